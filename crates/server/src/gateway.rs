//! The control plane's side of the SSH gateway: which key is whose, and which workspace a
//! login names (see `warren-ssh`).

use std::time::Duration;

use sqlx::Row;
use std::sync::Arc;

use warren_ssh::{Directory, Opening, PublicKey, Reach, Target, TaskTerminals, Terminal, User};

use crate::api::{blob_fingerprint, workspace_env};
use crate::model::{Event, WorkspaceState};
use crate::state::AppState;
use crate::workspaces::{self, Workspace};

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
    async fn row(&self, user: &User, login: &str) -> Result<Workspace, String> {
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
        let row = workspaces::select(
            &self.state.db,
            "WHERE w.name = $1 AND u.name = $2",
            &[workspace, owner],
        )
        .await
        // Logged where it happened; the client learns only that it failed.
        .map_err(|_| "the control plane cannot answer right now".to_owned())?
        .into_iter()
        .next()
        .ok_or_else(missing)?;
        if row.owner_id != user.id {
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

    async fn target(&self, login: &str, ws: &Workspace) -> Result<Target, String> {
        let reach = match &self.state.runtime {
            Some(runtime) if ws.host_id.0 == self.state.host_id => Reach::Local(runtime.clone()),
            _ => Reach::Remote {
                host: ws.host.clone(),
                terminals: Arc::new(RemoteTasks {
                    state: self.state.clone(),
                    workspace: ws.clone(),
                }),
            },
        };
        let env = workspace_env(&self.state, &ws.owner_id, ws.project_id.as_deref())
            .await
            .map_err(|e| e.message)?;
        Ok(Target {
            name: login.to_owned(),
            id: warren_runtime::WorkspaceId::new(&ws.id.runtime_id()).map_err(|e| e.to_string())?,
            reach,
            state: ws.state.to_string(),
            env,
            user: ws.run_as.clone(),
        })
    }
}

/// The tasks of a workspace on another host, reached through that host's agent.
struct RemoteTasks {
    state: AppState,
    workspace: Workspace,
}

impl TaskTerminals for RemoteTasks {
    fn attach(&self, task: &str) -> Opening<'_> {
        let task = task.to_owned();
        Box::pin(async move {
            let terminal = self
                .state
                .hosts
                .attach(&self.workspace, &task)
                .await
                .map_err(|e| e.message)?;
            Ok(Box::new(terminal) as Box<dyn Terminal>)
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
        workspaces::request(&self.state, &row, Event::Start)
            .await
            .map_err(|e| e.message)?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let row = self.row(user, login).await?;
            let state = row.state;
            match state {
                WorkspaceState::Running => return self.target(login, &row).await,
                WorkspaceState::Starting | WorkspaceState::Creating => {}
                other => {
                    return Err(format!(
                        "workspace `{login}` did not start: it is {other}{}",
                        row.last_error
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
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
