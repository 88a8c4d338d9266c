//! What the host and the guest agent say to each other over vsock (or TCP).
//!
//! The host reaches the guest through `vhost-device-vsock`'s unix socket (`CONNECT <port>`, then
//! `OK <port>`), or over TCP to the guest's address with the boot's token ([`agent_hello`],
//! then `OK`); one connection per request. Everything after that is frames: a kind byte, a
//! little-endian `u32` length, the payload. The first frame is a [`Request`] (JSON); the guest
//! answers with a [`Reply`]. An exec then streams [`Kind::Stdin`] one way and
//! [`Kind::Stdout`]/[`Kind::Stderr`] the other, with [`Control`] frames from the host, and ends
//! with a [`Reply::Exited`]. A connect, once `Started`, relays a connection in frames (see
//! [`relay`]): [`Kind::Stdin`] to the guest, [`Kind::Stdout`] from it, an empty one a half-close.
//!
//! Agent forwarding turns the direction around without the guest ever connecting to the host:
//! a [`Request::ListenUnix`] connection stays open and carries a [`Reply::Accepted`] for every
//! connection made to the guest's socket; the host then picks each one up with a
//! [`Request::Attach`] on a new connection, relayed like a connect once `Started`.
//! Closing the listening connection removes the socket.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// What the guest writes on its console once the agent listens: the host connects only after
/// it, since a vsock connection made while the guest's driver is still coming up can leave
/// `vhost-device-vsock` with a connection that is never answered.
pub const AGENT_READY: &str = "agent listening on";

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Reply = 2,
    /// Input for the process; an empty payload closes its stdin.
    Stdin = 3,
    /// Output (a terminal's output is all `Stdout`).
    Stdout = 4,
    Stderr = 5,
    Control = 6,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Reply,
            3 => Self::Stdin,
            4 => Self::Stdout,
            5 => Self::Stderr,
            6 => Self::Control,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Runs a process. `env` is complete (the host merged the workspace's and the request's);
    /// the guest adds `HOME`, `USER`, `LOGNAME`, `SHELL` (and `TERM` with a terminal) when absent.
    Exec {
        argv: Vec<String>,
        env: Vec<String>,
        /// Where it starts (an error if there is no such folder); without it, `land_in` if
        /// that is a folder, else the user's home (or `/`).
        cwd: Option<String>,
        #[serde(default)]
        land_in: Option<String>,
        /// A name or numeric uid from the guest's `/etc/passwd`; root when absent.
        user: Option<String>,
        /// A terminal of (rows, cols); without, three pipes.
        tty: Option<(u16, u16)>,
    },
    /// Opens a TCP connection from inside the guest (`host:port`).
    Connect {
        address: String,
    },
    Stats,
    /// Listens on a fresh unix socket in a private folder under `/run`, both owned by `user`
    /// (a name or uid; root when absent); see the module's documentation.
    ListenUnix {
        user: Option<String>,
    },
    /// Takes over a connection a [`Request::ListenUnix`] announced.
    Attach {
        id: u64,
    },
    /// Writes what the guest's page cache holds through to its filesystems (`sync`); answered
    /// once done.
    Sync,
    /// Stops every process (SIGTERM, SIGKILL after `grace_ms`), syncs and powers off.
    Poweroff {
        grace_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Pong,
    Started,
    Error {
        message: String,
    },
    /// The process ended: its code, or the signal that ended it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    Stats(GuestStats),
    Synced,
    PoweringOff,
    /// The socket a [`Request::ListenUnix`] made, as the guest's processes see it.
    Listening {
        path: String,
    },
    /// A connection to that socket, waiting for a [`Request::Attach`].
    Accepted {
        id: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Signal(i32),
    Resize { rows: u16, cols: u16 },
}

/// What the guest kernel says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// `MemTotal - MemAvailable`, bytes.
    pub memory_used: u64,
    pub memory_total: u64,
    /// Processes and threads.
    pub tasks: u64,
}

