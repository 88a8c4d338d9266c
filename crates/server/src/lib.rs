//! Warren's control plane: the REST API (`/api/v1`), the database, users and tokens, projects,
//! workspaces as stored state machines, and durable jobs that the host agent carries out.
//!
//! On a single host (`warren up`) the agent runs in this process and claims jobs straight from
//! the database; the runtime it drives is given by the caller. This crate owns no workspace
//! mechanics (`warren-runtime`) and no job execution (`warren-agent`).

pub mod api;
pub mod auth;
pub mod db;
pub mod error;
pub mod gateway;
pub mod git;
pub mod jobs;
pub mod model;
pub mod prebuilds;
pub mod secrets;
pub mod workspaces;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, patch, post};
use sqlx::Row;
use tokio::sync::Notify;
use warren_agent::Agent;
use warren_runtime::Runtime;

use crate::db::{Db, new_id, now_ms};
use crate::error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// Wakes the agent when a job is queued.
    pub wake: Arc<Notify>,
    /// This process's host (where new workspaces go on a single host).
    pub host_id: String,
    /// The local runtime, for exec (single host).
    pub runtime: Option<Arc<dyn Runtime>>,
    /// Seals and opens secret values.
    pub secrets: secrets::SecretBox,
    /// The jobs, as agents see them (in process, or through the agent endpoints).
    pub plane: Arc<jobs::DbControlPlane>,
    /// How developers reach the SSH gateway, when this process runs one.
    pub ssh: Option<api::SshView>,
    /// Failed logins, to slow guessing down.
    pub logins: Arc<auth::LoginThrottle>,
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

/// Largest request body (names, keys and exec stdin; not files).
const BODY_LIMIT: usize = 1 << 20;

