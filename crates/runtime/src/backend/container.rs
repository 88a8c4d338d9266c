//! The system-container backend: a workspace's processes are the shim's children in its
//! namespaces, reached through the shim's socket; its network through `setns`; its files
//! through `openat2` walks in its root; its use read from its cgroups.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use warren_guest::accounts::AGENT_SOCKET_NAME;

use super::{Backend, Found};
use crate::exec::set_window_size;
use crate::proto::{ANSWER_LIMIT, Channel, Reply, Request};
use crate::record::{ID_RANGE, WorkspaceRecord};
use crate::types::MadeSocket;
use crate::{
    Error, Exec, ExecIo, ExecRequest, ExitStatus, Process, Stats, WinSize, WorkspaceSocket, cgroup,
};

/// How long a forwarded connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct Container;

impl Backend for Container {
    fn exec(&self, ws: &Found<'_>, request: &ExecRequest) -> Result<Exec, Error> {
        let (id, layout) = (ws.id, ws.layout);
        let channel = Channel::connect(&layout.socket(), ANSWER_LIMIT)
            .map_err(|_| Error::NotRunning(id.to_string()))?;
        let pipe = || std::io::pipe().map_err(Error::os("pipe"));
        let (io, theirs): (Option<ExecIo>, Vec<OwnedFd>) = if request.tty.is_some() {
            (None, Vec::new())
        } else {
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            (
                Some(ExecIo::Pipes {
                    stdin: File::from(OwnedFd::from(in_w)),
                    stdout: File::from(OwnedFd::from(out_r)),
                    stderr: File::from(OwnedFd::from(err_r)),
                }),
                vec![in_r.into(), out_w.into(), err_w.into()],
            )
        };
        let fds: Vec<_> = theirs.iter().map(|f| f.as_fd()).collect();
        channel.send(&Request::Exec(request.clone()), &fds)?;
        drop(theirs);
        let argv0 = request.argv.first().cloned().unwrap_or_default();
        match channel.recv::<Reply>()? {
            Some((Reply::Started { pid }, mut fds)) => {
                // From here the connection waits for the process's exit, however long it runs.
                channel
                    .set_limit(None)
                    .map_err(|cause| Error::SupervisorLink {
                        action: "wait without a limit on",
                        cause,
                    })?;
                let (io, master) = match io {
                    Some(io) => (io, None),
                    None => {
                        let master = fds.pop().ok_or_else(|| Error::Exec {
                            argv0: argv0.clone(),
                            message: "the terminal did not arrive".into(),
                        })?;
                        let copy = master.try_clone().map_err(Error::os("dup"))?;
                        (
                            ExecIo::Pty {
                                master: File::from(master),
                            },
                            Some(copy),
                        )
                    }
                };
                Ok(Exec {
                    io,
                    process: Box::new(ShimProcess {
                        id: id.to_string(),
                        pid,
                        channel,
                        master,
                    }),
                })
            }
            Some((Reply::Error(message), _)) => Err(Error::Shim {
                id: id.to_string(),
                message,
            }),
            Some(_) | None => Err(Error::ShimGone { id: id.to_string() }),
        }
    }

