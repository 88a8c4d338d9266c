//! A hostile tenant: each test is one way a workspace's root, a Dockerfile or a user could try
//! to stall the host, reach it, or reach another tenant, against a real `warren up`, and what
//! Warren does instead. See docs/SECURITY.md for the boundaries these tests hold.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
mod common;

use common::{Warren, ok};
use warren_testkit::{DebianRootfs, debian_rootfs, enter_own_network, run};

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

/// A "remote" network namespace reached by routing from the test's own: it holds a
/// link-local address (where clouds answer metadata requests), a plain outside address, and an
/// address in a network the admin denies, each with a listener that answers "hello".
struct Outside {
    name: String,
}

const METADATA: &str = "169.254.169.254";
const OUTSIDE: &str = "192.0.2.2";
const DENIED: &str = "198.51.100.2";

impl Outside {
    fn start(port: u16) -> Self {
        use std::os::fd::AsFd;
        let name = format!("whostile{}", std::process::id());
        let ip = |args: &[&str]| run(std::process::Command::new("ip").args(args));
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", "whost0", "type", "veth", "peer", "name", "wout0", "netns", &name,
        ]);
        ip(&["addr", "add", "169.254.0.1/16", "dev", "whost0"]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", "whost0"]);
        ip(&["addr", "add", "198.51.100.1/24", "dev", "whost0"]);
        ip(&["link", "set", "whost0", "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", &name];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "lo", "up"]);
        for address in [
            format!("{METADATA}/16"),
            format!("{OUTSIDE}/24"),
            format!("{DENIED}/24"),
        ] {
            inside(&["addr", "add", &address, "dev", "wout0"]);
        }
        inside(&["link", "set", "wout0", "up"]);
        // Replies to the workspaces' (masqueraded) connections go back the same way.
        let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
            ready_tx.send(()).unwrap();
            for conn in listener.incoming().flatten() {
                let _ = std::io::Write::write_all(&mut &conn, b"hello\n");
            }
        });
        ready_rx.recv().unwrap();
        Self { name }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// True when a process in workspace `name` (of the runtime at `data`) gets "hello" from
/// `address:port` within 3 s.
fn reaches(data: &std::path::Path, uid_base: &str, name: &str, address: &str, port: u16) -> bool {
    let out = common::warren_at(
        data,
        &[
            "runtime",
            "exec",
            name,
            "--",
            "perl",
            "-MIO::Socket::INET",
            "-e",
            "my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], Timeout => 3) or exit 1; \
             my $l = <$s>; exit($l eq \"hello\\n\" ? 0 : 1)",
            &format!("{address}:{port}"),
        ],
        &[("WARREN_UID_BASE", uid_base)],
    );
    // Exit 1 is the connection failing; anything else is the exec failing, which must not
    // pass for a refusal.
    assert!(
        matches!(out.status.code(), Some(0 | 1)) && out.stderr.is_empty(),
        "{name} -> {address}:{port}: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

/// Removes a runtime's workspace when dropped, also when the test fails half-way (a running
/// workspace left behind would hold its uid range and cgroup into the next run).
struct Removed<'a> {
    data: &'a std::path::Path,
    uid_base: &'a str,
    name: &'a str,
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = common::warren_at(
            self.data,
            &["runtime", "rm", "-f", self.name],
            &[("WARREN_UID_BASE", self.uid_base)],
        );
    }
}

