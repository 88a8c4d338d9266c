//! Environment variables of users and projects (secrets sealed at rest).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::Body;
use super::projects::find_project;
use crate::auth::Caller;
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::secrets::{StoredVariable, sealed_as};
use crate::state::AppState;
use warren_api::{NewVar, ScopeQuery, VarView};

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
        Some(p) => Ok(("project", find_project(state, caller, p).await?.id)),
        None => Ok(("user", caller.user_id.clone())),
    }
}

/// Environment variables of the caller (or of `?project=`); secrets' values are never returned
#[utoipa::path(get, path = "/api/v1/env", tag = "variables",
    params(ScopeQuery),
    responses((status = OK, body = Vec<VarView>)))]
pub async fn list_vars(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Query(query): axum::extract::Query<ScopeQuery>,
) -> ApiResult<Json<Vec<VarView>>> {
    let (scope, scope_id) = var_scope(&state, &caller, query.project.as_deref()).await?;
    let rows = StoredVariable::of(&state.db, scope, &scope_id).await?;
    let mut out = Vec::new();
    for row in rows {
        let (value, hint) = if row.secret.0 {
            let hint = match state
                .secrets
                .open(&row.context(scope, &scope_id), &row.value)
            {
                Ok(plain) => format!("{} characters", plain.chars().count()),
                Err(e) => e.to_string(),
            };
            (None, Some(hint))
        } else {
            (Some(row.value), None)
        };
        out.push(VarView {
            name: row.name,
            scope: scope.into(),
            secret: row.secret.0,
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

/// Set a variable (`secret: true` seals it at rest)
#[utoipa::path(post, path = "/api/v1/env", tag = "variables",
    request_body = NewVar,
    responses((status = NO_CONTENT, description = "Done")))]
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
            .seal(&sealed_as(scope, &scope_id, &req.name), &req.value)
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

/// Remove a variable (of the caller, or of `?project=`)
#[utoipa::path(delete, path = "/api/v1/env/{name}", tag = "variables",
    params(("name" = String, Path, description = "The variable's name"), ScopeQuery),
    responses((status = NO_CONTENT, description = "Done")))]
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
