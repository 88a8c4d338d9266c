//! A workspace's cgroups. libcontainer creates them and applies the limits (through youki's
//! `libcgroups`, which reads the host's layout — v1, v2 or hybrid — at start); this module adds
//! what Warren needs around that: exec'd processes join them, their counters become `Stats`, the
//! workspace's root is given its own subtree (so Docker inside can make cgroups), and delete
//! removes every directory, including those made inside.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use libcgroups::common::{
    AnyCgroupManager, CgroupConfig, CgroupManager, CgroupSetup, FreezerState,
    create_cgroup_manager, get_cgroup_setup,
};
use libcontainer::oci_spec::runtime::{
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
};
use nix::unistd::Pid;

use crate::Error;
use crate::record::WorkspaceRecord;

fn manager(rec: &WorkspaceRecord) -> Result<AnyCgroupManager, Error> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: rec.cgroup_path(),
        systemd_cgroup: false,
        container_name: rec.container_id(),
    })
    .map_err(|e| Error::Cgroup {
        id: rec.config.id.to_string(),
        action: "open them".into(),
        cause: e.to_string(),
    })
}

/// The devices a workspace may open: the standard set (`null`, `zero`, `full`, `random`,
/// `urandom`, `tty`, `console`, `ptmx`, the pseudo-terminals) and the two its spec creates for a
/// nested engine, FUSE and TUN; and `mknod` of any (a nested engine makes its own `/dev`).
/// Every other device node — one in an image, or one a tenant's root bind-mounts in — cannot
/// be opened, whatever its mode. (libcgroups adds the standard set again; the list is whole
/// here because the unified hierarchy's filter below is built from it alone.)
pub(crate) fn device_rules() -> Vec<LinuxDeviceCgroup> {
    use LinuxDeviceType::{A, B, C};
    let rule = |allow: bool,
                typ: LinuxDeviceType,
                major: Option<i64>,
                minor: Option<i64>,
                access: &str| {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .access(access);
        if let Some(major) = major {
            b = b.major(major);
        }
        if let Some(minor) = minor {
            b = b.minor(minor);
        }
        b.build().expect("a device rule has every field it needs")
    };
    let mut rules = vec![
        rule(false, A, None, None, "rwm"),
        rule(true, C, None, None, "m"),
        rule(true, B, None, None, "m"),
        rule(true, C, Some(136), None, "rwm"),
    ];
    let fuse_and_tun = [(10, 229), (10, 200)];
    for (major, minor) in warren_hostfs::STANDARD_CHAR_DEVICES
        .into_iter()
        .chain(fuse_and_tun)
    {
        // Device numbers are small: they fit the rule's signed fields.
        rules.push(rule(true, C, Some(major as i64), Some(minor as i64), "rwm"));
    }
    rules
}

/// Moves `pid` into every cgroup of the workspace.
pub(crate) fn add(rec: &WorkspaceRecord, pid: i32) -> Result<(), Error> {
    manager(rec)?
        .add_task(Pid::from_raw(pid))
        .map_err(|e| Error::Cgroup {
            id: rec.config.id.to_string(),
            action: format!("move process {pid} in"),
            cause: e.to_string(),
        })?;
    fence_unified(rec, pid, false)
}

/// On a hybrid host (v1 controllers, plus a unified hierarchy with none) libcontainer keeps a
/// workspace in the v1 hierarchies, where the `devices` controller holds [`device_rules`]. The
/// same rules are also loaded as an eBPF program on the workspace's directory in the unified
/// hierarchy, as libcontainer does on a cgroup-v2 host, and `pid` joins it: two layers, and the
/// eBPF one is the one cgroup-v2 hosts rely on. (`BPF_F_ALLOW_MULTI`: a nested engine's own
/// programs below can only refuse more.) The program is (re)loaded when `load` is set (a
/// start) or the directory is new.
pub(crate) fn fence_unified(rec: &WorkspaceRecord, pid: i32, load: bool) -> Result<(), Error> {
    let Some(root) = hybrid_unified_root() else {
        return Ok(());
    };
    let dir = root.join(relative(rec));
    if load || !dir.is_dir() {
        std::fs::create_dir_all(&dir).map_err(Error::io("cannot create the cgroup", &dir))?;
        load_device_filter(&dir).map_err(|cause| Error::Cgroup {
            id: rec.config.id.to_string(),
            action: format!("load the device filter into {}", dir.display()),
            cause,
        })?;
    }
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(Error::io("cannot write", &procs))
}

/// Where the unified hierarchy is mounted, on a hybrid host only; read once (a host's cgroup
/// layout does not change under a running process), not at every exec.
fn hybrid_unified_root() -> Option<&'static Path> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        if !matches!(get_cgroup_setup(), Ok(CgroupSetup::Hybrid)) {
            return None;
        }
        hierarchies()
            .into_iter()
            .find_map(|(fstype, root)| (fstype == "cgroup2").then_some(root))
    })
    .as_deref()
}

