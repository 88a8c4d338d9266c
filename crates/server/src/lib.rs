//! Warren's control plane: the REST API (`/api/v1`), the database, users and tokens, projects,
//! workspaces as stored state machines, and durable jobs that the host agent carries out.
//!
//! On a single host (`warren up`) the caller runs the host's agent in this process, claiming
//! jobs straight from the database ([`Started::plane`]), and gives the host's API
//! ([`SingleHost::host_api`]). This crate owns no workspace mechanics (`warren-runtime`) and
//! no job execution (`warren-agent`).

pub mod agents;
pub mod api;
pub mod auth;
pub mod client;
pub mod db;
pub mod error;
pub mod gateway;
pub mod git;
pub mod idle;
pub mod jobs;
pub mod key_proof;
pub mod links;
pub mod logins;
pub mod model;
pub mod plane;
pub mod prebuilds;
pub mod preview;
pub mod replicas;
pub mod secrets;
pub mod state;
pub mod tls;
mod ui;
pub mod workspaces;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::sync::Notify;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::db::{Db, new_id, now_ms};
use crate::error::ApiError;
pub use crate::error::ServerError;
pub use crate::state::AppState;
use warren_api::SshView;

/// Largest request body (names, keys and exec stdin; not files).
const BODY_LIMIT: usize = 1 << 20;

/// The API's routes with the OpenAPI document made from them: a route is in the document
/// because it is registered through its `#[utoipa::path]`, never beside it.
fn api_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(api::login))
        .routes(routes!(api::me))
        .routes(routes!(api::set_my_idle_timeout))
        .routes(routes!(api::list_users, api::create_user))
        .routes(routes!(api::update_user))
        .routes(routes!(api::list_tokens))
        .routes(routes!(api::delete_token))
        .routes(routes!(api::list_keys, api::add_key))
        .routes(routes!(api::key_challenge))
        .routes(routes!(api::delete_key))
        .routes(routes!(api::list_projects, api::create_project))
        .routes(routes!(
            api::get_project,
            api::delete_project,
            api::update_project
        ))
        .routes(routes!(api::list_workspaces, api::create_workspace))
        .routes(routes!(api::get_workspace, api::delete_workspace))
        .routes(routes!(api::start_workspace))
        .routes(routes!(api::retry_workspace))
        .routes(routes!(api::move_workspace))
        .routes(routes!(api::drain_host))
        .routes(routes!(api::resume_host))
        .routes(routes!(api::workspace_jobs))
        .routes(routes!(api::set_workspace_idle_timeout))
        .routes(routes!(api::list_ports))
        .routes(routes!(api::set_port_access))
        .routes(routes!(api::stop_workspace))
        .routes(routes!(api::exec_workspace))
        .routes(routes!(api::list_tasks))
        .routes(routes!(api::task_log))
        .routes(routes!(api::project_branches))
        .routes(routes!(api::set_project_idle_timeout))
        .routes(routes!(api::refresh_project))
        .routes(routes!(api::git_hook))
        .routes(routes!(api::list_vars, api::set_var))
        .routes(routes!(api::delete_var))
        .routes(routes!(api::list_hosts, api::add_host))
        .routes(routes!(api::agent_claim))
        .routes(routes!(api::agent_finish))
        .routes(routes!(api::agent_log))
        .routes(routes!(api::agent_tunnel))
        .routes(routes!(api::agent_servers))
        .routes(routes!(api::list_prebuilds, api::create_prebuild))
        .routes(routes!(api::get_prebuild))
        .routes(routes!(api::prebuild_log))
        .routes(routes!(api::cancel_prebuild))
        .routes(routes!(api::retry_prebuild))
        .routes(routes!(api::list_jobs))
        .routes(routes!(api::ssh_gateway))
        .routes(routes!(openapi))
        .split_for_parts();
    add_error_responses(&mut doc);
    (router, doc)
}

/// The document's frame: title, version and how callers authenticate.
#[derive(utoipa::OpenApi)]
#[openapi(
    components(schemas(warren_api::ErrorBody)),
    info(title = "Warren", description = "Warren's control plane: users, projects, workspaces, prebuilds and hosts. Errors answer `{\"error\": message}`."),
    modifiers(&Security))]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let bearer = |what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(what))
                    .build(),
            )
        };
        use utoipa::openapi::security::SecurityRequirement;
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("token", bearer("a user's API token (wrn_...)"));
        components.add_security_scheme("host", bearer("a host's agent token (wrh_...)"));
        // A user's token unless an operation says otherwise (login, webhooks, agents).
        doc.security = Some(vec![SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
    }
}

