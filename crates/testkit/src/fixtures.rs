//! What the tests read and never make: Debian root filesystems, Debian's kernel for the VM
//! tests, the static guest agent, and a local Debian mirror. `./dev fixtures` (the
//! `warren-fixtures` program, which `./dev test` runs first) makes every one of them in the
//! host's own network namespace, once, in `$WARREN_FIXTURES` (default
//! `/var/cache/warren/fixtures`). A test that finds one missing fails at once with the command
//! that makes it: tests run in network namespaces of their own, with no route to a mirror, and
//! never download anything.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where fixtures live: `$WARREN_FIXTURES`, default `/var/cache/warren/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("WARREN_FIXTURES").map_or_else(
        || PathBuf::from("/var/cache/warren/fixtures"),
        PathBuf::from,
    )
}

/// The Debian mirror fixtures are made from: `$WARREN_DEBIAN_MIRROR`, as for
/// `warren image bootstrap`, else Debian's own.
fn upstream_mirror() -> String {
    std::env::var("WARREN_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into())
}

/// The Debian bookworm root filesystems tests run workspaces and builds on
/// (`mmdebstrap --variant=minbase`, plus a few packages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebianRootfs {
    /// Nothing beyond minbase.
    Minbase,
    /// With git: prebuild checkouts.
    Git,
    /// With an SSH server, busybox and procps: the gateway's tests.
    SshServer,
    /// With Docker's engine: Docker inside a workspace.
    Docker,
}

impl DebianRootfs {
    pub const ALL: [Self; 4] = [Self::Minbase, Self::Git, Self::SshServer, Self::Docker];

    /// Packages beyond minbase.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Self::Minbase => &[],
            Self::Git => &["git"],
            Self::SshServer => &["busybox", "openssh-server", "procps"],
            Self::Docker => &["docker.io", "iproute2", "procps"],
        }
    }

    /// Its folder's name in the fixtures folder.
    pub fn name(self) -> String {
        std::iter::once("bookworm-minbase")
            .chain(self.packages().iter().copied())
            .collect::<Vec<_>>()
            .join("-")
    }
}

/// One thing `./dev fixtures` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixture {
    Rootfs(DebianRootfs),
    /// Debian's generic kernel package, unpacked.
    GuestKernel,
    /// `warren-guest` built static, as a VM's initramfs needs.
    StaticGuest,
    /// A signed apt repository on disk holding minbase and busybox: what
    /// `warren image bootstrap --mirror file://... --keyring ...` is tested against.
    DebianMirror,
}

impl Fixture {
    /// Every fixture, in the order `./dev fixtures` makes them.
    pub fn all() -> Vec<Fixture> {
        DebianRootfs::ALL
            .into_iter()
            .map(Fixture::Rootfs)
            .chain([
                Fixture::GuestKernel,
                Fixture::DebianMirror,
                Fixture::StaticGuest,
            ])
            .collect()
    }

    pub fn name(self) -> String {
        match self {
            Self::Rootfs(r) => r.name(),
            Self::GuestKernel => "guest-kernel-amd64".into(),
            Self::StaticGuest => "static-guest".into(),
            Self::DebianMirror => "debian-mirror".into(),
        }
    }

    /// Where it is (a folder, or for the guest agent, its binary in the shared target folder).
    pub fn path(self) -> PathBuf {
        match self {
            Self::StaticGuest => target_dir().join("x86_64-unknown-linux-gnu/release/warren-guest"),
            other => fixtures_dir().join(other.name()),
        }
    }

    /// Marks a fixture made in full: written last, so an interrupted build is never taken for
    /// one.
    fn complete_marker(self) -> PathBuf {
        fixtures_dir().join(format!("{}.complete", self.name()))
    }

    /// True when it can be used as it is.
    pub fn is_ready(self) -> bool {
        match self {
            Self::StaticGuest => self.path().is_file() && !guest_sources_newer(&self.path()),
            other => other.complete_marker().exists() && other.path().is_dir(),
        }
    }

