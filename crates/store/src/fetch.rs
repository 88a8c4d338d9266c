//! Getting chunk data for a reader: from the host cache when present, otherwise from the blob
//! store. Missing chunks that lie next to each other in a pack are fetched with one range
//! request (small gaps are read through rather than split), every chunk is verified against its
//! id before it is cached or returned, and a chunk several readers want at once is fetched once.
//!
//! The layers are nydus's: backend ([`BlobStore`]) -> cache ([`ChunkCache`]) -> this fetcher,
//! which is what the filesystem reads.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use warren_image::{ChunkLoc, PAGE_CHUNKS, TreeIndex, open_chunk};

use crate::blob::{BlobStore, StoreError};
use crate::cache::{CacheError, ChunkCache};
use crate::table::{ChunkTable, TableSource};

/// A chunk (its position in the image's chunk table) and where it lives.
pub type Located = (u32, ChunkLoc);

/// Gaps up to this size between wanted chunks are read through (one request beats two).
const MAX_GAP: u64 = 64 << 10;
/// Pack readahead: an on-demand fetch also takes the chunks that follow it in its pack, this
/// much at first (compressed bytes) ...
const PACK_AHEAD_MIN: u64 = 128 << 10;
/// ... doubling while reads keep landing where the last fetch ended, up to this.
const PACK_AHEAD_MAX: u64 = 2 << 20;
/// Places in the packs followed at once: a program reading several folders in turn (each
/// library's files) goes through each of them.
const PACK_STREAMS: usize = 32;
/// Readahead is fetched behind the reader's back, on threads of its own, this many at once; the
/// reader waits only for the chunks it asked for.
const AHEAD_THREADS: usize = 4;
/// Pack readahead looks this far along the chunk table for chunks that follow in the pack.
const AHEAD_SCAN: usize = PAGE_CHUNKS;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("chunk {chunk} from {store} is corrupt even after fetching it again")]
    Corrupt {
        chunk: warren_image::ChunkId,
        store: String,
    },
    #[error("chunk {chunk} from {store} could not be fetched")]
    Unavailable {
        chunk: warren_image::ChunkId,
        store: String,
    },
    #[error("chunk {chunk} is not in the image's table of {chunks}")]
    NoChunk { chunk: u32, chunks: u32 },
}

/// Counters, readable while the fetcher runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Compressed bytes received from the blob store.
    pub bytes_fetched: AtomicU64,
    pub requests: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// On-demand reads in progress: background work yields while this is not zero.
    pub demand_in_flight: AtomicU64,
    /// Opens the kernel reads from a whole-file copy ([`crate::WholeFiles`]), not through
    /// the mount.
    pub whole_file_opens: AtomicU64,
    /// Whole-file copies this mount made.
    pub whole_files_made: AtomicU64,
    /// Whether the kernel agreed to read from whole-file copies (set when the mount starts).
    pub passthrough: AtomicBool,
}

/// A place in a pack a reader is going through: where the window before the last began
/// (`prev`), the last readahead window asked for (`[start, end)`), its size, and the chunk
/// table position to look on from for the next.
#[derive(Debug, Clone, Copy)]
struct PackStream {
    blob: u32,
    prev: u64,
    start: u64,
    end: u64,
    window: u64,
    next: u32,
}

#[derive(Debug)]
pub struct ChunkFetcher {
    store: Arc<dyn BlobStore>,
    cache: Arc<ChunkCache>,
    index: Arc<TreeIndex>,
    table: ChunkTable,
    in_flight: Mutex<HashSet<u32>>,
    landed: Condvar,
    /// The places readers are going through, the most recently used last.
    ahead: Mutex<Vec<PackStream>>,
    max_request: u64,
    /// Readahead fetches running, and a signal when one ends.
    behind: Mutex<usize>,
    behind_done: Condvar,
    me: Weak<ChunkFetcher>,
    pub counters: Counters,
}

impl std::fmt::Debug for dyn BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ChunkFetcher {
    /// Reads the chunks of `index` from `store` through `cache`, located by `table` (as
    /// [`crate::images::open_image_lazily`] gives them); `max_request` bounds the bytes of one
    /// range request.
    pub fn new(
        store: Arc<dyn BlobStore>,
        cache: Arc<ChunkCache>,
        index: Arc<TreeIndex>,
        table: TableSource,
        max_request: u64,
    ) -> Arc<ChunkFetcher> {
        let table = ChunkTable::new(table, index.blobs.len(), store.clone(), cache.clone());
        Arc::new_cyclic(|me| ChunkFetcher {
            store,
            cache,
            index,
            table,
            in_flight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            ahead: Mutex::new(Vec::new()),
            max_request,
            behind: Mutex::new(0),
            behind_done: Condvar::new(),
            me: me.clone(),
            counters: Counters::default(),
        })
    }

