//! `ADD`: what `COPY` does, plus remote files (`http(s)://`, checked against `--checksum`) and
//! local tar archives (plain, gzip or zstd), which are unpacked into the destination folder —
//! inside the sandbox, decompressed on the host as a stream (nothing is written on the host).

use std::io::{Read, Write};
use std::path::PathBuf;

use sha2::Digest as _;
use warren_runtime::EgressPolicy;

use crate::BuildError;

use super::{
    BuildRequest, CopySource, Files, Meta, State, context_path, expand_with, is_glob, leaf,
};

/// Largest remote file `ADD` fetches.
const REMOTE_LIMIT: u64 = 1 << 30;

/// How long a remote fetch may take.
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
enum Codec {
    Plain,
    Gzip,
    Zstd,
}

/// A local archive to unpack.
pub(super) struct Archive {
    path: PathBuf,
    codec: Codec,
}

impl Archive {
    /// The archive as a plain tar stream.
    pub(super) fn open(&self) -> Result<Box<dyn Read + Send>, BuildError> {
        let file = std::fs::File::open(&self.path).map_err(BuildError::io(self.path.display()))?;
        Ok(match self.codec {
            Codec::Plain => Box::new(file),
            Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Codec::Zstd => Box::new(
                zstd::stream::read::Decoder::new(file)
                    .map_err(BuildError::io(self.path.display()))?,
            ),
        })
    }
}

/// What kind of archive a file is, by its first bytes; `None` for any other file.
fn archive_codec(path: &std::path::Path) -> Result<Option<Codec>, BuildError> {
    let mut head = [0u8; 512];
    let mut file = std::fs::File::open(path).map_err(BuildError::io(path.display()))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(BuildError::io(path.display())(e)),
        }
    }
    let head = &head[..n];
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Some(Codec::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Codec::Zstd)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some(Codec::Plain)
    } else if head.starts_with(b"BZh") || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(BuildError::Refused(format!(
            "{}: bzip2 and xz archives are not unpacked by ADD; unpack it with RUN tar",
            path.display()
        )));
    } else {
        None
    })
}

/// A fetched remote file: its name in the destination and its bytes (spooled, never held in
/// memory).
pub(super) struct Remote {
    name: String,
    body: super::Spooled,
    len: u64,
}

/// The addresses the host may connect to for a tenant (`ADD <url>`, a registry a Dockerfile or
/// an environment file names): those the egress policy lets a workspace reach, and stricter —
/// the host fetches, so without it a tenant could read the host's own services (its API on
/// loopback), the cloud's metadata address or a denied network. Applied on every connection,
/// redirects included.
pub fn egress_filter(policy: &EgressPolicy) -> warren_store::AddressFilter {
    let (policy, host) = (policy.clone(), warren_runtime::net::host_networks());
    std::sync::Arc::new(move |ip| policy.refuses(ip, &host).map(str::to_owned))
}

/// The file at `url` and its length, spooled.
fn fetch(
    url: &str,
    checksum: Option<&str>,
    egress: &EgressPolicy,
    spool: &super::Spool,
) -> Result<(super::Spooled, u64), BuildError> {
    let agent = ureq::Agent::with_parts(
        ureq::Agent::config_builder()
            .timeout_global(Some(REMOTE_TIMEOUT))
            // A proxy would be resolved instead of the URL's host, and the policy not apply.
            .proxy(None)
            .build(),
        ureq::unversioned::transport::DefaultConnector::default(),
        warren_store::FilteringResolver(egress_filter(egress)),
    );
    let mut answer = agent
        .get(url)
        .call()
        .map_err(|e| BuildError::Refused(format!("ADD {url}: {e}")))?;
    let mut body = super::Spooled::new(spool)?;
    let mut hashing = Hashing {
        into: &mut body,
        hasher: sha2::Sha256::new(),
    };
    let len = std::io::copy(
        &mut answer
            .body_mut()
            .with_config()
            .limit(REMOTE_LIMIT + 1)
            .reader(),
        &mut hashing,
    )
    .map_err(BuildError::io(format_args!("ADD {url}")))?;
    if len > REMOTE_LIMIT {
        return Err(BuildError::Refused(format!(
            "ADD {url}: larger than {REMOTE_LIMIT} bytes"
        )));
    }
    let digest = hashing.hasher.finalize();
    if let Some(want) = checksum {
        let hex = want.strip_prefix("sha256:").ok_or_else(|| {
            BuildError::Refused(format!("--checksum={want}: expected sha256:<hex>"))
        })?;
        let got = hex::encode(digest);
        if !got.eq_ignore_ascii_case(hex) {
            return Err(BuildError::Refused(format!(
                "ADD {url}: the checksum is sha256:{got}, not {want}"
            )));
        }
    }
    Ok((body, len))
}

