//! Projects: git repositories whose environments are prebuilt, their branches and webhooks.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{Body, check_name, pick_owned};
use crate::auth::Caller;
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use warren_api::{BranchView, HookQuery, NewProject, ProjectView, TrustChange};

/// `https://`, `ssh://`, `file://` or scp-like `user@host:path`.
pub fn check_git_url(url: &str) -> ApiResult<()> {
    let scp_like = url
        .split_once(':')
        .is_some_and(|(host, path)| host.contains('@') && !host.contains('/') && !path.is_empty());
    let ok = ["https://", "ssh://", "file://"]
        .iter()
        .any(|scheme| url.strip_prefix(scheme).is_some_and(|rest| rest.len() > 1))
        || scp_like;
    if ok && !url.chars().any(char::is_whitespace) && url.len() <= 2048 {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{url}` is not a git URL Warren can fetch (https://, ssh://, file:// or user@host:path)"
        )))
    }
}

/// A `file://` repository is on this host's disk: an admin may name any, other users only one
/// inside the folders the server allows (`WARREN_FILE_REPOS`) — else a user could have any
/// repository here, other projects' mirrors among them, cloned into their workspace.
fn check_file_repo(state: &AppState, caller: &Caller, url: &str) -> ApiResult<()> {
    let Some(path) = url.strip_prefix("file://") else {
        return Ok(());
    };
    if caller.is_admin {
        return Ok(());
    }
    let real = std::fs::canonicalize(path).ok();
    let allowed = real.as_ref().is_some_and(|real| {
        state
            .file_repos
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(d))
    });
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "`{url}` is on the server's own disk: only an admin may add it (or an admin allows its folder with WARREN_FILE_REPOS)"
            ),
        ))
    }
}

/// A project as stored, with its owner's name.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Project {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    pub owner: String,
    pub git_url: String,
    pub root_folder: String,
    pub env_file: Option<String>,
}

impl super::Owned for Project {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn owner_id(&self) -> String {
        self.owner_id.clone()
    }
}

fn project_view(p: Project) -> ProjectView {
    ProjectView {
        id: p.id,
        name: p.name,
        owner: p.owner,
        // A URL may carry a login (`https://user:token@...`): never shown back.
        git_url: warren_git::redacted(&p.git_url),
        root_folder: p.root_folder,
        env_file: p.env_file,
        webhook: None,
    }
}

const PROJECT_COLUMNS: &str = "p.id, p.name, p.owner_id, u.name AS owner, p.git_url, p.root_folder, p.env_file FROM projects p JOIN users u ON u.id = p.owner_id";

pub(crate) async fn find_project(
    state: &AppState,
    caller: &Caller,
    key: &str,
) -> ApiResult<Project> {
    let rows = sqlx::query_as::<_, Project>(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECT_COLUMNS} WHERE p.id = $1 OR p.name = $1"
    )))
    .bind(key)
    .fetch_all(&state.db.pool)
    .await?;
    pick_owned(rows, caller, key)
        .ok_or_else(|| ApiError::not_found(format_args!("project `{key}`")))
}

/// Projects the caller may see
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects",
    responses((status = OK, body = Vec<ProjectView>)))]
pub async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<ProjectView>>> {
    let projects = sqlx::query_as::<_, Project>(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECT_COLUMNS} WHERE p.owner_id = $1 OR $2 = 1 ORDER BY p.name"
    )))
    .bind(&caller.user_id)
    .bind(i64::from(caller.is_admin))
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(projects.into_iter().map(project_view).collect()))
}

/// Add a project (a git repository)
#[utoipa::path(post, path = "/api/v1/projects", tag = "projects",
    request_body = NewProject,
    responses((status = CREATED, body = ProjectView)))]
