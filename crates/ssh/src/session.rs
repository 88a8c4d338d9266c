//! Session channels (shell, exec, sftp) and forwarded connections, routed into a workspace.

use std::sync::Arc;
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, Sig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio_util::task::AbortOnDropHandle;
use warren_runtime::{Exec, ExecIo, ExecRequest, ExitStatus, Process, WinSize};

use crate::{Directory, Gateway, START_VARIABLE, TASK_VARIABLE, Target, User};

/// What a session channel asked to run.
#[derive(Debug)]
enum Command {
    Shell,
    Exec(String),
    Subsystem(String),
}

/// Where Debian, Fedora, Arch and Alpine keep OpenSSH's sftp server.
const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
];

/// The most a session's client may set through `env` requests.
const MAX_CLIENT_VARIABLES: usize = 64;

/// How long a process may take to end after its client left.
const HANGUP_WAIT: Duration = Duration::from_secs(5);

/// Read size for a process's output.
const OUTPUT_BUFFER: usize = 256 << 10;

/// How long a terminal's last output may take to drain after its process exited (a background
/// process may keep the terminal open forever).
const PTY_DRAIN: Duration = Duration::from_secs(1);

impl Command {
    /// The command line in the workspace, run by the user's shell as sshd does.
    fn argv(&self) -> Result<Vec<String>, String> {
        let sh = |script: String| {
            Ok(vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                script,
                "sh".to_owned(),
            ])
        };
        match self {
            // `-l`: a login shell, reading the profile (bash, dash and zsh all take it).
            Self::Shell => sh(r#"exec "${SHELL:-/bin/sh}" -l"#.to_owned()),
            Self::Exec(command) => {
                let mut argv = sh(r#"exec "${SHELL:-/bin/sh}" -c "$1""#.to_owned())?;
                argv.push(command.clone());
                Ok(argv)
            }
            Self::Subsystem(name) if name == "sftp" => {
                let candidates = SFTP_SERVERS.join(" ");
                sh(format!(
                    "for p in {candidates}; do [ -x \"$p\" ] && exec \"$p\"; done; \
                     echo 'warren: this workspace has no sftp-server (install openssh-sftp-server in its image)' >&2; exit 127"
                ))
            }
            Self::Subsystem(name) => Err(format!("no subsystem `{name}` (only sftp)")),
        }
    }
}

/// Runs one session channel to its end.
pub(crate) async fn run<D: Directory>(
    mut channel: Channel<Msg>,
    handle: Handle,
    gateway: Arc<Gateway<D>>,
    user: User,
    login: String,
    slot: crate::ChannelSlot,
) {
    // Counted as the user's session until the process ends, also when it outlives this
    // channel (a process that ignores the hang-up holds a blocking thread on).
    let slot = Arc::new(slot);
    let id = channel.id();
    let mut tty: Option<WinSize> = None;
    let mut term: Option<String> = None;
    let mut client_env: Vec<String> = Vec::new();
    let mut agent = false;
    // Requests up to the one that starts a process.
    let command = loop {
        match channel.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty {
                term: t,
                col_width,
                row_height,
                ..
            }) => {
                tty = Some(win_size(col_width, row_height));
                term = Some(t);
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) if tty.is_some() => tty = Some(win_size(col_width, row_height)),
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if client_env.len() < MAX_CLIENT_VARIABLES && valid_variable_name(&variable_name) {
                    client_env.push(format!("{variable_name}={variable_value}"));
                }
            }
            Some(ChannelMsg::AgentForward { .. }) => agent = true,
            Some(ChannelMsg::RequestShell { .. }) => break Command::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Command::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) => break Command::Subsystem(name),
            Some(_) => {}
        }
    };
    let _ = handle.channel_success(id).await;
    let wants_start = client_env
        .iter()
        .any(|v| v == &format!("{START_VARIABLE}=1"));
    let status = match prepare(&gateway, &user, &login, wants_start).await {
        Err(message) => {
            let _ = handle
                .extended_data(id, 1, format!("warren: {message}\r\n"))
                .await;
            ExitStatus::Code(255)
        }
        Ok(target) => {
            // The workspace is in use until the session's process ends.
            let _in_use = gateway.in_use(&target);
            let mut env = target.found.env.clone();
            env.extend(client_env);
            if let Some(t) = term {
                env.push(format!("TERM={t}"));
            }
            let task = env
                .iter()
                .find_map(|v| v.strip_prefix(&format!("{TASK_VARIABLE}=")))
                .map(str::to_owned);
            let session = Session {
                target,
                command,
                env,
                tty,
                agent,
                slot: slot.clone(),
            };
            let ran = match task {
                Some(task) => attach_task(&session.target, &task, &mut channel).await,
                None => session.run(&mut channel, &handle).await,
            };
            match ran {
                Ok(status) => status,
                Err(message) => {
                    let _ = handle
                        .extended_data(id, 1, format!("warren: {message}\r\n"))
                        .await;
                    ExitStatus::Code(255)
                }
            }
        }
    };
    match status {
        ExitStatus::Code(code) => {
            let _ = handle.exit_status_request(id, code as u32).await;
        }
        ExitStatus::Signal(signal) => {
            let _ = handle
                .exit_signal_request(id, sig_of(signal), false, String::new(), String::new())
                .await;
        }
    }
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

