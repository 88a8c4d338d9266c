//! Prebuilds: one per (project, commit), queued when a branch head moves, made by an agent
//! (see `warren_build::prebuild`), their logs kept, cancelled and retried on request, and
//! archived once no branch head and no workspace needs them.
//!
//! States: `queued` → `running` → `succeeded` | `failed` | `cancelled`; a succeeded one becomes
//! `archived` when its image is removed.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use warren_agent::{Outcome, PrebuildJob};

use crate::AppState;
use crate::api::{Body, find_project};
use crate::auth::Caller;
use crate::db::{Db, new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use warren_api::{LogPiece, LogQuery, NewPrebuild, PrebuildView};

/// How long a prebuild's first start is recorded for its access trace.
pub const TRACE_SECS: u64 = 10;

/// Queues a prebuild for each moved head whose commit has none yet in this project (a
/// prebuild that failed is not tried again on its own: `retry` asks for that).
pub async fn queue_for_heads(
    tx: &mut Transaction<'static, Any>,
    project_id: &str,
    url: &str,
    heads: &[(String, String)],
) -> Result<(), sqlx::Error> {
    for (branch, commit) in heads {
        let known: i64 = sqlx::query(
            "SELECT COUNT(*) FROM prebuilds WHERE project_id = $1 AND commit_sha = $2 AND state <> 'archived'",
        )
        .bind(project_id)
        .bind(commit)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
        if known == 0 {
            queue(tx, project_id, url, branch, commit).await?;
        }
    }
    Ok(())
}

async fn queue(
    tx: &mut Transaction<'static, Any>,
    project_id: &str,
    url: &str,
    branch: &str,
    commit: &str,
) -> Result<String, sqlx::Error> {
    let target: String = sqlx::query("SELECT root_folder, env_file FROM projects WHERE id = $1")
        .bind(project_id)
        .fetch_one(&mut **tx)
        .await
        .map(|r| {
            let root: String = r.get("root_folder");
            let file: Option<String> = r.get("env_file");
            match file {
                Some(f) if root.is_empty() => f,
                Some(f) => format!("{root}/{f}"),
                None => root,
            }
        })?;
    let id = new_id();
    sqlx::query(
        "INSERT INTO prebuilds (id, project_id, commit_sha, state, branch, created_at) VALUES ($1, $2, $3, 'queued', $4, $5)",
    )
    .bind(&id)
    .bind(project_id)
    .bind(commit)
    .bind(branch)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    jobs::enqueue_prebuild(
        tx,
        &PrebuildJob {
            prebuild_id: id.clone(),
            project_id: project_id.to_owned(),
            git_url: url.to_owned(),
            commit: commit.to_owned(),
            target,
            variables: Vec::new(),
            record_trace_secs: TRACE_SECS,
        },
    )
    .await?;
    tracing::info!(prebuild.id = %id, project.id = project_id, branch, commit, "prebuild queued");
    Ok(id)
}

/// Records how a prebuild's job went, in the caller's transaction.
pub async fn finish(
    tx: &mut Transaction<'static, Any>,
    job_id: &str,
    prebuild_id: &str,
    result: Result<Outcome, String>,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let (job_state, error) = match &result {
        Ok(_) => ("done", None),
        Err(e) => ("failed", Some(e.clone())),
    };
    sqlx::query("UPDATE jobs SET state = $2, last_error = $3, finished_at = $4, lease_until = NULL WHERE id = $1")
        .bind(job_id)
        .bind(job_state)
        .bind(&error)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    match result {
        Ok(Outcome::Prebuilt {
            image,
            digest,
            env_file,
            env_text,
            reused,
            ..
        }) => {
            sqlx::query(
                "UPDATE prebuilds SET state = 'succeeded', image = $2, digest = $3, env_file = $4, env_text = $5,
                 reused = $6, error = NULL, finished_at = $7 WHERE id = $1",
            )
            .bind(prebuild_id)
            .bind(&image)
            .bind(&digest)
            .bind(&env_file)
            .bind(&env_text)
            .bind(i64::from(reused))
            .bind(now)
            .execute(&mut **tx)
            .await?;
            tracing::info!(
                prebuild.id = prebuild_id,
                image,
                reused,
                "prebuild succeeded"
            );
        }
        Ok(other) => {
            sqlx::query(
                "UPDATE prebuilds SET state = 'failed', error = $2, finished_at = $3 WHERE id = $1",
            )
            .bind(prebuild_id)
            .bind(format!("the agent answered {other:?}"))
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        Err(message) => {
            sqlx::query(
                "UPDATE prebuilds SET state = CASE WHEN cancel_requested = 1 OR $4 = 1 THEN 'cancelled' ELSE 'failed' END,
                 error = $2, finished_at = $3 WHERE id = $1",
            )
            .bind(prebuild_id)
            .bind(&message)
            .bind(now)
            .bind(i64::from(message == warren_build::CANCELLED))
            .execute(&mut **tx)
            .await?;
            tracing::info!(prebuild.id = prebuild_id, error = %message, "prebuild did not succeed");
        }
    }
    Ok(())
}

/// Archives succeeded prebuilds nothing needs: not the newest succeeded one of a branch, not at
/// a branch head, not the prebuild of a workspace; their images are removed from the host that
/// holds them (unless another prebuild shares the image, as equal keys do).
pub async fn archive_unneeded(db: &Db) -> Result<usize, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let rows = sqlx::query(
        "SELECT p.id, p.image, p.host_id FROM prebuilds p
         WHERE p.state = 'succeeded'
           AND NOT EXISTS (SELECT 1 FROM branches b WHERE b.project_id = p.project_id AND b.head = p.commit_sha)
           AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.prebuild_id = p.id)
           AND EXISTS (SELECT 1 FROM prebuilds n WHERE n.project_id = p.project_id AND n.branch = p.branch
                       AND n.state = 'succeeded' AND n.created_at > p.created_at)",
    )
    .fetch_all(&mut *tx)
    .await?;
    let now = now_ms();
    for r in &rows {
        let id: String = r.try_get("id")?;
        let image: Option<String> = r.try_get("image")?;
        let host: Option<String> = r.try_get("host_id")?;
        sqlx::query("UPDATE prebuilds SET state = 'archived', finished_at = COALESCE(finished_at, $2) WHERE id = $1")
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let (Some(image), Some(host)) = (image, host) else {
            continue;
        };
        let shared: i64 = sqlx::query(
            "SELECT COUNT(*) FROM prebuilds WHERE image = $1 AND state = 'succeeded' AND id <> $2",
        )
        .bind(&image)
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        if shared == 0 {
            // The environment image built on the way has the same key.
            let env = image.replacen("warren-prebuild:", "warren-env:", 1);
            jobs::enqueue_removal(&mut tx, &host, &[image, env]).await?;
        }
        tracing::info!(prebuild.id = %id, "prebuild archived");
    }
    tx.commit().await?;
    Ok(rows.len())
}

