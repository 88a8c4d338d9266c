//! The guest init boots under QEMU (TCG, which every host can run; which accelerator a host's
//! VMs get is decided by the runtime and tested with it) from the initramfs the runtime makes (the guest as `/init`, its modules, its
//! settings), loads every module either kind of VM boots with (virtio, vsock, virtiofs, 9p,
//! balloon, ext4), and powers the VM off. The kernel boots as the runtime boots it (unpacked
//! to an ELF when it can).
//! Everything past boot (the agent, the workspace's root) is tested through the runtime
//! (`crates/cli/tests/runtime.rs`, the VM backend).
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_runtime::vm::kernel::{
    BOOT_MODULES, GuestKernel, IN_QEMU_MODULES, VHOST_USER_MODULES, guest_initramfs, module_index,
};
use warren_runtime::vm::{Accel, boot_probe};
use warren_testkit::{guest_kernel, require_program, static_guest};

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
    let kernel = GuestKernel::find(&guest_kernel()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let index = module_index(&kernel, &dir.path().join("modules.index")).unwrap();
    let every: Vec<&str> = [&BOOT_MODULES[..], &VHOST_USER_MODULES, &IN_QEMU_MODULES].concat();
    let modules = kernel.module_files(&index, &every).unwrap();
    let initrd = dir.path().join("initrd.img");
    std::fs::write(
        &initrd,
        guest_initramfs(&guest, &modules, None, &Default::default()).unwrap(),
    )
    .unwrap();

    let started = Instant::now();
    let image = kernel.boot_image(dir.path()).unwrap();
    let mut qemu = boot_probe(&image, &initrd, Accel::Tcg)
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
    let wanted = format!("ready: {} modules", modules.len());
    assert!(out.contains(&wanted), "every module loads: {out}");
    assert!(
        !out.contains("warren-guest: module"),
        "a module failed: {out}"
    );
    assert!(out.contains("powering off"), "{out}");
}
