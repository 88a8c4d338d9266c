//! Workspaces: created from an image or a branch's prebuild, started, stopped, deleted;
//! commands and task logs.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use sqlx::Row;
use warren_protocol::{Action, WorkspaceJob, WorkspaceSpec};

use super::projects::find_project;
use super::variables::workspace_env;
use super::{Body, check_name, pick_owned};
use crate::auth::Caller;
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::model::{Desired, Event, WorkspaceId, WorkspaceState};
use crate::state::AppState;
use crate::workspaces::{self, Workspace};
use warren_api::{
    EnvironmentFile, ExecRequest, ExecResponse, LogQuery, LogView, NewWorkspace, StopRequest,
    TaskView, WorkspaceView,
};

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

// ---- workspaces ----

/// What a workspace takes from its environment file.
struct Environment {
    /// Devcontainer `postCreateCommand` (once) and `postStartCommand`, Hocus `tasks[].workspace`
    /// with its `workspaceShell`, warren.yml's `workspace` commands.
    tasks: Vec<warren_protocol::TaskSpec>,
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
        .map(warren_spec::read_options)
        .unwrap_or_default();
    let loaded = warren_spec::parse(&path, format, &env.text, &options)
        .map_err(|r| ApiError::bad_request(r.render_errors()))?;
    Ok(Environment {
        tasks: warren_spec::workspace_tasks(&loaded.spec),
        user: warren_spec::session_user(&loaded.spec),
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
) -> warren_protocol::TaskSpec {
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
    warren_protocol::TaskSpec {
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

fn workspace_view(w: &Workspace) -> WorkspaceView {
    WorkspaceView {
        id: w.id.0.clone(),
        name: w.name.clone(),
        owner: w.owner.clone(),
        project: w.project.clone(),
        image: w.image.clone(),
        host: w.host.clone(),
        state: w.state,
        desired: w.desired,
        last_error: w.last_error.clone(),
        memory: w.memory,
        cpus: w.cpus,
        disk: w.disk,
        created_at: w.created_at,
        updated_at: w.updated_at,
        stats_at: w.stats_at,
        user: w.run_as.clone(),
        prebuild: w.prebuild_id.clone(),
        branch: w.branch.clone(),
        behind: None,
        runtime: w.runtime.clone(),
        accel: w
            .stats
            .as_ref()
            .and_then(|s| s.pointer("/vm/accel"))
            .and_then(|a| a.as_str())
            .map(str::to_owned),
        stats: w.stats.clone(),
    }
}

/// The view, with how far the workspace's prebuild is behind its branch.
async fn workspace_view_now(state: &AppState, w: &Workspace) -> WorkspaceView {
    let mut view = workspace_view(w);
    if let (Some(commit), Some(head), Some(url)) = (&w.prebuild_commit, &w.branch_head, &w.git_url)
    {
        view.behind = crate::prebuilds::behind(&state.git_mirrors, url, commit, head).await;
    }
    view
}

/// The workspace `key` (an id, or a name) the caller may see.
async fn find_workspace(state: &AppState, caller: &Caller, key: &str) -> ApiResult<Workspace> {
    let found = workspaces::select(&state.db, "WHERE w.id = $1 OR w.name = $1", &[key]).await?;
    pick_owned(found, caller, key)
        .ok_or_else(|| ApiError::not_found(format_args!("workspace `{key}`")))
}

/// Workspaces the caller may see
#[utoipa::path(get, path = "/api/v1/workspaces", tag = "workspaces",
    responses((status = OK, body = Vec<WorkspaceView>)))]
pub async fn list_workspaces(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<WorkspaceView>>> {
    let admin = if caller.is_admin { "1" } else { "0" };
    let found = workspaces::select(
        &state.db,
        "WHERE w.owner_id = $1 OR $2 = '1' ORDER BY w.name",
        &[&caller.user_id, admin],
    )
    .await?;
    let mut out = Vec::with_capacity(found.len());
    for w in &found {
        out.push(workspace_view_now(&state, w).await);
    }
    Ok(Json(out))
}

/// One workspace (by id or name)
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = OK, body = WorkspaceView)))]
pub async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(
        workspace_view_now(&state, &find_workspace(&state, &caller, &key).await?).await,
    ))
}

