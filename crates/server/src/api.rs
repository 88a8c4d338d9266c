//! `/api/v1`: handlers over the database. Every handler takes the [`Caller`] and touches only
//! what the caller owns (admins: everything); another user's object answers 404, as a missing
//! one does, so ids and names do not leak. Request bodies are strict (unknown fields are errors)
//! and bounded.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use warren_agent::{Action, WorkspaceJob, WorkspaceSpec};
use warren_runtime::VmOptions;

use crate::AppState;
use crate::auth::{Caller, hash_password, new_token, verify_password};
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::jobs;

/// `Json` whose rejections (bad JSON, unknown fields, wrong content type, too large) become
/// [`ApiError`]s with a message.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

/// Workspace, project and key names: what a person types on a command line.
pub fn check_name(what: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{name}` is not a valid {what} name: 1 to 40 of a-z, 0-9 and -, not starting with -"
        )))
    }
}

// ---- login, users, tokens ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    user: String,
    password: String,
    #[serde(default)]
    token_name: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LoginResponse {
    token: String,
    user: String,
    admin: bool,
}

pub async fn login(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Body(req): Body<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    // Refused before anything is kept of it (the throttle's records are keyed by name).
    if req.user.is_empty() || req.user.len() > 64 {
        return Err(ApiError::bad_request("a user name has 1 to 64 bytes"));
    }
    let now = std::time::Instant::now();
    let wait = state.logins.wait(&req.user, peer.ip(), now);
    if !wait.is_zero() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed logins for `{}`: try again in {} s",
                req.user,
                wait.as_secs().max(1)
            ),
        ));
    }
    let row = sqlx::query("SELECT id, password_hash, is_admin FROM users WHERE name = $1")
        .bind(&req.user)
        .fetch_optional(&state.db.pool)
        .await?;
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "wrong user name or password");
    // An unknown name costs the same verification as a wrong password; argon2 runs off the
    // async workers, which must keep serving everybody else.
    let hash = match &row {
        Some(row) => row.try_get::<String, _>("password_hash")?,
        None => crate::auth::unknown_user_hash().to_owned(),
    };
    // Counted as a failure before it is verified (refunded on success), so parallel guesses
    // cannot all slip in under the throttle; at most a few verifications at once (each takes
    // ~19 MiB), whoever asks.
    state.logins.failed(&req.user, peer.ip(), now);
    static VERIFYING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
    let _turn = VERIFYING
        .acquire()
        .await
        .map_err(|e| ApiError::internal("cannot verify a password", e))?;
    let password = req.password.clone();
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let row = match row {
        Some(row) if verified => row,
        _ => return Err(refused()),
    };
    state.logins.succeeded(&req.user, peer.ip());
    let (token, token_hash) = new_token();
    sqlx::query("INSERT INTO api_tokens (id, user_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(new_id())
        .bind(row.try_get::<String, _>("id")?)
        .bind(req.token_name.unwrap_or_else(|| "cli".into()))
        .bind(token_hash)
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    Ok(Json(LoginResponse {
        token,
        user: req.user,
        admin: row.try_get::<i64, _>("is_admin")? != 0,
    }))
}

#[derive(Debug, Serialize)]
pub struct UserView {
    id: String,
    name: String,
    admin: bool,
}

fn user_view(row: &AnyRow) -> ApiResult<UserView> {
    Ok(UserView {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        admin: row.try_get::<i64, _>("is_admin")? != 0,
    })
}

/// An admin's change to a trust domain (a user or a project).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustChange {
    /// Whether the memory of this domain's VM workspaces may be merged by KSM (from their next
    /// start). Merged pages are a side channel: a tenant can tell, by timing its own writes,
    /// whether another VM holds the same page — so only for tenants that trust each other.
    vm_ksm: bool,
}

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

pub async fn update_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<TrustChange>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let id: String = find_project(&state, &caller, &key).await?.try_get("id")?;
    sqlx::query("UPDATE projects SET vm_ksm = $1 WHERE id = $2")
        .bind(i64::from(req.vm_ksm))
        .bind(&id)
        .execute(&state.db.pool)
        .await?;
    tracing::info!(project = %key, vm_ksm = req.vm_ksm, by = %caller.name, "trust domain changed");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn me(caller: Caller) -> Json<UserView> {
    Json(UserView {
        id: caller.user_id,
        name: caller.name,
        admin: caller.is_admin,
    })
}

pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<UserView>>> {
    caller.require_admin()?;
    let rows = sqlx::query("SELECT id, name, is_admin FROM users ORDER BY name")
        .fetch_all(&state.db.pool)
        .await?;
    Ok(Json(rows.iter().map(user_view).collect::<ApiResult<_>>()?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    name: String,
    password: String,
    #[serde(default)]
    admin: bool,
}

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

#[derive(Debug, Serialize)]
pub struct TokenView {
    id: String,
    name: String,
    created_at: i64,
}

pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenView>>> {
    let rows = sqlx::query(
        "SELECT id, name, created_at FROM api_tokens WHERE user_id = $1 ORDER BY created_at",
    )
    .bind(&caller.user_id)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(
        rows.iter()
            .map(|r| {
                Ok(TokenView {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<ApiResult<_>>()?,
    ))
}

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

// ---- SSH keys ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: String,
    public_key: String,
    /// An SSH signature (`ssh-keygen -Y sign -n warren-key`) of the caller's
    /// [`KeyChallenge`] message, made with the key: the proof that the caller holds it.
    #[serde(default)]
    signature: Option<String>,
}

/// What a user signs with a key to add it.
#[derive(Debug, Serialize)]
pub struct KeyChallenge {
    namespace: &'static str,
    message: String,
}

pub async fn key_challenge(caller: Caller) -> Json<KeyChallenge> {
    Json(KeyChallenge {
        namespace: warren_ssh::KEY_PROOF_NAMESPACE,
        message: warren_ssh::key_proof_message(&caller.user_id),
    })
}

#[derive(Debug, Serialize)]
pub struct KeyView {
    id: String,
    name: String,
    public_key: String,
    fingerprint: String,
}

/// How developers reach the SSH gateway.
#[derive(Debug, Clone, Serialize)]
pub struct SshView {
    /// The name developers' machines know this host by.
    pub host: String,
    pub port: u16,
    /// The gateway's host key as a `known_hosts` line.
    pub known_hosts: String,
}

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

fn key_view(r: &AnyRow) -> ApiResult<KeyView> {
    Ok(KeyView {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        public_key: r.try_get("public_key")?,
        fingerprint: r.try_get("fingerprint")?,
    })
}

pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<KeyView>>> {
    let rows = sqlx::query(
        "SELECT id, name, public_key, fingerprint FROM ssh_keys WHERE user_id = $1 ORDER BY name",
    )
    .bind(&caller.user_id)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(rows.iter().map(key_view).collect::<ApiResult<_>>()?))
}

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
            warren_ssh::KEY_PROOF_NAMESPACE
        ))
    })?;
    warren_ssh::verify_key_proof(&public_key, signature, &caller.user_id)
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

// ---- projects ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    name: String,
    git_url: String,
    #[serde(default)]
    root_folder: Option<String>,
    #[serde(default)]
    env_file: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ProjectView {
    id: String,
    name: String,
    owner: String,
    git_url: String,
    root_folder: String,
    env_file: Option<String>,
    /// The webhook's URL path with its secret: shown once, when the project is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<String>,
}

/// `https://`, `ssh://`, `file://` or scp-like `user@host:path`.
pub fn check_git_url(url: &str) -> ApiResult<()> {
    let scp_like = url
        .split_once(':')
        .is_some_and(|(host, path)| host.contains('@') && !host.contains('/') && !path.is_empty());
    let ok = ["https://", "ssh://", "file://"]
        .iter()
        .any(|scheme| url.strip_prefix(scheme).is_some_and(|rest| rest.len() > 1))
        || scp_like;
    if ok && !url.chars().any(char::is_whitespace) && url.len() <= 2048 {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{url}` is not a git URL Warren can fetch (https://, ssh://, file:// or user@host:path)"
        )))
    }
}

/// A `file://` repository is on this host's disk: an admin may name any, other users only one
/// inside the folders the server allows (`WARREN_FILE_REPOS`) — else a user could have any
/// repository here, other projects' mirrors among them, cloned into their workspace.
fn check_file_repo(state: &AppState, caller: &Caller, url: &str) -> ApiResult<()> {
    let Some(path) = url.strip_prefix("file://") else {
        return Ok(());
    };
    if caller.is_admin {
        return Ok(());
    }
    let real = std::fs::canonicalize(path).ok();
    let allowed = real.as_ref().is_some_and(|real| {
        state
            .file_repos
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(d))
    });
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "`{url}` is on the server's own disk: only an admin may add it (or an admin allows its folder with WARREN_FILE_REPOS)"
            ),
        ))
    }
}

