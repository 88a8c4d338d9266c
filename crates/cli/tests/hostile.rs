//! A hostile tenant: each test is one way a workspace's root, a Dockerfile or a user could try
//! to stall the host, reach it, or reach another tenant, against a real `warren up`, and what
//! Warren does instead. See docs/SECURITY.md for the boundaries these tests hold.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
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
    let shown: Value = warren.json(user, &["ws", "show", name]);
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
    let stderr = common::fails(out);
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

/// Imports the Debian minbase fixture as `dev:1` with `warren` (a runtime's own command).
fn import_dev(warren: &dyn Fn(&[&str]) -> std::process::Output) {
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    ok(warren(&[
        "image",
        "import",
        rootfs.to_str().unwrap(),
        "dev:1",
    ]));
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

/// A runtime of its own for VM workspaces (a fresh data folder under /var/tmp; the fixtures'
/// kernel and static guest; its own uid range, bridge and subnet), with `dev:1` imported.
struct VmRuntime {
    data: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
}

impl VmRuntime {
    fn new(uid_base: &str, bridge: &str, subnet: &str) -> Self {
        let data = tempfile::Builder::new()
            .prefix("warren-hostile-vm-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let path = |p: std::path::PathBuf| p.to_str().unwrap().to_owned();
        let vms = Self {
            data,
            env: vec![
                ("WARREN_UID_BASE", uid_base.to_owned()),
                ("WARREN_BRIDGE", bridge.to_owned()),
                ("WARREN_SUBNET", subnet.to_owned()),
                ("WARREN_VM_KERNEL", path(warren_testkit::guest_kernel())),
                ("WARREN_GUEST", path(warren_testkit::static_guest())),
            ],
        };
        import_dev(&|args| vms.warren(args));
        vms
    }

    fn warren(&self, args: &[&str]) -> std::process::Output {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::warren_at(self.data.path(), args, &env)
    }

    /// Removes workspace `name` when dropped, however the test ends.
    fn removes<'a>(&'a self, name: &'a str) -> Removed<'a> {
        Removed {
            data: self.data.path(),
            uid_base: &self.env[0].1,
            name,
        }
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
    import_dev(&in_a);
    import_dev(&in_b);
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
    let wb_address: Value = common::json(in_b(&["runtime", "ls", "--json"]));
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

/// A VM workspace's root makes `/usr/lib/modules` a symlink to a folder of the host. Each
/// start shares the kernel's modules into the workspace's tree; before, host root followed the
/// symlink (made a folder there, chowned it, and bound the modules over it, outliving the
/// stop). Now the path is resolved inside the workspace.
#[test]
fn a_vm_workspace_cannot_point_its_modules_folder_at_the_host() {
    enter_own_network();
    warren_testkit::require_vm_tools();
    let release = std::fs::read_dir(warren_testkit::guest_kernel().join("lib/modules"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let canary = tempfile::Builder::new()
        .prefix("warren-canary-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let canary_path = canary.path().to_str().unwrap().to_owned();
    let vms = VmRuntime::new("3500000000", "wbrv", "10.95.0.0/16");
    let warren = |args: &[&str]| vms.warren(args);
    let _vm = vms.removes("vmw");
    ok(warren(&[
        "runtime", "run", "vmw", "--image", "dev:1", "--vm",
    ]));
    ok(warren(&[
        "runtime",
        "exec",
        "vmw",
        "--",
        "sh",
        "-c",
        // The modules are bound (read-only) below it while the VM runs: moved aside whole.
        &format!(
            "mv /usr/lib/modules /usr/lib/modules.old && ln -s {canary_path} /usr/lib/modules"
        ),
    ]));
    ok(warren(&["runtime", "stop", "vmw"]));
    ok(warren(&["runtime", "start", "vmw"]));
    let on_host: Vec<_> = std::fs::read_dir(canary.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(on_host.is_empty(), "made on the host: {on_host:?}");
    // (Inside the workspace's tree, the same path is the workspace's own: mounted there.)
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let on_canary: Vec<&str> = mounts
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| m.starts_with(&canary_path))
        })
        .collect();
    assert!(
        on_canary.is_empty(),
        "a mount on the host's {canary_path}: {on_canary:?}"
    );
    // Inside, the modules are where the workspace's own symlink leads, and the VM runs.
    let listed = ok(warren(&[
        "runtime",
        "exec",
        "vmw",
        "--",
        "ls",
        &format!("/lib/modules/{release}"),
    ]));
    assert!(listed.contains("kernel"), "{listed}");
}

/// A `warren up` with these variables, its admin logged in and `dev:1` imported, whose users may
/// add the git repositories under the returned folder as projects.
fn up_with_repos(seed: u32, env: &[(&str, &str)]) -> (Warren, tempfile::TempDir) {
    let repos = tempfile::tempdir().unwrap();
    let mut warren = Warren::new(seed, None);
    warren.env.push((
        "WARREN_FILE_REPOS".into(),
        repos.path().display().to_string(),
    ));
    warren
        .env
        .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let password = warren.start().unwrap();
    warren.login("admin", &password);
    warren.import_dev_image();
    (warren, repos)
}

/// A git repository `name` under `repos` holding `files`, added by `user` as project `name`.
fn add_project(
    warren: &Warren,
    repos: &std::path::Path,
    user: &str,
    name: &str,
    files: &[(&str, &str)],
) {
    let repo = repos.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    for (file, text) in files {
        std::fs::write(repo.join(file), text).unwrap();
    }
    warren_testkit::git(&repo, &["init", "-q", "-b", "main"]);
    warren_testkit::git(&repo, &["add", "."]);
    warren_testkit::git(&repo, &["commit", "-q", "-m", "first"]);
    warren.ok(
        user,
        &[
            "project",
            "add",
            name,
            &format!("file://{}", repo.display()),
        ],
    );
}

/// Two users add projects on the same repository. Before, the prebuild key and the build
/// caches were the repository's: the second user's project reused (or a first, hostile one
/// poisoned) the other's prebuild, `RUN --mount=type=cache` was one folder per `id` for
/// everybody, and any user could start a workspace from another project's prebuild image.
#[test]
fn a_projects_prebuilds_and_caches_are_its_own() {
    enter_own_network();
    let (warren, repos) = up_with_repos(41, &[]);
    warren.add_user("alice");
    warren.add_user("bob");
    let repo = repos.path().join("shared");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("warren.yml"), "image:\n  file: Dockerfile\n").unwrap();
    // Each build records what the shared cache id held before it, then leaves its own mark.
    std::fs::write(
        repo.join("Dockerfile"),
        "FROM dev:1\nRUN --mount=type=cache,target=/c,id=shared \
         sh -c 'cat /c/mark > /seen.txt 2>/dev/null; hostname > /c/mark'\n",
    )
    .unwrap();
    warren_testkit::git(&repo, &["init", "-q", "-b", "main"]);
    warren_testkit::git(&repo, &["add", "."]);
    warren_testkit::git(&repo, &["commit", "-q", "-m", "first"]);
    let url = format!("file://{}", repo.display());
    let prebuild = |user: &str, project: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let list: Value = warren.json(user, &["prebuild", "ls", project, "--json"]);
            if let Some(pb) = list.as_array().and_then(|l| l.first())
                && !matches!(pb["state"].as_str(), Some("queued" | "running"))
            {
                return pb.clone();
            }
            assert!(Instant::now() < deadline, "no prebuild ended: {list}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    warren.ok("alice", &["project", "add", "alices", &url]);
    let alices = prebuild("alice", "alices");
    assert_eq!(alices["state"], "succeeded", "{alices}");
    warren.ok("bob", &["project", "add", "bobs", &url]);
    let bobs = prebuild("bob", "bobs");
    assert_eq!(bobs["state"], "succeeded", "{bobs}");
    assert_eq!(bobs["reused"], false, "bob got alice's prebuild: {bobs}");
    assert_ne!(bobs["image"], alices["image"]);
    // Bob's build did not see what alice's left in the cache.
    warren.ok("bob", &["ws", "create", "mine", "--project", "bobs"]);
    let seen = warren.ok("bob", &["ws", "exec", "mine", "--", "cat", "/seen.txt"]);
    assert_eq!(seen, "", "bob's build saw alice's cache: {seen}");
    // Alice's prebuild image is not bob's to start.
    let out = warren.cli(
        "bob",
        &[
            "ws",
            "create",
            "stolen",
            "--image",
            alices["image"].as_str().unwrap(),
        ],
    );
    let err = common::fails(out);
    assert!(err.contains("its project's"), "{err}");
    // Nor by its digest.
    let inspected: Value = common::json(common::warren_at(
        warren.data.path(),
        &[
            "image",
            "inspect",
            alices["image"].as_str().unwrap(),
            "--json",
        ],
        &[],
    ));
    let digest = inspected["digest"].as_str().unwrap();
    let err = common::fails(warren.cli("bob", &["ws", "create", "stolen", "--image", digest]));
    assert!(err.contains("bare digest"), "{err}");
    warren.ok("bob", &["ws", "rm", "mine"]);
}

/// A build step leaves a process behind that changes the sandbox's files later (here: after
/// the step's commit began). Before, it ran on while the host walked the sandbox's writable
/// layer for the commit (so a symlink swapped in mid-walk made host root copy a host file into
/// the image) and into the next step. Now everything a step started ends with it, as with
/// Docker, before the host reads anything.
#[test]
fn nothing_a_build_step_left_running_outlives_it() {
    enter_own_network();
    let data = tempfile::Builder::new()
        .prefix("warren-hostile-build-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let env = [
        ("WARREN_UID_BASE", "3600000000"),
        ("WARREN_BRIDGE", "wbrc"),
        ("WARREN_SUBNET", "10.94.0.0/16"),
    ];
    let warren = |args: &[&str]| common::warren_at(data.path(), args, &env);
    import_dev(&warren);
    let canary = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    std::fs::write(canary.path(), "HOST SECRET\n").unwrap();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM dev:1\n\
             RUN echo inside > /x && (while :; do ln -sfn {} /x.new; mv -T /x.new /x; \
             echo inside > /x.new; mv -T /x.new /x; done) >/dev/null 2>&1 & \
             (sleep 2; echo late > /late) >/dev/null 2>&1 & sleep 0.5\n\
             RUN sleep 3; test ! -e /late\n",
            canary.path().display()
        ),
    )
    .unwrap();
    let out = warren(&["build", ctx.path().to_str().unwrap(), "-t", "left:1"]);
    assert!(
        out.status.success(),
        "a process of the first step wrote in the second: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ws = Removed {
        data: data.path(),
        uid_base: "3600000000",
        name: "check",
    };
    ok(warren(&["runtime", "run", "check", "--image", "left:1"]));
    let x = ok(warren(&[
        "runtime",
        "exec",
        "check",
        "--",
        "sh",
        "-c",
        "cat /x 2>&1; true",
    ]));
    assert!(!x.contains("HOST SECRET"), "a host file in the image: {x}");
    // A Dockerfile cannot start from a step cached for another build or project.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM warren-build-cache:0123456789abcdef0123456789abcdef\nRUN true\n",
    )
    .unwrap();
    let err = common::fails(warren(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        "stolen:1",
    ]));
    assert!(err.contains("is its project's, not to be named"), "{err}");
}

/// 200 TCP connections to the SSH gateway that never authenticate. Before, each was held for
/// good (no pre-auth timeout, no cap), each holding a task and a descriptor. Now at most 64 per
/// address wait, for at most 30 s; the gateway serves the next connection after them.
#[test]
fn idle_unauthenticated_ssh_connections_are_dropped() {
    use std::io::Read as _;
    enter_own_network();
    let warren = Warren::up_with_admin(42, None);
    let addr = ("127.0.0.1", warren.ssh_port);
    // Some get as far as the version exchange (russh then runs the session in a task of its
    // own), the rest say nothing at all.
    let held: Vec<std::net::TcpStream> = (0..200)
        .map(|i| {
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            if i % 4 == 0 {
                std::io::Write::write_all(&mut conn, b"SSH-2.0-OpenSSH_9.2p1\r\n").unwrap();
            }
            conn
        })
        .collect();
    let started = Instant::now();
    for mut conn in held {
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("a connection still open after {:?}", started.elapsed())
                }
                Err(_) => break,
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "dropped only after {:?}",
        started.elapsed()
    );
    let mut fresh = std::net::TcpStream::connect(addr).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut banner = [0u8; 14];
    fresh.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-Warren", "the gateway still serves");
}

