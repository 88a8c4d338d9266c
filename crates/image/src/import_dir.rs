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
    #[error("cannot read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirImportError + '_ {
    move |source| DirImportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Adds the tree under `root` to `builder` (the root folder's own metadata included).
pub fn import_dir(builder: &mut ImageBuilder, root: &Path) -> Result<(), DirImportError> {
    let meta = fs::symlink_metadata(root).map_err(io_err(root))?;
    let mut top = entry_from(Vec::new(), &meta, root)?;
    top.kind = EntryKind::Dir;
    builder.add(top)?;
    let mut seen_inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
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
            let mut entry = entry_from(child_rel.clone(), &meta, &path)?;
            match entry.kind {
                EntryKind::Dir => {
                    builder.add(entry)?;
                    stack.push((path, child_rel));
                }
                EntryKind::File => {
                    let key = (meta.dev(), meta.ino());
                    if meta.nlink() > 1 {
                        if let Some(first) = seen_inodes.get(&key) {
                            entry.kind = EntryKind::Hardlink;
                            entry.link = first.clone();
                            builder.add(entry)?;
                            continue;
                        }
                        seen_inodes.insert(key, child_rel);
                    }
                    let file = File::open(&path).map_err(io_err(&path))?;
                    builder.add_file(entry, std::io::BufReader::with_capacity(1 << 20, file))?;
                }
                _ => builder.add(entry)?,
            }
        }
    }
    Ok(())
}

fn entry_from(rel: Vec<u8>, meta: &fs::Metadata, path: &Path) -> Result<Entry, DirImportError> {
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
