//! Hosts, their agents' job endpoints, and the job list.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use super::{Body, check_name};
use crate::auth::Caller;
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use warren_api::{
    AgentServers, DrainAnswer, DrainMove, DrainRefusal, HostView, JobView, LogAnswer, LogRequest,
    NewHost, NewHostAnswer,
};

/// Registers a host for `warren agent`; its token is shown once.
#[utoipa::path(post, path = "/api/v1/hosts", tag = "hosts",
    summary = "Register a host for `warren agent`; its token is shown once (admin)",
    request_body = NewHost,
    responses((status = CREATED, body = NewHostAnswer)))]
pub async fn add_host(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewHost>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    check_name("host", &req.name)?;
    // Host tokens look like user tokens with another prefix, so neither passes for the other.
    let token = crate::auth::new_token().0.replacen("wrn_", "wrh_", 1);
    let id = new_id();
    sqlx::query("INSERT INTO hosts (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(&req.name)
        .bind(crate::auth::token_hash(&token))
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewHostAnswer {
            id,
            name: req.name,
            token,
            server_fingerprint: state.server_fingerprint.clone(),
        }),
    ))
}

/// An agent on another host, authenticated by its host token.
#[derive(Debug)]
pub struct AgentHost {
    pub host_id: String,
}

impl axum::extract::FromRequestParts<AppState> for AgentHost {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| t.starts_with("wrh_"))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "agents send their host token (warren host add)",
                )
            })?;
        let host_id = sqlx::query_scalar("SELECT id FROM hosts WHERE token_hash = $1")
            .bind(crate::auth::token_hash(token.trim()))
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unknown host token"))?;
        Ok(Self { host_id })
    }
}

/// Drain a host: it takes no new workspaces, and each of its workspaces moves to another (admin)
///
/// Each move stops the workspace, saves its writable layer to the server's registry and makes
/// it anew on the best other host over that layer; a running one runs again there.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/drain", tag = "hosts",
    params(("host" = String, Path, description = "The host's name")),
    responses((status = ACCEPTED, body = DrainAnswer)))]
pub async fn drain_host(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    let id = host_id(&state, &name).await?;
    let (moving, refused) = crate::workspaces::moves::drain(&state, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(DrainAnswer {
            moving: moving
                .into_iter()
                .map(|(workspace, host)| DrainMove { workspace, host })
                .collect(),
            refused: refused
                .into_iter()
                .map(|(workspace, error)| DrainRefusal { workspace, error })
                .collect(),
        }),
    ))
}

/// A drained host takes new workspaces again (admin)
#[utoipa::path(post, path = "/api/v1/hosts/{host}/resume", tag = "hosts",
    params(("host" = String, Path, description = "The host's name")),
    responses((status = NO_CONTENT)))]
pub async fn resume_host(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let id = host_id(&state, &name).await?;
    sqlx::query("UPDATE hosts SET draining = 0 WHERE id = $1")
        .bind(&id)
        .execute(&state.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The id of the host named `name`.
async fn host_id(state: &AppState, name: &str) -> ApiResult<String> {
    sqlx::query_scalar("SELECT id FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("host `{name}`")))
}

/// The server replicas an agent keeps tunnels to (host token)
///
/// Every replica that says where agents reach it (`--advertise-url`) and was alive in the last
/// 20 s: each host keeps a tunnel to each, so any replica reaches any workspace, and an agent
/// whose server went away goes on with another.
#[utoipa::path(get, path = "/api/v1/agent/servers", tag = "agent",
    responses((status = OK, body = AgentServers)),
    security(("host" = [])))]
pub async fn agent_servers(
    State(state): State<AppState>,
    _host: AgentHost,
) -> ApiResult<Json<AgentServers>> {
    Ok(Json(AgentServers {
        servers: crate::replicas::live(&state.db).await?,
    }))
}

/// An agent opens its host's tunnel (host token)
///
/// After `101 Switching Protocols` the connection carries HTTP/2 the other way: the control
/// plane calls the host's API (exec, tasks, task logs, attach) through it.
#[utoipa::path(get, path = "/api/v1/agent/tunnel", tag = "agent",
    responses((status = SWITCHING_PROTOCOLS, description = "The tunnel is open (`Upgrade: warren-host-tunnel`)")),
    security(("host" = [])))]
pub async fn agent_tunnel(
    State(state): State<AppState>,
    host: AgentHost,
    mut request: axum::extract::Request,
) -> ApiResult<axum::response::Response> {
    use axum::http::header::{CONNECTION, UPGRADE};
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use warren_protocol::tunnel::{KEEP_ALIVE, PROTOCOL};
    let asked = request
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case(PROTOCOL));
    if !asked {
        return Err(ApiError::bad_request(format!(
            "the tunnel needs `Connection: upgrade` and `Upgrade: {PROTOCOL}`"
        )));
    }
    let upgrade = hyper::upgrade::on(&mut request);
    let host_id = host.host_id;
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::warn!(host = %host_id, error = %e, "a host's tunnel did not open");
                return;
            }
        };
        let opened = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE)
            .keep_alive_while_idle(true)
            .max_frame_size(warren_protocol::tunnel::MAX_FRAME_SIZE)
            .handshake::<_, axum::body::Body>(upgraded)
            .await;
        let (sender, connection) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(host = %host_id, error = %e, "a host's tunnel did not open");
                return;
            }
        };
        let number = state.hosts.opened(&host_id, sender);
        tracing::info!(host = %host_id, "host tunnel open");
        if let Err(e) = connection.await {
            tracing::info!(host = %host_id, error = %e, "host tunnel ended");
        }
        state.hosts.closed(&host_id, number);
    });
    axum::response::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, PROTOCOL)
        .body(axum::body::Body::empty())
        .map_err(|e| ApiError::internal("tunnel", e))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    #[serde(default)]
    report: Option<warren_protocol::HostReport>,
    /// Whether the agent has a prebuild slot free (older agents do not say: yes).
    #[serde(default = "yes")]
    prebuilds: bool,
}

