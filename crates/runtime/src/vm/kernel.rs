//! The guest kernel (Debian's `linux-image-*-cloud-amd64`, unpacked: `boot/vmlinuz-*` and
//! `lib/modules/<version>/`) and the initramfs a VM boots from: `warren-guest` as `/init`, the
//! modules it loads (every virtio driver is a module in Debian's kernels), and its settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use warren_guest::proto::{CONFIG_PATH, GuestConfig, MODULE_LIST};

use crate::Error;

/// The modules a VM workspace loads at boot, by name (their dependencies come along).
pub const BOOT_MODULES: [&str; 6] = [
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_balloon",
];

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
                "no guest kernel in {}: {what} is missing (unpack Debian's linux-image-cloud-amd64 there; `./dev up` does)",
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

    /// The module files for `names`, each after its dependencies (read from the module's
    /// `.modinfo` `depends=` entry).
    pub fn module_files(&self, names: &[&str]) -> Result<Vec<PathBuf>, Error> {
        let mut by_name = HashMap::new();
        let mut stack = vec![self.modules.clone()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".ko"))
                {
                    by_name.insert(name.replace('-', "_"), path);
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            add_module(name, &by_name, &mut out, 0)?;
        }
        Ok(out)
    }
}

fn add_module(
    name: &str,
    by_name: &HashMap<String, PathBuf>,
    out: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<(), Error> {
    let path = by_name
        .get(&name.replace('-', "_"))
        .ok_or_else(|| Error::InvalidConfig(format!("the guest kernel has no module {name}")))?;
    if out.contains(path) || depth > 32 {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(Error::io("cannot read", path))?;
    let needle = b"depends=";
    if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
        let rest = &bytes[at + needle.len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
        let deps = String::from_utf8_lossy(&rest[..end]).into_owned();
        for dep in deps.split(',').filter(|d| !d.is_empty()) {
            add_module(dep, by_name, out, depth + 1)?;
        }
    }
    if !out.contains(path) {
        out.push(path.clone());
    }
    Ok(())
}

/// The initramfs of a VM: the guest as `/init`, `modules` (loaded in order) and `config`.
pub fn guest_initramfs(
    guest: &Path,
    modules: &[PathBuf],
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
    files.push((
        CONFIG_PATH.trim_start_matches('/').into(),
        0o600,
        serde_json::to_vec(config).map_err(|e| Error::Sys(e.to_string()))?,
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
