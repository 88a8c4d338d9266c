//! The pages and the actions on them. Each calls the API's own functions as the signed-in
//! user; what it adds is only how things look.

use askama::Template;
use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{Acting, Session, UiError, check_origin, end_session, new_session, over_https};
use crate::api;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::model::{Desired, Event, WorkspaceState};
use crate::state::AppState;
use crate::workspaces::{self, Workspace};
use warren_api::{NewWorkspace, PrebuildState, TaskState, WorkspaceView};

pub(crate) fn html(page: &impl Template) -> Response {
    match page.render() {
        Ok(text) => Html(text).into_response(),
        Err(e) => ApiError::internal("cannot render a page", e).into_response(),
    }
}

#[derive(Template)]
#[template(path = "error.html")]
pub(crate) struct ErrorPage {
    pub status: u16,
    pub message: String,
    pub frame: Frame,
}

/// What every page's frame shows: who is signed in (with the token its requests carry).
pub(crate) struct Frame {
    pub csrf: Option<String>,
    pub user: Option<String>,
    pub admin: bool,
}

impl Frame {
    pub fn of(session: &Session) -> Self {
        Self {
            csrf: Some(session.csrf.clone()),
            user: Some(session.caller.name.clone()),
            admin: session.caller.is_admin,
        }
    }

    /// The frame of a page shown to nobody in particular (signing in, an error).
    pub fn nobody() -> Self {
        Self {
            csrf: None,
            user: None,
            admin: false,
        }
    }
}

// ---- signing in and out ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    problem: Option<String>,
    user_name: String,
    frame: Frame,
}

pub(crate) async fn login_page() -> Response {
    html(&LoginPage {
        problem: None,
        user_name: String::new(),
        frame: Frame::nobody(),
    })
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    user: String,
    password: String,
}

pub(crate) async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    crate::client::ClientAddr(client): crate::client::ClientAddr,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    // Signing a browser in as somebody else from another site's page is refused too.
    if let Err(e) = check_origin(&headers) {
        return e.into_response();
    }
    let signed_in = match api::check_password(&state, client, &form.user, &form.password).await {
        Ok((user_id, _)) => {
            new_session(&state, &user_id, over_https(peer.ip(), &headers, &state)).await
        }
        Err(e) => Err(e),
    };
    match signed_in {
        Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response(),
        Err(e) => (
            e.status,
            html(&LoginPage {
                problem: Some(e.message),
                user_name: form.user,
                frame: Frame::nobody(),
            }),
        )
            .into_response(),
    }
}

pub(crate) async fn logout(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Acting(session): Acting,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let https = over_https(peer.ip(), &headers, &state);
    let cookie = end_session(&session, &state, https).await?;
    Ok((
        [(header::SET_COOKIE, cookie)],
        [("hx-redirect", "/login")],
        Redirect::to("/login"),
    )
        .into_response())
}

// ---- workspaces ----

/// One workspace as a row of the list.
pub(crate) struct Row {
    id: String,
    name: String,
    owner: String,
    mine: bool,
    source: String,
    behind: u64,
    state: &'static str,
    busy: bool,
    error: Option<String>,
    /// Why Warren stopped it by itself.
    stop_reason: Option<String>,
    /// Its idle timeout, for people.
    idle: String,
    runtime: String,
    host: String,
    /// Why it was placed there (shown when pointing at the host).
    placement: String,
    resources: String,
    /// When it was last used (an SSH channel, a command, a preview), for people.
    used: String,
    ssh: Option<String>,
    alias: String,
    vscode: String,
    can_start: bool,
    can_stop: bool,
    /// Failed: its last request can be asked again.
    can_retry: bool,
}

