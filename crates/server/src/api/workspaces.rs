//! Workspaces: created from an image or a branch's prebuild, started, stopped, deleted;
//! commands and task logs.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;

use super::projects::find_project;
use super::variables::workspace_env;
use super::{Body, pick_owned};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::model::{Desired, Event, WorkspaceState};
use crate::state::AppState;
use crate::workspaces::{self, Workspace, create};
use warren_api::{
    ExecRequest, ExecResponse, IdleTimeout, JobView, LogQuery, LogView, MoveRequest, NewWorkspace,
    PortChange, PortView, StopRequest, TaskState, TaskView, WorkspaceView,
};

// ---- workspaces ----

pub(crate) fn workspace_view(state: &AppState, w: &Workspace) -> WorkspaceView {
    let (idle_timeout, whence) = crate::idle::timeout_of(w, &state.idle);
    WorkspaceView {
        idle_timeout,
        idle_timeout_from: whence.to_owned(),
        last_active_at: w.last_active_at,
        stop_reason: w.stop_reason.clone(),
        placement: w.placement.clone(),
        saved_layer: w.saved_layer.clone(),
        saved_at: w.saved_at,
        moving_to: w.moving_to_host.clone(),
        id: w.id.0.clone(),
        name: w.name.clone(),
        owner: w.owner.clone(),
        project: w.project.clone(),
        image: w.image.clone(),
        host: w.host.clone(),
        state: w.state,
        desired: w.desired,
        last_error: w.last_error.clone(),
        memory: w.memory,
        cpus: w.cpus,
        disk: w.disk,
        created_at: w.created_at,
        updated_at: w.updated_at,
        stats_at: w.stats_at,
        user: w.run_as.clone(),
        folder: w.folder.clone(),
        prebuild: w.prebuild_id.clone(),
        branch: w.branch.clone(),
        behind: None,
        runtime: w.runtime.clone(),
        accel: w
            .stats
            .as_ref()
            .and_then(|s| s.pointer("/vm/accel"))
            .and_then(|a| a.as_str())
            .map(str::to_owned),
        stats: w.stats.clone(),
    }
}

/// The view, with how far the workspace's prebuild is behind its branch.
pub(crate) async fn workspace_view_now(state: &AppState, w: &Workspace) -> WorkspaceView {
    let mut view = workspace_view(state, w);
    if let (Some(commit), Some(head), Some(url)) = (&w.prebuild_commit, &w.branch_head, &w.git_url)
    {
        view.behind = crate::prebuilds::behind(&state.git_mirrors, url, commit, head).await;
    }
    view
}

/// The workspace `key` (an id, or a name) the caller may see.
pub(crate) async fn find_workspace(
    state: &AppState,
    caller: &Caller,
    key: &str,
) -> ApiResult<Workspace> {
    let found = workspaces::select(&state.db, "WHERE w.id = $1 OR w.name = $1", &[key]).await?;
    pick_owned(found, caller, key)
        .ok_or_else(|| ApiError::not_found(format_args!("workspace `{key}`")))
}

/// Workspaces the caller may see
#[utoipa::path(get, path = "/api/v1/workspaces", tag = "workspaces",
    responses((status = OK, body = Vec<WorkspaceView>)))]
pub async fn list_workspaces(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<WorkspaceView>>> {
    let found = visible_workspaces(&state, &caller).await?;
    let mut out = Vec::with_capacity(found.len());
    for w in &found {
        out.push(workspace_view_now(&state, w).await);
    }
    Ok(Json(out))
}

/// The workspaces the caller may see (admins: everybody's), by name.
pub(crate) async fn visible_workspaces(
    state: &AppState,
    caller: &Caller,
) -> ApiResult<Vec<Workspace>> {
    let admin = if caller.is_admin { "1" } else { "0" };
    let found = workspaces::select(
        &state.db,
        "WHERE w.owner_id = $1 OR $2 = '1' ORDER BY w.name, w.id",
        &[&caller.user_id, admin],
    )
    .await?;
    Ok(found)
}

/// One workspace (by id or name)
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = OK, body = WorkspaceView)))]
pub async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(
        workspace_view_now(&state, &find_workspace(&state, &caller, &key).await?).await,
    ))
}

