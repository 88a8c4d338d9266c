//! `warren spec check`: read a repository's environment file and show what Warren makes of it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;
use warren_envfile::{
    Diagnostic, EnvSpec, ImageSource, Loaded, Phase, ReadOptions, RepoPath, SpecError,
};

/// Exit code for an environment file that cannot be used.
const INVALID: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// Check an environment file and print the environment it describes
    Check {
        /// A project folder (the file is discovered there) or an environment file
        #[arg(default_value = ".")]
        path: PathBuf,
        /// The repository root; by default the nearest folder above PATH holding `.git`
        #[arg(long)]
        repo: Option<PathBuf>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: SpecCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SpecCommand::Check { path, repo, json } => check(&path, repo.as_deref(), json),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonReport<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<&'a EnvSpec>,
    errors: Vec<Diagnostic>,
    warnings: &'a [Diagnostic],
}

fn check(path: &Path, repo: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    let repo_root = match repo {
        Some(r) => r
            .canonicalize()
            .with_context(|| format!("cannot open `{}`", r.display()))?,
        None => find_repo_root(&path),
    };
    let relative = path.strip_prefix(&repo_root).map_err(|_| {
        anyhow::anyhow!(
            "`{}` is not inside the repository `{}`",
            path.display(),
            repo_root.display()
        )
    })?;
    let relative = relative.to_str().context("the path is not valid UTF-8")?;
    let target = RepoPath::resolve(
        &RepoPath::root(),
        if relative.is_empty() { "." } else { relative },
    )
    .map_err(|why| anyhow::anyhow!("{why}"))?;
    let options = ReadOptions {
        local_env: std::env::vars().collect(),
        local_workspace_folder: Some(repo_root.display().to_string()),
    };
    match warren_envfile::load(&repo_root, &target, &options) {
        Ok(Loaded { spec, warnings }) => {
            if json {
                let report = JsonReport {
                    ok: true,
                    spec: Some(&spec),
                    errors: Vec::new(),
                    warnings: &warnings,
                };
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", describe(&spec));
                for w in &warnings {
                    eprintln!("{w}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(SpecError::Rejected(rejected)) => {
            if json {
                let report = JsonReport {
                    ok: false,
                    spec: None,
                    errors: rejected.errors.clone(),
                    warnings: &rejected.warnings,
                };
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for d in rejected.warnings.iter().chain(&rejected.errors) {
                    if d.file == rejected.file {
                        eprint!("{}", d.render(&rejected.text));
                    } else {
                        eprintln!("{d}");
                    }
                }
                eprintln!(
                    "{}: {} error(s); the environment cannot be used",
                    rejected.file,
                    rejected.errors.len()
                );
            }
            Ok(ExitCode::from(INVALID))
        }
        Err(
            err @ (SpecError::NotFound { .. }
            | SpecError::OnlyNested { .. }
            | SpecError::UnknownName { .. }
            | SpecError::OutsideRepository { .. }),
        ) => {
            if json {
                let report = serde_json::json!({ "ok": false, "errors": [{ "message": err.to_string() }], "warnings": [] });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprintln!("error: {err}");
            }
            Ok(ExitCode::from(INVALID))
        }
        Err(err) => Err(err.into()),
    }
}

/// The nearest folder at or above `path` that holds `.git`; `path` itself (or its folder) if none.
fn find_repo_root(path: &Path) -> PathBuf {
    let start = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    start
        .ancestors()
        .find(|dir| dir.join(".git").exists())
        .unwrap_or(start)
        .to_path_buf()
}

/// The human-readable summary of an environment.
fn describe(spec: &EnvSpec) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "{} ({})", spec.source.path, spec.source.format);
    if let Some(name) = &spec.name {
        let _ = writeln!(w, "  name       {name}");
    }
    match &spec.image {
        ImageSource::Reference { reference } => {
            let _ = writeln!(w, "  image      {reference}");
        }
        ImageSource::Dockerfile {
            dockerfile,
            context,
            args,
            target,
        } => {
            let _ = write!(w, "  image      build {dockerfile} (context {context}");
            if let Some(t) = target {
                let _ = write!(w, ", target {t}");
            }
            for (k, v) in args {
                let _ = write!(w, ", {k}={v}");
            }
            let _ = writeln!(w, ")");
        }
    }
    let _ = writeln!(w, "  runtime    {}", spec.runtime);
    let r = &spec.resources;
    let mut res = Vec::new();
    if let Some(c) = r.cpus {
        res.push(format!("{c} cpus"));
    }
    if let Some(m) = r.memory {
        res.push(format!("{m} memory"));
    }
    if let Some(d) = r.disk {
        res.push(format!("{d} disk"));
    }
    let _ = writeln!(
        w,
        "  resources  {}",
        if res.is_empty() {
            "host defaults".to_owned()
        } else {
            res.join(", ")
        }
    );
    let _ = writeln!(w, "  folder     {}", spec.workspace_folder);
    if let Some(u) = &spec.user {
        let _ = writeln!(w, "  user       {u}");
    }
    if let Some(u) = &spec.container_user {
        let _ = writeln!(w, "  container user {u}");
    }
    if !spec.ports.is_empty() {
        let ports: Vec<String> = spec
            .ports
            .iter()
            .map(|p| match &p.label {
                Some(l) => format!("{} ({l})", p.port),
                None => p.port.to_string(),
            })
            .collect();
        let _ = writeln!(w, "  ports      {}", ports.join(", "));
    }
    for (title, map) in [("env", &spec.env), ("remote env", &spec.remote_env)] {
        for (k, v) in map {
            let _ = writeln!(w, "  {title:<10} {k}={v}");
        }
    }
    if !spec.extensions.is_empty() {
        let _ = writeln!(w, "  extensions {}", spec.extensions.join(", "));
    }
    for phase in [
        Phase::Prebuild,
        Phase::FirstStart,
        Phase::EveryStart,
        Phase::Attach,
    ] {
        let tasks: Vec<_> = spec.tasks_in(phase).collect();
        if tasks.is_empty() {
            continue;
        }
        let _ = writeln!(w, "  tasks on {phase}:");
        for t in tasks {
            let summary = match &t.command {
                warren_envfile::Command::Script(s) => {
                    let mut lines = s.lines();
                    let head = lines.next().unwrap_or_default().to_owned();
                    let more = lines.filter(|l| !l.trim().is_empty()).count();
                    if more > 0 {
                        format!("{head}  (+{more} lines)")
                    } else {
                        head
                    }
                }
                warren_envfile::Command::Exec(argv) => format!("exec {argv:?}"),
            };
            let _ = writeln!(
                w,
                "    [{}] {} ({}): {summary}",
                t.stage,
                t.name,
                t.shell.name()
            );
        }
    }
    out
}
