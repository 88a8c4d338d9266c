//! `warren-bench memory` and `warren-bench boot`: VM workspaces measured from the host.
//!
//! - memory: a VM with 2 GiB fills 1 GiB of memory (a tmpfs), frees it, and its QEMU process's
//!   resident memory is sampled every second, with virtio-balloon free page reporting on and
//!   then off; then four VMs of the same tree with KSM off, allowed but with ksmd stopped (the
//!   other device setup alone), and on (total RSS, PSS and the host's `pages_sharing`).
//! - boot: start request → guest agent answering, over several boots, with the accelerator.
//!
//! Runs in the benchmark's own network namespace, like the other benchmarks (see `bench.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use warren_runtime::{
    ContainerRuntime, ContainerRuntimeConfig, ExecIo, ExecRequest, Limits, RootSource, Runtime,
    VmOptions, WorkspaceConfig, WorkspaceId,
};

/// Far from the default workspace ranges and from the other benchmarks'.
const BENCH_UID_BASE: u32 = 3_500_000_000;

fn vm_runtime(work: &Path) -> anyhow::Result<(ContainerRuntime, PathBuf)> {
    crate::bench::require_programs(&[("qemu-system-x86_64", "qemu-system-x86")])?;
    let rootfs = crate::bench_runtime::debian_rootfs(work, &[])?;
    let data = work.join("vm-data");
    let runtime = ContainerRuntime::new(ContainerRuntimeConfig {
        // WARREN_VM_KERNEL, WARREN_GUEST, WARREN_VM_ACCEL, else the host's own (what
        // `./dev vm` prepared under the data folder, not the benchmark's).
        vm: warren_runtime::VmSettings {
            kernel: Some(
                std::env::var_os("WARREN_VM_KERNEL")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        std::env::var_os("WARREN_DATA")
                            .map(PathBuf::from)
                            .unwrap_or_else(|| PathBuf::from("/var/lib/warren"))
                            .join("vm/kernel")
                    }),
            ),
            ..Default::default()
        },
        ..crate::bench::runtime_config(&data, BENCH_UID_BASE)?
    })?;
    remove_all(&runtime)?;
    Ok((runtime, rootfs))
}

/// Deletes every workspace of the benchmark's runtime (what an interrupted run left, or this
/// run's after an error).
fn remove_all(runtime: &ContainerRuntime) -> anyhow::Result<()> {
    for ws in runtime.list()? {
        let report = runtime.delete(&ws.config.id)?;
        if !report.leftovers.is_empty() {
            bail!(
                "{} could not be removed: {}",
                ws.config.id,
                report.leftovers.join(", ")
            );
        }
    }
    Ok(())
}

fn create_vm(
    runtime: &ContainerRuntime,
    rootfs: &Path,
    name: &str,
    memory: u64,
    options: VmOptions,
) -> anyhow::Result<WorkspaceId> {
    let id = WorkspaceId::new(name)?;
    runtime.create(&WorkspaceConfig {
        id: id.clone(),
        root: RootSource::Dir {
            path: rootfs.to_path_buf(),
        },
        hostname: None,
        limits: Limits {
            memory: Some(memory),
            ..Default::default()
        },
        env: Vec::new(),
        vm: Some(options),
        owner: None,
        tenant: None,
    })?;
    Ok(id)
}

