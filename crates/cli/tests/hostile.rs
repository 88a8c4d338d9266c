//! A hostile tenant: each test is one way a workspace's root, a Dockerfile or a user could try
//! to stall the host, reach it, or reach another tenant, against a real `warren up`, and what
//! Warren does instead. See docs/SECURITY.md for the boundaries these tests hold.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
mod common;

use common::Warren;
use warren_testkit::enter_own_network;

/// Pids of the processes that run as host root inside the pid namespace of any workspace of
/// `warren` (its processes run in its uid ranges; the shim that made a namespace stays outside
/// it).
fn host_root_inside_workspaces(warren: &Warren) -> Vec<String> {
    let procs: Vec<(String, u32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?.to_string();
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let ns = std::fs::read_link(entry.path().join("ns/pid")).ok()?;
            Some((pid, uid, ns.display().to_string()))
        })
        .collect();
    let range = warren.uid_base..warren.uid_base + 64 * 65536;
    let workspace_namespaces: Vec<&String> = procs
        .iter()
        .filter(|(_, uid, _)| range.contains(uid))
        .map(|(_, _, ns)| ns)
        .collect();
    procs
        .iter()
        .filter(|(_, uid, ns)| *uid == 0 && workspace_namespaces.contains(&ns))
        .map(|(pid, _, _)| pid.clone())
        .collect()
}

fn state(warren: &Warren, user: &str, name: &str) -> Value {
    let shown: Value = serde_json::from_str(&warren.ok(user, &["ws", "show", name])).unwrap();
    shown["state"].clone()
}

/// A workspace's root replaces `/etc/passwd` with a FIFO. Every process start reads that file;
/// before, the host-root helper blocked on it for good, its shim stopped answering, the host's
/// report waited on the shim, and every other user's `ws create` on the host stayed `creating`.
#[test]
fn a_fifo_for_passwd_stalls_neither_the_host_nor_other_users() {
    enter_own_network();
    let warren = Warren::up_with_admin(40, None);
    warren.import_dev_image();
    warren.add_user("bob");
    warren.ok("admin", &["ws", "create", "trap", "--image", "dev:1"]);
    warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "trap",
            "--",
            "sh",
            "-c",
            "mv /etc/passwd /etc/p.bak && mkfifo /etc/passwd",
        ],
    );
    // The next process start is refused at once, saying why.
    let out = warren.cli_within(
        "admin",
        &["ws", "exec", "trap", "--", "true"],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/etc/passwd is not a regular file"),
        "{stderr}"
    );
    assert_eq!(
        host_root_inside_workspaces(&warren),
        Vec::<String>::new(),
        "the helper is gone"
    );
    // Another user's workspace on the same host is created while the FIFO stays.
    let asked = Instant::now();
    warren.ok("bob", &["ws", "create", "mine", "--image", "dev:1"]);
    while state(&warren, "bob", "mine") != "running" {
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "bob's workspace is still {} after 30 s\n{}",
            state(&warren, "bob", "mine"),
            warren.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The trapped workspace still stops, starts and is removed.
    warren.ok("admin", &["ws", "stop", "trap"]);
    warren.ok("admin", &["ws", "start", "trap"]);
    let out = warren.cli_within(
        "admin",
        &["ws", "exec", "trap", "--", "true"],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    warren.ok("admin", &["ws", "rm", "trap"]);
    warren.ok("bob", &["ws", "rm", "mine"]);
}
