//! Warren images in a [`BlobStore`]: commit a build as an OCI artifact, open one for mounting,
//! and copy one between stores (push and pull).

use std::sync::Arc;

use warren_image::{Built, ChunkId, Digest, TreeIndex};

use crate::blob::{BlobStore, StoreError};
use crate::cache::ChunkCache;
use crate::manifest::{
    ARTIFACT_TYPE, CHUNK_TABLE_MEDIA_TYPE, CONFIG_MEDIA_TYPE, ImageConfig, MANIFEST_MEDIA_TYPE,
    Manifest, PACK_MEDIA_TYPE, PAGED_TREE_MEDIA_TYPE, TREE_INDEX_MEDIA_TYPE, descriptor,
};
use crate::table::TableSource;

/// An image read from a store, ready to serve.
#[derive(Debug, Clone)]
pub struct OpenImage {
    pub digest: Digest,
    pub manifest: Manifest,
    pub config: ImageConfig,
    pub index: Arc<TreeIndex>,
}

/// Stores the packs, the index (paged: its tree and chunk table), the config and the manifest
/// of `built`, tagged `tag`. Returns the manifest digest. Blobs the store already holds are not
/// sent again.
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
    let (index_bytes, table_bytes) = built.index.encode_paged();
    let index_digest = Digest::of(&index_bytes);
    store.put_blob(&index_digest, &index_bytes)?;
    config.tree_index = Some(index_digest);
    config.data_bytes = built.index.data_bytes();
    config.entries = built.index.entries.len() as u64;
    let config_bytes = serde_json::to_vec(&config).expect("a config always serializes");
    let config_digest = Digest::of(&config_bytes);
    store.put_blob(&config_digest, &config_bytes)?;
    let mut layers = vec![descriptor(
        PAGED_TREE_MEDIA_TYPE,
        index_digest,
        index_bytes.len() as u64,
    )];
    if !table_bytes.is_empty() {
        let table_digest = Digest::of(&table_bytes);
        store.put_blob(&table_digest, &table_bytes)?;
        layers.push(descriptor(
            CHUNK_TABLE_MEDIA_TYPE,
            table_digest,
            table_bytes.len() as u64,
        ));
    }
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

/// Reads the manifest, config and whole tree index of a Warren image (not its packs).
pub fn open_image(store: &dyn BlobStore, reference: &str) -> Result<OpenImage, StoreError> {
    let (image, table) = open_image_lazily(store, reference)?;
    let mut index = Arc::into_inner(image.index).expect("not shared yet");
    match table {
        TableSource::Whole(chunks) => index.chunks = chunks,
        TableSource::Paged { blob, table } => {
            let bytes = if table.pages.is_empty() {
                Vec::new()
            } else {
                store.get_blob(&blob, crate::blob::INDEX_LIMIT)?
            };
            index = TreeIndex::from_pages(index, &table, &bytes).map_err(|e| {
                StoreError::Invalid(format!("the tree index of `{reference}`: {e}"))
            })?;
        }
    }
    Ok(OpenImage {
        index: Arc::new(index),
        ..image
    })
}

/// Pages of a paged image's chunk table [`sample_chunk_ids`] reads.
const SAMPLE_PAGES: usize = 64;

/// A sample of about 4,096 chunk ids of image `reference`: what a host reports of an image it
/// may not hold. An index of the first format is sampled whole ([`ChunkCache::sample`]); of a
/// paged one, [`SAMPLE_PAGES`] pages spread evenly over the table are fetched (9 MB of a
/// 100 GiB image's 58 MB), every 64th id of each taken.
pub fn sample_chunk_ids(
    store: &dyn BlobStore,
    reference: &str,
) -> Result<Vec<ChunkId>, StoreError> {
    let (image, table) = open_image_lazily(store, reference)?;
    let (blob, table) = match table {
        TableSource::Whole(chunks) => {
            return Ok(ChunkCache::sample(
                &chunks.iter().map(|c| c.id).collect::<Vec<_>>(),
            ));
        }
        TableSource::Paged { blob, table } => (blob, table),
    };
    let pages = table.pages.len();
    let mut picked: Vec<usize> = (0..SAMPLE_PAGES.min(pages))
        .map(|k| k * pages / SAMPLE_PAGES.min(pages))
        .collect();
    picked.dedup();
    let mut ids = Vec::new();
    for p in picked {
        let r = table.pages[p];
        let bytes = store.read_range(&blob, r.offset, u64::from(r.len))?;
        let locs = table
            .decode_page(p, &bytes, image.index.blobs.len())
            .map_err(|e| StoreError::Invalid(format!("the chunk table of `{reference}`: {e}")))?;
        ids.extend(locs.iter().step_by(64).map(|l| l.id));
    }
    Ok(ids)
}

/// Reads the manifest, config and tree of a Warren image, for a mount: the index comes without
/// its chunk table (`chunks` empty), which is returned apart — whole for an index of the first
/// format, where its pages are for a paged one.
pub fn open_image_lazily(
    store: &dyn BlobStore,
    reference: &str,
) -> Result<(OpenImage, TableSource), StoreError> {
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
    let invalid = |e| StoreError::Invalid(format!("the tree index of `{reference}`: {e}"));
    let (index, table) = match manifest.layers.first() {
        Some(l) if l.media_type == TREE_INDEX_MEDIA_TYPE => {
            let mut index =
                TreeIndex::decode(&store.get_blob(&l.digest, crate::blob::INDEX_LIMIT)?)
                    .map_err(invalid)?;
            let chunks = std::mem::take(&mut index.chunks);
            (index, TableSource::Whole(chunks))
        }
        Some(l) if l.media_type == PAGED_TREE_MEDIA_TYPE => {
            let (index, table) =
                TreeIndex::decode_tree(&store.get_blob(&l.digest, crate::blob::INDEX_LIMIT)?)
                    .map_err(invalid)?;
            let blob = match manifest.layers.get(1) {
                Some(t) if t.media_type == CHUNK_TABLE_MEDIA_TYPE => t.digest,
                // No chunks, no table (its pages are checked against the tree anyway).
                _ if table.chunks == 0 => Digest::of(b""),
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "`{reference}` has a paged index but no chunk table"
                    )));
                }
            };
            (index, TableSource::Paged { blob, table })
        }
        _ => {
            return Err(StoreError::Invalid(format!(
                "`{reference}` has no tree index"
            )));
        }
    };
    Ok((
        OpenImage {
            digest,
            manifest,
            config,
            index: Arc::new(index),
        },
        table,
    ))
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
