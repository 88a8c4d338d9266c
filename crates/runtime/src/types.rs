//! The values the [`Runtime`](crate::Runtime) trait speaks in.

use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;

pub use warren_protocol::{Stats, VmOptions, VmStats};

/// A workspace's name on this host: 1 to 40 characters of `a-z`, `0-9` and `-`, starting with a
/// letter or digit. It names folders, cgroups and the container, so it is kept that plain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkspaceId(String);

impl WorkspaceId {
    pub fn new(id: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidId {
            id: id.to_owned(),
            reason: reason.to_owned(),
        };
        if id.is_empty() || id.len() > 40 {
            return Err(invalid("it must be 1 to 40 characters long"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid("only a-z, 0-9 and - are allowed"));
        }
        if id.starts_with('-') {
            return Err(invalid("it must start with a letter or digit"));
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl TryFrom<String> for WorkspaceId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(&s)
    }
}

impl From<WorkspaceId> for String {
    fn from(id: WorkspaceId) -> String {
        id.0
    }
}

/// The read-only tree a workspace starts from; its changes go to the workspace's own layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSource {
    /// A Warren image (`name:tag`, digest, or registry reference), mounted lazily.
    Image {
        reference: String,
        /// Record which chunks the first this many seconds read, and store that trace with
        /// the image (for prefetching on later cold starts).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record_trace_secs: Option<u64>,
        /// Fetch only what is read, with no background pull of the rest: for short-lived
        /// sandboxes (build steps), which read little of their image.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        lazy_only: bool,
    },
    /// A folder on the host (for example an unpacked root filesystem), shown inside through an
    /// idmapped bind mount so that its root-owned files belong to the workspace's root.
    Dir { path: PathBuf },
}

/// A workspace's writable layer, as an overlayfs upper folder on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableLayer {
    /// The image the layer lies over.
    pub image: String,
    pub upper: PathBuf,
    /// The host id of the workspace's root (ids in the layer are shifted by it).
    pub id_offset: u32,
}

/// Resource limits; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time, in CPUs (1.5 = one and a half cores).
    pub cpus: Option<f64>,
    /// Memory in bytes; past it the kernel reclaims, then kills a process inside.
    pub memory: Option<u64>,
    /// Most processes and threads at once.
    pub pids: Option<u64>,
    /// Bytes the workspace may write (its writable layer and its nested engine's folder
    /// together); past it, writes inside fail with ENOSPC. Container workspaces only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceConfig {
    pub id: WorkspaceId,
    pub root: RootSource,
    /// Defaults to the id.
    pub hostname: Option<String>,
    pub limits: Limits,
    /// `KEY=value` pairs every process inside starts with (before the exec's own).
    pub env: Vec<String>,
    /// Run it as a virtual machine (its own kernel) rather than a system container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmOptions>,
    /// The process it belongs to, for a sandbox a build or prebuild makes: once that process is
    /// gone, the sandbox is an orphan the host removes ([`crate::reap_orphans`]). `None` for a
    /// workspace, which outlives whoever made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Whose it is (the control plane's owner id, or [`HOST_TENANT`]): the host shares an
    /// image's mount only between workspaces of one tenant, so that no tenant sees another's
    /// reads in it (its page cache). `None` (a build's sandbox, a workspace recorded before
    /// tenants were): shared with nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The tenant of workspaces the host's root makes itself (`warren runtime`), apart from every
/// control-plane owner (whose ids never start with `@`).
pub const HOST_TENANT: &str = "@host";

impl WorkspaceConfig {
    /// A workspace of image `reference`, mounted lazily and pulled in the background, the
    /// host's own ([`HOST_TENANT`]), with no limits, variables or owner of its own.
    pub fn of_image(id: WorkspaceId, reference: &str) -> Self {
        Self {
            id,
            root: RootSource::Image {
                reference: reference.to_owned(),
                record_trace_secs: None,
                lazy_only: false,
            },
            hostname: None,
            limits: Limits::default(),
            env: Vec::new(),
            vm: None,
            owner: None,
            tenant: Some(HOST_TENANT.to_owned()),
        }
    }
}

/// A running process, told apart from a later one with the same pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// When it started, in clock ticks since boot (`/proc/<pid>/stat`).
    pub started: u64,
}

impl Owner {
    /// This process (`None` only if `/proc` cannot be read).
    pub fn this_process() -> Option<Self> {
        let me = procfs::process::Process::myself().ok()?;
        Some(Self {
            pid: u32::try_from(me.pid).ok()?,
            started: me.stat().ok()?.starttime,
        })
    }

    /// Whether the process still runs (a zombie counts as gone). Only a process that is not
    /// there is gone: when `/proc` cannot be read for another reason, it counts as running.
    pub fn is_alive(&self) -> bool {
        use procfs::ProcError;
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        let stat = procfs::process::Process::new(pid).and_then(|p| p.stat());
        match stat {
            Ok(stat) => stat.starttime == self.started && stat.state != 'Z',
            Err(ProcError::NotFound(_)) => false,
            Err(_) => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    Stopped,
    Running,
}

impl fmt::Display for WorkspaceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Stopped => "stopped",
            Self::Running => "running",
        })
    }
}

