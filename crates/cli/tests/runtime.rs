//! Workspaces for real: system containers (user namespaces, cgroups — v1 here — overlay over a
//! folder or a lazy image) and VMs (QEMU under TCG here, the same tree over virtiofs), on a
//! bridge with nftables rules — each test in a network namespace of its own. The lifecycle and
//! isolation tests run against both backends. Workspaces are driven with `warren runtime ...`
//! as an operator would, and inspected through the library's exec and from the host.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use warren_runtime::vm::remembered_accel;
use warren_runtime::{
    Accel, ContainerRuntime, ContainerRuntimeConfig, ExecIo, ExecRequest, ExitStatus,
    NetworkConfig, Runtime, VmSettings, WinSize, WorkspaceId, WorkspaceState,
};
use warren_testkit::{DebianRootfs, debian_rootfs, enter_own_network, require_program};

/// Which kind of workspace a test makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Container,
    Vm,
}

/// One test's host: its own network namespace and data folder.
struct Host {
    data: TempDir,
    runtime: ContainerRuntime,
    uid_base: u32,
    backend: Backend,
    /// The guest kernel and agent (VM tests).
    vm: Option<(PathBuf, PathBuf)>,
}

impl Host {
    /// `seed` gives each test its own uid ranges: tests run in parallel, and their workspaces'
    /// processes must not be mistaken for one another's.
    fn new(seed: u32) -> Self {
        Self::with_backend(seed, Backend::Container)
    }

