//! The `warren` command's parts: each subcommand's module, and the host glue they share (the
//! API client, the host's prebuilder and image store). The binary (`main.rs`) parses arguments
//! and maps failures to exit codes; `warren-bench` drives the same parts against real peers.
// The terminal is this crate's interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod agent_cmd;
pub mod build_cmd;
pub mod client;
pub mod control_cmd;
pub mod image_cmd;
pub mod prebuild_cmd;
pub mod runtime_cmd;
pub mod spec_cmd;
pub mod ssh_cmd;

/// A size given on the command line, such as `512MiB` or `20GiB`.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    warren_envfile::ByteSize::parse(text)
        .map(|b| b.0)
        .ok_or_else(|| anyhow::anyhow!("`{text}` is not a size such as 512MiB or 20GiB"))
}
