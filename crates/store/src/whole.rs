//! Whole-file copies: a large file of an image, once all its chunks are in the host cache, is
//! also kept as one plain file, `files/<key>` beside the cache's segments, so that the kernel
//! can read it straight from the host's disk (FUSE passthrough) instead of asking the image's
//! mount for every MiB. Through the mount a read costs two copies of every byte in the server
//! (segment to buffer, buffer to the kernel); from a copy, none.
//!
//! - The key is the hash of the file's size and chunk ids: identical files of different images
//!   (a library every version of a prebuild has) share one copy.
//! - A copy is written to a temporary file, synced, and renamed into place without replacing
//!   one another process made meanwhile; a crash leaves a temporary file, never a short copy
//!   under a key. Its bytes come from verified chunks.
//! - Copies take at most a quarter of the cache's limit, or without a limit a quarter of what
//!   they use plus the disk's free space; the least recently opened go first. A copy deleted
//!   while open stays readable until closed.
//! - Only the mount processes (host root) open or write them; the folder is root's alone.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use warren_image::ChunkId;

/// Files smaller than this are not worth a copy: a read of one is a request or two.
pub const WHOLE_FILE_MIN: u64 = 1 << 20;
/// A temporary file older than this was left by a crash.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct WholeFiles {
    dir: PathBuf,
    /// The cache's limit, if it has one.
    cache_limit: Option<u64>,
}

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
        let mut bytes = size.to_le_bytes().to_vec();
        for id in chunks {
            bytes.extend_from_slice(&id.0);
        }
        ChunkId::of(&bytes).to_hex()
    }

    /// The copy named `key`, open for reading, if there is one of `size` bytes; its time is
    /// touched (copies are dropped least recently opened first).
    pub fn open(&self, key: &str, size: u64) -> Option<File> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.dir.join(key))
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() != size {
            return None;
        }
        let _ = file.set_modified(SystemTime::now());
        Some(file)
    }

    pub fn exists(&self, key: &str) -> bool {
        self.dir.join(key).exists()
    }

    /// Makes the copy `key` of `size` bytes, which `fill` writes; false if it would not fit.
    /// Another process making the same copy at the same time is no error.
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
        if !self.make_room(size)? {
            return Ok(false);
        }
        let mut temporary = tempfile::Builder::new()
            .prefix(".making-")
            .tempfile_in(&self.dir)?;
        fill(temporary.as_file_mut())?;
        temporary.as_file_mut().flush()?;
        let written = temporary.as_file().metadata()?.len();
        if written != size {
            return Err(std::io::Error::other(format!(
                "a copy of {size} bytes came out {written}"
            )));
        }
        temporary.as_file().sync_all()?;
        match temporary.persist_noclobber(self.dir.join(key)) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(true),
            Err(e) => Err(e.error),
        }
    }

    /// Drops the least recently opened copies until `need` more bytes fit the budget; false
    /// if they never could. Removes temporary files a crash left.
    fn make_room(&self, need: u64) -> std::io::Result<bool> {
        let mut copies = Vec::new();
        let mut used = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                if modified.elapsed().is_ok_and(|age| age > STALE_TEMPORARY) {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            used += meta.blocks() * 512;
            copies.push((modified, meta.blocks() * 512, entry.path()));
        }
        let budget = match self.cache_limit {
            Some(limit) => limit / 4,
            None => (used + free_bytes(&self.dir)?) / 4,
        };
        if need > budget {
            return Ok(false);
        }
        copies.sort();
        let mut oldest = copies.into_iter();
        while used + need > budget {
            let Some((_, bytes, path)) = oldest.next() else {
                return Ok(false);
            };
            match fs::remove_file(&path) {
                Ok(()) => used -= bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => used -= bytes,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type, filled on success.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_of(files: &WholeFiles, key: &str, bytes: &[u8]) -> bool {
        files
            .make(key, bytes.len() as u64, |f| f.write_all(bytes))
            .unwrap()
    }

    #[test]
    fn a_copy_is_found_by_key_and_size_and_the_oldest_make_room() {
        let dir = tempfile::tempdir().unwrap();
        // A limit of 64 KiB: copies get 16 KiB.
        let files = WholeFiles::new(dir.path(), Some(64 << 10));
        let a = vec![1u8; 8 << 10];
        assert!(copy_of(&files, "a", &a));
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut files.open("a", a.len() as u64).unwrap(), &mut read)
            .unwrap();
        assert_eq!(read, a);
        assert!(
            files.open("a", 1).is_none(),
            "a copy of another size is not it"
        );
        assert!(files.open("b", a.len() as u64).is_none());
        // Two more of 8 KiB: the first goes.
        std::thread::sleep(Duration::from_millis(20));
        assert!(copy_of(&files, "b", &a));
        std::thread::sleep(Duration::from_millis(20));
        assert!(copy_of(&files, "c", &a));
        assert!(!files.exists("a") && files.exists("b") && files.exists("c"));
        // Larger than the whole budget: never made.
        assert!(!copy_of(&files, "d", &vec![0u8; 20 << 10]));
        assert!(!files.exists("d"));
    }

    #[test]
    fn a_failed_or_short_copy_leaves_nothing_under_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let files = WholeFiles::new(dir.path(), None);
        let failed = files.make("k", 10, |f| {
            f.write_all(b"12345")?;
            Err(std::io::Error::other("a chunk went missing"))
        });
        assert!(failed.is_err());
        assert!(files.make("k", 10, |f| f.write_all(b"12345")).is_err());
        assert!(!files.exists("k"));
        let names: Vec<_> = fs::read_dir(dir.path().join("files")).unwrap().collect();
        assert!(names.is_empty(), "temporary files are removed: {names:?}");
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