    fn with_backend(seed: u32, backend: Backend) -> Self {
        enter_own_network();
        for (program, package) in [
            ("nft", "nftables"),
            ("ip", "iproute2"),
            ("nsenter", "util-linux"),
        ] {
            require_program(program, package);
        }
        let data = tempfile::Builder::new()
            .prefix("warren-rt-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let uid_base = ContainerRuntimeConfig::DEFAULT_UID_BASE + seed * 16 * 65536;
        let vm = (backend == Backend::Vm).then(|| {
            warren_testkit::require_vm_tools();
            (
                warren_testkit::guest_kernel(),
                warren_testkit::static_guest(),
            )
        });
        let runtime = ContainerRuntime::new(ContainerRuntimeConfig {
            root: data.path().join("runtime"),
            data: data.path().to_path_buf(),
            helper: env!("CARGO_BIN_EXE_warren").into(),
            network: NetworkConfig::default(),
            uid_base,
            default_disk: None,
            share_image_mounts: true,
            passthrough: true,
            vm: VmSettings {
                kernel: vm.as_ref().map(|v| v.0.clone()),
                guest: vm.as_ref().map(|v| v.1.clone()),
                accel: None,
            },
        })
        .unwrap();
        Self {
            data,
            runtime,
            uid_base,
            backend,
            vm,
        }
    }

    /// The accelerator Warren detected for this host's VMs (none before its first VM, and
    /// for containers).
    fn accel(&self) -> Option<Accel> {
        let (kernel, _) = self.vm.as_ref()?;
        remembered_accel(&self.data.path().join("runtime"), kernel)
    }

    /// How long to wait for something a workspace does that takes `base` in a container: as
    /// long under KVM, ten times as long under TCG, which emulates every instruction (the VM
    /// boot takes 2.9 s here under TCG; the same boot under KVM well under a second).
    fn patience(&self, base: Duration) -> Duration {
        match self.accel() {
            Some(Accel::Tcg) => base * 10,
            _ => base,
        }
    }

    /// Polls `done` every 100 ms until it holds, failing with `what` after `patience(base)`.
    fn wait_for(&self, what: &str, base: Duration, mut done: impl FnMut() -> bool) {
        let limit = self.patience(base);
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn warren(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--data")
            .arg(self.data.path())
            .env("WARREN_UID_BASE", self.uid_base.to_string())
            .envs(self.vm.iter().flat_map(|(kernel, guest)| {
                [("WARREN_VM_KERNEL", kernel), ("WARREN_GUEST", guest)]
            }))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.warren(args);
        assert!(
            out.status.success(),
            "warren {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `script` with `sh -c` in the workspace; returns status, stdout and stderr.
    fn sh(&self, ws: &str, script: &str) -> (ExitStatus, String, String) {
        self.exec_as(ws, None, script)
    }

    fn exec_as(&self, ws: &str, user: Option<&str>, script: &str) -> (ExitStatus, String, String) {
        let exec = self
            .runtime
            .exec(
                &id(ws),
                &ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), script.into()],
                    user: user.map(Into::into),
                    ..Default::default()
                },
            )
            .unwrap();
        let ExecIo::Pipes {
            stdin,
            mut stdout,
            mut stderr,
        } = exec.io
        else {
            panic!("asked for pipes")
        };
        drop(stdin);
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            stderr.read_to_string(&mut s).unwrap();
            s
        });
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        let status = exec.process.wait().unwrap();
        (status, out, err.join().unwrap())
    }

    /// Starts `argv` in the workspace as root, with pipes.
    fn start(
        &self,
        ws: &str,
        argv: &[&str],
    ) -> Result<warren_runtime::Exec, warren_runtime::Error> {
        self.runtime.exec(
            &id(ws),
            &ExecRequest {
                argv: argv.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    /// Runs `argv` with `input` on its stdin; returns its status and stdout.
    fn feed(&self, ws: &str, argv: &[&str], input: Vec<u8>) -> (ExitStatus, String) {
        let exec = self.start(ws, argv).unwrap();
        let ExecIo::Pipes {
            mut stdin,
            mut stdout,
            ..
        } = exec.io
        else {
            panic!("asked for pipes")
        };
        let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        writer.join().unwrap();
        (exec.process.wait().unwrap(), out)
    }

    fn run_dir(&self, ws: &str, extra: &[&str]) {
        self.run_dir_with(ws, &debian_rootfs(DebianRootfs::Minbase), extra);
    }

    fn run_dir_with(&self, ws: &str, rootfs: &Path, extra: &[&str]) {
        let mut args = vec!["runtime", "run", ws, "--dir", rootfs.to_str().unwrap()];
        if self.backend == Backend::Vm {
            args.push("--vm");
        }
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    fn uid_base(&self, ws: &str) -> u32 {
        self.runtime.info(&id(ws)).unwrap().uid_base
    }

    /// Everything of `ws` that should be gone after delete.
    fn traces_of(&self, ws: &str, uid_base: u32, veth: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for line in mounts.lines() {
            if line.contains(self.data.path().to_str().unwrap()) {
                found.push(format!("mount: {line}"));
            }
        }
        for controller in ["memory", "pids", "cpu", "systemd", "unified"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("warren")
                .join(format!("{ws}-{:x}", uid_base >> 16));
            if dir.exists() {
                found.push(format!("cgroup {}", dir.display()));
            }
        }
        if Command::new("ip")
            .args(["link", "show", veth])
            .output()
            .unwrap()
            .status
            .success()
        {
            found.push(format!("interface {veth}"));
        }
        let set = Command::new("nft")
            .args(["list", "set", "bridge", "warren", "addresses"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&set.stdout).contains(veth) {
            found.push(format!("nft element for {veth}"));
        }
        for pid in processes_in_range(uid_base) {
            found.push(format!("process {pid} ({})", describe_process(pid)));
        }
        if self
            .data
            .path()
            .join("runtime/workspaces")
            .join(ws)
            .exists()
        {
            found.push("workspace folder".into());
        }
        found
    }
}

/// A failed test must not leave workspaces running on the machine.
impl Drop for Host {
    #[allow(clippy::print_stderr)] // a failing test's output is where this belongs
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the supervisors said is the first thing a failure needs.
            let dir = self.data.path().join("runtime/workspaces");
            let shared = self.data.path().join("mounts");
            for (entry, name) in std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| (e, "shim.log"))
                .chain(
                    std::fs::read_dir(&shared)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| (e, "log")),
                )
            {
                let log = std::fs::read_to_string(entry.path().join(name)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!(
                    "--- {} {name} (last lines):\n{}",
                    entry.file_name().to_string_lossy(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        for ws in self.runtime.list().unwrap_or_default() {
            let _ = self.runtime.delete(&ws.config.id);
        }
    }
}

fn id(ws: &str) -> WorkspaceId {
    WorkspaceId::new(ws).unwrap()
}

/// Host pids whose real uid lies in the workspace's range.
fn processes_in_range(base: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let uid: Option<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        if uid.is_some_and(|u| u >= base && u < base + 65536) {
            pids.push(pid);
        }
    }
    pids
}

/// A process as a failure should show it: its name, state and parent (name and state too), so
/// that a leftover tells whose it was and whether it is only unreaped.
fn describe_process(pid: u32) -> String {
    let field = |pid: &str, name: &str| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            })
            .unwrap_or_else(|| "?".into())
    };
    let pid = pid.to_string();
    let parent = field(&pid, "PPid:");
    format!(
        "{}, {}, parent {parent} {}, {}",
        field(&pid, "Name:"),
        field(&pid, "State:"),
        field(&parent, "Name:"),
        field(&parent, "State:")
    )
}

/// Reads from a terminal until `needle` shows up (or panics after `limit`).
fn read_until(master: &mut std::fs::File, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        assert!(
            Instant::now() < deadline,
            "`{needle}` never came; saw {seen:?}"
        );
        let n = master.read(&mut buf).unwrap();
        assert!(n > 0, "terminal closed; saw {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// A data folder under a folder the workspaces' ids cannot search (what `mktemp -d` makes,
/// mode 0700) is refused before anything starts, by `runtime run` and by `warren up`, with the
/// folder in the way and the fix named; once it is opened, the same command works.
#[test]
fn a_data_folder_closed_to_workspaces_is_refused_with_the_folder_named() {
    let host = Host::new(9);
    let closed = tempfile::Builder::new()
        .prefix("warren-closed-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(
        closed.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let data = closed.path().join("data");
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    let warren = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--data")
            .arg(&data)
            .env("WARREN_UID_BASE", host.uid_base.to_string())
            .args(args)
            .output()
            .unwrap()
    };
    let run = ["runtime", "run", "shut", "--dir", rootfs.to_str().unwrap()];
    let expected = format!(
        "cannot enter `{0}` (mode 0700, owner 0); let others search it (`chmod o+x {0}`)",
        closed.path().display()
    );
    let refused = warren(&run);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains(&expected), "{stderr}");
    let listed = warren(&["runtime", "ls"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(!listed.contains("shut"), "nothing was created: {listed}");
    let up = warren(&["up", "--listen", "127.0.0.1:0", "--ssh-listen", "off"]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(!up.status.success());
    assert!(stderr.contains(&expected), "{stderr}");

    std::fs::set_permissions(
        closed.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o701),
    )
    .unwrap();
    let started = warren(&run);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let exec = warren(&["runtime", "exec", "shut", "--", "echo", "reached"]);
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "reached\n");
    assert!(warren(&["runtime", "rm", "-f", "shut"]).status.success());
}

/// Two tests of one body: on a system container and on a VM, each host with its own seed.
macro_rules! on_each_backend {
    ($body:ident: $container:ident($c:literal), $vm:ident($v:literal)) => {
        #[test]
        fn $container() {
            $body(Host::with_backend($c, Backend::Container));
        }

        #[test]
        fn $vm() {
            $body(Host::with_backend($v, Backend::Vm));
        }
    };
}

on_each_backend!(lifecycle:
    lifecycle_exec_pty_stop_start_and_clean_delete(1),
    lifecycle_exec_pty_stop_start_and_clean_delete_of_a_vm(5));

fn lifecycle(host: Host) {
    let vm = host.backend == Backend::Vm;
    host.run_dir("life", &["--memory", "256MiB", "--pids", "500"]);
    let base = host.uid_base("life");

    // Pipes: separate streams and the exit status.
    let (status, out, err) = host.sh("life", "echo out; echo err >&2; exit 3");
    assert_eq!(
        (status, out.as_str(), err.as_str()),
        (ExitStatus::Code(3), "out\n", "err\n")
    );
    let (_, out, _) = host.sh("life", "id -u; cat /proc/self/uid_map; hostname");
    let words: Vec<&str> = out.split_whitespace().collect();
    if vm {
        // Root of its own kernel: no user namespace inside.
        assert_eq!(words, ["0", "0", "0", "4294967295", "life"]);
        // The accelerator Warren detected, which a host without a usable /dev/kvm never
        // picks as KVM.
        let detected = host
            .accel()
            .expect("the first VM's start detects the accelerator");
        let info = host.runtime.info(&id("life")).unwrap();
        assert_eq!(info.accel.as_deref(), Some(detected.as_str()));
        if std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            assert_eq!(detected, Accel::Tcg);
        }
        let (_, out, _) = host.sh("life", "uname -r; grep MemTotal /proc/meminfo");
        assert!(out.contains("-amd64"), "the guest kernel runs: {out}");
    } else {
        assert_eq!(words, ["0", "0", &base.to_string(), "65536", "life"]);
    }

    // stdin reaches the process.
    let (status, upper) = host.feed("life", &["tr", "a-z", "A-Z"], b"through stdin\n".to_vec());
    assert_eq!(
        (status, upper.as_str()),
        (ExitStatus::Code(0), "THROUGH STDIN\n")
    );

    // A terminal: its size, a resize, and the status of the shell.
    let exec = host
        .runtime
        .exec(
            &id("life"),
            &ExecRequest {
                argv: vec!["sh".into()],
                tty: Some(WinSize { rows: 24, cols: 80 }),
                ..Default::default()
            },
        )
        .unwrap();
    let ExecIo::Pty { mut master } = exec.io else {
        panic!("asked for a terminal")
    };
    master.write_all(b"tty; stty size\n").unwrap();
    let seen = read_until(&mut master, "24 80", host.patience(Duration::from_secs(20)));
    assert!(seen.contains("/dev/pts/"), "{seen}");
    exec.process
        .resize(WinSize {
            rows: 40,
            cols: 100,
        })
        .unwrap();
    master.write_all(b"stty size; exit 7\n").unwrap();
    read_until(
        &mut master,
        "40 100",
        host.patience(Duration::from_secs(20)),
    );
    assert_eq!(exec.process.wait().unwrap(), ExitStatus::Code(7));

    // A signal reaches the process.
    let exec = host
        .runtime
        .exec(
            &id("life"),
            &ExecRequest {
                argv: vec!["sleep".into(), "600".into()],
                ..Default::default()
            },
        )
        .unwrap();
    exec.process.signal(libc::SIGTERM).unwrap();
    assert_eq!(
        exec.process.wait().unwrap(),
        ExitStatus::Signal(libc::SIGTERM)
    );

    // A socket inside for SSH agent forwarding: the user's, in a folder only they enter; a
    // connection made inside arrives at the listener here; dropping it removes the folder.
    let socket = host
        .runtime
        .listen_unix(&id("life"), Some("nobody"))
        .unwrap();
    let folder = Path::new(&socket.path)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let listener = socket.listener.try_clone().unwrap();
    let served = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut line = [0u8; 5];
        conn.read_exact(&mut line).unwrap();
        conn.write_all(b"pong ").unwrap();
        conn.write_all(&line).unwrap();
    });
    let (status, out, err) = host.exec_as(
        "life",
        Some("nobody"),
        &format!(
            "stat -c '%u %a' {folder}; perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"connect: $!\"; print $s \"ping\\n\"; print scalar <$s>' {}",
            socket.path
        ),
    );
    assert_eq!(status, ExitStatus::Code(0), "{out}{err}");
    assert_eq!(out, "65534 700\npong ping\n");
    served.join().unwrap();
    drop(socket);
    host.wait_for(
        &format!("{folder} outlives its socket"),
        Duration::from_secs(20),
        || host.sh("life", &format!("test -e {folder} && echo left")).1 != "left\n",
    );

    // The writable layer survives stop and start, and belongs to the workspace's root.
    assert_eq!(
        host.sh("life", "echo kept > /root/kept").0,
        ExitStatus::Code(0)
    );
    let kept = host
        .data
        .path()
        .join("runtime/workspaces/life/upper/root/kept");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&kept).unwrap()),
        base
    );
    host.ok(&["runtime", "stop", "life"]);
    assert_eq!(
        host.runtime.info(&id("life")).unwrap().state,
        WorkspaceState::Stopped
    );
    assert!(
        processes_in_range(base).is_empty(),
        "stop leaves no process"
    );
    assert!(host.start("life", &["true"]).is_err());
    host.ok(&["runtime", "start", "life"]);
    assert!(host.ok(&["runtime", "ls"]).contains("running"));
    assert_eq!(host.sh("life", "cat /root/kept").1, "kept\n");
    let stats = host.runtime.stats(&id("life")).unwrap();
    assert_eq!(stats.memory_limit, Some(256 << 20));
    // A VM's processes are its kernel's business: the limit is its memory.
    assert_eq!(stats.pids_limit, if vm { None } else { Some(500) });
    assert!(stats.pids >= 1 && stats.disk_bytes > 0, "{stats:?}");
    if vm {
        assert!(
            stats.memory_bytes > 16 << 20 && stats.cpu_ns > 0,
            "QEMU's memory and CPU time: {stats:?}"
        );
    }

    // Delete while running: nothing of it is left on the host.
    let out = host.warren(&["runtime", "rm", "life"]);
    assert!(
        !out.status.success(),
        "rm refuses a running workspace without --force"
    );
    host.ok(&["runtime", "rm", "--force", "life"]);
    assert_eq!(
        host.traces_of("life", base, &format!("wv{:x}", base >> 16)),
        Vec::<String>::new()
    );
    assert!(!host.ok(&["runtime", "ls"]).contains("life"));
}