    /// Its path, or a panic that names the command that makes it.
    fn ready(self) -> PathBuf {
        assert!(
            self.is_ready(),
            "the test fixture `{}` is missing or out of date at {}: run `./dev fixtures` \
             (`./dev test` runs it first; tests never download anything)",
            self.name(),
            self.path().display()
        );
        self.path()
    }

    /// Makes it unless it is ready. Errors say what failed; the caller retries.
    pub fn prepare(self) -> Result<(), String> {
        // The guest is always handed to cargo, whose fingerprints (sources, Cargo.lock,
        // flags) know better than a look at modification times whether it is current.
        if self != Self::StaticGuest && self.is_ready() {
            return Ok(());
        }
        let dir = fixtures_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let partial = dir.join(format!("{}.partial", self.name()));
        let _ = std::fs::remove_dir_all(&partial);
        match self {
            Self::StaticGuest => return build_static_guest(),
            Self::Rootfs(r) => mmdebstrap(r.packages(), &partial, &upstream_mirror(), None)?,
            Self::GuestKernel => download_kernel(&partial)?,
            Self::DebianMirror => make_mirror(&partial)?,
        }
        let root = self.path();
        // Not complete from the moment the old one is touched.
        let _ = std::fs::remove_file(self.complete_marker());
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&partial, &root)
            .map_err(|e| format!("cannot move {} into place: {e}", partial.display()))?;
        std::fs::write(self.complete_marker(), b"")
            .map_err(|e| format!("cannot mark {} complete: {e}", root.display()))
    }
}

/// A Debian bookworm root filesystem for tests. Made by `./dev fixtures`.
pub fn debian_rootfs(which: DebianRootfs) -> PathBuf {
    Fixture::Rootfs(which).ready()
}

/// Debian's kernel for VM tests (the generic one: the cloud kernel has no 9p), unpacked
/// (`boot/vmlinuz-*`, `lib/modules/<version>/`): the folder to give the runtime as its guest
/// kernel. Made by `./dev fixtures`.
pub fn guest_kernel() -> PathBuf {
    Fixture::GuestKernel.ready().join("x")
}

/// `warren-guest` built static (`+crt-static` on the gnu target). Built by `./dev fixtures`
/// into the shared target folder; a test fails if the guest's sources changed since.
pub fn static_guest() -> PathBuf {
    Fixture::StaticGuest.ready()
}

/// A local Debian mirror (`file://` URL) holding minbase and busybox for bookworm, and the
/// keyring its Release file is signed with. Made by `./dev fixtures`.
pub fn debian_mirror() -> (String, PathBuf) {
    let dir = Fixture::DebianMirror.ready();
    (
        format!("file://{}", dir.join("repo").display()),
        dir.join("keyring.gpg"),
    )
}

/// The shared cargo target folder, where `./dev` builds.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/warren/target"))
}

/// True if a file of the guest crate's sources is newer than the built guest.
fn guest_sources_newer(binary: &Path) -> bool {
    let Ok(built) = binary.metadata().and_then(|m| m.modified()) else {
        return true;
    };
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest");
    let mut stack = vec![sources.join("src"), sources.join("Cargo.toml")];
    while let Some(path) = stack.pop() {
        let Ok(meta) = path.metadata() else { continue };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return true;
        }
    }
    false
}

fn run_checked(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mmdebstrap(
    include: &[&str],
    target: &Path,
    mirror: &str,
    extra: Option<&[&str]>,
) -> Result<(), String> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--quiet"]);
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.args(extra.unwrap_or_default());
    cmd.arg("bookworm").arg(target).arg(mirror);
    run_checked(&mut cmd).map(drop)
}

fn download_kernel(target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let depends = run_checked(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .ok_or("apt-cache names no package linux-image-amd64 depends on (run apt-get update)")?
        .trim()
        .to_owned();
    run_checked(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(target),
    )?;
    let deb = std::fs::read_dir(target)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| format!("apt-get download left no .deb of {package}"))?;
    run_checked(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(target.join("x")),
    )?;
    std::fs::remove_file(&deb).map_err(|e| e.to_string())
}

fn build_static_guest() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_checked(
        Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--locked",
                "--release",
                "-p",
                "warren-guest",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("CARGO_TARGET_DIR", target_dir())
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            ),
    )
    .map(drop)
}

