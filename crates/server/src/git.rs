//! Branch heads of projects: `git ls-remote --heads` on a timer and on demand (the webhook),
//! recorded in `branches`. Prebuilds (a later issue) start from new heads.

use std::time::Duration;

use sqlx::Row;

use crate::db::{Db, now_ms};

/// How long one `git ls-remote` may take.
const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// `(branch, commit)` of every branch at `url`.
pub async fn ls_remote(url: &str) -> Result<Vec<(String, String)>, String> {
    let run = tokio::process::Command::new("git")
        .args(["ls-remote", "--heads", "--", url])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -o BatchMode=yes -o ConnectTimeout=20",
        )
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LS_REMOTE_TIMEOUT, run)
        .await
        .map_err(|_| format!("git ls-remote {url} took longer than {LS_REMOTE_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git ls-remote {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_ls_remote(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ls_remote(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (commit, name) = l.split_once('\t')?;
            let branch = name.strip_prefix("refs/heads/")?;
            (commit.len() >= 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| (branch.to_owned(), commit.to_owned()))
        })
        .collect()
}

/// Brings `branches` of one project up to date; returns how many heads changed.
pub async fn refresh_project(db: &Db, project_id: &str, url: &str) -> Result<usize, String> {
    let heads = ls_remote(url).await?;
    let now = now_ms();
    let mut tx = db.begin_write().await.map_err(|e| e.to_string())?;
    let known: Vec<(String, String, i64)> =
        sqlx::query("SELECT name, head, updated_at FROM branches WHERE project_id = $1")
            .bind(project_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|r| (r.get("name"), r.get("head"), r.get("updated_at")))
            .collect();
    let gone = known
        .iter()
        .filter(|(n, _, _)| !heads.iter().any(|(h, _)| h == n))
        .count();
    let mut changed = gone;
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
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(changed)
}

/// Polls every project every `interval` until the process ends. A failing repository is logged
/// and tried again at the next round.
pub async fn poll_forever(db: Db, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let projects = match sqlx::query("SELECT id, git_url FROM projects")
            .fetch_all(&db.pool)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot list projects to poll");
                continue;
            }
        };
        for row in projects {
            let (id, url): (String, String) = (row.get("id"), row.get("git_url"));
            if let Err(e) = refresh_project(&db, &id, &url).await {
                tracing::warn!(project.id = %id, error = %e, "cannot poll a project's branches");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_remote_output_becomes_branches() {
        let text = "0123456789abcdef0123456789abcdef01234567\trefs/heads/main\n\
                    89abcdef0123456789abcdef0123456789abcdef\trefs/heads/feature/x\n\
                    89abcdef0123456789abcdef0123456789abcdef\trefs/tags/v1\n\
                    garbage\n";
        assert_eq!(
            parse_ls_remote(text),
            vec![
                (
                    "main".into(),
                    "0123456789abcdef0123456789abcdef01234567".into()
                ),
                (
                    "feature/x".into(),
                    "89abcdef0123456789abcdef0123456789abcdef".into()
                ),
            ]
        );
    }
}
