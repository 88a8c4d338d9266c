//! The database: SQLite by default, PostgreSQL when configured — one code path through sqlx's
//! Any driver, one set of migrations (embedded, applied in order at start, each in a transaction).

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL `{0}` (use sqlite://PATH or postgres://...)")]
    Url(String),
    #[error("cannot open the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot make the database {0} private (mode 0600): {1}")]
    Private(String, #[source] std::io::Error),
    #[error("migration {version} failed: {source}")]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub kind: DbKind,
}

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_webhooks.sql")),
    (3, include_str!("../migrations/0003_host_images.sql")),
    (4, include_str!("../migrations/0004_unique_ssh_keys.sql")),
    (5, include_str!("../migrations/0005_workspace_tasks.sql")),
    (6, include_str!("../migrations/0006_workspace_stats.sql")),
    (7, include_str!("../migrations/0007_workspace_user.sql")),
    (8, include_str!("../migrations/0008_prebuilds.sql")),
    (9, include_str!("../migrations/0009_host_prebuilds.sql")),
    (10, include_str!("../migrations/0010_workspace_runtime.sql")),
    (11, include_str!("../migrations/0011_workspace_disk.sql")),
    (12, include_str!("../migrations/0012_host_disk_ceiling.sql")),
    (13, include_str!("../migrations/0013_sessions.sql")),
    (14, include_str!("../migrations/0014_idle_stop.sql")),
    (15, include_str!("../migrations/0015_workspace_ports.sql")),
    (16, include_str!("../migrations/0016_preview_grants.sql")),
    (17, include_str!("../migrations/0017_host_load.sql")),
    (18, include_str!("../migrations/0018_prebuild_registry.sql")),
    (
        19,
        include_str!("../migrations/0019_workspace_placement.sql"),
    ),
    (20, include_str!("../migrations/0020_replicas.sql")),
    (21, include_str!("../migrations/0021_workspace_layers.sql")),
    (22, include_str!("../migrations/0022_replica_hosts.sql")),
    (23, include_str!("../migrations/0023_workspace_folder.sql")),
];

/// The advisory lock PostgreSQL migrations are made under ("warren-m").
const MIGRATION_LOCK: i64 = 0x7761_7272_656e_2d6d;

/// The SQLite file holds every user's password hash, tokens' hashes and sealed secrets: made
/// (or set) 0600 before SQLite opens it, whose WAL and shared-memory files take its mode.
fn keep_private(url: &str) -> Result<(), DbError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let rest = url.strip_prefix("sqlite:").unwrap_or(url);
    let path = rest
        .strip_prefix("//")
        .unwrap_or(rest)
        .split('?')
        .next()
        .unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    let private = |e: std::io::Error| DbError::Private(path.to_owned(), e);
    let file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(private)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(private)?;
    // Files an older Warren left with the default mode.
    for suffix in ["-wal", "-shm"] {
        let side = format!("{path}{suffix}");
        if std::path::Path::new(&side).exists() {
            std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600))
                .map_err(private)?;
        }
    }
    Ok(())
}

impl Db {
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            DbKind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            DbKind::Postgres
        } else {
            return Err(DbError::Url(url.to_owned()));
        };
        let mut options =
            AnyPoolOptions::new().max_connections(if kind == DbKind::Sqlite { 4 } else { 16 });
        if kind == DbKind::Sqlite {
            // WAL lets readers run beside the writer; the busy timeout makes writers queue
            // instead of failing; SQLite enforces foreign keys only when asked.
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            });
        }
        if kind == DbKind::Sqlite {
            keep_private(url)?;
        }
        let url = if kind == DbKind::Sqlite && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = options.connect(&url).await.map_err(DbError::Connect)?;
        let db = Self { pool, kind };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let fail = |version| move |source| DbError::Migrate { version, source };
        // Replicas started at once migrate one after the other: the lock is held by a
        // connection of its own, released when it closes.
        let _migrating = if self.kind == DbKind::Postgres {
            let mut conn = self.pool.acquire().await.map_err(fail(0))?.detach();
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut conn)
                .await
                .map_err(fail(0))?;
            Some(conn)
        } else {
            None
        };
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS warren_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(fail(0))?;
        for &(version, sql) in MIGRATIONS {
            let mut tx = self.begin_write().await.map_err(fail(version))?;
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM warren_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(fail(version))?;
            if applied.is_some() {
                continue;
            }
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(fail(version))?;
            sqlx::query("INSERT INTO warren_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(fail(version))?;
            tx.commit().await.map_err(fail(version))?;
            tracing::info!(version, "database migrated");
        }
        self.hash_webhook_secrets().await.map_err(fail(0))
    }

    /// Webhook secrets stored as given by earlier versions are replaced by their digests
    /// (`sha256:<hex>`), as tokens are: the database never holds one a caller could use.
    async fn hash_webhook_secrets(&self) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, webhook_secret FROM projects WHERE webhook_secret IS NOT NULL AND webhook_secret NOT LIKE 'sha256:%'",
        )
        .fetch_all(&self.pool)
        .await?;
        for (id, secret) in rows {
            sqlx::query("UPDATE projects SET webhook_secret = $1 WHERE id = $2")
                .bind(webhook_digest(&secret))
                .bind(&id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}

/// How a project's webhook secret is kept: its SHA-256 digest (the secret is 128 random bits,
/// so a digest is enough; no salt or slow hash is needed).
pub fn webhook_digest(secret: &str) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(secret.as_bytes()))
    )
}

impl Db {
    /// A transaction that will write. On SQLite it takes the write lock at `BEGIN IMMEDIATE`:
    /// a deferred transaction that reads first and then writes fails at once with
    /// SQLITE_BUSY_SNAPSHOT when another connection wrote in between (the busy timeout does
    /// not apply to that case).
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            DbKind::Postgres => self.pool.begin().await,
        }
    }
}

/// A 0/1 flag as stored (the same on SQLite and PostgreSQL); read into a row's field with
/// `#[sqlx(try_from = "i64")]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flag(pub bool);

impl From<i64> for Flag {
    fn from(stored: i64) -> Self {
        Self(stored != 0)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A new random id: 16 lowercase hex digits.
pub fn new_id() -> String {
    hex::encode(random_bytes::<8>())
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS's random source failing is not something Warren can work around.
    if getrandom::fill(&mut buf).is_err() {
        panic!("the operating system's random source failed");
    }
    buf
}

/// A stored value that does not read as its type (a state another program wrote).
pub(crate) fn decode_error(
    column: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(e),
    }
}