/// Two runtimes on one host, each with its own bridge (as `warren up` and a `warren runtime
/// run --bridge` or an agent would be): before, the second bridge got no rules at all and its
/// workspaces reached the host. Now each bridge has its own table, and the egress policy
/// (link-local always, admin-denied networks per runtime) holds for workspaces and for build
/// steps, and for what the host fetches for `ADD <url>`.
#[test]
fn every_bridge_is_walled_off_and_egress_is_policed() {
    enter_own_network();
    let port = warren_testkit::free_port();
    let outside = Outside::start(port);
    // A listener on the host, on every address (the bridges' gateways included).
    let host = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let host_port = host.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in host.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut &conn, b"hello\n");
        }
    });
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    let a = tempfile::Builder::new()
        .prefix("warren-hostile-a-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let b = tempfile::Builder::new()
        .prefix("warren-hostile-b-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (base_a, base_b) = ("3300000000", "3400000000");
    let in_a = |args: &[&str]| {
        common::warren_at(
            a.path(),
            args,
            &[
                ("WARREN_UID_BASE", base_a),
                ("WARREN_BRIDGE", "wbra"),
                ("WARREN_SUBNET", "10.97.0.0/16"),
            ],
        )
    };
    let in_b = |args: &[&str]| {
        common::warren_at(
            b.path(),
            args,
            &[
                ("WARREN_UID_BASE", base_b),
                ("WARREN_BRIDGE", "wbrb"),
                ("WARREN_SUBNET", "10.98.0.0/16"),
                ("WARREN_DENY_NETS", "198.51.100.0/24"),
            ],
        )
    };
    ok(in_a(&[
        "image",
        "import",
        rootfs.to_str().unwrap(),
        "dev:1",
    ]));
    ok(in_b(&[
        "image",
        "import",
        rootfs.to_str().unwrap(),
        "dev:1",
    ]));
    let _wa = Removed {
        data: a.path(),
        uid_base: base_a,
        name: "wa",
    };
    let _wb = Removed {
        data: b.path(),
        uid_base: base_b,
        name: "wb",
    };
    ok(in_a(&["runtime", "run", "wa", "--image", "dev:1"]));
    ok(in_b(&["runtime", "run", "wb", "--image", "dev:1"]));

    // The way out works: a plain outside address answers both (so a refusal below is the
    // policy, not a broken route).
    assert!(reaches(a.path(), base_a, "wa", OUTSIDE, port));
    assert!(reaches(b.path(), base_b, "wb", OUTSIDE, port));
    // The host, on either bridge's gateway, answers neither.
    for gateway in ["10.97.0.1", "10.98.0.1"] {
        assert!(
            !reaches(a.path(), base_a, "wa", gateway, host_port),
            "wa reached {gateway}"
        );
        assert!(
            !reaches(b.path(), base_b, "wb", gateway, host_port),
            "wb reached {gateway}"
        );
    }
    // Link-local (the metadata address) answers neither.
    assert!(!reaches(a.path(), base_a, "wa", METADATA, port));
    assert!(!reaches(b.path(), base_b, "wb", METADATA, port));
    // The denied network is denied to the runtime that denies it only.
    assert!(reaches(a.path(), base_a, "wa", DENIED, port));
    assert!(!reaches(b.path(), base_b, "wb", DENIED, port));
    // No workspace reaches one on the other bridge.
    let wb_address: Value = serde_json::from_str(&ok(in_b(&["runtime", "ls", "--json"]))).unwrap();
    let wb_address = wb_address[0]["address"].as_str().unwrap().to_owned();
    let mut listening = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--data")
        .arg(b.path())
        .args(["runtime", "exec", "wb", "--", "perl", "-MIO::Socket::INET", "-e"])
        .arg(format!(
            "my $l = IO::Socket::INET->new(LocalAddr => '0.0.0.0:{port}', Listen => 5, ReuseAddr => 1) or die; \
             while (my $c = $l->accept) {{ print $c \"hello\\n\"; close $c }}"
        ))
        .env("WARREN_UID_BASE", base_b)
        .env("WARREN_BRIDGE", "wbrb")
        .env("WARREN_SUBNET", "10.98.0.0/16")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        reaches(b.path(), base_b, "wb", "127.0.0.1", port),
        "wb's own listener runs"
    );
    assert!(
        !reaches(a.path(), base_a, "wa", &wb_address, port),
        "wa reached wb"
    );

    // A build step is held the same way, and `ADD <url>` fetched by the host is refused for
    // the host's own addresses and link-local, naming the policy.
    let ctx = tempfile::tempdir().unwrap();
    let build = |dockerfile: String| {
        std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
        in_a(&["build", ctx.path().to_str().unwrap(), "-t", "probe:1"])
    };
    let probe = |address: &str| {
        format!(
            "FROM dev:1\nRUN perl -MIO::Socket::INET -e 'exit(IO::Socket::INET->new(PeerAddr => \"{address}:{port}\", Timeout => 3) ? 0 : 1)'\n"
        )
    };
    ok(build(probe(OUTSIDE)));
    assert!(
        !build(probe(METADATA)).status.success(),
        "a build step reached {METADATA}"
    );
    for url in [
        format!("http://127.0.0.1:{host_port}/x"),
        format!("http://10.97.0.1:{host_port}/x"),
        format!("http://{METADATA}:{port}/x"),
        // Another tenant's workspace, which the host itself could reach.
        format!("http://{wb_address}:{port}/x"),
    ] {
        let out = build(format!("FROM dev:1\nADD {url} /x\n"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ADD {url} was fetched");
        assert!(err.contains("refused by the egress policy"), "{err}");
    }
    ok(in_a(&["runtime", "rm", "-f", "wa"]));
    ok(in_b(&["runtime", "rm", "-f", "wb"]));
    let _ = listening.wait();
    drop(outside);
}
