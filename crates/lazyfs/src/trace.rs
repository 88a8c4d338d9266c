//! Access traces: which chunks a workspace read, in first-read order, during its first seconds.
//! A trace is saved with the image (as a small OCI artifact tagged `sha256-<image hex>.trace`
//! in the image's own store, the tag scheme OCI uses for referrers) and replayed on the next cold
//! mount, so the startup set arrives in a few large requests before it is asked for.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use warren_image::{ChunkId, Digest};
use warren_store::manifest::{MANIFEST_MEDIA_TYPE, Manifest, descriptor};
use warren_store::{BlobStore, StoreError};

const MAGIC: &[u8; 8] = b"WRNTRC01";
pub const TRACE_CONFIG_MEDIA_TYPE: &str = "application/vnd.warren.trace.config.v1+json";
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.warren.trace.v1";

/// Chunk ids in the order they were first read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub chunks: Vec<ChunkId>,
}

impl Trace {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for id in &self.chunks {
            out.extend_from_slice(&id.0);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Trace> {
        let body = bytes.strip_prefix(MAGIC)?;
        if body.len() % 32 != 0 {
            return None;
        }
        Some(Trace {
            chunks: body
                .chunks_exact(32)
                .map(|c| ChunkId(c.try_into().expect("32 bytes")))
                .collect(),
        })
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

    /// The recorded trace, as chunk ids of `index`.
    pub fn trace(&self, index: &warren_image::TreeIndex) -> Trace {
        let s = self.state.lock().expect("recorder lock");
        Trace {
            chunks: s
                .order
                .iter()
                .map(|&c| index.chunks[c as usize].id)
                .collect(),
        }
    }
}
