//! The system-container backend of [`Runtime`]: workspace records and folders under
//! `<root>/workspaces/<id>/`, one shim per running workspace, reached through its socket.
//!
//! Safe to use from a multithreaded process (the agent): everything that forks happens in the
//! shim, which is started as a separate executable.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::backend::{self, Found};
use crate::image_sharing::{self, ImageSharing};
use crate::proto::{ANSWER_LIMIT, Channel, Reply, Request};
use crate::record::{ID_RANGE, Layout, WorkspaceRecord};
use crate::shim::{create_layout, teardown};
use crate::slots::Slots;
use crate::vm::VmFiles;
use crate::{
    DeleteReport, Error, Exec, ExecRequest, RootSource, Runtime, Stats, WorkspaceConfig,
    WorkspaceId, WorkspaceInfo, WorkspaceSocket, WorkspaceState, WritableLayer, net,
};

/// A status is one small answer from an idle loop.
const STATUS_LIMIT: Duration = Duration::from_secs(5);

/// Where workspaces attach.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The bridge all workspaces of this host share (created if missing).
    pub bridge: String,
    /// Workspace addresses; the first host address is the bridge's (the gateway).
    pub subnet: Ipv4Net,
    /// DNS servers given to workspaces; empty means the host's (from `/etc/resolv.conf`,
    /// loopback resolvers left out since a workspace cannot reach them).
    pub nameservers: Vec<Ipv4Addr>,
    /// Where workspaces may not go (besides the host itself).
    pub egress: crate::net::EgressPolicy,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            bridge: "warren0".into(),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or_default(),
            nameservers: Vec::new(),
            egress: Default::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContainerRuntimeConfig {
    /// The runtime's folder (`<data>/runtime`).
    pub root: PathBuf,
    /// Warren's data folder, where images and the chunk cache live.
    pub data: PathBuf,
    /// The `warren` executable: it runs the shims (`warren runtime shim`) and the lazy image
    /// mounts (`warren image mount`).
    pub helper: PathBuf,
    pub network: NetworkConfig,
    /// The first host uid given to workspaces; workspace `n` gets `base + n * 65536` and the
    /// 65535 ids after it. Keep it clear of the host's own users and `/etc/subuid` ranges.
    pub uid_base: u32,
    /// What VM workspaces boot from (used only by workspaces that ask for a VM).
    pub vm: crate::VmSettings,
    /// The disk limit of workspaces created without one of their own (`None`:
    /// unlimited).
    pub default_disk: Option<u64>,
    /// Serve each image once for all its workspaces where the kernel allows it (see
    /// [`image_sharing`]); `false` gives each workspace a mount of its own.
    pub share_image_mounts: bool,
    /// Let the kernel read an image's large files from whole-file copies (FUSE passthrough,
    /// Linux 6.9+) instead of through its mount. `false` keeps one more level of overlay
    /// stacking for mounts made inside workspaces.
    pub passthrough: bool,
}

impl ContainerRuntimeConfig {
    pub const DEFAULT_UID_BASE: u32 = 1_000_000_000;
}

/// How long a starting shim may hold a workspace before answering on its socket.
const SHIM_START_WAIT: Duration = Duration::from_secs(60);

enum Shim {
    Serving(Channel),
    Absent(File),
}

#[derive(Debug)]
pub struct ContainerRuntime {
    config: ContainerRuntimeConfig,
    slots: Slots,
    image_sharing: ImageSharing,
}

/// The running shim's init pid, or `None` when the workspace is stopped (or its shim does not
/// answer within the status limit).
pub(crate) fn status(layout: &Layout) -> Option<i32> {
    let channel = Channel::connect(&layout.socket(), STATUS_LIMIT).ok()?;
    channel.send(&Request::Status, &[]).ok()?;
    match channel.recv::<Reply>() {
        Ok(Some((Reply::Status { init_pid }, _))) => Some(init_pid),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(socket = %layout.socket().display(), error = %e, "a workspace's supervisor does not answer; counted as not running");
            None
        }
    }
}

/// How long an exec waits for a frozen workspace (its layer being read) to go on.
const FROZEN_WAIT: Duration = Duration::from_secs(120);

