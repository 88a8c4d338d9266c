//! Building an image: entries go in, content is cut into chunks (FastCDC), each chunk is named
//! by its BLAKE3 hash, compressed with zstd and appended to a pack file. Chunks already present
//! (earlier in this image, or in a base image the caller supplies) are stored once.
//!
//! The builder only writes pack files into a work folder; storing them is the caller's business
//! (see the `store` crate).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::chunk_list::ChunkList;
use crate::digest::{ChunkId, Digest, Hasher};
use crate::index::{ChunkLoc, Entry, EntryKind, TreeIndex, is_clean_path};

/// FastCDC bounds. The average is what dedup and lazy reads are tuned for.
#[derive(Debug, Clone, Copy)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> ChunkParams {
        ChunkParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

/// Bounds on untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    pub max_file_bytes: u64,
    pub max_path_bytes: usize,
    pub max_xattr_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: 10_000_000,
            max_file_bytes: 1 << 40,
            max_path_bytes: 4096,
            max_xattr_bytes: 64 << 10,
        }
    }
}

/// Target size of one pack file (compressed bytes).
const PACK_TARGET_BYTES: u64 = 32 << 20;
/// Placeholder blob index for chunks of the pack still being written.
const OPEN_PACK: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot write a pack in `{}`: {cause}", dir.display())]
    Pack { dir: PathBuf, cause: io::Error },
    #[error("cannot read the content of `{path}`: {cause}")]
    Content { path: String, cause: io::Error },
    #[error("`{path}`: {reason}")]
    Rejected { path: String, reason: String },
}

impl BuildError {
    pub(crate) fn rejected(path: &[u8], reason: impl Into<String>) -> BuildError {
        BuildError::Rejected {
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        }
    }
}

/// A pack file the build wrote, to be stored under its digest.
#[derive(Debug, Clone)]
pub struct NewPack {
    pub digest: Digest,
    pub path: PathBuf,
    pub size: u64,
}

/// What a build produced.
#[derive(Debug)]
pub struct Built {
    pub index: TreeIndex,
    pub new_packs: Vec<NewPack>,
    pub stats: BuildStats,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BuildStats {
    pub files: u64,
    pub file_bytes: u64,
    pub new_chunks: u64,
    pub reused_chunks: u64,
    /// Compressed bytes written to new packs.
    pub stored_bytes: u64,
}

struct OpenPack {
    path: PathBuf,
    file: io::BufWriter<File>,
    hasher: Hasher,
    len: u64,
}

#[derive(Debug)]
pub struct ImageBuilder {
    work_dir: PathBuf,
    params: ChunkParams,
    limits: Limits,
    entries: BTreeMap<Vec<u8>, Entry>,
    blobs: Vec<Digest>,
    blob_pos: HashMap<Digest, u32>,
    chunks: Vec<ChunkLoc>,
    chunk_pos: HashMap<ChunkId, u32>,
    known: HashMap<ChunkId, (Digest, ChunkLoc)>,
    open: Option<OpenPack>,
    new_packs: Vec<NewPack>,
    stats: BuildStats,
}

impl std::fmt::Debug for OpenPack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenPack")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl ImageBuilder {
    /// A builder writing packs into `work_dir` (which must exist).
    pub fn new(work_dir: &Path, params: ChunkParams, limits: Limits) -> ImageBuilder {
        let mut root = Entry::new(Vec::new(), EntryKind::Dir, 0o755);
        root.mtime = 0;
        ImageBuilder {
            work_dir: work_dir.to_path_buf(),
            params,
            limits,
            entries: BTreeMap::from([(Vec::new(), root)]),
            blobs: Vec::new(),
            blob_pos: HashMap::new(),
            chunks: Vec::new(),
            chunk_pos: HashMap::new(),
            known: HashMap::new(),
            open: None,
            new_packs: Vec::new(),
            stats: BuildStats::default(),
        }
    }

    /// Makes the chunks of `base` reusable: identical content is referenced, not stored again.
    pub fn reuse_chunks_of(&mut self, base: &TreeIndex) {
        for loc in &base.chunks {
            if let Some(&digest) = base.blobs.get(loc.blob as usize) {
                self.known.entry(loc.id).or_insert((digest, *loc));
            }
        }
    }

