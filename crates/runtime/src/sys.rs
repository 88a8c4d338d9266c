//! Host side effects that are not namespaces or cgroups: mounts and the host commands (`ip`,
//! `nft`, `mount` for idmapped binds) the runtime runs. Kept in one narrow module so the logic
//! around them reads plainly and the privileged tests stay few.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::Error;

/// Runs a host command, returning its stdout; an error carries its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, Error> {
    run_with_input(cmd, None)
}

/// Gives the child `fd` (of this process, close-on-exec) as its fd `target`, open across its
/// exec.
pub(crate) fn give_fd_to_child(cmd: &mut Command, fd: std::os::fd::RawFd, target: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls dup2 (or fcntl, when the
    // fd already has its number), both async-signal-safe; `fd` stays open in the parent until
    // the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            let done = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A descriptor that becomes readable when process `pid` ends (close-on-exec); `None` if it
/// is gone.
pub(crate) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Children start with no signal blocked. The shim blocks the signals it reads from a signalfd,
/// and `std::process::Command` passes the mask on: a helper started from it would never see
/// SIGTERM.
pub(crate) fn unblock_signals_in_child(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls sigprocmask, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let empty = nix::sys::signal::SigSet::empty();
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&empty),
                None,
            )
            .map_err(std::io::Error::from)
        })
    }
}

