//! The host's side of the guest agent: requests over `vhost-device-vsock`'s unix socket (or TCP
//! to the guest, for a VM allowed KSM), and exec'd processes relayed to the caller's pipes or
//! terminal.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren_guest::proto::{
    AGENT_PORT, AGENT_READY, Control, GuestStats, Kind, Reply, Request, agent_hello, read_frame,
    read_json, read_line, relay, write_frame, write_json,
};

use crate::types::MadeSocket;
use crate::{Error, Exec, ExecIo, ExecRequest, ExitStatus, Process, WinSize, WorkspaceSocket};

/// Where the host reaches a running VM's guest agent (written at each boot, see
/// `VmFiles::agent_addr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AgentAddr {
    /// `vhost-device-vsock`'s unix socket (`CONNECT <port>`, then `OK <port>`).
    Vsock(PathBuf),
    /// The guest's address on the workspace's network; every connection first sends the
    /// boot's token (`warren_guest::proto::agent_hello`), then `OK` comes back.
    Tcp { address: SocketAddr, token: String },
}

/// A connection to the guest agent, whichever way it came.
pub(crate) type AgentConn = socket2::Socket;

/// Opens a connection to the guest agent and sends `request`; returns the connection and the
/// first reply.
pub(crate) fn request(agent: &AgentAddr, request: &Request) -> Result<(AgentConn, Reply), Error> {
    let gone = Error::GuestSilent;
    let (mut stream, hello): (AgentConn, String) = match agent {
        AgentAddr::Vsock(uds) => (
            OwnedFd::from(UnixStream::connect(uds).map_err(gone)?).into(),
            format!("CONNECT {AGENT_PORT}\n"),
        ),
        AgentAddr::Tcp { address, token } => {
            let tcp = TcpStream::connect_timeout(address, Duration::from_secs(10)).map_err(gone)?;
            tcp.set_nodelay(true).map_err(gone)?;
            (tcp.into(), agent_hello(token))
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(gone)?;
    stream.write_all(hello.as_bytes()).map_err(gone)?;
    // `OK ...` comes back (from the device, or the guest).
    let line = read_line(&mut stream, 256).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::GuestSilent(std::io::Error::other(
                "the VM is not up yet, or its agent died",
            ))
        } else {
            gone(e)
        }
    })?;
    if !line.starts_with(b"OK") {
        return Err(Error::GuestAnswer(format!(
            "its transport refused: {}",
            String::from_utf8_lossy(&line).trim()
        )));
    }
    write_json(&mut stream, Kind::Request, request).map_err(gone)?;
    let reply: Reply = read_json(&mut stream, Kind::Reply).map_err(gone)?;
    stream.set_read_timeout(None).map_err(gone)?;
    Ok((stream, reply))
}

/// Whether the guest agent answers a ping.
pub(crate) fn ping(agent: &AgentAddr) -> bool {
    matches!(request(agent, &Request::Ping), Ok((_, Reply::Pong)))
}

pub(crate) fn stats(agent: &AgentAddr) -> Result<GuestStats, Error> {
    match request(agent, &Request::Stats)? {
        (_, Reply::Stats(stats)) => Ok(stats),
        (_, other) => Err(Error::GuestAnswer(format!("{other:?}"))),
    }
}

/// Has the guest write its page cache through to its filesystems (the shared root among
/// them); an answer later than the request's read limit (30 s) is an error.
pub(crate) fn sync(agent: &AgentAddr) -> Result<(), Error> {
    match request(agent, &Request::Sync)? {
        (_, Reply::Synced) => Ok(()),
        (_, other) => Err(Error::GuestAnswer(format!("{other:?}"))),
    }
}

/// Asks the guest to stop its processes and power off.
pub(crate) fn poweroff(agent: &AgentAddr, grace: Duration) -> Result<(), Error> {
    let grace_ms = grace.as_millis().min(u128::from(u64::MAX)) as u64;
    request(agent, &Request::Poweroff { grace_ms }).map(|_| ())
}

/// A TCP connection made inside the guest, handed over as a loopback `TcpStream` whose other
/// end this process relays.
pub(crate) fn connect(agent: &AgentAddr, to: SocketAddr) -> Result<TcpStream, Error> {
    let (stream, reply) = request(
        agent,
        &Request::Connect {
            address: to.to_string(),
        },
    )?;
    if let Reply::Error { message } = reply {
        return Err(Error::Guest(message));
    }
    let relay = Error::os("make a loopback relay");
    let listener = TcpListener::bind("127.0.0.1:0").map_err(relay)?;
    let theirs = TcpStream::connect(listener.local_addr().map_err(Error::os("getsockname"))?)
        .map_err(Error::os("connect a loopback relay"))?;
    let expected = theirs.local_addr().map_err(Error::os("getsockname"))?;
    // Only the socket just connected is accepted: another local process racing to the port
    // gets nothing.
    let ours = loop {
        let (conn, from) = listener
            .accept()
            .map_err(Error::os("accept a loopback relay"))?;
        if from == expected {
            break conn;
        }
    };
    relay_in_background(stream, ours);
    Ok(theirs)
}

