//! The jobs the control plane hands a host's agent, what the agent reports back, and the
//! [`ControlPlane`] the agent talks to (in process on a single host; over HTTP for others).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{CANCELLED, TaskSpec, printable};

/// What a workspace is made from, as the control plane recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceSpec {
    /// The runtime's name for it (`ws-<id>`).
    pub runtime_id: String,
    pub image: String,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Bytes it may write (`None`: the host's default, `--workspace-disk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
    /// What runs in persistent terminals on each start (the environment's workspace tasks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskSpec>,
    /// Run it as a virtual machine rather than a system container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::VmOptions>,
    /// Whose it is (its owner's id): a host shares what it may share (an image's mount) only
    /// between workspaces of one tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The step a job asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    Create,
    Start,
    Stop {
        grace_ms: u64,
    },
    Delete,
    /// Store the stopped workspace's writable layer over its image, as an image of its own at
    /// `destination` (`HOST/REPO:TAG` in the server's registry): only the chunks the registry
    /// lacks are sent. Another host can then start the workspace from it.
    Save {
        destination: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceJob {
    pub action: Action,
    pub workspace: WorkspaceSpec,
}

/// A prebuild to make: a project's environment at one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrebuildJob {
    pub prebuild_id: String,
    /// The project the prebuild is for: its prebuilds and build caches are its own.
    #[serde(default)]
    pub project_id: String,
    pub git_url: String,
    pub commit: String,
    /// The project's root folder or environment file, relative to the repository.
    pub target: String,
    /// The project's environment variables (`KEY`, value); never a user's secrets.
    #[serde(default)]
    pub variables: Vec<(String, String)>,
    /// How long the first start is recorded for the prebuild's access trace (0: not at all).
    #[serde(default)]
    pub record_trace_secs: u64,
    /// Where a succeeded prebuild is pushed (`HOST[:PORT]/REPO`, the server's `--registry`):
    /// every host then starts its workspaces lazily from there. `None`: it stays on this host.
    #[serde(default)]
    pub registry: Option<String>,
}

/// What a job is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Work {
    Workspace(WorkspaceJob),
    Prebuild(PrebuildJob),
    /// Removes images of archived prebuilds from the host's store.
    Archive {
        images: Vec<String>,
    },
}

/// A claimed job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub attempt: u32,
    pub work: Work,
}

/// Where the workspace ended up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Stopped,
    /// Gone; anything the runtime could not remove is listed.
    Deleted {
        leftovers: Vec<String>,
    },
    /// A prebuild is made (or was found made before under its key: `reused`).
    Prebuilt {
        image: String,
        digest: String,
        env_file: String,
        env_text: String,
        reused: bool,
        steps_run: usize,
        steps_cached: usize,
        /// Where it was pushed (`HOST/REPO/NAME:TAG`), when the job named a registry: the
        /// image workspaces start from. `image` stays the name in the making host's store.
        #[serde(default)]
        pushed: Option<String>,
    },
    /// Images of archived prebuilds are removed.
    Removed,
    /// The writable layer is saved, as this image.
    Saved {
        image: String,
    },
}

/// Why a job failed, and whether running it again may help: a workspace whose image does not
/// exist fails at once, where a host that was briefly busy gets the job again later. A job
/// that was cancelled (a prebuild whose user cancelled it) did not fail: `cancelled` says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub message: String,
    pub retry: bool,
    pub cancelled: bool,
}

impl Failure {
    /// A failure a later attempt may not have. Its message is kept printable: it may quote a
    /// registry, a build step or a workspace, and is shown on users' terminals.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: printable(&message.into()),
            retry: true,
            cancelled: false,
        }
    }

    /// A failure every attempt would have: the job fails for good at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: printable(&message.into()),
            retry: false,
            cancelled: false,
        }
    }

    /// The job was cancelled: it ends at once, not as a failure.
    pub fn cancelled() -> Self {
        Self {
            message: CANCELLED.into(),
            retry: false,
            cancelled: true,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::transient(message)
    }
}

/// Read from `{"message", "retry"}`, or from a plain message (agents before `retry`).
impl<'de> Deserialize<'de> for Failure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Plain(String),
            Full {
                message: String,
                retry: bool,
                #[serde(default)]
                cancelled: Option<bool>,
            },
        }
        Ok(match Wire::deserialize(d)? {
            Wire::Plain(message) if message == CANCELLED => Self::cancelled(),
            Wire::Plain(message) => Self::transient(message),
            Wire::Full {
                message,
                retry,
                cancelled,
            } => Self {
                // Agents from before the flag said it only in words.
                cancelled: cancelled.unwrap_or(message == CANCELLED),
                message: printable(&message),
                retry,
            },
        })
    }
}

/// Checks, before a workspace is made or started, that its image can be had on this host: in
/// its store, or in a registry that answers. The error names the image or the registry.
pub type ImageCheck = Arc<dyn Fn(&str) -> Result<(), ImageUnavailable> + Send + Sync>;

/// Why a workspace's image cannot be had on a host; each message names the image and where it
/// was looked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageUnavailable {
    /// No such image: not in the host's store, nor in the registry its name points to.
    #[error("{0}")]
    NotFound(String),
    /// Its registry refused the connection or the host's credentials, answered an error, or
    /// could not be reached.
    #[error("{0}")]
    Registry(String),
    /// The host's own image store failed: the host's trouble, not the request's.
    #[error("{0}")]
    Host(String),
}

