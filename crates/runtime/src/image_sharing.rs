//! One lazy mount per image per host, shared by every workspace of that image.
//!
//! An image mount costs a process of several MiB for as long as its workspace runs. Where the
//! kernel lets FUSE mounts be idmapped (Linux 6.12 and later, for a server that opts in), the
//! host serves each image once per tenant (see [`find_or_start`] for where), with the image's
//! own ids and setuid bits ignored there; every workspace of that tenant sees it through an
//! idmapped clone of that mount (its ids shifted to the workspace's range, setuid honored)
//! under its own overlay. Elsewhere each workspace keeps a mount of its own, as before.
//! [`detect`] decides, once per boot.
//!
//! A workspace holds a [`Lease`] (a shared `flock` on the mount's lease file) while it uses
//! the mount. The last one out ends the mount ([`Lease::release`]); the mount also ends by
//! itself once nobody has held the lease for a while (a holder that crashed).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// How this host mounts images for workspaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ImageSharing {
    /// One mount per image and tenant, shared by its workspaces through idmapped mounts.
    Shared,
    /// One mount per workspace: why sharing is not possible here.
    PerWorkspace { why: String },
}

impl std::fmt::Display for ImageSharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shared => {
                f.write_str("one per image and tenant, shared by its workspaces (idmapped FUSE)")
            }
            Self::PerWorkspace { why } => write!(f, "one per workspace ({why})"),
        }
    }
}

/// A hold on a shared image mount. Dropping it gives the hold back without ending the mount;
/// [`Lease::release`] ends it when this was the last hold.
#[derive(Debug)]
pub struct Lease(Flock<File>);

