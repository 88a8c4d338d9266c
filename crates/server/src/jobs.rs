//! Durable jobs in the database, and the control plane the agent claims them from.
//!
//! A job is claimed with one `UPDATE ... RETURNING` (with `FOR UPDATE SKIP LOCKED` on
//! PostgreSQL, so agents on several hosts never take the same row), leased, retried with
//! exponential backoff, and never claimed while an older job of the same workspace is queued or
//! running — so a workspace's steps run in the order they were asked for. A force-stop
//! (`workspace.kill`) is the exception: it supersedes queued steps and does not wait behind a
//! running one; the reconciler settles whatever order the two then finish in. When a job ends, the
//! workspace's state follows in the same transaction; an in-between state (`starting`,
//! `stopping`, ...) stays while a later job of the workspace is still pending.

use std::sync::Arc;

use sqlx::{Any, Row, Transaction};
use tokio::sync::Notify;
use warren_agent::{Action, ControlPlane, Job, Outcome, WorkspaceJob};

use crate::db::{Db, DbKind, new_id, now_ms};

/// How long a claimed job belongs to its agent before another may take it over.
const LEASE_MS: i64 = 5 * 60 * 1000;
const MAX_ATTEMPTS: i64 = 5;

fn backoff_ms(attempt: i64) -> i64 {
    (1000i64 << attempt.clamp(0, 6)).min(60_000)
}

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

/// The control plane as the in-process agent sees it.
#[derive(Debug, Clone)]
pub struct DbControlPlane {
    pub db: Db,
    pub wake: Arc<Notify>,
}

