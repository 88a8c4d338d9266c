//! `warren up` and the commands that talk to it: login, users, projects, workspaces, keys,
//! hosts, jobs.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use warren_api::{WorkspaceState, WorkspaceView};

use crate::client::{Client, Login, save_login};
use crate::runtime_cmd::HostFlags;
use warren_agent::server_link::{ServerLink, Trust};
use warren_agent::servers::Servers;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the API listens
    #[arg(long, env = "WARREN_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// sqlite://PATH (default: <data>/warren.db) or postgres://USER:PASSWORD@HOST/DB
    #[arg(long, env = "WARREN_DATABASE_URL")]
    database_url: Option<String>,
    /// This host's name among Warren's hosts (default: the machine's hostname)
    #[arg(long, env = "WARREN_HOST_NAME")]
    host_name: Option<String>,
    /// Seconds between readings of every project's branch heads
    #[arg(long, env = "WARREN_GIT_POLL_SECONDS", default_value_t = 60)]
    git_poll_seconds: u64,
    /// Seconds between this host's reports (its images, its workspaces' states and use), each
    /// compared with what the workspaces' owners asked for
    #[arg(long, env = "WARREN_RECONCILE_SECONDS", default_value_t = 10)]
    reconcile_seconds: u64,
    /// Folders (`:`-separated) whose git repositories any user may add as file:// projects
    /// (admins may add any)
    #[arg(long, env = "WARREN_FILE_REPOS", value_delimiter = ':')]
    file_repos: Vec<PathBuf>,
    /// A reverse proxy (address or CIDR; repeatable, `,`-separated in the variable) whose
    /// `X-Forwarded-For` names the client, for the login throttle; no other caller's is read
    #[arg(long = "trusted-proxy", env = "WARREN_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// How long a workspace may go unused (no SSH channel, command or preview) before it is
    /// stopped, when neither it, its project nor its owner sets one: 90m, 2h, ... (0: never)
    #[arg(long, env = "WARREN_IDLE_TIMEOUT", default_value = "2h", value_parser = crate::parse_duration)]
    idle_timeout: u64,
    /// Delete workspaces that have been stopped this long: 30d, ... (default: never)
    #[arg(long, env = "WARREN_DELETE_STOPPED_AFTER", value_parser = crate::parse_duration)]
    delete_stopped_after: Option<u64>,
    /// Where preview URLs of workspaces' ports are served (`off`: nowhere). A listener of its
    /// own, so a workspace's pages never run on the web UI's origin (default: the API's
    /// address, next port)
    #[arg(long, env = "WARREN_PREVIEW_LISTEN")]
    preview_listen: Option<String>,
    /// The start of preview URLs as browsers reach them, e.g. https://previews.example.com
    /// behind a proxy (default: http://<the host the UI was reached by>:<preview port>)
    #[arg(long, env = "WARREN_PREVIEW_URL")]
    preview_url: Option<String>,
    /// A wildcard DNS name for previews: each port gets a host (and a browser origin) of its
    /// own, `<port>-<workspace id>.<domain>`, and private ports can be shared safely. Without
    /// one, previews are path-based on one origin, and only public ports are served
    #[arg(long, env = "WARREN_PREVIEW_DOMAIN")]
    preview_domain: Option<String>,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1) with this certificate chain (PEM), on the API's and the
    /// previews' listeners; with --tls-key
    #[arg(long, env = "WARREN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM)
    #[arg(long, env = "WARREN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where agents (and the other replicas' hosts) reach this server, when several servers
    /// share one PostgreSQL database: every host keeps a tunnel to each replica, so any of them
    /// serves any request (https://HOST:PORT; replicas serve one certificate)
    #[arg(long, env = "WARREN_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Seconds a host may go without reporting before its workspaces are marked lost (and can
    /// be started on another host from their last saved layer)
    #[arg(long, env = "WARREN_HOST_LOST_SECONDS", default_value_t = 60)]
    host_lost_seconds: u64,
    /// Push every succeeded prebuild to this registry (HOST[:PORT]/REPO), so that any host
    /// starts its workspaces lazily from there; the registry is trusted as --trusted-registry
    /// is (give each other host `--trusted-registry HOST[:PORT]` too)
    #[arg(long, env = "WARREN_REGISTRY")]
    registry: Option<String>,
    /// Also save each running workspace's layer to the registry this often (`30m`; each is
    /// frozen while its host reads the layer), so that a host lost costs at most this much of
    /// its work; without it (or with 0), layers are saved when workspaces stop. Needs --registry
    #[arg(long, env = "WARREN_SAVE_RUNNING_EVERY", value_parser = crate::parse_duration, requires = "registry")]
    save_running_every: Option<u64>,
    #[command(flatten)]
    host: HostFlags,
    #[command(flatten)]
    agent: crate::agent_cmd::HostAgentFlags,
    #[command(flatten)]
    ssh: SshFlags,
}

/// The SSH gateway's settings (`warren up`, `warren gateway`).
#[derive(Debug, Args)]
pub struct SshFlags {
    /// Where the SSH gateway listens (`off`: no gateway)
    #[arg(long, env = "WARREN_SSH_LISTEN", default_value = "0.0.0.0:2222")]
    ssh_listen: String,
    /// The name developers' machines reach this host by, for `warren ssh-config`
    /// (default: the machine's hostname)
    #[arg(long, env = "WARREN_SSH_HOST")]
    ssh_host: Option<String>,
}

impl SshFlags {
    pub fn settings(&self, data: &Path) -> anyhow::Result<Option<warren_ssh::Settings>> {
        if self.ssh_listen == "off" {
            return Ok(None);
        }
        let listen: SocketAddr = self.ssh_listen.parse().with_context(|| {
            format!(
                "`{}` is not an address such as 0.0.0.0:2222 (or `off`)",
                self.ssh_listen
            )
        })?;
        Ok(Some(warren_ssh::Settings {
            listen,
            host_key: data.join("ssh_host_ed25519_key"),
            public_host: self.ssh_host.clone().unwrap_or_else(hostname),
        }))
    }
}