pub(crate) fn row(state: &AppState, caller: &Caller, w: &Workspace, view: &WorkspaceView) -> Row {
    let mine = w.owner_id == caller.user_id;
    // As at the gateway and in `warren ssh-config`: another user's is `<workspace>.<owner>`.
    let login = if mine {
        w.name.clone()
    } else {
        format!("{}.{}", w.name, w.owner)
    };
    let source = match (&w.project, &w.branch) {
        (Some(project), branch) => {
            let mut text = project.clone();
            if let Some(branch) = branch {
                text.push_str(&format!(" / {branch}"));
            }
            if let Some(commit) = &w.prebuild_commit {
                text.push_str(&format!(" @ {}", &commit[..commit.len().min(8)]));
            }
            text
        }
        (None, _) => w.image.clone(),
    };
    let runtime = match (w.runtime.as_str(), &view.accel) {
        ("vm", Some(accel)) => format!("VM · {accel}"),
        ("vm", None) => "VM".to_owned(),
        (other, _) => other.to_owned(),
    };
    let memory = memory_shown(w);
    let resources = match w.cpus {
        Some(cpus) => format!(
            "{memory} · {cpus} CPU{}",
            if cpus == 1.0 { "" } else { "s" }
        ),
        None => memory,
    };
    let ssh = state
        .ssh
        .as_ref()
        .map(|g| format!("ssh -p {} {login}@{}", g.port, g.host));
    let alias = format!("{login}.warren");
    Row {
        id: w.id.0.clone(),
        name: w.name.clone(),
        owner: w.owner.clone(),
        mine,
        source,
        behind: view.behind.unwrap_or(0),
        state: w.state.as_str(),
        busy: !w.state.is_settled() && w.state != WorkspaceState::Failed,
        error: w
            .last_error
            .clone()
            .filter(|_| w.state == WorkspaceState::Failed),
        stop_reason: w
            .stop_reason
            .clone()
            .filter(|_| w.state == WorkspaceState::Stopped),
        idle: {
            let (seconds, whence) = crate::idle::timeout_of(w, &state.idle);
            match seconds {
                0 => "never stopped when idle".to_owned(),
                s => format!(
                    "stopped after {} unused ({whence}'s setting)",
                    crate::idle::spoken(s)
                ),
            }
        },
        runtime,
        host: w.host.clone(),
        placement: w.placement.clone().unwrap_or_default(),
        resources,
        used: w
            .last_active_at
            .map_or_else(|| "not yet".to_owned(), |at| ago(crate::db::now_ms() - at)),
        ssh,
        // VS Code opens the project's checkout, or root's home.
        vscode: warren_api::vscode_link(&alias, w.folder.as_deref().unwrap_or("/root")),
        alias,
        // A lost one starts on another host, from its last saved layer.
        can_start: w.state == WorkspaceState::Lost
            || w.desired != Desired::Running
                && matches!(w.state, WorkspaceState::Stopped | WorkspaceState::Failed),
        can_stop: w.desired == Desired::Running
            && !matches!(w.state, WorkspaceState::Failed | WorkspaceState::Lost),
        can_retry: w.state == WorkspaceState::Failed,
    }
}

/// Its memory as its row shows it: used (as its host last said) of its limit.
pub(crate) fn memory_shown(w: &Workspace) -> String {
    let used = w
        .stats
        .as_ref()
        .and_then(|s| s.get("memory_bytes"))
        .and_then(serde_json::Value::as_u64);
    match (used, w.memory) {
        (Some(used), Some(limit)) => format!("{} of {}", gib(used), gib(limit)),
        (Some(used), None) => gib(used),
        (None, Some(limit)) => format!("≤ {}", gib(limit)),
        (None, None) => "—".to_owned(),
    }
}

