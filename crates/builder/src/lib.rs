//! Daemonless Dockerfile builds: the parser ([`parse`]), build-time word expansion
//! ([`expand`]), `.dockerignore` ([`Ignore`]), and a first executor ([`build`]) that runs each
//! stage in a workspace sandbox of the runtime with a step cache, and prebuilds ([`prebuild`]):
//! a project's environment at one commit, from a checkout made on the host ([`git`]).
//!
//! Warren has its own parser because the crates.io one rejects heredocs and `RUN --mount`, both
//! of which real environments use.

pub use warren_git as git;
mod error;
mod ignore;
mod parse;
mod prebuild;
mod run;
mod words;

pub use error::BuildError;
pub use ignore::Ignore;
pub use parse::{
    ArgDecl, Command, CopySource, Dockerfile, Files, Heredoc, Instruction, Mount, ParseError,
    Stage, Step, parse,
};
pub use prebuild::{
    PrebuildRequest, Prebuilt, prebuild, prebuild_key, read_options, session_user, workspace_tasks,
};
pub use run::{
    BuildRequest, Built, CANCELLED, ImageSettings, ImageStore, RESERVED_REPOSITORIES, Spool,
    StepLimits, build, egress_filter, refuse_reserved,
};
pub use words::{ExpandError, expand, split_words};