/// Relays the byte stream `raw` over the agent's connection `framed` until both directions are
/// done: what arrives in `incoming` frames is written to `raw`, what `raw` gives goes out in
/// `outgoing` frames, and an empty frame ends a direction (`raw` then gets a half-close, and
/// its own end of input is sent as one). `vhost-device-vsock` passes no half-close of its own,
/// and protocols that answer only once the request has ended need it. A failed write, or the
/// connection ending without an empty frame, ends both directions.
pub fn relay(framed: std::fs::File, raw: std::fs::File, incoming: Kind, outgoing: Kind) {
    use nix::sys::socket::{Shutdown, shutdown};
    use std::os::fd::AsRawFd;
    let (Ok(mut frames_in), Ok(mut raw_out)) = (framed.try_clone(), raw.try_clone()) else {
        return;
    };
    // Both stay open until the inbound thread is joined, below.
    let (raw_fd, framed_fd) = (raw.as_raw_fd(), framed.as_raw_fd());
    let end_both = move || {
        let _ = shutdown(raw_fd, Shutdown::Both);
        let _ = shutdown(framed_fd, Shutdown::Both);
    };
    let end_both_in = end_both;
    let inbound = std::thread::spawn(move || {
        loop {
            match read_frame(&mut frames_in) {
                Ok(Some((kind, data))) if kind == incoming && !data.is_empty() => {
                    if raw_out.write_all(&data).is_err() {
                        return end_both_in();
                    }
                }
                Ok(Some((kind, _))) if kind == incoming => {
                    let _ = shutdown(raw_out.as_raw_fd(), Shutdown::Write);
                    return;
                }
                _ => return end_both_in(),
            }
        }
    });
    let (mut raw_in, mut frames_out) = (raw, framed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match raw_in.read(&mut buf) {
            Ok(0) => {
                let _ = write_frame(&mut frames_out, outgoing, &[]);
                break;
            }
            Ok(n) => {
                if write_frame(&mut frames_out, outgoing, &buf[..n]).is_err() {
                    end_both();
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                end_both();
                break;
            }
        }
    }
    let _ = inbound.join();
}

/// Reads one line, up to and including its `\n` but never more than `max` bytes, a byte at a
/// time so that nothing after it is consumed (the handshakes before the frames).
pub fn read_line(input: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < max && line.last() != Some(&b'\n') {
        match input.read(&mut byte) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(line)
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind as u8);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    out.write_all(&buf)
}

pub fn write_json<T: Serialize>(out: &mut impl Write, kind: Kind, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(out, kind, &bytes)
}

/// Reads one frame; `None` at a clean end of the stream.
pub fn read_frame(input: &mut impl Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let kind = Kind::from_byte(head[0]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", head[0]),
        )
    })?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is too large"),
        ));
    }
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