fn project_view(r: &AnyRow) -> ApiResult<ProjectView> {
    Ok(ProjectView {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        git_url: r.try_get("git_url")?,
        root_folder: r.try_get("root_folder")?,
        env_file: r.try_get("env_file")?,
        webhook: None,
    })
}

const PROJECT_COLUMNS: &str = "p.id, p.name, p.owner_id, u.name AS owner, p.git_url, p.root_folder, p.env_file FROM projects p JOIN users u ON u.id = p.owner_id";

pub(crate) async fn find_project(
    state: &AppState,
    caller: &Caller,
    key: &str,
) -> ApiResult<AnyRow> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECT_COLUMNS} WHERE p.id = $1 OR p.name = $1"
    )))
    .bind(key)
    .fetch_all(&state.db.pool)
    .await?;
    pick_owned(rows, caller, key)
        .ok_or_else(|| ApiError::not_found(format_args!("project `{key}`")))
}

/// Of the rows matching an id or a name, the one the caller may see: by id first, then the
/// caller's own by name, then (admins) any.
fn pick_owned(rows: Vec<AnyRow>, caller: &Caller, key: &str) -> Option<AnyRow> {
    let owner = |r: &AnyRow| r.try_get::<String, _>("owner_id").unwrap_or_default();
    let id = |r: &AnyRow| r.try_get::<String, _>("id").unwrap_or_default();
    let visible: Vec<AnyRow> = rows
        .into_iter()
        .filter(|r| caller.may_touch(&owner(r)))
        .collect();
    let by_id = visible.iter().position(|r| id(r) == key);
    let own = visible.iter().position(|r| owner(r) == caller.user_id);
    let at = by_id
        .or(own)
        .or(if visible.len() == 1 { Some(0) } else { None })?;
    visible.into_iter().nth(at)
}

pub async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<ProjectView>>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECT_COLUMNS} WHERE p.owner_id = $1 OR $2 = 1 ORDER BY p.name"
    )))
    .bind(&caller.user_id)
    .bind(i64::from(caller.is_admin))
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(
        rows.iter().map(project_view).collect::<ApiResult<_>>()?,
    ))
}

pub async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewProject>,
) -> ApiResult<impl IntoResponse> {
    check_name("project", &req.name)?;
    check_git_url(&req.git_url)?;
    check_file_repo(&state, &caller, &req.git_url)?;
    let root_folder = req.root_folder.unwrap_or_default();
    if root_folder.starts_with('/') || root_folder.split('/').any(|c| c == "..") {
        return Err(ApiError::bad_request(
            "root_folder is a relative path inside the repository",
        ));
    }
    let id = new_id();
    let secret = hex::encode(crate::db::random_bytes::<16>());
    sqlx::query(
        "INSERT INTO projects (id, owner_id, name, git_url, root_folder, env_file, created_at, webhook_secret)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(&caller.user_id)
    .bind(&req.name)
    .bind(&req.git_url)
    .bind(&root_folder)
    .bind(&req.env_file)
    .bind(now_ms())
    .bind(crate::db::webhook_digest(&secret))
    .execute(&state.db.pool)
    .await?;
    // The first branch heads, in the background: a slow or unreachable remote must not hold
    // up the answer (the poller tries again).
    let (db, url, project) = (state.db.clone(), req.git_url.clone(), id.clone());
    let (mirrors, wake) = (state.git_mirrors.clone(), state.wake.clone());
    tokio::spawn(async move {
        match crate::git::refresh_project(&db, &mirrors, &project, &url).await {
            Ok(_) => wake.notify_one(),
            Err(e) => {
                tracing::warn!(project.id = %project, error = %e, "cannot read the new project's branches")
            }
        }
    });
    let row = find_project(&state, &caller, &id).await?;
    let mut view = project_view(&row)?;
    view.webhook = Some(format!("/api/v1/hooks/git/{id}?secret={secret}"));
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<ProjectView>> {
    Ok(Json(project_view(
        &find_project(&state, &caller, &key).await?,
    )?))
}

pub async fn delete_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let row = find_project(&state, &caller, &key).await?;
    let id: String = row.try_get("id")?;
    sqlx::query("DELETE FROM projects WHERE id = $1")
        .bind(&id)
        .execute(&state.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize)]
pub struct BranchView {
    name: String,
    head: String,
    updated_at: i64,
}

async fn branches_of(state: &AppState, project_id: &str) -> ApiResult<Vec<BranchView>> {
    let rows = sqlx::query(
        "SELECT name, head, updated_at FROM branches WHERE project_id = $1 ORDER BY name",
    )
    .bind(project_id)
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(BranchView {
                name: r.try_get("name")?,
                head: r.try_get("head")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect()
}

pub async fn project_branches(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<BranchView>>> {
    let row = find_project(&state, &caller, &key).await?;
    Ok(Json(
        branches_of(&state, &row.try_get::<String, _>("id")?).await?,
    ))
}

/// Reads the project's branch heads now (what the poller does on its timer).
pub async fn refresh_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<BranchView>>> {
    let row = find_project(&state, &caller, &key).await?;
    let id: String = row.try_get("id")?;
    let url: String = row.try_get("git_url")?;
    crate::git::refresh_project(&state.db, &state.git_mirrors, &id, &url)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    state.wake.notify_one();
    Ok(Json(branches_of(&state, &id).await?))
}

#[derive(Debug, Deserialize)]
pub struct HookQuery {
    secret: String,
}

/// The git webhook: a push to the repository makes Warren read its branch heads now. Needs
/// the project's secret instead of a token (git hosts cannot log in).
pub async fn git_hook(
    State(state): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<HookQuery>,
) -> ApiResult<StatusCode> {
    let row = sqlx::query("SELECT git_url, webhook_secret FROM projects WHERE id = $1")
        .bind(&id)
        .fetch_optional(&state.db.pool)
        .await?;
    let refused = || ApiError::not_found(format_args!("project `{id}` with that secret"));
    let row = row.ok_or_else(refused)?;
    let secret: Option<String> = row.try_get("webhook_secret")?;
    // Only the secret's digest is kept; comparing digests also keeps the time taken from
    // saying anything about the secret.
    let matches = secret.is_some_and(|s| s == crate::db::webhook_digest(&query.secret));
    if !matches {
        return Err(refused());
    }
    let url: String = row.try_get("git_url")?;
    crate::git::refresh_project(&state.db, &state.git_mirrors, &id, &url)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    state.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses a user's image reference on a registry (the first part of `HOST[:PORT]/REPO:TAG`, as
/// Docker tells a registry from a repository) the admin does not trust: the host would mount
/// it, following whatever redirects and token services that registry names, with no egress
/// policy in the way.
fn check_registry_trusted(image: &str, policy: &warren_runtime::EgressPolicy) -> ApiResult<()> {
    let Some(first) = warren_store::registry_host(image) else {
        return Ok(());
    };
    if policy.trusts_registry(first) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "image {image}: {first} is not a registry this host trusts (an admin names them with \
         --trusted-registry); start from a project's prebuild, a local image, or a trusted registry"
    )))
}

// ---- workspaces ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWorkspace {
    name: String,
    /// The image to start from; when absent, the newest succeeded prebuild of the project's
    /// branch.
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    project: Option<String>,
    /// The branch whose prebuild to start from and check out (the project's default branch
    /// when absent).
    #[serde(default)]
    branch: Option<String>,
    /// Bytes.
    #[serde(default)]
    memory: Option<u64>,
    #[serde(default)]
    cpus: Option<f64>,
    /// Bytes it may write (a container's writable layer and `/var/lib/docker`); when absent,
    /// the environment file's, else the host's default (`--workspace-disk`).
    #[serde(default)]
    disk: Option<u64>,
    /// The environment file whose workspace tasks run on each start.
    #[serde(default)]
    environment: Option<EnvironmentFile>,
    /// `container` or `vm`; when absent, the environment file's `runtime` (else a container).
    #[serde(default)]
    runtime: Option<String>,
}

/// An environment file, as found in a repository.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentFile {
    /// Its name in the repository (`hocus.yml`, `.devcontainer/devcontainer.json`, ...).
    file: String,
    text: String,
}

