//! The guest agent: one vsock (or TCP) connection per request (see `warren_guest::proto`).
//!
//! As PID 1 the agent inherits every orphan, so one reaper thread collects every child with
//! `waitpid(-1)` and hands an exec'd process's status to the connection waiting for it. A
//! process is spawned and registered under the same lock the reaper takes, so its exit is never
//! collected before someone waits for it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use warren_guest::accounts::{
    AGENT_SOCKET_NAME, agent_folder_name, parse_groups, read_account_file, resolve_account,
};
use warren_guest::proto::{
    AGENT_PORT, Control, GuestStats, Kind, Reply, Request, agent_hello, read_frame, read_json,
    read_line, relay, write_frame, write_json,
};

/// How a process ended: (code, signal).
type Exit = (Option<i32>, Option<i32>);

fn waiters() -> &'static Mutex<HashMap<i32, Sender<Exit>>> {
    static WAITERS: OnceLock<Mutex<HashMap<i32, Sender<Exit>>>> = OnceLock::new();
    WAITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn reap_forever() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local integer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            // No children at all: look again shortly.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let exit = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            continue;
        };
        let waiter = waiters()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&pid);
        if let Some(tx) = waiter {
            let _ = tx.send(exit);
        }
    }
}

pub(crate) fn listen() -> Result<OwnedFd, String> {
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
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, AGENT_PORT),
    )
    .map_err(|e| format!("vsock bind: {e}"))?;
    listen(&fd, Backlog::new(64).map_err(|e| e.to_string())?)
        .map_err(|e| format!("vsock listen: {e}"))?;
    Ok(fd)
}

/// A TCP listener on the guest's own address (not loopback: the host reaches it over the
/// workspace's network).
pub(crate) fn listen_tcp(address: std::net::Ipv4Addr, port: u16) -> Result<OwnedFd, String> {
    std::net::TcpListener::bind((address, port))
        .map(OwnedFd::from)
        .map_err(|e| format!("tcp bind {address}:{port}: {e}"))
}

/// Whether the connection starts with the host's hello (see [`proto::agent_hello`]); answers
/// `OK` if so. Anything else, or nothing within 10 s, is refused.
fn greeted(conn: &mut File, token: &str) -> bool {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    let expected = agent_hello(token);
    let _ = setsockopt(&*conn, ReceiveTimeout, &nix::sys::time::TimeVal::new(10, 0));
    let Ok(line) = read_line(conn, expected.len()) else {
        return false;
    };
    // Compared in full, whatever differs first.
    let same = line.len() == expected.len()
        && line
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    // The requests that follow may wait as long as they like (a quiet terminal).
    same && setsockopt(&*conn, ReceiveTimeout, &nix::sys::time::TimeVal::new(0, 0)).is_ok()
        && conn.write_all(b"OK\n").is_ok()
}

/// Serves every connection to `listener` on its own thread; with a `token`, only those that
/// first send it (TCP).
pub(crate) fn serve(listener: OwnedFd, token: Option<String>) -> ! {
    std::thread::spawn(reap_forever);
    let token: Arc<Option<String>> = Arc::new(token);
    loop {
        let conn = match nix::sys::socket::accept4(
            listener.as_raw_fd(),
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        ) {
            // SAFETY: accept returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { File::from_raw_fd(fd) },
            Err(e) => {
                crate::console(&format!("agent accept: {e}"));
                continue;
            }
        };
        let token = token.clone();
        std::thread::spawn(move || {
            let mut conn = conn;
            if let Some(token) = token.as_ref()
                && !greeted(&mut conn, token)
            {
                return;
            }
            if let Err(e) = handle(conn) {
                crate::console(&format!("request failed: {e}"));
            }
        });
    }
}

