//! `warren-bench start`: a workspace from a large image in a registry a link away, on a host
//! whose chunk cache is empty — a real `warren up`, its workspace created through the API —
//! without the image's trace and then with it. Each start is timed from the create request to:
//! the API showing the workspace running; the output of its first command (`cat
//! /etc/debian_version`, through the API's exec: a process started in the workspace, `cat`'s
//! and the C library's pages fetched); and the ~200 MB startup set read inside it (the same
//! set as `bench lazy`'s, listed in `/srv/bench/startup.list`). As for any workspace, the
//! mount's background pull runs (yielding to reads, but not stopping batches already sent;
//! with a trace it starts after the replay) and the host reports a sample of the image's
//! chunks (64 pages of its table) to the server: both are part of what a real start costs.
//!
//! The image is a Debian minbase root with `bench lazy`'s synthetic tree under `/srv/bench`
//! (its bulk `--filler compressible` by default, so that 100 GiB fit in a few GB). It is
//! imported and pushed straight to the registry; every start reads it through the delay line.
//! The trace is recorded between the two starts by a mount of its own (straight to the
//! registry): the commands' programs and the C library, then the set backwards with files the
//! starts never read, as `bench lazy` records it. Each start runs on a fresh `warren up` (a fresh data folder: nothing cached).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::bench::{Filler, Link, LocalRegistry, drop_caches, generate, record_trace, sh};
use crate::bench_api::Up;
use warren_envfile::ByteSize;

/// What the two commands run (`cat`, `sh`, `xargs`) read of the image: their programs and
/// the C library.
const COMMAND_FILES: [&str; 5] = [
    "usr/bin/cat",
    "usr/bin/dash",
    "usr/bin/xargs",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
];

#[derive(Debug, Serialize)]
struct Start {
    trace: bool,
    /// From the create request to the API showing the workspace running.
    running_s: f64,
    /// ... to the output of its first command.
    first_command_s: f64,
    /// ... to the startup set read inside it.
    startup_set_s: f64,
    /// Connections made to the registry during the start.
    connections: u64,
}

#[derive(Debug, Serialize)]
struct Results {
    image_bytes: u64,
    image_chunks: u64,
    startup_bytes: u64,
    rate: String,
    rtt_ms: f64,
    starts: Vec<Start>,
}

pub(crate) fn start(
    size: u64,
    rate: &str,
    rtt: Duration,
    filler: Filler,
    work: &Path,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    let rootfs = crate::bench_runtime::debian_rootfs(work, &[])?;
    let exe = crate::bench::warren_exe()?;
    let warren = |data: &Path, args: &[&str]| -> anyhow::Result<String> {
        sh(Command::new(&exe).arg("--data").arg(data).args(args))
    };
    // The image: the Debian root, the synthetic tree under /srv/bench.
    let src = work.join("start-src");
    let _ = std::fs::remove_dir_all(&src);
    sh(Command::new("cp").arg("-a").arg(&rootfs).arg(&src))?;
    eprintln!("generating a {} image ({filler:?} bulk)", ByteSize(size));
    let mut chunks_filler = filler.chunks(work)?;
    let tree = src.join("srv/bench");
    let sets = generate(&tree, size, chunks_filler.as_mut())?;
    let list: String = sets
        .startup
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    std::fs::write(tree.join("startup.list"), list)?;
    eprintln!("importing");
    let base = work.join("start-base");
    let _ = std::fs::remove_dir_all(&base);
    warren(
        &base,
        &["image", "import", src.to_str().context("utf-8")?, "start:1"],
    )?;
    std::fs::remove_dir_all(&src)?;
    let inspected: serde_json::Value =
        serde_json::from_str(&warren(&base, &["image", "inspect", "--json", "start:1"])?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let registry = LocalRegistry::start(&work.join("start-registry"), port)?;
    let pushed = format!("{}/bench/start:1", registry.host);
    warren(&base, &["image", "push", "start:1", &pushed])?;
    std::fs::remove_dir_all(&base)?;

    let link = Link {
        rates: vec![rate.to_owned()],
        rtt,
    };
    let line = link.to(registry.host.parse()?, rate)?;
    let image = format!("{}/bench/start:1", line.host());
    let timed = |trace: bool| -> anyhow::Result<Start> {
        eprintln!("a workspace, {} trace", if trace { "with" } else { "no" });
        let up = Up::start(
            work,
            "start",
            &rootfs,
            &["--trusted-registry", &line.host()],
        )?;
        let result = (|| {
            drop_caches();
            let before = line.connections();
            let t = Instant::now();
            up.client
                .post("/workspaces", &json!({"name": "start", "image": image}))?;
            let deadline = t + Duration::from_secs(600);
            loop {
                let ws = up.client.get("/workspaces/start")?;
                if ws["state"] == "running" {
                    break;
                }
                if ws["state"] == "failed" {
                    bail!("the workspace failed: {}", ws["last_error"]);
                }
                if Instant::now() > deadline {
                    bail!("the workspace did not run within 600 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let running_s = t.elapsed().as_secs_f64();
            let exec = |argv: &[&str]| -> anyhow::Result<()> {
                let out = up
                    .client
                    .post("/workspaces/start/exec", &json!({"argv": argv}))?;
                if out["exit_code"] != 0 {
                    bail!("{argv:?} in the workspace: {out}");
                }
                Ok(())
            };
            exec(&["cat", "/etc/debian_version"])?;
            let first_command_s = t.elapsed().as_secs_f64();
            exec(&[
                "sh",
                "-c",
                "cd /srv/bench && xargs -d '\\n' cat < startup.list > /dev/null",
            ])?;
            let startup_set_s = t.elapsed().as_secs_f64();
            Ok(Start {
                trace,
                running_s,
                first_command_s,
                startup_set_s,
                connections: line.connections() - before,
            })
        })();
        up.delete_all(Duration::from_secs(300))?;
        result
    };
    let mut starts = vec![timed(false)?];
    // The trace, recorded as a prebuild's first start would: the commands' programs, then the
    // set in another order, with other files.
    let in_image = |set: &[PathBuf]| -> Vec<PathBuf> {
        set.iter().map(|p| Path::new("srv/bench").join(p)).collect()
    };
    record_trace(
        &work.join("start-rec"),
        &pushed,
        &work.join("start-mnt"),
        &COMMAND_FILES.map(PathBuf::from),
        &in_image(&sets.startup),
        &in_image(&sets.recording_extra),
    )?;
    starts.push(timed(true)?);

    let results = Results {
        image_bytes: inspected["dataBytes"].as_u64().unwrap_or(0),
        image_chunks: inspected["chunks"].as_u64().unwrap_or(0),
        startup_bytes: sets.startup_bytes,
        rate: rate.to_owned(),
        rtt_ms: rtt.as_secs_f64() * 1e3,
        starts,
    };
    println!(
        "a workspace from a {} image ({} chunks) in a registry {rate} and {:.0} ms away, cache empty; startup set {}:",
        ByteSize(results.image_bytes),
        results.image_chunks,
        results.rtt_ms,
        ByteSize(results.startup_bytes)
    );
    println!("| trace | running | first command's output | startup set read | connections |");
    println!("|---|---|---|---|---|");
    for s in &results.starts {
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {} |",
            if s.trace { "yes" } else { "no" },
            s.running_s,
            s.first_command_s,
            s.startup_set_s,
            s.connections
        );
    }
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}