/// Reads one frame of `kind` holding JSON.
pub fn read_json<T: for<'de> Deserialize<'de>>(input: &mut impl Read, kind: Kind) -> io::Result<T> {
    match read_frame(input)? {
        Some((k, payload)) if k == kind => serde_json::from_slice(&payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Some((k, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected a {kind:?} frame, got {k:?}"),
        )),
        None => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_passes_half_closes_both_ways() {
        use std::os::fd::OwnedFd;
        use std::os::unix::net::UnixStream;
        let file = |s: UnixStream| std::fs::File::from(OwnedFd::from(s));
        let (framed, mut host) = UnixStream::pair().unwrap();
        let (raw, mut service) = UnixStream::pair().unwrap();
        let relaying = std::thread::spawn(move || {
            relay(file(framed), file(raw), Kind::Stdin, Kind::Stdout);
        });
        // The host's request, then its end: the service reads it whole, up to its end.
        write_frame(&mut host, Kind::Stdin, b"a request").unwrap();
        write_frame(&mut host, Kind::Stdin, b"").unwrap();
        let mut request = String::new();
        service.read_to_string(&mut request).unwrap();
        assert_eq!(request, "a request");
        // The answer still goes back, then the service's own end.
        service.write_all(b"its answer").unwrap();
        service.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        while let Some((kind, data)) = read_frame(&mut host).unwrap() {
            assert_eq!(kind, Kind::Stdout);
            if data.is_empty() {
                break;
            }
            answer.extend(data);
        }
        assert_eq!(answer, b"its answer");
        relaying.join().unwrap();
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_json(
            &mut buf,
            Kind::Request,
            &Request::Connect {
                address: "127.0.0.1:22".into(),
            },
        )
        .unwrap();
        write_frame(&mut buf, Kind::Stdin, b"").unwrap();
        let mut input = buf.as_slice();
        let request: Request = read_json(&mut input, Kind::Request).unwrap();
        assert_eq!(
            request,
            Request::Connect {
                address: "127.0.0.1:22".into()
            }
        );
        assert_eq!(
            read_frame(&mut input).unwrap(),
            Some((Kind::Stdin, Vec::new()))
        );
        assert_eq!(read_frame(&mut input).unwrap(), None);

        let huge = [9u8, 0, 0, 0, 0];
        let err = read_frame(&mut huge.as_slice()).unwrap_err();
        assert!(err.to_string().contains("unknown frame kind 9"), "{err}");
        let mut too_long = vec![Kind::Stdout as u8];
        too_long.extend_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        let err = read_frame(&mut too_long.as_slice()).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let truncated = [Kind::Stdout as u8, 4, 0];
        assert!(read_frame(&mut truncated.as_slice()).is_err());
    }
}

/// The guest's settings, written by the host into the initramfs as [`CONFIG_PATH`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    pub hostname: String,
    /// `eth0`'s address, prefix length and default gateway; no network when absent.
    pub network: Option<GuestNetwork>,
    /// The tag of the workspace's tree (virtiofs or 9p, see `root_fs`), made the guest's root.
    pub root_tag: Option<String>,
    #[serde(default)]
    pub root_fs: RootFs,
    /// Serve the host on this TCP port of `network`'s address, to whoever first sends the
    /// token ([`agent_hello`]), instead of on vsock.
    #[serde(default)]
    pub agent_tcp: Option<AgentTcp>,
    /// A block device formatted ext4, mounted (with `discard`) at `/var/lib/docker`.
    pub scratch_device: Option<String>,
    /// Files bind-mounted over the root's `/etc/<name>` (resolv.conf, hosts, hostname).
    pub etc: Vec<(String, String)>,
}

/// The filesystem the workspace's tree comes over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootFs {
    /// From `virtiofsd` (a vhost-user device: the guest's RAM is shared with it).
    #[default]
    Virtiofs,
    /// From QEMU itself (virtio-9p), so the guest's RAM can stay private (and mergeable).
    #[serde(rename = "9p")]
    NineP,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTcp {
    pub port: u16,
    /// What the host sends first on every connection (hex), see [`agent_hello`].
    pub token: String,
}

/// The first line the host sends on a TCP connection to the agent; the agent answers `OK\n`
/// or closes the connection.
pub fn agent_hello(token: &str) -> String {
    format!("WARREN {token}\n")
}

/// The agent's TCP port when it serves over the workspace's network: above Linux's ephemeral
/// range (32768-60999), so no outgoing connection in the guest takes it.
pub const AGENT_TCP_PORT: u16 = 61024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
}

/// Where the guest finds its [`GuestConfig`] in the initramfs.
pub const CONFIG_PATH: &str = "/warren/config.json";

/// The modules the guest loads, one path per line, dependencies first.
pub const MODULE_LIST: &str = "/lib/warren/modules";

/// Every module of the guest kernel, for loading on demand (see `modules`).
pub const MODULE_INDEX: &str = "/lib/warren/modules.index";
