//! Idle stop: a running workspace nobody has used for its idle timeout is stopped, and says so
//! (`stop_reason`). Use is an open SSH channel (a shell, a command, a forward, sftp, an attached
//! task terminal), a command run through `exec`, or preview traffic; what runs inside on its own
//! (a long build) is not use. The clock starts again when the workspace reaches `running`.
//!
//! The timeout is the workspace's own, else its project's, else its owner's, else the server's
//! (`--idle-timeout`, 2 h); 0 is never. Optionally, workspaces stopped for longer than
//! `--delete-stopped-after` are deleted.
//!
//! Each process that serves use (the API, the SSH gateway, also when it runs alone) records it in
//! the database: at once when a use begins and ends, and every [`FLUSH`] while it lasts, so the
//! server's loop needs nothing but the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::db::{Db, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::model::Event;
use crate::state::AppState;
use crate::workspaces::{self, Workspace};

/// How often a use that lasts is written down, and how often the server looks for idle
/// workspaces.
pub const FLUSH: Duration = Duration::from_secs(15);

/// The shortest idle timeout (besides 0, never): shorter ones would stop a workspace between
/// two records of a use that lasts.
pub const SHORTEST_S: u64 = 60;
/// The longest: 30 days.
pub const LONGEST_S: u64 = 30 * 24 * 3600;

/// The uses of workspaces this process serves now.
pub struct Presence {
    db: Db,
    open: Mutex<HashMap<String, usize>>,
    /// When each workspace's use was last written: a use that begins or ends is written at
    /// most once per [`FLUSH`] (a page with many requests is one write, not one per request).
    written: Mutex<HashMap<String, std::time::Instant>>,
    /// Uses that ended while a write was too recent: written at the next flush.
    unwritten: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presence")
    }
}

impl Presence {
    /// Also starts writing down the uses that last (for as long as the presence lives).
    pub fn new(db: Db) -> Arc<Self> {
        let presence = Arc::new(Self {
            db,
            open: Mutex::default(),
            written: Mutex::default(),
            unwritten: Mutex::default(),
        });
        let weak = Arc::downgrade(&presence);
        tokio::spawn(flush_forever(weak));
        presence
    }

    /// Marks workspace `id` (the control plane's id) in use until the answer is dropped.
    pub fn in_use(self: &Arc<Self>, id: &str) -> Use {
        *self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default() += 1;
        self.touch_unless_recent(id);
        Use {
            presence: self.clone(),
            id: id.to_owned(),
        }
    }

    /// Writes `id`'s use now, unless it was written within the last [`FLUSH`].
    fn touch_unless_recent(&self, id: &str) {
        let now = std::time::Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written
            .get(id)
            .is_some_and(|at| now.duration_since(*at) < FLUSH)
        {
            self.unwritten
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.to_owned());
            return;
        }
        written.insert(id.to_owned(), now);
        // Forget workspaces not used for a while (the map stays as small as the busy set).
        written.retain(|_, at| now.duration_since(*at) < FLUSH * 4);
        drop(written);
        touch_soon(self.db.clone(), vec![id.to_owned()]);
    }

    fn open_ids(&self) -> Vec<String> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// One use of a workspace; it ends when this is dropped.
#[derive(Debug)]
pub struct Use {
    presence: Arc<Presence>,
    id: String,
}

impl Drop for Use {
    fn drop(&mut self) {
        let mut open = self.presence.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.id);
            }
        }
        drop(open);
        self.presence.touch_unless_recent(&self.id);
    }
}

async fn flush_forever(presence: Weak<Presence>) {
    loop {
        tokio::time::sleep(FLUSH).await;
        let Some(presence) = presence.upgrade() else {
            return;
        };
        let mut ids = presence.open_ids();
        let ended: Vec<String> = presence
            .unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for id in ended {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if !ids.is_empty() {
            {
                let now = std::time::Instant::now();
                let mut written = presence.written.lock().unwrap_or_else(|e| e.into_inner());
                for id in &ids {
                    written.insert(id.clone(), now);
                }
            }
            touch(&presence.db, &ids).await;
        }
    }
}

fn touch_soon(db: Db, ids: Vec<String>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move { touch(&db, &ids).await });
    }
}

async fn touch(db: &Db, ids: &[String]) {
    let now = now_ms();
    for id in ids {
        let done = sqlx::query("UPDATE workspaces SET last_active_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&db.pool)
            .await;
        if let Err(e) = done {
            tracing::warn!(workspace = %id, error = %e, "cannot record a workspace's use");
        }
    }
}

/// The server's settings for idle workspaces.
#[derive(Debug, Clone, Copy)]
pub struct IdlePolicy {
    /// Seconds; 0: never.
    pub default_timeout_s: u64,
    /// Delete workspaces stopped for this long.
    pub delete_stopped_after: Option<Duration>,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        Self {
            default_timeout_s: 2 * 3600,
            delete_stopped_after: None,
        }
    }
}

