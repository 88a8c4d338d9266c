//! Who is calling: passwords (argon2), API tokens (random, stored as SHA-256), the admin made at
//! first start, and the [`Caller`] every handler receives.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::AppState;
use crate::db::{Db, new_id, now_ms, random_bytes};
use crate::error::ApiError;

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(&random_bytes::<16>())
        .map_err(|e| ApiError::internal("cannot make a salt", e))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal("cannot hash a password", e))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Slows password guessing: after [`FREE_FAILURES`] failed logins in a row for one user name
/// from one address, each further attempt waits twice as long as the last (1 s, 2 s, ... up to
/// 5 minutes). Keyed by address too, so a stranger cannot lock a user out from elsewhere. A
/// success clears the record. Kept in memory: a restart forgets it.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: std::sync::Mutex<std::collections::HashMap<(String, std::net::IpAddr), Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: std::time::Instant,
}

pub const FREE_FAILURES: u32 = 5;
const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// Records older than this are dropped (and with them, the slowing down).
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

impl LoginThrottle {
    fn wait_after(count: u32) -> std::time::Duration {
        if count < FREE_FAILURES {
            return std::time::Duration::ZERO;
        }
        let exp = (count - FREE_FAILURES).min(16);
        std::time::Duration::from_secs(1 << exp).min(LONGEST_WAIT)
    }

    /// How long `user` from `addr` must still wait before its next attempt (zero: go ahead).
    pub fn wait(
        &self,
        user: &str,
        addr: std::net::IpAddr,
        now: std::time::Instant,
    ) -> std::time::Duration {
        let Ok(mut map) = self.failures.lock() else {
            return std::time::Duration::ZERO;
        };
        map.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
        map.get(&(user.to_owned(), addr))
            .map_or(std::time::Duration::ZERO, |f| {
                (f.last + Self::wait_after(f.count)).saturating_duration_since(now)
            })
    }

    pub fn failed(&self, user: &str, addr: std::net::IpAddr, now: std::time::Instant) {
        if let Ok(mut map) = self.failures.lock() {
            let f = map.entry((user.to_owned(), addr)).or_insert(Failures {
                count: 0,
                last: now,
            });
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
    }

    pub fn succeeded(&self, user: &str, addr: std::net::IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&(user.to_owned(), addr));
        }
    }
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
    let count: i64 = sqlx::query("SELECT COUNT(*) FROM users")
        .fetch_one(&db.pool)
        .await?
        .get(0);
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

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(ApiError::unauthorized)?;
        let row = sqlx::query(
            "SELECT u.id, u.name, u.is_admin FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(token_hash(token.trim()))
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unknown or revoked token: log in again"))?;
        Ok(Self {
            user_id: row.try_get("id")?,
            name: row.try_get("name")?,
            is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_slow_down_per_user_and_address() {
        use std::time::{Duration, Instant};
        let throttle = LoginThrottle::default();
        let (here, there): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(throttle.wait("alice", here, t0), Duration::ZERO);
            throttle.failed("alice", here, t0);
        }
        assert_eq!(throttle.wait("alice", here, t0), Duration::from_secs(1));
        assert_eq!(
            throttle.wait("alice", there, t0),
            Duration::ZERO,
            "other addresses"
        );
        assert_eq!(
            throttle.wait("bob", here, t0),
            Duration::ZERO,
            "other users"
        );
        let t1 = t0 + Duration::from_secs(1);
        throttle.failed("alice", here, t1);
        assert_eq!(throttle.wait("alice", here, t1), Duration::from_secs(2));
        for _ in 0..30 {
            throttle.failed("alice", here, t1);
        }
        assert_eq!(throttle.wait("alice", here, t1), Duration::from_secs(300));
        throttle.succeeded("alice", here);
        assert_eq!(throttle.wait("alice", here, t1), Duration::ZERO);
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
