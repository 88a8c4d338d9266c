//! `warren-bench build`: two Dockerfiles built by `warren build` and by Docker's classic builder
//! (`DOCKER_BUILDKIT=0 docker build`, dockerd in the benchmark's namespace) from the same Debian
//! base, each cold (nothing cached), cached (nothing changed) and after one source file
//! changed; and the bytes a prebuild of a commit changing one source file newly stores.
//!
//! BuildKit is not the peer: it needs `docker-buildx`, which neither Debian bookworm nor its
//! backports ship, so it cannot be installed on the machines this runs on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::Serialize;
use warren_agent::{Outcome, PrebuildJob, Prebuilder as _};
use warren_runtime::ContainerRuntime;

use crate::bench::sh;
use crate::bench_runtime::{Dockerd, debian_rootfs};

/// The examples, compiled in so the benchmark runs from the binary alone.
const DOCKERFILE: &str =
    include_str!("../../../examples/devcontainer-app/.devcontainer/Dockerfile");
const DEVCONTAINER: &str =
    include_str!("../../../examples/devcontainer-app/.devcontainer/devcontainer.json");
const NOTES_INDEX: &str = include_str!("../../../examples/devcontainer-app/tools/notes-index");
const BENCH_DOCKERFILE: &str = include_str!("../../../examples/build-bench/Dockerfile");

const BENCH_UID_BASE: u32 = 3_500_000_000;

/// One Dockerfile with its context, and how one of its source files changes.
struct Case {
    name: &'static str,
    context: PathBuf,
    /// A source file the Dockerfile copies early, rewritten with new content per run.
    source_file: &'static str,
}

#[derive(Debug, Serialize)]
struct Row {
    dockerfile: &'static str,
    builder: &'static str,
    cold_s: f64,
    cached_s: f64,
    one_file_changed_s: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    runs: usize,
    rows: Vec<Row>,
    image_bytes: u64,
    one_file_prebuild_new_bytes: u64,
    one_file_prebuild_share: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// The devcontainer example's files as a build context (its Dockerfile at the top).
fn context(work: &Path) -> anyhow::Result<PathBuf> {
    let ctx = work.join("context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(ctx.join("tools"))?;
    std::fs::create_dir_all(ctx.join(".devcontainer"))?;
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
    std::fs::write(ctx.join(".devcontainer/Dockerfile"), DOCKERFILE)?;
    std::fs::write(ctx.join(".devcontainer/devcontainer.json"), DEVCONTAINER)?;
    std::fs::write(ctx.join("tools/notes-index"), NOTES_INDEX)?;
    Ok(ctx)
}

/// `examples/build-bench`'s context: 2,000 source files in 40 folders (1 to 8 KiB of text
/// each) and a 20 MB file that does not compress.
fn bench_context(work: &Path) -> anyhow::Result<PathBuf> {
    let ctx = work.join("bench-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(ctx.join("assets"))?;
    std::fs::write(ctx.join("Dockerfile"), BENCH_DOCKERFILE)?;
    for i in 0..2000u32 {
        let dir = ctx.join(format!("src/pkg{:02}", i % 40));
        std::fs::create_dir_all(&dir)?;
        let lines = 16 + (i * 7919) % 112;
        let body: String = (0..lines)
            .map(|l| format!("fn item_{i}_{l}() -> u32 {{ {} }}\n", i * 31 + l))
            .collect();
        std::fs::write(dir.join(format!("mod{i:04}.rs")), body)?;
    }
    crate::bench::write_random(&ctx.join("assets/data.bin"), 20_000_000)?;
    Ok(ctx)
}

fn warren(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(crate::bench::warren_exe().unwrap_or_else(|_| "warren".into()));
    c.arg("--data")
        .arg(data)
        .args(args)
        .env("WARREN_UID_BASE", BENCH_UID_BASE.to_string());
    c
}

/// Bytes in the local store's blobs.
fn stored_bytes(data: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&data.join("images/blobs"))
}

/// Gives the case's source file new content (a different one each `run`).
fn change_one(case: &Case, builder: &str, run: usize) -> anyhow::Result<()> {
    let path = case.context.join(case.source_file);
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str(&format!("# changed for {builder}, run {run}\n"));
    std::fs::write(&path, text)?;
    Ok(())
}

pub(crate) fn build(runs: usize, work: &Path, json: Option<&Path>) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::bench::require_programs(&[("dockerd", "docker.io"), ("git", "git")])?;
    std::fs::create_dir_all(work)?;
    let rootfs = debian_rootfs(work, &[])?;
    let cases = [
        Case {
            name: "examples/devcontainer-app",
            context: context(work)?,
            source_file: "tools/notes-index",
        },
        Case {
            name: "examples/build-bench",
            context: bench_context(work)?,
            source_file: "src/pkg07/mod0007.rs",
        },
    ];
    let mut rows = Vec::new();
    for case in &cases {
        let ctx = case.context.to_str().context("a UTF-8 work folder")?;
        // Warren: a fresh store holding only the base for each cold build.
        let (mut cold, mut cached, mut one) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let data = work.join("data");
            let _ = std::fs::remove_dir_all(&data);
            sh(warren(&data, &["image", "import"])
                .arg(&rootfs)
                .arg("debian:bookworm"))?;
            let build = || sh(&mut warren(&data, &["build", ctx, "-t", "bench:1"])).map(drop);
            cold.push(timed(build)?);
            cached.push(timed(build)?);
            change_one(case, "warren", run)?;
            one.push(timed(build)?);
        }
        rows.push(Row {
            dockerfile: case.name,
            builder: "warren build",
            cold_s: median(cold),
            cached_s: median(cached),
            one_file_changed_s: median(one),
        });

        // Docker's classic builder, from the same base imported into a dockerd of its own.
        let dockerd = Dockerd::start(&work.join("docker-build"))?;
        dockerd.import(&rootfs, "debian:bookworm")?;
        let (mut cold, mut cached, mut one) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let build = |extra: &[&str]| {
                sh(dockerd
                    .client()
                    .arg("build")
                    .args(extra)
                    .args(["-q", "-t", "bench:1", ctx])
                    .env("DOCKER_BUILDKIT", "0")
                    .stdin(Stdio::null()))
                .map(drop)
            };
            cold.push(timed(|| build(&["--no-cache"]))?);
            cached.push(timed(|| build(&[]))?);
            change_one(case, "docker", run)?;
            one.push(timed(|| build(&[]))?);
        }
        drop(dockerd);
        rows.push(Row {
            dockerfile: case.name,
            builder: "docker build (classic)",
            cold_s: median(cold),
            cached_s: median(cached),
            one_file_changed_s: median(one),
        });
    }

    let (image_bytes, new_bytes) = one_file_prebuild(work, &rootfs)?;
    let r = Results {
        runs,
        rows,
        image_bytes,
        one_file_prebuild_new_bytes: new_bytes,
        one_file_prebuild_share: new_bytes as f64 / image_bytes.max(1) as f64,
    };
    println!(
        "Dockerfiles from a Debian minbase base, seconds, median of {runs} (cold: nothing cached; cached: nothing changed; one file: one source file changed):"
    );
    println!(
        "  {:<26} {:<24} {:>8} {:>8} {:>9}",
        "dockerfile", "builder", "cold", "cached", "one file"
    );
    for row in &r.rows {
        println!(
            "  {:<26} {:<24} {:>8.2} {:>8.2} {:>9.2}",
            row.dockerfile, row.builder, row.cold_s, row.cached_s, row.one_file_changed_s
        );
    }
    for pair in r.rows.chunks(2) {
        if let [w, d] = pair {
            println!(
                "  {}: warren over docker: cold {:.2}, cached {:.2}, one file {:.2} (target ≤ 1)",
                w.dockerfile,
                w.cold_s / d.cold_s,
                w.cached_s / d.cached_s,
                w.one_file_changed_s / d.one_file_changed_s
            );
        }
    }
    println!(
        "(the peer is the classic builder: BuildKit needs docker-buildx, which Debian bookworm and its backports do not ship)"
    );
    println!(
        "prebuild of a commit changing one source file: {} new bytes stored for a {} image = {:.3}% (target ≤ 1%)",
        r.one_file_prebuild_new_bytes,
        r.image_bytes,
        r.one_file_prebuild_share * 100.0
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}