/// Every hold on a mount's lease at once: while this lives nobody takes a new one, so the
/// mount can end without a workspace starting on it.
#[derive(Debug)]
pub struct WholeLease(#[allow(dead_code)] Flock<File>);

fn open_lease(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Takes `arg` (a non-blocking kind) on `file`, trying again until `deadline`; past it, a
/// `WouldBlock` error.
fn lock_by(mut file: File, arg: FlockArg, deadline: Instant) -> std::io::Result<Flock<File>> {
    loop {
        match Flock::lock(file, arg) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

impl Lease {
    /// Holds the lease at `path`, waiting up to `within` while its mount is ending.
    pub fn take(path: &Path, within: Duration) -> std::io::Result<Self> {
        let deadline = Instant::now() + within;
        lock_by(open_lease(path)?, FlockArg::LockSharedNonblock, deadline).map(Self)
    }

    /// Gives the hold back; `Some` when it was the last one (the mount is then the caller's to
    /// end, and no new hold is taken until the returned value drops).
    pub fn release(self) -> Option<WholeLease> {
        // Converting the hold either succeeds at once (nobody else holds it) or drops it.
        self.0
            .relock(FlockArg::LockExclusiveNonblock)
            .ok()
            .map(|()| WholeLease(self.0))
    }
}

impl WholeLease {
    /// All of the lease at `path` if nobody holds it; `None` while somebody does.
    pub fn try_take(path: &Path) -> std::io::Result<Option<Self>> {
        match Flock::lock(open_lease(path)?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self(lock))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e.into()),
        }
    }
}

/// The server of the generation whose tree is `tree`, while it serves it: its tree is a
/// mount, and the server named in its `pid` file is alive and serves that tree. Asked of
/// mountinfo and `/proc`, never of the server (a request could wait behind reads stuck on a
/// slow registry).
pub fn server_of(tree: &Path) -> Option<i32> {
    crate::sys::is_mounted(tree)
        .then(|| server_pid(tree))
        .flatten()
}

fn is_served(tree: &Path) -> bool {
    server_of(tree).is_some()
}

/// The live process named in the `pid` file beside `tree`, if it serves `tree`.
fn server_pid(tree: &Path) -> Option<i32> {
    let pid_file = tree.parent()?.join("pid");
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let tree = tree.as_os_str().as_encoded_bytes();
    // The tree is one of its arguments (a pid reused by another process is not it).
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == tree)
        .then_some(pid)
}

/// Where the shared mounts of a data folder live.
pub fn mounts_dir(data: &Path) -> PathBuf {
    data.join("mounts")
}

/// How long `warren image share` may take in all (resolving the image, waiting for another
/// start of it, then for a new mount to say it serves it): less than a supervisor waits for
/// it, so that the reason reaches the supervisor.
pub const SHARE_LIMIT: Duration = Duration::from_secs(110);

/// The shared mount's log is set aside past this size.
const LOG_LIMIT: u64 = 1 << 20;

/// The host's mount of one image for one tenant, named `key` (hex) under `mounts`: the one
/// being served, or a new one, started by `server(tree, lease)` (a `warren image mount` given
/// the readiness pipe as fd [`READY_FD`](crate::image_mount::READY_FD)). Returns its tree
/// and lease; gives up at `deadline`.
///
/// Layout: `<mounts>/<key>/lock` (held while one is found or started), `current` (the
/// generation served), `log` (every generation's output), and a folder per generation with
/// its `tree`, `lease` and the server's `pid`. A generation is never mounted at another's
/// path, so a server that ends late never unmounts its successor; each removes its own folder
/// when it ends.
pub fn find_or_start(
    mounts: &Path,
    key: &str,
    deadline: Instant,
    server: impl FnOnce(&Path, &Path) -> std::process::Command,
) -> Result<(PathBuf, PathBuf), String> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{key}` is not a shared mount's name"));
    }
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        format!("cannot {what} {}: {e}", path.display())
    };
    private_folder(mounts).map_err(|e| fail("make", mounts, e))?;
    // As mountinfo names it (the data folder may be reached through a symlink).
    let mounts = &std::fs::canonicalize(mounts).map_err(|e| fail("resolve", mounts, e))?;
    let image = mounts.join(key);
    private_folder(&image).map_err(|e| fail("make", &image, e))?;
    let lock_path = image.join("lock");
    let lock_file = open_lease(&lock_path).map_err(|e| fail("open", &lock_path, e))?;
    let lock = match lock_by(lock_file, FlockArg::LockExclusiveNonblock, deadline) {
        Ok(lock) => lock,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(format!(
                "another start of this image was still starting its shared mount after {} s (see {})",
                SHARE_LIMIT.as_secs(),
                image.join("log").display()
            ));
        }
        Err(e) => return Err(fail("lock", &lock_path, e)),
    };
    let current = image.join("current");
    if let Ok(name) = std::fs::read_to_string(&current) {
        let name = name.trim();
        let generation = image.join(name);
        if !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_hexdigit())
            && is_served(&generation.join("tree"))
        {
            return Ok((generation.join("tree"), generation.join("lease")));
        }
    }
    clear_generations(&image);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("{stamp:x}");
    let generation = image.join(&name);
    let (tree, lease) = (generation.join("tree"), generation.join("lease"));
    for dir in [&generation, &tree] {
        private_folder(dir).map_err(|e| fail("make", dir, e))?;
    }
    let log_path = image.join("log");
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > LOG_LIMIT) {
        let _ = std::fs::rename(&log_path, image.join("log.1"));
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| fail("open", &log_path, e))?;
    let (ready_read, ready_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let mut command = server(&tree, &lease);
    command.args(["--ready-fd", &crate::image_mount::READY_FD.to_string()]);
    crate::sys::give_fd_to_child(
        &mut command,
        std::os::fd::AsRawFd::as_raw_fd(&ready_write),
        crate::image_mount::READY_FD,
    );
    // Its own process group: it serves every workspace of the image, not its starter's.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| fail("open", &log_path, e))?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start the image's shared mount: {e}"))?;
    drop(ready_write);
    let server_pid = child.id();
    let mut give_up = |why: String| {
        let _ = child.kill();
        let _ = child.wait();
        if crate::sys::is_mounted(&tree) {
            let _ = nix::mount::umount2(&tree, nix::mount::MntFlags::MNT_DETACH);
        }
        remove_generation(&generation);
        why
    };
    let pid_file = generation.join("pid");
    if let Err(e) = std::fs::write(&pid_file, server_pid.to_string()) {
        return Err(give_up(fail("write", &pid_file, e)));
    }
    use crate::image_mount::MountSignal;
    let left = deadline.saturating_duration_since(Instant::now());
    match MountSignal::receive_within(File::from(ready_read), left) {
        Some(MountSignal::Mounted { .. }) if is_served(&tree) => {}
        other => {
            return Err(give_up(match other {
                Some(MountSignal::Failed { error }) => error,
                _ => format!(
                    "the image's shared mount said nothing within {} s or ended (see {})",
                    left.as_secs(),
                    log_path.display()
                ),
            }));
        }
    }
    let tmp = image.join("current.tmp");
    std::fs::write(&tmp, &name)
        .and_then(|()| std::fs::rename(&tmp, &current))
        .map_err(|e| fail("write", &current, e))?;
    drop(lock);
    Ok((tree, lease))
}

/// Removes what is left of the generations of an image's mount that are no longer served: a
/// tree whose server died is unmounted. A server still alive (only views of crashed
/// workspaces hold its file system) ends once its lease is gone.
fn clear_generations(image: &Path) {
    let Ok(entries) = std::fs::read_dir(image) else {
        return;
    };
    for entry in entries.flatten() {
        let generation = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let tree = generation.join("tree");
        if is_served(&tree) {
            continue;
        }
        if crate::sys::is_mounted(&tree) {
            let _ = nix::mount::umount2(&tree, nix::mount::MntFlags::MNT_DETACH);
        }
        remove_generation(&generation);
    }
}

/// Removes a generation's folder (its tree no longer mounted).
pub fn remove_generation(generation: &Path) {
    let _ = std::fs::remove_dir(generation.join("tree"));
    for file in ["lease", "pid"] {
        let _ = std::fs::remove_file(generation.join(file));
    }
    let _ = std::fs::remove_dir(generation);
}

/// A folder only host root may enter: the shared tree shows the image's own ids (root's files
/// are host root's).
fn private_folder(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(std::io::Error::other("not a folder of host root's"));
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Detected once per boot (the kernel cannot change without one) and remembered in `root`.
pub(crate) fn detect(root: &Path) -> ImageSharing {
    #[derive(Serialize, Deserialize)]
    struct Remembered {
        boot_id: String,
        sharing: ImageSharing,
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let path = root.join("image-sharing.json");
    if let Some(r) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Remembered>(&b).ok())
        .filter(|r| !boot_id.is_empty() && r.boot_id == boot_id)
    {
        return r.sharing;
    }
    let sharing = match probe(root) {
        Ok(()) => ImageSharing::Shared,
        Err(why) => ImageSharing::PerWorkspace { why },
    };
    let tmp = path.with_extension("tmp");
    if let Ok(bytes) = serde_json::to_vec(&Remembered {
        boot_id,
        sharing: sharing.clone(),
    }) && std::fs::write(&tmp, bytes).is_ok()
    {
        let _ = std::fs::rename(&tmp, &path);
    }
    sharing
}

/// Mounts an empty FUSE file system that asks for idmapped mounts, as an image mount does, and
/// idmaps a clone of it: what a shared image needs, tried for real.
fn probe(root: &Path) -> Result<(), String> {
    let dir = probe_folder(root).map_err(|e| format!("cannot make a probe folder: {e}"))?;
    let (served, view) = (dir.join("served"), dir.join("view"));
    let result = (|| {
        for d in [&served, &view] {
            std::fs::create_dir(d).map_err(|e| format!("cannot make {}: {e}", d.display()))?;
        }
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("warren-probe".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::All;
        let session = fuser::spawn_mount(Probe, &served, &config)
            .map_err(|e| format!("cannot mount FUSE: {e}"))?;
        // The first request waits for the server's answer to the kernel's INIT.
        let _ = std::fs::metadata(&served);
        let bound = crate::sys::bind_idmapped(&served, &view, 1 << 31, 65536, false);
        let _ = nix::mount::umount2(&view, nix::mount::MntFlags::MNT_DETACH);
        drop(session);
        bound.map_err(|e| {
            format!(
                "this kernel ({}) cannot idmap a FUSE mount ({e}); Linux 6.12 and later can",
                kernel_release()
            )
        })
    })();
    let _ = std::fs::remove_dir(&served);
    let _ = std::fs::remove_dir(&view);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// A new, empty folder in `root` for the probe.
fn probe_folder(root: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(root)?;
    for n in 0..100u32 {
        let dir = root.join(format!("probe-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free probe folder name"))
}

/// An empty, read-only file system that opts in to idmapped mounts.
struct Probe;

impl fuser::Filesystem for Probe {
    fn init(
        &mut self,
        _req: &fuser::Request,
        config: &mut fuser::KernelConfig,
    ) -> std::io::Result<()> {
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ALLOW_IDMAP);
        Ok(())
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        if ino != fuser::INodeNo(1) {
            return reply.error(fuser::Errno::ENOENT);
        }
        let t = std::time::UNIX_EPOCH;
        reply.attr(
            &Duration::from_secs(1),
            &fuser::FileAttr {
                ino,
                size: 0,
                blocks: 0,
                atime: t,
                mtime: t,
                ctime: t,
                crtime: t,
                kind: fuser::FileType::Directory,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                flags: 0,
                blksize: 4096,
            },
        );
    }
}