    fn connect(&self, ws: &Found<'_>, to: SocketAddr) -> Result<TcpStream, Error> {
        let (id, pid) = (ws.id, ws.pid()?);
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let ns = File::open(&ns_path).map_err(Error::io("cannot open", &ns_path))?;
        // setns(CLONE_NEWNET) changes only the calling thread: a short-lived thread enters the
        // workspace's network, connects, and the socket stays in that network.
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(Error::os("setns into the workspace's network"))?;
                TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map_err(|e| Error::Shim {
                    id: id.to_string(),
                    message: format!("cannot connect to {to} ({e})"),
                })
            })
            .join()
            .map_err(|_| Error::Shim {
                id: id.to_string(),
                message: format!("connecting to {to} failed (the thread panicked)"),
            })?
        })
    }

    fn listen_unix(&self, ws: &Found<'_>, user: Option<&str>) -> Result<WorkspaceSocket, Error> {
        let (rec, pid) = (ws.rec, ws.pid()?);
        let root_path = PathBuf::from(format!("/proc/{pid}/root"));
        let root = File::open(&root_path).map_err(Error::io("cannot open", &root_path))?;
        // Every path is resolved as if the workspace's root were `/`, so a symlink planted in
        // the workspace cannot lead outside it.
        let open_inside = |path: &str, flags: OFlag| -> Result<OwnedFd, Error> {
            let how = OpenHow::new()
                .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let fd = nix::fcntl::openat2(root.as_raw_fd(), path, how).map_err(|e| {
                Error::InWorkspace {
                    action: "open",
                    path: path.to_owned(),
                    cause: e.into(),
                }
            })?;
            // SAFETY: openat2 returned a new descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let user = user.unwrap_or("root");
        // Opened without blocking and read only if a small regular file: a FIFO planted there
        // must not hold this host-root process.
        let passwd = warren_guest::accounts::read_account_fd(
            File::from(open_inside(
                "/etc/passwd",
                OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            )?),
            "/etc/passwd",
        )
        .map_err(Error::Account)?;
        let (uid, gid) = match warren_guest::accounts::parse_passwd(&passwd, user) {
            Some(account) => (account.uid, account.gid),
            None => match user.parse::<u32>() {
                Ok(uid) => (uid, uid),
                Err(_) => return Err(Error::NoUser(user.to_owned())),
            },
        };
        if uid >= ID_RANGE || gid >= ID_RANGE {
            return Err(Error::UserOutOfRange(user.to_owned()));
        }
        let owner = Some(nix::unistd::Uid::from_raw(rec.uid_base + uid));
        let group = Some(nix::unistd::Gid::from_raw(rec.uid_base + gid));
        let tmp = open_inside("/tmp", OFlag::O_DIRECTORY | OFlag::O_PATH)?;
        let folder_name = loop {
            let name = warren_guest::accounts::agent_folder_name();
            match nix::sys::stat::mkdirat(Some(tmp.as_raw_fd()), name.as_str(), Mode::S_IRWXU) {
                Ok(()) => break name,
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => {
                    return Err(Error::InWorkspace {
                        action: "make a folder in",
                        path: "/tmp".into(),
                        cause: e.into(),
                    });
                }
            }
        };
        let fd = nix::fcntl::openat(
            Some(tmp.as_raw_fd()),
            folder_name.as_str(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| Error::InWorkspace {
            action: "open",
            path: format!("/tmp/{folder_name}"),
            cause: e.into(),
        })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let folder = unsafe { OwnedFd::from_raw_fd(fd) };
        // From here on, dropping the socket removes what was made.
        let bound = std::os::unix::net::UnixListener::bind(format!(
            "/proc/self/fd/{}/{AGENT_SOCKET_NAME}",
            folder.as_raw_fd()
        ));
        let path = format!("/tmp/{folder_name}/{AGENT_SOCKET_NAME}");
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = nix::unistd::unlinkat(
                    Some(tmp.as_raw_fd()),
                    folder_name.as_str(),
                    nix::unistd::UnlinkatFlags::RemoveDir,
                );
                return Err(Error::InWorkspace {
                    action: "listen on",
                    path,
                    cause: e,
                });
            }
        };
        // Stays open as long as `socket`, which owns it.
        let folder_fd = folder.as_raw_fd();
        let socket = WorkspaceSocket {
            listener,
            path,
            made: MadeSocket::InRoot {
                folder,
                tmp,
                folder_name,
            },
        };
        nix::unistd::fchownat(
            Some(folder_fd),
            AGENT_SOCKET_NAME,
            owner,
            group,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .and_then(|()| nix::unistd::fchown(folder_fd, owner, group))
        .map_err(|e| Error::InWorkspace {
            action: "give to its user",
            path: format!("{} (`{user}`)", socket.path),
            cause: e.into(),
        })?;
        Ok(socket)
    }

    fn live_stats(&self, ws: &Found<'_>) -> Result<Stats, Error> {
        cgroup::stats(ws.rec)
    }

    fn quiesce(&self, ws: &Found<'_>) -> Result<(), Error> {
        let (id, rec, init_pid) = (ws.id, ws.rec, ws.pid()?);
        if cgroup::dirs(rec).is_empty() {
            return Err(Error::Shim {
                id: id.to_string(),
                message: "its cgroups are not found: cannot tell what runs in it".into(),
            });
        }
        // Rounds, since a process may fork while the previous round kills; killed ones are
        // reaped by init. A task that has fully exited leaves `cgroup.procs`; one listed is
        // killed even if its leader shows as a zombie (its other threads may still run).
        for _ in 0..200 {
            let alive: Vec<i32> = cgroup::processes(rec)
                .into_iter()
                .filter(|&pid| pid != init_pid)
                .collect();
            if alive.is_empty() {
                return Ok(());
            }
            for pid in alive {
                kill_if_in(rec, pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::Shim {
            id: id.to_string(),
            message: "its processes would not end".into(),
        })
    }

    fn freeze(&self, ws: &Found<'_>, frozen: bool) -> Result<(), Error> {
        cgroup::freeze(ws.rec, frozen)
    }
}

/// SIGKILL to `pid` if it is (still) a process of the workspace: through a pidfd, so a pid
/// reused by a host process since it was listed is never signalled.
fn kill_if_in(rec: &WorkspaceRecord, pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return;
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // The pidfd pins the process: checked after it is open, the membership is this process's.
    let ours = rec.cgroup_path().display().to_string();
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        text.lines().any(|l| {
            l.splitn(3, ':').nth(2).is_some_and(|path| {
                path == ours || path.strip_prefix(&ours).is_some_and(|r| r.starts_with('/'))
            })
        })
    });
    if member {
        // SAFETY: pidfd_send_signal with an open pidfd, a signal number and no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// A process in a container workspace, watched through its connection to the shim.
#[derive(Debug)]
struct ShimProcess {
    id: String,
    pid: i32,
    channel: Channel,
    /// A copy of the terminal's master, for resizing.
    master: Option<OwnedFd>,
}

impl Process for ShimProcess {
    fn wait(&self) -> Result<ExitStatus, Error> {
        loop {
            match self.channel.recv::<Reply>()? {
                Some((Reply::Exited(status), _)) => return Ok(status),
                Some(_) => continue,
                None => {
                    return Err(Error::ShimGone {
                        id: self.id.clone(),
                    });
                }
            }
        }
    }

    fn signal(&self, signal: i32) -> Result<(), Error> {
        self.channel.send(&Request::Signal(signal), &[])
    }

    fn resize(&self, size: WinSize) -> Result<(), Error> {
        let master = self.master.as_ref().ok_or_else(|| Error::Exec {
            argv0: format!("pid {}", self.pid),
            message: "the process has no terminal to resize".into(),
        })?;
        set_window_size(master.as_fd(), size).map_err(Error::os("TIOCSWINSZ"))
    }
}
