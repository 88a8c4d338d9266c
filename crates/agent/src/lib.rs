//! The host agent: claims the control plane's jobs for its host and carries them out — workspace
//! steps with the host's [`Runtime`], prebuilds with its [`Prebuilder`] (their log sent as they
//! run, a cancel heard in the answer). Every step is idempotent — a job cut short by a crash is
//! simply run again — and reports an outcome the control plane turns into the workspace's or
//! prebuild's state.
//!
//! The agent does not know how the control plane stores jobs: it talks to it through the
//! [`ControlPlane`] trait (in process on a single host; over HTTP for remote hosts), whose
//! types are `warren-protocol`'s. The control plane reaches the host's workspaces through the
//! host's API ([`host_api`]), in process or through the [`tunnel`] a remote agent keeps open.

pub mod host_api;
mod relay;
pub mod server_link;
pub mod servers;
pub mod tunnel;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
pub use warren_protocol::{
    Action, ControlPlane, Failure, HostImage, HostReport, ImageCheck, ImageUnavailable, Job,
    Outcome, PlaneError, PrebuildJob, Work, WorkspaceJob, WorkspaceReport, WorkspaceSpec,
};
use warren_runtime::{
    Error as RuntimeError, Limits, RootSource, Runtime, WorkspaceConfig, WorkspaceId,
};

/// Makes prebuilds on this host (the builder crate with the host's runtime and image store).
pub trait Prebuilder: Send + Sync {
    /// Makes the prebuild, its log going to `log`; stops soon after `cancel` turns true.
    fn prebuild(
        &self,
        job: &PrebuildJob,
        log: &mut dyn std::io::Write,
        cancel: &AtomicBool,
    ) -> Result<Outcome, Failure>;
    /// Removes these images from the host's store (their chunks go at the next collection).
    fn remove_images(&self, images: &[String]) -> Result<(), String>;
}

