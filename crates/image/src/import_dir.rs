//! Import from a directory on this host: every entry with its metadata, extended attributes
//! (`security.capability` included) and hard links; symlinks are recorded, never followed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::builder::{BuildError, ImageBuilder};
use crate::index::{Entry, EntryKind};

#[derive(Debug, thiserror::Error)]
pub enum DirImportError {
    #[error("cannot read `{}`: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirImportError + '_ {
    move |cause| DirImportError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Adds the tree under `root` to `builder` (the root folder's own metadata included).
pub fn import_dir(builder: &mut ImageBuilder, root: &Path) -> Result<(), DirImportError> {
    let meta = fs::symlink_metadata(root).map_err(io_err(root))?;
    let mut top = entry_from(Vec::new(), &meta, root)?;
    top.kind = EntryKind::Dir;
    builder.add(top)?;
    let mut links = HardLinks::default();
    walk(root, |path, rel, meta| {
        let entry = entry_from(rel, meta, path)?;
        let is_dir = entry.kind == EntryKind::Dir;
        add_entry(builder, &mut links, entry, path, meta)?;
        Ok(is_dir)
    })
}

/// The first path seen of each multiply linked file, by inode.
#[derive(Default)]
pub(crate) struct HardLinks(HashMap<(u64, u64), Vec<u8>>);

/// Visits every entry under `root` (not `root` itself), each folder's children by name, with
/// its path on disk, its path in the image and its metadata (symlinks not followed); `visit`
/// says whether to go into a folder.
pub(crate) fn walk<E: From<DirImportError>>(
    root: &Path,
    mut visit: impl FnMut(&Path, Vec<u8>, &fs::Metadata) -> Result<bool, E>,
) -> Result<(), E> {
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut children: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let path = child.path();
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(child.file_name().as_bytes());
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if visit(&path, child_rel.clone(), &meta)? && meta.is_dir() {
                stack.push((path, child_rel));
            }
        }
    }
    Ok(())
}

/// Adds one entry read from disk: a regular file with its content (or as a hard link to the
/// first path of its inode), anything else as it is.
pub(crate) fn add_entry(
    builder: &mut ImageBuilder,
    links: &mut HardLinks,
    mut entry: crate::index::Entry,
    path: &Path,
    meta: &fs::Metadata,
) -> Result<(), DirImportError> {
    if entry.kind != EntryKind::File {
        return Ok(builder.add(entry)?);
    }
    let key = (meta.dev(), meta.ino());
    if meta.nlink() > 1 {
        if let Some(first) = links.0.get(&key) {
            entry.kind = EntryKind::Hardlink;
            entry.link = first.clone();
            return Ok(builder.add(entry)?);
        }
        links.0.insert(key, entry.path.clone());
    }
    // The same file as looked at: not a link or a FIFO put in its place meanwhile.
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        File::options()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(io_err(path))?
    };
    let opened = file.metadata().map_err(io_err(path))?;
    if !opened.is_file() || (opened.dev(), opened.ino()) != key {
        return Err(io_err(path)(std::io::Error::other(
            "the file changed while it was read",
        )));
    }
    Ok(builder.add_file(entry, std::io::BufReader::with_capacity(1 << 20, file))?)
}

pub(crate) fn entry_from(
    rel: Vec<u8>,
    meta: &fs::Metadata,
    path: &Path,
) -> Result<Entry, DirImportError> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_char_device() {
        EntryKind::CharDevice
    } else if ft.is_block_device() {
        EntryKind::BlockDevice
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        EntryKind::Socket
    };
    let mut e = Entry::new(rel, kind, meta.mode());
    e.uid = meta.uid();
    e.gid = meta.gid();
    e.mtime = meta.mtime();
    e.mtime_nsec = u32::try_from(meta.mtime_nsec()).unwrap_or(0);
    if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
        e.rdev = meta.rdev();
    }
    if kind == EntryKind::Symlink {
        e.link = fs::read_link(path)
            .map_err(io_err(path))?
            .as_os_str()
            .as_bytes()
            .to_vec();
    }
    // `xattr::list` and `get` do not follow symlinks.
    if let Ok(names) = xattr::list(path) {
        for name in names {
            let Some(name_str) = name.to_str() else {
                continue;
            };
            if let Ok(Some(value)) = xattr::get(path, &name) {
                e.xattrs.push((name_str.to_owned(), value));
            }
        }
        e.xattrs.sort();
    }
    Ok(e)
}
