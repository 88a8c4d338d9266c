//! A new workspace: what it is made from (an image the user names, or the newest succeeded
//! prebuild of a project's branch), what its environment file asks (tasks, user, folder,
//! runtime, resources), the request checked against all of that, and the row stored with its
//! create job in one transaction.

use axum::http::StatusCode;
use warren_api::{EnvironmentFile, NewWorkspace};
use warren_protocol::{Action, TaskSpec, WorkspaceJob, WorkspaceSpec};

use crate::auth::Caller;
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::model::{Desired, WorkspaceId, WorkspaceState, check_name};
use crate::state::AppState;

/// The project a workspace is made for, as the caller may see it.
#[derive(Debug, Clone)]
pub struct Project {
    pub id: String,
    pub git_url: String,
}

/// A branch's prebuild a workspace starts from.
struct Prebuilt {
    id: String,
    branch: String,
    commit: String,
    /// The environment file the prebuild was made from.
    environment: Option<EnvironmentFile>,
}

/// A request that passed [`check`].
#[derive(Debug)]
pub struct Checked(NewWorkspace);

impl Checked {
    /// The project it names, to be looked up as the caller may see it.
    pub fn project(&self) -> Option<&str> {
        self.0.project.as_deref()
    }
}

/// Creates `req`'s workspace for `caller` (of `project`, when it names one) and queues its
/// create job; returns its id. Every refusal says what to change.
pub async fn create(
    state: &AppState,
    caller: &Caller,
    project: Option<Project>,
    Checked(req): Checked,
) -> ApiResult<WorkspaceId> {
    let (image, prebuilt) = match (&req.image, &project) {
        (Some(image), _) => (image.clone(), None),
        (None, None) => {
            return Err(ApiError::bad_request(
                "a workspace needs an image, or a project whose prebuild it starts from",
            ));
        }
        (None, Some(project)) => {
            let (image, prebuilt) = branch_prebuild(state, project, &req).await?;
            (image, Some(prebuilt))
        }
    };
    let environment = match req
        .environment
        .as_ref()
        .or(prebuilt.as_ref().and_then(|p| p.environment.as_ref()))
    {
        Some(env) => read_environment(env, project.as_ref().map(|p| p.git_url.as_str()))?,
        None => Environment::default(),
    };
    let asked = Resources::asked(&req, &environment)?;
    let mut tasks = environment.tasks.clone();
    if let Some(prebuilt) = &prebuilt {
        let (name, email) = git_identity(state, caller).await?;
        let git = git_task(
            &environment,
            &prebuilt.branch,
            &prebuilt.commit,
            &name,
            &email,
        );
        // The tasks run in the checkout, after the branch is checked out.
        for t in &mut tasks {
            t.stage += 1;
            t.cwd = Some(environment.folder.clone());
        }
        tasks.insert(0, git);
    }
    let project_id = project.as_ref().map(|p| p.id.clone());
    let ksm: (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT vm_ksm FROM users WHERE id = $1), (SELECT vm_ksm FROM projects WHERE id = $2)",
    )
    .bind(&caller.user_id)
    .bind(&project_id)
    .fetch_one(&state.db.pool)
    .await?;
    let vm = super::vm_options(&asked.runtime, ksm.0 != 0 || ksm.1.unwrap_or(0) != 0);
    super::resolve_image(state, &image).await?;
    let (host_id, placement) = super::place(state, &image, asked.disk).await?;
    let id = WorkspaceId(new_id());
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    sqlx::query(
        "INSERT INTO workspaces (id, owner_id, project_id, name, image, host_id, state, desired, memory, cpus_milli, created_at, updated_at, tasks, run_as, prebuild_id, branch, runtime, disk, idle_timeout_s, placement, folder)
         VALUES ($1, $2, $3, $4, $5, $6, $16, $17, $7, $8, $9, $9, $10, $11, $12, $13, $14, $15, $18, $19, $20)",
    )
    .bind(&id.0)
    .bind(&caller.user_id)
    .bind(&project_id)
    .bind(&req.name)
    .bind(&image)
    .bind(&host_id)
    .bind(asked.memory.map(|m| m as i64))
    .bind(asked.cpus.map(|c| (c * 1000.0).round() as i64))
    .bind(now)
    .bind(
        (!tasks.is_empty())
            .then(|| serde_json::to_string(&tasks))
            .transpose()
            .map_err(|e| ApiError::internal("tasks", e))?,
    )
    .bind(&environment.user)
    .bind(prebuilt.as_ref().map(|p| &p.id))
    .bind(prebuilt.as_ref().map(|p| &p.branch))
    .bind(&asked.runtime)
    .bind(asked.disk.map(|d| d as i64))
    .bind(WorkspaceState::Creating.as_str())
    .bind(Desired::Running.as_str())
    .bind(crate::idle::check_timeout(req.idle_timeout)?)
    .bind(&placement)
    // The checkout, made by the first start's git task; none without a prebuild.
    .bind(prebuilt.as_ref().map(|_| &environment.folder))
    .execute(&mut *tx)
    .await
    .map_err(|e| match ApiError::from(e) {
        c if c.status == StatusCode::CONFLICT => {
            ApiError::conflict(format!("you have a workspace `{}` already", req.name))
        }
        other => other,
    })?;
    // The ports its environment names, private until its owner says otherwise.
    for port in &environment.ports {
        sqlx::query(
            "INSERT INTO workspace_ports (workspace_id, port, label, access) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id.0)
        .bind(i64::from(port.port))
        .bind(&port.label)
        .bind(warren_api::PortAccess::Private.as_str())
        .execute(&mut *tx)
        .await?;
    }
    let spec = WorkspaceSpec {
        runtime_id: id.runtime_id(),
        image,
        memory: asked.memory,
        cpus: asked.cpus,
        pids: None,
        disk: asked.disk,
        tasks,
        vm,
        tenant: Some(caller.user_id.clone()),
    };
    jobs::enqueue(
        &mut tx,
        &id.0,
        &host_id,
        &WorkspaceJob {
            action: Action::Create,
            workspace: spec,
        },
    )
    .await?;
    tx.commit().await?;
    state.wake.notify_one();
    Ok(id)
}

