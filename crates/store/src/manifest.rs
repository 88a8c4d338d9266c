//! OCI manifests and descriptors, and how a Warren image is laid out as an OCI artifact:
//! the config blob is Warren's [`ImageConfig`], the first layer the tree index, the others the
//! pack blobs holding the chunks. Any OCI registry stores it as it stores container images.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use warren_image::Digest;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST_MEDIA_TYPE: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.warren.image.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.warren.image.config.v1+json";
/// The first format's index, one blob ([`warren_image::TreeIndex::encode`]).
pub const TREE_INDEX_MEDIA_TYPE: &str = "application/vnd.warren.image.index.v1";
/// A paged index's tree ([`warren_image::TreeIndex::encode_paged`]) ...
pub const PAGED_TREE_MEDIA_TYPE: &str = "application/vnd.warren.image.index.v2";
/// ... and its chunk table, the second layer (absent when the image has no chunks).
pub const CHUNK_TABLE_MEDIA_TYPE: &str = "application/vnd.warren.image.chunks.v1";
pub const PACK_MEDIA_TYPE: &str = "application/vnd.warren.image.pack.v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Warren's image configuration: what a workspace needs besides the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    /// Digest of the tree index blob (also the first layer).
    pub tree_index: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Digest>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// What runs: the entrypoint, then the command (Docker's rule).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `PORT/PROTOCOL`, such as `8080/tcp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Total bytes of file data, for listings.
    #[serde(default)]
    pub data_bytes: u64,
    #[serde(default)]
    pub entries: u64,
}

impl Manifest {
    pub fn is_warren_image(&self) -> bool {
        self.config.media_type == CONFIG_MEDIA_TYPE
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serializes")
    }
}

pub fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        annotations: BTreeMap::new(),
        platform: None,
    }
}

/// The `mediaType` a manifest (or manifest list) declares, if it is JSON and declares one.
pub fn media_type_of(manifest: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    value.get("mediaType")?.as_str().map(str::to_owned)
}
