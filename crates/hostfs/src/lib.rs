//! Host file helpers every part of Warren shares: files written whole or not at all (private
//! ones readable by their owner only), and the host's mount table read once, the same way.
//!
//! Nothing here resolves a path inside a tenant's tree: those go through the runtime's
//! `openat2` walks (`warren-runtime`'s `sys`).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The character devices (major, minor) every workspace may have and open: null, zero, full,
/// random, urandom, tty, console, ptmx (what base images such as mmdebstrap's ship in `/dev`).
/// Images may hold no other device; a workspace's cgroups let it open no other (but for the
/// pseudo-terminals and the FUSE and TUN devices its own engine needs).
pub const STANDARD_CHAR_DEVICES: [(u64, u64); 8] = [
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 1),
    (5, 2),
];

/// A name beside `path` that no other writer (thread or process) uses at the same time.
fn temporary_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `bytes` to a fresh temporary file beside `path` with `mode`, synced to disk; the
/// caller then puts it in place. Removed again on failure.
fn write_temporary(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    let tmp = temporary_beside(path);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // The umask may have taken bits away; a private file must not have gained any.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Syncs the folder holding `path`, so a rename into it survives a crash.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

/// Writes `path` whole or not at all, with `mode`: a crash leaves either the old file or the
/// new one, never a part of either.
pub fn write_whole(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = write_temporary(path, bytes, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Writes a file only its owner may read (0600), whole or not at all.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_whole(path, bytes, 0o600)
}

/// Creates a private file (0600) whole, unless `path` already exists: then nothing is written
/// and `false` comes back. Two callers racing both see one file, written by one of them.
pub fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let tmp = write_temporary(path, bytes, 0o600)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_parent(path).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// One mount of this process's mount namespace (a line of `/proc/self/mountinfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted, unescaped (`\040` is a space).
    pub mount_point: PathBuf,
    /// The filesystem type (`overlay`, `fuse.warren-lazyfs`, ...).
    pub fstype: String,
}

/// This process's mounts, in mount order; empty if the table cannot be read.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|table| parse_mountinfo(&table))
        .unwrap_or_default()
}

fn parse_mountinfo(table: &str) -> Vec<Mount> {
    table
        .lines()
        .filter_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            Some(Mount {
                mount_point: unescape(fields.split(' ').nth(4)?).into(),
                fstype: fs.split(' ').next()?.to_owned(),
            })
        })
        .collect()
}

/// Mount points at or under `path`, deepest first (the order to unmount them in).
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(path))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// True if something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|m| m.mount_point == path)
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some(i) = rest.iter().position(|&b| b == b'\\') {
        out.extend_from_slice(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                rest = &rest[i + 4..];
            }
            None => {
                out.push(b'\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.extend_from_slice(rest);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape(r"/x\"), r"/x\");
        assert_eq!(unescape(r"/\303\251t\303\251"), "/été");
        let table = "36 35 98:0 / /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw\n\
                     37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            parse_mountinfo(table),
            vec![
                Mount {
                    mount_point: "/mnt/my disk".into(),
                    fstype: "ext3".into()
                },
                Mount {
                    mount_point: "/proc".into(),
                    fstype: "proc".into()
                },
            ]
        );
    }

    #[test]
    fn this_process_sees_its_root_and_proc() {
        assert!(is_mounted(Path::new("/")));
        assert!(mounts().iter().any(|m| m.fstype == "proc"));
        assert!(!is_mounted(Path::new("/no/such/mount")));
    }

    #[test]
    fn a_private_file_replaces_the_old_one_and_only_its_owner_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_whole(&path, b"open", 0o644).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn a_private_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert!(create_private(&path, b"first").unwrap());
        assert!(!create_private(&path, b"second").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub");
        std::fs::create_dir(&path).unwrap();
        // Renaming a file over a folder fails: the temporary file goes too.
        assert!(write_private(&path, b"x").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
