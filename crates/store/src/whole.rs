//! Whole-file copies: a large file of an image, once all its chunks are in the host cache and
//! it has been read to its end, is also kept as one plain file, `files/<key>` beside the
//! cache's segments, so that the kernel can read it straight from the host's disk (FUSE
//! passthrough) instead of asking the image's mount for every MiB. Through the mount a read
//! costs two copies of every byte in the server (segment to buffer, buffer to the kernel);
//! from a copy, none.
//!
//! - The key is the hash of the file's size and chunk ids: identical files of different images
//!   (a library every version of a prebuild has) share one copy.
//! - Copies are made one at a time on the host, under `files/.lock`: each is written to a
//!   temporary file, synced, and renamed into place without replacing one made meanwhile. A
//!   crash leaves a temporary file (removed by the next maker, as nobody else can be writing
//!   one), never a short copy under a key. Its bytes come from verified chunks.
//! - Copies take at most a quarter of the cache's limit, or without a limit a quarter of what
//!   they use plus the disk's free space, and one copy at most an eighth of that; none is made
//!   that would leave the disk under a tenth free. A copy a file of a mount has open is held
//!   with a shared `flock` and never dropped; of the others the least recently opened go
//!   first. Open copies can therefore hold more than the budget, but only while they are open;
//!   a copy dropped while still mapped into memory (its file closed) keeps its blocks until
//!   unmapped, which the free-space floor bounds.
//! - Only the mount processes (host root) open or write them; the folder is root's alone.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use warren_image::ChunkId;

/// Files smaller than this are not worth a copy: a read of one is a request or two.
pub const WHOLE_FILE_MIN: u64 = 1 << 20;
/// Names of temporary copies begin with this.
const MAKING: &str = ".making-";
const LOCK: &str = ".lock";

#[derive(Debug)]
pub struct WholeFiles {
    dir: PathBuf,
    /// The cache's limit, if it has one.
    cache_limit: Option<u64>,
}

/// A copy open for reading, held (a shared `flock`) so that no maker drops it meanwhile.
#[derive(Debug)]
pub struct HeldCopy(pub File);

impl WholeFiles {
    /// The copies of the chunk cache at `cache_dir`, whose size is capped at `cache_limit`.
    pub(crate) fn new(cache_dir: &Path, cache_limit: Option<u64>) -> WholeFiles {
        WholeFiles {
            dir: cache_dir.join("files"),
            cache_limit,
        }
    }

    /// The name of a copy of a file of `size` bytes made of `chunks`.
    pub fn key<'a>(size: u64, chunks: impl IntoIterator<Item = &'a ChunkId>) -> String {
        let size = size.to_le_bytes();
        let parts = std::iter::once(&size[..]).chain(chunks.into_iter().map(|id| &id.0[..]));
        ChunkId::of_parts(parts).to_hex()
    }

    /// The copy named `key`, open for reading and held, if there is one of `size` bytes; its
    /// time is touched (copies are dropped least recently opened first).
    pub fn open(&self, key: &str, size: u64) -> Option<HeldCopy> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.dir.join(key))
            .ok()?;
        // A maker dropping it holds it exclusively, and unlinks it before letting go.
        file.try_lock_shared().ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() != size || meta.nlink() == 0 {
            return None;
        }
        let _ = file.set_modified(SystemTime::now());
        Some(HeldCopy(file))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.dir.join(key).exists()
    }

    /// Makes the copy `key` of `size` bytes, which `fill` writes; false if it would not fit.
    /// Waits while another process makes one.
    pub fn make(
        &self,
        key: &str,
        size: u64,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.dir.join(LOCK))?;
        lock.lock()?;
        if self.exists(key) {
            return Ok(false);
        }
        if !self.make_room(size)? {
            return Ok(false);
        }
        let mut temporary = tempfile::Builder::new()
            .prefix(MAKING)
            .tempfile_in(&self.dir)?;
        fill(temporary.as_file_mut())?;
        let written = temporary.as_file().metadata()?.len();
        if written != size {
            return Err(std::io::Error::other(format!(
                "a copy of {size} bytes came out {written}"
            )));
        }
        temporary.as_file().sync_all()?;
        match temporary.persist_noclobber(self.dir.join(key)) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.error),
        }
    }

    /// With the makers' lock held: drops the least recently opened copies nobody reads from
    /// until `need` more bytes fit the budget; false if they never could. Removes temporary
    /// files (a crashed maker's: only the lock's holder writes one).
    fn make_room(&self, need: u64) -> std::io::Result<bool> {
        let mut copies = Vec::new();
        let mut used = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(MAKING.as_bytes()) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if name == LOCK || !meta.is_file() {
                continue;
            }
            let bytes = meta.blocks() * 512;
            used += bytes;
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            copies.push((modified, bytes, entry.path()));
        }
        let (free, disk) = free_bytes(&self.dir)?;
        let budget = match self.cache_limit {
            Some(limit) => limit / 4,
            None => (used + free) / 4,
        };
        // Whatever the budget, a copy never takes the disk under a tenth free: copies dropped
        // while a mapping still reads them keep their blocks until it goes.
        if need > budget / 8 || free.saturating_sub(need) < disk / 10 {
            return Ok(false);
        }
        copies.sort();
        let mut oldest = copies.into_iter();
        while used + need > budget {
            let Some((_, bytes, path)) = oldest.next() else {
                return Ok(false);
            };
            if drop_unheld(&path)? {
                used -= bytes;
            }
        }
        Ok(true)
    }
}

