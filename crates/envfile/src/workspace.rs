//! What a workspace takes from its environment: its tasks, who its sessions run as, and how a
//! repository's environment file is read for it. The prebuild and the control plane both use
//! these, so a workspace made from either runs the same tasks as the same user.

use warren_protocol::TaskSpec;

use crate::{EnvSpec, Phase};

/// The workspace tasks of an environment: what runs on first start (once) and on every start,
/// as the user sessions run as.
pub fn workspace_tasks(spec: &EnvSpec) -> Vec<TaskSpec> {
    let user = session_user(spec);
    let env: Vec<String> = spec
        .env
        .iter()
        .chain(spec.remote_env.iter())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    spec.tasks
        .iter()
        .filter(|t| matches!(t.phase, Phase::FirstStart | Phase::EveryStart))
        .map(|t| TaskSpec {
            name: t.name.clone(),
            argv: t.command.argv(t.shell),
            env: env.clone(),
            user: user.clone(),
            cwd: None,
            once: t.phase == Phase::FirstStart,
            stage: t.stage,
        })
        .collect()
}

/// How a repository's environment file is read, the same way by the prebuild and by the
/// control plane when it makes a workspace of it: `${localWorkspaceFolder}` is
/// `/src/<repository name>` (so a devcontainer's default folder is `/workspaces/<name>`).
pub fn read_options(repository: &str) -> crate::ReadOptions {
    let name = repository
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .rsplit(['/', ':'])
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("repository");
    crate::ReadOptions {
        local_env: Default::default(),
        local_workspace_folder: Some(format!("/src/{name}")),
    }
}

/// Who developers' sessions, commands and tasks run as (`remoteUser`, else `containerUser`;
/// the image's user when neither is set).
pub fn session_user(spec: &EnvSpec) -> Option<String> {
    spec.user.clone().or_else(|| spec.container_user.clone())
}
