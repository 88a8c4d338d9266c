//! Who is calling: passwords (argon2), API tokens (random, stored as SHA-256), the admin made at
//! first start, and the [`Caller`] every handler receives.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::db::{Db, new_id, now_ms, random_bytes};
use crate::error::ApiError;
use crate::state::AppState;

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(&random_bytes::<16>())
        .map_err(|e| ApiError::internal("cannot make a salt", e))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal("cannot hash a password", e))
}

/// A hash of nothing anybody knows, with the same cost as a real one: verified against when a
/// login names no user, so an unknown name takes as long as a wrong password.
pub fn unknown_user_hash() -> &'static str {
    static HASH: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash_password("no such user").unwrap_or_default());
    &HASH
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A new API token (shown once) and the hash that is stored.
pub fn new_token() -> (String, String) {
    let token = format!(
        "wrn_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    );
    let hash = token_hash(&token);
    (token, hash)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A readable random password for the first admin.
pub fn new_password() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<18>())
}

/// Creates the `admin` user if there is no user at all; returns its password (shown once).
pub async fn bootstrap_admin(db: &Db) -> Result<Option<String>, ApiError> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&db.pool)
        .await?;
    if count > 0 {
        return Ok(None);
    }
    let password = new_password();
    sqlx::query("INSERT INTO users (id, name, password_hash, is_admin, created_at) VALUES ($1, $2, $3, 1, $4)")
        .bind(new_id())
        .bind("admin")
        .bind(hash_password(&password)?)
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    Ok(Some(password))
}

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub name: String,
    pub is_admin: bool,
}

impl Caller {
    /// Whether the caller may see and act on something owned by `owner_id`.
    pub fn may_touch(&self, owner_id: &str) -> bool {
        self.is_admin || self.user_id == owner_id
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("only an admin may do that"))
        }
    }
}

/// A user as stored (`id, name, is_admin`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct User {
    pub id: String,
    pub name: String,
    #[sqlx(try_from = "i64")]
    pub is_admin: crate::db::Flag,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(ApiError::unauthorized)?;
        let user = sqlx::query_as::<_, User>(
            "SELECT u.id, u.name, u.is_admin FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(token_hash(token.trim()))
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unknown or revoked token: log in again"))?;
        Ok(Self {
            user_id: user.id,
            name: user.name,
            is_admin: user.is_admin.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_user_costs_a_real_verification() {
        let hash = unknown_user_hash();
        assert!(hash.starts_with("$argon2"), "{hash}");
        assert!(!verify_password("guess", hash));
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap_or_default();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("wrn_") && a.len() > 40);
        assert_eq!(token_hash(&a), ha);
        assert!(!ha.contains(&a[4..]));
    }
}