/// The workspace, running (started first if the client asked for that).
async fn prepare<D: Directory>(
    gateway: &Gateway<D>,
    user: &User,
    login: &str,
    wants_start: bool,
) -> Result<Target, String> {
    let target = gateway.workspace(user, login).await?;
    if target.found.state == "running" {
        return Ok(target);
    }
    if wants_start {
        return gateway.start(user, login).await;
    }
    Err(format!(
        "workspace `{}` is {}: start it with `warren ws start {}`, or connect with `-o SetEnv={START_VARIABLE}=1` to have it started",
        target.found.name, target.found.state, target.found.name
    ))
}

struct Session {
    target: Target,
    command: Command,
    env: Vec<String>,
    tty: Option<WinSize>,
    agent: bool,
    slot: Arc<crate::ChannelSlot>,
}

impl Session {
    async fn run(
        mut self,
        channel: &mut Channel<Msg>,
        handle: &Handle,
    ) -> Result<ExitStatus, String> {
        let argv = self.command.argv()?;
        // Shells and commands start in the project's checkout; sftp in the home folder, as
        // with sshd, so that `scp f ws.warren:` and relative paths mean what they always did.
        let land_in = match self.command {
            Command::Subsystem(_) => None,
            _ => self.target.found.folder.clone(),
        };
        let runtime = match &self.target.reach {
            crate::Reach::Local(runtime) => runtime.clone(),
            // Run by the workspace's host, through its agent.
            crate::Reach::Remote(remote) => {
                let start = warren_protocol::relay::SessionStart {
                    argv,
                    env: self.env,
                    user: self.target.found.user.clone(),
                    land_in,
                    tty: self.tty.map(|w| (w.rows, w.cols)),
                    agent: self.agent,
                };
                let stream = remote.session().await?;
                return crate::relayed::run(stream, start, channel, handle, self.slot).await;
            }
        };
        // Agent forwarding: a socket inside the workspace whose connections go back to the
        // client's agent. It lives as long as the session.
        let _agent = if self.agent {
            let runtime = runtime.clone();
            let (id, user) = (self.target.id.clone(), self.target.found.user.clone());
            let socket =
                tokio::task::spawn_blocking(move || runtime.listen_unix(&id, user.as_deref()))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("agent forwarding: {e}"))?;
            self.env.push(format!("SSH_AUTH_SOCK={}", socket.path));
            Some(AbortOnDropHandle::new(tokio::spawn(forward_agent(
                socket,
                handle.clone(),
            ))))
        } else {
            None
        };
        let request = ExecRequest {
            argv,
            env: self.env,
            cwd: None,
            land_in,
            user: self.target.found.user.clone(),
            tty: self.tty,
            no_network: false,
        };
        let id = self.target.id.clone();
        let Exec { io, process } = tokio::task::spawn_blocking(move || runtime.exec(&id, &request))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let process: Arc<dyn Process> = Arc::from(process);
        let is_pty = matches!(io, ExecIo::Pty { .. });
        let (stdin, stdout, stderr) = io
            .into_async()
            .map_err(|e| format!("process streams: {e}"))?;
        let out = tokio::spawn(copy_out(stdout, channel.make_writer()));
        let err = stderr.map(|e| tokio::spawn(copy_out(e, channel.make_writer_ext(Some(1)))));
        let (input, input_task) = feed_input(stdin);
        let mut input = Some(input);
        let waiter = process.clone();
        let slot = self.slot.clone();
        let mut exited = tokio::task::spawn_blocking(move || {
            let status = waiter.wait();
            drop(slot);
            status
        });
        let status = loop {
            tokio::select! {
                status = &mut exited => break status,
                msg = channel.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        if let Some(tx) = &input
                            && tx.send(data.to_vec()).await.is_err()
                        {
                            input = None;
                        }
                    }
                    // The client's end of input; a terminal has none of its own.
                    Some(ChannelMsg::Eof) if !is_pty => input = None,
                    Some(ChannelMsg::Signal { signal }) => {
                        if let Some(n) = signal_number(&signal) {
                            let _ = process.signal(n);
                        }
                    }
                    Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                        let _ = process.resize(win_size(col_width, row_height));
                    }
                    None | Some(ChannelMsg::Close) => {
                        // The client is gone: hang up, as a terminal closing would, and let a
                        // process that ignores it run on without this session.
                        let _ = process.signal(libc::SIGHUP);
                        input = None;
                        match tokio::time::timeout(HANGUP_WAIT, &mut exited).await {
                            Ok(status) => break status,
                            Err(_) => return Ok(ExitStatus::Signal(libc::SIGHUP)),
                        }
                    }
                    Some(_) => {}
                },
            }
        };
        drop(input);
        input_task.abort();
        let status = status
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        // Everything the process wrote goes out before its exit status.
        if is_pty {
            let _ = tokio::time::timeout(PTY_DRAIN, out).await;
        } else {
            let _ = out.await;
        }
        if let Some(err) = err {
            let _ = err.await;
        }
        Ok(status)
    }
}

