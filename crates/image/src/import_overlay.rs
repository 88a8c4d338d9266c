//! Import of an overlayfs writable layer (`upperdir`) on top of the image it was mounted over:
//! what a sandbox changed, and nothing else, so committing a step costs what the step wrote.
//!
//! The layer is read as overlayfs leaves it: a whiteout (a character device 0:0) removes what
//! the lower tree had at its path, an opaque folder (`trusted.overlay.opaque=y`) hides the
//! lower folder's content, anything else replaces the entry at its path. Ids are the host's,
//! shifted by the sandbox's id offset; they are shifted back. A layer made with `redirect_dir`
//! or `metacopy` (its content partly elsewhere) is refused, and the caller commits the whole
//! tree instead.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::builder::ImageBuilder;
use crate::import_dir::{DirImportError, HardLinks, add_entry, entry_from, walk};
use crate::index::EntryKind;

/// The id a file owned outside the sandbox's range shows inside (`nobody`).
const OVERFLOW_ID: u32 = 65534;

/// Ids per sandbox.
const ID_RANGE: u32 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum OverlayImportError {
    #[error(transparent)]
    Read(#[from] DirImportError),
    #[error(
        "`{path}` is an overlay {feature} entry: the layer is not self-contained, commit the whole tree"
    )]
    NotSelfContained { path: String, feature: &'static str },
}

fn shift(id: u32, offset: u32) -> u32 {
    match id.checked_sub(offset) {
        Some(inside) if inside < ID_RANGE => inside,
        _ => OVERFLOW_ID,
    }
}

/// Applies the writable layer at `upper` to `builder`, which holds the lower image's tree
/// ([`ImageBuilder::start_from`]). `id_offset` is the host id of the sandbox's root.
pub fn apply_overlay_upper(
    builder: &mut ImageBuilder,
    upper: &Path,
    id_offset: u32,
) -> Result<(), OverlayImportError> {
    let mut links = HardLinks::default();
    walk(upper, |path, rel, meta| {
        if meta.file_type().is_char_device() && meta.rdev() == 0 {
            builder.remove(&rel);
            return Ok(false);
        }
        let mut entry = entry_from(rel.clone(), meta, path)?;
        for (name, feature) in [
            ("trusted.overlay.redirect", "redirect_dir"),
            ("trusted.overlay.metacopy", "metacopy"),
        ] {
            if entry.xattrs.iter().any(|(n, _)| n == name) {
                return Err(OverlayImportError::NotSelfContained {
                    path: entry.path_str(),
                    feature,
                });
            }
        }
        let opaque = entry
            .xattrs
            .iter()
            .any(|(n, v)| n == "trusted.overlay.opaque" && v == b"y");
        entry
            .xattrs
            .retain(|(n, _)| !n.starts_with("trusted.overlay."));
        entry.uid = shift(entry.uid, id_offset);
        entry.gid = shift(entry.gid, id_offset);
        let is_dir = entry.kind == EntryKind::Dir;
        let was_dir = builder.entry(&rel).map(|e| e.kind) == Some(EntryKind::Dir);
        // What the layer holds replaces what was there, except that a folder over a folder
        // merges with it unless it is opaque.
        if !(is_dir && was_dir && !opaque) {
            builder.remove(&rel);
        }
        add_entry(builder, &mut links, entry, path, meta)?;
        Ok(is_dir)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{ChunkParams, Limits};
    use crate::index::Entry;
    use std::fs;

    fn base(work: &Path) -> crate::TreeIndex {
        let mut b = ImageBuilder::new(work, ChunkParams::default(), Limits::default());
        for dir in ["etc", "gone", "hidden", "hidden/deep", "becomes-file"] {
            b.add(Entry::new(dir.as_bytes().to_vec(), EntryKind::Dir, 0o755))
                .unwrap();
        }
        for (path, text) in [
            ("etc/keep", "keep"),
            ("etc/change", "old"),
            ("gone/a", "a"),
            ("hidden/deep/x", "x"),
            ("becomes-file/y", "y"),
        ] {
            b.add_file(
                Entry::new(path.as_bytes().to_vec(), EntryKind::File, 0o644),
                text.as_bytes(),
            )
            .unwrap();
        }
        b.finish().unwrap().index
    }

    #[test]
    fn an_upper_layer_applies_over_its_lower_tree() {
        let work = tempfile::tempdir().unwrap();
        let lower = base(work.path());
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        fs::create_dir(u.join("etc")).unwrap();
        fs::write(u.join("etc/change"), "new").unwrap();
        fs::write(u.join("etc/added"), "added").unwrap();
        std::os::unix::fs::chown(
            u.join("etc/added"),
            Some(100_000 + 1000),
            Some(100_000 + 1000),
        )
        .unwrap();
        // Whiteouts: a removed folder and a removed file.
        for w in ["gone", "etc/keep-not"] {
            nix::sys::stat::mknod(
                &u.join(w),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o000),
                0,
            )
            .unwrap();
        }
        // An opaque folder: the lower content is hidden.
        fs::create_dir(u.join("hidden")).unwrap();
        fs::write(u.join("hidden/fresh"), "fresh").unwrap();
        xattr::set(u.join("hidden"), "trusted.overlay.opaque", b"y").unwrap();
        // A folder replaced by a file.
        fs::write(u.join("becomes-file"), "now a file").unwrap();

        let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
        b.start_from(&lower);
        apply_overlay_upper(&mut b, u, 100_000).unwrap();
        let built = b.finish().unwrap().index;
        let paths: Vec<String> = built.entries.iter().map(|e| e.path_str()).collect();
        assert_eq!(
            paths,
            [
                "",
                "becomes-file",
                "etc",
                "etc/added",
                "etc/change",
                "etc/keep",
                "hidden",
                "hidden/fresh"
            ]
        );
        let added = &built.entries[built.find(b"etc/added").unwrap()];
        assert_eq!((added.uid, added.gid), (1000, 1000));
        let hidden = &built.entries[built.find(b"hidden").unwrap()];
        assert!(hidden.xattrs.is_empty(), "{:?}", hidden.xattrs);
        // Unchanged files keep their chunks; the new content is stored.
        let keep = &built.entries[built.find(b"etc/keep").unwrap()];
        assert_eq!(keep.size, 4);

        xattr::set(u.join("etc"), "trusted.overlay.redirect", b"/x").unwrap();
        let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
        b.start_from(&lower);
        assert!(matches!(
            apply_overlay_upper(&mut b, u, 100_000),
            Err(OverlayImportError::NotSelfContained { .. })
        ));
    }
}