#[test]
fn a_lazy_image_is_the_lower_layer_with_its_ownership_shifted() {
    let host = Host::new(2);
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    host.ok(&["image", "import", rootfs.to_str().unwrap(), "base:1"]);
    // A mount of its own (the host's shared ones: the next test), serving its ids shifted.
    let own = "--no-shared-image-mounts";
    host.ok(&["runtime", "run", "lazy", "--image", "base:1", own]);
    let mounts = image_mounts_of(host.data.path());
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(mounts[0].1.contains("--id-offset"), "{mounts:?}");
    let base = host.uid_base("lazy");
    let (status, out, err) = host.sh(
        "lazy",
        "stat -c '%u %g %a' /etc/shadow /usr/bin/passwd; cat /etc/debian_version; perl -e 'print 6*7, qq(\\n)'",
    );
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    let version = std::fs::read_to_string(rootfs.join("etc/debian_version")).unwrap();
    assert_eq!(out, format!("0 42 640\n0 0 4755\n{version}42\n"));
    // Changes go to the workspace's layer, owned by its root on the host.
    assert_eq!(
        host.sh("lazy", "echo new > /etc/motd; rm /etc/issue").0,
        ExitStatus::Code(0)
    );
    let upper = host.data.path().join("runtime/workspaces/lazy/upper/etc");
    assert_eq!(
        std::fs::read_to_string(upper.join("motd")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(upper.join("motd")).unwrap()),
        base
    );
    assert_eq!(host.sh("lazy", "test -e /etc/issue").0, ExitStatus::Code(1));
    host.ok(&["runtime", "stop", "lazy"]);
    host.ok(&["runtime", "start", "lazy", own]);
    assert!(!host.data.path().join("mounts").exists());
    assert_eq!(host.sh("lazy", "cat /etc/motd").1, "new\n");
    host.ok(&["runtime", "rm", "-f", "lazy"]);
    assert_eq!(
        host.traces_of("lazy", base, &format!("wv{:x}", base >> 16)),
        Vec::<String>::new()
    );
}

