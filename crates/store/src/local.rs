//! The local image store: an OCI image layout folder (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`). Warren's embedded default; `skopeo` and `umoci` read it as it is.
//! Tags are `index.json` entries annotated `org.opencontainers.image.ref.name` = `name:tag`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use warren_image::Digest;

use crate::blob::{BlobStore, StoreError, Verified, write_atomically};
use crate::manifest::{Descriptor, MANIFEST_MEDIA_TYPE, Manifest, descriptor};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutIndex {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub bytes_removed: u64,
}

impl LocalStore {
    /// Opens the layout at `root`, creating an empty one if the folder holds none.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        let store = LocalStore {
            root: root.to_path_buf(),
        };
        let io = |cause| StoreError::Io {
            store: store.describe(),
            op: "create the layout".into(),
            cause,
        };
        fs::create_dir_all(store.root.join("blobs/sha256")).map_err(io)?;
        if !store.root.join("oci-layout").exists() {
            write_atomically(
                &store.root,
                "oci-layout",
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            )
            .map_err(io)?;
        }
        if !store.root.join("index.json").exists() {
            store.write_index(&LayoutIndex {
                schema_version: 2,
                media_type: Some(crate::manifest::INDEX_MEDIA_TYPE.into()),
                manifests: Vec::new(),
            })?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn io(&self, op: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        let op = op.to_owned();
        move |cause| StoreError::Io {
            store: self.describe(),
            op,
            cause,
        }
    }

    fn read_index(&self) -> Result<LayoutIndex, StoreError> {
        let bytes = fs::read(self.root.join("index.json")).map_err(self.io("read index.json"))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            StoreError::Invalid(format!("{}: index.json is corrupt: {e}", self.describe()))
        })
    }

    fn write_index(&self, index: &LayoutIndex) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(index).expect("index.json always serializes");
        write_atomically(&self.root, "index.json", &bytes).map_err(self.io("write index.json"))?;
        Ok(())
    }

    /// Takes the store's exclusive lock, held until the returned file is dropped.
    fn lock(&self) -> Result<File, StoreError> {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))
            .map_err(self.io("lock the store"))?;
        lock.lock().map_err(self.io("lock the store"))?;
        Ok(lock)
    }

    /// Runs `change` on `index.json` under an exclusive lock (several Warren processes may share
    /// a store).
    fn update_index(&self, change: impl FnOnce(&mut LayoutIndex)) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        change(&mut index);
        self.write_index(&index)
    }

    /// Every tag and the manifest it names.
    pub fn tags(&self) -> Result<BTreeMap<String, Digest>, StoreError> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .filter_map(|d| {
                d.annotations
                    .get(REF_NAME)
                    .cloned()
                    .map(|name| (name, d.digest))
            })
            .collect())
    }

    /// Removes a tag; returns whether it existed. Blobs stay until [`LocalStore::gc`].
    pub fn remove_tag(&self, tag: &str) -> Result<bool, StoreError> {
        let mut found = false;
        self.update_index(|index| {
            let before = index.manifests.len();
            index
                .manifests
                .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
            found = index.manifests.len() != before;
        })?;
        Ok(found)
    }

    /// Deletes every blob no tagged manifest refers to.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _lock = self.lock()?;
        let mut live: HashSet<Digest> = HashSet::new();
        for d in self.read_index()?.manifests {
            live.insert(d.digest);
            let bytes = self.get_blob(&d.digest, crate::blob::MANIFEST_LIMIT)?;
            if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                live.insert(m.config.digest);
                live.extend(m.layers.iter().map(|l| l.digest));
            }
        }
        let mut report = GcReport::default();
        for entry in fs::read_dir(self.root.join("blobs/sha256")).map_err(self.io("list blobs"))? {
            let entry = entry.map_err(self.io("list blobs"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = format!("sha256:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| live.contains(&d));
            if !keep {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(self.io("remove a blob"))?;
                report.blobs_removed += 1;
                report.bytes_removed += size;
            }
        }
        Ok(report)
    }
}

fn verify(store: &LocalStore, digest: &Digest, data: &[u8]) -> Result<(), StoreError> {
    if Digest::of(data) == *digest {
        Ok(())
    } else {
        Err(StoreError::DigestMismatch {
            digest: *digest,
            store: store.describe(),
        })
    }
}

impl BlobStore for LocalStore {
    fn describe(&self) -> String {
        format!("local store {}", self.root.display())
    }

    fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.blob_path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("stat a blob")(e)),
        }
    }

    fn put_blob_stream(
        &self,
        digest: &Digest,
        size: u64,
        src: &mut dyn Read,
    ) -> Result<(), StoreError> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        // Hash while copying: what lands under a digest must be that digest.
        let dir = self.root.join("blobs/sha256");
        let tmp = dir.join(format!(".{}.{}.tmp", digest.hex(), std::process::id()));
        let mut dst = File::create(&tmp).map_err(self.io("write a blob"))?;
        let mut checked = Verified::new(Box::new(src), *digest, size, self.describe());
        let copied = std::io::copy(&mut checked, &mut dst).and_then(|_| dst.sync_all());
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(self.io("write a blob")(e));
        }
        fs::rename(&tmp, self.blob_path(digest)).map_err(self.io("write a blob"))?;
        Ok(())
    }

    fn put_blob(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError> {
        verify(self, digest, data)?;
        if self.has_blob(digest)? {
            return Ok(());
        }
        write_atomically(&self.root.join("blobs/sha256"), &digest.hex(), data)
            .map_err(self.io("write a blob"))?;
        Ok(())
    }

    fn get_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let read = File::open(self.blob_path(digest)).and_then(|f| {
            let mut data = Vec::new();
            f.take(limit + 1).read_to_end(&mut data).map(|_| data)
        });
        let data = match read {
            Ok(d) if d.len() as u64 > limit => {
                return Err(StoreError::Invalid(format!(
                    "{}: blob {digest} is more than {limit} bytes",
                    self.describe()
                )));
            }
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::BlobNotFound {
                    digest: *digest,
                    store: self.describe(),
                });
            }
            Err(e) => return Err(self.io("read a blob")(e)),
        };
        verify(self, digest, &data)?;
        Ok(data)
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Verified<'_>, StoreError> {
        let file = File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::BlobNotFound {
                digest: *digest,
                store: self.describe(),
            },
            _ => self.io("read a blob")(e),
        })?;
        Ok(Verified::new(
            Box::new(std::io::BufReader::with_capacity(1 << 20, file)),
            *digest,
            size,
            self.describe(),
        ))
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let mut f = File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::BlobNotFound {
                digest: *digest,
                store: self.describe(),
            },
            _ => self.io("read a blob")(e),
        })?;
        f.seek(SeekFrom::Start(offset))
            .map_err(self.io("read a blob"))?;
        let mut out = Vec::with_capacity(len as usize);
        f.take(len)
            .read_to_end(&mut out)
            .map_err(self.io("read a blob"))?;
        if out.len() as u64 != len {
            return Err(StoreError::Invalid(format!(
                "{}: blob {digest} is shorter than {} bytes",
                self.describe(),
                offset + len
            )));
        }
        Ok(out)
    }

    fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(manifest);
        self.put_blob(&digest, manifest)?;
        let media_type = crate::manifest::media_type_of(manifest)
            .unwrap_or_else(|| MANIFEST_MEDIA_TYPE.to_owned());
        let mut desc = descriptor(&media_type, digest, manifest.len() as u64);
        desc.annotations.insert(REF_NAME.into(), tag.to_owned());
        self.update_index(|index| {
            index
                .manifests
                .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
            index.manifests.push(desc);
        })?;
        Ok(digest)
    }

    fn get_manifest(&self, reference: &str) -> Result<(Vec<u8>, Digest), StoreError> {
        let digest = match reference.parse::<Digest>() {
            Ok(d) => d,
            Err(_) => *self
                .tags()?
                .get(reference)
                .ok_or_else(|| StoreError::ManifestNotFound {
                    reference: reference.to_owned(),
                    store: self.describe(),
                })?,
        };
        Ok((self.get_blob(&digest, crate::blob::MANIFEST_LIMIT)?, digest))
    }
}
