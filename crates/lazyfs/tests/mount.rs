//! The images issue's proof, for real: a Debian root filesystem made with mmdebstrap is imported,
//! pushed to Debian's docker-registry on loopback, mounted lazily from there on an empty cache,
//! used as the lower layer of an overlay to run a program, and compared file by file (content and
//! metadata) with its source.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use warren_image::{ChunkParams, Digest, ImageBuilder, Limits, import_dir};
use warren_lazyfs::{LazyFs, MountOptions, mount, pull, trace};
use warren_store::images::{commit, copy_image, open_image, open_image_lazily};
use warren_store::manifest::{ImageConfig, PAGED_TREE_MEDIA_TYPE, descriptor};
use warren_store::{BlobStore, ChunkCache, ChunkFetcher, LocalStore, RegistryStore, TableSource};
use warren_testkit::{
    DebianRootfs, Registry, debian_rootfs, is_mounted, pseudo_random, require_root, run,
};

/// Compares two trees entry by entry: kind, mode, owner, size, mtime, symlink target, device
/// number, xattrs, hard-link structure and file content. Returns the number of entries checked.
fn compare_trees(src: &Path, mounted: &Path) -> usize {
    let mut checked = 0;
    let mut links_src: HashMap<u64, PathBuf> = HashMap::new();
    let mut links_dst: HashMap<u64, PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (a, b) = (src.join(&rel), mounted.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).unwrap(),
            std::fs::symlink_metadata(&b).unwrap_or_else(|e| panic!("{}: {e}", b.display())),
        );
        let what = rel.display();
        assert_eq!(
            ma.file_type().is_dir(),
            mb.file_type().is_dir(),
            "{what}: kind"
        );
        assert_eq!(
            ma.file_type().is_symlink(),
            mb.file_type().is_symlink(),
            "{what}: kind"
        );
        assert_eq!(
            ma.file_type().is_char_device(),
            mb.file_type().is_char_device(),
            "{what}: kind"
        );
        assert_eq!(ma.mode(), mb.mode(), "{what}: mode");
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}: owner");
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "{what}: mtime"
        );
        let xa: Vec<_> = xattr::list(&a)
            .unwrap()
            .map(|n| (n.clone(), xattr::get(&a, &n).unwrap()))
            .collect();
        let xb: Vec<_> = xattr::list(&b)
            .unwrap()
            .map(|n| (n.clone(), xattr::get(&b, &n).unwrap()))
            .collect();
        assert_eq!(xa, xb, "{what}: xattrs");
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&a).unwrap(),
                std::fs::read_link(&b).unwrap(),
                "{what}: target"
            );
        } else if ma.file_type().is_char_device() || ma.file_type().is_block_device() {
            assert_eq!(ma.rdev(), mb.rdev(), "{what}: device");
        } else if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "{what}: size");
            assert_eq!(ma.nlink(), mb.nlink(), "{what}: links");
            if ma.nlink() > 1 {
                let first_a = links_src
                    .entry(ma.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                let first_b = links_dst
                    .entry(mb.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                assert_eq!(first_a, first_b, "{what}: hard links differ");
            }
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{what}: content"
            );
        } else if ma.is_dir() {
            let mut names_a: Vec<_> = std::fs::read_dir(&a)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            let mut names_b: Vec<_> = std::fs::read_dir(&b)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names_a.sort();
            names_b.sort();
            assert_eq!(names_a, names_b, "{what}: entries");
            stack.extend(names_a.into_iter().map(|n| rel.join(n)));
        }
        checked += 1;
    }
    checked
}

/// Imports the folder `src` into a local store under `dir` as `tag`; returns the store and the
/// image's manifest digest.
/// A fetcher of image `reference` from `store` into a new, empty chunk cache at `cache_dir`,
/// as a mount opens it (its chunk table paged).
fn fetcher_into(store: Arc<dyn BlobStore>, cache_dir: &Path, reference: &str) -> Arc<ChunkFetcher> {
    let cache = Arc::new(ChunkCache::open(cache_dir, None).unwrap());
    let (image, table) = open_image_lazily(store.as_ref(), reference).unwrap();
    assert!(matches!(table, TableSource::Paged { .. }));
    ChunkFetcher::new(store, cache, image.index, table, 8 << 20)
}