/// The image mounts serving workspaces of the data folder `data`: (pid, command line).
fn image_mounts_of(data: &Path) -> Vec<(u32, String)> {
    let marker = format!("--data {} image mount ", data.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&marker).then_some((pid, cmdline))
        })
        .collect()
}

/// The mount options of whatever is mounted at `path`, as /proc/mounts lists them.
fn mount_options(path: &Path) -> Option<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
        .and_then(|l| l.split(' ').nth(3).map(str::to_owned))
}

#[test]
fn workspaces_of_one_image_share_one_mount_each_with_its_own_ids() {
    let host = Host::new(66);
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    host.ok(&["image", "import", rootfs.to_str().unwrap(), "base:1"]);
    for ws in ["sa", "sb"] {
        host.ok(&["runtime", "run", ws, "--image", "base:1"]);
    }
    let mounts = image_mounts_of(host.data.path());
    if let warren_runtime::image_sharing::ImageSharing::PerWorkspace { why } =
        host.runtime.image_sharing()
    {
        // A kernel that cannot idmap FUSE mounts: each workspace keeps a mount of its own.
        assert!(why.contains("6.12"), "{why}");
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        return;
    }
    // One process serves the image, at a tree only host root reaches, setuid ignored there.
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(mounts[0].1.contains("--shared-lease"), "{mounts:?}");
    let shared = host.data.path().join("mounts");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&shared).unwrap().permissions())
            & 0o777,
        0o700
    );
    let tree = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .find_map(|image| {
            let current = std::fs::read_to_string(image.path().join("current")).ok()?;
            Some(image.path().join(current.trim()).join("tree"))
        })
        .unwrap();
    assert!(mount_options(&tree).unwrap().contains("nosuid"));
    // Each workspace sees the image with its own ids, setuid honored, its changes its own.
    for ws in ["sa", "sb"] {
        let lower = host
            .data
            .path()
            .join("runtime/workspaces")
            .join(ws)
            .join("lower");
        let options = mount_options(&lower).unwrap();
        assert!(
            options.contains("idmapped") && !options.contains("nosuid"),
            "{options}"
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(
                &std::fs::metadata(lower.join("usr/bin/passwd")).unwrap()
            ),
            host.uid_base(ws)
        );
        let (status, out, err) = host.sh(ws, "stat -c '%u %g %a' /usr/bin/passwd /etc/shadow");
        assert_eq!(status, ExitStatus::Code(0), "{err}");
        assert_eq!(out, "0 0 4755\n0 42 640\n");
    }
    // passwd reads /etc/shadow (root's only) for a user because it is setuid root.
    let (status, out, err) = host.sh(
        "sa",
        "useradd -u 1000 u1 && setpriv --reuid 1000 --regid 1000 --clear-groups passwd -S u1",
    );
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    assert!(out.starts_with("u1 "), "{out}");
    assert_eq!(
        host.sh("sa", "echo mine > /etc/motd").0,
        ExitStatus::Code(0)
    );
    assert_ne!(host.sh("sb", "cat /etc/motd").1, "mine\n");

    // One stops: the other reads on from the same mount, which a third start joins.
    host.ok(&["runtime", "stop", "sa"]);
    assert_eq!(image_mounts_of(host.data.path()), mounts);
    assert!(
        mount_options(&tree).is_some(),
        "the shared tree is still mounted"
    );
    let version = std::fs::read_to_string(rootfs.join("etc/debian_version")).unwrap();
    assert_eq!(host.sh("sb", "cat /etc/debian_version").1, version);
    host.ok(&["runtime", "start", "sa"]);
    assert_eq!(image_mounts_of(host.data.path()), mounts);
    host.ok(&["runtime", "stop", "sa"]);

    // Another tenant's workspace of the same image has a mount of its own: no tenant sees
    // another's reads in a shared page cache.
    let bobs = id("sbob");
    host.runtime
        .create(&warren_runtime::WorkspaceConfig {
            tenant: Some("bob".into()),
            ..warren_runtime::WorkspaceConfig::of_image(bobs.clone(), "base:1")
        })
        .unwrap();
    host.runtime.start(&bobs).unwrap();
    assert_eq!(image_mounts_of(host.data.path()).len(), 2);
    assert_eq!(host.sh("sbob", "cat /etc/debian_version").1, version);
    host.runtime.delete(&bobs).unwrap();
    host.wait_for(
        "the other tenant's mount ends",
        Duration::from_secs(10),
        || image_mounts_of(host.data.path()) == mounts,
    );
    // A workspace of no known tenant (recorded before tenants were) shares with nobody.
    let unknown = id("snone");
    host.runtime
        .create(&warren_runtime::WorkspaceConfig {
            tenant: None,
            ..warren_runtime::WorkspaceConfig::of_image(unknown.clone(), "base:1")
        })
        .unwrap();
    host.runtime.start(&unknown).unwrap();
    let with_own = image_mounts_of(host.data.path());
    assert_eq!(with_own.len(), 2, "{with_own:?}");
    assert!(
        with_own
            .iter()
            .any(|(_, cmdline)| cmdline.contains("--id-offset")),
        "{with_own:?}"
    );
    host.runtime.delete(&unknown).unwrap();

    // A mount nobody takes (its starter died before it held the lease) ends by itself and
    // leaves nothing; a data folder reached through a symlink is found as mountinfo names it.
    let link = host.data.path().with_extension("link");
    std::os::unix::fs::symlink(host.data.path(), &link).unwrap();
    let unheld = host.ok(&[
        "image",
        "share",
        "base:1",
        "--under",
        link.join("mounts").to_str().unwrap(),
        "--tenant",
        "nobody",
    ]);
    std::fs::remove_file(&link).unwrap();
    assert!(unheld.contains("shared mount at"), "{unheld}");
    assert_eq!(image_mounts_of(host.data.path()).len(), 2);
    host.wait_for("an unheld mount ends", Duration::from_secs(30), || {
        image_mounts_of(host.data.path()) == mounts
    });

    // Its server killed, the next start serves the image anew.
    let _ = Command::new("kill")
        .arg("-9")
        .arg(mounts[0].0.to_string())
        .status();
    host.wait_for("the killed mount is gone", Duration::from_secs(10), || {
        image_mounts_of(host.data.path()).is_empty()
    });
    // Its workspace's supervisor says so.
    let sb_log = host.data.path().join("runtime/workspaces/sb/shim.log");
    host.wait_for(
        "the supervisor logs the end",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&sb_log)
                .unwrap_or_default()
                .contains("the image's shared mount ended")
        },
    );
    assert!(
        !host
            .warren(&["runtime", "exec", "sb", "--", "cat", "/etc/debian_version"])
            .status
            .success()
    );
    host.ok(&["runtime", "start", "sa"]);
    assert_eq!(host.sh("sa", "cat /etc/motd").1, "mine\n");
    assert_eq!(image_mounts_of(host.data.path()).len(), 1);

    // The last one out ends the mount.
    for ws in ["sb", "sa"] {
        host.ok(&["runtime", "stop", ws]);
    }
    host.wait_for("the shared mount ends", Duration::from_secs(10), || {
        image_mounts_of(host.data.path()).is_empty()
    });
    let left: Vec<String> = warren_hostfs::mounts_under(&shared)
        .iter()
        .map(|m| m.display().to_string())
        .collect();
    assert_eq!(left, Vec::<String>::new());
    // Each mount removed its folder as it ended (the killed one's went at the next start).
    let generations: Vec<PathBuf> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .flat_map(|image| std::fs::read_dir(image.path()).unwrap().flatten())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path())
        .collect();
    assert_eq!(generations, Vec::<PathBuf>::new());
}