/// Bob registers alice's public key before she does (key squatting). Before, the first to
/// register a fingerprint owned it: alice could then never add her key. Now a key is added only
/// with a signature, made by the key, of the adding user's own challenge.
#[test]
fn a_key_is_added_only_by_whoever_holds_it() {
    enter_own_network();
    let warren = Warren::up_with_admin(43, None);
    for user in ["alice", "bob"] {
        warren.add_user(user);
    }
    let alice_key = warren.configs.path().join("alice/id_ed25519");
    std::fs::create_dir_all(alice_key.parent().unwrap()).unwrap();
    common::keygen(&alice_key);
    let public = std::fs::read_to_string(alice_key.with_extension("pub")).unwrap();
    // Bob has alice's public key (it is public), never her private key.
    let copied = warren.configs.path().join("bob/alice.pub");
    std::fs::write(&copied, &public).unwrap();
    let err = common::fails(warren.cli("bob", &["key", "add", "hers", copied.to_str().unwrap()]));
    assert!(err.contains("could not sign"), "{err}");
    let bob = warren.token("bob");
    let post = |body: Value| {
        warren.http(
            "POST",
            "/api/v1/keys",
            Some(&bob),
            Some(body.to_string().as_bytes()),
        )
    };
    let (status, answer) = post(json!({"name": "hers", "public_key": public}));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("prove you hold the key"),
        "{answer}"
    );
    // Bob's own key signing bob's challenge, sent with alice's public key.
    let bob_key = warren.configs.path().join("bob/id_ed25519");
    common::keygen(&bob_key);
    let (_, challenge) = warren.http("GET", "/api/v1/keys/challenge", Some(&bob), None);
    let namespace = challenge["namespace"].as_str().unwrap();
    let forged = common::ssh_sign(&bob_key, namespace, challenge["message"].as_str().unwrap());
    let (status, answer) = post(json!({"name": "hers", "public_key": public, "signature": forged}));
    assert_eq!(status, 400, "{answer}");
    // Alice adds her key; her proof replayed by bob proves nothing for him.
    warren.ok(
        "alice",
        &[
            "key",
            "add",
            "laptop",
            alice_key.with_extension("pub").to_str().unwrap(),
        ],
    );
    let alice = warren.token("alice");
    let (_, hers) = warren.http("GET", "/api/v1/keys/challenge", Some(&alice), None);
    let proof = common::ssh_sign(&alice_key, namespace, hers["message"].as_str().unwrap());
    let (status, answer) = post(json!({"name": "hers", "public_key": public, "signature": proof}));
    assert_eq!(status, 400, "{answer}");
    let (_, listed) = warren.http("GET", "/api/v1/keys", Some(&bob), None);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let (_, listed) = warren.http("GET", "/api/v1/keys", Some(&alice), None);
    assert_eq!(listed[0]["name"], "laptop", "{listed}");
}

