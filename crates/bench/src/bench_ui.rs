//! `warren-bench ui`: the web UI's workspaces page with many workspaces under many viewers who
//! each hold its live stream open, against the API's JSON list of the same workspaces for the
//! same clients; and a preview URL's throughput against `ssh -L` to the same HTTP server in
//! the same workspace (through Warren's gateway, and through OpenSSH's sshd in the workspace).

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::bench::{Latency, latency, sh};
use crate::bench_api::Up;

/// What the workspace image holds: the HTTP server (busybox httpd) and the `ssh -L` peer.
pub(crate) const PACKAGES: &[&str] = &["openssh-server", "busybox"];

/// Where the peer sshd and the HTTP server listen inside the workspace.
const SSHD_PORT: u16 = 2200;
const HTTP_PORT: u16 = 8000;

/// How long the server is watched with only the live streams open.
const STREAMS_ONLY: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct Throughput {
    mib_s: f64,
}

#[derive(Debug, Serialize)]
struct Preview {
    file_mib: u64,
    runs: usize,
    /// curl straight to the workspace's address (the ceiling).
    direct: Throughput,
    /// curl through the preview URL (Warren's preview listener).
    preview: Throughput,
    /// curl through `ssh -L` into Warren's gateway.
    gateway_forward: Throughput,
    /// curl through `ssh -L` into OpenSSH's sshd in the workspace.
    sshd_forward: Throughput,
    preview_vs_sshd_forward: f64,
    preview_vs_gateway_forward: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    workspaces: usize,
    viewers: usize,
    seconds: u64,
    all_running_s: f64,
    /// Each viewer's live stream: from its request to the event saying every row was sent.
    first_sync: Latency,
    /// `GET /` (the page with every row) once a second per viewer, streams open.
    page: Latency,
    /// `GET /api/v1/workspaces` (the same workspaces as JSON) on the same schedule.
    json: Latency,
    /// The server's CPU (cores) with no viewer, with only the streams open (nothing changing,
    /// then workspaces stopped and started), while pages load, while JSON loads (changes
    /// going on).
    cpu_no_viewers: f64,
    cpu_streams_quiet: f64,
    cpu_streams_changing: f64,
    cpu_page: f64,
    cpu_json: f64,
    /// Row updates the viewers' streams delivered while workspaces were stopped and started.
    row_events: usize,
    stops_and_starts: usize,
    preview: Preview,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn ui(
    workspaces: usize,
    viewers: usize,
    seconds: u64,
    mib: u64,
    runs: usize,
    work: &Path,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    for program in ["ssh", "ssh-keygen", "curl"] {
        if warren_runtime::vm::which(program).is_none() {
            bail!("`{program}` is missing (apt install openssh-client curl)");
        }
    }
    if workspaces < 2 || viewers == 0 || seconds == 0 || mib == 0 || runs == 0 {
        bail!("--workspaces must be at least 2; --viewers, --seconds, --mib and --runs at least 1");
    }
    std::fs::create_dir_all(work)?;
    let rootfs = crate::bench_runtime::debian_rootfs(work, PACKAGES)?;
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (gateway_port, preview_port) = (free_port()?, free_port()?);
    let up = Up::start(
        work,
        "ui",
        &rootfs,
        &[
            "--ssh-listen",
            &format!("127.0.0.1:{gateway_port}"),
            "--preview-listen",
            &format!("127.0.0.1:{preview_port}"),
        ],
    )?;
    let client = up.client.clone();
    let site = client.server().to_owned();

    // The workspaces, twenty at a time.
    let all_running = up.create_all("ui", workspaces, 20, Duration::from_secs(1800))?;
    eprintln!(
        "{workspaces} workspaces running after {:.0} s",
        all_running.as_secs_f64()
    );

    // What the server does with no viewer (its own agent reports the 200 workspaces' use).
    let pid = up.pid();
    let cpu_no_viewers = cpu_over(pid, || {
        std::thread::sleep(STREAMS_ONLY);
        Ok(())
    })?
    .1;

    // The viewers: admins (who see every workspace), each signed in to the UI, each with an
    // API token for the JSON rows.
    let mut sessions = Vec::new();
    for v in 0..viewers {
        let (name, password) = (format!("viewer-{v}"), format!("viewer-{v}-password"));
        client.post(
            "/users",
            &json!({"name": name, "password": password, "admin": true}),
        )?;
        sessions.push(Viewer::sign_in(&site, &name, &password)?);
    }

    let rows = Arc::new(AtomicUsize::new(0));
    let synced = Arc::new(Mutex::new(Vec::new()));
    for viewer in &sessions {
        viewer.follow(&site, rows.clone(), synced.clone())?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while synced.lock().map(|s| s.len()).unwrap_or(0) < viewers {
        if Instant::now() > deadline {
            bail!("not every viewer's live stream sent all its rows within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_sync = latency(
        synced
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .map(|d| (*d, true))
            .collect(),
    );

    // The streams alone, nothing changing (each looks once a second and finds nothing new).
    let cpu_streams_quiet = cpu_over(pid, || {
        std::thread::sleep(STREAMS_ONLY);
        Ok(())
    })?
    .1;
    // Live updates from here on: workspaces stopped and started in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (client, stop, changes) = (client.clone(), stop.clone(), changes.clone());
        std::thread::spawn(move || churn(&client, workspaces, &stop, &changes))
    };
    let rows_before = rows.load(Ordering::Relaxed);
    let cpu_streams_changing = cpu_over(pid, || {
        std::thread::sleep(STREAMS_ONLY);
        Ok(())
    })?
    .1;
    let (page, cpu_page) = cpu_over(pid, || {
        load(&sessions, seconds, |v| v.page(&site, workspaces))
    })?;
    eprintln!(
        "page: p50 {:.1} ms, p99 {:.1} ms ({:.2} cores)",
        page.p50_ms, page.p99_ms, cpu_page
    );
    let (json_rows, cpu_json) = cpu_over(pid, || {
        load(&sessions, seconds, |v| v.json(&site, workspaces))
    })?;
    eprintln!(
        "json: p50 {:.1} ms, p99 {:.1} ms ({:.2} cores)",
        json_rows.p50_ms, json_rows.p99_ms, cpu_json
    );
    stop.store(true, Ordering::Relaxed);
    churn
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    let row_events = rows.load(Ordering::Relaxed) - rows_before;

    let preview = preview(&up, gateway_port, preview_port, mib, runs, work)?;
    let results = Results {
        workspaces,
        viewers,
        seconds,
        all_running_s: all_running.as_secs_f64(),
        first_sync,
        page,
        json: json_rows,
        cpu_no_viewers,
        cpu_streams_quiet,
        cpu_streams_changing,
        cpu_page,
        cpu_json,
        row_events,
        stops_and_starts: changes.load(Ordering::Relaxed),
        preview,
    };
    up.delete_all(Duration::from_secs(1800))?;
    drop(up);
    print(&results);
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

fn print(r: &Results) {
    let row = |what: &str, l: &Latency| {
        println!(
            "  {what:<44} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms   ({} requests, {} errors)",
            l.p50_ms, l.p99_ms, l.max_ms, l.requests, l.errors
        );
    };
    println!(
        "{} workspaces (all running after {:.0} s), {} viewers each holding the list's live stream, for {} s each:",
        r.workspaces, r.all_running_s, r.viewers, r.seconds
    );
    row("live stream, request to every row sent", &r.first_sync);
    row("GET / (the page, every row), 1/s per viewer", &r.page);
    row("GET /api/v1/workspaces (JSON), same schedule", &r.json);
    println!(
        "  server CPU, cores: {:.2} with no viewer; streams only {:.2} (nothing changing), {:.2} (workspaces stopped and started); {:.2} serving pages, {:.2} serving JSON",
        r.cpu_no_viewers, r.cpu_streams_quiet, r.cpu_streams_changing, r.cpu_page, r.cpu_json
    );
    println!(
        "  live updates: {} stops and starts asked, {} row updates delivered to the viewers",
        r.stops_and_starts, r.row_events
    );
    let p = &r.preview;
    println!(
        "HTTP download of {} MiB from busybox httpd in a workspace, curl, median of {}, MiB/s:",
        p.file_mib, p.runs
    );
    for (what, t) in [
        ("straight to the workspace's address", &p.direct),
        ("preview URL (warren's preview listener)", &p.preview),
        ("ssh -L through warren's gateway", &p.gateway_forward),
        ("ssh -L through sshd in the workspace", &p.sshd_forward),
    ] {
        println!("  {what:<44} {:>8.0}", t.mib_s);
    }
    println!(
        "  preview / ssh -L via sshd: {:.0}% (target ≥ 80%); preview / ssh -L via the gateway: {:.0}%",
        p.preview_vs_sshd_forward * 100.0,
        p.preview_vs_gateway_forward * 100.0
    );
}

/// A signed-in viewer: its UI session cookie and its API token.
struct Viewer {
    cookie: String,
    token: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

impl Viewer {
    fn sign_in(site: &str, name: &str, password: &str) -> anyhow::Result<Self> {
        let answer = agent()
            .post(&format!("{site}/login"))
            .send_form([("user", name), ("password", password)])?;
        let cookie = answer
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("signing in set no cookie")?
            .to_owned();
        let token = warren_cli::client::Client::anonymous(site)
            .post("/login", &json!({"user": name, "password": password}))?["token"]
            .as_str()
            .context("no token")?
            .to_owned();
        Ok(Self { cookie, token })
    }

    /// Opens the list's live stream in a thread of its own: counts `row` events, and notes
    /// when `synced` (every row sent once) came.
    fn follow(
        &self,
        site: &str,
        rows: Arc<AtomicUsize>,
        synced: Arc<Mutex<Vec<Duration>>>,
    ) -> anyhow::Result<()> {
        let (url, cookie) = (format!("{site}/events/workspaces"), self.cookie.clone());
        std::thread::spawn(move || {
            let asked = Instant::now();
            let Ok(answer) = agent().get(&url).header("Cookie", &cookie).call() else {
                return;
            };
            let reader = std::io::BufReader::new(answer.into_body().into_reader());
            let mut first = true;
            // The stream lasts until the server goes.
            for line in reader.lines() {
                let Ok(line) = line else { return };
                match line.as_str() {
                    "event: row" if !first => {
                        rows.fetch_add(1, Ordering::Relaxed);
                    }
                    "event: synced" if first => {
                        first = false;
                        if let Ok(mut s) = synced.lock() {
                            s.push(asked.elapsed());
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(())
    }

    /// The workspaces page, read whole; `false` unless it lists every workspace.
    fn page(&self, site: &str, workspaces: usize) -> bool {
        let answer = agent()
            .get(&format!("{site}/"))
            .header("Cookie", &self.cookie)
            .call();
        answer.is_ok_and(|a| {
            let ok = a.status() == 200;
            let body = a.into_body().read_to_string().unwrap_or_default();
            ok && body.matches("<tr id=\"ws-").count() == workspaces
        })
    }

    /// The same workspaces as JSON, read whole.
    fn json(&self, site: &str, workspaces: usize) -> bool {
        let answer = agent()
            .get(&format!("{site}/api/v1/workspaces"))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call();
        answer.is_ok_and(|a| {
            let ok = a.status() == 200;
            let text = a.into_body().read_to_string().unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or_default();
            ok && body.as_array().map(Vec::len) == Some(workspaces)
        })
    }
}

/// Every viewer asks once a second for `seconds` (viewers spread over the second), each
/// request timed from when it was due, so a server that falls behind shows as latency.
fn load(
    viewers: &[Viewer],
    seconds: u64,
    ask: impl Fn(&Viewer) -> bool + Sync,
) -> anyhow::Result<Latency> {
    let count = viewers.len();
    let t0 = Instant::now() + Duration::from_millis(200);
    let ask = &ask;
    let all = std::thread::scope(|scope| {
        let threads: Vec<_> = viewers
            .iter()
            .enumerate()
            .map(|(v, viewer)| {
                scope.spawn(move || {
                    let offset = Duration::from_secs(1).mul_f64(v as f64 / count as f64);
                    (0..seconds)
                        .map(|i| {
                            let due = t0 + offset + Duration::from_secs(i);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            let ok = ask(viewer);
                            (Instant::now().saturating_duration_since(due), ok)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            all.extend(t.join().map_err(|_| anyhow::anyhow!("a viewer panicked"))?);
        }
        anyhow::Ok(all)
    })?;
    Ok(latency(all))
}

/// Runs `work` and says how many of the server's cores it used meanwhile.
fn cpu_over<T>(pid: u32, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let cpu = || -> anyhow::Result<f64> {
        let stat = procfs::process::Process::new(pid as i32)?.stat()?;
        Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    };
    let (before, t) = (cpu()?, Instant::now());
    let out = work()?;
    Ok((out, (cpu()? - before) / t.elapsed().as_secs_f64()))
}

/// Stops and starts workspaces 1..=10 in turn until `stop`, counting the requests.
fn churn(
    client: &warren_cli::client::Client,
    workspaces: usize,
    stop: &AtomicBool,
    changes: &AtomicUsize,
) -> anyhow::Result<()> {
    let wait = |name: &str, state: &str| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while client.get(&format!("/workspaces/{name}"))?["state"] != state {
            if Instant::now() > deadline {
                bail!("{name} never became {state}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    for k in (1..workspaces.min(11)).cycle() {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let name = format!("ui-{k}");
        client.post(&format!("/workspaces/{name}/stop"), &json!({}))?;
        wait(&name, "stopped")?;
        client.post(&format!("/workspaces/{name}/start"), &json!({}))?;
        wait(&name, "running")?;
        changes.fetch_add(2, Ordering::Relaxed);
    }
    Ok(())
}

/// A file served by busybox httpd in workspace `ui-0`, downloaded by curl straight, through
/// the preview URL, and through `ssh -L` into the gateway and into sshd in the workspace.
fn preview(
    up: &Up,
    gateway_port: u16,
    preview_port: u16,
    mib: u64,
    runs: usize,
    work: &Path,
) -> anyhow::Result<Preview> {
    let key = work.join("ui-bench-key");
    let public_key = crate::bench_ssh::register_key(up, &key)?;
    let exec = |script: String| -> anyhow::Result<String> {
        let out = up.client.post(
            "/workspaces/ui-0/exec",
            &json!({"argv": ["/bin/sh", "-c", script]}),
        )?;
        if out["exit_code"] != 0 {
            bail!("{script}: {}", out["stderr"]);
        }
        Ok(out["stdout"].as_str().unwrap_or_default().to_owned())
    };
    let address = exec(format!(
        "mkdir -p /srv /root/.ssh /run/sshd && head -c {mib}M /dev/urandom > /srv/payload \
         && busybox httpd -p {HTTP_PORT} -h /srv </dev/null >/dev/null 2>&1 \
         && chmod 700 /root/.ssh && echo '{}' > /root/.ssh/authorized_keys \
         && ssh-keygen -A >/dev/null && /usr/sbin/sshd -p {SSHD_PORT} </dev/null >/dev/null 2>&1 \
         && hostname -I",
        public_key.trim()
    ))?;
    let address = address
        .split_whitespace()
        .next()
        .context("the workspace has no address")?
        .to_owned();
    up.client.put(
        &format!("/workspaces/ui-0/ports/{HTTP_PORT}"),
        &json!({"access": "public"}),
    )?;
    let bytes = mib << 20;
    let measure = |label: &str, url: &str| -> anyhow::Result<Throughput> {
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let got = sh(Command::new("curl")
                .args(["-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}"])
                .arg(url))?;
            times.push(t.elapsed());
            if got.trim() != bytes.to_string() {
                bail!("{label}: {got} bytes came, not {bytes}");
            }
        }
        times.sort();
        let result = Throughput {
            mib_s: mib as f64 / times[times.len() / 2].as_secs_f64(),
        };
        eprintln!("{label}: {:.0} MiB/s", result.mib_s);
        Ok(result)
    };
    let direct = measure("direct", &format!("http://{address}:{HTTP_PORT}/payload"))?;
    let preview = measure(
        "preview",
        &format!("http://127.0.0.1:{preview_port}/preview/admin/ui-0/{HTTP_PORT}/payload"),
    )?;
    let forward = |label: &str, port: u16, login: &str| -> anyhow::Result<Throughput> {
        let local = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let tunnel = Tunnel(
            crate::bench_ssh::ssh_client("ssh", &key, port)
                .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
                .arg(format!("{local}:127.0.0.1:{HTTP_PORT}"))
                .arg(login)
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start ssh -L")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
            if Instant::now() > deadline {
                bail!("{label}: the forward never listened");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let result = measure(label, &format!("http://127.0.0.1:{local}/payload"));
        drop(tunnel);
        result
    };
    let gateway_forward = forward("ssh -L via the gateway", gateway_port, "ui-0@127.0.0.1")?;
    let sshd_forward = forward("ssh -L via sshd", SSHD_PORT, &format!("root@{address}"))?;
    // Once, untimed: the bytes are the file's.
    let want = exec("sha256sum /srv/payload".to_owned())?;
    let got = sh(Command::new("sh").arg("-c").arg(format!(
        "curl -sS --fail http://127.0.0.1:{preview_port}/preview/admin/ui-0/{HTTP_PORT}/payload | sha256sum"
    )))?;
    if want.split_whitespace().next() != got.split_whitespace().next() {
        bail!("the preview served other bytes than the file's");
    }
    Ok(Preview {
        file_mib: mib,
        runs,
        preview_vs_sshd_forward: preview.mib_s / sshd_forward.mib_s,
        preview_vs_gateway_forward: preview.mib_s / gateway_forward.mib_s,
        direct,
        preview,
        gateway_forward,
        sshd_forward,
    })
}

/// An `ssh -L` running while held.
struct Tunnel(Child);

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
