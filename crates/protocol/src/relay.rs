//! An SSH session relayed to a workspace on another host (a shell, a command, sftp, with agent
//! forwarding): one both-ways byte stream through that host's tunnel, carrying [`Frame`]s. The
//! gateway sends [`Frame::Start`] first, then the client's input, signals and window sizes; the
//! host answers with the process's output and, last, how it ended. Agent forwarding rides the
//! same stream: each connection to the socket in the workspace is numbered by the host
//! ([`Frame::AgentOpen`]) and its bytes travel both ways as [`Frame::AgentData`].
//!
//! A frame is one byte of kind, four of length (big-endian) and the payload, at most
//! [`MAX_FRAME`] bytes: neither side holds more of a frame than that, whatever the other sends.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The largest payload a frame may have.
pub const MAX_FRAME: usize = 1 << 20;

/// What the session runs, as whom, with which terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// The user inside the workspace (root when absent).
    pub user: Option<String>,
    /// Where the session lands if the workspace has that folder (else the user's home).
    #[serde(default)]
    pub land_in: Option<String>,
    /// A terminal of this size (rows, columns), or pipes.
    pub tty: Option<(u16, u16)>,
    /// Whether to make an agent socket (`SSH_AUTH_SOCK`) forwarded to the client.
    pub agent: bool,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // The gateway's.
    Start(SessionStart),
    Input(Vec<u8>),
    /// The client's end of input.
    InputEnd,
    Signal(i32),
    Resize {
        rows: u16,
        cols: u16,
    },
    // The host's.
    Output(Vec<u8>),
    ErrorOutput(Vec<u8>),
    Exited(Exit),
    /// The process could not be started, and why.
    Failed(String),
    /// A new connection to the session's agent socket.
    AgentOpen(u32),
    // Both ways.
    AgentData(u32, Vec<u8>),
    AgentClose(u32),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Start(_) => 1,
            Frame::Input(_) => 2,
            Frame::InputEnd => 3,
            Frame::Signal(_) => 4,
            Frame::Resize { .. } => 5,
            Frame::Output(_) => 10,
            Frame::ErrorOutput(_) => 11,
            Frame::Exited(_) => 12,
            Frame::Failed(_) => 13,
            Frame::AgentOpen(_) => 14,
            Frame::AgentData(..) => 20,
            Frame::AgentClose(_) => 21,
        }
    }

    /// The frame as sent. A payload over [`MAX_FRAME`] is the sender's bug: callers split data
    /// into pieces of at most [`MAX_DATA`].
    pub fn encode(&self) -> Vec<u8> {
        let small: Vec<u8>;
        let payload: &[u8] = match self {
            // The bulk of a session: copied once, from where it is.
            Frame::Input(data) | Frame::Output(data) | Frame::ErrorOutput(data) => data,
            Frame::Failed(why) => why.as_bytes(),
            other => {
                small = match other {
                    Frame::Start(start) => serde_json::to_vec(start).unwrap_or_default(),
                    Frame::Signal(n) => n.to_be_bytes().to_vec(),
                    Frame::Resize { rows, cols } => {
                        [rows.to_be_bytes(), cols.to_be_bytes()].concat()
                    }
                    Frame::Exited(Exit::Code(c)) => [&[0u8][..], &c.to_be_bytes()].concat(),
                    Frame::Exited(Exit::Signal(s)) => [&[1u8][..], &s.to_be_bytes()].concat(),
                    Frame::AgentOpen(n) | Frame::AgentClose(n) => n.to_be_bytes().to_vec(),
                    Frame::AgentData(n, data) => [&n.to_be_bytes()[..], data].concat(),
                    _ => Vec::new(),
                };
                &small
            }
        };
        encoded(self.kind(), payload)
    }

    /// [`Frame::Input`] of `data`, encoded from the slice (one copy, where building the frame
    /// first makes two).
    pub fn input(data: &[u8]) -> Vec<u8> {
        encoded(2, data)
    }

    /// [`Frame::Output`] of `data`, encoded from the slice.
    pub fn output(data: &[u8]) -> Vec<u8> {
        encoded(10, data)
    }

    /// [`Frame::ErrorOutput`] of `data`, encoded from the slice.
    pub fn error_output(data: &[u8]) -> Vec<u8> {
        encoded(11, data)
    }

    /// The next frame from `from`; `None` at a clean end of the stream (between frames).
    pub async fn read(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 5];
        match from.read_exact(&mut head[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        from.read_exact(&mut head[1..]).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(invalid(format!("a frame of {len} bytes")));
        }
        // Filled as it arrives, never zeroed first: a session's bulk passes through here.
        let mut payload = Vec::with_capacity(len);
        (&mut *from)
            .take(len as u64)
            .read_to_end(&mut payload)
            .await?;
        if payload.len() < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Frame::decode(head[0], payload).map(Some)
    }

    fn decode(kind: u8, payload: Vec<u8>) -> std::io::Result<Frame> {
        let int = |p: &[u8]| -> std::io::Result<[u8; 4]> {
            p.try_into()
                .map_err(|_| invalid(format!("frame {kind}: {} bytes", p.len())))
        };
        Ok(match kind {
            1 => Frame::Start(
                serde_json::from_slice(&payload)
                    .map_err(|e| invalid(format!("a session's start: {e}")))?,
            ),
            2 => Frame::Input(payload),
            3 => Frame::InputEnd,
            4 => Frame::Signal(i32::from_be_bytes(int(&payload)?)),
            5 => match payload[..] {
                [r0, r1, c0, c1] => Frame::Resize {
                    rows: u16::from_be_bytes([r0, r1]),
                    cols: u16::from_be_bytes([c0, c1]),
                },
                _ => return Err(invalid("a resize of the wrong length".into())),
            },
            10 => Frame::Output(payload),
            11 => Frame::ErrorOutput(payload),
            12 => match payload.split_first() {
                Some((0, n)) => Frame::Exited(Exit::Code(i32::from_be_bytes(int(n)?))),
                Some((1, n)) => Frame::Exited(Exit::Signal(i32::from_be_bytes(int(n)?))),
                _ => return Err(invalid("an exit of no known kind".into())),
            },
            13 => Frame::Failed(String::from_utf8_lossy(&payload).into_owned()),
            14 => Frame::AgentOpen(u32::from_be_bytes(int(&payload)?)),
            20 if payload.len() >= 4 => {
                let n = u32::from_be_bytes(int(&payload[..4])?);
                Frame::AgentData(n, payload[4..].to_vec())
            }
            21 => Frame::AgentClose(u32::from_be_bytes(int(&payload)?)),
            other => return Err(invalid(format!("a frame of unknown kind {other}"))),
        })
    }
}

