//! Workspace runtimes: the [`Runtime`] trait every backend implements, and the system-container
//! backend ([`ContainerRuntime`]).
//!
//! A container workspace is run by a small single-threaded supervisor process, the shim
//! (`shim.rs`), one per workspace. The shim mounts the workspace's tree (the lazy image or a
//! folder, under an overlay whose upper layer is the workspace's writable layer), creates the
//! container with youki's `libcontainer` (it forks, so it never runs inside a multithreaded
//! process), wires its network, and then serves exec, status and stop requests on a unix socket.
//! Workspaces keep running when the process that started them exits; any later process finds
//! them again through their sockets.
//!
//! This crate does not own images (`warren-store`, `warren-lazyfs`) or desired state (the
//! agent): it turns one workspace record into running processes and back.

mod backend;
mod cgroup;
mod container;
mod disk;
mod error;
mod exec;
pub mod image_mount;
pub mod image_sharing;
mod init;
pub mod net;
mod proto;
mod record;
mod seccomp;
mod shim;
mod slots;
mod spec;
mod sys;
pub mod tasks;
mod types;
pub mod vm;

pub use container::{ContainerRuntime, ContainerRuntimeConfig, NetworkConfig};
pub use disk::MIN_SIZE as MIN_DISK;
pub use error::Error;
pub use net::EgressPolicy;
pub use shim::run_shim;
pub use types::{
    DeleteReport, Exec, ExecIo, ExecRequest, ExitStatus, HOST_TENANT, Limits, Owner, Process,
    RootSource, Stats, VmOptions, VmStats, WinSize, WorkspaceConfig, WorkspaceId, WorkspaceInfo,
    WorkspaceSocket, WorkspaceState, WritableLayer,
};
pub use vm::{Accel, VmSettings};

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// What the agent, the SSH gateway and the CLI need from a workspace backend. Both backends
/// (system container, VM) implement it; every operation names the workspace by id and is safe
/// to repeat.
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// Records a new workspace and reserves what it needs (uid range, address); starts nothing.
    fn create(&self, config: &WorkspaceConfig) -> Result<WorkspaceInfo, Error>;
    /// Starts a created or stopped workspace; does nothing if it runs already.
    fn start(&self, id: &WorkspaceId) -> Result<(), Error>;
    /// Runs a process inside a running workspace.
    fn exec(&self, id: &WorkspaceId, request: &ExecRequest) -> Result<Exec, Error>;
    /// Opens a TCP connection from inside the workspace's network (port forwarding): a
    /// loopback address is the workspace's own loopback.
    fn connect(&self, id: &WorkspaceId, to: SocketAddr) -> Result<TcpStream, Error>;
    /// The workspace's task folder on the host (kept across stops, removed on delete); see
    /// [`tasks`].
    fn tasks_dir(&self, id: &WorkspaceId) -> Result<std::path::PathBuf, Error>;
    /// Runs the workspace's tasks (see [`tasks`]) in the background, in persistent terminals;
    /// does nothing while the tasks of this start run already.
    fn start_tasks(&self, id: &WorkspaceId, tasks: &[tasks::TaskSpec]) -> Result<(), Error>;
    /// Listens on a fresh unix socket inside a running workspace, owned by `user` (a name or
    /// uid in the workspace; root when absent) and reachable by nobody else there.
    fn listen_unix(&self, id: &WorkspaceId, user: Option<&str>) -> Result<WorkspaceSocket, Error>;
    /// Stops the workspace: SIGTERM to everything in it, SIGKILL after `grace`. The writable
    /// layer is kept. Does nothing if it is stopped.
    fn stop(&self, id: &WorkspaceId, grace: Duration) -> Result<(), Error>;
    /// Stops (without grace) and removes the workspace and everything made for it; reports
    /// what could not be removed.
    fn delete(&self, id: &WorkspaceId) -> Result<DeleteReport, Error>;
    /// Resource use of a running workspace.
    fn stats(&self, id: &WorkspaceId) -> Result<Stats, Error>;
    /// Resource use without the writable layer's size (`disk_bytes` is 0: measuring it walks
    /// the layer, slow when it is large): cheap enough to ask every few seconds.
    fn live_stats(&self, id: &WorkspaceId) -> Result<Stats, Error> {
        self.stats(id)
    }
    /// One workspace's record and state.
    fn info(&self, id: &WorkspaceId) -> Result<WorkspaceInfo, Error>;
    /// Every workspace this runtime knows, running or not.
    fn list(&self) -> Result<Vec<WorkspaceInfo>, Error>;
    /// Kills every process of a running workspace but its init, and returns once none is
    /// left: nothing of the workspace runs while the host then reads its files (a build step's
    /// commit), as when Docker ends a RUN step's container.
    fn quiesce(&self, id: &WorkspaceId) -> Result<(), Error> {
        let _ = id;
        Ok(())
    }
    /// Freezes every process of a running workspace (`true`: none runs, its files hold still)
    /// or thaws them; see [`Frozen`].
    fn freeze(&self, id: &WorkspaceId, frozen: bool) -> Result<(), Error> {
        let _ = (id, frozen);
        Err(Error::NotForBackend(
            "this runtime does not freeze workspaces",
        ))
    }
    /// Where this runtime's workspaces may not go; what the host fetches on their behalf
    /// (`ADD <url>`) is held to the same policy.
    fn egress(&self) -> net::EgressPolicy {
        net::EgressPolicy::default()
    }
    /// The most a workspace of this host may write (`None`: no limit), which a workspace's own
    /// disk request may not pass.
    fn disk_ceiling(&self) -> Option<u64> {
        None
    }
    /// The workspace's writable layer as a folder on the host, for storing only what changed
    /// over its image (`None` when the backend has no such folder).
    fn writable_layer(&self, id: &WorkspaceId) -> Result<Option<WritableLayer>, Error> {
        let _ = id;
        Ok(None)
    }
}