/// Attaches the channel to a workspace task's terminal until the client leaves (the task keeps
/// running: that is a detach) or the task ends.
async fn attach_task(
    target: &Target,
    task: &str,
    channel: &mut Channel<Msg>,
) -> Result<ExitStatus, String> {
    let terminal: Box<dyn crate::Terminal> = match &target.reach {
        crate::Reach::Local(runtime) => {
            let runtime = runtime.clone();
            let (id, name) = (target.id.clone(), task.to_owned());
            let stream = tokio::task::spawn_blocking(move || {
                let dir = runtime.tasks_dir(&id)?;
                warren_runtime::tasks::attach(&dir, &name)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            Box::new(tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?)
        }
        crate::Reach::Remote(remote) => remote.attach(task).await?,
    };
    let (from_task, mut to_task) = tokio::io::split(terminal);
    let mut out = tokio::spawn(copy_out(from_task, channel.make_writer()));
    loop {
        tokio::select! {
            _ = &mut out => return Ok(ExitStatus::Code(0)),
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if to_task.write_all(&data).await.is_err() {
                        break;
                    }
                }
                None | Some(ChannelMsg::Close) | Some(ChannelMsg::Eof) => break,
                Some(_) => {}
            },
        }
    }
    // Detached: the task goes on without this terminal.
    out.abort();
    Ok(ExitStatus::Code(0))
}

type Input = pipe::Sender;

/// Input goes through a small queue to its own task, so a process that stops reading never
/// blocks the session from noticing its exit; the queue's bound is the back-pressure.
fn feed_input(
    mut stdin: Input,
) -> (
    tokio::sync::mpsc::Sender<Vec<u8>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let task = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if stdin.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Dropping `stdin` closes it: the process reads end of file.
    });
    (tx, task)
}

async fn copy_out(from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    // Reads as large as the client's packets (tokio's default 8 KiB copies cost a third of
    // the download throughput in `bench ssh`). A terminal's master reads EIO once the last
    // process holding the terminal is gone: that is its end of file.
    let mut from = tokio::io::BufReader::with_capacity(OUTPUT_BUFFER, from);
    let _ = tokio::io::copy_buf(&mut from, &mut to).await;
    let _ = to.flush().await;
}

