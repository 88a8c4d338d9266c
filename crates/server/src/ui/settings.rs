//! A user's settings (SSH keys, variables and secrets, API tokens) and the admin's page
//! (users, hosts, recent jobs with failures first), through the API's own functions.

use askama::Template;
use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;

use super::pages::{Frame, ago, gib, html};
use super::{Acting, Session, UiError};
use crate::api;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use warren_api::{KeyView, NewKey, NewUser, NewVar, ScopeQuery, UserView, VarView};

/// The user's SSH keys, and the form that adds one with the proof that they hold it.
#[derive(Template)]
#[template(path = "keys.html")]
struct KeysFragment {
    keys: Vec<KeyView>,
    /// The command that signs the proof (`ssh-keygen -Y sign`).
    sign: String,
}

async fn keys_of(state: &AppState, caller: &Caller) -> Result<KeysFragment, ApiError> {
    let Json(keys) = api::list_keys(State(state.clone()), caller.clone()).await?;
    let Json(challenge) = api::key_challenge(caller.clone()).await;
    let message = challenge.message.trim_end_matches('\n');
    Ok(KeysFragment {
        keys,
        sign: format!(
            "printf '%s\\n' '{message}' | ssh-keygen -Y sign -n {} -f ~/.ssh/id_ed25519",
            challenge.namespace
        ),
    })
}

/// The user's variables; a secret's value is never shown, only its length.
#[derive(Template)]
#[template(path = "variables.html")]
struct VariablesFragment {
    vars: Vec<VarView>,
}

async fn variables_of(state: &AppState, caller: &Caller) -> Result<VariablesFragment, ApiError> {
    let Json(vars) = api::list_vars(
        State(state.clone()),
        caller.clone(),
        axum::extract::Query(ScopeQuery { project: None }),
    )
    .await?;
    Ok(VariablesFragment { vars })
}

/// The user's API tokens; a new one is shown this once.
#[derive(Template)]
#[template(path = "tokens.html")]
struct TokensFragment {
    tokens: Vec<TokenRow>,
    new: Option<String>,
}

struct TokenRow {
    id: String,
    name: String,
    made: String,
}

async fn tokens_of(
    state: &AppState,
    caller: &Caller,
    new: Option<String>,
) -> Result<TokensFragment, ApiError> {
    let Json(tokens) = api::list_tokens(State(state.clone()), caller.clone()).await?;
    let now = crate::db::now_ms();
    Ok(TokensFragment {
        tokens: tokens
            .into_iter()
            .map(|t| TokenRow {
                id: t.id,
                name: t.name,
                made: ago(now - t.created_at),
            })
            .collect(),
        new,
    })
}

#[derive(Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    frame: Frame,
    keys: KeysFragment,
    vars: VariablesFragment,
    tokens: TokensFragment,
}

pub(crate) async fn settings(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    Ok(html(&SettingsPage {
        keys: keys_of(&state, caller).await?,
        vars: variables_of(&state, caller).await?,
        tokens: tokens_of(&state, caller, None).await?,
        frame: Frame::of(&session),
    }))
}

#[derive(Deserialize)]
pub(crate) struct KeyForm {
    name: String,
    public_key: String,
    signature: String,
}

pub(crate) async fn add_key(
    State(state): State<AppState>,
    Acting(session): Acting,
    axum::Form(form): axum::Form<KeyForm>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    api::add_key(
        State(state.clone()),
        caller.clone(),
        api::Body(NewKey {
            name: form.name.trim().to_owned(),
            public_key: form.public_key.trim().to_owned(),
            signature: Some(form.signature.trim().to_owned()).filter(|s| !s.is_empty()),
        }),
    )
    .await?;
    Ok(html(&keys_of(&state, caller).await?))
}

pub(crate) async fn delete_key(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    api::delete_key(State(state.clone()), caller.clone(), Path(id)).await?;
    Ok(html(&keys_of(&state, caller).await?))
}

#[derive(Deserialize)]
pub(crate) struct VariableForm {
    name: String,
    value: String,
    /// A checkbox: present when ticked.
    #[serde(default)]
    secret: Option<String>,
}

pub(crate) async fn set_variable(
    State(state): State<AppState>,
    Acting(session): Acting,
    axum::Form(form): axum::Form<VariableForm>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    api::set_var(
        State(state.clone()),
        caller.clone(),
        api::Body(NewVar {
            name: form.name.trim().to_owned(),
            value: form.value,
            secret: form.secret.is_some(),
            project: None,
        }),
    )
    .await?;
    Ok(html(&variables_of(&state, caller).await?))
}

