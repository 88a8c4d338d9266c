//! The tree index: every entry of an image's filesystem tree, and where each chunk of file data
//! lives. The entries are all a mount needs to answer `stat` and `readdir` without touching file
//! data; the chunk table is most of the bytes (a 100 GiB image has 1.6 M chunks, 60 MB of
//! locations), and a read needs only the part for its file.
//!
//! Two encodings, both untrusted when they come from a registry (every reference is checked):
//! - paged (what images are stored as): the *tree* — magic `WRNIDX02`, then a zstd frame of the
//!   postcard encoding of the pack blobs, the entries (each file's chunk list delta-coded,
//!   [`DeltaCoded`], so a run of new chunks costs a byte each before compression) and a
//!   [`PageTable`] — plus a
//!   *chunk table* blob of pages of [`PAGE_CHUNKS`] locations, each its own zstd frame, named in
//!   the tree by its BLAKE3 hash ([`TreeIndex::encode_paged`], [`TreeIndex::decode_tree`],
//!   [`PageTable::decode_page`]). A mount fetches the tree, then a page when a reader first
//!   needs one;
//! - whole (the first format, still read): the magic `WRNIDX01`, then a zstd frame of the
//!   postcard encoding of [`TreeIndex`].

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::chunk_list::{ChunkList, DeltaCoded, with_budget};
use crate::digest::{ChunkId, Digest};

const MAGIC: &[u8; 8] = b"WRNIDX01";
const PAGED_MAGIC: &[u8; 8] = b"WRNIDX02";
/// Chunk locations per page of a paged index's chunk table (about 190 KiB compressed: the ids
/// are random bytes).
pub const PAGE_CHUNKS: usize = 4096;
/// Refuse a page longer than this, compressed or not (a full page decodes to ~210 KiB).
pub const MAX_PAGE_BYTES: usize = 1 << 20;
/// Refuse an index of more chunks than this: 1 TiB at the 64 KiB average (a 100 GiB image has
/// 1.6 M). A tree claims its table's size before any page is seen; this bounds what anything
/// sized from that claim takes, and what a mount's pins may be asked to hold.
pub const MAX_CHUNKS: u32 = 1 << 24;
/// Refuse an index whose files name more chunk positions than this in all (64 M: 4 TiB of file
/// data at the 64 KiB average chunk), while it is decoded: at most 512 MiB of lists.
pub const MAX_POSITIONS: u64 = 4 * MAX_CHUNKS as u64;
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

/// Where one page of a chunk table lies in its blob, and the BLAKE3 hash of its bytes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
}

/// A paged index's chunk table as its tree describes it: `chunks` locations, in pages of
/// [`PAGE_CHUNKS`] (the last may hold fewer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageTable {
    pub chunks: u32,
    pub pages: Vec<PageRef>,
}

/// The tree of a paged index, as encoded.
#[derive(Serialize, Deserialize)]
struct PagedTree {
    blobs: Vec<Digest>,
    entries: Vec<Entry<DeltaCoded>>,
    table: PageTable,
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

/// One entry of the tree; `C` is how its chunk list is held (encoded differently in a paged
/// index's tree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<C = ChunkList> {
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
    /// For regular files: positions in [`TreeIndex::chunks`], in file order.
    pub chunks: C,
}

impl<C> Entry<C> {
    /// The same entry with its chunk list held as `f` makes it.
    fn with_chunks<D>(self, f: impl FnOnce(C) -> D) -> Entry<D> {
        Entry {
            path: self.path,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
            size: self.size,
            rdev: self.rdev,
            link: self.link,
            xattrs: self.xattrs,
            chunks: f(self.chunks),
        }
    }
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
            chunks: ChunkList::new(),
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

/// Decompresses a zstd frame of at most `limit` bytes (one more is an error).
fn decompress(body: &[u8], limit: u64) -> Result<Vec<u8>, IndexError> {
    let mut raw = Vec::new();
    let decoder = zstd::Decoder::new(body).map_err(IndexError::Decompress)?;
    use std::io::Read as _;
    decoder
        .take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(IndexError::Decompress)?;
    if raw.len() as u64 > limit {
        return Err(IndexError::TooLarge);
    }
    Ok(raw)
}

/// The chunk positions page `page` of a table of `chunks` holds (empty past its end).
pub fn page_span(chunks: u32, page: usize) -> std::ops::Range<u32> {
    let start = (page * PAGE_CHUNKS).min(chunks as usize);
    start as u32..(start + PAGE_CHUNKS).min(chunks as usize) as u32
}

/// A paged index's tree as encoded: magic, then a zstd frame of its postcard encoding; each
/// file's chunk list delta-coded.
fn encode_tree(blobs: &[Digest], entries: &[Entry], table: PageTable) -> Vec<u8> {
    let tree = PagedTree {
        blobs: blobs.to_vec(),
        entries: entries
            .iter()
            .map(|e| e.clone().with_chunks(DeltaCoded))
            .collect(),
        table,
    };
    let raw = postcard::to_stdvec(&tree).expect("serializing to memory cannot fail");
    let mut out = PAGED_MAGIC.to_vec();
    out.extend(zstd::encode_all(&raw[..], 3).expect("compressing to memory cannot fail"));
    out
}

impl PageTable {
    /// The chunk positions page `page` holds.
    pub fn span(&self, page: usize) -> std::ops::Range<u32> {
        page_span(self.chunks, page)
    }

