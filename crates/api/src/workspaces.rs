//! Workspaces, their commands and task logs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWorkspace {
    pub name: String,
    /// The image to start from; when absent, the newest succeeded prebuild of the project's
    /// branch.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub project: Option<String>,
    /// The branch whose prebuild to start from and check out (the project's default branch
    /// when absent).
    #[serde(default)]
    pub branch: Option<String>,
    /// Bytes.
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Bytes it may write (a container's writable layer and `/var/lib/docker`); when absent,
    /// the environment file's, else the host's default (`--workspace-disk`).
    #[serde(default)]
    pub disk: Option<u64>,
    /// The environment file whose workspace tasks run on each start.
    #[serde(default)]
    pub environment: Option<EnvironmentFile>,
    /// `container` or `vm`; when absent, the environment file's `runtime` (else a container).
    #[serde(default)]
    pub runtime: Option<String>,
    /// Seconds without use after which it is stopped (0: never); when absent, its project's,
    /// else its owner's, else the server's.
    #[serde(default)]
    pub idle_timeout: Option<u64>,
}

/// Who may reach a workspace's port through its preview URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PortAccess {
    /// Its owner only (signed in to the web UI): the default.
    Private,
    /// Anyone signed in to the web UI.
    Users,
    /// Anyone who has the URL.
    Public,
}

impl PortAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Users => "users",
            Self::Public => "public",
        }
    }
}

impl FromStr for PortAccess {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Private, Self::Users, Self::Public]
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A port of a workspace, as its preview URL serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PortView {
    pub port: u16,
    /// From the environment file (`ports`, devcontainer `portsAttributes`, Hocus ports).
    pub label: Option<String>,
    pub access: PortAccess,
    /// Its preview URL, when the server serves previews.
    pub url: Option<String>,
}

/// Who may reach a port (`PUT .../ports/{port}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortChange {
    pub access: PortAccess,
}

/// An idle timeout to set on a workspace, a project or yourself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdleTimeout {
    /// Seconds without use after which a workspace is stopped: 0 is never; `null` leaves it to
    /// the next level (workspace, then project, then user, then the server).
    pub seconds: Option<u64>,
}

/// An environment file, as found in a repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentFile {
    /// Its name in the repository (`hocus.yml`, `.devcontainer/devcontainer.json`, ...).
    pub file: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceView {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub project: Option<String>,
    pub image: String,
    pub host: String,
    pub state: WorkspaceState,
    pub desired: Desired,
    pub last_error: Option<String>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    /// Bytes it may write (absent: the host's default).
    pub disk: Option<u64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Resource use as its host last reported it (cpu_ns, memory_bytes, pids, disk_bytes, ...),
    /// while it runs.
    pub stats: Option<serde_json::Value>,
    pub stats_at: Option<i64>,
    /// Who sessions, commands and tasks run as inside (root when absent).
    pub user: Option<String>,
    /// Where sessions, commands and editors land: the project's checkout (absent: the user's
    /// home).
    #[serde(default)]
    pub folder: Option<String>,
    /// The prebuild it was made from, and the branch it is on.
    pub prebuild: Option<String>,
    pub branch: Option<String>,
    /// Commits the branch's head has that the prebuild lacks.
    pub behind: Option<u64>,
    /// `container` or `vm`.
    pub runtime: String,
    /// How a running VM is accelerated (`kvm`, or `tcg` where the host's KVM cannot run it),
    /// as its host last reported.
    pub accel: Option<String>,
    /// Seconds without use after which it is stopped (0: never), and where that was set:
    /// `workspace`, `project`, `user` or `server`.
    pub idle_timeout: u64,
    pub idle_timeout_from: String,
    /// When it was last used (ms): an SSH channel, a command, a preview.
    pub last_active_at: Option<i64>,
    /// Why Warren stopped it by itself (an idle stop); cleared by the next start or stop.
    pub stop_reason: Option<String>,
    /// Its writable layer as last saved to the server's registry (an image), and when (ms):
    /// what a start on another host restores.
    #[serde(default)]
    pub saved_layer: Option<String>,
    #[serde(default)]
    pub saved_at: Option<i64>,
    /// The host a move is taking it to, while it moves.
    #[serde(default)]
    pub moving_to: Option<String>,
    /// Why it was placed on its host (the share of its image each host holds, then how busy).
    #[serde(default)]
    pub placement: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Kill at once, dropping whatever else was queued for the workspace.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Where the command runs; it fails if the workspace has no such folder.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Where it runs without `cwd`, if the workspace has that folder (else the user's home).
    /// The server sets it to the project's checkout when the request does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub land_in: Option<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default)]
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogView {
    /// The bytes, base64 (a terminal's output is not always UTF-8).
    pub data_base64: String,
    pub next_offset: u64,
    /// Whether more may come.
    pub running: bool,
}

/// Where a workspace is. The in-between states (`creating`, `starting`, `stopping`,
/// `deleting`) each have a job queued or running on the workspace's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Deleting,
    /// Its last job failed on every attempt; `last_error` says why. A start or delete
    /// tries again.
    Failed,
    /// Its host stopped reporting. A start makes it anew on another host from its last saved
    /// layer (`saved_layer`), else from its image; a delete forgets it.
    Lost,
}

/// What the owner last asked for; jobs and the reconciler bring the workspace there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
    /// Its row goes once the host has removed it.
    Deleted,
}

