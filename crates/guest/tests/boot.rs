//! The guest init boots under QEMU (TCG here: this machine's nested KVM cannot run a stock
//! kernel) from an initramfs holding only it and its modules, loads the virtio, vsock,
//! virtiofs and balloon modules, and powers the VM off. (The vsock device itself needs
//! vhost-device-vsock: it comes with the guest agent.)
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_testkit::{guest_kernel, initramfs, require_program};

/// `warren-guest` built static (`+crt-static` on the gnu target), as a VM's initramfs needs.
fn static_guest() -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/warren/target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "warren-guest",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .status()
        .unwrap();
    assert!(status.success(), "cannot build the static guest");
    target_dir.join("x86_64-unknown-linux-gnu/release/warren-guest")
}

/// QEMU under TCG booting the kernel and initramfs, its serial console on stdout; `append`
/// goes on the kernel command line.
fn qemu(kernel: &warren_testkit::GuestKernel, initrd: &std::path::Path, append: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-m", "512", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 rdinit=/init panic=-1 quiet {append}"
        ));
    cmd
}

/// The initramfs of the guest and its modules, written under `dir`.
fn boot_files(
    guest: &std::path::Path,
    kernel: &warren_testkit::GuestKernel,
    dir: &std::path::Path,
) -> PathBuf {
    let mut files = vec![("init", 0o755, std::fs::read(guest).unwrap())];
    let mut list = String::new();
    let names: Vec<String> = kernel
        .modules
        .iter()
        .map(|m| format!("lib/modules/{}", m.file_name().unwrap().to_string_lossy()))
        .collect();
    for (m, name) in kernel.modules.iter().zip(&names) {
        files.push((name.as_str(), 0o644, std::fs::read(m).unwrap()));
        list.push_str(&format!("/{name}\n"));
    }
    files.push(("lib/warren/modules", 0o644, list.into_bytes()));
    let initrd = dir.join("initramfs");
    std::fs::write(&initrd, initramfs(&files)).unwrap();
    initrd
}

#[test]
fn the_guest_init_boots_and_loads_its_modules() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let guest = static_guest();
    let file = String::from_utf8_lossy(&Command::new("file").arg(&guest).output().unwrap().stdout)
        .into_owned();
    assert!(
        file.contains("statically linked") || file.contains("static-pie"),
        "{file}"
    );
    let kernel = guest_kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = boot_files(&guest, &kernel, dir.path());

    let started = Instant::now();
    let mut qemu = qemu(&kernel, &initrd, "warren.poweroff=1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = qemu.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            panic!("the VM did not power off in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    out.push_str(&reader.join().unwrap());
    let mut err = String::new();
    let _ = qemu.stderr.take().unwrap().read_to_string(&mut err);
    eprintln!("booted and powered off in {:?}", started.elapsed());
    for line in out.lines().filter(|l| l.contains("warren-guest")) {
        eprintln!("  {line}");
    }
    assert!(status.success(), "{status}: {out}\n{err}");
    assert!(out.contains("warren-guest: ready"), "{out}\n{err}");
    let wanted = format!("ready: {} modules", kernel.modules.len());
    assert!(out.contains(&wanted), "every module loads: {out}");
    assert!(
        !out.contains("warren-guest: module"),
        "a module failed: {out}"
    );
    assert!(out.contains("powering off"), "{out}");
}

#[test]
fn the_host_reaches_the_guest_over_vsock_and_shuts_it_down() {
    use std::io::{BufRead, Write};
    require_program("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        Command::new("sh")
            .args(["-c", "command -v vhost-device-vsock"])
            .status()
            .unwrap()
            .success(),
        "vhost-device-vsock is missing: `cargo install --locked vhost-device-vsock` (./dev deps does)"
    );
    let guest = static_guest();
    let kernel = guest_kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = boot_files(&guest, &kernel, dir.path());
    let control = dir.path().join("vhost.sock");
    let uds = dir.path().join("vsock.sock");
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _device = Killed(
        Command::new("vhost-device-vsock")
            .args(["--guest-cid", "3"])
            .arg("--socket")
            .arg(&control)
            .arg("--uds-path")
            .arg(&uds)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(
            Instant::now() < deadline,
            "vhost-device-vsock made no socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut qemu = Killed(
        qemu(&kernel, &initrd, "")
            // vhost-user devices need the guest's memory shared with their process.
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vsock,path={}", control.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = qemu.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut console = String::new();
    while !console.contains("listening on vsock port 1024") {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the guest never listened: {console}"));
        console.push_str(&line);
        console.push('\n');
    }
    // The host side of vhost-device-vsock: `CONNECT <port>`, then a byte stream.
    let stream = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    writeln!(writer, "CONNECT 1024").unwrap();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line}");
    writeln!(writer, "ping").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "pong\n");
    writeln!(writer, "poweroff").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "powering off\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the VM did not power off");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}
