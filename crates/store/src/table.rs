//! A mounted image's chunk table: where each chunk lives. A paged index's table comes a page of
//! 4,096 locations at a time, the first time a reader needs one: one range request into the
//! chunk-table blob, checked against the page's hash in the tree, kept in the chunk cache (the
//! next mount on the host reads it from disk) and, the most recently used few, in memory. An
//! index of the first format has its whole table at hand.
//!
//! A 100 GiB image's table is 60 MB; a mount that reads a 200 MB startup set fetches the pages
//! of the files in it, and holds at most [`HELD_PAGES`] of them decoded (7 MiB).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use warren_image::{ChunkLoc, Digest, PAGE_CHUNKS, PageTable};

use crate::blob::{BlobStore, StoreError};
use crate::cache::{ChunkCache, PinSet};
use crate::fetch::FetchError;

/// Decoded pages held in memory at once, the least recently used dropped first.
const HELD_PAGES: usize = 32;
/// Pages fetched at once when a read needs several.
const PAGE_LOADERS: usize = 8;
/// Pages one call holds at once (16 decoded pages: 3.5 MiB).
const WINDOW_PAGES: usize = 16;
/// Page loads are serialized per stripe (page number modulo this): two readers that need the
/// same page fetch it once, readers of different pages do not wait for each other.
const LOAD_STRIPES: usize = 64;

/// A page of a chunk table, decoded.
type Page = Arc<[ChunkLoc]>;

/// Where an opened image's chunk locations come from.
#[derive(Debug)]
pub enum TableSource {
    /// All of them, from an index of the first format.
    Whole(Vec<ChunkLoc>),
    /// Pages of blob `blob`, as the tree's page table says.
    Paged { blob: Digest, table: PageTable },
}

#[derive(Debug)]
pub struct ChunkTable {
    count: u32,
    blobs: usize,
    source: Source,
    /// Bytes and requests of pages fetched from the store.
    pub bytes_fetched: AtomicU64,
    pub requests: AtomicU64,
}

#[derive(Debug)]
enum Source {
    Whole(Vec<Arc<[ChunkLoc]>>),
    Paged(Paged),
}

#[derive(Debug)]
struct Paged {
    store: Arc<dyn BlobStore>,
    cache: Arc<ChunkCache>,
    blob: Digest,
    table: PageTable,
    pins: PinSet,
    held: Mutex<Held>,
    loading: Vec<Mutex<()>>,
}

#[derive(Debug, Default)]
struct Held {
    pages: HashMap<usize, (Arc<[ChunkLoc]>, u64)>,
    clock: u64,
}