    /// Starts from `base`'s whole tree (its chunks referenced, not stored again), for layering
    /// changes on top of it.
    pub fn start_from(&mut self, base: &TreeIndex) {
        self.reuse_chunks_of(base);
        for e in &base.entries {
            let mut e = e.clone();
            e.chunks = e
                .chunks
                .iter()
                .filter_map(|c| {
                    let id = base.chunks.get(c as usize)?.id;
                    self.chunk_ref(id)
                })
                .collect();
            self.entries.insert(e.path.clone(), e);
        }
    }

    pub fn stats(&self) -> BuildStats {
        self.stats
    }

    pub fn entry(&self, path: &[u8]) -> Option<&Entry> {
        self.entries.get(path)
    }

    fn check_path(&self, path: &[u8]) -> Result<(), BuildError> {
        if path.is_empty() {
            return Ok(());
        }
        if !is_clean_path(path) {
            return Err(BuildError::rejected(
                path,
                "the path must be relative without `.`, `..` or empty parts",
            ));
        }
        if path.len() > self.limits.max_path_bytes {
            return Err(BuildError::rejected(
                path,
                format!(
                    "the path is longer than {} bytes",
                    self.limits.max_path_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Makes sure every folder above `path` exists (creating missing ones like tar extractors
    /// do) and that none of them is something else, such as a symlink.
    fn ensure_parents(&mut self, path: &[u8]) -> Result<(), BuildError> {
        let mut end = 0;
        while let Some(i) = path[end..].iter().position(|&b| b == b'/') {
            let parent = &path[..end + i];
            match self.entries.get(parent) {
                Some(e) if e.kind == EntryKind::Dir => {}
                Some(e) => {
                    return Err(BuildError::rejected(
                        path,
                        format!(
                            "its parent `{}` is a {:?}, not a folder",
                            e.path_str(),
                            e.kind
                        ),
                    ));
                }
                None => {
                    let dir = Entry::new(parent.to_vec(), EntryKind::Dir, 0o755);
                    self.entries.insert(parent.to_vec(), dir);
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    fn insert(&mut self, entry: Entry) -> Result<(), BuildError> {
        self.check_path(&entry.path)?;
        for (name, value) in &entry.xattrs {
            if value.len() + name.len() > self.limits.max_xattr_bytes {
                return Err(BuildError::rejected(
                    &entry.path,
                    format!(
                        "extended attribute `{name}` is larger than {} bytes",
                        self.limits.max_xattr_bytes
                    ),
                ));
            }
        }
        if entry.path.is_empty() && entry.kind != EntryKind::Dir {
            return Err(BuildError::rejected(b"/", "the root must be a folder"));
        }
        self.ensure_parents(&entry.path)?;
        match self.entries.get(&entry.path) {
            // A folder replaced by a folder keeps its contents (tar and layers restate folders).
            Some(old) if old.kind == EntryKind::Dir && entry.kind == EntryKind::Dir => {}
            Some(old) if old.kind == EntryKind::Dir => self.remove(&entry.path.clone()),
            _ => {}
        }
        if self.entries.len() >= self.limits.max_entries && !self.entries.contains_key(&entry.path)
        {
            return Err(BuildError::rejected(
                &entry.path,
                format!(
                    "the image has more than {} entries",
                    self.limits.max_entries
                ),
            ));
        }
        self.entries.insert(entry.path.clone(), entry);
        Ok(())
    }

    /// Adds anything but a regular file (folders, symlinks, hard links, devices, fifos, sockets).
    pub fn add(&mut self, mut entry: Entry) -> Result<(), BuildError> {
        entry.chunks.clear();
        entry.size = 0;
        match entry.kind {
            EntryKind::File => {
                return Err(BuildError::rejected(
                    &entry.path,
                    "regular files are added with their content",
                ));
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                if let Err(why) = crate::index::device_allowed(entry.kind, entry.rdev) {
                    return Err(BuildError::rejected(&entry.path, &why));
                }
            }
            EntryKind::Symlink if entry.link.is_empty() || entry.link.contains(&0) => {
                return Err(BuildError::rejected(
                    &entry.path,
                    "the symlink target is empty or holds a NUL byte",
                ));
            }
            EntryKind::Hardlink => {
                if !is_clean_path(&entry.link) || entry.link.is_empty() {
                    return Err(BuildError::rejected(
                        &entry.path,
                        format!(
                            "the hard link target `{}` leaves the image root",
                            String::from_utf8_lossy(&entry.link)
                        ),
                    ));
                }
                match self.entries.get(&entry.link).map(|e| e.kind) {
                    Some(EntryKind::File) => {}
                    Some(EntryKind::Hardlink) => {
                        // Point at the file itself, so every link names a real file.
                        entry.link = self.entries[&entry.link].link.clone();
                    }
                    _ => {
                        return Err(BuildError::rejected(
                            &entry.path,
                            format!(
                                "the hard link target `{}` is not a file added before it",
                                String::from_utf8_lossy(&entry.link)
                            ),
                        ));
                    }
                }
                if entry.link == entry.path {
                    return Err(BuildError::rejected(&entry.path, "a hard link to itself"));
                }
            }
            _ => {}
        }
        self.insert(entry)
    }

    /// Adds a regular file, reading its content from `content` to the end.
    pub fn add_file(&mut self, mut entry: Entry, content: impl Read) -> Result<(), BuildError> {
        entry.kind = EntryKind::File;
        self.check_path(&entry.path)?;
        let limit = self.limits.max_file_bytes;
        let mut chunks = ChunkList::new();
        let mut size = 0u64;
        let params = self.params;
        let mut limited = content.take(limit + 1);
        let cdc = fastcdc::v2020::StreamCDC::new(
            &mut limited,
            params.min as usize,
            params.avg as usize,
            params.max as usize,
        );
        let path_for_errors = entry.path.clone();
        for chunk in cdc {
            let chunk = chunk.map_err(|e| BuildError::Content {
                path: String::from_utf8_lossy(&path_for_errors).into_owned(),
                cause: match e {
                    fastcdc::v2020::Error::IoError(io) => io,
                    other => io::Error::other(other.to_string()),
                },
            })?;
            size += chunk.length as u64;
            if size > limit {
                return Err(BuildError::rejected(
                    &entry.path,
                    format!("the file is larger than {limit} bytes"),
                ));
            }
            chunks.push(self.store_chunk(&chunk.data)?);
        }
        entry.size = size;
        entry.chunks = chunks;
        self.stats.files += 1;
        self.stats.file_bytes += size;
        self.insert(entry)
    }

    /// The index of chunk `id` in this image's table, if it is already stored or known.
    fn chunk_ref(&mut self, id: ChunkId) -> Option<u32> {
        if let Some(&i) = self.chunk_pos.get(&id) {
            return Some(i);
        }
        let (digest, loc) = *self.known.get(&id)?;
        let blob = match self.blob_pos.get(&digest) {
            Some(&b) => b,
            None => {
                self.blobs.push(digest);
                let b = u32::try_from(self.blobs.len() - 1).expect("fewer than 2^32 blobs");
                self.blob_pos.insert(digest, b);
                b
            }
        };
        self.chunks.push(ChunkLoc { blob, ..loc });
        let i = u32::try_from(self.chunks.len() - 1).expect("fewer than 2^32 chunks");
        self.chunk_pos.insert(id, i);
        Some(i)
    }

    fn store_chunk(&mut self, data: &[u8]) -> Result<u32, BuildError> {
        let id = ChunkId::of(data);
        if let Some(i) = self.chunk_ref(id) {
            self.stats.reused_chunks += 1;
            return Ok(i);
        }
        let compressed = zstd::bulk::compress(data, 3).map_err(|e| self.pack_error(e))?;
        let pack = self.open_pack()?;
        let offset = pack.len;
        pack.file
            .write_all(&compressed)
            .map_err(|e| BuildError::Pack {
                dir: pack.path.clone(),
                cause: e,
            })?;
        pack.hasher.update(&compressed);
        pack.len += compressed.len() as u64;
        let full = pack.len >= PACK_TARGET_BYTES;
        self.chunks.push(ChunkLoc {
            id,
            blob: OPEN_PACK,
            offset,
            compressed_len: u32::try_from(compressed.len()).expect("chunks are at most a few MiB"),
            len: u32::try_from(data.len()).expect("chunks are at most a few MiB"),
        });
        let i = u32::try_from(self.chunks.len() - 1).expect("fewer than 2^32 chunks");
        self.chunk_pos.insert(id, i);
        self.stats.new_chunks += 1;
        self.stats.stored_bytes += compressed.len() as u64;
        if full {
            self.close_pack()?;
        }
        Ok(i)
    }

    fn pack_error(&self, cause: io::Error) -> BuildError {
        BuildError::Pack {
            dir: self.work_dir.clone(),
            cause,
        }
    }

    fn open_pack(&mut self) -> Result<&mut OpenPack, BuildError> {
        if self.open.is_none() {
            let path = self
                .work_dir
                .join(format!("pack-{}.partial", self.new_packs.len()));
            let file = File::create(&path).map_err(|e| self.pack_error(e))?;
            self.open = Some(OpenPack {
                path,
                file: io::BufWriter::new(file),
                hasher: Hasher::default(),
                len: 0,
            });
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    fn close_pack(&mut self) -> Result<(), BuildError> {
        let Some(pack) = self.open.take() else {
            return Ok(());
        };
        let file = pack.file.into_inner().map_err(|e| BuildError::Pack {
            dir: self.work_dir.clone(),
            cause: e.into_error(),
        })?;
        file.sync_all().map_err(|e| self.pack_error(e))?;
        let digest = pack.hasher.finish();
        let path = self.work_dir.join(digest.hex());
        std::fs::rename(&pack.path, &path).map_err(|e| self.pack_error(e))?;
        self.blobs.push(digest);
        let blob = u32::try_from(self.blobs.len() - 1).expect("fewer than 2^32 blobs");
        self.blob_pos.insert(digest, blob);
        for loc in self.chunks.iter_mut().filter(|c| c.blob == OPEN_PACK) {
            loc.blob = blob;
        }
        self.new_packs.push(NewPack {
            digest,
            path,
            size: pack.len,
        });
        Ok(())
    }

    /// Removes the entry at `path` and, for a folder, everything below it (an OCI whiteout).
    pub fn remove(&mut self, path: &[u8]) {
        self.entries.remove(path);
        self.clear_dir(path);
    }

    /// Removes everything below the folder `path`, keeping the folder (an opaque whiteout).
    pub fn clear_dir(&mut self, path: &[u8]) {
        let mut prefix = path.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let doomed: Vec<Vec<u8>> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    /// Finishes the last pack and returns the index. Only chunks and blobs the final tree refers
    /// to are listed in it.
    pub fn finish(mut self) -> Result<Built, BuildError> {
        self.close_pack()?;
        // Hard links whose file was removed by a later layer cannot be served.
        for e in self.entries.values() {
            if e.kind == EntryKind::Hardlink
                && self.entries.get(&e.link).map(|t| t.kind) != Some(EntryKind::File)
            {
                return Err(BuildError::rejected(
                    &e.path,
                    format!(
                        "its hard link target `{}` was removed",
                        String::from_utf8_lossy(&e.link)
                    ),
                ));
            }
        }
        let mut chunk_map: HashMap<u32, u32> = HashMap::new();
        let mut blob_map: HashMap<u32, u32> = HashMap::new();
        let mut blobs = Vec::new();
        let mut chunks = Vec::new();
        let mut entries = Vec::with_capacity(self.entries.len());
        for (_, mut e) in self.entries {
            e.chunks = e
                .chunks
                .iter()
                .map(|c| {
                    *chunk_map.entry(c).or_insert_with(|| {
                        let mut loc = self.chunks[c as usize];
                        loc.blob = *blob_map.entry(loc.blob).or_insert_with(|| {
                            blobs.push(self.blobs[loc.blob as usize]);
                            u32::try_from(blobs.len() - 1).expect("fewer than 2^32 blobs")
                        });
                        chunks.push(loc);
                        u32::try_from(chunks.len() - 1).expect("fewer than 2^32 chunks")
                    })
                })
                .collect();
            entries.push(e);
        }
        let index = TreeIndex {
            blobs,
            chunks,
            entries,
        };
        index
            .validate()
            .map_err(|e| BuildError::rejected(b"/", e.to_string()))?;
        Ok(Built {
            index,
            new_packs: self.new_packs,
            stats: self.stats,
        })
    }
}
