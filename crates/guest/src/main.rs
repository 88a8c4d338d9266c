//! `warren-guest`: PID 1 of a VM workspace, built as a static binary
//! (`-C target-feature=+crt-static`) so that it runs from an initramfs with nothing else in it.
//!
//! Boot: mount `/proc`, `/sys`, `/dev`; load the modules listed in [`proto::MODULE_LIST`]
//! (virtio transport, vsock, virtiofs or 9p, balloon, net, block); read [`proto::GuestConfig`];
//! mount the workspace's tree from virtiofs (or 9p) and make it the root (its scratch disk at
//! `/var/lib/docker`, `/etc/resolv.conf`, `hosts` and `hostname` bound over from the config);
//! configure `eth0`; then serve the host on vsock port [`proto::AGENT_PORT`], or on a TCP port
//! of `eth0` behind a token when the config says so (`agent.rs`).
//! With `warren.poweroff=1` on the kernel command line it powers off right after the modules
//! (boot tests).

mod agent;
mod net;

use std::ffi::CString;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use nix::mount::{MsFlags, mount};
use warren_guest::proto::{self, GuestConfig, RootFs};

fn console(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "warren-guest: {line}");
    let _ = out.flush();
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| format!("cannot mount {fstype} at {target}: {e}"))
}

/// Loads one module file (`finit_module`); one already loaded is fine.
fn load_module(path: &str) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let params = CString::default();
    // SAFETY: the fd is open for the call's duration and the parameters are a valid C string.
    let done = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            params.as_ptr(),
            0,
        )
    };
    if done == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(format!("{path}: {err}"))
    }
}

/// Syncs and powers the VM off; never returns.
pub(crate) fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Where the guest's own modprobe and its module index live in the workspace's root.
const RUN_MODPROBE: &str = "/run/warren/modprobe";
const RUN_INDEX: &str = "/run/warren/modules.index";

