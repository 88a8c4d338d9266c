//! The VM backend: a workspace as a QEMU virtual machine with its own kernel.
//!
//! The shim (`shim.rs`) mounts the workspace's tree exactly as for a container (lazy image or
//! folder, overlay with the workspace's writable layer), then, instead of a container, starts:
//! `virtiofsd` sharing that tree, `vhost-device-vsock` (there is no kernel vhost here), and
//! QEMU — each root only in a user namespace mapping the guest's ids onto the workspace's range
//! (vhost-device-vsock simply as that range's first uid), never root on the host — booting
//! Debian's kernel with an initramfs holding `warren-guest` (PID 1, see `crates/guest`). The
//! guest makes the virtiofs tree its root, mounts a sparse ext4 scratch disk at
//! `/var/lib/docker`, and serves exec, connect, agent-forwarding sockets and stats on vsock;
//! the host side of that is `client.rs`. Memory: `virtio-balloon` with free page reporting (the
//! guest returns freed pages; `page_reporting_order=0`, THP off in the guest). A VM whose
//! options allow KSM has no vhost-user daemon, whose shared memory KSM could not merge: private
//! RAM, its tree over 9p from QEMU itself, and its agent on the workspace's network.

pub(crate) mod client;
pub mod kernel;
pub(crate) mod qmp;

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use warren_guest::proto::{AGENT_TCP_PORT, AgentTcp, GuestConfig, GuestNetwork, RootFs};

use crate::record::{ID_RANGE, Layout, WorkspaceRecord};
use crate::{Error, VmOptions, spec, sys};

/// Where a host finds what VMs need. Unset fields come from the environment
/// (`WARREN_VM_KERNEL`, `WARREN_GUEST`, `WARREN_VM_ACCEL`) or the defaults: the kernel package
/// unpacked at `<data>/vm/kernel`, `warren-guest` beside the `warren` executable, and the
/// accelerator detected.
#[derive(Debug, Clone, Default)]
pub struct VmSettings {
    pub kernel: Option<PathBuf>,
    pub guest: Option<PathBuf>,
    pub accel: Option<Accel>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(Error::InvalidConfig(format!(
                "unknown VM accelerator `{other}` (kvm or tcg)"
            ))),
        }
    }
}

/// What a VM workspace's record holds beyond a container's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    /// The unpacked kernel package.
    pub kernel: PathBuf,
    pub guest: PathBuf,
    /// Forced by the settings; detected at start when absent.
    pub accel: Option<Accel>,
    /// Where the detected accelerator is remembered (the runtime's folder).
    pub runtime_root: PathBuf,
}

impl VmSettings {
    /// Resolves the settings for a new VM workspace, checking that the files exist.
    pub(crate) fn resolve(
        &self,
        data: &Path,
        helper: &Path,
        runtime_root: &Path,
    ) -> Result<VmRecord, Error> {
        let kernel = self
            .kernel
            .clone()
            .or_else(|| std::env::var_os("WARREN_VM_KERNEL").map(PathBuf::from))
            .unwrap_or_else(|| data.join("vm/kernel"));
        kernel::GuestKernel::find(&kernel)?;
        let guest = self
            .guest
            .clone()
            .or_else(|| std::env::var_os("WARREN_GUEST").map(PathBuf::from))
            .unwrap_or_else(|| helper.with_file_name("warren-guest"));
        if !guest.is_file() {
            return Err(Error::InvalidConfig(format!(
                "no guest agent at {} (build it with `./dev up`, or set WARREN_GUEST)",
                guest.display()
            )));
        }
        let accel = match (self.accel, std::env::var("WARREN_VM_ACCEL")) {
            (Some(a), _) => Some(a),
            (None, Ok(s)) if !s.is_empty() => Some(Accel::parse(&s)?),
            _ => None,
        };
        for (program, package) in [
            ("qemu-system-x86_64", "Debian's qemu-system-x86"),
            ("virtiofsd", "`cargo install --locked virtiofsd`"),
            (
                "vhost-device-vsock",
                "`cargo install --locked vhost-device-vsock`",
            ),
        ] {
            if which(program).is_none() {
                return Err(Error::InvalidConfig(format!(
                    "VM workspaces need {program} ({package}; `./dev deps` installs it)"
                )));
            }
        }
        Ok(VmRecord {
            kernel,
            guest,
            accel,
            runtime_root: runtime_root.to_path_buf(),
        })
    }
}

