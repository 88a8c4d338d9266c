//! `warren-guest`: PID 1 of a VM workspace, built as a static binary
//! (`-C target-feature=+crt-static`) so that it runs from an initramfs with nothing else in it.
//!
//! What it does so far: mounts `/proc`, `/sys` and `/dev`, loads the kernel modules listed in
//! `/lib/warren/modules` (in order: the virtio transport, vsock, virtiofs, balloon, ...), says
//! on the console that the guest is up, and answers the host on vsock port [`CONTROL_PORT`]: a
//! line `ping` gets `pong`, a line `poweroff` shuts the VM down cleanly. It powers off at once
//! when the kernel command line asks (`warren.poweroff=1`, for boot tests). The guest agent
//! proper (exec, pty, connect, stats), the workspace's root from virtiofs and networking come
//! next (the VM issue).

use std::ffi::CString;
use std::io::Write;
use std::time::Instant;

use nix::mount::{MsFlags, mount};

/// The vsock port the host reaches the guest on.
const CONTROL_PORT: u32 = 1024;

/// Modules to load, one path per line, dependencies first.
const MODULE_LIST: &str = "/lib/warren/modules";

fn console(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "warren-guest: {line}");
    let _ = out.flush();
}

fn mount_fs(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
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

fn power_off() -> ! {
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

fn main() {
    let started = Instant::now();
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        if let Err(e) = mount_fs(source, target, fstype) {
            console(&e);
        }
    }
    let mut loaded = 0;
    if let Ok(list) = std::fs::read_to_string(MODULE_LIST) {
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
    let vsock = std::path::Path::new("/dev/vsock").exists();
    console(&format!(
        "vsock device: {}",
        if vsock { "present" } else { "absent" }
    ));
    if cmdline.split_whitespace().any(|w| w == "warren.poweroff=1") {
        console("powering off");
        power_off();
    }
    match control_listener() {
        Ok(listener) => {
            console(&format!("listening on vsock port {CONTROL_PORT}"));
            serve(listener);
        }
        Err(e) => console(&format!("no control channel: {e}")),
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn control_listener() -> Result<std::os::fd::OwnedFd, String> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, listen, socket,
    };
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("vsock socket: {e}"))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(libc::VMADDR_CID_ANY, CONTROL_PORT),
    )
    .map_err(|e| format!("vsock bind: {e}"))?;
    listen(&fd, Backlog::new(16).map_err(|e| e.to_string())?)
        .map_err(|e| format!("vsock listen: {e}"))?;
    Ok(fd)
}

/// Answers the host's control connections, one line each way.
fn serve(listener: std::os::fd::OwnedFd) -> ! {
    use std::io::BufRead;
    loop {
        let conn = match nix::sys::socket::accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) {
            Ok(fd) => {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            }
            Err(e) => {
                console(&format!("vsock accept: {e}"));
                continue;
            }
        };
        std::thread::spawn(move || {
            let mut out = match conn.try_clone() {
                Ok(c) => c,
                Err(_) => return,
            };
            for line in std::io::BufReader::new(conn).lines().map_while(Result::ok) {
                match line.trim() {
                    "ping" => {
                        let _ = writeln!(out, "pong");
                    }
                    "poweroff" => {
                        let _ = writeln!(out, "powering off");
                        console("powering off (asked by the host)");
                        power_off();
                    }
                    other => {
                        let _ = writeln!(out, "unknown request `{other}`");
                    }
                }
            }
        });
    }
}