#[test]
fn memory_and_pids_limits_stop_at_the_workspace() {
    let host = Host::new(3);
    host.run_dir("lim-a", &["--memory", "64MiB", "--pids", "40"]);
    host.run_dir("lim-b", &[]);

    // 300 MB in one string: the OOM killer ends it inside the workspace only.
    let (status, _, _) = host.sh(
        "lim-a",
        "perl -e '$x = q(a) x (300 * 1024 * 1024); print length $x'",
    );
    assert_eq!(
        status.as_shell_code(),
        128 + libc::SIGKILL,
        "the hog is killed"
    );
    assert_eq!(host.sh("lim-a", "echo alive").1, "alive\n");

    // A fork bomb fills the pids limit and no more.
    let bomb = host
        .runtime
        .exec(
            &id("lim-a"),
            &ExecRequest {
                argv: vec!["bash".into(), "-c".into(), "b() { b | b & }; b".into()],
                ..Default::default()
            },
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let stats = host.runtime.stats(&id("lim-a")).unwrap();
    assert!(stats.pids <= 40, "{stats:?}");
    assert!(stats.pids >= 30, "the bomb reached the limit: {stats:?}");
    // The host and the other workspace keep working.
    assert!(Command::new("true").status().unwrap().success());
    assert_eq!(host.sh("lim-b", "echo fine").1, "fine\n");
    host.ok(&["runtime", "stop", "--time", "0", "lim-a"]);
    drop(bomb);
    host.ok(&["runtime", "rm", "lim-a"]);
    host.ok(&["runtime", "rm", "-f", "lim-b"]);
}

on_each_backend!(isolation: isolation_holds(4), isolation_holds_for_a_vm(6));

fn isolation(host: Host) {
    let vm = host.backend == Backend::Vm;
    host.run_dir("iso-a", &[]);
    host.run_dir("iso-b", &[]);
    let base = host.uid_base("iso-a");
    let b_addr = host.runtime.info(&id("iso-b")).unwrap().address;
    let expect_fail = |what: &str, script: &str| {
        let (status, out, err) = host.sh("iso-a", script);
        assert_ne!(
            status,
            ExitStatus::Code(0),
            "{what} must fail, but: {out}{err}"
        );
        err
    };

    // No host process is visible (user processes: a VM's kernel has threads of its own).
    let (_, out, _) = host.sh(
        "iso-a",
        "grep -l . /proc/[0-9]*/cmdline 2>/dev/null | wc -l",
    );
    assert!(out.trim().parse::<u32>().unwrap() < 10, "{out}");
    assert!(
        !host
            .sh("iso-a", &format!("ls /proc/{}", std::process::id()))
            .1
            .contains("status")
    );

    // Host sysctls and the host's hostname are out of reach.
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    host.sh(
        "iso-a",
        "echo mine > /proc/sys/kernel/hostname; hostname mine",
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        hostname
    );
    assert_eq!(
        host.sh("iso-a", "hostname").1,
        "mine\n",
        "the workspace has its own"
    );
    if vm {
        vm_isolation(&host, base);
    } else {
        container_isolation(&host, base);
    }

    // Another workspace: reachable by its own loopback and by the host, not by iso-a. Its
    // server reads a request to its end (the client's half-close) before it answers.
    let listen = "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => q(0.0.0.0:8000), Listen => 5, ReuseAddr => 1) or die $!; while ($c = $s->accept) { local $/; $d = <$c>; print $c qq(hello ) . length($d) . qq(\\n); close $c }'";
    let server = host
        .runtime
        .exec(
            &id("iso-b"),
            &ExecRequest {
                argv: vec!["sh".into(), "-c".into(), listen.into()],
                ..Default::default()
            },
        )
        .unwrap();
    let connect = |target: &str| {
        format!(
            "timeout 3 perl -MIO::Socket::INET -e '$c = IO::Socket::INET->new(PeerAddr => q({target}), Timeout => 2) or die qq(refused: $!); print $c qq(ping); $c->shutdown(1); print <$c>'"
        )
    };
    host.wait_for(
        "the server in iso-b never came up",
        Duration::from_secs(10),
        || host.sh("iso-b", &connect("127.0.0.1:8000")).1 == "hello 4\n",
    );
    let ask = |mut conn: std::net::TcpStream, request: &str| {
        conn.write_all(request.as_bytes()).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    };
    assert_eq!(
        ask(
            std::net::TcpStream::connect((b_addr, 8000)).unwrap(),
            "ping"
        ),
        "hello 4\n"
    );
    let forwarded = host
        .runtime
        .connect(&id("iso-b"), "127.0.0.1:8000".parse().unwrap())
        .unwrap();
    assert_eq!(
        ask(forwarded, "a half-closed request"),
        "hello 21\n",
        "connect() reaches the workspace's port and passes on a half-close"
    );
    expect_fail(
        "reaching another workspace",
        &connect(&format!("{b_addr}:8000")),
    );
    drop(server);

    // A port on the host (as Warren's API would listen), by any of the host's addresses.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let gateway = "10.88.0.1";
    assert!(
        std::net::TcpStream::connect((gateway, port)).is_ok(),
        "the host reaches it"
    );
    expect_fail(
        "reaching a host port",
        &connect(&format!("{gateway}:{port}")),
    );

    for ws in ["iso-a", "iso-b"] {
        host.ok(&["runtime", "rm", "-f", ws]);
    }
}

/// What only a container must refuse: its kernel is the host's.
fn container_isolation(host: &Host, base: u32) {
    let expect_fail = |what: &str, script: &str| {
        let (status, out, err) = host.sh("iso-a", script);
        assert_ne!(
            status,
            ExitStatus::Code(0),
            "{what} must fail, but: {out}{err}"
        );
        err
    };
    expect_fail("a host sysctl", "echo 1 > /proc/sys/vm/drop_caches");
    expect_fail("a host sysctl", "echo 5 > /proc/sys/kernel/panic");

    // No block device, no kernel module.
    expect_fail("mknod of a block device", "mknod /tmp/disk b 8 0");
    expect_fail("mounting a block device", "mount -t ext4 /dev/vda /mnt");
    // finit_module(2): refused by the workspace's seccomp filter before the kernel looks (which
    // would refuse it for want of CAP_SYS_MODULE in the host's user namespace, or answer
    // ENOSYS on a kernel built without modules, as this test machine's).
    let (status, out, _) = host.sh(
        "iso-a",
        "perl -e '$p = q(); syscall(313, 0, $p, 0) == -1 or exit 0; print $!; exit 1'",
    );
    assert_eq!(status, ExitStatus::Code(1), "finit_module must fail");
    assert_eq!(out, "Operation not permitted");

    // A setuid-root binary started by an unprivileged user is root only inside.
    host.sh(
        "iso-a",
        "cp /bin/sleep /tmp/suid-sleep && chmod 4755 /tmp/suid-sleep",
    );
    let sleeper = host
        .runtime
        .exec(
            &id("iso-a"),
            &ExecRequest {
                argv: vec!["/tmp/suid-sleep".into(), "30".into()],
                user: Some("nobody".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let euid = loop {
        let found = euid_of_command("suid-sleep");
        if let Some(e) = found {
            break e;
        }
        assert!(Instant::now() < deadline, "suid-sleep never showed up");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        euid, base,
        "setuid root inside is the workspace's base uid outside"
    );
    sleeper.process.signal(libc::SIGKILL).unwrap();

    // Cgroup limits are not the workspace's to change.
    expect_fail(
        "raising its memory limit",
        "echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes",
    );
    expect_fail(
        "raising its pids limit",
        "echo max > /sys/fs/cgroup/pids/pids.max",
    );
}

/// A VM has its own kernel: what a container must refuse is the guest's own business there,
/// and on the host the VM is only unprivileged processes.
fn vm_isolation(host: &Host, base: u32) {
    let info = host.runtime.info(&id("iso-a")).unwrap();
    let qemu = info.init_pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(
        uids, [base; 4],
        "QEMU runs as the workspace's root on the host"
    );
    // So do its device daemons: virtiofsd (root only in a user namespace that maps the guest's
    // ids onto the workspace's range) and the vsock device.
    let vm_dir = host.data.path().join("runtime/workspaces/iso-a/vm");
    let mut daemons = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(vm_dir.to_str().unwrap()) || cmdline.contains("qemu-system") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        let name = cmdline
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(field("Uid:"), [base; 4], "{cmdline}");
        assert_eq!(field("Gid:"), [base; 4], "{cmdline}");
        daemons.push(name);
    }
    daemons.sort();
    daemons.dedup();
    assert_eq!(daemons, ["vhost-device-vsock", "virtiofsd"], "{vm_dir:?}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let (status, out, err) = host.sh(
        "iso-a",
        "uname -r; mknod /dev/wdisk b 8 0 && echo made; echo 3 > /proc/sys/vm/drop_caches && echo dropped",
    );
    assert_eq!(status, ExitStatus::Code(0), "{out}{err}");
    assert_ne!(
        out.lines().next().unwrap(),
        host_kernel.trim(),
        "its own kernel"
    );
    assert!(
        out.contains("made\ndropped"),
        "root of its own kernel: {out}"
    );
    // The block devices it sees are its own: its scratch disk, not the host's.
    let (_, out, _) = host.sh("iso-a", "cat /proc/partitions");
    assert!(out.contains("vda") && !out.contains("sda"), "{out}");
}

/// The effective uid (on the host) of the process running `comm`.
fn euid_of_command(comm: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir: PathBuf = entry.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == comm) {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok());
        }
    }
    None
}