/// Create a workspace from an image (202: it starts in the background)
#[utoipa::path(post, path = "/api/v1/workspaces", tag = "workspaces",
    request_body = NewWorkspace,
    responses((status = ACCEPTED, body = WorkspaceView, description = "Created; it starts in the background")))]
pub async fn create_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewWorkspace>,
) -> ApiResult<impl IntoResponse> {
    let row = create_as(&state, &caller, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(workspace_view_now(&state, &row).await),
    ))
}

/// Creates a workspace as `caller` (the API's and the UI's one way), which then starts.
pub(crate) async fn create_as(
    state: &AppState,
    caller: &Caller,
    req: NewWorkspace,
) -> ApiResult<Workspace> {
    let req = create::check(state, caller, req)?;
    let project = match &req.project() {
        Some(p) => {
            let project = find_project(state, caller, p).await?;
            Some(create::Project {
                id: project.id,
                git_url: project.git_url,
            })
        }
        None => None,
    };
    let id = create::create(state, caller, project, req).await?;
    find_workspace(state, caller, &id.0).await
}

/// Start a workspace
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/start", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = ACCEPTED, body = WorkspaceView)))]
pub async fn start_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let ws = find_workspace(&state, &caller, &key).await?;
    workspaces::request(&state, &ws, Event::Start).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&state, &ws))))
}

/// Move a workspace to another host (admin)
///
/// It is stopped, its writable layer saved to the server's registry, and made anew on `host`
/// over that layer, running again if it ran. A lost workspace starts there from its last
/// saved layer.
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/move", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    request_body = MoveRequest,
    responses((status = ACCEPTED, body = WorkspaceView)))]
pub async fn move_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<MoveRequest>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    let ws = find_workspace(&state, &caller, &key).await?;
    let to = workspaces::moves::target_host(&state, &req.host).await?;
    workspaces::moves::start_move(&state, &ws, &to).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&state, &ws))))
}

/// Ask again for what a failed workspace was asked last (to run, to stop, to go)
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/retry", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = ACCEPTED, body = WorkspaceView)))]
pub async fn retry_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let ws = find_workspace(&state, &caller, &key).await?;
    if ws.state != WorkspaceState::Failed {
        return Err(ApiError::conflict(format!(
            "workspace `{}` is {}: only a failed one is retried",
            ws.name, ws.state
        )));
    }
    let event = match ws.desired {
        Desired::Running => Event::Start,
        Desired::Stopped => Event::Stop {
            grace_ms: STOP_GRACE_S * 1000,
            force: false,
        },
        Desired::Deleted => Event::Delete,
    };
    workspaces::request(&state, &ws, event).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&state, &ws))))
}

/// The workspace's jobs, newest first: what was asked of its host, how often it was tried and
/// why it failed
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}/jobs", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = OK, body = Vec<JobView>)))]
pub async fn workspace_jobs(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<JobView>>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    let jobs = sqlx::query_as::<_, JobView>(sqlx::AssertSqlSafe(format!(
        "SELECT {} WHERE j.workspace_id = $1 ORDER BY j.created_at DESC, j.id LIMIT 100",
        super::hosts::JOB_COLUMNS
    )))
    .bind(&ws.id.0)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(jobs))
}

/// How long a stop waits for the workspace's processes to end before killing them.
pub(crate) const STOP_GRACE_S: u64 = 10;

/// Stop a workspace (`force` kills at once)
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/stop", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    request_body = StopRequest,
    responses((status = ACCEPTED, body = WorkspaceView)))]