/// What a workspace takes from its environment file.
struct Environment {
    /// Devcontainer `postCreateCommand` (once) and `postStartCommand`, Hocus `tasks[].workspace`
    /// with its `workspaceShell`, warren.yml's `workspace` commands.
    tasks: Vec<warren_runtime::tasks::TaskSpec>,
    /// Who sessions, commands and tasks run as (`remoteUser`, else `containerUser`).
    user: Option<String>,
    /// Where the repository is checked out.
    folder: String,
    /// What the file asks to run in (`runtime: vm` in warren.yml).
    runtime: warren_spec::RuntimeKind,
    /// CPUs, memory and disk it asks for (warren.yml's `resources`, devcontainer's
    /// `hostRequirements`); the request's own values win.
    resources: warren_spec::Resources,
}

/// Refuses CPU and memory requests no host could honour; `source` says where they came from.
fn check_resources(cpus: Option<f64>, memory: Option<u64>, source: &str) -> ApiResult<()> {
    if let Some(cpus) = cpus
        && !(cpus > 0.0 && cpus <= 1024.0)
    {
        return Err(ApiError::bad_request(format!(
            "{source}cpus must be between 0 and 1024, not {cpus}"
        )));
    }
    if let Some(memory) = memory
        && !(4 << 20..=1 << 50).contains(&memory)
    {
        return Err(ApiError::bad_request(format!(
            "{source}memory must be at least 4 MiB"
        )));
    }
    Ok(())
}

/// Reads an environment file (of the repository at `repository`, when it comes from one);
/// errors name the file, line and column.
fn read_environment(env: &EnvironmentFile, repository: Option<&str>) -> ApiResult<Environment> {
    use warren_spec::RepoPath;
    let path = RepoPath::resolve(&RepoPath::root(), &env.file)
        .map_err(|e| ApiError::bad_request(format!("environment file `{}`: {e}", env.file)))?;
    let name = env.file.rsplit('/').next().unwrap_or_default();
    let format = warren_spec::format_of(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "`{}` is not an environment file (warren.yml, hocus.yml or devcontainer.json)",
            env.file
        ))
    })?;
    let options = repository
        .map(warren_build::read_options)
        .unwrap_or_default();
    let loaded = warren_spec::parse(&path, format, &env.text, &options)
        .map_err(|r| ApiError::bad_request(r.render_errors()))?;
    Ok(Environment {
        tasks: warren_build::workspace_tasks(&loaded.spec),
        user: warren_build::session_user(&loaded.spec),
        runtime: loaded.spec.runtime,
        folder: loaded.spec.workspace_folder,
        resources: loaded.spec.resources,
    })
}

/// Checks out the workspace's branch at the prebuild's commit and sets the owner's git
/// identity: the first task of the first start, so every other task sees the branch.
fn git_task(
    env: &Environment,
    branch: &str,
    commit: &str,
    name: &str,
    email: &str,
) -> warren_runtime::tasks::TaskSpec {
    const SCRIPT: &str = r#"set -e
cd "$1"
if ! command -v git >/dev/null; then
  echo "warren: git is not installed in the image: branch $2 is not checked out" >&2
  exit 1
fi
git config --global user.name "$4"
git config --global user.email "$5"
git checkout -q -B "$2" "$3"
if git rev-parse -q --verify "refs/remotes/origin/$2" >/dev/null; then
  git branch -q --set-upstream-to="origin/$2" "$2"
fi
echo "on branch $2 at $(git rev-parse --short HEAD), committing as $4 <$5>"
"#;
    warren_runtime::tasks::TaskSpec {
        name: "warren-git".into(),
        argv: [
            "/bin/sh",
            "-c",
            SCRIPT,
            "warren-git",
            &env.folder,
            branch,
            commit,
            name,
            email,
        ]
        .map(String::from)
        .to_vec(),
        env: Vec::new(),
        user: env.user.clone(),
        cwd: None,
        once: true,
        stage: 0,
    }
}

#[derive(Debug, Serialize)]
pub struct WorkspaceView {
    id: String,
    name: String,
    owner: String,
    project: Option<String>,
    image: String,
    host: String,
    state: String,
    desired: String,
    last_error: Option<String>,
    memory: Option<i64>,
    cpus: Option<f64>,
    /// Bytes it may write (absent: the host's default).
    disk: Option<i64>,
    created_at: i64,
    updated_at: i64,
    /// Resource use as its host last reported it (cpu_ns, memory_bytes, pids, disk_bytes, ...),
    /// while it runs.
    stats: Option<serde_json::Value>,
    stats_at: Option<i64>,
    /// Who sessions, commands and tasks run as inside (root when absent).
    user: Option<String>,
    /// The prebuild it was made from, and the branch it is on.
    prebuild: Option<String>,
    branch: Option<String>,
    /// Commits the branch's head has that the prebuild lacks.
    behind: Option<u64>,
    /// `container` or `vm`.
    runtime: String,
    /// How a running VM is accelerated (`kvm`, or `tcg` where the host's KVM cannot run it),
    /// as its host last reported.
    accel: Option<String>,
}

