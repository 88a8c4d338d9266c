//! The control plane's side of the SSH gateway ([`Directory`]): which key is whose, which
//! workspace a login names and where it runs, and a task's terminal on another host (through
//! [`crate::links`]).

use std::time::Duration;

use warren_protocol::gateway::{Directory, Found, InUse, Opening, Terminal, User};

use crate::api::{blob_fingerprint, workspace_env};
use crate::links::Place;
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

    async fn found(&self, login: &str, ws: &Workspace) -> Result<Found, String> {
        let env = workspace_env(&self.state, &ws.owner_id, ws.project_id.as_deref())
            .await
            .map_err(|e| e.message)?;
        Ok(Found {
            name: login.to_owned(),
            runtime_id: ws.id.runtime_id(),
            host_id: ws.host_id.0.clone(),
            host: ws.host.clone(),
            state: ws.state.to_string(),
            env,
            user: ws.run_as.clone(),
            folder: ws.folder.clone(),
        })
    }
}

impl Directory for GatewayDirectory {
    async fn user_for_key(&self, blob: &[u8]) -> Result<Option<User>, String> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT u.id, u.name FROM ssh_keys k JOIN users u ON u.id = k.user_id WHERE k.fingerprint = $1",
        )
        .bind(blob_fingerprint(blob))
        .fetch_optional(&self.state.db.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok(row.map(|(id, name)| User { id, name }))
    }

    async fn workspace(&self, user: &User, login: &str) -> Result<Found, String> {
        let row = self.row(user, login).await?;
        self.found(login, &row).await
    }

    async fn start(&self, user: &User, login: &str) -> Result<Found, String> {
        let row = self.row(user, login).await?;
        workspaces::request(&self.state, &row, Event::Start)
            .await
            .map_err(|e| e.message)?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let row = self.row(user, login).await?;
            let state = row.state;
            match state {
                WorkspaceState::Running => return self.found(login, &row).await,
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

    fn attach<'a>(&'a self, found: &'a Found, task: &'a str) -> Opening<'a> {
        Box::pin(async move {
            let terminal = self
                .state
                .hosts
                .attach(&place(found), task)
                .await
                .map_err(|e| e.message)?;
            Ok(Box::new(terminal) as Box<dyn Terminal>)
        })
    }

    fn session<'a>(&'a self, found: &'a Found) -> Opening<'a> {
        Box::pin(async move {
            let stream = self
                .state
                .hosts
                .session(&place(found))
                .await
                .map_err(|e| e.message)?;
            Ok(Box::new(stream) as Box<dyn Terminal>)
        })
    }

    fn connect<'a>(&'a self, found: &'a Found, host: &'a str, port: u16) -> Opening<'a> {
        Box::pin(async move {
            let stream = self
                .state
                .hosts
                .connect(&place(found), host, port)
                .await
                .map_err(|e| e.message)?;
            Ok(Box::new(stream) as Box<dyn Terminal>)
        })
    }

    fn in_use(&self, workspace: &Found) -> InUse {
        let id = workspace
            .runtime_id
            .strip_prefix(crate::model::WorkspaceId::RUNTIME_PREFIX)
            .unwrap_or(&workspace.runtime_id);
        InUse::new(self.state.presence.in_use(id))
    }
}

/// Where a workspace the gateway found is, for its host's links.
fn place(found: &Found) -> Place {
    Place {
        host_id: found.host_id.clone(),
        host: found.host.clone(),
        workspace: found.name.clone(),
        runtime_id: found.runtime_id.clone(),
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