impl ChunkTable {
    /// The table of an image with `blobs` packs. Its chunks are pinned in `cache` from now on
    /// (a paged table's as each page arrives, before any of its chunks is fetched), and the
    /// pages themselves too.
    pub fn new(
        source: TableSource,
        blobs: usize,
        store: Arc<dyn BlobStore>,
        cache: Arc<ChunkCache>,
    ) -> ChunkTable {
        let (count, source) = match source {
            TableSource::Whole(chunks) => {
                cache.pin(chunks.iter().map(|c| c.id));
                let count = u32::try_from(chunks.len()).expect("under 4 G chunks");
                let pages = chunks.chunks(PAGE_CHUNKS).map(Arc::from).collect();
                (count, Source::Whole(pages))
            }
            TableSource::Paged { blob, table } => {
                // Sized for the table, up to 8 M ids (a 16 MiB filter); a larger table's pins
                // hold as well, keeping more other chunks with them: about 2% at 16 M ids, the
                // most a tree may claim.
                let pins = cache.pin_set((table.chunks as usize + table.pages.len()).min(1 << 23));
                (
                    table.chunks,
                    Source::Paged(Paged {
                        store,
                        cache,
                        blob,
                        table,
                        pins,
                        held: Mutex::new(Held::default()),
                        loading: (0..LOAD_STRIPES).map(|_| Mutex::new(())).collect(),
                    }),
                )
            }
        };
        ChunkTable {
            count,
            blobs,
            source,
            bytes_fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// How many chunks the image has.
    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn pages(&self) -> usize {
        (self.count as usize).div_ceil(PAGE_CHUNKS)
    }

    /// The chunk positions page `page` holds.
    pub fn page_span(&self, page: usize) -> std::ops::Range<u32> {
        warren_image::page_span(self.count, page)
    }

    /// The locations of page `page` (chunks `page * PAGE_CHUNKS ..`).
    pub fn page(&self, page: usize) -> Result<Arc<[ChunkLoc]>, FetchError> {
        match &self.source {
            Source::Whole(pages) => pages.get(page).cloned().ok_or(FetchError::NoChunk {
                chunk: (page * PAGE_CHUNKS) as u32,
                chunks: self.count,
            }),
            Source::Paged(paged) => paged.page(page, self),
        }
    }

    /// Page `page` if it is at hand without a request (always, for a whole table).
    pub fn page_at_hand(&self, page: usize) -> Option<Arc<[ChunkLoc]>> {
        match &self.source {
            Source::Whole(pages) => pages.get(page).cloned(),
            Source::Paged(paged) => paged.held(page),
        }
    }

    /// Where each of `chunks` lives, in their order.
    pub fn locs(&self, chunks: &[u32]) -> Result<Vec<ChunkLoc>, FetchError> {
        if let Some(&c) = chunks.iter().find(|&&c| c >= self.count) {
            return Err(FetchError::NoChunk {
                chunk: c,
                chunks: self.count,
            });
        }
        let mut out = Vec::with_capacity(chunks.len());
        for window in self.windows(chunks) {
            let mut pages = HashMap::new();
            for (p, page) in self.load(window) {
                pages.insert(p, page?);
            }
            out.extend(
                window
                    .iter()
                    .map(|&c| pages[&(c as usize / PAGE_CHUNKS)][c as usize % PAGE_CHUNKS]),
            );
        }
        Ok(out)
    }

    /// Those of `chunks` that are in the table and whose page can be had, located, in their
    /// order (a trace replay goes on without a page that cannot), and how many pages could not.
    pub fn locs_available(&self, chunks: &[u32]) -> (Vec<(u32, ChunkLoc)>, u64) {
        let chunks: Vec<u32> = chunks.iter().copied().filter(|&c| c < self.count).collect();
        let (mut out, mut failed) = (Vec::with_capacity(chunks.len()), 0);
        for window in self.windows(&chunks) {
            let mut pages = HashMap::new();
            for (p, page) in self.load(window) {
                match page {
                    Ok(page) => {
                        pages.insert(p, page);
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(page = p, error = %e, "cannot read a page of the chunk table")
                    }
                }
            }
            out.extend(window.iter().filter_map(|&c| {
                let page = pages.get(&(c as usize / PAGE_CHUNKS))?;
                Some((c, page[c as usize % PAGE_CHUNKS]))
            }));
        }
        (out, failed)
    }

    /// `chunks` cut where they have come to [`WINDOW_PAGES`] pages: what one call holds of the
    /// table at once, whatever a file's or a trace's list spans.
    fn windows<'a>(&self, chunks: &'a [u32]) -> Vec<&'a [u32]> {
        let mut out = Vec::new();
        let mut pages: Vec<usize> = Vec::new();
        let mut start = 0;
        for (i, &c) in chunks.iter().enumerate() {
            let p = c as usize / PAGE_CHUNKS;
            if !pages.contains(&p) {
                if pages.len() == WINDOW_PAGES {
                    out.push(&chunks[start..i]);
                    start = i;
                    pages.clear();
                }
                pages.push(p);
            }
        }
        if start < chunks.len() {
            out.push(&chunks[start..]);
        }
        out
    }

