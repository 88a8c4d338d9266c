//! Real peers for integration tests, started by the tests themselves: Debian's
//! `docker-registry` on a free loopback port, a throwaway PostgreSQL; and the fixtures they
//! read (`fixtures`: Debian root filesystems, the guest kernel and agent, a local mirror), made
//! beforehand by `./dev fixtures`.
//!
//! What a test needs and the host lacks is a failure with the reason, never a silent skip:
//! `./dev deps` installs all of it.
// Test support: a failure to set up a peer should stop the test with its reason.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod fixtures;
pub mod link;
pub use fixtures::{
    DebianRootfs, Fixture, debian_mirror, debian_rootfs, fixtures_dir, guest_kernel, static_guest,
};
pub use link::{DelayLine, LinkShape};

/// Panics with a clear message unless `program` is on the PATH.
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is missing: install the Debian package `{package}` (./dev deps does)"
    );
}

/// Panics unless running as root (namespaces, FUSE, mounts).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (FUSE, mounts): run the suite as root, as ./dev test does"
    );
}

/// `len` bytes of incompressible, reproducible data (xorshift from `seed`), so that chunks
/// neither compress nor dedup away.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A loopback port nothing listens on, never the same twice in one test process (two quick
/// calls can otherwise get the same port back from the kernel).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Debian's `docker-registry` (distribution 2.8) serving from a temporary folder on loopback.
/// Stopped when dropped.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: tempfile::TempDir,
    config: PathBuf,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with(None)
    }

    /// A registry that requires HTTP Basic authentication (an htpasswd file, bcrypt) for `user`.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Registry {
        Self::start_with(Some((user, password)))
    }

    fn start_with(basic_auth: Option<(&str, &str)>) -> Registry {
        require_program("docker-registry", "docker-registry");
        let storage = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        if let Some((user, password)) = basic_auth {
            require_program("htpasswd", "apache2-utils");
            let entry = run(Command::new("htpasswd").args(["-Bbn", user, password]));
            let htpasswd = storage.path().join("htpasswd");
            std::fs::write(&htpasswd, entry.trim()).unwrap();
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: warren-test\n    path: {}\n",
                htpasswd.display()
            ));
            std::fs::write(&config, text).unwrap();
        }
        let child = Self::spawn(&config);
        let registry = Registry {
            child,
            port,
            storage,
            config,
        };
        registry.wait_ready();
        registry
    }

    fn spawn(config: &Path) -> Child {
        Command::new("docker-registry")
            .arg("serve")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("http://127.0.0.1:{}/v2/", self.port);
        // Any HTTP answer (a 401 included) means it is up.
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        );
        while agent.get(&url).call().is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {url} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the registry (connections drop, the port refuses).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same storage.
    pub fn resume(&mut self) {
        self.child = Self::spawn(&self.config);
        self.wait_ready();
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The file holding a blob in the registry's storage (to corrupt it in tests).
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.storage.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs git in `dir` as a fixed author; its trimmed output (panics if git fails).
pub fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=dev", "-c", "user.email=dev@example.org"])
        .args(args))
    .trim()
    .to_owned()
}

/// Runs a command and returns its stdout, panicking with its stderr if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    warren_hostfs::is_mounted(path)
}

/// Moves the calling test process into a network namespace of its own (loopback up), so that
/// the bridges, addresses and nftables rules its workspaces make never touch the host's network.
/// Processes the test starts afterwards inherit it.
pub fn enter_own_network() {
    require_root();
    // SAFETY: unshare only changes this process's namespaces; it takes no pointers.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    run(Command::new("ip").args(["link", "set", "lo", "up"]));
}

/// A throwaway PostgreSQL server (Debian's, run as the `postgres` user) on a free loopback port,
/// trusting local connections. Stopped and removed when dropped.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

impl Postgres {
    pub fn start() -> Self {
        require_root();
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).find(|b| b.join("initdb").exists()))
            .expect("PostgreSQL's server is missing: install the Debian package `postgresql` (./dev deps does)");
        let dir = tempfile::Builder::new()
            .prefix("warren-pg-")
            .tempdir_in("/var/tmp")
            .unwrap();
        run(Command::new("chown").arg("postgres:").arg(dir.path()));
        let port = free_port();
        let data = dir.path().join("data");
        let as_postgres = |program: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(program));
            c
        };
        run(as_postgres("initdb")
            .args(["--auth=trust", "-U", "postgres", "-D"])
            .arg(&data));
        run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.path().display()
            ))
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "start"]));
        Self { dir, port, bin }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Fails (never skips) when a VM test's programs are missing.
pub fn require_vm_tools() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    require_program("xz", "xz-utils");
    for tool in ["virtiofsd", "vhost-device-vsock"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{tool} is missing: `cargo install --locked {tool}` (./dev deps does)"
        );
    }
}