/// Asks the guest for an agent-forwarding socket owned by `user` (see
/// [`Runtime::listen_unix`](crate::Runtime::listen_unix)). Each connection made to it inside
/// is attached and relayed to the returned listener, bound at `relay_at` (a path on the host
/// only root reaches).
pub(crate) fn listen_unix(
    agent: &AgentAddr,
    user: Option<&str>,
    relay_at: &Path,
) -> Result<WorkspaceSocket, Error> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;
    let (announcements, reply) = request(
        agent,
        &Request::ListenUnix {
            user: user.map(str::to_owned),
        },
    )?;
    let path = match reply {
        Reply::Listening { path } => path,
        Reply::Error { message } => return Err(Error::Guest(message)),
        other => return Err(Error::GuestAnswer(format!("{other:?}"))),
    };
    let sys = |cause| Error::Io {
        what: "cannot make the forwarding socket",
        path: relay_at.to_owned(),
        cause,
    };
    let _ = std::fs::remove_file(relay_at);
    let listener = UnixListener::bind(relay_at).map_err(sys)?;
    // From here on, dropping the socket ends the guest's listening and removes `relay_at`.
    let socket = WorkspaceSocket {
        listener,
        path,
        made: MadeSocket::InGuest {
            announcements: announcements.try_clone().map_err(Error::os("dup"))?,
            relay: relay_at.to_owned(),
        },
    };
    std::fs::set_permissions(relay_at, std::fs::Permissions::from_mode(0o600)).map_err(sys)?;
    let (agent, relay_at) = (agent.clone(), relay_at.to_owned());
    std::thread::spawn(move || {
        let mut announcements = BufReader::new(announcements);
        // Ends when the socket is dropped (its shutdown) or the guest goes away.
        while let Ok(Reply::Accepted { id }) = read_json(&mut announcements, Kind::Reply) {
            let attached = request(&agent, &Request::Attach { id }).and_then(|(guest, reply)| {
                if reply != Reply::Started {
                    return Err(Error::GuestAnswer(format!("{reply:?}")));
                }
                let host = UnixStream::connect(&relay_at)
                    .map_err(Error::io("cannot connect to", &relay_at))?;
                Ok((guest, host))
            });
            match attached {
                Ok((guest, host)) => relay_in_background(guest, host),
                Err(e) => tracing::warn!(error = %e, "an agent-forwarding connection was lost"),
            }
        }
    });
    Ok(socket)
}

/// Relays `raw` over the agent's connection `agent` (started already) on a thread of its own.
fn relay_in_background(agent: AgentConn, raw: impl Into<OwnedFd> + Send + 'static) {
    std::thread::spawn(move || {
        relay(
            File::from(OwnedFd::from(agent)),
            File::from(raw.into()),
            Kind::Stdout,
            Kind::Stdin,
        );
    });
}

#[derive(Debug, Default)]
struct ExitSlot {
    status: Mutex<Option<Result<ExitStatus, String>>>,
    changed: Condvar,
}

#[derive(Debug)]
struct VmProcess {
    control: Mutex<AgentConn>,
    exit: Arc<ExitSlot>,
}