/// A prebuild task and a build step that never end. Before, each held a job slot for good, and
/// the agent's four slots were shared with workspace jobs: four such prebuilds stopped every
/// workspace on the host from starting. Now a step stops at the step time limit with a message
/// naming it, prebuilds wait for a prebuild slot of their own (one here), and workspace jobs go
/// on meanwhile.
#[test]
fn a_step_past_its_time_limit_fails_and_frees_its_slot() {
    enter_own_network();
    let (warren, repos) = up_with_repos(44, &[("WARREN_BUILD_STEP_SECONDS", "8")]);
    let project = |name: &str, files: &[(&str, &str)]| {
        add_project(&warren, repos.path(), "admin", name, files);
    };
    project(
        "task",
        &[(
            "warren.yml",
            "image: dev:1\ntasks:\n  - name: forever\n    prebuild: sleep 600\n",
        )],
    );
    // A step that never stops writing (more often than the build looks at the clock).
    project(
        "step",
        &[
            ("warren.yml", "image:\n  file: Dockerfile\n"),
            (
                "Dockerfile",
                "FROM dev:1\nRUN while :; do echo still here; sleep 0.05; done\n",
            ),
        ],
    );
    // A stage whose own `tar` never ends, read by the host for a COPY --from.
    project(
        "copy",
        &[
            ("warren.yml", "image:\n  file: Dockerfile\n"),
            (
                "Dockerfile",
                "FROM dev:1 AS a\nRUN printf '#!/bin/sh\\nsleep 600\\n' > /usr/bin/tar && chmod +x /usr/bin/tar\n\
                 FROM dev:1\nCOPY --from=a /etc/hostname /copied\n",
            ),
        ],
    );
    let projects = ["task", "step", "copy"];
    let latest = |name: &str| -> Value {
        let list: Value = warren.json("admin", &["prebuild", "ls", name, "--json"]);
        list.as_array()
            .and_then(|l| l.first())
            .cloned()
            .unwrap_or(Value::Null)
    };
    // While a prebuild hangs, a workspace is made.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !projects.iter().any(|p| latest(p)["state"] == "running") {
        assert!(Instant::now() < deadline, "no prebuild started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = warren.cli_within(
        "admin",
        &["ws", "create", "meanwhile", "--image", "dev:1"],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One prebuild at a time; each stops at the limit and the next then runs.
    let deadline = Instant::now() + Duration::from_secs(300);
    let ended = loop {
        let all: Vec<Value> = projects.iter().map(|p| latest(p)).collect();
        if all.iter().all(|p| {
            matches!(
                p["state"].as_str(),
                Some("failed" | "succeeded" | "cancelled")
            )
        }) {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "the prebuilds never ended: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Never two at once: each started after the one before it had finished (read from the
    // server's own times, not from polls, which see one project after another).
    let mut spans: Vec<(i64, i64)> = ended
        .iter()
        .map(|pb| {
            (
                pb["started_at"].as_i64().unwrap(),
                pb["finished_at"].as_i64().unwrap(),
            )
        })
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two prebuilds at once: {ended:?}");
    }
    for (pb, what) in ended
        .iter()
        .zip(["sleep 600", "still here", "copying from a stage"])
    {
        assert_eq!(pb["state"], "failed", "{pb}");
        let error = pb["error"].as_str().unwrap();
        assert!(
            error.contains(what) && error.contains("step time limit (8 s)"),
            "{error}"
        );
    }
    warren.ok("admin", &["ws", "rm", "meanwhile"]);
}

/// A registry password given to Warren for the team's registry. Before, it went to every
/// registry a user named (`FROM evil.example/x`, `image pull`) and to any token service such a
/// registry pointed at. Now each registry's credentials are its own entry of a 0600 file, sent
/// to that registry alone.
#[test]
fn registry_passwords_go_only_to_their_registry() {
    use std::io::{BufRead as _, Write as _};
    use std::os::unix::fs::PermissionsExt as _;
    enter_own_network();
    let team = warren_testkit::Registry::start_with_basic_auth("ada", "s3cret");
    // Another registry, which asks every client for a password and keeps what it is sent.
    let decoy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let decoy_host = decoy.local_addr().unwrap().to_string();
    let (seen_tx, seen) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for conn in decoy.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            // Up to the blank line that ends the request's head.
            while reader.read_line(&mut head).is_ok_and(|n| n > 2) {}
            let _ = seen_tx.send(head);
            let _ = (&conn).write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"decoy\"\r\n\
                  Content-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let data = tempfile::tempdir().unwrap();
    let warren = |args: &[&str]| common::warren_at(data.path(), args, &[]);
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("hello"), "hi\n").unwrap();
    ok(warren(&[
        "image",
        "import",
        tree.path().to_str().unwrap(),
        "demo:1",
    ]));
    let auth = data.path().join("registry-auth.json");
    std::fs::write(
        &auth,
        json!({"auths": {team.host(): {"username": "ada", "password": "s3cret"}}}).to_string(),
    )
    .unwrap();
    // Readable by others: not used.
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pushed = format!("{}/team/demo:1", team.host());
    let err = common::fails(warren(&["image", "push", "demo:1", &pushed]));
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    ok(warren(&["image", "push", "demo:1", &pushed]));
    ok(warren(&["image", "pull", &pushed, "again:1"]));
    // The decoy asks; it gets no password.
    let err = common::fails(warren(&[
        "image",
        "pull",
        &format!("{decoy_host}/team/demo:1"),
        "decoy:1",
    ]));
    assert!(err.contains("user name and password"), "{err}");
    let requests: Vec<String> = seen.try_iter().collect();
    assert!(!requests.is_empty(), "the decoy was never asked");
    for request in requests {
        assert!(
            !request.to_ascii_lowercase().contains("authorization"),
            "credentials sent to another registry: {request}"
        );
    }
}

/// A workspace that writes until its disk is full. Before, its writable layer was a folder on
/// the host's disk, which it filled for the host, Warren and every other workspace. Now, with
/// a disk limit (here the host's default, `--workspace-disk`), its writes fail with ENOSPC at
/// the limit, its disk image takes no more than the limit of the host's disk, and another
/// workspace writes on.
#[test]
fn a_workspace_that_fills_its_disk_fills_only_its_own() {
    enter_own_network();
    let (warren, _repos) = up_with_repos(45, &[("WARREN_WORKSPACE_DISK", "256MiB")]);
    for ws in ["full", "other"] {
        warren.ok("admin", &["ws", "create", ws, "--image", "dev:1"]);
    }
    // Each workspace's filesystem is a file only root reads.
    for ws in common::workspace_folders(warren.data.path()) {
        use std::os::unix::fs::PermissionsExt as _;
        let image = ws.join("disk.img");
        let mode = std::fs::metadata(&image).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", image.display());
    }
    let out = warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "full",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/big bs=1M count=1024 2>&1; echo status=$?; df -m / | tail -1",
        ],
    );
    assert!(
        out.contains("No space left on device") && !out.contains("status=0"),
        "{out}"
    );
    // What the host pays is the workspaces' disk images' blocks: at most the limit each (the
    // host's free space itself moves with every other test running beside this one).
    for ws in common::workspace_folders(warren.data.path()) {
        use std::os::unix::fs::MetadataExt as _;
        let image = ws.join("disk.img");
        let used = std::fs::metadata(&image).unwrap().blocks() * 512;
        assert!(
            used <= (256 + 8) << 20,
            "{} takes {} MiB of the host's disk for a 256 MiB limit: {out}",
            image.display(),
            used >> 20
        );
    }
    // The other workspace, and the full one once it deletes, write on.
    warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "other",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/f bs=1M count=32 && sync",
        ],
    );
    warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "full",
            "--",
            "sh",
            "-c",
            "rm /big && echo again > /small && sync",
        ],
    );
    // What it wrote is kept across a stop and a start, also when its filesystem was unmounted
    // meanwhile (as after a reboot of the host).
    warren.ok("admin", &["ws", "stop", "full"]);
    for ws in common::workspace_folders(warren.data.path()) {
        let disk = ws.join("disk");
        let c = std::ffi::CString::new(disk.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount of a path; no memory is shared.
        unsafe { libc::umount(c.as_ptr()) };
    }
    warren.ok("admin", &["ws", "start", "full"]);
    let kept = warren.ok("admin", &["ws", "exec", "full", "--", "cat", "/small"]);
    assert_eq!(kept, "again\n");
    // A workspace's own limit, from `ws create --disk` or its environment file, wins over the
    // host's default.
    let env_file = warren.data.path().join("warren.yml");
    std::fs::write(&env_file, "image: dev:1\nresources:\n  disk: 96MiB\n").unwrap();
    warren.ok(
        "admin",
        &[
            "ws", "create", "own", "--image", "dev:1", "--disk", "128MiB",
        ],
    );
    warren.ok(
        "admin",
        &[
            "ws",
            "create",
            "file",
            "--image",
            "dev:1",
            "--env-file",
            env_file.to_str().unwrap(),
        ],
    );
    for (ws, most) in [("own", 128), ("file", 96), ("other", 256)] {
        let size = warren.ok(
            "admin",
            &["ws", "exec", ws, "--", "df", "-m", "--output=size", "/"],
        );
        let size: u64 = size.lines().last().unwrap().trim().parse().unwrap();
        assert!(
            size <= most && size > most / 2,
            "{ws}: {size} MiB for a {most} MiB limit"
        );
    }
    let err = common::fails(warren.cli(
        "admin",
        &["ws", "create", "tiny", "--image", "dev:1", "--disk", "1MiB"],
    ));
    assert!(err.contains("at least 64 MiB"), "{err}");
    // Nor more than the host gives: the host's limit is a ceiling, known from its reports, so
    // the request is refused at once, and no workspace is made (before, the host refused it
    // after the job's retries, about 30 s, and a failed workspace stayed).
    let err = common::fails(warren.cli(
        "admin",
        &["ws", "create", "big", "--image", "dev:1", "--disk", "1GiB"],
    ));
    assert!(
        err.contains(
            "a disk of 1024 MiB is more than any host gives a workspace (at most 256 MiB)"
        ),
        "{err}"
    );
    common::fails(warren.cli("admin", &["ws", "show", "big"]));
    for ws in ["full", "other", "own", "file"] {
        warren.ok("admin", &["ws", "rm", ws]);
    }
    // Nothing of it stays mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(warren.data.path().to_str().unwrap()),
        "{mounts}"
    );
}

