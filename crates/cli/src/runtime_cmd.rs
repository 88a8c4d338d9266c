//! `warren runtime ...`: container workspaces by hand, without the control plane.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use warren_envfile::ByteSize;
use warren_runtime::{
    ContainerRuntime, ContainerRuntimeConfig, ExecIo, ExecRequest, Limits, NetworkConfig,
    RootSource, Runtime, VmOptions, WinSize, WorkspaceConfig, WorkspaceId, WorkspaceState,
};

/// How container workspaces are wired on this host (used by `runtime` and `up`).
#[derive(Debug, Args)]
pub struct HostFlags {
    /// Bridge shared by the host's workspaces (created if missing)
    #[arg(long, global = true, env = "WARREN_BRIDGE", default_value = "warren0")]
    bridge: String,
    /// Addresses for workspaces; the first one is the bridge's
    #[arg(
        long,
        global = true,
        env = "WARREN_SUBNET",
        default_value = "10.88.0.0/16"
    )]
    subnet: ipnet::Ipv4Net,
    /// DNS server for workspaces (repeat for more); default: the host's non-loopback ones
    #[arg(long = "dns", global = true, env = "WARREN_DNS", value_delimiter = ',')]
    dns: Vec<Ipv4Addr>,
    /// A network workspaces and build steps may not reach (repeatable), besides link-local
    /// 169.254.0.0/16 and the host's own addresses, which are always refused
    #[arg(
        long = "deny-net",
        global = true,
        env = "WARREN_DENY_NETS",
        value_delimiter = ','
    )]
    deny_nets: Vec<ipnet::Ipv4Net>,
    /// A network workspaces and build steps may reach even though it is refused above
    /// (repeatable), e.g. a package mirror on a link-local address
    #[arg(
        long = "allow-net",
        global = true,
        env = "WARREN_ALLOW_NETS",
        value_delimiter = ','
    )]
    allow_nets: Vec<ipnet::Ipv4Net>,
    /// A registry (HOST[:PORT]) this host trusts (repeatable): reached for tenants without the
    /// egress policy, and the only kind users may start workspaces from
    #[arg(
        long = "trusted-registry",
        global = true,
        env = "WARREN_TRUSTED_REGISTRIES",
        value_delimiter = ','
    )]
    trusted_registries: Vec<String>,
    /// First host uid of workspace uid ranges (65536 ids per workspace)
    #[arg(long, global = true, env = "WARREN_UID_BASE", default_value_t = ContainerRuntimeConfig::DEFAULT_UID_BASE)]
    uid_base: u32,
    /// What each container workspace (and build sandbox) may write, such as 20GiB, unless
    /// it has its own limit; past it, writes inside fail with "no space left" (default: no limit)
    #[arg(long, global = true, env = "WARREN_WORKSPACE_DISK")]
    workspace_disk: Option<String>,
    /// Give each workspace an image mount of its own, even where the kernel lets the host
    /// serve an image once for all its workspaces (about 8 MiB more per idle workspace; a
    /// mount's crash then reaches one workspace, not every workspace of its image)
    #[arg(long, global = true, env = "WARREN_NO_SHARED_IMAGE_MOUNTS")]
    no_shared_image_mounts: bool,
    /// Read every file of an image through its mount, never from a whole-file copy beside
    /// the chunk cache (FUSE passthrough, Linux 6.9+: warm reads of large files at the disk's
    /// speed, at the cost of one of the kernel's two levels of overlay stacking, so an
    /// overlay mounted inside a workspace on its root file system is refused)
    #[arg(long, global = true, env = "WARREN_NO_PASSTHROUGH")]
    no_passthrough: bool,
}

