//! The workspace lifecycle as a service: typed rows, placement, image resolution, the moves an
//! owner asks for, and reconciling a host's runtime with what was stored. The API, the SSH gateway and the
//! job loop call it; [`crate::model`] decides every move, this module stores it and queues the
//! host's job in one transaction.

use axum::http::StatusCode;
use sqlx::Row;
use sqlx::any::AnyRow;
use warren_protocol::TaskSpec;
use warren_protocol::VmOptions;
use warren_protocol::{Action, WorkspaceJob, WorkspaceSpec};

pub mod create;
pub mod moves;

use crate::db::{Db, now_ms};
use crate::error::ServerError;
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::model::{Desired, Event, HostId, Lifecycle, Next, Refusal, WorkspaceId, WorkspaceState};
use crate::state::AppState;

/// What [`Workspace::from_row`] reads: the workspace and the names of its owner, project, host
/// and prebuild.
pub(crate) const COLUMNS: &str =
    "w.id, w.name, w.owner_id, u.name AS owner, w.project_id, p.name AS project, w.image, h.name AS host,
    w.host_id, w.state, w.desired, w.last_error, w.memory, w.cpus_milli, w.disk, w.created_at, w.updated_at,
    w.tasks, w.stats, w.stats_at, w.run_as, w.folder, w.prebuild_id, w.branch, pb.commit_sha AS prebuild_commit, p.git_url,
    w.runtime, u.vm_ksm AS owner_ksm, p.vm_ksm AS project_ksm,
    w.idle_timeout_s, p.idle_timeout_s AS project_idle_timeout_s, u.idle_timeout_s AS owner_idle_timeout_s,
    w.last_active_at, w.stop_reason, w.placement, w.saved_layer, w.saved_at, w.base_image, w.moving_to,
    (SELECT m.name FROM hosts m WHERE m.id = w.moving_to) AS moving_to_host,
    (SELECT b.head FROM branches b WHERE b.project_id = w.project_id AND b.name = w.branch) AS branch_head
    FROM workspaces w JOIN users u ON u.id = w.owner_id JOIN hosts h ON h.id = w.host_id
    LEFT JOIN projects p ON p.id = w.project_id LEFT JOIN prebuilds pb ON pb.id = w.prebuild_id";

/// A workspace as stored.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    pub owner_id: String,
    pub owner: String,
    pub project_id: Option<String>,
    pub project: Option<String>,
    pub image: String,
    pub host_id: HostId,
    pub host: String,
    pub state: WorkspaceState,
    pub desired: Desired,
    pub last_error: Option<String>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    /// Bytes it may write (`None`: the host's default).
    pub disk: Option<u64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// What runs in persistent terminals on each start.
    pub tasks: Vec<TaskSpec>,
    /// Resource use as its host last reported it, while it runs.
    pub stats: Option<serde_json::Value>,
    pub stats_at: Option<i64>,
    /// Who sessions, commands and tasks run as inside (root when `None`).
    pub run_as: Option<String>,
    /// Where sessions, commands and editors land: the project's checkout (the user's home when
    /// `None`, or when the workspace no longer has the folder).
    pub folder: Option<String>,
    pub prebuild_id: Option<String>,
    pub branch: Option<String>,
    pub prebuild_commit: Option<String>,
    pub branch_head: Option<String>,
    pub git_url: Option<String>,
    /// `container` or `vm`.
    pub runtime: String,
    /// Whether its owner's or its project's trust domain lets KSM merge its VM's memory.
    pub vm_ksm: bool,
    /// Idle timeouts (seconds, 0: never) set on it, its project and its owner
    /// ([`crate::idle::timeout_of`]).
    pub idle_timeout_s: Option<u64>,
    pub project_idle_timeout_s: Option<u64>,
    pub owner_idle_timeout_s: Option<u64>,
    /// When it was last used (ms): an SSH channel, `exec`, a preview.
    pub last_active_at: Option<i64>,
    /// Why Warren stopped it by itself.
    pub stop_reason: Option<String>,
    /// Why it was placed on its host.
    pub placement: Option<String>,
    /// Its writable layer as last saved to the registry (an image reference), and when.
    pub saved_layer: Option<String>,
    pub saved_at: Option<i64>,
    /// The image its writable layer lies over, when not `image` (it was started from a saved
    /// layer on another host).
    pub base_image: Option<String>,
    /// The host a move is taking it to (its id, and its name).
    pub moving_to: Option<String>,
    pub moving_to_host: Option<String>,
}

