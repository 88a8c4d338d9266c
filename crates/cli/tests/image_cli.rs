//! `warren image ...` end to end, as an operator runs it: the real binary, a real
//! docker-registry on loopback, a real FUSE mount, skopeo and umoci as the peers that must
//! accept what Warren exports.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ok;
use warren_testkit::{
    DebianRootfs, Registry, debian_mirror, debian_rootfs, enter_own_network, is_mounted,
    require_program, require_root,
};

mod common;

fn warren(data: &Path, args: &[&str]) -> Output {
    common::warren_at(data, args, &[])
}

fn failed(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `warren image mount`; a failing test must not leave it behind.
struct MountProcess(Option<Child>);

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

fn spawn_mount(data: &Path, image: &str, mnt: &Path, extra: &[&str]) -> MountProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--data")
        .arg(data)
        .args(["image", "mount", image])
        .arg(mnt)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let process = MountProcess(Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(mnt) {
        assert!(
            Instant::now() < deadline,
            "{image} was not mounted at {} within 30 s",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    process
}

fn signal(process: &MountProcess, sig: &str) {
    let pid = process.0.as_ref().unwrap().id();
    assert!(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
}

fn stop(mut process: MountProcess, mnt: &Path) -> String {
    signal(&process, "TERM");
    let out = process.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mount exited with {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mnt), "still mounted after SIGTERM");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn import_push_mount_lazily_trace_export_and_reimport() {
    require_root();
    require_program("skopeo", "skopeo");
    require_program("umoci", "umoci");
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (host_a, host_b, host_c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let remote = format!("{}/warren/debian:1", registry.host());

    let out = ok(warren(
        &host_a,
        &[
            "image",
            "import",
            rootfs.to_str().unwrap(),
            "debian:minbase",
        ],
    ));
    assert!(out.contains("imported debian:minbase"), "{out}");
    let listed: serde_json::Value = common::json(warren(&host_a, &["image", "ls", "--json"]));
    assert_eq!(listed[0]["name"], "debian:minbase");
    assert!(listed[0]["entries"].as_u64().unwrap() > 5000);
    ok(warren(
        &host_a,
        &["image", "push", "debian:minbase", &remote],
    ));

    // Host B: nothing local. Mount from the registry, record a trace of what a shell reads.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let stats = tmp.path().join("stats.json");
    let child = spawn_mount(
        &host_b,
        &remote,
        &mnt,
        &[
            "--record-trace",
            "600",
            "--no-background",
            "--stats",
            stats.to_str().unwrap(),
        ],
    );
    let out = Command::new("chroot")
        .arg(&mnt)
        .args([
            "/bin/sh",
            "-c",
            "cat /etc/debian_version; ls /usr/bin >/dev/null",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("12."),
        "{out:?}"
    );
    signal(&child, "USR1");
    std::thread::sleep(Duration::from_millis(500));
    let out = stop(child, &mnt);
    assert!(out.contains("recorded a trace of"), "{out}");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let image: serde_json::Value =
        common::json(warren(&host_b, &["image", "inspect", &remote, "--json"]));
    let fetched = s["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched < image["storedBytes"].as_u64().unwrap() / 2,
        "running a shell fetched {fetched} bytes: {s}"
    );

    // Host C: the trace is replayed, then the rest is pulled in the background.
    let stats = tmp.path().join("stats-c.json");
    let child = spawn_mount(
        &host_c,
        &remote,
        &mnt,
        &["--stats", stats.to_str().unwrap()],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s: serde_json::Value = std::fs::read(&stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if s["pull_finished"] == true {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the background pull did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        s["trace_chunks"].as_u64().unwrap() > 0 && s["trace_done"] == s["trace_chunks"],
        "{s}"
    );
    // Every chunk of the image, and the pages of its chunk table (4,096 chunks a page).
    let chunks = image["chunks"].as_u64().unwrap();
    assert_eq!(
        s["cached_chunks"].as_u64().unwrap(),
        chunks + chunks.div_ceil(4096),
        "{s}"
    );
    stop(child, &mnt);

    // Export as a standard OCI image: skopeo reads it, umoci unpacks it, Warren imports it back.
    let layout = tmp.path().join("layout");
    ok(warren(
        &host_a,
        &[
            "image",
            "export",
            "debian:minbase",
            &format!("oci:{}:minbase", layout.display()),
        ],
    ));
    let inspect = warren_testkit::run(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:minbase", layout.display())),
    );
    assert!(inspect.contains("\"Os\": \"linux\""), "{inspect}");
    let unpacked = tmp.path().join("unpacked");
    warren_testkit::run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:minbase", layout.display()))
            .arg(&unpacked),
    );
    assert_eq!(
        std::fs::read(unpacked.join("rootfs/etc/debian_version")).unwrap(),
        std::fs::read(rootfs.join("etc/debian_version")).unwrap()
    );
    let out = ok(warren(
        &host_a,
        &[
            "image",
            "import",
            &format!("oci:{}:minbase", layout.display()),
            "debian:again",
        ],
    ));
    assert!(
        out.contains("0 new chunks"),
        "identical content must be stored once: {out}"
    );

    // A standard image in a registry imports too.
    warren_testkit::run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:minbase", layout.display()))
            .arg(format!("docker://{}/oci/debian:1", registry.host())),
    );
    ok(warren(
        &host_a,
        &[
            "image",
            "import",
            &format!("docker://{}/oci/debian:1", registry.host()),
            "debian:oci",
        ],
    ));

    ok(warren(&host_a, &["image", "rm", "debian:again"]));
    ok(warren(&host_a, &["image", "gc"]));
    assert!(ok(warren(&host_a, &["image", "ls"])).contains("debian:oci"));
}

#[test]
fn bad_image_commands_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    assert!(
        failed(warren(data, &["image", "import", "/nonexistent", "x:1"]))
            .contains("cannot open `/nonexistent`")
    );
    assert!(
        failed(warren(data, &["image", "import", "/tmp", "Not A Name"]))
            .contains("is not a local image name")
    );
    assert!(
        failed(warren(data, &["image", "inspect", "missing:1"]))
            .contains("`missing:1` is not in local store")
    );
    assert!(
        failed(warren(data, &["image", "rm", "missing:1"]))
            .contains("there is no local image `missing:1`")
    );
    let evil = tmp.path().join("evil.tar");
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"../etc/passwd");
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend([0u8; 1024]);
    std::fs::write(&evil, bytes).unwrap();
    let err = failed(warren(
        data,
        &["image", "import", evil.to_str().unwrap(), "evil:1"],
    ));
    assert!(
        err.contains("tar entry `../etc/passwd`: `..` in a path would leave the image root"),
        "{err}"
    );
}

/// `warren image bootstrap`: a Debian base image from a Debian mirror, for machines that reach
/// no public registry — here a signed mirror on disk (a team's own, with its own key), in a
/// network namespace with no route anywhere; bad names are refused before anything runs.
#[test]
fn bootstrap_builds_a_debian_base_image() {
    require_root();
    require_program("mmdebstrap", "mmdebstrap");
    let (mirror, keyring) = debian_mirror();
    enter_own_network();
    let data = tempfile::Builder::new()
        .prefix("warren-bootstrap-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let bootstrap = |keyring: &Path| {
        warren(
            data.path(),
            &[
                "image",
                "bootstrap",
                "debian:bookworm",
                "--mirror",
                &mirror,
                "--keyring",
                keyring.to_str().unwrap(),
                "--include",
                "busybox",
                "--tag",
                "base:1",
            ],
        )
    };
    // Debian's own keys do not sign this mirror: apt refuses it.
    let refused = failed(bootstrap(Path::new(
        "/usr/share/keyrings/debian-archive-keyring.gpg",
    )));
    assert!(refused.contains("mmdebstrap could not build"), "{refused}");
    let out = ok(bootstrap(&keyring));
    assert!(out.contains("imported base:1"), "{out}");
    let shown: serde_json::Value = common::json(warren(
        data.path(),
        &["image", "inspect", "base:1", "--json"],
    ));
    assert!(shown["entries"].as_u64().unwrap() > 5000, "{shown}");
    for (args, expected) in [
        (
            &["image", "bootstrap", "ubuntu:jammy"][..],
            "expected debian:SUITE",
        ),
        (
            &["image", "bootstrap", "debian:bookworm", "--include=-x"][..],
            "not a package name",
        ),
        (
            &[
                "image",
                "bootstrap",
                "debian:bookworm",
                "--keyring",
                "/nonexistent",
            ][..],
            "is not a file",
        ),
        (
            &["image", "bootstrap", "debian:--help"][..],
            "expected debian:SUITE",
        ),
        (
            &[
                "image",
                "bootstrap",
                "debian:bookworm",
                "--mirror",
                "ftp://x",
            ][..],
            "http://",
        ),
    ] {
        let out = warren(data.path(), args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
