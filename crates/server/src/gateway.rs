//! The control plane's side of the SSH gateway: which key is whose, and which workspace a
//! login names (see `warren-ssh`).

use std::time::Duration;

use sqlx::Row;
use warren_ssh::{Directory, PublicKey, Target, User};

use crate::AppState;
use crate::api::{WORKSPACE_COLUMNS, blob_fingerprint, runtime_id, start_row, workspace_env};

/// How long a session waits for a workspace it asked to start.
const START_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct GatewayDirectory {
    pub state: AppState,
}

/// `<workspace>` (the user's own) or `<workspace>.<owner>` (another user's, for admins).
fn parse_login(login: &str) -> (&str, Option<&str>) {
    match login.split_once('.') {
        Some((workspace, owner)) => (workspace, Some(owner)),
        None => (login, None),
    }
}

impl GatewayDirectory {
    async fn row(&self, user: &User, login: &str) -> Result<sqlx::any::AnyRow, String> {
        let (workspace, owner) = parse_login(login);
        let owner = owner.unwrap_or(&user.name);
        let missing = || {
            format!(
                "no workspace `{login}` for user `{}` (`warren ws ls` lists yours; another user's is `<workspace>.<owner>`, for admins)",
                user.name
            )
        };
        let internal = |e: sqlx::Error| {
            tracing::warn!(error = %e, "ssh gateway: database");
            "the control plane cannot answer right now".to_owned()
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WORKSPACE_COLUMNS} WHERE w.name = $1 AND u.name = $2"
        )))
        .bind(workspace)
        .bind(owner)
        .fetch_optional(&self.state.db.pool)
        .await
        .map_err(internal)?
        .ok_or_else(missing)?;
        let owner_id: String = row.try_get("owner_id").map_err(internal)?;
        if owner_id != user.id {
            let is_admin: i64 = sqlx::query_scalar("SELECT is_admin FROM users WHERE id = $1")
                .bind(&user.id)
                .fetch_optional(&self.state.db.pool)
                .await
                .map_err(internal)?
                .unwrap_or(0);
            if is_admin == 0 {
                // The same answer as for a missing one: nobody learns what others have.
                return Err(missing());
            }
        }
        Ok(row)
    }

    async fn target(&self, login: &str, row: &sqlx::any::AnyRow) -> Result<Target, String> {
        let get = |column: &str| -> Result<String, String> {
            row.try_get::<String, _>(column).map_err(|e| e.to_string())
        };
        let host_id = get("host_id")?;
        if host_id != self.state.host_id {
            return Err(format!(
                "workspace `{login}` runs on host `{}`: connect to that host's gateway",
                get("host")?
            ));
        }
        let runtime = self
            .state
            .runtime
            .clone()
            .ok_or("this gateway has no workspace runtime")?;
        let env = workspace_env(
            &self.state,
            &get("owner_id")?,
            row.try_get::<Option<String>, _>("project_id")
                .map_err(|e| e.to_string())?
                .as_deref(),
        )
        .await
        .map_err(|e| e.message)?;
        Ok(Target {
            name: login.to_owned(),
            id: warren_runtime::WorkspaceId::new(&runtime_id(&get("id")?))
                .map_err(|e| e.to_string())?,
            runtime,
            state: get("state")?,
            env,
            user: row
                .try_get::<Option<String>, _>("run_as")
                .map_err(|e| e.to_string())?,
        })
    }
}

impl Directory for GatewayDirectory {
    async fn user_for_key(&self, key: &PublicKey) -> Result<Option<User>, String> {
        let blob = key.to_bytes().map_err(|e| e.to_string())?;
        let row = sqlx::query(
            "SELECT u.id, u.name FROM ssh_keys k JOIN users u ON u.id = k.user_id WHERE k.fingerprint = $1",
        )
        .bind(blob_fingerprint(&blob))
        .fetch_optional(&self.state.db.pool)
        .await
        .map_err(|e| e.to_string())?;
        row.map(|r| {
            Ok(User {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| e.to_string())
    }

    async fn workspace(&self, user: &User, login: &str) -> Result<Target, String> {
        let row = self.row(user, login).await?;
        self.target(login, &row).await
    }

    async fn start(&self, user: &User, login: &str) -> Result<Target, String> {
        let row = self.row(user, login).await?;
        start_row(&self.state, &row, login)
            .await
            .map_err(|e| e.message)?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let row = self.row(user, login).await?;
            let state: String = row.try_get("state").map_err(|e| e.to_string())?;
            match state.as_str() {
                "running" => return self.target(login, &row).await,
                "starting" | "creating" => {}
                other => {
                    let error: Option<String> = row.try_get("last_error").unwrap_or(None);
                    return Err(format!(
                        "workspace `{login}` did not start: it is {other}{}",
                        error.map(|e| format!(" ({e})")).unwrap_or_default()
                    ));
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "workspace `{login}` is still {state} after {}s",
                    START_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_name_a_workspace_and_maybe_its_owner() {
        assert_eq!(parse_login("web"), ("web", None));
        assert_eq!(parse_login("web.alice"), ("web", Some("alice")));
    }
}
