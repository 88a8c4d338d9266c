//! `warren-bench api`: a real `warren up` (SQLite by default) in the benchmark's network
//! namespace; N workspaces created at once must all reach `running`; then API latency under
//! fixed rates of mixed reads, open loop: every request has a scheduled send time (one every
//! 1/rate s), a pool of senders takes them in order, and a request's latency runs from its
//! scheduled time to its answer. A server (or a sender pool) that falls behind shows up in the
//! latency instead of lowering the rate: no coordinated omission.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::bench::{latency, sh};
use warren_cli::client::Client;

#[derive(Debug, Serialize)]
struct RateResult {
    /// Requests per second asked for, and the rate their schedule was kept at.
    rate_per_s: f64,
    achieved_per_s: f64,
    #[serde(flatten)]
    latency: crate::bench::Latency,
}

#[derive(Debug, Serialize)]
struct Results {
    workspaces: usize,
    all_running_s: f64,
    seconds: u64,
    rates: Vec<RateResult>,
}

/// Senders in the pool: enough that at 500/s and a few ms per answer none waits for another.
const SENDERS: usize = 64;

/// Far from the default workspace ranges and from `bench runtime`'s.
const UID_BASE: &str = "3500000000";

/// A real `warren up` of a benchmark, with the admin logged in; stopped when dropped.
pub(crate) struct Up {
    child: Child,
    pub client: Arc<Client>,
    /// Its data folder.
    pub data: std::path::PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Up {
    /// Clears `<work>/<name>-data` (and workspaces an interrupted run left), imports `rootfs` as
    /// `bench:1`, starts `warren up` with `args` and logs the admin in.
    pub(crate) fn start(
        work: &Path,
        name: &str,
        rootfs: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let data = work.join(format!("{name}-data"));
        let exe = crate::bench::warren_exe()?;
        // Workspaces an interrupted run left behind go first (never delete through their mounts).
        if let Ok(entries) = std::fs::read_dir(data.join("runtime/workspaces")) {
            for entry in entries.flatten() {
                let _ = Command::new(&exe)
                    .arg("--data")
                    .arg(&data)
                    .args(["runtime", "rm", "-f"])
                    .arg(entry.file_name())
                    .env("WARREN_UID_BASE", UID_BASE)
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&data);
        if data.exists() {
            bail!("cannot clear {} from an earlier run", data.display());
        }
        sh(Command::new(&exe)
            .arg("--data")
            .arg(&data)
            .args(["image", "import"])
            .arg(rootfs)
            .arg("bench:1"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new(&exe)
            .arg("--data")
            .arg(&data)
            .args(["up", "--listen", &format!("127.0.0.1:{port}")])
            // No previews unless the benchmark asks for them.
            .args(if args.contains(&"--preview-listen") {
                &[][..]
            } else {
                &["--preview-listen", "off"][..]
            })
            .args(args)
            .env("WARREN_UID_BASE", UID_BASE)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(work.join(format!("{name}-up.log")))?)
            .spawn()
            .context("cannot start warren up")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut up = Up {
            child,
            client: Arc::new(Client::anonymous("http://invalid")),
            data: data.clone(),
        };
        let mut password = None;
        let mut lines = std::io::BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line?;
            if let Some(p) = line.trim().strip_prefix("user: admin   password: ") {
                password = Some(p.trim().to_owned());
            }
            if line.starts_with("Next:") {
                break;
            }
        }
        // Keep reading, so the server never writes into a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let password = password.context("warren up printed no admin password")?;
        let url = format!("http://127.0.0.1:{port}");
        let token = Client::anonymous(&url)
            .post("/login", &json!({"user": "admin", "password": password}))?["token"]
            .as_str()
            .context("no token")?
            .to_owned();
        up.client = Arc::new(Client::with_token(&url, &token));
        Ok(up)
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `warren ARGS` on the server's own host (its data folder).
    pub(crate) fn warren(&self, args: &[&str]) -> anyhow::Result<String> {
        sh(Command::new(crate::bench::warren_exe()?)
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .env("WARREN_UID_BASE", UID_BASE))
    }

    /// Deletes every workspace and waits (up to `within`) until they are gone.
    pub(crate) fn delete_all(&self, within: Duration) -> anyhow::Result<()> {
        let list = self.client.get("/workspaces")?;
        for ws in list.as_array().into_iter().flatten() {
            if let Some(id) = ws["id"].as_str() {
                let _ = self.client.delete(&format!("/workspaces/{id}"));
            }
        }
        let deadline = Instant::now() + within;
        while self
            .client
            .get("/workspaces")?
            .as_array()
            .is_some_and(|a| !a.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Creates workspaces `<prefix>-0` .. `<prefix>-<count - 1>` from `bench:1`, `at_once` of
    /// them at a time, and waits (up to `within`) until all run; how long that took.
    pub(crate) fn create_all(
        &self,
        prefix: &str,
        count: usize,
        at_once: usize,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        for batch in (0..count).collect::<Vec<_>>().chunks(at_once.max(1)) {
            let handles: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let (client, name) = (self.client.clone(), format!("{prefix}-{i}"));
                    std::thread::spawn(move || {
                        client.post("/workspaces", &json!({"name": name, "image": "bench:1"}))
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a create thread panicked"))??;
            }
        }
        self.wait_running(count, within)?;
        Ok(started.elapsed())
    }

    /// Waits until every workspace runs (an error as soon as one failed).
    pub(crate) fn wait_running(&self, count: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let list = self.client.get("/workspaces")?;
            let all = list.as_array().cloned().unwrap_or_default();
            if let Some(failed) = all.iter().find(|w| w["state"] == "failed") {
                bail!("{} failed: {}", failed["name"], failed["last_error"]);
            }
            if all.len() == count && all.iter().all(|w| w["state"] == "running") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not all {count} workspaces ran within {}s",
                    within.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Another host of a benchmark's `warren up`: `warren agent` with its own data folder, uid
/// ranges, bridge and addresses, registered with the server; stopped (and its workspaces
/// removed) when dropped.
pub(crate) struct AgentHost {
    child: Child,
    pub data: std::path::PathBuf,
    uid_base: String,
    bridge: String,
    subnet: String,
}

impl AgentHost {
    /// Host `n` (1 or 2) named `name`: `image` (a root filesystem) imported as `tag` first when
    /// given, `env` for its agent; returns once the agent called in.
    pub(crate) fn start(
        up: &Up,
        work: &Path,
        name: &str,
        n: u32,
        image: Option<(&Path, &str)>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let data = work.join(format!("{name}-data"));
        let mut host = AgentHost {
            child: Command::new("true").spawn()?,
            uid_base: (3_500_000_000u64 + u64::from(n) * 100_000_000).to_string(),
            bridge: format!("wbench{n}"),
            subnet: format!("10.{}.0.0/16", 100 + n),
            data,
        };
        host.clear()?;
        if let Some((rootfs, tag)) = image {
            sh(host.command(&["image", "import"]).arg(rootfs).arg(tag))?;
        }
        let added = up.client.post("/hosts", &json!({"name": name}))?;
        let token = added["token"].as_str().context("no host token")?;
        host.child = host
            .command(&["agent", "--server", up.client.server()])
            .env("WARREN_HOST_TOKEN", token)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                work.join(format!("{name}-agent.log")),
            )?)
            .spawn()
            .context("cannot start warren agent")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hosts = up.client.get("/hosts")?;
            if hosts
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| h["name"] == name && !h["last_seen_at"].is_null())
            {
                return Ok(host);
            }
            if Instant::now() > deadline {
                bail!("the agent of {name} never called in");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::bench::warren_exe().unwrap_or_else(|_| "warren".into()));
        cmd.arg("--data")
            .arg(&self.data)
            .args(args)
            .env("WARREN_UID_BASE", &self.uid_base)
            .env("WARREN_BRIDGE", &self.bridge)
            .env("WARREN_SUBNET", &self.subnet);
        cmd
    }

    /// Its workspaces and data folder from an earlier run (or this one) removed.
    fn clear(&self) -> anyhow::Result<()> {
        if let Ok(entries) = std::fs::read_dir(self.data.join("runtime/workspaces")) {
            for entry in entries.flatten() {
                let _ = self
                    .command(&["runtime", "rm", "-f"])
                    .arg(entry.file_name())
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.data);
        if self.data.exists() {
            bail!("cannot clear {} from an earlier run", self.data.display());
        }
        Ok(())
    }
}

impl Drop for AgentHost {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = self.clear();
    }
}

pub(crate) fn api(
    workspaces: usize,
    rates: &[f64],
    seconds: u64,
    work: &Path,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    if rates.is_empty() || rates.iter().any(|r| !(*r > 0.0 && *r <= 10_000.0)) {
        bail!("--rates must be between 0 and 10000 requests per second");
    }
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    std::fs::create_dir_all(work)?;
    let rootfs = crate::bench_runtime::debian_rootfs(work, &[])?;
    let up = Up::start(work, "api", &rootfs, &[])?;
    let client = up.client.clone();

    // N creates at once.
    let all_running = up.create_all("load", workspaces, workspaces, Duration::from_secs(600))?;
    eprintln!(
        "{workspaces} workspaces running after {:.1}s",
        all_running.as_secs_f64()
    );

    let mut results = Results {
        workspaces,
        all_running_s: all_running.as_secs_f64(),
        seconds,
        rates: Vec::new(),
    };
    for &rate in rates {
        let r = open_loop(&client, rate, seconds)?;
        eprintln!(
            "{rate}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms
        );
        results.rates.push(r);
    }
    up.delete_all(Duration::from_secs(300))?;
    drop(up);
    println!(
        "{} workspaces created at once: all running after {:.1} s",
        results.workspaces, results.all_running_s
    );
    println!(
        "mixed reads (/workspaces, /workspaces/NAME, /me, /jobs, /projects) for {seconds} s each, open loop (latency from each request's scheduled send time, {SENDERS} senders):"
    );
    for r in &results.rates {
        println!(
            "  {:>5.0}/s (kept {:>5.0}/s, {} requests): p50 {:>6.1} ms   p99 {:>6.1} ms   max {:>6.1} ms   {} errors",
            r.rate_per_s,
            r.achieved_per_s,
            r.latency.requests,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.max_ms,
            r.latency.errors
        );
    }
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// `rate` requests a second for `seconds`, each timed from when it was due.
fn open_loop(client: &Arc<Client>, rate: f64, seconds: u64) -> anyhow::Result<RateResult> {
    let total = (rate * seconds as f64) as usize;
    if total == 0 {
        bail!("{rate}/s for {seconds} s is no request at all: raise --rates or --seconds");
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    const PATHS: [&str; 5] = [
        "/workspaces",
        "/workspaces/load-0",
        "/me",
        "/jobs",
        "/projects",
    ];
    let t0 = Instant::now() + Duration::from_millis(100);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break done;
                    }
                    let due = t0 + interval.mul_f64(i as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let ok = client.get(PATHS[i % PATHS.len()]).is_ok();
                    done.push((Instant::now().saturating_duration_since(due), ok));
                }
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(total);
    for sender in senders {
        samples.extend(
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("a sender panicked"))?,
        );
    }
    let achieved = total as f64 / t0.elapsed().as_secs_f64();
    Ok(RateResult {
        rate_per_s: rate,
        achieved_per_s: achieved,
        latency: latency(samples),
    })
}