impl Process for VmProcess {
    fn wait(&self) -> Result<ExitStatus, Error> {
        let mut slot = self
            .exit
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while slot.is_none() {
            slot = self
                .exit
                .changed
                .wait(slot)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        match slot.clone() {
            Some(Ok(status)) => Ok(status),
            Some(Err(message)) => Err(Error::Guest(message)),
            None => Err(Error::GuestAnswer("no exit status".into())),
        }
    }

    fn signal(&self, signal: i32) -> Result<(), Error> {
        self.send(&Control::Signal(signal))
    }

    fn resize(&self, size: WinSize) -> Result<(), Error> {
        self.send(&Control::Resize {
            rows: size.rows,
            cols: size.cols,
        })
    }
}

impl VmProcess {
    fn send(&self, control: &Control) -> Result<(), Error> {
        let mut stream = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_json(&mut *stream, Kind::Control, control).map_err(Error::GuestSilent)
    }
}

/// Starts `request` in the guest with the complete environment `env`.
pub(crate) fn exec(
    agent: &AgentAddr,
    request: &ExecRequest,
    env: Vec<String>,
) -> Result<Exec, Error> {
    let argv0 = request.argv.first().cloned().unwrap_or_default();
    if request.no_network {
        return Err(Error::Exec {
            argv0,
            message: "a process with no network runs only in a container".into(),
        });
    }
    let (stream, reply) = self::request(
        agent,
        &Request::Exec {
            argv: request.argv.clone(),
            env,
            cwd: request.cwd.clone(),
            land_in: request.land_in.clone(),
            user: request.user.clone(),
            tty: request.tty.map(|t| (t.rows, t.cols)),
        },
    )?;
    match reply {
        Reply::Started => {}
        Reply::Error { message } => return Err(Error::Exec { argv0, message }),
        other => return Err(Error::GuestAnswer(format!("{other:?}"))),
    }
    let exit = Arc::new(ExitSlot::default());
    let control = stream.try_clone().map_err(Error::os("dup"))?;
    // (caller's io, where guest output goes, where caller input comes from)
    let (io, out, err, input): (ExecIo, File, Option<File>, File) = if request.tty.is_some() {
        // A real terminal for the caller; its slave side, raw, is this end of the relay.
        let pty = nix::pty::openpty(None, None).map_err(Error::os("openpty"))?;
        let slave = File::from(pty.slave);
        let mut raw = nix::sys::termios::tcgetattr(&slave).map_err(Error::os("tcgetattr"))?;
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &raw)
            .map_err(Error::os("tcsetattr"))?;
        (
            ExecIo::Pty {
                master: File::from(pty.master),
            },
            slave.try_clone().map_err(Error::os("dup"))?,
            None,
            slave,
        )
    } else {
        let (in_r, in_w) = std::io::pipe().map_err(Error::os("pipe"))?;
        let (out_r, out_w) = std::io::pipe().map_err(Error::os("pipe"))?;
        let (err_r, err_w) = std::io::pipe().map_err(Error::os("pipe"))?;
        (
            ExecIo::Pipes {
                stdin: File::from(OwnedFd::from(in_w)),
                stdout: File::from(OwnedFd::from(out_r)),
                stderr: File::from(OwnedFd::from(err_r)),
            },
            File::from(OwnedFd::from(out_w)),
            Some(File::from(OwnedFd::from(err_w))),
            File::from(OwnedFd::from(in_r)),
        )
    };
    let tty = request.tty.is_some();
    // Caller input -> guest.
    let mut to_guest = stream.try_clone().map_err(Error::os("dup"))?;
    let ended = exit.clone();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let mut input = input;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Wake up now and then to let go of the input once the process has ended: a
            // terminal's caller sees its end only when every slave handle is closed.
            let mut fds = [nix::poll::PollFd::new(
                input.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
            if ended
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some()
            {
                break;
            }
            if !matches!(ready, Ok(n) if n > 0) {
                continue;
            }
            match input.read(&mut buf) {
                Ok(0) | Err(_) => {
                    if !tty {
                        let _ = write_frame(&mut to_guest, Kind::Stdin, &[]);
                    }
                    break;
                }
                Ok(n) => {
                    if write_frame(&mut to_guest, Kind::Stdin, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    // Guest output and the exit -> caller.
    let slot = exit.clone();
    std::thread::spawn(move || {
        let mut from_guest = BufReader::with_capacity(256 * 1024, stream);
        let (mut out, mut err) = (Some(out), err);
        let result = loop {
            match read_frame(&mut from_guest) {
                Ok(Some((Kind::Stdout, data))) => {
                    if let Some(w) = &mut out
                        && w.write_all(&data).is_err()
                    {
                        out = None;
                    }
                }
                Ok(Some((Kind::Stderr, data))) => {
                    if let Some(w) = &mut err
                        && w.write_all(&data).is_err()
                    {
                        err = None;
                    }
                }
                Ok(Some((Kind::Reply, payload))) => {
                    break match serde_json::from_slice::<Reply>(&payload) {
                        Ok(Reply::Exited {
                            signal: Some(s), ..
                        }) => Ok(ExitStatus::Signal(s)),
                        Ok(Reply::Exited { code, .. }) => Ok(ExitStatus::Code(code.unwrap_or(0))),
                        Ok(other) => Err(format!("unexpected answer {other:?}")),
                        Err(e) => Err(e.to_string()),
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    break Err("the VM went away before the process ended".to_owned());
                }
            }
        };
        // The caller's streams end before the status is known, as with a local process.
        drop(out);
        drop(err);
        let _ = from_guest.get_ref().shutdown(std::net::Shutdown::Both);
        let mut status = slot
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *status = Some(result);
        slot.changed.notify_all();
    });
    Ok(Exec {
        io,
        process: Box::new(VmProcess {
            control: Mutex::new(control),
            exit,
        }),
    })
}

/// Waits until the guest agent answers, the VM process dies, or `limit` passes.
pub(crate) fn wait_for_agent(
    agent: &AgentAddr,
    console: &Path,
    limit: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    let listening = || {
        crate::sys::read_tenant_file(console, 1 << 20).is_some_and(|c| {
            c.windows(AGENT_READY.len())
                .any(|w| w == AGENT_READY.as_bytes())
        })
    };
    loop {
        let ready = match agent {
            AgentAddr::Vsock(uds) => uds.exists(),
            AgentAddr::Tcp { .. } => true,
        };
        if ready && listening() && ping(agent) {
            return Ok(());
        }
        if !alive() {
            return Err("the VM exited while booting".into());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "its guest agent did not answer within {} s",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