/// Every route: the router below and the OpenAPI document are both built from it.
const ROUTES: &[(&str, &str, &str)] = &[
    (
        "post",
        "/api/v1/login",
        "Exchange a user name and password for an API token",
    ),
    ("get", "/api/v1/me", "The calling user"),
    ("get", "/api/v1/users", "All users (admin)"),
    ("post", "/api/v1/users", "Create a user (admin)"),
    ("get", "/api/v1/tokens", "The caller's API tokens"),
    (
        "delete",
        "/api/v1/tokens/{id}",
        "Revoke one of the caller's tokens",
    ),
    ("get", "/api/v1/keys", "The caller's SSH public keys"),
    (
        "post",
        "/api/v1/keys",
        "Add an SSH public key, with a signature proving the caller holds it",
    ),
    (
        "get",
        "/api/v1/keys/challenge",
        "What the caller signs with a key to add it (SSHSIG namespace and message)",
    ),
    (
        "delete",
        "/api/v1/keys/{key}",
        "Remove an SSH public key (by id or name)",
    ),
    ("get", "/api/v1/projects", "Projects the caller may see"),
    (
        "post",
        "/api/v1/projects",
        "Add a project (a git repository)",
    ),
    (
        "get",
        "/api/v1/projects/{project}",
        "One project (by id or name)",
    ),
    ("delete", "/api/v1/projects/{project}", "Remove a project"),
    (
        "get",
        "/api/v1/projects/{project}/branches",
        "The project's branches and their head commits",
    ),
    (
        "post",
        "/api/v1/projects/{project}/refresh",
        "Read the project's branch heads now",
    ),
    (
        "post",
        "/api/v1/hooks/git/{id}",
        "Git webhook (`?secret=` from the project's creation): read branch heads now",
    ),
    ("get", "/api/v1/workspaces", "Workspaces the caller may see"),
    (
        "post",
        "/api/v1/workspaces",
        "Create a workspace from an image (202: it starts in the background)",
    ),
    (
        "get",
        "/api/v1/workspaces/{workspace}",
        "One workspace (by id or name)",
    ),
    (
        "delete",
        "/api/v1/workspaces/{workspace}",
        "Delete a workspace",
    ),
    (
        "post",
        "/api/v1/workspaces/{workspace}/start",
        "Start a workspace",
    ),
    (
        "post",
        "/api/v1/workspaces/{workspace}/stop",
        "Stop a workspace (`force` kills at once)",
    ),
    (
        "post",
        "/api/v1/workspaces/{workspace}/exec",
        "Run a command to its end and return its output",
    ),
    (
        "get",
        "/api/v1/workspaces/{workspace}/tasks",
        "The workspace's tasks and how each is doing",
    ),
    (
        "get",
        "/api/v1/workspaces/{workspace}/tasks/{task}/log",
        "A task's output from `?offset=` (base64), where to continue, and whether more may come",
    ),
    (
        "get",
        "/api/v1/env",
        "Environment variables of the caller (or of `?project=`); secrets' values are never returned",
    ),
    (
        "post",
        "/api/v1/env",
        "Set a variable (`secret: true` seals it at rest)",
    ),
    (
        "delete",
        "/api/v1/env/{name}",
        "Remove a variable (of the caller, or of `?project=`)",
    ),
    ("get", "/api/v1/hosts", "Hosts (admin)"),
    (
        "post",
        "/api/v1/hosts",
        "Register a host for `warren agent`; its token is shown once (admin)",
    ),
    (
        "post",
        "/api/v1/agent/claim",
        "An agent claims its host's next job (host token)",
    ),
    (
        "post",
        "/api/v1/agent/finish",
        "An agent reports how a job went (host token)",
    ),
    (
        "post",
        "/api/v1/agent/log",
        "An agent adds to a running prebuild's log; answers whether to go on (host token)",
    ),
    (
        "get",
        "/api/v1/projects/{project}/prebuilds",
        "The project's prebuilds, newest first, with how far each is behind its branch",
    ),
    (
        "post",
        "/api/v1/projects/{project}/prebuilds",
        "Prebuild a branch's head now ({branch}; the default branch when absent)",
    ),
    ("get", "/api/v1/prebuilds/{id}", "One prebuild"),
    (
        "get",
        "/api/v1/prebuilds/{id}/log",
        "A prebuild's log from ?offset= on; `done` once it ended",
    ),
    (
        "post",
        "/api/v1/prebuilds/{id}/cancel",
        "Stop a queued or running prebuild",
    ),
    (
        "post",
        "/api/v1/prebuilds/{id}/retry",
        "A new prebuild of a failed or cancelled one's commit",
    ),
    (
        "get",
        "/api/v1/jobs",
        "Recent jobs of the caller's workspaces",
    ),
    (
        "get",
        "/api/v1/ssh",
        "The SSH gateway's address and host key (for `warren ssh-config`)",
    ),
    ("get", "/api/v1/openapi.json", "This document"),
];

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/login", post(api::login))
        .route("/api/v1/me", get(api::me))
        .route("/api/v1/users", get(api::list_users).post(api::create_user))
        .route("/api/v1/users/{user}", patch(api::update_user))
        .route("/api/v1/tokens", get(api::list_tokens))
        .route("/api/v1/tokens/{id}", delete(api::delete_token))
        .route("/api/v1/keys", get(api::list_keys).post(api::add_key))
        .route("/api/v1/keys/challenge", get(api::key_challenge))
        .route("/api/v1/keys/{key}", delete(api::delete_key))
        .route(
            "/api/v1/projects",
            get(api::list_projects).post(api::create_project),
        )
        .route(
            "/api/v1/projects/{project}",
            get(api::get_project)
                .delete(api::delete_project)
                .patch(api::update_project),
        )
        .route(
            "/api/v1/workspaces",
            get(api::list_workspaces).post(api::create_workspace),
        )
        .route(
            "/api/v1/workspaces/{workspace}",
            get(api::get_workspace).delete(api::delete_workspace),
        )
        .route(
            "/api/v1/workspaces/{workspace}/start",
            post(api::start_workspace),
        )
        .route(
            "/api/v1/workspaces/{workspace}/stop",
            post(api::stop_workspace),
        )
        .route(
            "/api/v1/workspaces/{workspace}/exec",
            post(api::exec_workspace),
        )
        .route("/api/v1/workspaces/{workspace}/tasks", get(api::list_tasks))
        .route(
            "/api/v1/workspaces/{workspace}/tasks/{task}/log",
            get(api::task_log),
        )
        .route(
            "/api/v1/projects/{project}/branches",
            get(api::project_branches),
        )
        .route(
            "/api/v1/projects/{project}/refresh",
            post(api::refresh_project),
        )
        .route("/api/v1/hooks/git/{id}", post(api::git_hook))
        .route("/api/v1/env", get(api::list_vars).post(api::set_var))
        .route("/api/v1/env/{name}", delete(api::delete_var))
        .route("/api/v1/hosts", get(api::list_hosts).post(api::add_host))
        .route("/api/v1/agent/claim", post(api::agent_claim))
        .route("/api/v1/agent/finish", post(api::agent_finish))
        .route("/api/v1/agent/log", post(api::agent_log))
        .route(
            "/api/v1/projects/{project}/prebuilds",
            get(prebuilds::list).post(prebuilds::create),
        )
        .route("/api/v1/prebuilds/{id}", get(prebuilds::get))
        .route("/api/v1/prebuilds/{id}/log", get(prebuilds::log))
        .route("/api/v1/prebuilds/{id}/cancel", post(prebuilds::cancel))
        .route("/api/v1/prebuilds/{id}/retry", post(prebuilds::retry))
        .route("/api/v1/jobs", get(api::list_jobs))
        .route("/api/v1/ssh", get(api::ssh_gateway))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("such endpoint (see /api/v1/openapi.json)") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn openapi() -> axum::Json<serde_json::Value> {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        let mut op = serde_json::json!({
            "summary": summary,
            "responses": {"default": {"description": "JSON; errors are {\"error\": message}"}},
        });
        if !path.ends_with("/login")
            && !path.ends_with("/openapi.json")
            && !path.contains("/hooks/")
        {
            op["security"] = serde_json::json!([{"token": []}]);
        }
        entry[*method] = op;
    }
    axum::Json(serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "Warren", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {
            "token": {"type": "http", "scheme": "bearer", "description": "a user's API token (wrn_...)"},
            "host": {"type": "http", "scheme": "bearer", "description": "a host's agent token (wrh_...)"},
        }},
        "paths": paths,
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// A single-host Warren: API, database and the in-process agent.
#[derive(Clone)]
pub struct SingleHost {
    pub database_url: String,
    pub listen: SocketAddr,
    pub host_name: String,
    pub runtime: Arc<dyn Runtime>,
    /// How often every project's branch heads are read.
    pub git_poll: std::time::Duration,
    /// The key that seals secrets (created at first start, mode 0600).
    pub secret_key: std::path::PathBuf,
    /// The images this host holds (for placing workspaces).
    pub images: warren_agent::ImageLister,
    /// How often settled workspaces are compared with what the runtime reports.
    pub reconcile_every: std::time::Duration,
    /// The SSH gateway, if this process runs one.
    pub ssh: Option<SshSettings>,
    /// Makes this host's prebuilds (`None`: other hosts make them).
    pub prebuilder: Option<Arc<dyn warren_agent::Prebuilder>>,
    /// Prebuilds this host makes at once, in slots of their own.
    pub prebuild_slots: usize,
    /// Where the server keeps its mirrors of project repositories.
    pub git_mirrors: std::path::PathBuf,
    /// Folders whose repositories any user may add as `file://` projects.
    pub file_repos: Vec<std::path::PathBuf>,
}

