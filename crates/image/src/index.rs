//! The tree index: every entry of an image's filesystem tree, and where each chunk of file data
//! lives. It is small, fetched whole before a mount, and the only thing a mount needs to answer
//! `stat` and `readdir` without touching file data.
//!
//! Encoding: the magic `WRNIDX01`, then a zstd frame of the postcard encoding of [`TreeIndex`].
//! An index from a registry is untrusted: [`TreeIndex::decode`] checks every reference in it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::digest::{ChunkId, Digest};

const MAGIC: &[u8; 8] = b"WRNIDX01";
/// Refuse to decode an index whose decompressed form is larger than this.
const MAX_DECODED_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeIndex {
    /// The pack blobs that hold this image's chunks (they may be shared with other images).
    pub blobs: Vec<Digest>,
    pub chunks: Vec<ChunkLoc>,
    /// Sorted by path; `entries[0]` is the root directory (empty path).
    pub entries: Vec<Entry>,
}

/// Where a chunk lives: `compressed_len` bytes at `offset` of pack `blobs[blob]`, a zstd frame
/// that decompresses to `len` bytes whose BLAKE3 hash is `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    pub id: ChunkId,
    pub blob: u32,
    pub offset: u64,
    pub compressed_len: u32,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    /// Another name for the regular file at `link` (an earlier entry).
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the image root, `/`-separated, no `.` or `..`; empty for the root.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// File size in bytes (regular files; 0 otherwise).
    pub size: u64,
    /// Device number of a character or block device.
    pub rdev: u64,
    /// The target of a symlink, or the path of a hard link's file.
    pub link: Vec<u8>,
    /// Extended attributes, sorted by name (`security.capability` among them).
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// For regular files: indices into [`TreeIndex::chunks`], in file order.
    pub chunks: Vec<u32>,
}

impl Entry {
    pub fn new(path: Vec<u8>, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path,
            kind,
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            rdev: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            chunks: Vec::new(),
        }
    }

    pub fn path_str(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// The folder holding this entry (`None` for the root).
    pub fn parent(&self) -> Option<&[u8]> {
        if self.path.is_empty() {
            return None;
        }
        Some(match self.path.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.path[..i],
            None => &[],
        })
    }

    pub fn name(&self) -> &[u8] {
        match self.path.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.path[i + 1..],
            None => &self.path,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not a Warren tree index (bad magic)")]
    BadMagic,
    #[error("the tree index is corrupt: {0}")]
    Decompress(std::io::Error),
    #[error("the tree index is larger than {MAX_DECODED_BYTES} bytes when decompressed")]
    TooLarge,
    #[error("the tree index cannot be decoded: {0}")]
    Decode(postcard::Error),
    #[error("the tree index is inconsistent: {0}")]
    Inconsistent(String),
}

/// Checks that a path is relative, `/`-separated, with no empty, `.` or `..` component.
pub fn is_clean_path(path: &[u8]) -> bool {
    path.is_empty()
        || (!path.contains(&0)
            && path
                .split(|&b| b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".."))
}

/// Whether an image may hold this device (`rdev` as Linux encodes it): no block device at
/// all, and only the standard character devices. Anything else in a workspace's tree could
/// open a device of the host.
pub fn device_allowed(kind: EntryKind, rdev: u64) -> Result<(), String> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    match kind {
        EntryKind::BlockDevice => Err(format!(
            "block device {major}:{minor} is not allowed in an image"
        )),
        EntryKind::CharDevice
            if !warren_hostfs::STANDARD_CHAR_DEVICES.contains(&(major, minor)) =>
        {
            Err(format!(
                "character device {major}:{minor} is not allowed in an image"
            ))
        }
        _ => Ok(()),
    }
}

impl TreeIndex {
    pub fn encode(&self) -> Vec<u8> {
        let raw = postcard::to_stdvec(self).expect("serializing to memory cannot fail");
        let mut out = MAGIC.to_vec();
        out.extend(zstd::encode_all(&raw[..], 3).expect("compressing to memory cannot fail"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<TreeIndex, IndexError> {
        let body = bytes.strip_prefix(MAGIC).ok_or(IndexError::BadMagic)?;
        let mut raw = Vec::new();
        let decoder = zstd::Decoder::new(body).map_err(IndexError::Decompress)?;
        use std::io::Read as _;
        decoder
            .take(MAX_DECODED_BYTES + 1)
            .read_to_end(&mut raw)
            .map_err(IndexError::Decompress)?;
        if raw.len() as u64 > MAX_DECODED_BYTES {
            return Err(IndexError::TooLarge);
        }
        let index: TreeIndex = postcard::from_bytes(&raw).map_err(IndexError::Decode)?;
        index.validate()?;
        Ok(index)
    }

    /// Checks every internal reference, so that code serving the index can index without fear,
    /// and that it holds no device but the standard character devices ([`device_allowed`]),
    /// wherever the index came from (a registry is a tenant's too).
    pub fn validate(&self) -> Result<(), IndexError> {
        let bad = |m: String| Err(IndexError::Inconsistent(m));
        for (i, c) in self.chunks.iter().enumerate() {
            if c.blob as usize >= self.blobs.len() {
                return bad(format!(
                    "chunk {i} refers to blob {} of {}",
                    c.blob,
                    self.blobs.len()
                ));
            }
        }
        match self.entries.first() {
            Some(root) if root.path.is_empty() && root.kind == EntryKind::Dir => {}
            _ => return bad("the first entry is not the root folder".into()),
        }
        let mut kinds: HashMap<&[u8], EntryKind> = HashMap::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            let name = e.path_str();
            if !is_clean_path(&e.path) {
                return bad(format!("entry {i} has an unclean path `{name}`"));
            }
            if i > 0 && self.entries[i - 1].path >= e.path {
                return bad(format!("entries are not sorted and unique at `{name}`"));
            }
            if let Some(parent) = e.parent()
                && kinds.get(parent) != Some(&EntryKind::Dir)
            {
                return bad(format!("the parent of `{name}` is not a folder"));
            }
            let mut size = 0u64;
            for &c in &e.chunks {
                let Some(loc) = self.chunks.get(c as usize) else {
                    return bad(format!(
                        "`{name}` refers to chunk {c} of {}",
                        self.chunks.len()
                    ));
                };
                size += u64::from(loc.len);
            }
            match e.kind {
                EntryKind::File if size != e.size => {
                    return bad(format!(
                        "`{name}` is {} bytes but its chunks hold {size}",
                        e.size
                    ));
                }
                EntryKind::Hardlink if kinds.get(&e.link[..]) != Some(&EntryKind::File) => {
                    return bad(format!(
                        "hard link `{name}` does not point to an earlier file"
                    ));
                }
                EntryKind::File => {}
                EntryKind::CharDevice | EntryKind::BlockDevice
                    if let Err(why) = device_allowed(e.kind, e.rdev) =>
                {
                    return bad(format!("`{name}`: {why}"));
                }
                _ if !e.chunks.is_empty() || e.size != 0 => {
                    return bad(format!("`{name}` is not a file but has data"));
                }
                _ => {}
            }
            kinds.insert(&e.path, e.kind);
        }
        Ok(())
    }

    /// Total bytes of file data (each hard-linked file counted once).
    pub fn data_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.size)
            .sum()
    }

