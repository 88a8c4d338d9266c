//! Prebuilds: one per (project, commit), queued when a branch head moves, made by an agent
//! (see `warren_builder::prebuild`), their logs kept, cancelled and retried on request, and
//! archived once no branch head and no workspace needs them.
//!
//! States: `queued` → `running` → `succeeded` | `failed` | `cancelled`; a succeeded one becomes
//! `archived` when its image is removed.

use std::path::Path;

use sqlx::{Any, Transaction};
use warren_protocol::{Failure, Outcome, PrebuildJob};

use crate::db::{Db, new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::jobs;

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
        let known: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM prebuilds WHERE project_id = $1 AND commit_sha = $2 AND state <> 'archived'",
        )
        .bind(project_id)
        .bind(commit)
        .fetch_one(&mut **tx)
        .await?;
        if known == 0 {
            queue(tx, project_id, url, branch, commit).await?;
        }
    }
    Ok(())
}

pub(crate) async fn queue(
    tx: &mut Transaction<'static, Any>,
    project_id: &str,
    url: &str,
    branch: &str,
    commit: &str,
) -> Result<String, sqlx::Error> {
    let (root, file): (String, Option<String>) =
        sqlx::query_as("SELECT root_folder, env_file FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_one(&mut **tx)
            .await?;
    let target = match file {
        Some(f) if root.is_empty() => f,
        Some(f) => format!("{root}/{f}"),
        None => root,
    };
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
            // Told at claim: the registry the server is configured with then.
            registry: None,
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
    result: Result<Outcome, Failure>,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let (job_state, error) = match &result {
        Ok(_) => ("done", None),
        Err(failure) => ("failed", Some(failure.message.clone())),
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
            pushed,
            ..
        }) => {
            // Workspaces start from the registry's copy when there is one; the local name is
            // what archiving removes from the host that made it.
            let (image, local_image) = match pushed {
                Some(pushed) => (pushed, Some(image)),
                None => (image, None),
            };
            sqlx::query(
                "UPDATE prebuilds SET state = 'succeeded', image = $2, digest = $3, env_file = $4, env_text = $5,
                 reused = $6, error = NULL, finished_at = $7, local_image = $8 WHERE id = $1",
            )
            .bind(prebuild_id)
            .bind(&image)
            .bind(&digest)
            .bind(&env_file)
            .bind(&env_text)
            .bind(i64::from(reused))
            .bind(now)
            .bind(&local_image)
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
        Err(Failure {
            message, cancelled, ..
        }) => {
            sqlx::query(
                "UPDATE prebuilds SET state = CASE WHEN cancel_requested = 1 OR $4 = 1 THEN 'cancelled' ELSE 'failed' END,
                 error = $2, finished_at = $3 WHERE id = $1",
            )
            .bind(prebuild_id)
            .bind(&message)
            .bind(now)
            .bind(i64::from(cancelled))
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
    let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT p.id, COALESCE(p.local_image, p.image), p.host_id FROM prebuilds p
         WHERE p.state = 'succeeded'
           AND NOT EXISTS (SELECT 1 FROM branches b WHERE b.project_id = p.project_id AND b.head = p.commit_sha)
           AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.prebuild_id = p.id)
           AND EXISTS (SELECT 1 FROM prebuilds n WHERE n.project_id = p.project_id AND n.branch = p.branch
                       AND n.state = 'succeeded' AND n.created_at > p.created_at)",
    )
    .fetch_all(&mut *tx)
    .await?;
    let now = now_ms();
    let archived = rows.len();
    for (id, image, host) in rows {
        sqlx::query("UPDATE prebuilds SET state = 'archived', finished_at = COALESCE(finished_at, $2) WHERE id = $1")
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let (Some(image), Some(host)) = (image, host) else {
            continue;
        };
        let shared: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM prebuilds WHERE COALESCE(local_image, image) = $1 AND state = 'succeeded' AND id <> $2",
        )
        .bind(&image)
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        if shared == 0 {
            // The environment image built on the way has the same key.
            let env = image.replacen("warren-prebuild:", "warren-env:", 1);
            jobs::enqueue_removal(&mut tx, &host, &[image, env]).await?;
        }
        tracing::info!(prebuild.id = %id, "prebuild archived");
    }
    tx.commit().await?;
    Ok(archived)
}

/// A prebuild as stored ([`COLUMNS`]), with its project's name, owner and URL, its branch's
/// head and the host that made it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Prebuild {
    pub id: String,
    pub project_id: String,
    pub project: String,
    pub owner_id: String,
    pub git_url: String,
    pub branch: Option<String>,
    pub commit_sha: String,
    #[sqlx(try_from = "String")]
    pub state: warren_api::PrebuildState,
    pub image: Option<String>,
    pub error: Option<String>,
    /// Found made before under its key.
    #[sqlx(try_from = "i64")]
    pub reused: crate::db::Flag,
    pub env_file: Option<String>,
    pub env_text: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub head: Option<String>,
    pub host: Option<String>,
}

/// What a [`Prebuild`] is read from.
pub(crate) const COLUMNS: &str = "p.id, p.project_id, pr.name AS project, pr.owner_id, pr.git_url, p.branch, p.commit_sha, p.state, p.image,
    p.error, p.reused, p.env_file, p.env_text, p.created_at, p.started_at, p.finished_at,
    (SELECT b.head FROM branches b WHERE b.project_id = p.project_id AND b.name = p.branch) AS head,
    (SELECT h.name FROM hosts h WHERE h.id = p.host_id) AS host
    FROM prebuilds p JOIN projects pr ON pr.id = p.project_id";

/// Commits `head` has that `commit` lacks, by the server's mirror of the repository.
pub async fn behind(mirrors: &Path, url: &str, commit: &str, head: &str) -> Option<u64> {
    if commit == head {
        return Some(0);
    }
    let (mirrors, url, commit, head) = (
        mirrors.to_path_buf(),
        url.to_owned(),
        commit.to_owned(),
        head.to_owned(),
    );
    tokio::task::spawn_blocking(move || warren_git::commits_between(&mirrors, &url, &commit, &head))
        .await
        .ok()
        .flatten()
}

/// A branch of the project and its head: the one named, else `main`, `master`, or the only one.
pub async fn branch_head(
    db: &Db,
    project_id: &str,
    branch: Option<&str>,
) -> ApiResult<(String, String)> {
    let heads: Vec<(String, String)> =
        sqlx::query_as("SELECT name, head FROM branches WHERE project_id = $1 ORDER BY name")
            .bind(project_id)
            .fetch_all(&db.pool)
            .await?;
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

/// The newest succeeded prebuild for a branch: the one of its head's commit first, else the
/// newest made for the branch.
pub(crate) async fn for_branch(
    db: &Db,
    project_id: &str,
    branch: &str,
    head: &str,
) -> ApiResult<Option<Prebuild>> {
    Ok(sqlx::query_as::<_, Prebuild>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} WHERE p.project_id = $1 AND p.state = 'succeeded' AND (p.branch = $2 OR p.commit_sha = $3)
         ORDER BY CASE WHEN p.commit_sha = $3 THEN 0 ELSE 1 END, p.created_at DESC LIMIT 1"
    )))
    .bind(project_id)
    .bind(branch)
    .bind(head)
    .fetch_optional(&db.pool)
    .await?)
}
