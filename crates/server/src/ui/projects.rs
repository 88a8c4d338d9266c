//! Projects and their prebuilds: the list, adding one (its webhook URL shown once), a
//! project's branches with their latest prebuild, and a prebuild's page (its steps, its live
//! log, Cancel and Retry). As everywhere in the UI, through the API's own functions.

use askama::Template;
use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::pages::{Frame, ago, html};
use super::{Acting, Session, UiError};
use crate::api;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use warren_api::{NewProject, PrebuildState, PrebuildView, ProjectView};

/// A prebuild as a cell of a table: its state (a link to its page), commit and age.
pub(crate) struct PrebuildCell {
    id: String,
    state: &'static str,
    busy: bool,
    branch: String,
    commit: String,
    when: String,
    behind: u64,
}

fn short(commit: &str) -> String {
    commit.chars().take(8).collect()
}

/// The cell of a stored prebuild, when there is one (git is asked how far behind it is).
async fn cell_of(state: &AppState, p: Option<crate::prebuilds::Prebuild>) -> Option<PrebuildCell> {
    match p {
        Some(p) => Some(cell(&api::view(state, p).await)),
        None => None,
    }
}

fn cell(p: &PrebuildView) -> PrebuildCell {
    PrebuildCell {
        id: p.id.clone(),
        state: p.state.as_str(),
        busy: matches!(p.state, PrebuildState::Queued | PrebuildState::Running),
        branch: p.branch.clone().unwrap_or_default(),
        commit: short(&p.commit),
        when: ago(crate::db::now_ms() - p.created_at),
        behind: p.behind.unwrap_or(0),
    }
}

struct ProjectRow {
    id: String,
    name: String,
    owner: String,
    mine: bool,
    git_url: String,
    branches: usize,
    latest: Option<PrebuildCell>,
}

#[derive(Template)]
#[template(path = "projects.html")]
struct ProjectsPage {
    frame: Frame,
    projects: Vec<ProjectRow>,
}

pub(crate) async fn projects(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let Json(found) = api::list_projects(State(state.clone()), caller.clone()).await?;
    let mut projects = Vec::new();
    for p in found {
        let Json(branches) =
            api::project_branches(State(state.clone()), caller.clone(), Path(p.id.clone())).await?;
        let newest = api::prebuilds_of(&state, caller, &p.id)
            .await?
            .into_iter()
            .next();
        let latest = cell_of(&state, newest).await;
        projects.push(ProjectRow {
            mine: p.owner == caller.name,
            latest,
            branches: branches.len(),
            id: p.id,
            name: p.name,
            owner: p.owner,
            git_url: p.git_url,
        });
    }
    Ok(html(&ProjectsPage {
        frame: Frame::of(&session),
        projects,
    }))
}

#[derive(Deserialize)]
pub(crate) struct ProjectForm {
    name: String,
    git_url: String,
    #[serde(default)]
    root_folder: String,
    #[serde(default)]
    env_file: String,
}

/// What the "Add project" dialog shows once the project is made: its webhook URL, this once.
#[derive(Template)]
#[template(path = "project_added.html")]
struct ProjectAdded {
    id: String,
    name: String,
    webhook: String,
}

pub(crate) async fn add_project(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Acting(session): Acting,
    headers: HeaderMap,
    axum::Form(form): axum::Form<ProjectForm>,
) -> Result<Response, UiError> {
    let optional = |text: String| Some(text.trim().to_owned()).filter(|t| !t.is_empty());
    let made = api::add_project(
        &state,
        &session.caller,
        NewProject {
            name: form.name.trim().to_owned(),
            git_url: form.git_url.trim().to_owned(),
            root_folder: optional(form.root_folder),
            env_file: optional(form.env_file),
        },
    )
    .await?;
    let path = made.webhook.unwrap_or_default();
    Ok(html(&ProjectAdded {
        webhook: format!("{}{path}", super::site_of(peer.ip(), &headers, &state)),
        id: made.id,
        name: made.name,
    }))
}

struct BranchRow {
    name: String,
    head: String,
    latest: Option<PrebuildCell>,
}

/// A project's branches, each with its latest prebuild and a button that asks for one.
#[derive(Template)]
#[template(path = "branches.html")]
struct BranchesFragment {
    id: String,
    branches: Vec<BranchRow>,
}

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    frame: Frame,
    project: ProjectView,
    branches: BranchesFragment,
    prebuilds: Vec<PrebuildCell>,
}

async fn branches_of(
    state: &AppState,
    caller: &Caller,
    project: &str,
) -> Result<(BranchesFragment, Vec<PrebuildCell>), ApiError> {
    let Json(branches) = api::project_branches(
        State(state.clone()),
        caller.clone(),
        Path(project.to_owned()),
    )
    .await?;
    let prebuilds = api::prebuilds_of(state, caller, project).await?;
    // Git is asked how far behind only about the prebuilds shown.
    let mut rows = Vec::with_capacity(branches.len());
    for b in branches {
        let latest = prebuilds
            .iter()
            .find(|p| p.branch.as_deref() == Some(b.name.as_str()))
            .cloned();
        rows.push(BranchRow {
            latest: cell_of(state, latest).await,
            head: short(&b.head),
            name: b.name,
        });
    }
    let mut newest = Vec::new();
    for p in prebuilds.into_iter().take(PREBUILDS_SHOWN) {
        newest.push(cell(&api::view(state, p).await));
    }
    Ok((
        BranchesFragment {
            id: project.to_owned(),
            branches: rows,
        },
        newest,
    ))
}