/// A running workspace held frozen until this is dropped (then thawed): a consistent copy of
/// its writable layer is read meanwhile.
pub struct Frozen<'a> {
    runtime: &'a dyn Runtime,
    id: &'a WorkspaceId,
}

impl<'a> Frozen<'a> {
    /// Freezes the workspace; a freeze that fails part way is undone by the runtime.
    pub fn hold(runtime: &'a dyn Runtime, id: &'a WorkspaceId) -> Result<Self, Error> {
        runtime.freeze(id, true)?;
        Ok(Self { runtime, id })
    }
}

impl std::fmt::Debug for Frozen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen").field("id", &self.id).finish()
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.runtime.freeze(self.id, false) {
            tracing::warn!(workspace = %self.id, error = %e, "cannot thaw a workspace");
        }
    }
}

/// Removes every sandbox whose owning process is gone (a build or prebuild killed before it
/// could clean up); returns their names. Workspaces, which have no owner, are never touched,
/// nor is a sandbox whose owner still runs.
pub fn reap_orphans(runtime: &dyn Runtime) -> Vec<String> {
    match runtime.list() {
        Ok(listed) => reap_orphans_among(runtime, &listed),
        Err(_) => Vec::new(),
    }
}

/// [`reap_orphans`] over a listing the caller already has.
pub fn reap_orphans_among(runtime: &dyn Runtime, listed: &[WorkspaceInfo]) -> Vec<String> {
    let orphaned = |info: &WorkspaceInfo| {
        info.config
            .owner
            .as_ref()
            .is_some_and(|owner| !owner.is_alive())
    };
    let mut reaped = Vec::new();
    for info in listed.iter().filter(|i| orphaned(i)) {
        let id = &info.config.id;
        // Asked again just before: a sandbox of the same name may have been made anew.
        if !runtime.info(id).is_ok_and(|now| orphaned(&now)) {
            continue;
        }
        match runtime.delete(id) {
            Ok(_) | Err(Error::NotFound(_)) => reaped.push(id.to_string()),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "cannot remove an orphaned sandbox")
            }
        }
    }
    reaped
}
