//! Prebuilds over the API: a project's list, one prebuild, its log, and asking for one,
//! cancelling it or trying it again. What a prebuild is (queueing, recording, archiving) is
//! `crate::prebuilds`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use sqlx::Row;
use sqlx::any::AnyRow;
use warren_api::{LogPiece, LogQuery, NewPrebuild, PrebuildView};

use super::Body;
use super::projects::find_project;
use crate::auth::Caller;
use crate::db::now_ms;
use crate::error::{ApiError, ApiResult};
use crate::prebuilds::{COLUMNS, behind, branch_head, queue};
use crate::state::AppState;

async fn view(state: &AppState, r: &AnyRow) -> ApiResult<PrebuildView> {
    let commit: String = r.try_get("commit_sha")?;
    let head: Option<String> = r.try_get("head")?;
    let url: String = r.try_get("git_url")?;
    let behind = match head {
        Some(head) => behind(&state.git_mirrors, &url, &commit, &head).await,
        None => None,
    };
    Ok(PrebuildView {
        id: r.try_get("id")?,
        project: r.try_get("project")?,
        branch: r.try_get("branch")?,
        commit,
        state: r
            .try_get::<String, _>("state")?
            .parse()
            .map_err(|e| ApiError::internal("a stored prebuild", e))?,
        image: r.try_get("image")?,
        error: r.try_get("error")?,
        reused: r.try_get::<i64, _>("reused")? != 0,
        env_file: r.try_get("env_file")?,
        host: r.try_get("host")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        behind,
    })
}

/// A prebuild the caller may see (its project's owner, or an admin).
async fn find(state: &AppState, caller: &Caller, id: &str) -> ApiResult<AnyRow> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.id = $1"
    )))
    .bind(id)
    .fetch_optional(&state.db.pool)
    .await?;
    row.filter(|r| caller.may_touch(&r.try_get::<String, _>("owner_id").unwrap_or_default()))
        .ok_or_else(|| ApiError::not_found(format_args!("prebuild `{id}`")))
}

/// The project's prebuilds, newest first, with how far each is behind its branch
#[utoipa::path(get, path = "/api/v1/projects/{project}/prebuilds", tag = "projects",
    params(("project" = String, Path, description = "The project's id or name")),
    responses((status = OK, body = Vec<PrebuildView>)))]
pub async fn list_prebuilds(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<PrebuildView>>> {
    let project = find_project(&state, &caller, &project).await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.project_id = $1 ORDER BY p.created_at DESC, p.id"
    )))
    .bind(&project.id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(view(&state, r).await?);
    }
    Ok(Json(out))
}

/// One prebuild
#[utoipa::path(get, path = "/api/v1/prebuilds/{id}", tag = "prebuilds",
    params(("id" = String, Path, description = "Its id")),
    responses((status = OK, body = PrebuildView)))]
pub async fn get_prebuild(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PrebuildView>> {
    let row = find(&state, &caller, &id).await?;
    Ok(Json(view(&state, &row).await?))
}

/// Asks for a prebuild of a branch's head now (the one there is when it exists).
#[utoipa::path(post, path = "/api/v1/projects/{project}/prebuilds", tag = "projects",
    summary = "Prebuild a branch's head now ({branch}; the default branch when absent)",
    params(("project" = String, Path, description = "The project's id or name")),
    request_body = NewPrebuild,
    responses((status = OK, body = PrebuildView, description = "The prebuild of that commit there already is"), (status = ACCEPTED, body = PrebuildView, description = "Queued")))]
pub async fn create_prebuild(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Body(req): Body<NewPrebuild>,
) -> ApiResult<impl IntoResponse> {
    let project = find_project(&state, &caller, &project).await?;
    let (project_id, url) = (project.id, project.git_url);
    let (branch, head) = branch_head(&state.db, &project_id, req.branch.as_deref()).await?;
    let existing: Option<String> = sqlx::query(
        "SELECT id FROM prebuilds WHERE project_id = $1 AND commit_sha = $2 AND state IN ('queued', 'running', 'succeeded')
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&project_id)
    .bind(&head)
    .fetch_optional(&state.db.pool)
    .await?
    .map(|r| r.get(0));
    let (id, status) = match existing {
        Some(id) => (id, StatusCode::OK),
        None => {
            let mut tx = state.db.begin_write().await?;
            let id = queue(&mut tx, &project_id, &url, &branch, &head).await?;
            tx.commit().await?;
            state.wake.notify_one();
            (id, StatusCode::ACCEPTED)
        }
    };
    let row = find(&state, &caller, &id).await?;
    Ok((status, Json(view(&state, &row).await?)))
}

