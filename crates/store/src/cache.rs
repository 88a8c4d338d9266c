//! The host chunk cache: decompressed, verified chunks shared by every image on the host, one
//! file per chunk under `chunks/<2 hex>/<64 hex>`, so identical chunks are stored once.
//!
//! - Which chunks are present survives restarts: it is the set of files (scanned at open).
//! - Writes are atomic: a chunk is written to `tmp/` (named by process and thread) and renamed
//!   into place; leftovers of a crash older than ten minutes are removed at open — never newer
//!   ones, which another process sharing the cache may be writing. A half-written chunk is
//!   never visible under its name.
//! - Every chunk is verified against its id when inserted and again when read; a corrupt file is
//!   deleted and reported as a miss, so the caller fetches it again. It is never served.
//! - With a size limit, the least recently used chunks that no mounted image pins are evicted.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use warren_image::ChunkId;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("chunk cache {}: {op} failed", dir.display())]
    Io {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to cache chunk {0}: its content does not match its id")]
    Corrupt(ChunkId),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub chunks: u64,
    pub bytes: u64,
    pub evicted: u64,
}

#[derive(Debug)]
struct Slot {
    size: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<ChunkId, Slot>,
    bytes: u64,
    clock: u64,
    pinned: HashSet<ChunkId>,
    evicted: u64,
}

#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    limit: Option<u64>,
    state: Mutex<State>,
}

fn chunk_path(dir: &Path, id: &ChunkId) -> PathBuf {
    let hex = id.to_hex();
    dir.join("chunks").join(&hex[..2]).join(hex)
}

fn parse_id(name: &str) -> Option<ChunkId> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(name, &mut id).ok()?;
    Some(ChunkId(id))
}