pub async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewProject>,
) -> ApiResult<impl IntoResponse> {
    let view = add_project(&state, &caller, req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Adds a project of the caller's; its view carries the webhook URL's path, this once.
pub(crate) async fn add_project(
    state: &AppState,
    caller: &Caller,
    req: NewProject,
) -> ApiResult<ProjectView> {
    check_name("project", &req.name)?;
    check_git_url(&req.git_url)?;
    check_file_repo(state, caller, &req.git_url)?;
    let root_folder = req.root_folder.unwrap_or_default();
    if root_folder.starts_with('/') || root_folder.split('/').any(|c| c == "..") {
        return Err(ApiError::bad_request(
            "root_folder is a relative path inside the repository",
        ));
    }
    let id = new_id();
    let secret = hex::encode(crate::db::random_bytes::<16>());
    sqlx::query(
        "INSERT INTO projects (id, owner_id, name, git_url, root_folder, env_file, created_at, webhook_secret)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(&caller.user_id)
    .bind(&req.name)
    .bind(&req.git_url)
    .bind(&root_folder)
    .bind(&req.env_file)
    .bind(now_ms())
    .bind(crate::db::webhook_digest(&secret))
    .execute(&state.db.pool)
    .await?;
    // The first branch heads, in the background: a slow or unreachable remote must not hold
    // up the answer (the poller tries again).
    let (db, url, project) = (state.db.clone(), req.git_url.clone(), id.clone());
    let (mirrors, wake) = (state.git_mirrors.clone(), state.wake.clone());
    tokio::spawn(async move {
        match crate::git::refresh_project(&db, &mirrors, &project, &url).await {
            Ok(_) => wake.notify_one(),
            Err(e) => {
                tracing::warn!(project.id = %project, error = %e, "cannot read the new project's branches")
            }
        }
    });
    let mut view = project_view(find_project(state, caller, &id).await?);
    view.webhook = Some(format!("/api/v1/hooks/git/{id}?secret={secret}"));
    Ok(view)
}

/// Change a project's trust domain: whether KSM may merge its VMs' memory (admin)
#[utoipa::path(patch, path = "/api/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path, description = "The project's id or name")),
    request_body = TrustChange,
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn update_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<TrustChange>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let id = find_project(&state, &caller, &key).await?.id;
    sqlx::query("UPDATE projects SET vm_ksm = $1 WHERE id = $2")
        .bind(i64::from(req.vm_ksm))
        .bind(&id)
        .execute(&state.db.pool)
        .await?;
    tracing::info!(project = %key, vm_ksm = req.vm_ksm, by = %caller.name, "trust domain changed");
    Ok(StatusCode::NO_CONTENT)
}

/// Set how long the project's workspaces may stay unused before they are stopped (those that
/// set none of their own)
#[utoipa::path(put, path = "/api/v1/projects/{project}/idle-timeout", tag = "projects",
    params(("project" = String, Path, description = "The project's id or name")),
    request_body = warren_api::IdleTimeout,
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn set_project_idle_timeout(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<warren_api::IdleTimeout>,
) -> ApiResult<StatusCode> {
    let seconds = crate::idle::check_timeout(req.seconds)?;
    let id = find_project(&state, &caller, &key).await?.id;
    sqlx::query("UPDATE projects SET idle_timeout_s = $2 WHERE id = $1")
        .bind(&id)
        .bind(seconds)
        .execute(&state.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One project (by id or name)
#[utoipa::path(get, path = "/api/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path, description = "The project's id or name")),
    responses((status = OK, body = ProjectView)))]
pub async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<ProjectView>> {
    Ok(Json(project_view(
        find_project(&state, &caller, &key).await?,
    )))
}

/// Remove a project
#[utoipa::path(delete, path = "/api/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path, description = "The project's id or name")),
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn delete_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let id = find_project(&state, &caller, &key).await?.id;
    sqlx::query("DELETE FROM projects WHERE id = $1")
        .bind(&id)
        .execute(&state.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn branches_of(state: &AppState, project_id: &str) -> ApiResult<Vec<BranchView>> {
    Ok(sqlx::query_as::<_, BranchView>(
        "SELECT name, head, updated_at FROM branches WHERE project_id = $1 ORDER BY name",
    )
    .bind(project_id)
    .fetch_all(&state.db.pool)
    .await?)
}

/// The project's branches and their head commits
#[utoipa::path(get, path = "/api/v1/projects/{project}/branches", tag = "projects",
    params(("project" = String, Path, description = "The project's id or name")),
    responses((status = OK, body = Vec<BranchView>)))]
pub async fn project_branches(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<BranchView>>> {
    let project = find_project(&state, &caller, &key).await?;
    Ok(Json(branches_of(&state, &project.id).await?))
}

/// Reads the project's branch heads now (what the poller does on its timer).
#[utoipa::path(post, path = "/api/v1/projects/{project}/refresh", tag = "projects",
    summary = "Read the project's branch heads now",
    params(("project" = String, Path, description = "The project's id or name")),
    responses((status = OK, body = Vec<BranchView>)))]
pub async fn refresh_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<BranchView>>> {
    let Project {
        id, git_url: url, ..
    } = find_project(&state, &caller, &key).await?;
    crate::git::refresh_project(&state.db, &state.git_mirrors, &id, &url)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    state.wake.notify_one();
    Ok(Json(branches_of(&state, &id).await?))
}

/// The git webhook: a push to the repository makes Warren read its branch heads now. Needs
/// the project's secret instead of a token (git hosts cannot log in).
#[utoipa::path(post, path = "/api/v1/hooks/git/{id}", tag = "projects",
    summary = "Git webhook (`?secret=` from the project's creation): read branch heads now",
    params(("id" = String, Path, description = "Its id"), HookQuery),
    responses((status = NO_CONTENT, description = "Done")),
    security(()))]
pub async fn git_hook(
    State(state): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<HookQuery>,
) -> ApiResult<StatusCode> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT git_url, webhook_secret FROM projects WHERE id = $1")
            .bind(&id)
            .fetch_optional(&state.db.pool)
            .await?;
    let refused = || ApiError::not_found(format_args!("project `{id}` with that secret"));
    let (url, secret) = row.ok_or_else(refused)?;
    // Only the secret's digest is kept; comparing digests also keeps the time taken from
    // saying anything about the secret.
    let matches = secret.is_some_and(|s| s == crate::db::webhook_digest(&query.secret));
    if !matches {
        return Err(refused());
    }
    crate::git::refresh_project(&state.db, &state.git_mirrors, &id, &url)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    state.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}
