//! Import from a tar stream (an OCI layer, a `docker save` member, `mmdebstrap`'s output).
//!
//! Tar input is untrusted. Every entry is checked before anything is recorded, and refused with
//! an error naming it: absolute paths and `..`, symlinks whose relative target climbs out of the
//! image, hard links to anything but a file added before them, block devices and character
//! devices outside the standard set, sparse files, oversized extension headers, and a stream that
//! ends early. Nothing is ever written to the host's filesystem: the result is an index and packs.
//!
//! OCI whiteouts are applied: `.wh.<name>` removes `<name>`, `.wh..wh..opq` empties its folder.

use std::io::Read;

use tar::{EntryType, PaxExtensions};

use crate::builder::{BuildError, ImageBuilder};
use crate::index::{Entry, EntryKind};

/// Extension headers (long names, PAX records) larger than this are refused.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarImportError {
    #[error("tar entry `{entry}`: {reason}")]
    Entry { entry: String, reason: String },
    #[error("the tar stream is unreadable after {entries} entries: {cause}")]
    Stream { entries: u64, cause: std::io::Error },
    #[error(transparent)]
    Build(#[from] BuildError),
}

fn refuse(entry: &[u8], reason: impl Into<String>) -> TarImportError {
    TarImportError::Entry {
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason: reason.into(),
    }
}

/// Normalizes a tar path: `./a/b/` -> `a/b`, `.` -> root. Absolute paths and `..` are refused.
fn normalize(raw: &[u8]) -> Result<Vec<u8>, TarImportError> {
    if raw.starts_with(b"/") {
        return Err(refuse(
            raw,
            "absolute paths are not allowed in an image layer",
        ));
    }
    if raw.contains(&0) {
        return Err(refuse(raw, "the path holds a NUL byte"));
    }
    let mut out: Vec<&[u8]> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(refuse(raw, "`..` in a path would leave the image root")),
            p => out.push(p),
        }
    }
    Ok(out.join(&b'/'))
}

/// True when a relative symlink target, followed from the folder holding the link, stays inside
/// the image. Absolute targets are resolved against the image's own root at run time.
fn symlink_stays_inside(link_path: &[u8], target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return true;
    }
    let mut depth = link_path.split(|&b| b == b'/').count() as i64 - 1;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

