//! The control plane as agents see it ([`ControlPlane`] over the database): claiming a host's
//! next job under a lease, a running prebuild's log, and a job's end, which moves its
//! workspace (through [`Lifecycle::next`]) or its prebuild in the same transaction.

use std::sync::Arc;

use tokio::sync::Notify;
use warren_protocol::{
    Action, ControlPlane, Failure, Job, Outcome, PlaneError, Work, WorkspaceJob,
};

use crate::db::{Db, DbKind, now_ms};
use crate::jobs;
use crate::model::{Desired, Event, Lifecycle, Next, WorkspaceState};

/// How long a claimed job belongs to its agent before another may take it over.
const LEASE_MS: i64 = 5 * 60 * 1000;

fn backoff_ms(attempt: i64) -> i64 {
    (1000i64 << attempt.clamp(0, 6)).min(60_000)
}

/// The work a stored job asks for.
fn read_work(kind: &str, payload: &str) -> Result<Work, String> {
    let err = |e: serde_json::Error| format!("unreadable {kind} job: {e}");
    match kind {
        "prebuild.run" => serde_json::from_str(payload)
            .map(Work::Prebuild)
            .map_err(err),
        "prebuild.archive" => serde_json::from_str(payload)
            .map(|images| Work::Archive { images })
            .map_err(err),
        _ => serde_json::from_str(payload)
            .map(Work::Workspace)
            .map_err(err),
    }
}

/// A job that ends, as far as its end is recorded.
#[derive(Debug, sqlx::FromRow)]
struct EndingJob {
    workspace_id: Option<String>,
    prebuild_id: Option<String>,
    attempts: i64,
    max_attempts: i64,
    kind: String,
}

/// A job as stored, as far as its agent needs it.
#[derive(Debug, sqlx::FromRow)]
struct StoredJob {
    id: String,
    kind: String,
    payload: String,
    attempts: i64,
    prebuild_id: Option<String>,
}

impl StoredJob {
    /// The job as its agent gets it (an unreadable payload is the job's failure).
    fn job(self, work: Result<Work, String>) -> Result<Job, (String, String)> {
        match work {
            Ok(work) => Ok(Job {
                id: self.id,
                attempt: u32::try_from(self.attempts).unwrap_or(u32::MAX),
                work,
            }),
            Err(e) => Err((self.id, e)),
        }
    }
}

/// Largest prebuild log kept; past it, pieces are dropped and the log says so once.
const LOG_LIMIT: i64 = 32 << 20;

