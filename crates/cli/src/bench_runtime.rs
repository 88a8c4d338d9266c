//! `warren bench runtime`: workspace start → exec `true` → stop cycles against `runc run` and
//! `docker run --rm` on the same Debian root filesystem, in one run, plus the host memory an
//! idle workspace costs.
//!
//! Runs in the benchmark's own network namespace (see `bench.rs`): Warren's bridge and rules and
//! dockerd's `docker0` and iptables rules live and die there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use warren_runtime::{
    ContainerRuntime, ContainerRuntimeConfig, ExecIo, ExecRequest, ExitStatus, NetworkConfig,
    RootSource, Runtime, WorkspaceConfig, WorkspaceId,
};

use crate::bench::sh;

/// Far from the default workspace ranges, so a benchmark never meets real workspaces' ids.
const BENCH_UID_BASE: u32 = 3_000_000_000;

#[derive(Debug, Serialize)]
pub(crate) struct Series {
    name: String,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mean_ms: f64,
}

impl Series {
    pub(crate) fn new(name: &str, mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| {
            ms(samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1])
        };
        Self {
            name: name.into(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            mean_ms: samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64,
        }
    }
}

#[derive(Debug, Serialize)]
struct IdleMemory {
    workspaces: usize,
    /// Proportional set size per workspace, MiB: what each adds to the host.
    shim_mib: f64,
    image_mount_mib: f64,
    init_mib: f64,
    total_mib: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    cycles: usize,
    series: Vec<Series>,
    /// Warren's p50 over docker's, from a folder and from a lazy image.
    folder_p50_over_docker: f64,
    image_p50_over_docker: f64,
    idle: IdleMemory,
}