fn handle(mut conn: File) -> std::io::Result<()> {
    let request: Request = read_json(&mut conn, Kind::Request)?;
    match request {
        Request::Ping => write_json(&mut conn, Kind::Reply, &Reply::Pong),
        Request::Stats => write_json(&mut conn, Kind::Reply, &Reply::Stats(stats())),
        Request::Sync => {
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
            write_json(&mut conn, Kind::Reply, &Reply::Synced)
        }
        Request::Poweroff { grace_ms } => {
            write_json(&mut conn, Kind::Reply, &Reply::PoweringOff)?;
            drop(conn);
            crate::console("stopping (asked by the host)");
            stop_everything(Duration::from_millis(grace_ms));
            crate::power_off();
        }
        Request::Connect { address } => match connect(&address) {
            Ok(stream) => started_relay(conn, stream),
            Err(message) => write_json(&mut conn, Kind::Reply, &Reply::Error { message }),
        },
        Request::ListenUnix { user } => listen_unix(conn, user.as_deref()),
        Request::Attach { id } => {
            let accepted = pending()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            match accepted {
                Some(stream) => started_relay(conn, stream),
                None => write_json(
                    &mut conn,
                    Kind::Reply,
                    &Reply::Error {
                        message: format!("no connection {id} is waiting"),
                    },
                ),
            }
        }
        Request::Exec {
            argv,
            env,
            cwd,
            land_in,
            user,
            tty,
        } => exec(conn, &argv, env, (cwd, land_in), user.as_deref(), tty),
    }
}

/// Answers `Started`, then relays `stream` over `conn` until both are done.
fn started_relay(mut conn: File, stream: impl Into<OwnedFd>) -> std::io::Result<()> {
    write_json(&mut conn, Kind::Reply, &Reply::Started)?;
    relay(conn, File::from(stream.into()), Kind::Stdin, Kind::Stdout);
    Ok(())
}

fn connect(address: &str) -> Result<TcpStream, String> {
    let addr = address
        .to_socket_addrs()
        .map_err(|e| format!("{address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address}: no address"))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to {address}: {e}"))
}

/// Connections to the sockets of [`Request::ListenUnix`], until the host attaches them.
fn pending() -> &'static Mutex<HashMap<u64, UnixStream>> {
    static PENDING: OnceLock<Mutex<HashMap<u64, UnixStream>>> = OnceLock::new();
    PENDING.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Serves one [`Request::ListenUnix`]: makes the socket, announces each connection to it, and
/// removes the socket (and the connections nobody attached) once the host closes `conn`.
fn listen_unix(mut conn: File, user: Option<&str>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail =
        |conn: &mut File, message: String| write_json(conn, Kind::Reply, &Reply::Error { message });
    let account = match resolve_account(user) {
        Ok(a) => a,
        Err(e) => return fail(&mut conn, e),
    };
    // A folder nobody else can enter: made here (mkdir never follows a planted link) and
    // only then given to the user. In /run, the guest's own tmpfs: a socket is nothing to keep
    // in the writable layer (and on a 9p root, making one there failed with ENXIO).
    let folder = loop {
        let folder = format!("/run/{}", agent_folder_name());
        match std::fs::DirBuilder::new().mode(0o700).create(&folder) {
            Ok(()) => break folder,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return fail(&mut conn, format!("cannot make a folder in /run: {e}")),
        }
    };
    let path = format!("{folder}/{AGENT_SOCKET_NAME}");
    let made = UnixListener::bind(&path).and_then(|listener| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let (uid, gid) = (Some(account.uid), Some(account.gid));
        std::os::unix::fs::lchown(&path, uid, gid)?;
        std::os::unix::fs::chown(&folder, uid, gid)?;
        Ok(listener)
    });
    let remove = || {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&folder);
    };
    let listener = match made {
        Ok(l) => l,
        Err(e) => {
            remove();
            return fail(&mut conn, format!("cannot listen on {path}: {e}"));
        }
    };
    let result = announce(&mut conn, &listener, &path);
    remove();
    result
}

/// Replies `Listening`, then an `Accepted` per connection, until the host closes `conn`.
fn announce(conn: &mut File, listener: &UnixListener, path: &str) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    write_json(
        conn,
        Kind::Reply,
        &Reply::Listening {
            path: path.to_owned(),
        },
    )?;
    let mut mine = Vec::new();
    let result = loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(e.into()),
        }
        // The host sends nothing on this connection: readable means it is gone.
        if fds[1].any().unwrap_or(true) {
            break Ok(());
        }
        if fds[0].any().unwrap_or(false) {
            let Ok((stream, _)) = listener.accept() else {
                continue;
            };
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            pending()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, stream);
            mine.push(id);
            if let Err(e) = write_json(conn, Kind::Reply, &Reply::Accepted { id }) {
                break Err(e);
            }
        }
    };
    let mut pending = pending()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for id in mine {
        pending.remove(&id);
    }
    result
}