/// Forwards each connection to the workspace's agent socket over a new agent channel.
async fn forward_agent(socket: warren_runtime::WorkspaceSocket, handle: Handle) {
    let listener = match socket.tokio_listener() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "agent forwarding: cannot listen");
            return;
        }
    };
    // `socket` stays alive (and its file in place) as long as this task.
    let _socket = socket;
    while let Ok((mut stream, _)) = listener.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            match handle.channel_open_agent().await {
                Ok(channel) => {
                    let mut channel = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut channel).await;
                }
                Err(e) => tracing::debug!(error = %e, "the client refused an agent channel"),
            }
        });
    }
}

/// Opens a TCP connection from inside the workspace (`ssh -L`, `ssh -D`, VS Code's tunnel);
/// on another host, that host makes it (and resolves the name).
pub(crate) async fn connect(
    target: &Target,
    host: &str,
    port: u16,
) -> Result<Box<dyn crate::Terminal>, String> {
    let runtime = match &target.reach {
        crate::Reach::Local(runtime) => runtime.clone(),
        crate::Reach::Remote(remote) => return remote.connect(host, port).await,
    };
    let address = warren_protocol::gateway::forward_address(host, port).await?;
    let id = target.id.clone();
    let stream = tokio::task::spawn_blocking(move || runtime.connect(&id, address))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    Ok(Box::new(
        tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?,
    ))
}

pub(crate) fn win_size(cols: u32, rows: u32) -> WinSize {
    WinSize {
        rows: u16::try_from(rows).unwrap_or(u16::MAX).max(1),
        cols: u16::try_from(cols).unwrap_or(u16::MAX).max(1),
    }
}

fn valid_variable_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

const SIGNALS: &[(&str, i32)] = &[
    ("ABRT", libc::SIGABRT),
    ("ALRM", libc::SIGALRM),
    ("FPE", libc::SIGFPE),
    ("HUP", libc::SIGHUP),
    ("ILL", libc::SIGILL),
    ("INT", libc::SIGINT),
    ("KILL", libc::SIGKILL),
    ("PIPE", libc::SIGPIPE),
    ("QUIT", libc::SIGQUIT),
    ("SEGV", libc::SIGSEGV),
    ("TERM", libc::SIGTERM),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("WINCH", libc::SIGWINCH),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
];

fn sig_name(sig: &Sig) -> &str {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
}

pub(crate) fn signal_number(sig: &Sig) -> Option<i32> {
    let name = sig_name(sig);
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn sig_of(number: i32) -> Sig {
    match SIGNALS.iter().find(|(_, v)| *v == number).map(|(n, _)| *n) {
        Some("ABRT") => Sig::ABRT,
        Some("ALRM") => Sig::ALRM,
        Some("FPE") => Sig::FPE,
        Some("HUP") => Sig::HUP,
        Some("ILL") => Sig::ILL,
        Some("INT") => Sig::INT,
        Some("KILL") => Sig::KILL,
        Some("PIPE") => Sig::PIPE,
        Some("QUIT") => Sig::QUIT,
        Some("SEGV") => Sig::SEGV,
        Some("TERM") => Sig::TERM,
        Some("USR1") => Sig::USR1,
        Some(name) => Sig::Custom(name.to_owned()),
        None => Sig::Custom(number.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_both_ways() {
        for (name, number) in SIGNALS {
            let sig = sig_of(*number);
            assert_eq!(sig_name(&sig), *name);
            assert_eq!(signal_number(&sig), Some(*number));
        }
        assert_eq!(signal_number(&Sig::Custom("NOPE".into())), None);
    }

    #[test]
    fn commands_run_through_the_users_shell() {
        let argv = Command::Exec("echo hi; exit 3".into()).argv().unwrap();
        assert_eq!(argv[0], "/bin/sh");
        assert_eq!(argv.last().unwrap(), "echo hi; exit 3");
        assert!(Command::Subsystem("sftp".into()).argv().unwrap()[2].contains("sftp-server"));
        let err = Command::Subsystem("netconf".into()).argv().unwrap_err();
        assert!(err.contains("netconf"), "{err}");
    }

    #[test]
    fn client_variable_names_are_checked() {
        assert!(valid_variable_name("LANG"));
        assert!(valid_variable_name("LC_ALL"));
        assert!(!valid_variable_name("1X"));
        assert!(!valid_variable_name("A=B"));
        assert!(!valid_variable_name(""));
    }
}