/// A column of seconds that may be unset.
fn seconds(r: &AnyRow, column: &str) -> Result<Option<u64>, sqlx::Error> {
    Ok(r.try_get::<Option<i64>, _>(column)?
        .map(|s| s.max(0) as u64))
}

impl Workspace {
    /// Reads a row of `SELECT {COLUMNS}`.
    pub fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let state: String = r.try_get("state")?;
        let desired: String = r.try_get("desired")?;
        Ok(Self {
            id: WorkspaceId(r.try_get("id")?),
            name: r.try_get("name")?,
            owner_id: r.try_get("owner_id")?,
            owner: r.try_get("owner")?,
            project_id: r.try_get("project_id")?,
            project: r.try_get("project")?,
            image: r.try_get("image")?,
            host_id: HostId(r.try_get("host_id")?),
            host: r.try_get("host")?,
            state: state
                .parse()
                .map_err(|e| crate::db::decode_error("state", e))?,
            desired: desired
                .parse()
                .map_err(|e| crate::db::decode_error("desired", e))?,
            last_error: r.try_get("last_error")?,
            memory: r.try_get::<Option<i64>, _>("memory")?.map(|m| m as u64),
            cpus: r
                .try_get::<Option<i64>, _>("cpus_milli")?
                .map(|m| m as f64 / 1000.0),
            disk: r.try_get::<Option<i64>, _>("disk")?.map(|d| d as u64),
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            tasks: match r.try_get::<Option<String>, _>("tasks")? {
                Some(json) => {
                    serde_json::from_str(&json).map_err(|e| crate::db::decode_error("tasks", e))?
                }
                None => Vec::new(),
            },
            stats: r
                .try_get::<Option<String>, _>("stats")?
                .and_then(|s| serde_json::from_str(&s).ok()),
            stats_at: r.try_get("stats_at")?,
            run_as: r.try_get("run_as")?,
            folder: r.try_get("folder")?,
            prebuild_id: r.try_get("prebuild_id")?,
            branch: r.try_get("branch")?,
            prebuild_commit: r.try_get("prebuild_commit")?,
            branch_head: r.try_get("branch_head")?,
            git_url: r.try_get("git_url")?,
            runtime: r.try_get("runtime")?,
            vm_ksm: r.try_get::<i64, _>("owner_ksm")? != 0
                || r.try_get::<Option<i64>, _>("project_ksm")?.unwrap_or(0) != 0,
            idle_timeout_s: seconds(r, "idle_timeout_s")?,
            project_idle_timeout_s: seconds(r, "project_idle_timeout_s")?,
            owner_idle_timeout_s: seconds(r, "owner_idle_timeout_s")?,
            last_active_at: r.try_get("last_active_at")?,
            stop_reason: r.try_get("stop_reason")?,
            placement: r.try_get("placement")?,
            saved_layer: r.try_get("saved_layer")?,
            saved_at: r.try_get("saved_at")?,
            base_image: r.try_get("base_image")?,
            moving_to: r.try_get("moving_to")?,
            moving_to_host: r.try_get("moving_to_host")?,
        })
    }

    /// Job `action` for its host's agent.
    pub fn job(&self, action: Action) -> WorkspaceJob {
        WorkspaceJob {
            action,
            workspace: self.spec(),
        }
    }

    /// What its host's agent needs to make and run it.
    pub fn spec(&self) -> WorkspaceSpec {
        WorkspaceSpec {
            runtime_id: self.id.runtime_id(),
            image: self
                .base_image
                .clone()
                .unwrap_or_else(|| self.image.clone()),
            memory: self.memory,
            cpus: self.cpus,
            pids: None,
            disk: self.disk,
            tasks: self.tasks.clone(),
            vm: vm_options(&self.runtime, self.vm_ksm),
            tenant: Some(self.owner_id.clone()),
        }
    }
}

