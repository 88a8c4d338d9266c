//! Warren's SSH gateway: one port in front of every workspace on this host.
//!
//! A developer connects with their own key; the SSH user names the workspace
//! (`ssh -p 2222 myws@devbox`, or `myws.alice@devbox` for an admin reaching alice's `myws`).
//! Every channel is routed into the workspace through the [`Runtime`]: sessions (shell, exec,
//! pty, env, signals, the `sftp` subsystem) become processes in the workspace, `direct-tcpip`
//! channels become connections made from inside its network, and agent forwarding becomes a
//! unix socket inside it whose connections travel back to the developer's agent.
//!
//! Who may reach what is the [`Directory`]'s business (the control plane implements it over its
//! database); this crate only speaks SSH and moves bytes.

mod relayed;
mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::{self, LineEnding, PrivateKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::TcpListener;
use warren_runtime::{Runtime, WorkspaceId};

pub use russh::keys::PublicKey;
pub use warren_protocol::gateway::{Directory, Found, Opening, Terminal, User};

/// The workspace a login names, resolved for one user, and how to reach it.
#[derive(Clone)]
pub(crate) struct Target {
    pub found: Found,
    pub id: WorkspaceId,
    /// How the gateway reaches the workspace's host.
    pub reach: Reach,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("found", &self.found)
            .finish_non_exhaustive()
    }
}

/// How the gateway reaches the host a workspace is on.
#[derive(Clone)]
pub(crate) enum Reach {
    /// The host's runtime, in this process: shells, commands, forwarding, task terminals.
    Local(Arc<dyn Runtime>),
    /// Another host, through its agent: sessions relayed to it, forwarded connections made
    /// from there, its tasks' terminals.
    Remote(Arc<dyn RemoteHost>),
}

impl std::fmt::Debug for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(_) => f.write_str("Local"),
            Self::Remote(_) => f.write_str("Remote"),
        }
    }
}

/// A workspace on another host, reached through that host's agent.
pub(crate) trait RemoteHost: Send + Sync {
    /// Task `task`'s terminal, until either side closes it (the task goes on).
    fn attach(&self, task: &str) -> Opening<'_>;
    /// A relayed session ([`warren_protocol::relay`]).
    fn session(&self) -> Opening<'_>;
    /// A TCP connection from inside the workspace to `host:port`.
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> Opening<'a>;
}

/// The host this gateway runs on: its id in the control plane and its runtime. Workspaces
/// elsewhere are reached through the [`Directory`] (their hosts' agents).
#[derive(Clone)]
pub struct LocalHost {
    pub host_id: String,
    pub runtime: Arc<dyn Runtime>,
}

impl std::fmt::Debug for LocalHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHost")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

/// The directory and this host together: what a login names, as a [`Target`] sessions reach.
pub(crate) struct Gateway<D> {
    directory: Arc<D>,
    local: LocalHost,
}

impl<D: Directory> Gateway<D> {
    fn target(&self, found: Found) -> Result<Target, String> {
        let id = WorkspaceId::new(&found.runtime_id).map_err(|e| e.to_string())?;
        let reach = if found.host_id == self.local.host_id {
            Reach::Local(self.local.runtime.clone())
        } else {
            Reach::Remote(Arc::new(Remote {
                directory: self.directory.clone(),
                found: found.clone(),
            }))
        };
        Ok(Target { found, id, reach })
    }

    /// The workspace `login` names for `user`.
    pub(crate) async fn workspace(&self, user: &User, login: &str) -> Result<Target, String> {
        self.target(self.directory.workspace(user, login).await?)
    }

    /// Starts the workspace `login` names and returns it once it runs.
    pub(crate) async fn start(&self, user: &User, login: &str) -> Result<Target, String> {
        self.target(self.directory.start(user, login).await?)
    }

    /// Marks the workspace in use until the answer is dropped (see [`Directory::in_use`]).
    pub(crate) fn in_use(&self, target: &Target) -> warren_protocol::gateway::InUse {
        self.directory.in_use(&target.found)
    }

    async fn user_for_key(&self, key: &PublicKey) -> Result<Option<User>, String> {
        let blob = key.to_bytes().map_err(|e| e.to_string())?;
        self.directory.user_for_key(&blob).await
    }
}

/// A workspace on another host, through the directory.
struct Remote<D> {
    directory: Arc<D>,
    found: Found,
}

impl<D: Directory> RemoteHost for Remote<D> {
    fn attach(&self, task: &str) -> Opening<'_> {
        let task = task.to_owned();
        Box::pin(async move { self.directory.attach(&self.found, &task).await })
    }

    fn session(&self) -> Opening<'_> {
        self.directory.session(&self.found)
    }

    fn connect<'a>(&'a self, host: &'a str, port: u16) -> Opening<'a> {
        self.directory.connect(&self.found, host, port)
    }
}

