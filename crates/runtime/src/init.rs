//! PID 1 of a container workspace: reaps zombies and forwards signals, like tini.
//!
//! It runs as libcontainer's executor in the container's first process (a fork of the shim,
//! already inside every namespace, pivoted into the workspace's root), so no init binary has to
//! exist in the image. A stop signal (SIGTERM, SIGINT, SIGPWR) is forwarded to every process of
//! the workspace; init exits once no other process is left, which the shim sees as "stopped".

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::spec::INIT_MARKER;

/// The executor given to libcontainer: Warren's init for the container's first process, the
/// default `execvp` for anything else.
#[derive(Debug, Clone)]
pub(crate) struct WorkspaceExecutor;

fn is_init(spec: &Spec) -> bool {
    spec.process()
        .as_ref()
        .and_then(|p| p.args().as_ref())
        .and_then(|a| a.first())
        .is_some_and(|a| a == INIT_MARKER)
}

impl Executor for WorkspaceExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if is_init(spec) {
            run_init()
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        if is_init(spec) {
            return Ok(());
        }
        DefaultExecutor {}.validate(spec)
    }
}

fn run_init() -> ! {
    // This process is a fork of the shim: drop every descriptor it inherited (the shim's lock,
    // sockets and pipes) so that nothing inside the workspace can reach them.
    // SAFETY: close_range only closes descriptors; no Rust object of this process uses them
    // afterwards (init only calls signal and wait functions below).
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // Not dumpable: it holds a copy of the shim's memory, and the workspace's root (same ids,
    // CAP_SYS_PTRACE in its namespace) must not attach to it or read it; it never execs, so
    // the flag stays.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let mut signals = SigSet::all();
    signals.remove(Signal::SIGKILL);
    signals.remove(Signal::SIGSTOP);
    if signals.thread_block().is_err() {
        std::process::exit(1);
    }
    let mut stopping = false;
    loop {
        let Ok(signal) = signals.wait() else { continue };
        match signal {
            Signal::SIGCHLD => reap(),
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGPWR => {
                stopping = true;
                let _ = kill(Pid::from_raw(-1), signal);
            }
            Signal::SIGHUP | Signal::SIGQUIT | Signal::SIGUSR1 | Signal::SIGUSR2 => {
                let _ = kill(Pid::from_raw(-1), signal);
            }
            _ => {}
        }
        // kill(-1, 0) from PID 1 reaches every other process of the namespace: ESRCH means
        // none is left.
        if stopping && kill(Pid::from_raw(-1), None) == Err(Errno::ESRCH) {
            reap();
            std::process::exit(0);
        }
    }
}

fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