/// Where the SSH gateway listens and how developers reach it.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub listen: SocketAddr,
    /// The gateway's host key (made at first start, mode 0600).
    pub host_key: std::path::PathBuf,
    /// The name developers' machines know this host by (for `warren ssh-config`).
    pub public_host: String,
}

/// Starts the SSH gateway for `state`'s host; returns what the API tells developers about it.
async fn start_gateway(
    state: &mut AppState,
    settings: &SshSettings,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServerError> {
    let key = warren_ssh::load_or_create_host_key(&settings.host_key)
        .map_err(|e| ServerError::Other(e.to_string()))?;
    let directory = Arc::new(gateway::GatewayDirectory {
        state: state.clone(),
    });
    let (addr, task) = warren_ssh::listen(settings.listen, key.clone(), directory)
        .await
        .map_err(|e| ServerError::Other(e.to_string()))?;
    state.ssh = Some(api::SshView {
        host: settings.public_host.clone(),
        port: addr.port(),
        known_hosts: warren_ssh::known_hosts_line(&key, &settings.public_host, addr.port()),
    });
    Ok((addr, task))
}

/// Only the SSH gateway (`warren gateway`), for a host whose agent runs elsewhere in its own
/// process, over the same database.
#[derive(Debug, Clone)]
pub struct GatewayOnly {
    pub database_url: String,
    pub host_name: String,
    pub runtime: Arc<dyn Runtime>,
    pub secret_key: std::path::PathBuf,
    pub ssh: SshSettings,
    pub git_mirrors: std::path::PathBuf,
}

pub async fn serve_gateway(
    config: GatewayOnly,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServerError> {
    let secrets = secrets::SecretBox::open_or_create(&config.secret_key)
        .map_err(|e| ServerError::Other(e.to_string()))?;
    let db = Db::connect(&config.database_url).await?;
    let host_id = register_host(&db, &config.host_name).await?;
    let wake = Arc::new(Notify::new());
    let mut state = AppState {
        plane: Arc::new(jobs::DbControlPlane {
            db: db.clone(),
            wake: wake.clone(),
            secrets: secrets.clone(),
        }),
        db,
        wake,
        host_id,
        runtime: Some(config.runtime),
        secrets,
        ssh: None,
        logins: Arc::default(),
        git_mirrors: config.git_mirrors,
        file_repos: Arc::default(),
    };
    start_gateway(&mut state, &config.ssh).await
}

impl std::fmt::Debug for SingleHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleHost")
            .field("listen", &self.listen)
            .field("host_name", &self.host_name)
            .finish_non_exhaustive()
    }
}