/// Refuses a database URL with a password given as an argument (`--database-url`): every user
/// of the host sees a process's arguments (`ps`). The environment is the owner's alone.
pub fn refuse_password_in_argv(url: &str) -> anyhow::Result<()> {
    if url_has_password(url) && std::env::args().any(|a| a.contains(url)) {
        bail!(
            "--database-url holds a password, which every user of this host could read from the \
             process list: give the URL in WARREN_DATABASE_URL instead"
        );
    }
    Ok(())
}

/// `scheme://user:password@host/...`, or a `password=` parameter (libpq's and sqlx's
/// `?password=...`, percent-encoded or not).
fn url_has_password(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(parsed) => {
            parsed.password().is_some()
                || parsed
                    .query_pairs()
                    .any(|(key, _)| key.eq_ignore_ascii_case("password"))
        }
        // Not a URL this parser reads: anything that could hold one counts.
        Err(_) => url.contains('@') || url.to_ascii_lowercase().contains("password"),
    }
}

/// A database URL as `up` shows it: its scheme, host and path only.
fn shown_database(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) if parsed.scheme() == "sqlite" => url.split('?').next().unwrap_or("").into(),
        Ok(parsed) => format!(
            "{}://{}{}{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or(""),
            parsed.port().map(|p| format!(":{p}")).unwrap_or_default(),
            parsed.path()
        ),
        Err(_) => "(the database URL)".into(),
    }
}

/// A trusted proxy as given: a network (`10.0.0.0/24`) or one address (`10.0.0.2`); a `/0`
/// would trust every caller, and is refused.
fn parse_proxy(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    let net = text
        .parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is not an address or a network (CIDR)"))?;
    if net.prefix_len() == 0 {
        return Err(format!(
            "`{text}` would trust every caller's X-Forwarded-For: name the proxies"
        ));
    }
    Ok(net)
}

/// Makes the data folder hold nothing for anybody but root, except the way to `runtime/`: the
/// workspaces' ids set their trees up from inside their user namespaces, so they must pass
/// through the folder (0711, never more; `vm/`, whose kernel a VM's QEMU reads as the
/// workspace's root, likewise). Everything else in it — the database, keys, images, the chunk
/// cache, git mirrors of private repositories, build caches and spool folders — is made 0700
/// (folders, made now if absent, so what is written later lands closed) or 0600 (files), so a
/// local user who guesses a path (a blob's digest, a mirror's name) reads nothing.
pub fn close_data_folder(data: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let set = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot make {} {mode:04o}", path.display()))
    };
    let mode = std::fs::metadata(data)
        .with_context(|| format!("cannot read {}", data.display()))?
        .permissions()
        .mode();
    if mode & 0o066 != 0 {
        set(data, mode & 0o711 | 0o700)?;
    }
    for private in ["images", "cache", "tmp", "build-mounts", "git"] {
        let _ = std::fs::create_dir(data.join(private));
    }
    // Root's alone: another owner would keep its access whatever the mode, and a symlink would
    // send what is written there elsewhere.
    let own = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(0), Some(0))
            .with_context(|| format!("cannot give {} to root", path.display()))
    };
    own(data)?;
    for entry in
        std::fs::read_dir(data).with_context(|| format!("cannot list {}", data.display()))?
    {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            bail!(
                "{} is a symlink: the data folder's entries must be its own (remove it)",
                path.display()
            );
        }
        own(&path)?;
        if matches!(entry.file_name().to_str(), Some("runtime" | "vm")) {
            continue;
        }
        if kind.is_dir() {
            set(&path, 0o700)?;
        } else if kind.is_file() {
            set(&path, 0o600)?;
        }
    }
    Ok(())
}

/// The host of `--registry HOST[:PORT]/REPO`, after checking it is that: a repository (no tag
/// or digest) that image names can be put under.
fn prebuild_registry(registry: &str) -> anyhow::Result<String> {
    let parsed = warren_store::RegistryRef::parse(&format!("{registry}/warren-prebuild:x"))
        .map_err(|e| anyhow::anyhow!("--registry {registry}: {e}"))?;
    if !registry.contains('/') || registry.contains(['@', '?', '#']) || registry.ends_with('/') {
        bail!(
            "--registry {registry}: expected HOST[:PORT]/REPO, such as registry.example.com/warren"
        );
    }
    Ok(parsed.host)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "local".into())
}

