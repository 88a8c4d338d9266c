//! Import from a directory on this host: every entry with its metadata, extended attributes
//! (`security.capability` included) and hard links; symlinks are recorded, never followed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
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
/// a path to reach it, its path in the image and its metadata (symlinks not followed); `visit`
/// says whether to go into a folder.
///
/// The tree may be a tenant's, changing while it is read: each folder is held open (opened
/// relative to its parent with `O_NOFOLLOW`, and checked to be the folder that was looked at),
/// and an entry's path is `/proc/self/fd/<its folder>/<name>`, so no component above the entry
/// is resolved again: a folder swapped for a symlink meanwhile is never followed out of the
/// tree. (The entry itself is opened with `O_NOFOLLOW` by whoever reads it.)
pub(crate) fn walk<E: From<DirImportError>>(
    root: &Path,
    mut visit: impl FnMut(&Path, Vec<u8>, &fs::Metadata) -> Result<bool, E>,
) -> Result<(), E> {
    let top = open_dir(None, root, root)?;
    // A folder still to read: its parent (held open while any child waits), its name, the
    // (device, inode) seen, its path for messages and in the image.
    struct Pending {
        parent: std::rc::Rc<File>,
        name: std::ffi::OsString,
        seen: (u64, u64),
        shown: PathBuf,
        rel: Vec<u8>,
    }
    let mut read_one = |dir: std::rc::Rc<File>,
                        shown: &Path,
                        rel: &[u8],
                        stack: &mut Vec<Pending>|
     -> Result<(), E> {
        let at = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let mut names: Vec<_> = fs::read_dir(&at)
            .map_err(io_err(shown))?
            .map(|c| c.map(|c| c.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(shown))?;
        names.sort();
        for name in names {
            let path = at.join(&name);
            let mut child_rel = rel.to_vec();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(name.as_bytes());
            let meta = fs::symlink_metadata(&path).map_err(io_err(&shown.join(&name)))?;
            if visit(&path, child_rel.clone(), &meta)? && meta.is_dir() {
                stack.push(Pending {
                    parent: dir.clone(),
                    shown: shown.join(&name),
                    name,
                    seen: (meta.dev(), meta.ino()),
                    rel: child_rel,
                });
            }
        }
        Ok(())
    };
    let mut stack = Vec::new();
    read_one(std::rc::Rc::new(top), root, &[], &mut stack)?;
    while let Some(next) = stack.pop() {
        let dir = open_dir(Some((&next.parent, &next.name)), &next.shown, root)?;
        let opened = dir.metadata().map_err(io_err(&next.shown))?;
        if (opened.dev(), opened.ino()) != next.seen {
            return Err(io_err(&next.shown)(std::io::Error::other(
                "the folder changed while it was read",
            ))
            .into());
        }
        read_one(std::rc::Rc::new(dir), &next.shown, &next.rel, &mut stack)?;
    }
    Ok(())
}

/// Opens a folder, never through a symlink: `root` itself, or `name` in the open folder
/// `parent`.
fn open_dir(
    parent: Option<(&File, &std::ffi::OsStr)>,
    shown: &Path,
    root: &Path,
) -> Result<File, DirImportError> {
    let flags =
        nix::libc::O_RDONLY | nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC;
    let (dirfd, name) = match parent {
        Some((fd, name)) => (fd.as_raw_fd(), name.as_bytes()),
        None => (nix::libc::AT_FDCWD, root.as_os_str().as_bytes()),
    };
    let name = std::ffi::CString::new(name)
        .map_err(|_| io_err(shown)(std::io::Error::other("a name with a NUL byte")))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call, and `dirfd` an open
    // folder (or AT_FDCWD); the descriptor returned is owned by nothing else.
    let fd = unsafe { nix::libc::openat(dirfd, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io_err(shown)(std::io::Error::last_os_error()));
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant swaps a folder the walk has listed but not yet read for a symlink to a folder
    /// of the host's: the walk stops there, and never lists what the host's folder holds.
    #[test]
    fn a_folder_swapped_for_a_symlink_mid_walk_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "the host's").unwrap();
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir(tree.path().join("a")).unwrap();
        fs::write(tree.path().join("a/mine"), "the tenant's").unwrap();
        let mut seen = Vec::new();
        let walked = walk::<DirImportError>(tree.path(), |_, rel, _| {
            if rel == b"a" {
                fs::rename(tree.path().join("a"), tree.path().join("a.old")).unwrap();
                std::os::unix::fs::symlink(outside.path(), tree.path().join("a")).unwrap();
            }
            seen.push(String::from_utf8(rel).unwrap());
            Ok(true)
        });
        assert!(walked.is_err(), "{seen:?}");
        assert_eq!(seen, ["a"]);
    }

    /// The same folder name made anew (another inode) is refused too.
    #[test]
    fn a_folder_replaced_mid_walk_is_refused() {
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir(tree.path().join("a")).unwrap();
        let walked = walk::<DirImportError>(tree.path(), |_, rel, _| {
            if rel == b"a" {
                fs::rename(tree.path().join("a"), tree.path().join("a.old")).unwrap();
                fs::create_dir(tree.path().join("a")).unwrap();
            }
            Ok(true)
        });
        let message = walked.unwrap_err().to_string();
        assert!(message.contains("changed while it was read"), "{message}");
    }
}