    /// The position of the entry at `path`, if any.
    pub fn find(&self, path: &[u8]) -> Option<usize> {
        self.entries.binary_search_by(|e| e.path[..].cmp(path)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TreeIndex {
        let mut file = Entry::new(b"etc/motd".to_vec(), EntryKind::File, 0o644);
        file.size = 5;
        file.chunks = vec![0];
        let mut link = Entry::new(b"etc/motd2".to_vec(), EntryKind::Hardlink, 0o644);
        link.link = b"etc/motd".to_vec();
        TreeIndex {
            blobs: vec![Digest::of(b"pack")],
            chunks: vec![ChunkLoc {
                id: ChunkId::of(b"hello"),
                blob: 0,
                offset: 0,
                compressed_len: 14,
                len: 5,
            }],
            entries: vec![
                Entry::new(Vec::new(), EntryKind::Dir, 0o755),
                Entry::new(b"etc".to_vec(), EntryKind::Dir, 0o755),
                file,
                link,
            ],
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let index = sample();
        assert_eq!(TreeIndex::decode(&index.encode()).unwrap(), index);
        assert_eq!(index.find(b"etc/motd"), Some(2));
        assert_eq!(index.entries[2].parent(), Some(&b"etc"[..]));
        assert_eq!(index.entries[1].parent(), Some(&b""[..]));
        assert_eq!(index.entries[2].name(), b"motd");
    }

    #[test]
    fn an_index_from_anywhere_holds_no_device_of_the_host() {
        let with = |kind: EntryKind, major: u64, minor: u64| {
            let mut index = sample();
            let mut dev = Entry::new(b"etc/dev".to_vec(), kind, 0o666);
            dev.rdev = nix::sys::stat::makedev(major, minor);
            index.entries.insert(2, dev);
            TreeIndex::decode(&index.encode()).map(|_| ())
        };
        let err = with(EntryKind::BlockDevice, 8, 0).unwrap_err().to_string();
        assert!(err.contains("block device 8:0 is not allowed"), "{err}");
        let err = with(EntryKind::CharDevice, 1, 1).unwrap_err().to_string();
        assert!(err.contains("character device 1:1 is not allowed"), "{err}");
        assert!(
            with(EntryKind::CharDevice, 1, 3).is_ok(),
            "/dev/null may be in an image"
        );
    }

    #[test]
    fn decode_rejects_inconsistent_indexes() {
        let mut bad = sample();
        bad.entries[2].size = 6;
        let err = TreeIndex::decode(&bad.encode()).unwrap_err().to_string();
        assert!(
            err.contains("`etc/motd` is 6 bytes but its chunks hold 5"),
            "{err}"
        );
        let mut bad = sample();
        bad.entries[2].path = b"etc/../motd".to_vec();
        assert!(matches!(
            TreeIndex::decode(&bad.encode()),
            Err(IndexError::Inconsistent(_))
        ));
        let mut bad = sample();
        bad.chunks[0].blob = 7;
        assert!(matches!(
            TreeIndex::decode(&bad.encode()),
            Err(IndexError::Inconsistent(_))
        ));
        let mut bad = sample();
        bad.entries.swap(2, 3);
        assert!(matches!(
            TreeIndex::decode(&bad.encode()),
            Err(IndexError::Inconsistent(_))
        ));
        assert!(matches!(
            TreeIndex::decode(b"garbage"),
            Err(IndexError::BadMagic)
        ));
        assert!(TreeIndex::decode(b"WRNIDX01garbage").is_err());
    }

    #[test]
    fn clean_paths() {
        assert!(is_clean_path(b""));
        assert!(is_clean_path(b"usr/bin/env"));
        for bad in [&b"/etc"[..], b"a//b", b"a/./b", b"..", b"a/", b"a\0b"] {
            assert!(!is_clean_path(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
