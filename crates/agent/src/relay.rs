//! The host's side of a relayed SSH session ([`warren_protocol::relay`]): the gateway of any
//! server reaches a workspace on this host through the tunnel, and this runs the session's
//! process here, as the gateway runs one on its own host — its output and exit status back as
//! frames, the client's input, signals and window sizes to it, and agent forwarding through
//! a socket in the workspace whose connections travel in the same stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use warren_protocol::relay::{Exit, Frame, MAX_DATA, SessionStart, carry_agent_connection};
use warren_runtime::{ExecIo, ExecRequest, ExitStatus, Process, Runtime, WinSize, WorkspaceId};

/// How long the gateway may take to say what to run.
const START_WITHIN: Duration = Duration::from_secs(10);
/// How long a terminal's last output may take to drain after its process exited.
const PTY_DRAIN: Duration = Duration::from_secs(1);
/// Frames queued for the gateway; past it, readers wait (the tunnel's flow control).
const QUEUED_FRAMES: usize = 64;
/// Agent connections one session may hold open at once.
const MOST_AGENT_CONNECTIONS: usize = 16;

/// Serves one relayed session: `body` carries the gateway's frames, the answer the host's.
pub(crate) async fn serve(runtime: Arc<dyn Runtime>, id: WorkspaceId, body: Body) -> Response {
    let mut input = tokio_util::io::StreamReader::new(
        body.into_data_stream()
            .map(|r| r.map_err(std::io::Error::other)),
    );
    // Encoded frames for the gateway; an empty one (no frame is) ends the answer, even while
    // agent connections still hold senders.
    let (out, queued) = mpsc::channel::<Vec<u8>>(QUEUED_FRAMES);
    tokio::spawn(async move {
        let done = match tokio::time::timeout(START_WITHIN, Frame::read(&mut input)).await {
            Ok(Ok(Some(Frame::Start(start)))) => run(runtime, id, start, input, out.clone()).await,
            Ok(Ok(_)) => Err("a relayed session must start with what it runs".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no session start within {START_WITHIN:?}")),
        };
        if let Err(why) = done {
            let _ = out.send(Frame::Failed(why).encode()).await;
        }
        let _ = out.send(Vec::new()).await;
    });
    let frames = futures_util::stream::unfold(queued, |mut queued| async move {
        match queued.recv().await {
            Some(frame) if !frame.is_empty() => Some((Ok::<_, std::io::Error>(frame), queued)),
            _ => None,
        }
    });
    Body::from_stream(frames).into_response()
}

/// Runs the session's process to its end; its exit goes out as the last frame.
async fn run(
    runtime: Arc<dyn Runtime>,
    id: WorkspaceId,
    start: SessionStart,
    mut input: impl AsyncRead + Unpin + Send + 'static,
    out: mpsc::Sender<Vec<u8>>,
) -> Result<(), String> {
    let mut env = start.env;
    // Agent forwarding: a socket inside the workspace for as long as the session.
    let agents: AgentConnections = Arc::default();
    let _agent = if start.agent {
        let (rt, ws, user) = (runtime.clone(), id.clone(), start.user.clone());
        let socket = tokio::task::spawn_blocking(move || rt.listen_unix(&ws, user.as_deref()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("agent forwarding: {e}"))?;
        env.push(format!("SSH_AUTH_SOCK={}", socket.path));
        Some(AbortOnDropHandle::new(tokio::spawn(accept_agents(
            socket,
            agents.clone(),
            out.clone(),
        ))))
    } else {
        None
    };
    let request = ExecRequest {
        argv: start.argv,
        env,
        cwd: None,
        land_in: start.land_in,
        user: start.user,
        tty: start.tty.map(|(rows, cols)| WinSize { rows, cols }),
        no_network: false,
    };
    let (rt, ws) = (runtime.clone(), id.clone());
    let exec = tokio::task::spawn_blocking(move || rt.exec(&ws, &request))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let process: Arc<dyn Process> = Arc::from(exec.process);
    let is_pty = matches!(exec.io, ExecIo::Pty { .. });
    let (stdin, stdout, stderr) = exec
        .io
        .into_async()
        .map_err(|e| format!("process streams: {e}"))?;
    let output = tokio::spawn(send_output(stdout, out.clone(), Frame::output));
    let errors = stderr.map(|e| tokio::spawn(send_output(e, out.clone(), Frame::error_output)));
    let (typed, mut typing) = mpsc::channel::<Vec<u8>>(16);
    let input_task = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut stdin = stdin;
        while let Some(chunk) = typing.recv().await {
            if stdin.write_all(&chunk).await.is_err() {
                return;
            }
        }
    }));
    let waiter = process.clone();
    let mut exited = tokio::task::spawn_blocking(move || waiter.wait());
    let mut typed = Some(typed);
    let status = loop {
        tokio::select! {
            status = &mut exited => break status,
            frame = Frame::read(&mut input) => match frame {
                Ok(Some(Frame::Input(data))) => {
                    if let Some(tx) = &typed
                        && tx.send(data).await.is_err()
                    {
                        typed = None;
                    }
                }
                Ok(Some(Frame::InputEnd)) if !is_pty => typed = None,
                Ok(Some(Frame::Signal(n))) => {
                    let _ = process.signal(n);
                }
                Ok(Some(Frame::Resize { rows, cols })) => {
                    let _ = process.resize(WinSize { rows: rows.max(1), cols: cols.max(1) });
                }
                Ok(Some(Frame::AgentData(n, data))) => {
                    let to = agents.lock().ok().and_then(|a| a.get(&n).map(|c| c.to.clone()));
                    if let Some(to) = to {
                        let _ = to.send(data).await;
                    }
                }
                // The client closed it (or refused it): the connection ends here too.
                Ok(Some(Frame::AgentClose(n))) => {
                    let gone = agents.lock().ok().and_then(|mut a| a.remove(&n));
                    if let Some(connection) = gone {
                        connection.task.abort();
                    }
                }
                Ok(Some(_)) => {}
                // The gateway is gone: hang up, as a closing terminal would; a process that
                // ignores it runs on, and the gateway counts the session until it ends.
                Ok(None) | Err(_) => {
                    let _ = process.signal(libc::SIGHUP);
                    typed = None;
                    break (&mut exited).await;
                }
            },
        }
    };
    drop(typed);
    drop(input_task);
    let status = status
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // Everything the process wrote goes out before its exit status.
    if is_pty {
        let _ = tokio::time::timeout(PTY_DRAIN, output).await;
    } else {
        let _ = output.await;
    }
    if let Some(errors) = errors {
        let _ = errors.await;
    }
    let exit = match status {
        ExitStatus::Code(c) => Exit::Code(c),
        ExitStatus::Signal(s) => Exit::Signal(s),
    };
    let _ = out.send(Frame::Exited(exit).encode()).await;
    Ok(())
}

