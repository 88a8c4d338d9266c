//! The one error of builds and prebuilds: each variant says whose it is to fix.

use std::time::Duration;

/// Why a build step, a build or a prebuild did not finish.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The build was cancelled (its prebuild was, or the caller stopped it).
    #[error("{}", warren_protocol::CANCELLED)]
    Cancelled,
    /// What a step ran outlived the step time limit.
    #[error(
        "{what} was still running after the step time limit ({} s) and was stopped",
        limit.as_secs()
    )]
    TimedOut { what: String, limit: Duration },
    /// The Dockerfile, the environment file or the build context asks for what cannot be;
    /// a command the build ran failed. The repository's to fix.
    #[error("{0}")]
    Refused(String),
    /// The sandbox the steps run in (the host's runtime).
    #[error(transparent)]
    Runtime(#[from] warren_runtime::Error),
    /// The image store: a base image not found, a layer not stored.
    #[error("{0}")]
    Store(String),
    /// The host's own files: the build context, spool files, cache mounts.
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    /// Where it happened: a Dockerfile's line (`Dockerfile:12`), a prebuild task.
    #[error("{place}: {cause}")]
    At {
        place: String,
        cause: Box<BuildError>,
    },
}

impl BuildError {
    /// A refusal with this message.
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self::Refused(message.into())
    }

    /// The error of an I/O call on `what` (a path or a stream, as the user knows it).
    pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.to_string();
        move |cause| Self::Io { what, cause }
    }

    /// This error, where it happened.
    pub(crate) fn at(self, place: impl std::fmt::Display) -> Self {
        Self::At {
            place: place.to_string(),
            cause: Box::new(self),
        }
    }

    /// Whether the build ended because it was cancelled (not because it failed).
    pub fn is_cancelled(&self) -> bool {
        match self {
            Self::Cancelled => true,
            Self::At { cause, .. } => cause.is_cancelled(),
            _ => false,
        }
    }
}

/// How a build's end is reported to the control plane: cancelled, or a failure another
/// attempt may not have (as every prebuild failure was before it was typed).
impl From<BuildError> for warren_protocol::Failure {
    fn from(e: BuildError) -> Self {
        if e.is_cancelled() {
            Self::cancelled()
        } else {
            Self::transient(e.to_string())
        }
    }
}
