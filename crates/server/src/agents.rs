//! What a host's agent does with the control plane, the same in process (`warren up`) and over
//! HTTP (`warren agent`): each claim notes the host alive, and when it brings the host's report,
//! its workspaces are compared with what their owners asked for (a workspace that stopped on
//! its own gets the job that brings it back) before the host gets its next job.

use warren_protocol::{ControlPlane, Failure, HostReport, Job, Outcome, PlaneError};

use crate::state::AppState;
use crate::workspaces;

/// Claims `host`'s next job, reconciling its workspaces from `report` first.
pub async fn claim(
    state: &AppState,
    host: &str,
    report: Option<HostReport>,
    prebuilds: bool,
) -> Result<Option<Job>, PlaneError> {
    let running = report.as_ref().map(|r| {
        let running = r
            .workspaces
            .iter()
            .map(|w| (w.runtime_id.clone(), w.running))
            .collect();
        let made_at =
            crate::db::now_ms().saturating_sub(i64::try_from(r.age_ms).unwrap_or(i64::MAX));
        (running, made_at)
    });
    if let Some((running, made_at)) = running {
        match workspaces::reconcile(&state.db, host, &running, made_at).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(host, workspaces = n, "reconciled from the host's report"),
            Err(e) => tracing::warn!(error = %e, "cannot reconcile a host's report"),
        }
    }
    state.plane.claim(host, report, prebuilds).await
}

/// The control plane for the agent in this process.
#[derive(Debug, Clone)]
pub struct InProcess {
    pub state: AppState,
}

impl ControlPlane for InProcess {
    async fn claim(
        &self,
        host: &str,
        report: Option<HostReport>,
        prebuilds: bool,
    ) -> Result<Option<Job>, PlaneError> {
        claim(&self.state, host, report, prebuilds).await
    }

    async fn log(&self, job: &Job, text: Vec<u8>) -> Result<bool, PlaneError> {
        self.state.plane.log(job, text).await
    }

    async fn finish(&self, job: &Job, result: Result<Outcome, Failure>) -> Result<(), PlaneError> {
        self.state.plane.finish(job, result).await
    }
}
