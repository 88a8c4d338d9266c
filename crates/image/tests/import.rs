//! Importing trees and tar streams, checked by reading every file back from the packs.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use warren_image::{
    ChunkParams, EntryKind, ImageBuilder, Limits, TarImportError, TreeIndex, import_dir,
    import_tar, open_chunk,
};

/// Reads a file's content back from the packs in `packs_dir`.
fn read_back(index: &TreeIndex, packs_dir: &Path, path: &str) -> Vec<u8> {
    let i = index
        .find(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"));
    let mut entry = &index.entries[i];
    if entry.kind == EntryKind::Hardlink {
        entry = &index.entries[index.find(&entry.link).unwrap()];
    }
    let mut out = Vec::new();
    let mut packs: HashMap<u32, Vec<u8>> = HashMap::new();
    for c in entry.chunks.iter() {
        let loc = index.chunks[c as usize];
        let pack = packs.entry(loc.blob).or_insert_with(|| {
            std::fs::read(packs_dir.join(index.blobs[loc.blob as usize].hex())).unwrap()
        });
        let frame = &pack[loc.offset as usize..loc.offset as usize + loc.compressed_len as usize];
        out.extend(open_chunk(&loc, frame).unwrap());
    }
    out
}

#[test]
fn a_directory_round_trips_with_metadata_links_and_xattrs() {
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let s = src.path();
    std::fs::create_dir_all(s.join("usr/bin")).unwrap();
    std::fs::write(
        s.join("usr/bin/tool"),
        warren_testkit::pseudo_random(3 << 20, 7),
    )
    .unwrap();
    std::fs::set_permissions(
        s.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::hard_link(s.join("usr/bin/tool"), s.join("usr/bin/tool-again")).unwrap();
    std::fs::write(s.join("empty"), b"").unwrap();
    symlink("usr/bin/tool", s.join("link")).unwrap();
    xattr::set(s.join("usr/bin/tool"), "user.warren.test", b"value").unwrap();
    std::os::unix::fs::chown(s.join("empty"), Some(1234), Some(5678)).unwrap();

    let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    import_dir(&mut b, s).unwrap();
    let built = b.finish().unwrap();
    let index = TreeIndex::decode(&built.index.encode()).unwrap();

    assert_eq!(
        read_back(&index, work.path(), "usr/bin/tool"),
        std::fs::read(s.join("usr/bin/tool")).unwrap()
    );
    assert_eq!(
        read_back(&index, work.path(), "usr/bin/tool-again").len(),
        3 << 20
    );
    let tool = &index.entries[index.find(b"usr/bin/tool").unwrap()];
    assert_eq!(tool.mode, 0o4755);
    assert_eq!(
        tool.xattrs,
        vec![("user.warren.test".to_owned(), b"value".to_vec())]
    );
    assert!(
        tool.chunks.len() >= 3 * 4,
        "3 MiB in ~64 KiB chunks, got {}",
        tool.chunks.len()
    );
    let again = &index.entries[index.find(b"usr/bin/tool-again").unwrap()];
    assert_eq!(
        (again.kind, &again.link[..]),
        (EntryKind::Hardlink, &b"usr/bin/tool"[..])
    );
    let link = &index.entries[index.find(b"link").unwrap()];
    assert_eq!(
        (link.kind, &link.link[..]),
        (EntryKind::Symlink, &b"usr/bin/tool"[..])
    );
    let empty = &index.entries[index.find(b"empty").unwrap()];
    assert_eq!((empty.uid, empty.gid, empty.size), (1234, 5678, 0));
    assert_eq!(
        index.entries[0].mode,
        std::fs::metadata(s).unwrap().mode() & 0o7777
    );
    // The hard link's data is stored once.
    assert_eq!(built.stats.files, 2);
}

#[test]
fn a_second_image_reuses_the_chunks_of_the_first() {
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let big = warren_testkit::pseudo_random(8 << 20, 1);
    std::fs::write(src.path().join("big"), &big).unwrap();
    let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    import_dir(&mut b, src.path()).unwrap();
    let first = b.finish().unwrap();

    // Change 4 KiB in the middle: only the chunks around it are new.
    let mut changed = big.clone();
    changed[4 << 20..(4 << 20) + 4096].fill(0xAB);
    std::fs::write(src.path().join("big"), &changed).unwrap();
    let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    b.reuse_chunks_of(&first.index);
    import_dir(&mut b, src.path()).unwrap();
    let second = b.finish().unwrap();
    assert!(second.stats.new_chunks <= 3, "{:?}", second.stats);
    assert!(second.stats.stored_bytes < 1 << 20, "{:?}", second.stats);
    assert_eq!(read_back(&second.index, work.path(), "big"), changed);
}

fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    build(&mut t);
    t.into_inner().unwrap()
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

#[test]
fn layers_apply_whiteouts_in_order() {
    let work = tempfile::tempdir().unwrap();
    let lower = tar_of(|t| {
        t.append_data(&mut file_header(3, 0o644), "etc/a", &b"aaa"[..])
            .unwrap();
        t.append_data(&mut file_header(3, 0o644), "etc/b", &b"bbb"[..])
            .unwrap();
        t.append_data(&mut file_header(3, 0o644), "opt/x/1", &b"111"[..])
            .unwrap();
        t.append_data(&mut file_header(3, 0o644), "opt/x/2", &b"222"[..])
            .unwrap();
    });
    let upper = tar_of(|t| {
        t.append_data(&mut file_header(0, 0o644), "etc/.wh.a", &b""[..])
            .unwrap();
        t.append_data(&mut file_header(0, 0o644), "opt/x/.wh..wh..opq", &b""[..])
            .unwrap();
        t.append_data(&mut file_header(3, 0o644), "opt/x/3", &b"333"[..])
            .unwrap();
        t.append_data(&mut file_header(4, 0o600), "etc/b", &b"BBBB"[..])
            .unwrap();
    });
    let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    import_tar(&mut b, &lower[..]).unwrap();
    import_tar(&mut b, &upper[..]).unwrap();
    let index = b.finish().unwrap().index;
    let paths: Vec<String> = index.entries.iter().map(|e| e.path_str()).collect();
    assert_eq!(paths, ["", "etc", "etc/b", "opt", "opt/x", "opt/x/3"]);
    assert_eq!(read_back(&index, work.path(), "etc/b"), b"BBBB");
    assert_eq!(index.entries[2].mode, 0o600);
}

/// A tar header with a raw name, bypassing the tar crate's own path checks.
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

fn raw_link(name: &[u8], kind: tar::EntryType, target: &[u8]) -> tar::Header {
    let mut h = raw_header(name, kind, 0);
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    h.set_cksum();
    h
}

fn raw_tar(parts: &[(tar::Header, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, data) in parts {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend([0u8; 1024]);
    out
}

fn import_err(tar: &[u8]) -> (String, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    let err =
        import_tar(&mut b, tar).and_then(|_| b.finish().map(|_| 0).map_err(TarImportError::from));
    (err.expect_err("the tar must be refused").to_string(), work)
}

#[test]
fn malicious_tars_are_refused_with_the_entry_named() {
    let marker = Path::new("/tmp/warren-malicious-tar-marker");
    let _ = std::fs::remove_file(marker);
    let mut device = raw_header(b"dev/sda", tar::EntryType::Block, 0);
    device.set_device_major(8).unwrap();
    device.set_device_minor(0).unwrap();
    device.set_cksum();
    let mut tty = raw_header(b"dev/tty1", tar::EntryType::Char, 0);
    tty.set_device_major(4).unwrap();
    tty.set_device_minor(1).unwrap();
    tty.set_cksum();
    let mut huge_name = raw_header(b"././@LongLink", tar::EntryType::GNULongName, 0);
    huge_name.set_size(8 << 30);
    huge_name.set_cksum();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            raw_tar(&[(
                raw_header(
                    b"../../tmp/warren-malicious-tar-marker",
                    tar::EntryType::Regular,
                    1,
                ),
                b"x",
            )]),
            "tar entry `../../tmp/warren-malicious-tar-marker`: `..` in a path would leave the image root",
        ),
        (
            "absolute",
            raw_tar(&[(
                raw_header(
                    b"/tmp/warren-malicious-tar-marker",
                    tar::EntryType::Regular,
                    1,
                ),
                b"x",
            )]),
            "tar entry `/tmp/warren-malicious-tar-marker`: absolute paths are not allowed",
        ),
        (
            "escaping symlink",
            raw_tar(&[(
                raw_link(b"etc/evil", tar::EntryType::Symlink, b"../../etc/shadow"),
                b"",
            )]),
            "tar entry `etc/evil`: symlink target `../../etc/shadow` leaves the image root",
        ),
        (
            "write through symlink",
            raw_tar(&[
                (raw_link(b"d", tar::EntryType::Symlink, b"/tmp"), b""),
                (
                    raw_header(b"d/warren-malicious-tar-marker", tar::EntryType::Regular, 1),
                    b"x",
                ),
            ]),
            "`d/warren-malicious-tar-marker`: its parent `d` is a Symlink, not a folder",
        ),
        (
            "escaping hard link",
            raw_tar(&[(
                raw_link(b"evil", tar::EntryType::Link, b"../etc/shadow"),
                b"",
            )]),
            "tar entry `evil`: hard link target `../etc/shadow` leaves the image root",
        ),
        (
            "dangling hard link",
            raw_tar(&[(raw_link(b"evil", tar::EntryType::Link, b"etc/shadow"), b"")]),
            "`evil`: the hard link target `etc/shadow` is not a file added before it",
        ),
        (
            "block device",
            raw_tar(&[(device, b"")]),
            "tar entry `dev/sda`: block device 8:0 is not allowed in an image",
        ),
        (
            "character device",
            raw_tar(&[(tty, b"")]),
            "tar entry `dev/tty1`: character device 4:1 is not allowed in an image",
        ),
        (
            "oversized header",
            raw_tar(&[(huge_name, b"")]),
            "long name header is 8589934592 bytes; the limit is 1048576",
        ),
        (
            "truncated stream",
            {
                let mut t = raw_tar(&[(
                    raw_header(b"big", tar::EntryType::Regular, 1 << 20),
                    &[7u8; 100],
                )]);
                t.truncate(1024);
                t
            },
            "the tar stream is unreadable after 1 entries",
        ),
    ];
    for (name, tar, expected) in cases {
        let (err, work) = import_err(&tar);
        assert!(
            err.contains(expected),
            "{name}: got `{err}`, expected `{expected}`"
        );
        for f in std::fs::read_dir(work.path()).unwrap() {
            let f = f.unwrap().file_name().into_string().unwrap();
            assert!(
                f.starts_with("pack-") || f.len() == 64,
                "{name}: unexpected file {f} in the work folder"
            );
        }
    }
    assert!(!marker.exists(), "a malicious tar wrote outside its target");
}

#[test]
fn standard_devices_absolute_symlinks_and_pax_records_are_kept() {
    let work = tempfile::tempdir().unwrap();
    let tar = tar_of(|t| {
        let mut null = tar::Header::new_gnu();
        null.set_entry_type(tar::EntryType::Char);
        null.set_device_major(1).unwrap();
        null.set_device_minor(3).unwrap();
        null.set_mode(0o666);
        null.set_size(0);
        t.append_data(&mut null, "dev/null", &b""[..]).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        t.append_link(&mut link, "bin", "/usr/bin").unwrap();
        t.append_pax_extensions([
            ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
            ("mtime", &b"1700000000.5"[..]),
        ])
        .unwrap();
        let long = format!("{}/file", "d".repeat(150));
        t.append_data(&mut file_header(2, 0o755), &long, &b"hi"[..])
            .unwrap();
    });
    let mut b = ImageBuilder::new(work.path(), ChunkParams::default(), Limits::default());
    import_tar(&mut b, &tar[..]).unwrap();
    let index = b.finish().unwrap().index;
    let null = &index.entries[index.find(b"dev/null").unwrap()];
    assert_eq!(
        (null.kind, null.rdev),
        (EntryKind::CharDevice, (1 << 8) | 3)
    );
    let bin = &index.entries[index.find(b"bin").unwrap()];
    assert_eq!(bin.link, b"/usr/bin");
    let long = format!("{}/file", "d".repeat(150));
    let file = &index.entries[index.find(long.as_bytes()).unwrap()];
    assert_eq!(
        file.xattrs,
        vec![(
            "security.capability".to_owned(),
            b"\x01\x00\x00\x02".to_vec()
        )]
    );
    assert_eq!((file.mtime, file.mtime_nsec), (1_700_000_000, 500_000_000));
    assert_eq!(read_back(&index, work.path(), &long), b"hi");
}