/// What can be refused before anything is looked up: the name, the image reference (its
/// form, a reserved name, an untrusted registry), an image and a branch at once, and CPU and
/// memory no host could honour.
pub fn check(state: &AppState, caller: &Caller, req: NewWorkspace) -> ApiResult<Checked> {
    check_request(state, caller, &req)?;
    Ok(Checked(req))
}

fn check_request(state: &AppState, caller: &Caller, req: &NewWorkspace) -> ApiResult<()> {
    check_name("workspace", &req.name)?;
    if let Some(image) = &req.image {
        if image.trim().is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace) {
            return Err(ApiError::bad_request(
                "image must be an image reference such as dev:1",
            ));
        }
        // Prebuilds and build steps are a project's own: reached through the project (whose
        // access is checked), never by naming their image.
        if let Err(e) = warren_protocol::refuse_reserved(image) {
            return Err(ApiError::forbidden(format!(
                "{e}: create the workspace with --project (and --branch)"
            )));
        }
        // A registry image is mounted by the host: a user may name one only on a registry
        // the admin trusts (an admin may name any).
        if !caller.is_admin {
            check_registry_trusted(image, &state.trusted_registries)?;
        }
        if req.branch.is_some() {
            return Err(ApiError::bad_request(
                "a branch's workspace starts from the branch's prebuild: give a branch or an image, not both",
            ));
        }
    }
    crate::idle::check_timeout(req.idle_timeout)?;
    check_resources(req.cpus, req.memory, "")
}

/// The image of the newest succeeded prebuild of the branch the request names (the project's
/// default branch when it names none), and what the workspace takes from that prebuild.
async fn branch_prebuild(
    state: &AppState,
    project: &Project,
    req: &NewWorkspace,
) -> ApiResult<(String, Prebuilt)> {
    let (branch, head) =
        crate::prebuilds::branch_head(&state.db, &project.id, req.branch.as_deref()).await?;
    let Some(pb) = crate::prebuilds::for_branch(&state.db, &project.id, &branch, &head).await?
    else {
        let latest: Option<String> = sqlx::query_scalar(
            "SELECT state FROM prebuilds WHERE project_id = $1 AND (branch = $2 OR commit_sha = $3) ORDER BY created_at DESC LIMIT 1",
        )
        .bind(&project.id)
        .bind(&branch)
        .bind(&head)
        .fetch_optional(&state.db.pool)
        .await?;
        return Err(ApiError::conflict(format!(
            "branch `{branch}` has no succeeded prebuild yet{} (warren prebuild ls {})",
            latest
                .map(|s| format!(" (the latest is {s})"))
                .unwrap_or_default(),
            req.project.as_deref().unwrap_or_default()
        )));
    };
    Ok((
        pb.image.unwrap_or_default(),
        Prebuilt {
            id: pb.id,
            branch,
            commit: pb.commit_sha,
            environment: pb
                .env_file
                .zip(pb.env_text)
                .map(|(file, text)| EnvironmentFile { file, text }),
        },
    ))
}

