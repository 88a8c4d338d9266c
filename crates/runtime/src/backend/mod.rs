//! What differs between a system container and a VM, behind one small trait: the host runtime
//! ([`crate::ContainerRuntime`]) finds a workspace and picks its backend once per call
//! ([`of`]); each backend lives in its own module.

mod container;
mod vm;

use std::net::{SocketAddr, TcpStream};

use crate::record::{Layout, WorkspaceRecord};
use crate::{Error, Exec, ExecRequest, Stats, WorkspaceId, WorkspaceSocket};

/// A workspace the host runtime found: its record and folders, and init's pid when it runs.
#[derive(Debug)]
pub(crate) struct Found<'a> {
    pub id: &'a WorkspaceId,
    pub rec: &'a WorkspaceRecord,
    pub layout: &'a Layout,
    pub pid: Option<i32>,
}

impl Found<'_> {
    /// Init's pid (the running workspace's).
    pub fn pid(&self) -> Result<i32, Error> {
        self.pid
            .ok_or_else(|| Error::NotRunning(self.id.to_string()))
    }
}

/// How a backend reaches into a workspace.
pub(crate) trait Backend: Sync {
    /// Runs a process inside.
    fn exec(&self, ws: &Found<'_>, request: &ExecRequest) -> Result<Exec, Error>;
    /// Opens a TCP connection from inside (its network) to `to`.
    fn connect(&self, ws: &Found<'_>, to: SocketAddr) -> Result<TcpStream, Error>;
    /// A Unix socket inside, owned by `user`, whose connections the host accepts.
    fn listen_unix(&self, ws: &Found<'_>, user: Option<&str>) -> Result<WorkspaceSocket, Error>;
    /// CPU, memory and processes now (not disk).
    fn live_stats(&self, ws: &Found<'_>) -> Result<Stats, Error>;
    /// Ends every process but init.
    fn quiesce(&self, ws: &Found<'_>) -> Result<(), Error>;
    /// Freezes every process (`true`) or thaws them.
    fn freeze(&self, ws: &Found<'_>, frozen: bool) -> Result<(), Error>;
}

/// The backend of a workspace.
pub(crate) fn of(rec: &WorkspaceRecord) -> &'static dyn Backend {
    if rec.vm.is_some() {
        &vm::Vm
    } else {
        &container::Container
    }
}