/// Returns once the workspace is not frozen; an error after [`FROZEN_WAIT`].
fn wait_until_thawed(id: &WorkspaceId, layout: &Layout) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + FROZEN_WAIT;
    while layout.frozen().exists() {
        if std::time::Instant::now() > deadline {
            return Err(Error::Shim {
                id: id.to_string(),
                message: "it is held still while its layer is saved: try again shortly".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// [`Runtime::freeze`] on a record already read.
fn set_frozen(
    id: &WorkspaceId,
    rec: &WorkspaceRecord,
    layout: &Layout,
    frozen: bool,
) -> Result<(), Error> {
    let ws = Found {
        id,
        rec,
        layout,
        pid: None,
    };
    let backend = backend::of(rec);
    let marker = layout.frozen();
    if !frozen {
        // Only what this runtime froze is thawed (nothing else made its cgroups frozen).
        if !marker.exists() {
            return Ok(());
        }
        let thawed = backend.freeze(&ws, false);
        let _ = std::fs::remove_file(&marker);
        return thawed;
    }
    std::fs::write(&marker, b"").map_err(Error::io("cannot write", &marker))?;
    let done = backend.freeze(&ws, true);
    if done.is_err() {
        // Half frozen is worse than not frozen.
        let _ = backend.freeze(&ws, false);
        let _ = std::fs::remove_file(&marker);
    }
    done
}

impl ContainerRuntime {
    pub fn new(config: ContainerRuntimeConfig) -> Result<Self, Error> {
        if config.network.subnet.prefix_len() > 29 {
            return Err(Error::InvalidConfig(format!(
                "subnet {} is too small for workspaces",
                config.network.subnet
            )));
        }
        let workspaces = config.root.join("workspaces");
        std::fs::create_dir_all(&workspaces).map_err(Error::io("cannot create", &workspaces))?;
        let slots = Slots::new(&config.root);
        let image_sharing = if config.share_image_mounts {
            image_sharing::detect(&config.root)
        } else {
            ImageSharing::PerWorkspace {
                why: "sharing turned off: --no-shared-image-mounts".into(),
            }
        };
        Ok(Self {
            config,
            slots,
            image_sharing,
        })
    }

    /// How this host mounts images for workspaces (detected once per boot).
    pub fn image_sharing(&self) -> &ImageSharing {
        &self.image_sharing
    }

    /// Refuses a data folder the workspaces' ids cannot reach: a container's root filesystem
    /// is set up inside its user namespace, as the workspace's own root, so every folder down
    /// to `<runtime>/workspaces` must be searchable by it (a folder under `mktemp -d`, mode
    /// 0700, is not). `warren up`, `agent`, `build` and `runtime run`/`start` check this before
    /// anything starts, and name the folder in the way.
    pub fn check_reachable_by_workspaces(&self) -> Result<(), Error> {
        let workspaces = self.config.root.join("workspaces");
        let uid = self.config.uid_base;
        if crate::sys::can_enter_as(&workspaces, uid) {
            return Ok(());
        }
        // Name the first folder on the way that is closed to it.
        let blocked = workspaces
            .ancestors()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|dir| !crate::sys::can_enter_as(dir, uid))
            .unwrap_or(&workspaces)
            .to_path_buf();
        let meta = std::fs::metadata(&blocked).map_err(Error::io("cannot read", &blocked))?;
        Err(Error::DataFolderClosed {
            data: self.config.data.clone(),
            blocked,
            uid,
            mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
            owner: std::os::unix::fs::MetadataExt::uid(&meta),
        })
    }

    fn layout(&self, id: &WorkspaceId) -> Layout {
        Layout {
            dir: self.config.root.join("workspaces").join(id.as_str()),
        }
    }

    fn capacity(&self) -> u32 {
        let net = self.config.network.subnet;
        let hosts = (1u64 << (32 - net.prefix_len())).saturating_sub(3); // network, gateway, broadcast
        let ranges = (u64::from(u32::MAX) - u64::from(self.config.uid_base)) / u64::from(ID_RANGE);
        hosts.min(ranges).min(u64::from(u32::MAX)) as u32
    }

    fn record(&self, id: &WorkspaceId) -> Result<(WorkspaceRecord, Layout), Error> {
        let layout = self.layout(id);
        if !layout.record().exists() {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok((WorkspaceRecord::load(&layout.record())?, layout))
    }

    /// The running shim's init pid, or `None` when the workspace is stopped.
    fn status(layout: &Layout) -> Option<i32> {
        status(layout)
    }

    fn lock_file(layout: &Layout) -> Result<File, Error> {
        File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(layout.shim_lock())
            .map_err(Error::io("cannot open", layout.shim_lock()))
    }

    /// The workspace's shim: serving on its socket, or absent (its lock then held by us). A
    /// shim that holds the lock but does not serve yet is starting: wait for it.
    fn find_shim(id: &WorkspaceId, layout: &Layout) -> Result<Shim, Error> {
        let deadline = std::time::Instant::now() + SHIM_START_WAIT;
        loop {
            if let Ok(channel) = Channel::connect(&layout.socket(), ANSWER_LIMIT) {
                return Ok(Shim::Serving(channel));
            }
            let lock = Self::lock_file(layout)?;
            if lock.try_lock().is_ok() {
                return Ok(Shim::Absent(lock));
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Shim {
                    id: id.to_string(),
                    message: format!(
                        "its supervisor holds the workspace but does not answer (see {})",
                        layout.log().display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&self, id: &WorkspaceId) -> Result<(WorkspaceRecord, Layout, i32), Error> {
        let (rec, layout) = self.record(id)?;
        let pid = Self::status(&layout).ok_or_else(|| Error::NotRunning(id.to_string()))?;
        Ok((rec, layout, pid))
    }

    /// Calls the running workspace's backend (`NotRunning` when it is stopped).
    fn on_running<T>(
        &self,
        id: &WorkspaceId,
        call: impl FnOnce(&dyn backend::Backend, &Found<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let (rec, layout, pid) = self.running(id)?;
        let ws = Found {
            id,
            rec: &rec,
            layout: &layout,
            pid: Some(pid),
        };
        call(backend::of(&rec), &ws)
    }

    fn info_of(rec: WorkspaceRecord, layout: &Layout) -> WorkspaceInfo {
        let init_pid = Self::status(layout);
        WorkspaceInfo {
            state: if init_pid.is_some() {
                WorkspaceState::Running
            } else {
                WorkspaceState::Stopped
            },
            uid_base: rec.uid_base,
            address: rec.address,
            accel: init_pid
                .and(rec.vm.as_ref())
                .and_then(|_| VmFiles::of(layout).read_accel()),
            init_pid,
            config: rec.config,
        }
    }

    fn nameservers(&self) -> Vec<Ipv4Addr> {
        if !self.config.network.nameservers.is_empty() {
            return self.config.network.nameservers.clone();
        }
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let found = host_nameservers(&conf);
        if found.is_empty() {
            tracing::warn!(
                "the host has no nameserver a workspace can reach (only loopback ones); workspaces get none"
            );
        }
        found
    }
}

fn host_nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

impl Runtime for ContainerRuntime {
    fn create(&self, config: &WorkspaceConfig) -> Result<WorkspaceInfo, Error> {
        match &config.root {
            RootSource::Dir { path } if !path.is_dir() => {
                return Err(Error::InvalidConfig(format!(
                    "`{}` is not a folder",
                    path.display()
                )));
            }
            RootSource::Image { reference, .. } if reference.trim().is_empty() => {
                return Err(Error::InvalidConfig("the image reference is empty".into()));
            }
            _ => {}
        }
        let vm = match &config.vm {
            Some(_) => Some(self.config.vm.resolve(
                &self.config.data,
                &self.config.helper,
                &self.config.root,
            )?),
            None => None,
        };
        if let Some(cpus) = config.limits.cpus
            && !(cpus > 0.0 && cpus.is_finite())
        {
            return Err(Error::InvalidConfig(format!(
                "cpus must be positive, not {cpus}"
            )));
        }
        let layout = self.layout(&config.id);
        let mut made = std::fs::create_dir(&layout.dir);
        if matches!(&made, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists) {
            if layout.record().exists() {
                return Err(Error::AlreadyExists(config.id.to_string()));
            }
            // A create cut short before its record was written (the record comes last): redo it.
            tracing::warn!(workspace.id = %config.id, "clearing a workspace folder left by an interrupted create");
            let _ = crate::disk::unmount(&layout.dir);
            if crate::sys::mounts_under(&layout.dir).is_empty() {
                let _ = std::fs::remove_dir_all(&layout.dir);
            }
            made = std::fs::create_dir(&layout.dir);
        }
        made.map_err(Error::io("cannot create", &layout.dir))?;
        let made = (|| {
            let slot = self.slots.allocate(&config.id, self.capacity())?;
            let net = self.config.network.subnet;
            let first = u32::from(net.network());
            let mut config = config.clone();
            // The host's limit is the most a workspace may write; its own may only be less.
            match (config.limits.disk, self.config.default_disk) {
                (None, host) => config.limits.disk = host,
                (Some(own), Some(host)) if own > host => {
                    return Err(Error::InvalidConfig(format!(
                        "a disk of {} MiB is more than this host gives a workspace ({} MiB)",
                        own >> 20,
                        host >> 20
                    )));
                }
                _ => {}
            }
            let rec = WorkspaceRecord {
                config,
                slot,
                uid_base: self.config.uid_base + slot * ID_RANGE,
                address: Ipv4Addr::from(first + 2 + slot),
                prefix_len: net.prefix_len(),
                gateway: Ipv4Addr::from(first + 1),
                bridge: self.config.network.bridge.clone(),
                nameservers: self.nameservers(),
                data: self.config.data.clone(),
                helper: self.config.helper.clone(),
                containers: self.config.root.join("containers"),
                vm: vm.clone(),
                shared_mounts: None,
                no_passthrough: false,
            };
            create_layout(&rec, &layout)?;
            rec.save(&layout.record())?;
            Ok(rec)
        })();
        match made {
            Ok(rec) => {
                tracing::info!(workspace.id = %config.id, uid_base = rec.uid_base, address = %rec.address, "workspace created");
                Ok(Self::info_of(rec, &layout))
            }
            Err(e) => {
                let _ = self.slots.release(&config.id);
                // Never delete through the workspace's own filesystem if it was mounted.
                if crate::disk::unmount(&layout.dir).is_ok() {
                    let _ = std::fs::remove_dir_all(&layout.dir);
                }
                Err(e)
            }
        }
    }

    fn start(&self, id: &WorkspaceId) -> Result<(), Error> {
        let (rec, layout) = self.record(id)?;
        match Self::find_shim(id, &layout)? {
            Shim::Serving(_) => return Ok(()),
            // The new shim takes the lock itself.
            Shim::Absent(lock) => drop(lock),
        }
        net::ensure_host(
            &rec.bridge,
            Ipv4Net::new(rec.gateway, rec.prefix_len)
                .map_err(|e| Error::InvalidConfig(e.to_string()))?
                .trunc(),
            rec.gateway,
            &self.config.network.egress,
        )?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(layout.log())
            .map_err(Error::io("cannot open", layout.log()))?;
        let mut cmd = Command::new(&self.config.helper);
        cmd.args(["runtime", "shim"]).arg(&layout.dir);
        if self.image_sharing == ImageSharing::Shared {
            cmd.arg("--shared-mounts")
                .arg(image_sharing::mounts_dir(&self.config.data));
        }
        if !self.config.passthrough {
            cmd.arg("--no-passthrough");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        // The shim is its own session, so a terminal closing does not reach it.
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(Error::io("cannot run", &self.config.helper))?;
        let stdout = child.stdout.take();
        // The first shim process forks the real one and exits at once.
        let _ = child.wait();
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let line = line.trim();
        if line == "ready" {
            return Ok(());
        }
        let message = match line.strip_prefix("error: ") {
            Some(m) => m.to_owned(),
            None => format!(
                "the supervisor exited without a word (see {})",
                layout.log().display()
            ),
        };
        Err(Error::Start {
            id: id.to_string(),
            message,
        })
    }

    fn exec(&self, id: &WorkspaceId, request: &ExecRequest) -> Result<Exec, Error> {
        let (rec, layout) = self.record(id)?;
        wait_until_thawed(id, &layout)?;
        let ws = Found {
            id,
            rec: &rec,
            layout: &layout,
            pid: None,
        };
        backend::of(&rec).exec(&ws, request)
    }

    fn connect(&self, id: &WorkspaceId, to: SocketAddr) -> Result<TcpStream, Error> {
        self.on_running(id, |backend, ws| backend.connect(ws, to))
    }

    fn tasks_dir(&self, id: &WorkspaceId) -> Result<PathBuf, Error> {
        let (_, layout) = self.record(id)?;
        Ok(layout.dir.join("tasks"))
    }

    fn start_tasks(&self, id: &WorkspaceId, tasks: &[crate::tasks::TaskSpec]) -> Result<(), Error> {
        let dir = self.tasks_dir(id)?;
        crate::tasks::save_tasks(&dir, tasks)?;
        if tasks.is_empty() {
            return Ok(());
        }
        let log_path = dir.join("supervisor.log");
        let log = File::create(&log_path).map_err(Error::io("cannot create", &log_path))?;
        let mut cmd = Command::new(&self.config.helper);
        cmd.arg("--data")
            .arg(&self.config.data)
            .args(["runtime", "--uid-base"])
            .arg(self.config.uid_base.to_string())
            .arg("--bridge")
            .arg(&self.config.network.bridge)
            .arg("--subnet")
            .arg(self.config.network.subnet.to_string())
            .args(["tasks", id.as_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Its own session and process group: it outlives the agent, as the shim does.
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(Error::io("cannot run", &self.config.helper))?;
        // Reaped by a thread so it never lingers as a zombie of a long-lived agent.
        std::thread::spawn(move || child.wait());
        Ok(())
    }

    fn listen_unix(&self, id: &WorkspaceId, user: Option<&str>) -> Result<WorkspaceSocket, Error> {
        self.on_running(id, |backend, ws| backend.listen_unix(ws, user))
    }

    fn stop(&self, id: &WorkspaceId, grace: Duration) -> Result<(), Error> {
        let (rec, layout) = self.record(id)?;
        // A frozen process does not die of SIGKILL (cgroup v1) and a paused guest cannot
        // power off: a stop thaws it first (a save reading the layer meanwhile reads it by
        // descriptors and checks what it opens).
        let _ = set_frozen(id, &rec, &layout, false);
        let lock = match Self::find_shim(id, &layout)? {
            Shim::Serving(channel) => {
                let grace_ms = grace.as_millis().min(u128::from(u64::MAX)) as u64;
                let limit = grace.saturating_add(ANSWER_LIMIT);
                channel
                    .set_limit(Some(limit))
                    .map_err(|cause| Error::SupervisorLink {
                        action: "set a timeout on",
                        cause,
                    })?;
                channel.send(&Request::Stop { grace_ms }, &[])?;
                // Stopped, or the shim closing the connection as it exits.
                let _ = channel.recv::<Reply>();
                // Wait for it to let go of the workspace, so long: a blocking lock (queued
                // before any new shim's `try_lock`, so a start right after cannot take the
                // workspace in between), in a thread that hands the lock over only if asked.
                let lock = Self::lock_file(&layout)?;
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let locked = lock.lock().map(|()| lock);
                    // When nobody waits any more, the lock is dropped (released) here.
                    let _ = tx.send(locked);
                });
                match rx.recv_timeout(limit) {
                    Ok(locked) => locked.map_err(Error::io("cannot lock", layout.shim_lock()))?,
                    Err(_) => {
                        return Err(Error::Shim {
                            id: id.to_string(),
                            message: format!(
                                "its supervisor did not stop within {} s (see {})",
                                limit.as_secs(),
                                layout.log().display()
                            ),
                        });
                    }
                }
            }
            Shim::Absent(lock) => lock,
        };
        // Clear what a crashed shim may have left, while no shim can start.
        let leftovers = teardown(&rec, &layout, None);
        drop(lock);
        if !leftovers.is_empty() {
            return Err(Error::Shim {
                id: id.to_string(),
                message: format!("stopped, but could not remove: {}", leftovers.join(", ")),
            });
        }
        Ok(())
    }

    fn delete(&self, id: &WorkspaceId) -> Result<DeleteReport, Error> {
        let layout = self.layout(id);
        if !layout.dir.exists() {
            return Err(Error::NotFound(id.to_string()));
        }
        let mut leftovers = Vec::new();
        // Stop tears down (container, network, mounts, cgroups) under the shim's lock and
        // reports whatever of it remains.
        if self.record(id).is_ok()
            && let Err(e) = self.stop(id, Duration::ZERO)
        {
            leftovers.push(e.to_string());
        }
        if let Err(e) = crate::disk::unmount(&layout.dir) {
            leftovers.push(e.to_string());
        }
        let mounts = crate::sys::mounts_under(&layout.dir);
        if mounts.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&layout.dir) {
                leftovers.push(format!("folder {} ({e})", layout.dir.display()));
            }
        } else {
            // Never delete through a mount.
            leftovers.extend(mounts.iter().map(|m| format!("mount {}", m.display())));
            leftovers.push(format!(
                "folder {} (kept: mounts remain)",
                layout.dir.display()
            ));
        }
        leftovers.sort();
        leftovers.dedup();
        if leftovers.is_empty() {
            self.slots.release(id)?;
            tracing::info!(workspace.id = %id, "workspace deleted");
        } else {
            // Something of it may still run as its uids: another workspace must not get them.
            leftovers.push("uid range and address (kept until the above are gone)".into());
        }
        Ok(DeleteReport { leftovers })
    }

    fn stats(&self, id: &WorkspaceId) -> Result<Stats, Error> {
        let mut stats = self.live_stats(id)?;
        let (_, layout) = self.record(id)?;
        stats.disk_bytes = disk_usage(&layout.upper())
            + disk_usage(&layout.docker())
            + disk_usage(&VmFiles::of(&layout).dir);
        Ok(stats)
    }

    fn live_stats(&self, id: &WorkspaceId) -> Result<Stats, Error> {
        self.on_running(id, |backend, ws| backend.live_stats(ws))
    }

    fn info(&self, id: &WorkspaceId) -> Result<WorkspaceInfo, Error> {
        let (rec, layout) = self.record(id)?;
        Ok(Self::info_of(rec, &layout))
    }

    fn writable_layer(&self, id: &WorkspaceId) -> Result<Option<WritableLayer>, Error> {
        let (rec, layout) = self.record(id)?;
        crate::disk::ensure_mounted(&layout.dir)?;
        Ok(match &rec.config.root {
            RootSource::Image { reference, .. } => Some(WritableLayer {
                image: reference.clone(),
                upper: layout.upper(),
                id_offset: rec.uid_base,
            }),
            RootSource::Dir { .. } => None,
        })
    }

    fn quiesce(&self, id: &WorkspaceId) -> Result<(), Error> {
        self.on_running(id, |backend, ws| backend.quiesce(ws))
    }

    /// Straight from the record, never through the shim: a process exec'd while the
    /// workspace is frozen would hold the (single-threaded) shim, and the thaw must not wait
    /// on it. The `frozen` marker beside the record makes new execs wait for the thaw instead,
    /// and a thaw always clears it.
    fn freeze(&self, id: &WorkspaceId, frozen: bool) -> Result<(), Error> {
        let (rec, layout) = self.record(id)?;
        set_frozen(id, &rec, &layout, frozen)
    }

    fn egress(&self) -> crate::net::EgressPolicy {
        self.config.network.egress.clone()
    }

    fn disk_ceiling(&self) -> Option<u64> {
        self.config.default_disk
    }

    fn list(&self) -> Result<Vec<WorkspaceInfo>, Error> {
        let dir = self.config.root.join("workspaces");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))? {
            let entry = entry.map_err(Error::io("cannot list", &dir))?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| WorkspaceId::new(n).ok())
            else {
                continue;
            };
            match self.record(&id) {
                Ok((rec, layout)) => out.push(Self::info_of(rec, &layout)),
                Err(e) => {
                    tracing::warn!(workspace.id = %id, error = %e, "skipping a workspace folder without a usable record")
                }
            }
        }
        out.sort_by(|a, b| a.config.id.cmp(&b.config.id));
        Ok(out)
    }
}

/// Bytes allocated on disk under `dir` (hard links counted once).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_left_out() {
        let conf =
            "# c\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nsearch x\n";
        assert_eq!(
            host_nameservers(conf),
            vec![Ipv4Addr::new(10, 255, 255, 53)]
        );
    }
}