/// A user names a registry on the host itself (here a real one on loopback; the same holds
/// for the server's API, the cloud's metadata address or the LAN) in a Dockerfile's `FROM`, in
/// an environment file's `image:` and in `ws create --image`. Before, the host fetched from it
/// for them, as it did for `ADD <url>`. Now a prebuild reaches it only under the egress policy,
/// and a user starts workspaces only from registries the admin trusts (the host mounts those
/// following their redirects and token services); an admin may name any.
#[test]
fn a_registry_a_user_names_is_held_to_the_egress_policy() {
    enter_own_network();
    let registry = warren_testkit::Registry::start();
    let trusted = warren_testkit::Registry::start();
    let (warren, repos) = up_with_repos(47, &[("WARREN_TRUSTED_REGISTRIES", &trusted.host())]);
    warren.add_user("alice");
    let remote = format!("{}/team/dev:1", registry.host());
    let team = format!("{}/team/dev:1", trusted.host());
    for to in [&remote, &team] {
        ok(common::warren_at(
            warren.data.path(),
            &["image", "push", "dev:1", to],
            &[],
        ));
    }
    let project = |name: &str, files: &[(&str, String)]| {
        let files: Vec<(&str, &str)> = files.iter().map(|(f, t)| (*f, t.as_str())).collect();
        add_project(&warren, repos.path(), "alice", name, &files);
    };
    project(
        "from",
        &[
            ("warren.yml", "image:\n  file: Dockerfile\n".into()),
            ("Dockerfile", format!("FROM {remote}\nRUN true\n")),
        ],
    );
    project("env", &[("warren.yml", format!("image: {remote}\n"))]);
    for name in ["from", "env"] {
        let deadline = Instant::now() + Duration::from_secs(120);
        let pb = loop {
            let list: Value = warren.json("alice", &["prebuild", "ls", name, "--json"]);
            if let Some(pb) = list.as_array().and_then(|l| l.first())
                && !matches!(pb["state"].as_str(), Some("queued" | "running"))
            {
                break pb.clone();
            }
            assert!(Instant::now() < deadline, "no prebuild ended: {list}");
            std::thread::sleep(Duration::from_millis(300));
        };
        assert_eq!(pb["state"], "failed", "{pb}");
        let error = pb["error"].as_str().unwrap();
        assert!(
            error.contains("loopback") && error.contains("egress policy"),
            "{name}: {error}"
        );
    }
    let err = common::fails(warren.cli("alice", &["ws", "create", "lazy", "--image", &remote]));
    assert!(err.contains("not a registry this host trusts"), "{err}");
    // The team's trusted registry, even on loopback, for her; any registry for the admin.
    warren.ok("alice", &["ws", "create", "team", "--image", &team]);
    warren.ok("alice", &["ws", "rm", "team"]);
    warren.ok("admin", &["ws", "create", "mine", "--image", &remote]);
    warren.ok("admin", &["ws", "rm", "mine"]);
}

