//! `warren up` for integration tests: a server of the test's own, its CLI as several users, and
//! raw API calls. Each test crate uses what it needs of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use std::path::{Path, PathBuf};
use tempfile::TempDir;
use warren_testkit::{DebianRootfs, debian_rootfs, free_port, git};

/// `warren --data DATA ARGS...` with these variables set, without a server.
pub fn warren_at(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--data")
        .arg(data)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A command's stdout, once it is known to have succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "the command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's stdout, once it is known to have succeeded, read as JSON.
pub fn json(out: Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A command's stderr, once it is known to have failed (the twin of [`ok`]).
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "warren succeeded where it should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Makes an Ed25519 key pair without a passphrase: `path` and `path.pub`.
pub fn keygen(path: &std::path::Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    ok(out);
}

/// An SSH signature of `message` in `namespace`, made by OpenSSH with the private key `key`.
pub fn ssh_sign(key: &std::path::Path, namespace: &str, message: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", namespace, "-f"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A `warren up` of this test, in the test's own network namespace.
pub struct Warren {
    pub data: TempDir,
    pub database_url: Option<String>,
    pub uid_base: u32,
    pub port: u16,
    /// Where its SSH gateway listens (0: `warren up` runs none).
    pub ssh_port: u16,
    /// Where preview URLs are served.
    pub preview_port: u16,
    pub child: Option<Child>,
    /// How `warren up` said it mounts images (`one per image, ...`, `one per workspace (...)`).
    pub image_mounts: Option<String>,
    /// Where each logged-in user keeps its CLI token.
    pub configs: TempDir,
    /// More variables for `warren up`.
    pub env: Vec<(String, String)>,
    /// The CA of the certificate it serves HTTPS with (its URL is then `https://`).
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Warren {
    pub fn new(seed: u32, database_url: Option<String>) -> Self {
        let data = tempfile::Builder::new()
            .prefix("warren-up-")
            .tempdir_in("/var/tmp")
            .unwrap();
        Self {
            data,
            database_url,
            uid_base: 2_000_000_000 + seed * 64 * 65536,
            port: free_port(),
            ssh_port: free_port(),
            preview_port: free_port(),
            child: None,
            image_mounts: None,
            configs: tempfile::tempdir().unwrap(),
            env: Vec::new(),
            tls_ca: None,
        }
    }

    /// A first start, with the admin logged in.
    pub fn up_with_admin(seed: u32, database_url: Option<String>) -> Self {
        let mut warren = Self::new(seed, database_url);
        let password = warren.start().expect("a first start creates the admin");
        warren.login("admin", &password);
        warren
    }

    /// Imports the Debian minbase fixture into this host's store as `dev:1`.
    pub fn import_dev_image(&self) {
        self.import_image(&debian_rootfs(DebianRootfs::Minbase), "dev:1");
    }

    /// Imports a root filesystem into this host's store under `tag`.
    pub fn import_image(&self, rootfs: &std::path::Path, tag: &str) {
        self.ok("admin", &["image", "import", rootfs.to_str().unwrap(), tag]);
    }

    /// Creates a user (as the admin) and logs it in.
    pub fn add_user(&self, name: &str) {
        let password = format!("{name}-password");
        let (status, body) = self.http(
            "POST",
            "/api/v1/users",
            Some(&self.token("admin")),
            Some(
                serde_json::json!({"name": name, "password": password})
                    .to_string()
                    .as_bytes(),
            ),
        );
        assert_eq!(status, 201, "{body}");
        self.login(name, &password);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CLI's variables: where the server's CA is, when it has one.
    fn cli_env(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        self.tls_ca
            .iter()
            .map(|ca| ("WARREN_SERVER_CA", ca.clone()))
            .collect()
    }

    /// Starts `warren up`; returns the admin password when this start created the admin.
    pub fn start(&mut self) -> Option<String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.arg("--data")
            .arg(self.data.path())
            .args(["up", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args([
                "--ssh-listen",
                &match self.ssh_port {
                    0 => "off".to_owned(),
                    port => format!("127.0.0.1:{port}"),
                },
            ])
            .args(["--ssh-host", "127.0.0.1"])
            .args([
                "--preview-listen",
                &format!("127.0.0.1:{}", self.preview_port),
            ])
            .env("WARREN_UID_BASE", self.uid_base.to_string())
            .env("WARREN_RECONCILE_SECONDS", "1")
            .env("WARREN_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(self.data.path().join("up.log"))
                    .unwrap(),
            );
        if let Some(url) = &self.database_url {
            cmd.env("WARREN_DATABASE_URL", url);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("warren up did not come up: {}", self.log()));
            if line.starts_with("  data:") {
                break;
            }
        }
        // A first start prints the admin's password next; a later one prints nothing more.
        let mut password = None;
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            if let Some(rest) = line.trim().strip_prefix("image mounts: ") {
                self.image_mounts = Some(rest.to_owned());
            }
            if let Some(rest) = line.trim().strip_prefix("user: admin   password: ") {
                password = Some(rest.trim().to_owned());
            }
            if line.starts_with("Next:") {
                break;
            }
        }
        password
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("up.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// The CLI as `user` (each user has its own saved login).
    pub fn cli(&self, user: &str, args: &[&str]) -> Output {
        self.cli_command(user, args).output().unwrap()
    }

    pub fn cli_command(&self, user: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.arg("--data")
            .arg(self.data.path())
            .args(args)
            .env("XDG_CONFIG_HOME", self.configs.path().join(user))
            .env("HOME", self.configs.path().join(user))
            .env("WARREN_SERVER", self.url())
            .envs(self.cli_env())
            .env_remove("SSH_AUTH_SOCK");
        cmd
    }

    /// The CLI as `user`, which must finish within `limit` (else it is killed and the test
    /// fails): for commands that a hostile workspace could make hang.
    pub fn cli_within(&self, user: &str, args: &[&str], limit: Duration) -> Output {
        let mut child = self
            .cli_command(user, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "warren {args:?} as {user} did not finish within {limit:?}: {}\n--- server log ---\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    }

    pub fn ok(&self, user: &str, args: &[&str]) -> String {
        let out = self.cli(user, args);
        assert!(
            out.status.success(),
            "warren {args:?} as {user} failed: {}{}\n--- server log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What `warren ARGS` (a `--json` listing, a `show`) prints as `user`, read as JSON.
    pub fn json(&self, user: &str, args: &[&str]) -> Value {
        let out = self.ok(user, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("warren {args:?}: {e}: {out}"))
    }

    pub fn login(&self, user: &str, password: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["login", "--server", &self.url(), "--user", user])
            .env("XDG_CONFIG_HOME", self.configs.path().join(user))
            .env("WARREN_PASSWORD", password)
            .envs(self.cli_env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "login {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The token `warren login` saved for `user`.
    pub fn token(&self, user: &str) -> String {
        let saved: Value = serde_json::from_slice(
            &std::fs::read(self.configs.path().join(user).join("warren/cli.json")).unwrap(),
        )
        .unwrap();
        saved["token"].as_str().unwrap().to_owned()
    }

    /// A raw API call; returns the status and the JSON body.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let mut config = ureq::Agent::config_builder().http_status_as_error(false);
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).unwrap();
            let cert = ureq::tls::Certificate::from_pem(&pem).unwrap();
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]))
                    .build(),
            );
        }
        let agent: ureq::Agent = config.build().into();
        let url = format!("{}{path}", self.url());
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut resp = match method {
            "GET" | "DELETE" => {
                let mut req = if method == "GET" {
                    agent.get(&url)
                } else {
                    agent.delete(&url)
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call().unwrap()
            }
            _ => {
                let req = match method {
                    "PATCH" => agent.patch(&url),
                    "PUT" => agent.put(&url),
                    _ => agent.post(&url),
                };
                let mut req = req.header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(body.unwrap_or(b"{}")).unwrap()
            }
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// How many image mounts serve this server's workspaces (a mount the host shares between
    /// workspaces counts once).
    pub fn image_mounts(&self) -> usize {
        let marker = format!("--data {} image mount ", self.data.path().display());
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|entry| {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .contains(&marker)
            })
            .count()
    }

    pub fn workspace_processes(&self) -> usize {
        let mut n = 0;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let uid: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if (self.uid_base..self.uid_base + 64 * 65536).contains(&uid) {
                n += 1;
            }
        }
        n
    }
}

/// The folder of every workspace of the runtime whose data folder is `data` (none when it has
/// no runtime yet).
pub fn workspace_folders(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(data.join("runtime/workspaces"))
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().path())
        .collect()
}

impl Drop for Warren {
    fn drop(&mut self) {
        self.kill9();
        // Whatever workspaces a failed test left: remove them with the runtime's own command.
        for folder in workspace_folders(self.data.path()) {
            let _ = Command::new(env!("CARGO_BIN_EXE_warren"))
                .arg("--data")
                .arg(self.data.path())
                .args(["runtime", "rm", "-f"])
                .arg(folder.file_name().unwrap())
                .env("WARREN_UID_BASE", self.uid_base.to_string())
                .output();
        }
    }
}

/// A second host for a test's `warren up`: its own data folder, uid ranges, bridge and
/// addresses, and a `warren agent` serving the server (stopped when dropped).
pub struct SecondHost {
    pub data: TempDir,
    pub uid_base: u32,
    /// More variables for its commands and its agent.
    pub env: Vec<(String, String)>,
    /// Its bridge and the addresses on it.
    bridge: String,
    subnet: String,
    agent: Option<Child>,
    /// Its host token, once joined.
    token: String,
}

impl SecondHost {
    pub fn new(warren: &Warren) -> Self {
        Self::nth(warren, 1)
    }

    /// The `n`th other host (1 or 2) of `warren`: each its own uid ranges (within the test's),
    /// bridge and subnet.
    pub fn nth(warren: &Warren, n: u32) -> Self {
        assert!((1..=2).contains(&n));
        Self {
            data: tempfile::Builder::new()
                .prefix("warren-agent-")
                .tempdir_in("/var/tmp")
                .unwrap(),
            uid_base: warren.uid_base + (16 + 16 * n) * 65536,
            bridge: format!("warren{n}"),
            subnet: format!("10.{}.0.0/16", 88 + n),
            env: Vec::new(),
            agent: None,
            token: String::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.arg("--data")
            .arg(self.data.path())
            .args(args)
            .env("WARREN_UID_BASE", self.uid_base.to_string())
            .env("WARREN_BRIDGE", &self.bridge)
            .env("WARREN_SUBNET", &self.subnet)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `warren ARGS` on this host.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Registers the host as `name` and starts its agent; returns once it called in, with what
    /// `host add` printed.
    pub fn join(&mut self, warren: &Warren, name: &str) -> String {
        let added = warren.ok("admin", &["host", "add", name]);
        self.token = added
            .split_whitespace()
            .find_map(|w| w.strip_prefix("WARREN_HOST_TOKEN="))
            .expect("the host token is printed once")
            .to_owned();
        self.start_agent(warren);
        let admin = warren.token("admin");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, hosts) = warren.http("GET", "/api/v1/hosts", Some(&admin), None);
            if hosts
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["name"] == name && !h["last_seen_at"].is_null())
            {
                return added;
            }
            assert!(
                Instant::now() < deadline,
                "the agent never called in: {hosts}\n{}",
                std::fs::read_to_string(self.data.path().join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl SecondHost {
    /// Starts the host's agent (with this host's `env`), once joined.
    pub fn start_agent(&mut self, warren: &Warren) {
        self.agent = Some(
            self.command(&["agent", "--server", &warren.url()])
                .env("WARREN_HOST_TOKEN", &self.token)
                .env("WARREN_LOG", "info")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(self.data.path().join("agent.log"))
                        .unwrap(),
                )
                .spawn()
                .unwrap(),
        );
    }

    /// `warren agent ARGS` with this host's token, run to its end (for agents that must
    /// refuse to start).
    pub fn agent_once(&self, args: &[&str]) -> Output {
        let mut all = vec!["agent"];
        all.extend_from_slice(args);
        self.command(&all)
            .env("WARREN_HOST_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    /// The host dies: its agent and every process of its runtime (shims, image mounts) are
    /// killed at once (`kill -9`).
    pub fn kill9_everything(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let data = self.data.path().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&data) {
                let _ = Command::new("kill")
                    .arg("-9")
                    .arg(entry.file_name())
                    .status();
            }
        }
    }

    /// Stops the host's agent (its workspaces go on running).
    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

impl Drop for SecondHost {
    fn drop(&mut self) {
        self.stop_agent();
        // Whatever workspaces a failed test left on this host.
        for folder in workspace_folders(self.data.path()) {
            let name = folder.file_name().unwrap().to_string_lossy().into_owned();
            let _ = self.run(&["runtime", "rm", "-f", &name]);
        }
    }
}

pub fn manifest_dir() -> std::ffi::OsString {
    std::env::var_os("CARGO_MANIFEST_DIR").expect("tests run under cargo test or nextest")
}

pub fn examples() -> PathBuf {
    Path::new(&manifest_dir()).join("../../examples")
}

/// A repository on `main` holding a copy of `source`; its URL.
pub fn repository(root: &Path, name: &str, source: &Path) -> (PathBuf, String) {
    let repo = root.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", source.display()))
        .arg(&repo)
        .status()
        .unwrap();
    assert!(copied.success());
    git(&repo, &["init", "-q", "-b", "main"]);
    commit_all(&repo, "first");
    let url = format!("file://{}", repo.display());
    (repo, url)
}

pub fn commit_all(repo: &Path, message: &str) -> String {
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

/// The project's prebuilds, newest first.
pub fn prebuilds(warren: &Warren, project: &str) -> Vec<Value> {
    let text = warren.ok("admin", &["prebuild", "ls", project, "--json"]);
    let list: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    list.as_array().unwrap().clone()
}

/// Waits for the prebuild `pick` chooses to show up and end; returns it.
pub fn ended(warren: &Warren, project: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(pb) = prebuilds(warren, project).into_iter().find(&pick)
            && !matches!(pb["state"].as_str(), Some("queued" | "running"))
        {
            return pb;
        }
        assert!(
            Instant::now() < deadline,
            "no prebuild ended: {:?}",
            prebuilds(warren, project)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The prebuild of `commit`, once it ended.
pub fn prebuild_of(warren: &Warren, project: &str, commit: &str) -> Value {
    ended(warren, project, |p| p["commit"] == commit)
}

/// Bytes of the files under `dir`.
pub fn walkdir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walkdir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The bytes in a host's chunk cache once its background pulls have ended (nothing came in
/// for 3 s; two minutes at most).
pub fn cache_once_pulled(cache: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut whole = walkdir_bytes(cache);
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = walkdir_bytes(cache);
        if now == whole {
            return whole;
        }
        assert!(Instant::now() < deadline, "the background pull never ended");
        whole = now;
    }
}

/// Waits (a minute at most) until the workspace `show` shows is `lost`: its host stopped
/// reporting.
pub fn wait_until_lost(show: impl Fn() -> Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while show()["state"] != "lost" {
        assert!(Instant::now() < deadline, "never lost: {}", show());
        std::thread::sleep(Duration::from_millis(500));
    }
}