/// Where `program` is on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Files of a VM workspace, in `<workspace>/vm/` (owned by the workspace's root on the host,
/// which QEMU runs as).
pub(crate) struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub(crate) fn of(layout: &Layout) -> Self {
        Self {
            dir: layout.dir.join("vm"),
        }
    }
    pub(crate) fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    /// The sparse ext4 disk mounted at `/var/lib/docker`; kept across stop and start.
    pub(crate) fn scratch(&self) -> PathBuf {
        self.dir.join("scratch.img")
    }
    pub(crate) fn fs_socket(&self) -> PathBuf {
        self.dir.join("fs.sock")
    }
    pub(crate) fn vsock_device(&self) -> PathBuf {
        self.dir.join("vsock-device.sock")
    }
    /// `vhost-device-vsock`'s socket for the host (`CONNECT <port>`).
    pub(crate) fn vsock_agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// How this boot's agent is reached (JSON of [`client::AgentAddr`]), in the workspace's
    /// own folder, which only root enters: the TCP token is a secret.
    fn agent_addr_file(&self) -> PathBuf {
        self.dir.with_file_name("vm-agent.json")
    }
    pub(crate) fn agent_addr(&self) -> Result<client::AgentAddr, Error> {
        let path = self.agent_addr_file();
        let text = std::fs::read(&path).map_err(Error::io("cannot read", &path))?;
        serde_json::from_slice(&text).map_err(|cause| Error::Damaged { path, cause })
    }
    pub(crate) fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub(crate) fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// `kvm` or `tcg`, while it runs (beside `vm/`, where only root writes).
    pub(crate) fn accel(&self) -> PathBuf {
        self.dir.with_file_name("vm-accel")
    }

    /// How the running VM is accelerated.
    pub(crate) fn read_accel(&self) -> Option<String> {
        std::fs::read_to_string(self.accel())
            .ok()
            .map(|a| a.trim().to_owned())
    }
}

/// Size of a new scratch disk of a VM with no disk limit (sparse: it takes only what the guest
/// writes). With a limit, the scratch disk is that size.
const SCRATCH_BYTES: u64 = 64 << 30;

/// How long a guest may take to answer after QEMU starts (TCG on a busy host is slow).
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// A running VM's processes, owned by the shim.
pub(crate) struct RunningVm {
    pub qemu: Child,
    pub helpers: Vec<Child>,
    /// Process groups of helpers the shim reaped before the stop, and when: their leader is
    /// gone, other members (virtiofsd's sandboxed child) may not be yet.
    pub reaped_groups: Vec<(i32, Instant)>,
}

/// The memory a VM workspace gets: `limits.memory`, at least 256 MiB, in whole MiB.
pub(crate) fn memory_of(rec: &WorkspaceRecord) -> u64 {
    rec.config
        .limits
        .memory
        .unwrap_or(VmOptions::DEFAULT_MEMORY)
        .max(256 << 20)
        >> 20
        << 20
}

fn cpus_of(rec: &WorkspaceRecord) -> u32 {
    rec.config
        .limits
        .cpus
        .map(|c| c.ceil().clamp(1.0, 64.0) as u32)
        .unwrap_or(VmOptions::DEFAULT_CPUS)
}

/// The guest kernel's command line. Free page reporting hands back every freed page (order 0,
/// not just 2 MiB blocks), and without transparent huge pages the guest frees in pieces it can
/// report.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 rdinit=/init panic=-1 quiet page_reporting.page_reporting_order=0 transparent_hugepage=never";

