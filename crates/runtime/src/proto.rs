//! The shim's control protocol: one JSON message per `SOCK_SEQPACKET` packet (boundaries kept
//! by the kernel), file descriptors passed alongside with `SCM_RIGHTS`.
//!
//! A client opens one connection per request. For an exec, the connection stays open: the shim
//! answers `Started`, then `Exited` when the process ends; the client may send `Signal` meanwhile.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

use crate::{Error, ExecRequest, ExitStatus};

/// Largest message: an exec request with a large environment fits easily.
const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Request {
    /// Without a tty, carries the process's stdin, stdout and stderr as descriptors.
    Exec(ExecRequest),
    Signal(i32),
    Status,
    Stop {
        grace_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// With a tty, carries the terminal's master side.
    Started {
        pid: i32,
    },
    Exited(ExitStatus),
    Status {
        init_pid: i32,
    },
    Stopped,
    Error(String),
}

/// One end of a connection.
#[derive(Debug)]
pub(crate) struct Channel(pub OwnedFd);

/// How long a client waits for the shim to take or answer a request: a shim is
/// single-threaded, and one that does not answer (wedged by its workspace) must not hold the
/// host's agent, its reports or other workspaces' jobs.
pub(crate) const ANSWER_LIMIT: Duration = Duration::from_secs(30);

impl Channel {
    /// Connects to a shim; sending and each receive give up after `limit`.
    pub(crate) fn connect(path: &Path, limit: Duration) -> std::io::Result<Self> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let channel = Self(fd);
        // Before the connect: a shim whose backlog is full makes connect wait, so long.
        channel.set_limit(Some(limit))?;
        connect(channel.0.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(channel)
    }

    /// How long a send or a receive may wait; `None`: for ever (a process's exit).
    pub(crate) fn set_limit(&self, limit: Option<Duration>) -> std::io::Result<()> {
        let limit = limit.unwrap_or_default();
        let time = TimeVal::new(limit.as_secs() as _, limit.subsec_micros() as _);
        setsockopt(self, sockopt::ReceiveTimeout, &time)?;
        setsockopt(self, sockopt::SendTimeout, &time)?;
        Ok(())
    }

    pub(crate) fn send<T: Serialize>(
        &self,
        message: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let bytes = serde_json::to_vec(message).map_err(Error::encode("a supervisor message"))?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            self.0.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| Error::SupervisorLink {
            action: "send to",
            cause: e.into(),
        })?;
        Ok(())
    }

    /// The next message and the descriptors that came with it; `None` when the peer closed.
    pub(crate) fn recv<T: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, Error> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| match e {
                nix::errno::Errno::EAGAIN => Error::SupervisorSilent,
                e => Error::SupervisorLink {
                    action: "read from",
                    cause: e.into(),
                },
            })?;
            let mut fds = Vec::new();
            let cmsgs = msg.cmsgs().map_err(|e| Error::SupervisorLink {
                action: "read descriptors from",
                cause: e.into(),
            })?;
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: the kernel just installed these descriptors in this process for
                    // us; nothing else owns them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            (msg.bytes, fds)
        };
        if len == 0 {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len]).map_err(Error::SupervisorMessage)?;
        Ok(Some((message, fds)))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The shim's listening socket.
pub(crate) fn listen_at(path: &Path) -> Result<OwnedFd, Error> {
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(Error::os("socket"))?;
    let bind_error = |e: nix::Error| Error::Io {
        what: "cannot listen at",
        path: path.to_owned(),
        cause: e.into(),
    };
    let addr = UnixAddr::new(path).map_err(bind_error)?;
    bind(fd.as_raw_fd(), &addr).map_err(bind_error)?;
    listen(
        &fd,
        nix::sys::socket::Backlog::new(64).map_err(Error::os("listen"))?,
    )
    .map_err(Error::os("listen"))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn messages_keep_their_boundaries_and_carry_descriptors() {
        let (a, b) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (a, b) = (Channel(a), Channel(b));
        let (mut r, w) = std::io::pipe().unwrap();
        a.send(&Request::Signal(15), &[w.as_fd()]).unwrap();
        a.send(&Request::Status, &[]).unwrap();
        drop(w);
        let (first, fds) = b.recv::<Request>().unwrap().unwrap();
        assert!(matches!(first, Request::Signal(15)));
        assert_eq!(fds.len(), 1);
        let (second, fds2) = b.recv::<Request>().unwrap().unwrap();
        assert!(matches!(second, Request::Status));
        assert!(fds2.is_empty());
        std::fs::File::from(fds.into_iter().next().unwrap())
            .write_all(b"through")
            .unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
        drop(a);
        assert!(
            b.recv::<Request>().unwrap().is_none(),
            "closed peer reads as None"
        );
    }
}
