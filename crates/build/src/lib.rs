//! Daemonless Dockerfile builds. So far: the parser ([`parse`]) and the build-time word
//! expansion ([`expand`]); executing the steps in the workspace sandbox, the step cache and
//! prebuilds come next (issue 7).
//!
//! Warren has its own parser because the crates.io one rejects heredocs and `RUN --mount`, both
//! of which real environments use.

mod ignore;
mod parse;
mod words;

pub use ignore::Ignore;
pub use parse::{
    ArgDecl, Command, CopySource, Dockerfile, Files, Heredoc, Instruction, Mount, ParseError,
    Stage, Step, parse,
};
pub use words::{ExpandError, expand, split_words};