/// A VM workspace's options: KSM merging when its trust domain has it on (`None` for a
/// container).
pub(crate) fn vm_options(runtime: &str, ksm: bool) -> Option<VmOptions> {
    (runtime == "vm").then(|| VmOptions {
        ksm,
        ..Default::default()
    })
}

/// Workspaces read with `SELECT {COLUMNS} <filter>`, `$1`.. bound to `binds`. The filter is a
/// literal: every value goes in `binds`.
pub(crate) async fn select(
    db: &Db,
    filter: &'static str,
    binds: &[&str],
) -> ApiResult<Vec<Workspace>> {
    let sql = format!("SELECT {COLUMNS} {filter}");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for b in binds {
        query = query.bind(*b);
    }
    let rows = query.fetch_all(&db.pool).await?;
    rows.iter()
        .map(|r| Workspace::from_row(r).map_err(|e| ApiError::internal("a stored workspace", e)))
        .collect()
}

/// Moves a workspace on an owner's request (`Start`, `Stop`, `Delete`): records its new state
/// and queues its host's job in one transaction, as [`Lifecycle::next`] decides. A request
/// that came in meanwhile is decided again from where it left the workspace.
pub(crate) async fn request(state: &AppState, ws: &Workspace, event: Event) -> ApiResult<()> {
    let mut ws = ws.clone();
    for _ in 0..3 {
        if try_request(state, &ws, event).await? {
            return Ok(());
        }
        ws = select(&state.db, "WHERE w.id = $1", &[&ws.id.0])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::not_found(format_args!("workspace `{}`", ws.name)))?;
    }
    Err(ApiError::conflict(format!(
        "workspace `{}` keeps changing: look at it again and retry",
        ws.name
    )))
}

/// One attempt of [`request`]: `false` when the workspace was no longer as read.
async fn try_request(state: &AppState, ws: &Workspace, event: Event) -> ApiResult<bool> {
    let next = ws.state.next(ws.desired, event).map_err(|e| match e {
        Refusal::BeingDeleted => {
            ApiError::conflict(format!("workspace `{}` is being deleted", ws.name))
        }
    })?;
    let (between, desired, action, supersede) = match next {
        Next::Queue {
            state,
            desired,
            action,
            supersede,
        } => (state, desired, action, supersede),
        Next::Relocate => return relocate(state, ws).await,
        Next::Forget => return forget(state, ws).await,
        Next::Stay | Next::Record(_) => return Ok(true),
    };
    let mut tx = state.db.begin_write().await?;
    // Only from the state the decision was made in: a request that came in meanwhile (a
    // delete) is never overwritten.
    // An owner's request replaces whatever Warren did by itself (and why).
    let moved = sqlx::query(
        "UPDATE workspaces SET state = $2, desired = $3, updated_at = $4, stop_reason = NULL
         WHERE id = $1 AND state = $5 AND desired = $6",
    )
    .bind(&ws.id.0)
    .bind(between.as_str())
    .bind(desired.as_str())
    .bind(now_ms())
    .bind(ws.state.as_str())
    .bind(ws.desired.as_str())
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(false);
    }
    if supersede {
        jobs::cancel_queued(&mut tx, &ws.id.0).await?;
    }
    jobs::enqueue(&mut tx, &ws.id.0, &ws.host_id.0, &ws.job(action)).await?;
    tx.commit().await?;
    state.wake.notify_one();
    Ok(true)
}

/// No job of the workspace `$1` is queued or running.
const SETTLED: &str = "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.workspace_id = $1 AND j.state IN ('queued', 'running'))";

