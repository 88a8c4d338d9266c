//! The guest kernel (Debian's `linux-image-*-amd64`, unpacked: `boot/vmlinuz-*` and
//! `lib/modules/<version>/`) and the initramfs a VM boots from: `warren-guest` as `/init`, the
//! modules it loads (every virtio driver is a module in Debian's kernels), and its settings.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use warren_guest::modules::Index;
use warren_guest::proto::{CONFIG_PATH, GuestConfig, MODULE_INDEX, MODULE_LIST};

use crate::Error;

/// The modules every VM workspace loads at boot, by name (their dependencies come along; one
/// the kernel has built in is skipped).
pub const BOOT_MODULES: [&str; 6] = [
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_balloon",
    // The scratch disk is mounted before modules load on demand (from the root's
    // /lib/modules): ext4 and the checksum it asks the kernel for by name.
    "ext4",
    "crc32c_generic",
];

/// And those of a VM whose tree and agent go through vhost-user daemons.
pub const VHOST_USER_MODULES: [&str; 2] = ["vmw_vsock_virtio_transport", "virtiofs"];

/// And those of a VM whose tree QEMU serves itself (9p).
pub const IN_QEMU_MODULES: [&str; 2] = ["9p", "9pnet_virtio"];

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    pub modules: PathBuf,
}

impl GuestKernel {
    /// Finds the kernel and its modules under `root` (where the package was unpacked).
    pub fn find(root: &Path) -> Result<Self, Error> {
        let missing = |what: &str| {
            Error::InvalidConfig(format!(
                "no guest kernel in {}: {what} is missing (unpack Debian's linux-image-amd64 there; `./dev vm` does)",
                root.display()
            ))
        };
        let first = |dir: &Path, prefix: &str| -> Option<PathBuf> {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
                .collect();
            found.sort();
            found.pop()
        };
        let vmlinuz =
            first(&root.join("boot"), "vmlinuz-").ok_or_else(|| missing("boot/vmlinuz-*"))?;
        let version = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_owned();
        let modules = root.join("lib/modules").join(&version);
        if !modules.is_dir() {
            return Err(missing(&format!("lib/modules/{version}")));
        }
        Ok(Self { vmlinuz, modules })
    }

