//! Users' SSH public keys, added with a proof of possession.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{Body, check_name};
use crate::auth::Caller;
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use warren_api::{KeyChallenge, KeyView, NewKey, SshView};

/// What the caller signs with a key to add it (SSHSIG namespace and message)
#[utoipa::path(get, path = "/api/v1/keys/challenge", tag = "keys",
    responses((status = OK, body = KeyChallenge)))]
pub async fn key_challenge(caller: Caller) -> Json<KeyChallenge> {
    Json(KeyChallenge {
        namespace: crate::key_proof::KEY_PROOF_NAMESPACE.to_owned(),
        message: crate::key_proof::key_proof_message(&caller.user_id),
    })
}

/// The SSH gateway's address and host key (for `warren ssh-config`)
#[utoipa::path(get, path = "/api/v1/ssh", tag = "keys", responses((status = OK, body = SshView)))]
pub async fn ssh_gateway(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<SshView>> {
    state.ssh.clone().map(Json).ok_or_else(|| {
        ApiError::not_found("SSH gateway in this server (start one with `warren gateway`)")
    })
}

/// `type base64 [comment]` → the key's SHA-256 fingerprint as OpenSSH prints it.
pub fn ssh_fingerprint(public_key: &str) -> ApiResult<String> {
    use base64::Engine as _;
    let mut parts = public_key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(ApiError::bad_request(
            "a public key looks like `ssh-ed25519 AAAA... comment`",
        ));
    };
    const KINDS: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !KINDS.contains(&kind) {
        return Err(ApiError::bad_request(format!(
            "unsupported key type `{kind}`"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| ApiError::bad_request("the key's base64 part is not valid"))?;
    // The blob starts with its own type as an SSH string.
    let named = bytes.get(4..).zip(bytes.get(..4)).and_then(|(rest, len)| {
        rest.get(..u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
    });
    if named != Some(kind.as_bytes()) {
        return Err(ApiError::bad_request(
            "the key's data does not match its type",
        ));
    }
    Ok(blob_fingerprint(&bytes))
}

/// A key's wire-format blob → its SHA-256 fingerprint as OpenSSH prints it.
pub fn blob_fingerprint(blob: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(blob))
    )
}

/// The caller's SSH public keys
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = OK, body = Vec<KeyView>)))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<KeyView>>> {
    let keys = sqlx::query_as::<_, KeyView>(
        "SELECT id, name, public_key, fingerprint FROM ssh_keys WHERE user_id = $1 ORDER BY name",
    )
    .bind(&caller.user_id)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(keys))
}

/// Add an SSH public key, with a signature proving the caller holds it
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys",
    request_body = NewKey,
    responses((status = CREATED, body = KeyView)))]
pub async fn add_key(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewKey>,
) -> ApiResult<impl IntoResponse> {
    check_name("key", &req.name)?;
    let public_key = req.public_key.trim().to_owned();
    let fingerprint = ssh_fingerprint(&public_key)?;
    // The gateway knows a developer by their key: whoever registers a key they do not hold
    // could keep its owner out, so the key must sign the caller's own challenge.
    let signature = req.signature.as_deref().ok_or_else(|| {
        ApiError::bad_request(format!(
            "prove you hold the key: sign the message of GET /api/v1/keys/challenge with it \
             (`ssh-keygen -Y sign -n {} -f KEY`) and send it as `signature`; `warren key add` does this",
            crate::key_proof::KEY_PROOF_NAMESPACE
        ))
    })?;
    crate::key_proof::verify_key_proof(&public_key, signature, &caller.user_id)
        .map_err(ApiError::bad_request)?;
    let id = new_id();
    sqlx::query(
        "INSERT INTO ssh_keys (id, user_id, name, public_key, fingerprint, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(&caller.user_id)
    .bind(&req.name)
    .bind(&public_key)
    .bind(&fingerprint)
    .bind(now_ms())
    .execute(&state.db.pool)
    .await
    .map_err(|e| match ApiError::from(e) {
        c if c.status == StatusCode::CONFLICT => ApiError::conflict(
            "this key is registered already (the gateway knows a developer by their key, so a key belongs to one user)",
        ),
        other => other,
    })?;
    Ok((
        StatusCode::CREATED,
        Json(KeyView {
            id,
            name: req.name,
            public_key,
            fingerprint,
        }),
    ))
}

/// Remove an SSH public key (by id or name)
#[utoipa::path(delete, path = "/api/v1/keys/{key}", tag = "keys",
    params(("key" = String, Path, description = "The key's id or name")),
    responses((status = NO_CONTENT, description = "Done")))]
pub async fn delete_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let done = sqlx::query("DELETE FROM ssh_keys WHERE (id = $1 OR name = $1) AND user_id = $2")
        .bind(&key)
        .bind(&caller.user_id)
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found(format_args!("key `{key}`")));
    }
    Ok(StatusCode::NO_CONTENT)
}
