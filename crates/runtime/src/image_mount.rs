//! How an image mount (`warren image mount --ready-fd N`) tells whoever started it that its
//! tree is served, or why it is not: one JSON line on a pipe of its own, never its human
//! output. The shim waits for it before it builds a workspace's root on the mount.

use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};

/// The one message of an image mount's readiness pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountSignal {
    /// The image's tree is mounted and served.
    Mounted { entries: u64, data_bytes: u64 },
    /// The host's one mount of the image is served at `tree` (the image's own ids, setuid
    /// ignored): a workspace holds `lease` while it uses it (see [`crate::image_sharing`]).
    Shared {
        tree: std::path::PathBuf,
        lease: std::path::PathBuf,
    },
    /// It will not be: why (naming the image or its registry).
    Failed { error: String },
}

/// The fd number the readiness pipe has in the mount process.
pub const READY_FD: i32 = 3;

pub use warren_protocol::printable;

/// The most a signal may take (a failure's message is cut to fit).
const SIGNAL_LIMIT: u64 = 16 << 10;

impl MountSignal {
    /// Writes the signal as one line (the mount side).
    pub fn send(&self, to: &mut impl Write) -> std::io::Result<()> {
        let mut signal = self.clone();
        if let Self::Failed { error } = &mut signal {
            *error = printable(error);
            let mut end = error.len().min(SIGNAL_LIMIT as usize / 2);
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error.truncate(end);
        }
        let mut line = serde_json::to_vec(&signal).map_err(std::io::Error::other)?;
        line.push(b'\n');
        to.write_all(&line)?;
        to.flush()
    }

    /// Reads the signal from the mount's pipe, waiting at most `limit`. `None` when the mount
    /// ended without one (it crashed, or is not a mount that signals) or said nothing in time.
    pub fn receive_within(from: std::fs::File, limit: std::time::Duration) -> Option<Self> {
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [nix::poll::PollFd::new(
                from.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(millis)) {
                // Readable, or its writer gone (EOF): the line is there, or never will be.
                Ok(n) if n > 0 => return Self::receive(from),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Reads the signal (the starting side). `None` when the mount ended without one (it
    /// crashed, or is not a mount that signals).
    pub fn receive(from: impl Read) -> Option<Self> {
        let mut line = String::new();
        BufReader::new(from.take(SIGNAL_LIMIT))
            .read_line(&mut line)
            .ok()?;
        serde_json::from_str(line.trim_end()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_read_back_as_sent() {
        for signal in [
            MountSignal::Mounted {
                entries: 3,
                data_bytes: 10,
            },
            MountSignal::Failed {
                error: "image r:5000/x:1: registry r:5000 refused the connection".into(),
            },
        ] {
            let mut pipe = Vec::new();
            signal.send(&mut pipe).unwrap_or_default();
            assert_eq!(MountSignal::receive(&pipe[..]), Some(signal));
        }
        assert_eq!(MountSignal::receive(&b""[..]), None);
        assert_eq!(MountSignal::receive(&b"mounted dev:1 at /x\n"[..]), None);
    }

    #[test]
    fn what_a_registry_says_cannot_drive_a_terminal() {
        assert_eq!(
            printable("HTTP 500: \u{1b}]0;owned\u{7}\nline\u{9b}2J"),
            "HTTP 500: ?]0;owned?\nline?2J"
        );
        assert_eq!(printable("abc\u{202e}fed"), "abc?fed");
    }

    #[test]
    fn a_long_failure_is_cut_not_lost() {
        let mut pipe = Vec::new();
        MountSignal::Failed {
            error: "é".repeat(20_000),
        }
        .send(&mut pipe)
        .unwrap_or_default();
        assert!(matches!(
            MountSignal::receive(&pipe[..]),
            Some(MountSignal::Failed { error }) if error.starts_with("éé")
        ));
    }
}