    /// Decodes page `page` from its bytes, checking them against the page's hash and every
    /// location against the image's `blobs` pack count.
    pub fn decode_page(
        &self,
        page: usize,
        bytes: &[u8],
        blobs: usize,
    ) -> Result<Vec<ChunkLoc>, IndexError> {
        let bad = |m: String| Err(IndexError::Inconsistent(m));
        let Some(r) = self.pages.get(page) else {
            return bad(format!("page {page} of {}", self.pages.len()));
        };
        if ChunkId::of(bytes) != r.id {
            return bad(format!(
                "page {page} of the chunk table does not match its hash"
            ));
        }
        let raw = decompress(bytes, MAX_PAGE_BYTES as u64)?;
        let locs: Vec<ChunkLoc> = postcard::from_bytes(&raw).map_err(IndexError::Decode)?;
        if locs.len() != self.span(page).len() {
            return bad(format!(
                "page {page} holds {} chunks, not {}",
                locs.len(),
                self.span(page).len()
            ));
        }
        if let Some(c) = locs.iter().find(|c| c.blob as usize >= blobs) {
            return bad(format!("a chunk refers to blob {} of {blobs}", c.blob));
        }
        Ok(locs)
    }

    /// The chunk table blob's size: its pages lie one after the other, from 0.
    pub fn blob_len(&self) -> u64 {
        self.pages.iter().map(|p| u64::from(p.len)).sum()
    }

    fn validate(&self) -> Result<(), IndexError> {
        let bad = |m: String| Err(IndexError::Inconsistent(m));
        if self.chunks > MAX_CHUNKS {
            return bad(format!("{} chunks (at most {MAX_CHUNKS})", self.chunks));
        }
        let pages = (self.chunks as usize).div_ceil(PAGE_CHUNKS);
        if self.pages.len() != pages {
            return bad(format!(
                "{} chunks need {pages} pages, not {}",
                self.chunks,
                self.pages.len()
            ));
        }
        let mut at = 0u64;
        for (i, p) in self.pages.iter().enumerate() {
            if p.len == 0 || p.len as usize > MAX_PAGE_BYTES {
                return bad(format!(
                    "page {i} is {} bytes (1 to {MAX_PAGE_BYTES})",
                    p.len
                ));
            }
            if p.offset != at {
                return bad(format!(
                    "page {i} is at {}, not right after the page before ({at})",
                    p.offset
                ));
            }
            at += u64::from(p.len);
        }
        Ok(())
    }
}

impl TreeIndex {
    /// The paged encoding: the tree, and the chunk table blob (empty when there are no chunks).
    pub fn encode_paged(&self) -> (Vec<u8>, Vec<u8>) {
        let mut table = Vec::new();
        let mut pages = Vec::new();
        for page in self.chunks.chunks(PAGE_CHUNKS) {
            let raw = postcard::to_stdvec(page).expect("serializing to memory cannot fail");
            let bytes = zstd::encode_all(&raw[..], 3).expect("compressing to memory cannot fail");
            pages.push(PageRef {
                id: ChunkId::of(&bytes),
                offset: table.len() as u64,
                len: bytes.len() as u32,
            });
            table.extend(bytes);
        }
        let tree = encode_tree(
            &self.blobs,
            &self.entries,
            PageTable {
                chunks: u32::try_from(self.chunks.len()).expect("under 4 G chunks"),
                pages,
            },
        );
        (tree, table)
    }

    /// Whether `bytes` begin like a paged index's tree.
    pub fn is_paged(bytes: &[u8]) -> bool {
        bytes.starts_with(PAGED_MAGIC)
    }

