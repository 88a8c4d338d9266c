//! `warren-bench runtime`: what a workspace's lifecycle costs, against `docker` and `runc` on
//! the same Debian root filesystem, in one run, each driven through its own command-line tool
//! (a new process per step, as a user or a script drives it):
//!
//! - full lifecycle: `warren runtime run` + `runtime exec -- true` + `runtime rm --force`,
//!   against `docker run --rm IMAGE true` and against `runc run` of `true` on what Warren sets
//!   up (an overlay over the root filesystem, a network namespace of its own with a veth on a
//!   bridge), made and removed each cycle;
//! - warm restart of an existing workspace or container: `runtime start` + `exec -- true` +
//!   `stop`, against `docker start` + `docker exec true` + `docker stop` (`--init`, so the
//!   container's process ends on SIGTERM as a workspace's init ends it);
//!
//! plus the host memory an idle workspace costs. Runs in the benchmark's own network namespace
//! (see `bench.rs`): Warren's bridge and rules, runc's bridge and dockerd's `docker0` and
//! iptables rules live and die there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use warren_runtime::{ContainerRuntime, Runtime, WorkspaceConfig, WorkspaceId};

use crate::bench::sh;

/// Far from the default workspace ranges, so a benchmark never meets real workspaces' ids.
const BENCH_UID_BASE: u32 = 3_000_000_000;

/// The p50 and the tail of a set of timings: the p99 from 100 samples on, else the p95 (a p99
/// of fewer samples is its largest or second-largest value, not a percentile).
#[derive(Debug, Serialize)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) samples: usize,
    pub(crate) p50_ms: f64,
    /// `p95` or `p99`.
    pub(crate) tail: &'static str,
    pub(crate) tail_ms: f64,
    pub(crate) mean_ms: f64,
}

impl Series {
    pub(crate) fn new(name: &str, mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| {
            ms(samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1])
        };
        let (tail, q) = if samples.len() >= 100 {
            ("p99", 0.99)
        } else {
            ("p95", 0.95)
        };
        Self {
            name: name.into(),
            samples: samples.len(),
            p50_ms: at(0.5),
            tail,
            tail_ms: at(q),
            mean_ms: samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64,
        }
    }

    fn line(&self) -> String {
        format!(
            "  {:<34} p50 {:>7.1} ms   {} {:>7.1} ms   mean {:>7.1} ms",
            self.name, self.p50_ms, self.tail, self.tail_ms, self.mean_ms
        )
    }
}

#[derive(Debug, Serialize)]
struct IdleMemory {
    workspaces: usize,
    /// How the host mounted the image: one mount per image shared by its workspaces, or one per
    /// workspace (and why).
    image_mounts: String,
    /// Proportional set size per workspace, MiB: what each adds to the host.
    shim_mib: f64,
    image_mount_mib: f64,
    init_mib: f64,
    total_mib: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    cycles: usize,
    lifecycle: Vec<Series>,
    warm_restart: Vec<Series>,
    /// Warren's p50 (lazy image) over docker's, per row kind.
    lifecycle_p50_over_docker: f64,
    warm_restart_p50_over_docker: f64,
    /// As the host mounts images, then (where it shares them) with a mount per workspace.
    idle: Vec<IdleMemory>,
}