impl DbControlPlane {
    /// Jobs this host was running when it went down are queued again (every step is idempotent).
    pub async fn resume_host(&self, host: &str) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_until = NULL, claimed_by = NULL WHERE state = 'running' AND claimed_by = $1",
        )
        .bind(host)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Notes that `host` is alive and, when it reports, the images it holds and its workspaces'
    /// resource use.
    pub async fn seen(
        &self,
        host: &str,
        report: Option<&warren_agent::HostReport>,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let Some(report) = report else {
            sqlx::query("UPDATE hosts SET last_seen_at = $2 WHERE id = $1")
                .bind(host)
                .bind(now)
                .execute(&self.db.pool)
                .await?;
            return Ok(());
        };
        sqlx::query("UPDATE hosts SET last_seen_at = $2, images = $3 WHERE id = $1")
            .bind(host)
            .bind(now)
            .bind(serde_json::to_string(&report.images).unwrap_or_default())
            .execute(&self.db.pool)
            .await?;
        for ws in &report.workspaces {
            let Some(id) = ws.runtime_id.strip_prefix("ws-") else {
                continue;
            };
            sqlx::query(
                "UPDATE workspaces SET stats = $3, stats_at = $4 WHERE id = $1 AND host_id = $2",
            )
            .bind(id)
            .bind(host)
            .bind(
                ws.stats
                    .as_ref()
                    .and_then(|s| serde_json::to_string(s).ok()),
            )
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        }
        Ok(())
    }

    /// A job this host holds, as stored (for an agent reporting over HTTP: the server does not
    /// take the job's content from the agent).
    pub async fn held_job(&self, host: &str, id: &str) -> Result<Option<Job>, sqlx::Error> {
        let row = sqlx::query("SELECT payload, attempts FROM jobs WHERE id = $1 AND claimed_by = $2 AND state = 'running'")
            .bind(id)
            .bind(host)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.and_then(|r| {
            let work = serde_json::from_str(&r.get::<String, _>("payload")).ok()?;
            Some(Job {
                id: id.to_owned(),
                attempt: r.get::<i64, _>("attempts") as u32,
                work,
            })
        }))
    }

    pub async fn claim_job(&self, host: &str) -> Result<Option<Job>, sqlx::Error> {
        let now = now_ms();
        let lock = if self.db.kind == DbKind::Postgres {
            "FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', claimed_by = $1, lease_until = $2, attempts = attempts + 1
             WHERE id = (
                SELECT j.id FROM jobs j
                WHERE (j.state = 'queued' OR (j.state = 'running' AND j.lease_until < $3))
                  AND j.run_at <= $3
                  AND (j.host_id IS NULL OR j.host_id = $1)
                  AND (j.kind = 'workspace.kill' OR NOT EXISTS (
                      SELECT 1 FROM jobs o
                      WHERE o.workspace_id = j.workspace_id AND o.id <> j.id
                        AND (o.state = 'running' AND o.lease_until >= $3
                             OR o.state = 'queued' AND (o.created_at < j.created_at OR (o.created_at = j.created_at AND o.id < j.id)))))
                ORDER BY j.created_at, j.id
                LIMIT 1 {lock})
             RETURNING id, payload, attempts"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(host)
            .bind(now + LEASE_MS)
            .bind(now)
            .fetch_optional(&self.db.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let id: String = row.try_get("id")?;
        let payload: String = row.try_get("payload")?;
        let attempts: i64 = row.try_get("attempts")?;
        match serde_json::from_str::<WorkspaceJob>(&payload) {
            Ok(work) => Ok(Some(Job {
                id,
                attempt: attempts as u32,
                work,
            })),
            Err(e) => {
                sqlx::query("UPDATE jobs SET state = 'failed', last_error = $2, finished_at = $3 WHERE id = $1")
                    .bind(&id)
                    .bind(format!("unreadable job: {e}"))
                    .bind(now)
                    .execute(&self.db.pool)
                    .await?;
                Ok(None)
            }
        }
    }

    pub async fn finish_job(
        &self,
        job: &Job,
        result: Result<Outcome, String>,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let row =
            sqlx::query("SELECT workspace_id, attempts, max_attempts FROM jobs WHERE id = $1")
                .bind(&job.id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(row) = row else { return Ok(()) };
        let workspace_id: Option<String> = row.try_get("workspace_id")?;
        let attempts: i64 = row.try_get("attempts")?;
        let max_attempts: i64 = row.try_get("max_attempts")?;
        let later: i64 = sqlx::query(
            "SELECT COUNT(*) FROM jobs WHERE workspace_id = $1 AND id <> $2 AND state IN ('queued', 'running')",
        )
        .bind(workspace_id.as_deref().unwrap_or(""))
        .bind(&job.id)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        match result {
            Ok(outcome) => {
                let note = match &outcome {
                    Outcome::Deleted { leftovers } if !leftovers.is_empty() => {
                        Some(format!("could not remove: {}", leftovers.join(", ")))
                    }
                    _ => None,
                };
                sqlx::query("UPDATE jobs SET state = 'done', finished_at = $2, last_error = $3 WHERE id = $1")
                    .bind(&job.id)
                    .bind(now)
                    .bind(note)
                    .execute(&mut *tx)
                    .await?;
                if let Some(ws) = &workspace_id {
                    match outcome {
                        Outcome::Deleted { .. } => {
                            sqlx::query(
                                "DELETE FROM workspaces WHERE id = $1 AND desired = 'deleted'",
                            )
                            .bind(ws)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Outcome::Running | Outcome::Stopped if later == 0 => {
                            let state = if outcome == Outcome::Running {
                                "running"
                            } else {
                                "stopped"
                            };
                            sqlx::query("UPDATE workspaces SET state = $2, last_error = NULL, updated_at = $3 WHERE id = $1")
                                .bind(ws)
                                .bind(state)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                        }
                        Outcome::Running | Outcome::Stopped => {}
                    }
                }
            }
            Err(message) => {
                let final_attempt = attempts >= max_attempts;
                sqlx::query(
                    "UPDATE jobs SET state = $2, last_error = $3, run_at = $4, lease_until = NULL, claimed_by = NULL,
                     finished_at = $5 WHERE id = $1",
                )
                .bind(&job.id)
                .bind(if final_attempt { "failed" } else { "queued" })
                .bind(&message)
                .bind(now + backoff_ms(attempts))
                .bind(final_attempt.then_some(now))
                .execute(&mut *tx)
                .await?;
                if let Some(ws) = &workspace_id {
                    let state_sql = if final_attempt && later == 0 {
                        "UPDATE workspaces SET state = 'failed', last_error = $2, updated_at = $3 WHERE id = $1"
                    } else {
                        "UPDATE workspaces SET last_error = $2, updated_at = $3 WHERE id = $1"
                    };
                    sqlx::query(state_sql)
                        .bind(ws)
                        .bind(&message)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await
    }
}

impl ControlPlane for DbControlPlane {
    async fn claim(
        &self,
        host: &str,
        report: Option<warren_agent::HostReport>,
    ) -> Result<Option<Job>, String> {
        self.seen(host, report.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        self.claim_job(host).await.map_err(|e| e.to_string())
    }

    async fn finish(&self, job: &Job, result: Result<Outcome, String>) -> Result<(), String> {
        self.finish_job(job, result)
            .await
            .map_err(|e| e.to_string())
    }
}
