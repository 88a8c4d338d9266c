//! Several server processes (replicas) on one PostgreSQL database. Every request can be served
//! by any of them: the state, the job queue and the sessions are the database's. What must run
//! once — the git poller (which queues prebuilds and archives old ones) and the idle stop — is
//! held by one replica at a time through a PostgreSQL advisory lock ([`Singleton`]): the
//! lock goes with its holder's connection, so when a replica dies another takes the work over
//! within [`RETRY`]. Each replica says where agents reach it (`--advertise-url`), so that every
//! host keeps a tunnel to every replica and any of them reaches any workspace.

use std::time::Duration;

use sqlx::Connection as _;

use crate::db::{Db, DbKind, new_id, now_ms};

/// How often a replica that does not hold a singleton's lock tries to take it, and how often
/// a replica says it is alive.
pub const RETRY: Duration = Duration::from_secs(5);

/// A replica not heard from for this long is not offered to agents.
const ALIVE_WITHIN_MS: i64 = 20_000;

/// Work only one replica does at a time, by name (each name its own lock).
#[allow(missing_debug_implementations, reason = "holds a database connection")]
pub struct Singleton {
    db: Db,
    name: &'static str,
    /// The connection holding the lock, while this replica holds it.
    held: Option<sqlx::AnyConnection>,
}

impl Singleton {
    pub fn new(db: Db, name: &'static str) -> Self {
        Self {
            db,
            name,
            held: None,
        }
    }

    /// The lock's key: stable across versions and processes (the first 8 bytes of the name's
    /// SHA-256), so the same work always takes the same lock.
    fn key(&self) -> i64 {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(format!("warren:{}", self.name).as_bytes());
        i64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
    }

    /// Returns once this replica holds the work's lock (at once when it does already, or on
    /// SQLite, which one process uses); meanwhile tries every [`RETRY`].
    pub async fn lead(&mut self) {
        if self.db.kind == DbKind::Sqlite {
            return;
        }
        loop {
            if let Some(conn) = &mut self.held {
                if conn.ping().await.is_ok() {
                    return;
                }
                tracing::warn!(
                    work = self.name,
                    "lost the connection holding this work's lock"
                );
                self.held = None;
            }
            match try_take(&self.db, self.key()).await {
                Ok(Some(conn)) => {
                    tracing::info!(work = self.name, "this replica does this work now");
                    self.held = Some(conn);
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(work = self.name, error = %e, "cannot ask for this work's lock")
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// A connection of its own (not the pool's: the lock lives as long as it) holding lock `key`,
/// or `None` when another replica holds it.
async fn try_take(db: &Db, key: i64) -> Result<Option<sqlx::AnyConnection>, sqlx::Error> {
    let mut conn = db.pool.acquire().await?.detach();
    let took: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut conn)
        .await?;
    Ok(took.then_some(conn))
}

/// Says, every [`RETRY`] until `stop`, that this replica is alive and reached at `url` (by
/// agents, and by the other replicas' hosts); gone from the list once stopped.
pub async fn advertise(
    db: Db,
    id: String,
    url: String,
    host_id: String,
    stop: std::sync::Arc<tokio::sync::Notify>,
) {
    let stopped = stop.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    loop {
        let now = now_ms();
        let said = sqlx::query(
            "INSERT INTO replicas (id, url, host_id, started_at, last_seen_at) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (id) DO UPDATE SET last_seen_at = $4",
        )
        .bind(&id)
        .bind(&url)
        .bind(&host_id)
        .bind(now)
        .execute(&db.pool)
        .await;
        if let Err(e) = said {
            tracing::warn!(error = %e, "cannot say this replica is alive");
        }
        // Replicas that died long ago.
        let _ = sqlx::query("DELETE FROM replicas WHERE last_seen_at < $1")
            .bind(now - 3_600_000)
            .execute(&db.pool)
            .await;
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = &mut stopped => break,
        }
    }
    let _ = sqlx::query("DELETE FROM replicas WHERE id = $1")
        .bind(&id)
        .execute(&db.pool)
        .await;
}

/// Refuses to run a replica as a host that is an agent's (its token would be replaced, and two
/// runtimes would take its jobs) or that another live replica runs as.
pub async fn claim_host(db: &Db, host_id: &str, name: &str, replica: &str) -> Result<(), String> {
    let db_error = |e: sqlx::Error| format!("database: {e}");
    let (has_token, is_replica): (i64, i64) = sqlx::query_as(
        "SELECT CASE WHEN token_hash IS NULL THEN 0 ELSE 1 END, replica FROM hosts WHERE id = $1",
    )
    .bind(host_id)
    .fetch_one(&db.pool)
    .await
    .map_err(db_error)?;
    if has_token != 0 && is_replica == 0 {
        return Err(format!(
            "host name `{name}` is an agent's host (warren host add): give this server its own --host-name"
        ));
    }
    let running: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM replicas WHERE host_id = $1 AND last_seen_at >= $2 AND id <> $3",
    )
    .bind(host_id)
    .bind(now_ms() - ALIVE_WITHIN_MS)
    .bind(replica)
    .fetch_one(&db.pool)
    .await
    .map_err(db_error)?;
    if running > 0 {
        return Err(format!(
            "another server runs as host `{name}`: give each replica its own --host-name"
        ));
    }
    Ok(())
}

/// This server's replica id, kept in `file` (beside its data) so that the same server started
/// again is known as itself.
pub fn local_id(file: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(file) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", file.display())),
    }
    let id = new_id();
    std::fs::write(file, &id).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(id)
}

/// Where the live replicas are reached, the newest first.
pub async fn live(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    let mut urls: Vec<String> = sqlx::query_scalar(
        "SELECT url FROM replicas WHERE last_seen_at >= $1 ORDER BY started_at DESC",
    )
    .bind(now_ms() - ALIVE_WITHIN_MS)
    .fetch_all(&db.pool)
    .await?;
    let mut seen = std::collections::HashSet::new();
    urls.retain(|u| seen.insert(u.clone()));
    Ok(urls)
}