/// Stops a queued or running prebuild.
#[utoipa::path(post, path = "/api/v1/prebuilds/{id}/cancel", tag = "prebuilds",
    summary = "Stop a queued or running prebuild",
    params(("id" = String, Path, description = "Its id")),
    responses((status = OK, body = PrebuildView)))]
pub async fn cancel_prebuild(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PrebuildView>> {
    let row = find(&state, &caller, &id).await?;
    let current: String = row.try_get("state")?;
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    match current.as_str() {
        "queued" => {
            sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = $2 WHERE prebuild_id = $1 AND state = 'queued'")
                .bind(&id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE prebuilds SET state = 'cancelled', cancel_requested = 1, error = $3, finished_at = $2 WHERE id = $1")
                .bind(&id)
                .bind(now)
                .bind(warren_protocol::CANCELLED)
                .execute(&mut *tx)
                .await?;
        }
        // The agent hears of it when it next sends the log, kills the step and reports.
        "running" => {
            sqlx::query("UPDATE prebuilds SET cancel_requested = 1 WHERE id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        other => {
            return Err(ApiError::conflict(format!(
                "prebuild `{id}` is {other}: only a queued or running one can be cancelled"
            )));
        }
    }
    tx.commit().await?;
    let row = find(&state, &caller, &id).await?;
    Ok(Json(view(&state, &row).await?))
}

/// A new prebuild of a failed or cancelled one's commit.
#[utoipa::path(post, path = "/api/v1/prebuilds/{id}/retry", tag = "prebuilds",
    summary = "A new prebuild of a failed or cancelled one's commit",
    params(("id" = String, Path, description = "Its id")),
    responses((status = ACCEPTED, body = PrebuildView)))]
pub async fn retry_prebuild(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = find(&state, &caller, &id).await?;
    let current: String = row.try_get("state")?;
    if !matches!(current.as_str(), "failed" | "cancelled") {
        return Err(ApiError::conflict(format!(
            "prebuild `{id}` is {current}: only a failed or cancelled one is retried"
        )));
    }
    let mut tx = state.db.begin_write().await?;
    let new = queue(
        &mut tx,
        &row.try_get::<String, _>("project_id")?,
        &row.try_get::<String, _>("git_url")?,
        &row.try_get::<Option<String>, _>("branch")?
            .unwrap_or_default(),
        &row.try_get::<String, _>("commit_sha")?,
    )
    .await?;
    tx.commit().await?;
    state.wake.notify_one();
    let row = find(&state, &caller, &new).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&state, &row).await?)))
}

/// The log from `offset` on (`warren prebuild logs -f` reads it again from the returned
/// offset until `done`).
#[utoipa::path(get, path = "/api/v1/prebuilds/{id}/log", tag = "prebuilds",
    summary = "A prebuild's log from ?offset= on; `done` once it ended",
    params(("id" = String, Path, description = "Its id"), LogQuery),
    responses((status = OK, body = LogPiece)))]
pub async fn prebuild_log(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> ApiResult<Json<LogPiece>> {
    let row = find(&state, &caller, &id).await?;
    let done = !matches!(
        row.try_get::<String, _>("state")?.as_str(),
        "queued" | "running"
    );
    let offset = i64::try_from(query.offset).unwrap_or(i64::MAX);
    let pieces = sqlx::query(
        "SELECT at, text FROM prebuild_logs WHERE prebuild_id = $1
         AND at >= COALESCE((SELECT MAX(at) FROM prebuild_logs WHERE prebuild_id = $1 AND at <= $2), 0) ORDER BY at",
    )
    .bind(&id)
    .bind(offset)
    .fetch_all(&state.db.pool)
    .await?;
    let mut text = String::new();
    let mut next = offset;
    // Offsets are bytes of the stored text; a read from inside a piece starts at the next
    // character.
    for p in &pieces {
        let at: i64 = p.try_get("at")?;
        let piece: String = p.try_get("text")?;
        let skip = usize::try_from(offset - at).unwrap_or(0);
        let mut from = skip.min(piece.len());
        while !piece.is_char_boundary(from) {
            from += 1;
        }
        text.push_str(&piece[from..]);
        next = next.max(at + piece.len() as i64);
    }
    Ok(Json(LogPiece {
        text,
        offset: u64::try_from(next).unwrap_or(0),
        done,
    }))
}