    /// Waits until no readahead is being fetched.
    pub fn settle(&self) {
        let mut running = self.behind.lock().expect("readahead lock");
        while *running > 0 {
            running = self.behind_done.wait(running).expect("readahead lock");
        }
    }

    /// Fetches `chunks` on a thread of its own, while the reader that asked goes on with the
    /// chunks it needs; the chunks back if [`AHEAD_THREADS`] already run.
    fn fetch_behind(&self, chunks: Vec<Located>) -> Result<(), Vec<Located>> {
        {
            let mut running = self.behind.lock().expect("readahead lock");
            if *running >= AHEAD_THREADS {
                return Err(chunks);
            }
            *running += 1;
        }
        let done = |me: &ChunkFetcher| {
            *me.behind.lock().expect("readahead lock") -= 1;
            me.behind_done.notify_all();
        };
        let Some(me) = self.me.upgrade() else {
            done(self);
            return Err(chunks);
        };
        // Claimed now: a reader that gets to one of them first waits for it rather than
        // fetch it again.
        let mine = self.claim(&chunks);
        let claimed = mine.clone();
        let spawned = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || {
                // On a reader's behalf: the background pull waits for it too.
                me.counters.demand_in_flight.fetch_add(1, Ordering::SeqCst);
                // A failure is the reader's to meet, if it gets that far.
                if let Err(e) = me.fetch_claimed(&mine, &[]) {
                    tracing::debug!(error = %e, "readahead failed");
                }
                me.release(&mine);
                me.counters.demand_in_flight.fetch_sub(1, Ordering::SeqCst);
                done(&me);
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot start a readahead thread");
            self.release(&claimed);
            done(self);
        }
        Ok(())
    }

    pub fn index(&self) -> &TreeIndex {
        &self.index
    }

    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    /// Where each chunk of file `entry` lives, checked to hold the file's size (an index from a
    /// store is only checked this far when a file's pages arrive).
    pub fn file_locs(&self, entry: &warren_image::Entry) -> Result<Vec<ChunkLoc>, FetchError> {
        let locs = self.table.locs(&entry.chunks.to_vec())?;
        TreeIndex::check_file(entry, locs.iter().map(|l| l.len))
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(locs)
    }

