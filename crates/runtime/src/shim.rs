//! The per-workspace supervisor. Single-threaded (libcontainer and `exec.rs` fork), detached from
//! whoever started it, and the parent of the container's init and of every exec'd process, so it
//! can report their exits. It owns the workspace's mounts while it runs and removes them, with the
//! container, its cgroups and its network, when the workspace stops.
//!
//! Start-up protocol: the starter reads one line from the shim's stdout: `ready`, or
//! `error: <message>`. The shim forks once more first, so the starter's child exits at once and
//! the running shim is nobody's zombie.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{SockFlag, accept4};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::image_mount::{MountSignal, READY_FD};
use crate::image_sharing::{self, Lease};
use crate::init::WorkspaceExecutor;
use crate::proto::{Channel, Reply, Request, listen_at};
use crate::record::{ID_RANGE, Layout, WorkspaceRecord};
use crate::{Error, ExitStatus, RootSource, cgroup, exec, net, spec, sys};

/// How long a VM may take to power off after its processes' grace period.
const VM_POWEROFF_SLACK: Duration = Duration::from_secs(15);

/// How long a stop asked for by a signal to the shim waits before killing.
const SIGNAL_STOP_GRACE: Duration = Duration::from_secs(10);

/// Entry point of `warren runtime shim <folder>`. Returns once the workspace has stopped.
/// `shared_mounts`: where the host's shared image mounts live, when its kernel allows them
/// (see [`image_sharing`]); `passthrough`: see [`crate::ContainerRuntimeConfig::passthrough`].
pub fn run_shim(dir: &Path, shared_mounts: Option<&Path>, passthrough: bool) -> Result<(), Error> {
    if thread_count() != 1 {
        return Err(Error::Os {
            call: "fork",
            cause: std::io::Error::other("the shim must start single-threaded"),
        });
    }
    // Nothing but stdin, stdout and stderr is the shim's: descriptors its starter leaked
    // (without close-on-exec) would otherwise live as long as the workspace.
    // SAFETY: close_range only closes descriptors; this process has opened none it still uses.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // SAFETY: single-threaded (checked above).
    match unsafe { fork() }.map_err(Error::os("fork"))? {
        ForkResult::Parent { .. } => return Ok(()),
        ForkResult::Child => {}
    }
    let _ = nix::unistd::setsid();
    let layout = Layout {
        dir: dir.to_path_buf(),
    };
    let result = supervise(&layout, shared_mounts, passthrough);
    if let Err(e) = &result {
        tracing::error!(workspace.dir = %dir.display(), error = %e, "supervisor failed");
        // The starter wraps this in its own "did not start".
        let message = match e {
            Error::Start { message, .. } => message.clone(),
            e => e.to_string(),
        };
        say(&format!("error: {message}"));
    }
    result
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The starter reads one line.
    let _ = writeln!(out, "{}", line.replace('\n', " "));
    let _ = out.flush();
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn supervise(
    layout: &Layout,
    shared_mounts: Option<&Path>,
    passthrough: bool,
) -> Result<(), Error> {
    let lock_path = layout.shim_lock();
    let lock = File::create(&lock_path).map_err(Error::io("cannot create", &lock_path))?;
    if lock.try_lock().is_err() {
        return Err(Error::SupervisorBusy);
    }
    let mut rec = WorkspaceRecord::load(&layout.record())?;
    rec.shared_mounts = shared_mounts.map(Path::to_path_buf);
    rec.no_passthrough = !passthrough;
    nix::sys::prctl::set_child_subreaper(true).map_err(Error::os("PR_SET_CHILD_SUBREAPER"))?;
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(Error::os("pthread_sigmask"))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(Error::os("signalfd"))?;

    let mut shim = match Shim::start(rec, layout.clone()) {
        Ok(shim) => shim,
        Err((e, mut partial)) => {
            crate::vm::stop_helpers(&mut partial.helpers);
            let leftovers = teardown(&partial.rec, &partial.layout, partial.mount.take());
            if !leftovers.is_empty() {
                tracing::error!(?leftovers, "could not undo a failed start");
            }
            return Err(e);
        }
    };
    let listener = listen_at(&layout.socket())?;
    tracing::info!(workspace.id = %shim.rec.config.id, init.pid = shim.init_pid, "workspace running");
    say("ready");
    // The starter has its answer; nothing more goes to its pipe.
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
    shim.serve(&listener, &sigfd);
    let _ = std::fs::remove_file(layout.socket());
    drop(lock);
    Ok(())
}

/// The read-only tree under the overlay.
pub(crate) enum LowerMount {
    /// `warren image mount` serving the image (FUSE); its output goes to the workspace's log.
    Image {
        child: Child,
    },
    /// The host's one mount of the image for the workspace's tenant (see [`image_sharing`]),
    /// held while this workspace uses it; `server` is readable once its server has ended.
    Shared {
        lease: Lease,
        tree: PathBuf,
        server: Option<OwnedFd>,
    },
    Dir,
}

impl LowerMount {
    /// Gives a shared mount back, ending it when this workspace was its last user; the
    /// workspace's own view of it must be unmounted first.
    fn release(self) {
        if let Self::Shared { lease, tree, .. } = self
            && let Some(whole) = lease.release()
        {
            // Its server ends when the file system goes; the kernel keeps it while a view is
            // left anywhere (a workspace whose supervisor was killed).
            let _ = nix::mount::umount2(&tree, nix::mount::MntFlags::MNT_DETACH);
            drop(whole);
        }
    }
}

/// What a failed start leaves for `teardown`.
struct Partial {
    rec: WorkspaceRecord,
    layout: Layout,
    mount: Option<LowerMount>,
    /// A VM's helper processes (virtiofsd, the vsock device) started so far.
    helpers: Vec<Child>,
}

struct Shim {
    rec: WorkspaceRecord,
    layout: Layout,
    init_pid: i32,
    mount: Option<LowerMount>,
    /// What runs the workspace (chosen once, at start): a container's init, or a VM's QEMU
    /// (its `init_pid`) and device daemons.
    machine: Box<dyn Machine>,
    /// Exec'd processes by pid, with the connection waiting for their exit.
    execs: HashMap<i32, Channel>,
    /// Readable once the server of the shared image mount under the workspace has ended.
    shared_server: Option<OwnedFd>,
}

impl Shim {
    fn start(rec: WorkspaceRecord, layout: Layout) -> Result<Self, (Error, Box<Partial>)> {
        let mut partial = Box::new(Partial {
            rec,
            layout,
            mount: None,
            helpers: Vec::new(),
        });
        // Whatever an earlier run left (a crash, a host reboot) goes first.
        let stale = teardown(&partial.rec, &partial.layout, None);
        if !stale.is_empty() {
            return Err((
                Error::Start {
                    id: partial.rec.config.id.to_string(),
                    message: format!(
                        "cannot clear what a previous run left: {}",
                        stale.join(", ")
                    ),
                },
                partial,
            ));
        }
        let prepared = match partial.rec.vm.clone() {
            Some(vm) => prepare_vm(
                &partial.rec,
                &vm,
                &partial.layout,
                &mut partial.mount,
                &mut partial.helpers,
            )
            .map(|running| {
                (
                    running.qemu.id() as i32,
                    Box::new(Vm(running)) as Box<dyn Machine>,
                )
            }),
            None => prepare(&partial.rec, &partial.layout, &mut partial.mount)
                .map(|pid| (pid, Box::new(SystemContainer) as Box<dyn Machine>)),
        };
        match prepared {
            Ok((init_pid, machine)) => Ok(Self {
                shared_server: match &mut partial.mount {
                    Some(LowerMount::Shared { server, .. }) => server.take(),
                    _ => None,
                },
                rec: partial.rec,
                layout: partial.layout,
                init_pid,
                mount: partial.mount,
                machine,
                execs: HashMap::new(),
            }),
            Err(e) => Err((e, partial)),
        }
    }

    fn serve(&mut self, listener: &OwnedFd, sigfd: &SignalFd) {
        let mut pending: Vec<Channel> = Vec::new();
        loop {
            let exec_pids: Vec<i32> = self.execs.keys().copied().collect();
            let mut fds = vec![
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            fds.extend(
                pending
                    .iter()
                    .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
            );
            fds.extend(
                exec_pids
                    .iter()
                    .map(|p| PollFd::new(self.execs[p].as_fd(), PollFlags::POLLIN)),
            );
            if let Some(server) = &self.shared_server {
                fds.push(PollFd::new(server.as_fd(), PollFlags::POLLIN));
            }
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                continue;
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            if self.shared_server.is_some() && ready.last() == Some(&true) {
                self.shared_server = None;
                tracing::error!(workspace.id = %self.rec.config.id, "the image's shared mount ended; the workspace's files are gone until it starts again");
            }
            if ready[1] {
                while let Ok(Some(info)) = sigfd.read_signal() {
                    let signal = Signal::try_from(info.ssi_signo as i32).ok();
                    if matches!(
                        signal,
                        Some(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP)
                    ) {
                        self.stop(SIGNAL_STOP_GRACE);
                        return;
                    }
                }
                if self.reap() {
                    self.finish("its init exited");
                    return;
                }
            }
            let mut keep = Vec::new();
            if ready[0] {
                while let Ok(fd) = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    keep.push(Channel(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }));
                }
            }
            // Exec connections follow the pending ones in `ready`.
            let base = 2 + pending.len();
            for (i, channel) in pending.drain(..).enumerate() {
                if !ready[2 + i] {
                    keep.push(channel);
                    continue;
                }
                if let Ok(Some((request, fds))) = channel.recv::<Request>()
                    && self.handle(channel, request, fds)
                {
                    return;
                }
            }
            pending = keep;
            for (i, pid) in exec_pids.iter().enumerate() {
                if ready.get(base + i) != Some(&true) {
                    continue;
                }
                let Some(channel) = self.execs.get(pid) else {
                    continue;
                };
                match channel.recv::<Request>() {
                    Ok(Some((Request::Signal(sig), _))) => {
                        if let Ok(sig) = Signal::try_from(sig) {
                            let _ = kill(Pid::from_raw(*pid), sig);
                        }
                    }
                    Ok(Some(_)) => {}
                    // The caller went away; the process runs on, unwatched.
                    Ok(None) | Err(_) => {
                        self.execs.remove(pid);
                    }
                }
            }
        }
    }

    /// Answers one request; true when the shim should exit (after a stop).
    fn handle(&mut self, channel: Channel, request: Request, fds: Vec<OwnedFd>) -> bool {
        match request {
            Request::Status => {
                let _ = channel.send(
                    &Reply::Status {
                        init_pid: self.init_pid,
                    },
                    &[],
                );
            }
            Request::Exec(request) => {
                match self.machine.exec(&self.rec, self.init_pid, &request, fds) {
                    Ok(started) => {
                        let fds: Vec<_> = started.master.iter().map(|m| m.as_fd()).collect();
                        if channel
                            .send(&Reply::Started { pid: started.pid }, &fds)
                            .is_ok()
                        {
                            self.execs.insert(started.pid, channel);
                        }
                    }
                    Err(e) => {
                        let _ = channel.send(&Reply::Error(e.to_string()), &[]);
                    }
                }
            }
            Request::Stop { grace_ms } => {
                self.stop(Duration::from_millis(grace_ms));
                let _ = channel.send(&Reply::Stopped, &[]);
                return true;
            }
            Request::Signal(_) => {
                let _ = channel.send(&Reply::Error("no process on this connection".into()), &[]);
            }
        }
        false
    }

    /// Reaps every exited child and reports exec exits; true when init is gone.
    fn reap(&mut self) -> bool {
        let mut init_gone = false;
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return init_gone,
                Ok(s) => s,
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid.as_raw(), ExitStatus::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid.as_raw(), ExitStatus::Signal(sig as i32)),
                _ => continue,
            };
            if pid == self.init_pid {
                init_gone = true;
            } else if let Some(channel) = self.execs.remove(&pid) {
                let _ = channel.send(&Reply::Exited(exit), &[]);
            } else if let Some(LowerMount::Image { child, .. }) = &self.mount
                && child.id() as i32 == pid
            {
                tracing::error!(workspace.id = %self.rec.config.id, ?exit, "the image mount exited; the workspace's files are gone");
            } else if self.machine.reaped(pid) {
                tracing::warn!(workspace.id = %self.rec.config.id, ?exit, "a VM device process exited");
            }
        }
    }

    /// Asks the workspace to stop (see [`Machine::ask_stop`]), kills its init if it has not
    /// ended by the deadline, then tears down.
    fn stop(&mut self, grace: Duration) {
        let asked = self.machine.ask_stop(&self.layout, self.init_pid, grace);
        let mut killed = false;
        while !self.reap() {
            if !killed && Instant::now() >= asked.deadline {
                // Killing a pid namespace's init kills everything in it; killing QEMU, the VM.
                let _ = kill(Pid::from_raw(self.init_pid), Signal::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.finish(if killed { asked.killed } else { asked.ended });
    }

    fn finish(&mut self, why: &str) {
        self.machine.finish(&self.layout);
        // Exec'd processes die with the pid namespace; collect them.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.execs.is_empty() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let leftovers = teardown(&self.rec, &self.layout, self.mount.take());
        if leftovers.is_empty() {
            tracing::info!(workspace.id = %self.rec.config.id, "workspace {why}");
        } else {
            tracing::error!(workspace.id = %self.rec.config.id, ?leftovers, "workspace {why}, but some of it could not be removed");
        }
    }
}

/// How a stop was asked for: when init is killed if it has not ended, and the words for each
/// ending.
struct StopAsked {
    deadline: Instant,
    ended: &'static str,
    killed: &'static str,
}

/// What runs a workspace under its shim, chosen once at start: the shim's loop, its exec
/// requests, its stop and its reaping never ask which.
trait Machine {
    /// Starts a process for an exec request.
    fn exec(
        &mut self,
        rec: &WorkspaceRecord,
        init_pid: i32,
        request: &crate::ExecRequest,
        stdio: Vec<OwnedFd>,
    ) -> Result<exec::Started, Error>;
    /// Asks the workspace to stop within `grace`.
    fn ask_stop(&mut self, layout: &Layout, init_pid: i32, grace: Duration) -> StopAsked;
    /// Whether the exited child `pid` was one of the machine's own (it is forgotten).
    fn reaped(&mut self, pid: i32) -> bool;
    /// Ends what the machine runs beside init.
    fn finish(&mut self, layout: &Layout);
}

/// A system container: init in its namespaces, processes exec'd beside it.
struct SystemContainer;

impl Machine for SystemContainer {
    fn exec(
        &mut self,
        rec: &WorkspaceRecord,
        init_pid: i32,
        request: &crate::ExecRequest,
        stdio: Vec<OwnedFd>,
    ) -> Result<exec::Started, Error> {
        exec::spawn(rec, init_pid, request, stdio)
    }

    /// SIGTERM to init (which passes it to every process); SIGKILL after `grace`.
    fn ask_stop(&mut self, _layout: &Layout, init_pid: i32, grace: Duration) -> StopAsked {
        let _ = kill(Pid::from_raw(init_pid), Signal::SIGTERM);
        StopAsked {
            deadline: Instant::now() + grace,
            ended: "stopped",
            killed: "stopped (killed after the grace period)",
        }
    }

    fn reaped(&mut self, _pid: i32) -> bool {
        false
    }

    fn finish(&mut self, _layout: &Layout) {}
}

/// A VM: QEMU (the shim's `init_pid`) and its device daemons.
struct Vm(crate::vm::RunningVm);

impl Machine for Vm {
    fn exec(
        &mut self,
        _rec: &WorkspaceRecord,
        _init_pid: i32,
        _request: &crate::ExecRequest,
        _stdio: Vec<OwnedFd>,
    ) -> Result<exec::Started, Error> {
        // The caller names the workspace.
        Err(Error::NotForBackend(
            "a VM workspace runs processes through its guest agent",
        ))
    }

    /// A clean shutdown by the guest (its processes get SIGTERM, then SIGKILL after `grace`),
    /// and QEMU killed if the guest has not powered off a while after that.
    fn ask_stop(&mut self, layout: &Layout, _init_pid: i32, grace: Duration) -> StopAsked {
        let asked = crate::vm::VmFiles::of(layout)
            .agent_addr()
            .and_then(|agent| crate::vm::client::poweroff(&agent, grace))
            .is_ok();
        StopAsked {
            deadline: Instant::now()
                + if asked {
                    grace + VM_POWEROFF_SLACK
                } else {
                    Duration::ZERO
                },
            ended: "stopped (the guest powered off)",
            killed: "stopped (the VM was killed)",
        }
    }

    fn reaped(&mut self, pid: i32) -> bool {
        let Some(at) = self.0.helpers.iter().position(|c| c.id() as i32 == pid) else {
            return false;
        };
        // Reaped by the shim's waitpid: forgotten, so a later stop never signals its
        // (reusable) pid.
        #[allow(clippy::zombie_processes)]
        let _reaped = self.0.helpers.remove(at);
        // Its group may outlive it a moment: the stop waits for that too.
        self.0.reaped_groups.push((pid, Instant::now()));
        true
    }

    fn finish(&mut self, layout: &Layout) {
        crate::vm::stop_helpers(&mut self.0.helpers);
        crate::vm::wait_groups_gone(&std::mem::take(&mut self.0.reaped_groups));
        let _ = std::fs::remove_file(crate::vm::VmFiles::of(layout).accel());
    }
}

/// Mounts the tree, creates the container, wires it, starts it; returns init's pid.
fn prepare(
    rec: &WorkspaceRecord,
    layout: &Layout,
    mount: &mut Option<LowerMount>,
) -> Result<i32, Error> {
    let start_err = |message: String| Error::Start {
        id: rec.config.id.to_string(),
        message,
    };
    for dir in [
        layout.lower(),
        layout.rootfs(),
        layout.bundle(),
        layout.etc(),
    ] {
        std::fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
    }
    mount_tree(rec, layout, mount)?;
    let root = Some(rec.uid_base);
    for (name, content) in spec::etc_files(rec) {
        let path = layout.etc().join(name);
        std::fs::write(&path, content).map_err(Error::io("cannot write", &path))?;
        chown(&path, root, root).map_err(Error::io("cannot chown", &path))?;
    }
    let config = spec::oci_config(rec, layout);
    let config_path = layout.bundle().join("config.json");
    std::fs::write(&config_path, config.to_string())
        .map_err(Error::io("cannot write", &config_path))?;
    std::fs::create_dir_all(&rec.containers)
        .map_err(Error::io("cannot create", &rec.containers))?;

    let null = |write: bool| {
        File::options()
            .read(!write)
            .write(write)
            .open("/dev/null")
            .map_err(Error::io("cannot open", "/dev/null"))
    };
    let mut container = ContainerBuilder::new(rec.container_id(), SyscallType::default())
        .with_root_path(&rec.containers)
        .map_err(|e| start_err(e.to_string()))?
        .with_executor(WorkspaceExecutor)
        .with_stdin(null(false)?)
        .with_stdout(null(true)?)
        .with_stderr(null(true)?)
        .as_init(layout.bundle())
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| start_err(format!("cannot create the container: {e}")))?;
    let init_pid = container
        .pid()
        .ok_or_else(|| start_err("the container has no init process".into()))?
        .as_raw();
    net::attach(rec, init_pid)?;
    cgroup::fence_unified(rec, init_pid, true)?;
    cgroup::delegate(rec)?;
    container
        .start()
        .map_err(|e| start_err(format!("cannot start the container: {e}")))?;
    Ok(init_pid)
}

/// Mounts the tree as for a container, wires a tap on the bridge, and boots the VM over it.
fn prepare_vm(
    rec: &WorkspaceRecord,
    vm: &crate::vm::VmRecord,
    layout: &Layout,
    mount: &mut Option<LowerMount>,
    helpers: &mut Vec<Child>,
) -> Result<crate::vm::RunningVm, Error> {
    for dir in [layout.lower(), layout.rootfs()] {
        std::fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
    }
    mount_tree(rec, layout, mount)?;
    net::attach_tap(rec)?;
    crate::vm::start(rec, vm, layout, helpers)
}

/// The workspace's tree at `layout.rootfs()`: its read-only tree under an overlay whose upper
/// layer is the workspace's writable layer.
fn mount_tree(
    rec: &WorkspaceRecord,
    layout: &Layout,
    mount: &mut Option<LowerMount>,
) -> Result<(), Error> {
    close_folder(rec, layout)?;
    *mount = Some(mount_lower(rec, layout)?);
    crate::disk::ensure_mounted(&layout.dir)?;
    sys::mount_overlay(
        &layout.lower(),
        &layout.upper(),
        &layout.work(),
        &layout.rootfs(),
    )
}

/// How long an image mount may take to say it serves the tree (or why not): its open retries
/// briefly, but a registry that accepts and never answers would hold the start.
const MOUNT_SIGNAL_LIMIT: Duration = Duration::from_secs(120);

/// How many times a start looks for a shared mount that ended just as it was found.
const SHARED_MOUNT_TRIES: usize = 3;

/// How long a start waits for a shared mount that is ending to be gone.
const LEASE_WAIT: Duration = Duration::from_secs(30);

fn mount_lower(rec: &WorkspaceRecord, layout: &Layout) -> Result<LowerMount, Error> {
    let lower = layout.lower();
    match &rec.config.root {
        RootSource::Dir { path } => {
            sys::bind_idmapped(path, &lower, rec.uid_base, ID_RANGE, false)?;
            Ok(LowerMount::Dir)
        }
        // A trace is recorded, or the background pull left out, for this workspace alone; a
        // workspace of no known tenant (made before tenants were recorded) shares nothing.
        RootSource::Image {
            reference,
            record_trace_secs: None,
            lazy_only: false,
        } if let Some(mounts) = &rec.shared_mounts
            && let Some(tenant) = &rec.config.tenant =>
        {
            mount_shared(rec, layout, reference, mounts, tenant)
        }
        RootSource::Image {
            reference,
            record_trace_secs,
            lazy_only,
        } => {
            let mut args = vec![
                OsString::from("mount"),
                reference.into(),
                lower.clone().into(),
                "--id-offset".into(),
                rec.uid_base.to_string().into(),
            ];
            if let Some(secs) = record_trace_secs {
                args.extend(["--record-trace".into(), secs.to_string().into()]);
            }
            if *lazy_only {
                args.push("--no-background".into());
            }
            let (mut child, signal) = run_image_mount(rec, layout, reference, &args)?;
            match signal {
                Ok(MountSignal::Mounted { .. }) if sys::is_mounted(&lower) => {
                    Ok(LowerMount::Image { child })
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(other
                        .err()
                        .unwrap_or_else(|| mount_failed(rec, layout, reference)))
                }
            }
        }
    }
}

/// The workspace's view of the host's shared mount of `reference` for `tenant` (see
/// [`image_sharing`]): found or started by `warren image share`, held by a lease, bound with
/// the workspace's ids.
fn mount_shared(
    rec: &WorkspaceRecord,
    layout: &Layout,
    reference: &str,
    mounts: &Path,
    tenant: &str,
) -> Result<LowerMount, Error> {
    let lower = layout.lower();
    for _ in 0..SHARED_MOUNT_TRIES {
        let (mut child, signal) = run_image_mount(
            rec,
            layout,
            reference,
            &[
                OsStr::new("share"),
                reference.as_ref(),
                "--under".as_ref(),
                mounts.as_os_str(),
                "--tenant".as_ref(),
                tenant.as_ref(),
            ],
        )?;
        let _ = child.wait();
        let (tree, lease) = match signal {
            Ok(MountSignal::Shared { tree, lease }) => (tree, lease),
            Ok(_) => return Err(mount_failed(rec, layout, reference)),
            Err(e) => return Err(e),
        };
        let lease = match Lease::take(&lease, LEASE_WAIT) {
            Ok(lease) => lease,
            // Its generation ended and was cleared meanwhile: ask again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::Start {
                    id: rec.config.id.to_string(),
                    message: format!(
                        "the shared mount of image `{reference}` was still ending after {} s",
                        LEASE_WAIT.as_secs()
                    ),
                });
            }
            Err(e) => return Err(Error::io("cannot hold", &lease)(e)),
        };
        // Held, it cannot end; found ending, it is made again.
        // The pid checked again once its pidfd is open: then it cannot be reused.
        let Some(server) = image_sharing::server_of(&tree).and_then(|pid| {
            sys::pidfd_open(pid).filter(|_| image_sharing::server_of(&tree) == Some(pid))
        }) else {
            drop(lease);
            continue;
        };
        if let Err(e) = sys::bind_idmapped(&tree, &lower, rec.uid_base, ID_RANGE, true) {
            LowerMount::Shared {
                lease,
                tree,
                server: None,
            }
            .release();
            return Err(e);
        }
        return Ok(LowerMount::Shared {
            lease,
            tree,
            server: Some(server),
        });
    }
    Err(Error::Start {
        id: rec.config.id.to_string(),
        message: format!("the shared mount of image `{reference}` kept ending as it was found"),
    })
}