/// Deletes the copy at `path` unless the kernel reads from it (someone holds it); true if it
/// went.
fn drop_unheld(path: &Path) -> std::io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    if file.try_lock().is_err() {
        return Ok(false);
    }
    // Unlinked while held: an opener that gets its shared lock after this sees no links.
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`, and its size.
fn free_bytes(dir: &Path) -> std::io::Result<(u64, u64)> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type, filled on success.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok((
        st.f_bavail.saturating_mul(st.f_frsize),
        st.f_blocks.saturating_mul(st.f_frsize),
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::Duration;

    use super::*;

    fn copy_of(files: &WholeFiles, key: &str, bytes: &[u8]) -> bool {
        files
            .make(key, bytes.len() as u64, |f| f.write_all(bytes))
            .unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("files"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_copy_is_found_by_key_and_size_and_the_oldest_unheld_make_room() {
        let dir = tempfile::tempdir().unwrap();
        // A limit of 256 KiB: copies get 64 KiB, one at most 8 KiB.
        let files = WholeFiles::new(dir.path(), Some(256 << 10));
        let a = vec![1u8; 8 << 10];
        assert!(copy_of(&files, "a", &a));
        let mut read = Vec::new();
        let held = files.open("a", a.len() as u64).unwrap();
        std::io::Read::read_to_end(&mut &held.0, &mut read).unwrap();
        assert_eq!(read, a);
        assert!(
            files.open("a", 1).is_none(),
            "a copy of another size is not it"
        );
        assert!(files.open("b", a.len() as u64).is_none());
        assert!(
            !copy_of(&files, "big", &vec![0u8; 9 << 10]),
            "over an eighth"
        );
        // Eight fill the budget; each one more drops the oldest not held: `a` is held.
        for n in 0..8 {
            std::thread::sleep(Duration::from_millis(20));
            assert!(copy_of(&files, &format!("{n}"), &a));
        }
        assert_eq!(names(dir.path()), ["1", "2", "3", "4", "5", "6", "7", "a"]);
        drop(held);
        std::thread::sleep(Duration::from_millis(20));
        assert!(copy_of(&files, "8", &a));
        assert_eq!(names(dir.path()), ["1", "2", "3", "4", "5", "6", "7", "8"]);
        assert!(!copy_of(&files, "8", &a), "made once");
    }

    #[test]
    fn a_failed_or_short_copy_leaves_nothing_under_its_key_nor_a_crash_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let files = WholeFiles::new(dir.path(), None);
        let failed = files.make("k", 10, |f| {
            f.write_all(b"12345")?;
            Err(std::io::Error::other("a chunk went missing"))
        });
        assert!(failed.is_err());
        assert!(files.make("k", 10, |f| f.write_all(b"12345")).is_err());
        assert!(!files.exists("k"));
        assert!(names(dir.path()).is_empty());
        // A maker that died mid-copy: the next one removes its temporary.
        fs::write(dir.path().join("files/.making-dead"), b"half").unwrap();
        assert!(copy_of(&files, "k", b"1234567890"));
        assert_eq!(names(dir.path()), ["k"]);
    }

    #[test]
    fn a_symlink_under_a_key_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let files = WholeFiles::new(dir.path(), None);
        fs::create_dir_all(dir.path().join("files")).unwrap();
        fs::write(dir.path().join("target"), b"1234").unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("files/k")).unwrap();
        assert!(files.open("k", 4).is_none());
    }

    #[test]
    fn the_key_depends_on_size_and_every_chunk() {
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let k = WholeFiles::key(2, [&a, &b]);
        assert_ne!(k, WholeFiles::key(2, [&b, &a]));
        assert_ne!(k, WholeFiles::key(3, [&a, &b]));
        assert_eq!(k, WholeFiles::key(2, [&a, &b]));
    }
}