/// `modprobe [-q] [--] NAME`: what the kernel runs to load a module it needs.
fn modprobe(args: &[String]) -> i32 {
    let quiet = args.iter().any(|a| a == "-q" || a == "--quiet");
    let Some(wanted) = args.iter().skip(1).find(|a| !a.starts_with('-')) else {
        return 1;
    };
    let index = warren_guest::modules::Index::parse(
        &std::fs::read_to_string(RUN_INDEX).unwrap_or_default(),
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let Some(name) = index.resolve(wanted) else {
        if !quiet {
            let _ = writeln!(
                std::io::stderr(),
                "modprobe: no module {wanted} for this kernel"
            );
        }
        return 1;
    };
    for path in index.load_order(&name) {
        if let Err(e) = load_module(&format!("/lib/modules/{}/{path}", release.trim())) {
            if !quiet {
                let _ = writeln!(std::io::stderr(), "modprobe: {e}");
            }
            return 1;
        }
    }
    0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args
        .first()
        .is_some_and(|a| a.rsplit('/').next() == Some("modprobe"))
    {
        std::process::exit(modprobe(&args));
    }
    let started = Instant::now();
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        if let Err(e) = mount_fs(source, target, fstype, nosuid, None) {
            console(&e);
        }
    }
    let mut loaded = 0;
    if let Ok(list) = std::fs::read_to_string(proto::MODULE_LIST) {
        for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match load_module(path) {
                Ok(()) => loaded += 1,
                Err(e) => console(&format!("module {e}")),
            }
        }
    }
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    console(&format!(
        "ready: {loaded} modules in {} ms, kernel uptime {} s",
        started.elapsed().as_millis(),
        uptime.split_whitespace().next().unwrap_or("?")
    ));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    console(&format!(
        "vsock device: {}",
        if Path::new("/dev/vsock").exists() {
            "present"
        } else {
            "absent"
        }
    ));
    if cmdline.split_whitespace().any(|w| w == "warren.poweroff=1") {
        console("powering off");
        power_off();
    }
    let config: GuestConfig = std::fs::read(proto::CONFIG_PATH)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Err(e) = enter_root(&config) {
        // Without its tree the workspace is useless: say why on the console and stop.
        console(&format!("cannot set up the workspace's root: {e}"));
        power_off();
    }
    if let Some(network) = &config.network
        && let Err(e) = net::configure(network)
    {
        console(&format!("network: {e}"));
    }
    if !config.hostname.is_empty() {
        // SAFETY: the pointer and length describe the hostname's bytes.
        let rc =
            unsafe { libc::sethostname(config.hostname.as_ptr().cast(), config.hostname.len()) };
        if rc < 0 {
            console(&format!("hostname: {}", std::io::Error::last_os_error()));
        }
    }
    let listening = match (&config.agent_tcp, &config.network) {
        (Some(tcp), Some(network)) => agent::listen_tcp(network.address, tcp.port).map(|l| {
            (
                l,
                format!("tcp {}:{}", network.address, tcp.port),
                Some(tcp.token.clone()),
            )
        }),
        (Some(_), None) => Err("the agent is to serve over TCP, but there is no network".into()),
        (None, _) => {
            agent::listen().map(|l| (l, format!("vsock port {}", proto::AGENT_PORT), None))
        }
    };
    match listening {
        Ok((listener, at, token)) => {
            console(&format!(
                "{} {at} after {} ms",
                proto::AGENT_READY,
                started.elapsed().as_millis()
            ));
            agent::serve(listener, token);
        }
        Err(e) => console(&format!("no agent: {e}")),
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Mounts the workspace's tree and makes it the root, with the kernel filesystems, the scratch
/// disk and the `/etc` files in it. Without a root tag the initramfs stays the root (tests).
fn enter_root(config: &GuestConfig) -> Result<(), String> {
    let Some(tag) = &config.root_tag else {
        return Ok(());
    };
    let new = "/newroot";
    match config.root_fs {
        RootFs::Virtiofs => mount_fs(tag, new, "virtiofs", MsFlags::empty(), None)?,
        // The guest's kernel checks permissions itself (`access=client`), as on a local disk;
        // only the guest writes the tree, so its page cache may keep everything (`loose`).
        RootFs::NineP => mount_fs(
            tag,
            new,
            "9p",
            MsFlags::empty(),
            Some("trans=virtio,version=9p2000.L,access=client,posixacl,cache=loose,msize=524288"),
        )?,
    }
    if let Some(device) = &config.scratch_device {
        let target = format!("{new}/var/lib/docker");
        mount_fs(device, &target, "ext4", MsFlags::empty(), Some("discard"))?;
    }
    // The /etc files live in a tmpfs, so nothing of them lands in the writable layer.
    let run = format!("{new}/run");
    mount_fs(
        "tmpfs",
        &run,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755"),
    )?;
    let files = format!("{run}/warren");
    std::fs::create_dir_all(&files).map_err(|e| format!("{files}: {e}"))?;
    for (name, content) in &config.etc {
        if name.contains('/') {
            continue;
        }
        let source = format!("{files}/{name}");
        std::fs::write(&source, content).map_err(|e| format!("{source}: {e}"))?;
        let target = format!("{new}/etc/{name}");
        if std::fs::symlink_metadata(&target).is_err() {
            std::fs::write(&target, "").map_err(|e| format!("{target}: {e}"))?;
        }
        mount(
            Some(source.as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("cannot bind {target}: {e}"))?;
    }
    // This binary doubles as the kernel's modprobe (modules on demand, from the index).
    if let Err(e) = std::fs::copy("/proc/self/exe", format!("{new}{RUN_MODPROBE}"))
        .and_then(|_| {
            std::fs::set_permissions(
                format!("{new}{RUN_MODPROBE}"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
        })
        .and_then(|()| std::fs::copy(proto::MODULE_INDEX, format!("{new}{RUN_INDEX}")))
    {
        console(&format!("no modules on demand: {e}"));
    }
    // Switch: the new root moves over `/`, and this process chroots into it (the initramfs's
    // files stay in memory; they are small).
    std::env::set_current_dir(new).map_err(|e| format!("chdir {new}: {e}"))?;
    for fs in ["/proc", "/sys", "/dev"] {
        let target = format!("{new}{fs}");
        let _ = std::fs::create_dir_all(&target);
        mount(
            Some(fs),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("cannot move {fs}: {e}"))?;
    }
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move the root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let _ = std::fs::write("/proc/sys/kernel/modprobe", RUN_MODPROBE);
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        nodev,
        Some("ptmxmode=0666,mode=620,gid=5"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    if let Err(e) = mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    ) {
        console(&e);
    }
    Ok(())
}