pub(crate) fn gib(bytes: u64) -> String {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if gib >= 10.0 {
        format!("{gib:.0} GiB")
    } else if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

pub(crate) fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

#[derive(Template)]
#[template(path = "workspace_row.html")]
pub(crate) struct RowFragment {
    pub row: Row,
}

/// The row of workspace `w` as it is now (with how far behind its branch it is).
pub(crate) async fn row_now(state: &AppState, caller: &Caller, w: &Workspace) -> Row {
    let view = api::workspace_view_now(state, w).await;
    row(state, caller, w, &view)
}

/// A branch (or not) to make a workspace from, as the "New workspace" dialog offers it.
struct Source {
    value: String,
    label: String,
    usable: bool,
    /// Its latest prebuild, when that one is building or failed: its page shows the log.
    log: Option<String>,
}

#[derive(Template)]
#[template(path = "workspaces.html")]
struct WorkspacesPage {
    frame: Frame,
    rows: Vec<Row>,
    sources: Vec<Source>,
}

pub(crate) async fn workspaces(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let mut rows = Vec::new();
    for w in api::visible_workspaces(&state, caller).await? {
        rows.push(row_now(&state, caller, &w).await);
    }
    let sources = sources(&state, caller).await?;
    Ok(html(&WorkspacesPage {
        frame: Frame::of(&session),
        rows,
        sources,
    }))
}

/// Every branch of the caller's projects, with where its prebuild is: a workspace starts from
/// the newest prebuild of its branch that succeeded.
async fn sources(state: &AppState, caller: &Caller) -> Result<Vec<Source>, ApiError> {
    let Json(projects) = api::list_projects(State(state.clone()), caller.clone()).await?;
    let mut out = Vec::new();
    for project in projects {
        let Json(branches) = api::project_branches(
            State(state.clone()),
            caller.clone(),
            Path(project.id.clone()),
        )
        .await?;
        let prebuilds = api::prebuilds_of(state, caller, &project.id).await?;
        for branch in branches {
            let of_branch = || {
                prebuilds
                    .iter()
                    .filter(|p| p.branch.as_deref() == Some(branch.name.as_str()))
            };
            let usable = of_branch().any(|p| p.state == PrebuildState::Succeeded);
            let word = match of_branch().next().map(|p| p.state) {
                Some(PrebuildState::Succeeded) => "ready",
                Some(PrebuildState::Queued | PrebuildState::Running) if usable => {
                    "building (an older one is ready)"
                }
                Some(PrebuildState::Queued | PrebuildState::Running) => "building",
                Some(PrebuildState::Failed) if usable => "failed (an older one is ready)",
                Some(PrebuildState::Failed) => "failed",
                Some(PrebuildState::Cancelled | PrebuildState::Archived) if usable => "ready",
                Some(PrebuildState::Cancelled | PrebuildState::Archived) | None => "no prebuild",
            };
            let owner = if project.owner == caller.name {
                String::new()
            } else {
                format!(" ({})", project.owner)
            };
            out.push(Source {
                value: format!("project:{}:{}", project.id, branch.name),
                label: format!("{}{owner} / {} — {word}", project.name, branch.name),
                usable,
                log: of_branch()
                    .next()
                    .filter(|p| {
                        matches!(
                            p.state,
                            PrebuildState::Queued | PrebuildState::Running | PrebuildState::Failed
                        )
                    })
                    .map(|p| p.id.clone()),
            });
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
pub(crate) struct NewForm {
    name: String,
    source: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    runtime: String,
    #[serde(default)]
    memory_gib: String,
    #[serde(default)]
    cpus: String,
}

impl NewForm {
    fn request(self) -> Result<NewWorkspace, ApiError> {
        let number = |field: &str, text: &str| -> Result<Option<f64>, ApiError> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            match text.parse::<f64>() {
                Ok(n) if n.is_finite() && n > 0.0 => Ok(Some(n)),
                _ => Err(ApiError::bad_request(format!(
                    "{field} must be a positive number, not `{text}`"
                ))),
            }
        };
        let memory =
            number("memory", &self.memory_gib)?.map(|gib| (gib * f64::from(1u32 << 30)) as u64);
        let cpus = number("CPUs", &self.cpus)?;
        let (image, project, branch) = match self.source.splitn(3, ':').collect::<Vec<_>>()[..] {
            ["image"] if !self.image.trim().is_empty() => {
                (Some(self.image.trim().to_owned()), None, None)
            }
            ["image"] => return Err(ApiError::bad_request("name the image to start from")),
            ["project", project, branch] => {
                (None, Some(project.to_owned()), Some(branch.to_owned()))
            }
            _ => {
                return Err(ApiError::bad_request(
                    "choose what to make the workspace from",
                ));
            }
        };
        Ok(NewWorkspace {
            name: self.name.trim().to_owned(),
            image,
            project,
            branch,
            memory,
            cpus,
            disk: None,
            environment: None,
            runtime: Some(self.runtime).filter(|r| !r.is_empty()),
            idle_timeout: None,
        })
    }
}

pub(crate) async fn create_workspace(
    State(state): State<AppState>,
    Acting(session): Acting,
    axum::Form(form): axum::Form<NewForm>,
) -> Result<Response, UiError> {
    api::create_as(&state, &session.caller, form.request()?).await?;
    // The list shows it, and its state as it changes.
    Ok([("hx-redirect", "/")].into_response())
}

/// Start, stop, force-stop or delete; answers the workspace's row as it now is.
pub(crate) async fn workspace_action(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path((key, action)): Path<(String, String)>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let ws = api::find_workspace(&state, caller, &key).await?;
    let event = match action.as_str() {
        "retry" => {
            api::retry_workspace(State(state.clone()), caller.clone(), Path(ws.id.0.clone()))
                .await?;
            let ws = api::find_workspace(&state, caller, &key).await?;
            return Ok(html(&RowFragment {
                row: row_now(&state, caller, &ws).await,
            }));
        }
        "start" => Event::Start,
        "stop" => Event::Stop {
            grace_ms: api::STOP_GRACE_S * 1000,
            force: false,
        },
        "force-stop" => Event::Stop {
            grace_ms: 0,
            force: true,
        },
        "delete" => Event::Delete,
        _ => return Err(UiError(ApiError::not_found("such action"))),
    };
    workspaces::request(&state, &ws, event).await?;
    match api::find_workspace(&state, caller, &key).await {
        Ok(ws) => Ok(html(&RowFragment {
            row: row_now(&state, caller, &ws).await,
        })),
        // Deleted already: its row goes.
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok(Html("").into_response()),
        Err(e) => Err(e.into()),
    }
}

struct TaskRow {
    name: String,
    state: &'static str,
    segment: String,
}

#[derive(Template)]
#[template(path = "workspace.html")]
struct WorkspacePage {
    frame: Frame,
    row: Row,
    tasks: Vec<TaskRow>,
    tasks_problem: Option<String>,
    ports: PortsFragment,
    jobs: JobsFragment,
}

/// The workspace's job timeline: what was asked of its host, how it went, and why it failed;
/// it asks for itself again every 3 s.
#[derive(Template)]
#[template(path = "jobs.html")]
pub(crate) struct JobsFragment {
    id: String,
    failed: bool,
    jobs: Vec<JobRow>,
}

struct JobRow {
    kind: String,
    state: String,
    attempts: i64,
    asked: String,
    ended: String,
    error: String,
}

async fn jobs_of(
    state: &AppState,
    caller: &Caller,
    ws: &Workspace,
) -> Result<JobsFragment, ApiError> {
    let Json(jobs) =
        api::workspace_jobs(State(state.clone()), caller.clone(), Path(ws.id.0.clone())).await?;
    let now = crate::db::now_ms();
    Ok(JobsFragment {
        id: ws.id.0.clone(),
        failed: ws.state == WorkspaceState::Failed,
        jobs: jobs
            .into_iter()
            .map(|j| JobRow {
                kind: j
                    .kind
                    .strip_prefix("workspace.")
                    .unwrap_or(&j.kind)
                    .to_owned(),
                asked: ago(now - j.created_at),
                ended: j.finished_at.map(|at| ago(now - at)).unwrap_or_default(),
                error: j.last_error.unwrap_or_default(),
                state: j.state,
                attempts: j.attempts,
            })
            .collect(),
    })
}

pub(crate) async fn workspace_jobs(
    State(state): State<AppState>,
    session: Session,
    Path(key): Path<String>,
) -> Result<Response, UiError> {
    let ws = api::find_workspace(&state, &session.caller, &key).await?;
    Ok(html(&jobs_of(&state, &session.caller, &ws).await?))
}

/// The workspace page's ports: each with its label, who may reach it, and its preview link.
#[derive(Template)]
#[template(path = "ports.html")]
pub(crate) struct PortsFragment {
    id: String,
    ports: Vec<PortRow>,
    /// Whether the viewer may open its ports up (its owner).
    owner: bool,
    /// Whether this server serves previews at all.
    served: bool,
}

struct PortRow {
    port: u16,
    label: String,
    access: &'static str,
    url: Option<String>,
}

async fn ports_of(
    state: &AppState,
    caller: &Caller,
    ws: &Workspace,
    headers: HeaderMap,
) -> Result<PortsFragment, ApiError> {
    let Json(ports) = api::list_ports(
        State(state.clone()),
        caller.clone(),
        Path(ws.id.0.clone()),
        headers,
    )
    .await?;
    Ok(PortsFragment {
        id: ws.id.0.clone(),
        owner: ws.owner_id == caller.user_id,
        served: state.previews.port.is_some() || state.previews.url.is_some(),
        ports: ports
            .into_iter()
            .map(|p| PortRow {
                port: p.port,
                label: p.label.unwrap_or_default(),
                access: p.access.as_str(),
                url: p.url,
            })
            .collect(),
    })
}

#[derive(Deserialize)]
pub(crate) struct PortForm {
    port: String,
    access: String,
}

/// Opens a port, or changes who may reach it; answers the ports as they now are.
pub(crate) async fn set_port_access(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(key): Path<String>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<PortForm>,
) -> Result<Response, UiError> {
    let port: u16 = form
        .port
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!("`{}` is not a port (1 to 65535)", form.port))
        })?;
    let access = form.access.parse().map_err(|_| {
        ApiError::bad_request(format!("`{}`: private, users or public", form.access))
    })?;
    let caller = &session.caller;
    let ws = api::find_workspace(&state, caller, &key).await?;
    let _now = api::set_port_access(
        State(state.clone()),
        caller.clone(),
        Path((ws.id.0.clone(), port)),
        headers.clone(),
        api::Body(warren_api::PortChange { access }),
    )
    .await?;
    Ok(html(&ports_of(&state, caller, &ws, headers).await?))
}

