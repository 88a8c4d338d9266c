//! Secrets at rest: values of secret environment variables are sealed with ChaCha20-Poly1305
//! under a key Warren generates at first start and keeps in a file of mode 0600 beside its data.
//! The variable's scope and name are bound in as associated data, so a sealed value copied to
//! another variable does not open.

use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::db::random_bytes;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secret key {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret key {0} is not 32 bytes: it is damaged or not Warren's")]
    BadKey(String),
    #[error("a stored secret does not open with this key (wrong key file, or damaged value)")]
    Open,
}

#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

const PREFIX: &str = "v1:";

impl SecretBox {
    /// Opens the key at `path`, creating it (mode 0600, never overwritten) if absent.
    pub fn open_or_create(path: &Path) -> Result<Self, SecretError> {
        let shown = path.display().to_string();
        let err = |source| SecretError::KeyFile {
            path: shown.clone(),
            source,
        };
        // Created whole or not at all, never over an existing key.
        warren_hostfs::create_private(path, &random_bytes::<32>()).map_err(err)?;
        let key = std::fs::read(path).map_err(err)?;
        if key.len() != 32 {
            return Err(SecretError::BadKey(shown));
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        })
    }

    pub fn seal(&self, context: &str, value: &str) -> String {
        let nonce = random_bytes::<12>();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend(sealed);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    pub fn open(&self, context: &str, sealed: &str) -> Result<String, SecretError> {
        let bytes = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .filter(|b| b.len() > 12)
            .ok_or(SecretError::Open)?;
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&bytes[..12]),
                Payload {
                    msg: &bytes[12..],
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Open)?;
        String::from_utf8(plain).map_err(|_| SecretError::Open)
    }
}

/// The variables of these scopes (`("project", id)`, `("user", id)`), in order, secrets opened:
/// they stay in memory and go only to the processes they are for.
pub(crate) async fn variables(
    db: &crate::db::Db,
    secrets: &SecretBox,
    scopes: &[(&str, &str)],
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (scope, scope_id) in scopes {
        let rows = StoredVariable::of(db, scope, scope_id)
            .await
            .map_err(|e| e.to_string())?;
        for row in rows {
            let value = if row.secret.0 {
                secrets
                    .open(&row.context(scope, scope_id), &row.value)
                    .map_err(|e| format!("variable {}: {e}", row.name))?
            } else {
                row.value
            };
            out.push((row.name, value));
        }
    }
    Ok(out)
}

/// A variable as stored: a secret's value is sealed.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredVariable {
    pub name: String,
    #[sqlx(try_from = "i64")]
    pub secret: crate::db::Flag,
    pub value: String,
}

impl StoredVariable {
    /// The variables of one scope (`user` or `project` and its id), by name.
    pub(crate) async fn of(
        db: &crate::db::Db,
        scope: &str,
        scope_id: &str,
    ) -> Result<Vec<Self>, sqlx::Error> {
        sqlx::query_as(
            "SELECT name, secret, value FROM env_vars WHERE scope = $1 AND scope_id = $2 ORDER BY name",
        )
        .bind(scope)
        .bind(scope_id)
        .fetch_all(&db.pool)
        .await
    }

    /// What its secret is sealed with.
    pub(crate) fn context(&self, scope: &str, scope_id: &str) -> String {
        sealed_as(scope, scope_id, &self.name)
    }
}

/// Refuses a key that cannot open the secrets already sealed in the database (a replica started
/// with a `secret.key` of its own, not the first server's): one would be sealed under two keys.
pub async fn check_key(db: &crate::db::Db, key: &SecretBox, path: &Path) -> Result<(), String> {
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT scope, scope_id, name, value FROM env_vars WHERE secret = 1 LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await
    .map_err(|e| format!("database: {e}"))?;
    let Some((scope, scope_id, name, value)) = row else {
        return Ok(());
    };
    key.open(&sealed_as(&scope, &scope_id, &name), &value)
        .map(drop)
        .map_err(|_| {
            format!(
                "{} does not open the secrets in the database: another server sealed them; \
                 give every replica that server's secret.key (mode 0600)",
                path.display()
            )
        })
}

/// The context a variable's secret is sealed with: it opens only under the scope and name it
/// was set as, so a sealed value copied to another row does not open.
pub(crate) fn sealed_as(scope: &str, scope_id: &str, name: &str) -> String {
    format!("{scope}/{scope_id}/{name}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = SecretBox::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        let sealed = a.seal("project/p1/TOKEN", "hunter2");
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            sealed,
            a.seal("project/p1/TOKEN", "hunter2"),
            "a fresh nonce each time"
        );
        // Reopening reads the same key.
        let again = SecretBox::open_or_create(&path).unwrap();
        assert_eq!(again.open("project/p1/TOKEN", &sealed).unwrap(), "hunter2");
        assert!(
            again.open("project/p2/TOKEN", &sealed).is_err(),
            "bound to its variable"
        );
        let other = SecretBox::open_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("project/p1/TOKEN", &sealed).is_err());
        assert!(a.open("x", "v1:not-base64").is_err());
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            SecretBox::open_or_create(&path),
            Err(SecretError::BadKey(_))
        ));
    }
}