    /// Where each of `chunks` lives.
    pub fn locate(&self, chunks: &[u32]) -> Result<Vec<Located>, FetchError> {
        let locs = self.table.locs(chunks)?;
        Ok(chunks.iter().copied().zip(locs).collect())
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The content of the chunks `wanted` (indices into the index's chunk table), one after
    /// the other. `extra` chunks are fetched in the same requests when missing (readahead) but
    /// not returned.
    pub fn read(&self, wanted: &[u32], extra: &[u32]) -> Result<Vec<u8>, FetchError> {
        let mut out = Vec::new();
        self.read_into(wanted, extra, &mut out)?;
        Ok(out)
    }

    /// [`ChunkFetcher::read`] into a buffer the caller reuses: the content is appended to `out`.
    pub fn read_into(
        &self,
        wanted: &[u32],
        extra: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<(), FetchError> {
        self.on_demand(|| {
            self.locate(wanted).and_then(|wanted| {
                // Readahead is a guess: a page of the table that cannot be had now is no
                // reason to fail the read.
                let extra = self.locate(extra).unwrap_or_default();
                self.read_inner(&wanted, &extra, out)
            })
        })
    }

    /// Runs `work` as an on-demand read: background work yields until it is done (or
    /// panicked).
    pub fn on_demand<T>(&self, work: impl FnOnce() -> T) -> T {
        struct Demand<'a>(&'a AtomicU64);
        impl Drop for Demand<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.counters
            .demand_in_flight
            .fetch_add(1, Ordering::SeqCst);
        let _demand = Demand(&self.counters.demand_in_flight);
        work()
    }

    fn read_inner(
        &self,
        wanted: &[Located],
        extra: &[Located],
        out: &mut Vec<u8>,
    ) -> Result<(), FetchError> {
        let start = out.len();
        // The common case: everything local, read straight into `out`.
        let mut hits = 0;
        for (_, loc) in wanted {
            if !self.cache.read_into(&loc.id, out) {
                break;
            }
            hits += 1;
        }
        self.counters
            .cache_hits
            .fetch_add(hits as u64, Ordering::Relaxed);
        if hits == wanted.len() {
            let ahead: Vec<_> = extra.iter().map(|(_, loc)| loc.id).collect();
            self.cache.advise_willneed(&ahead);
            return Ok(());
        }
        // Another process may have stored them since.
        self.cache.refresh();
        let rest = &wanted[hits..];
        let absent = |(_, loc): &Located| !self.cache.contains(&loc.id);
        let mut missing: Vec<Located> = rest.iter().copied().filter(absent).collect();
        // Readahead (the rest of the file, the pack after it) comes behind the reader's back;
        // when no thread is free for it, with the chunks wanted.
        let mut ahead: Vec<Located> = extra.iter().copied().filter(absent).collect();
        ahead.extend(self.pack_ahead(&missing));
        if !ahead.is_empty()
            && let Err(ahead) = self.fetch_behind(ahead)
        {
            missing.extend(ahead);
        }
        let fetched: HashMap<u32, Vec<u8>> = self.fetch(&missing, rest)?.into_iter().collect();
        for &(c, loc) in rest {
            if let Some(d) = fetched.get(&c) {
                self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
                out.extend_from_slice(d);
                continue;
            }
            if self.cache.read_into(&loc.id, out) {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Another reader was fetching it and failed, or it was evicted since: fetch it here.
            self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
            match self.fetch(&[(c, loc)], &[(c, loc)])?.into_iter().next() {
                Some((_, d)) => out.extend_from_slice(&d),
                None if self.cache.read_into(&loc.id, out) => {}
                None => {
                    out.truncate(start);
                    return Err(FetchError::Unavailable {
                        chunk: loc.id,
                        store: self.store.describe(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The chunks to read ahead of an on-demand miss: those that follow it in its pack. Images
    /// are packed in path order, so the files next to a file just read (the rest of its folder)
    /// come with it, and a reader going through a folder needs a request per window instead of
    /// one per file. The window grows like the kernel's readahead: from [`PACK_AHEAD_MIN`],
    /// doubling while the reader keeps going through the pack, up to [`PACK_AHEAD_MAX`]; the
    /// next window is asked for as soon as the reader gets into the last one (it then waits for
    /// chunks still on their way), so one window is always coming. Several such places are
    /// followed at once.
    ///
    /// What follows in the pack is found along the chunk table, which a builder fills in pack
    /// order: the chunks after the last one missed, of the same pack, beyond the window's start
    /// (a chunk met before in the table, or from an older pack, is passed over). Only pages of
    /// the table at hand are looked at: the reader does not wait for a page for a guess.
    fn pack_ahead(&self, missing: &[Located]) -> Vec<Located> {
        let (Some(&(_, first)), Some(&(last_c, last))) = (missing.first(), missing.last()) else {
            return Vec::new();
        };
        let mut streams = self.ahead.lock().expect("readahead lock");
        // The stream this miss belongs to: from the window before its last (the reader waits
        // for chunks on their way) to where the last ends, give or take a gap a fetch would
        // read through.
        let on = |s: &PackStream| {
            s.blob == first.blob && first.offset >= s.prev && first.offset <= s.end + MAX_GAP
        };
        let last_end = last.offset + u64::from(last.compressed_len);
        let (from, window, next) = match streams.iter().position(on) {
            Some(i) => {
                let s = streams.remove(i);
                streams.push(s);
                if first.offset < s.start {
                    // Still in the window before: the last one is already coming.
                    return Vec::new();
                }
                // Into the last window, or past it: the next one.
                (
                    s.end.max(last_end),
                    (s.window * 2).min(PACK_AHEAD_MAX),
                    s.next.max(last_c + 1),
                )
            }
            None => {
                if streams.len() >= PACK_STREAMS {
                    streams.remove(0);
                }
                streams.push(PackStream {
                    blob: first.blob,
                    prev: first.offset,
                    start: first.offset,
                    end: last_end,
                    window: PACK_AHEAD_MIN,
                    next: last_c + 1,
                });
                (last_end, PACK_AHEAD_MIN, last_c + 1)
            }
        };
        let stream = streams.last_mut().expect("just pushed");
        let mut out = Vec::new();
        let mut taken = 0;
        let mut end = from;
        let mut c = next;
        let mut passed = 0;
        let mut page: Option<(usize, Arc<[ChunkLoc]>)> = None;
        while c < self.table.len() && taken < window && passed < AHEAD_SCAN {
            let p = c as usize / PAGE_CHUNKS;
            let locs = match &page {
                Some((q, locs)) if *q == p => locs,
                _ => match self.table.page_at_hand(p) {
                    Some(locs) => &page.insert((p, locs)).1,
                    None => break,
                },
            };
            let loc = locs[c as usize % PAGE_CHUNKS];
            c += 1;
            if loc.blob != last.blob || loc.offset < end {
                passed += 1;
                continue;
            }
            passed = 0;
            taken += u64::from(loc.compressed_len);
            end = loc.offset + u64::from(loc.compressed_len);
            if !self.cache.contains(&loc.id) {
                out.push((c - 1, loc));
            }
        }
        *stream = PackStream {
            blob: last.blob,
            prev: stream.start,
            start: from,
            end,
            window,
            next: c,
        };
        out
    }

    /// Makes sure the chunks are in the cache (prefetch and background pull).
    pub fn prefetch(&self, chunks: &[Located]) -> Result<(), FetchError> {
        self.cache.refresh();
        let missing: Vec<Located> = chunks
            .iter()
            .copied()
            .filter(|(_, loc)| !self.cache.contains(&loc.id))
            .collect();
        self.fetch(&missing, &[]).map(|_| ())
    }

    /// Marks those of `chunks` nobody is fetching as being fetched by the caller, and returns
    /// them.
    fn claim(&self, chunks: &[Located]) -> Vec<Located> {
        let mut mine: Vec<Located> = Vec::new();
        let mut in_flight = self.in_flight.lock().expect("fetch lock");
        for &(c, loc) in chunks {
            if in_flight.insert(c) {
                mine.push((c, loc));
            }
        }
        mine
    }

    /// Ends a claim: the chunks landed (or failed), and those waiting for them look again.
    fn release(&self, mine: &[Located]) {
        let mut in_flight = self.in_flight.lock().expect("fetch lock");
        for (c, _) in mine {
            in_flight.remove(c);
        }
        self.landed.notify_all();
    }

    /// Fetches `chunks` (claiming them so concurrent readers wait instead of fetching them too)
    /// into the cache, and returns those of `keep` this call fetched.
    fn fetch(
        &self,
        chunks: &[Located],
        keep: &[Located],
    ) -> Result<Vec<(u32, Vec<u8>)>, FetchError> {
        let mine = self.claim(chunks);
        let result = self.fetch_claimed(&mine, keep);
        self.release(&mine);
        // Wait for the chunks other readers were fetching.
        let mut in_flight = self.in_flight.lock().expect("fetch lock");
        while chunks.iter().any(|(c, _)| in_flight.contains(c)) {
            in_flight = self.landed.wait(in_flight).expect("fetch lock");
        }
        result
    }

    /// Fetches `chunks` into the cache; the content of those of `keep` back. The rest is not
    /// held: a readahead of 8 MiB, several at once, would otherwise be held whole until its
    /// last chunk landed.
    fn fetch_claimed(
        &self,
        chunks: &[Located],
        keep: &[Located],
    ) -> Result<Vec<(u32, Vec<u8>)>, FetchError> {
        let mut sorted: Vec<Located> = chunks.to_vec();
        sorted.sort_by_key(|(c, l)| (l.blob, l.offset, *c));
        sorted.dedup_by_key(|(c, _)| *c);
        let keep: HashSet<u32> = keep.iter().map(|(c, _)| *c).collect();
        let mut out = Vec::with_capacity(keep.len());
        for run in self.runs(&sorted) {
            let first = run[0].1;
            let last = run.last().expect("runs are not empty").1;
            let start = first.offset;
            let end = last.offset + u64::from(last.compressed_len);
            let digest = self.index.blobs[first.blob as usize];
            let bytes = self.store.read_range(&digest, start, end - start)?;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            for &(c, loc) in &run {
                let at = (loc.offset - start) as usize;
                let frame = &bytes[at..at + loc.compressed_len as usize];
                let data = match open_chunk(&loc, frame) {
                    Ok(d) => d,
                    Err(_) => self.refetch_one(&loc)?,
                };
                self.cache.insert(&loc.id, &data)?;
                if keep.contains(&c) {
                    out.push((c, data));
                }
            }
        }
        Ok(out)
    }

    /// A chunk that arrived corrupt is fetched once more on its own; if it is still corrupt the
    /// read fails rather than serve it.
    fn refetch_one(&self, loc: &ChunkLoc) -> Result<Vec<u8>, FetchError> {
        tracing::warn!(chunk = %loc.id, store = %self.store.describe(), "chunk arrived corrupt; fetching it again");
        let digest = self.index.blobs[loc.blob as usize];
        let frame = self
            .store
            .read_range(&digest, loc.offset, u64::from(loc.compressed_len))?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        open_chunk(loc, &frame).map_err(|_| FetchError::Corrupt {
            chunk: loc.id,
            store: self.store.describe(),
        })
    }

    /// Splits chunks sorted by (blob, offset) into runs one request each can cover.
    fn runs(&self, sorted: &[Located]) -> Vec<Vec<Located>> {
        let mut runs: Vec<Vec<Located>> = Vec::new();
        for &(c, loc) in sorted {
            if let Some(run) = runs.last_mut() {
                let first = run[0].1;
                let prev = run.last().expect("runs are not empty").1;
                let prev_end = prev.offset + u64::from(prev.compressed_len);
                let joins = prev.blob == loc.blob
                    && loc.offset >= prev_end
                    && loc.offset - prev_end <= MAX_GAP
                    && loc.offset + u64::from(loc.compressed_len) - first.offset
                        <= self.max_request;
                if joins {
                    run.push((c, loc));
                    continue;
                }
            }
            runs.push(vec![(c, loc)]);
        }
        runs
    }
}