/// Mounts what `fetcher` serves at `mnt` (created if missing).
fn mount_at(
    fetcher: &Arc<ChunkFetcher>,
    mnt: &Path,
    recorder: Option<Arc<trace::Recorder>>,
) -> fuser::BackgroundSession {
    std::fs::create_dir_all(mnt).unwrap();
    mount(
        LazyFs::new(fetcher.clone(), MountOptions::default(), recorder),
        mnt,
    )
    .unwrap()
}

fn local_image(dir: &Path, src: &Path, tag: &str) -> (LocalStore, Digest) {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut builder = ImageBuilder::new(&work, ChunkParams::default(), Limits::default());
    import_dir(&mut builder, src).unwrap();
    let store = LocalStore::open(&dir.join("images")).unwrap();
    let digest = commit(
        &store,
        &builder.finish().unwrap(),
        ImageConfig::default(),
        tag,
    )
    .unwrap();
    (store, digest)
}

/// An overlay mounted at `<dir>/merged` over `lower` (its upper and work folders beside it), as
/// a workspace's root is; unmounted when dropped.
struct Overlay(PathBuf);

impl Overlay {
    fn over(lower: &Path, dir: &Path) -> Overlay {
        let (upper, work, merged) = (dir.join("upper"), dir.join("ovl-work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged));
        Overlay(merged)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_debian_image_from_a_registry_mounts_lazily_runs_through_an_overlay_and_matches_its_source() {
    require_root();
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    let dir = tempfile::tempdir().unwrap();
    let (local, _) = local_image(dir.path(), &rootfs, "debian:minbase");

    let registry = Registry::start();
    let remote = RegistryStore::new(&registry.host(), "warren/debian", None, false);
    copy_image(&local, &remote, "debian:minbase", "minbase", |_, _| {}).unwrap();

    // A second host: empty cache, the image only in the registry.
    let image = open_image(&remote, "minbase").unwrap();
    let fetcher = fetcher_into(Arc::new(remote), &dir.path().join("cache"), "minbase");
    let mnt = dir.path().join("mnt");
    let session = mount_at(&fetcher, &mnt, None);
    assert!(is_mounted(&mnt));

    // Metadata needs no file data.
    let listing = run(Command::new("ls").arg("-lR").arg(&mnt));
    assert!(listing.contains("debian_version"));
    assert_eq!(
        fetcher.counters.bytes_fetched.load(Ordering::Relaxed),
        0,
        "listing the tree fetched file data"
    );

    // The image's device nodes are listed as they are, but the mount is `nodev`: none opens
    // a device of the host, even for root (an image is a tenant's; only the standard
    // character devices may be in one at all).
    let null = mnt.join("dev/null");
    assert!(
        std::fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device()
    );
    let opened = std::fs::File::open(&null);
    assert_eq!(
        opened.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::PermissionDenied),
        "a device node of the image opened"
    );

    // The writable layer: an overlay over the lazy mount; run a program from it.
    let overlay = Overlay::over(&mnt, dir.path());
    let (merged, upper) = (overlay.0.clone(), dir.path().join("upper"));
    let out = run(Command::new("chroot").arg(&merged).args(["/bin/sh", "-c", "echo written > /root/note && cat /etc/debian_version && /usr/bin/env -i /bin/ls /usr/bin | wc -l"]));
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("12."), "{out}");
    assert!(
        lines.next().unwrap().trim().parse::<u32>().unwrap() > 50,
        "{out}"
    );
    assert_eq!(
        std::fs::read(upper.join("root/note")).unwrap(),
        b"written\n",
        "the write did not land in the upper layer"
    );
    let fetched_to_run = fetcher.counters.bytes_fetched.load(Ordering::Relaxed);
    let total: u64 = image
        .index
        .chunks
        .iter()
        .map(|c| u64::from(c.compressed_len))
        .sum();
    assert!(
        fetched_to_run < total / 2,
        "running a shell fetched {fetched_to_run} of {total} bytes: not lazy"
    );
    drop(overlay);

    let checked = compare_trees(&rootfs, &mnt);
    assert!(checked > 5000, "only {checked} entries compared");

    drop(session);
    assert!(
        !is_mounted(&mnt),
        "the image is still mounted after the session ended"
    );
}

#[test]
fn a_recorded_trace_is_replayed_and_the_background_pull_fills_the_cache() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..8u8 {
        std::fs::write(src.join(format!("f{i}")), vec![i; 1 << 20]).unwrap();
    }
    // Incompressible and distinct content so that chunks do not dedup away.
    let noise = pseudo_random(4 << 20, 99);
    std::fs::write(src.join("noise"), &noise).unwrap();
    let (store, digest) = local_image(dir.path(), &src, "t:1");
    let store = Arc::new(store);
    let image = open_image(store.as_ref(), "t:1").unwrap();

    // First mount: record what reading `noise` touches.
    let fetcher = fetcher_into(store.clone(), &dir.path().join("cache1"), "t:1");
    let recorder = Arc::new(trace::Recorder::new(Duration::from_secs(60)));
    let mnt = dir.path().join("mnt");
    let session = mount_at(&fetcher, &mnt, Some(recorder.clone()));
    assert_eq!(std::fs::read(mnt.join("noise")).unwrap(), noise);
    recorder.stop();
    let recorded = recorder.trace();
    drop(session);
    let noise_chunks = &image.index.entries[image.index.find(b"noise").unwrap()].chunks;
    // Every chunk of the file, once (the kernel's readahead may ask in another order).
    let trace::Trace::Positions(mut positions) = recorded.clone() else {
        panic!("a trace of chunk ids recorded")
    };
    positions.sort();
    assert_eq!(positions, noise_chunks.to_vec());
    trace::save(store.as_ref(), &digest, &recorded).unwrap();

    // Second mount on an empty cache: the trace is replayed, then everything else pulled.
    let loaded = trace::load(store.as_ref(), &digest).unwrap().unwrap();
    assert_eq!(loaded, recorded);
    let fetcher = fetcher_into(store.clone(), &dir.path().join("cache2"), "t:1");
    let progress = Arc::new(pull::Progress::default());
    pull::spawn(
        fetcher.clone(),
        Some(loaded),
        true,
        "test-image".into(),
        progress.clone(),
    )
    .join()
    .unwrap();
    let stats = pull::stats(&fetcher, &progress);
    assert_eq!(stats.trace_done, noise_chunks.len() as u64);
    assert!(stats.pull_finished && stats.pull_failures == 0, "{stats:?}");
    // Every chunk, and the chunk table's page.
    assert_eq!(
        stats.cached_chunks,
        image.index.chunks.len() as u64 + 1,
        "{stats:?}"
    );
    // Large merged requests: far fewer requests than chunks.
    assert!(
        stats.requests * 4 < image.index.chunks.len() as u64,
        "{stats:?}"
    );
    let session = mount_at(&fetcher, &mnt, None);
    let before = fetcher.counters.requests.load(Ordering::Relaxed);
    assert_eq!(std::fs::read(mnt.join("f3")).unwrap(), vec![3u8; 1 << 20]);
    assert_eq!(
        fetcher.counters.requests.load(Ordering::Relaxed),
        before,
        "a fully pulled image still fetched"
    );
    drop(session);
}

#[test]
fn a_mount_survives_the_registry_going_away_and_coming_back() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let content = pseudo_random(3 << 20, 7);
    std::fs::write(src.join("data"), &content).unwrap();
    let (local, _) = local_image(dir.path(), &src, "d:1");
    let mut registry = Registry::start();
    let remote = RegistryStore::new(&registry.host(), "w/d", None, false)
        .with_retry(warren_store::Retry::patient());
    copy_image(&local, &remote, "d:1", "1", |_, _| {}).unwrap();
    let fetcher = fetcher_into(Arc::new(remote), &dir.path().join("cache"), "1");
    let mnt = dir.path().join("mnt");
    let session = mount_at(&fetcher, &mnt, None);