/// The accelerator for this host: forced by the settings, else remembered, else found by
/// booting the guest kernel under KVM once (a nested KVM that cannot run a stock kernel fails
/// that test and gets TCG).
pub(crate) fn accel(vm: &VmRecord) -> Accel {
    let remembered = remembered_accel(&vm.runtime_root, &vm.kernel);
    let found = choose_accel(vm.accel, remembered, || kvm_boots(vm));
    if vm.accel.is_none() && remembered.is_none() {
        tracing::info!(
            accel = found.as_str(),
            "VM accelerator chosen for this host"
        );
        let _ = std::fs::write(
            vm.runtime_root.join(ACCEL_FILE),
            format!("{}\n{}\n", vm.kernel.display(), found.as_str()),
        );
    }
    found
}

/// Where a runtime remembers the accelerator it found, and for which kernel.
const ACCEL_FILE: &str = "vm-accel";

/// The accelerator a runtime (its folder `runtime_root`) found for `kernel`, if it has looked.
pub fn remembered_accel(runtime_root: &Path, kernel: &Path) -> Option<Accel> {
    let text = std::fs::read_to_string(runtime_root.join(ACCEL_FILE)).ok()?;
    let rest = text.strip_prefix(&format!("{}\n", kernel.display()))?;
    Accel::parse(rest.trim()).ok()
}

/// The decision: what the settings force, else what was found before, else KVM exactly when
/// the guest kernel boots under it.
fn choose_accel(
    forced: Option<Accel>,
    remembered: Option<Accel>,
    kvm_boots: impl FnOnce() -> bool,
) -> Accel {
    forced
        .or(remembered)
        .unwrap_or_else(|| if kvm_boots() { Accel::Kvm } else { Accel::Tcg })
}

