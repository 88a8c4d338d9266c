//! Filling the cache around a mount: first the recorded startup set in trace order (large
//! merged requests), then everything else in pack order, yielding whenever an on-demand read is
//! in flight so that the developer's reads never queue behind background work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use warren_store::{ChunkFetcher, FetchError, Located};

use crate::trace::Trace;

/// Bytes (uncompressed) per prefetch batch: the upper bound of one merged request.
const BATCH_BYTES: u64 = 8 << 20;
/// Background batches in flight at once: enough to keep a link busy while a finished batch is
/// verified and written.
const PULL_WORKERS: usize = 3;
/// The first trace batch's bytes; each next is twice the one before, up to [`BATCH_BYTES`]. What
/// a workspace reads first comes first in its trace, and its first command waits for it: in one
/// 8 MiB batch sharing the link with seven others, the first command of `bench start` took
/// 1.4 s against 0.9 s with no trace at all.
const TRACE_FIRST_BATCH: u64 = 256 << 10;
/// Trace batches in flight at once. A startup set is scattered (small files between files
/// nobody reads at startup), so its batches are many small requests; parallel requests hide the
/// registry's per-request latency (about 3.5 ms for docker-registry here).
const TRACE_WORKERS: usize = 8;

#[derive(Debug, Default)]
pub struct Progress {
    pub trace_chunks: AtomicU64,
    pub trace_done: AtomicU64,
    pub all_chunks: AtomicU64,
    pub all_done: AtomicU64,
    pub finished: AtomicBool,
    pub stop: AtomicBool,
    pub failures: AtomicU64,
}

/// A snapshot of a mount's counters, as written to its stats file.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub bytes_fetched: u64,
    pub requests: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cached_chunks: u64,
    pub cached_bytes: u64,
    pub trace_chunks: u64,
    pub trace_done: u64,
    pub all_chunks: u64,
    pub all_done: u64,
    pub pull_finished: bool,
    pub pull_failures: u64,
    pub passthrough: bool,
    pub whole_file_opens: u64,
    pub whole_files_made: u64,
}

/// A mount's counters; bytes and requests count the chunk table's pages too.
pub fn stats(fetcher: &ChunkFetcher, progress: &Progress) -> Stats {
    let c = &fetcher.counters;
    let t = fetcher.table();
    let cache = fetcher.cache().stats();
    Stats {
        bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed)
            + t.bytes_fetched.load(Ordering::Relaxed),
        requests: c.requests.load(Ordering::Relaxed) + t.requests.load(Ordering::Relaxed),
        cache_hits: c.cache_hits.load(Ordering::Relaxed),
        cache_misses: c.cache_misses.load(Ordering::Relaxed),
        cached_chunks: cache.chunks,
        cached_bytes: cache.bytes,
        trace_chunks: progress.trace_chunks.load(Ordering::Relaxed),
        trace_done: progress.trace_done.load(Ordering::Relaxed),
        all_chunks: progress.all_chunks.load(Ordering::Relaxed),
        all_done: progress.all_done.load(Ordering::Relaxed),
        pull_finished: progress.finished.load(Ordering::Relaxed),
        pull_failures: progress.failures.load(Ordering::Relaxed),
        passthrough: c.passthrough.load(Ordering::Relaxed),
        whole_file_opens: c.whole_file_opens.load(Ordering::Relaxed),
        whole_files_made: c.whole_files_made.load(Ordering::Relaxed),
    }
}

