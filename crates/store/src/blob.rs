//! The [`BlobStore`] trait: content-addressed blobs plus tagged manifests, as OCI registries and
//! OCI image layouts both provide. Everything above it (images, mounts, the CLI) is written
//! against this trait; the backends are [`crate::LocalStore`] and [`crate::RegistryStore`].

use std::io::Read;
use std::path::{Path, PathBuf};

use warren_image::{Digest, Hasher};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {digest} is not in {store}")]
    BlobNotFound { digest: Digest, store: String },
    #[error("`{reference}` is not in {store}")]
    ManifestNotFound { reference: String, store: String },
    #[error("blob {digest} from {store} does not match its digest")]
    DigestMismatch { digest: Digest, store: String },
    #[error("{store}: {op} failed: {cause}")]
    Io {
        store: String,
        op: String,
        cause: std::io::Error,
    },
    #[error("{store}: {op}: HTTP {status}: {body}")]
    Http {
        store: String,
        op: String,
        status: u16,
        body: String,
    },
    #[error("{store}: {op}: {message}")]
    Transport {
        store: String,
        op: String,
        message: String,
    },
    #[error("{store}: authentication failed: {message}")]
    Auth { store: String, message: String },
    #[error("`{reference}` is not a valid image reference: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether nothing listened where the store is (a registry that is down, a wrong port).
    pub fn is_connection_refused(&self) -> bool {
        match self {
            Self::Transport { message, .. } => message.to_ascii_lowercase().contains("refused"),
            _ => false,
        }
    }
}

/// The file at `path`, open for reading, and its size; errors name `store`.
pub(crate) fn open_sized(store: &str, path: &Path) -> Result<(std::fs::File, u64), StoreError> {
    let io = |cause| StoreError::Io {
        store: store.to_owned(),
        op: format!("read {}", path.display()),
        cause,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    Ok((file, size))
}

/// Content-addressed blobs and named manifests.
pub trait BlobStore: Send + Sync {
    /// How this store is named in messages (`local store /var/lib/warren/images`,
    /// `registry 127.0.0.1:5000/team/dev`).
    fn describe(&self) -> String;
    /// The size of the blob, or `None` if the store does not hold it.
    fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;
    fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.blob_size(digest)?.is_some())
    }
    /// Stores the file at `path` (whose content has `digest`) as a blob: streamed from it,
    /// unless the store has a better way.
    fn put_blob_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        let (mut file, size) = open_sized(&self.describe(), path)?;
        self.put_blob_stream(digest, size, &mut file)
    }
    fn put_blob(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError>;
    /// Stores the `size` bytes `src` gives (whose content must have `digest`) as a blob, never
    /// holding them in memory.
    fn put_blob_stream(
        &self,
        digest: &Digest,
        size: u64,
        src: &mut dyn Read,
    ) -> Result<(), StoreError>;
    /// The whole blob in memory, for the small ones (configs, indexes, traces, manifests): an
    /// error if it is more than `limit` bytes (one of the `*_LIMIT`s below), whatever a
    /// manifest says of its size.
    fn get_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError>;
    /// The blob as a stream, for the large ones (layers, packs): a [`Verified`] reader of
    /// `size` bytes, whatever the store sends.
    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Verified<'_>, StoreError>;
    /// `len` bytes of the blob from `offset`: one range request on a registry.
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, StoreError>;
    /// Stores a manifest under `tag`; returns its digest.
    fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<Digest, StoreError>;
    /// The manifest named by a tag or a digest (`sha256:...`), and its digest.
    fn get_manifest(&self, reference: &str) -> Result<(Vec<u8>, Digest), StoreError>;
}

/// The most [`BlobStore::get_blob`] reads of an image's config.
pub const CONFIG_LIMIT: u64 = 16 << 20;
/// Of a manifest.
pub const MANIFEST_LIMIT: u64 = 4 << 20;
/// Of a tree index (a 100 GiB image's is about 100 MiB).
pub const INDEX_LIMIT: u64 = 1 << 30;
/// Of a start trace.
pub const TRACE_LIMIT: u64 = 256 << 20;

/// A blob file written next to its final place and renamed into it, so a crash never leaves a
/// partial blob under a real name.
pub(crate) fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    warren_hostfs::write_whole(&path, data, 0o644)?;
    Ok(path)
}

