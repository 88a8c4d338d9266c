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
    /// Commands each user runs through `exec` now.
    pub execs: Arc<PerUser>,
    /// Failed logins, to slow guessing down.
    pub logins: Arc<logins::LoginThrottle>,
    /// The server's mirrors of project repositories (branch heads, how far behind).
    pub git_mirrors: std::path::PathBuf,
    /// Folders of this host whose git repositories any user may name as `file://` projects
    /// (admins may name any).
    pub file_repos: Arc<Vec<std::path::PathBuf>>,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`--trusted-proxy`).
    pub trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    /// The workspaces this process serves a use of now (SSH channels, commands, previews).
    pub presence: Arc<crate::idle::Presence>,
    /// When idle workspaces stop (and stopped ones go).
    pub idle: crate::idle::IdlePolicy,
    /// Where preview URLs are served.
    pub previews: crate::preview::PreviewConfig,
    /// Whether this process serves HTTPS itself (`--tls-cert`).
    pub https: bool,
    /// The fingerprint of the certificate it serves HTTPS with, for agents to pin.
    pub server_fingerprint: Option<String>,
    /// Where prebuilds and workspace layers are pushed (`HOST/REPO`), when there is a registry.
    pub registry: Option<String>,
    /// How long a host may go unheard before it is lost: only hosts heard from within it
    /// are live (take workspaces, count as holding images).
    pub host_lost_after: std::time::Duration,
    /// Connections previews hold now.
    pub preview_slots: Arc<crate::preview::PreviewSlots>,
    /// Event streams each user holds open now.
    pub streams: Arc<PerUser>,
}

impl AppState {
    /// Hosts last heard from before this (ms) are not live.
    pub fn live_since(&self) -> i64 {
        crate::db::now_ms() - self.host_lost_after.as_millis() as i64
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

/// How many of something each user holds now (their commands running through `exec`).
#[derive(Debug, Default)]
pub struct PerUser(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl PerUser {
    /// One more for `user`, unless they hold `most` already; counted until the slot is
    /// dropped.
    pub fn admit(self: &Arc<Self>, user: &str, most: usize) -> Option<Slot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(user.to_owned()).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(Slot {
            counts: self.clone(),
            user: user.to_owned(),
        })
    }
}

/// One held by a user; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<PerUser>,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.user);
            }
        }
    }
}
