//! The `warren` command. Thin: parses arguments, calls the library crates, prints, and maps
//! failures to exit codes (0 success, 1 failure, 2 invalid input such as a bad environment file).
// The terminal is this binary's interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_cli::{
    agent_cmd, build_cmd, control_cmd, image_cmd, prebuild_cmd, runtime_cmd, spec_cmd, ssh_cmd,
};

#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "Self-hosted development environments"
)]
struct Cli {
    /// Where Warren keeps its state (images, chunk cache)
    #[arg(
        long,
        global = true,
        env = "WARREN_DATA",
        default_value = "/var/lib/warren"
    )]
    data: PathBuf,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Bring Warren up on this machine: API, database and agent (needs root)
    Up(Box<control_cmd::UpArgs>),
    /// Log in to a Warren server and keep the token for the other commands
    Login(control_cmd::LoginArgs),
    /// Users (admin)
    #[command(subcommand)]
    User(control_cmd::UserCommand),
    /// Projects: git repositories with an environment file
    #[command(subcommand)]
    Project(control_cmd::ProjectCommand),
    /// Workspaces: create, list, start, stop, delete, exec
    #[command(subcommand)]
    Ws(control_cmd::WsCommand),
    /// Prebuilds: a project's environment made ready per commit; list, follow, cancel, retry
    #[command(subcommand)]
    Prebuild(prebuild_cmd::PrebuildCommand),
    /// Your SSH public keys (for the SSH gateway)
    #[command(subcommand)]
    Key(control_cmd::KeyCommand),
    /// Environment variables and secrets (yours, or a project's)
    #[command(subcommand)]
    Env(control_cmd::EnvCommand),
    /// Hosts that run workspaces (admin)
    #[command(subcommand)]
    Host(control_cmd::HostCommand),
    /// Run workspaces on this machine for a Warren server elsewhere (needs root)
    Agent(agent_cmd::AgentArgs),
    /// The SSH gateway alone, for this machine's workspaces (`warren up` runs one already)
    Gateway(ssh_cmd::GatewayArgs),
    /// Print (or --write) ~/.ssh/config entries for your workspaces
    SshConfig(ssh_cmd::SshConfigArgs),
    /// Recent jobs of your workspaces
    #[command(subcommand)]
    Job(control_cmd::ListCommand),
    /// Environment files (warren.yml, hocus.yml, devcontainer.json)
    #[command(subcommand)]
    Spec(spec_cmd::SpecCommand),
    /// Build a Dockerfile with no Docker daemon, each stage in a sandbox (needs root)
    Build(build_cmd::BuildArgs),
    /// Images: import, push, pull, mount lazily, list, inspect, remove, collect, export
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Container workspaces by hand: run, exec, stop, rm, ls (needs root)
    Runtime(runtime_cmd::RuntimeArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
                .unwrap_or_else(|_| "warn,libcgroups=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Up(args) => control_cmd::up(*args, &cli.data),
        Commands::Login(args) => control_cmd::login(args),
        Commands::User(cmd) => control_cmd::user(cmd),
        Commands::Project(cmd) => control_cmd::project(cmd),
        Commands::Ws(cmd) => control_cmd::ws(cmd),
        Commands::Prebuild(cmd) => prebuild_cmd::prebuild(cmd),
        Commands::Key(cmd) => control_cmd::key(cmd),
        Commands::Env(cmd) => control_cmd::env(cmd),
        Commands::Host(cmd) => control_cmd::host(cmd),
        Commands::Agent(args) => agent_cmd::agent(args, &cli.data),
        Commands::Gateway(args) => ssh_cmd::gateway(args, &cli.data),
        Commands::SshConfig(args) => ssh_cmd::ssh_config(args),
        Commands::Job(cmd) => control_cmd::job(cmd),
        Commands::Spec(cmd) => spec_cmd::run(cmd),
        Commands::Build(args) => build_cmd::build(args, &cli.data),
        Commands::Image(cmd) => image_cmd::run(cmd, &cli.data).map(|()| ExitCode::SUCCESS),
        Commands::Runtime(args) => runtime_cmd::run(args, &cli.data),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
