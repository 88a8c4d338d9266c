//! Warren images through a real OCI registry (Debian's docker-registry on loopback) and a local
//! OCI layout, read back chunk by chunk into an empty cache.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use warren_image::{ChunkParams, EntryKind, ImageBuilder, Limits, import_dir};
use warren_store::images::{commit, copy_image, open_image, open_image_lazily};
use warren_store::manifest::{ImageConfig, PACK_MEDIA_TYPE, TREE_INDEX_MEDIA_TYPE, descriptor};
use warren_store::{
    BlobStore, ChunkCache, ChunkFetcher, FetchError, LocalStore, RegistryStore, Retry, TableSource,
};
use warren_testkit::Registry;

/// The tree at `<dir>/src` imported and committed as `tag` to a fresh local store in `dir`.
fn commit_tree(dir: &std::path::Path, config: ImageConfig, tag: &str) -> LocalStore {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut b = ImageBuilder::new(&work, ChunkParams::default(), Limits::default());
    import_dir(&mut b, &dir.join("src")).unwrap();
    let built = b.finish().unwrap();
    let store = LocalStore::open(&dir.join("store")).unwrap();
    commit(&store, &built, config, tag).unwrap();
    store
}

/// A small image committed to a fresh local store: one 2 MiB file and one small one.
fn local_image() -> (tempfile::TempDir, LocalStore, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("data")).unwrap();
    let big = warren_testkit::pseudo_random(2 << 20, 3);
    std::fs::write(src.join("data/big"), &big).unwrap();
    std::fs::write(src.join("hello"), b"hello\n").unwrap();
    let config = ImageConfig {
        env: vec!["PATH=/usr/bin".into()],
        ..Default::default()
    };
    let store = commit_tree(dir.path(), config, "demo:1");
    (dir, store, big)
}

/// The image of [`local_image`] pushed to `registry` as `team/demo:1`: the local store's
/// folder, the registry as a store, and the big file's bytes.
fn pushed_image(registry: &Registry) -> (tempfile::TempDir, RegistryStore, Vec<u8>) {
    let (dir, local, big) = local_image();
    let remote = RegistryStore::new(&registry.host(), "team/demo", None, false);
    copy_image(&local, &remote, "demo:1", "1", |_, _| {}).unwrap();
    (dir, remote, big)
}

fn file_content(fetcher: &ChunkFetcher, path: &str) -> Vec<u8> {
    let index = fetcher.index();
    let e = &index.entries[index.find(path.as_bytes()).unwrap()];
    assert_eq!(e.kind, EntryKind::File);
    let content = fetcher.read(&e.chunks.to_vec(), &[]).unwrap();
    // Readahead runs behind the read: counted once it is done.
    fetcher.settle();
    content
}

#[test]
fn an_image_pushed_to_a_registry_reads_back_lazily_into_an_empty_cache() {
    let registry = Registry::start();
    let (dir, remote, big) = pushed_image(&registry);
    let (image, table) = open_image_lazily(&remote, "1").unwrap();
    assert!(matches!(table, TableSource::Paged { .. }));
    assert_eq!(image.config.env, ["PATH=/usr/bin"]);
    assert_eq!(image.config.data_bytes, (2 << 20) + 6);
    let cache = Arc::new(ChunkCache::open(&dir.path().join("cache"), None).unwrap());
    let fetcher = ChunkFetcher::new(
        Arc::new(remote),
        cache.clone(),
        image.index.clone(),
        table,
        8 << 20,
    );
    assert_eq!(file_content(&fetcher, "hello"), b"hello\n");
    let requests_before = fetcher
        .counters
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(file_content(&fetcher, "data/big"), big);
    let requests = fetcher
        .counters
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - requests_before;
    let chunks = image.index.entries[image.index.find(b"data/big").unwrap()]
        .chunks
        .len();
    assert!(
        chunks > 10 && requests == 1,
        "{chunks} adjacent chunks should be one range request, took {requests}"
    );
    // Now local: no more requests.
    assert_eq!(file_content(&fetcher, "data/big"), big);
    assert_eq!(
        fetcher
            .counters
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            - requests_before,
        1
    );

    // A full pull into another local store gives the same image.
    let pulled = LocalStore::open(&dir.path().join("pulled")).unwrap();
    let remote = RegistryStore::new(&registry.host(), "team/demo", None, false);
    let digest = copy_image(&remote, &pulled, "1", "demo:1", |_, _| {}).unwrap();
    assert_eq!(digest, image.digest);
    assert_eq!(
        open_image(&pulled, "demo:1").unwrap().index,
        open_image(&remote, "1").unwrap().index
    );
}