fn stats() -> GuestStats {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    let available = field("MemAvailable:");
    let tasks = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .map(|e| std::fs::read_dir(e.path().join("task")).map_or(0, |t| t.count() as u64))
                .sum()
        })
        .unwrap_or(0);
    GuestStats {
        memory_used: total.saturating_sub(available),
        memory_total: total,
        tasks,
    }
}

/// Every process but this one: SIGTERM, then SIGKILL once `grace` is over.
fn stop_everything(grace: Duration) {
    let others = || {
        std::fs::read_dir("/proc").map_or(0, |d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|&pid| pid != 1 && !is_kernel_thread(pid))
                .count()
        })
    };
    // SAFETY: kill takes no pointers; -1 is every process but init (this one).
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while others() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    for target in ["/var/lib/docker", "/"] {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn is_kernel_thread(pid: u32) -> bool {
    // Kernel threads have an empty command line.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
}

/// Output pumps report here when their stream ends.
type Done = (Sender<()>, Receiver<()>);

fn pump(mut from: File, conn: Arc<Mutex<File>>, kind: Kind, done: Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut out = conn
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if write_frame(&mut *out, kind, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = done.send(());
    });
}

fn exec(
    mut conn: File,
    argv: &[String],
    env: Vec<String>,
    (cwd, land_in): (Option<String>, Option<String>),
    user: Option<&str>,
    tty: Option<(u16, u16)>,
) -> std::io::Result<()> {
    let fail =
        |conn: &mut File, message: String| write_json(conn, Kind::Reply, &Reply::Error { message });
    let Some(program) = argv.first() else {
        return fail(&mut conn, "no command given".into());
    };
    let account = match resolve_account(user) {
        Ok(a) => a,
        Err(e) => return fail(&mut conn, e),
    };
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap_or((e, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    for (k, v) in [
        ("HOME", account.home.as_str()),
        ("USER", account.name.as_str()),
        ("LOGNAME", account.name.as_str()),
        ("SHELL", account.shell.as_str()),
    ] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.into(), v.into()));
        }
    }
    if tty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    let is_dir = |d: &String| std::path::Path::new(d).is_dir();
    let dir = match cwd {
        Some(dir) if is_dir(&dir) => dir,
        Some(dir) => return fail(&mut conn, format!("no folder `{dir}` in the workspace")),
        None => land_in
            .filter(is_dir)
            .or_else(|| Some(account.home.clone()).filter(is_dir))
            .unwrap_or_else(|| "/".into()),
    };
    let mut command = Command::new(program);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&dir);
    let group_file = match read_account_file("/etc/group") {
        Ok(text) => text,
        Err(e) => return fail(&mut conn, e),
    };
    let groups = parse_groups(&group_file, &account.name, account.gid);
    let (uid, gid) = (account.uid, account.gid);
    let with_tty = tty.is_some();
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0
                || (with_tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0)
                || libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setresgid(gid, gid, gid) < 0
                || libc::setresuid(uid, uid, uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (done_tx, done_rx): Done = channel();
    let shared = Arc::new(Mutex::new(conn.try_clone()?));
    let mut input: Option<File> = None;
    let mut master: Option<File> = None;
    let mut pumps = 0;
    let (exit_tx, exit_rx) = channel();
    let pid = {
        let mut waiting = waiters()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let spawned = match tty {
            Some((rows, cols)) => {
                let size = nix::pty::Winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                let pty = nix::pty::openpty(Some(&size), None).map_err(std::io::Error::from)?;
                let slave = File::from(pty.slave);
                let _ = nix::unistd::fchown(
                    slave.as_raw_fd(),
                    Some(nix::unistd::Uid::from_raw(uid)),
                    None,
                );
                command
                    .stdin(Stdio::from(slave.try_clone()?))
                    .stdout(Stdio::from(slave.try_clone()?))
                    .stderr(Stdio::from(slave));
                let spawned = command.spawn();
                master = Some(File::from(pty.master));
                spawned
            }
            None => {
                command
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                command.spawn().map(|mut child| {
                    input = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
                    let outputs = [
                        (child.stdout.take().map(OwnedFd::from), Kind::Stdout),
                        (child.stderr.take().map(OwnedFd::from), Kind::Stderr),
                    ];
                    for (output, kind) in outputs {
                        if let Some(output) = output {
                            pump(File::from(output), shared.clone(), kind, done_tx.clone());
                            pumps += 1;
                        }
                    }
                    child
                })
            }
        };
        match spawned {
            Ok(child) => {
                let pid = child.id() as i32;
                // The reaper collects it; dropping `Child` neither waits nor kills.
                drop(child);
                waiting.insert(pid, exit_tx);
                pid
            }
            Err(e) => {
                drop(waiting);
                return fail(&mut conn, format!("cannot run `{program}`: {e}"));
            }
        }
    };
    // The terminal's slave end must close here, or the master never reports the end.
    drop(command);
    if let Some(m) = &master {
        pump(
            m.try_clone()?,
            shared.clone(),
            Kind::Stdout,
            done_tx.clone(),
        );
        pumps += 1;
    }
    drop(done_tx);
    {
        let mut out = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_json(&mut *out, Kind::Reply, &Reply::Started)?;
    }
    // The host's frames: input, signals, resizes. Ends when the host closes the connection.
    let mut to_child = match &master {
        Some(m) => Some(m.try_clone()?),
        None => input,
    };
    let resize_fd = master.as_ref().map(|m| m.as_raw_fd());
    let mut from_host = conn;
    std::thread::spawn(move || {
        while let Ok(Some((kind, payload))) = read_frame(&mut from_host) {
            match kind {
                Kind::Stdin if payload.is_empty() && resize_fd.is_none() => to_child = None,
                Kind::Stdin => {
                    if let Some(w) = &mut to_child {
                        let _ = w.write_all(&payload);
                    }
                }
                Kind::Control => match serde_json::from_slice::<Control>(&payload) {
                    Ok(Control::Signal(sig)) => {
                        // SAFETY: kill takes no pointers.
                        unsafe { libc::kill(pid, sig) };
                    }
                    Ok(Control::Resize { rows, cols }) => {
                        if let Some(fd) = resize_fd {
                            let size = libc::winsize {
                                ws_row: rows,
                                ws_col: cols,
                                ws_xpixel: 0,
                                ws_ypixel: 0,
                            };
                            // SAFETY: the master is open (this thread holds a clone) and
                            // `size` is a valid winsize.
                            unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) };
                        }
                    }
                    Err(_) => {}
                },
                _ => {}
            }
        }
    });
    let exit = exit_rx.recv().unwrap_or((None, Some(libc::SIGKILL)));
    // Output written just before the exit still goes first; a background process holding the
    // streams open does not hold the exit back for long.
    let deadline = Instant::now() + Duration::from_millis(500);
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    drop(master);
    let mut out = shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    write_json(
        &mut *out,
        Kind::Reply,
        &Reply::Exited {
            code: exit.0,
            signal: exit.1,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_boot_token_opens_the_agent() {
        for (sent, opens) in [
            ("WARREN 0a1b\n", true),
            ("WARREN 0a1c\n", false),
            ("WARREN 0a1\n", false),
            ("WARREN 0a1bc\n", false),
            ("", false),
        ] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            theirs.write_all(sent.as_bytes()).unwrap();
            theirs.shutdown(std::net::Shutdown::Write).unwrap();
            let mut conn = File::from(OwnedFd::from(ours));
            assert_eq!(greeted(&mut conn, "0a1b"), opens, "{sent:?}");
            drop(conn);
            // A refused connection is closed (reset if it sent more than was read): no `OK`.
            let mut answer = String::new();
            let read = theirs.read_to_string(&mut answer);
            if opens {
                read.unwrap();
            }
            assert_eq!(answer, if opens { "OK\n" } else { "" }, "{sent:?}");
        }
    }
}