    /// The image QEMU boots. Debian's generic kernel is an XZ-compressed bzImage whose
    /// decompression takes seconds under TCG, so when the kernel can boot as an ELF (its config
    /// has `CONFIG_PVH=y`) its payload is unpacked once (`xz`) into `cache_dir` and booted
    /// directly; any other image boots as it is.
    pub fn boot_image(&self, cache_dir: &Path) -> Result<PathBuf, Error> {
        const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
        let file_name = self
            .vmlinuz
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let config = self
            .vmlinuz
            .with_file_name(file_name.replacen("vmlinuz-", "config-", 1));
        let pvh =
            std::fs::read_to_string(&config).is_ok_and(|c| c.lines().any(|l| l == "CONFIG_PVH=y"));
        let bytes =
            std::fs::read(&self.vmlinuz).map_err(Error::io("cannot read", &self.vmlinuz))?;
        let Some(payload) = bytes.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC) else {
            return Ok(self.vmlinuz.clone());
        };
        if !pvh {
            return Ok(self.vmlinuz.clone());
        }
        let unpacked = cache_dir.join(format!(
            "{}.{}.vmlinux",
            file_name.replacen("vmlinuz-", "", 1),
            bytes.len()
        ));
        if unpacked.exists() {
            return Ok(unpacked);
        }
        let tmp = unpacked.with_extension(format!("tmp{}", std::process::id()));
        let out = File::create(&tmp).map_err(Error::io("cannot create", &tmp))?;
        let mut xz = Command::new("xz")
            .args(["--decompress", "--stdout", "--single-stream"])
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io("cannot run (install xz-utils)", "xz"))?;
        let mut stdin = xz.stdin.take().expect("piped");
        // xz stops reading at the end of the stream; what follows in the image is not its.
        let _ = stdin.write_all(&bytes[payload..]);
        drop(stdin);
        let done = xz
            .wait_with_output()
            .map_err(Error::io("cannot run", "xz"))?;
        let mut head = [0u8; 4];
        let is_elf = File::open(&tmp)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head == *b"\x7fELF";
        if !done.status.success() || !is_elf {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Command {
                command: format!("xz -d {}", self.vmlinuz.display()),
                stderr: String::from_utf8_lossy(&done.stderr).trim().to_owned(),
            });
        }
        std::fs::rename(&tmp, &unpacked).map_err(Error::io("cannot rename", &tmp))?;
        Ok(unpacked)
    }

    /// The module files for `names`, each after its dependencies, from the kernel's index
    /// (`module_index`).
    pub fn module_files(&self, index: &str, names: &[&str]) -> Result<Vec<PathBuf>, Error> {
        let index = Index::parse(index);
        let builtin =
            std::fs::read_to_string(self.modules.join("modules.builtin")).unwrap_or_default();
        let is_builtin = |name: &str| {
            builtin.lines().any(|l| {
                l.rsplit('/')
                    .next()
                    .and_then(|f| f.strip_suffix(".ko"))
                    .is_some_and(|f| f.replace('-', "_") == name)
            })
        };
        let mut out: Vec<PathBuf> = Vec::new();
        for name in names {
            if is_builtin(name) {
                continue;
            }
            let found = index.resolve(name).ok_or_else(|| {
                Error::InvalidConfig(format!("the guest kernel has no module {name}"))
            })?;
            for relative in index.load_order(&found) {
                let path = self.modules.join(relative);
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
        Ok(out)
    }
}

/// Every module of the kernel in the guest's index format (see `warren_guest::modules`):
/// `m NAME RELATIVE/PATH.ko DEP,DEP` and `a ALIAS-PATTERN NAME` lines, read from each module's
/// `.modinfo` (the package ships no `modules.dep`; the host may have no `depmod`). Cached in
/// `cache` (keyed by the modules folder), since it reads every module file.
pub fn module_index(kernel: &GuestKernel, cache: &Path) -> Result<String, Error> {
    let key = format!("# {}\n", kernel.modules.display());
    if let Ok(text) = std::fs::read_to_string(cache)
        && text.starts_with(&key)
    {
        return Ok(text);
    }
    let mut out = key;
    let mut stack = vec![kernel.modules.clone()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
                .map(|n| n.replace('-', "_"))
            else {
                continue;
            };
            let Ok(relative) = path.strip_prefix(&kernel.modules) else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(Error::io("cannot read", &path))?;
            let field = |key: &[u8]| -> Vec<String> {
                let mut values = Vec::new();
                let mut at = 0;
                while let Some(found) = bytes[at..].windows(key.len()).position(|w| w == key) {
                    let start = at + found + key.len();
                    // modinfo entries are NUL-separated `key=value` strings.
                    if at + found == 0 || bytes[at + found - 1] == 0 {
                        let end = bytes[start..]
                            .iter()
                            .position(|&b| b == 0)
                            .map_or(bytes.len(), |e| start + e);
                        values.push(String::from_utf8_lossy(&bytes[start..end]).into_owned());
                    }
                    at = start;
                }
                values
            };
            let depends = field(b"depends=").into_iter().next().unwrap_or_default();
            out.push_str(&format!(
                "m {name} {} {}\n",
                relative.display(),
                if depends.is_empty() { "-" } else { &depends }
            ));
            for alias in field(b"alias=") {
                if !alias.contains(char::is_whitespace) {
                    out.push_str(&format!("a {alias} {name}\n"));
                }
            }
        }
    }
    let tmp = cache.with_extension("tmp");
    std::fs::write(&tmp, &out).map_err(Error::io("cannot write", &tmp))?;
    std::fs::rename(&tmp, cache).map_err(Error::io("cannot replace", cache))?;
    Ok(out)
}

/// The initramfs of a VM: the guest as `/init`, `modules` (loaded in order) and `config`.
pub fn guest_initramfs(
    guest: &Path,
    modules: &[PathBuf],
    index: Option<&str>,
    config: &GuestConfig,
) -> Result<Vec<u8>, Error> {
    let init = std::fs::read(guest).map_err(Error::io("cannot read the guest agent", guest))?;
    let mut files: Vec<(String, u32, Vec<u8>)> = vec![("init".into(), 0o755, init)];
    let mut list = String::new();
    for module in modules {
        let name = format!(
            "lib/warren/modules.d/{}",
            module.file_name().unwrap_or_default().to_string_lossy()
        );
        list.push_str(&format!("/{name}\n"));
        files.push((
            name,
            0o644,
            std::fs::read(module).map_err(Error::io("cannot read", module))?,
        ));
    }
    files.push((
        MODULE_LIST.trim_start_matches('/').into(),
        0o644,
        list.into_bytes(),
    ));
    if let Some(index) = index {
        files.push((
            MODULE_INDEX.trim_start_matches('/').into(),
            0o644,
            index.as_bytes().to_vec(),
        ));
    }
    files.push((
        CONFIG_PATH.trim_start_matches('/').into(),
        0o600,
        serde_json::to_vec(config).map_err(Error::encode("the guest's settings"))?,
    ));
    Ok(newc_archive(&files))
}

/// A `newc` cpio archive (the initramfs format) of `files`: (path inside, mode, content);
/// folders are made for every parent.
pub fn newc_archive<S: AsRef<str>>(files: &[(S, u32, Vec<u8>)]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path.as_ref()).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut ino = 1;
    for d in &dirs {
        entry(&mut out, ino, d, 0o040755, &[]);
        ino += 1;
    }
    for (path, mode, data) in files {
        entry(&mut out, ino, path.as_ref(), 0o100000 | mode, data);
        ino += 1;
    }
    entry(&mut out, ino, "TRAILER!!!", 0, &[]);
    out
}