/// Runs `warren image ARGS` with a readiness pipe and waits for its signal: a failure it
/// reports is an error naming the image; `Ok` is whatever else it said.
fn run_image_mount(
    rec: &WorkspaceRecord,
    layout: &Layout,
    reference: &str,
    args: &[impl AsRef<std::ffi::OsStr>],
) -> Result<(Child, Result<MountSignal, Error>), Error> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(layout.log())
        .map_err(Error::io("cannot open", layout.log()))?;
    // The mount says on a pipe of its own whether it serves the tree, or why not.
    let (ready_read, ready_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::os("pipe"))?;
    let mut command = Command::new(&rec.helper);
    sys::unblock_signals_in_child(&mut command);
    sys::give_fd_to_child(&mut command, ready_write.as_raw_fd(), READY_FD);
    let mut child = command
        .arg("--data")
        .arg(&rec.data)
        .arg("image")
        .args(args)
        .args(rec.no_passthrough.then_some("--no-passthrough"))
        .args(["--ready-fd", &READY_FD.to_string()])
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(Error::io("cannot open", layout.log()))?,
        )
        .stderr(log)
        .spawn()
        .map_err(Error::io("cannot run", &rec.helper))?;
    // Only the mount holds the writing end now: its exit ends the read.
    drop(ready_write);
    let signal = match MountSignal::receive_within(File::from(ready_read), MOUNT_SIGNAL_LIMIT) {
        Some(MountSignal::Failed { error }) => Err(Error::Start {
            id: rec.config.id.to_string(),
            message: error,
        }),
        Some(signal) => Ok(signal),
        None => Err(mount_failed(rec, layout, reference)),
    };
    if signal.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok((child, signal))
}