pub(crate) fn runtime(cycles: usize, work: &Path, json: Option<&Path>) -> anyhow::Result<()> {
    if cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    crate::bench::require_programs(&[
        ("runc", "runc"),
        ("dockerd", "docker.io"),
        ("mmdebstrap", "mmdebstrap"),
    ])?;
    std::fs::create_dir_all(work)?;
    let rootfs = debian_rootfs(work, &[])?;
    let data = work.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let helper = std::env::current_exe()?;
    let runtime = ContainerRuntime::new(ContainerRuntimeConfig {
        root: data.join("runtime"),
        data: data.clone(),
        helper: helper.clone(),
        network: NetworkConfig::default(),
        uid_base: BENCH_UID_BASE,
        vm: Default::default(),
    })?;
    sh(Command::new(&helper)
        .arg("--data")
        .arg(&data)
        .args(["image", "import"])
        .arg(&rootfs)
        .arg("bench:1"))?;

    let mut series = Vec::new();
    for (name, root) in [
        (
            "warren (folder)",
            RootSource::Dir {
                path: rootfs.clone(),
            },
        ),
        (
            "warren (lazy image)",
            RootSource::Image {
                reference: "bench:1".into(),
                record_trace_secs: None,
                lazy_only: false,
            },
        ),
    ] {
        let id = WorkspaceId::new(if matches!(root, RootSource::Dir { .. }) {
            "bench-dir"
        } else {
            "bench-image"
        })?;
        runtime.create(&WorkspaceConfig {
            id: id.clone(),
            root,
            hostname: None,
            limits: Default::default(),
            env: Vec::new(),
            vm: None,
        })?;
        let samples = timed(cycles, name, || {
            runtime.start(&id)?;
            let exec = runtime.exec(
                &id,
                &ExecRequest {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
            )?;
            if let ExecIo::Pipes { stdin, .. } = exec.io {
                drop(stdin);
            }
            let status = exec.process.wait()?;
            if status != ExitStatus::Code(0) {
                bail!("`true` exited with {status:?}");
            }
            runtime.stop(&id, Duration::from_secs(10))?;
            Ok(())
        })?;
        runtime.delete(&id)?;
        series.push(Series::new(name, samples));
    }

    series.push(Series::new("runc run", runc(cycles, work, &rootfs)?));
    series.push(Series::new(
        "docker run --rm",
        docker(cycles, work, &rootfs)?,
    ));
    let idle = idle_memory(&runtime, 5)?;

    let docker_p50 = series[3].p50_ms;
    let results = Results {
        cycles,
        folder_p50_over_docker: series[0].p50_ms / docker_p50,
        image_p50_over_docker: series[1].p50_ms / docker_p50,
        series,
        idle,
    };
    println!(
        "start → exec `true` → stop, {cycles} cycles each, the same Debian minbase root filesystem:"
    );
    for s in &results.series {
        println!(
            "  {:<22} p50 {:>7.1} ms   p99 {:>7.1} ms   mean {:>7.1} ms",
            s.name, s.p50_ms, s.p99_ms, s.mean_ms
        );
    }
    println!(
        "  p50 over docker's: warren (folder) {:.2}, warren (lazy image) {:.2} (target ≤ 1)",
        results.folder_p50_over_docker, results.image_p50_over_docker
    );
    let m = &results.idle;
    println!(
        "idle workspace on the host (PSS, mean of {}): shim {:.2} MiB + image mount {:.2} MiB + init {:.2} MiB = {:.2} MiB (target ≤ 10 MiB)",
        m.workspaces, m.shim_mib, m.image_mount_mib, m.init_mib, m.total_mib
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

fn timed(
    cycles: usize,
    name: &str,
    mut cycle: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    // Two unmeasured cycles warm the page cache and the image's chunk cache.
    for _ in 0..2 {
        cycle().with_context(|| format!("{name}: warm-up cycle"))?;
    }
    let mut samples = Vec::with_capacity(cycles);
    for i in 0..cycles {
        let t = Instant::now();
        cycle().with_context(|| format!("{name}: cycle {i}"))?;
        samples.push(t.elapsed());
    }
    eprintln!("{name}: done");
    Ok(samples)
}

/// A Debian minbase root filesystem, made once with mmdebstrap and kept in the work folder.
/// A Debian minbase root filesystem with `include`d packages, built once into `work`.
pub(crate) fn debian_rootfs(work: &Path, include: &[&str]) -> anyhow::Result<PathBuf> {
    let name = std::iter::once("rootfs")
        .chain(include.iter().copied())
        .collect::<Vec<_>>()
        .join("-");
    std::fs::create_dir_all(work)?;
    let rootfs = work.join(&name);
    let done = work.join(format!("{name}.complete"));
    if done.exists() {
        return Ok(rootfs);
    }
    let _ = std::fs::remove_dir_all(&rootfs);
    eprintln!("building a Debian minbase root filesystem with mmdebstrap (once)");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--quiet"]);
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    sh(cmd
        .arg("bookworm")
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian"))?;
    std::fs::write(&done, b"")?;
    Ok(rootfs)
}

fn runc(cycles: usize, work: &Path, rootfs: &Path) -> anyhow::Result<Vec<Duration>> {
    let bundle = work.join("runc-bundle");
    let state = work.join("runc-state");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle)?;
    sh(Command::new("runc").arg("spec").current_dir(&bundle))?;
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["root"] = serde_json::json!({ "path": rootfs, "readonly": true });
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    let mut n = 0;
    timed(cycles, "runc run", || {
        n += 1;
        sh(Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("bench-{n}"))
            .stdin(Stdio::null()))?;
        Ok(())
    })
}

/// dockerd in the benchmark's namespace with its own folders, stopped on drop.
pub(crate) struct Dockerd {
    child: Child,
    socket: PathBuf,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Dockerd {
    /// Starts dockerd with its folders under `dir` and waits until it answers.
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Dockerd> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd")?;
        let dockerd = Dockerd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !dockerd
            .client()
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success()
        {
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not come up (see {})",
                    dir.join("dockerd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(dockerd)
    }

    /// `docker` talking to this dockerd.
    pub(crate) fn client(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.socket.display()));
        c
    }

    /// Imports a root filesystem folder as the image `tag`.
    pub(crate) fn import(&self, rootfs: &Path, tag: &str) -> anyhow::Result<()> {
        let mut import = self
            .client()
            .args(["import", "-", tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()?;
        if let (Some(mut from), Some(mut to)) = (tar.stdout.take(), import.stdin.take()) {
            std::io::copy(&mut from, &mut to)?;
            to.flush()?;
        }
        if !tar.wait()?.success() || !import.wait()?.success() {
            bail!("docker import of the root filesystem failed");
        }
        Ok(())
    }
}

fn docker(cycles: usize, work: &Path, rootfs: &Path) -> anyhow::Result<Vec<Duration>> {
    let dockerd = Dockerd::start(&work.join("docker"))?;
    dockerd.import(rootfs, "warren-bench:1")?;
    timed(cycles, "docker run", || {
        sh(dockerd
            .client()
            .args(["run", "--rm", "warren-bench:1", "true"])
            .stdin(Stdio::null()))?;
        Ok(())
    })
}

/// Starts `count` idle workspaces from the image and measures what their processes add to the
/// host (proportional set size: shared pages split between the processes sharing them).
fn idle_memory(runtime: &ContainerRuntime, count: usize) -> anyhow::Result<IdleMemory> {
    let ids: Vec<WorkspaceId> = (0..count)
        .map(|i| WorkspaceId::new(&format!("idle-{i}")))
        .collect::<Result<_, _>>()?;
    for id in &ids {
        runtime.create(&WorkspaceConfig {
            id: id.clone(),
            root: RootSource::Image {
                reference: "bench:1".into(),
                record_trace_secs: None,
                lazy_only: false,
            },
            hostname: None,
            limits: Default::default(),
            env: Vec::new(),
            vm: None,
        })?;
        runtime.start(id)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let (mut shim, mut mount, mut init) = (0u64, 0u64, 0u64);
    for id in &ids {
        let marker = format!("workspaces/{id}");
        let init_pid = runtime.info(id)?.init_pid.unwrap_or(0);
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.contains(&marker) {
                continue;
            }
            let pss = pss_bytes(pid);
            if pid == init_pid {
                init += pss;
            } else if cmdline.contains("image mount") {
                mount += pss;
            } else if cmdline.contains("runtime shim") {
                shim += pss;
            }
        }
    }
    for id in &ids {
        runtime.delete(id)?;
    }
    let per = |b: u64| b as f64 / count as f64 / (1 << 20) as f64;
    Ok(IdleMemory {
        workspaces: count,
        shim_mib: per(shim),
        image_mount_mib: per(mount),
        init_mib: per(init),
        total_mib: per(shim + mount + init),
    })
}

pub(crate) fn pss_bytes(pid: i32) -> u64 {
    crate::bench::proc_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}