/// Opens a port's preview for the signed-in user, when they may see it: on a preview domain,
/// through a single-use ticket its host exchanges for a cookie of its own; without one, only
/// a public port (path-based previews share one origin).
pub(crate) async fn open_preview(
    State(state): State<AppState>,
    session: Session,
    Path((id, port)): Path<(String, u16)>,
) -> Result<Response, UiError> {
    let refused = || {
        UiError(ApiError::not_found(format_args!(
            "preview of port {port} you may open"
        )))
    };
    let ws = workspaces::select(&state.db, "WHERE w.id = $1", &[&id])
        .await?
        .into_iter()
        .next()
        .ok_or_else(refused)?;
    let access = crate::preview::port_access(&state, &ws.id.0, port).await?;
    let may = match access {
        warren_api::PortAccess::Private => ws.owner_id == session.caller.user_id,
        warren_api::PortAccess::Users | warren_api::PortAccess::Public => true,
    };
    if !may {
        return Err(refused());
    }
    if let Some(url) = crate::preview::ticket_url(&state, &ws, port, &session).await? {
        return Ok(Redirect::to(&url).into_response());
    }
    if access != warren_api::PortAccess::Public {
        return Err(UiError(ApiError::not_found(format_args!(
            "way to open a port that is not public here: this server has no preview domain \
             (warren up --preview-domain); make the port public, or use `ssh -L`"
        ))));
    }
    let url = crate::preview::url_of(&state, &HeaderMap::new(), &ws, port)
        .ok_or_else(|| UiError(ApiError::not_found("preview listener on this server")))?;
    Ok(Redirect::to(&url).into_response())
}

