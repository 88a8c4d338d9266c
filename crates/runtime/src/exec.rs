//! Starting a process inside a running container workspace (runs in the shim).
//!
//! libcontainer 0.7's own exec ("tenant") does not enter the container's user namespace — its
//! list of namespaces to join leaves `user` out — so an exec'd process would be host root in the
//! workspace's mounts (measured: a file it wrote was owned by uid 0 on the host). Warren enters
//! the container itself:
//!
//! 1. fork A; the shim moves A into the workspace's cgroups, then lets it go on;
//! 2. A joins all of init's namespaces at once (`setns` on a pidfd: user first, so the others are
//!    joined with the workspace root's rights), then forks B, which is inside the pid namespace;
//!    A reports B's pid and exits, and B is re-parented to the shim (a child subreaper), which
//!    reaps it and reports its exit;
//! 3. B takes the requested user and groups from the workspace's own `/etc/passwd` and
//!    `/etc/group`, opens its terminal on the workspace's devpts (the master goes back to the
//!    shim over a socket) or takes the given stdin/stdout/stderr, and execs.
//!
//! The shim is single-threaded, so both forks may allocate freely.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Gid, Uid, fork};

use crate::proto::Channel;
use crate::record::WorkspaceRecord;
use crate::spec::DEFAULT_PATH;
use crate::{Error, ExecRequest, WinSize, cgroup};
use warren_guest::accounts::{parse_groups, read_account_file, resolve_account};

/// A process started in the workspace.
#[derive(Debug)]
pub(crate) struct Started {
    pub pid: i32,
    pub master: Option<OwnedFd>,
}

/// Merges environments: later entries replace earlier ones with the same key.
pub(crate) fn merge_env(layers: &[&[String]]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in layers.iter().flat_map(|l| l.iter()) {
        let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_owned(),
            None => out.push((k.to_owned(), v.to_owned())),
        }
    }
    out
}

/// Starts `request` in the workspace whose init is `init_pid`. `stdio` is required without a
/// tty (stdin, stdout, stderr) and ignored with one.
pub(crate) fn spawn(
    rec: &WorkspaceRecord,
    init_pid: i32,
    request: &ExecRequest,
    stdio: Vec<OwnedFd>,
) -> Result<Started, Error> {
    let argv0 = request
        .argv
        .first()
        .cloned()
        .ok_or_else(|| Error::InvalidConfig("an exec needs a command".into()))?;
    let fail = |message: String| Error::Exec {
        argv0: argv0.clone(),
        message,
    };
    if request.tty.is_none() && stdio.len() != 3 {
        return Err(fail("stdin, stdout and stderr must be passed".into()));
    }
    let argv: Vec<CString> = request
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|_| fail("an argument contains a NUL byte".into()))?;
    let pidfd = crate::sys::pidfd_open(init_pid)
        .ok_or_else(|| Error::NotRunning(rec.config.id.to_string()))?;
    let (go_read, go_write) = std::io::pipe().map_err(Error::os("pipe"))?;
    let (report_read, report_write) = std::io::pipe().map_err(Error::os("pipe"))?;
    let (master_here, master_there) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(Error::os("socketpair"))?;
    let env = merge_env(&[&[DEFAULT_PATH.to_owned()], &rec.config.env, &request.env]);

    // SAFETY: the shim is single-threaded, so the child may run any code before exec.
    match unsafe { fork() }.map_err(Error::os("fork"))? {
        ForkResult::Child => {
            drop((go_write, report_read, master_here));
            let plan = Plan {
                master_socket: master_there,
                stdio: &stdio,
                request,
                argv: &argv,
                env: &env,
            };
            let code = enter_and_fork(pidfd, go_read, report_write, &plan);
            // SAFETY: _exit ends this forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop((go_read, report_write, master_there, pidfd, stdio));
            let released = cgroup::add(rec, child.as_raw()).and_then(|()| {
                (&go_write)
                    .write_all(b"g")
                    .map_err(Error::os("write to the new process's start pipe"))
            });
            drop(go_write);
            let mut report = Vec::new();
            let mut reader = report_read;
            let mut pid_bytes = [0u8; 4];
            let got_pid = released.is_ok() && reader.read_exact(&mut pid_bytes).is_ok();
            let _ = waitpid(child, None);
            released?;
            let pid = i32::from_ne_bytes(pid_bytes);
            // B runs on the workspace's files until it execs: the single-threaded shim waits
            // for it only so long, then kills it, so no workspace can wedge its own shim (and
            // whoever asks that shim for anything).
            let deadline = std::time::Instant::now() + START_LIMIT;
            let master = if got_pid && request.tty.is_some() {
                let master_here = Channel(master_here);
                set_receive_timeout(&master_here, START_LIMIT);
                master_here
                    .recv::<()>()
                    .ok()
                    .flatten()
                    .and_then(|(_, fds)| fds.into_iter().next())
            } else {
                None
            };
            if !read_until_closed(&reader, &mut report, deadline) {
                if got_pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(fail(format!(
                    "the process was not started within {} s (killed): something in the \
                     workspace held it before it ran",
                    START_LIMIT.as_secs()
                )));
            }
            if !report.is_empty() || !got_pid {
                let message = String::from_utf8_lossy(&report).trim().to_owned();
                return Err(fail(if message.is_empty() {
                    "the process could not be started".into()
                } else {
                    message
                }));
            }
            if request.tty.is_some() && master.is_none() {
                return Err(fail("no terminal was opened".into()));
            }
            Ok(Started { pid, master })
        }
    }
}