fn rss(pid: i32) -> u64 {
    crate::bench::proc_kb(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// The part of QEMU's resident memory that is the guest's RAM (a shared memfd); the rest is
/// QEMU's own (TCG's translated code, device state).
fn guest_ram_held(pid: i32) -> u64 {
    crate::bench::proc_kb(&format!("/proc/{pid}/status"), "RssShmem:")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn run_in(runtime: &ContainerRuntime, id: &WorkspaceId, script: &str) -> anyhow::Result<()> {
    let exec = runtime.exec(
        id,
        &ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        },
    )?;
    if let ExecIo::Pipes { stdin, .. } = exec.io {
        drop(stdin);
    }
    let status = exec.process.wait()?;
    if status.as_shell_code() != 0 {
        bail!("`{script}` exited with {status:?}");
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Reclaim {
    free_page_reporting: bool,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    /// (seconds after the memory was freed, RSS MiB, guest RAM held MiB).
    after_free: Vec<(u64, f64, f64)>,
    /// When RSS came back within 20% of the idle RSS (the guest's working set plus QEMU's own).
    back_within_20_percent_s: Option<u64>,
    /// What the guest says it holds at the end (its balloon's total − free: used and cached;
    /// the kernel's own reserved memory is not in it).
    guest_working_set_mib: f64,
    /// Guest RAM the host holds (QEMU's RssShmem) once booted and idle, and at the end.
    guest_ram_idle_mib: f64,
    guest_ram_held_mib: f64,
}

#[derive(Debug, Serialize)]
struct Merging {
    /// The VMs' trust domain allows KSM (private RAM, 9p root, network agent).
    ksm: bool,
    /// Whether ksmd was scanning: a row with KSM allowed and ksmd stopped separates what
    /// merging saves from what the different device setup costs or saves.
    ksmd: bool,
    vms: usize,
    total_rss_mib: f64,
    total_pss_mib: f64,
    pages_sharing: u64,
}

#[derive(Debug, Serialize)]
struct MemoryResults {
    accel: String,
    reclaim: Vec<Reclaim>,
    merging: Vec<Merging>,
}

pub(crate) fn memory(work: &Path, settle: u64, json: Option<&Path>) -> anyhow::Result<()> {
    let (runtime, rootfs) = vm_runtime(work)?;
    let result = measure_memory(&runtime, &rootfs, settle, json);
    remove_all(&runtime)?;
    result
}

fn measure_memory(
    runtime: &ContainerRuntime,
    rootfs: &Path,
    settle: u64,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let mut reclaim = Vec::new();
    let mut accel = String::new();
    for reporting in [true, false] {
        let name = if reporting { "mem-on" } else { "mem-off" };
        let id = create_vm(
            runtime,
            rootfs,
            name,
            2 << 30,
            VmOptions {
                free_page_reporting: reporting,
                ..Default::default()
            },
        )?;
        runtime.start(&id)?;
        let info = runtime.info(&id)?;
        accel = info.accel.clone().unwrap_or_default();
        let pid = info.init_pid.context("the VM has no QEMU process")?;
        std::thread::sleep(Duration::from_secs(5));
        let idle = rss(pid);
        let idle_guest_ram = guest_ram_held(pid);
        eprintln!(
            "{name}: idle RSS {:.0} MiB; writing 1 GiB into a tmpfs in the guest, then freeing it",
            mib(idle)
        );
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        // 1 GiB written into a tmpfs (every page touched), then removed: freed in the guest.
        run_in(
            runtime,
            &id,
            "mkdir -p /run/fill && mount -t tmpfs -o size=1100m fill /run/fill && \
             dd if=/dev/zero of=/run/fill/data bs=1M count=1024 status=none && \
             rm /run/fill/data && umount /run/fill",
        )?;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = sampler.join();
        let freed = Instant::now();
        let mut after_free = Vec::new();
        let mut back = None;
        for second in 0..=settle {
            let wait = Duration::from_secs(second).saturating_sub(freed.elapsed());
            std::thread::sleep(wait);
            let now = rss(pid);
            after_free.push((second, mib(now), mib(guest_ram_held(pid))));
            if back.is_none() && (now as f64) <= idle as f64 * 1.2 {
                back = Some(second);
            }
        }
        let stats = runtime.stats(&id)?;
        let working_set = stats
            .vm
            .as_ref()
            .map(|v| v.guest_total.saturating_sub(v.guest_free))
            .unwrap_or(0);
        let held = guest_ram_held(pid);
        runtime.delete(&id)?;
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{name}: peak {:.0} MiB, after {settle} s {:.0} MiB",
            mib(peak),
            after_free.last().map(|s| s.1).unwrap_or(0.0)
        );
        reclaim.push(Reclaim {
            free_page_reporting: reporting,
            idle_rss_mib: mib(idle),
            peak_rss_mib: mib(peak),
            after_free,
            back_within_20_percent_s: back,
            guest_working_set_mib: mib(working_set),
            guest_ram_idle_mib: mib(idle_guest_ram),
            guest_ram_held_mib: mib(held),
        });
    }

    let merging = ksm(runtime, rootfs, settle)?;
    let results = MemoryResults {
        accel,
        reclaim,
        merging,
    };
    println!(
        "A VM with 2 GiB fills 1 GiB of memory and frees it; its QEMU's resident memory ({}):",
        results.accel
    );
    for r in &results.reclaim {
        let at = |s: u64| {
            r.after_free
                .iter()
                .find(|(t, _, _)| *t == s)
                .map(|(_, m, _)| format!("{m:.0}"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "  free page reporting {:<3}  idle {:>5.0} MiB  peak {:>5.0} MiB  after 5 s {:>5} MiB  10 s {:>5}  30 s {:>5}  {settle} s {:>5}  back within 20% of idle: {}",
            if r.free_page_reporting { "on" } else { "off" },
            r.idle_rss_mib,
            r.peak_rss_mib,
            at(5),
            at(10),
            at(30),
            at(settle),
            r.back_within_20_percent_s
                .map(|s| format!("after {s} s"))
                .unwrap_or_else(|| format!("not within {settle} s"))
        );
        println!(
            "      guest RAM held by the host: {:.0} MiB idle, {:.0} MiB at {settle} s ({:.2}× idle; target ≤ 1.2× with reporting on); the guest reports {:.0} MiB used + cache (its kernel's reserved memory not counted)",
            r.guest_ram_idle_mib,
            r.guest_ram_held_mib,
            r.guest_ram_held_mib / r.guest_ram_idle_mib.max(1.0),
            r.guest_working_set_mib
        );
    }
    println!("Four VMs of the same tree, {settle} s after boot:");
    for m in &results.merging {
        println!(
            "  KSM {:<3} ksmd {:<7}  total RSS {:>6.0} MiB  total PSS {:>6.0} MiB  pages_sharing {}",
            if m.ksm { "on" } else { "off" },
            if m.ksmd { "running" } else { "stopped" },
            m.total_rss_mib,
            m.total_pss_mib,
            m.pages_sharing
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// The host's KSM settings, put back when dropped.
struct KsmSettings(Vec<(PathBuf, String)>);

impl KsmSettings {
    fn set(values: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut saved = Vec::new();
        for (name, value) in values {
            let path = Path::new("/sys/kernel/mm/ksm").join(name);
            let old = std::fs::read_to_string(&path)
                .with_context(|| format!("{} (a kernel without KSM?)", path.display()))?;
            std::fs::write(&path, value).with_context(|| format!("{}", path.display()))?;
            saved.push((path, old.trim().to_owned()));
        }
        Ok(Self(saved))
    }
}

impl Drop for KsmSettings {
    fn drop(&mut self) {
        for (path, old) in self.0.iter().rev() {
            let _ = std::fs::write(path, old);
        }
    }
}

fn pages_sharing() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/ksm/pages_sharing")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn ksm(runtime: &ContainerRuntime, rootfs: &Path, settle: u64) -> anyhow::Result<Vec<Merging>> {
    // ksmd scans fast for the benchmark (the host's settings come back afterwards).
    let _settings = KsmSettings::set(&[
        ("run", "1"),
        ("pages_to_scan", "10000"),
        ("sleep_millisecs", "20"),
    ])?;
    let mut out = Vec::new();
    for (merge, ksmd) in [(false, true), (true, false), (true, true)] {
        std::fs::write("/sys/kernel/mm/ksm/run", if ksmd { "1" } else { "0" })
            .context("/sys/kernel/mm/ksm/run")?;
        let before = pages_sharing();
        let mut ids = Vec::new();
        for i in 0..4 {
            let id = create_vm(
                runtime,
                rootfs,
                &format!(
                    "ksm-{}{}-{i}",
                    if merge { "on" } else { "off" },
                    if ksmd { "" } else { "-idle" }
                ),
                1 << 30,
                VmOptions {
                    ksm: merge,
                    ..Default::default()
                },
            )?;
            runtime.start(&id)?;
            ids.push(id);
        }
        eprintln!(
            "KSM {}, ksmd {}: four VMs up; waiting {settle} s",
            if merge { "on" } else { "off" },
            if ksmd { "running" } else { "stopped" }
        );
        std::thread::sleep(Duration::from_secs(settle));
        let pids: Vec<i32> = ids
            .iter()
            .filter_map(|id| runtime.info(id).ok()?.init_pid)
            .collect();
        out.push(Merging {
            ksm: merge,
            ksmd,
            vms: pids.len(),
            total_rss_mib: mib(pids.iter().map(|&p| rss(p)).sum()),
            total_pss_mib: mib(pids
                .iter()
                .map(|&p| crate::bench_runtime::pss_bytes(p))
                .sum()),
            pages_sharing: pages_sharing().saturating_sub(before),
        });
        for id in &ids {
            runtime.delete(id)?;
        }
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct BootResults {
    accel: String,
    boots: usize,
    series: crate::bench_runtime::Series,
}

pub(crate) fn boot(boots: usize, work: &Path, json: Option<&Path>) -> anyhow::Result<()> {
    if boots == 0 {
        bail!("--boots must be at least 1");
    }
    let (runtime, rootfs) = vm_runtime(work)?;
    let result = measure_boot(&runtime, &rootfs, boots, json);
    remove_all(&runtime)?;
    result
}

fn measure_boot(
    runtime: &ContainerRuntime,
    rootfs: &Path,
    boots: usize,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let id = create_vm(runtime, rootfs, "boot", 1 << 30, VmOptions::default())?;
    let mut samples = Vec::new();
    let mut accel = String::new();
    // One unmeasured boot makes the scratch disk and finds the accelerator.
    for i in 0..=boots {
        let started = Instant::now();
        runtime.start(&id)?;
        let took = started.elapsed();
        accel = runtime.info(&id)?.accel.unwrap_or_default();
        runtime.stop(&id, Duration::from_secs(10))?;
        if i > 0 {
            samples.push(took);
        }
    }
    runtime.delete(&id)?;
    let results = BootResults {
        accel,
        boots,
        series: crate::bench_runtime::Series::new("start → guest agent answers", samples),
    };
    println!(
        "VM workspace start request → guest agent answering, {} boots ({}): p50 {:.0} ms, {} {:.0} ms, mean {:.0} ms",
        results.boots,
        results.accel,
        results.series.p50_ms,
        results.series.tail,
        results.series.tail_ms,
        results.series.mean_ms
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}
