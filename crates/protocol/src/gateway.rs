//! What the SSH gateway asks the control plane: whose key this is, which workspace a login
//! names (and where it runs), to start one, and a task's terminal on another host. The
//! gateway (`warren-ssh`) speaks SSH and moves bytes; the control plane (`warren-server`)
//! implements [`Directory`] over its database.

use std::future::Future;
use std::pin::Pin;

/// A Warren user, as the [`Directory`] knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub name: String,
}

/// The workspace a login names, resolved for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The workspace's name, as the user wrote it.
    pub name: String,
    /// The runtime's name for it (`ws-<id>`).
    pub runtime_id: String,
    /// The host it is on: its id and its name.
    pub host_id: String,
    pub host: String,
    /// Its state in the control plane (`running`, `stopped`, `starting`, ...).
    pub state: String,
    /// Variables every process started through the gateway gets (the project's and the owner's).
    pub env: Vec<String>,
    /// The user inside the workspace that sessions run as (root when absent).
    pub user: Option<String>,
}

/// Both directions of a task's terminal.
pub trait Terminal: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Terminal for T {}

/// A task's terminal being opened.
pub type Opening<'a> = Pin<Box<dyn Future<Output = Result<Box<dyn Terminal>, String>> + Send + 'a>>;

/// Who may reach which workspace. Messages in `Err` are shown to the developer as they are.
pub trait Directory: Send + Sync + 'static {
    /// The user who registered this public key (its wire-format blob), if anyone did.
    fn user_for_key(
        &self,
        key_blob: &[u8],
    ) -> impl Future<Output = Result<Option<User>, String>> + Send;
    /// The workspace `login` (the SSH user field) names for `user`.
    fn workspace(
        &self,
        user: &User,
        login: &str,
    ) -> impl Future<Output = Result<Found, String>> + Send;
    /// Starts a workspace that is not running and returns it once it runs.
    fn start(&self, user: &User, login: &str)
    -> impl Future<Output = Result<Found, String>> + Send;
    /// Task `task`'s terminal in a workspace on another host than the gateway's, through that
    /// host's agent.
    fn attach<'a>(&'a self, workspace: &'a Found, task: &'a str) -> Opening<'a>;
    /// Marks the workspace in use (an SSH channel is open to it) until the answer is dropped:
    /// the idle stop leaves it running meanwhile.
    fn in_use(&self, workspace: &Found) -> InUse;
}

/// Keeps a workspace marked in use for as long as it lives ([`Directory::in_use`]).
pub struct InUse(
    #[allow(dead_code, reason = "held for its Drop")] Box<dyn std::any::Any + Send + Sync>,
);

impl InUse {
    pub fn new(guard: impl std::any::Any + Send + Sync) -> Self {
        Self(Box::new(guard))
    }
}

impl std::fmt::Debug for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InUse")
    }
}