pub(crate) const WORKSPACE_COLUMNS: &str =
    "w.id, w.name, w.owner_id, u.name AS owner, w.project_id, p.name AS project, w.image, h.name AS host,
    w.host_id, w.state, w.desired, w.last_error, w.memory, w.cpus_milli, w.disk, w.created_at, w.updated_at,
    w.tasks, w.stats, w.stats_at, w.run_as, w.prebuild_id, w.branch, pb.commit_sha AS prebuild_commit, p.git_url,
    w.runtime, u.vm_ksm AS owner_ksm, p.vm_ksm AS project_ksm,
    (SELECT b.head FROM branches b WHERE b.project_id = w.project_id AND b.name = w.branch) AS branch_head
    FROM workspaces w JOIN users u ON u.id = w.owner_id JOIN hosts h ON h.id = w.host_id
    LEFT JOIN projects p ON p.id = w.project_id LEFT JOIN prebuilds pb ON pb.id = w.prebuild_id";

fn workspace_view(r: &AnyRow) -> ApiResult<WorkspaceView> {
    let stats: Option<serde_json::Value> = r
        .try_get::<Option<String>, _>("stats")?
        .and_then(|s| serde_json::from_str(&s).ok());
    Ok(WorkspaceView {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        project: r.try_get("project")?,
        image: r.try_get("image")?,
        host: r.try_get("host")?,
        state: r.try_get("state")?,
        desired: r.try_get("desired")?,
        last_error: r.try_get("last_error")?,
        memory: r.try_get("memory")?,
        cpus: r
            .try_get::<Option<i64>, _>("cpus_milli")?
            .map(|m| m as f64 / 1000.0),
        disk: r.try_get("disk")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        stats_at: r.try_get("stats_at")?,
        user: r.try_get("run_as")?,
        prebuild: r.try_get("prebuild_id")?,
        branch: r.try_get("branch")?,
        behind: None,
        runtime: r.try_get("runtime")?,
        accel: stats
            .as_ref()
            .and_then(|s| s.pointer("/vm/accel"))
            .and_then(|a| a.as_str())
            .map(str::to_owned),
        stats,
    })
}

/// The view, with how far the workspace's prebuild is behind its branch.
async fn workspace_view_now(state: &AppState, r: &AnyRow) -> ApiResult<WorkspaceView> {
    let mut view = workspace_view(r)?;
    let commit: Option<String> = r.try_get("prebuild_commit")?;
    let head: Option<String> = r.try_get("branch_head")?;
    let url: Option<String> = r.try_get("git_url")?;
    if let (Some(commit), Some(head), Some(url)) = (commit, head, url) {
        view.behind = crate::prebuilds::behind(state, &url, &commit, &head).await;
    }
    Ok(view)
}

/// A VM workspace's options: KSM merging when its owner's or its project's trust domain has
/// it on (`None` for a container).
fn vm_options(runtime: &str, owner_ksm: i64, project_ksm: Option<i64>) -> Option<VmOptions> {
    (runtime == "vm").then(|| VmOptions {
        ksm: owner_ksm != 0 || project_ksm.unwrap_or(0) != 0,
        ..Default::default()
    })
}

/// The runtime's name for the workspace with this id.
pub(crate) fn runtime_id(workspace_id: &str) -> String {
    format!("ws-{workspace_id}")
}

/// What the agent needs of a workspace row (`id`, `image`, `memory`, `cpus_milli`, `tasks`).
pub(crate) fn workspace_spec(r: &AnyRow) -> ApiResult<WorkspaceSpec> {
    Ok(WorkspaceSpec {
        runtime_id: runtime_id(&r.try_get::<String, _>("id")?),
        image: r.try_get("image")?,
        memory: r.try_get::<Option<i64>, _>("memory")?.map(|m| m as u64),
        cpus: r
            .try_get::<Option<i64>, _>("cpus_milli")?
            .map(|m| m as f64 / 1000.0),
        pids: None,
        disk: r.try_get::<Option<i64>, _>("disk")?.map(|d| d as u64),
        tasks: match r.try_get::<Option<String>, _>("tasks")? {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| ApiError::internal("a workspace's tasks", e))?,
            None => Vec::new(),
        },
        vm: vm_options(
            &r.try_get::<String, _>("runtime")?,
            r.try_get("owner_ksm")?,
            r.try_get("project_ksm")?,
        ),
    })
}

async fn find_workspace(state: &AppState, caller: &Caller, key: &str) -> ApiResult<AnyRow> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {WORKSPACE_COLUMNS} WHERE w.id = $1 OR w.name = $1"
    )))
    .bind(key)
    .fetch_all(&state.db.pool)
    .await?;
    pick_owned(rows, caller, key)
        .ok_or_else(|| ApiError::not_found(format_args!("workspace `{key}`")))
}

pub async fn list_workspaces(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<WorkspaceView>>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {WORKSPACE_COLUMNS} WHERE w.owner_id = $1 OR $2 = 1 ORDER BY w.name"
    )))
    .bind(&caller.user_id)
    .bind(i64::from(caller.is_admin))
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(workspace_view_now(&state, r).await?);
    }
    Ok(Json(out))
}

pub async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(
        workspace_view_now(&state, &find_workspace(&state, &caller, &key).await?).await?,
    ))
}