/// Carries out one workspace job, blocking (call it on a blocking thread). Safe to repeat.
/// Before a workspace is made or started, `check` says whether its image can be had: if not,
/// the job fails saying why (a create for good, at once).
pub fn execute(
    runtime: &dyn Runtime,
    check: Option<&ImageCheck>,
    saver: Option<&LayerSaver>,
    work: &WorkspaceJob,
) -> Result<Outcome, Failure> {
    let spec = &work.workspace;
    let id = WorkspaceId::new(&spec.runtime_id).map_err(|e| Failure::permanent(e.to_string()))?;
    let create = || {
        let config = WorkspaceConfig {
            id: id.clone(),
            root: RootSource::Image {
                reference: spec.image.clone(),
                record_trace_secs: None,
                lazy_only: false,
            },
            hostname: None,
            limits: Limits {
                cpus: spec.cpus,
                memory: spec.memory,
                pids: spec.pids,
                disk: spec.disk,
            },
            env: Vec::new(),
            vm: spec.vm.clone(),
            owner: None,
            tenant: spec.tenant.clone(),
        };
        match runtime.create(&config) {
            Ok(_) | Err(RuntimeError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(Failure::transient(e.to_string())),
        }
    };
    match &work.action {
        Action::Create | Action::Start => {
            // A new workspace whose image cannot be had fails at once; a start tries again
            // later (a registry may be back), its message on the workspace meanwhile.
            if let Some(check) = check {
                check(&spec.image).map_err(|why| match work.action {
                    Action::Create if why.is_the_requests() => Failure::permanent(why.to_string()),
                    _ => Failure::transient(why.to_string()),
                })?;
            }
            create()?;
            runtime
                .start(&id)
                .map_err(|e| Failure::transient(e.to_string()))?;
            runtime
                .start_tasks(&id, &spec.tasks)
                .map_err(|e| Failure::transient(format!("workspace tasks: {e}")))?;
            Ok(Outcome::Running)
        }
        Action::Stop { grace_ms } => match runtime.stop(&id, Duration::from_millis(*grace_ms)) {
            Ok(()) | Err(RuntimeError::NotFound(_)) => Ok(Outcome::Stopped),
            Err(e) => Err(Failure::transient(e.to_string())),
        },
        Action::Save { destination } => {
            let saver = saver.ok_or_else(|| Failure::permanent("this host saves no layers"))?;
            let running = match runtime.info(&id) {
                Ok(info) => info.state == warren_runtime::WorkspaceState::Running,
                Err(e) => return Err(Failure::permanent(e.to_string())),
            };
            let layer = match runtime.writable_layer(&id) {
                Ok(Some(layer)) => layer,
                Ok(None) => {
                    return Err(Failure::permanent(
                        "this workspace keeps no writable layer the host can read (a VM's disk, a folder)",
                    ));
                }
                Err(e) => return Err(Failure::permanent(e.to_string())),
            };
            // A running workspace is frozen while its layer is read: one consistent copy.
            let hold = running.then_some((runtime, &id));
            saver(&layer, destination, hold).map_err(Failure::transient)?;
            Ok(Outcome::Saved {
                image: destination.clone(),
            })
        }
        Action::Delete => match runtime.delete(&id) {
            Ok(report) => Ok(Outcome::Deleted {
                leftovers: report.leftovers,
            }),
            Err(RuntimeError::NotFound(_)) => Ok(Outcome::Deleted {
                leftovers: Vec::new(),
            }),
            Err(e) => Err(Failure::transient(e.to_string())),
        },
    }
}

/// Thaws every workspace left frozen by a save this agent did not finish (the runtime knows
/// which by their marker).
fn thaw_all(runtime: &dyn Runtime) {
    let Ok(listed) = runtime.list() else {
        return;
    };
    for info in &listed {
        if let Err(e) = runtime.freeze(&info.config.id, false) {
            tracing::debug!(workspace = %info.config.id, error = %e, "cannot thaw");
        }
    }
}

/// How often a running workspace job renews its lease (5 minutes on the server).
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Saves a workspace's writable layer over its image as the image named second (a registry
/// reference), sending only what the registry lacks. With a workspace (third), it runs: it is
/// held frozen ([`warren_runtime::Frozen`]) while its layer is read.
pub type LayerSaver = Arc<
    dyn Fn(
            &warren_runtime::WritableLayer,
            &str,
            Option<(&dyn Runtime, &WorkspaceId)>,
        ) -> Result<(), String>
        + Send
        + Sync,
>;

/// Lists the images this host holds, wholly or in part, given the workspaces its runtime knows.
pub type ImageLister =
    Arc<dyn Fn(&[warren_runtime::WorkspaceInfo]) -> Vec<HostImage> + Send + Sync>;

/// How often a workspace's disk use is measured again (it walks the writable layer; cpu,
/// memory and pids are read on every report).
const DISK_EVERY: Duration = Duration::from_secs(300);

/// The last disk use measured for each workspace, and when.
#[derive(Debug, Default)]
pub struct DiskUse(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>);

/// The host's report: its images and its workspaces' actual states and resource use.
/// Sandboxes whose build or prebuild is gone (another process's too: a `warren build` killed
/// on this host) are removed first and left out of it.
pub fn host_report(runtime: &dyn Runtime, images: &ImageLister, disk: &DiskUse) -> HostReport {
    let mut listed = runtime.list().unwrap_or_default();
    let reaped = reap(warren_runtime::reap_orphans_among(runtime, &listed));
    listed.retain(|i| !reaped.iter().any(|r| r == i.config.id.as_str()));
    let images = images(&listed);
    let mut measured = disk.0.lock().unwrap_or_else(|e| e.into_inner());
    measured.retain(|id, _| listed.iter().any(|i| i.config.id.as_str() == id));
    let workspaces = listed
        .into_iter()
        .map(|info| {
            let id = &info.config.id;
            let running = info.state == warren_runtime::WorkspaceState::Running;
            let stats = running
                .then(|| runtime.live_stats(id).ok())
                .flatten()
                .map(|mut s| {
                    let known = measured
                        .get(id.as_str())
                        .filter(|(at, _)| at.elapsed() < DISK_EVERY)
                        .map(|(_, bytes)| *bytes);
                    s.disk_bytes = known.unwrap_or_else(|| {
                        let bytes = runtime.stats(id).map(|full| full.disk_bytes).unwrap_or(0);
                        measured.insert(id.to_string(), (std::time::Instant::now(), bytes));
                        bytes
                    });
                    s
                });
            WorkspaceReport {
                runtime_id: id.to_string(),
                running,
                stats,
            }
        })
        .collect();
    HostReport {
        images,
        workspaces,
        makes_prebuilds: true,
        disk_ceiling: runtime.disk_ceiling(),
        age_ms: 0,
        load: host_load(),
    }
}

/// The host's load average, CPUs and memory, from `/proc`.
fn host_load() -> Option<warren_protocol::HostLoad> {
    use procfs::Current as _;
    let load = procfs::LoadAverage::current().ok()?;
    let memory = procfs::Meminfo::current().ok()?;
    Some(warren_protocol::HostLoad {
        load1: (f64::from(load.one) * 100.0).round() / 100.0,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_total: memory.mem_total,
        memory_available: memory.mem_available.unwrap_or(memory.mem_free),
    })
}

pub struct Agent<C> {
    host: String,
    runtime: Arc<dyn Runtime>,
    /// `None`: this host makes no prebuilds (they go to other hosts).
    prebuilder: Option<Arc<dyn Prebuilder>>,
    plane: Arc<C>,
    images: ImageLister,
    /// Whether a workspace's image can be had, before it is made or started.
    check: Option<ImageCheck>,
    saver: Option<LayerSaver>,
    /// Notified by the control plane when it queues a job, so the agent need not poll hard.
    wake: Arc<Notify>,
    /// Jobs carried out at once (jobs of one workspace are never claimed together).
    parallel: usize,
    /// Prebuilds made at once. They have slots of their own: long prebuilds never hold up
    /// workspace jobs, and a host never runs more than this many.
    prebuild_slots: usize,
    /// How often the host's report goes with a claim (it reconciles the host's workspaces).
    report_every: Duration,
}

impl<C> std::fmt::Debug for Agent<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// How often the host's report goes along with a claim.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

impl<C: ControlPlane> Agent<C> {
    pub fn new(
        host: String,
        runtime: Arc<dyn Runtime>,
        prebuilder: Option<Arc<dyn Prebuilder>>,
        plane: Arc<C>,
        wake: Arc<Notify>,
        images: ImageLister,
    ) -> Self {
        Self {
            host,
            runtime,
            prebuilder,
            plane,
            images,
            check: None,
            saver: None,
            wake,
            parallel: 4,
            prebuild_slots: 1,
            report_every: REPORT_EVERY,
        }
    }

    /// How often the host's report goes with a claim (default [`REPORT_EVERY`]).
    pub fn with_report_every(mut self, every: Duration) -> Self {
        self.report_every = every;
        self
    }

    /// Checks each workspace's image before it is made or started (see [`ImageCheck`]).
    pub fn with_image_check(mut self, check: ImageCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// Saves workspaces' layers to the registry (see [`LayerSaver`]).
    pub fn with_layer_saver(mut self, saver: LayerSaver) -> Self {
        self.saver = Some(saver);
        self
    }

    /// How many prebuilds this host makes at once (at least one).
    pub fn with_prebuild_slots(mut self, slots: usize) -> Self {
        self.prebuild_slots = slots.max(1);
        self
    }

    pub async fn run(self, shutdown: Arc<Notify>) {
        // Sandboxes of builds and prebuilds whose process died (this agent's before a crash)
        // go before any job runs: a prebuild redone makes its sandboxes anew.
        // A workspace frozen while its layer was read when this agent died is thawed.
        let runtime = self.runtime.clone();
        let _ = tokio::task::spawn_blocking(move || {
            reap(warren_runtime::reap_orphans(runtime.as_ref()));
            thaw_all(runtime.as_ref());
        })
        .await;
        let slots = Arc::new(Semaphore::new(self.parallel));
        let prebuild_slots = Arc::new(Semaphore::new(self.prebuild_slots));
        let mut reported: Option<std::time::Instant> = None;
        let disk = Arc::new(DiskUse::default());
        // The report is made beside the claims, never in their way: a workspace that answers
        // slowly delays only the report, not other workspaces' jobs.
        let mut making: Option<(std::time::Instant, tokio::task::JoinHandle<HostReport>)> = None;
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut wait = Duration::ZERO;
            if making.is_none() && reported.is_none_or(|t| t.elapsed() >= self.report_every) {
                let begun = std::time::Instant::now();
                reported = Some(begun);
                let (runtime, lister, disk) =
                    (self.runtime.clone(), self.images.clone(), disk.clone());
                let makes_prebuilds = self.prebuilder.is_some();
                making = Some((
                    begun,
                    tokio::task::spawn_blocking(move || HostReport {
                        makes_prebuilds,
                        ..host_report(runtime.as_ref(), &lister, &disk)
                    }),
                ));
                // A healthy host's report is ready at once and goes with this claim; a slow
                // one goes with a later claim.
                wait = Duration::from_millis(500);
            }
            let report = match making.as_mut() {
                Some((begun, handle)) => match tokio::time::timeout(wait, handle).await {
                    Ok(done) => {
                        let age_ms = u64::try_from(begun.elapsed().as_millis()).unwrap_or(u64::MAX);
                        making = None;
                        done.ok().map(|report| HostReport { age_ms, ..report })
                    }
                    Err(_) => None,
                },
                None => None,
            };
            let may_prebuild = self.prebuilder.is_some() && prebuild_slots.available_permits() > 0;
            let claimed = self.plane.claim(&self.host, report, may_prebuild).await;
            match claimed {
                Ok(Some(job)) => {
                    // A prebuild moves to a prebuild slot (free: only this loop takes them),
                    // leaving its general slot to workspace jobs.
                    let mut permit = Some(permit);
                    let prebuild_permit = match job.work {
                        Work::Prebuild(_) => prebuild_slots.clone().try_acquire_owned().ok(),
                        _ => None,
                    };
                    if prebuild_permit.is_some() {
                        permit = None;
                    }
                    let runtime = self.runtime.clone();
                    let check = self.check.clone();
                    let saver = self.saver.clone();
                    let prebuilder = self.prebuilder.clone();
                    let plane = self.plane.clone();
                    let wake = self.wake.clone();
                    tokio::spawn(async move {
                        let result = match job.work.clone() {
                            Work::Workspace(work) => {
                                // A long step (a layer saved, an image pulled) keeps its lease,
                                // so no later step of the workspace starts meanwhile, and keeps
                                // the host seen while every slot is busy.
                                let keepalive = {
                                    let (plane, job) = (plane.clone(), job.clone());
                                    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                                        async move {
                                            loop {
                                                tokio::time::sleep(KEEPALIVE).await;
                                                let _ = plane.log(&job, Vec::new()).await;
                                            }
                                        },
                                    ))
                                };
                                let done = tokio::task::spawn_blocking(move || {
                                    execute(runtime.as_ref(), check.as_ref(), saver.as_ref(), &work)
                                })
                                .await
                                .unwrap_or_else(|e| Err(format!("the job panicked: {e}").into()));
                                drop(keepalive);
                                done
                            }
                            Work::Prebuild(work) => match prebuilder {
                                Some(p) => prebuild(p, plane.as_ref(), &job, work).await,
                                None => Err(Failure::permanent("this host makes no prebuilds")),
                            },
                            Work::Archive { images } => match prebuilder {
                                Some(p) => tokio::task::spawn_blocking(move || {
                                    p.remove_images(&images).map(|()| Outcome::Removed)
                                })
                                .await
                                .unwrap_or_else(|e| Err(format!("the job panicked: {e}")))
                                .map_err(Failure::from),
                                None => Err(Failure::permanent("this host makes no prebuilds")),
                            },
                        };
                        if let Err(e) = &result {
                            tracing::warn!(job.id = %job.id, attempt = job.attempt, error = %e, "job failed");
                        }
                        // The step is done: recording it must not be lost to a passing
                        // database error (the job would wait for its lease to run out).
                        let mut delay = Duration::from_millis(100);
                        for attempt in 1..=10 {
                            match plane.finish(&job, result.clone()).await {
                                Ok(()) => break,
                                Err(e) => {
                                    tracing::warn!(job.id = %job.id, attempt, error = %e, "cannot record a job's result; retrying");
                                    tokio::time::sleep(delay).await;
                                    delay = (delay * 2).min(Duration::from_secs(5));
                                }
                            }
                        }
                        drop((permit, prebuild_permit));
                        // A finished job may unblock the next one of the same workspace.
                        wake.notify_one();
                    });
                    continue;
                }
                Ok(None) => drop(permit),
                Err(e) => {
                    drop(permit);
                    tracing::error!(error = %e, "cannot claim jobs");
                }
            }
            tokio::select! {
                _ = shutdown.notified() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// Says which orphaned sandboxes were removed.
fn reap(removed: Vec<String>) -> Vec<String> {
    for name in &removed {
        tracing::info!(sandbox = %name, "removed a sandbox whose build or prebuild is gone");
    }
    removed
}

/// Sends a blocking job's log to the channel the agent forwards from.
struct LogSender(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

impl std::io::Write for LogSender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The forwarder outlives the job; a send can only fail once it gave up.
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How often a running prebuild's log goes to the control plane (and a cancel comes back).
const LOG_EVERY: Duration = Duration::from_millis(500);

/// Runs a prebuild on a blocking thread while its log goes to the control plane, which also
/// says when it is cancelled.
async fn prebuild<C: ControlPlane>(
    prebuilder: Arc<dyn Prebuilder>,
    plane: &C,
    job: &Job,
    work: PrebuildJob,
) -> Result<Outcome, Failure> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let mut run = tokio::task::spawn_blocking(move || {
        let mut log = LogSender(tx);
        prebuilder.prebuild(&work, &mut log, &flag)
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut tick = tokio::time::interval(LOG_EVERY);
    let result = loop {
        tokio::select! {
            done = &mut run => {
                break done.unwrap_or_else(|e| Err(Failure::transient(format!("the prebuild panicked: {e}"))));
            }
            Some(bytes) = rx.recv() => pending.extend_from_slice(&bytes),
            _ = tick.tick() => {
                if !pending.is_empty() || !cancel.load(Ordering::Relaxed) {
                    match plane.log(job, std::mem::take(&mut pending)).await {
                        Ok(true) => {}
                        Ok(false) => cancel.store(true, Ordering::Relaxed),
                        Err(e) => tracing::warn!(job.id = %job.id, error = %e, "cannot send a prebuild's log"),
                    }
                }
            }
        }
    };
    while let Ok(bytes) = rx.try_recv() {
        pending.extend_from_slice(&bytes);
    }
    if let Err(e) = &result {
        pending.extend_from_slice(format!("prebuild failed: {e}\n").as_bytes());
    }
    if !pending.is_empty()
        && let Err(e) = plane.log(job, pending).await
    {
        tracing::warn!(job.id = %job.id, error = %e, "cannot send a prebuild's log");
    }
    result
}