/// The variable a client sends (`ssh -o SetEnv=WARREN_START=1`, or `warren ssh-config --start`)
/// to have a stopped workspace started instead of refused.
pub const START_VARIABLE: &str = "WARREN_START";

/// The variable a client sends (`ssh -t -o SetEnv=WARREN_TASK=<task>`, or `warren ws attach`) to
/// attach to a workspace task's terminal instead of starting a shell; leaving detaches.
pub const TASK_VARIABLE: &str = "WARREN_TASK";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("host key {path}: {message}")]
    HostKey { path: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the gateway's host key, or makes one (Ed25519, OpenSSH format, mode 0600) the first
/// time, so clients see the same host on every start.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, Error> {
    let fail = |message: String| Error::HostKey {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => return PrivateKey::from_openssh(&text).map_err(|e| fail(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| fail(format!("no random bytes: {e}")))?;
    let key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    // Written whole under a temporary name, then renamed: a crash leaves no half key.
    warren_hostfs::write_private(path, text.as_bytes()).map_err(|e| fail(e.to_string()))?;
    Ok(key)
}

/// The host key's public half as a `known_hosts` line for `[host]:port`.
pub fn known_hosts_line(key: &PrivateKey, host: &str, port: u16) -> String {
    let public = key.public_key().to_openssh().unwrap_or_default();
    if port == 22 {
        format!("{host} {public}")
    } else {
        format!("[{host}]:{port} {public}")
    }
}

/// How long a connection may take to authenticate (OpenSSH's `LoginGraceTime`).
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Connections not yet authenticated, from one address and from everywhere: beyond, a new
/// connection is closed at once (OpenSSH's `MaxStartups`, without the random early drop).
/// Roomy enough for a burst of real logins from one machine (50 sessions at once is tested):
/// a login leaves this count within milliseconds.
pub const MOST_UNAUTHENTICATED_PER_ADDRESS: usize = 64;
pub const MOST_UNAUTHENTICATED: usize = 256;

/// Counts what is open per key (connections per address, channels per user), each counted
/// until its [`Counted`] is dropped.
struct Counter<K>(std::sync::Mutex<std::collections::HashMap<K, usize>>);

impl<K> Default for Counter<K> {
    fn default() -> Self {
        Self(Default::default())
    }
}

/// One thing counted under `key` until dropped.
pub(crate) struct Counted<K: Eq + std::hash::Hash> {
    table: Arc<Counter<K>>,
    key: K,
}

impl<K: Eq + std::hash::Hash + Clone> Counter<K> {
    /// Counts one more under `key`; `None` when `key` has `most` already, or all keys together
    /// `most_in_all`.
    fn admit(self: &Arc<Self>, key: K, most: usize, most_in_all: usize) -> Option<Counted<K>> {
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = table.values().sum();
        let here = table.get(&key).copied().unwrap_or(0);
        if total >= most_in_all || here >= most {
            return None;
        }
        table.insert(key.clone(), here + 1);
        Some(Counted {
            table: self.clone(),
            key,
        })
    }
}

impl<K: Eq + std::hash::Hash> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = table.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.key);
            }
        }
    }
}

/// Connections not yet authenticated, per address.
type Unauthenticated = Counter<std::net::IpAddr>;

/// One unauthenticated connection, counted until it authenticates or ends.
struct Pending(std::sync::Mutex<Option<Counted<std::net::IpAddr>>>);

impl Pending {
    /// Counts a new connection from `ip`; `None` when it is one too many.
    fn admit(table: &Arc<Unauthenticated>, ip: std::net::IpAddr) -> Option<Arc<Pending>> {
        let counted = table.admit(ip, MOST_UNAUTHENTICATED_PER_ADDRESS, MOST_UNAUTHENTICATED)?;
        Some(Arc::new(Pending(std::sync::Mutex::new(Some(counted)))))
    }