/// The control plane as the in-process agent sees it.
#[derive(Debug, Clone)]
pub struct DbControlPlane {
    pub db: Db,
    pub wake: Arc<Notify>,
    /// Opens the project secrets a prebuild gets.
    pub secrets: crate::secrets::SecretBox,
    /// Where succeeded prebuilds are pushed (`HOST[:PORT]/REPO`), told to the agent that
    /// claims one.
    pub registry: Option<String>,
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
        report: Option<&warren_protocol::HostReport>,
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
        sqlx::query(
            "UPDATE hosts SET last_seen_at = $2, images = $3, prebuilds = $4, disk_ceiling = $5, load_report = $6 WHERE id = $1",
        )
        .bind(host)
        .bind(now)
        .bind(serde_json::to_string(&report.images).unwrap_or_default())
        .bind(i64::from(report.makes_prebuilds))
        .bind(report.disk_ceiling.map(|d| d as i64))
        .bind(report.load.and_then(|l| serde_json::to_string(&l).ok()))
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
        let row = sqlx::query_as::<_, StoredJob>("SELECT id, kind, payload, attempts, prebuild_id FROM jobs WHERE id = $1 AND claimed_by = $2 AND state = 'running'")
            .bind(id)
            .bind(host)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.and_then(|stored| {
            let work = read_work(&stored.kind, &stored.payload);
            stored.job(work).ok()
        }))
    }

    /// Claims `host`'s next job: the oldest it may run, a prebuild only when `prebuilds` (the
    /// host has a prebuild slot free) and the host makes prebuilds.
    pub async fn claim_job(&self, host: &str, prebuilds: bool) -> Result<Option<Job>, sqlx::Error> {
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
                  AND (j.kind <> 'prebuild.run'
                       OR $4 = 1 AND (SELECT h.prebuilds FROM hosts h WHERE h.id = $1) = 1)
                  AND (j.kind = 'workspace.kill' OR NOT EXISTS (
                      SELECT 1 FROM jobs o
                      WHERE o.workspace_id = j.workspace_id AND o.id <> j.id
                        AND (o.state = 'running' AND o.lease_until >= $3
                             OR o.state = 'queued' AND (o.created_at < j.created_at OR (o.created_at = j.created_at AND o.id < j.id)))))
                ORDER BY j.created_at, j.id
                LIMIT 1 {lock})
             RETURNING id, kind, payload, attempts, prebuild_id"
        );
        let stored = sqlx::query_as::<_, StoredJob>(sqlx::AssertSqlSafe(sql))
            .bind(host)
            .bind(now + LEASE_MS)
            .bind(now)
            .bind(i64::from(prebuilds))
            .fetch_optional(&self.db.pool)
            .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let work = match read_work(&stored.kind, &stored.payload) {
            Ok(Work::Prebuild(mut work)) => {
                let project: Option<String> =
                    sqlx::query_scalar("UPDATE prebuilds SET state = 'running', started_at = $2, host_id = $3 WHERE id = $1 RETURNING project_id")
                        .bind(stored.prebuild_id.as_deref().unwrap_or_default())
                        .bind(now)
                        .bind(host)
                        .fetch_optional(&self.db.pool)
                        .await?;
                // Opened only now, in memory, for the agent: the queue never holds secrets.
                work.variables = match project {
                    Some(p) => crate::secrets::variables(&self.db, &self.secrets, &[("project", &p)])
                        .await
                        .unwrap_or_else(|e| {
                            tracing::error!(error = %e, "cannot read a project's variables for its prebuild");
                            Vec::new()
                        }),
                    None => Vec::new(),
                };
                work.registry = self.registry.clone();
                Ok(Work::Prebuild(work))
            }
            other => other,
        };
        match stored.job(work) {
            Ok(job) => Ok(Some(job)),
            Err((id, e)) => {
                sqlx::query("UPDATE jobs SET state = 'failed', last_error = $2, finished_at = $3 WHERE id = $1")
                    .bind(&id)
                    .bind(e)
                    .bind(now)
                    .execute(&self.db.pool)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Appends to a running prebuild's log and extends its job's lease (a long build must not
    /// be taken over); `false` once the prebuild is cancelled.
    pub async fn append_log(&self, job_id: &str, text: &[u8]) -> Result<bool, sqlx::Error> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        sqlx::query("UPDATE jobs SET lease_until = $2 WHERE id = $1 AND state = 'running'")
            .bind(job_id)
            .bind(now + LEASE_MS)
            .execute(&mut *tx)
            .await?;
        let row: Option<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT p.id, p.log_size, p.cancel_requested, j.state FROM jobs j JOIN prebuilds p ON p.id = j.prebuild_id WHERE j.id = $1",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((prebuild, size, cancel_requested, job_state)) = row else {
            return Ok(false);
        };
        let cancelled = cancel_requested != 0 || job_state != "running";
        if !text.is_empty() && size < LOG_LIMIT {
            let mut piece = String::from_utf8_lossy(text).into_owned();
            if size + piece.len() as i64 >= LOG_LIMIT {
                piece.push_str("\n[warren: the log is longer than 32 MiB; the rest is not kept]\n");
            }
            sqlx::query("INSERT INTO prebuild_logs (prebuild_id, at, text) VALUES ($1, $2, $3)")
                .bind(&prebuild)
                .bind(size)
                .bind(&piece)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE prebuilds SET log_size = $2 WHERE id = $1")
                .bind(&prebuild)
                .bind(size + piece.len() as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(!cancelled)
    }

    pub async fn finish_job(
        &self,
        job: &Job,
        result: Result<Outcome, Failure>,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let row: Option<EndingJob> = sqlx::query_as(
            "SELECT workspace_id, prebuild_id, attempts, max_attempts, kind FROM jobs WHERE id = $1 AND state = 'running'",
        )
        .bind(&job.id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(EndingJob {
            workspace_id,
            prebuild_id,
            attempts,
            max_attempts,
            kind,
        }) = row
        else {
            // Gone, or no longer this host's to finish (cancelled when its host was lost, or
            // its lease ran out and it was handed out again): what it says is stale.
            return Ok(());
        };
        if let Some(prebuild) = prebuild_id {
            crate::prebuilds::finish(&mut tx, &job.id, &prebuild, result).await?;
            return tx.commit().await;
        }
        // Lifecycle steps still to come (a save does not settle the state: a stop that ends
        // while one runs is recorded now).
        let later: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE workspace_id = $1 AND id <> $2 AND state IN ('queued', 'running')
               AND kind <> 'workspace.save'",
        )
        .bind(workspace_id.as_deref().unwrap_or(""))
        .bind(&job.id)
        .fetch_one(&mut *tx)
        .await?;
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
                            sqlx::query("DELETE FROM workspaces WHERE id = $1 AND desired = $2")
                                .bind(ws)
                                .bind(Desired::Deleted.as_str())
                                .execute(&mut *tx)
                                .await?;
                        }
                        Outcome::Running | Outcome::Stopped => {
                            let reached = Event::Reached {
                                running: outcome == Outcome::Running,
                                later_jobs: later > 0,
                            };
                            record(&mut tx, ws, reached, None, now).await?;
                            if outcome == Outcome::Stopped && kind != "workspace.create" {
                                self.save_after_stop(&mut tx, ws, later > 0, now).await?;
                            }
                        }
                        Outcome::Saved { image } => {
                            self.saved(&mut tx, ws, &job.id, &image, now).await?;
                        }
                        Outcome::Prebuilt { .. } | Outcome::Removed => {}
                    }
                }
            }
            Err(Failure { message, retry, .. }) => {
                // A failure no attempt would escape ends the job (and fails the workspace) now.
                let final_attempt = !retry || attempts >= max_attempts;
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
                match &workspace_id {
                    // A layer that could not be saved leaves the workspace as it is; a move
                    // waiting for it is called off, saying why.
                    Some(ws) if kind == "workspace.save" && final_attempt => {
                        // A move is called off only when this was its save (made once stopped).
                        sqlx::query(
                            "UPDATE workspaces SET last_error = $2,
                               moving_to = CASE WHEN state = 'stopped' THEN NULL ELSE moving_to END
                             WHERE id = $1",
                        )
                        .bind(ws)
                        .bind(format!("its layer was not saved: {message}"))
                        .execute(&mut *tx)
                        .await?;
                    }
                    // Tried again later; the workspace stays as it is meanwhile.
                    Some(_) if kind == "workspace.save" => {}
                    Some(ws) => {
                        let failed = Event::JobFailed {
                            final_attempt,
                            later_jobs: later > 0,
                        };
                        record(&mut tx, ws, failed, Some(&message), now).await?;
                        // A move waiting on this step is called off.
                        if final_attempt {
                            sqlx::query("UPDATE workspaces SET moving_to = NULL WHERE id = $1")
                                .bind(ws)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    None => {}
                }
            }
        }
        tx.commit().await
    }
}