fn mount_failed(rec: &WorkspaceRecord, layout: &Layout, reference: &str) -> Error {
    Error::Start {
        id: rec.config.id.to_string(),
        message: format!(
            "image `{reference}` could not be mounted: the mount said nothing within {} s or ended (see {})",
            MOUNT_SIGNAL_LIMIT.as_secs(),
            layout.log().display()
        ),
    }
}

/// Removes the container, its network, mounts and cgroups; idempotent. Returns what remains.
pub(crate) fn teardown(
    rec: &WorkspaceRecord,
    layout: &Layout,
    mount: Option<LowerMount>,
) -> Vec<String> {
    let mut leftovers = Vec::new();
    let state = rec.containers.join(rec.container_id());
    if state.exists() {
        match Container::load(state.clone()) {
            Ok(mut container) => {
                let _ = container.refresh_status();
                if let Err(e) = container.delete(true) {
                    leftovers.push(format!("container state {} ({e})", state.display()));
                }
            }
            Err(_) => {
                if let Err(e) = std::fs::remove_dir_all(&state) {
                    leftovers.push(format!("container state {} ({e})", state.display()));
                }
            }
        }
    }
    leftovers.extend(net::detach(rec));
    leftovers.extend(sys::unmount_all(&layout.rootfs()));
    // Unmounting first lets the image mount's FUSE session end at once; its process then exits
    // on SIGTERM (killed if it does not).
    leftovers.extend(sys::unmount_all(&layout.lower()));
    match mount {
        Some(LowerMount::Image { mut child, .. }) => {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Some(shared @ LowerMount::Shared { .. }) => shared.release(),
        Some(LowerMount::Dir) | None => {}
    }
    // A VM has no cgroup of its own (its QEMU's memory is its size); its name may be a
    // container's of another runtime on the host.
    if rec.vm.is_none() {
        leftovers.extend(cgroup::remove(rec));
    }
    leftovers
}

/// Closes the workspace's folder to everybody but host root and the workspace's own ids (its
/// root's group, which sets its tree up from inside its user namespace): no other user of the
/// host, nor another workspace, reaches its image mount (setuid programs there run as its
/// root), its layer or its disk image (0600). Done at create, and at each start for workspaces
/// made before.
fn close_folder(rec: &WorkspaceRecord, layout: &Layout) -> Result<(), Error> {
    chown(&layout.dir, None, Some(rec.uid_base)).map_err(Error::io("cannot chown", &layout.dir))?;
    std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o710))
        .map_err(Error::io("cannot set permissions of", &layout.dir))?;
    let image = crate::disk::image(&layout.dir);
    if image.exists() {
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o600))
            .map_err(Error::io("cannot set permissions of", &image))?;
    }
    Ok(())
}

/// Creates the folders of a new workspace: the writable layer and the nested engine's folder
/// belong to the workspace's root.
pub(crate) fn create_layout(rec: &WorkspaceRecord, layout: &Layout) -> Result<(), Error> {
    let root = Some(rec.uid_base);
    close_folder(rec, layout)?;
    if let Some(size) = rec.config.limits.disk {
        crate::disk::create(&layout.dir, size)?;
    }
    for dir in [layout.upper(), layout.docker()] {
        std::fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
        chown(&dir, root, root).map_err(Error::io("cannot chown", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(Error::io("cannot set permissions of", &dir))?;
    }
    std::fs::create_dir_all(layout.work()).map_err(Error::io("cannot create", layout.work()))?;
    Ok(())
}