pub async fn create_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewWorkspace>,
) -> ApiResult<impl IntoResponse> {
    check_name("workspace", &req.name)?;
    if let Some(image) = &req.image
        && (image.trim().is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace))
    {
        return Err(ApiError::bad_request(
            "image must be an image reference such as dev:1",
        ));
    }
    // Prebuilds and build steps are a project's own: reached through the project (whose
    // access is checked), never by naming their image.
    if let Some(image) = &req.image
        && let Err(e) = warren_build::refuse_reserved(image)
    {
        return Err(ApiError::forbidden(format!(
            "{e}: create the workspace with --project (and --branch)"
        )));
    }
    // A registry image is mounted by the host: a user may name one only on a registry the
    // admin trusts (an admin may name any).
    if let Some(image) = &req.image
        && !caller.is_admin
    {
        let policy = state
            .runtime
            .as_ref()
            .map(|r| r.egress())
            .unwrap_or_default();
        check_registry_trusted(image, &policy)?;
    }
    if req.image.is_some() && req.branch.is_some() {
        return Err(ApiError::bad_request(
            "a branch's workspace starts from the branch's prebuild: give a branch or an image, not both",
        ));
    }
    check_resources(req.cpus, req.memory, "")?;
    let project = match &req.project {
        Some(p) => Some(find_project(&state, &caller, p).await?),
        None => None,
    };
    let project_id = project
        .as_ref()
        .map(|p| p.try_get::<String, _>("id"))
        .transpose()?;
    // Without an image: the newest succeeded prebuild of the branch, its environment file,
    // and a first task that checks the branch out.
    let mut from_prebuild = None;
    let image = match (&req.image, &project_id) {
        (Some(image), _) => image.clone(),
        (None, None) => {
            return Err(ApiError::bad_request(
                "a workspace needs an image, or a project whose prebuild it starts from",
            ));
        }
        (None, Some(pid)) => {
            let (branch, head) =
                crate::prebuilds::branch_head(&state, pid, req.branch.as_deref()).await?;
            let Some(pb) = crate::prebuilds::for_branch(&state, pid, &branch, &head).await? else {
                let latest: Option<String> = sqlx::query(
                    "SELECT state FROM prebuilds WHERE project_id = $1 AND (branch = $2 OR commit_sha = $3) ORDER BY created_at DESC LIMIT 1",
                )
                .bind(pid)
                .bind(&branch)
                .bind(&head)
                .fetch_optional(&state.db.pool)
                .await?
                .map(|r| r.get(0));
                return Err(ApiError::conflict(format!(
                    "branch `{branch}` has no succeeded prebuild yet{} (warren prebuild ls {})",
                    latest
                        .map(|s| format!(" (the latest is {s})"))
                        .unwrap_or_default(),
                    req.project.as_deref().unwrap_or_default()
                )));
            };
            let image: String = pb
                .try_get::<Option<String>, _>("image")?
                .unwrap_or_default();
            from_prebuild = Some((
                pb.try_get::<String, _>("id")?,
                branch,
                pb.try_get::<String, _>("commit_sha")?,
                pb.try_get::<Option<String>, _>("env_file")?,
                pb.try_get::<Option<String>, _>("env_text")?,
            ));
            image
        }
    };
    let prebuild_env = from_prebuild.as_ref().and_then(|(_, _, _, file, text)| {
        Some(EnvironmentFile {
            file: file.clone()?,
            text: text.clone()?,
        })
    });
    let Environment {
        mut tasks,
        user,
        folder,
        runtime: env_runtime,
        resources,
    } = match req.environment.as_ref().or(prebuild_env.as_ref()) {
        Some(env) => read_environment(
            env,
            project
                .as_ref()
                .map(|p| p.try_get::<String, _>("git_url"))
                .transpose()?
                .as_deref(),
        )?,
        None => Environment {
            tasks: Vec::new(),
            user: None,
            folder: "/workspace".into(),
            runtime: Default::default(),
            resources: Default::default(),
        },
    };
    check_resources(
        resources.cpus.map(f64::from),
        resources.memory.map(|m| m.0),
        "the environment file's resources: ",
    )?;
    let memory = req.memory.or(resources.memory.map(|m| m.0));
    let cpus = req.cpus.or(resources.cpus.map(f64::from));
    let disk = req.disk.or(resources.disk.map(|d| d.0));
    let runtime = match req.runtime.as_deref() {
        None => env_runtime.to_string(),
        Some(r @ ("container" | "vm")) => r.to_owned(),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "runtime must be `container` or `vm`, not `{other}`"
            )));
        }
    };
    if let Some(disk) = disk {
        let from = if req.disk.is_some() {
            ""
        } else {
            "the environment file's resources: "
        };
        if !(warren_runtime::MIN_DISK..=1 << 50).contains(&disk) {
            return Err(ApiError::bad_request(format!(
                "{from}disk must be at least {} MiB",
                warren_runtime::MIN_DISK >> 20
            )));
        }
    }
    if let Some((_, branch, commit, _, _)) = &from_prebuild {
        let (name, email) = git_identity(&state, &caller).await?;
        let git = git_task(
            &Environment {
                tasks: Vec::new(),
                user: user.clone(),
                folder: folder.clone(),
                runtime: Default::default(),
                resources: Default::default(),
            },
            branch,
            commit,
            &name,
            &email,
        );
        // The tasks run in the checkout, after the branch is checked out.
        for t in &mut tasks {
            t.stage += 1;
            t.cwd = Some(folder.clone());
        }
        tasks.insert(0, git);
    }
    let ksm: (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT vm_ksm FROM users WHERE id = $1), (SELECT vm_ksm FROM projects WHERE id = $2)",
    )
    .bind(&caller.user_id)
    .bind(&project_id)
    .fetch_one(&state.db.pool)
    .await?;
    let vm = vm_options(&runtime, ksm.0, ksm.1);
    let host_id = place(&state, &image, disk).await?;
    let id = new_id();
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    sqlx::query(
        "INSERT INTO workspaces (id, owner_id, project_id, name, image, host_id, state, desired, memory, cpus_milli, created_at, updated_at, tasks, run_as, prebuild_id, branch, runtime, disk)
         VALUES ($1, $2, $3, $4, $5, $6, 'creating', 'running', $7, $8, $9, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(&id)
    .bind(&caller.user_id)
    .bind(&project_id)
    .bind(&req.name)
    .bind(&image)
    .bind(&host_id)
    .bind(memory.map(|m| m as i64))
    .bind(cpus.map(|c| (c * 1000.0).round() as i64))
    .bind(now)
    .bind(
        (!tasks.is_empty())
            .then(|| serde_json::to_string(&tasks))
            .transpose()
            .map_err(|e| ApiError::internal("tasks", e))?,
    )
    .bind(&user)
    .bind(from_prebuild.as_ref().map(|p| &p.0))
    .bind(from_prebuild.as_ref().map(|p| &p.1))
    .bind(&runtime)
    .bind(disk.map(|d| d as i64))
    .execute(&mut *tx)
    .await
    .map_err(|e| match ApiError::from(e) {
        c if c.status == StatusCode::CONFLICT => ApiError::conflict(format!("you have a workspace `{}` already", req.name)),
        other => other,
    })?;
    let spec = WorkspaceSpec {
        runtime_id: runtime_id(&id),
        image: image.clone(),
        memory,
        cpus,
        pids: None,
        disk,
        tasks,
        vm,
    };
    jobs::enqueue(
        &mut tx,
        &id,
        &host_id,
        &WorkspaceJob {
            action: Action::Create,
            workspace: spec,
        },
    )
    .await?;
    tx.commit().await?;
    state.wake.notify_one();
    let row = find_workspace(&state, &caller, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(workspace_view_now(&state, &row).await?),
    ))
}

/// The name and email the owner commits as in their workspaces: their `GIT_AUTHOR_NAME` and
/// `GIT_AUTHOR_EMAIL` variables when set, else their Warren name and `<name>@<this host>`.
async fn git_identity(state: &AppState, caller: &Caller) -> ApiResult<(String, String)> {
    let vars = crate::secrets::variables(&state.db, &state.secrets, &[("user", &caller.user_id)])
        .await
        .map_err(|e| ApiError::internal("reading variables", e))?;
    let var = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let host = state
        .ssh
        .as_ref()
        .map_or_else(|| "warren.invalid".to_owned(), |s| s.host.clone());
    Ok((
        var("GIT_AUTHOR_NAME").unwrap_or_else(|| caller.name.clone()),
        var("GIT_AUTHOR_EMAIL").unwrap_or_else(|| format!("{}@{host}", caller.name)),
    ))
}

/// Records the transition (in-between state and desired state) and queues its job, atomically.
async fn transition(
    state: &AppState,
    row: &AnyRow,
    action: Action,
    between: &str,
    desired: &str,
    supersede: bool,
) -> ApiResult<()> {
    let id: String = row.try_get("id")?;
    let host: String = row.try_get("host_id")?;
    let mut tx = state.db.begin_write().await?;
    if supersede {
        jobs::cancel_queued(&mut tx, &id).await?;
    }
    sqlx::query("UPDATE workspaces SET state = $2, desired = $3, updated_at = $4 WHERE id = $1")
        .bind(&id)
        .bind(between)
        .bind(desired)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    jobs::enqueue(
        &mut tx,
        &id,
        &host,
        &WorkspaceJob {
            action,
            workspace: workspace_spec(row)?,
        },
    )
    .await?;
    tx.commit().await?;
    state.wake.notify_one();
    Ok(())
}