    /// Brings in the pages of `chunks` (all in the table), those not at hand [`PAGE_LOADERS`]
    /// at once: the first read of a 10 GiB file needs 40 pages, which one after the other
    /// would cost 40 round trips. Each page as it came, or why it did not.
    fn load(&self, chunks: &[u32]) -> Vec<(usize, Result<Page, FetchError>)> {
        let mut pages: Vec<usize> = chunks.iter().map(|&c| c as usize / PAGE_CHUNKS).collect();
        pages.sort_unstable();
        pages.dedup();
        let mut out = Vec::with_capacity(pages.len());
        let mut missing = Vec::new();
        for p in pages {
            match self.page_at_hand(p) {
                Some(page) => out.push((p, Ok(page))),
                None => missing.push(p),
            }
        }
        if missing.len() < 2 {
            out.extend(missing.into_iter().map(|p| (p, self.page(p))));
            return out;
        }
        let next = AtomicUsize::new(0);
        let loaded = Mutex::new(Vec::with_capacity(missing.len()));
        let load_on = || {
            while let Some(&p) = missing.get(next.fetch_add(1, Ordering::Relaxed)) {
                let page = self.page(p);
                loaded.lock().expect("loaded pages").push((p, page));
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..PAGE_LOADERS.min(missing.len()) {
                let spawned = std::thread::Builder::new()
                    .name("page-loader".into())
                    .spawn_scoped(scope, load_on);
                if let Err(e) = spawned {
                    // This thread loads what no other one does.
                    tracing::debug!(error = %e, "cannot start a page loader");
                    break;
                }
            }
            load_on();
        });
        out.extend(loaded.into_inner().expect("loaded pages"));
        out
    }

    /// Pins the chunks of the pages the host's cache already holds (an earlier mount of the
    /// image fetched them), so that what is cached of the image stays while this mount runs.
    /// Nothing is fetched.
    pub fn pin_cached_pages(&self) {
        let Source::Paged(paged) = &self.source else {
            return;
        };
        for (p, r) in paged.table.pages.iter().enumerate() {
            if paged.cache.contains(&r.id)
                && let Some(bytes) = paged.cache.get(&r.id)
                && let Ok(locs) = paged.table.decode_page(p, &bytes, self.blobs)
            {
                paged.cache.pin_more(
                    &paged.pins,
                    std::iter::once(r.id).chain(locs.iter().map(|l| l.id)),
                );
            }
        }
    }
}

impl Paged {
    fn held(&self, page: usize) -> Option<Arc<[ChunkLoc]>> {
        let mut held = self.held.lock().expect("page lock");
        held.clock += 1;
        let clock = held.clock;
        held.pages.get_mut(&page).map(|(locs, used)| {
            *used = clock;
            locs.clone()
        })
    }

    fn page(&self, page: usize, of: &ChunkTable) -> Result<Arc<[ChunkLoc]>, FetchError> {
        if let Some(locs) = self.held(page) {
            return Ok(locs);
        }
        let _loading = self.loading[page % LOAD_STRIPES]
            .lock()
            .expect("page load lock");
        if let Some(locs) = self.held(page) {
            return Ok(locs);
        }
        let r = *self.table.pages.get(page).ok_or(FetchError::NoChunk {
            chunk: (page * PAGE_CHUNKS) as u32,
            chunks: of.count,
        })?;
        let invalid =
            |e: warren_image::IndexError| StoreError::Invalid(format!("the chunk table: {e}"));
        let (bytes, cached) = match self.cache.get(&r.id) {
            Some(bytes) => (bytes, true),
            None => {
                let bytes = self
                    .store
                    .read_range(&self.blob, r.offset, u64::from(r.len))?;
                of.requests.fetch_add(1, Ordering::Relaxed);
                of.bytes_fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                (bytes, false)
            }
        };
        let locs: Arc<[ChunkLoc]> = self
            .table
            .decode_page(page, &bytes, of.blobs)
            .map_err(invalid)?
            .into();
        // Pinned before any of its chunks can be fetched, and the page with them.
        self.cache.pin_more(
            &self.pins,
            std::iter::once(r.id).chain(locs.iter().map(|l| l.id)),
        );
        if !cached && let Err(e) = self.cache.insert(&r.id, &bytes) {
            tracing::debug!(error = %e, "cannot keep a page of the chunk table");
        }
        let mut held = self.held.lock().expect("page lock");
        if held.pages.len() >= HELD_PAGES
            && let Some(oldest) = held
                .pages
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(p, _)| *p)
        {
            held.pages.remove(&oldest);
        }
        let clock = held.clock;
        held.pages.insert(page, (locs.clone(), clock));
        Ok(locs)
    }
}
