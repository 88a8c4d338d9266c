//! Workspaces that change hosts: a move an admin asks for (`ws move`, `host drain`), and
//! workspaces whose host stopped reporting (`lost`), started elsewhere from their last saved
//! layer. A move stops the workspace, saves its writable layer to the registry (the agent's
//! `Save` job), then makes it anew on the other host over that layer
//! ([`super::relocate_in`]), which also queues the old host's cleanup.

use std::time::Duration;

use warren_protocol::Action;

use super::{Workspace, layer_destination, select};
use crate::db::now_ms;
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::model::{Desired, Event, Lifecycle as _, Next, WorkspaceState};
use crate::state::AppState;

/// Starts moving `ws` to host `to` (its id), `why` kept as its placement.
pub(crate) async fn start_move(state: &AppState, ws: &Workspace, to: &str) -> ApiResult<()> {
    let Some(registry) = &state.registry else {
        return Err(ApiError::conflict(
            "a move carries the workspace's layer through a registry: start the server with --registry",
        ));
    };
    if ws.host_id.0 == to {
        return Err(ApiError::conflict(format!(
            "workspace `{}` is on that host already",
            ws.name
        )));
    }
    if ws.moving_to.is_some() {
        return Err(ApiError::conflict(format!(
            "workspace `{}` is moving already",
            ws.name
        )));
    }
    let mut tx = state.db.begin_write().await?;
    let job = match ws.state {
        // Stopped first (its desired state stays): a layer is saved from a stopped workspace.
        WorkspaceState::Running => Some((
            WorkspaceState::Stopping,
            Action::Stop {
                grace_ms: crate::api::STOP_GRACE_S * 1000,
            },
        )),
        WorkspaceState::Stopped => Some((
            WorkspaceState::Stopped,
            Action::Save {
                destination: layer_destination(registry, ws, now_ms()),
            },
        )),
        // Its host is gone: it starts there from what was saved.
        WorkspaceState::Lost => None,
        other => {
            return Err(ApiError::conflict(format!(
                "workspace `{}` is {other}: move it once it runs or is stopped",
                ws.name
            )));
        }
    };
    let Some((between, action)) = job else {
        let base = ws.saved_layer.as_deref().or(ws.base_image.as_deref());
        let why = "moved while its host was lost, from its last saved layer".to_owned();
        if !super::relocate_in(&mut tx, ws, to, base, Desired::Running, &why).await? {
            return Err(changed(ws));
        }
        tx.commit().await?;
        state.wake.notify_one();
        return Ok(());
    };
    let moved = sqlx::query(
        "UPDATE workspaces SET moving_to = $2, state = $3, updated_at = $4 WHERE id = $1 AND state = $5
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.workspace_id = $1 AND j.state IN ('queued', 'running')
             AND j.kind <> 'workspace.save')",
    )
    .bind(&ws.id.0)
    .bind(to)
    .bind(between.as_str())
    .bind(now_ms())
    .bind(ws.state.as_str())
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Err(changed(ws));
    }
    jobs::enqueue(&mut tx, &ws.id.0, &ws.host_id.0, &ws.job(action)).await?;
    tx.commit().await?;
    state.wake.notify_one();
    Ok(())
}

fn changed(ws: &Workspace) -> ApiError {
    ApiError::conflict(format!(
        "workspace `{}` is busy (a step is under way): try again once it settles",
        ws.name
    ))
}

/// A host is its id, its name, when it was last seen, whether it drains.
type HostRow = (String, String, Option<i64>, i64);

/// The host named `name`, which must be live (heard from within `--host-lost-seconds`, or this
/// server's own)
/// and not draining, to take a workspace.
pub(crate) async fn target_host(state: &AppState, name: &str) -> ApiResult<String> {
    let row: Option<HostRow> =
        sqlx::query_as("SELECT id, name, last_seen_at, draining FROM hosts WHERE name = $1")
            .bind(name)
            .fetch_optional(&state.db.pool)
            .await?;
    let Some((id, name, seen, draining)) = row else {
        return Err(ApiError::not_found(format_args!("host `{name}`")));
    };
    if draining != 0 {
        return Err(ApiError::conflict(format!("host `{name}` is draining")));
    }
    if id != state.host_id && seen.is_none_or(|t| t < state.live_since()) {
        return Err(ApiError::conflict(format!(
            "host `{name}` has not reported in the last {}",
            crate::idle::spoken(state.host_lost_after.as_secs())
        )));
    }
    Ok(id)
}

/// Drains a host: it takes no new workspaces, and each of its workspaces moves to the best
/// other host. Answers the moves begun (workspace, host) and those that could not be.
pub(crate) async fn drain(
    state: &AppState,
    host_id: &str,
) -> ApiResult<(Vec<(String, String)>, Vec<(String, String)>)> {
    sqlx::query("UPDATE hosts SET draining = 1 WHERE id = $1")
        .bind(host_id)
        .execute(&state.db.pool)
        .await?;
    let mut moved = Vec::new();
    let mut refused = Vec::new();
    for ws in select(
        &state.db,
        "WHERE w.host_id = $1 AND w.desired <> 'deleted' AND w.moving_to IS NULL",
        &[host_id],
    )
    .await?
    {
        let image = ws.base_image.as_deref().unwrap_or(&ws.image);
        let placed = super::place_except(state, &[image, &ws.image], ws.disk, Some(host_id)).await;
        let result = match placed {
            Ok((to, _)) => start_move(state, &ws, &to).await.map(|()| to),
            Err(e) => Err(e),
        };
        match result {
            Ok(to) => {
                let name: Option<String> =
                    sqlx::query_scalar("SELECT name FROM hosts WHERE id = $1")
                        .bind(&to)
                        .fetch_optional(&state.db.pool)
                        .await?;
                moved.push((ws.name.clone(), name.unwrap_or(to)));
            }
            Err(e) => refused.push((ws.name.clone(), e.message)),
        }
    }
    Ok((moved, refused))
}

