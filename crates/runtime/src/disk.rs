//! A workspace's disk limit. Its writable layer, the overlay's work folder and its nested
//! engine's folder live on a filesystem of their own: ext4 in a sparse file of the limit's size
//! (`disk.img` in the workspace's folder), attached to a loop device and mounted at `disk/`
//! from create to delete. A workspace that fills it gets ENOSPC; the host's disk and the other
//! workspaces do not notice. The file takes only what is written (and gives back what is
//! deleted: the filesystem is mounted with `discard`, which punches holes in it).

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::Error;

/// The file holding a limited workspace's filesystem, in its folder.
pub(crate) const IMAGE: &str = "disk.img";
/// Where that filesystem is mounted, in its folder.
pub(crate) const MOUNT: &str = "disk";
/// The smallest limit: ext4 with a journal needs room for its own metadata.
pub const MIN_SIZE: u64 = warren_protocol::MIN_DISK;

pub(crate) fn image(dir: &Path) -> PathBuf {
    dir.join(IMAGE)
}

pub(crate) fn mount_point(dir: &Path) -> PathBuf {
    dir.join(MOUNT)
}

/// Whether the workspace in `dir` has a disk limit.
pub(crate) fn limited(dir: &Path) -> bool {
    image(dir).exists()
}

/// Makes the workspace's filesystem (`size` bytes; its root folder the host root's, holding
/// the folders the workspace writes to, which the caller makes), then mounts it.
pub(crate) fn create(dir: &Path, size: u64) -> Result<(), Error> {
    if size < MIN_SIZE {
        return Err(Error::InvalidConfig(format!(
            "a disk limit is at least {} MiB, not {size} bytes",
            MIN_SIZE >> 20
        )));
    }
    let path = image(dir);
    // Only root reads it: it holds every file of the workspace, whatever their modes inside.
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(Error::io("cannot create", &path))?;
    file.set_len(size)
        .map_err(Error::io("cannot size", &path))?;
    drop(file);
    crate::sys::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E"])
            .arg("root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard")
            .arg(&path),
    )?;
    ensure_mounted(dir)
}

/// Mounts the workspace's filesystem at `disk/` unless it is mounted (after a reboot it is
/// not); nothing for a workspace without a limit.
pub(crate) fn ensure_mounted(dir: &Path) -> Result<(), Error> {
    let path = image(dir);
    if !path.exists() {
        return Ok(());
    }
    // One mount at a time (the shim at start, the runtime for a commit): two loop devices over
    // one file, both mounted, would corrupt it.
    let lock = File::open(&path).map_err(Error::io("cannot open", &path))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Io {
            what: "cannot lock",
            path: path.clone(),
            cause: e.into(),
        })
        .and_then(|_held| mount_unlocked(&path, &mount_point(dir)))
}

fn mount_unlocked(path: &Path, target: &Path) -> Result<(), Error> {
    if crate::sys::is_mounted(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(Error::io("cannot create", target))?;
    // Held open until mounted: a loop device that detaches itself does so at its last close.
    let (device, _held) = attach(path)?;
    // nodev: nothing on it opens a device. The loop device detaches itself when unmounted.
    mount(
        Some(device.as_path()),
        target,
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        Some("discard"),
    )
    .map_err(|e| Error::Io {
        what: "cannot mount the workspace's filesystem at",
        path: target.to_owned(),
        cause: e.into(),
    })
}

/// Unmounts the workspace's filesystem (before its folder is deleted).
pub(crate) fn unmount(dir: &Path) -> Result<(), Error> {
    let target = mount_point(dir);
    if !crate::sys::is_mounted(&target) {
        return Ok(());
    }
    umount2(&target, MntFlags::empty()).map_err(|e| Error::Io {
        what: "cannot unmount the workspace's filesystem at",
        path: target,
        cause: e.into(),
    })
}

// The loop device interface of <linux/loop.h>, which the libc crate does not carry.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches `file` to a free loop device, which detaches itself once unmounted (or once the
/// returned descriptor closes, if it was never mounted); its path and that descriptor.
fn attach(file: &Path) -> Result<(PathBuf, File), Error> {
    let backing = File::options()
        .read(true)
        .write(true)
        .open(file)
        .map_err(Error::io("cannot open", file))?;
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(Error::io("cannot open", "/dev/loop-control"))?;
    // Another process may take the free device first: then ask again.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(Error::Os {
                call: "LOOP_CTL_GET_FREE (no free loop device)",
                cause: std::io::Error::last_os_error(),
            });
        }
        let device = PathBuf::from(format!("/dev/loop{n}"));
        let loop_file = File::options()
            .read(true)
            .write(true)
            .open(&device)
            .map_err(Error::io("cannot open", &device))?;
        let mut config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = file.as_os_str().as_encoded_bytes();
        let len = name.len().min(63);
        config.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` lays out.
        let done = unsafe { libc::ioctl(loop_file.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if done == 0 {
            return Ok((device, loop_file));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(Error::LoopDevice {
                file: file.to_owned(),
                cause: err,
            });
        }
    }
    Err(Error::LoopDevice {
        file: file.to_owned(),
        cause: std::io::Error::other("every free loop device was taken first"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_structs_are_laid_out_as_the_kernel_reads_them() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