/// Gives every operation the one shape its errors have (`4XX`: `{"error": message}`).
fn add_error_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, Response, ResponseBuilder};
    // Every operation's errors have one shape.
    let error: RefOr<Response> = ResponseBuilder::new()
        .description("What was wrong: `{\"error\": message}`")
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into();
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .insert("4XX".to_owned(), error.clone());
        }
    }
}

/// The OpenAPI document of every route ([`router`] serves it at `/api/v1/openapi.json`).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes().1
}

pub fn router(state: AppState) -> Router {
    api_routes()
        .0
        .merge(ui::routes())
        .fallback(|uri: axum::http::Uri| async move {
            if uri.path().starts_with("/api/") {
                axum::response::IntoResponse::into_response(ApiError::not_found(
                    "such endpoint (see /api/v1/openapi.json)",
                ))
            } else {
                ui::not_found()
            }
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// This document
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = OK, description = "This document (OpenAPI 3.1)")),
    security(()))]
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(openapi_document())
}

/// A single-host Warren: API, database and the in-process agent.
#[derive(Clone)]
pub struct SingleHost {
    pub database_url: String,
    pub listen: SocketAddr,
    pub host_name: String,
    /// This host's API (`warren_agent::host_api`): exec, tasks and their logs, task terminals.
    pub host_api: Router,
    /// How often every project's branch heads are read.
    pub git_poll: std::time::Duration,
    /// The key that seals secrets (created at first start, mode 0600).
    pub secret_key: std::path::PathBuf,
    /// Registries (`HOST[:PORT]`) the admin trusts: the only ones a user may name an image on.
    pub trusted_registries: Vec<String>,
    /// Where succeeded prebuilds are pushed (`HOST[:PORT]/REPO`), so that every host starts
    /// their workspaces lazily from there; `None`: a prebuild stays on the host that made it.
    pub registry: Option<String>,
    /// Whether a workspace's image can be had on this host (asked at create and before each
    /// start).
    pub image_check: Option<warren_protocol::ImageCheck>,
    /// How developers reach the SSH gateway, when the caller runs one (with
    /// [`Started::gateway`]).
    pub ssh: Option<SshView>,
    /// Where the server keeps its mirrors of project repositories.
    pub git_mirrors: std::path::PathBuf,
    /// Folders whose repositories any user may add as `file://` projects.
    pub file_repos: Vec<std::path::PathBuf>,
    /// Reverse proxies whose `X-Forwarded-For` names the client (see [`client`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// When idle workspaces stop (and stopped ones go).
    pub idle: idle::IdlePolicy,
    /// Where preview URLs are served (`None`: nowhere), and the start of their URLs when set.
    pub preview_listen: Option<SocketAddr>,
    pub preview_url: Option<String>,
    /// Host-based previews under this domain (`<port>-<workspace id>.<domain>`).
    pub preview_domain: Option<String>,
    /// Serve HTTPS with this certificate and key (both listeners); else plain HTTP.
    pub tls: Option<tls::TlsFiles>,
    /// Where agents reach this server, when it is one of several replicas on one database:
    /// every host then keeps a tunnel to each replica.
    pub advertise_url: Option<String>,
    /// How long a host may go without reporting before its workspaces are marked lost.
    pub host_lost_after: std::time::Duration,
    /// How often running workspaces' layers are saved to the registry (`None`: only on stop).
    pub save_running_every: Option<std::time::Duration>,
}

/// Only the SSH gateway's directory (`warren gateway`), for a host whose agent runs elsewhere
/// in its own process, over the same database.
#[derive(Debug, Clone)]
pub struct GatewayOnly {
    pub database_url: String,
    pub host_name: String,
    pub secret_key: std::path::PathBuf,
    pub git_mirrors: std::path::PathBuf,
}