/// Prebuilds a project page lists (the newest).
const PREBUILDS_SHOWN: usize = 30;

pub(crate) async fn project(
    State(state): State<AppState>,
    session: Session,
    Path(key): Path<String>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let Json(project) =
        api::get_project(State(state.clone()), caller.clone(), Path(key.clone())).await?;
    let (branches, prebuilds) = branches_of(&state, caller, &project.id).await?;
    Ok(html(&ProjectPage {
        frame: Frame::of(&session),
        branches,
        prebuilds,
        project,
    }))
}

/// Reads the project's branch heads now; answers its branches.
pub(crate) async fn refresh_project(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(key): Path<String>,
) -> Result<Response, UiError> {
    let caller = &session.caller;
    let Json(project) = api::get_project(State(state.clone()), caller.clone(), Path(key)).await?;
    let Json(_read) = api::refresh_project(
        State(state.clone()),
        caller.clone(),
        Path(project.id.clone()),
    )
    .await?;
    Ok(html(&branches_of(&state, caller, &project.id).await?.0))
}

pub(crate) async fn delete_project(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(key): Path<String>,
) -> Result<Response, UiError> {
    api::delete_project(State(state), session.caller, Path(key)).await?;
    Ok([("hx-redirect", "/projects")].into_response())
}

#[derive(Deserialize)]
pub(crate) struct PrebuildForm {
    branch: String,
}

/// Asks for a prebuild of a branch's head; goes to its page (the one there is, when its
/// commit has one).
pub(crate) async fn prebuild_branch(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path(key): Path<String>,
    axum::Form(form): axum::Form<PrebuildForm>,
) -> Result<Response, UiError> {
    let (made, _) =
        api::request_prebuild(&state, &session.caller, &key, Some(&form.branch)).await?;
    Ok(go_to_prebuild(&made.id))
}

/// Sends the page to a prebuild's.
fn go_to_prebuild(id: &str) -> Response {
    [("hx-redirect", format!("/prebuilds/{id}"))].into_response()
}

/// A prebuild's state, times and actions; it asks for itself again every 2 s while the
/// prebuild is queued or running.
#[derive(Template)]
#[template(path = "prebuild_summary.html")]
struct SummaryFragment {
    p: PrebuildView,
    commit: String,
    behind: u64,
    active: bool,
    queued: String,
    took: Option<String>,
}

fn summary(p: PrebuildView) -> SummaryFragment {
    let active = matches!(p.state, PrebuildState::Queued | PrebuildState::Running);
    let took = p.started_at.map(|start| {
        let end = p.finished_at.unwrap_or_else(crate::db::now_ms);
        let s = (end - start).max(0) / 1000;
        if s < 120 {
            format!("{s} s")
        } else {
            format!("{} min {} s", s / 60, s % 60)
        }
    });
    SummaryFragment {
        commit: short(&p.commit),
        behind: p.behind.unwrap_or(0),
        queued: ago(crate::db::now_ms() - p.created_at),
        active,
        took,
        p,
    }
}

#[derive(Template)]
#[template(path = "prebuild.html")]
struct PrebuildPage {
    frame: Frame,
    id: String,
    project_id: String,
    project: String,
    branch: String,
    state: &'static str,
    summary: SummaryFragment,
}

pub(crate) async fn prebuild(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let Json(p) = api::get_prebuild(State(state), session.caller.clone(), Path(id)).await?;
    Ok(html(&PrebuildPage {
        frame: Frame::of(&session),
        id: p.id.clone(),
        project_id: p.project_id.clone(),
        project: p.project.clone(),
        branch: p.branch.clone().unwrap_or_default(),
        state: p.state.as_str(),
        summary: summary(p),
    }))
}

pub(crate) async fn prebuild_summary(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let Json(p) = api::get_prebuild(State(state), session.caller, Path(id)).await?;
    Ok(html(&summary(p)))
}

/// Cancel (answers the summary as it now is) or Retry (goes to the new prebuild's page).
pub(crate) async fn prebuild_action(
    State(state): State<AppState>,
    Acting(session): Acting,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, UiError> {
    let caller = session.caller;
    match action.as_str() {
        "cancel" => {
            let Json(p) = api::cancel_prebuild(State(state), caller, Path(id)).await?;
            Ok(html(&summary(p)))
        }
        "retry" => Ok(go_to_prebuild(&api::retry(&state, &caller, &id).await?.id)),
        _ => Err(UiError(ApiError::not_found("such action"))),
    }
}