/// A settled workspace whose host's report disagrees (`running`, by runtime id: the host
/// rebooted, a process died) gets the job that brings it back to what its owner asked for.
/// Only workspaces that settled before the report was made (`made_at`, ms) are compared: a
/// report is a moment's view. Returns how many workspaces got a job.
pub(crate) async fn reconcile(
    db: &Db,
    host_id: &str,
    running: &std::collections::HashMap<String, bool>,
    made_at: i64,
) -> Result<usize, ServerError> {
    let made_at = made_at.to_string();
    let settled = select(
        db,
        "WHERE w.host_id = $1 AND w.state IN ('running', 'stopped', 'lost') AND w.desired IN ('running', 'stopped')
           AND w.updated_at <= CAST($2 AS BIGINT)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.workspace_id = w.id AND j.state IN ('queued', 'running'))",
        &[host_id, &made_at],
    )
    .await
    .map_err(|e| ServerError::Other(e.message))?;
    let mut queued = 0;
    for ws in settled {
        let listed = running.get(&ws.id.runtime_id()).copied();
        // A lost workspace is found again only if its host (back) still has it.
        if ws.state == WorkspaceState::Lost && listed.is_none() {
            continue;
        }
        let running = listed.unwrap_or(false);
        let next = ws
            .state
            .next(ws.desired, Event::Observed { running })
            .map_err(|e| ServerError::Other(e.to_string()))?;
        // Each write only if nobody asked for something else while the runtime was asked.
        match next {
            Next::Stay | Next::Relocate | Next::Forget => {}
            Next::Record(now) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE workspaces SET state = $2, updated_at = $3 WHERE id = $1 AND state = $4 AND {SETTLED}"
                )))
                .bind(&ws.id.0)
                .bind(now.as_str())
                .bind(now_ms())
                .bind(ws.state.as_str())
                .execute(&db.pool)
                .await?;
            }
            Next::Queue {
                state: between,
                action,
                ..
            } => {
                tracing::info!(workspace.id = %ws.id, stored = %ws.state, running, "reconciling a workspace with its runtime");
                let mut tx = db.begin_write().await?;
                let updated = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE workspaces SET state = $2, updated_at = $3 WHERE id = $1 AND state = $4 AND {SETTLED}"
                )))
                .bind(&ws.id.0)
                .bind(between.as_str())
                .bind(now_ms())
                .bind(ws.state.as_str())
                .execute(&mut *tx)
                .await?;
                if updated.rows_affected() == 0 {
                    continue;
                }
                jobs::enqueue(&mut tx, &ws.id.0, host_id, &ws.job(action)).await?;
                tx.commit().await?;
                queued += 1;
            }
        }
    }
    Ok(queued)
}

/// What placement reads of a host: its image chunk shares and disk ceiling (from its reports),
/// when it last reported, and how many workspaces it holds.
#[derive(sqlx::FromRow)]
struct PlacementRow {
    id: String,
    images: Option<String>,
    last_seen_at: Option<i64>,
    disk_ceiling: Option<i64>,
    workspaces: i64,
}

/// The host a new workspace goes to: a live host (this process's own is always live) that
/// gives a workspace the `disk` it asks for, holding the largest share of the image's chunks,
/// then the least loaded. A disk request no live host gives is refused at once (a host's
/// ceiling is its `--workspace-disk`, from its reports).
pub(crate) async fn place(
    state: &AppState,
    image: &str,
    disk: Option<u64>,
) -> ApiResult<(String, String)> {
    place_except(state, &[image], disk, None).await
}