pub(crate) async fn workspace(
    State(state): State<AppState>,
    session: Session,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let ws = api::find_workspace(&state, caller, &key).await?;
    let ports = ports_of(&state, caller, &ws, headers).await?;
    let jobs = jobs_of(&state, caller, &ws).await?;
    let row = row_now(&state, caller, &ws).await;
    let (tasks, tasks_problem) = if ws.state == WorkspaceState::Running {
        match api::list_tasks(State(state.clone()), caller.clone(), Path(ws.id.0.clone())).await {
            Ok(Json(tasks)) if tasks.is_empty() => {
                (Vec::new(), Some("Its environment has no tasks.".to_owned()))
            }
            Ok(Json(tasks)) => (
                tasks
                    .into_iter()
                    .map(|t| TaskRow {
                        segment: crate::links::task_segment(&t.name),
                        state: match t.state {
                            TaskState::Waiting => "waiting",
                            TaskState::Running => "running",
                            TaskState::Exited { .. } => "exited",
                            TaskState::Failed { .. } => "failed",
                        },
                        name: t.name,
                    })
                    .collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.message)),
        }
    } else {
        (
            Vec::new(),
            Some(format!("It is {}: its tasks show while it runs.", ws.state)),
        )
    };
    Ok(html(&WorkspacePage {
        frame: Frame::of(&session),
        row,
        tasks,
        tasks_problem,
        ports,
        jobs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(source: &str, image: &str, memory: &str) -> NewForm {
        NewForm {
            name: " dev ".into(),
            source: source.into(),
            image: image.into(),
            runtime: String::new(),
            memory_gib: memory.into(),
            cpus: "2".into(),
        }
    }

    #[test]
    fn the_new_workspace_form_becomes_the_apis_request() {
        let req = form("project:p1:feature:x", "", "1.5").request().ok();
        let req = req.as_ref();
        assert_eq!(req.map(|r| r.name.as_str()), Some("dev"));
        assert_eq!(req.and_then(|r| r.project.as_deref()), Some("p1"));
        assert_eq!(req.and_then(|r| r.branch.as_deref()), Some("feature:x"));
        assert_eq!(req.and_then(|r| r.memory), Some(3 << 29));
        assert_eq!(req.and_then(|r| r.cpus), Some(2.0));
        assert_eq!(req.and_then(|r| r.runtime.clone()), None);
        let image = form("image", "reg/x:1", "").request().ok();
        assert_eq!(image.and_then(|r| r.image), Some("reg/x:1".to_owned()));
        for (source, image, memory) in [
            ("image", " ", ""),
            ("", "", ""),
            ("project:p1:main", "", "-1"),
            ("project:p1:main", "", "lots"),
        ] {
            assert!(
                form(source, image, memory).request().is_err(),
                "{source} {memory}"
            );
        }
    }

    #[test]
    fn sizes_and_ages_read_as_people_say_them() {
        assert_eq!(gib(512 << 20), "512 MiB");
        assert_eq!(gib(3 << 29), "1.5 GiB");
        assert_eq!(gib(16 << 30), "16 GiB");
        assert_eq!(ago(5_000), "just now");
        assert_eq!(ago(125_000), "2 min ago");
        assert_eq!(ago(3 * 86_400_000), "3 days ago");
    }
}
