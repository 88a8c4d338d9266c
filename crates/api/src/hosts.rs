//! Hosts, their agents' logs, and jobs.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: String,
    pub name: String,
    pub workspaces: i64,
    pub last_seen_at: Option<i64>,
    /// Its 1-minute load average, CPUs and memory at its last report (absent before one).
    #[serde(default)]
    pub load1: Option<f64>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub memory_total: Option<u64>,
    #[serde(default)]
    pub memory_available: Option<u64>,
    /// It takes no new workspaces (`host drain`).
    #[serde(default)]
    pub draining: bool,
}

/// Where a workspace is to move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The host's name.
    pub host: String,
}

/// A drained host's workspaces: those on their way elsewhere, and those that could not go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrainAnswer {
    pub moving: Vec<DrainMove>,
    pub refused: Vec<DrainRefusal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrainMove {
    pub workspace: String,
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrainRefusal {
    pub workspace: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHost {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    pub job: String,
    pub text: String,
}

/// The server replicas a host keeps a tunnel to (besides the one it was given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentServers {
    /// Their URLs (`--advertise-url`), the newest first.
    pub servers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogAnswer {
    /// `false` once the job was cancelled: the agent stops it.
    pub go_on: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct JobView {
    pub id: String,
    pub kind: String,
    pub workspace: Option<String>,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// A registered host: its agent's token is shown this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewHostAnswer {
    pub id: String,
    pub name: String,
    /// The agent's token (`wrh_...`): `WARREN_HOST_TOKEN` for `warren agent`.
    pub token: String,
    /// The fingerprint of the certificate the server serves HTTPS with, when it does itself:
    /// `warren agent --server-fingerprint`.
    #[serde(default)]
    pub server_fingerprint: Option<String>,
}