    /// Decodes a paged index's tree: the index without its chunk table (`chunks` empty), and
    /// where the table's pages are. Every entry is checked but the sum of a file's chunk
    /// lengths, which needs the table: whoever loads a file's pages checks it
    /// ([`TreeIndex::check_file`]).
    pub fn decode_tree(bytes: &[u8]) -> Result<(TreeIndex, PageTable), IndexError> {
        let body = bytes
            .strip_prefix(PAGED_MAGIC)
            .ok_or(IndexError::BadMagic)?;
        let raw = decompress(body, MAX_DECODED_BYTES)?;
        let tree: PagedTree = with_budget(MAX_POSITIONS, || postcard::from_bytes(&raw))
            .map_err(IndexError::Decode)?;
        drop(raw);
        tree.table.validate()?;
        let index = TreeIndex {
            blobs: tree.blobs,
            chunks: Vec::new(),
            entries: tree
                .entries
                .into_iter()
                .map(|e| e.with_chunks(|d| d.0))
                .collect(),
        };
        index.validate_entries(tree.table.chunks as usize, None)?;
        Ok((index, tree.table))
    }

    /// The whole index from a paged index's tree and its chunk table blob.
    pub fn from_pages(
        mut index: TreeIndex,
        table: &PageTable,
        blob: &[u8],
    ) -> Result<TreeIndex, IndexError> {
        if blob.len() as u64 != table.blob_len() {
            return Err(IndexError::Inconsistent(format!(
                "the chunk table is {} bytes, its pages {}",
                blob.len(),
                table.blob_len()
            )));
        }
        for (p, r) in table.pages.iter().enumerate() {
            let bytes = usize::try_from(r.offset)
                .ok()
                .and_then(|start| blob.get(start..start.checked_add(r.len as usize)?))
                .ok_or_else(|| {
                    IndexError::Inconsistent(format!("page {p} lies beyond the chunk table"))
                })?;
            index
                .chunks
                .extend(table.decode_page(p, bytes, index.blobs.len())?);
        }
        index.validate()?;
        Ok(index)
    }

