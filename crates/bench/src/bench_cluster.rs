//! `warren-bench cluster`: three hosts — `warren up`'s own and two `warren agent`s, each with
//! its own data folder, chunk cache, uid ranges and bridge — and one image in Debian's
//! docker-registry (as a prebuild is once the server has `--registry`). N workspaces are
//! created at once; for each, the time from its create request until the API shows it
//! running; where they were placed; and what each host pulled into its chunk cache against
//! the image's size. Then a second round of N more while the first runs, when every host
//! reports the image cached: where those go, and what they pull.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::bench::{LocalRegistry, dir_bytes};
use crate::bench_api::{AgentHost, Up};

#[derive(Debug, Serialize)]
struct Round {
    workspaces: usize,
    /// From each create request to the API showing the workspace running, in seconds.
    running_p50_s: f64,
    running_p95_s: f64,
    running_max_s: f64,
    /// Workspaces placed on each host.
    placed: BTreeMap<String, usize>,
    /// Bytes each host's chunk cache grew by during the round (and the following background
    /// pulls), and that against the image's data bytes.
    pulled_bytes: BTreeMap<String, u64>,
    pulled_of_image: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct Results {
    image_bytes: u64,
    first: Round,
    second: Round,
}

pub(crate) fn cluster(
    workspaces: usize,
    work: &Path,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    if workspaces == 0 {
        bail!("--workspaces must be at least 1");
    }
    let rootfs = crate::bench_runtime::debian_rootfs(work, &[])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let registry = LocalRegistry::start(&work.join("cluster-registry"), port)?;
    let up = Up::start(
        work,
        "cluster",
        &rootfs,
        &["--registry", &format!("{}/bench", registry.host)],
    )?;
    let image = format!("{}/bench/cluster:1", registry.host);
    up.warren(&["image", "push", "bench:1", &image])?;
    let inspected: serde_json::Value =
        serde_json::from_str(&up.warren(&["image", "inspect", "bench:1", "--json"])?)?;
    let image_bytes = inspected["dataBytes"]
        .as_u64()
        .context("the image's size")?;
    let trusted = [("WARREN_TRUSTED_REGISTRIES", registry.host.as_str())];
    let others = [
        AgentHost::start(&up, work, "cluster-b", 1, None, &trusted)?,
        AgentHost::start(&up, work, "cluster-c", 2, None, &trusted)?,
    ];
    let server_host = up
        .client
        .get("/hosts")?
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["name"] != "cluster-b" && h["name"] != "cluster-c")
        .and_then(|h| h["name"].as_str().map(str::to_owned))
        .context("the server's own host")?;
    let caches: Vec<(String, std::path::PathBuf)> = vec![
        (server_host, up.data.join("cache")),
        ("cluster-b".into(), others[0].data.join("cache")),
        ("cluster-c".into(), others[1].data.join("cache")),
    ];
    let first = round(&up, &image, "one", workspaces, &caches, image_bytes)?;
    // Every agent has reported the image cached (they report every 10 s).
    std::thread::sleep(Duration::from_secs(12));
    let second = round(&up, &image, "two", workspaces, &caches, image_bytes)?;
    let results = Results {
        image_bytes,
        first,
        second,
    };
    up.delete_all(Duration::from_secs(300))?;
    drop(others);
    drop(up);
    drop(registry);
    println!(
        "{workspaces} workspaces created at once on 3 hosts, image of {} MiB in a registry:",
        image_bytes >> 20
    );
    for (label, r) in [
        ("first round", &results.first),
        ("second round", &results.second),
    ] {
        println!(
            "  {label}: running after p50 {:.2} s, p95 {:.2} s, max {:.2} s",
            r.running_p50_s, r.running_p95_s, r.running_max_s
        );
        for (host, placed) in &r.placed {
            println!(
                "    {host:<14} {placed:>3} workspaces, pulled {:>6.1} MiB ({:.2} × the image)",
                r.pulled_bytes.get(host).copied().unwrap_or(0) as f64 / f64::from(1 << 20),
                r.pulled_of_image.get(host).copied().unwrap_or(0.0)
            );
        }
    }
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// Creates `count` workspaces `<prefix>-<i>` of `image` at once and measures them.
fn round(
    up: &Up,
    image: &str,
    prefix: &str,
    count: usize,
    caches: &[(String, std::path::PathBuf)],
    image_bytes: u64,
) -> anyhow::Result<Round> {
    let before: Vec<u64> = caches.iter().map(|(_, dir)| dir_bytes(dir)).collect();
    let started = Instant::now();
    let creates: Vec<_> = (0..count)
        .map(|i| {
            let client = Arc::clone(&up.client);
            let (name, image) = (format!("{prefix}-{i}"), image.to_owned());
            std::thread::spawn(move || {
                client.post("/workspaces", &json!({"name": name, "image": image}))
            })
        })
        .collect();
    for create in creates {
        create
            .join()
            .map_err(|_| anyhow::anyhow!("a create thread panicked"))??;
    }
    // Each workspace's time to running, as the API shows it (looked at every 100 ms).
    let mut running: BTreeMap<String, f64> = BTreeMap::new();
    let mut placed: BTreeMap<String, usize> = caches.iter().map(|(h, _)| (h.clone(), 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    while running.len() < count {
        let list = up.client.get("/workspaces")?;
        for ws in list.as_array().into_iter().flatten() {
            let name = ws["name"].as_str().unwrap_or_default();
            if !name.starts_with(&format!("{prefix}-")) || running.contains_key(name) {
                continue;
            }
            if ws["state"] == "failed" {
                bail!("{name} failed: {}", ws["last_error"]);
            }
            if ws["state"] == "running" {
                running.insert(name.to_owned(), started.elapsed().as_secs_f64());
                *placed
                    .entry(ws["host"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
        }
        if Instant::now() > deadline {
            bail!("not all {count} workspaces ran within 600 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Background pulls end: the caches stop growing.
    let mut last: Vec<u64> = caches.iter().map(|(_, dir)| dir_bytes(dir)).collect();
    let settle_by = Instant::now() + Duration::from_secs(120);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now: Vec<u64> = caches.iter().map(|(_, dir)| dir_bytes(dir)).collect();
        if now == last || Instant::now() > settle_by {
            break;
        }
        last = now;
    }
    let mut times: Vec<f64> = running.into_values().collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    let pulled_bytes: BTreeMap<String, u64> = caches
        .iter()
        .zip(before.iter().zip(&last))
        .map(|((host, _), (b, a))| (host.clone(), a.saturating_sub(*b)))
        .collect();
    Ok(Round {
        workspaces: count,
        running_p50_s: at(0.5),
        running_p95_s: at(0.95),
        running_max_s: at(1.0),
        placed,
        pulled_of_image: pulled_bytes
            .iter()
            .map(|(h, b)| (h.clone(), *b as f64 / image_bytes as f64))
            .collect(),
        pulled_bytes,
    })
}