/// [`place`], never on `except` (the host a workspace leaves) nor on a draining host. The
/// share a host holds is its largest of `images` (a saved layer and the image it lies over:
/// most of a layer's chunks are its image's).
pub(crate) async fn place_except(
    state: &AppState,
    images_of: &[&str],
    disk: Option<u64>,
    except: Option<&str>,
) -> ApiResult<(String, String)> {
    let alive_since = state.live_since();
    let rows: Vec<PlacementRow> = sqlx::query_as(
        "SELECT h.id, h.images, h.last_seen_at, h.disk_ceiling, (SELECT COUNT(*) FROM workspaces w WHERE w.host_id = h.id) AS workspaces
         FROM hosts h WHERE h.draining = 0 AND h.id <> $1",
    )
    .bind(except.unwrap_or(""))
    .fetch_all(&state.db.pool)
    .await?;
    let mut candidates = Vec::new();
    let mut most_given: Option<u64> = None;
    for PlacementRow {
        id,
        images,
        last_seen_at,
        disk_ceiling,
        workspaces,
    } in rows
    {
        if id != state.host_id && last_seen_at.is_none_or(|t| t < alive_since) {
            continue;
        }
        let ceiling = disk_ceiling.map(|c| c as u64);
        if let (Some(wanted), Some(ceiling)) = (disk, ceiling)
            && wanted > ceiling
        {
            most_given = most_given.max(Some(ceiling));
            continue;
        }
        let cached = images.as_deref().map_or(0.0, |j| {
            images_of
                .iter()
                .map(|image| cached_share(j, image))
                .fold(0.0, f64::max)
        });
        candidates.push((id, cached, workspaces));
    }
    if let (true, Some(wanted), Some(most)) = (candidates.is_empty(), disk, most_given) {
        return Err(ApiError::bad_request(format!(
            "a disk of {} MiB is more than any host gives a workspace (at most {} MiB)",
            wanted >> 20,
            most >> 20
        )));
    }
    if let Some(chosen) = best_host(&candidates) {
        return Ok(chosen);
    }
    // The server's own host, unless it is the one to avoid.
    let own_draining: i64 = sqlx::query_scalar("SELECT draining FROM hosts WHERE id = $1")
        .bind(&state.host_id)
        .fetch_optional(&state.db.pool)
        .await?
        .unwrap_or(0);
    if except == Some(state.host_id.as_str()) || own_draining != 0 {
        return Err(ApiError::conflict(
            "no other live host can take it (hosts heard from lately, not draining)",
        ));
    }
    Ok((
        state.host_id.clone(),
        "no host reported lately: the server's own".to_owned(),
    ))
}

/// Where a workspace's layer is saved, in a repository no user may name (see
/// `warren_protocol::refuse_reserved`): beside its image when that is a prebuild in the
/// server's registry (their chunks are shared, nothing of the image is copied), else in the
/// registry's `warren-layers` (the image copied there once); tagged with the workspace and the
/// time.
pub(crate) fn layer_destination(registry: &str, ws: &Workspace, now: i64) -> String {
    let base = ws.base_image.as_deref().unwrap_or(&ws.image);
    let tag = format!("layer-{}-{now}", ws.id.0);
    let in_registry = base
        .strip_prefix(&format!("{registry}/"))
        .map(|rest| rest.split(['@', ':']).next().unwrap_or(rest));
    match in_registry {
        Some(repository) if repository == "warren-prebuild" || repository == "warren-layers" => {
            format!("{registry}/{repository}:{tag}")
        }
        _ => format!("{registry}/warren-layers:{tag}"),
    }
}

/// Makes the workspace anew on host `to` over `base` (its saved layer, or its image when it
/// has none), to be `desired`, in the caller's transaction: its queued jobs go, the new host
/// gets a create (and a stop when it is to stay stopped), the host it leaves a cleanup of
/// whatever is left there (which never holds back the workspace's own jobs). `false` when the
/// workspace was no longer in `ws.state`.
pub(crate) async fn relocate_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    ws: &Workspace,
    to: &str,
    base: Option<&str>,
    desired: Desired,
    why: &str,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE workspaces SET host_id = $2, base_image = $3, state = $4, desired = $5, placement = $6,
         moving_to = NULL, last_error = NULL, stop_reason = NULL, updated_at = $7 WHERE id = $1 AND state = $8",
    )
    .bind(&ws.id.0)
    .bind(to)
    .bind(base)
    .bind(WorkspaceState::Starting.as_str())
    .bind(desired.as_str())
    .bind(why)
    .bind(now_ms())
    .bind(ws.state.as_str())
    .execute(&mut **tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(false);
    }
    jobs::cancel_queued(tx, &ws.id.0).await?;
    jobs::cancel_cleanup(tx, to, &ws.id.runtime_id()).await?;
    let mut spec = ws.spec();
    spec.image = base.unwrap_or(&ws.image).to_owned();
    jobs::enqueue(
        tx,
        &ws.id.0,
        to,
        &WorkspaceJob {
            action: Action::Create,
            workspace: spec.clone(),
        },
    )
    .await?;
    if desired == Desired::Stopped {
        jobs::enqueue(
            tx,
            &ws.id.0,
            to,
            &WorkspaceJob {
                action: Action::Stop {
                    grace_ms: crate::api::STOP_GRACE_S * 1000,
                },
                workspace: spec,
            },
        )
        .await?;
    }
    jobs::enqueue_cleanup(tx, &ws.host_id.0, &ws.spec()).await?;
    Ok(true)
}

