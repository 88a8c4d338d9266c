//! `warren-bench`: Warren's benchmarks, each against a real peer in the same run on the same
//! work (`./dev bench ...` builds and runs it; the README says what each row measures). Kept
//! out of the `warren` binary: it drives `warren` (beside it in the target folder) and the
//! library parts of `warren-cli`.
// The terminal is this binary's interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod bench_api;
mod bench_build;
mod bench_cluster;
mod bench_runtime;
mod bench_ssh;
mod bench_start;
mod bench_ui;
mod bench_vm;
mod filler;

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "warren-bench",
    version,
    about = "Warren's benchmarks against real peers (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: bench::BenchCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