/// Carries agent connection `n` both ways until either side ends it: what arrives in
/// `for_agent` (the other side's [`Frame::AgentData`]) is written to `writing`, what `reading`
/// yields goes out as frames on `frames`, ended by [`Frame::AgentClose`]. The host runs it for
/// a connection to the session's agent socket, the gateway for the client's agent channel.
pub async fn carry_agent_connection(
    n: u32,
    mut reading: impl AsyncRead + Unpin,
    mut writing: impl tokio::io::AsyncWrite + Unpin,
    mut for_agent: tokio::sync::mpsc::Receiver<Vec<u8>>,
    frames: tokio::sync::mpsc::Sender<Vec<u8>>,
) {
    use tokio::io::AsyncWriteExt as _;
    let write = async {
        while let Some(data) = for_agent.recv().await {
            if writing.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = writing.shutdown().await;
    };
    let read = async {
        let mut buf = vec![0u8; AGENT_READ];
        while let Ok(got @ 1..) = reading.read(&mut buf).await {
            if frames
                .send(Frame::AgentData(n, buf[..got].to_vec()).encode())
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = frames.send(Frame::AgentClose(n).encode()).await;
    };
    tokio::join!(write, read);
}

/// How much of an agent connection one [`Frame::AgentData`] carries: the most either side
/// accepts in one.
pub const AGENT_READ: usize = 64 << 10;

/// The most data one frame carries (the rest of [`MAX_FRAME`] is room for a header).
pub const MAX_DATA: usize = MAX_FRAME - 16;

/// A frame of `kind` carrying `payload`: kind, length, payload.
fn encoded(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("relayed session: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_read_back_as_written_and_oversized_ones_are_refused() {
        let frames = vec![
            Frame::Start(SessionStart {
                argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec!["A=b".into()],
                user: Some("dev".into()),
                land_in: Some("/workspace".into()),
                tty: Some((24, 80)),
                agent: true,
            }),
            Frame::Input(b"typed".to_vec()),
            Frame::InputEnd,
            Frame::Signal(15),
            Frame::Resize {
                rows: 50,
                cols: 132,
            },
            Frame::Output(vec![0; 1000]),
            Frame::ErrorOutput(b"oops".to_vec()),
            Frame::Exited(Exit::Code(-1)),
            Frame::Exited(Exit::Signal(9)),
            Frame::Failed("no such user".into()),
            Frame::AgentOpen(7),
            Frame::AgentData(7, b"agent bytes".to_vec()),
            Frame::AgentData(8, Vec::new()),
            Frame::AgentClose(7),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut reader = &bytes[..];
        let mut read = Vec::new();
        while let Some(frame) = Frame::read(&mut reader).await.unwrap() {
            read.push(frame);
        }
        assert_eq!(read, frames);
        // The bulk's encoders, from a slice, make the same frames.
        let data = b"from a slice";
        assert_eq!(Frame::input(data), Frame::Input(data.to_vec()).encode());
        assert_eq!(Frame::output(data), Frame::Output(data.to_vec()).encode());
        assert_eq!(
            Frame::error_output(data),
            Frame::ErrorOutput(data.to_vec()).encode()
        );

        let mut huge = vec![2u8];
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(Frame::read(&mut &huge[..]).await.is_err());
        assert!(Frame::read(&mut &[99u8, 0, 0, 0, 0][..]).await.is_err());
        assert!(Frame::read(&mut &[4u8, 0, 0, 0, 1, 0][..]).await.is_err());
        // Cut short inside a frame: an error, not a clean end.
        assert!(Frame::read(&mut &[2u8, 0, 0, 0, 9, 1][..]).await.is_err());
    }
}