/// The resources and runtime a workspace gets: the request's, else its environment file's.
struct Resources {
    memory: Option<u64>,
    cpus: Option<f64>,
    disk: Option<u64>,
    /// `container` or `vm`.
    runtime: String,
}

impl Resources {
    fn asked(req: &NewWorkspace, env: &Environment) -> ApiResult<Self> {
        let from_file = &env.resources;
        check_resources(
            from_file.cpus.map(f64::from),
            from_file.memory.map(|m| m.0),
            "the environment file's resources: ",
        )?;
        let runtime = match req.runtime.as_deref() {
            None => env.runtime.to_string(),
            Some(r @ ("container" | "vm")) => r.to_owned(),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "runtime must be `container` or `vm`, not `{other}`"
                )));
            }
        };
        let disk = req.disk.or(from_file.disk.map(|d| d.0));
        if let Some(disk) = disk
            && !(warren_protocol::MIN_DISK..=1 << 50).contains(&disk)
        {
            let from = if req.disk.is_some() {
                ""
            } else {
                "the environment file's resources: "
            };
            return Err(ApiError::bad_request(format!(
                "{from}disk must be at least {} MiB",
                warren_protocol::MIN_DISK >> 20
            )));
        }
        Ok(Self {
            memory: req.memory.or(from_file.memory.map(|m| m.0)),
            cpus: req.cpus.or(from_file.cpus.map(f64::from)),
            disk,
            runtime,
        })
    }
}

/// Refuses a user's image reference on a registry (the first part of `HOST[:PORT]/REPO:TAG`, as
/// Docker tells a registry from a repository) the admin does not trust: the host would mount
/// it, following whatever redirects and token services that registry names, with no egress
/// policy in the way.
fn check_registry_trusted(image: &str, trusted: &[String]) -> ApiResult<()> {
    let Some(first) = warren_store::registry_host(image) else {
        return Ok(());
    };
    if trusted.iter().any(|r| r.eq_ignore_ascii_case(first)) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "image {image}: {first} is not a registry this host trusts (an admin names them with \
         --trusted-registry); start from a project's prebuild, a local image, or a trusted registry"
    )))
}

/// What a workspace takes from its environment file.
struct Environment {
    /// Devcontainer `postCreateCommand` (once) and `postStartCommand`, Hocus `tasks[].workspace`
    /// with its `workspaceShell`, warren.yml's `workspace` commands.
    tasks: Vec<TaskSpec>,
    /// Who sessions, commands and tasks run as (`remoteUser`, else `containerUser`).
    user: Option<String>,
    /// Where the repository is checked out.
    folder: String,
    /// What the file asks to run in (`runtime: vm` in warren.yml).
    runtime: warren_envfile::RuntimeKind,
    /// CPUs, memory and disk it asks for (warren.yml's `resources`, devcontainer's
    /// `hostRequirements`); the request's own values win.
    resources: warren_envfile::Resources,
    /// Ports developers reach, with their labels.
    ports: Vec<warren_envfile::Port>,
}

impl Default for Environment {
    /// A workspace without an environment file.
    fn default() -> Self {
        Self {
            tasks: Vec::new(),
            user: None,
            folder: "/workspace".into(),
            runtime: Default::default(),
            resources: Default::default(),
            ports: Vec::new(),
        }
    }
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
    use warren_envfile::RepoPath;
    let path = RepoPath::resolve(&RepoPath::root(), &env.file)
        .map_err(|e| ApiError::bad_request(format!("environment file `{}`: {e}", env.file)))?;
    let name = env.file.rsplit('/').next().unwrap_or_default();
    let format = warren_envfile::format_of(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "`{}` is not an environment file (warren.yml, hocus.yml or devcontainer.json)",
            env.file
        ))
    })?;
    let options = repository
        .map(warren_envfile::read_options)
        .unwrap_or_default();
    let loaded = warren_envfile::parse(&path, format, &env.text, &options)
        .map_err(|r| ApiError::bad_request(r.render_errors()))?;
    Ok(Environment {
        tasks: warren_envfile::workspace_tasks(&loaded.spec),
        user: warren_envfile::session_user(&loaded.spec),
        runtime: loaded.spec.runtime,
        folder: loaded.spec.workspace_folder,
        resources: loaded.spec.resources,
        ports: loaded.spec.ports,
    })
}

/// Checks out the workspace's branch at the prebuild's commit and sets the owner's git
/// identity: the first task of the first start, so every other task sees the branch.
fn git_task(env: &Environment, branch: &str, commit: &str, name: &str, email: &str) -> TaskSpec {
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
    TaskSpec {
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
