//! The [`BlobStore`] trait: content-addressed blobs plus tagged manifests, as OCI registries and
//! OCI image layouts both provide. Everything above it (images, mounts, the CLI) is written
//! against this trait; the backends are [`crate::LocalStore`] and [`crate::RegistryStore`].

use std::path::{Path, PathBuf};

use warren_image::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {digest} is not in {store}")]
    BlobNotFound { digest: Digest, store: String },
    #[error("`{reference}` is not in {store}")]
    ManifestNotFound { reference: String, store: String },
    #[error("blob {digest} from {store} does not match its digest")]
    DigestMismatch { digest: Digest, store: String },
    #[error("{store}: {op} failed")]
    Io {
        store: String,
        op: String,
        #[source]
        source: std::io::Error,
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
    /// Stores the file at `path` (whose content has `digest`) as a blob.
    fn put_blob_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError>;
    fn put_blob(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError>;
    fn get_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError>;
    /// `len` bytes of the blob from `offset`: one range request on a registry.
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, StoreError>;
    /// Stores a manifest under `tag`; returns its digest.
    fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<Digest, StoreError>;
    /// The manifest named by a tag or a digest (`sha256:...`), and its digest.
    fn get_manifest(&self, reference: &str) -> Result<(Vec<u8>, Digest), StoreError>;
}

/// A blob file written next to its final place and renamed into it, so a crash never leaves a
/// partial blob under a real name.
pub(crate) fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
