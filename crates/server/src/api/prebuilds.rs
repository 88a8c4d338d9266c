//! Prebuilds over the API: a project's list, one prebuild, its log, and asking for one,
//! cancelling it or trying it again. What a prebuild is (queueing, recording, archiving) is
//! `crate::prebuilds`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use warren_api::{LogPiece, LogQuery, NewPrebuild, PrebuildState, PrebuildView};

use super::Body;
use super::projects::find_project;
use crate::auth::Caller;
use crate::db::now_ms;
use crate::error::{ApiError, ApiResult};
use crate::prebuilds::{COLUMNS, Prebuild, behind, branch_head, queue};
use crate::state::AppState;

/// A prebuild as the API shows it, with how far behind its branch it is (asked of git).
pub(crate) async fn view(state: &AppState, p: Prebuild) -> PrebuildView {
    let behind = match &p.head {
        Some(head) => behind(&state.git_mirrors, &p.git_url, &p.commit_sha, head).await,
        None => None,
    };
    PrebuildView {
        id: p.id,
        project_id: p.project_id,
        project: p.project,
        branch: p.branch,
        commit: p.commit_sha,
        state: p.state,
        image: p.image,
        error: p.error,
        reused: p.reused.0,
        env_file: p.env_file,
        host: p.host,
        created_at: p.created_at,
        started_at: p.started_at,
        finished_at: p.finished_at,
        behind,
    }
}

/// A prebuild the caller may see (its project's owner, or an admin).
async fn find(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Prebuild> {
    let row = sqlx::query_as::<_, Prebuild>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.id = $1"
    )))
    .bind(id)
    .fetch_optional(&state.db.pool)
    .await?;
    row.filter(|p| caller.may_touch(&p.owner_id))
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
    let rows = prebuilds_of(&state, &caller, &project).await?;
    let mut out = Vec::with_capacity(rows.len());
    for p in rows {
        out.push(view(&state, p).await);
    }
    Ok(Json(out))
}

/// The project's prebuilds, newest first, as stored (nothing asked of git: a page that shows a
/// few makes the views of those alone).
pub(crate) async fn prebuilds_of(
    state: &AppState,
    caller: &Caller,
    project: &str,
) -> ApiResult<Vec<Prebuild>> {
    let project = find_project(state, caller, project).await?;
    Ok(sqlx::query_as::<_, Prebuild>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.project_id = $1 ORDER BY p.created_at DESC, p.id"
    )))
    .bind(&project.id)
    .fetch_all(&state.db.pool)
    .await?)
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
    let prebuild = find(&state, &caller, &id).await?;
    Ok(Json(view(&state, prebuild).await))
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
    let (view, queued) = request_prebuild(&state, &caller, &project, req.branch.as_deref()).await?;
    let status = if queued {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// The prebuild of `branch`'s head (the default branch's when `None`): the one there is, or
/// a new one queued (`true`).
pub(crate) async fn request_prebuild(
    state: &AppState,
    caller: &Caller,
    project: &str,
    branch: Option<&str>,
) -> ApiResult<(PrebuildView, bool)> {
    let project = find_project(state, caller, project).await?;
    let (project_id, url) = (project.id, project.git_url);
    let (branch, head) = branch_head(&state.db, &project_id, branch).await?;
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT id FROM prebuilds WHERE project_id = $1 AND commit_sha = $2 AND state IN ('queued', 'running', 'succeeded')
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&project_id)
    .bind(&head)
    .fetch_optional(&state.db.pool)
    .await?;
    let (id, queued) = match existing {
        Some(id) => (id, false),
        None => {
            let mut tx = state.db.begin_write().await?;
            let id = queue(&mut tx, &project_id, &url, &branch, &head).await?;
            tx.commit().await?;
            state.wake.notify_one();
            (id, true)
        }
    };
    let row = find(state, caller, &id).await?;
    Ok((view(state, row).await, queued))
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
    let current = find(&state, &caller, &id).await?.state;
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    match current {
        PrebuildState::Queued => {
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
        PrebuildState::Running => {
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
    let prebuild = find(&state, &caller, &id).await?;
    Ok(Json(view(&state, prebuild).await))
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
    let view = retry(&state, &caller, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// A new prebuild of a failed or cancelled one's commit.
pub(crate) async fn retry(state: &AppState, caller: &Caller, id: &str) -> ApiResult<PrebuildView> {
    let old = find(state, caller, id).await?;
    if !matches!(old.state, PrebuildState::Failed | PrebuildState::Cancelled) {
        return Err(ApiError::conflict(format!(
            "prebuild `{id}` is {}: only a failed or cancelled one is retried",
            old.state
        )));
    }
    let mut tx = state.db.begin_write().await?;
    // Retried twice (a double click): the one the first asked for is the answer.
    let again: Option<String> = sqlx::query_scalar(
        "SELECT id FROM prebuilds WHERE project_id = $1 AND commit_sha = $2 AND state IN ('queued', 'running', 'succeeded')
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&old.project_id)
    .bind(&old.commit_sha)
    .fetch_optional(&mut *tx)
    .await?;
    let new = match again {
        Some(id) => id,
        None => {
            let id = queue(
                &mut tx,
                &old.project_id,
                &old.git_url,
                old.branch.as_deref().unwrap_or_default(),
                &old.commit_sha,
            )
            .await?;
            tx.commit().await?;
            state.wake.notify_one();
            id
        }
    };
    let prebuild = find(state, caller, &new).await?;
    Ok(view(state, prebuild).await)
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
    Ok(Json(
        read_log(&state, &caller, &id, query.offset, None).await?.0,
    ))
}

/// The log from `offset` on: all of it, or only its next `pieces` stored pieces (a live page
/// reads it a bounded piece at a time). `true` beside it when more is stored than was read
/// (then the answer is not `done`).
pub(crate) async fn read_log(
    state: &AppState,
    caller: &Caller,
    id: &str,
    offset: u64,
    pieces: Option<usize>,
) -> ApiResult<(LogPiece, bool)> {
    let ended = !matches!(
        find(state, caller, id).await?.state,
        PrebuildState::Queued | PrebuildState::Running
    );
    let offset = i64::try_from(offset).unwrap_or(i64::MAX);
    let limit = pieces.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX - 1) + 1);
    let mut pieces_read: Vec<(i64, String)> = sqlx::query_as(
        "SELECT at, text FROM prebuild_logs WHERE prebuild_id = $1
         AND at >= COALESCE((SELECT MAX(at) FROM prebuild_logs WHERE prebuild_id = $1 AND at <= $2), 0) ORDER BY at LIMIT $3",
    )
    .bind(id)
    .bind(offset)
    .bind(limit)
    .fetch_all(&state.db.pool)
    .await?;
    let more = pieces.is_some_and(|n| pieces_read.len() > n);
    if let Some(n) = pieces {
        pieces_read.truncate(n);
    }
    let mut text = String::new();
    let mut next = offset;
    // Offsets are bytes of the stored text; a read from inside a piece starts at the next
    // character.
    for (at, piece) in pieces_read {
        let skip = usize::try_from(offset - at).unwrap_or(0);
        let mut from = skip.min(piece.len());
        while !piece.is_char_boundary(from) {
            from += 1;
        }
        text.push_str(&piece[from..]);
        next = next.max(at + piece.len() as i64);
    }
    Ok((
        LogPiece {
            text,
            offset: u64::try_from(next).unwrap_or(0),
            done: ended && !more,
        },
        more,
    ))
}
