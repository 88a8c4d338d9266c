//! An image served lazily, in one call: the image opened from its store, its chunks pinned in
//! the host's cache, a fetcher, the FUSE mount, the stored trace replayed and the rest pulled in
//! the background. `warren image mount` (which the shim and every build sandbox run) is this
//! function, a readiness line and a signal loop.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren_store::images::{OpenImage, open_image_lazily};
use warren_store::{BlobStore, ChunkCache, ChunkFetcher, StoreError};

use crate::{LazyFs, MountOptions, pull, trace};

/// What to serve, from where, and how.
pub struct ServeRequest<'a> {
    /// How the user named the image (for messages).
    pub reference: &'a str,
    /// Where the image is opened: a store that answers soon (a missing image or a refusing
    /// registry ends the request at once).
    pub opening: &'a dyn BlobStore,
    /// Where its chunks are read once it is served: a store that retries patiently, to outlive
    /// a registry's restart.
    pub store: Arc<dyn BlobStore>,
    /// The image's name in both stores.
    pub name: &'a str,
    pub cache: Arc<ChunkCache>,
    pub mountpoint: &'a Path,
    /// Added to every uid and gid (a user namespace starting there).
    pub id_offset: u32,
    /// Record which chunks the first seconds read, to store as the image's trace.
    pub record_trace: Option<Duration>,
    /// Replay the image's stored trace first.
    pub prefetch: bool,
    /// Pull the rest of the image in the background.
    pub background: bool,
    /// Served for several workspaces (the host's shared mount of the image): setuid bits are
    /// ignored (its root is host root), and it has more FUSE threads, so that one workspace's
    /// reads waiting on a slow registry do not hold the others'.
    pub shared: bool,
    /// Refuse to serve unless the reference names this manifest digest.
    pub digest: Option<&'a str>,
    /// Let the kernel read large files from whole-file copies (see [`MountOptions`]).
    pub passthrough: bool,
}

impl std::fmt::Debug for ServeRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeRequest")
            .field("reference", &self.reference)
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// Why an image is not served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("image {reference} not found")]
    NotFound { reference: String },
    #[error("image {reference}: registry {registry} refused the connection")]
    Refused { reference: String, registry: String },
    /// The registry's own words stay in the mount's log.
    #[error("image {reference}: its store answered HTTP {status}")]
    Answered { reference: String, status: u16 },
    #[error("cannot open image {reference}: {source}")]
    Open {
        reference: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "image {reference} changed while it was being mounted (it is {found}, not {expected}); start again"
    )]
    Moved {
        reference: String,
        expected: String,
        found: String,
    },
    #[error("cannot mount image {reference} at {mountpoint}: {source}")]
    Mount {
        reference: String,
        mountpoint: String,
        #[source]
        source: std::io::Error,
    },
}

/// An image being served; [`ServedImage::unmount`] ends it.
pub struct ServedImage {
    pub image: OpenImage,
    /// Whether a stored trace is replayed.
    pub replaying: bool,
    store: Arc<dyn BlobStore>,
    fetcher: Arc<ChunkFetcher>,
    recorder: Option<(Arc<trace::Recorder>, Duration)>,
    trace_saved: bool,
    started: Instant,
    progress: Arc<pull::Progress>,
    puller: std::thread::JoinHandle<()>,
    session: fuser::BackgroundSession,
}

impl std::fmt::Debug for ServedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedImage")
            .field("digest", &self.image.digest)
            .finish_non_exhaustive()
    }
}

impl ServeError {
    /// What opening the image `reference` (its manifest, config or index) failing means.
    pub fn opening(reference: &str, e: StoreError) -> Self {
        let reference = reference.to_owned();
        match e {
            StoreError::ManifestNotFound { .. } => ServeError::NotFound { reference },
            e if e.is_connection_refused() && warren_store::registry_host(&reference).is_some() => {
                ServeError::Refused {
                    registry: warren_store::registry_host(&reference)
                        .unwrap_or_default()
                        .to_owned(),
                    reference,
                }
            }
            e @ StoreError::Http { status, .. } => {
                tracing::warn!(image = %reference, error = %e, "cannot open an image");
                ServeError::Answered { reference, status }
            }
            source => ServeError::Open { reference, source },
        }
    }
}

/// Opens `request`'s image and serves it at its mountpoint.
pub fn serve(request: ServeRequest<'_>) -> Result<ServedImage, ServeError> {
    let reference = request.reference.to_owned();
    let (image, table) = open_image_lazily(request.opening, request.name)
        .map_err(|e| ServeError::opening(&reference, e))?;
    if let Some(expected) = request.digest
        && image.digest.to_string() != expected
    {
        return Err(ServeError::Moved {
            reference,
            expected: expected.to_owned(),
            found: image.digest.to_string(),
        });
    }
    let fetcher = ChunkFetcher::new(
        request.store.clone(),
        request.cache.clone(),
        image.index.clone(),
        table,
        8 << 20,
    );
    let recorder = request
        .record_trace
        .map(|window| (Arc::new(trace::Recorder::new(window)), window));
    let stored_trace = if request.prefetch {
        trace::load(request.store.as_ref(), &image.digest).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the image's trace; mounting without prefetch");
            None
        })
    } else {
        None
    };
    let defaults = MountOptions::default();
    let options = MountOptions {
        id_offset: request.id_offset,
        setuid: !request.shared,
        passthrough: request.passthrough,
        threads: if request.shared {
            2 * defaults.threads
        } else {
            defaults.threads
        },
        ..defaults
    };
    let session = crate::mount(
        LazyFs::new(
            fetcher.clone(),
            options,
            recorder.as_ref().map(|(r, _)| r.clone()),
        ),
        request.mountpoint,
    )
    .map_err(|source| ServeError::Mount {
        reference: reference.clone(),
        mountpoint: request.mountpoint.display().to_string(),
        source,
    })?;
    let progress = Arc::new(pull::Progress::default());
    let replaying = stored_trace.is_some();
    let puller = pull::spawn(
        fetcher.clone(),
        stored_trace,
        request.background,
        image.digest.hex(),
        progress.clone(),
    );
    Ok(ServedImage {
        image,
        replaying,
        store: request.store,
        fetcher,
        recorder,
        trace_saved: false,
        started: Instant::now(),
        progress,
        puller,
        session,
    })
}

impl ServedImage {
    /// Whether the file system has gone (unmounted, and no view of it left anywhere).
    pub fn ended(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// The mount's counters so far.
    pub fn stats(&self) -> pull::Stats {
        pull::stats(&self.fetcher, &self.progress)
    }

    /// Stores the recorded trace once its window has passed (or `now`); `Some` with what was
    /// stored, the first time only.
    pub fn save_trace_when_due(&mut self, now: bool) -> Option<Result<trace::Trace, StoreError>> {
        let (recorder, window) = self.recorder.as_ref()?;
        if self.trace_saved || !(now || self.started.elapsed() >= *window) {
            return None;
        }
        self.trace_saved = true;
        recorder.stop();
        let recorded = recorder.trace();
        Some(trace::save(self.store.as_ref(), &self.image.digest, &recorded).map(|_| recorded))
    }

    /// Ends the mount (storing the trace if it was not yet); the final counters and what the
    /// trace's storing gave, if this call stored it.
    pub fn unmount(mut self) -> (pull::Stats, Option<Result<trace::Trace, StoreError>>) {
        self.progress
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let saved = self.save_trace_when_due(true);
        drop(self.session);
        let _ = self.puller.join();
        (pull::stats(&self.fetcher, &self.progress), saved)
    }
}