impl ChunkCache {
    /// Opens (or creates) the cache in `dir`. `limit` caps its size in bytes.
    pub fn open(dir: &Path, limit: Option<u64>) -> Result<ChunkCache, CacheError> {
        let io = |op| {
            move |source| CacheError::Io {
                dir: dir.to_path_buf(),
                op,
                source,
            }
        };
        fs::create_dir_all(dir.join("chunks")).map_err(io("create"))?;
        // Partial chunks a crash left behind. Other processes may share this cache (every
        // image mount of the host does) and be writing theirs right now: only old ones go.
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).map_err(io("create"))?;
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(600));
                if stale {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let mut state = State::default();
        for shard in fs::read_dir(dir.join("chunks")).map_err(io("scan"))? {
            let shard = shard.map_err(io("scan"))?;
            for file in fs::read_dir(shard.path()).map_err(io("scan"))? {
                let file = file.map_err(io("scan"))?;
                let Some(id) = file.file_name().to_str().and_then(parse_id) else {
                    continue;
                };
                let meta = file.metadata().map_err(io("scan"))?;
                let used = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                state.bytes += meta.len();
                state.slots.insert(
                    id,
                    Slot {
                        size: meta.len(),
                        used,
                    },
                );
                state.clock = state.clock.max(used);
            }
        }
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(state),
        })
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        chunk_path(&self.dir, id)
    }

    /// The share of `ids` present in the cache at `dir`, read from disk without opening the
    /// cache (opening clears its temporary folder, which a running mount may be writing to).
    /// Long lists are sampled: one id at a pseudo-random place in each of 4096 equal stretches
    /// (a fixed stride could fall in step with a pattern in the list), enough for placing
    /// workspaces.
    pub fn share_on_disk(dir: &Path, ids: &[ChunkId]) -> f64 {
        const SAMPLE: usize = 4096;
        if ids.is_empty() {
            return 0.0;
        }
        let n = ids.len();
        let picks: Vec<usize> = if n <= SAMPLE {
            (0..n).collect()
        } else {
            (0..SAMPLE)
                .filter_map(|k| {
                    let (lo, hi) = (k * n / SAMPLE, (k + 1) * n / SAMPLE);
                    // splitmix64 of the stretch number: the same picks every time.
                    let mut z = (k as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    (hi > lo).then(|| lo + (z % (hi - lo) as u64) as usize)
                })
                .collect()
        };
        let present = picks
            .iter()
            .filter(|&&i| chunk_path(dir, &ids[i]).exists())
            .count();
        present as f64 / picks.len() as f64
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state
            .lock()
            .expect("cache lock")
            .slots
            .contains_key(id)
    }

    /// The chunk's content, verified; `None` if absent or found corrupt (then it is removed).
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        {
            let mut state = self.state.lock().expect("cache lock");
            state.clock += 1;
            let clock = state.clock;
            state.slots.get_mut(id)?.used = clock;
        }
        let path = self.path_of(id);
        match fs::read(&path) {
            Ok(data) if ChunkId::of(&data) == *id => Some(data),
            Ok(_) => {
                tracing::warn!(chunk = %id, "cached chunk is corrupt; removing it");
                let _ = fs::remove_file(&path);
                self.forget(id);
                None
            }
            Err(_) => {
                self.forget(id);
                None
            }
        }
    }

    fn forget(&self, id: &ChunkId) {
        let mut state = self.state.lock().expect("cache lock");
        if let Some(slot) = state.slots.remove(id) {
            state.bytes -= slot.size;
        }
    }

    /// Stores a chunk after checking it against `id`.
    pub fn insert(&self, id: &ChunkId, data: &[u8]) -> Result<(), CacheError> {
        if ChunkId::of(data) != *id {
            return Err(CacheError::Corrupt(*id));
        }
        if self.contains(id) {
            return Ok(());
        }
        let io = |op| {
            move |source| CacheError::Io {
                dir: self.dir.clone(),
                op,
                source,
            }
        };
        let path = self.path_of(id);
        fs::create_dir_all(path.parent().expect("chunk paths have a parent"))
            .map_err(io("write"))?;
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}.{:?}",
            id.to_hex(),
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = fs::File::create(&tmp).map_err(io("write"))?;
        f.write_all(data).map_err(io("write"))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io("write"))?;
        let mut state = self.state.lock().expect("cache lock");
        state.clock += 1;
        let used = state.clock;
        if state
            .slots
            .insert(
                *id,
                Slot {
                    size: data.len() as u64,
                    used,
                },
            )
            .is_none()
        {
            state.bytes += data.len() as u64;
        }
        if let Some(limit) = self.limit
            && state.bytes > limit
        {
            self.evict(&mut state, limit - limit / 10);
        }
        Ok(())
    }

    fn evict(&self, state: &mut State, target: u64) {
        let mut victims: Vec<(u64, ChunkId)> = state
            .slots
            .iter()
            .filter(|(id, _)| !state.pinned.contains(*id))
            .map(|(id, s)| (s.used, *id))
            .collect();
        victims.sort_unstable();
        for (_, id) in victims {
            if state.bytes <= target {
                break;
            }
            if fs::remove_file(self.path_of(&id)).is_ok()
                && let Some(slot) = state.slots.remove(&id)
            {
                state.bytes -= slot.size;
                state.evicted += 1;
            }
        }
    }

    /// Asks the kernel to start reading the files of these cached chunks. A sequential read of a
    /// file spans many chunk files, and the kernel's readahead does not cross files by itself.
    pub fn advise_willneed(&self, ids: &[ChunkId]) {
        use std::os::fd::AsRawFd as _;
        for id in ids {
            if !self.contains(id) {
                continue;
            }
            if let Ok(f) = fs::File::open(self.path_of(id)) {
                // SAFETY: the descriptor is open for the whole call; fadvise only gives a hint
                // and reads no memory of ours.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                }
            }
        }
    }

    /// Keeps these chunks from eviction (the chunks of a mounted image).
    pub fn pin(&self, ids: impl IntoIterator<Item = ChunkId>) {
        self.state.lock().expect("cache lock").pinned.extend(ids);
    }

    pub fn unpin_all(&self) {
        self.state.lock().expect("cache lock").pinned.clear();
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.state.lock().expect("cache lock");
        CacheStats {
            chunks: state.slots.len() as u64,
            bytes: state.bytes,
            evicted: state.evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_survive_reopening_and_corruption_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        let data = b"some chunk".to_vec();
        let id = ChunkId::of(&data);
        assert!(matches!(
            cache.insert(&ChunkId::of(b"other"), &data),
            Err(CacheError::Corrupt(_))
        ));
        cache.insert(&id, &data).unwrap();
        drop(cache);

        let cache = ChunkCache::open(dir.path(), None).unwrap();
        assert_eq!(cache.get(&id), Some(data.clone()));
        assert_eq!(cache.stats().bytes, data.len() as u64);
        fs::write(cache.path_of(&id), b"bit rot").unwrap();
        assert_eq!(cache.get(&id), None);
        assert!(!cache.contains(&id));
        assert!(!cache.path_of(&id).exists());
    }

    #[test]
    fn opening_the_cache_again_leaves_other_writers_alone() {
        let dir = tempfile::tempdir().unwrap();
        let first = ChunkCache::open(dir.path(), None).unwrap();
        // Another process's chunk being written as a second mount opens the cache.
        let in_flight = dir.path().join("tmp/abc.1.ThreadId(2)");
        std::fs::write(&in_flight, b"partial").unwrap();
        let second = ChunkCache::open(dir.path(), None).unwrap();
        assert!(in_flight.exists(), "a write in flight was removed");
        let data = b"shared chunk".to_vec();
        let id = ChunkId::of(&data);
        first.insert(&id, &data).unwrap();
        second.insert(&id, &data).unwrap();
        assert_eq!(second.get(&id), Some(data));
    }

    #[test]
    fn the_share_on_disk_counts_present_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        let chunks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100]).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        for c in &chunks[..3] {
            cache.insert(&ChunkId::of(c), c).unwrap();
        }
        assert!((ChunkCache::share_on_disk(dir.path(), &ids) - 0.3).abs() < 1e-9);
        assert_eq!(ChunkCache::share_on_disk(dir.path(), &[]), 0.0);
        // Long lists are sampled evenly.
        let many: Vec<ChunkId> = ids.iter().cycle().take(100_000).cloned().collect();
        let share = ChunkCache::share_on_disk(dir.path(), &many);
        assert!((share - 0.3).abs() < 0.02, "{share}");
    }

    #[test]
    fn eviction_keeps_pinned_and_recent_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), Some(3000)).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        cache.pin([ids[0]]);
        for (id, c) in ids.iter().zip(&chunks) {
            cache.insert(id, c).unwrap();
        }
        assert!(cache.stats().bytes <= 3000);
        assert!(cache.contains(&ids[0]), "pinned chunk evicted");
        assert!(cache.contains(&ids[4]), "newest chunk evicted");
        assert!(!cache.contains(&ids[1]), "oldest unpinned chunk kept");
    }
}
