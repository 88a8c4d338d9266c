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
/// Failed logins from one address, whatever names they try, before it is slowed down too.
pub const FREE_FAILURES_PER_ADDRESS: u32 = 50;
/// Most records kept: beyond, the oldest go (a flood of names cannot grow memory without end).
const MOST_RECORDS: usize = 100_000;
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
        let of_user = map
            .get(&(user.to_owned(), addr))
            .map_or(std::time::Duration::ZERO, |f| {
                (f.last + Self::wait_after(f.count)).saturating_duration_since(now)
            });
        // The address as a whole (the empty name), with a larger free budget: trying many
        // names from one place is slowed down as trying one name is.
        let of_address = map
            .get(&(String::new(), addr))
            .map_or(std::time::Duration::ZERO, |f| {
                let over = f
                    .count
                    .saturating_sub(FREE_FAILURES_PER_ADDRESS - FREE_FAILURES);
                (f.last + Self::wait_after(over)).saturating_duration_since(now)
            });
        of_user.max(of_address)
    }

    pub fn failed(&self, user: &str, addr: std::net::IpAddr, now: std::time::Instant) {
        if let Ok(mut map) = self.failures.lock() {
            if map.len() >= MOST_RECORDS {
                let mut by_age: Vec<_> = map.iter().map(|(k, f)| (f.last, k.clone())).collect();
                by_age.sort_unstable_by_key(|(last, _)| *last);
                for (_, key) in by_age.into_iter().take(MOST_RECORDS / 10) {
                    map.remove(&key);
                }
            }
            for key in [(user.to_owned(), addr), (String::new(), addr)] {
                let f = map.entry(key).or_insert(Failures {
                    count: 0,
                    last: now,
                });
                f.count = f.count.saturating_add(1);
                f.last = now;
            }
        }
    }

    /// A success clears the name's record and refunds the one failure counted for the
    /// address before the password was verified.
    pub fn succeeded(&self, user: &str, addr: std::net::IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&(user.to_owned(), addr));
            let key = (String::new(), addr);
            if let Some(f) = map.get_mut(&key) {
                f.count = f.count.saturating_sub(1);
                if f.count == 0 {
                    map.remove(&key);
                }
            }
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
    use std::time::{Duration, Instant};

    #[test]
    fn failed_logins_slow_down_per_user_and_address() {
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
    fn many_names_from_one_address_are_slowed_too() {
        let throttle = LoginThrottle::default();
        let here: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        // Four tries per name stay under each name's budget, not under the address's.
        for n in 0..FREE_FAILURES_PER_ADDRESS {
            let name = format!("user{}", n / (FREE_FAILURES - 1));
            assert_eq!(throttle.wait(&name, here, t0), Duration::ZERO, "try {n}");
            throttle.failed(&name, here, t0);
        }
        assert_eq!(
            throttle.wait("fresh-name", here, t0),
            Duration::from_secs(1)
        );
        let elsewhere: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(throttle.wait("fresh-name", elsewhere, t0), Duration::ZERO);
        // Each login counts as a failure until verified: successes are refunded, so a machine
        // that logs in often is never slowed down.
        for _ in 0..3 * FREE_FAILURES_PER_ADDRESS {
            assert_eq!(throttle.wait("ci", elsewhere, t0), Duration::ZERO);
            throttle.failed("ci", elsewhere, t0);
            throttle.succeeded("ci", elsewhere);
        }
    }

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