/// A started server.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    /// The first admin's password, when this start created it (shown once).
    pub admin_password: Option<String>,
    pub serve: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    pub shutdown: Arc<Notify>,
    /// The SSH gateway's address and task, when it runs.
    pub ssh: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

pub async fn start(config: SingleHost) -> Result<Started, ServerError> {
    let secrets = secrets::SecretBox::open_or_create(&config.secret_key)
        .map_err(|e| ServerError::Other(e.to_string()))?;
    let db = Db::connect(&config.database_url).await?;
    let admin_password = auth::bootstrap_admin(&db)
        .await
        .map_err(|e| ServerError::Other(e.message))?;
    let host_id = register_host(&db, &config.host_name).await?;
    let wake = Arc::new(Notify::new());
    let plane = Arc::new(jobs::DbControlPlane {
        db: db.clone(),
        wake: wake.clone(),
        secrets: secrets.clone(),
    });
    let resumed = plane.resume_host(&host_id).await?;
    if resumed > 0 {
        tracing::info!(jobs = resumed, "resuming jobs cut short by the last stop");
    }
    workspaces::reconcile(
        &db,
        &host_id,
        workspaces::Actual::Runtime(config.runtime.clone()),
    )
    .await?;
    {
        // Again on a timer: a workspace can stop on its own (`poweroff` inside, a killed shim).
        let (db, host_id, runtime, wake) = (
            db.clone(),
            host_id.clone(),
            config.runtime.clone(),
            wake.clone(),
        );
        let every = config.reconcile_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match workspaces::reconcile(
                    &db,
                    &host_id,
                    workspaces::Actual::Runtime(runtime.clone()),
                )
                .await
                {
                    Ok(0) => {}
                    Ok(_) => wake.notify_one(),
                    Err(e) => tracing::warn!(error = %e, "cannot reconcile workspaces"),
                }
            }
        });
    }
    let shutdown = Arc::new(Notify::new());
    let agent = Agent::new(
        host_id.clone(),
        config.runtime.clone(),
        config.prebuilder.clone(),
        plane.clone(),
        wake.clone(),
        config.images.clone(),
    )
    .with_prebuild_slots(config.prebuild_slots);
    tokio::spawn(agent.run(shutdown.clone()));
    tokio::spawn(git::poll_forever(
        db.clone(),
        config.git_mirrors.clone(),
        config.git_poll,
        wake.clone(),
    ));

    let mut state = AppState {
        db,
        wake,
        host_id,
        runtime: Some(config.runtime),
        secrets,
        plane,
        ssh: None,
        logins: Arc::default(),
        git_mirrors: config.git_mirrors,
        file_repos: Arc::new(config.file_repos),
    };
    let ssh = match &config.ssh {
        Some(settings) => Some(start_gateway(&mut state, settings).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let stop = shutdown.clone();
    let serve = tokio::spawn(async move {
        axum::serve(
            listener,
            router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.notified().await })
        .await
    });
    Ok(Started {
        addr,
        admin_password,
        serve,
        shutdown,
        ssh,
    })
}

async fn register_host(db: &Db, name: &str) -> Result<String, sqlx::Error> {
    if let Some(row) = sqlx::query("SELECT id FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_optional(&db.pool)
        .await?
    {
        let id: String = row.try_get("id")?;
        sqlx::query("UPDATE hosts SET last_seen_at = $2 WHERE id = $1")
            .bind(&id)
            .bind(now_ms())
            .execute(&db.pool)
            .await?;
        return Ok(id);
    }
    let id = new_id();
    sqlx::query("INSERT INTO hosts (id, name, created_at, last_seen_at) VALUES ($1, $2, $3, $3)")
        .bind(&id)
        .bind(name)
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    Ok(id)
}