pub(crate) async fn delete_variable(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(name): Path<String>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    api::delete_var(
        State(state.clone()),
        caller.clone(),
        Path(name),
        axum::extract::Query(ScopeQuery { project: None }),
    )
    .await?;
    Ok(html(&variables_of(&state, caller).await?))
}

#[derive(Deserialize)]
pub(crate) struct TokenForm {
    name: String,
}

pub(crate) async fn create_token(
    State(state): State<AppState>,
    Acting(session): Acting,
    axum::Form(form): axum::Form<TokenForm>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let (_, token) = api::make_token(&state, caller, &form.name).await?;
    Ok(html(&tokens_of(&state, caller, Some(token)).await?))
}

pub(crate) async fn delete_token(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    api::delete_token(State(state.clone()), caller.clone(), Path(id)).await?;
    Ok(html(&tokens_of(&state, caller, None).await?))
}

// ---- admin ----

/// Every user, and the form that adds one.
#[derive(Template)]
#[template(path = "users.html")]
struct UsersFragment {
    users: Vec<UserView>,
}

struct HostRow {
    name: String,
    seen: String,
    /// Heard from within `--host-lost-seconds`.
    alive: bool,
    load: String,
    memory: String,
    workspaces: i64,
}

struct JobRow {
    kind: String,
    workspace: String,
    state: String,
    attempts: i64,
    asked: String,
    error: String,
}

#[derive(Template)]
#[template(path = "admin.html")]
struct AdminPage {
    frame: Frame,
    users: UsersFragment,
    hosts: Vec<HostRow>,
    jobs: Vec<JobRow>,
}

/// Jobs the admin page lists.
const JOBS_SHOWN: usize = 50;

pub(crate) async fn admin(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    // Not an admin: there is no such page (as for another user's workspace).
    if !caller.is_admin {
        return Err(UiError(ApiError::not_found("such page")));
    }
    let Json(users) = api::list_users(State(state.clone()), caller.clone()).await?;
    let Json(hosts) = api::list_hosts(State(state.clone()), caller.clone()).await?;
    let Json(mut jobs) = api::list_jobs(State(state.clone()), caller.clone()).await?;
    // Failures first, then the newest.
    jobs.sort_by_key(|j| (j.state != "failed", std::cmp::Reverse(j.created_at)));
    let now = crate::db::now_ms();
    let live_since = state.live_since();
    Ok(html(&AdminPage {
        frame: Frame::of(&session),
        users: UsersFragment { users },
        hosts: hosts
            .into_iter()
            .map(|h| HostRow {
                seen: h
                    .last_seen_at
                    .map_or_else(|| "never".to_owned(), |at| ago(now - at)),
                alive: h.last_seen_at.is_some_and(|at| at >= live_since),
                load: match (h.load1, h.cpus) {
                    (Some(load), Some(cpus)) => format!("{load:.2} on {cpus} CPUs"),
                    _ => "—".to_owned(),
                },
                memory: match (h.memory_available, h.memory_total) {
                    (Some(free), Some(total)) => format!("{} free of {}", gib(free), gib(total)),
                    _ => "—".to_owned(),
                },
                name: h.name,
                workspaces: h.workspaces,
            })
            .collect(),
        jobs: jobs
            .into_iter()
            .take(JOBS_SHOWN)
            .map(|j| JobRow {
                kind: j.kind,
                workspace: j.workspace.unwrap_or_default(),
                asked: ago(now - j.created_at),
                error: j.last_error.unwrap_or_default(),
                state: j.state,
                attempts: j.attempts,
            })
            .collect(),
    }))
}

#[derive(Deserialize)]
pub(crate) struct UserForm {
    name: String,
    password: String,
    #[serde(default)]
    admin: Option<String>,
}

pub(crate) async fn add_user(
    State(state): State<AppState>,
    Acting(session): Acting,
    axum::Form(form): axum::Form<UserForm>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    // As the page: nothing here for anyone else.
    if !caller.is_admin {
        return Err(UiError(ApiError::not_found("such page")));
    }
    api::create_user(
        State(state.clone()),
        caller.clone(),
        api::Body(NewUser {
            name: form.name.trim().to_owned(),
            password: form.password,
            admin: form.admin.is_some(),
        }),
    )
    .await?;
    let Json(users) = api::list_users(State(state), caller.clone()).await?;
    Ok(html(&UsersFragment { users }))
}