pub fn up(mut args: UpArgs, data: &Path) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("warren up runs workspaces (namespaces, mounts, cgroups): run it as root");
    }
    close_data_folder(data)?;
    let database_url = args
        .database_url
        .unwrap_or_else(|| format!("sqlite://{}", data.join("warren.db").display()));
    refuse_password_in_argv(&database_url)?;
    let host_name = args.host_name.unwrap_or_else(hostname);
    if let Some(registry) = &args.registry {
        args.host.trust_registry(prebuild_registry(registry)?);
    }
    let advertise_url = args
        .advertise_url
        .as_deref()
        .map(|url| {
            let url = url.trim_end_matches('/').to_owned();
            // The same checks an agent makes (no token in the clear off this machine).
            ServerLink::new(&url, String::new(), Trust::PublicCas)
                .map(|_| url)
                .map_err(|e| anyhow::anyhow!("--advertise-url: {e}"))
        })
        .transpose()?;
    if advertise_url.is_some() && database_url.starts_with("sqlite:") {
        bail!(
            "--advertise-url is for replicas sharing a PostgreSQL database (--database-url postgres://...)"
        );
    }
    let runtime = args.host.runtime_for_workspaces(data)?;
    let image_mounts = runtime.image_sharing().to_string();
    let runtime: Arc<dyn warren_runtime::Runtime> = Arc::new(runtime);
    let ssh = args.ssh.settings(data)?;
    // Bad limits are refused before anything starts.
    args.agent.check()?;
    let image_check = crate::image_cmd::image_check(data);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tokio.block_on(async move {
        let shown_url = shown_database(&database_url);
        // The gateway's port is bound first: the API tells developers how to reach it.
        let gateway = match &ssh {
            Some(settings) => Some((settings.bind().await?, settings.public_host.clone())),
            None => None,
        };
        let ssh_view = gateway.as_ref().map(|(bound, host)| warren_api::SshView {
            host: host.clone(),
            port: bound.addr.port(),
            known_hosts: bound.known_hosts.clone(),
        });
        let tls = args.tls_cert.is_some();
        let started = warren_server::start(warren_server::SingleHost {
            database_url: database_url.clone(),
            listen: args.listen,
            host_name,
            host_api: warren_agent::host_api::router(runtime.clone()),
            git_poll: Duration::from_secs(args.git_poll_seconds.max(1)),
            secret_key: data.join("secret.key"),
            trusted_registries: runtime.egress().registries,
            registry: args.registry,
            advertise_url: advertise_url.clone(),
            host_lost_after: Duration::from_secs(args.host_lost_seconds.max(5)),
            save_running_every: args
                .save_running_every
                .filter(|&s| s > 0)
                .map(|s| Duration::from_secs(s.max(5))),
            image_check: Some(image_check),
            ssh: ssh_view,
            git_mirrors: data.join("git/server"),
            file_repos: args.file_repos,
            trusted_proxies: args.trusted_proxies,
            idle: warren_server::idle::IdlePolicy {
                default_timeout_s: args.idle_timeout,
                delete_stopped_after: args
                    .delete_stopped_after
                    .filter(|&s| s > 0)
                    .map(Duration::from_secs),
            },
            preview_listen: match args.preview_listen.as_deref() {
                Some("off") => None,
                Some(addr) => Some(
                    addr.parse()
                        .with_context(|| format!("--preview-listen {addr}: not ADDRESS:PORT or off"))?,
                ),
                // The next port (any free one when the API's is chosen by the system).
                None => Some(SocketAddr::new(
                    args.listen.ip(),
                    match args.listen.port() {
                        0 => 0,
                        port => port.checked_add(1).unwrap_or(0),
                    },
                )),
            },
            preview_url: args.preview_url,
            preview_domain: args
                .preview_domain
                .map(|d| d.trim_matches('.').to_ascii_lowercase())
                .filter(|d| !d.is_empty()),
            tls: match (args.tls_cert, args.tls_key) {
                (Some(cert), Some(key)) => Some(warren_server::tls::TlsFiles { cert, key }),
                _ => None,
            },
        })
        .await?;
        let gateway_addr = gateway.map(|(bound, _)| {
            let addr = bound.addr;
            let local = warren_ssh::LocalHost {
                host_id: started.host_id.clone(),
                runtime: runtime.clone(),
            };
            bound.serve(Arc::new(started.gateway.clone()), local);
            addr
        });
        // One of several replicas: this host keeps a tunnel to each other one, as agents do.
        if let (Some(url), Some(token)) = (&advertise_url, &started.replica_token) {
            let trust = match &started.server_fingerprint {
                // Replicas serve one certificate.
                Some(own) => Trust::Pinned(
                    warren_agent::server_link::parse_fingerprint(own).map_err(anyhow::Error::msg)?,
                ),
                None => Trust::PublicCas,
            };
            let own = ServerLink::new(url, token.clone(), trust.clone())
                .map_err(anyhow::Error::msg)?;
            let servers = Arc::new(Servers::new(Arc::new(own), token.clone(), trust));
            tokio::spawn(warren_agent::tunnel::hold_all(
                servers,
                Some(url.clone()),
                warren_agent::host_api::router(runtime.clone()),
                started.shutdown.clone(),
            ));
        }
        // This host's agent, in this process: it claims jobs straight from the database, and
        // each of its reports (every --reconcile-seconds) reconciles the host's workspaces.
        let agent = args
            .agent
            .agent(
                started.host_id.clone(),
                runtime,
                Arc::new(started.plane.clone()),
                started.wake.clone(),
                data,
            )?
            .with_report_every(Duration::from_secs(args.reconcile_seconds.max(1)));
        tokio::spawn(agent.run(started.shutdown.clone()));
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{}", started.addr);
        let shown_db = shown_url.as_str();
        let mut banner = format!(
            "Warren is up at {url}\n  data: {}   database: {shown_db}\n  image mounts: {image_mounts}\n",
            data.display()
        );
        if let Some(addr) = &started.preview_addr {
            banner.push_str(&format!(
                "  previews: {scheme}://{addr}/preview/<owner>/<workspace>/<port>/\n"
            ));
        }
        if let Some(addr) = &gateway_addr {
            banner.push_str(&format!(
                "  ssh gateway: {addr} (`ssh -p {} <workspace>@<this host>`)\n",
                addr.port()
            ));
        }
        if let Some(password) = &started.admin_password {
            // The commands as they can be pasted: the binary may not be on the PATH.
            let warren = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "warren".into());
            banner.push_str(&format!(
                "\nFirst start: an admin was created (the password is shown only now):\n  \
                 user: admin   password: {password}\n\nNext:\n  \
                 {warren} login --server {url} --user admin\n  \
                 {warren} image import /path/to/rootfs dev:1\n  \
                 {warren} ws create dev --image dev:1 && {warren} ws exec dev -- uname -a\n  \
                 {warren} key add laptop ~/.ssh/id_ed25519.pub && {warren} ssh-config --write && ssh dev.warren\n"
            ));
        }
        // A closed stdout (a supervisor that stopped reading) must not bring the server down.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("stopping (workspaces keep running)");
        started.shutdown.notify_waiters();
        // Requests in flight finish; what would last (a browser's live list, a preview's
        // WebSocket, a long exec) is cut after the grace: a stop must not wait on a client.
        const GRACE: std::time::Duration = std::time::Duration::from_secs(10);
        if tokio::time::timeout(GRACE, started.serve).await.is_err() {
            eprintln!("connections still open after {} s: closing them", GRACE.as_secs());
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The server `warren up` printed
    #[arg(long, env = "WARREN_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    #[arg(long, default_value = "admin")]
    user: String,
    /// Read the password from stdin (the first line) instead of asking
    #[arg(long)]
    password_stdin: bool,
}

pub fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let password = match std::env::var("WARREN_PASSWORD") {
        Ok(p) => p,
        Err(_) => read_password(args.password_stdin)?,
    };
    let answer: warren_api::LoginResponse = Client::anonymous(&args.server).post_as(
        "/login",
        &warren_api::LoginRequest {
            user: args.user.clone(),
            password,
            token_name: Some("cli".into()),
        },
    )?;
    let token = answer.token;
    let path = save_login(&Login {
        server: args.server.clone(),
        token,
    })?;
    println!(
        "logged in to {} as {} (token saved in {})",
        args.server,
        args.user,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let interactive = !from_stdin && std::io::IsTerminal::is_terminal(&stdin);
    let saved = if interactive {
        eprint!("password: ");
        let saved = tcgetattr(&stdin).ok();
        if let Some(t) = &saved {
            let mut quiet = t.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
        }
        saved
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &t);
        eprintln!();
    }
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user (admin); the password is read like `login` reads it
    Add {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        password_stdin: bool,
    },
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Let KSM merge the memory of this user's VM workspaces (admin; from their next start).
    /// Merged pages are a side channel between the tenants whose VMs share them: only for
    /// tenants that trust each other
    Ksm {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// How long your workspaces may go unused before they are stopped, where neither the
    /// workspace nor its project sets it: 90m, 2h, 0 (never), or `default` (the server's)
    Idle {
        #[arg(value_parser = crate::parse_idle_timeout)]
        timeout: crate::IdleTimeoutArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Add a project: a git repository (https://, ssh://, file:// or user@host:path)
    Add {
        name: String,
        git_url: String,
        /// The folder of the repository the environment lives in
        #[arg(long)]
        root: Option<String>,
        /// The environment file, if not found by the usual names
        #[arg(long)]
        env_file: Option<String>,
    },
    Ls {
        #[arg(long)]
        json: bool,
    },
    Rm {
        name: String,
    },
    /// Let KSM merge the memory of this project's VM workspaces (admin; from their next start).
    /// Merged pages are a side channel between the tenants whose VMs share them: only for
    /// tenants that trust each other
    Ksm {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// How long the project's workspaces may go unused before they are stopped, where a
    /// workspace sets none: 90m, 2h, 0 (never), or `default` (its owner's, else the server's)
    Idle {
        name: String,
        #[arg(value_parser = crate::parse_idle_timeout)]
        timeout: crate::IdleTimeoutArg,
    },
    /// The project's branches and head commits
    Branches {
        name: String,
        /// Read them from the repository now
        #[arg(long)]
        refresh: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WsCommand {
    /// Create a workspace and wait until it runs
    Create {
        /// The workspace's name; without --image or --project, the project to start from
        /// (the workspace is named after it, and after --branch)
        name: String,
        /// The image to start from (without one: the newest succeeded prebuild of the
        /// project's branch)
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        project: Option<String>,
        /// The branch whose prebuild to start from and check out (default: main, master, or the
        /// only one)
        #[arg(long)]
        branch: Option<String>,
        /// e.g. 4GiB
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        cpus: Option<f64>,
        /// What it may write, e.g. 20GiB (default: the environment file's, else the host's)
        #[arg(long)]
        disk: Option<String>,
        /// An environment file (warren.yml, hocus.yml, devcontainer.json) whose workspace tasks
        /// run on each start
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// `container` or `vm` (default: the environment file's `runtime`, else container)
        #[arg(long, value_parser = ["container", "vm"])]
        runtime: Option<String>,
        /// Stop it after this long unused (no SSH channel, command or preview): 90m, 2h, 0
        /// (never); default: its project's, else yours, else the server's
        #[arg(long, value_parser = crate::parse_duration)]
        idle_timeout: Option<u64>,
        /// Return at once instead of waiting
        #[arg(long)]
        no_wait: bool,
    },
    /// The workspace's ports reached through preview URLs, with who may open each
    Ports {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Open a port through a preview URL, or change who may: `private` (only you),
    /// `users` (anyone signed in) or `public` (anyone with the link)
    Port {
        name: String,
        port: u16,
        #[arg(value_parser = ["private", "users", "public"])]
        access: String,
    },
    /// How long the workspace may go unused before it is stopped: 90m, 2h, 0 (never), or
    /// `default` (its project's, else yours, else the server's)
    Idle {
        name: String,
        #[arg(value_parser = crate::parse_idle_timeout)]
        timeout: crate::IdleTimeoutArg,
    },
    Ls {
        #[arg(long)]
        json: bool,
    },
    Show {
        name: String,
    },
    Start {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Move a workspace to another host: stopped, its layer saved to the registry, made anew
    /// there (running again if it ran); a lost one starts there from its last saved layer (admin)
    Move {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        no_wait: bool,
    },
    Stop {
        name: String,
        /// Kill at once (even if another step is pending)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    Rm {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// The workspace's tasks, or one task's output (`-f` follows it)
    Logs {
        name: String,
        task: Option<String>,
        #[arg(short, long)]
        follow: bool,
    },
    /// Attach your terminal to a running task over SSH (leave with `~.`; the task goes on)
    Attach {
        name: String,
        task: String,
    },
    /// Print the link that opens the workspace in VS Code (Remote-SSH)
    Open {
        name: String,
        /// The folder to open (default: where its sessions land, the project's checkout or
        /// root's home)
        #[arg(long)]
        folder: Option<String>,
    },
    /// Run a command to its end; exits with its status
    Exec {
        name: String,
        /// Pass this process's stdin to the command
        #[arg(short = 'i', long)]
        stdin: bool,
        #[arg(short = 'u', long)]
        user: Option<String>,
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Set a variable for your workspaces (or, with --project, for a project's)
    Set {
        /// NAME=VALUE; for a secret, give NAME alone and the value is read like a password
        assignment: String,
        /// Seal the value at rest; it is never shown again
        #[arg(long)]
        secret: bool,
        #[arg(long)]
        project: Option<String>,
    },
    Ls {
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        json: bool,
    },
    Rm {
        name: String,
        #[arg(long)]
        project: Option<String>,
    },
}

pub fn env(cmd: EnvCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    let query = |project: &Option<String>| {
        project
            .as_ref()
            .map(|p| format!("?project={p}"))
            .unwrap_or_default()
    };
    match cmd {
        EnvCommand::Set {
            assignment,
            secret,
            project,
        } => {
            let (name, value) = match assignment.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None if secret => (assignment.clone(), read_password(false)?),
                None => bail!("give NAME=VALUE (or --secret NAME to type the value)"),
            };
            client.post(
                "/env",
                &warren_api::NewVar {
                    name: name.clone(),
                    value,
                    secret,
                    project,
                },
            )?;
            println!("{name} set{}", if secret { " (sealed)" } else { "" });
        }
        EnvCommand::Ls { project, json } => {
            return print_table(
                json,
                &client.get(&format!("/env{}", query(&project)))?,
                &[
                    ("name", "NAME"),
                    ("scope", "SCOPE"),
                    ("secret", "SECRET"),
                    ("value", "VALUE"),
                    ("hint", "HINT"),
                ],
            );
        }
        EnvCommand::Rm { name, project } => {
            client.delete(&format!("/env/{name}{}", query(&project)))?;
            println!("{name} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Signs the server's key challenge with `ssh-keygen -Y sign`: with the private key beside
/// `file` (`~/.ssh/id_ed25519` for `~/.ssh/id_ed25519.pub`), else with the key held by
/// ssh-agent. ssh-keygen asks for a passphrase or a security key's touch itself.
fn sign_key_challenge(
    file: &str,
    public_key: &str,
    namespace: &str,
    message: &str,
) -> anyhow::Result<String> {
    use std::io::Write as _;
    // Only Warren's own challenge is signed: a signature in another namespace (git, file)
    // could be used elsewhere by whoever answered as the server.
    if namespace != "warren-key" || !message.starts_with("warren: this key is mine, user ") {
        bail!("the server's key challenge is not Warren's (namespace `{namespace}`): not signed");
    }
    let scratch = tempfile::tempdir()?;
    let private = file
        .strip_suffix(".pub")
        .map(std::path::Path::new)
        .filter(|p| p.is_file());
    let signer = match private {
        Some(p) => p.to_path_buf(),
        None => {
            // A public key alone: ssh-keygen signs with the agent's copy of its private half.
            let p = scratch.path().join("key.pub");
            std::fs::write(&p, format!("{public_key}\n"))?;
            p
        }
    };
    let mut child = std::process::Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", namespace, "-f"])
        .arg(&signer)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run ssh-keygen (OpenSSH's client tools) to sign with the key")?;
    child
        .stdin
        .take()
        .context("ssh-keygen has no stdin")?
        .write_all(message.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ssh-keygen could not sign with {} (the private key must be beside the .pub file or in ssh-agent)",
            signer.display()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add an SSH public key (a file such as ~/.ssh/id_ed25519.pub, or - for stdin). The key
    /// signs the server's challenge with `ssh-keygen -Y sign`, from the private key beside the
    /// .pub file or from ssh-agent, to prove it is yours.
    Add {
        name: String,
        file: String,
    },
    Ls {
        #[arg(long)]
        json: bool,
    },
    Rm {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn print_table(
    json: bool,
    value: &Value,
    columns: &[(&str, &str)],
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows = value.as_array().cloned().unwrap_or_default();
    let cell = |row: &Value, key: &str| match &row[key] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|(key, title)| {
            rows.iter()
                .map(|r| cell(r, key).len())
                .max()
                .unwrap_or(0)
                .max(title.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|(_, t)| t.to_string()).collect())
    );
    for row in &rows {
        println!(
            "{}",
            line(columns.iter().map(|(k, _)| cell(row, k)).collect())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn user(cmd: UserCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    match cmd {
        UserCommand::Add {
            name,
            admin,
            password_stdin,
        } => {
            let password = match std::env::var("WARREN_PASSWORD") {
                Ok(p) => p,
                Err(_) => read_password(password_stdin)?,
            };
            client.post(
                "/users",
                &warren_api::NewUser {
                    name: name.clone(),
                    password,
                    admin,
                },
            )?;
            println!("user {name} created");
            Ok(ExitCode::SUCCESS)
        }
        UserCommand::Ls { json } => print_table(
            json,
            &client.get("/users")?,
            &[("name", "NAME"), ("admin", "ADMIN")],
        ),
        UserCommand::Ksm { name, setting } => {
            client.patch(
                &format!("/users/{name}"),
                &warren_api::TrustChange {
                    vm_ksm: setting == "on",
                },
            )?;
            println!("KSM for {name}'s VM workspaces: {setting} (from their next start)");
            Ok(ExitCode::SUCCESS)
        }
        UserCommand::Idle {
            timeout: crate::IdleTimeoutArg(timeout),
        } => {
            client.put(
                "/me/idle-timeout",
                &warren_api::IdleTimeout { seconds: timeout },
            )?;
            println!(
                "your workspaces' idle timeout: {}",
                idle_words(timeout, "the server's")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An idle timeout as set, for a message.
fn idle_words(timeout: Option<u64>, otherwise: &str) -> String {
    match timeout {
        None => otherwise.to_owned(),
        Some(s) => warren_server::idle::spoken(s),
    }
}

pub fn project(cmd: ProjectCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    match cmd {
        ProjectCommand::Add {
            name,
            git_url,
            root,
            env_file,
        } => {
            let project: warren_api::ProjectView = client.post_as(
                "/projects",
                &warren_api::NewProject {
                    name: name.clone(),
                    git_url: git_url.clone(),
                    root_folder: root,
                    env_file,
                },
            )?;
            println!("project {name} added ({git_url})");
            if let Some(hook) = project.webhook {
                println!(
                    "webhook (shown once; point the repository's push hook here): {}{hook}",
                    client.server()
                );
            }
        }
        ProjectCommand::Branches {
            name,
            refresh,
            json,
        } => {
            let branches = if refresh {
                client.post(&format!("/projects/{name}/refresh"), &json!({}))?
            } else {
                client.get(&format!("/projects/{name}/branches"))?
            };
            return print_table(json, &branches, &[("name", "BRANCH"), ("head", "HEAD")]);
        }
        ProjectCommand::Ls { json } => {
            return print_table(
                json,
                &client.get("/projects")?,
                &[
                    ("name", "NAME"),
                    ("owner", "OWNER"),
                    ("git_url", "GIT URL"),
                    ("root_folder", "ROOT"),
                ],
            );
        }
        ProjectCommand::Rm { name } => {
            client.delete(&format!("/projects/{name}"))?;
            println!("project {name} removed");
        }
        ProjectCommand::Ksm { name, setting } => {
            client.patch(
                &format!("/projects/{name}"),
                &warren_api::TrustChange {
                    vm_ksm: setting == "on",
                },
            )?;
            println!("KSM for project {name}'s VM workspaces: {setting} (from their next start)");
        }
        ProjectCommand::Idle {
            name,
            timeout: crate::IdleTimeoutArg(timeout),
        } => {
            client.put(
                &format!("/projects/{name}/idle-timeout"),
                &warren_api::IdleTimeout { seconds: timeout },
            )?;
            println!(
                "project {name}'s idle timeout: {}",
                idle_words(timeout, "its owners'")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A branch name as part of a workspace name: lowercase letters, digits and `-`.
fn workspace_name_part(branch: &str) -> String {
    let mut out = String::new();
    for c in branch.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// Polls a workspace until `done` says so (or it fails), with a spinner on a terminal.
/// Milliseconds since the epoch, as the server stamps times.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An age in seconds, for people: `40 s`, `12 min`, `3 h`, `2 days`.
fn spoken_age(seconds: i64) -> String {
    match seconds {
        ..120 => format!("{} s", seconds.max(0)),
        120..7200 => format!("{} min", seconds / 60),
        7200..172_800 => format!("{} h", seconds / 3600),
        _ => format!("{} days", seconds / 86400),
    }
}

fn wait_for(
    client: &Client,
    name: &str,
    what: &str,
    done: impl Fn(Option<&WorkspaceView>) -> bool,
) -> anyhow::Result<Option<WorkspaceView>> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("{name}: {what}"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let result = loop {
        match client.get_as::<WorkspaceView>(&format!("/workspaces/{name}")) {
            Ok(ws) => {
                if done(Some(&ws)) {
                    break Ok(Some(ws));
                }
                if ws.state == WorkspaceState::Failed {
                    break Err(anyhow::anyhow!(
                        "{name} failed: {}",
                        ws.last_error.as_deref().unwrap_or("no reason recorded")
                    ));
                }
                // A step that failed and will be tried again says why meanwhile.
                bar.set_message(format!(
                    "{name}: {} ({}s){}",
                    ws.state,
                    started.elapsed().as_secs(),
                    ws.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            Err(e) if e.to_string().contains("HTTP 404") && done(None) => break Ok(None),
            Err(e) => break Err(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    result
}

pub fn ws(cmd: WsCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    let state_is =
        |s: WorkspaceState| move |ws: Option<&WorkspaceView>| ws.is_some_and(|w| w.state == s);
    match cmd {
        WsCommand::Create {
            name,
            image,
            project,
            branch,
            memory,
            cpus,
            disk,
            env_file,
            runtime,
            idle_timeout,
            no_wait,
        } => {
            // `ws create PROJECT [--branch B]`: a workspace of the project's prebuild, named
            // after the project (and the branch).
            let (name, project) = match (&image, project) {
                (None, None) => {
                    let ws = match &branch {
                        Some(b) => format!("{name}-{}", workspace_name_part(b)),
                        None => name.clone(),
                    };
                    (ws, Some(name))
                }
                (_, project) => (name, project),
            };
            let memory = memory.as_deref().map(crate::parse_size).transpose()?;
            let disk = disk.as_deref().map(crate::parse_size).transpose()?;
            let environment = match env_file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let file = env_file_name(&path);
                    Some(warren_api::EnvironmentFile { file, text })
                }
                None => None,
            };
            client.post(
                "/workspaces",
                &warren_api::NewWorkspace {
                    name: name.clone(),
                    image,
                    project,
                    branch,
                    memory,
                    cpus,
                    disk,
                    environment,
                    runtime,
                    idle_timeout,
                },
            )?;
            if !no_wait {
                wait_for(
                    &client,
                    &name,
                    "creating",
                    state_is(WorkspaceState::Running),
                )?;
            }
            println!(
                "{name} {}",
                if no_wait {
                    "is being created"
                } else {
                    "is running"
                }
            );
        }
        WsCommand::Ls { json } => {
            return print_table(
                json,
                &client.get("/workspaces")?,
                &[
                    ("name", "NAME"),
                    ("owner", "OWNER"),
                    ("state", "STATE"),
                    ("runtime", "RUNTIME"),
                    ("image", "IMAGE"),
                    ("host", "HOST"),
                    ("last_error", "LAST ERROR"),
                    ("stop_reason", "STOPPED BECAUSE"),
                ],
            );
        }
        WsCommand::Idle {
            name,
            timeout: crate::IdleTimeoutArg(timeout),
        } => {
            let ws: WorkspaceView = serde_json::from_value(client.put(
                &format!("/workspaces/{name}/idle-timeout"),
                &warren_api::IdleTimeout { seconds: timeout },
            )?)?;
            println!(
                "{name}'s idle timeout: {} (set on its {})",
                idle_words(Some(ws.idle_timeout), ""),
                ws.idle_timeout_from
            );
        }
        WsCommand::Ports { name, json } => {
            return print_table(
                json,
                &client.get(&format!("/workspaces/{name}/ports"))?,
                &[
                    ("port", "PORT"),
                    ("label", "LABEL"),
                    ("access", "ACCESS"),
                    ("url", "URL"),
                ],
            );
        }
        WsCommand::Port { name, port, access } => {
            let access: warren_api::PortAccess = access
                .parse()
                .map_err(|_| anyhow::anyhow!("`{access}`: private, users or public"))?;
            let ports: Vec<warren_api::PortView> = serde_json::from_value(client.put(
                &format!("/workspaces/{name}/ports/{port}"),
                &warren_api::PortChange { access },
            )?)?;
            let url = ports
                .iter()
                .find(|p| p.port == port)
                .and_then(|p| p.url.clone())
                .unwrap_or_else(|| "no preview URL: the server serves none".into());
            println!("{name}:{port} is {}: {url}", access.as_str());
        }
        WsCommand::Show { name } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.get(&format!("/workspaces/{name}"))?)?
            );
        }
        WsCommand::Move {
            name,
            host,
            no_wait,
        } => {
            let asked: WorkspaceView = client.post_as(
                &format!("/workspaces/{name}/move"),
                &warren_api::MoveRequest { host: host.clone() },
            )?;
            let was_running = asked.desired == warren_api::Desired::Running;
            if !no_wait {
                let settled = if was_running {
                    WorkspaceState::Running
                } else {
                    WorkspaceState::Stopped
                };
                // Done there, or called off (a step failed): still here, no longer moving.
                let ended = wait_for(&client, &name, &format!("moving to {host}"), |ws| {
                    ws.is_some_and(|ws| {
                        ws.host == host && ws.state == settled
                            || ws.host != host && ws.moving_to.is_none()
                    })
                })?;
                if let Some(ws) = ended.filter(|ws| ws.host != host) {
                    bail!(
                        "{name} did not move: {}",
                        ws.last_error
                            .as_deref()
                            .unwrap_or("the move was called off")
                    );
                }
            }
            println!(
                "{name} {} {host}",
                if no_wait { "is moving to" } else { "is on" }
            );
        }
        WsCommand::Start { name, no_wait } => {
            let before: WorkspaceView = client.get_as(&format!("/workspaces/{name}"))?;
            if before.state == WorkspaceState::Lost {
                match before.saved_at {
                    Some(at) => {
                        let age = (now_ms() - at).max(0) / 1000;
                        println!(
                            "{name}'s host {} is lost: starting it on another host from its layer saved {} ago ({})",
                            before.host,
                            spoken_age(age),
                            before.saved_layer.as_deref().unwrap_or("")
                        );
                    }
                    None => println!(
                        "{name}'s host {} is lost and no layer of it was saved: starting it on another host from its image, without its files",
                        before.host
                    ),
                }
            }
            client.post(&format!("/workspaces/{name}/start"), &json!({}))?;
            if !no_wait {
                wait_for(
                    &client,
                    &name,
                    "starting",
                    state_is(WorkspaceState::Running),
                )?;
            }
            println!(
                "{name} {}",
                if no_wait { "is starting" } else { "is running" }
            );
        }
        WsCommand::Stop {
            name,
            force,
            no_wait,
        } => {
            client.post(
                &format!("/workspaces/{name}/stop"),
                &warren_api::StopRequest {
                    force,
                    grace_seconds: None,
                },
            )?;
            if !no_wait {
                wait_for(
                    &client,
                    &name,
                    "stopping",
                    state_is(WorkspaceState::Stopped),
                )?;
            }
            println!(
                "{name} {}",
                if no_wait { "is stopping" } else { "is stopped" }
            );
        }
        WsCommand::Rm { name, no_wait } => {
            client.delete(&format!("/workspaces/{name}"))?;
            if !no_wait {
                wait_for(&client, &name, "deleting", |ws| ws.is_none())?;
            }
            println!(
                "{name} {}",
                if no_wait {
                    "is being deleted"
                } else {
                    "is deleted"
                }
            );
        }
        WsCommand::Logs {
            name, task: None, ..
        } => {
            return print_table(
                false,
                &client.get(&format!("/workspaces/{name}/tasks"))?,
                &[
                    ("name", "TASK"),
                    ("state", "STATE"),
                    ("log_bytes", "LOG BYTES"),
                ],
            );
        }
        WsCommand::Logs {
            name,
            task: Some(task),
            follow,
        } => return task_logs(&client, &name, &task, follow),
        WsCommand::Attach { name, task } => {
            use std::os::unix::process::CommandExt;
            let host = crate::ssh_cmd::host_alias(&client, &name)?;
            let err = std::process::Command::new("ssh")
                .args(["-t", "-o"])
                .arg(format!("SetEnv={}={task}", warren_ssh::TASK_VARIABLE))
                .arg(&host)
                .exec();
            bail!(
                "cannot run ssh: {err} (after `warren ssh-config --write`, `ssh {host}` reaches it)"
            );
        }
        WsCommand::Open { name, folder } => {
            println!(
                "{}",
                crate::ssh_cmd::open_link(&client, &name, folder.as_deref())?
            );
            eprintln!("(needs the entries of `warren ssh-config --write`)");
        }
        WsCommand::Exec {
            name,
            stdin,
            user,
            workdir,
            command,
        } => {
            let input = if stdin {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                Some(s)
            } else {
                None
            };
            let out: warren_api::ExecResponse = client.post_as(
                &format!("/workspaces/{name}/exec"),
                &warren_api::ExecRequest {
                    argv: command,
                    stdin: input,
                    user,
                    cwd: workdir,
                    land_in: None,
                    env: Vec::new(),
                },
            )?;
            use std::io::Write;
            std::io::stdout().write_all(out.stdout.as_bytes())?;
            std::io::stderr().write_all(out.stderr.as_bytes())?;
            let code = out.exit_code;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The environment file's name as the repository has it: from the folder holding
/// `.devcontainer` when it is in one (its paths, such as `"context": ".."`, are relative to
/// that), else its own name.
fn env_file_name(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let from = parts
        .iter()
        .rposition(|p| p == ".devcontainer")
        .unwrap_or(parts.len().saturating_sub(1));
    parts[from..].join("/")
}

/// Prints a task's output; with `follow`, until the task ends.
fn task_logs(client: &Client, name: &str, task: &str, follow: bool) -> anyhow::Result<ExitCode> {
    use base64::Engine as _;
    use std::io::Write;
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        let chunk: warren_api::LogView = client.get_as(&format!(
            "/workspaces/{name}/tasks/{task}/log?offset={offset}"
        ))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(&chunk.data_base64)
            .context("the server sent a log that is not base64")?;
        out.write_all(&data)?;
        out.flush()?;
        let (next, more) = (chunk.next_offset, chunk.running);
        let caught_up = next == offset || data.is_empty();
        offset = next;
        if caught_up {
            if !follow || !more {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

pub fn key(cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    match cmd {
        KeyCommand::Add { name, file } => {
            let public_key = if file == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?
            };
            let public_key = public_key.trim();
            let challenge: warren_api::KeyChallenge = client.get_as("/keys/challenge")?;
            let signature =
                sign_key_challenge(&file, public_key, &challenge.namespace, &challenge.message)?;
            let key: warren_api::KeyView = client.post_as(
                "/keys",
                &warren_api::NewKey {
                    name: name.clone(),
                    public_key: public_key.to_owned(),
                    signature: Some(signature),
                },
            )?;
            println!("key {name} added ({})", key.fingerprint);
        }
        KeyCommand::Ls { json } => {
            return print_table(
                json,
                &client.get("/keys")?,
                &[("name", "NAME"), ("fingerprint", "FINGERPRINT")],
            );
        }
        KeyCommand::Rm { name } => {
            client.delete(&format!("/keys/{name}"))?;
            println!("key {name} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Register a host; run `WARREN_HOST_TOKEN=TOKEN warren agent --server URL` there
    Add { name: String },
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Take no new workspaces there, and move each of its workspaces to another host
    Drain { name: String },
    /// Take new workspaces there again
    Resume { name: String },
}

pub fn host(cmd: HostCommand) -> anyhow::Result<ExitCode> {
    let json = match cmd {
        HostCommand::Add { name } => {
            let client = Client::from_login()?;
            let host: warren_api::NewHostAnswer =
                client.post_as("/hosts", &warren_api::NewHost { name: name.clone() })?;
            println!("host {name} registered; on it, as root (the token is shown only now):");
            let trust = host
                .server_fingerprint
                .map(|f| format!(" --server-fingerprint {f}"))
                .unwrap_or_default();
            println!(
                "  WARREN_HOST_TOKEN={} warren agent --server {}{trust}",
                host.token,
                client.server()
            );
            if client.server().starts_with("http://") {
                println!(
                    "(an agent takes plain http:// only on this machine: for other hosts, serve \
                     HTTPS with `warren up --tls-cert --tls-key`, or give the https:// address \
                     of a proxy in front, and --server-ca FILE if its CA is not a public one)"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        HostCommand::Ls { json } => json,
        HostCommand::Drain { name } => {
            let drained: warren_api::DrainAnswer =
                Client::from_login()?.post_as(&format!("/hosts/{name}/drain"), &json!({}))?;
            println!("host {name} takes no new workspaces");
            for moving in &drained.moving {
                println!("  {} is moving to {}", moving.workspace, moving.host);
            }
            for refused in &drained.refused {
                println!("  {} stays: {}", refused.workspace, refused.error);
            }
            return Ok(if drained.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        HostCommand::Resume { name } => {
            Client::from_login()?.post(&format!("/hosts/{name}/resume"), &json!({}))?;
            println!("host {name} takes new workspaces again");
            return Ok(ExitCode::SUCCESS);
        }
    };
    print_table(
        json,
        &Client::from_login()?.get("/hosts")?,
        &[
            ("name", "NAME"),
            ("workspaces", "WORKSPACES"),
            ("load1", "LOAD"),
            ("cpus", "CPUS"),
            ("draining", "DRAINING"),
        ],
    )
}

pub fn job(cmd: ListCommand) -> anyhow::Result<ExitCode> {
    let ListCommand::Ls { json } = cmd;
    print_table(
        json,
        &Client::from_login()?.get("/jobs")?,
        &[
            ("kind", "KIND"),
            ("workspace", "WORKSPACE"),
            ("state", "STATE"),
            ("attempts", "ATTEMPTS"),
            ("last_error", "LAST ERROR"),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_password_is_found_where_urls_keep_it() {
        assert!(url_has_password(
            "postgres://warren:s3cret@db.example/warren"
        ));
        assert!(url_has_password("postgres://warren:p@ss@db/warren"));
        assert!(!url_has_password("postgres://warren@db.example/warren"));
        assert!(!url_has_password("sqlite:///var/lib/warren/warren.db"));
        assert!(!url_has_password("postgres://db.example/warren?user=a:b"));
        assert!(url_has_password(
            "postgres://warren@db/warren?sslmode=require&password=hunter2"
        ));
        assert!(url_has_password("postgres://db/warren?Password=x"));
        assert!(url_has_password("postgres://db/warren?%70assword=x"));
        assert!(!url_has_password("postgres://db/warren?passwordless=1"));
        assert_eq!(
            shown_database("postgres://warren:p@ss@db:5433/warren?password=p@ss&sslmode=require"),
            "postgres://db:5433/warren"
        );
        assert_eq!(
            shown_database("sqlite:///var/lib/warren/warren.db?mode=rwc"),
            "sqlite:///var/lib/warren/warren.db"
        );
    }

    #[test]
    fn environment_files_are_named_as_in_their_repository() {
        assert_eq!(env_file_name(Path::new("/r/app/hocus.yml")), "hocus.yml");
        assert_eq!(
            env_file_name(Path::new("/r/app/.devcontainer/devcontainer.json")),
            ".devcontainer/devcontainer.json"
        );
        assert_eq!(
            env_file_name(Path::new("app/.devcontainer/python/devcontainer.json")),
            ".devcontainer/python/devcontainer.json"
        );
    }
}
