//! The host chunk cache: decompressed, verified chunks shared by every image and every process
//! on the host; identical chunks are stored once.
//!
//! Chunks live in segments, `segments/<name>.data` with an index `segments/<name>.index`. Each
//! process that stores chunks appends them to a segment of its own (locked with `flock` while it
//! writes; a new one every [`SEGMENT_BYTES`]), each at a 4 KiB boundary, and then appends a
//! 48-byte record (id, offset, length) to the segment's index. Chunks fetched together lie
//! together, so a file read in order reads its segment in order and the kernel's readahead
//! works, and a read costs one `pread` on a file that stays open.
//!
//! - Which chunks are present survives restarts: the index files, replayed at open. Chunks other
//!   processes stored since are picked up by [`ChunkCache::refresh`].
//! - A crash never serves a half chunk: every chunk is verified against its id when inserted and
//!   again the first time each process reads it. Bytes that do not match (a write torn by a
//!   crash, bit rot, a range another process evicted) are a miss: the chunk is dropped and the
//!   caller fetches it again.
//! - A process that has verified a chunk holds a lease on it: a shared open-file-description
//!   lock (`F_OFD_SETLK`) on its byte range, released when the process exits. Eviction takes an
//!   exclusive lock on the range before punching it, and passes over a chunk it cannot lock, so
//!   a verified chunk cannot change under its reader and later reads skip the hash. A chunk some
//!   running process has read is therefore kept, whoever evicts.
//! - With a size limit, the least recently used chunks that no image this process mounts pins
//!   and no other process leases are evicted: their range is punched out of the segment
//!   (`fallocate`), a tombstone record is appended to the segment's index, and a segment with
//!   nothing left is deleted once no process writes to it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren_image::ChunkId;

/// A process starts a new segment once its current one holds this much.
const SEGMENT_BYTES: u64 = 1 << 30;
/// Chunks start at page boundaries: an evicted chunk's pages are freed whole, and reads are
/// page-aligned.
const ALIGN: u64 = 4096;
/// One index record: kind (4 bytes), length (4), offset (8), chunk id (32).
const RECORD: usize = 48;
const PRESENT: &[u8; 4] = b"WCC+";
const EVICTED: &[u8; 4] = b"WCC-";
/// Looking for other processes' new chunks at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(50);
/// After an eviction that could not get under the limit (what is left is pinned or leased),
/// the next waits this long rather than retry every chunk on every insert.
const EVICT_RETRY: Duration = Duration::from_secs(1);

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
    /// Disk space the present chunks take (each rounded up to 4 KiB).
    pub bytes: u64,
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Present,
    Evicted,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    kind: Kind,
    len: u32,
    offset: u64,
    id: ChunkId,
}

impl Record {
    fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[..4].copy_from_slice(match self.kind {
            Kind::Present => PRESENT,
            Kind::Evicted => EVICTED,
        });
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..].copy_from_slice(&self.id.0);
        b
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let kind = match &b[..4] {
            m if m == PRESENT => Kind::Present,
            m if m == EVICTED => Kind::Evicted,
            _ => return None,
        };
        Some(Record {
            kind,
            len: u32::from_le_bytes(b[4..8].try_into().ok()?),
            offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
            id: ChunkId(b[16..].try_into().ok()?),
        })
    }
}

/// The whole records in `bytes`; a malformed record is skipped, except at the very end, where it
/// may be one being written right now: the count of bytes consumed stops before it.
fn records(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::with_capacity(bytes.len() / RECORD);
    let mut used = 0;
    let whole = bytes.len() / RECORD * RECORD;
    for (i, b) in bytes[..whole].chunks_exact(RECORD).enumerate() {
        match Record::decode(b) {
            Some(r) => out.push(r),
            None if (i + 1) * RECORD == whole => break,
            None => {}
        }
        used = (i + 1) * RECORD;
    }
    (out, used)
}

fn aligned(len: u32) -> u64 {
    u64::from(len).div_ceil(ALIGN) * ALIGN
}

#[derive(Debug)]
struct Segment {
    name: String,
    data: Arc<File>,
    /// Bytes of its index replayed so far.
    index_read: u64,
    /// Its chunks this process counts as present.
    live: u64,
}

#[derive(Debug)]
struct Slot {
    segment: usize,
    offset: u64,
    len: u32,
    used: u64,
    /// Verified by this process, which holds a lease on its range: reads skip the hash.
    leased: bool,
}