/// The directory of a gateway-only process and its host's id. Task terminals on other hosts
/// are not reached from it (their tunnels go to the API server).
pub async fn gateway_directory(
    config: GatewayOnly,
) -> Result<(gateway::GatewayDirectory, String), ServerError> {
    let secrets = secrets::SecretBox::open_or_create(&config.secret_key)
        .map_err(|e| ServerError::Other(e.to_string()))?;
    let db = Db::connect(&config.database_url).await?;
    let host_id = register_host(&db, &config.host_name).await?;
    let wake = Arc::new(Notify::new());
    let state = AppState {
        presence: idle::Presence::new(db.clone()),
        plane: Arc::new(plane::DbControlPlane {
            db: db.clone(),
            wake: wake.clone(),
            secrets: secrets.clone(),
            // The gateway claims no jobs.
            registry: None,
        }),
        db,
        wake,
        host_id: host_id.clone(),
        hosts: Arc::new(links::HostLinks::none()),
        trusted_registries: Arc::default(),
        // The gateway creates no workspaces.
        image_check: None,
        secrets,
        ssh: None,
        execs: Arc::default(),
        logins: Arc::default(),
        git_mirrors: config.git_mirrors,
        file_repos: Arc::default(),
        trusted_proxies: Arc::default(),
        // Idle workspaces are stopped by the API server's loop.
        idle: idle::IdlePolicy::default(),
        previews: preview::PreviewConfig::default(),
        https: false,
        server_fingerprint: None,
        registry: None,
        host_lost_after: std::time::Duration::from_secs(60),
        preview_slots: Arc::default(),
        streams: Arc::default(),
    };
    Ok((gateway::GatewayDirectory { state }, host_id))
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
    /// Where preview URLs are served, when they are.
    pub preview_addr: Option<SocketAddr>,
    /// The first admin's password, when this start created it (shown once).
    pub admin_password: Option<String>,
    pub serve: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    pub shutdown: Arc<Notify>,
    /// The SSH gateway's directory, for the caller to serve the gateway with.
    pub gateway: gateway::GatewayDirectory,
    /// The control plane as this host's agent sees it: the caller runs the agent with it.
    pub plane: agents::InProcess,
    /// This host's id, for its agent.
    pub host_id: String,
    /// With `advertise_url`: a token for this host, made at this start, with which it opens
    /// tunnels to the other replicas (so they reach its workspaces).
    pub replica_token: Option<String>,
    /// The fingerprint of the certificate it serves HTTPS with (see `warren host add`).
    pub server_fingerprint: Option<String>,
    /// Wakes the agent when a job is queued.
    pub wake: Arc<Notify>,
}

