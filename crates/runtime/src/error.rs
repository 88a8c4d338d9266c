//! The runtime's one error type: every variant names the workspace or the thing that failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{id}` is not a valid workspace name: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("no workspace `{0}`")]
    NotFound(String),
    #[error("no task `{0}` in this workspace")]
    NoTask(String),
    #[error("workspace `{0}` exists already")]
    AlreadyExists(String),
    #[error("workspace `{0}` is not running (start it first)")]
    NotRunning(String),
    #[error(
        "every uid range and address is in use ({0} workspaces); delete one or widen the subnet"
    )]
    Exhausted(usize),
    #[error("{what} `{}`: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A kernel call failed where no path names what it was for.
    #[error("{call}: {cause}")]
    Os {
        call: &'static str,
        cause: std::io::Error,
    },
    /// A path inside a workspace's own tree (resolved in its root) could not be used.
    #[error("cannot {action} {path} in the workspace: {cause}")]
    InWorkspace {
        action: &'static str,
        path: String,
        cause: std::io::Error,
    },
    /// A bind mount of a host folder into a workspace failed at `step`.
    #[error("cannot bind {} {how} ({step}: {cause})", from.display())]
    Bind {
        from: PathBuf,
        how: String,
        step: &'static str,
        cause: std::io::Error,
    },
    #[error("cannot attach {} to a loop device: {cause}", file.display())]
    LoopDevice {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("no user `{0}` in the workspace")]
    NoUser(String),
    /// The workspace's account files cannot be used (not a small regular file, unreadable);
    /// the message names the file.
    #[error("{0}")]
    Account(String),
    #[error("user `{0}` is outside the workspace's id range")]
    UserOutOfRange(String),
    #[error("task `{0}` is not running (`warren ws logs` shows how it ended)")]
    TaskNotRunning(String),
    /// The operation does not apply to this kind of workspace (container or VM).
    #[error("{0}")]
    NotForBackend(&'static str),
    /// The channel to a workspace's supervisor (its shim) failed.
    #[error("cannot {action} the workspace's supervisor: {cause}")]
    SupervisorLink {
        action: &'static str,
        cause: std::io::Error,
    },
    #[error("the workspace's supervisor did not answer in time")]
    SupervisorSilent,
    #[error("malformed message from the workspace's supervisor: {0}")]
    SupervisorMessage(serde_json::Error),
    #[error("another supervisor runs this workspace already")]
    SupervisorBusy,
    /// A VM's guest agent reported a failure in its own words.
    #[error("the guest agent: {0}")]
    Guest(String),
    #[error("the guest agent does not answer: {0}")]
    GuestSilent(std::io::Error),
    #[error("unexpected answer from the guest agent: {0}")]
    GuestAnswer(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("cgroups of `{id}`: cannot {action}: {cause}")]
    Cgroup {
        id: String,
        action: String,
        cause: String,
    },
    #[error("cannot encode {what}: {cause}")]
    Encode {
        what: &'static str,
        cause: serde_json::Error,
    },
    #[error("`{}` is damaged: {cause}", path.display())]
    Damaged {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("workspace `{id}` did not start: {message}")]
    Start { id: String, message: String },
    #[error("workspace `{id}`: {message}")]
    Shim { id: String, message: String },
    #[error("workspace `{id}`: lost the connection to its supervisor")]
    ShimGone { id: String },
    #[error("cannot run `{argv0}`: {message}")]
    Exec { argv0: String, message: String },
    #[error(
        "workspaces cannot reach the data folder `{}`: their ids (host uid {uid} and up) cannot enter `{}` (mode {mode:04o}, owner {owner}); let others search it (`chmod o+x {}`) or choose a data folder under one they can (--data / WARREN_DATA)",
        data.display(), blocked.display(), blocked.display()
    )]
    DataFolderClosed {
        data: PathBuf,
        blocked: PathBuf,
        uid: u32,
        mode: u32,
        owner: u32,
    },
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |cause| Self::Io { what, path, cause }
    }

    /// The error of kernel call `call`, from std or nix.
    pub(crate) fn os<E: Into<std::io::Error>>(call: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::Os {
            call,
            cause: e.into(),
        }
    }

    /// The error of encoding `what` (a record or a message) as JSON.
    pub(crate) fn encode(what: &'static str) -> impl FnOnce(serde_json::Error) -> Self {
        move |cause| Self::Encode { what, cause }
    }
}