/// Asks for a workspace to run (nothing to do if it does).
pub(crate) async fn start_row(state: &AppState, row: &AnyRow, name: &str) -> ApiResult<()> {
    let current: String = row.try_get("state")?;
    if current == "deleting" {
        return Err(ApiError::conflict(format!(
            "workspace `{name}` is being deleted"
        )));
    }
    if current != "running" {
        transition(state, row, Action::Start, "starting", "running", false).await?;
    }
    Ok(())
}

pub async fn start_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = find_workspace(&state, &caller, &key).await?;
    start_row(&state, &row, &key).await?;
    let row = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&row)?)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Kill at once, dropping whatever else was queued for the workspace.
    #[serde(default)]
    force: bool,
    #[serde(default)]
    grace_seconds: Option<u64>,
}

pub async fn stop_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    body: Result<Json<StopRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    // An empty body is a plain stop.
    let req = match body {
        Ok(Json(r)) => r,
        Err(JsonRejection::MissingJsonContentType(_)) => StopRequest::default(),
        Err(e) => return Err(e.into()),
    };
    let row = find_workspace(&state, &caller, &key).await?;
    let current: String = row.try_get("state")?;
    if current == "deleting" {
        return Err(ApiError::conflict(format!(
            "workspace `{key}` is being deleted"
        )));
    }
    let grace_ms = if req.force {
        0
    } else {
        req.grace_seconds.unwrap_or(10).min(3600) * 1000
    };
    if current != "stopped" || req.force {
        transition(
            &state,
            &row,
            Action::Stop { grace_ms },
            "stopping",
            "stopped",
            req.force,
        )
        .await?;
    }
    let row = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&row)?)))
}

pub async fn delete_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = find_workspace(&state, &caller, &key).await?;
    transition(&state, &row, Action::Delete, "deleting", "deleted", true).await?;
    let row = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&row)?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    argv: Vec<String>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ExecResponse {
    exit_code: i32,
    stdout: String,
    stderr: String,
}

/// Most output an exec returns per stream; the rest is cut (interactive work goes over SSH).
const EXEC_OUTPUT_LIMIT: u64 = 8 << 20;

pub async fn exec_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let row = find_workspace(&state, &caller, &key).await?;
    let current: String = row.try_get("state")?;
    if current != "running" {
        return Err(ApiError::conflict(format!(
            "workspace `{key}` is {current}, not running"
        )));
    }
    if req.argv.is_empty() {
        return Err(ApiError::bad_request("argv must name a command"));
    }
    let (runtime, id) = local_runtime(&state, &row)?;
    // The project's variables, then its owner's, then the request's: later ones win.
    let mut env = workspace_env(
        &state,
        &row.try_get::<String, _>("owner_id")?,
        row.try_get::<Option<String>, _>("project_id")?.as_deref(),
    )
    .await?;
    env.extend(req.env);
    let request = warren_runtime::ExecRequest {
        argv: req.argv,
        env,
        cwd: req.cwd,
        user: req.user.or(row.try_get("run_as")?),
        tty: None,
        no_network: false,
    };
    let stdin = req.stdin.unwrap_or_default();
    let out =
        tokio::task::spawn_blocking(move || run_to_end(runtime.as_ref(), &id, &request, stdin))
            .await
            .map_err(|e| ApiError::internal("exec", e))?;
    out.map(Json)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

/// The runtime of a workspace on this server's own host, and the workspace's id in it.
fn local_runtime(
    state: &AppState,
    row: &AnyRow,
) -> ApiResult<(
    Arc<dyn warren_runtime::Runtime>,
    warren_runtime::WorkspaceId,
)> {
    if row.try_get::<String, _>("host_id")? != state.host_id {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "the workspace runs on another host: reach it through that host's SSH gateway",
        ));
    }
    let runtime = state.runtime.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this needs the workspace's host agent in this process",
        )
    })?;
    let id = warren_runtime::WorkspaceId::new(&runtime_id(&row.try_get::<String, _>("id")?))
        .map_err(|e| ApiError::internal("workspace id", e))?;
    Ok((runtime, id))
}