/// One image's pinned chunks, as a Bloom filter: never a pinned chunk missed, now and then
/// (under 1%) another chunk kept a while longer. A 100 GiB image's 1.6 M ids take 2 MiB here,
/// 70 MiB in a set. The ids are BLAKE3 hashes already: their words are the filter's hashes.
#[derive(Debug)]
struct Pins {
    bits: Vec<u64>,
}

/// Bits tested per id.
const PIN_PROBES: u64 = 7;

impl Pins {
    /// Room for `capacity` ids at under 1% false positives: at least ten bits per id, seven
    /// probes.
    fn with_capacity(capacity: usize) -> Pins {
        let words = (capacity * 10).div_ceil(64).next_power_of_two().max(1);
        Pins {
            bits: vec![0; words],
        }
    }

    #[cfg(test)]
    fn of(ids: impl ExactSizeIterator<Item = ChunkId>) -> Pins {
        let mut pins = Pins::with_capacity(ids.len());
        pins.add(ids);
        pins
    }

    fn add(&mut self, ids: impl Iterator<Item = ChunkId>) {
        for id in ids {
            for bit in self.probes(&id) {
                self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
    }

    fn probes(&self, id: &ChunkId) -> impl Iterator<Item = u64> + use<> {
        let word = |i: usize| u64::from_le_bytes(id.0[i * 8..i * 8 + 8].try_into().expect("8"));
        let (a, b) = (word(0), word(1) | 1);
        let mask = self.bits.len() as u64 * 64 - 1;
        (0..PIN_PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) & mask)
    }

    fn may_hold(&self, id: &ChunkId) -> bool {
        self.probes(id)
            .all(|bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// A set of pinned chunks that grows ([`ChunkCache::pin_set`]).
#[derive(Debug)]
pub struct PinSet(u64);

#[derive(Debug, Default)]
struct State {
    slots: HashMap<ChunkId, Slot>,
    /// By position; `None` once deleted.
    segments: Vec<Option<Segment>>,
    bytes: u64,
    clock: u64,
    /// By [`PinSet`] number.
    pinned: Vec<(u64, Pins)>,
    pin_sets: u64,
    evicted: u64,
    refreshed: Option<Instant>,
    /// When eviction last stopped short of its target: every chunk left was pinned or leased.
    evict_blocked: Option<Instant>,
}

/// This process's segment for new chunks.
#[derive(Debug)]
struct Writer {
    segment: usize,
    data: File,
    index: File,
    end: u64,
}

#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    limit: Option<u64>,
    state: Mutex<State>,
    /// Taken before `state` when both are needed.
    writer: Mutex<Option<Writer>>,
}

fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

/// A segment's data (`"data"`) or index (`"index"`) file in the cache at `dir`.
fn segment_file(dir: &Path, name: &str, kind: &str) -> PathBuf {
    segments_dir(dir).join(format!("{name}.{kind}"))
}

impl ChunkCache {
    /// Takes, for as long as the answer lives, the host-wide lock on pulling the image with
    /// `key` into this cache; waits while another process holds it (checking `give_up` every
    /// 200 ms: `None` once it says so). Concurrent mounts of one image then pull it once, one
    /// after the other, the later ones finding the chunks there: each process stores what it
    /// fetches in segments of its own, so two pulling at once would store the image twice.
    pub fn pull_lock(&self, key: &str, give_up: &dyn Fn() -> bool) -> Option<File> {
        let dir = self.dir.join("pulls");
        fs::create_dir_all(&dir).ok()?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(format!("{key}.lock")))
            .ok()?;
        loop {
            if try_lock(&file) {
                return Some(file);
            }
            if give_up() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Takes `flock(LOCK_EX | LOCK_NB)` on `file`: true if no other process holds it.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor that is open for the whole call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Takes (`F_RDLCK`, `F_WRLCK`) or drops (`F_UNLCK`) an open-file-description lock on
/// `[offset, offset + len)` of `file` without waiting: false if another holds a conflicting one.
/// Such locks belong to the open file, not the thread, and go when it is closed.
fn range_lock(file: &File, kind: libc::c_int, offset: u64, len: u64) -> bool {
    let lock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
    };
    // SAFETY: fcntl on a descriptor that is open for the whole call, with a pointer to a lock
    // description that outlives it.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) == 0 }
}

/// Reads `len` bytes at `offset` of `file` onto the end of `out`, without zeroing them first;
/// false (and `out` as it was) if the file ends before or the read fails.
fn append_from(file: &File, offset: u64, len: usize, out: &mut Vec<u8>) -> bool {
    out.reserve(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    let mut done = 0;
    while done < len {
        // SAFETY: pread on a descriptor open for the whole call, into the `len - done` bytes
        // of reserved capacity left after `done`; the kernel only writes them.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare[done..].as_mut_ptr().cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
    let filled = out.len() + len;
    // SAFETY: the `len` bytes after the old length were all written by pread above.
    unsafe { out.set_len(filled) };
    true
}

/// Frees `[offset, offset + len)` of `file`, keeping its size.
fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a descriptor that is open for the whole call; it reads no memory.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        );
    }
}

/// The names of the segments in `dir` (those with an index), oldest first.
fn segment_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(segments_dir(dir))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".index"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
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
        fs::create_dir_all(segments_dir(dir)).map_err(io("create"))?;
        // The layout before segments: one file per chunk. A cache can always be refilled.
        for old in ["chunks", "tmp"] {
            if dir.join(old).exists() {
                tracing::info!(dir = %dir.display(), "removing a chunk cache of the old layout");
                let _ = fs::remove_dir_all(dir.join(old));
            }
        }
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(State::default()),
            writer: Mutex::new(None),
        };
        {
            let mut state = cache.state.lock().expect("cache lock");
            cache.scan(&mut state).map_err(io("scan"))?;
            // Segments left with nothing (all evicted, or a crash before the first record).
            let empty: Vec<usize> = (0..state.segments.len())
                .filter(|&s| state.segments[s].as_ref().is_some_and(|g| g.live == 0))
                .collect();
            for s in empty {
                cache.delete_segment(&mut state, s);
            }
        }
        Ok(cache)
    }