fn kvm_boots(vm: &VmRecord) -> bool {
    if File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(kernel) = kernel::GuestKernel::find(&vm.kernel) else {
        return false;
    };
    let Ok(dir) = tempdir_in(&vm.runtime_root, "kvm-check") else {
        return false;
    };
    let initrd = dir.join("initrd.img");
    let ok = (|| {
        let image = kernel::guest_initramfs(&vm.guest, &[], None, &GuestConfig::default()).ok()?;
        std::fs::write(&initrd, image).ok()?;
        let image = kernel.boot_image(&vm.runtime_root).ok()?;
        let mut child = boot_probe(&image, &initrd, Accel::Kvm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut out = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let console = reader.join().unwrap_or_default();
        Some(status?.success() && console.contains("warren-guest: ready"))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    ok == Some(true)
}

/// QEMU booting `kernel` (see `GuestKernel::boot_image`) and `initrd` with nothing attached,
/// its console on stdout, powering off once the guest is up (`warren.poweroff=1`): the
/// accelerator check, and the boot test.
pub fn boot_probe(kernel: &Path, initrd: &Path, accel: Accel) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", &format!("q35,accel={}", accel.as_str())])
        .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-m", "256", "-smp", "1"])
        .args([
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("{KERNEL_CMDLINE} warren.poweroff=1"));
    cmd
}

fn tempdir_in(parent: &Path, name: &str) -> std::io::Result<PathBuf> {
    let dir = parent.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child, Error> {
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io("cannot open", log))?;
    let err = log_file
        .try_clone()
        .map_err(Error::io("cannot open", log))?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    // Its own process group, which `stop_helpers` signals whole: virtiofsd's sandboxed child
    // must not outlive a stop.
    std::os::unix::process::CommandExt::process_group(sys::unblock_signals_in_child(cmd), 0)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err)
        .spawn()
        .map_err(Error::io("cannot run", program))
}

fn wait_for_path(path: &Path, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} made no socket in 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Boots the VM over the mounted tree (`layout.rootfs()`): helpers, QEMU, then waits for the
/// guest agent. On error, what was started is returned for teardown through `started`.
pub(crate) fn start(
    rec: &WorkspaceRecord,
    vm: &VmRecord,
    layout: &Layout,
    started: &mut Vec<Child>,
) -> Result<RunningVm, Error> {
    let fail = |message: String| Error::Start {
        id: rec.config.id.to_string(),
        message,
    };
    let files = VmFiles::of(layout);
    let owner = Some(rec.uid_base);
    std::fs::create_dir_all(&files.dir).map_err(Error::io("cannot create", &files.dir))?;
    std::os::unix::fs::chown(&files.dir, owner, owner)
        .map_err(Error::io("cannot chown", &files.dir))?;
    std::fs::set_permissions(&files.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("cannot set permissions of", &files.dir))?;
    for stale in [
        files.fs_socket(),
        files.vsock_device(),
        files.vsock_agent(),
        files.agent_addr_file(),
        files.qmp(),
        files.accel(),
        // The last boot's: the host waits for this boot's agent to say it listens.
        files.console(),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    let accel = accel(vm);
    let kernel = kernel::GuestKernel::find(&vm.kernel)?;

    // The scratch disk, made once: the limit's size, so the guest's `/var/lib/docker` gets
    // ENOSPC there, as its tree does on the workspace's own filesystem (`crate::disk`). `vm/`
    // is the VM's processes' to write in: root makes its files only through `sys`'s
    // no-follow helpers, never by a path something there could have pointed elsewhere.
    let scratch = files.scratch();
    if !std::fs::symlink_metadata(&scratch).is_ok_and(|m| m.is_file()) {
        let tmp = scratch.with_extension("img.new");
        let f = sys::create_in_tenant_dir(&files.dir, "scratch.img.new", owner)?;
        f.set_len(rec.config.limits.disk.unwrap_or(SCRATCH_BYTES))
            .map_err(Error::io("cannot size", &tmp))?;
        // mkfs writes through this process's descriptor, not the name.
        sys::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-E"])
                .arg("nodiscard,lazy_itable_init=1,lazy_journal_init=1")
                .arg(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())),
        )?;
        drop(f);
        std::fs::rename(&tmp, &scratch).map_err(Error::io("cannot rename", &tmp))?;
    }
    std::os::unix::fs::lchown(&scratch, owner, owner)
        .map_err(Error::io("cannot chown", &scratch))?;

    // How the guest's devices reach the host. KSM merges only private memory, and vhost-user
    // daemons need the guest's RAM shared with them; so a VM allowed to merge gets its tree
    // from QEMU itself (9p) and serves its agent over the workspace's network instead.
    let options = rec.config.vm.clone().unwrap_or_default();
    let ksm = options.ksm;
    let agent = if ksm {
        client::AgentAddr::Tcp {
            address: SocketAddr::from((rec.address, AGENT_TCP_PORT)),
            token: random_token()?,
        }
    } else {
        client::AgentAddr::Vsock(files.vsock_agent())
    };

    // The initramfs: the guest, its modules, its settings.
    let config = GuestConfig {
        hostname: spec::hostname(rec),
        network: Some(GuestNetwork {
            address: rec.address,
            prefix_len: rec.prefix_len,
            gateway: rec.gateway,
        }),
        root_tag: Some("root".into()),
        root_fs: if ksm { RootFs::NineP } else { RootFs::Virtiofs },
        agent_tcp: match &agent {
            client::AgentAddr::Tcp { address, token } => Some(AgentTcp {
                port: address.port(),
                token: token.clone(),
            }),
            client::AgentAddr::Vsock(_) => None,
        },
        scratch_device: Some("/dev/vda".into()),
        etc: spec::etc_files(rec)
            .into_iter()
            .map(|(name, content)| (name.to_owned(), content))
            .collect(),
    };
    let index = kernel::module_index(&kernel, &vm.runtime_root.join("vm-modules.index"))?;
    let mut wanted = kernel::BOOT_MODULES.to_vec();
    wanted.extend(if ksm {
        kernel::IN_QEMU_MODULES.as_slice()
    } else {
        kernel::VHOST_USER_MODULES.as_slice()
    });
    let modules = kernel.module_files(&index, &wanted).map_err(|e| {
        if ksm {
            fail(format!(
                "a VM allowed KSM gets its tree over 9p, which its kernel needs: {e} (Debian's linux-image-amd64 has it, the cloud kernel does not; `./dev vm` unpacks it)"
            ))
        } else {
            e
        }
    })?;
    let image = kernel::guest_initramfs(&vm.guest, &modules, Some(&index), &config)?;
    share_modules(rec, &kernel, layout)?;
    std::io::Write::write_all(
        &mut sys::create_in_tenant_dir(&files.dir, "initrd.img", owner)?,
        &image,
    )
    .map_err(Error::io("cannot write", files.initrd()))?;
    let agent_file = files.agent_addr_file();
    warren_hostfs::write_private(
        &agent_file,
        &serde_json::to_vec(&agent).map_err(Error::encode("the guest agent's address"))?,
    )
    .map_err(Error::io("cannot write", &agent_file))?;

    let log = layout.log();
    // The device daemons and QEMU are root in a user namespace that maps guest ids 0..65535
    // onto the workspace's range, as a container's: what the guest's users write lands in the
    // upper layer under their ids in that range, and no process of the VM has any privilege
    // on the host. The data folder may be closed to those ids, so whoever serves the tree
    // starts in it (its working folder) and shares `.`; binaries under root's home (where
    // `cargo install` puts the daemons) and the kernel come as open descriptors.
    let userns = sys::mapping_namespace(rec.uid_base, ID_RANGE)
        .map_err(|e| fail(format!("cannot make the VM's user namespace: {e}")))?;
    let in_tree = || -> Result<File, Error> {
        File::open(layout.rootfs()).map_err(Error::io("cannot open", layout.rootfs()))
    };
    if !ksm {
        let virtiofsd_bin = inherited(&which("virtiofsd").unwrap_or_default())?;
        let mut virtiofsd = Command::new(format!("/proc/self/fd/{}", virtiofsd_bin.as_raw_fd()));
        std::os::unix::process::CommandExt::arg0(&mut virtiofsd, "virtiofsd");
        start_in(&mut virtiofsd, in_tree()?);
        virtiofsd
            .arg("--socket-path")
            .arg(files.fs_socket())
            .args([
                "--shared-dir",
                ".",
                "--tag",
                "root",
                "--sandbox",
                "namespace",
            ])
            .args(["--xattr", "--cache", "auto", "--log-level", "warn"]);
        let userns = userns
            .try_clone()
            .map_err(|e| fail(format!("cannot share the user namespace: {e}")))?;
        let mut virtiofsd = spawn_logged(as_root_in(&mut virtiofsd, userns, None), &log)?;
        drop(virtiofsd_bin);
        let result = wait_for_path(&files.fs_socket(), &mut virtiofsd, "virtiofsd");
        started.push(virtiofsd);
        result.map_err(fail)?;
        let vsock_bin = inherited(&which("vhost-device-vsock").unwrap_or_default())?;
        let mut vsock = spawn_logged(
            as_workspace_root(
                std::os::unix::process::CommandExt::arg0(
                    &mut Command::new(format!("/proc/self/fd/{}", vsock_bin.as_raw_fd())),
                    "vhost-device-vsock",
                ),
                rec.uid_base,
                None,
            )
            .args(["--guest-cid", "3"])
            .arg("--socket")
            .arg(files.vsock_device())
            .arg("--uds-path")
            .arg(files.vsock_agent()),
            &log,
        )?;
        drop(vsock_bin);
        let result = wait_for_path(&files.vsock_device(), &mut vsock, "vhost-device-vsock");
        started.push(vsock);
        result.map_err(fail)?;
        std::os::unix::fs::lchown(files.fs_socket(), owner, owner)
            .map_err(Error::io("cannot chown", files.fs_socket()))?;
    }
    let kernel_file = inherited(&kernel.boot_image(&vm.runtime_root)?)?;
    // QEMU runs unprivileged: it gets the tap already opened.
    let tap = open_tap(&rec.veth())?;

    let memory = memory_of(rec);
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-name", &format!("warren-{}", rec.config.id)])
        .args([
            "-machine",
            &format!("q35,accel={},mem-merge={}", accel.as_str(), on_off(ksm)),
        ])
        .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-smp", &cpus_of(rec).to_string()])
        .args(["-m", &format!("{}M", memory >> 20)])
        .arg("-object")
        .arg(if ksm {
            // Private, so KSM may merge it.
            format!("memory-backend-ram,id=mem,size={}M,merge=on", memory >> 20)
        } else {
            // vhost-user devices need the guest's memory shared with their processes.
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on,merge=off",
                memory >> 20
            )
        })
        .args(["-numa", "node,memdev=mem"])
        .args(["-nographic", "-nodefaults", "-no-reboot", "-no-user-config"])
        .arg("-serial")
        .arg(format!("file:{}", files.console().display()))
        .arg("-kernel")
        .arg(format!("/proc/self/fd/{}", kernel_file.as_raw_fd()))
        .arg("-initrd")
        .arg(files.initrd())
        .args(["-append", KERNEL_CMDLINE]);
    if ksm {
        start_in(&mut qemu, in_tree()?);
        qemu.args([
            "-fsdev",
            "local,id=root,path=.,security_model=passthrough,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=root,mount_tag=root",
        ]);
    } else {
        qemu.arg("-chardev")
            .arg(format!("socket,id=fs,path={}", files.fs_socket().display()))
            .args(["-device", "vhost-user-fs-pci,chardev=fs,tag=root"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vsock,path={}",
                files.vsock_device().display()
            ))
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock"]);
    }
    qemu.arg("-drive")
        .arg(format!(
            "file={},if=none,id=scratch,format=raw,discard=unmap,detect-zeroes=unmap",
            scratch.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=scratch"])
        .args(["-netdev", &format!("tap,id=net0,fd={}", tap.as_raw_fd())])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", mac_of(rec)),
        ])
        .args([
            "-device",
            &format!(
                "virtio-balloon-pci,id=balloon0,free-page-reporting={},deflate-on-oom=on",
                on_off(options.free_page_reporting)
            ),
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", files.qmp().display()));
    as_root_in(&mut qemu, userns, group_id("kvm"));
    let mut qemu = spawn_logged(&mut qemu, &log)?;
    drop((tap, kernel_file));
    let booted = client::wait_for_agent(&agent, &files.console(), BOOT_LIMIT, &mut || {
        matches!(qemu.try_wait(), Ok(None))
    });
    if let Err(e) = booted {
        let console = sys::read_tenant_file(&files.console(), 64 << 10).unwrap_or_default();
        let console = String::from_utf8_lossy(&console);
        let tail: Vec<&str> = console.lines().rev().take(5).collect();
        let _ = qemu.kill();
        let _ = qemu.wait();
        return Err(fail(format!(
            "the VM did not come up: {e} (console: {}; see {})",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            log.display()
        )));
    }
    if let Err(e) = qmp::enable_balloon_stats(&files.qmp(), 2) {
        tracing::warn!(workspace.id = %rec.config.id, error = %e, "no memory statistics from the balloon");
    }
    let _ = std::fs::write(files.accel(), accel.as_str());
    tracing::info!(workspace.id = %rec.config.id, accel = accel.as_str(), memory, "VM running");
    Ok(RunningVm {
        qemu,
        helpers: std::mem::take(started),
        reaped_groups: Vec::new(),
    })
}

/// The kernel's modules, read-only at `/lib/modules/<release>` in the workspace's tree (a bind
/// mount over its root, so the guest loads them on demand; removed with the tree's mounts).
fn share_modules(
    rec: &WorkspaceRecord,
    kernel: &kernel::GuestKernel,
    layout: &Layout,
) -> Result<(), Error> {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let release = kernel
        .modules
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::InvalidConfig(format!("{}: no release name", kernel.modules.display()))
        })?;
    // The workspace's tree is the tenant's: `lib`, `lib/modules` may be symlinks anywhere.
    // Resolved inside it, made where missing, and bound onto by descriptor.
    let root_path = layout.rootfs();
    let root = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(&root_path)
        .map_err(Error::io("cannot open", &root_path))?;
    let target = crate::sys::open_or_make_in_root(
        root.as_fd(),
        &format!("lib/modules/{release}"),
        rec.uid_base,
    )?;
    // A symlink may lead the last folder to the tree's root itself: never mounted over.
    let (at, top) = (
        nix::sys::stat::fstat(target.as_raw_fd()),
        nix::sys::stat::fstat(root.as_raw_fd()),
    );
    if let (Ok(at), Ok(top)) = (at, top)
        && (at.st_dev, at.st_ino) == (top.st_dev, top.st_ino)
    {
        return Err(Error::InWorkspace {
            action: "mount the kernel's modules at",
            path: format!("/lib/modules/{release}"),
            cause: std::io::Error::other("it leads to the workspace's root folder"),
        });
    }
    crate::sys::bind_readonly_at(&kernel.modules, target.as_fd())
}