/// How long a new process may take from entering the workspace to its exec.
/// Generous: a first exec may read its binary from a lazily pulled image over a slow link.
const START_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

fn set_receive_timeout(channel: &Channel, limit: std::time::Duration) {
    let limit = nix::sys::time::TimeVal::new(limit.as_secs() as _, 0);
    let _ =
        nix::sys::socket::setsockopt(channel, nix::sys::socket::sockopt::ReceiveTimeout, &limit);
}

/// Reads `pipe` to its end (every writer closed it, or exec'd); false when `deadline` passes
/// first.
fn read_until_closed(
    pipe: &std::io::PipeReader,
    into: &mut Vec<u8>,
    deadline: std::time::Instant,
) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
        match (&*pipe).read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                if into.len() < 64 * 1024 {
                    into.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// What child B needs to become the requested process.
struct Plan<'a> {
    /// Where B sends its terminal's master.
    master_socket: OwnedFd,
    stdio: &'a [OwnedFd],
    request: &'a ExecRequest,
    argv: &'a [CString],
    env: &'a [(String, String)],
}

/// Child A: waits to be put in the cgroups, joins the namespaces, forks B, reports B's pid.
fn enter_and_fork(
    pidfd: OwnedFd,
    go: std::io::PipeReader,
    mut report: std::io::PipeWriter,
    plan: &Plan<'_>,
) -> i32 {
    // Not dumpable: B runs as host root inside the workspace's pid and user namespaces until
    // it drops to the workspace's ids, and the workspace's root (CAP_SYS_PTRACE there) could
    // otherwise attach to it. The flag passes to B with the fork; exec resets it.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        let _ = write!(
            report,
            "cannot make the helper non-dumpable: {}",
            std::io::Error::last_os_error()
        );
        return 1;
    }
    let mut byte = [0u8; 1];
    if (&go).read_exact(&mut byte).is_err() {
        return 1;
    }
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: setns with a valid pidfd and namespace flags only changes this process's namespaces.
    if unsafe { libc::setns(pidfd.as_raw_fd(), flags) } != 0 {
        let _ = write!(
            report,
            "cannot enter the workspace: {}",
            std::io::Error::last_os_error()
        );
        return 1;
    }
    drop(pidfd);
    // SAFETY: still single-threaded (a fork of the single-threaded shim).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let message = exec_inside(plan);
            let _ = report.write_all(message.as_bytes());
            127
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = report.write_all(&child.as_raw().to_ne_bytes());
            0
        }
        Err(e) => {
            let _ = write!(report, "fork inside the workspace: {e}");
            1
        }
    }
}