/// Replays `trace` (if any), then, with `background`, pulls every other chunk. Runs on its own
/// thread; failures are counted and logged, and the chunks are left to on-demand reads.
///
/// The background pull of one image is one process's at a time on a host (`image_key` names
/// the image for [`warren_store::ChunkCache::pull_lock`]): a mount started while another pulls
/// it waits, then finds the chunks cached.
pub fn spawn(
    fetcher: Arc<ChunkFetcher>,
    trace: Option<Trace>,
    background: bool,
    image_key: String,
    progress: Arc<Progress>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("warren-pull".into())
        .spawn(move || {
            let table = fetcher.table();
            // What an earlier mount left of the image in the host's cache stays for this one.
            table.pin_cached_pages();
            if let Some(trace) = trace {
                let (order, failed) = table.locs_available(&trace.positions(table));
                progress.failures.fetch_add(failed, Ordering::Relaxed);
                progress
                    .trace_chunks
                    .store(order.len() as u64, Ordering::Relaxed);
                // The trace is what the workspace is about to read: no yielding here.
                run_batches(
                    &fetcher,
                    &progress,
                    &batches(&order, TRACE_FIRST_BATCH),
                    &progress.trace_done,
                    TRACE_WORKERS,
                    false,
                );
                if progress.stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            if background {
                let stop = || progress.stop.load(Ordering::Relaxed);
                let _pulling = fetcher.cache().pull_lock(&image_key, &stop);
                if stop() {
                    return;
                }
                progress
                    .all_chunks
                    .store(u64::from(table.len()), Ordering::Relaxed);
                // A page of the table at a time, each in pack order: a 100 GiB image's whole
                // table is never held.
                for page in 0..table.pages() {
                    let mut all = match page_located(&fetcher, page) {
                        Ok(all) => all,
                        Err(err) => {
                            progress.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %err, page, "cannot read a page of the chunk table; its chunks will be fetched when read");
                            progress.all_done.fetch_add(
                                table.page_span(page).len() as u64,
                                Ordering::Relaxed,
                            );
                            continue;
                        }
                    };
                    all.sort_by_key(|(_, l)| (l.blob, l.offset));
                    run_batches(
                        &fetcher,
                        &progress,
                        &batches(&all, BATCH_BYTES),
                        &progress.all_done,
                        PULL_WORKERS,
                        true,
                    );
                    if progress.stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
            progress.finished.store(true, Ordering::Relaxed);
        })
        .expect("spawning a thread")
}

/// Runs `work` with `workers` batches in flight, in order, so the link stays busy while a
/// finished batch is verified and written to the cache. With `yield_to_demand`, no new batch
/// starts while an on-demand read is in flight.
fn run_batches(
    fetcher: &ChunkFetcher,
    progress: &Progress,
    work: &[Vec<Located>],
    done: &AtomicU64,
    workers: usize,
    yield_to_demand: bool,
) {
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    if progress.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(batch) = work.get(i) else {
                        return;
                    };
                    while yield_to_demand
                        && fetcher.counters.demand_in_flight.load(Ordering::SeqCst) > 0
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    run_batch(fetcher, progress, batch, done);
                }
            });
        }
    });
}

fn run_batch(fetcher: &ChunkFetcher, progress: &Progress, batch: &[Located], done: &AtomicU64) {
    if let Err(err) = fetcher.prefetch(batch) {
        progress.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %err, chunks = batch.len(), "prefetch failed; these chunks will be fetched when read");
    }
    done.fetch_add(batch.len() as u64, Ordering::Relaxed);
}

/// The chunks of page `page` of the fetcher's table, located.
fn page_located(fetcher: &ChunkFetcher, page: usize) -> Result<Vec<Located>, FetchError> {
    let locs = fetcher.table().page(page)?;
    let first = fetcher.table().page_span(page).start;
    Ok((first..).zip(locs.iter().copied()).collect())
}

/// `order` in batches of up to [`BATCH_BYTES`], the first of `first` bytes and each next twice
/// the one before until then.
fn batches(order: &[Located], first: u64) -> Vec<Vec<Located>> {
    let mut out: Vec<Vec<Located>> = Vec::new();
    let mut bytes = 0;
    let mut limit = first.min(BATCH_BYTES);
    for &(c, loc) in order {
        let len = u64::from(loc.len);
        if out.is_empty() || bytes + len > limit {
            if !out.is_empty() {
                limit = (limit * 2).min(BATCH_BYTES);
            }
            out.push(Vec::new());
            bytes = 0;
        }
        out.last_mut().expect("just pushed").push((c, loc));
        bytes += len;
    }
    out
}
