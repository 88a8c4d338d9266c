//! `warren bench build`: the devcontainer example's Dockerfile built cold and cached by
//! `warren build` and by `docker build` (dockerd in the benchmark's namespace), from the same
//! Debian base; and the bytes a prebuild of a commit changing one source file newly stores.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::Serialize;
use warren_agent::{Outcome, PrebuildJob, Prebuilder as _};
use warren_runtime::{ContainerRuntime, ContainerRuntimeConfig, NetworkConfig};

use crate::bench::sh;
use crate::bench_runtime::{Dockerd, debian_rootfs};

/// The example, compiled in so the benchmark runs from the binary alone.
const DOCKERFILE: &str =
    include_str!("../../../examples/devcontainer-app/.devcontainer/Dockerfile");
const DEVCONTAINER: &str =
    include_str!("../../../examples/devcontainer-app/.devcontainer/devcontainer.json");
const NOTES_INDEX: &str = include_str!("../../../examples/devcontainer-app/tools/notes-index");

const BENCH_UID_BASE: u32 = 3_500_000_000;

#[derive(Debug, Serialize)]
struct Results {
    runs: usize,
    warren_cold_s: f64,
    warren_cached_s: f64,
    docker_cold_s: f64,
    docker_cached_s: f64,
    cold_over_docker: f64,
    cached_over_docker: f64,
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

/// The example's files as a build context (its Dockerfile at the top).
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

fn warren(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap_or_else(|_| "warren".into()));
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

pub(crate) fn build(runs: usize, work: &Path, json: Option<&Path>) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::bench::require_programs(&[("dockerd", "docker.io"), ("git", "git")])?;
    std::fs::create_dir_all(work)?;
    let rootfs = debian_rootfs(work, &[])?;
    let ctx = context(work)?;
    let ctx_s = ctx.to_str().context("a UTF-8 work folder")?;

    // Warren: a fresh store with the base each cold run; the cached run right after it.
    let (mut w_cold, mut w_cached) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let data = work.join("data");
        let _ = std::fs::remove_dir_all(&data);
        sh(warren(&data, &["image", "import"])
            .arg(&rootfs)
            .arg("debian:bookworm"))?;
        let build = || sh(&mut warren(&data, &["build", ctx_s, "-t", "notes:1"])).map(drop);
        w_cold.push(timed(build)?);
        w_cached.push(timed(build)?);
    }

    // docker build, from the same base imported into a dockerd of its own.
    let dockerd = Dockerd::start(&work.join("docker-build"))?;
    dockerd.import(&rootfs, "debian:bookworm")?;
    let (mut d_cold, mut d_cached) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let build = |extra: &[&str]| {
            sh(dockerd
                .client()
                .arg("build")
                .args(extra)
                .args(["-q", "-t", "notes:1", ctx_s])
                .env("DOCKER_BUILDKIT", "0")
                .stdin(Stdio::null()))
            .map(drop)
        };
        d_cold.push(timed(|| build(&["--no-cache"]))?);
        d_cached.push(timed(|| build(&[]))?);
    }
    drop(dockerd);

    let (image_bytes, new_bytes) = one_file_prebuild(work, &rootfs)?;
    let r = Results {
        runs,
        warren_cold_s: median(w_cold),
        warren_cached_s: median(w_cached),
        docker_cold_s: median(d_cold),
        docker_cached_s: median(d_cached),
        cold_over_docker: 0.0,
        cached_over_docker: 0.0,
        image_bytes,
        one_file_prebuild_new_bytes: new_bytes,
        one_file_prebuild_share: new_bytes as f64 / image_bytes.max(1) as f64,
    };
    let r = Results {
        cold_over_docker: r.warren_cold_s / r.docker_cold_s,
        cached_over_docker: r.warren_cached_s / r.docker_cached_s,
        ..r
    };
    println!("examples/devcontainer-app's Dockerfile from a Debian minbase, median of {runs}:");
    println!(
        "  cold:   warren build {:.2} s   docker build --no-cache {:.2} s   ratio {:.2} (target ≤ 1.2)",
        r.warren_cold_s, r.docker_cold_s, r.cold_over_docker
    );
    println!(
        "  cached: warren build {:.2} s   docker build {:.2} s   ratio {:.2} (target ≤ 1)",
        r.warren_cached_s, r.docker_cached_s, r.cached_over_docker
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

    let runtime = Arc::new(ContainerRuntime::new(ContainerRuntimeConfig {
        root: data.join("runtime"),
        data: data.clone(),
        helper: std::env::current_exe()?,
        network: NetworkConfig::default(),
        uid_base: BENCH_UID_BASE,
        vm: Default::default(),
    })?);
    let prebuilder = crate::prebuild_cmd::HostPrebuilder {
        data: data.clone(),
        runtime,
    };
    let url = format!("file://{}", repo.display());
    let prebuild = |commit: &str| -> anyhow::Result<String> {
        let job = PrebuildJob {
            prebuild_id: format!("bench{}", &commit[..8]),
            git_url: url.clone(),
            commit: commit.to_owned(),
            target: String::new(),
            variables: Vec::new(),
            record_trace_secs: 0,
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