impl HostFlags {
    /// The container runtime these flags describe, keeping its state under `data`.
    pub fn runtime(&self, data: &Path) -> anyhow::Result<ContainerRuntime> {
        Ok(ContainerRuntime::new(ContainerRuntimeConfig {
            root: data.join("runtime"),
            data: data.to_path_buf(),
            helper: std::env::current_exe().context("cannot find the warren executable")?,
            network: NetworkConfig {
                bridge: self.bridge.clone(),
                subnet: self.subnet,
                nameservers: self.dns.clone(),
                egress: self.egress(),
            },
            uid_base: self.uid_base,
            share_image_mounts: !self.no_shared_image_mounts,
            passthrough: !self.no_passthrough,
            // WARREN_VM_KERNEL, WARREN_GUEST and WARREN_VM_ACCEL, else the defaults.
            vm: Default::default(),
            default_disk: match self.workspace_disk.as_deref() {
                None => None,
                Some(text) => {
                    let size = crate::parse_size(text).context("--workspace-disk")?;
                    if size < warren_runtime::MIN_DISK {
                        bail!(
                            "--workspace-disk {text}: a workspace's disk is at least {} MiB",
                            warren_runtime::MIN_DISK >> 20
                        );
                    }
                    Some(size)
                }
            },
        })?)
    }

    /// Trusts `host` (`HOST[:PORT]`) as `--trusted-registry` does.
    pub fn trust_registry(&mut self, host: String) {
        if !self.trusted_registries.contains(&host) {
            self.trusted_registries.push(host);
        }
    }

    /// Where workspaces, build steps and `ADD <url>` may not go.
    pub fn egress(&self) -> warren_runtime::EgressPolicy {
        warren_runtime::EgressPolicy {
            denied: self.deny_nets.clone(),
            allowed: self.allow_nets.clone(),
            registries: self.trusted_registries.clone(),
        }
    }

    /// The runtime, for a command that starts workspaces or sandboxes: a data folder they
    /// cannot reach is refused here, before anything starts, with the folder in the way named.
    pub fn runtime_for_workspaces(&self, data: &Path) -> anyhow::Result<ContainerRuntime> {
        let runtime = self.runtime(data)?;
        runtime.check_reachable_by_workspaces()?;
        Ok(runtime)
    }
}

#[derive(Debug, Args)]
pub struct RuntimeArgs {
    #[command(flatten)]
    host: HostFlags,
    #[command(subcommand)]
    command: RuntimeCommand,
}