    /// Authenticated (or ended): no longer counted.
    fn done(&self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    fn authenticated(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// Sessions (shells, commands, sftp) one user may have open at once, over all their
/// connections: each holds a blocking thread while its process runs, so one user cannot take
/// the gateway's whole pool (512 threads) from everybody else.
pub const MOST_SESSIONS_PER_USER: usize = 64;
/// Forwarded connections (`ssh -L`, `-D`, VS Code's tunnels) one user may have open at once.
pub const MOST_FORWARDS_PER_USER: usize = 256;

/// Open channels per user and kind (`true`: forwarded connections).
type Channels = Counter<(String, bool)>;
/// One open channel, counted until dropped (when its task, and any process it started, ends).
pub(crate) type ChannelSlot = Counted<(String, bool)>;

/// Counts a new session (`forward` false) or forwarded connection of `user`; `None` when it
/// is one too many.
fn admit_channel(channels: &Arc<Channels>, user: &str, forward: bool) -> Option<ChannelSlot> {
    let most = if forward {
        MOST_FORWARDS_PER_USER
    } else {
        MOST_SESSIONS_PER_USER
    };
    channels.admit((user.to_owned(), forward), most, usize::MAX)
}

/// A gateway listening on `listener` until the returned task is aborted.
pub fn serve<D: Directory>(
    listener: TcpListener,
    host_key: PrivateKey,
    directory: Arc<D>,
    local: LocalHost,
) -> tokio::task::JoinHandle<()> {
    let gateway = Arc::new(Gateway { directory, local });
    let config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(
            concat!("SSH-2.0-Warren_", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        // OpenSSH probes with "none" first: no reason to make that slow.
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        // An idle terminal is normal; a dead peer is found by keepalives instead.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        window_size: 8 << 20,
        ..Default::default()
    });
    let unauthenticated = Arc::new(Unauthenticated::default());
    let channels = Arc::new(Channels::default());
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(error = %e, "ssh gateway: cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(pending) = Pending::admit(&unauthenticated, peer.ip()) else {
                tracing::info!(%peer, "ssh: too many connections not authenticated yet; closed");
                drop(socket);
                continue;
            };
            let _ = socket.set_nodelay(true);
            let connection = Connection {
                gateway: gateway.clone(),
                peer,
                user: None,
                login: String::new(),
                pending: pending.clone(),
                channels: channels.clone(),
            };
            let config = config.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + LOGIN_GRACE;
                // A second descriptor of the socket: shutting it down ends the connection
                // whatever state the session is in (a disconnect message is not sent before
                // the key exchange is done).
                let closer = {
                    use std::os::fd::AsFd as _;
                    socket.as_fd().try_clone_to_owned().ok()
                };
                // russh runs an established session in a task of its own, which dropping its
                // handle does not stop: a session that has not authenticated in time is told
                // to disconnect, which ends that task and closes the socket.
                let session = match tokio::time::timeout_at(
                    deadline,
                    russh::server::run_stream(config, socket, connection),
                )
                .await
                {
                    Ok(Ok(session)) => session,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "ssh handshake failed");
                        pending.done();
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "ssh: no handshake within {} s; closed", LOGIN_GRACE.as_secs());
                        pending.done();
                        return;
                    }
                };
                let handle = session.handle();
                tokio::pin!(session);
                let ended = tokio::select! {
                    ended = &mut session => Some(ended),
                    () = tokio::time::sleep_until(deadline) => None,
                };
                let ended = match ended {
                    Some(ended) => ended,
                    None if pending.authenticated() => session.await,
                    None => {
                        tracing::info!(%peer, "ssh: not authenticated within {} s; closed", LOGIN_GRACE.as_secs());
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            handle.disconnect(
                                russh::Disconnect::ByApplication,
                                "not authenticated in time".into(),
                                String::new(),
                            ),
                        )
                        .await;
                        if let Some(closer) = &closer {
                            // SAFETY: shutdown on a descriptor this task owns; no memory.
                            unsafe {
                                libc::shutdown(
                                    std::os::fd::AsRawFd::as_raw_fd(closer),
                                    libc::SHUT_RDWR,
                                )
                            };
                        }
                        session.await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "ssh connection ended");
                }
                pending.done();
            });
        }
    })
}

/// Where the gateway listens and how developers reach it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The gateway's host key (made at first start, mode 0600).
    pub host_key: std::path::PathBuf,
    /// The name developers' machines know this host by (for `warren ssh-config`).
    pub public_host: String,
}

/// A gateway bound to its port, not serving yet: what developers are told about it can be
/// known before it serves.
pub struct Bound {
    listener: TcpListener,
    key: PrivateKey,
    pub addr: SocketAddr,
    /// The host key as a `known_hosts` line for the public name and the bound port.
    pub known_hosts: String,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads (or makes) the host key and binds the port.
    pub async fn bind(&self) -> Result<Bound, Error> {
        let key = load_or_create_host_key(&self.host_key)?;
        let addr = self.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        let known_hosts = known_hosts_line(&key, &self.public_host, addr.port());
        Ok(Bound {
            listener,
            key,
            addr,
            known_hosts,
        })
    }
}

impl Bound {
    /// Serves until the returned task is aborted (see [`serve`]).
    pub fn serve<D: Directory>(
        self,
        directory: Arc<D>,
        local: LocalHost,
    ) -> tokio::task::JoinHandle<()> {
        serve(self.listener, self.key, directory, local)
    }
}