pub async fn stop_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    body: Result<Json<StopRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    // An empty body is a plain stop.
    let req = match body {
        Ok(Json(r)) => r,
        Err(JsonRejection::MissingJsonContentType(_)) => StopRequest::default(),
        Err(e) => return Err(e.into()),
    };
    let ws = find_workspace(&state, &caller, &key).await?;
    let grace_ms = if req.force {
        0
    } else {
        req.grace_seconds.unwrap_or(STOP_GRACE_S).min(3600) * 1000
    };
    let stop = Event::Stop {
        grace_ms,
        force: req.force,
    };
    workspaces::request(&state, &ws, stop).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&state, &ws))))
}

/// Delete a workspace
#[utoipa::path(delete, path = "/api/v1/workspaces/{workspace}", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = ACCEPTED, body = WorkspaceView, description = "It is being deleted")))]
pub async fn delete_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let ws = find_workspace(&state, &caller, &key).await?;
    workspaces::request(&state, &ws, Event::Delete).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&state, &ws))))
}

/// Set how long it may stay unused before it is stopped
#[utoipa::path(put, path = "/api/v1/workspaces/{workspace}/idle-timeout", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    request_body = IdleTimeout,
    responses((status = OK, body = WorkspaceView)))]
pub async fn set_workspace_idle_timeout(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<IdleTimeout>,
) -> ApiResult<Json<WorkspaceView>> {
    let seconds = crate::idle::check_timeout(req.seconds)?;
    let ws = find_workspace(&state, &caller, &key).await?;
    sqlx::query("UPDATE workspaces SET idle_timeout_s = $2 WHERE id = $1")
        .bind(&ws.id.0)
        .bind(seconds)
        .execute(&state.db.pool)
        .await?;
    let ws = find_workspace(&state, &caller, &ws.id.0).await?;
    Ok(Json(workspace_view(&state, &ws)))
}

/// The workspace's ports reached through preview URLs: those its environment names and those
/// its owner opened, with who may reach each
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}/ports", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = OK, body = Vec<PortView>)))]
pub async fn list_ports(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<PortView>>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    let rows: Vec<(i64, Option<String>, String)> = sqlx::query_as(
        "SELECT port, label, access FROM workspace_ports WHERE workspace_id = $1 ORDER BY port",
    )
    .bind(&ws.id.0)
    .fetch_all(&state.db.pool)
    .await?;
    let mut ports = Vec::with_capacity(rows.len());
    for (port, label, access) in rows {
        let port = u16::try_from(port).map_err(|e| ApiError::internal("a stored port", e))?;
        ports.push(PortView {
            port,
            label,
            access: access
                .parse()
                .map_err(|e| ApiError::internal("a stored port's access", e))?,
            url: crate::preview::url_of(&state, &headers, &ws, port),
        });
    }
    Ok(Json(ports))
}

/// Set who may reach a port through its preview URL (private, users, public)
#[utoipa::path(put, path = "/api/v1/workspaces/{workspace}/ports/{port}", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name"), ("port" = u16, Path, description = "A TCP port on the workspace's loopback")),
    request_body = PortChange,
    responses((status = OK, body = Vec<PortView>, description = "The workspace's ports now")))]
pub async fn set_port_access(
    State(state): State<AppState>,
    caller: Caller,
    Path((key, port)): Path<(String, u16)>,
    headers: HeaderMap,
    Body(req): Body<PortChange>,
) -> ApiResult<Json<Vec<PortView>>> {
    if port == 0 {
        return Err(ApiError::bad_request("port 0 is no port"));
    }
    let ws = find_workspace(&state, &caller, &key).await?;
    // Only its owner decides who reaches it (an admin sees it, but does not open it up).
    if ws.owner_id != caller.user_id {
        return Err(ApiError::forbidden(format!(
            "only {} decides who reaches workspace `{}`'s ports",
            ws.owner, ws.name
        )));
    }
    sqlx::query(
        "INSERT INTO workspace_ports (workspace_id, port, access) VALUES ($1, $2, $3)
         ON CONFLICT (workspace_id, port) DO UPDATE SET access = excluded.access",
    )
    .bind(&ws.id.0)
    .bind(i64::from(port))
    .bind(req.access.as_str())
    .execute(&state.db.pool)
    .await?;
    list_ports(State(state), caller, Path(ws.id.0), headers).await
}

