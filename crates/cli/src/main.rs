//! The `warren` command. Thin: parses arguments, calls the library crates, prints, and maps
//! failures to exit codes (0 success, 1 failure, 2 invalid input such as a bad environment file).
// The terminal is this binary's interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod spec_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "Self-hosted development environments"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Environment files (warren.yml, hocus.yml, devcontainer.json)
    #[command(subcommand)]
    Spec(spec_cmd::SpecCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Spec(cmd) => spec_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
