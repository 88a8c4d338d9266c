//! `warren build`: a Dockerfile built with no Docker daemon, each stage in a workspace sandbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::runtime_cmd::HostFlags;

/// What each build step and prebuild task may use (`warren build`, `up` and `agent`).
#[derive(Debug, Clone, Args)]
pub struct StepLimitFlags {
    /// Longest a build step or prebuild task may run, in seconds, before it is stopped
    #[arg(long, env = "WARREN_BUILD_STEP_SECONDS", default_value_t = 3600)]
    build_step_seconds: u64,
    /// Memory of each build and prebuild sandbox, such as 8GiB (default: half of this host's)
    #[arg(long, env = "WARREN_BUILD_MEMORY")]
    build_memory: Option<String>,
    /// Most processes and threads at once in each build and prebuild sandbox
    #[arg(long, env = "WARREN_BUILD_PIDS", default_value_t = 4096)]
    build_pids: u64,
}

impl StepLimitFlags {
    pub fn limits(&self) -> anyhow::Result<warren_builder::StepLimits> {
        if self.build_step_seconds == 0 || self.build_pids == 0 {
            bail!("--build-step-seconds and --build-pids must be more than 0");
        }
        let default = warren_builder::StepLimits::host_default();
        Ok(warren_builder::StepLimits {
            time: std::time::Duration::from_secs(self.build_step_seconds),
            memory: match &self.build_memory {
                Some(text) => Some(crate::parse_size(text).context("--build-memory")?),
                None => default.memory,
            },
            pids: Some(self.build_pids),
        })
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build context (a folder)
    context: PathBuf,
    /// The image to make, NAME:TAG
    #[arg(short, long)]
    tag: String,
    /// The Dockerfile (default: <context>/Dockerfile)
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// KEY=VALUE for the Dockerfile's ARGs (repeat)
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    #[command(flatten)]
    host: HostFlags,
    #[command(flatten)]
    limits: StepLimitFlags,
}

pub fn build(args: BuildArgs, data: &Path) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("warren build runs each step in a sandbox (namespaces, mounts): run it as root");
    }
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let shown = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    let dockerfile = warren_builder::parse(&shown, &text)?;
    let ignore = match std::fs::read_to_string(args.context.join(".dockerignore")) {
        Ok(text) => warren_builder::Ignore::parse(&text).map_err(anyhow::Error::msg)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warren_builder::Ignore::parse("").map_err(anyhow::Error::msg)?
        }
        Err(e) => return Err(e).context("cannot read .dockerignore"),
    };
    let mut build_args = BTreeMap::new();
    for kv in &args.build_args {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--build-arg `{kv}`: expected KEY=VALUE"))?;
        build_args.insert(k.to_owned(), v.to_owned());
    }
    let runtime = args.host.runtime_for_workspaces(data)?;
    let store = crate::image_cmd::LocalImages {
        data: data.to_path_buf(),
        indexes: Default::default(),
        egress: None,
    };
    // What a killed build left behind goes first.
    for name in warren_runtime::reap_orphans(&runtime) {
        eprintln!("removed {name}, a sandbox of a build that is gone");
    }
    let prefix = format!("build-{}", std::process::id());
    let started = std::time::Instant::now();
    let built = warren_builder::build(
        &runtime,
        &store,
        &warren_builder::BuildRequest {
            dockerfile: &dockerfile,
            file: &shown,
            context: &args.context,
            ignore: &ignore,
            build_args: &build_args,
            tag: &args.tag,
            sandbox_prefix: &prefix,
            cancel: None,
            mount_cache: Some(&data.join("build-mounts")),
            cache_scope: "",
            limits: args.limits.limits()?,
            spool: warren_builder::Spool::new(
                &data.join("tmp"),
                warren_builder::Spool::DEFAULT_BUDGET,
            ),
        },
        &mut std::io::stderr(),
    )?;
    println!(
        "built {} ({}) in {:.1}s: {} steps run, {} from the cache",
        args.tag,
        built.digest,
        started.elapsed().as_secs_f64(),
        built.steps_run,
        built.steps_cached
    );
    Ok(ExitCode::SUCCESS)
}