    /// Replays the index records added since the last look, in every segment, and takes in the
    /// segments other processes started.
    fn scan(&self, state: &mut State) -> std::io::Result<()> {
        let names = segment_names(&self.dir)?;
        let known: HashSet<&str> = state.segments.iter().flatten().map(|s| &*s.name).collect();
        let new: Vec<String> = names
            .into_iter()
            .filter(|n| !known.contains(n.as_str()))
            .collect();
        for name in new {
            let path = segment_file(&self.dir, &name, "data");
            match File::open(&path) {
                Ok(data) => state.segments.push(Some(Segment {
                    name,
                    data: Arc::new(data),
                    index_read: 0,
                    live: 0,
                })),
                // An index without its data: left by a crash while a segment was deleted.
                Err(_) => {
                    let _ = fs::remove_file(segment_file(&self.dir, &name, "index"));
                }
            }
        }
        for s in 0..state.segments.len() {
            self.replay(state, s);
        }
        Ok(())
    }

    /// Applies segment `s`'s index records not yet seen.
    fn replay(&self, state: &mut State, s: usize) {
        let Some(seg) = &state.segments[s] else {
            return;
        };
        let path = segment_file(&self.dir, &seg.name, "index");
        let mut bytes = Vec::new();
        let read = File::open(&path).and_then(|mut f| {
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(seg.index_read))?;
            f.read_to_end(&mut bytes)
        });
        if read.is_err() {
            // Deleted by another process: everything in it was evicted.
            state.slots.retain(|_, slot| slot.segment != s);
            state.segments[s] = None;
            state.bytes = state.slots.values().map(|x| aligned(x.len)).sum();
            return;
        }
        let size = seg.data.metadata().map_or(0, |m| m.len());
        let (recs, used) = records(&bytes);
        for r in recs {
            match r.kind {
                Kind::Present => {
                    // A record whose data never reached the file (a crash) is no chunk.
                    if r.offset + u64::from(r.len) > size || state.slots.contains_key(&r.id) {
                        continue;
                    }
                    state.clock += 1;
                    let used = state.clock;
                    state.slots.insert(
                        r.id,
                        Slot {
                            segment: s,
                            offset: r.offset,
                            len: r.len,
                            used,
                            leased: false,
                        },
                    );
                    state.bytes += aligned(r.len);
                    if let Some(seg) = &mut state.segments[s] {
                        seg.live += 1;
                    }
                }
                Kind::Evicted => {
                    let ours = state
                        .slots
                        .get(&r.id)
                        .is_some_and(|x| x.segment == s && x.offset == r.offset);
                    if ours {
                        state.slots.remove(&r.id);
                        state.bytes -= aligned(r.len);
                        if let Some(seg) = &mut state.segments[s] {
                            seg.live -= 1;
                        }
                    }
                }
            }
        }
        if let Some(seg) = &mut state.segments[s] {
            seg.index_read += used as u64;
        }
    }

    /// Takes in the chunks other processes stored since the last look (at most every 50 ms).
    pub fn refresh(&self) {
        let mut state = self.state.lock().expect("cache lock");
        if state.refreshed.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return;
        }
        state.refreshed = Some(Instant::now());
        if let Err(e) = self.scan(&mut state) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot scan the chunk cache");
        }
    }

    /// Appends a record to segment `s`'s index (`O_APPEND`: several processes may) and replays
    /// it.
    fn append(&self, state: &mut State, s: usize, record: Record) -> std::io::Result<()> {
        let Some(seg) = &state.segments[s] else {
            return Ok(());
        };
        OpenOptions::new()
            .append(true)
            .open(segment_file(&self.dir, &seg.name, "index"))?
            .write_all(&record.encode())?;
        self.replay(state, s);
        Ok(())
    }

    /// Deletes segment `s` if no process writes to it any more.
    fn delete_segment(&self, state: &mut State, s: usize) {
        let Some(seg) = &state.segments[s] else {
            return;
        };
        let path = segment_file(&self.dir, &seg.name, "data");
        let Ok(probe) = File::open(&path) else {
            return;
        };
        if !try_lock(&probe) {
            return;
        }
        let _ = fs::remove_file(segment_file(&self.dir, &seg.name, "index"));
        let _ = fs::remove_file(&path);
        state.slots.retain(|_, slot| slot.segment != s);
        state.segments[s] = None;
    }

    /// A sample of a long list of ids, enough to tell the share of them a cache holds: one id at
    /// a pseudo-random place in each of 4096 equal stretches (a fixed stride could fall in step
    /// with a pattern in the list); a short list whole.
    pub fn sample(ids: &[ChunkId]) -> Vec<ChunkId> {
        Self::sample_positions(ids.len()).map(|i| ids[i]).collect()
    }

    /// The positions [`ChunkCache::sample`] takes from a list of `n`, in order.
    fn sample_positions(n: usize) -> impl Iterator<Item = usize> {
        const SAMPLE: usize = 4096;
        let stretches = if n <= SAMPLE { n } else { SAMPLE };
        (0..stretches).filter_map(move |k| {
            if n <= SAMPLE {
                return Some(k);
            }
            let (lo, hi) = (k * n / SAMPLE, (k + 1) * n / SAMPLE);
            // splitmix64 of the stretch number: the same picks every time.
            let mut z = (k as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (hi > lo).then(|| lo + (z % (hi - lo) as u64) as usize)
        })
    }

    /// The share of `ids` present in the cache at `dir`, read from its index files without
    /// opening the cache; a long list is [`ChunkCache::sample`]d, enough for placing
    /// workspaces.
    pub fn share_on_disk(dir: &Path, ids: &[ChunkId]) -> f64 {
        if ids.is_empty() {
            return 0.0;
        }
        let picks = Self::sample(ids);
        let wanted: HashSet<ChunkId> = picks.iter().copied().collect();
        // Where each wanted chunk is stored: (segment, offset), so a tombstone takes out the
        // copy it names.
        let mut found: HashMap<ChunkId, (usize, u64)> = HashMap::new();
        for (s, name) in segment_names(dir).unwrap_or_default().iter().enumerate() {
            let Ok(bytes) = fs::read(segment_file(dir, name, "index")) else {
                continue;
            };
            for r in records(&bytes).0 {
                if !wanted.contains(&r.id) {
                    continue;
                }
                match r.kind {
                    Kind::Present => {
                        found.entry(r.id).or_insert((s, r.offset));
                    }
                    Kind::Evicted => {
                        if found.get(&r.id) == Some(&(s, r.offset)) {
                            found.remove(&r.id);
                        }
                    }
                }
            }
        }
        let present = picks.iter().filter(|id| found.contains_key(id)).count();
        present as f64 / picks.len() as f64
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state
            .lock()
            .expect("cache lock")
            .slots
            .contains_key(id)
    }

    /// Appends the chunk's content, verified, to `out`; false (and `out` as it was) if it is
    /// absent or its bytes do not match its id (then it is dropped from the cache).
    ///
    /// The first read verifies the bytes and takes a lease on them; later reads in this process
    /// trust them, since no process can punch a leased range.
    pub fn read_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> bool {
        let (file, s, offset, len, leased) = {
            let mut state = self.state.lock().expect("cache lock");
            state.clock += 1;
            let clock = state.clock;
            let Some(slot) = state.slots.get_mut(id) else {
                return false;
            };
            slot.used = clock;
            let (s, offset, len, leased) = (slot.segment, slot.offset, slot.len, slot.leased);
            match &state.segments[s] {
                Some(seg) => (seg.data.clone(), s, offset, len, leased),
                None => return false,
            }
        };
        if leased {
            return append_from(&file, offset, len as usize, out);
        }
        // The lease comes before the read: the bytes verified are the bytes kept. Without it
        // (an evictor holds the range right now) the read is verified and served all the same.
        let lease = range_lock(&file, libc::F_RDLCK, offset, aligned(len));
        let start = out.len();
        let ok = append_from(&file, offset, len as usize, out) && ChunkId::of(&out[start..]) == *id;
        let mut state = self.state.lock().expect("cache lock");
        let same = |slot: &Slot| slot.segment == s && slot.offset == offset;
        match state.slots.get_mut(id) {
            Some(slot) if ok && lease && same(slot) => slot.leased = true,
            _ if !ok => {
                out.truncate(start);
                tracing::info!(chunk = %id, "cached chunk is gone or corrupt; dropping it");
                if lease {
                    range_lock(&file, libc::F_UNLCK, offset, aligned(len));
                }
                if state.slots.get(id).is_some_and(same) && !self.evict_chunk(&mut state, id) {
                    // Others still lease the old bytes: this process forgets them and stores
                    // a good copy of its own.
                    self.forget(&mut state, id);
                }
            }
            // Served, but not kept: the chunk moved or went while it was read.
            _ if lease => {
                range_lock(&file, libc::F_UNLCK, offset, aligned(len));
            }
            _ => {}
        }
        ok
    }

    /// Drops this process's record of a chunk, leaving the segment as it is. The segment still
    /// counts it as live: others lease it, so it is not this process's to delete.
    fn forget(&self, state: &mut State, id: &ChunkId) {
        if let Some(slot) = state.slots.remove(id) {
            state.bytes -= aligned(slot.len);
        }
    }

    /// The chunk's content, verified; `None` if absent or found corrupt (then it is dropped).
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(id, &mut out).then_some(out)
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
        let mut writer = self.writer.lock().expect("cache writer lock");
        if self.contains(id) {
            return Ok(());
        }
        if writer.as_ref().is_none_or(|w| w.end >= SEGMENT_BYTES) {
            *writer = Some(self.new_segment().map_err(io("start a segment"))?);
        }
        let w = writer.as_mut().expect("just made");
        let offset = w.end;
        w.data.write_all_at(data, offset).map_err(io("write"))?;
        let len = u32::try_from(data.len()).expect("chunks are far below 4 GiB");
        w.end = offset + aligned(len);
        let record = Record {
            kind: Kind::Present,
            len,
            offset,
            id: *id,
        };
        w.index.write_all(&record.encode()).map_err(io("write"))?;
        let mut state = self.state.lock().expect("cache lock");
        self.replay(&mut state, w.segment);
        if let Some(limit) = self.limit
            && state.bytes > limit
            && state
                .evict_blocked
                .is_none_or(|t| t.elapsed() >= EVICT_RETRY)
        {
            self.evict(&mut state, limit - limit / 10);
        }
        Ok(())
    }

    /// Starts a segment of this process's own, locked for as long as the process writes to it.
    fn new_segment(&self) -> std::io::Result<Writer> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{nanos:024}-{}", std::process::id());
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_file(&self.dir, &name, "data"))?;
        // Locked before its index exists: nobody else takes it for an abandoned segment.
        if !try_lock(&data) {
            return Err(std::io::Error::other(
                "a new segment is locked by another process",
            ));
        }
        let index = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o644)
            .open(segment_file(&self.dir, &name, "index"))?;
        // A handle of its own for reads: the lock goes with the writer's when it moves on to
        // a new segment, and this one may be deleted once emptied.
        let read = Arc::new(File::open(segment_file(&self.dir, &name, "data"))?);
        let mut state = self.state.lock().expect("cache lock");
        state.segments.push(Some(Segment {
            name,
            data: read,
            index_read: 0,
            live: 0,
        }));
        Ok(Writer {
            segment: state.segments.len() - 1,
            data,
            index,
            end: 0,
        })
    }

    /// Drops one chunk: its range punched out, a tombstone in its segment's index. False, and
    /// the chunk kept, if another process leases it.
    fn evict_chunk(&self, state: &mut State, id: &ChunkId) -> bool {
        let Some(slot) = state.slots.get_mut(id) else {
            return true;
        };
        let (s, offset, len) = (slot.segment, slot.offset, slot.len);
        let range = aligned(len);
        // A deleted segment has nothing left to punch or record.
        let Some(seg) = &state.segments[s] else {
            return true;
        };
        if std::mem::take(&mut slot.leased) {
            range_lock(&seg.data, libc::F_UNLCK, offset, range);
        }
        // Read handles are read-only; punching takes a writable one, and its own lock: held
        // until the tombstone is written and the handle closed.
        let path = segment_file(&self.dir, &seg.name, "data");
        let Ok(f) = OpenOptions::new().write(true).open(path) else {
            return false;
        };
        if !range_lock(&f, libc::F_WRLCK, offset, range) {
            return false;
        }
        punch(&f, offset, range);
        let tomb = Record {
            kind: Kind::Evicted,
            len,
            offset,
            id: *id,
        };
        if self.append(state, s, tomb).is_err() {
            // The index is gone: so is the segment.
            self.replay(state, s);
        }
        true
    }

    fn evict(&self, state: &mut State, target: u64) {
        let mut victims: Vec<(u64, ChunkId)> = state
            .slots
            .iter()
            .filter(|(id, _)| !state.pinned.iter().any(|(_, p)| p.may_hold(id)))
            .map(|(id, s)| (s.used, *id))
            .collect();
        victims.sort_unstable();
        let mut emptied = HashSet::new();
        for (_, id) in victims {
            if state.bytes <= target {
                break;
            }
            // Replaying a tombstone from another process may have dropped it already.
            let Some(s) = state.slots.get(&id).map(|x| x.segment) else {
                continue;
            };
            if !self.evict_chunk(state, &id) {
                continue;
            }
            state.evicted += 1;
            if state.segments[s].as_ref().is_some_and(|g| g.live == 0) {
                emptied.insert(s);
            }
        }
        // This process's own segment stays: its writer holds the lock.
        for s in emptied {
            self.delete_segment(state, s);
        }
        state.evict_blocked = (state.bytes > target).then(Instant::now);
    }

    /// Asks the kernel to start reading these chunks (the window ahead of a file being read
    /// from the cache): one call per run of adjacent chunks in a segment. The kernel's own
    /// readahead on a segment is shared by every reader of it, and FUSE reads arrive several at a
    /// time, a little out of order.
    pub fn advise_willneed(&self, ids: &[ChunkId]) {
        let mut runs: Vec<(Arc<File>, usize, u64, u64)> = Vec::new();
        {
            let state = self.state.lock().expect("cache lock");
            for id in ids {
                let Some(slot) = state.slots.get(id) else {
                    continue;
                };
                let end = slot.offset + aligned(slot.len);
                match runs.last_mut() {
                    Some((_, s, _, e)) if *s == slot.segment && *e == slot.offset => *e = end,
                    _ => {
                        if let Some(seg) = &state.segments[slot.segment] {
                            runs.push((seg.data.clone(), slot.segment, slot.offset, end));
                        }
                    }
                }
            }
        }
        for (file, _, start, end) in runs {
            // SAFETY: fadvise on a descriptor that is open for the whole call; a hint only.
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    start as libc::off_t,
                    (end - start) as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Keeps these chunks from eviction (the chunks of a mounted image).
    pub fn pin<I>(&self, ids: I)
    where
        I: IntoIterator<Item = ChunkId>,
        I::IntoIter: ExactSizeIterator,
    {
        let ids = ids.into_iter();
        let set = self.pin_set(ids.len());
        self.pin_more(&set, ids);
    }

    /// An empty set of pins for up to about `capacity` chunks, to be added as they become
    /// known (a paged index's chunks, page by page).
    pub fn pin_set(&self, capacity: usize) -> PinSet {
        let mut state = self.state.lock().expect("cache lock");
        state.pin_sets += 1;
        let number = state.pin_sets;
        state.pinned.push((number, Pins::with_capacity(capacity)));
        PinSet(number)
    }

    /// Keeps these chunks from eviction too, as long as `set` is (until [`ChunkCache::unpin_all`]).
    pub fn pin_more(&self, set: &PinSet, ids: impl IntoIterator<Item = ChunkId>) {
        let mut state = self.state.lock().expect("cache lock");
        if let Some((_, pins)) = state.pinned.iter_mut().find(|(n, _)| *n == set.0) {
            pins.add(ids.into_iter());
        }
    }

    pub fn unpin_all(&self) {
        self.state.lock().expect("cache lock").pinned.clear();
    }

    /// The whole-file copies kept beside this cache, within its limit.
    pub fn whole_files(&self) -> crate::WholeFiles {
        crate::WholeFiles::new(&self.dir, self.limit)
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

    fn chunk(i: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_mul(31) ^ i).collect();
        (ChunkId::of(&data), data)
    }

    fn data_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(segments_dir(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "data"))
            .collect()
    }

    #[test]
    fn chunks_survive_reopening_and_corruption_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        let (id, data) = chunk(1, 10_000);
        let (id2, data2) = chunk(2, 5000);
        assert!(matches!(
            cache.insert(&ChunkId::of(b"other"), &data),
            Err(CacheError::Corrupt(_))
        ));
        cache.insert(&id, &data).unwrap();
        cache.insert(&id2, &data2).unwrap();
        drop(cache);

        let cache = ChunkCache::open(dir.path(), None).unwrap();
        assert_eq!(cache.get(&id2), Some(data2.clone()));
        assert_eq!(cache.stats().bytes, 3 * 4096 + 2 * 4096);
        // Bit rot in the first chunk's bytes before this process reads them.
        let seg = &data_files(dir.path())[0];
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.write_all_at(b"bit rot", 100).unwrap();
        let mut out = b"kept".to_vec();
        assert!(!cache.read_into(&id, &mut out));
        assert_eq!(out, b"kept", "a failed read left bytes behind");
        assert!(!cache.contains(&id));
        assert_eq!(cache.get(&id2), Some(data2.clone()));
        // The tombstone holds after reopening; the chunk can be stored again.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        assert!(!cache.contains(&id) && cache.contains(&id2));
        cache.insert(&id, &data).unwrap();
        assert_eq!(cache.get(&id), Some(data));
    }

    #[test]
    fn a_record_whose_data_never_landed_is_no_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        let (a, da) = chunk(1, 9000);
        let (b, db) = chunk(2, 9000);
        cache.insert(&a, &da).unwrap();
        cache.insert(&b, &db).unwrap();
        drop(cache);
        // A crash after b's index record but before its data: the file ends inside b.
        let seg = &data_files(dir.path())[0];
        OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(3 * 4096 + 100)
            .unwrap();
        // And a record torn at the end of the index.
        let index = seg.with_extension("index");
        let mut f = OpenOptions::new().append(true).open(&index).unwrap();
        f.write_all(&[7u8; RECORD]).unwrap();
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        assert!(!cache.contains(&b));
        assert_eq!(cache.get(&a), Some(da));
        assert_eq!(cache.stats().chunks, 1);
    }

    #[test]
    fn processes_sharing_the_cache_see_each_others_chunks_and_evictions() {
        let dir = tempfile::tempdir().unwrap();
        let first = ChunkCache::open(dir.path(), None).unwrap();
        let second = ChunkCache::open(dir.path(), Some(3 * 4096)).unwrap();
        let (a, da) = chunk(1, 4000);
        first.insert(&a, &da).unwrap();
        assert!(!second.contains(&a));
        std::thread::sleep(REFRESH_EVERY);
        second.refresh();
        // Read (and so leased) by the second process itself: its own lease does not stop it
        // evicting the chunk.
        assert_eq!(second.get(&a), Some(da.clone()));
        // The second process fills its limit and evicts the oldest chunk (a, in the first's
        // segment): the first sees the tombstone and no longer serves the punched range.
        for i in 2..6 {
            let (id, d) = chunk(i, 4000);
            second.insert(&id, &d).unwrap();
        }
        assert!(!second.contains(&a));
        std::thread::sleep(REFRESH_EVERY);
        first.refresh();
        assert!(!first.contains(&a), "an evicted chunk is still listed");
        assert_eq!(first.get(&a), None);
        // The first process still writes its segment: nobody deleted it.
        assert_eq!(data_files(dir.path()).len(), 2);
        drop(first);
        let third = ChunkCache::open(dir.path(), None).unwrap();
        // The first's segment held only evicted chunks: gone once nobody writes to it.
        assert_eq!(data_files(dir.path()).len(), 1);
        assert!(third.stats().chunks <= 3);
    }

    #[test]
    fn a_chunk_another_process_has_read_is_not_evicted_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let reader = ChunkCache::open(dir.path(), None).unwrap();
        let (a, da) = chunk(1, 4000);
        let (b, db) = chunk(2, 4000);
        reader.insert(&a, &da).unwrap();
        reader.insert(&b, &db).unwrap();
        // The reader verifies `a` (and so leases it); `b` it has only stored.
        assert_eq!(reader.get(&a), Some(da.clone()));
        // Another process with room for two chunks stores three more: it evicts `b` and its
        // own oldest, and passes over `a`.
        let other = ChunkCache::open(dir.path(), Some(2 * 4096)).unwrap();
        for i in 3..6 {
            let (id, d) = chunk(i, 4000);
            other.insert(&id, &d).unwrap();
        }
        assert!(other.contains(&a) && !other.contains(&b));
        assert_eq!(reader.get(&a), Some(da.clone()));
        std::thread::sleep(REFRESH_EVERY);
        reader.refresh();
        assert!(!reader.contains(&b), "the reader missed the tombstone");
        // Bit rot in `a` after the reader verified it: another process that reads it now finds
        // it corrupt, cannot punch it (leased), and keeps a good copy of its own instead.
        let seg = data_files(dir.path())
            .into_iter()
            .find(|p| fs::metadata(p).unwrap().len() == 4096 + 4000)
            .unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(b"bit rot", 10).unwrap();
        let third = ChunkCache::open(dir.path(), None).unwrap();
        assert_eq!(third.get(&a), None);
        assert!(!third.contains(&a));
        third.insert(&a, &da).unwrap();
        assert_eq!(third.get(&a), Some(da.clone()));
        drop(third);
        // Once the reader is gone, so is its lease.
        drop(reader);
        for i in 6..8 {
            let (id, d) = chunk(i, 4000);
            other.insert(&id, &d).unwrap();
        }
        assert!(!other.contains(&a), "the lease outlived its process");
    }

    #[test]
    fn the_share_on_disk_counts_present_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        let chunks: Vec<(ChunkId, Vec<u8>)> = (0..10u8).map(|i| chunk(i, 100)).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.0).collect();
        for (id, c) in &chunks[..4] {
            cache.insert(id, c).unwrap();
        }
        let mut state = cache.state.lock().unwrap();
        cache.evict_chunk(&mut state, &ids[3]);
        drop(state);
        assert!((ChunkCache::share_on_disk(dir.path(), &ids) - 0.3).abs() < 1e-9);
        assert_eq!(ChunkCache::share_on_disk(dir.path(), &[]), 0.0);
        // Long lists are sampled evenly.
        let many: Vec<ChunkId> = ids.iter().cycle().take(100_000).cloned().collect();
        let share = ChunkCache::share_on_disk(dir.path(), &many);
        assert!((share - 0.3).abs() < 0.02, "{share}");
    }

    #[test]
    fn pinned_chunks_are_all_kept_and_few_others_with_them() {
        let id = |n: u32| ChunkId::of(&n.to_le_bytes());
        let pins = Pins::of((0..100_000).map(id));
        assert!((0..100_000).all(|n| pins.may_hold(&id(n))));
        let kept = (100_000..200_000)
            .filter(|&n| pins.may_hold(&id(n)))
            .count();
        assert!(
            kept < 1_000,
            "{kept} of 100000 unpinned chunks taken for pinned"
        );
        assert!(
            pins.bits.len() * 8 <= 256 << 10,
            "{} bytes",
            pins.bits.len() * 8
        );
    }

    #[test]
    fn eviction_keeps_pinned_and_recent_chunks_and_frees_the_space() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), Some(3 * 65536)).unwrap();
        let chunks: Vec<(ChunkId, Vec<u8>)> = (0..5u8).map(|i| chunk(i, 65536)).collect();
        cache.pin([chunks[0].0]);
        for (id, c) in &chunks {
            cache.insert(id, c).unwrap();
        }
        assert!(cache.stats().bytes <= 3 * 65536);
        assert!(cache.contains(&chunks[0].0), "pinned chunk evicted");
        assert!(cache.contains(&chunks[4].0), "newest chunk evicted");
        assert!(!cache.contains(&chunks[1].0), "oldest unpinned chunk kept");
        // The evicted ranges take no disk space.
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::metadata(&data_files(dir.path())[0]).unwrap();
        assert!(
            meta.blocks() * 512 <= 3 * 65536,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        assert_eq!(cache.get(&chunks[4].0).as_deref(), Some(&chunks[4].1[..]));
    }
}