fn read_extension(
    entry: &mut tar::Entry<'_, impl Read>,
    what: &str,
    count: u64,
) -> Result<Vec<u8>, TarImportError> {
    let size = entry.header().size().map_err(|e| TarImportError::Stream {
        entries: count,
        cause: e,
    })?;
    if size > MAX_EXTENSION_BYTES {
        return Err(refuse(
            &entry.header().path_bytes(),
            format!("its {what} header is {size} bytes; the limit is {MAX_EXTENSION_BYTES}"),
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut buf)
        .map_err(|e| TarImportError::Stream {
            entries: count,
            cause: e,
        })?;
    if buf.len() as u64 != size {
        return Err(TarImportError::Stream {
            entries: count,
            cause: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(buf)
}

/// A GNU long name or long link: the extension's data without its trailing NULs.
fn read_long_name(
    entry: &mut tar::Entry<'_, impl Read>,
    what: &str,
    count: u64,
) -> Result<Vec<u8>, TarImportError> {
    let mut name = read_extension(entry, what, count)?;
    while name.last() == Some(&0) {
        name.pop();
    }
    Ok(name)
}

/// Applies the tar stream `input` to `builder`, as one layer on top of what it holds.
pub fn import_tar(builder: &mut ImageBuilder, input: impl Read) -> Result<u64, TarImportError> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| TarImportError::Stream {
        entries: 0,
        cause: e,
    })?;
    let mut pending = Pending::default();
    let mut count = 0u64;
    for entry in entries.raw(true) {
        let mut entry = entry.map_err(|e| TarImportError::Stream {
            entries: count,
            cause: e,
        })?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::GNULongName => {
                pending.long_name = Some(read_long_name(&mut entry, "long name", count)?);
                continue;
            }
            EntryType::GNULongLink => {
                pending.long_link = Some(read_long_name(&mut entry, "long link", count)?);
                continue;
            }
            EntryType::XHeader => {
                pending.pax = Some(read_extension(&mut entry, "PAX", count)?);
                continue;
            }
            EntryType::XGlobalHeader => {
                read_extension(&mut entry, "global PAX", count)?;
                continue;
            }
            _ => {}
        }
        count += 1;
        let ext = std::mem::take(&mut pending);
        apply_entry(builder, &mut entry, ext, count)?;
    }
    Ok(count)
}

fn apply_entry(
    builder: &mut ImageBuilder,
    entry: &mut tar::Entry<'_, impl Read>,
    ext: Pending,
    count: u64,
) -> Result<(), TarImportError> {
    let header = entry.header().clone();
    let mut raw_path = ext
        .long_name
        .unwrap_or_else(|| header.path_bytes().into_owned());
    let mut raw_link = ext
        .long_link
        .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
    let mut xattrs = Vec::new();
    let mut size = header
        .size()
        .map_err(|e| refuse(&raw_path, format!("bad size field: {e}")))?;
    let mut mtime = header.mtime().unwrap_or(0) as i64;
    let mut mtime_nsec = 0u32;
    let mut uid = header.uid().unwrap_or(0);
    let mut gid = header.gid().unwrap_or(0);
    if let Some(pax) = &ext.pax {
        for rec in PaxExtensions::new(pax) {
            let rec = rec.map_err(|_| refuse(&raw_path, "malformed PAX record"))?;
            let key = rec.key_bytes();
            let value = rec.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            };
            match key {
                b"path" => raw_path = value.to_vec(),
                b"linkpath" => raw_link = Some(value.to_vec()),
                b"size" => size = number().ok_or_else(|| refuse(&raw_path, "bad PAX size"))?,
                b"uid" => uid = number().ok_or_else(|| refuse(&raw_path, "bad PAX uid"))?,
                b"gid" => gid = number().ok_or_else(|| refuse(&raw_path, "bad PAX gid"))?,
                b"mtime" => {
                    let text = String::from_utf8_lossy(value);
                    let (secs, frac) = text.split_once('.').unwrap_or((&text, ""));
                    mtime = secs.parse().unwrap_or(mtime);
                    let digits: String = frac.chars().take(9).collect();
                    mtime_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    let name = String::from_utf8_lossy(&k[b"SCHILY.xattr.".len()..]).into_owned();
                    xattrs.push((name, value.to_vec()));
                }
                k if k.starts_with(b"GNU.sparse.") => {
                    return Err(refuse(&raw_path, "sparse files are not supported"));
                }
                _ => {}
            }
        }
    }
    let path = normalize(&raw_path)?;
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
    let parent_len = path.len().saturating_sub(name.len() + 1);

    // OCI whiteouts.
    if name == b".wh..wh..opq" {
        let dir = &path[..parent_len.min(path.len())];
        let dir = if path.len() == name.len() {
            &b""[..]
        } else {
            dir
        };
        builder.clear_dir(dir);
        return Ok(());
    }
    if let Some(victim) = name.strip_prefix(b".wh.") {
        let mut target = if path.len() == name.len() {
            Vec::new()
        } else {
            path[..parent_len].to_vec()
        };
        if !target.is_empty() {
            target.push(b'/');
        }
        target.extend_from_slice(victim);
        let target = normalize(&target)?;
        builder.remove(&target);
        return Ok(());
    }

    let mode = header
        .mode()
        .map_err(|e| refuse(&raw_path, format!("bad mode field: {e}")))?;
    let kind = match header.entry_type() {
        EntryType::Regular | EntryType::Continuous => EntryKind::File,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Char => EntryKind::CharDevice,
        EntryType::Block => EntryKind::BlockDevice,
        EntryType::Fifo => EntryKind::Fifo,
        EntryType::GNUSparse => return Err(refuse(&raw_path, "sparse files are not supported")),
        other => {
            return Err(refuse(
                &raw_path,
                format!("unsupported entry type {:?}", other),
            ));
        }
    };
    let mut e = Entry::new(path.clone(), kind, mode);
    e.uid = u32::try_from(uid).map_err(|_| refuse(&raw_path, "uid does not fit 32 bits"))?;
    e.gid = u32::try_from(gid).map_err(|_| refuse(&raw_path, "gid does not fit 32 bits"))?;
    e.mtime = mtime;
    e.mtime_nsec = mtime_nsec;
    xattrs.sort();
    e.xattrs = xattrs;
    match kind {
        EntryKind::Symlink => {
            let target = raw_link.ok_or_else(|| refuse(&raw_path, "symlink without a target"))?;
            if !symlink_stays_inside(&path, &target) {
                return Err(refuse(
                    &raw_path,
                    format!(
                        "symlink target `{}` leaves the image root",
                        String::from_utf8_lossy(&target)
                    ),
                ));
            }
            e.link = target;
        }
        EntryKind::Hardlink => {
            let target = raw_link.ok_or_else(|| refuse(&raw_path, "hard link without a target"))?;
            e.link = normalize(&target).map_err(|_| {
                refuse(
                    &raw_path,
                    format!(
                        "hard link target `{}` leaves the image root",
                        String::from_utf8_lossy(&target)
                    ),
                )
            })?;
        }
        EntryKind::CharDevice | EntryKind::BlockDevice => {
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            e.rdev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
            crate::index::device_allowed(kind, e.rdev).map_err(|why| refuse(&raw_path, why))?;
        }
        _ => {}
    }
    if kind == EntryKind::File {
        let mut data = (&mut *entry).take(size);
        let mut counted = CountingReader {
            inner: &mut data,
            read: 0,
        };
        builder.add_file(e, &mut counted).map_err(|err| match err {
            BuildError::Content { cause, .. } => TarImportError::Stream {
                entries: count,
                cause,
            },
            other => other.into(),
        })?;
        if counted.read != size {
            return Err(TarImportError::Stream {
                entries: count,
                cause: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "`{}` ends after {} of {size} bytes",
                        String::from_utf8_lossy(&raw_path),
                        counted.read
                    ),
                ),
            });
        }
    } else {
        builder.add(e)?;
    }
    Ok(())
}

struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_or_refused() {
        assert_eq!(normalize(b"./usr/bin/").unwrap(), b"usr/bin");
        assert_eq!(normalize(b".").unwrap(), b"");
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"usr/../../etc").is_err());
    }

    #[test]
    fn symlink_escape_detection() {
        assert!(symlink_stays_inside(b"usr/bin/python", b"python3.11"));
        assert!(symlink_stays_inside(
            b"usr/lib/x",
            b"../../etc/alternatives/x"
        ));
        assert!(symlink_stays_inside(b"bin", b"/usr/bin"));
        assert!(!symlink_stays_inside(b"etc/x", b"../../etc/shadow"));
        assert!(!symlink_stays_inside(b"x", b".."));
    }
}