impl ImageUnavailable {
    /// Whether asking again with the same image cannot help (the image or its registry is
    /// wrong, as far as this host can tell), rather than the host being in trouble.
    pub fn is_the_requests(&self) -> bool {
        !matches!(self, Self::Host(_))
    }
}

/// The agent's view of the control plane.
pub trait ControlPlane: Send + Sync + 'static {
    /// The next job for `host`, leased to it; `None` when there is nothing to do. `report`
    /// comes along every [`REPORT_EVERY`]: the host's images (for placing later workspaces) and
    /// its workspaces' actual states and resource use.
    /// Claims the host's next job; a prebuild only when `prebuilds` (the host has a prebuild
    /// slot free).
    fn claim(
        &self,
        host: &str,
        report: Option<HostReport>,
        prebuilds: bool,
    ) -> impl Future<Output = Result<Option<Job>, PlaneError>> + Send;
    /// Adds to a running job's log; `false` when the job was cancelled and should stop.
    fn log(
        &self,
        job: &Job,
        text: Vec<u8>,
    ) -> impl Future<Output = Result<bool, PlaneError>> + Send;
    /// Records how a job went.
    fn finish(
        &self,
        job: &Job,
        result: Result<Outcome, Failure>,
    ) -> impl Future<Output = Result<(), PlaneError>> + Send;
}

/// Why a call to the control plane did not go through; the agent says so in its log and
/// calls again later.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// It could not be reached, or answered with an error (over HTTP).
    #[error("the control plane: {0}")]
    Unreachable(String),
    /// Its database failed (the control plane in this process).
    #[error("the control plane's database: {0}")]
    Database(String),
    /// Its answer could not be read.
    #[error("the control plane's answer: {0}")]
    Answer(String),
}

/// An image a host can start workspaces from, and how much of it the host holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostImage {
    pub image: String,
    /// The share of its chunks on this host (1 for an image in the host's own store).
    pub cached: f64,
}

/// What an agent tells the control plane about its host, every [`REPORT_EVERY`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub images: Vec<HostImage>,
    /// Every workspace the host's runtime knows.
    pub workspaces: Vec<WorkspaceReport>,
    /// Whether the host takes prebuild jobs.
    #[serde(default = "yes")]
    pub makes_prebuilds: bool,
    /// The most a workspace of the host may write (its `--workspace-disk`; `None`: no limit),
    /// so the server refuses a larger request at once instead of placing it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_ceiling: Option<u64>,
    /// How long before it was sent the report was begun, in milliseconds: the control plane
    /// compares with it only the workspaces that settled before then.
    #[serde(default)]
    pub age_ms: u64,
    /// How busy the host is (absent when its kernel could not say, or from an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<HostLoad>,
}

/// How busy a host is, as its kernel says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// The 1-minute load average.
    pub load1: f64,
    /// The CPUs it may use.
    pub cpus: u32,
    pub memory_total: u64,
    pub memory_available: u64,
}

fn yes() -> bool {
    true
}

/// One workspace as its host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceReport {
    pub runtime_id: String,
    pub running: bool,
    /// Resource use, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<crate::Stats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_from_either_form() {
        let plain: Result<Outcome, Failure> =
            serde_json::from_str(r#"{"Err":"host busy"}"#).unwrap_or(Ok(Outcome::Removed));
        assert_eq!(plain, Err(Failure::transient("host busy")));
        let full = Err::<Outcome, _>(Failure::permanent("image x:1 not found"));
        let text = serde_json::to_string(&full).unwrap_or_default();
        assert_eq!(
            serde_json::from_str::<Result<Outcome, Failure>>(&text).ok(),
            Some(full)
        );
        let cancelled = Err::<Outcome, _>(Failure::cancelled());
        let text = serde_json::to_string(&cancelled).unwrap_or_default();
        assert_eq!(
            serde_json::from_str::<Result<Outcome, Failure>>(&text).ok(),
            Some(cancelled)
        );
        // From agents before the flag: cancelled when their words say so, and only then.
        let older = |text: &str| {
            serde_json::from_str::<Result<Outcome, Failure>>(text)
                .unwrap_or(Ok(Outcome::Removed))
                .map_err(|f| f.cancelled)
        };
        assert_eq!(
            older(r#"{"Err":{"message":"cancelled","retry":false}}"#),
            Err(true)
        );
        assert_eq!(older(r#"{"Err":"cancelled"}"#), Err(true));
        assert_eq!(
            older(r#"{"Err":{"message":"Dockerfile:3: exit 1","retry":true}}"#),
            Err(false)
        );
    }

    #[test]
    fn jobs_read_back_as_written() {
        let job = WorkspaceJob {
            action: Action::Stop { grace_ms: 10_000 },
            workspace: WorkspaceSpec {
                runtime_id: "ws-1".into(),
                image: "dev:1".into(),
                memory: Some(1 << 30),
                cpus: None,
                pids: None,
                disk: Some(20 << 30),
                tasks: vec![TaskSpec {
                    name: "web".into(),
                    argv: vec!["sh".into(), "-c".into(), "npm start".into()],
                    env: vec![],
                    user: None,
                    cwd: None,
                    once: false,
                    stage: 0,
                }],
                vm: Some(crate::VmOptions::default()),
                tenant: Some("u-1".into()),
            },
        };
        let text = serde_json::to_string(&job).unwrap_or_default();
        assert!(text.contains(r#""action":"stop""#), "{text}");
        assert_eq!(serde_json::from_str::<WorkspaceJob>(&text).ok(), Some(job));
    }
}