pub(crate) fn runtime(cycles: usize, work: &Path, json: Option<&Path>) -> anyhow::Result<()> {
    if cycles < 30 {
        bail!("--cycles must be at least 30 (a tail percentile needs them)");
    }
    crate::bench::require_programs(&[
        ("runc", "runc"),
        ("dockerd", "docker.io"),
        ("docker-init", "docker.io"),
        ("mmdebstrap", "mmdebstrap"),
    ])?;
    std::fs::create_dir_all(work)?;
    let rootfs = debian_rootfs(work, &[])?;
    let data = work.join("data");
    let exe = crate::bench::warren_exe()?;
    // Workspaces an interrupted run left behind go first (never delete through their mounts).
    if let Ok(entries) = std::fs::read_dir(data.join("runtime/workspaces")) {
        for entry in entries.flatten() {
            let _ = warren(&exe, &data)
                .args(["runtime", "rm", "-f"])
                .arg(entry.file_name())
                .output();
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    sh(warren(&exe, &data)
        .args(["image", "import"])
        .arg(&rootfs)
        .arg("bench:1"))?;
    let rootfs_s = rootfs.to_str().context("a UTF-8 work folder")?;
    let cli = |args: &[&str]| sh(warren(&exe, &data).args(args).stdin(Stdio::null())).map(drop);

    // (a) Full lifecycle through each tool's command line.
    let mut lifecycle = Vec::new();
    for (name, source) in [
        ("warren (lazy image)", ["--image", "bench:1"]),
        ("warren (folder)", ["--dir", rootfs_s]),
    ] {
        let samples = timed(cycles, name, || {
            cli(&["runtime", "run", "life", source[0], source[1]])?;
            cli(&["runtime", "exec", "life", "-T", "--", "true"])?;
            cli(&["runtime", "rm", "--force", "life"])
        })?;
        lifecycle.push(Series::new(name, samples));
    }
    lifecycle.push(Series::new(
        "runc run (overlay, netns, veth)",
        runc(cycles, work, &rootfs)?,
    ));
    let dockerd = Dockerd::start(&work.join("docker"))?;
    dockerd.import(&rootfs, "warren-bench:1")?;
    lifecycle.push(Series::new(
        "docker run --rm",
        timed(cycles, "docker run --rm", || {
            sh(dockerd
                .client()
                .args(["run", "--rm", "warren-bench:1", "true"])
                .stdin(Stdio::null()))
            .map(drop)
        })?,
    ));

    // (b) Warm restart of an existing workspace or container.
    let mut warm_restart = Vec::new();
    cli(&["runtime", "run", "warm", "--image", "bench:1"])?;
    cli(&["runtime", "stop", "warm"])?;
    warm_restart.push(Series::new(
        "warren (lazy image)",
        timed(cycles, "warren warm restart", || {
            cli(&["runtime", "start", "warm"])?;
            cli(&["runtime", "exec", "warm", "-T", "--", "true"])?;
            cli(&["runtime", "stop", "warm"])
        })?,
    ));
    cli(&["runtime", "rm", "--force", "warm"])?;
    let docker = |args: &[&str]| sh(dockerd.client().args(args).stdin(Stdio::null())).map(drop);
    let _ = docker(&["rm", "-f", "warm"]);
    docker(&[
        "create",
        "--init",
        "--name",
        "warm",
        "warren-bench:1",
        "sleep",
        "infinity",
    ])?;
    warm_restart.push(Series::new(
        "docker start / exec / stop",
        timed(cycles, "docker warm restart", || {
            docker(&["start", "warm"])?;
            docker(&["exec", "warm", "true"])?;
            docker(&["stop", "warm"])
        })?,
    ));
    docker(&["rm", "-f", "warm"])?;
    drop(dockerd);

    let runtime = ContainerRuntime::new(crate::bench::runtime_config(&data, BENCH_UID_BASE)?)?;
    // Ten idle workspaces of one image, as the host mounts images, then with a mount each.
    let mut idle = vec![idle_memory(&runtime, &data, 10)?];
    if runtime.image_sharing() == &warren_runtime::image_sharing::ImageSharing::Shared {
        let own_mounts = ContainerRuntime::new(warren_runtime::ContainerRuntimeConfig {
            share_image_mounts: false,
            ..crate::bench::runtime_config(&data, BENCH_UID_BASE)?
        })?;
        idle.push(idle_memory(&own_mounts, &data, 10)?);
    }

    let p50 = |rows: &[Series], name: &str| {
        rows.iter()
            .find(|s| s.name.starts_with(name))
            .map_or(f64::NAN, |s| s.p50_ms)
    };
    let results = Results {
        cycles,
        lifecycle_p50_over_docker: p50(&lifecycle, "warren (lazy") / p50(&lifecycle, "docker"),
        warm_restart_p50_over_docker: p50(&warm_restart, "warren") / p50(&warm_restart, "docker"),
        lifecycle,
        warm_restart,
        idle,
    };
    println!(
        "The same Debian minbase root filesystem, {cycles} cycles each, every step a new process of the tool's CLI:"
    );
    println!("full lifecycle: create and start, exec `true`, stop and delete");
    for s in &results.lifecycle {
        println!("{}", s.line());
    }
    println!("warm restart of an existing workspace or container: start, exec `true`, stop");
    for s in &results.warm_restart {
        println!("{}", s.line());
    }
    println!(
        "  warren (lazy image) p50 over docker's: full lifecycle {:.2}, warm restart {:.2} (target ≤ 1)",
        results.lifecycle_p50_over_docker, results.warm_restart_p50_over_docker
    );
    for m in &results.idle {
        println!(
            "idle workspace on the host (PSS, mean of {} of one image; image mounts: {}): shim {:.2} MiB + image mount {:.2} MiB + init {:.2} MiB = {:.2} MiB",
            m.workspaces, m.image_mounts, m.shim_mib, m.image_mount_mib, m.init_mib, m.total_mib
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// `warren --data DATA` with the benchmark's uid range.
fn warren(exe: &Path, data: &Path) -> Command {
    let mut c = Command::new(exe);
    c.arg("--data")
        .arg(data)
        .env("WARREN_UID_BASE", BENCH_UID_BASE.to_string());
    c
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

/// `runc run` of `true` on what Warren sets up for a workspace, made and removed each cycle as a
/// runc-based tool would: an overlay over the root filesystem with a fresh upper layer, and a
/// network namespace of its own with a veth on a bridge and an address (`ip`, as CNI's plugins
/// and Warren's network code run it).
fn runc(cycles: usize, work: &Path, rootfs: &Path) -> anyhow::Result<Vec<Duration>> {
    const BRIDGE: &str = "rbench0";
    const NETNS: &str = "rbench-ws";
    let bundle = work.join("runc-bundle");
    let state = work.join("runc-state");
    let layers = work.join("runc-layers");
    let _ = nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    sh(Command::new("runc").arg("spec").current_dir(&bundle))?;
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["root"] = serde_json::json!({ "path": "rootfs", "readonly": false });
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    for ns in spec["linux"]["namespaces"]
        .as_array_mut()
        .context("runc spec wrote no namespaces")?
    {
        if ns["type"] == "network" {
            ns["path"] = serde_json::json!(format!("/run/netns/{NETNS}"));
        }
    }
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    let ip = |args: &[&str]| sh(Command::new("ip").args(args)).map(drop);
    let _ = ip(&["link", "del", BRIDGE]);
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", "10.77.0.1/24", "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    let _ = ip(&["link", "del", "rbv0"]);
    let _ = ip(&["netns", "del", NETNS]);
    let merged = bundle.join("rootfs");
    let mut n = 0;
    let result = timed(cycles, "runc run", || {
        n += 1;
        // The workspace's layers: a fresh upper over the root filesystem.
        let (upper, workdir) = (layers.join("upper"), layers.join("work"));
        let _ = std::fs::remove_dir_all(&layers);
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&workdir)?;
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(
                format!(
                    "lowerdir={},upperdir={},workdir={}",
                    rootfs.display(),
                    upper.display(),
                    workdir.display()
                )
                .as_str(),
            ),
        )?;
        // Its network: a namespace, a veth on the bridge, an address.
        ip(&["netns", "add", NETNS])?;
        ip(&[
            "link", "add", "rbv0", "type", "veth", "peer", "name", "eth0", "netns", NETNS,
        ])?;
        ip(&["link", "set", "rbv0", "master", BRIDGE, "up"])?;
        ip(&["-n", NETNS, "addr", "add", "10.77.0.2/24", "dev", "eth0"])?;
        ip(&["-n", NETNS, "link", "set", "eth0", "up"])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        sh(Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("bench-{n}"))
            .stdin(Stdio::null()))?;
        // And all of it gone again (the veth first: a namespace's devices go with it only
        // later, in the kernel's cleanup work).
        ip(&["link", "del", "rbv0"])?;
        ip(&["netns", "del", NETNS])?;
        nix::mount::umount2(&merged, nix::mount::MntFlags::empty())?;
        std::fs::remove_dir_all(&layers)?;
        Ok(())
    });
    let _ = ip(&["netns", "del", NETNS]);
    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    let _ = ip(&["link", "del", BRIDGE]);
    result
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

    /// `docker` talking to this dockerd: the client of the same package (`docker.io` puts it in
    /// /usr/bin; another one earlier on the PATH may be of another version, or only a client).
    pub(crate) fn client(&self) -> Command {
        let same_package = Path::new("/usr/bin/docker");
        let mut c = Command::new(if same_package.exists() {
            same_package
        } else {
            Path::new("docker")
        });
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

/// Starts `count` idle workspaces from the image and measures what their processes add to the
/// host (proportional set size: shared pages split between the processes sharing them; a mount
/// the host shares between them, split between them too).
fn idle_memory(
    runtime: &ContainerRuntime,
    data: &Path,
    count: usize,
) -> anyhow::Result<IdleMemory> {
    let ids: Vec<WorkspaceId> = (0..count)
        .map(|i| WorkspaceId::new(&format!("idle-{i}")))
        .collect::<Result<_, _>>()?;
    for id in &ids {
        runtime.create(&WorkspaceConfig::of_image(id.clone(), "bench:1"))?;
        runtime.start(id)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let (mut shim, mut mount, mut init) = (0u64, 0u64, 0u64);
    let init_pids = ids
        .iter()
        .map(|id| Ok(runtime.info(id)?.init_pid.unwrap_or(0)))
        .collect::<anyhow::Result<Vec<i32>>>()?;
    let markers: Vec<String> = ids.iter().map(|id| format!("workspaces/{id}")).collect();
    let shared_marker = format!(
        "--shared-lease {}/",
        warren_runtime::image_sharing::mounts_dir(data).display()
    );
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let shared = cmdline.contains("image mount") && cmdline.contains(&shared_marker);
        if !shared && !markers.iter().any(|m| cmdline.contains(m)) {
            continue;
        }
        let pss = pss_bytes(pid);
        if init_pids.contains(&pid) {
            init += pss;
        } else if cmdline.contains("image mount") {
            mount += pss;
        } else if cmdline.contains("runtime shim") {
            shim += pss;
        }
    }
    for id in &ids {
        runtime.delete(id)?;
    }
    let per = |b: u64| b as f64 / count as f64 / (1 << 20) as f64;
    Ok(IdleMemory {
        workspaces: count,
        image_mounts: runtime.image_sharing().to_string(),
        shim_mib: per(shim),
        image_mount_mib: per(mount),
        init_mib: per(init),
        total_mib: per(shim + mount + init),
    })
}

pub(crate) fn pss_bytes(pid: i32) -> u64 {
    crate::bench::proc_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}
