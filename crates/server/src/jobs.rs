//! Durable jobs in the database: queueing them in the caller's transaction, and dropping a
//! workspace's queued ones. How agents claim them and report back is [`crate::plane`].
//!
//! A job is claimed with one `UPDATE ... RETURNING` (with `FOR UPDATE SKIP LOCKED` on
//! PostgreSQL, so agents on several hosts never take the same row), leased, retried with
//! exponential backoff, and never claimed while an older job of the same workspace is queued or
//! running — so a workspace's steps run in the order they were asked for. A force-stop
//! (`workspace.kill`) is the exception: it supersedes queued steps and does not wait behind a
//! running one; the reconciler settles whatever order the two then finish in. When a job ends, the
//! workspace's state follows in the same transaction; an in-between state (`starting`,
//! `stopping`, ...) stays while a later job of the workspace is still pending.

use sqlx::{Any, Transaction};
use warren_protocol::{Action, PrebuildJob, WorkspaceJob};

use crate::db::{new_id, now_ms};

const MAX_ATTEMPTS: i64 = 5;

/// Queues a workspace job inside the caller's transaction.
pub async fn enqueue(
    tx: &mut Transaction<'static, Any>,
    workspace_id: &str,
    host_id: &str,
    work: &WorkspaceJob,
) -> Result<String, sqlx::Error> {
    let id = new_id();
    let kind = match work.action {
        Action::Create => "workspace.create",
        Action::Start => "workspace.start",
        // A stop without grace (a force-stop) does not wait behind a step already running.
        Action::Stop { grace_ms: 0 } => "workspace.kill",
        Action::Stop { .. } => "workspace.stop",
        Action::Delete => "workspace.delete",
        Action::Save { .. } => "workspace.save",
    };
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, kind, workspace_id, host_id, payload, state, attempts, max_attempts, run_at, created_at)
         VALUES ($1, $2, $3, $4, $5, 'queued', 0, $6, $7, $7)",
    )
    .bind(&id)
    .bind(kind)
    .bind(workspace_id)
    .bind(host_id)
    .bind(serde_json::to_string(work).unwrap_or_default())
    .bind(MAX_ATTEMPTS)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// Queues the removal of what is left of a workspace on a host it left (moved, or lost and
/// started elsewhere). It belongs to no workspace: it never holds back the workspace's own
/// jobs, and a host that never comes back leaves it queued, harming nothing.
pub async fn enqueue_cleanup(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    spec: &warren_protocol::WorkspaceSpec,
) -> Result<String, sqlx::Error> {
    let id = new_id();
    let now = now_ms();
    let work = WorkspaceJob {
        action: Action::Delete,
        workspace: spec.clone(),
    };
    sqlx::query(
        "INSERT INTO jobs (id, kind, host_id, payload, state, attempts, max_attempts, run_at, created_at, runtime_id)
         VALUES ($1, 'workspace.cleanup', $2, $3, 'queued', 0, $4, $5, $5, $6)",
    )
    .bind(&id)
    .bind(host_id)
    .bind(serde_json::to_string(&work).unwrap_or_default())
    .bind(MAX_ATTEMPTS)
    .bind(now)
    .bind(&spec.runtime_id)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// Cancels the cleanups of workspace `runtime_id` still queued for `host_id`: it is coming
/// back there.
pub async fn cancel_cleanup(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    runtime_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET state = 'cancelled', finished_at = $3
         WHERE kind = 'workspace.cleanup' AND host_id = $1 AND runtime_id = $2 AND state = 'queued'",
    )
    .bind(host_id)
    .bind(runtime_id)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Queues a prebuild: any host may take it, and it is tried once (a failed build fails the
/// same way again; `retry` asks for another).
pub async fn enqueue_prebuild(
    tx: &mut Transaction<'static, Any>,
    work: &PrebuildJob,
) -> Result<String, sqlx::Error> {
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, kind, prebuild_id, payload, state, attempts, max_attempts, run_at, created_at)
         VALUES ($1, 'prebuild.run', $2, $3, 'queued', 0, 1, $4, $4)",
    )
    .bind(&id)
    .bind(&work.prebuild_id)
    .bind(serde_json::to_string(work).unwrap_or_default())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// Queues the removal of archived prebuilds' images on the host that holds them.
pub async fn enqueue_removal(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    images: &[String],
) -> Result<String, sqlx::Error> {
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, kind, host_id, payload, state, attempts, max_attempts, run_at, created_at)
         VALUES ($1, 'prebuild.archive', $2, $3, 'queued', 0, $4, $5, $5)",
    )
    .bind(&id)
    .bind(host_id)
    .bind(serde_json::to_string(images).unwrap_or_default())
    .bind(MAX_ATTEMPTS)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// Drops the workspace's queued jobs (a force-stop or a delete supersedes them).
pub async fn cancel_queued(
    tx: &mut Transaction<'static, Any>,
    workspace_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET state = 'cancelled', finished_at = $2 WHERE workspace_id = $1 AND state = 'queued'",
    )
    .bind(workspace_id)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