/// A lost workspace started again: on the best other host, from its last saved layer.
async fn relocate(state: &AppState, ws: &Workspace) -> ApiResult<bool> {
    let base = ws.saved_layer.as_deref().or(ws.base_image.as_deref());
    let image = base.unwrap_or(&ws.image);
    let (to, placed) =
        place_except(state, &[image, &ws.image], ws.disk, Some(&ws.host_id.0)).await?;
    let why = match (&ws.saved_layer, ws.saved_at) {
        (Some(_), Some(at)) => format!(
            "its host {} was lost: started here from its layer saved {} ago ({placed})",
            ws.host,
            crate::idle::spoken(((now_ms() - at) / 1000).max(1) as u64)
        ),
        _ => format!(
            "its host {} was lost and it had no saved layer: started here from its image, without its files ({placed})",
            ws.host
        ),
    };
    let mut tx = state.db.begin_write().await?;
    if !relocate_in(&mut tx, ws, &to, base, Desired::Running, &why).await? {
        return Ok(false);
    }
    tx.commit().await?;
    state.wake.notify_one();
    Ok(true)
}

/// A workspace whose host is gone, deleted: its row goes now; the host, should it come back,
/// removes what it has of it.
async fn forget(state: &AppState, ws: &Workspace) -> ApiResult<bool> {
    let mut tx = state.db.begin_write().await?;
    let gone = sqlx::query("DELETE FROM workspaces WHERE id = $1 AND state = $2")
        .bind(&ws.id.0)
        .bind(ws.state.as_str())
        .execute(&mut *tx)
        .await?;
    if gone.rows_affected() == 0 {
        return Ok(false);
    }
    jobs::cancel_queued(&mut tx, &ws.id.0).await?;
    jobs::enqueue_cleanup(&mut tx, &ws.host_id.0, &ws.spec()).await?;
    tx.commit().await?;
    Ok(true)
}

