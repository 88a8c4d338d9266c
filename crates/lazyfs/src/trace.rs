//! Access traces: which chunks a workspace read, in first-read order, during its first seconds.
//! A trace is saved with the image (as a small OCI artifact tagged `sha256-<image hex>.trace`
//! in the image's own store, the tag scheme OCI uses for referrers) and replayed on the next cold
//! mount, so the startup set arrives in a few large requests before it is asked for.
//!
//! A trace names chunks by their position in the image's chunk table (`WRNTRC02`, 4 bytes
//! each), so replaying it needs only the pages it touches; traces of the first format named them
//! by id (`WRNTRC01`, 32 bytes each) and are still replayed for the images of the first format
//! they were recorded for (whose whole table is at hand).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use warren_image::{ChunkId, Digest, PAGE_CHUNKS};
use warren_store::manifest::{MANIFEST_MEDIA_TYPE, Manifest, descriptor};
use warren_store::{BlobStore, ChunkTable, StoreError};

const MAGIC: &[u8; 8] = b"WRNTRC02";
const ID_MAGIC: &[u8; 8] = b"WRNTRC01";
/// The most chunks a trace replays: 64 GiB at the 64 KiB average, far beyond any startup set.
pub const MAX_TRACE_CHUNKS: usize = 1 << 20;
pub const TRACE_CONFIG_MEDIA_TYPE: &str = "application/vnd.warren.trace.config.v1+json";
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.warren.trace.v1";

/// Chunks in the order they were first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trace {
    /// Positions in the image's chunk table.
    Positions(Vec<u32>),
    /// Chunk ids (the first format).
    Ids(Vec<ChunkId>),
}

impl Trace {
    pub fn len(&self) -> usize {
        match self {
            Trace::Positions(p) => p.len(),
            Trace::Ids(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Trace::Positions(positions) => {
                let mut out = MAGIC.to_vec();
                for p in positions {
                    out.extend_from_slice(&p.to_le_bytes());
                }
                out
            }
            Trace::Ids(ids) => {
                let mut out = ID_MAGIC.to_vec();
                for id in ids {
                    out.extend_from_slice(&id.0);
                }
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Trace> {
        if let Some(body) = bytes.strip_prefix(MAGIC) {
            return (body.len() % 4 == 0).then(|| {
                Trace::Positions(
                    body.chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                )
            });
        }
        let body = bytes.strip_prefix(ID_MAGIC)?;
        (body.len() % 32 == 0).then(|| {
            Trace::Ids(
                body.chunks_exact(32)
                    .map(|c| ChunkId(c.try_into().expect("32 bytes")))
                    .collect(),
            )
        })
    }

    /// The traced chunks that are in `table`, as positions in it, in trace order, each once and
    /// at most [`MAX_TRACE_CHUNKS`] (a trace comes from a store: a position beyond the table
    /// or met before is dropped, not trusted). Ids are looked
    /// up in the pages at hand: all of a whole table, which an image of the first format (the
    /// only kind id traces were recorded for) has.
    pub fn positions(&self, table: &ChunkTable) -> Vec<u32> {
        let mut seen = HashSet::new();
        let mut keep = |c: &u32| *c < table.len() && seen.insert(*c);
        match self {
            Trace::Positions(p) => p
                .iter()
                .copied()
                .filter(&mut keep)
                .take(MAX_TRACE_CHUNKS)
                .collect(),
            Trace::Ids(ids) => {
                let mut position = HashMap::new();
                for p in 0..table.pages() {
                    let Some(locs) = table.page_at_hand(p) else {
                        continue;
                    };
                    for (i, loc) in locs.iter().enumerate() {
                        position.insert(loc.id, (p * PAGE_CHUNKS + i) as u32);
                    }
                }
                ids.iter()
                    .filter_map(|id| position.get(id).copied())
                    .filter(&mut keep)
                    .take(MAX_TRACE_CHUNKS)
                    .collect()
            }
        }
    }
}

/// The tag a trace of `image` is stored under.
pub fn trace_tag(image: &Digest) -> String {
    format!("sha256-{}.trace", image.hex())
}

/// Stores `trace` for `image` in `store`.
pub fn save(store: &dyn BlobStore, image: &Digest, trace: &Trace) -> Result<Digest, StoreError> {
    let body = trace.encode();
    let body_digest = Digest::of(&body);
    store.put_blob(&body_digest, &body)?;
    let config = b"{}";
    let config_digest = Digest::of(config);
    store.put_blob(&config_digest, config)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.into(),
        artifact_type: Some(TRACE_MEDIA_TYPE.into()),
        config: descriptor(TRACE_CONFIG_MEDIA_TYPE, config_digest, config.len() as u64),
        layers: vec![descriptor(TRACE_MEDIA_TYPE, body_digest, body.len() as u64)],
        annotations: Default::default(),
    };
    store.put_manifest(&trace_tag(image), &manifest.to_json())
}

/// The trace stored for `image`, if there is one.
pub fn load(store: &dyn BlobStore, image: &Digest) -> Result<Option<Trace>, StoreError> {
    let (bytes, _) = match store.get_manifest(&trace_tag(image)) {
        Ok(found) => found,
        Err(StoreError::ManifestNotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Invalid(format!("trace manifest: {e}")))?;
    let Some(layer) = manifest.layers.first() else {
        return Ok(None);
    };
    Ok(Trace::decode(
        &store.get_blob(&layer.digest, warren_store::TRACE_LIMIT)?,
    ))
}

/// Records first reads during a window (or until stopped).
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    window: Duration,
    state: Mutex<RecorderState>,
}

#[derive(Debug, Default)]
struct RecorderState {
    seen: HashSet<u32>,
    order: Vec<u32>,
    stopped: bool,
}

impl Recorder {
    pub fn new(window: Duration) -> Recorder {
        Recorder {
            started: Instant::now(),
            window,
            state: Mutex::new(RecorderState::default()),
        }
    }

    /// Notes that chunks (indices into the image's chunk table) were read.
    pub fn record(&self, chunks: &[u32]) {
        let mut s = self.state.lock().expect("recorder lock");
        if s.stopped || self.started.elapsed() > self.window {
            return;
        }
        for &c in chunks {
            if s.seen.insert(c) {
                s.order.push(c);
            }
        }
    }

    pub fn stop(&self) {
        self.state.lock().expect("recorder lock").stopped = true;
    }

    /// The recorded trace.
    pub fn trace(&self) -> Trace {
        Trace::Positions(self.state.lock().expect("recorder lock").order.clone())
    }
}