    /// Checks that a file's chunks (`lens`, in file order) hold its size.
    pub fn check_file(entry: &Entry, lens: impl Iterator<Item = u32>) -> Result<(), IndexError> {
        let size: u64 = lens.map(u64::from).sum();
        if entry.kind == EntryKind::File && size != entry.size {
            return Err(IndexError::Inconsistent(format!(
                "`{}` is {} bytes but its chunks hold {size}",
                entry.path_str(),
                entry.size
            )));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let raw = postcard::to_stdvec(self).expect("serializing to memory cannot fail");
        let mut out = MAGIC.to_vec();
        out.extend(zstd::encode_all(&raw[..], 3).expect("compressing to memory cannot fail"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<TreeIndex, IndexError> {
        let body = bytes.strip_prefix(MAGIC).ok_or(IndexError::BadMagic)?;
        let raw = decompress(body, MAX_DECODED_BYTES)?;
        let index: TreeIndex = with_budget(MAX_POSITIONS, || postcard::from_bytes(&raw))
            .map_err(IndexError::Decode)?;
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
        self.validate_entries(self.chunks.len(), Some(&self.chunks))
    }

    /// Checks the entries against a chunk table of `count` chunks, and each file's size against
    /// its chunks' lengths when the table is at hand.
    fn validate_entries(
        &self,
        count: usize,
        chunks: Option<&[ChunkLoc]>,
    ) -> Result<(), IndexError> {
        let bad = |m: String| Err(IndexError::Inconsistent(m));
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
            if let Some(c) = e.chunks.max()
                && c as usize >= count
            {
                return bad(format!("`{name}` refers to chunk {c} of {count}"));
            }
            if let Some(chunks) = chunks {
                Self::check_file(e, e.chunks.iter().map(|c| chunks[c as usize].len))?;
            }
            match e.kind {
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
        file.chunks = [0].into();
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

    /// An index of `files` files of `per_file` chunks each, in `blobs` packs.
    fn big(files: usize, per_file: usize) -> TreeIndex {
        let mut index = sample();
        index.entries.truncate(2);
        index.chunks.clear();
        for f in 0..files {
            let mut e = Entry::new(format!("etc/f{f:05}").into_bytes(), EntryKind::File, 0o644);
            for _ in 0..per_file {
                let n = index.chunks.len() as u32;
                e.chunks.push(n);
                e.size += 100;
                index.chunks.push(ChunkLoc {
                    id: ChunkId::of(&n.to_le_bytes()),
                    blob: 0,
                    offset: u64::from(n) * 50,
                    compressed_len: 50,
                    len: 100,
                });
            }
            index.entries.push(e);
        }
        // A file made of chunks seen before, out of order (dedup).
        let mut again = Entry::new(b"etc/g".to_vec(), EntryKind::File, 0o644);
        again.chunks = [7, 3, 3, 5000].into();
        again.size = 400;
        index.entries.push(again);
        index
    }

    #[test]
    fn a_paged_index_round_trips_through_its_tree_and_pages() {
        let index = big(100, 90);
        let (tree, blob) = index.encode_paged();
        assert!(TreeIndex::is_paged(&tree));
        let (bare, table) = TreeIndex::decode_tree(&tree).unwrap();
        assert_eq!(
            bare.entries, index.entries,
            "chunk lists survive the delta code"
        );
        assert!(bare.chunks.is_empty());
        assert_eq!(table.chunks, 9000);
        assert_eq!(table.pages.len(), 3);
        assert_eq!(table.span(2), 8192..9000);
        let third = &blob[table.pages[2].offset as usize..][..table.pages[2].len as usize];
        assert_eq!(
            table.decode_page(2, third, 1).unwrap(),
            index.chunks[8192..9000]
        );
        assert_eq!(
            TreeIndex::from_pages(bare.clone(), &table, &blob).unwrap(),
            index
        );
        // The tree is small: a run of new chunks costs about nothing in it.
        assert!(tree.len() < 4096, "tree of {} bytes", tree.len());
        // Tampering is found: a page that is not its hash, one given as another, a blob out
        // of range, a chunk out of range, a file whose chunks do not hold its size.
        let mut flipped = third.to_vec();
        flipped[10] ^= 1;
        let err = table.decode_page(2, &flipped, 1).unwrap_err().to_string();
        assert!(err.contains("does not match its hash"), "{err}");
        assert!(table.decode_page(1, third, 1).is_err());
        let err = table.decode_page(2, third, 0).unwrap_err().to_string();
        assert!(err.contains("refers to blob 0 of 0"), "{err}");
        let mut far = index.clone();
        far.entries.last_mut().unwrap().chunks = [9000, 3, 3, 5000].into();
        let err = TreeIndex::decode_tree(&far.encode_paged().0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`etc/g` refers to chunk 9000 of 9000"),
            "{err}"
        );
        let mut long = index.clone();
        long.entries.last_mut().unwrap().size = 401;
        let (tree, blob) = long.encode_paged();
        let (bare, table) = TreeIndex::decode_tree(&tree).unwrap();
        let err = TreeIndex::from_pages(bare, &table, &blob)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`etc/g` is 401 bytes but its chunks hold 400"),
            "{err}"
        );
        assert!(
            TreeIndex::from_pages(
                TreeIndex::decode_tree(&tree).unwrap().0,
                &table,
                &blob[..100]
            )
            .is_err()
        );
    }

    /// A tree as a registry could serve it, its page table given.
    fn tree_with(index: &TreeIndex, table: PageTable) -> Vec<u8> {
        encode_tree(&index.blobs, &index.entries, table)
    }

    #[test]
    fn a_tree_whose_page_table_does_not_add_up_is_refused() {
        let index = big(100, 90);
        let (tree, _) = index.encode_paged();
        let (_, table) = TreeIndex::decode_tree(&tree).unwrap();
        let refused = |table: PageTable| {
            TreeIndex::decode_tree(&tree_with(&index, table))
                .unwrap_err()
                .to_string()
        };
        // A table claimed far larger than any image, from a few repeated page entries.
        let mut huge = table.clone();
        huge.chunks = MAX_CHUNKS + 1;
        huge.pages = vec![table.pages[0]; (MAX_CHUNKS as usize + 1).div_ceil(PAGE_CHUNKS)];
        assert!(refused(huge).contains("at most"));
        let mut short = table.clone();
        short.pages.pop();
        assert!(refused(short).contains("9000 chunks need 3 pages, not 2"));
        // Pages that are not laid one after the other (one page's bytes given twice).
        let mut reused = table.clone();
        reused.pages[1] = reused.pages[0];
        assert!(refused(reused).contains("not right after the page before"));
        let mut far = table.clone();
        far.pages[2].offset = u64::MAX - 1;
        assert!(refused(far).contains("not right after"));
        let mut empty = table.clone();
        empty.pages[2].len = 0;
        assert!(refused(empty).contains("page 2 is 0 bytes"));
        assert!(TreeIndex::decode_tree(&tree_with(&index, table)).is_ok());
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