/// Child B, inside every namespace: user, terminal or stdio, environment, exec. Returns only on
/// failure, with the message for the caller.
fn exec_inside(plan: &Plan<'_>) -> String {
    let request = plan.request;
    // The shim blocks the signals it waits for; the new process starts with none blocked.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // Joining the user namespace left this process with its host ids (host root), which are
    // unmapped there: become the workspace's root before touching any of the workspace's
    // files, so nothing it reads is read with the host's rights, and the terminal it opens
    // belongs to a mapped user.
    let root = (Gid::from_raw(0), Uid::from_raw(0));
    if nix::unistd::setresgid(root.0, root.0, root.0).is_err()
        || nix::unistd::setresuid(root.1, root.1, root.1).is_err()
    {
        return "cannot become the workspace's root".into();
    }
    // Read without blocking and refused unless a small regular file: a FIFO there must not
    // hold this process, and the shim waiting for it.
    let account = match resolve_account(request.user.as_deref()) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let group_file = match read_account_file("/etc/group") {
        Ok(text) => text,
        Err(e) => return e,
    };
    if nix::unistd::setsid().is_err() {
        return "setsid failed".into();
    }
    if request.no_network {
        if let Err(e) = warren_guest::netif::isolate_with_loopback() {
            return e;
        }
        // The workspace's root may join any namespace its user namespace owns, the sandbox's
        // network included (`nsenter -t 1 -n`): without CAP_SYS_ADMIN in its bounding set,
        // neither this process nor anything it runs (as root or through setuid) can.
        // linux/capability.h: CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21.
        const CAP_SYS_PTRACE: libc::c_int = 19;
        const CAP_SYS_ADMIN: libc::c_int = 21;
        for cap in [CAP_SYS_ADMIN, CAP_SYS_PTRACE] {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                return format!(
                    "cannot drop capability {cap} for --network=none: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    // While it still has the capabilities to (as the workspace's root).
    if let Err(e) = crate::seccomp::install() {
        return e;
    }
    let terminal = match request.tty {
        Some(size) => open_terminal(&plan.master_socket, size, account.uid)
            .map_err(|e| format!("cannot open a terminal: {e}")),
        None => install_stdio(plan.stdio),
    };
    if let Err(e) = terminal {
        return e;
    }
    let groups = parse_groups(&group_file, &account.name, account.gid);
    let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw).collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        return format!("setgroups: {e}");
    }
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    if let Err(e) = nix::unistd::setresgid(gid, gid, gid) {
        return format!("cannot become group {}: {e}", account.gid);
    }
    if let Err(e) = nix::unistd::setresuid(uid, uid, uid) {
        return format!("cannot become user {}: {e}", account.name);
    }
    let mut env = plan.env.to_vec();
    let defaults = [
        ("HOME", account.home.as_str()),
        ("USER", account.name.as_str()),
        ("LOGNAME", account.name.as_str()),
        ("SHELL", account.shell.as_str()),
    ];
    for (k, v) in defaults {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.into(), v.into()));
        }
    }
    if request.tty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    if let Some(cwd) = &request.cwd {
        if std::env::set_current_dir(cwd).is_err() {
            return format!("no folder `{cwd}` in the workspace");
        }
    } else {
        let landed = [request.land_in.as_deref(), Some(account.home.as_str())]
            .into_iter()
            .flatten()
            .any(|folder| std::env::set_current_dir(folder).is_ok());
        if !landed {
            let _ = std::env::set_current_dir("/");
        }
    }
    for (k, _) in std::env::vars_os() {
        // SAFETY: this forked child is single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::remove_var(k) };
    }
    for (k, v) in &env {
        if !k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0') {
            // SAFETY: as above, single-threaded.
            unsafe { std::env::set_var(k, v) };
        }
    }
    let err = match nix::unistd::execvp(&plan.argv[0], plan.argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    match err {
        nix::errno::Errno::ENOENT => "command not found in the workspace".into(),
        e => e.desc().to_owned(),
    }
}

/// Opens a terminal on the workspace's own devpts, sends the master to the shim, and makes the
/// slave this process's controlling terminal and stdin/stdout/stderr.
fn open_terminal(master_socket: &OwnedFd, size: WinSize, owner: u32) -> Result<(), String> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("/dev/ptmx: {e}"))?;
    grantpt(&master).map_err(|e| e.to_string())?;
    unlockpt(&master).map_err(|e| e.to_string())?;
    let name = ptsname_r(&master).map_err(|e| e.to_string())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .map_err(|e| format!("{name}: {e}"))?;
    let _ = std::os::unix::fs::fchown(&slave, Some(owner), None);
    set_window_size(slave.as_fd(), size).map_err(|e| e.to_string())?;
    Channel(master_socket.try_clone().map_err(|e| e.to_string())?)
        .send(&(), &[master.as_fd()])
        .map_err(|e| e.to_string())?;
    drop(master);
    // SAFETY: TIOCSCTTY on a terminal descriptor this process owns, right after setsid.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(format!("TIOCSCTTY: {}", std::io::Error::last_os_error()));
    }
    for target in 0..3 {
        nix::unistd::dup2(slave.as_raw_fd(), target).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Sets a terminal's size (either side of a pty).
pub(crate) fn set_window_size(
    fd: std::os::fd::BorrowedFd<'_>,
    size: WinSize,
) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the given descriptors on 0, 1 and 2 of child B (no tty).
fn install_stdio(stdio: &[OwnedFd]) -> Result<(), String> {
    for (target, fd) in stdio.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), target as i32).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_environment_wins() {
        let env = merge_env(&[
            &["PATH=/bin".into(), "A=1".into()],
            &["A=2".into(), "B".into()],
        ]);
        assert_eq!(
            env,
            vec![
                ("PATH".into(), "/bin".into()),
                ("A".into(), "2".into()),
                ("B".into(), "".into())
            ]
        );
    }
}