const COLUMNS: &str = "p.id, p.project_id, pr.name AS project, pr.owner_id, pr.git_url, p.branch, p.commit_sha, p.state, p.image,
    p.error, p.reused, p.env_file, p.env_text, p.created_at, p.started_at, p.finished_at,
    (SELECT b.head FROM branches b WHERE b.project_id = p.project_id AND b.name = p.branch) AS head,
    (SELECT h.name FROM hosts h WHERE h.id = p.host_id) AS host
    FROM prebuilds p JOIN projects pr ON pr.id = p.project_id";

async fn view(state: &AppState, r: &AnyRow) -> ApiResult<PrebuildView> {
    let commit: String = r.try_get("commit_sha")?;
    let head: Option<String> = r.try_get("head")?;
    let url: String = r.try_get("git_url")?;
    let behind = match head {
        Some(head) => behind(state, &url, &commit, &head).await,
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

/// Commits `head` has that `commit` lacks, by the server's mirror of the repository.
pub async fn behind(state: &AppState, url: &str, commit: &str, head: &str) -> Option<u64> {
    if commit == head {
        return Some(0);
    }
    let (mirrors, url, commit, head) = (
        state.git_mirrors.clone(),
        url.to_owned(),
        commit.to_owned(),
        head.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        warren_build::git::commits_between(&mirrors, &url, &commit, &head)
    })
    .await
    .ok()
    .flatten()
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
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<PrebuildView>>> {
    let project = find_project(&state, &caller, &project).await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.project_id = $1 ORDER BY p.created_at DESC, p.id"
    )))
    .bind(project.try_get::<String, _>("id")?)
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
pub async fn get(
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
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Body(req): Body<NewPrebuild>,
) -> ApiResult<impl IntoResponse> {
    let project = find_project(&state, &caller, &project).await?;
    let project_id: String = project.try_get("id")?;
    let url: String = project.try_get("git_url")?;
    let (branch, head) = branch_head(&state, &project_id, req.branch.as_deref()).await?;
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

/// A branch of the project and its head: the one named, else `main`, `master`, or the only one.
pub async fn branch_head(
    state: &AppState,
    project_id: &str,
    branch: Option<&str>,
) -> ApiResult<(String, String)> {
    let rows = sqlx::query("SELECT name, head FROM branches WHERE project_id = $1 ORDER BY name")
        .bind(project_id)
        .fetch_all(&state.db.pool)
        .await?;
    let heads: Vec<(String, String)> = rows
        .iter()
        .map(|r| Ok((r.try_get("name")?, r.try_get("head")?)))
        .collect::<ApiResult<_>>()?;
    let found = match branch {
        Some(b) => heads.iter().find(|(n, _)| n == b),
        None => heads
            .iter()
            .find(|(n, _)| n == "main")
            .or_else(|| heads.iter().find(|(n, _)| n == "master"))
            .or_else(|| (heads.len() == 1).then(|| &heads[0])),
    };
    found.cloned().ok_or_else(|| match branch {
        Some(b) => ApiError::not_found(format_args!(
            "branch `{b}` (known: {})",
            heads
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => ApiError::bad_request(format!(
            "the project has no main or master branch: name one (known: {})",
            heads
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    })
}

/// Stops a queued or running prebuild.
#[utoipa::path(post, path = "/api/v1/prebuilds/{id}/cancel", tag = "prebuilds",
    summary = "Stop a queued or running prebuild",
    params(("id" = String, Path, description = "Its id")),
    responses((status = OK, body = PrebuildView)))]
pub async fn cancel(
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
                .bind(warren_build::CANCELLED)
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
pub async fn retry(
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
pub async fn log(
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

/// The newest succeeded prebuild for a branch: the one of its head's commit first, else the
/// newest made for the branch.
pub async fn for_branch(
    state: &AppState,
    project_id: &str,
    branch: &str,
    head: &str,
) -> ApiResult<Option<AnyRow>> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.project_id = $1 AND p.state = 'succeeded' AND (p.branch = $2 OR p.commit_sha = $3)
         ORDER BY CASE WHEN p.commit_sha = $3 THEN 0 ELSE 1 END, p.created_at DESC LIMIT 1"
    )))
    .bind(project_id)
    .bind(branch)
    .bind(head)
    .fetch_optional(&state.db.pool)
    .await?)
}
