//! The projects in `examples/` work as the README says: each one's Dockerfile builds with
//! `warren build` (from a Debian base, as `warren image bootstrap` makes it) and a workspace made
//! from the result with the project's environment file runs the file's workspace tasks.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Warren;
use warren_testkit::{DebianRootfs, debian_rootfs, enter_own_network};

/// This crate's folder, as the test runner gives it (not as compiled in: the target folder is
/// shared between checkouts, and a binary built for another may be reused).
fn manifest_dir() -> std::ffi::OsString {
    std::env::var_os("CARGO_MANIFEST_DIR").expect("tests run under cargo test or nextest")
}

fn examples() -> PathBuf {
    Path::new(&manifest_dir()).join("../../examples")
}

#[test]
fn every_example_builds_and_runs_its_tasks() {
    enter_own_network();
    let warren = Warren::up_with_admin(21, None);
    // What `warren image bootstrap debian:bookworm` makes, from the fixture built once.
    warren.import_image(&debian_rootfs(DebianRootfs::Minbase), "debian:bookworm");
    let cases = [
        (
            "hocus-app",
            "Dockerfile",
            "hocus.yml",
            "greeter",
            "hello, ready (from the hocus example)",
        ),
        (
            "devcontainer-app",
            ".devcontainer/Dockerfile",
            ".devcontainer/devcontainer.json",
            "postStartCommand",
            "welcome.txt: 1 line(s)",
        ),
        (
            "warren-app",
            "Dockerfile",
            "warren.yml",
            "counter",
            "counter starts at 0",
        ),
    ];
    for (n, (name, dockerfile, env_file, task, expected)) in cases.into_iter().enumerate() {
        let dir = examples().join(name);
        let image = format!("example-{n}:1");
        let out = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--data")
            .arg(warren.data.path())
            .arg("build")
            .arg(&dir)
            .args(["-t", &image, "-f"])
            .arg(dir.join(dockerfile))
            .env("WARREN_UID_BASE", warren.uid_base.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ws = format!("ex{n}");
        warren.ok(
            "admin",
            &[
                "ws",
                "create",
                &ws,
                "--image",
                &image,
                "--env-file",
                dir.join(env_file).to_str().unwrap(),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = warren.ok("admin", &["ws", "logs", &ws, task]);
            if log.contains(expected) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {expected:?} never came: {log}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        warren.ok("admin", &["ws", "rm", &ws]);
    }
}
