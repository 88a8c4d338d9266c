//! The VM backend: a workspace is a QEMU guest whose agent (`warren-guest`) runs its
//! processes, connections and sockets over vsock; its use is QEMU's as the host sees it and
//! the guest's as its agent reports.

use std::net::{SocketAddr, TcpStream};

use serde_json::json;

use super::{Backend, Found};
use crate::vm::{self, VmFiles};
use crate::{Error, Exec, ExecRequest, Stats, WorkspaceSocket};

#[derive(Debug)]
pub(crate) struct Vm;

impl Backend for Vm {
    fn exec(&self, ws: &Found<'_>, request: &ExecRequest) -> Result<Exec, Error> {
        let (id, rec, layout) = (ws.id, ws.rec, ws.layout);
        if crate::container::status(layout).is_none() {
            return Err(Error::NotRunning(id.to_string()));
        }
        let env = crate::exec::merge_env(&[
            &[crate::spec::DEFAULT_PATH.to_owned()],
            &rec.config.env,
            &request.env,
        ])
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
        vm::client::exec(&VmFiles::of(layout).agent_addr()?, request, env).map_err(|e| match e {
            Error::Exec { .. } => e,
            other => Error::Shim {
                id: id.to_string(),
                message: other.to_string(),
            },
        })
    }

    fn connect(&self, ws: &Found<'_>, to: SocketAddr) -> Result<TcpStream, Error> {
        let (id, layout) = (ws.id, ws.layout);
        vm::client::connect(&VmFiles::of(layout).agent_addr()?, to).map_err(|e| Error::Shim {
            id: id.to_string(),
            message: format!("cannot connect to {to} ({e})"),
        })
    }

    fn listen_unix(&self, ws: &Found<'_>, user: Option<&str>) -> Result<WorkspaceSocket, Error> {
        let layout = ws.layout;
        let relay = layout.dir.join(format!(
            "{}.sock",
            warren_guest::accounts::agent_folder_name()
        ));
        vm::client::listen_unix(&VmFiles::of(layout).agent_addr()?, user, &relay)
    }

    fn live_stats(&self, ws: &Found<'_>) -> Result<Stats, Error> {
        let (rec, layout, pid) = (ws.rec, ws.layout, ws.pid()?);
        // What the host pays for the VM (QEMU's resident memory and CPU time), and what the
        // guest runs.
        let files = VmFiles::of(layout);
        let guest = files
            .agent_addr()
            .and_then(|agent| vm::client::stats(&agent))
            .unwrap_or_default();
        let (guest_total, guest_free, guest_available) =
            vm::qmp::balloon_stats(&files.qmp()).unwrap_or_default();
        Ok(Stats {
            cpu_ns: vm::cpu_ns_of(pid),
            memory_bytes: vm::rss_of(pid),
            memory_limit: Some(vm::memory_of(rec)),
            pids: guest.tasks,
            pids_limit: None,
            disk_bytes: 0,
            vm: Some(crate::VmStats {
                accel: files.read_accel().unwrap_or_default(),
                guest_total,
                guest_free,
                guest_available,
            }),
        })
    }

    fn quiesce(&self, _ws: &Found<'_>) -> Result<(), Error> {
        Err(Error::NotForBackend(
            "a VM workspace cannot be quiesced from the host",
        ))
    }

    /// Pauses the guest's CPUs (QMP `stop`) or resumes them; before a pause, what the guest's
    /// page cache holds is written through to the shared tree (its agent's `Sync`). A guest
    /// that does not answer that within 30 s is paused as it is: the tree is then as a power
    /// cut would leave it.
    fn freeze(&self, ws: &Found<'_>, frozen: bool) -> Result<(), Error> {
        let files = VmFiles::of(ws.layout);
        if frozen
            && let Err(e) = files
                .agent_addr()
                .and_then(|agent| vm::client::sync(&agent))
        {
            tracing::warn!(workspace = %ws.id, error = %e, "the guest did not sync: pausing it as it is");
        }
        let command = if frozen { "stop" } else { "cont" };
        vm::qmp::Qmp::connect(&files.qmp())?.execute(command, json!({}))?;
        Ok(())
    }
}
