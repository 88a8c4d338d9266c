//! A workspace's record on disk and the layout of its folder. The record holds everything the
//! shim needs, so a shim started by any later process (or after a host restart) needs no other
//! input.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, WorkspaceConfig};

/// Size of every workspace's uid and gid range: a full 16-bit range, so that nested containers
/// (Docker inside) find the ids they expect.
pub(crate) const ID_RANGE: u32 = 65536;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkspaceRecord {
    pub config: WorkspaceConfig,
    pub slot: u32,
    pub uid_base: u32,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    pub nameservers: Vec<Ipv4Addr>,
    /// Warren's data folder (images and the chunk cache), for lazy image mounts.
    pub data: PathBuf,
    /// The `warren` executable that serves lazy image mounts.
    pub helper: PathBuf,
    /// libcontainer's state folder (shared by all workspaces of the host).
    pub containers: PathBuf,
    /// What a VM workspace boots from; `None` for a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vm::VmRecord>,
    /// Where the host's shared image mounts live, when this start shares one (decided by the
    /// runtime at each start, never stored).
    #[serde(skip)]
    pub shared_mounts: Option<PathBuf>,
    /// Every file of its image read through the mount, never from a whole-file copy
    /// (`--no-passthrough`; decided by the runtime at each start, never stored).
    #[serde(skip)]
    pub no_passthrough: bool,
}

impl WorkspaceRecord {
    /// The host-side veth name: short (at most 15 bytes) and unique on the host, also among
    /// several runtimes (each with its own data folder and bridge): it is named by the
    /// workspace's uid range, which no two workspaces on a host may share.
    pub(crate) fn veth(&self) -> String {
        format!("wv{:x}", self.uid_base >> 16)
    }

    /// libcontainer's id and the cgroup's name.
    pub(crate) fn container_id(&self) -> String {
        format!("warren-{}", self.config.id)
    }

    /// Cgroups are host-wide: named by the uid range too, so two runtimes on a host (each with
    /// its own data folder) never share one for workspaces of the same name.
    pub(crate) fn cgroup_path(&self) -> PathBuf {
        PathBuf::from("/warren").join(format!(
            "{}-{:x}",
            self.config.id.as_str(),
            self.uid_base >> 16
        ))
    }

    pub(crate) fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(Error::io("cannot read", path))?;
        serde_json::from_slice(&bytes).map_err(|cause| Error::Damaged {
            path: path.to_owned(),
            cause,
        })
    }

    pub(crate) fn save(&self, path: &Path) -> Result<(), Error> {
        let tmp = path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec_pretty(self).map_err(Error::encode("the workspace record"))?;
        std::fs::write(&tmp, bytes).map_err(Error::io("cannot write", &tmp))?;
        std::fs::rename(&tmp, path).map_err(Error::io("cannot replace", path))
    }
}

/// The folder of one workspace, `<runtime>/workspaces/<id>/`.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub(crate) fn record(&self) -> PathBuf {
        self.dir.join("workspace.json")
    }
    /// Where what the workspace writes is kept: its own filesystem when it has a disk limit
    /// (see [`crate::disk`]), else its folder.
    fn writable(&self) -> PathBuf {
        if crate::disk::limited(&self.dir) {
            crate::disk::mount_point(&self.dir)
        } else {
            self.dir.clone()
        }
    }
    /// The writable layer (overlay upper); kept across stop and start.
    pub(crate) fn upper(&self) -> PathBuf {
        self.writable().join("upper")
    }
    pub(crate) fn work(&self) -> PathBuf {
        self.writable().join("work")
    }
    /// Where the read-only tree is mounted (lazy image or idmapped folder).
    pub(crate) fn lower(&self) -> PathBuf {
        self.dir.join("lower")
    }
    /// The overlay: the workspace's root.
    pub(crate) fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub(crate) fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    /// resolv.conf, hosts and hostname, bind-mounted into `/etc`.
    pub(crate) fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }
    /// Bind-mounted at `/var/lib/docker`: a nested engine cannot keep its overlays on an overlay.
    pub(crate) fn docker(&self) -> PathBuf {
        self.writable().join("docker")
    }
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("shim.sock")
    }
    pub(crate) fn shim_lock(&self) -> PathBuf {
        self.dir.join("shim.lock")
    }
    /// There while the workspace is frozen for a save (`Runtime::freeze`).
    pub(crate) fn frozen(&self) -> PathBuf {
        self.dir.join("frozen")
    }
    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
}