/// A user of the host with no part in Warren (here `nobody`) walks into a workspace's folder
/// under the data folder. Before, its image mount (whose setuid programs run as the
/// workspace's root on the host), its writable layer and its root were all there to read and
/// run. Now the workspace's folder is open only to host root and the workspace's own ids.
#[test]
fn a_workspaces_tree_is_closed_to_other_users_of_the_host() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let warren = admin_with_a_workspace(48, "closed");
    let workspaces = common::workspace_folders(warren.data.path());
    assert_eq!(workspaces.len(), 1);
    let dir = &workspaces[0];
    let meta = std::fs::metadata(dir).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o710,
        "{}",
        dir.display()
    );
    for inside in ["rootfs/usr/bin", "lower/usr/bin", "upper"] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
            .arg(dir.join(inside))
            .output()
            .unwrap();
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody lists {inside}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Nor anything else of the data folder: the database, the keys, image blobs (named by
    // their digests), the chunk cache, git mirrors (named by their URLs' hashes).
    for private in [
        "warren.db",
        "secret.key",
        "ssh_host_ed25519_key",
        "images/blobs/sha256",
        "cache",
        "git",
    ] {
        let path = warren.data.path().join(private);
        let read = if path.is_dir() { "ls" } else { "cat" };
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", read])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody reads {private}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The workspace itself still starts, runs and keeps its files.
    warren.ok(
        "admin",
        &["ws", "exec", "closed", "--", "sh", "-c", "echo kept > /k"],
    );
    warren.ok("admin", &["ws", "stop", "closed"]);
    warren.ok("admin", &["ws", "start", "closed"]);
    assert_eq!(
        warren.ok("admin", &["ws", "exec", "closed", "--", "cat", "/k"]),
        "kept\n"
    );
    assert_eq!(
        meta.gid(),
        std::fs::metadata(dir.join("upper")).unwrap().uid()
    );
    warren.ok("admin", &["ws", "rm", "closed"]);
}

/// A workspace's root calls into kernel state shared with the host and other tenants: the
/// keyrings, io_uring, perf events, eBPF, kexec. Before, only the user namespace stood in the
/// way (and io_uring, keyrings and perf events are reachable from one). Now a seccomp filter
/// refuses them in every process of the workspace, exec'd ones included, while what a system
/// container running Docker needs (mount, unshare) still works.
#[test]
fn a_workspace_cannot_reach_kernel_state_it_shares_with_others() {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    let warren = admin_with_a_workspace(49, "sc");
    // x86_64 numbers: keyctl 250, io_uring_setup 425, perf_event_open 298, bpf 321,
    // kexec_load 246. Each is called with zero arguments; the errno is printed.
    let script = r#"for $n (250, 425, 298, 321, 246) { $r = syscall($n, 0, 0, 0, 0, 0); print "$n=", ($r == -1 ? $!+0 : "ok"), " " }"#;
    let out = warren.ok("admin", &["ws", "exec", "sc", "--", "perl", "-e", script]);
    // ENOSYS (38) where programs should fall back, EPERM (1) elsewhere.
    assert_eq!(out.trim(), "250=38 425=38 298=1 321=1 246=1", "{out}");
    // The calls a nested engine needs still work.
    let out = warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "sc",
            "--",
            "sh",
            "-c",
            "mkdir -p /m && mount -t tmpfs t /m && umount /m && unshare -m true && echo fine",
        ],
    );
    assert_eq!(out, "fine\n");
    warren.ok("admin", &["ws", "rm", "sc"]);
}