/// Saves, every `every`, the writable layer of each running workspace whose last save (or
/// start) is older than that, so that a host lost costs at most `every` of work. The host
/// freezes the workspace (pauses a VM) while it reads the layer. One replica at a time.
pub async fn save_running_forever(state: AppState, every: Duration) {
    let mut saver = crate::replicas::Singleton::new(state.db.clone(), "layer saves");
    loop {
        tokio::time::sleep(every.min(Duration::from_secs(60))).await;
        saver.lead().await;
        if let Err(e) = save_running(&state, every, now_ms()).await {
            tracing::warn!(error = %e.message, "cannot queue the saves of running workspaces");
        }
    }
}

/// One look of [`save_running_forever`]; answers the workspaces whose save it queued. One
/// with a step under way, or whose save was tried within `every` (it may have failed), waits;
/// so does one whose host has a save under way (a host saves one running workspace at a time,
/// and its job slots stay free for other steps).
pub(crate) async fn save_running(
    state: &AppState,
    every: Duration,
    now: i64,
) -> ApiResult<Vec<String>> {
    let Some(registry) = &state.registry else {
        return Ok(Vec::new());
    };
    let due = (now - every.as_millis() as i64).to_string();
    let found = select(
        &state.db,
        "WHERE w.state = 'running' AND w.desired = 'running' AND w.moving_to IS NULL AND COALESCE(w.saved_at, w.updated_at) < CAST($1 AS BIGINT)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.workspace_id = w.id
             AND (j.state IN ('queued', 'running')
                  OR (j.kind = 'workspace.save' AND j.created_at >= CAST($1 AS BIGINT))))
           AND NOT EXISTS (SELECT 1 FROM jobs s WHERE s.host_id = w.host_id
             AND s.kind = 'workspace.save' AND s.state IN ('queued', 'running'))
         ORDER BY COALESCE(w.saved_at, w.updated_at)",
        &[&due],
    )
    .await?;
    let mut queued = Vec::new();
    let mut hosts = std::collections::HashSet::new();
    for ws in found {
        if !hosts.insert(ws.host_id.0.clone()) {
            continue;
        }
        let destination = layer_destination(registry, &ws, now);
        let mut tx = state.db.begin_write().await?;
        jobs::enqueue(
            &mut tx,
            &ws.id.0,
            &ws.host_id.0,
            &ws.job(Action::Save { destination }),
        )
        .await?;
        tx.commit().await?;
        queued.push(ws.name);
    }
    if !queued.is_empty() {
        state.wake.notify_one();
    }
    Ok(queued)
}

/// Marks lost, every few seconds, the workspaces of hosts not heard from for `after` (not this
/// server's own); a delete their host never carried out is done at once. One replica at a time.
pub async fn mark_lost_forever(state: AppState, after: Duration) {
    let mut watcher = crate::replicas::Singleton::new(state.db.clone(), "lost hosts");
    loop {
        tokio::time::sleep(crate::replicas::RETRY).await;
        watcher.lead().await;
        if let Err(e) = mark_lost(&state, after).await {
            tracing::warn!(error = %e.message, "cannot look for lost hosts");
        }
    }
}

/// One look of [`mark_lost_forever`]; answers the workspaces it marked or forgot.
pub(crate) async fn mark_lost(state: &AppState, after: Duration) -> ApiResult<Vec<String>> {
    let since = (now_ms() - after.as_millis() as i64).to_string();
    let gone = select(
        &state.db,
        "WHERE w.host_id <> $1 AND w.state <> 'lost'
           AND COALESCE(h.last_seen_at, 0) < CAST($2 AS BIGINT)",
        &[&state.host_id, &since],
    )
    .await?;
    let mut marked = Vec::new();
    for ws in gone {
        let Ok(next) = ws.state.next(ws.desired, Event::HostLost) else {
            continue;
        };
        let mut tx = state.db.begin_write().await?;
        let done = match next {
            Next::Record(lost) => sqlx::query(
                "UPDATE workspaces SET state = $2, moving_to = NULL, updated_at = $3 WHERE id = $1 AND state = $4",
            )
            .bind(&ws.id.0)
            .bind(lost.as_str())
            .bind(now_ms())
            .bind(ws.state.as_str())
            .execute(&mut *tx)
            .await?,
            Next::Forget => sqlx::query("DELETE FROM workspaces WHERE id = $1 AND state = $2")
                .bind(&ws.id.0)
                .bind(ws.state.as_str())
                .execute(&mut *tx)
                .await?,
            _ => continue,
        };
        if done.rows_affected() == 0 {
            continue;
        }
        // Whatever was queued for the host that is gone.
        jobs::cancel_queued(&mut tx, &ws.id.0).await?;
        if next == Next::Forget {
            // Should the host come back, it removes what it has of it.
            jobs::enqueue_cleanup(&mut tx, &ws.host_id.0, &ws.spec()).await?;
        }
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = $2 WHERE workspace_id = $1 AND state = 'running'")
            .bind(&ws.id.0)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::warn!(workspace = %ws.name, host = %ws.host, "its host stopped reporting: the workspace is lost");
        marked.push(ws.name.clone());
    }
    Ok(marked)
}
