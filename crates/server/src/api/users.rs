//! Logging in, users and their API tokens.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{Body, check_name};
use crate::auth::{Caller, User, hash_password, new_token, verify_password};
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use warren_api::{LoginRequest, LoginResponse, NewUser, TokenView, TrustChange, UserView};

/// Exchange a user name and password for an API token
#[utoipa::path(post, path = "/api/v1/login", tag = "users",
    request_body = LoginRequest,
    responses((status = OK, body = LoginResponse)),
    security(()))]
pub async fn login(
    State(state): State<AppState>,
    crate::client::ClientAddr(client): crate::client::ClientAddr,
    Body(req): Body<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let (user_id, is_admin) = check_password(&state, client, &req.user, &req.password).await?;
    let name = req.token_name.unwrap_or_else(|| "cli".into());
    let (_, token) = insert_token(&state, &user_id, &name).await?;
    Ok(Json(LoginResponse {
        token,
        user: req.user,
        admin: is_admin,
    }))
}

/// The user `name` with this password, as `(id, is_admin)`: what the API's login and the web
/// UI's sign-in both ask, under one throttle.
pub(crate) async fn check_password(
    state: &AppState,
    client: std::net::IpAddr,
    name: &str,
    password: &str,
) -> ApiResult<(String, bool)> {
    // Refused before anything is kept of it (the throttle's records are keyed by name).
    if name.is_empty() || name.len() > 64 {
        return Err(ApiError::bad_request("a user name has 1 to 64 bytes"));
    }
    let now = std::time::Instant::now();
    let wait = state.logins.wait(name, client, now);
    if !wait.is_zero() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed logins for `{name}`: try again in {} s",
                wait.as_secs().max(1)
            ),
        ));
    }
    let row: Option<(String, String, i64)> =
        sqlx::query_as("SELECT id, password_hash, is_admin FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&state.db.pool)
            .await?;
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "wrong user name or password");
    // An unknown name costs the same verification as a wrong password; argon2 runs off the
    // async workers, which must keep serving everybody else.
    let hash = match &row {
        Some((_, hash, _)) => hash.clone(),
        None => crate::auth::unknown_user_hash().to_owned(),
    };
    // Counted as a failure before it is verified (refunded on success), so parallel guesses
    // cannot all slip in under the throttle; at most a few verifications at once (each takes
    // ~19 MiB), whoever asks.
    state.logins.failed(name, client, now);
    static VERIFYING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
    let _turn = VERIFYING
        .acquire()
        .await
        .map_err(|e| ApiError::internal("cannot verify a password", e))?;
    let password = password.to_owned();
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let Some((user_id, _, is_admin)) = row.filter(|_| verified) else {
        return Err(refused());
    };
    state.logins.succeeded(name, client);
    Ok((user_id, is_admin != 0))
}

fn user_view(user: User) -> UserView {
    UserView {
        id: user.id,
        name: user.name,
        admin: user.is_admin.0,
    }
}

/// Change a user's trust domain: whether KSM may merge their VMs' memory (admin)
#[utoipa::path(patch, path = "/api/v1/users/{user}", tag = "users",
    params(("user" = String, Path, description = "The user's id or name")),
    request_body = TrustChange,
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<TrustChange>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let done = sqlx::query("UPDATE users SET vm_ksm = $1 WHERE name = $2 OR id = $2")
        .bind(i64::from(req.vm_ksm))
        .bind(&name)
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found(format_args!("user `{name}`")));
    }
    tracing::info!(user = %name, vm_ksm = req.vm_ksm, by = %caller.name, "trust domain changed");
    Ok(StatusCode::NO_CONTENT)
}

/// The calling user
#[utoipa::path(get, path = "/api/v1/me", tag = "users", responses((status = OK, body = UserView)))]
pub async fn me(caller: Caller) -> Json<UserView> {
    Json(UserView {
        id: caller.user_id,
        name: caller.name,
        admin: caller.is_admin,
    })
}

/// Set how long your workspaces may stay unused before they are stopped (those whose workspace
/// and project set none)
#[utoipa::path(put, path = "/api/v1/me/idle-timeout", tag = "users",
    request_body = warren_api::IdleTimeout,
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn set_my_idle_timeout(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<warren_api::IdleTimeout>,
) -> ApiResult<StatusCode> {
    let seconds = crate::idle::check_timeout(req.seconds)?;
    sqlx::query("UPDATE users SET idle_timeout_s = $2 WHERE id = $1")
        .bind(&caller.user_id)
        .bind(seconds)
        .execute(&state.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// All users (admin)
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = OK, body = Vec<UserView>)))]
pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<UserView>>> {
    caller.require_admin()?;
    let users = sqlx::query_as::<_, User>("SELECT id, name, is_admin FROM users ORDER BY name")
        .fetch_all(&state.db.pool)
        .await?;
    Ok(Json(users.into_iter().map(user_view).collect()))
}

/// Create a user (admin)
#[utoipa::path(post, path = "/api/v1/users", tag = "users",
    request_body = NewUser,
    responses((status = CREATED, body = UserView)))]
pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewUser>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    check_name("user", &req.name)?;
    if req.password.len() < 8 {
        return Err(ApiError::bad_request(
            "a password needs at least 8 characters",
        ));
    }
    let id = new_id();
    let password = req.password.clone();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::internal("cannot hash a password", e))??;
    sqlx::query("INSERT INTO users (id, name, password_hash, is_admin, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&id)
        .bind(&req.name)
        .bind(hash)
        .bind(i64::from(req.admin))
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(UserView {
            id,
            name: req.name,
            admin: req.admin,
        }),
    ))
}

/// A new API token of `user_id`'s: its id and the token (stored only as its digest).
async fn insert_token(state: &AppState, user_id: &str, name: &str) -> ApiResult<(String, String)> {
    let (token, token_hash) = new_token();
    let id = new_id();
    sqlx::query("INSERT INTO api_tokens (id, user_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&id)
        .bind(user_id)
        .bind(name)
        .bind(token_hash)
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    Ok((id, token))
}

/// A new API token of the caller's, named `name`: its id and the token, shown once. Only the
/// web UI makes one this way, for a signed-in user (a token cannot make another: one that
/// leaked could otherwise outlive its revocation).
pub(crate) async fn make_token(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> ApiResult<(String, String)> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "name the token: 1 to 100 characters, no control characters",
        ));
    }
    insert_token(state, &caller.user_id, name).await
}

/// The caller's API tokens
#[utoipa::path(get, path = "/api/v1/tokens", tag = "users",
    responses((status = OK, body = Vec<TokenView>)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenView>>> {
    let tokens = sqlx::query_as::<_, TokenView>(
        "SELECT id, name, created_at FROM api_tokens WHERE user_id = $1 ORDER BY created_at",
    )
    .bind(&caller.user_id)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(tokens))
}

/// Revoke one of the caller's tokens
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "users",
    params(("id" = String, Path, description = "Its id")),
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1 AND user_id = $2")
        .bind(&id)
        .bind(&caller.user_id)
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found(format_args!("token `{id}`")));
    }
    Ok(StatusCode::NO_CONTENT)
}