impl DbControlPlane {
    /// After a stop: with a registry, the writable layer of a container workspace is saved
    /// (unless the owner asked for more meanwhile and no move waits for it).
    async fn save_after_stop(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        ws_id: &str,
        later_jobs: bool,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let Some(ws) = self.workspace(ws_id).await? else {
            return Ok(());
        };
        if later_jobs && ws.moving_to.is_none() {
            return Ok(());
        }
        let destination = crate::workspaces::layer_destination(registry, &ws, now);
        jobs::enqueue(
            tx,
            &ws.id.0,
            &ws.host_id.0,
            &ws.job(Action::Save { destination }),
        )
        .await?;
        Ok(())
    }

    /// A layer saved: recorded, and a move waiting for it goes on to its new host. Only the
    /// destination the job named is taken, whatever the host says it saved.
    async fn saved(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        ws_id: &str,
        job_id: &str,
        said: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let payload: String = sqlx::query_scalar("SELECT payload FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&mut **tx)
            .await?;
        let asked = match serde_json::from_str::<WorkspaceJob>(&payload) {
            Ok(WorkspaceJob {
                action: Action::Save { destination },
                ..
            }) => destination,
            _ => return Ok(()),
        };
        if said != asked {
            tracing::warn!(
                workspace.id = ws_id,
                said,
                asked,
                "a host reported another layer than it was asked to save"
            );
            return Ok(());
        }
        let image = asked.as_str();
        sqlx::query("UPDATE workspaces SET saved_layer = $2, saved_at = $3 WHERE id = $1")
            .bind(ws_id)
            .bind(image)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        let Some(ws) = self.workspace(ws_id).await? else {
            return Ok(());
        };
        // Only the save made after the move's stop carries the workspace over: one made while
        // it ran (a periodic save the move found under way) is just recorded.
        let (Some(to), WorkspaceState::Stopped) = (&ws.moving_to, &ws.state) else {
            return Ok(());
        };
        let why = format!("moved from {} with its layer saved on the way", ws.host);
        crate::workspaces::relocate_in(tx, &ws, to, Some(image), ws.desired, &why).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// The workspace as stored (outside the caller's transaction: what it wrote is not seen).
    async fn workspace(
        &self,
        id: &str,
    ) -> Result<Option<crate::workspaces::Workspace>, sqlx::Error> {
        crate::workspaces::select(&self.db, "WHERE w.id = $1", &[id])
            .await
            .map(|found| found.into_iter().next())
            .map_err(|e| sqlx::Error::Protocol(e.message))
    }
}

/// Records where a workspace is after one of its jobs ended, as [`WorkspaceState::next`]
/// decides; a failure's message becomes its `last_error` (a recorded success clears it).
async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    workspace_id: &str,
    event: Event,
    error: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let Some((current, desired)) = sqlx::query_as::<_, (String, String)>(
        "SELECT state, desired FROM workspaces WHERE id = $1",
    )
    .bind(workspace_id)
    .fetch_optional(&mut **tx)
    .await?
    else {
        return Ok(());
    };
    let current: WorkspaceState = current
        .parse()
        .map_err(|e| crate::db::decode_error("state", e))?;
    let desired: Desired = desired
        .parse()
        .map_err(|e| crate::db::decode_error("desired", e))?;
    let state = match current.next(desired, event) {
        Ok(Next::Record(state)) => state,
        // Nothing to record but a failure's message.
        _ if error.is_some() => current,
        _ => return Ok(()),
    };
    sqlx::query("UPDATE workspaces SET state = $2, last_error = $3, updated_at = $4 WHERE id = $1")
        .bind(workspace_id)
        .bind(state.as_str())
        .bind(error)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl ControlPlane for DbControlPlane {
    async fn claim(
        &self,
        host: &str,
        report: Option<warren_protocol::HostReport>,
        prebuilds: bool,
    ) -> Result<Option<Job>, PlaneError> {
        self.seen(host, report.as_ref()).await.map_err(database)?;
        self.claim_job(host, prebuilds).await.map_err(database)
    }

    async fn log(&self, job: &Job, text: Vec<u8>) -> Result<bool, PlaneError> {
        self.append_log(&job.id, &text).await.map_err(database)
    }

    async fn finish(&self, job: &Job, result: Result<Outcome, Failure>) -> Result<(), PlaneError> {
        self.finish_job(job, result).await.map_err(database)
    }
}

fn database(e: sqlx::Error) -> PlaneError {
    PlaneError::Database(e.to_string())
}