/// One client connection.
struct Connection<D> {
    gateway: Arc<Gateway<D>>,
    peer: SocketAddr,
    /// Set once a key has been verified.
    user: Option<User>,
    /// The SSH user field: which workspace.
    login: String,
    /// Counted among the unauthenticated until a key is accepted.
    pending: Arc<Pending>,
    /// Every connection's open channels, per user.
    channels: Arc<Channels>,
}

impl<D: Directory> Connection<D> {
    async fn known_user(&self, key: &PublicKey) -> Option<User> {
        match self.gateway.user_for_key(key).await {
            Ok(user) => user,
            Err(e) => {
                tracing::warn!(error = %e, "ssh gateway: cannot look a key up");
                None
            }
        }
    }

    /// The workspace this connection names, for a new channel.
    async fn target(&self) -> Result<(User, Target), String> {
        let user = self
            .user
            .clone()
            .ok_or_else(|| "not authenticated".to_owned())?;
        let target = self.gateway.workspace(&user, &self.login).await?;
        Ok((user, target))
    }
}

impl<D: Directory> russh::server::Handler for Connection<D> {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Only keys someone registered are worth a signature check.
        Ok(match self.known_user(offer.public_key).await {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Some(user) = self.known_user(key.public_key).await else {
            tracing::info!(peer = %self.peer, login, "ssh: unknown key refused");
            return Ok(Auth::reject());
        };
        tracing::debug!(peer = %self.peer, login, user = user.name, "ssh: key accepted");
        self.user = Some(user);
        self.login = login.to_owned();
        self.pending.done();
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(user) = self.user.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let Some(slot) = admit_channel(&self.channels, &user.id, false) else {
            tracing::info!(peer = %self.peer, user = user.name, "ssh: too many sessions; refused");
            reply
                .reject(ChannelOpenFailure::Other {
                    // SSH_OPEN_RESOURCE_SHORTAGE
                    code: 4,
                    reason: format!(
                        "{} has {MOST_SESSIONS_PER_USER} sessions open already",
                        user.name
                    ),
                })
                .await;
            return Ok(());
        };
        reply.accept().await;
        tokio::spawn(session::run(
            channel,
            session.handle(),
            self.gateway.clone(),
            user,
            self.login.clone(),
            slot,
        ));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let refuse = |reason: String| ChannelOpenFailure::Other {
            // SSH_OPEN_CONNECT_FAILED: OpenSSH prints the reason after it.
            code: 2,
            reason,
        };
        let target = match self.target().await {
            Ok((_, t)) if t.found.state == "running" => t,
            Ok((_, t)) => {
                reply
                    .reject(refuse(format!(
                        "workspace `{}` is {}",
                        t.found.name, t.found.state
                    )))
                    .await;
                return Ok(());
            }
            Err(message) => {
                reply.reject(refuse(message)).await;
                return Ok(());
            }
        };
        let Ok(port) = u16::try_from(port) else {
            reply.reject(refuse(format!("no port {port}"))).await;
            return Ok(());
        };
        let user = self.user.clone().map(|u| u.id).unwrap_or_default();
        let Some(slot) = admit_channel(&self.channels, &user, true) else {
            reply
                .reject(ChannelOpenFailure::Other {
                    // SSH_OPEN_RESOURCE_SHORTAGE
                    code: 4,
                    reason: format!(
                        "{MOST_FORWARDS_PER_USER} forwarded connections are open already"
                    ),
                })
                .await;
            return Ok(());
        };
        // Connecting may take seconds (a name to resolve, a host that does not answer): done
        // in a task, so the connection's other channels go on meanwhile.
        let host = host.to_owned();
        let in_use = self.gateway.in_use(&target);
        tokio::spawn(async move {
            let _slot = slot;
            let _in_use = in_use;
            match session::connect(&target, &host, port).await {
                Ok(mut stream) => {
                    reply.accept().await;
                    let mut channel = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut channel, &mut stream).await;
                }
                Err(message) => reply.reject(refuse(message)).await,
            }
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The session task has the request already; it takes effect when the process starts.
        session.channel_success(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The session task makes the socket when its process starts.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_has_only_so_many_channels_open() {
        let channels = Arc::new(Channels::default());
        let mut held: Vec<ChannelSlot> = (0..MOST_SESSIONS_PER_USER)
            .map(|_| admit_channel(&channels, "alice", false).unwrap())
            .collect();
        assert!(admit_channel(&channels, "alice", false).is_none());
        // Her forwarded connections and bob's sessions are counted apart.
        assert!(admit_channel(&channels, "alice", true).is_some());
        assert!(admit_channel(&channels, "bob", false).is_some());
        held.pop();
        assert!(admit_channel(&channels, "alice", false).is_some());
        held.clear();
        assert!(channels.0.lock().unwrap().is_empty());
    }
}
