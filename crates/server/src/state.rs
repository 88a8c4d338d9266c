//! What every handler and service can reach: the database, the job plane, the hosts' APIs,
//! secrets and settings.

use std::sync::Arc;

use tokio::sync::Notify;
use warren_api::SshView;

use crate::db::Db;
use crate::{logins, plane, secrets};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// Wakes the agent when a job is queued.
    pub wake: Arc<Notify>,
    /// This process's host (where new workspaces go on a single host).
    pub host_id: String,
    /// Every host's API: exec, tasks and their logs go there, whichever host a workspace is on.
    pub hosts: Arc<crate::links::HostLinks>,
    /// Whether an image can be had on this process's host: a workspace's image is resolved
    /// when it is created.
    pub image_check: Option<warren_protocol::ImageCheck>,
    /// Registries (`HOST[:PORT]`) the admin trusts: the only ones a user may name an image on
    /// (`--trusted-registry`).
    pub trusted_registries: Arc<Vec<String>>,
    /// Seals and opens secret values.
    pub secrets: secrets::SecretBox,
    /// The jobs, as agents see them (in process, or through the agent endpoints).
    pub plane: Arc<plane::DbControlPlane>,
    /// How developers reach the SSH gateway, when this process runs one.
    pub ssh: Option<SshView>,
    /// Failed logins, to slow guessing down.
    pub logins: Arc<logins::LoginThrottle>,
    /// The server's mirrors of project repositories (branch heads, how far behind).
    pub git_mirrors: std::path::PathBuf,
    /// Folders of this host whose git repositories any user may name as `file://` projects
    /// (admins may name any).
    pub file_repos: Arc<Vec<std::path::PathBuf>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}