/// Runs `cmd` as the workspace's root user on the host (with `extra_group` if given).
fn as_workspace_root(cmd: &mut Command, uid: u32, extra_group: Option<u32>) -> &mut Command {
    let groups: Vec<libc::gid_t> = extra_group.into_iter().collect();
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setresgid(uid, uid, uid) < 0
                || libc::setresuid(uid, uid, uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `cmd` as root in the user namespace `userns`, so as the namespace's first host id
/// with no privilege outside it (and no supplementary group but `extra_group`).
fn as_root_in(
    cmd: &mut Command,
    userns: std::os::fd::OwnedFd,
    extra_group: Option<u32>,
) -> &mut Command {
    let groups: Vec<libc::gid_t> = extra_group.into_iter().collect();
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            // Groups first: the namespace denies setgroups once inside.
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setns(userns.as_raw_fd(), libc::CLONE_NEWUSER) < 0
                || libc::setresgid(0, 0, 0) < 0
                || libc::setresuid(0, 0, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Makes `cmd` start in `folder` (its working folder), which it may not be able to reach by
/// path.
fn start_in(cmd: &mut Command, folder: File) {
    // SAFETY: fchdir is async-signal-safe; `folder` lives as long as the command.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            nix::unistd::fchdir(folder.as_raw_fd()).map_err(std::io::Error::from)
        });
    }
}

/// A secret for this boot's agent (hex of 128 random bits).
fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the local buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        return Err(Error::Os {
            call: "getrandom",
            cause: std::io::Error::last_os_error(),
        });
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `path` opened for a child to inherit (its descriptor stays open across exec).
fn inherited(path: &Path) -> Result<std::os::fd::OwnedFd, Error> {
    let fd = std::os::fd::OwnedFd::from(File::open(path).map_err(Error::io("cannot open", path))?);
    keep_across_exec(&fd);
    Ok(fd)
}

fn keep_across_exec(fd: &std::os::fd::OwnedFd) {
    // SAFETY: fcntl on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC);
    }
}