/// A device node reaches a workspace (bind-mounted in, or a nested engine's `mknod`, or an
/// image from before import refused them). Its cgroups must refuse it anyway. Before, the
/// spec listed no device rules: libcgroups' v1 `devices` controller only added allows to a
/// cgroup that allowed everything, and libcontainer was built without the cgroup-v2 eBPF
/// filter. Each layer is checked on its own: a host-root process joins one hierarchy's
/// directory of the workspace (v1 `devices`, and the unified one, whose eBPF filter cgroup-v2
/// hosts rely on) and opens a node outside the standard set, then `/dev/null`'s twin.
#[test]
fn a_device_node_outside_the_standard_set_cannot_be_opened() {
    let warren = admin_with_a_workspace(50, "dv");
    let folders = common::workspace_folders(warren.data.path());
    let id = folders[0].file_name().unwrap().to_str().unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // The workspace's directory in every hierarchy that holds device rules: v1's `devices`
    // and the unified one (on a hybrid host both; on a v1 or a v2 host, one).
    let (mut layers, mut hierarchies) = (Vec::new(), 0);
    for line in mountinfo.lines() {
        let (fields, fs) = line.split_once(" - ").unwrap();
        let mut fs = fs.split(' ');
        let (fstype, options) = (fs.next().unwrap(), fs.nth(1).unwrap_or(""));
        let v1_devices = fstype == "cgroup" && options.split(',').any(|o| o == "devices");
        if !(v1_devices || fstype == "cgroup2") {
            continue;
        }
        hierarchies += 1;
        let root = std::path::Path::new(fields.split(' ').nth(4).unwrap()).join("warren");
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&format!("{id}-")))
            {
                layers.push(entry.path());
            }
        }
    }
    assert!(
        !layers.is_empty() && layers.len() == hierarchies,
        "{layers:?}"
    );
    // The workspace's init is in each, and so is a process exec'd into it (it shares init's
    // cgroup in every hierarchy that holds device rules).
    for dir in &layers {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(!procs.trim().is_empty(), "nothing in {}", dir.display());
    }
    let inside = |script: &str| warren.ok("admin", &["ws", "exec", "dv", "--", "sh", "-c", script]);
    let both = inside("cat /proc/1/cgroup; echo --; cat /proc/self/cgroup");
    let (init, exec) = both.split_once("--\n").unwrap();
    let relevant = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("0::") || l.contains(":devices:"))
            .map(str::to_owned)
            .collect()
    };
    assert!(!relevant(init).is_empty(), "{both}");
    assert_eq!(relevant(init), relevant(exec), "{both}");
    let nodes = tempfile::tempdir().unwrap();
    let kmsg = nodes.path().join("kmsg");
    let null = nodes.path().join("null");
    run(std::process::Command::new("mknod")
        .arg(&kmsg)
        .args(["c", "1", "11"]));
    run(std::process::Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"]));
    let open_in = |dir: &std::path::Path, node: &std::path::Path| {
        std::process::Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$1/cgroup.procs\" && exec dd if=\"$2\" of=/dev/null count=0 status=none",
                "sh",
            ])
            .arg(dir)
            .arg(node)
            .output()
            .unwrap()
    };
    for dir in &layers {
        let out = open_in(dir, &kmsg);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // What a workspace may use: the standard set, and FUSE and TUN for a nested engine.
        for allowed in [
            &null,
            std::path::Path::new("/dev/fuse"),
            "/dev/net/tun".as_ref(),
        ] {
            let out = open_in(dir, allowed);
            assert!(
                out.status.success(),
                "{} {}: {}",
                dir.display(),
                allowed.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = inside("head -c1 /dev/urandom >/dev/null && echo x >/dev/null && echo fine");
    assert_eq!(out, "fine\n");
    warren.ok("admin", &["ws", "rm", "dv"]);
    for dir in &layers {
        assert!(!dir.exists(), "{} outlived its workspace", dir.display());
    }
}

/// A VM workspace with a disk limit fills its tree (over virtiofs, onto the workspace's own
/// filesystem) and its scratch disk (`/var/lib/docker`, a block device) and gets ENOSPC in
/// each, while what it takes on the host stays within the limit for each. Before, a VM could
/// not have a limit, and its scratch disk was a 64 GiB sparse file on the host's disk.
#[test]
fn a_vm_that_fills_its_disk_fills_only_its_own() {
    use std::os::unix::fs::MetadataExt as _;
    enter_own_network();
    warren_testkit::require_vm_tools();
    let vms = VmRuntime::new("3600000000", "wbrd", "10.94.0.0/16");
    let warren = |args: &[&str]| vms.warren(args);
    let _vm = vms.removes("vmd");
    ok(warren(&[
        "runtime", "run", "vmd", "--image", "dev:1", "--vm", "--disk", "128MiB",
    ]));
    for target in ["/root/big", "/var/lib/docker/big"] {
        let out = ok(warren(&[
            "runtime",
            "exec",
            "vmd",
            "--",
            "sh",
            "-c",
            &format!("dd if=/dev/zero of={target} bs=1M count=200 conv=fsync 2>&1; echo rc=$?"),
        ]));
        assert!(
            out.contains("No space left on device") && !out.contains("rc=0"),
            "{target}: {out}"
        );
        ok(warren(&["runtime", "exec", "vmd", "--", "rm", target]));
    }
    // The workspace goes on once it deletes what filled it.
    let out = ok(warren(&[
        "runtime",
        "exec",
        "vmd",
        "--",
        "sh",
        "-c",
        "echo kept > /root/k && cat /root/k",
    ]));
    assert_eq!(out, "kept\n");
    let dir = common::workspace_folders(vms.data.path()).remove(0);
    let mut files = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir()
                && entry.file_name() != "rootfs"
                && entry.file_name() != "lower"
                && entry.file_name() != "disk"
            {
                stack.push(entry.path());
            } else if meta.is_file() {
                files.push((entry.path(), meta));
            }
        }
    }
    for name in ["disk.img", "scratch.img"] {
        let (path, meta) = files
            .iter()
            .find(|(p, _)| p.file_name().is_some_and(|n| n == name))
            .unwrap_or_else(|| panic!("no {name} in {files:?}"));
        assert_eq!(meta.len(), 128 << 20, "{}", path.display());
        assert!(
            meta.blocks() * 512 <= 136 << 20,
            "{} takes {} bytes",
            path.display(),
            meta.blocks() * 512
        );
    }
}

/// In a network namespace of its own, a Warren whose admin has one workspace `name` of the dev
/// image.
fn admin_with_a_workspace(seed: u32, name: &str) -> Warren {
    enter_own_network();
    let warren = Warren::up_with_admin(seed, None);
    warren.import_dev_image();
    warren.ok("admin", &["ws", "create", name, "--image", "dev:1"]);
    warren
}