/// A fetcher of image `reference` in `store` into a new chunk cache at `cache`, opened as a
/// mount opens it.
fn lazily(store: impl BlobStore + 'static, cache: &Path, reference: &str) -> Arc<ChunkFetcher> {
    let (image, table) = open_image_lazily(&store, reference).unwrap();
    let cache = Arc::new(ChunkCache::open(cache, None).unwrap());
    ChunkFetcher::new(Arc::new(store), cache, image.index, table, 8 << 20)
}

#[test]
fn a_corrupted_chunk_in_the_registry_is_reported_never_served() {
    let registry = Registry::start();
    let (dir, remote, _) = pushed_image(&registry);
    let image = open_image(&remote, "1").unwrap();
    // Flip bytes inside the first chunk of `data/big`, in the registry's own storage.
    let e = &image.index.entries[image.index.find(b"data/big").unwrap()];
    let loc = image.index.chunks[e.chunks.get(0).unwrap() as usize];
    let pack = registry.blob_file(&image.index.blobs[loc.blob as usize].hex());
    let mut bytes = std::fs::read(&pack).unwrap();
    for b in &mut bytes[loc.offset as usize + 20..loc.offset as usize + 40] {
        *b ^= 0xFF;
    }
    std::fs::write(&pack, bytes).unwrap();

    let fetcher = lazily(remote, &dir.path().join("cache"), "1");
    let err = fetcher.read(&e.chunks.to_vec()[..1], &[]).unwrap_err();
    assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is corrupt even after fetching it again"),
        "{err}"
    );
    assert!(
        !fetcher.cache().contains(&loc.id),
        "a corrupt chunk reached the cache"
    );
    // The other chunks are fine and served.
    assert!(fetcher.read(&e.chunks.to_vec()[1..2], &[]).is_ok());
}

#[test]
fn a_registry_that_is_down_fails_with_a_clear_error_after_retrying() {
    let port = warren_testkit::free_port();
    let remote =
        RegistryStore::new(&format!("127.0.0.1:{port}"), "x", None, false).with_retry(Retry {
            attempts: 3,
            first_delay: std::time::Duration::from_millis(10),
            max_delay: std::time::Duration::from_millis(20),
        });
    let err = remote.get_manifest("latest").unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "registry 127.0.0.1:{port}/x: fetch manifest latest"
        )) && err.contains("gave up after 3 attempts"),
        "{err}"
    );
}

#[test]
fn local_store_tags_and_garbage_collection() {
    let (_dir, store, _) = local_image();
    assert!(store.tags().unwrap().contains_key("demo:1"));
    let blobs = std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(store.gc().unwrap().blobs_removed, 0);
    assert!(store.remove_tag("demo:1").unwrap());
    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed as usize, blobs);
    assert!(open_image(&store, "demo:1").is_err());
}

