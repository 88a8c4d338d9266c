//! Standard OCI container images: import one (from an OCI layout or any registry) into Warren's
//! format, and export a Warren image as one that `skopeo`, `umoci` and container engines accept.
//!
//! Import applies the layers in order with their whiteouts; layers are `tar`, `tar+gzip` or
//! `tar+zstd` (OCI or Docker media types); a manifest list picks linux/amd64. Layer content is
//! untrusted and goes through the checks of [`warren_image::import_tar`].

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use warren_image::{Digest, EntryKind, Hasher, ImageBuilder, TarImportError, import_tar};

use crate::blob::{BlobStore, StoreError};
use crate::fetch::{ChunkFetcher, FetchError};
use crate::images::parse_manifest;
use crate::manifest::{
    DOCKER_LIST_MEDIA_TYPE, INDEX_MEDIA_TYPE, ImageConfig, MANIFEST_MEDIA_TYPE, Manifest,
    descriptor,
};

pub const OCI_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {layer} of `{reference}`: {cause}")]
    Layer {
        reference: String,
        layer: Digest,
        cause: TarImportError,
    },
    #[error("`{reference}`: {reason}")]
    Unsupported { reference: String, reason: String },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("writing the exported layer failed: {0}")]
    Write(std::io::Error),
}

#[derive(Debug, Deserialize)]
struct ManifestList {
    manifests: Vec<crate::manifest::Descriptor>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OciConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    author: Option<String>,
    #[serde(default)]
    config: RunConfig,
    #[serde(default)]
    rootfs: RootFs,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
    /// `"8080/tcp": {}`, as the image spec writes a set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RootFs {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<Digest>,
}

/// Reads the single-platform manifest for `reference`, following a manifest list to linux/amd64.
fn platform_manifest(src: &dyn BlobStore, reference: &str) -> Result<Manifest, OciError> {
    let (bytes, _) = src.get_manifest(reference)?;
    let media_type = crate::manifest::media_type_of(&bytes).unwrap_or_default();
    let is_list = media_type == INDEX_MEDIA_TYPE
        || media_type == DOCKER_LIST_MEDIA_TYPE
        || serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|v| v.get("manifests").is_some());
    if !is_list {
        return Ok(parse_manifest(src, reference, &bytes)?);
    }
    let list: ManifestList = serde_json::from_slice(&bytes).map_err(|e| OciError::Unsupported {
        reference: reference.into(),
        reason: format!("unreadable manifest list: {e}"),
    })?;
    let chosen = list
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| (list.manifests.len() == 1).then(|| &list.manifests[0]))
        .ok_or_else(|| OciError::Unsupported {
            reference: reference.into(),
            reason: "no linux/amd64 image in its manifest list".into(),
        })?;
    let (bytes, _) = src.get_manifest(&chosen.digest.to_string())?;
    Ok(parse_manifest(src, reference, &bytes)?)
}

/// Applies the layers of the OCI image `reference` in `src` to `builder`; returns the image's
/// run configuration. `progress(done, total)` counts layers.
pub fn import_oci(
    src: &dyn BlobStore,
    reference: &str,
    builder: &mut ImageBuilder,
    mut progress: impl FnMut(usize, usize),
) -> Result<ImageConfig, OciError> {
    let manifest = platform_manifest(src, reference)?;
    if manifest.is_warren_image() {
        return Err(OciError::Unsupported {
            reference: reference.into(),
            reason: "it is already a Warren image; use `warren image pull`".into(),
        });
    }
    let config: OciConfig =
        serde_json::from_slice(&src.get_blob(&manifest.config.digest, crate::blob::CONFIG_LIMIT)?)
            .map_err(|e| OciError::Unsupported {
                reference: reference.into(),
                reason: format!("unreadable image config: {e}"),
            })?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        progress(i, manifest.layers.len());
        // Streamed from the store into the image, checked as it comes: a layer is never held
        // in memory.
        let mut blob = src.open_blob(&layer.digest, layer.size)?;
        let layer_error = |cause| OciError::Layer {
            reference: reference.into(),
            layer: layer.digest,
            cause,
        };
        let mt = layer.media_type.as_str();
        let reader: Box<dyn Read + '_> = if mt.ends_with("gzip") {
            Box::new(flate2::read::GzDecoder::new(&mut blob))
        } else if mt.ends_with("zstd") {
            Box::new(zstd::Decoder::new(&mut blob).map_err(|e| {
                layer_error(TarImportError::Stream {
                    entries: 0,
                    cause: e,
                })
            })?)
        } else if mt.ends_with(".tar") || mt.ends_with("diff.tar") {
            Box::new(&mut blob)
        } else {
            return Err(OciError::Unsupported {
                reference: reference.into(),
                reason: format!("layer media type `{mt}` is not a tar layer"),
            });
        };
        import_tar(builder, reader).map_err(layer_error)?;
        // The tar ends before the blob does (padding, the compressor's trailer): the rest is
        // read and the whole checked.
        blob.finish()?;
    }
    progress(manifest.layers.len(), manifest.layers.len());
    let run = config.config;
    Ok(ImageConfig {
        env: run.env.unwrap_or_default(),
        user: run.user.filter(|u| !u.is_empty()),
        workdir: run.working_dir.filter(|w| !w.is_empty()),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        labels: run.labels.unwrap_or_default(),
        exposed_ports: run.exposed_ports.unwrap_or_default().into_keys().collect(),
        author: config.author.filter(|a| !a.is_empty()),
        ..Default::default()
    })
}

/// Hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the image served by `fetcher` as a standard single-layer OCI image into `dest`,
/// tagged `tag`. The layer is built in `work_dir`. Returns the manifest digest.
pub fn export_oci(
    fetcher: &ChunkFetcher,
    config: &ImageConfig,
    dest: &dyn BlobStore,
    tag: &str,
    work_dir: &Path,
) -> Result<Digest, OciError> {
    let index = fetcher.index();
    let layer_path = work_dir.join("layer.tar.gz");
    let file = std::fs::File::create(&layer_path).map_err(OciError::Write)?;
    let compressed = HashingWriter {
        inner: std::io::BufWriter::new(file),
        hasher: Hasher::default(),
        len: 0,
    };
    let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::fast());
    let plain = HashingWriter {
        inner: gz,
        hasher: Hasher::default(),
        len: 0,
    };
    let mut tar = tar::Builder::new(plain);
    tar.mode(tar::HeaderMode::Complete);
    for e in index.entries.iter().skip(1) {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(u64::from(e.uid));
        h.set_gid(u64::from(e.gid));
        h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
        h.set_size(0);
        if !e.xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(n, v)| (format!("SCHILY.xattr.{n}"), &v[..]))
                .collect();
            tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .map_err(OciError::Write)?;
        }
        let path = OsStr::from_bytes(&e.path);
        let result = match e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                tar.append_data(&mut h, path, std::io::empty())
            }
            EntryKind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                // A tar entry is its header's size: an index whose chunks hold more or less
                // than the file's size would put bytes of its choosing where the next header
                // is read (and a list repeating one chunk could fill memory). Checked before
                // any of it is read.
                fetcher.file_locs(e)?;
                let data = fetcher.read(&e.chunks.to_vec(), &[])?;
                tar.append_data(&mut h, path, &data[..])
            }
            EntryKind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, path, OsStr::from_bytes(&e.link))
            }
            EntryKind::Hardlink => {
                h.set_entry_type(tar::EntryType::Link);
                tar.append_link(&mut h, path, OsStr::from_bytes(&e.link))
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                h.set_entry_type(if e.kind == EntryKind::CharDevice {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                h.set_device_major((e.rdev >> 8) as u32)
                    .map_err(OciError::Write)?;
                h.set_device_minor((e.rdev & 0xff) as u32)
                    .map_err(OciError::Write)?;
                tar.append_data(&mut h, path, std::io::empty())
            }
            EntryKind::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                tar.append_data(&mut h, path, std::io::empty())
            }
            // Sockets cannot be stored in a tar layer; they are runtime objects anyway.
            EntryKind::Socket => continue,
        };
        result.map_err(OciError::Write)?;
    }
    let plain = tar.into_inner().map_err(OciError::Write)?;
    let diff_id = plain.hasher.finish();
    let mut compressed = plain.inner.finish().map_err(OciError::Write)?;
    compressed.flush().map_err(OciError::Write)?;
    let layer_digest = compressed.hasher.finish();
    let layer_size = compressed.len;
    drop(compressed.inner);
    dest.put_blob_file(&layer_digest, &layer_path)?;

    let some = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let oci_config = OciConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        author: config.author.clone(),
        config: RunConfig {
            env: Some(config.env.clone()),
            user: config.user.clone(),
            working_dir: config.workdir.clone(),
            entrypoint: some(&config.entrypoint),
            cmd: some(&config.cmd),
            labels: (!config.labels.is_empty()).then(|| config.labels.clone()),
            exposed_ports: (!config.exposed_ports.is_empty()).then(|| {
                config
                    .exposed_ports
                    .iter()
                    .map(|p| (p.clone(), serde_json::json!({})))
                    .collect()
            }),
        },
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: vec![diff_id],
        },
    };
    let config_bytes = serde_json::to_vec(&oci_config).expect("a config always serializes");
    let config_digest = Digest::of(&config_bytes);
    dest.put_blob(&config_digest, &config_bytes)?;
    let config_desc = descriptor(
        OCI_CONFIG_MEDIA_TYPE,
        config_digest,
        config_bytes.len() as u64,
    );
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.into(),
        artifact_type: None,
        config: config_desc,
        layers: vec![descriptor(OCI_LAYER_GZIP, layer_digest, layer_size)],
        annotations: BTreeMap::new(),
    };
    Ok(dest.put_manifest(tag, &manifest.to_json())?)
}