/// A workspace as the runtime knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceInfo {
    pub config: WorkspaceConfig,
    pub state: WorkspaceState,
    /// Host uid (and gid) that root inside maps to; the range is 65536 ids long.
    pub uid_base: u32,
    pub address: Ipv4Addr,
    /// PID (on the host) of the workspace's init (a VM's QEMU), while running.
    pub init_pid: Option<i32>,
    /// How a running VM workspace is accelerated (`kvm` or `tcg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// A process to run in a workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// `KEY=value`, on top of the workspace's environment.
    pub env: Vec<String>,
    /// Where the process starts; it fails if the workspace has no such folder. Without it,
    /// `land_in` if that is a folder there, else the user's home folder (or `/`).
    pub cwd: Option<String>,
    /// Where a session lands when it names no `cwd`: the project's checkout.
    #[serde(default)]
    pub land_in: Option<String>,
    /// A user name or numeric uid inside the workspace; defaults to root.
    pub user: Option<String>,
    /// With a terminal of this size; without, stdin, stdout and stderr are separate pipes.
    pub tty: Option<WinSize>,
    /// No network: the process gets a network namespace of its own with only loopback (a
    /// build step's `RUN --network=none`). Containers only.
    #[serde(default)]
    pub no_network: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal.
    pub fn as_shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
        }
    }
}

/// The caller's ends of a running process's standard streams.
#[derive(Debug)]
pub enum ExecIo {
    Pipes {
        stdin: File,
        stdout: File,
        stderr: File,
    },
    /// The terminal's master side: write input, read output (stdout and stderr are merged).
    Pty { master: File },
}

/// A process's input, output, and error output (none for a terminal), non-blocking for tokio.
pub type AsyncStreams = (
    tokio::net::unix::pipe::Sender,
    tokio::net::unix::pipe::Receiver,
    Option<tokio::net::unix::pipe::Receiver>,
);

impl ExecIo {
    /// The streams as async ends (a terminal's master serves both ways); within a tokio
    /// runtime.
    pub fn into_async(self) -> std::io::Result<AsyncStreams> {
        use tokio::net::unix::pipe;
        match self {
            ExecIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => Ok((
                pipe::Sender::from_file(stdin)?,
                pipe::Receiver::from_file(stdout)?,
                Some(pipe::Receiver::from_file(stderr)?),
            )),
            ExecIo::Pty { master } => {
                let reader = master.try_clone()?;
                Ok((
                    pipe::Sender::from_file_unchecked(master)?,
                    pipe::Receiver::from_file_unchecked(reader)?,
                    None,
                ))
            }
        }
    }
}

/// Control of a running process: wait for it, signal it, resize its terminal.
pub trait Process: Send + Sync + fmt::Debug {
    /// Blocks until the process exits.
    fn wait(&self) -> Result<ExitStatus, Error>;
    fn signal(&self, signal: i32) -> Result<(), Error>;
    /// Sets the terminal size (an error for a process without a terminal).
    fn resize(&self, size: WinSize) -> Result<(), Error>;
}

/// A process started by [`Runtime::exec`](crate::Runtime::exec).
#[derive(Debug)]
pub struct Exec {
    pub io: ExecIo,
    pub process: Box<dyn Process>,
}

/// A unix socket listening inside a running workspace, in a private folder under its `/tmp` (a
/// VM's `/run`) owned by the workspace user (SSH agent forwarding). Dropping it removes the socket and the
/// folder.
#[derive(Debug)]
pub struct WorkspaceSocket {
    /// Where the connections made to the socket inside arrive.
    pub listener: std::os::unix::net::UnixListener,
    /// The socket's path as processes in the workspace see it.
    pub path: String,
    pub(crate) made: MadeSocket,
}

impl WorkspaceSocket {
    /// Its listener for tokio (within a tokio runtime); the socket stays while `self` lives.
    pub fn tokio_listener(&self) -> std::io::Result<tokio::net::UnixListener> {
        let listener = self.listener.try_clone()?;
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    }
}

/// What a [`WorkspaceSocket`] removes when dropped.
#[derive(Debug)]
pub(crate) enum MadeSocket {
    /// A container's: the socket itself, in the private folder in `/tmp` (both opened inside
    /// the workspace's root).
    InRoot {
        folder: std::os::fd::OwnedFd,
        tmp: std::os::fd::OwnedFd,
        folder_name: String,
    },
    /// A VM's: the guest agent listens while `announcements` is open; connections are relayed
    /// to `listener`, bound at `relay` in a host folder only root can enter.
    InGuest {
        announcements: socket2::Socket,
        relay: std::path::PathBuf,
    },
}

impl Drop for WorkspaceSocket {
    fn drop(&mut self) {
        use nix::unistd::{UnlinkatFlags, unlinkat};
        use std::os::fd::AsRawFd;
        match &self.made {
            MadeSocket::InRoot {
                folder,
                tmp,
                folder_name,
            } => {
                let _ = unlinkat(
                    Some(folder.as_raw_fd()),
                    warren_guest::accounts::AGENT_SOCKET_NAME,
                    UnlinkatFlags::NoRemoveDir,
                );
                let _ = unlinkat(
                    Some(tmp.as_raw_fd()),
                    folder_name.as_str(),
                    UnlinkatFlags::RemoveDir,
                );
            }
            MadeSocket::InGuest {
                announcements,
                relay,
            } => {
                let _ = announcements.shutdown(std::net::Shutdown::Both);
                let _ = std::fs::remove_file(relay);
            }
        }
    }
}

/// What [`Runtime::delete`](crate::Runtime::delete) could not remove (empty when all is gone).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReport {
    pub leftovers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ids_are_plain_names() {
        for ok in [
            "a",
            "dev-1",
            "0x",
            "abcdefghij-abcdefghij-abcdefghij-abcdefg",
        ] {
            assert!(WorkspaceId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "..", "a b", &"x".repeat(41)] {
            let err = WorkspaceId::new(bad).unwrap_err().to_string();
            assert!(err.contains("workspace name"), "{bad}: {err}");
        }
    }
}