/// A workspace's idle timeout (seconds, 0: never) and where it was set: `workspace`,
/// `project`, `user` or `server`.
pub fn timeout_of(w: &Workspace, policy: &IdlePolicy) -> (u64, &'static str) {
    [
        (w.idle_timeout_s, "workspace"),
        (w.project_idle_timeout_s, "project"),
        (w.owner_idle_timeout_s, "user"),
    ]
    .into_iter()
    .find_map(|(t, whence)| t.map(|t| (t, whence)))
    .unwrap_or((policy.default_timeout_s, "server"))
}

/// Checks a timeout someone asks for (seconds; `None`: as the next level says).
pub fn check_timeout(seconds: Option<u64>) -> ApiResult<Option<i64>> {
    match seconds {
        None => Ok(None),
        Some(0) => Ok(Some(0)),
        Some(s) if (SHORTEST_S..=LONGEST_S).contains(&s) => Ok(Some(s as i64)),
        Some(s) => Err(ApiError::bad_request(format!(
            "an idle timeout of {s} s: give 0 (never) or {SHORTEST_S} s to {} days",
            LONGEST_S / 86400
        ))),
    }
}

/// `90 min`, `2 h`, `45 s`, for messages.
pub fn spoken(seconds: u64) -> String {
    match seconds {
        0 => "never".to_owned(),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Looks for idle workspaces every [`FLUSH`] and stops them; deletes long-stopped ones when
/// the policy says so.
pub async fn stop_idle_forever(state: AppState) {
    // One replica stops idle workspaces at a time.
    let mut stopper = crate::replicas::Singleton::new(state.db.clone(), "idle stop");
    loop {
        tokio::time::sleep(FLUSH).await;
        stopper.lead().await;
        if let Err(e) = stop_idle(&state, now_ms()).await {
            tracing::warn!(error = %e.message, "idle stop");
        }
    }
}

/// One look: returns the workspaces it stopped or deleted.
pub async fn stop_idle(state: &AppState, now: i64) -> ApiResult<Vec<String>> {
    let policy = state.idle;
    let mut acted = Vec::new();
    for w in workspaces::select(
        &state.db,
        "WHERE (w.state = 'running' AND w.desired = 'running') OR (w.state = 'stopped' AND w.desired = 'stopped')",
        &[],
    )
    .await?
    {
        if w.state == crate::model::WorkspaceState::Stopped {
            let Some(after) = policy.delete_stopped_after else {
                continue;
            };
            if now - w.updated_at >= after.as_millis() as i64 {
                tracing::info!(workspace = %w.name, owner = %w.owner, "deleting a workspace stopped for long");
                // One that cannot be moved now (it changed meanwhile) waits for the next look;
                // the others go on.
                match workspaces::request(state, &w, Event::Delete).await {
                    Ok(()) => acted.push(w.name.clone()),
                    Err(e) => tracing::warn!(workspace = %w.name, error = %e.message, "idle delete"),
                }
            }
            continue;
        }
        let (timeout, whence) = timeout_of(&w, &policy);
        let since = w.last_active_at.unwrap_or(0).max(w.updated_at);
        if timeout == 0 || now - since < (timeout * 1000) as i64 {
            continue;
        }
        tracing::info!(workspace = %w.name, owner = %w.owner, timeout, whence, "stopping an idle workspace");
        match stop_as_idle(state, &w, timeout, whence).await {
            Ok(()) => acted.push(w.name.clone()),
            Err(e) => tracing::warn!(workspace = %w.name, error = %e.message, "idle stop"),
        }
    }
    Ok(acted)
}

async fn stop_as_idle(
    state: &AppState,
    w: &Workspace,
    timeout: u64,
    whence: &str,
) -> ApiResult<()> {
    let stop = Event::Stop {
        grace_ms: crate::api::STOP_GRACE_S * 1000,
        force: false,
    };
    workspaces::request(state, w, stop).await?;
    let reason = format!(
        "idle: nobody used it for {} (its {whence}'s idle timeout)",
        spoken(timeout)
    );
    // Only while nobody has asked for anything else since.
    sqlx::query("UPDATE workspaces SET stop_reason = $2 WHERE id = $1 AND desired = 'stopped'")
        .bind(&w.id.0)
        .bind(reason)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_checked_and_spoken() {
        assert_eq!(check_timeout(None).ok(), Some(None));
        assert_eq!(check_timeout(Some(0)).ok(), Some(Some(0)));
        assert_eq!(check_timeout(Some(60)).ok(), Some(Some(60)));
        assert!(check_timeout(Some(59)).is_err());
        assert!(check_timeout(Some(LONGEST_S + 1)).is_err());
        assert_eq!(spoken(7200), "2 h");
        assert_eq!(spoken(5400), "90 min");
        assert_eq!(spoken(61), "61 s");
        assert_eq!(spoken(0), "never");
    }
}