pub(crate) fn run_with_input(cmd: &mut Command, input: Option<&str>) -> Result<String, Error> {
    unblock_signals_in_child(cmd);
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let describe = || command.clone();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::Command {
        command: describe(),
        stderr: e.to_string(),
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| Error::Command {
                command: describe(),
                stderr: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| Error::Command {
        command: describe(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: describe(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True if host uid `uid` (with gid `uid` and no other groups, as a workspace's root is) can
/// enter `dir`: every folder on the way searchable by it, ACLs included. Asked of the kernel
/// itself, by a child that takes those ids and changes into `dir` (std's spawn does setgid,
/// setuid, then chdir) before it runs `true`.
pub(crate) fn can_enter_as(dir: &Path, uid: u32) -> bool {
    use std::os::unix::process::CommandExt as _;
    // As root, std also drops the supplementary groups when it sets the uid; the chdir then
    // happens with the workspace's rights. Only a refusal counts as closed: any other failure
    // (no /bin/true, no process left) says nothing about the folder.
    match Command::new("/bin/true")
        .uid(uid)
        .gid(uid)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) => !matches!(
            e.raw_os_error(),
            Some(libc::EACCES | libc::ENOTDIR | libc::EPERM)
        ),
    }
}

pub(crate) use warren_hostfs::{is_mounted, mounts, mounts_under};

/// The overlay that is the workspace's root: `lower` read-only, changes to `upper`.
pub(crate) fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), Error> {
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if [lower, upper, work]
        .iter()
        .any(|p| p.to_string_lossy().contains([',', ':']))
    {
        return Err(Error::InvalidConfig(format!(
            "overlay paths may not contain ',' or ':': {data}"
        )));
    }
    // nodev: no device node of the workspace's tree (its image, its layer) opens a device;
    // its /dev is a mount of its own.
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| Error::Io {
        what: "cannot mount the overlay at",
        path: target.to_owned(),
        cause: e.into(),
    })
}

/// Binds `source` at `target` with every id shifted by `base` (an idmapped mount), so files
/// owned by root on the host belong to the workspace's root inside. Forks (for the user
/// namespace that describes the mapping). `honor_setuid` clears `nosuid` on the clone (a
/// shared image mount has it; each workspace's view of it does not).
pub(crate) fn bind_idmapped(
    source: &Path,
    target: &Path,
    base: u32,
    count: u32,
    honor_setuid: bool,
) -> Result<(), Error> {
    let fail = |step: &'static str, cause: std::io::Error| Error::Bind {
        from: source.to_owned(),
        how: format!("at {} with shifted ids", target.display()),
        step,
        cause,
    };
    let userns = mapping_namespace(base, count).map_err(|e| fail("user namespace", e))?;
    let c_target = path_cstring(target)?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: if honor_setuid {
            libc::MOUNT_ATTR_NOSUID
        } else {
            0
        },
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    bind_with(source, true, &attr, MountTarget::Path(&c_target), fail)
}

/// Binds `source` (a host folder Warren owns) read-only onto the folder open at `target`: the
/// target is the descriptor, never a path, so nothing in a tenant's tree can redirect it.
pub(crate) fn bind_readonly_at(
    source: &Path,
    target: std::os::fd::BorrowedFd<'_>,
) -> Result<(), Error> {
    let fail = |step: &'static str, cause: std::io::Error| Error::Bind {
        from: source.to_owned(),
        how: "read-only".to_owned(),
        step,
        cause,
    };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    bind_with(source, false, &attr, MountTarget::Fd(target), fail)
}

/// Where a bind mount is attached: a path (of a folder Warren made), or a folder open as a
/// descriptor (one inside a tenant's tree).
enum MountTarget<'a> {
    Path(&'a std::ffi::CStr),
    Fd(std::os::fd::BorrowedFd<'a>),
}

/// Clones the tree at `source` (with its submounts when `recursive`), gives the clone `attr`
/// and attaches it at `target`; `fail` names the step that failed.
fn bind_with(
    source: &Path,
    recursive: bool,
    attr: &libc::mount_attr,
    target: MountTarget<'_>,
    fail: impl Fn(&'static str, std::io::Error) -> Error,
) -> Result<(), Error> {
    let c_source = path_cstring(source)?;
    let (clone, set) = if recursive {
        (
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
        )
    } else {
        (
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
            libc::AT_EMPTY_PATH,
        )
    };
    // SAFETY: open_tree reads a NUL-terminated path and returns a new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c_source.as_ptr(),
            clone,
        )
    };
    if tree < 0 {
        return Err(fail("open_tree", std::io::Error::last_os_error()));
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    // SAFETY: mount_setattr reads `attr` (size given) and the empty path; both outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            set,
            attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(fail("mount_setattr", std::io::Error::last_os_error()));
    }
    let (to_dir, to_path, flags) = match target {
        MountTarget::Path(path) => (libc::AT_FDCWD, path, libc::MOVE_MOUNT_F_EMPTY_PATH),
        MountTarget::Fd(fd) => (
            fd.as_raw_fd(),
            c"",
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        ),
    };
    // SAFETY: move_mount attaches the detached tree at the target (a NUL-terminated path, or
    // the open folder with an empty path); every descriptor and string outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            to_dir,
            to_path.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        return Err(fail("move_mount", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens (as an `O_PATH` folder) `path` inside the tenant tree open at `root`, resolved as if
/// `root` were `/` (an absolute or `..` symlink stays inside), never through `/proc` magic
/// links or onto another mount; the missing folders on the way are made, owned by `owner`,
/// also where a symlink leads to nothing yet (inside the tree, as the kernel resolves it).
/// A new, empty file `name` in `dir`, a folder the workspace's own ids may write to (a VM's
/// `vm/`, where its QEMU and daemons make their sockets): what is there is removed first (a
/// symlink itself, never where it leads), and the file is made with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, so host root writes only to a file it has just made (one
/// planted in between makes this fail, never redirects it). Given to `owner` through its
/// descriptor.
pub(crate) fn create_in_tenant_dir(
    dir: &Path,
    name: &str,
    owner: Option<u32>,
) -> Result<std::fs::File, Error> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let path = dir.join(name);
    let folder = std::fs::File::open(dir).map_err(Error::io("cannot open", dir))?;
    match nix::unistd::unlinkat(
        Some(folder.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::Io {
                what: "cannot remove",
                path,
                cause: e.into(),
            });
        }
    }
    let fd = openat(
        Some(folder.as_raw_fd()),
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| Error::Io {
        what: "cannot create",
        path: path.clone(),
        cause: e.into(),
    })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(&file, Some(owner), Some(owner))
            .map_err(Error::io("cannot chown", &path))?;
    }
    Ok(file)
}

/// The last `limit` bytes of a file in a folder the workspace's own ids may write to (a VM's
/// console log), read by host root: opened without following a symlink or waiting on a FIFO,
/// and read only if it is a regular file.
pub(crate) fn read_tenant_file(path: &Path, limit: u64) -> Option<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    file.seek(SeekFrom::Start(meta.len().saturating_sub(limit)))
        .ok()?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

pub(crate) fn open_or_make_in_root(
    root: std::os::fd::BorrowedFd<'_>,
    path: &str,
    owner: u32,
) -> Result<OwnedFd, Error> {
    open_or_make(root, path, owner, 0)
}

fn open_or_make(
    root: std::os::fd::BorrowedFd<'_>,
    path: &str,
    owner: u32,
    hops: u32,
) -> Result<OwnedFd, Error> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    if hops > 8 {
        return Err(Error::InWorkspace {
            action: "make",
            path: path.to_owned(),
            cause: nix::errno::Errno::ELOOP.into(),
        });
    }
    let open = |at: &str| -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_IN_ROOT
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        // SAFETY: openat2 returns a new descriptor that nothing else owns.
        openat2(root.as_raw_fd(), at, how).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let fail = |at: &str, e: nix::Error| Error::InWorkspace {
        action: "open",
        path: at.to_owned(),
        cause: e.into(),
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut so_far = String::new();
    let mut dir = open("/").map_err(|e| fail("/", e))?;
    for (i, part) in parts.iter().enumerate() {
        let parent = so_far.clone();
        so_far.push('/');
        so_far.push_str(part);
        dir = match open(&so_far) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) if *part != "." && *part != ".." => {
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    *part,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) => {}
                    Err(nix::errno::Errno::EEXIST) => {
                        // A symlink to nothing yet: go on where it leads, inside the tree.
                        let target = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), *part)
                            .map_err(|e| fail(&so_far, e))?;
                        let target = target.to_string_lossy();
                        let rest = parts[i + 1..].join("/");
                        let next = if target.starts_with('/') {
                            format!("{target}/{rest}")
                        } else {
                            format!("{parent}/{target}/{rest}")
                        };
                        return open_or_make(root, &next, owner, hops + 1);
                    }
                    Err(e) => return Err(fail(&so_far, e)),
                }
                let made = open(&so_far).map_err(|e| fail(&so_far, e))?;
                // SAFETY: fchownat on an open descriptor with an empty path and AT_EMPTY_PATH.
                if unsafe {
                    libc::fchownat(
                        made.as_raw_fd(),
                        c"".as_ptr(),
                        owner,
                        owner,
                        libc::AT_EMPTY_PATH,
                    )
                } != 0
                {
                    return Err(Error::InWorkspace {
                        action: "chown",
                        path: so_far,
                        cause: std::io::Error::last_os_error(),
                    });
                }
                made
            }
            Err(e) => return Err(fail(&so_far, e)),
        };
    }
    Ok(dir)
}