    registry.stop();
    let path = mnt.join("data");
    let reader = std::thread::spawn(move || std::fs::read(path));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !reader.is_finished(),
        "the read did not wait for the registry"
    );
    registry.resume();
    let read = reader
        .join()
        .unwrap()
        .expect("the read failed instead of retrying");
    assert!(
        read == content,
        "wrong content after the registry came back"
    );
    drop(session);
}

/// Mounts of one image started at once on a host (each its own process, its own fetcher over
/// the host's one cache) pull it once between them: the background pulls take turns, and the
/// later ones find the chunks cached.
#[test]
fn mounts_of_one_image_at_once_pull_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("noise"), pseudo_random(8 << 20, 5)).unwrap();
    let (store, _) = local_image(dir.path(), &src, "p:1");
    let store = Arc::new(store);
    let image = open_image(store.as_ref(), "p:1").unwrap();
    let cache = dir.path().join("cache");
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let fetcher = fetcher_into(store.clone(), &cache, "p:1");
            let progress = Arc::new(pull::Progress::default());
            let puller = pull::spawn(
                fetcher.clone(),
                None,
                true,
                image.digest.hex(),
                progress.clone(),
            );
            (fetcher, progress, puller)
        })
        .collect();
    let mut fetched = 0;
    for (fetcher, progress, puller) in pulls {
        puller.join().unwrap();
        let stats = pull::stats(&fetcher, &progress);
        assert!(stats.pull_finished && stats.pull_failures == 0, "{stats:?}");
        fetched += stats.bytes_fetched;
    }
    let image_bytes = image.index.data_bytes();
    assert!(
        fetched <= image_bytes + image_bytes / 10,
        "4 mounts fetched {fetched} bytes of a {image_bytes}-byte image"
    );
}

