//! `warren-bench lazy`: lazy image mounts against full pulls, on a shaped link, in one run.
//!
//! Everything runs in a network namespace of its own (`warren-bench`): Debian's docker-registry
//! serves there on 127.0.0.1, behind a user-space link (`warren_testkit::DelayLine`: a round
//! trip and a rate) that the peers (`skopeo copy` + `umoci unpack`, Warren's own full pull) and
//! Warren's lazy mounts all fetch through.
//!
//! The synthetic image is data of the requested size (random, or chunks that compress away:
//! [`crate::filler`]); its startup set (about 200 MB of random data: many small files and some
//! whole medium files, interleaved with files nobody reads at startup, as in a real root
//! filesystem) is read after each kind of start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::Serialize;
use warren_envfile::ByteSize;
use warren_testkit::{DelayLine, LinkShape};

/// The `warren` binary the benchmarks drive: `WARREN_EXE`, else the one beside this binary
/// (cargo builds both into the same folder).
pub fn warren_exe() -> anyhow::Result<PathBuf> {
    let exe = match std::env::var_os("WARREN_EXE") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?.with_file_name("warren"),
    };
    if !exe.is_file() {
        bail!(
            "{} is not there: build it too (`cargo build --release -p warren-cli`), or set WARREN_EXE",
            exe.display()
        );
    }
    Ok(exe)
}