/// Hashes what it writes on.
struct Hashing<'a> {
    into: &'a mut dyn Write,
    hasher: sha2::Sha256,
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.into.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.into.flush()
    }
}

/// Sorts `ADD`'s sources: what is copied as `COPY` would, remote files, local archives.
pub(super) fn sort_sources(
    req: &BuildRequest<'_>,
    state: &State,
    files: &Files,
    checksum: Option<&str>,
    egress: &EgressPolicy,
) -> Result<(Files, Vec<Remote>, Vec<Archive>), BuildError> {
    let escape = req.dockerfile.escape;
    let mut plain = files.clone();
    plain.sources.clear();
    let mut remote = Vec::new();
    let mut archives = Vec::new();
    for source in &files.sources {
        let CopySource::Path(raw) = source else {
            plain.sources.push(source.clone());
            continue;
        };
        let path = expand_with(state, escape, raw)?;
        if path.starts_with("http://") || path.starts_with("https://") {
            if path.ends_with(".git") {
                return Err(BuildError::Refused(format!(
                    "ADD {path}: git repositories are not fetched by ADD"
                )));
            }
            let name = path
                .split(['?', '#'])
                .next()
                .and_then(|p| p.trim_end_matches('/').rsplit('/').next())
                .filter(|n| !n.is_empty() && !n.contains(':'))
                .unwrap_or("download")
                .to_owned();
            let (body, len) = fetch(&path, checksum, egress, &req.spool)?;
            remote.push(Remote { name, body, len });
            continue;
        }
        if path.contains("://") || path.starts_with("git@") {
            return Err(BuildError::Refused(format!(
                "ADD {path}: only http(s) URLs are fetched"
            )));
        }
        if !is_glob(&path) {
            let (on_disk, rel) = context_path(req.context, &path)?;
            let meta =
                std::fs::symlink_metadata(&on_disk).map_err(BuildError::io(format!("`{path}`")))?;
            if meta.is_file()
                && !req.ignore.excludes(&rel)
                && let Some(codec) = archive_codec(&on_disk)?
            {
                archives.push(Archive {
                    path: on_disk,
                    codec,
                });
                continue;
            }
        }
        plain.sources.push(source.clone());
    }
    if checksum.is_some() && remote.is_empty() {
        return Err(BuildError::refused(
            "ADD --checksum is for remote (http/https) sources",
        ));
    }
    Ok((plain, remote, archives))
}

/// The remote files as a tar stream: each by its URL's last segment in a destination folder, or
/// named as the destination; mode 0600 unless `--chmod` says otherwise (as Docker does).
pub(super) fn remote_tar(
    remote: &[Remote],
    dest: &str,
    files: &Files,
    meta: &Meta,
    spool: &super::Spool,
) -> Result<super::Spooled, BuildError> {
    let into_folder = super::copies_into_folder(dest, files);
    let mut tar = super::Spooled::builder(spool)?;
    for r in remote {
        let mut header = tar::Header::new_gnu();
        header.set_size(r.len);
        header.set_mode(0o600);
        header.set_mtime(0);
        meta.apply(&mut header, false)?;
        let name = if into_folder {
            r.name.clone()
        } else {
            leaf(dest)
        };
        tar.append_data(&mut header, &name, r.body.reader()?)
            .map_err(BuildError::io("a spool file"))?;
    }
    super::Spooled::finish(tar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_known_by_their_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(1);
        header.set_cksum();
        tar.append_data(&mut header, "a", &b"x"[..]).unwrap();
        let plain = tar.into_inner().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &plain).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&plain[..], 1).unwrap();
        assert!(matches!(
            archive_codec(&write("p", &plain)),
            Ok(Some(Codec::Plain))
        ));
        assert!(matches!(
            archive_codec(&write("g", &gz)),
            Ok(Some(Codec::Gzip))
        ));
        assert!(matches!(
            archive_codec(&write("z", &zst)),
            Ok(Some(Codec::Zstd))
        ));
        assert!(matches!(archive_codec(&write("t", b"just text")), Ok(None)));
        assert!(archive_codec(&write("b", b"BZh91AY")).is_err());
        // Each reads back as the same plain tar.
        for (name, codec) in [("p", Codec::Plain), ("g", Codec::Gzip), ("z", Codec::Zstd)] {
            let mut back = Vec::new();
            Archive {
                path: dir.path().join(name),
                codec,
            }
            .open()
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
            assert_eq!(back, plain);
        }
    }
}
