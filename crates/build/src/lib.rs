//! Daemonless Dockerfile builds: the parser ([`parse`]), build-time word expansion
//! ([`expand`]), `.dockerignore` ([`Ignore`]), and a first executor ([`build`]) that runs each
//! stage in a workspace sandbox of the runtime. The step cache and prebuilds come next.
//!
//! Warren has its own parser because the crates.io one rejects heredocs and `RUN --mount`, both
//! of which real environments use.

mod ignore;
mod parse;
mod run;
mod words;

pub use ignore::Ignore;
pub use parse::{
    ArgDecl, Command, CopySource, Dockerfile, Files, Heredoc, Instruction, Mount, ParseError,
    Stage, Step, parse,
};
pub use run::{BuildError, BuildRequest, Built, ImageSettings, ImageStore, build};
pub use words::{ExpandError, expand, split_words};