/// A benchmark's own runtime: its folders under `data`, workspace ids from `uid_base` (far
/// from the default ranges and from the other benchmarks'), the default network, containers.
pub fn runtime_config(
    data: &Path,
    uid_base: u32,
) -> anyhow::Result<warren_runtime::ContainerRuntimeConfig> {
    Ok(warren_runtime::ContainerRuntimeConfig {
        root: data.join("runtime"),
        data: data.to_path_buf(),
        helper: warren_exe()?,
        network: warren_runtime::NetworkConfig::default(),
        uid_base,
        default_disk: None,
        vm: Default::default(),
        share_image_mounts: true,
        passthrough: true,
    })
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Lazy mounts (with and without a trace) against full pulls on shaped links
    Lazy {
        /// Image sizes, each measured in turn and compared side by side (4GiB,100GiB)
        #[arg(long, value_delimiter = ',', default_value = "4GiB")]
        size: Vec<String>,
        /// Link rates to measure (1gbit, 100mbit, ...)
        #[arg(long, value_delimiter = ',', default_value = "1gbit,100mbit")]
        rates: Vec<String>,
        /// The link's round trip (each direction delays by half; a new connection's first
        /// bytes by one more, its handshake)
        #[arg(long, default_value = "20ms")]
        rtt: String,
        /// What the image's bulk (all but the startup set and the sequential-read file) is made
        /// of: `random` data, or `compressible` chunks, all different, that compress to almost
        /// nothing (a 100 GiB image in a few GB of registry and disk)
        #[arg(long, value_enum, default_value = "random")]
        filler: Filler,
        /// Where to build the image and keep the stores (needs about 4 × size free; 2 × with
        /// --only-lazy; about 10 GB for 100 GiB with --filler compressible)
        #[arg(long, default_value = "/var/tmp/warren-bench")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only the lazy mounts (no full pulls, background pull, local reads or dedup): to compare
        /// image sizes quickly. The source tree and the local store are removed once the image
        /// is in the registry
        #[arg(long)]
        only_lazy: bool,
    },
    /// A real `warren up`: workspaces created at once, then API latency at fixed read rates
    /// (open loop, latency from each request's scheduled send time)
    Api {
        /// Workspaces created concurrently
        #[arg(long, default_value_t = 20)]
        workspaces: usize,
        /// Mixed read requests per second, one measurement per rate
        #[arg(long, value_delimiter = ',', default_value = "100,500")]
        rates: Vec<f64>,
        /// How long to send them at each rate
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Where to keep the root filesystem and Warren's data
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A workspace's full lifecycle and warm restart through the CLI, against runc and docker
    /// through theirs; idle workspace memory
    Runtime {
        /// Cycles per row (at least 30)
        #[arg(long, default_value_t = 50)]
        cycles: usize,
        /// Where to keep the root filesystem, images and docker's folders
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The devcontainer example's Dockerfile cold and cached against `docker build`; bytes a
    /// one-file prebuild stores
    Build {
        /// Builds of each kind (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where to keep the root filesystem, Warren's data and docker's folders
        #[arg(long, default_value = "/var/tmp/warren-bench-build")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// scp through the SSH gateway against OpenSSH's sshd inside the same workspace
    Ssh {
        /// Size of the file copied each way, in MiB
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Copies each way per path (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where to keep the root filesystem, the file and Warren's data
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The web UI's workspaces page with many workspaces under many live viewers, against the
    /// API's JSON list; a preview URL's throughput against `ssh -L` to the same server
    Ui {
        /// Workspaces listed on the page
        #[arg(long, default_value_t = 200)]
        workspaces: usize,
        /// Viewers, each holding the page's live stream and loading the page once a second
        #[arg(long, default_value_t = 50)]
        viewers: usize,
        /// How long the page (then the JSON list) is loaded
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Size of the file downloaded through each path, in MiB
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Downloads per path (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where to keep the root filesystem and Warren's data
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// VM memory: freed memory back to the host with free page reporting on and off; KSM
    /// across four VMs
    Memory {
        /// Seconds to watch after the memory is freed (and after the four VMs boot)
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Where to keep the root filesystem and Warren's data
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A workspace from a large image in a registry a link away, on a host with an empty
    /// cache: create request to running, to its first command's output and to the startup set
    /// read inside, without the image's trace and with it
    Start {
        /// The image's size (a Debian root and `bench lazy`'s tree)
        #[arg(long, default_value = "100GiB")]
        size: String,
        /// The link's rate
        #[arg(long, default_value = "1gbit")]
        rate: String,
        /// The link's round trip
        #[arg(long, default_value = "20ms")]
        rtt: String,
        /// What the image's bulk is made of (see `lazy`)
        #[arg(long, value_enum, default_value = "compressible")]
        filler: Filler,
        /// Where to build the image and keep the registry and Warren's data (about 3 GB for
        /// 100 GiB compressible)
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Three hosts (the server's and two agents), one image in a registry: workspaces created
    /// at once, time to running, placement, and what each host pulled; then a second round
    Cluster {
        /// Workspaces per round
        #[arg(long, default_value_t = 30)]
        workspaces: usize,
        /// Where to keep the root filesystem, the registry and the hosts' data
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// VM boot: start request to the guest agent answering
    Boot {
        /// Boots measured (the median is reported)
        #[arg(long, default_value_t = 10)]
        boots: usize,
        /// Where to keep the root filesystem and Warren's data
        #[arg(long, default_value = "/var/tmp/warren-bench-runtime")]
        work: PathBuf,
        /// Write the results as JSON here as well
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

const NETNS: &str = "warren-bench";

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Lazy {
            size,
            rates,
            rtt,
            filler,
            work,
            json,
            only_lazy,
        } => {
            let sizes = size
                .iter()
                .map(|s| {
                    ByteSize::parse(s)
                        .map(|b| b.0)
                        .with_context(|| format!("`{s}` is not a size"))
                })
                .collect::<anyhow::Result<Vec<u64>>>()?;
            let rtt = parse_rtt(&rtt)?;
            for rate in &rates {
                rate_bits(rate)?;
            }
            if std::env::var_os("WARREN_BENCH_INSIDE").is_none() {
                return reexec_in_netns();
            }
            let link = Link { rates, rtt };
            lazy(&sizes, &link, filler, &work, json.as_deref(), only_lazy)
        }
        BenchCommand::Api {
            workspaces,
            rates,
            seconds,
            work,
            json,
        } => {
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_api::api(workspaces, &rates, seconds, &work, json.as_deref())
        }
        BenchCommand::Runtime { cycles, work, json } => {
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_runtime::runtime(cycles, &work, json.as_deref())
        }
        BenchCommand::Start {
            size,
            rate,
            rtt,
            filler,
            work,
            json,
        } => {
            let size = ByteSize::parse(&size)
                .map(|b| b.0)
                .with_context(|| format!("`{size}` is not a size"))?;
            let rtt = parse_rtt(&rtt)?;
            rate_bits(&rate)?;
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_start::start(size, &rate, rtt, filler, &work, json.as_deref())
        }
        BenchCommand::Cluster {
            workspaces,
            work,
            json,
        } => {
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_cluster::cluster(workspaces, &work, json.as_deref())
        }
        BenchCommand::Build { runs, work, json } => {
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_build::build(runs, &work, json.as_deref())
        }
        BenchCommand::Ssh {
            mib,
            runs,
            work,
            json,
        } => {
            if mib == 0 || runs == 0 {
                bail!("--mib and --runs must be at least 1");
            }
            if !inside_netns(&work, crate::bench_ssh::PACKAGES)? {
                return Ok(());
            }
            crate::bench_ssh::ssh(mib, runs, &work, json.as_deref())
        }
        BenchCommand::Ui {
            workspaces,
            viewers,
            seconds,
            mib,
            runs,
            work,
            json,
        } => {
            if !inside_netns(&work, crate::bench_ui::PACKAGES)? {
                return Ok(());
            }
            crate::bench_ui::ui(
                workspaces,
                viewers,
                seconds,
                mib,
                runs,
                &work,
                json.as_deref(),
            )
        }
        BenchCommand::Memory {
            seconds,
            work,
            json,
        } => {
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_vm::memory(&work, seconds, json.as_deref())
        }
        BenchCommand::Boot { boots, work, json } => {
            if !inside_netns(&work, &[])? {
                return Ok(());
            }
            crate::bench_vm::boot(boots, &work, json.as_deref())
        }
    }
}

/// Request latencies: how many, p50, p99, the slowest, and how many failed.
#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: usize,
}

/// The [`Latency`] of `samples` (each a time and whether it succeeded).
pub(crate) fn latency(mut samples: Vec<(Duration, bool)>) -> Latency {
    let errors = samples.iter().filter(|(_, ok)| !ok).count();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| {
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len().max(1)) - 1;
        samples.get(i).map_or(0.0, |(d, _)| ms(*d))
    };
    Latency {
        requests: samples.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        errors,
    }
}

/// A `/proc/<pid>/status` or `smaps_rollup` figure in kB, as bytes.
pub(crate) fn proc_kb(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Fails naming the Debian package of the first of these `(program, package)` that is missing.
pub(crate) fn require_programs(programs: &[(&str, &str)]) -> anyhow::Result<()> {
    for (program, package) in programs {
        if Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!(
                "`{program}` is missing: install the Debian package `{package}` (./dev deps does)"
            );
        }
    }
    Ok(())
}

pub(crate) fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the namespace, runs this same command inside it, and removes the namespace.
/// Outside the benchmark's namespace: builds the root filesystem with `include`d packages from
/// Debian's mirror (the namespace has no route out), runs this command again inside, and
/// returns false; inside, returns true.
fn inside_netns(work: &Path, include: &[&str]) -> anyhow::Result<bool> {
    if std::env::var_os("WARREN_BENCH_INSIDE").is_some() {
        return Ok(true);
    }
    crate::bench_runtime::debian_rootfs(work, include)?;
    reexec_in_netns()?;
    Ok(false)
}

fn reexec_in_netns() -> anyhow::Result<()> {
    let _ = Command::new("ip")
        .args(["netns", "del", NETNS])
        .stderr(Stdio::null())
        .status();
    sh(Command::new("ip").args(["netns", "add", NETNS]))?;
    let result = (|| {
        sh(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
        let status = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NETNS}"))
            // This benchmark again, inside.
            .arg(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env("WARREN_BENCH_INSIDE", "1")
            .status()
            .context("cannot run nsenter")?;
        if !status.success() {
            bail!("the benchmark failed");
        }
        Ok(())
    })();
    let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    result
}

fn rate_bits(rate: &str) -> anyhow::Result<f64> {
    let r = rate.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = r.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = r.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        bail!("rate `{rate}`: use gbit, mbit or kbit");
    };
    Ok(num.parse::<f64>()? * mult)
}

/// Writes `len` bytes that do not compress.
pub(crate) fn write_random(path: &Path, len: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut rng = Xorshift(0x2545_F491_4F6C_DD1D);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

pub(crate) struct Xorshift(pub(crate) u64);

impl Xorshift {
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// The synthetic tree's files that matter: the startup set the timed starts read, and files
/// only the recording start reads (a prebuild's first start reads more than a later one).
pub(crate) struct Sets {
    pub startup: Vec<PathBuf>,
    pub startup_bytes: u64,
    pub recording_extra: Vec<PathBuf>,
    pub written: u64,
}

/// Writes the synthetic tree; its bulk from `filler` when given, else random.
pub(crate) fn generate(
    src: &Path,
    size: u64,
    mut filler: Option<&mut crate::filler::CompressibleChunks>,
) -> anyhow::Result<Sets> {
    let _ = std::fs::remove_dir_all(src);
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let mut startup = Vec::new();
    let mut recording_extra = Vec::new();
    let (mut written, mut startup_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 4 << 20];
    let mut write = |path: &Path, len: u64, rng: &mut Xorshift| -> anyhow::Result<()> {
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            std::io::Write::write_all(&mut f, &buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    };
    // One 256 MiB file for the sequential-read comparison.
    write(&src.join("data/seq"), 256 << 20, &mut rng)?;
    written += 256 << 20;
    // 10,000 small files in 100 folders, one in five read at startup (~80 MB);
    // 300 files of 2 MiB, one in five read at startup (~120 MB); the rest in 64 MiB files.
    for i in 0..10_000u64 {
        let len = 16 * 1024 + (i * 7919 % 48) * 1024;
        let rel = PathBuf::from(format!("lib/d{:02}/f{i:05}", i % 100));
        write(&src.join(&rel), len, &mut rng)?;
        written += len;
        if i % 5 == 0 {
            startup.push(rel);
            startup_bytes += len;
        } else if i % 50 == 1 {
            recording_extra.push(rel);
        }
    }
    for i in 0..300u64 {
        let rel = PathBuf::from(format!("share/m{:02}/file{i:03}", i % 30));
        write(&src.join(&rel), 2 << 20, &mut rng)?;
        written += 2 << 20;
        if i % 5 == 0 {
            startup.push(rel);
            startup_bytes += 2 << 20;
        } else if i % 30 == 1 {
            recording_extra.push(rel);
        }
    }
    let mut i = 0;
    while written < size {
        let len = (64u64 << 20).min(size - written);
        let path = src.join(format!("data/blob{i:05}"));
        match filler.as_deref_mut() {
            Some(filler) => written += filler.write(&path, len)?,
            None => {
                write(&path, len, &mut rng)?;
                written += len;
            }
        }
        i += 1;
    }
    Ok(Sets {
        startup,
        startup_bytes,
        recording_extra,
        written,
    })
}

/// Records `image`'s startup trace (straight to its registry, through a mount of its own at
/// `mnt` with its data in `data`), as a prebuild's first start would: not the timed starts'
/// reads replayed, but `first`, then the startup set in another order (backwards) interleaved
/// with `extra` files the timed starts never read.
pub(crate) fn record_trace(
    data: &Path,
    image: &str,
    mnt: &Path,
    first: &[PathBuf],
    startup: &[PathBuf],
    extra: &[PathBuf],
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(data);
    let m = Mount::start(
        data,
        image,
        mnt,
        &["--record-trace", "3600", "--no-prefetch", "--no-background"],
    )?;
    let mut recording: Vec<PathBuf> = startup.iter().rev().cloned().collect();
    for (n, e) in extra.iter().enumerate() {
        recording.insert((n * 7) % recording.len(), e.clone());
    }
    recording.splice(0..0, first.iter().cloned());
    read_set(mnt, &recording)?;
    m.stop()?;
    let _ = std::fs::remove_dir_all(data);
    Ok(())
}

fn read_set(root: &Path, set: &[PathBuf]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for rel in set {
        std::fs::read(root.join(rel)).with_context(|| format!("reading {}", rel.display()))?;
    }
    Ok(started.elapsed())
}

/// Empties the page cache. Dirty pages are written first: they cannot be dropped, and their
/// writeback would compete with the next measurement.
pub(crate) fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

struct Mount {
    child: std::process::Child,
    mountpoint: PathBuf,
    stats: PathBuf,
    /// From the mount command to the mount in place (its image's index fetched and read).
    ready: Duration,
}

use warren_hostfs::is_mounted;

impl Mount {
    fn start(data: &Path, image: &str, mountpoint: &Path, args: &[&str]) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(mountpoint)?;
        let stats = mountpoint.with_extension("stats.json");
        let _ = std::fs::remove_file(&stats);
        let child = Command::new(crate::bench::warren_exe()?)
            .arg("--data")
            .arg(data)
            .args(["image", "mount", image])
            .arg(mountpoint)
            .arg("--stats")
            .arg(&stats)
            .args(args)
            .stdout(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        while !is_mounted(mountpoint) {
            if Instant::now() > deadline {
                bail!("{image} was not mounted within 60 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Mount {
            child,
            mountpoint: mountpoint.to_path_buf(),
            stats,
            ready: started.elapsed(),
        })
    }

    /// The mount process's largest resident set so far, in bytes.
    fn peak_rss(&self) -> u64 {
        proc_kb(&format!("/proc/{}/status", self.child.id()), "VmHWM:")
    }

    fn stats(&self) -> serde_json::Value {
        std::fs::read(&self.stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The mount's counters once `done` says so, or `None` after `limit`.
    fn wait_until(
        &self,
        limit: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.stats();
            if done(&s) {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_stat(&self, key: &str) -> anyhow::Result<serde_json::Value> {
        self.wait_until(Duration::from_secs(3600), |s| s[key] == true)
            .with_context(|| format!("{key} did not become true"))
    }

    fn stop(mut self) -> anyhow::Result<serde_json::Value> {
        sh(Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string()))?;
        self.child.wait()?;
        if is_mounted(&self.mountpoint) {
            bail!(
                "{} is still mounted after SIGTERM",
                self.mountpoint.display()
            );
        }
        Ok(self.stats())
    }
}

impl Drop for Mount {
    /// A benchmark that fails half-way must not leave a mount behind.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug, Serialize)]
struct RateResult {
    rate: String,
    ideal_startup_s: f64,
    skopeo_umoci_full_s: f64,
    warren_full_pull_s: f64,
    lazy_no_trace_ready_s: f64,
    lazy_no_trace_s: f64,
    lazy_no_trace_fetched: u64,
    lazy_no_trace_requests: u64,
    /// Connections the lazy start made to the registry.
    lazy_no_trace_connections: u64,
    lazy_trace_ready_s: f64,
    lazy_trace_s: f64,
    lazy_trace_fetched: u64,
    lazy_trace_requests: u64,
    lazy_trace_connections: u64,
    /// The larger of the two lazy mount processes' peak resident sets, in bytes.
    lazy_peak_rss_bytes: u64,
    background_pull_s: f64,
    background_rate_of_link: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    image_bytes: u64,
    /// Chunks in the image (its index's chunk table).
    image_chunks: u64,
    filler: Filler,
    rtt_ms: f64,
    startup_files: usize,
    /// Files only the recording start read.
    recording_extra_files: usize,
    startup_bytes: u64,
    import_s: f64,
    stored_bytes: u64,
    rates: Vec<RateResult>,
    local_read_mib_s: f64,
    /// From the mount: from the file's whole copy when `whole_copy`.
    mount_read_mib_s: f64,
    /// Through the mount by chunks (`--no-passthrough`).
    chunks_read_mib_s: f64,
    /// Whether the mount made the file's whole copy (a kernel with FUSE passthrough).
    whole_copy: bool,
    dedup_first_bytes: u64,
    dedup_total_bytes: u64,
    dedup_budget_bytes: u64,
}

/// What the image's bulk is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Filler {
    Random,
    Compressible,
}

impl Filler {
    /// What writes the compressible bulk (checked against Warren's chunker in `work` first);
    /// `None` for random bulk.
    pub(crate) fn chunks(
        self,
        work: &Path,
    ) -> anyhow::Result<Option<crate::filler::CompressibleChunks>> {
        Ok(match self {
            Filler::Random => None,
            Filler::Compressible => {
                let mut f = crate::filler::CompressibleChunks::new()?;
                f.check(work)?;
                Some(f)
            }
        })
    }
}

/// The link between the registry and everything that pulls from it: a [`DelayLine`] per rate.
pub(crate) struct Link {
    pub rates: Vec<String>,
    pub rtt: Duration,
}

impl Link {
    /// The registry at `registry`, `rate` and the round trip away.
    pub(crate) fn to(
        &self,
        registry: std::net::SocketAddr,
        rate: &str,
    ) -> anyhow::Result<DelayLine> {
        let bits = rate_bits(rate)?;
        Ok(DelayLine::start(
            registry,
            LinkShape {
                rtt: self.rtt,
                down_bits: Some(bits),
                up_bits: Some(bits),
            },
        ))
    }
}

/// A round trip on the command line: `20ms`, `0.5s`, `0`.
fn parse_rtt(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if t == "0" {
        (t, 1.0)
    } else {
        bail!("`{text}` is not a round trip such as 20ms");
    };
    let secs = number
        .parse::<f64>()
        .ok()
        .map(|n| n * scale)
        .filter(|s| s.is_finite() && (0.0..=10.0).contains(s))
        .with_context(|| format!("`{text}` is not a round trip such as 20ms (10 s at most)"))?;
    Ok(Duration::from_secs_f64(secs))
}

/// Debian's docker-registry on `127.0.0.1:port`, keeping its blobs under `dir` (cleared
/// first); stopped when dropped.
pub(crate) struct LocalRegistry {
    child: std::process::Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
}

impl LocalRegistry {
    pub(crate) fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )?;
        let registry = LocalRegistry {
            child: Command::new("docker-registry")
                .arg("serve")
                .arg(dir.join("config.yml"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start docker-registry (apt install docker-registry)")?,
            host: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(format!("http://{}/v2/", registry.host))
            .call()
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("docker-registry did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().ok();
            if m.as_ref().is_some_and(|m| m.is_dir()) {
                stack.push(e.path());
            } else if let Some(m) = m {
                total += m.len();
            }
        }
    }
    total
}

/// One cold lazy start: `remote` mounted with `args` over an empty `dir` and an empty page
/// cache, the startup set read through it; the mount is stopped and `dir` removed after.
struct LazyStart {
    /// From the mount command to the last file of the set read.
    secs: f64,
    ready_s: f64,
    peak_rss: u64,
    fetched: u64,
    requests: u64,
    /// Connections made to the registry (filled in by whoever holds the link).
    connections: u64,
}

fn lazy_start(
    dir: &Path,
    remote: &str,
    mnt: &Path,
    args: &[&str],
    startup: &[PathBuf],
) -> anyhow::Result<LazyStart> {
    let _ = std::fs::remove_dir_all(dir);
    drop_caches();
    let t = Instant::now();
    let m = Mount::start(dir, remote, mnt, args)?;
    read_set(mnt, startup)?;
    let secs = t.elapsed().as_secs_f64();
    let (ready_s, peak_rss) = (m.ready.as_secs_f64(), m.peak_rss());
    let s = m.stop()?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(LazyStart {
        secs,
        ready_s,
        peak_rss,
        fetched: s["bytes_fetched"].as_u64().unwrap_or(0),
        requests: s["requests"].as_u64().unwrap_or(0),
        connections: 0,
    })
}

/// Measures each of `sizes` in turn (each its own image, registry and trace), then prints
/// them side by side.
fn lazy(
    sizes: &[u64],
    link: &Link,
    filler: Filler,
    work: &Path,
    json: Option<&Path>,
    only_lazy: bool,
) -> anyhow::Result<()> {
    require_programs(&[
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
        ("docker-registry", "docker-registry"),
    ])?;
    let mut all = Vec::new();
    for &size in sizes {
        let results = lazy_one(size, link, filler, work, only_lazy)?;
        report(&results);
        all.push(results);
    }
    if all.len() > 1 {
        compare(&all);
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)?;
    }
    Ok(())
}

fn lazy_one(
    size: u64,
    link: &Link,
    filler: Filler,
    work: &Path,
    only_lazy: bool,
) -> anyhow::Result<Results> {
    let exe = crate::bench::warren_exe()?;
    let warren = |data: &Path, args: &[&str]| -> anyhow::Result<String> {
        sh(Command::new(&exe).arg("--data").arg(data).args(args))
    };
    std::fs::create_dir_all(work)?;
    let src = work.join("src");
    eprintln!("generating a {} image ({filler:?} bulk)", ByteSize(size));
    let mut chunks_filler = filler.chunks(work)?;
    let Sets {
        startup,
        startup_bytes,
        recording_extra,
        written: size,
    } = generate(&src, size, chunks_filler.as_mut())?;
    eprintln!("importing");
    let base = work.join("base");
    let _ = std::fs::remove_dir_all(&base);
    let started = Instant::now();
    warren(
        &base,
        &["image", "import", src.to_str().expect("utf-8"), "bench:1"],
    )?;
    let import_s = started.elapsed().as_secs_f64();
    let stored_bytes = dir_bytes(&base.join("images/blobs"));
    let inspected: serde_json::Value =
        serde_json::from_str(&warren(&base, &["image", "inspect", "--json", "bench:1"])?)?;
    let image_chunks = inspected["chunks"].as_u64().unwrap_or(0);
    if only_lazy {
        // Only the registry's copy is read from here on: room for a large image.
        std::fs::remove_dir_all(&src)?;
    }

    let registry = LocalRegistry::start(&work.join("registry"), 5000)?;
    let registry_addr: std::net::SocketAddr = registry.host.parse()?;
    let result = (|| -> anyhow::Result<Results> {
        // Pushed and traced straight to the registry; every timed start goes through the link.
        let pushed = format!("{}/bench/warren:1", registry.host);
        warren(&base, &["image", "push", "bench:1", &pushed])?;
        if only_lazy {
            std::fs::remove_dir_all(&base)?;
        }
        let layout = work.join("layout");
        let _ = std::fs::remove_dir_all(&layout);
        if !only_lazy {
            warren(
                &base,
                &[
                    "image",
                    "export",
                    "bench:1",
                    &format!("oci:{}:1", layout.display()),
                ],
            )?;
            sh(Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:1", layout.display()))
                .arg(format!("docker://{}/bench/oci:1", registry.host)))?;
        }

        let mnt = work.join("mnt");
        record_trace(
            &work.join("rec"),
            &pushed,
            &mnt,
            &[],
            &startup,
            &recording_extra,
        )?;

        let mut rate_results = Vec::new();
        for rate in &link.rates {
            let bits = rate_bits(rate)?;
            let ideal = startup_bytes as f64 * 8.0 / bits;
            eprintln!(
                "link {rate}, {:?} round trip: startup set {} (ideal {ideal:.1}s)",
                link.rtt,
                ByteSize(startup_bytes)
            );
            let line = link.to(registry_addr, rate)?;
            let remote = format!("{}/bench/warren:1", line.host());

            let (mut skopeo_s, mut full_s) = (f64::NAN, f64::NAN);
            if !only_lazy {
                eprintln!("  skopeo copy + umoci unpack");
                // Peer: skopeo copy + umoci unpack, then the startup set from disk.
                let peer = work.join("peer");
                let _ = std::fs::remove_dir_all(&peer);
                std::fs::create_dir_all(&peer)?;
                drop_caches();
                let t = Instant::now();
                sh(Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{}/bench/oci:1", line.host()))
                    .arg(format!("oci:{}:1", peer.join("layout").display())))?;
                sh(Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:1", peer.join("layout").display()))
                    .arg(peer.join("bundle")))?;
                read_set(&peer.join("bundle/rootfs"), &startup)?;
                skopeo_s = t.elapsed().as_secs_f64();
                let _ = std::fs::remove_dir_all(&peer);

                eprintln!("  warren full pull");
                // Warren's own full pull, then the startup set from a local mount.
                let full = work.join("full");
                let _ = std::fs::remove_dir_all(&full);
                drop_caches();
                let t = Instant::now();
                warren(&full, &["image", "pull", &remote, "bench:1"])?;
                let m = Mount::start(
                    &full,
                    "bench:1",
                    &mnt,
                    &["--no-prefetch", "--no-background"],
                )?;
                read_set(&mnt, &startup)?;
                full_s = t.elapsed().as_secs_f64();
                m.stop()?;
                let _ = std::fs::remove_dir_all(&full);
            }

            eprintln!("  lazy mounts");
            // Lazy, no trace; then with the trace replayed.
            let lazy_dir = work.join("lazy");
            let cold = |args: &[&str]| {
                let before = line.connections();
                let start = lazy_start(&lazy_dir, &remote, &mnt, args, &startup)?;
                anyhow::Ok(LazyStart {
                    connections: line.connections() - before,
                    ..start
                })
            };
            let no_trace = cold(&["--no-prefetch", "--no-background"])?;
            let trace = cold(&["--no-background"])?;

            let (mut bg_s, mut bg_rate) = (f64::NAN, f64::NAN);
            if !only_lazy {
                eprintln!("  background pull");
                // Background pull of the whole image.
                let t = Instant::now();
                let m = Mount::start(&lazy_dir, &remote, &mnt, &["--no-prefetch"])?;
                let s = m.wait_stat("pull_finished")?;
                bg_s = t.elapsed().as_secs_f64();
                m.stop()?;
                bg_rate = s["bytes_fetched"].as_u64().unwrap_or(0) as f64 * 8.0 / bg_s / bits;
                let _ = std::fs::remove_dir_all(&lazy_dir);
            }
            rate_results.push(RateResult {
                rate: rate.clone(),
                ideal_startup_s: ideal,
                skopeo_umoci_full_s: skopeo_s,
                warren_full_pull_s: full_s,
                lazy_no_trace_ready_s: no_trace.ready_s,
                lazy_no_trace_s: no_trace.secs,
                lazy_no_trace_fetched: no_trace.fetched,
                lazy_no_trace_requests: no_trace.requests,
                lazy_no_trace_connections: no_trace.connections,
                lazy_trace_ready_s: trace.ready_s,
                lazy_trace_s: trace.secs,
                lazy_trace_fetched: trace.fetched,
                lazy_trace_requests: trace.requests,
                lazy_trace_connections: trace.connections,
                lazy_peak_rss_bytes: no_trace.peak_rss.max(trace.peak_rss),
                background_pull_s: bg_s,
                background_rate_of_link: bg_rate,
            });
        }
        let mut results = Results {
            image_bytes: size,
            image_chunks,
            filler,
            rtt_ms: link.rtt.as_secs_f64() * 1e3,
            startup_files: startup.len(),
            recording_extra_files: recording_extra.len(),
            startup_bytes,
            import_s,
            stored_bytes,
            rates: rate_results,
            local_read_mib_s: f64::NAN,
            mount_read_mib_s: f64::NAN,
            chunks_read_mib_s: f64::NAN,
            whole_copy: false,
            dedup_first_bytes: 0,
            dedup_total_bytes: 0,
            dedup_budget_bytes: 0,
        };
        if only_lazy {
            return Ok(results);
        }

        // Sequential read of a large file once local: from the mount as workspaces read it
        // (the kernel reading the file's whole copy), through the mount by chunks
        // (--no-passthrough), and the source on disk.
        eprintln!("sequential reads once local");
        let big = PathBuf::from("data/seq");
        {
            let by_chunks = work.join("mnt-chunks");
            let chunks = Mount::start(
                &base,
                "bench:1",
                &by_chunks,
                &["--no-prefetch", "--no-background", "--no-passthrough"],
            )?;
            let m = Mount::start(
                &base,
                "bench:1",
                &mnt,
                &["--no-prefetch", "--no-background"],
            )?;
            std::fs::read(mnt.join(&big))?; // warm the chunk cache: "once local"
            results.whole_copy = m
                .wait_until(Duration::from_secs(60), |s| {
                    s["whole_files_made"].as_u64().is_some_and(|n| n >= 1)
                })
                .is_some();
            // Each way five times, in turn (this disk's speed varies by 2× from one read to
            // the next); the medians.
            let read_mib_s = |path: &Path| -> anyhow::Result<f64> {
                drop_caches();
                let t = Instant::now();
                let n = std::fs::read(path)?.len() as f64;
                Ok(n / t.elapsed().as_secs_f64() / (1 << 20) as f64)
            };
            let (mut mount, mut by_chunk, mut local) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..5 {
                mount.push(read_mib_s(&mnt.join(&big))?);
                by_chunk.push(read_mib_s(&by_chunks.join(&big))?);
                local.push(read_mib_s(&src.join(&big))?);
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[2]
            };
            results.mount_read_mib_s = median(mount);
            results.chunks_read_mib_s = median(by_chunk);
            results.local_read_mib_s = median(local);
            m.stop()?;
            chunks.stop()?;
        }

        eprintln!("ten successive images");
        // Dedup: ten successive images that each change one 10 MB file.
        let dd = work.join("dedup");
        let _ = std::fs::remove_dir_all(&dd);
        let first = dir_bytes(&base.join("images/blobs"));
        std::fs::create_dir_all(&dd)?;
        sh(Command::new("cp")
            .arg("-a")
            .arg(base.join("images"))
            .arg(dd.join("images")))?;
        let mut rng = Xorshift(42);
        let mut ten = vec![0u8; 10 << 20];
        for v in 2..=11 {
            rng.fill(&mut ten);
            std::fs::write(src.join("share/m00/file000"), &ten)?;
            warren(
                &dd,
                &[
                    "image",
                    "import",
                    src.to_str().expect("utf-8"),
                    &format!("bench:{v}"),
                ],
            )?;
        }
        results.dedup_first_bytes = first;
        results.dedup_total_bytes = dir_bytes(&dd.join("images/blobs"));
        results.dedup_budget_bytes = ((first + 10 * (10 << 20)) as f64 * 1.1) as u64;
        Ok(results)
    })();
    drop(registry);
    result
}

fn report(r: &Results) {
    println!(
        "image {} ({} chunks, {:?} bulk; {} stored), imported in {:.1}s; startup set {} files, {}; round trip {:.0} ms",
        ByteSize(r.image_bytes),
        r.image_chunks,
        r.filler,
        ByteSize(r.stored_bytes),
        r.import_s,
        r.startup_files,
        ByteSize(r.startup_bytes),
        r.rtt_ms,
    );
    println!(
        "the trace replayed was recorded by another start: the startup set read backwards, interleaved with {} files the timed starts never read",
        r.recording_extra_files
    );
    println!(
        "| link | ideal | skopeo+umoci full | warren full pull | mount ready no trace / trace | lazy, no trace (of 1.5×ideal+1s) | lazy, trace (of 1.5×ideal+1s; speed-up) | requests (connections) no trace / trace | fetched no trace / trace | mount peak RSS | background pull (of link) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.rates {
        let budget = 1.5 * x.ideal_startup_s + 1.0;
        println!(
            "| {} | {:.1}s | {:.1}s | {:.1}s | {:.2}s / {:.2}s | {:.1}s ({:.2}×) | {:.1}s ({:.2}×; {:.2}×) | {} ({}) / {} ({}) | {} / {} ({:.2}× / {:.2}× the set) | {} MiB | {:.1}s ({:.0}%) |",
            x.rate,
            x.ideal_startup_s,
            x.skopeo_umoci_full_s,
            x.warren_full_pull_s,
            x.lazy_no_trace_ready_s,
            x.lazy_trace_ready_s,
            x.lazy_no_trace_s,
            x.lazy_no_trace_s / budget,
            x.lazy_trace_s,
            x.lazy_trace_s / budget,
            x.lazy_no_trace_s / x.lazy_trace_s,
            x.lazy_no_trace_requests,
            x.lazy_no_trace_connections,
            x.lazy_trace_requests,
            x.lazy_trace_connections,
            ByteSize(x.lazy_no_trace_fetched),
            ByteSize(x.lazy_trace_fetched),
            x.lazy_no_trace_fetched as f64 / r.startup_bytes as f64,
            x.lazy_trace_fetched as f64 / r.startup_bytes as f64,
            x.lazy_peak_rss_bytes >> 20,
            x.background_pull_s,
            x.background_rate_of_link * 100.0
        );
    }
    if r.dedup_budget_bytes == 0 {
        // --only-lazy: the local-read and storage parts did not run.
        return;
    }
    println!(
        "sequential read once local: {:.0} MiB/s from the mount ({}), {:.0} MiB/s through it by chunks (--no-passthrough), {:.0} MiB/s from local disk ({:.0}% / {:.0}%)",
        r.mount_read_mib_s,
        if r.whole_copy {
            "the kernel reading the file's whole copy"
        } else {
            "no whole copy was made: this kernel has no FUSE passthrough"
        },
        r.chunks_read_mib_s,
        r.local_read_mib_s,
        r.mount_read_mib_s / r.local_read_mib_s * 100.0,
        r.chunks_read_mib_s / r.local_read_mib_s * 100.0
    );
    println!(
        "ten successive images changing one 10 MB file: {} stored, budget 1.1 × (first + 10 × 10 MB) = {} ({})",
        ByteSize(r.dedup_total_bytes),
        ByteSize(r.dedup_budget_bytes),
        if r.dedup_total_bytes <= r.dedup_budget_bytes {
            "met"
        } else {
            "missed"
        }
    );
}

/// The lazy figures of every size beside the first's, each as a multiple of the first's.
fn compare(all: &[Results]) {
    let first = &all[0];
    println!(
        "side by side ({} round trip), each as a multiple of {}:",
        format_args!("{:.0} ms", first.rtt_ms),
        ByteSize(first.image_bytes)
    );
    let sizes: Vec<String> = all
        .iter()
        .map(|r| ByteSize(r.image_bytes).to_string())
        .collect();
    println!("| link | figure | {} |", sizes.join(" | "));
    println!("|---|---|{}", "---|".repeat(sizes.len()));
    type Figure = (&'static str, fn(&RateResult) -> f64, &'static str);
    let figures: [Figure; 6] = [
        ("mount ready, no trace", |x| x.lazy_no_trace_ready_s, "s"),
        ("mount ready, trace", |x| x.lazy_trace_ready_s, "s"),
        ("startup set, no trace", |x| x.lazy_no_trace_s, "s"),
        ("startup set, trace", |x| x.lazy_trace_s, "s"),
        (
            "mount peak RSS",
            |x| x.lazy_peak_rss_bytes as f64 / (1 << 20) as f64,
            " MiB",
        ),
        (
            "bytes fetched with trace",
            |x| x.lazy_trace_fetched as f64 / (1 << 20) as f64,
            " MiB",
        ),
    ];
    for (i, x) in first.rates.iter().enumerate() {
        for (name, value, unit) in &figures {
            let base = value(x);
            let cells: Vec<String> = all
                .iter()
                .map(|r| {
                    let v = value(&r.rates[i]);
                    format!("{v:.2}{unit} ({:.2}×)", v / base)
                })
                .collect();
            println!("| {} | {name} | {} |", x.rate, cells.join(" | "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_parse_and_nonsense_is_refused() {
        assert_eq!(parse_rtt("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_rtt("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_rtt("0").unwrap(), Duration::ZERO);
        for bad in ["20", "-1ms", "11s", "fast", "NaNms"] {
            assert!(parse_rtt(bad).is_err(), "{bad} was taken");
        }
    }
}
