//! A session channel relayed to a workspace on another host ([`warren_protocol::relay`]): the
//! client's channel on one side, the host's frames on the other, through the tunnel of that
//! host's agent. The host runs the process; this moves the client's input, signals and window
//! sizes there and the process's output and exit back, and opens an agent channel to the client
//! for each connection to the session's agent socket there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;
use warren_protocol::relay::{
    AGENT_READ, Exit, Frame, MAX_DATA, SessionStart, carry_agent_connection,
};
use warren_runtime::ExitStatus;

use crate::Terminal;

/// How long the host may take to end the process after the client left.
const HANGUP_WAIT: Duration = Duration::from_secs(5);
/// Agent connections one session may hold open at once.
const MOST_AGENT_CONNECTIONS: usize = 16;
/// How many agent frames (each at most [`AGENT_READ`]) wait for one agent channel: a host
/// cannot make the gateway hold more.
const AGENT_QUEUE: usize = 4;
/// How long a frame may wait for the host to read.
const SEND_WITHIN: Duration = Duration::from_secs(60);

/// Runs `start` through `stream` (a relayed session opened on the workspace's host) to its
/// end, with the client on `channel`; answers how the process ended.
pub(crate) async fn run(
    stream: Box<dyn Terminal>,
    start: SessionStart,
    channel: &mut Channel<Msg>,
    handle: &Handle,
    slot: Arc<crate::ChannelSlot>,
) -> Result<ExitStatus, String> {
    let is_pty = start.tty.is_some();
    let (from_host, mut to_host) = tokio::io::split(stream);
    let (frames, mut sending) = mpsc::channel::<Vec<u8>>(32);
    let writer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(bytes) = sending.recv().await {
            if to_host.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to_host.shutdown().await;
    }));
    // A host that stops reading gets no more of the session than its queue: past a while, the
    // session ends.
    let send = |frame: Vec<u8>| {
        let frames = frames.clone();
        async move {
            matches!(
                tokio::time::timeout(SEND_WITHIN, frames.send(frame)).await,
                Ok(Ok(()))
            )
        }
    };
    let stalled = || "the workspace's host stopped reading the session".to_owned();
    if !send(Frame::Start(start).encode()).await {
        return Err(stalled());
    }
    let (ended, mut ending) = oneshot::channel();
    let reader = AbortOnDropHandle::new(tokio::spawn(read_host(
        from_host,
        channel.make_writer(),
        channel.make_writer_ext(Some(1)),
        handle.clone(),
        frames.clone(),
        ended,
    )));
    let gone = || "the workspace's host ended the session without its exit status".to_owned();
    loop {
        tokio::select! {
            status = &mut ending => return status.unwrap_or_else(|_| Err(gone())),
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    for piece in data.chunks(MAX_DATA) {
                        if !send(Frame::input(piece)).await {
                            return Err(stalled());
                        }
                    }
                }
                // The client's end of input; a terminal has none of its own.
                Some(ChannelMsg::Eof) if !is_pty => {
                    send(Frame::InputEnd.encode()).await;
                }
                Some(ChannelMsg::Signal { signal }) => {
                    if let Some(n) = crate::session::signal_number(&signal) {
                        send(Frame::Signal(n).encode()).await;
                    }
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let size = crate::session::win_size(col_width, row_height);
                    send(Frame::Resize { rows: size.rows, cols: size.cols }.encode()).await;
                }
                None | Some(ChannelMsg::Close) => {
                    // The client is gone: the host hangs up on the process, which may run on;
                    // it counts as the user's session until it ends there.
                    send(Frame::Signal(libc::SIGHUP).encode()).await;
                    return match tokio::time::timeout(HANGUP_WAIT, &mut ending).await {
                        Ok(Ok(status)) => status,
                        Ok(Err(_)) => Err(gone()),
                        Err(_) => {
                            tokio::spawn(async move {
                                let _held = (slot, writer, reader);
                                let _ = ending.await;
                            });
                            Ok(ExitStatus::Signal(libc::SIGHUP))
                        }
                    };
                }
                Some(_) => {}
            },
        }
    }
}

/// Reads the host's frames: output to the client (all of it before the exit), agent
/// connections opened to the client, and at last how the process ended, sent to `ended`.
async fn read_host(
    mut from: impl AsyncRead + Unpin,
    mut out: impl AsyncWrite + Unpin,
    mut err: impl AsyncWrite + Unpin,
    handle: Handle,
    frames: mpsc::Sender<Vec<u8>>,
    ended: oneshot::Sender<Result<ExitStatus, String>>,
) {
    let mut agents: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    // Aborted with this task: the session's agent connections end with it.
    let mut connections = tokio::task::JoinSet::new();
    let result = loop {
        match Frame::read(&mut from).await {
            // A client that stopped reading loses output, not the session.
            Ok(Some(Frame::Output(data))) => {
                let _ = out.write_all(&data).await;
            }
            Ok(Some(Frame::ErrorOutput(data))) => {
                let _ = err.write_all(&data).await;
            }
            Ok(Some(Frame::Exited(Exit::Code(code)))) => break Ok(ExitStatus::Code(code)),
            Ok(Some(Frame::Exited(Exit::Signal(signal)))) => break Ok(ExitStatus::Signal(signal)),
            Ok(Some(Frame::Failed(why))) => break Err(printable(&why)),
            Ok(Some(Frame::AgentOpen(n))) => {
                if agents.len() >= MOST_AGENT_CONNECTIONS || agents.contains_key(&n) {
                    let _ = frames.send(Frame::AgentClose(n).encode()).await;
                    continue;
                }
                let (to_agent, for_agent) = mpsc::channel(AGENT_QUEUE);
                agents.insert(n, to_agent);
                connections.spawn(agent_connection(
                    n,
                    handle.clone(),
                    for_agent,
                    frames.clone(),
                ));
            }
            Ok(Some(Frame::AgentData(n, data))) if data.len() > AGENT_READ => {
                agents.remove(&n);
                let _ = frames.send(Frame::AgentClose(n).encode()).await;
            }
            Ok(Some(Frame::AgentData(n, data))) => {
                if let Some(to_agent) = agents.get(&n) {
                    let _ = to_agent.send(data).await;
                }
            }
            Ok(Some(Frame::AgentClose(n))) => {
                agents.remove(&n);
            }
            // What only a gateway sends.
            Ok(Some(_)) => {}
            Ok(None) => {
                break Err("the workspace's host ended the session without its exit status".into());
            }
            Err(e) => break Err(format!("the workspace's host: {e}")),
        }
    };
    let _ = out.flush().await;
    let _ = err.flush().await;
    let _ = ended.send(result);
}

/// One connection to the agent socket on the host, carried to a new agent channel of the
/// client's: `for_agent` is what the host's side sent, what the client's agent answers goes
/// back as frames.
async fn agent_connection(
    n: u32,
    handle: Handle,
    for_agent: mpsc::Receiver<Vec<u8>>,
    frames: mpsc::Sender<Vec<u8>>,
) {
    let channel = match handle.channel_open_agent().await {
        Ok(channel) => channel,
        Err(e) => {
            tracing::debug!(error = %e, "the client refused an agent channel");
            let _ = frames.send(Frame::AgentClose(n).encode()).await;
            return;
        }
    };
    let (reading, writing) = tokio::io::split(channel.into_stream());
    carry_agent_connection(n, reading, writing, for_agent, frames).await;
}

/// What a host says, fit for a terminal: no control characters but line ends, at most 1 KiB.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|&c| c == '\n' || !c.is_control())
        .take(1024)
        .collect()
}
