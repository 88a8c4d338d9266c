//! Branch heads of projects: the repository fetched into a mirror (`git fetch`, which runs
//! nothing from it) on a timer and on demand (the webhook), its heads recorded in `branches`.
//! A new head queues a prebuild of its commit; the mirror also says how far a prebuild is behind.

use std::path::Path;
use std::time::Duration;

use crate::db::{Db, now_ms};

/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// `(branch, commit)` of every branch at `url`, fetched into the mirror under `mirrors`.
pub async fn fetch_heads(mirrors: &Path, url: &str) -> Result<Vec<(String, String)>, String> {
    let (mirrors, url_owned) = (mirrors.to_path_buf(), url.to_owned());
    let run = tokio::task::spawn_blocking(move || warren_git::fetch_heads(&mirrors, &url_owned));
    tokio::time::timeout(FETCH_TIMEOUT, run)
        .await
        .map_err(|_| {
            format!(
                "fetching {} took longer than {FETCH_TIMEOUT:?}",
                warren_git::redacted(url)
            )
        })?
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Brings `branches` of one project up to date; returns how many heads changed.
pub async fn refresh_project(
    db: &Db,
    mirrors: &Path,
    project_id: &str,
    url: &str,
) -> Result<usize, String> {
    let heads = fetch_heads(mirrors, url).await?;
    let now = now_ms();
    let mut tx = db.begin_write().await.map_err(|e| e.to_string())?;
    let known: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT name, head, updated_at FROM branches WHERE project_id = $1")
            .bind(project_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
    let gone = known
        .iter()
        .filter(|(n, _, _)| !heads.iter().any(|(h, _)| h == n))
        .count();
    let mut changed = gone;
    let mut moved = Vec::new();
    // Rewritten whole: unchanged branches keep their time, moved and new ones get now.
    sqlx::query("DELETE FROM branches WHERE project_id = $1")
        .bind(project_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    for (name, head) in &heads {
        let unchanged = known.iter().find(|(n, h, _)| n == name && h == head);
        if unchanged.is_none() {
            changed += 1;
            moved.push((name.clone(), head.clone()));
            tracing::info!(
                project.id = project_id,
                branch = name,
                head,
                "new branch head"
            );
        }
        sqlx::query(
            "INSERT INTO branches (project_id, name, head, updated_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(project_id)
        .bind(name)
        .bind(head)
        .bind(unchanged.map_or(now, |(_, _, t)| *t))
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    }
    crate::prebuilds::queue_for_heads(&mut tx, project_id, url, &moved)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    // A moved head may leave older prebuilds unneeded.
    if let Err(e) = crate::prebuilds::archive_unneeded(db).await {
        tracing::warn!(error = %e, "cannot archive old prebuilds");
    }
    Ok(changed)
}

/// Polls every project every `interval` until the process ends. A failing repository is logged
/// and tried again at the next round.
pub async fn poll_forever(
    db: Db,
    mirrors: std::path::PathBuf,
    interval: Duration,
    wake: std::sync::Arc<tokio::sync::Notify>,
) {
    // One replica polls at a time.
    let mut poller = crate::replicas::Singleton::new(db.clone(), "git poller");
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(interval).await;
        }
        poller.lead().await;
        let projects: Vec<(String, String)> =
            match sqlx::query_as("SELECT id, git_url FROM projects")
                .fetch_all(&db.pool)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list projects to poll");
                    continue;
                }
            };
        for (id, url) in projects {
            match refresh_project(&db, &mirrors, &id, &url).await {
                Ok(0) => {}
                Ok(_) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(project.id = %id, error = %e, "cannot poll a project's branches")
                }
            }
        }
    }
}
