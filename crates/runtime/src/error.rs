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
    #[error("{what} `{}`", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
    #[error("{0}")]
    Sys(String),
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