/// Opens the workspace's tap (made by `net::attach_tap`) for QEMU to inherit: the descriptor
/// is left open across exec on purpose.
fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd, Error> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(Error::io("cannot open", "/dev/net/tun"))?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = b as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `req` is a valid ifreq for TUNSETIFF, alive for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(Error::Io {
            what: "cannot open the tap device",
            path: name.into(),
            cause: std::io::Error::last_os_error(),
        });
    }
    let fd = std::os::fd::OwnedFd::from(tun);
    keep_across_exec(&fd);
    Ok(fd)
}

fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
        })
}

/// A stable, locally administered MAC per slot.
fn mac_of(rec: &WorkspaceRecord) -> String {
    let s = rec.slot.to_be_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", s[0], s[1], s[2], s[3])
}

/// Ends the helpers (they have nothing to serve once QEMU is gone).
pub(crate) fn stop_helpers(helpers: &mut Vec<Child>) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    // Each leads its own process group (see `spawn_logged`).
    let group = |child: &Child| Pid::from_raw(child.id() as i32);
    for child in helpers.iter() {
        let _ = killpg(group(child), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for child in helpers.iter_mut() {
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // A process that outlives its leader (virtiofsd's sandbox) goes too, before the caller
    // says the VM is stopped.
    while Instant::now() < deadline && helpers.iter().any(|c| killpg(group(c), None).is_ok()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for child in helpers.iter_mut() {
        let _ = killpg(group(child), Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
    }
    // Killed members of a group outlive its reaped leader for a moment (their new parent
    // reaps them): the caller says nothing of the VM is left only once they are gone.
    let gone_by = Instant::now() + Duration::from_secs(5);
    while Instant::now() < gone_by && helpers.iter().any(|c| killpg(group(c), None).is_ok()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    helpers.clear();
}

/// Waits (5 s at most) until the process groups `groups`, whose leaders were reaped lately,
/// have no member left, so that a stop says nothing of the VM is left only once nothing is.
/// Only looks (signal 0): a leader's pid may be reused once its group is empty, so it is never
/// signalled, and a group reaped more than 30 s ago is not waited for (its members were gone
/// long since; its number may belong to another group by now).
pub(crate) fn wait_groups_gone(groups: &[(i32, Instant)]) {
    use nix::sys::signal::killpg;
    use nix::unistd::Pid;
    let recent: Vec<Pid> = groups
        .iter()
        .filter(|(_, at)| at.elapsed() < Duration::from_secs(30))
        .map(|&(g, _)| Pid::from_raw(g))
        .collect();
    let gone_by = Instant::now() + Duration::from_secs(5);
    while Instant::now() < gone_by && recent.iter().any(|&g| killpg(g, None).is_ok()) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The QEMU process's resident memory, bytes.
pub(crate) fn rss_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// CPU time the QEMU process used, nanoseconds.
pub(crate) fn cpu_ns_of(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_chosen_exactly_when_the_guest_kernel_boots_under_it() {
        assert_eq!(choose_accel(None, None, || true), Accel::Kvm);
        assert_eq!(choose_accel(None, None, || false), Accel::Tcg);
    }

    #[test]
    fn a_forced_or_remembered_accelerator_is_taken_without_a_probe() {
        let no_probe = || panic!("no boot probe when the answer is known");
        assert_eq!(
            choose_accel(Some(Accel::Tcg), Some(Accel::Kvm), no_probe),
            Accel::Tcg
        );
        assert_eq!(choose_accel(Some(Accel::Kvm), None, no_probe), Accel::Kvm);
        assert_eq!(choose_accel(None, Some(Accel::Kvm), no_probe), Accel::Kvm);
        assert_eq!(choose_accel(None, Some(Accel::Tcg), no_probe), Accel::Tcg);
    }

    #[test]
    fn the_remembered_accelerator_is_per_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Path::new("/k/one");
        assert_eq!(remembered_accel(dir.path(), kernel), None);
        std::fs::write(dir.path().join(ACCEL_FILE), "/k/one\nkvm\n").unwrap();
        assert_eq!(remembered_accel(dir.path(), kernel), Some(Accel::Kvm));
        assert_eq!(remembered_accel(dir.path(), Path::new("/k/two")), None);
        std::fs::write(dir.path().join(ACCEL_FILE), "/k/one\nhvf\n").unwrap();
        assert_eq!(
            remembered_accel(dir.path(), kernel),
            None,
            "damaged: probe again"
        );
    }
}