pub async fn start(config: SingleHost) -> Result<Started, ServerError> {
    let secrets = secrets::SecretBox::open_or_create(&config.secret_key)
        .map_err(|e| ServerError::Other(e.to_string()))?;
    let db = Db::connect(&config.database_url).await?;
    secrets::check_key(&db, &secrets, &config.secret_key)
        .await
        .map_err(ServerError::Other)?;
    let admin_password = auth::bootstrap_admin(&db)
        .await
        .map_err(|e| ServerError::Other(e.message))?;
    let host_id = register_host(&db, &config.host_name).await?;
    let wake = Arc::new(Notify::new());
    let plane = Arc::new(plane::DbControlPlane {
        db: db.clone(),
        wake: wake.clone(),
        secrets: secrets.clone(),
        registry: config.registry.clone(),
    });
    let resumed = plane.resume_host(&host_id).await?;
    if resumed > 0 {
        tracing::info!(jobs = resumed, "resuming jobs cut short by the last stop");
    }
    let shutdown = Arc::new(Notify::new());
    tokio::spawn(git::poll_forever(
        db.clone(),
        config.git_mirrors.clone(),
        config.git_poll,
        wake.clone(),
    ));

    let (acceptor, server_fingerprint) = match &config.tls {
        Some(files) => {
            let (acceptor, fingerprint) = tls::acceptor(files).map_err(ServerError::Other)?;
            (Some(acceptor), Some(fingerprint))
        }
        None => (None, None),
    };
    let preview_listener = match config.preview_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Listen { addr, source })?,
        ),
        None => None,
    };
    let preview_addr = preview_listener.as_ref().and_then(|l| l.local_addr().ok());
    let state = AppState {
        presence: idle::Presence::new(db.clone()),
        idle: config.idle,
        previews: preview::PreviewConfig {
            port: preview_addr.map(|a| a.port()),
            // Whether browsers reach previews over HTTPS: served so, or behind a proxy whose
            // URL says so.
            https: acceptor.is_some()
                || config
                    .preview_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://")),
            url: config.preview_url,
            domain: config.preview_domain,
        },
        https: acceptor.is_some(),
        server_fingerprint,
        registry: config.registry.clone(),
        host_lost_after: config.host_lost_after,
        preview_slots: Arc::default(),
        streams: Arc::default(),
        db,
        wake,
        hosts: Arc::new(links::HostLinks::new(Some((
            host_id.clone(),
            config.host_api,
        )))),
        host_id,
        trusted_registries: Arc::new(config.trusted_registries),
        image_check: config.image_check.clone(),
        secrets,
        plane,
        ssh: config.ssh,
        execs: Arc::default(),
        logins: Arc::default(),
        git_mirrors: config.git_mirrors,
        file_repos: Arc::new(config.file_repos),
        trusted_proxies: Arc::new(config.trusted_proxies),
    };
    tokio::spawn(idle::stop_idle_forever(state.clone()));
    tokio::spawn(workspaces::moves::mark_lost_forever(
        state.clone(),
        config.host_lost_after,
    ));
    if let Some(every) = config.save_running_every {
        tokio::spawn(workspaces::moves::save_running_forever(
            state.clone(),
            every,
        ));
    }
    let (plane_state, plane_host, plane_wake, plane_fingerprint) = (
        state.clone(),
        state.host_id.clone(),
        state.wake.clone(),
        state.server_fingerprint.clone(),
    );
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
    if let Some(listener) = preview_listener {
        tokio::spawn(serve(
            listener,
            preview::router(state.clone()),
            acceptor.clone(),
            shutdown.clone(),
        ));
    }
    // One of several replicas: said where it is reached, and its host gets a token for its
    // tunnels to the others.
    let replica_token = match &config.advertise_url {
        Some(url) => {
            let replica = replicas::local_id(&config.secret_key.with_file_name("replica.id"))
                .map_err(ServerError::Other)?;
            replicas::claim_host(&state.db, &state.host_id, &config.host_name, &replica)
                .await
                .map_err(ServerError::Other)?;
            tokio::spawn(replicas::advertise(
                state.db.clone(),
                replica,
                url.clone(),
                state.host_id.clone(),
                shutdown.clone(),
            ));
            let token = auth::new_token().0.replacen("wrn_", "wrh_", 1);
            sqlx::query("UPDATE hosts SET token_hash = $2, replica = 1 WHERE id = $1")
                .bind(&state.host_id)
                .bind(auth::token_hash(&token))
                .execute(&state.db.pool)
                .await?;
            Some(token)
        }
        None => None,
    };
    let serve = tokio::spawn(serve(listener, router(state), acceptor, shutdown.clone()));
    Ok(Started {
        addr,
        preview_addr,
        admin_password,
        serve,
        shutdown,
        gateway: gateway::GatewayDirectory {
            state: plane_state.clone(),
        },
        plane: agents::InProcess { state: plane_state },
        host_id: plane_host,
        wake: plane_wake,
        replica_token,
        server_fingerprint: plane_fingerprint,
    })
}

/// Serves `app` on `listener` (over TLS when there is an acceptor) until `stop` is notified.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stop: Arc<Notify>,
) -> Result<(), std::io::Error> {
    match acceptor {
        Some(acceptor) => {
            tls::serve(listener, acceptor, app, stop).await;
            Ok(())
        }
        None => {
            use axum::serve::ListenerExt as _;
            // Small writes go out at once: an agent's tunnel carries request-answer traffic
            // (an sftp client's reads, typed keys) that Nagle's algorithm would hold back.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.notified().await })
            .await
        }
    }
}

async fn register_host(db: &Db, name: &str) -> Result<String, sqlx::Error> {
    if let Some(id) = sqlx::query_scalar::<_, String>("SELECT id FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_optional(&db.pool)
        .await?
    {
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

#[cfg(test)]
mod tests {
    /// The document clients are written against, as checked in: a change to a route or a
    /// type shows up here, to be looked at and then checked in with
    /// `WARREN_UPDATE_OPENAPI=1 cargo test -p warren-server openapi`.
    #[test]
    fn the_openapi_document_is_the_checked_in_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = super::openapi_document()
            .to_pretty_json()
            .expect("the document serializes")
            + "\n";
        if std::env::var_os("WARREN_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).expect("docs/openapi.json is writable");
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "the API changed: review `git diff docs/openapi.json` after \
             `WARREN_UPDATE_OPENAPI=1 cargo test -p warren-server openapi`"
        );
    }
}