/// Create a workspace from an image (202: it starts in the background)
#[utoipa::path(post, path = "/api/v1/workspaces", tag = "workspaces",
    request_body = NewWorkspace,
    responses((status = ACCEPTED, body = WorkspaceView, description = "Created; it starts in the background")))]
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
        && let Err(e) = warren_protocol::refuse_reserved(image)
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
        check_registry_trusted(image, &state.trusted_registries)?;
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
                crate::prebuilds::branch_head(&state.db, pid, req.branch.as_deref()).await?;
            let Some(pb) = crate::prebuilds::for_branch(&state.db, pid, &branch, &head).await?
            else {
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
        if !(warren_protocol::MIN_DISK..=1 << 50).contains(&disk) {
            return Err(ApiError::bad_request(format!(
                "{from}disk must be at least {} MiB",
                warren_protocol::MIN_DISK >> 20
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
    let vm = workspaces::vm_options(&runtime, ksm.0 != 0 || ksm.1.unwrap_or(0) != 0);
    workspaces::resolve_image(&state, &image).await?;
    let host_id = workspaces::place(&state, &image, disk).await?;
    let id = new_id();
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    sqlx::query(
        "INSERT INTO workspaces (id, owner_id, project_id, name, image, host_id, state, desired, memory, cpus_milli, created_at, updated_at, tasks, run_as, prebuild_id, branch, runtime, disk)
         VALUES ($1, $2, $3, $4, $5, $6, $16, $17, $7, $8, $9, $9, $10, $11, $12, $13, $14, $15)",
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
    .bind(WorkspaceState::Creating.as_str())
    .bind(Desired::Running.as_str())
    .execute(&mut *tx)
    .await
    .map_err(|e| match ApiError::from(e) {
        c if c.status == StatusCode::CONFLICT => ApiError::conflict(format!("you have a workspace `{}` already", req.name)),
        other => other,
    })?;
    let spec = WorkspaceSpec {
        runtime_id: WorkspaceId(id.clone()).runtime_id(),
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
        Json(workspace_view_now(&state, &row).await),
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

/// Start a workspace
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/start", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = ACCEPTED, body = WorkspaceView)))]
pub async fn start_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let ws = find_workspace(&state, &caller, &key).await?;
    workspaces::request(&state, &ws, Event::Start).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&ws))))
}

/// Stop a workspace (`force` kills at once)
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/stop", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    request_body = StopRequest,
    responses((status = ACCEPTED, body = WorkspaceView)))]
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
    let ws = find_workspace(&state, &caller, &key).await?;
    let grace_ms = if req.force {
        0
    } else {
        req.grace_seconds.unwrap_or(10).min(3600) * 1000
    };
    let stop = Event::Stop {
        grace_ms,
        force: req.force,
    };
    workspaces::request(&state, &ws, stop).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&ws))))
}

/// Delete a workspace
#[utoipa::path(delete, path = "/api/v1/workspaces/{workspace}", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = ACCEPTED, body = WorkspaceView, description = "It is being deleted")))]
pub async fn delete_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let ws = find_workspace(&state, &caller, &key).await?;
    workspaces::request(&state, &ws, Event::Delete).await?;
    let ws = find_workspace(&state, &caller, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(workspace_view(&ws))))
}

/// Longest a command may run through `exec` (a host that is gone is noticed much sooner: its
/// tunnel's pings stop).
const EXEC_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// Longest a host may take over a task list or a piece of a log.
const TASKS_WITHIN: Duration = Duration::from_secs(30);

/// Run a command to its end and return its output
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace}/exec", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    request_body = ExecRequest,
    responses((status = OK, body = ExecResponse)))]
pub async fn exec_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    if ws.state != WorkspaceState::Running {
        return Err(ApiError::conflict(format!(
            "workspace `{key}` is {}, not running",
            ws.state
        )));
    }
    if req.argv.is_empty() {
        return Err(ApiError::bad_request("argv must name a command"));
    }
    // The project's variables, then its owner's, then the request's: later ones win.
    let mut env = workspace_env(&state, &ws.owner_id, ws.project_id.as_deref()).await?;
    env.extend(req.env);
    let request = ExecRequest {
        env,
        user: req.user.or(ws.run_as.clone()),
        ..req
    };
    let answer = state
        .hosts
        .json(
            &(&ws).into(),
            Method::POST,
            "exec",
            Some(&request),
            EXEC_WITHIN,
        )
        .await;
    answer.map(Json)
}

/// The workspace's tasks and how each is doing
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}/tasks", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name")),
    responses((status = OK, body = Vec<TaskView>)))]
pub async fn list_tasks(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<TaskView>>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    let none: Option<&()> = None;
    let tasks = state
        .hosts
        .json(&(&ws).into(), Method::GET, "tasks", none, TASKS_WITHIN)
        .await?;
    Ok(Json(tasks))
}

/// A task's output from `?offset=` (base64), where to continue, and whether more may come
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace}/tasks/{task}/log", tag = "workspaces",
    params(("workspace" = String, Path, description = "The workspace's id or name"), ("task" = String, Path, description = "The task's name"), LogQuery),
    responses((status = OK, body = LogView)))]
pub async fn task_log(
    State(state): State<AppState>,
    caller: Caller,
    Path((key, task)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
) -> ApiResult<Json<LogView>> {
    let ws = find_workspace(&state, &caller, &key).await?;
    let path = format!(
        "tasks/{}/log?offset={}",
        crate::links::task_segment(&task),
        query.offset
    );
    let none: Option<&()> = None;
    let log = state
        .hosts
        .json(&(&ws).into(), Method::GET, &path, none, TASKS_WITHIN)
        .await
        .map_err(|e| match e.status {
            StatusCode::NOT_FOUND => {
                ApiError::not_found(format_args!("task `{task}` in workspace `{key}`"))
            }
            _ => e,
        })?;
    Ok(Json(log))
}