/// A signed apt repository of what `mmdebstrap --variant=minbase --include=busybox` installs:
/// the packages come from a real bootstrap (its apt cache and lists kept), the index from
/// `apt-ftparchive` with the archive's priorities (mmdebstrap picks minbase by them), the
/// signature from a key made here (`keyring.gpg` beside `repo/`).
fn make_mirror(target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let bootstrap = target.join("bootstrap");
    mmdebstrap(
        &["busybox"],
        &bootstrap,
        &upstream_mirror(),
        Some(&["--skip=cleanup/apt", "--skip=essential/unlink"]),
    )?;
    let repo = target.join("repo");
    let pool = repo.join("pool/main");
    let index = repo.join("dists/bookworm/main/binary-amd64");
    for dir in [&pool, &index] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let archives = bootstrap.join("var/cache/apt/archives");
    let debs = std::fs::read_dir(&archives).map_err(|e| format!("{}: {e}", archives.display()))?;
    for deb in debs
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "deb"))
    {
        std::fs::rename(deb.path(), pool.join(deb.file_name())).map_err(|e| e.to_string())?;
    }
    // The archive's own priorities and sections, from the index the bootstrap read: a
    // package's control file may say otherwise (apt's says `important`, the archive `required`).
    let lists = bootstrap.join("var/lib/apt/lists");
    let mut overrides = String::new();
    for list in std::fs::read_dir(&lists).map_err(|e| format!("{}: {e}", lists.display()))? {
        let list = list.map_err(|e| e.to_string())?.path();
        if !list.to_string_lossy().ends_with("_Packages") {
            continue;
        }
        let text = std::fs::read_to_string(&list).map_err(|e| e.to_string())?;
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            };
            if let (Some(package), Some(priority), Some(section)) =
                (field("Package"), field("Priority"), field("Section"))
            {
                overrides.push_str(&format!("{package} {priority} {section}\n"));
            }
        }
    }
    let override_file = target.join("override");
    std::fs::write(&override_file, overrides).map_err(|e| e.to_string())?;
    std::fs::remove_dir_all(&bootstrap).map_err(|e| e.to_string())?;
    let packages = run_checked(
        Command::new("apt-ftparchive")
            .args(["packages", "pool"])
            .arg(&override_file)
            .current_dir(&repo),
    )?;
    std::fs::write(index.join("Packages"), packages).map_err(|e| e.to_string())?;
    let release = run_checked(
        Command::new("apt-ftparchive")
            .args([
                "-o",
                "APT::FTPArchive::Release::Suite=bookworm",
                "-o",
                "APT::FTPArchive::Release::Codename=bookworm",
                "-o",
                "APT::FTPArchive::Release::Components=main",
                "-o",
                "APT::FTPArchive::Release::Architectures=amd64",
                "release",
                "dists/bookworm",
            ])
            .current_dir(&repo),
    )?;
    let release_file = repo.join("dists/bookworm/Release");
    std::fs::write(&release_file, release).map_err(|e| e.to_string())?;

    // A throwaway signing key in a home of its own (short: gpg-agent's socket is in it).
    let home = tempfile::Builder::new()
        .prefix("warren-gpg-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let gpg = |args: &[&str]| {
        let mut cmd = Command::new("gpg");
        cmd.arg("--homedir")
            .arg(home.path())
            .args(["--batch", "--quiet"])
            .args(args);
        cmd
    };
    run_checked(&mut gpg(&[
        "--passphrase",
        "",
        "--quick-gen-key",
        "Warren test mirror <fixtures@warren.invalid>",
        "ed25519",
        "sign",
        "never",
    ]))?;
    run_checked(
        gpg(&["--clearsign", "--output"])
            .arg(repo.join("dists/bookworm/InRelease"))
            .arg(&release_file),
    )?;
    run_checked(
        gpg(&["--export", "--output"])
            .arg(target.join("keyring.gpg"))
            .arg("fixtures@warren.invalid"),
    )?;
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(home.path())
        .args(["--kill", "gpg-agent"])
        .status();
    Ok(())
}