#[test]
fn a_file_whose_chunks_do_not_hold_its_size_is_an_io_error_not_served() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("good"), b"good\n").unwrap();
    std::fs::write(src.join("long"), pseudo_random(200_000, 64)).unwrap();
    let (store, _) = local_image(dir.path(), &src, "s:1");
    // The same image, but its tree says `long` is 1,000 bytes: the check needs the chunk
    // table, which a mount reads only when the file is.
    let image = open_image(&store, "s:1").unwrap();
    let mut index = (*image.index).clone();
    let i = index.find(b"long").unwrap();
    index.entries[i].size = 1000;
    let (tree, _) = index.encode_paged();
    let tree_digest = Digest::of(&tree);
    store.put_blob(&tree_digest, &tree).unwrap();
    let mut manifest = image.manifest.clone();
    manifest.layers[0] = descriptor(PAGED_TREE_MEDIA_TYPE, tree_digest, tree.len() as u64);
    store.put_manifest("s:bad", &manifest.to_json()).unwrap();

    let fetcher = fetcher_into(Arc::new(store), &dir.path().join("cache"), "s:bad");
    let mnt = dir.path().join("mnt");
    let _session = mount_at(&fetcher, &mnt, None);
    assert_eq!(std::fs::metadata(mnt.join("long")).unwrap().len(), 1000);
    let err = std::fs::read(mnt.join("long")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read(mnt.join("good")).unwrap(), b"good\n");
}