impl WorkspaceState {
    pub const ALL: [Self; 8] = [
        Self::Creating,
        Self::Starting,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Deleting,
        Self::Failed,
        Self::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Deleting => "deleting",
            Self::Failed => "failed",
            Self::Lost => "lost",
        }
    }

    /// Whether no job of the workspace should be under way.
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Running | Self::Stopped)
    }
}

impl fmt::Display for WorkspaceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored value that names no state: the database was written by something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a state Warren knows")]
pub struct UnknownState(pub String);

impl FromStr for WorkspaceState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl Desired {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Desired {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Running, Self::Stopped, Self::Deleted]
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::Desired as D;
    use super::WorkspaceState as S;
    use super::*;

    #[test]
    fn a_vscode_link_escapes_what_a_uri_path_cannot_hold() {
        assert_eq!(
            vscode_link("web.warren", "/workspaces/app"),
            "vscode://vscode-remote/ssh-remote+web.warren/workspaces/app"
        );
        assert_eq!(
            vscode_link("web.warren", "srv/My App #2?"),
            "vscode://vscode-remote/ssh-remote+web.warren/srv/My%20App%20%232%3F"
        );
    }

    #[test]
    fn states_read_back_as_stored() {
        for state in S::ALL {
            assert_eq!(state.as_str().parse::<S>(), Ok(state));
            assert_eq!(
                serde_json::to_string(&state).ok(),
                Some(format!("\"{state}\""))
            );
        }
        assert_eq!(
            "paused".parse::<S>(),
            Err(UnknownState("paused".to_owned()))
        );
        for desired in [D::Running, D::Stopped, D::Deleted] {
            assert_eq!(desired.as_str().parse::<D>(), Ok(desired));
        }
    }
}

/// One of a workspace's tasks and how it is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub name: String,
    #[serde(flatten)]
    pub state: TaskState,
    /// Bytes in its log.
    pub log_bytes: u64,
}

/// How a task is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TaskState {
    /// Its stage has not begun (tasks of an earlier stage still run).
    Waiting,
    Running,
    Exited {
        status: ExitStatus,
    },
    /// It could not be started (the message says why).
    Failed {
        error: String,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// The characters of a folder's path a URI must escape (space, `#`, `?`, `%` and the like);
/// slashes stay.
const URI_PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The `vscode://` link that opens `folder` on the SSH host `alias` (an entry `warren
/// ssh-config` wrote) through VS Code's Remote-SSH extension.
pub fn vscode_link(alias: &str, folder: &str) -> String {
    let folder = folder.strip_prefix('/').unwrap_or(folder);
    format!(
        "vscode://vscode-remote/ssh-remote+{alias}/{}",
        percent_encoding::utf8_percent_encode(folder, URI_PATH)
    )
}