pub async fn list_tasks(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<warren_runtime::tasks::TaskInfo>>> {
    let row = find_workspace(&state, &caller, &key).await?;
    let (runtime, id) = local_runtime(&state, &row)?;
    let dir = runtime
        .tasks_dir(&id)
        .map_err(|e| ApiError::internal("tasks", e))?;
    Ok(Json(warren_runtime::tasks::list(&dir)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default)]
    offset: u64,
}

#[derive(Debug, Serialize)]
pub struct LogView {
    /// The bytes, base64 (a terminal's output is not always UTF-8).
    data_base64: String,
    next_offset: u64,
    /// Whether more may come.
    running: bool,
}

/// Largest piece of a log one request returns.
const LOG_PIECE: usize = 256 << 10;

pub async fn task_log(
    State(state): State<AppState>,
    caller: Caller,
    Path((key, task)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
) -> ApiResult<Json<LogView>> {
    use base64::Engine as _;
    let row = find_workspace(&state, &caller, &key).await?;
    let (runtime, id) = local_runtime(&state, &row)?;
    let dir = runtime
        .tasks_dir(&id)
        .map_err(|e| ApiError::internal("tasks", e))?;
    let chunk = warren_runtime::tasks::read_log(&dir, &task, query.offset, LOG_PIECE).map_err(
        |e| match e {
            warren_runtime::Error::NoTask(_) => {
                ApiError::not_found(format_args!("task `{task}` in workspace `{key}`"))
            }
            other => ApiError::internal("task log", other),
        },
    )?;
    Ok(Json(LogView {
        data_base64: base64::engine::general_purpose::STANDARD.encode(&chunk.data),
        next_offset: chunk.next_offset,
        running: chunk.running,
    }))
}

fn run_to_end(
    runtime: &dyn warren_runtime::Runtime,
    id: &warren_runtime::WorkspaceId,
    request: &warren_runtime::ExecRequest,
    stdin: String,
) -> Result<ExecResponse, warren_runtime::Error> {
    use std::io::{Read, Write};
    let exec = runtime.exec(id, request)?;
    let warren_runtime::ExecIo::Pipes {
        stdin: mut input,
        stdout,
        stderr,
    } = exec.io
    else {
        return Err(warren_runtime::Error::Sys("expected pipes".into()));
    };
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let read = |stream: std::fs::File| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut limited = stream.take(EXEC_OUTPUT_LIMIT);
            let _ = limited.read_to_end(&mut buf);
            // Drain the rest so the process is never blocked on a full pipe.
            let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let (out, err) = (read(stdout), read(stderr));
    let status = exec.process.wait()?;
    let _ = writer.join();
    Ok(ExecResponse {
        exit_code: status.as_shell_code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

// ---- environment variables ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeQuery {
    #[serde(default)]
    project: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVar {
    name: String,
    value: String,
    #[serde(default)]
    secret: bool,
    /// Set on a project (its workspaces and prebuilds) instead of on the caller.
    #[serde(default)]
    project: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VarView {
    name: String,
    scope: String,
    secret: bool,
    /// Plain values only: a secret's value is never sent back.
    value: Option<String>,
    /// For a secret: its length, so a person can tell which value is set.
    hint: Option<String>,
}

fn check_var_name(name: &str) -> ApiResult<()> {
    let mut bytes = name.bytes();
    let ok = name.len() <= 128
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{name}` is not a variable name: letters, digits and _, not starting with a digit"
        )))
    }
}

/// (scope, scope id) of a request: the caller, or a project the caller may touch.
async fn var_scope(
    state: &AppState,
    caller: &Caller,
    project: Option<&str>,
) -> ApiResult<(&'static str, String)> {
    match project {
        Some(p) => Ok((
            "project",
            find_project(state, caller, p).await?.try_get("id")?,
        )),
        None => Ok(("user", caller.user_id.clone())),
    }
}

pub async fn list_vars(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Query(query): axum::extract::Query<ScopeQuery>,
) -> ApiResult<Json<Vec<VarView>>> {
    let (scope, scope_id) = var_scope(&state, &caller, query.project.as_deref()).await?;
    let rows = sqlx::query(
        "SELECT name, secret, value FROM env_vars WHERE scope = $1 AND scope_id = $2 ORDER BY name",
    )
    .bind(scope)
    .bind(&scope_id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.try_get("name")?;
        let secret = r.try_get::<i64, _>("secret")? != 0;
        let stored: String = r.try_get("value")?;
        let (value, hint) = if secret {
            let context = format!("{scope}/{scope_id}/{name}");
            let hint = match state.secrets.open(&context, &stored) {
                Ok(plain) => format!("{} characters", plain.chars().count()),
                Err(e) => e.to_string(),
            };
            (None, Some(hint))
        } else {
            (Some(stored), None)
        };
        out.push(VarView {
            name,
            scope: scope.into(),
            secret,
            value,
            hint,
        });
    }
    Ok(Json(out))
}

/// `KEY=value` for a workspace's processes: its project's variables, then its owner's; secrets
/// are opened here, in memory, and go nowhere else.
pub(crate) async fn workspace_env(
    state: &AppState,
    owner_id: &str,
    project_id: Option<&str>,
) -> ApiResult<Vec<String>> {
    let scopes: Vec<(&str, &str)> = project_id
        .map(|p| ("project", p))
        .into_iter()
        .chain([("user", owner_id)])
        .collect();
    let vars = crate::secrets::variables(&state.db, &state.secrets, &scopes)
        .await
        .map_err(|e| ApiError::internal("reading variables", e))?;
    Ok(vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

pub async fn set_var(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewVar>,
) -> ApiResult<StatusCode> {
    check_var_name(&req.name)?;
    if req.value.len() > 64 << 10 {
        return Err(ApiError::bad_request("a value may be at most 64 KiB"));
    }
    let (scope, scope_id) = var_scope(&state, &caller, req.project.as_deref()).await?;
    let stored = if req.secret {
        state
            .secrets
            .seal(&format!("{scope}/{scope_id}/{}", req.name), &req.value)
    } else {
        req.value
    };
    let mut tx = state.db.begin_write().await?;
    sqlx::query("DELETE FROM env_vars WHERE scope = $1 AND scope_id = $2 AND name = $3")
        .bind(scope)
        .bind(&scope_id)
        .bind(&req.name)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO env_vars (id, scope, scope_id, name, secret, value, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(new_id())
    .bind(scope)
    .bind(&scope_id)
    .bind(&req.name)
    .bind(i64::from(req.secret))
    .bind(stored)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_var(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ScopeQuery>,
) -> ApiResult<StatusCode> {
    let (scope, scope_id) = var_scope(&state, &caller, query.project.as_deref()).await?;
    let done = sqlx::query("DELETE FROM env_vars WHERE scope = $1 AND scope_id = $2 AND name = $3")
        .bind(scope)
        .bind(&scope_id)
        .bind(&name)
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found(format_args!("variable `{name}`")));
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---- hosts and jobs ----

#[derive(Debug, Serialize)]
pub struct HostView {
    id: String,
    name: String,
    workspaces: i64,
    last_seen_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHost {
    name: String,
}

/// Registers a host for `warren agent`; its token is shown once.
pub async fn add_host(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewHost>,
) -> ApiResult<impl IntoResponse> {
    caller.require_admin()?;
    check_name("host", &req.name)?;
    // Host tokens look like user tokens with another prefix, so neither passes for the other.
    let token = crate::auth::new_token().0.replacen("wrn_", "wrh_", 1);
    let id = new_id();
    sqlx::query("INSERT INTO hosts (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(&req.name)
        .bind(crate::auth::token_hash(&token))
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": id, "name": req.name, "token": token})),
    ))
}

/// An agent on another host, authenticated by its host token.
#[derive(Debug)]
pub struct AgentHost {
    pub host_id: String,
}

impl axum::extract::FromRequestParts<AppState> for AgentHost {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| t.starts_with("wrh_"))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "agents send their host token (warren host add)",
                )
            })?;
        let row = sqlx::query("SELECT id FROM hosts WHERE token_hash = $1")
            .bind(crate::auth::token_hash(token.trim()))
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unknown host token"))?;
        Ok(Self {
            host_id: row.try_get("id")?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    #[serde(default)]
    report: Option<warren_agent::HostReport>,
    /// Whether the agent has a prebuild slot free (older agents do not say: yes).
    #[serde(default = "yes")]
    prebuilds: bool,
}

fn yes() -> bool {
    true
}

pub async fn agent_claim(
    State(state): State<AppState>,
    host: AgentHost,
    Body(req): Body<ClaimRequest>,
) -> ApiResult<axum::response::Response> {
    use warren_agent::ControlPlane as _;
    // A remote host's workspaces are compared with what the owners asked for as it reports
    // them (the local host's are compared with its runtime directly).
    let actual = req.report.as_ref().map(|r| {
        crate::Actual::Reported(
            r.workspaces
                .iter()
                .map(|w| (w.runtime_id.clone(), w.running))
                .collect(),
        )
    });
    let job = state
        .plane
        .claim(&host.host_id, req.report, req.prebuilds)
        .await
        .map_err(|e| ApiError::internal("claiming a job", e))?;
    if let Some(actual) = actual {
        match crate::reconcile(&state.db, &host.host_id, actual).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(host = %host.host_id, workspaces = n, "reconciled from the host's report")
            }
            Err(e) => tracing::warn!(error = %e, "cannot reconcile a host's report"),
        }
    }
    Ok(match job {
        Some(job) => Json(job).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    job: String,
    result: Result<warren_agent::Outcome, String>,
}

pub async fn agent_finish(
    State(state): State<AppState>,
    host: AgentHost,
    Body(req): Body<FinishRequest>,
) -> ApiResult<StatusCode> {
    let job = state
        .plane
        .held_job(&host.host_id, &req.job)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("job `{}` held by this host", req.job)))?;
    state.plane.finish_job(&job, req.result).await?;
    state.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    job: String,
    text: String,
}

#[derive(Debug, Serialize)]
pub struct LogAnswer {
    /// `false` once the job was cancelled: the agent stops it.
    pub go_on: bool,
}

pub async fn agent_log(
    State(state): State<AppState>,
    host: AgentHost,
    Body(req): Body<LogRequest>,
) -> ApiResult<Json<LogAnswer>> {
    state
        .plane
        .held_job(&host.host_id, &req.job)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("job `{}` held by this host", req.job)))?;
    let go_on = state
        .plane
        .append_log(&req.job, req.text.as_bytes())
        .await?;
    Ok(Json(LogAnswer { go_on }))
}

/// The host a new workspace goes to: a live host (this process's own is always live) that
/// gives a workspace the `disk` it asks for, holding the largest share of the image's chunks,
/// then the least loaded. A disk request no live host gives is refused at once (a host's
/// ceiling is its `--workspace-disk`, from its reports).
async fn place(state: &AppState, image: &str, disk: Option<u64>) -> ApiResult<String> {
    let alive_since = now_ms() - 60_000;
    let rows = sqlx::query(
        "SELECT h.id, h.images, h.last_seen_at, h.disk_ceiling, (SELECT COUNT(*) FROM workspaces w WHERE w.host_id = h.id) AS n FROM hosts h",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let mut candidates = Vec::new();
    let mut most_given: Option<u64> = None;
    for r in rows {
        let id: String = r.try_get("id")?;
        let seen: Option<i64> = r.try_get("last_seen_at")?;
        if id != state.host_id && seen.is_none_or(|t| t < alive_since) {
            continue;
        }
        let ceiling = r
            .try_get::<Option<i64>, _>("disk_ceiling")?
            .map(|c| c as u64);
        if let (Some(wanted), Some(ceiling)) = (disk, ceiling)
            && wanted > ceiling
        {
            most_given = most_given.max(Some(ceiling));
            continue;
        }
        let images: Option<String> = r.try_get("images")?;
        let cached = images.as_deref().map_or(0.0, |j| cached_share(j, image));
        candidates.push((id, cached, r.try_get::<i64, _>("n")?));
    }
    if let (true, Some(wanted), Some(most)) = (candidates.is_empty(), disk, most_given) {
        return Err(ApiError::bad_request(format!(
            "a disk of {} MiB is more than any host gives a workspace (at most {} MiB)",
            wanted >> 20,
            most >> 20
        )));
    }
    Ok(best_host(&candidates).unwrap_or_else(|| state.host_id.clone()))
}

/// How much of `image` a host's reported image list says it holds (lists from before shares
/// were reported name whole images).
fn cached_share(images_json: &str, image: &str) -> f64 {
    if let Ok(list) = serde_json::from_str::<Vec<warren_agent::HostImage>>(images_json) {
        return list
            .iter()
            .filter(|h| h.image == image)
            .map(|h| h.cached.clamp(0.0, 1.0))
            .fold(0.0, f64::max);
    }
    let whole = serde_json::from_str::<Vec<String>>(images_json)
        .is_ok_and(|list| list.iter().any(|i| i == image));
    if whole { 1.0 } else { 0.0 }
}

/// The most of the image first, then the fewest workspaces; shares within 5% count as equal, so
/// a nearly full host does not take every workspace from an idle one that holds as much.
fn best_host(candidates: &[(String, f64, i64)]) -> Option<String> {
    let top = candidates.iter().map(|c| c.1).fold(0.0, f64::max);
    candidates
        .iter()
        .filter(|c| c.1 >= top - 0.05)
        .min_by_key(|c| c.2)
        .map(|c| c.0.clone())
}

pub async fn list_hosts(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<HostView>>> {
    caller.require_admin()?;
    let rows = sqlx::query(
        "SELECT h.id, h.name, h.last_seen_at, (SELECT COUNT(*) FROM workspaces w WHERE w.host_id = h.id) AS n
         FROM hosts h ORDER BY h.name",
    )
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(
        rows.iter()
            .map(|r| {
                Ok(HostView {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    workspaces: r.try_get("n")?,
                    last_seen_at: r.try_get("last_seen_at")?,
                })
            })
            .collect::<ApiResult<_>>()?,
    ))
}

#[derive(Debug, Serialize)]
pub struct JobView {
    id: String,
    kind: String,
    workspace: Option<String>,
    state: String,
    attempts: i64,
    last_error: Option<String>,
    created_at: i64,
    finished_at: Option<i64>,
}

pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<JobView>>> {
    let rows = sqlx::query(
        "SELECT j.id, j.kind, w.name AS workspace, j.state, j.attempts, j.last_error, j.created_at, j.finished_at
         FROM jobs j LEFT JOIN workspaces w ON w.id = j.workspace_id
         WHERE $2 = 1 OR w.owner_id = $1
         ORDER BY j.created_at DESC LIMIT 200",
    )
    .bind(&caller.user_id)
    .bind(i64::from(caller.is_admin))
    .fetch_all(&state.db.pool)
    .await?;
    Ok(Json(
        rows.iter()
            .map(|r| {
                Ok(JobView {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    workspace: r.try_get("workspace")?,
                    state: r.try_get("state")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    created_at: r.try_get("created_at")?,
                    finished_at: r.try_get("finished_at")?,
                })
            })
            .collect::<ApiResult<_>>()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_host_holding_most_of_the_image_then_the_least_loaded() {
        let list = r#"[{"image":"dev:1","cached":0.8},{"image":"web:2","cached":1.0}]"#;
        assert_eq!(cached_share(list, "dev:1"), 0.8);
        assert_eq!(cached_share(list, "other:1"), 0.0);
        assert_eq!(cached_share(r#"["dev:1"]"#, "dev:1"), 1.0);
        assert_eq!(cached_share("not json", "dev:1"), 0.0);
        let hosts = |c: &[(&str, f64, i64)]| {
            best_host(
                &c.iter()
                    .map(|(h, s, n)| (h.to_string(), *s, *n))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(hosts(&[("a", 0.2, 0), ("b", 0.9, 5)]).as_deref(), Some("b"));
        assert_eq!(
            hosts(&[("a", 0.9, 3), ("b", 0.92, 5)]).as_deref(),
            Some("a")
        );
        assert_eq!(hosts(&[("a", 0.0, 3), ("b", 0.0, 1)]).as_deref(), Some("b"));
        assert_eq!(hosts(&[]), None);
    }

    #[test]
    fn git_urls() {
        for ok in [
            "https://example.com/a.git",
            "ssh://git@example.com/a.git",
            "file:///srv/repo",
            "git@example.com:team/a.git",
        ] {
            assert!(check_git_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ftp://x/y",
            "/srv/repo",
            "https://",
            "http://example.com/a",
            "a b",
            "example.com:x",
        ] {
            assert!(check_git_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_keys_are_checked_and_fingerprinted() {
        // `ssh-keygen -lf` of this key prints SHA256:xK6U2Sg9CovItUVxAj+GYpPjKmy/exZ7XALpQnAFgAo.
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKpoURYOUvqDe79NUODlAulUiW6t1Hg2A5JCqOEct8Np alice@laptop";
        assert_eq!(
            ssh_fingerprint(key).ok().as_deref(),
            Some("SHA256:xK6U2Sg9CovItUVxAj+GYpPjKmy/exZ7XALpQnAFgAo")
        );
        assert!(ssh_fingerprint("ssh-ed25519").is_err());
        assert!(
            ssh_fingerprint(
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"
            )
            .is_err()
        );
        assert!(ssh_fingerprint("ssh-ed25519 !!!").is_err());
        assert!(ssh_fingerprint("ssh-dss AAAA").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("workspace", "dev-1").is_ok());
        for bad in ["", "Dev", "-x", "a_b", &"x".repeat(41)] {
            assert!(check_name("workspace", bad).is_err(), "{bad}");
        }
    }
}
