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
    /// Where sessions land: the project's checkout, if the workspace still has it (else the
    /// user's home).
    pub folder: Option<String>,
}

/// Both directions of a byte stream to something on another host: a task's terminal, a relayed
/// session ([`crate::relay`]), a forwarded connection.
pub trait Terminal: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Terminal for T {}

/// A stream to another host being opened.
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
    /// A relayed session ([`crate::relay`]) with a workspace on another host, through that
    /// host's agent.
    fn session<'a>(&'a self, workspace: &'a Found) -> Opening<'a>;
    /// A TCP connection from inside a workspace on another host to `host:port` (resolved
    /// there), through that host's agent.
    fn connect<'a>(&'a self, workspace: &'a Found, host: &'a str, port: u16) -> Opening<'a>;
    /// Marks the workspace in use (an SSH channel is open to it) until the answer is dropped:
    /// the idle stop leaves it running meanwhile.
    fn in_use(&self, workspace: &Found) -> InUse;
}

/// The address a forwarded connection (`ssh -L`, `-D`) to `host:port` goes to, from inside a
/// workspace: `localhost` (or nothing) is its own loopback, an IP itself, a name resolved by
/// the resolver of the host the workspace runs on (workspaces use the host's DNS servers), to
/// an IPv4 address (workspaces have no IPv6 route).
pub async fn forward_address(host: &str, port: u16) -> Result<std::net::SocketAddr, String> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    if host == "localhost" || host.is_empty() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    // A name server that never answers must not hold the caller (or a blocking thread) for
    // longer than this.
    const RESOLVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
    tokio::time::timeout(RESOLVE_WITHIN, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| format!("cannot resolve {host}: no answer within 10 s"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{host} has no IPv4 address"))
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