#[test]
fn bad_requests_get_clear_errors() {
    let host = Host::new(5);
    let err = |args: &[&str]| {
        let out = host.warren(args);
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        err(&["runtime", "run", "Bad_Name", "--dir", "/"]).contains("not a valid workspace name")
    );
    assert!(err(&["runtime", "run", "nodir", "--dir", "/nonexistent"]).contains("is not a folder"));
    assert!(err(&["runtime", "exec", "ghost", "--", "true"]).contains("no workspace `ghost`"));
    assert!(
        err(&["runtime", "run", "m", "--dir", "/", "--memory", "lots"]).contains("is not a size")
    );
    host.run_dir("dup", &[]);
    assert!(err(&["runtime", "run", "dup", "--dir", "/"]).contains("exists already"));
    let e = host
        .start("dup", &["/no/such/program"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    let e = host
        .runtime
        .exec(
            &id("dup"),
            &ExecRequest {
                argv: vec!["true".into()],
                user: Some("nosuchuser".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no user `nosuchuser`"), "{e}");
    host.ok(&["runtime", "rm", "-f", "dup"]);
}

#[test]
fn outbound_traffic_leaves_through_the_hosts_address() {
    let host = Host::new(6);
    // An "internet" next door: a namespace behind a veth, with a server that reports who called.
    let upstream = format!("warren-up-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["netns", "add", &upstream]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(upstream.clone());
    ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "far", "netns", &upstream,
    ]);
    ip(&["addr", "add", "192.0.2.1/24", "dev", "uplink"]);
    ip(&["link", "set", "uplink", "up"]);
    for args in [
        &["addr", "add", "192.0.2.2/24", "dev", "far"][..],
        &["link", "set", "far", "up"],
        &["link", "set", "lo", "up"],
    ] {
        ip(&[&["-n", upstream.as_str()][..], args].concat());
    }
    let server = Command::new("ip")
        .args(["netns", "exec", &upstream, "perl", "-MIO::Socket::INET", "-e"])
        .arg("$s = IO::Socket::INET->new(LocalAddr => q(0.0.0.0:8080), Listen => 1, ReuseAddr => 1) or die $!; $c = $s->accept; print $c $c->peerhost, qq(\\n)")
        .spawn()
        .unwrap();
    host.run_dir("out", &[]);
    let fetch = "perl -MIO::Socket::INET -e 'for (1..50) { $c = IO::Socket::INET->new(PeerAddr => q(192.0.2.2:8080), Timeout => 2) and last; select(undef, undef, undef, 0.1) } $c or die qq(no way out: $!); print <$c>'";
    let (status, out, err) = host.sh("out", fetch);
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    assert_eq!(out, "192.0.2.1\n", "masqueraded behind the host's address");
    let mut server = server;
    let _ = server.wait();
    host.ok(&["runtime", "rm", "-f", "out"]);
}

/// Host processes whose cgroup (memory hierarchy, v1 or v2 path) lies under the workspace's.
fn processes_of(ws: &str) -> Vec<(u32, u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        if !cgroup.lines().any(|l| l.contains(&format!("/warren/{ws}"))) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        found.push((pid, uid, comm.trim().to_owned()));
    }
    found
}

#[test]
fn docker_runs_inside_as_the_workspaces_unprivileged_users() {
    let host = Host::new(7);
    let base = docker_runs_a_container(&host);
    let (status, _, err) = host.sh("dind", "docker run -d --name nap deb:1 sleep 300");
    assert_eq!(status, ExitStatus::Code(0), "{err}");

    // On the host, every process of the workspace — dockerd, containerd, the nested
    // container's — runs under the workspace's range, never as a host user.
    let deadline = Instant::now() + Duration::from_secs(20);
    let processes = loop {
        let p = processes_of("dind");
        if p.iter().any(|(_, _, comm)| comm == "sleep") {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the nested container's sleep never showed: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for wanted in ["dockerd", "containerd", "sleep"] {
        assert!(
            processes.iter().any(|(_, _, c)| c == wanted),
            "{wanted} in {processes:?}"
        );
    }
    for (pid, uid, comm) in &processes {
        assert!(
            (base..base + 65536).contains(uid),
            "{comm} (pid {pid}) runs as host uid {uid}, outside {base}..{}",
            base + 65536
        );
    }
    host.ok(&["runtime", "rm", "-f", "dind"]);
    assert!(processes_of("dind").is_empty());
}

/// Starts a workspace `dind` from an image with docker.io, starts dockerd in it, imports an
/// image from a tar stream (no registry) and runs a container of it; returns the workspace's
/// uid base.
fn docker_runs_a_container(host: &Host) -> u32 {
    let rootfs = debian_rootfs(DebianRootfs::Docker);
    // Under TCG on a loaded host, a second vCPU starved of host time has left the guest kernel
    // spinning on a cross-CPU call (a soft lockup in runc): one vCPU has nothing to wait for.
    let cpus: &[&str] = match host.backend {
        Backend::Vm => &["--cpus", "1"],
        Backend::Container => &[],
    };
    host.run_dir_with("dind", &rootfs, cpus);
    let base = host.uid_base("dind");
    // containerd first, then dockerd on it: dockerd starting its own gives it 60 s, which a
    // VM under TCG on a loaded host can overrun.
    let daemon = |start: &str, ready: &str, log: &str| {
        let (status, _, err) = host.sh("dind", &format!("{start} > {log} 2>&1 &"));
        assert_eq!(status, ExitStatus::Code(0), "{err}");
        let deadline = Instant::now() + host.patience(Duration::from_secs(40));
        while host.sh("dind", ready).0 != ExitStatus::Code(0) {
            if Instant::now() > deadline {
                panic!(
                    "{start} never came up: {}",
                    host.sh("dind", &format!("tail -20 {log}")).1
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    daemon(
        "containerd",
        "test -S /run/containerd/containerd.sock",
        "/var/log/containerd.log",
    );
    daemon(
        "dockerd --containerd=/run/containerd/containerd.sock",
        "docker info >/dev/null 2>&1",
        "/var/log/dockerd.log",
    );

    // An image imported from a tar stream (no registry needed), then a container from it.
    let minbase = debian_rootfs(DebianRootfs::Minbase);
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&minbase)
        .args(["-c", "."])
        .output()
        .unwrap()
        .stdout;
    let (status, digest) = host.feed("dind", &["docker", "import", "-", "deb:1"], tar);
    assert_eq!(status, ExitStatus::Code(0));
    assert!(digest.starts_with("sha256:"), "{digest}");

    // Bounded, so a stuck guest fails the test instead of hanging it.
    let (status, out, err) = host.sh(
        "dind",
        "timeout 300 docker run --rm deb:1 sh -c 'id -u; echo ran in docker'",
    );
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "{err}\n{}",
        host.sh("dind", "tail -20 /var/log/dockerd.log").1
    );
    assert_eq!(out, "0\nran in docker\n");
    base
}

#[test]
fn docker_runs_inside_a_vm() {
    let host = Host::with_backend(8, Backend::Vm);
    docker_runs_a_container(&host);
    // Its storage is the VM's scratch disk (overlay2 on ext4), not the virtiofs tree.
    let (_, out, _) = host.sh(
        "dind",
        "docker info --format '{{.Driver}}'; stat -f -c %T /var/lib/docker",
    );
    assert_eq!(out, "overlay2\next2/ext3\n");
    host.ok(&["runtime", "rm", "-f", "dind"]);
}