#[test]
fn a_trace_names_each_chunk_of_the_table_once_and_nothing_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), pseudo_random(1 << 20, 65)).unwrap();
    let (store, _) = local_image(dir.path(), &src, "q:1");
    let fetcher = fetcher_into(Arc::new(store), &dir.path().join("cache"), "q:1");
    let n = fetcher.table().len();
    assert!(n > 3, "{n} chunks");
    // As a store could hold it: repeats, and positions past the table.
    let trace = trace::Trace::Positions(vec![3, 3, n, u32::MAX, 1, 3, 0]);
    assert_eq!(trace.positions(fetcher.table()), [3, 1, 0]);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited a minute for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_large_file_read_whole_is_then_read_by_the_kernel_from_its_copy_and_modes_never_mix() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let big = pseudo_random(3 << 20, 67);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("small"), pseudo_random(100_000, 68)).unwrap();
    // Mostly one chunk repeated: its copy would cost 3 MiB of disk for a chunk of cache.
    std::fs::write(src.join("zeros"), vec![0u8; 3 << 20]).unwrap();
    let (store, _) = local_image(dir.path(), &src, "w:1");
    let cache_dir = dir.path().join("cache");
    let fetcher = fetcher_into(Arc::new(store), &cache_dir, "w:1");
    let mnt = dir.path().join("mnt");
    let session = mount_at(&fetcher, &mnt, None);
    let counters = &fetcher.counters;
    let read_all = |f: &mut std::fs::File| {
        use std::io::{Read as _, Seek as _};
        f.rewind().unwrap();
        let mut out = Vec::new();
        f.read_to_end(&mut out).unwrap();
        assert!(out == big, "the file's content");
    };

    // Read through the mount to its end, and still open when its copy is made (asked for by
    // that read, and again when the first file closes: by then every chunk is local).
    std::fs::read(mnt.join("zeros")).unwrap();
    let mut first = std::fs::File::open(mnt.join("big")).unwrap();
    read_all(&mut first);
    let mut second = std::fs::File::open(mnt.join("big")).unwrap();
    drop(first);
    std::fs::read(mnt.join("small")).unwrap();
    if !counters.passthrough.load(Ordering::Relaxed) {
        // This kernel (before 6.9, or built without it) has no passthrough: all by chunks.
        read_all(&mut second);
        assert_eq!(counters.whole_files_made.load(Ordering::Relaxed), 0);
        return;
    }
    wait_for("the copy", || {
        counters.whole_files_made.load(Ordering::Relaxed) == 1
    });
    let copies: Vec<_> = std::fs::read_dir(cache_dir.join("files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with(".lock"))
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "one copy, of the large file only: {copies:?}"
    );
    assert!(
        std::fs::read(&copies[0]).unwrap() == big,
        "the copy's content"
    );
    // The kernel fails an open that mixes reads through the mount and from a copy on one
    // inode (EIO): while files are open through the mount, new ones are too.
    let mut third = std::fs::File::open(mnt.join("big")).unwrap();
    read_all(&mut third);
    read_all(&mut second);
    assert_eq!(counters.whole_file_opens.load(Ordering::Relaxed), 0);
    drop((second, third));
    // All closed: the next opens read from the copy, twice at once, and by mmap.
    let hits = counters.cache_hits.load(Ordering::Relaxed);
    let mut fourth = std::fs::File::open(mnt.join("big")).unwrap();
    let mut fifth = std::fs::File::open(mnt.join("big")).unwrap();
    read_all(&mut fifth);
    read_all(&mut fourth);
    assert_eq!(counters.whole_file_opens.load(Ordering::Relaxed), 1);
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a private read-only mapping of an open file's first 3 MiB (its size),
        // read and unmapped before the file is closed.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                big.len(),
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fourth.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            let mapped = std::slice::from_raw_parts(p as *const u8, big.len());
            assert!(mapped == &big[..], "the mapped content");
            libc::munmap(p, big.len());
        }
    }
    drop((fourth, fifth));
    // As the lower layer of an overlay, as a workspace sees it.
    let overlay = Overlay::over(&mnt, dir.path());
    assert!(
        std::fs::read(overlay.0.join("big")).unwrap() == big,
        "through the overlay"
    );
    assert_eq!(counters.whole_file_opens.load(Ordering::Relaxed), 2);
    assert_eq!(
        counters.cache_hits.load(Ordering::Relaxed),
        hits,
        "reads from the copy never reach the mount"
    );
    drop(overlay);
    drop(session);

    // A mount told not to (`--no-passthrough`) reads the file through itself, copy or not.
    let fetcher = fetcher_into(
        Arc::new(LocalStore::open(&dir.path().join("images")).unwrap()),
        &cache_dir,
        "w:1",
    );
    let options = MountOptions {
        passthrough: false,
        ..MountOptions::default()
    };
    let _session = mount(LazyFs::new(fetcher.clone(), options, None), &mnt).unwrap();
    assert!(std::fs::read(mnt.join("big")).unwrap() == big);
    assert_eq!(fetcher.counters.whole_file_opens.load(Ordering::Relaxed), 0);
    assert!(!fetcher.counters.passthrough.load(Ordering::Relaxed));
    assert!(fetcher.counters.cache_hits.load(Ordering::Relaxed) > 0);
}