fn path_cstring(path: &Path) -> Result<std::ffi::CString, Error> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidConfig(format!("{} contains a NUL byte", path.display())))
}

/// A user namespace mapping 0..count to base..base+count, held by an open descriptor: a child
/// unshares it, the parent writes the maps and opens it, and the child exits.
pub(crate) fn mapping_namespace(base: u32, count: u32) -> std::io::Result<OwnedFd> {
    use std::io::{Read, Write};
    let (mut ready_r, mut ready_w) = std::io::pipe()?;
    let (mut done_r, mut done_w) = std::io::pipe()?;
    // SAFETY: the child only calls unshare, read, write and _exit (async-signal-safe), so it
    // is sound even if the caller has other threads.
    match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            drop((ready_r, done_w));
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = ready_w.write_all(&[u8::from(ok)]);
            let _ = done_r.read(&mut [0u8; 1]);
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop((ready_w, done_r));
            let result = (|| {
                let mut ok = [0u8; 1];
                ready_r.read_exact(&mut ok)?;
                if ok[0] != 1 {
                    return Err(std::io::Error::other("unshare(CLONE_NEWUSER) failed"));
                }
                let proc = format!("/proc/{child}");
                let map = format!("0 {base} {count}\n");
                std::fs::write(format!("{proc}/uid_map"), &map)?;
                std::fs::write(format!("{proc}/setgroups"), "deny")?;
                std::fs::write(format!("{proc}/gid_map"), &map)?;
                std::fs::File::open(format!("{proc}/ns/user")).map(OwnedFd::from)
            })();
            let _ = done_w.write_all(b"x");
            let _ = nix::sys::wait::waitpid(child, None);
            result
        }
    }
}

/// Detaches everything mounted at or under `path` (lazily, so a busy mount cannot block a
/// stop); returns the mount points that could not be detached.
pub(crate) fn unmount_all(path: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    for m in mounts_under(path) {
        if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
            failed.push(format!("mount {} ({e})", m.display()));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_made_inside_the_tree_whatever_its_symlinks_say() {
        use std::os::fd::AsFd as _;
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let Ok(tree) = tempfile::tempdir() else {
            return;
        };
        let t = tree.path();
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(t.join("usr/lib"))?;
            // Absolute symlinks, as a tenant makes them: one to a folder, one to nothing.
            std::os::unix::fs::symlink("/usr/lib", t.join("lib"))?;
            std::os::unix::fs::symlink("/warren-test-nowhere/x", t.join("usr/lib/modules"))
        })();
        assert!(made.is_ok(), "{made:?}");
        let root = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(t);
        let Ok(root) = root else {
            panic!("cannot open the tree")
        };
        let opened = open_or_make_in_root(root.as_fd(), "lib/modules/6.1.0", 4242);
        assert!(opened.is_ok(), "{opened:?}");
        let inside = t.join("warren-test-nowhere/x/6.1.0");
        assert!(
            inside.is_dir(),
            "made where the symlink leads, inside the tree"
        );
        assert!(
            !Path::new("/warren-test-nowhere").exists(),
            "nothing made outside the tree"
        );
        assert_eq!(std::fs::metadata(&inside).map(|m| m.uid()).ok(), Some(4242));
    }
}