fn yes() -> bool {
    true
}

/// An agent claims its host's next job (host token)
#[utoipa::path(post, path = "/api/v1/agent/claim", tag = "agent",
    request_body(content = Object, description = "`{\"report\": HostReport?, \"prebuilds\": bool}` (warren-protocol's types)"),
    responses((status = OK, description = "The job (warren-protocol's `Job`)"), (status = NO_CONTENT, description = "Nothing to do")),
    security(("host" = [])))]
pub async fn agent_claim(
    State(state): State<AppState>,
    host: AgentHost,
    Body(req): Body<ClaimRequest>,
) -> ApiResult<axum::response::Response> {
    let job = crate::agents::claim(&state, &host.host_id, req.report, req.prebuilds)
        .await
        .map_err(|e| ApiError::internal("claiming a job", e))?;
    Ok(match job {
        Some(job) => Json(job).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    job: String,
    result: Result<warren_protocol::Outcome, warren_protocol::Failure>,
}

/// An agent reports how a job went (host token)
#[utoipa::path(post, path = "/api/v1/agent/finish", tag = "agent",
    request_body(content = Object, description = "`{\"job\": id, \"result\": {\"Ok\": Outcome} | {\"Err\": message}}` (warren-protocol's types)"),
    responses((status = NO_CONTENT, description = "Done")),
    security(("host" = [])))]
pub async fn agent_finish(
    State(state): State<AppState>,
    host: AgentHost,
    Body(req): Body<FinishRequest>,
) -> ApiResult<StatusCode> {
    let job = state
        .plane
        .held_job(&host.host_id, &req.job)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("job `{}` held by this host", req.job)))?;
    state.plane.finish_job(&job, req.result).await?;
    state.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// An agent adds to a running prebuild's log; answers whether to go on (host token)
#[utoipa::path(post, path = "/api/v1/agent/log", tag = "agent",
    request_body = LogRequest,
    responses((status = OK, body = LogAnswer)),
    security(("host" = [])))]
pub async fn agent_log(
    State(state): State<AppState>,
    host: AgentHost,
    Body(req): Body<LogRequest>,
) -> ApiResult<Json<LogAnswer>> {
    state
        .plane
        .held_job(&host.host_id, &req.job)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("job `{}` held by this host", req.job)))?;
    // A host busy with long jobs claims nothing for a while: this says it is alive.
    state.plane.seen(&host.host_id, None).await?;
    let go_on = state
        .plane
        .append_log(&req.job, req.text.as_bytes())
        .await?;
    Ok(Json(LogAnswer { go_on }))
}

#[derive(sqlx::FromRow)]
struct HostRow {
    id: String,
    name: String,
    last_seen_at: Option<i64>,
    workspaces: i64,
    /// JSON of its agent's last `HostLoad`.
    load_report: Option<String>,
    draining: i64,
}

/// Hosts (admin)
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    responses((status = OK, body = Vec<HostView>)))]
pub async fn list_hosts(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<HostView>>> {
    caller.require_admin()?;
    let rows = sqlx::query_as::<_, HostRow>(
        "SELECT h.id, h.name, h.last_seen_at, (SELECT COUNT(*) FROM workspaces w WHERE w.host_id = h.id) AS workspaces, h.load_report,
         h.draining FROM hosts h ORDER BY h.name",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let hosts = rows
        .into_iter()
        .map(|h| {
            let load: Option<warren_protocol::HostLoad> = h
                .load_report
                .and_then(|text| serde_json::from_str(&text).ok());
            HostView {
                id: h.id,
                name: h.name,
                workspaces: h.workspaces,
                last_seen_at: h.last_seen_at,
                load1: load.map(|l| l.load1),
                cpus: load.map(|l| l.cpus),
                memory_total: load.map(|l| l.memory_total),
                memory_available: load.map(|l| l.memory_available),
                draining: h.draining != 0,
            }
        })
        .collect();
    Ok(Json(hosts))
}

pub(crate) const JOB_COLUMNS: &str = "j.id, j.kind, w.name AS workspace, j.state, j.attempts, j.last_error, j.created_at, j.finished_at
    FROM jobs j LEFT JOIN workspaces w ON w.id = j.workspace_id";

/// Recent jobs of the caller's workspaces (all jobs, for an admin)
#[utoipa::path(get, path = "/api/v1/jobs", tag = "hosts",
    responses((status = OK, body = Vec<JobView>)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<JobView>>> {
    let jobs = sqlx::query_as::<_, JobView>(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} WHERE $2 = 1 OR w.owner_id = $1 ORDER BY j.created_at DESC LIMIT 200"
    )))
    .bind(&caller.user_id)
    .bind(i64::from(caller.is_admin))
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(jobs))
}