/// Longest a command may run through `exec` (a host that is gone is noticed much sooner: its
/// tunnel's pings stop), and the most its answer holds: two streams of 8 MiB, JSON-escaped.
const EXEC_CALL: (Duration, usize) = (Duration::from_secs(24 * 3600), 128 << 20);

/// Longest a host may take over a task list or a piece of a log (256 KiB, in base64), and
/// the most either answer holds.
const TASKS_CALL: (Duration, usize) = (Duration::from_secs(30), 4 << 20);

/// Commands a user runs through `exec` at once (each holds a call to its host).
const EXECS_PER_USER: usize = 16;

/// Run a command to its end and return its output
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/exec", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    request_body = ExecRequest,
    responses((status = OK, body = ExecResponse)))]
pub async fn exec_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    if ws.state != WorkspaceState::Running {
        return Err(ApiError::conflict(format!(
            "workspace `{key}` is {}, not running",
            ws.state
        )));
    }
    if req.argv.is_empty() {
        return Err(ApiError::bad_request("argv must name a command"));
    }
    let _slot = state
        .execs
        .admit(&caller.user_id, EXECS_PER_USER)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("you have {EXECS_PER_USER} commands running already: wait for one to end"),
            )
        })?;
    // A command is a use: the workspace is not idle while one runs.
    let _use = state.presence.in_use(&ws.id.0);
    // The project's variables, then its owner's, then the request's: later ones win.
    let mut env = workspace_env(&state, &ws.owner_id, ws.project_id.as_deref()).await?;
    env.extend(req.env);
    let request = ExecRequest {
        env,
        user: req.user.or(ws.run_as.clone()),
        land_in: req.land_in.or(ws.folder.clone()),
        ..req
    };
    let answer = state
        .hosts
        .json(
            &(&ws).into(),
            Method::POST,
            "exec",
            Some(&request),
            EXEC_CALL,
        )
        .await;
    answer.map(Json)
}

/// The workspace's tasks and how each is doing
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}/tasks", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = OK, body = Vec<TaskView>)))]
pub async fn list_tasks(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<TaskView>>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    let none: Option<&()> = None;
    let tasks: Vec<TaskView> = state
        .hosts
        .json(&(&ws).into(), Method::GET, "tasks", none, TASKS_CALL)
        .await?;
    // Shown on users' terminals: what the host says is kept printable.
    Ok(Json(
        tasks
            .into_iter()
            .map(|t| TaskView {
                name: warren_protocol::printable(&t.name),
                state: match t.state {
                    TaskState::Failed { error } => TaskState::Failed {
                        error: warren_protocol::printable(&error),
                    },
                    other => other,
                },
                ..t
            })
            .collect(),
    ))
}

/// A task's output from `?offset=` (base64), where to continue, and whether more may come
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}/tasks/{task}/log", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name"), ("task" = String, Path, description = "The task's name"), LogQuery),
    responses((status = OK, body = LogView)))]
pub async fn task_log(
    State(state): State<AppState>,
    caller: Caller,
    Path((key, task)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
) -> ApiResult<Json<LogView>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    let path = format!(
        "tasks/{}/log?offset={}",
        crate::links::task_segment(&task),
        query.offset
    );
    let none: Option<&()> = None;
    let log = state
        .hosts
        .json(&(&ws).into(), Method::GET, &path, none, TASKS_CALL)
        .await
        .map_err(|e| match e.status {
            StatusCode::NOT_FOUND => {
                ApiError::not_found(format_args!("task `{task}` in workspace `{key}`"))
            }
            _ => e,
        })?;
    Ok(Json(log))
}