/// Reads `from` to its end (a terminal's EIO included), each piece a frame made by `frame`.
async fn send_output(
    mut from: impl AsyncRead + Unpin,
    out: mpsc::Sender<Vec<u8>>,
    frame: fn(&[u8]) -> Vec<u8>,
) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                for piece in buf[..n].chunks(MAX_DATA) {
                    if out.send(frame(piece)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// A session's open agent connections, by number: what the gateway sends each, and its task.
type AgentConnections = Arc<std::sync::Mutex<HashMap<u32, AgentConnection>>>;

struct AgentConnection {
    to: mpsc::Sender<Vec<u8>>,
    task: tokio::task::AbortHandle,
}

/// Numbers each connection to the session's agent socket, tells the gateway, and carries its
/// bytes both ways; at most [`MOST_AGENT_CONNECTIONS`] at once (one more is closed at once).
async fn accept_agents(
    socket: warren_runtime::WorkspaceSocket,
    agents: AgentConnections,
    out: mpsc::Sender<Vec<u8>>,
) {
    let listener = match socket.tokio_listener() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "agent forwarding: cannot listen");
            return;
        }
    };
    // `socket` stays alive (and its file in place) as long as this task.
    let _socket = socket;
    let slots = Arc::new(tokio::sync::Semaphore::new(MOST_AGENT_CONNECTIONS));
    let mut next = 0u32;
    // Aborted with this task: the connections end with the session.
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        next = next.wrapping_add(1);
        let n = next;
        let (to_agent, for_agent) = mpsc::channel::<Vec<u8>>(16);
        let (reading, writing) = stream.into_split();
        let (out_here, agents_here) = (out.clone(), agents.clone());
        let task = connections.spawn(async move {
            let _slot = slot;
            carry_agent_connection(n, reading, writing, for_agent, out_here).await;
            if let Ok(mut a) = agents_here.lock() {
                a.remove(&n);
            }
        });
        if let Ok(mut a) = agents.lock() {
            a.insert(n, AgentConnection { to: to_agent, task });
        }
        if out.send(Frame::AgentOpen(n).encode()).await.is_err() {
            return;
        }
    }
}
