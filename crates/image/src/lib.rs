//! Warren's image format.
//!
//! An image is a [`TreeIndex`] (every entry of the filesystem tree, with its metadata and, for
//! regular files, the ordered list of its chunks) plus pack blobs holding the chunks. Chunks are
//! cut by content (FastCDC, ~64 KiB average), named by BLAKE3, compressed with zstd, and located
//! by (pack, offset, length), so reading any chunk from a remote store is one range request and
//! identical content across images is stored once.
//!
//! This crate builds images ([`ImageBuilder`], [`import_dir`], [`import_tar`]) and encodes their
//! index. Where the blobs are kept is the `store` crate's business; serving them is `lazyfs`'s.

mod builder;
mod chunk_list;
mod digest;
mod import_dir;
mod import_overlay;
mod import_tar;
mod index;

pub use builder::{BuildError, BuildStats, Built, ChunkParams, ImageBuilder, Limits, NewPack};
pub use chunk_list::ChunkList;
pub use digest::{BadDigest, ChunkId, Digest, Hasher};
pub use import_dir::{DirImportError, import_dir};
pub use import_overlay::{OverlayImportError, apply_overlay_upper};
pub use import_tar::{TarImportError, import_tar};
pub use index::{
    ChunkLoc, Entry, EntryKind, IndexError, MAX_PAGE_BYTES, PAGE_CHUNKS, PageRef, PageTable,
    TreeIndex, is_clean_path, page_span,
};

/// Decompresses one chunk frame and checks it against its id. A mismatch means the bytes were
/// corrupted somewhere between the pack writer and here; they must not be served.
pub fn open_chunk(loc: &ChunkLoc, frame: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let data =
        zstd::bulk::decompress(frame, loc.len as usize).map_err(|_| ChunkError::Corrupt(loc.id))?;
    if data.len() != loc.len as usize || ChunkId::of(&data) != loc.id {
        return Err(ChunkError::Corrupt(loc.id));
    }
    Ok(data)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {0} is corrupt: its content does not match its id")]
    Corrupt(ChunkId),
}