/// Attaches an eBPF program made of [`device_rules`] to the cgroup `dir`, and detaches the
/// ones it replaces: libcgroups' own `apply_devices`, but where raising `RLIMIT_MEMLOCK` (which
/// needs `CAP_SYS_RESOURCE`) may fail: since Linux 5.11 eBPF memory is charged to memory
/// cgroups, not to that limit, so a host without the capability still loads it; before 5.11
/// the raised limit is what lets many workspaces have one.
fn load_device_filter(dir: &Path) -> Result<(), String> {
    use libcgroups::v2::devices::{bpf::prog, emulator::Emulator, program::Program};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let mut emulator = Emulator::with_default_allow(false);
    emulator.add_rules(&device_rules());
    let program =
        Program::from_rules(&emulator.rules, emulator.default_allow).map_err(|e| e.to_string())?;
    if charged_to_memlock() {
        let _ = prog::bump_memlock_rlimit();
    }
    let cgroup = std::fs::File::open(dir).map_err(|e| e.to_string())?;
    let old: Vec<OwnedFd> = prog::query(cgroup.as_raw_fd())
        .map_err(|e| e.to_string())?
        .into_iter()
        // SAFETY: `query` opened each descriptor for the caller; each is owned once, here.
        .map(|info| unsafe { OwnedFd::from_raw_fd(info.fd) })
        .collect();
    // SAFETY: `load` returns a new descriptor of its own, or an error. (libbpf reads the
    // licence as a C string: hence the NUL.)
    let loaded = unsafe {
        OwnedFd::from_raw_fd(
            prog::load("Apache\0", program.bytecodes()).map_err(|e| e.to_string())?,
        )
    };
    prog::attach(loaded.as_raw_fd(), cgroup.as_raw_fd()).map_err(|e| e.to_string())?;
    for fd in &old {
        prog::detach2(fd.as_raw_fd(), cgroup.as_raw_fd()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether this kernel charges eBPF programs to `RLIMIT_MEMLOCK` (before 5.11). Raising it
/// only then keeps the limit of what the runtime starts (workspace processes among them) as
/// the host set it.
fn charged_to_memlock() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) < (5, 11)
}

/// Freezes every process of the workspace (its nested cgroups too), or thaws them: frozen, none
/// runs until thawed, so its files hold still while the host reads them. Returns once the
/// kernel says all are frozen.
pub(crate) fn freeze(rec: &WorkspaceRecord, frozen: bool) -> Result<(), Error> {
    let state = if frozen {
        FreezerState::Frozen
    } else {
        FreezerState::Thawed
    };
    manager(rec)?.freeze(state).map_err(|e| Error::Cgroup {
        id: rec.config.id.to_string(),
        action: if frozen { "freeze them" } else { "thaw them" }.into(),
        cause: e.to_string(),
    })
}

/// cpu, memory and pids counters.
pub(crate) fn stats(rec: &WorkspaceRecord) -> Result<crate::Stats, Error> {
    let s = manager(rec)?.stats().map_err(|e| Error::Cgroup {
        id: rec.config.id.to_string(),
        action: "read the counters".into(),
        cause: e.to_string(),
    })?;
    let limit = |l: u64| (l != 0 && l < i64::MAX as u64 / 2).then_some(l);
    Ok(crate::Stats {
        cpu_ns: s.cpu.usage.usage_total,
        memory_bytes: s.memory.memory.usage,
        memory_limit: limit(s.memory.memory.limit),
        pids: s.pids.current,
        pids_limit: limit(s.pids.limit),
        disk_bytes: 0,
        vm: None,
    })
}

fn relative(rec: &WorkspaceRecord) -> PathBuf {
    let path = rec.cgroup_path();
    path.strip_prefix("/").unwrap_or(&path).to_path_buf()
}

/// Every mounted cgroup hierarchy: its type (`cgroup`, `cgroup2`) and where it is mounted.
fn hierarchies() -> Vec<(String, PathBuf)> {
    crate::sys::mounts()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| (m.fstype, m.mount_point))
        .collect()
}

/// The workspace's cgroup directory in every mounted hierarchy (v1 controllers, v2 unified).
pub(crate) fn dirs(rec: &WorkspaceRecord) -> Vec<PathBuf> {
    let relative = relative(rec);
    let mut found = Vec::new();
    for (_, root) in hierarchies() {
        let dir = root.join(&relative);
        if dir.is_dir() && !found.contains(&dir) {
            found.push(dir);
        }
    }
    found
}

/// Every process in the workspace's cgroups, nested cgroups included (a tenant cannot move a
/// process out of its subtree).
pub(crate) fn processes(rec: &WorkspaceRecord) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = dirs(rec);
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Hands the workspace's cgroups to its root (the files a delegated subtree needs), so a nested
/// engine can create and limit its own children. Limits set on these directories stay out of
/// reach: the limit files of the directory itself are not given away.
pub(crate) fn delegate(rec: &WorkspaceRecord) -> Result<(), Error> {
    let owner = Some(rec.uid_base);
    for dir in dirs(rec) {
        chown(&dir, owner, owner).map_err(Error::io("cannot delegate the cgroup", &dir))?;
        for file in [
            "cgroup.procs",
            "tasks",
            "cgroup.subtree_control",
            "cgroup.threads",
        ] {
            let path = dir.join(file);
            if path.exists() {
                chown(&path, owner, owner).map_err(Error::io("cannot delegate", &path))?;
            }
        }
    }
    Ok(())
}

/// Removes the workspace's cgroups, children first; returns those that remain.
pub(crate) fn remove(rec: &WorkspaceRecord) -> Vec<String> {
    if let Ok(m) = manager(rec) {
        let _ = m.remove();
    }
    let mut failed = Vec::new();
    for dir in dirs(rec) {
        if let Err(e) = remove_tree(&dir) {
            failed.push(format!("cgroup {} ({e})", dir.display()));
        }
    }
    failed
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}