/// Two prebuilds of the example's repository, the second commit changing one source file; the
/// image's size and the bytes the second one added to the store.
fn one_file_prebuild(work: &Path, rootfs: &Path) -> anyhow::Result<(u64, u64)> {
    let data = work.join("prebuild-data");
    let _ = std::fs::remove_dir_all(&data);
    sh(warren(&data, &["image", "import"])
        .arg(rootfs)
        .arg("debian:bookworm"))?;
    let repo = work.join("prebuild-repo");
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo)?;
    let src = context(work)?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&repo))?;
    std::fs::remove_file(repo.join("Dockerfile"))?;
    let git = |args: &[&str]| {
        sh(Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args([
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@warren.invalid",
            ])
            .args(args))
    };
    git(&["init", "-q", "-b", "main"])?;
    // A source tree of some size, as a project has.
    for i in 0..200 {
        std::fs::create_dir_all(repo.join("src"))?;
        std::fs::write(
            repo.join(format!("src/module{i}.txt")),
            format!("module {i}\n").repeat(400),
        )?;
    }
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "first"])?;
    let first = git(&["rev-parse", "HEAD"])?.trim().to_owned();
    std::fs::write(repo.join("src/module7.txt"), "changed\n")?;
    git(&["commit", "-q", "-am", "one file"])?;
    let second = git(&["rev-parse", "HEAD"])?.trim().to_owned();

    let runtime = Arc::new(ContainerRuntime::new(crate::bench::runtime_config(
        &data,
        BENCH_UID_BASE,
    )?)?);
    let prebuilder = warren_cli::prebuild_cmd::HostPrebuilder {
        data: data.clone(),
        runtime,
        limits: warren_builder::StepLimits::host_default(),
    };
    let url = format!("file://{}", repo.display());
    let prebuild = |commit: &str| -> anyhow::Result<String> {
        let job = PrebuildJob {
            prebuild_id: format!("bench{}", &commit[..8]),
            project_id: "bench".into(),
            git_url: url.clone(),
            commit: commit.to_owned(),
            target: String::new(),
            variables: Vec::new(),
            record_trace_secs: 0,
            registry: None,
        };
        match prebuilder
            .prebuild(&job, &mut std::io::sink(), &AtomicBool::new(false))
            .map_err(anyhow::Error::msg)?
        {
            Outcome::Prebuilt { image, .. } => Ok(image),
            other => bail!("the prebuild answered {other:?}"),
        }
    };
    let first_image = prebuild(&first)?;
    let before = stored_bytes(&data);
    prebuild(&second)?;
    let added = stored_bytes(&data).saturating_sub(before);
    let inspect = sh(&mut warren(
        &data,
        &["image", "inspect", &first_image, "--json"],
    ))?;
    let info: serde_json::Value = serde_json::from_str(&inspect)?;
    let image_bytes = info["dataBytes"]
        .as_u64()
        .context("`image inspect --json` gave no dataBytes")?;
    Ok((image_bytes, added))
}