/// How long a workspace's image may take to resolve at create.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Refuses at once (422, naming the image or its registry) an image no host can start a
/// workspace from: one that another live host holds is fine; else this process's host is asked
/// (its local store, or the image's registry).
pub(crate) async fn resolve_image(state: &AppState, image: &str) -> ApiResult<()> {
    let alive_since = state.live_since();
    let reports: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, images FROM hosts WHERE id <> $1 AND last_seen_at >= $2")
            .bind(&state.host_id)
            .bind(alive_since)
            .fetch_all(&state.db.pool)
            .await?;
    if reports.iter().any(|(_, images)| {
        images
            .as_deref()
            .is_some_and(|j| cached_share(j, image) >= 1.0)
    }) {
        return Ok(());
    }
    let Some(check) = state.image_check.clone() else {
        return Ok(());
    };
    // A few at once: each holds a blocking thread until its registry answers or gives up.
    static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
    let _turn = CHECKS
        .acquire()
        .await
        .map_err(|e| ApiError::internal("resolving an image", e))?;
    let reference = image.to_owned();
    let asked = tokio::task::spawn_blocking(move || check(&reference));
    match tokio::time::timeout(RESOLVE_TIMEOUT, asked).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(why))) if why.is_the_requests() => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            why.to_string(),
        )),
        Ok(Ok(Err(why))) => Err(ApiError::internal("resolving an image", why)),
        Ok(Err(e)) => Err(ApiError::internal("resolving an image", e)),
        Err(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "image {image}: its registry did not answer within {} s",
                RESOLVE_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// How much of `image` a host's reported image list says it holds (lists from before shares
/// were reported name whole images).
fn cached_share(images_json: &str, image: &str) -> f64 {
    if let Ok(list) = serde_json::from_str::<Vec<warren_protocol::HostImage>>(images_json) {
        return list
            .iter()
            .filter(|h| h.image == image)
            .map(|h| h.cached.clamp(0.0, 1.0))
            .fold(0.0, f64::max);
    }
    let whole = serde_json::from_str::<Vec<String>>(images_json)
        .is_ok_and(|list| list.iter().any(|i| i == image));
    if whole { 1.0 } else { 0.0 }
}

/// The most of the image first, then the fewest workspaces; shares within 5% count as equal, so
/// a nearly full host does not take every workspace from an idle one that holds as much.
fn best_host(candidates: &[(String, f64, i64)]) -> Option<(String, String)> {
    let top = candidates.iter().map(|c| c.1).fold(0.0, f64::max);
    let near_top = candidates.iter().filter(|c| c.1 >= top - 0.05).count();
    let (id, cached, workspaces) = candidates
        .iter()
        .filter(|c| c.1 >= top - 0.05)
        .min_by_key(|c| c.2)?;
    let hosts = match candidates.len() {
        1 => "the only host that could take it".to_owned(),
        n => format!("of {n} hosts that could take it"),
    };
    let share = (cached * 100.0).floor();
    let workspaces = match workspaces {
        1 => "1 workspace".to_owned(),
        n => format!("{n} workspaces"),
    };
    let why = match (candidates.len(), near_top) {
        (1, _) if top > 0.0 => format!("{hosts}; it holds {share}% of the image"),
        (1, _) => hosts,
        (_, 1) => format!("{hosts}, the one holding most of the image ({share}%)"),
        _ if top > 0.0 => format!(
            "{hosts}, {near_top} hold about as much of the image ({share}%): the least busy ({workspaces})"
        ),
        _ => format!("{hosts}, none holds any of the image: the least busy ({workspaces})"),
    };
    Some((id.clone(), why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_host_holding_most_of_the_image_then_the_least_loaded() {
        let list = r#"[{"image":"dev:1","cached":0.8},{"image":"web:2","cached":1.0}]"#;
        assert_eq!(cached_share(list, "dev:1"), 0.8);
        assert_eq!(cached_share(list, "other:1"), 0.0);
        assert_eq!(cached_share(r#"["dev:1"]"#, "dev:1"), 1.0);
        assert_eq!(cached_share("not json", "dev:1"), 0.0);
        let placed = |c: &[(&str, f64, i64)]| {
            best_host(
                &c.iter()
                    .map(|(h, s, n)| (h.to_string(), *s, *n))
                    .collect::<Vec<_>>(),
            )
        };
        let hosts = |c: &[(&str, f64, i64)]| placed(c).map(|(h, _)| h);
        let why = |c: &[(&str, f64, i64)]| placed(c).map(|(_, w)| w).unwrap();
        assert_eq!(
            why(&[("a", 0.2, 0), ("b", 0.9, 5)]),
            "of 2 hosts that could take it, the one holding most of the image (90%)"
        );
        assert_eq!(
            why(&[("a", 0.9, 3), ("b", 0.92, 5)]),
            "of 2 hosts that could take it, 2 hold about as much of the image (90%): the least busy (3 workspaces)"
        );
        assert_eq!(
            why(&[("a", 0.0, 3), ("b", 0.0, 1)]),
            "of 2 hosts that could take it, none holds any of the image: the least busy (1 workspace)"
        );
        assert_eq!(
            why(&[("a", 1.0, 3)]),
            "the only host that could take it; it holds 100% of the image"
        );
        assert_eq!(hosts(&[("a", 0.2, 0), ("b", 0.9, 5)]).as_deref(), Some("b"));
        assert_eq!(
            hosts(&[("a", 0.9, 3), ("b", 0.92, 5)]).as_deref(),
            Some("a")
        );
        assert_eq!(hosts(&[("a", 0.0, 3), ("b", 0.0, 1)]).as_deref(), Some("b"));
        assert_eq!(hosts(&[]), None);
    }
}