#[derive(Debug, Subcommand)]
enum RuntimeCommand {
    /// Create a workspace and start it
    Run {
        name: String,
        /// A Warren image to mount lazily (`name:tag`, digest or registry reference)
        #[arg(long, conflicts_with = "dir", required_unless_present = "dir")]
        image: Option<String>,
        /// A root filesystem folder on the host (read-only underneath the workspace's own layer)
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Memory limit, e.g. 2GiB
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit in cores, e.g. 1.5
        #[arg(long)]
        cpus: Option<f64>,
        /// Most processes and threads at once
        #[arg(long)]
        pids: Option<u64>,
        /// What the workspace may write, e.g. 10GiB (default: --workspace-disk)
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// KEY=value for every process in the workspace (repeatable)
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// A virtual machine (its own kernel) instead of a system container
        #[arg(long)]
        vm: bool,
        /// Let the host's KSM merge this VM's memory with others' (a side channel between
        /// tenants: only for VMs that trust each other)
        #[arg(long, requires = "vm")]
        ksm: bool,
    },
    /// Start a stopped workspace
    Start { name: String },
    /// Run a command in a running workspace; exits with its status
    Exec {
        name: String,
        /// With a terminal (the default when stdin is one)
        #[arg(short = 't', long, overrides_with = "no_tty")]
        tty: bool,
        /// Without a terminal: separate stdin, stdout and stderr
        #[arg(short = 'T', long)]
        no_tty: bool,
        /// User name or uid inside the workspace
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// Working folder inside the workspace
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        /// KEY=value (repeatable)
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a workspace (its writable layer is kept)
    Stop {
        name: String,
        /// Seconds between SIGTERM and SIGKILL
        #[arg(long, default_value_t = 10)]
        time: u64,
    },
    /// Delete a workspace and everything made for it
    Rm {
        name: String,
        /// Delete even if it is running
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// List workspaces
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// CPU, memory, processes and disk of a running workspace
    Stats {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The per-workspace supervisor (started by the commands above)
    #[command(hide = true)]
    Shim {
        dir: PathBuf,
        /// Where the host's shared image mounts live (when its kernel allows sharing)
        #[arg(long)]
        shared_mounts: Option<PathBuf>,
        /// Read every file of the image through its mount
        #[arg(long)]
        no_passthrough: bool,
    },
    /// The supervisor of a workspace's tasks (started with the workspace)
    #[command(hide = true)]
    Tasks { name: String },
}

fn id(name: &str) -> anyhow::Result<WorkspaceId> {
    Ok(WorkspaceId::new(name)?)
}

pub fn run(args: RuntimeArgs, data: &Path) -> anyhow::Result<ExitCode> {
    if let RuntimeCommand::Shim {
        dir,
        shared_mounts,
        no_passthrough,
    } = &args.command
    {
        warren_runtime::run_shim(dir, shared_mounts.as_deref(), !no_passthrough)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = match args.command {
        RuntimeCommand::Run { .. } | RuntimeCommand::Start { .. } => {
            args.host.runtime_for_workspaces(data)?
        }
        _ => args.host.runtime(data)?,
    };
    match args.command {
        RuntimeCommand::Run {
            name,
            image,
            dir,
            memory,
            cpus,
            pids,
            disk,
            hostname,
            env,
            vm,
            ksm,
        } => {
            let memory = memory.as_deref().map(crate::parse_size).transpose()?;
            let disk = disk.as_deref().map(crate::parse_size).transpose()?;
            let root = match (image, dir) {
                (Some(reference), _) => RootSource::Image {
                    reference,
                    record_trace_secs: None,
                    lazy_only: false,
                },
                (None, Some(path)) => RootSource::Dir {
                    path: std::path::absolute(&path)?,
                },
                (None, None) => bail!("give --image or --dir"),
            };
            let config = WorkspaceConfig {
                id: id(&name)?,
                root,
                hostname,
                limits: Limits {
                    cpus,
                    memory,
                    pids,
                    disk,
                },
                env,
                vm: vm.then_some(VmOptions {
                    ksm,
                    ..Default::default()
                }),
                owner: None,
                tenant: Some(warren_runtime::HOST_TENANT.to_owned()),
            };
            let info = runtime.create(&config)?;
            runtime.start(&config.id).with_context(|| {
                format!("{name} was created but did not start (its log: {}; `warren runtime rm {name}` removes it)",
                    data.join("runtime/workspaces").join(&name).join("shim.log").display())
            })?;
            println!(
                "{name} running at {} (root inside is uid {} outside)",
                info.address, info.uid_base
            );
        }
        RuntimeCommand::Start { name } => {
            runtime.start(&id(&name)?)?;
            println!("{name} running");
        }
        RuntimeCommand::Exec {
            name,
            tty,
            no_tty,
            user,
            workdir,
            env,
            command,
        } => {
            let stdin_is_tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
            let want_tty = tty || (!no_tty && stdin_is_tty);
            return exec(&runtime, &id(&name)?, command, user, workdir, env, want_tty);
        }
        RuntimeCommand::Stop { name, time } => {
            runtime.stop(&id(&name)?, Duration::from_secs(time))?;
            println!("{name} stopped");
        }
        RuntimeCommand::Rm { name, force } => {
            let ws = id(&name)?;
            if !force && runtime.info(&ws)?.state == WorkspaceState::Running {
                bail!("{name} is running: stop it first, or use --force");
            }
            let report = runtime.delete(&ws)?;
            if !report.leftovers.is_empty() {
                for l in &report.leftovers {
                    eprintln!("left behind: {l}");
                }
                bail!(
                    "{name} was deleted, but {} thing(s) could not be removed",
                    report.leftovers.len()
                );
            }
            println!("{name} deleted");
        }
        RuntimeCommand::Ls { json } => {
            let list = runtime.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<8} {:<10} {:<15} {:<11} ROOT",
                    "NAME", "STATE", "KIND", "ADDRESS", "UID BASE"
                );
                for w in list {
                    let root = match &w.config.root {
                        RootSource::Image { reference, .. } => format!("image {reference}"),
                        RootSource::Dir { path } => format!("dir {}", path.display()),
                    };
                    let kind = match (&w.config.vm, &w.accel) {
                        (None, _) => "container".to_owned(),
                        (Some(_), Some(accel)) => format!("vm ({accel})"),
                        (Some(_), None) => "vm".to_owned(),
                    };
                    println!(
                        "{:<24} {:<8} {:<10} {:<15} {:<11} {root}",
                        w.config.id, w.state, kind, w.address, w.uid_base
                    );
                }
            }
        }
        RuntimeCommand::Stats { name, json } => {
            let s = runtime.stats(&id(&name)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let limit = |l: Option<u64>, f: &dyn Fn(u64) -> String| {
                    l.map(|v| format!(" of {}", f(v))).unwrap_or_default()
                };
                println!("cpu     {:.2}s", s.cpu_ns as f64 / 1e9);
                println!(
                    "memory  {}{}",
                    ByteSize(s.memory_bytes),
                    limit(s.memory_limit, &|v| ByteSize(v).to_string())
                );
                println!(
                    "pids    {}{}",
                    s.pids,
                    limit(s.pids_limit, &|v| v.to_string())
                );
                println!("disk    {}", ByteSize(s.disk_bytes));
                if let Some(vm) = &s.vm {
                    println!(
                        "vm      {} (memory above: QEMU's on the host); guest {} free of {} ({} available)",
                        vm.accel,
                        ByteSize(vm.guest_free),
                        ByteSize(vm.guest_total),
                        ByteSize(vm.guest_available)
                    );
                }
            }
        }
        RuntimeCommand::Tasks { name } => {
            let id = id(&name)?;
            let dir = runtime.tasks_dir(&id)?;
            warren_runtime::tasks::supervise(&runtime, &id, &dir)?;
        }
        RuntimeCommand::Shim { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(
    runtime: &ContainerRuntime,
    ws: &WorkspaceId,
    argv: Vec<String>,
    user: Option<String>,
    cwd: Option<String>,
    env: Vec<String>,
    tty: bool,
) -> anyhow::Result<ExitCode> {
    let size = tty.then(|| terminal_size().unwrap_or(WinSize { rows: 24, cols: 80 }));
    let mut env = env;
    if tty && let Ok(term) = std::env::var("TERM") {
        env.insert(0, format!("TERM={term}"));
    }
    let started = runtime.exec(
        ws,
        &ExecRequest {
            argv,
            env,
            cwd,
            land_in: None,
            user,
            tty: size,
            no_network: false,
        },
    )?;
    let process = started.process;
    let status = match started.io {
        ExecIo::Pipes {
            mut stdin,
            mut stdout,
            mut stderr,
        } => {
            // stdin is copied by a thread that may stay blocked on our stdin after the process
            // exits; the process's exit ends the command regardless.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut stdin);
            });
            let err = std::thread::spawn(move || {
                let _ = std::io::copy(&mut stderr, &mut std::io::stderr());
            });
            let _ = std::io::copy(&mut stdout, &mut std::io::stdout().lock());
            let _ = err.join();
            process.wait()?
        }
        ExecIo::Pty { master } => {
            let raw = RawMode::enter();
            let mut input = master.try_clone()?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut stdin = std::io::stdin().lock();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 || input.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            let process: std::sync::Arc<dyn warren_runtime::Process> = process.into();
            let resizer = process.clone();
            if let Ok(mut signals) =
                signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH])
            {
                std::thread::spawn(move || {
                    for _ in signals.forever() {
                        if let Some(size) = terminal_size() {
                            let _ = resizer.resize(size);
                        }
                    }
                });
            }
            let mut output = master;
            let mut buf = [0u8; 8192];
            let mut stdout = std::io::stdout().lock();
            // EIO once the last process holding the terminal's slave side is gone.
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = stdout.flush();
            }
            let status = process.wait();
            drop(raw);
            status?
        }
    };
    Ok(ExitCode::from(status.as_shell_code().clamp(0, 255) as u8))
}

fn terminal_size() -> Option<WinSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which outlives the call.
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some(WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The local terminal in raw mode while a remote terminal is attached; restored on drop.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}