#[test]
fn a_registry_with_basic_auth_wants_the_right_credentials() {
    let registry = Registry::start_with_basic_auth("ada", "s3cret");
    let (_dir, local, _) = local_image();
    let as_user = |password: Option<&str>| {
        let credentials = password.map(|p| ("ada".to_owned(), p.to_owned()));
        RegistryStore::new(&registry.host(), "team/demo", credentials, false)
    };
    let refused = |store: &RegistryStore, hint: &str| {
        let err = copy_image(&local, store, "demo:1", "1", |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("authentication failed") && err.contains(hint),
            "{err}"
        );
    };
    // No credentials: the error says where they go; wrong ones: what the registry said.
    refused(&as_user(None), "registry-auth.json");
    refused(&as_user(Some("nope")), "401");
    let ada = as_user(Some("s3cret"));
    let digest = copy_image(&local, &ada, "demo:1", "1", |_, _| {}).unwrap();
    assert_eq!(open_image(&ada, "1").unwrap().digest, digest);
}

/// Reading files on demand: the files next to one just read come in the same request, the
/// window growing while a reader goes through a folder (several folders in turn each get their
/// own), and an isolated read brings little more than itself.
#[test]
fn reads_bring_their_neighbours_in_the_pack_and_little_else() {
    const FILE: usize = 32 << 10;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut seed = 1;
    let mut sources = std::collections::HashMap::new();
    for folder in ["a", "b", "c", "d", "scattered"] {
        std::fs::create_dir_all(src.join(folder)).unwrap();
        for i in 0..40 {
            seed += 2; // odd seeds: the generator ignores the lowest bit
            let data = warren_testkit::pseudo_random(FILE, seed);
            let path = format!("{folder}/f{i:02}");
            std::fs::write(src.join(&path), &data).unwrap();
            sources.insert(path, data);
        }
    }
    let store = commit_tree(dir.path(), ImageConfig::default(), "n:1");
    let image = open_image(&store, "n:1").unwrap();
    let fetcher = lazily(store, &dir.path().join("cache"), "n:1");
    let counter = |f: &ChunkFetcher| {
        (
            f.counters
                .requests
                .load(std::sync::atomic::Ordering::Relaxed),
            f.counters
                .bytes_fetched
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    };

    // Four folders read in turn, a file from each: 160 files.
    for i in 0..40 {
        for folder in ["a", "b", "c", "d"] {
            let path = format!("{folder}/f{i:02}");
            assert_eq!(file_content(&fetcher, &path), sources[&path], "{path}");
        }
    }
    let (requests, fetched) = counter(&fetcher);
    // Compressed, as fetched.
    let stored = |folder: &str| -> u64 {
        let index = &image.index;
        index
            .entries
            .iter()
            .filter(|e| e.path_str().starts_with(&format!("{folder}/")))
            .flat_map(|e| e.chunks.iter())
            .map(|c| u64::from(index.chunks[c as usize].compressed_len))
            .sum()
    };
    let read: u64 = ["a", "b", "c", "d"].iter().map(|f| stored(f)).sum();
    // Per folder, four readahead windows (128 KiB doubling to 1 MiB), each two requests: the
    // file the reader asked for, and the window fetched behind it.
    assert!(requests <= 4 * 8, "{requests} requests for 160 files");
    assert!(
        fetched <= read + 4 * (2 << 20) && fetched >= read,
        "{fetched} bytes fetched for {read}"
    );

    // One file in eight of another folder: each read on its own, with a small window.
    for i in (0..40).step_by(8) {
        let path = format!("scattered/f{i:02}");
        assert_eq!(file_content(&fetcher, &path), sources[&path], "{path}");
    }
    let (requests2, fetched2) = counter(&fetcher);
    // Each: the file, and a small window behind it.
    assert_eq!(requests2 - requests, 2 * 5, "isolated reads were merged");
    assert!(
        fetched2 - fetched <= 5 * (stored("scattered") / 40 + (160 << 10)),
        "{} bytes fetched for five files of {} stored",
        fetched2 - fetched,
        stored("scattered") / 40
    );
}

/// The chunk table's requests and bytes so far.
fn table_fetched(fetcher: &ChunkFetcher) -> (u64, u64) {
    let t = fetcher.table();
    (
        t.requests.load(std::sync::atomic::Ordering::Relaxed),
        t.bytes_fetched.load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[test]
fn a_mount_fetches_the_chunk_table_a_page_at_a_time_checks_it_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src/d");
    std::fs::create_dir_all(&src).unwrap();
    // 9,000 files of a chunk each: a table of three pages.
    let content = |i: usize| format!("file {i}\n").into_bytes();
    for i in 0..9000 {
        std::fs::write(src.join(format!("f{i:05}")), content(i)).unwrap();
    }
    let local = commit_tree(dir.path(), ImageConfig::default(), "p:1");
    let registry = Registry::start();
    let remote = || RegistryStore::new(&registry.host(), "team/paged", None, false);
    copy_image(&local, &remote(), "p:1", "1", |_, _| {}).unwrap();
    let (_, table) = open_image_lazily(&remote(), "1").unwrap();
    let TableSource::Paged { blob, table } = table else {
        panic!("a new image's index is not paged");
    };
    assert_eq!((table.chunks, table.pages.len()), (9000, 3));
    let page_len = |p: usize| u64::from(table.pages[p].len);

    // A file in the last page: that page only.
    let fetcher = lazily(remote(), &dir.path().join("cache"), "1");
    assert_eq!(file_content(&fetcher, "d/f08500"), content(8500));
    assert_eq!(table_fetched(&fetcher), (1, page_len(2)));
    assert_eq!(file_content(&fetcher, "d/f00001"), content(1));
    assert_eq!(table_fetched(&fetcher), (2, page_len(2) + page_len(0)));

    // What a host reports of the image: ids from pages spread over the table, all its own.
    let sample = warren_store::images::sample_chunk_ids(&remote(), "1").unwrap();
    let all: std::collections::HashSet<_> = open_image(&local, "p:1")
        .unwrap()
        .index
        .chunks
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(sample.len(), 64 + 64 + 13, "every 64th id of each page");
    assert!(sample.iter().all(|id| all.contains(id)));

    // The next mount on this host finds the pages in the cache.
    let again = lazily(remote(), &dir.path().join("cache"), "1");
    assert_eq!(file_content(&again, "d/f08500"), content(8500));
    assert_eq!(file_content(&again, "d/f00001"), content(1));
    assert_eq!(table_fetched(&again), (0, 0));

    // A page altered in the registry is refused, not served; the other pages still are.
    let path = registry.blob_file(&blob.hex());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[table.pages[1].offset as usize + 30] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let fresh = lazily(remote(), &dir.path().join("cache2"), "1");
    let index = fresh.index();
    let e = &index.entries[index.find(b"d/f05000").unwrap()];
    let err = fresh.read(&e.chunks.to_vec(), &[]).unwrap_err().to_string();
    assert!(
        err.contains("page 1 of the chunk table does not match its hash"),
        "{err}"
    );
    assert_eq!(file_content(&fresh, "d/f00002"), content(2));
}

#[test]
fn an_image_with_an_index_of_the_first_format_still_opens_and_reads() {
    let (dir, local, big) = local_image();
    // The image as the first format stored it: one index blob, then the packs.
    let whole = open_image(&local, "demo:1").unwrap();
    let bytes = whole.index.encode();
    let digest = warren_image::Digest::of(&bytes);
    local.put_blob(&digest, &bytes).unwrap();
    let mut manifest = whole.manifest.clone();
    manifest.layers.retain(|l| l.media_type == PACK_MEDIA_TYPE);
    manifest.layers.insert(
        0,
        descriptor(TREE_INDEX_MEDIA_TYPE, digest, bytes.len() as u64),
    );
    local.put_manifest("demo:old", &manifest.to_json()).unwrap();

    assert_eq!(open_image(&local, "demo:old").unwrap().index, whole.index);
    let (_, table) = open_image_lazily(&local, "demo:old").unwrap();
    assert!(matches!(table, TableSource::Whole(_)));
    let fetcher = lazily(local, &dir.path().join("cache"), "demo:old");
    assert_eq!(file_content(&fetcher, "data/big"), big);
    assert_eq!(table_fetched(&fetcher), (0, 0));
}