/// A blob read as a stream, checked as it goes: more bytes than its size, fewer, or bytes of
/// another digest end it with an error (`InvalidData`) at the read that shows it. Whoever stops
/// reading early (a tar ends before its padding) calls [`Verified::finish`] to read and check the
/// rest.
pub struct Verified<'a> {
    inner: Box<dyn Read + 'a>,
    digest: Digest,
    size: u64,
    read: u64,
    hasher: Option<Hasher>,
    store: String,
    /// Why it failed, once it has.
    failed: Option<String>,
}

impl std::fmt::Debug for Verified<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<'a> Verified<'a> {
    pub fn new(inner: Box<dyn Read + 'a>, digest: Digest, size: u64, store: String) -> Self {
        Verified {
            inner,
            digest,
            size,
            read: 0,
            hasher: Some(Hasher::default()),
            store,
            failed: None,
        }
    }

    /// Reads what is left and checks the whole.
    pub fn finish(mut self) -> Result<(), StoreError> {
        std::io::copy(&mut self, &mut std::io::sink())
            .map(drop)
            .map_err(|cause| StoreError::Io {
                op: format!("read blob {}", self.digest),
                store: self.store.clone(),
                cause,
            })
    }

    fn bad(&self, what: String) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("blob {} from {}: {what}", self.digest, self.store),
        )
    }
}

impl Read for Verified<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Once it has failed it fails on every read: a reader that tries again never sees a
        // clean end.
        if let Some(why) = &self.failed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                why.clone(),
            ));
        }
        let Some(hasher) = self.hasher.as_mut() else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        // One byte past the size is asked for, to see a blob that is too long.
        let room = (self.size - self.read)
            .saturating_add(1)
            .min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.read += n as u64;
        hasher.update(&buf[..n]);
        let failure = if self.read > self.size {
            Some(format!("more than its {} bytes", self.size))
        } else if n == 0 && self.read < self.size {
            Some(format!("{} of its {} bytes", self.read, self.size))
        } else if n == 0 && self.hasher.take().map(Hasher::finish) != Some(self.digest) {
            Some("does not match its digest".to_owned())
        } else {
            None
        };
        if let Some(what) = failure {
            let error = self.bad(what);
            self.failed = Some(error.to_string());
            return Err(error);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read(body: &[u8], digest: Digest, size: u64) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Verified::new(Box::new(body), digest, size, "test".into())
            .read_to_end(&mut out)
            .map(|_| out)
    }

    #[test]
    fn a_streamed_blob_must_be_its_size_and_its_digest() {
        let body = b"layer bytes".as_slice();
        let digest = Digest::of(body);
        assert_eq!(read(body, digest, body.len() as u64).unwrap(), body);
        // A registry that sends more, less, or other bytes than the manifest names.
        let longer = read(b"layer bytes and more", digest, body.len() as u64).unwrap_err();
        assert!(
            longer.to_string().contains("more than its 11 bytes"),
            "{longer}"
        );
        let shorter = read(b"layer", digest, body.len() as u64).unwrap_err();
        assert!(
            shorter.to_string().contains("5 of its 11 bytes"),
            "{shorter}"
        );
        let other = read(b"LAYER BYTES", digest, body.len() as u64).unwrap_err();
        assert!(
            other.to_string().contains("does not match its digest"),
            "{other}"
        );
        // Whoever stops early still gets the whole checked.
        let mut stopped =
            Verified::new(Box::new(b"LAYER BYTES".as_slice()), digest, 11, "t".into());
        stopped.read_exact(&mut [0u8; 4]).unwrap();
        assert!(stopped.finish().is_err());
        let mut stopped = Verified::new(Box::new(body), digest, 11, "t".into());
        stopped.read_exact(&mut [0u8; 4]).unwrap();
        stopped.finish().unwrap();
        // A reader that tries again after an error gets the error again, never an end.
        for body in [b"LAYER BYTES".as_slice(), b"layer bytes and more", b"layer"] {
            let mut failed = Verified::new(Box::new(body), digest, 11, "t".into());
            let mut out = Vec::new();
            assert!(failed.read_to_end(&mut out).is_err());
            assert!(failed.read(&mut [0u8; 64]).is_err());
            assert!(failed.read_to_end(&mut out).is_err());
        }
    }
}
