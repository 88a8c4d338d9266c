//! Warren images in a [`BlobStore`]: commit a build as an OCI artifact, open one for mounting,
//! and copy one between stores (push and pull).

use std::sync::Arc;

use warren_image::{Built, Digest, TreeIndex};

use crate::blob::{BlobStore, StoreError};
use crate::manifest::{
    ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, ImageConfig, MANIFEST_MEDIA_TYPE, Manifest, PACK_MEDIA_TYPE,
    TREE_INDEX_MEDIA_TYPE, descriptor,
};

/// An image read from a store, ready to serve.
#[derive(Debug, Clone)]
pub struct OpenImage {
    pub digest: Digest,
    pub manifest: Manifest,
    pub config: ImageConfig,
    pub index: Arc<TreeIndex>,
}

/// Stores the packs, the index, the config and the manifest of `built`, tagged `tag`.
/// Returns the manifest digest. Blobs the store already holds are not sent again.
pub fn commit(
    store: &dyn BlobStore,
    built: &Built,
    mut config: ImageConfig,
    tag: &str,
) -> Result<Digest, StoreError> {
    for pack in &built.new_packs {
        if built.index.blobs.contains(&pack.digest) {
            store.put_blob_file(&pack.digest, &pack.path)?;
        }
    }
    let index_bytes = built.index.encode();
    let index_digest = Digest::of(&index_bytes);
    store.put_blob(&index_digest, &index_bytes)?;
    config.tree_index = Some(index_digest);
    config.data_bytes = built.index.data_bytes();
    config.entries = built.index.entries.len() as u64;
    let config_bytes = serde_json::to_vec(&config).expect("a config always serializes");
    let config_digest = Digest::of(&config_bytes);
    store.put_blob(&config_digest, &config_bytes)?;
    let mut layers = vec![descriptor(
        TREE_INDEX_MEDIA_TYPE,
        index_digest,
        index_bytes.len() as u64,
    )];
    for blob in &built.index.blobs {
        let size = store
            .blob_size(blob)?
            .ok_or_else(|| StoreError::BlobNotFound {
                digest: *blob,
                store: store.describe(),
            })?;
        layers.push(descriptor(PACK_MEDIA_TYPE, *blob, size));
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.into(),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: descriptor(CONFIG_MEDIA_TYPE, config_digest, config_bytes.len() as u64),
        layers,
        annotations: Default::default(),
    };
    store.put_manifest(tag, &manifest.to_json())
}

pub fn parse_manifest(
    store: &dyn BlobStore,
    reference: &str,
    bytes: &[u8],
) -> Result<Manifest, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Invalid(format!(
            "{}: the manifest of `{reference}` is not an OCI manifest: {e}",
            store.describe()
        ))
    })
}

/// Reads the manifest, config and tree index of a Warren image (not its packs).
pub fn open_image(store: &dyn BlobStore, reference: &str) -> Result<OpenImage, StoreError> {
    let (bytes, digest) = store.get_manifest(reference)?;
    let manifest = parse_manifest(store, reference, &bytes)?;
    if !manifest.is_warren_image() {
        return Err(StoreError::Invalid(format!(
            "`{reference}` in {} is not a Warren image (config type `{}`); import it with `warren image import`",
            store.describe(),
            manifest.config.media_type
        )));
    }
    let config: ImageConfig = serde_json::from_slice(
        &store.get_blob(&manifest.config.digest, crate::blob::CONFIG_LIMIT)?,
    )
    .map_err(|e| StoreError::Invalid(format!("the config of `{reference}` is corrupt: {e}")))?;
    let index_digest = manifest
        .layers
        .first()
        .filter(|l| l.media_type == TREE_INDEX_MEDIA_TYPE)
        .map(|l| l.digest)
        .ok_or_else(|| StoreError::Invalid(format!("`{reference}` has no tree index")))?;
    let index = TreeIndex::decode(&store.get_blob(&index_digest, crate::blob::INDEX_LIMIT)?)
        .map_err(|e| StoreError::Invalid(format!("the tree index of `{reference}`: {e}")))?;
    Ok(OpenImage {
        digest,
        manifest,
        config,
        index: Arc::new(index),
    })
}

/// Copies an image's manifest and the blobs `to` lacks (push and full pull); `progress(done,
/// total)` counts bytes.
pub fn copy_image(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    reference: &str,
    tag: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<Digest, StoreError> {
    let (bytes, _) = from.get_manifest(reference)?;
    let manifest = parse_manifest(from, reference, &bytes)?;
    let blobs: Vec<_> = std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .collect();
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let mut done = 0;
    for blob in blobs {
        if !to.has_blob(&blob.digest)? {
            let mut data = from.open_blob(&blob.digest, blob.size)?;
            to.put_blob_stream(&blob.digest, blob.size, &mut data)?;
        }
        done += blob.size;
        progress(done, total);
    }
    to.put_manifest(tag, &bytes)
}
