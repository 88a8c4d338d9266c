//! The control plane's domain model: ids, a workspace's states, and the one function that says
//! where a workspace goes next — on an owner's request, when its host's job ends, or when the
//! host's runtime disagrees with what was stored. It holds no SQL and no I/O: the
//! [`workspaces`](crate::workspaces) service reads rows into these types and writes back what
//! [`WorkspaceState::next`] decides.

use std::fmt;

use serde::{Deserialize, Serialize};
pub use warren_api::{Desired, UnknownState, WorkspaceState};
use warren_protocol::Action;

/// A workspace's id in the database (its runtime's name is [`WorkspaceId::runtime_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkspaceId(pub String);

impl WorkspaceId {
    /// The runtime's name for the workspace: `ws-<id>`.
    /// What the runtime's name of a workspace starts with.
    pub const RUNTIME_PREFIX: &str = "ws-";

    pub fn runtime_id(&self) -> String {
        format!("{}{}", Self::RUNTIME_PREFIX, self.0)
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host's id (a workspace runs on exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostId(pub String);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What moves a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The owner (or a session, or the idle stop) asks for it to run.
    Start,
    /// The owner asks for it to stop; `force` kills at once and drops whatever was queued.
    Stop { grace_ms: u64, force: bool },
    /// The owner asks for it to go.
    Delete,
    /// Its host finished a job: it runs, or it is stopped. `later_jobs`: more of its jobs are
    /// queued, so the state stays until the last one ends.
    Reached { running: bool, later_jobs: bool },
    /// Its host gave up on a job. `final_attempt`: no retry follows.
    JobFailed {
        final_attempt: bool,
        later_jobs: bool,
    },
    /// The reconciler asked the host's runtime: it runs or not. Only for a settled workspace
    /// (no job queued or running), or a lost one whose host came back.
    Observed { running: bool },
    /// Its host stopped reporting.
    HostLost,
}

/// What a workspace does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing changes.
    Stay,
    /// Only the stored state changes (the host is already there).
    Record(WorkspaceState),
    /// The state and desired state change and the host gets a job (`supersede`: queued jobs
    /// of the workspace are cancelled first).
    Queue {
        state: WorkspaceState,
        desired: Desired,
        action: Action,
        supersede: bool,
    },
    /// Made anew on another host (from its last saved layer), to run.
    Relocate,
    /// The row goes now: its host is gone, and with it whatever a job would remove.
    Forget,
}

/// A request the workspace's state refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it is being deleted")]
    BeingDeleted,
}

/// How long a stop the reconciler asks for waits for processes to end.
pub const RECONCILE_GRACE_MS: u64 = 10_000;

/// The lifecycle: where a workspace goes next.
pub trait Lifecycle {
    /// Where a workspace in this state, with this desired state, goes on `event`: the one
    /// place the lifecycle is written down.
    fn next(self, desired: Desired, event: Event) -> Result<Next, Refusal>;
}

impl Lifecycle for WorkspaceState {
    fn next(self, desired: Desired, event: Event) -> Result<Next, Refusal> {
        use WorkspaceState as S;
        Ok(match event {
            Event::HostLost => match self {
                S::Lost => Next::Stay,
                S::Deleting => Next::Forget,
                _ => Next::Record(S::Lost),
            },
            Event::Start if self == S::Lost => Next::Relocate,
            Event::Stop { .. } if self == S::Lost => Next::Stay,
            Event::Delete if self == S::Lost => Next::Forget,
            // Its host is back, and has it.
            Event::Observed { running } if self == S::Lost => {
                Next::Record(if running { S::Running } else { S::Stopped })
            }
            Event::Reached { .. } | Event::JobFailed { .. } if self == S::Lost => Next::Stay,
            Event::Start => match self {
                S::Deleting => return Err(Refusal::BeingDeleted),
                S::Running => Next::Stay,
                _ => Next::Queue {
                    state: S::Starting,
                    desired: Desired::Running,
                    action: Action::Start,
                    supersede: false,
                },
            },
            Event::Stop { grace_ms, force } => match self {
                S::Deleting => return Err(Refusal::BeingDeleted),
                S::Stopped if !force => Next::Stay,
                _ => Next::Queue {
                    state: S::Stopping,
                    desired: Desired::Stopped,
                    action: Action::Stop { grace_ms },
                    supersede: force,
                },
            },
            // Deleting again queues another delete: a delete that failed is tried anew.
            Event::Delete => Next::Queue {
                state: S::Deleting,
                desired: Desired::Deleted,
                action: Action::Delete,
                supersede: true,
            },
            Event::Reached {
                later_jobs: true, ..
            } => Next::Stay,
            // A delete's own end removes the row; a start or stop that ends after a delete was
            // asked for leaves the workspace deleting.
            Event::Reached { .. } if desired == Desired::Deleted => Next::Stay,
            Event::Reached { running, .. } => {
                Next::Record(if running { S::Running } else { S::Stopped })
            }
            Event::JobFailed {
                final_attempt: true,
                later_jobs: false,
            } => Next::Record(S::Failed),
            Event::JobFailed { .. } => Next::Stay,
            Event::Observed { running } => {
                if !self.is_settled() {
                    return Ok(Next::Stay);
                }
                match (desired, running) {
                    (Desired::Running, false) => Next::Queue {
                        state: S::Starting,
                        desired,
                        action: Action::Start,
                        supersede: false,
                    },
                    (Desired::Stopped, true) => Next::Queue {
                        state: S::Stopping,
                        desired,
                        action: Action::Stop {
                            grace_ms: RECONCILE_GRACE_MS,
                        },
                        supersede: false,
                    },
                    (Desired::Running, true) if self != S::Running => Next::Record(S::Running),
                    (Desired::Stopped, false) if self != S::Stopped => Next::Record(S::Stopped),
                    _ => Next::Stay,
                }
            }
        })
    }
}

/// Workspace, project and key names: what a person types on a command line.
pub fn check_name(what: &str, name: &str) -> crate::error::ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(crate::error::ApiError::bad_request(format!(
            "`{name}` is not a valid {what} name: 1 to 40 of a-z, 0-9 and -, not starting with -"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::Desired as D;
    use super::WorkspaceState as S;
    use super::*;

    fn queue(state: S, desired: D, action: Action, supersede: bool) -> Result<Next, Refusal> {
        Ok(Next::Queue {
            state,
            desired,
            action,
            supersede,
        })
    }

    const STOP: Event = Event::Stop {
        grace_ms: 5_000,
        force: false,
    };
    const KILL: Event = Event::Stop {
        grace_ms: 0,
        force: true,
    };

    #[test]
    fn a_start_runs_whatever_is_not_running_or_going() {
        for from in [S::Creating, S::Starting, S::Stopping, S::Stopped, S::Failed] {
            assert_eq!(
                from.next(D::Stopped, Event::Start),
                queue(S::Starting, D::Running, Action::Start, false),
                "from {from}"
            );
        }
    }

    #[test]
    fn a_start_of_a_running_workspace_does_nothing() {
        assert_eq!(S::Running.next(D::Running, Event::Start), Ok(Next::Stay));
    }

    #[test]
    fn a_deleting_workspace_refuses_start_and_stop() {
        for event in [Event::Start, STOP, KILL] {
            assert_eq!(
                S::Deleting.next(D::Deleted, event),
                Err(Refusal::BeingDeleted)
            );
        }
    }

    #[test]
    fn a_stop_stops_whatever_is_not_stopped() {
        for from in [S::Creating, S::Starting, S::Running, S::Stopping, S::Failed] {
            assert_eq!(
                from.next(D::Running, STOP),
                queue(
                    S::Stopping,
                    D::Stopped,
                    Action::Stop { grace_ms: 5_000 },
                    false
                ),
                "from {from}"
            );
        }
    }

    #[test]
    fn a_stop_of_a_stopped_workspace_does_nothing_unless_forced() {
        assert_eq!(S::Stopped.next(D::Stopped, STOP), Ok(Next::Stay));
        assert_eq!(
            S::Stopped.next(D::Stopped, KILL),
            queue(S::Stopping, D::Stopped, Action::Stop { grace_ms: 0 }, true)
        );
    }

    #[test]
    fn a_forced_stop_drops_what_was_queued() {
        assert_eq!(
            S::Starting.next(D::Running, KILL),
            queue(S::Stopping, D::Stopped, Action::Stop { grace_ms: 0 }, true)
        );
    }

    #[test]
    fn a_delete_goes_from_every_state_and_drops_what_was_queued() {
        // (A lost one is forgotten: see below.)
        for from in S::ALL.into_iter().filter(|s| *s != S::Lost) {
            assert_eq!(
                from.next(D::Running, Event::Delete),
                queue(S::Deleting, D::Deleted, Action::Delete, true),
                "from {from}"
            );
        }
    }

    #[test]
    fn the_last_job_to_end_records_where_the_host_is() {
        for from in [S::Creating, S::Starting, S::Stopping] {
            assert_eq!(
                from.next(
                    D::Running,
                    Event::Reached {
                        running: true,
                        later_jobs: false
                    }
                ),
                Ok(Next::Record(S::Running))
            );
            assert_eq!(
                from.next(
                    D::Stopped,
                    Event::Reached {
                        running: false,
                        later_jobs: false
                    }
                ),
                Ok(Next::Record(S::Stopped))
            );
        }
    }

    #[test]
    fn a_job_with_later_jobs_queued_leaves_the_state_to_them() {
        let reached = Event::Reached {
            running: true,
            later_jobs: true,
        };
        assert_eq!(S::Starting.next(D::Stopped, reached), Ok(Next::Stay));
    }

    #[test]
    fn a_start_that_ends_after_a_delete_leaves_it_deleting() {
        let reached = Event::Reached {
            running: true,
            later_jobs: false,
        };
        assert_eq!(S::Deleting.next(D::Deleted, reached), Ok(Next::Stay));
    }

    #[test]
    fn only_a_final_failure_with_nothing_queued_fails_the_workspace() {
        let failed = |final_attempt, later_jobs| Event::JobFailed {
            final_attempt,
            later_jobs,
        };
        assert_eq!(
            S::Starting.next(D::Running, failed(true, false)),
            Ok(Next::Record(S::Failed))
        );
        assert_eq!(
            S::Starting.next(D::Running, failed(false, false)),
            Ok(Next::Stay)
        );
        assert_eq!(
            S::Starting.next(D::Running, failed(true, true)),
            Ok(Next::Stay)
        );
    }

    #[test]
    fn a_workspace_that_should_run_but_does_not_is_started_again() {
        for from in [S::Running, S::Stopped] {
            assert_eq!(
                from.next(D::Running, Event::Observed { running: false }),
                queue(S::Starting, D::Running, Action::Start, false)
            );
        }
    }

    #[test]
    fn a_workspace_that_should_be_stopped_but_runs_is_stopped_again() {
        for from in [S::Running, S::Stopped] {
            assert_eq!(
                from.next(D::Stopped, Event::Observed { running: true }),
                queue(
                    S::Stopping,
                    D::Stopped,
                    Action::Stop {
                        grace_ms: RECONCILE_GRACE_MS
                    },
                    false
                )
            );
        }
    }

    #[test]
    fn a_host_already_where_the_owner_wants_is_recorded() {
        assert_eq!(
            S::Stopped.next(D::Running, Event::Observed { running: true }),
            Ok(Next::Record(S::Running))
        );
        assert_eq!(
            S::Running.next(D::Stopped, Event::Observed { running: false }),
            Ok(Next::Record(S::Stopped))
        );
        assert_eq!(
            S::Running.next(D::Running, Event::Observed { running: true }),
            Ok(Next::Stay)
        );
        assert_eq!(
            S::Stopped.next(D::Stopped, Event::Observed { running: false }),
            Ok(Next::Stay)
        );
    }

    #[test]
    fn the_reconciler_leaves_workspaces_in_between_to_their_jobs() {
        for from in [
            S::Creating,
            S::Starting,
            S::Stopping,
            S::Deleting,
            S::Failed,
        ] {
            for running in [true, false] {
                assert_eq!(
                    from.next(D::Running, Event::Observed { running }),
                    Ok(Next::Stay),
                    "from {from}"
                );
            }
        }
    }

    #[test]
    fn a_workspace_whose_host_is_gone_is_lost_until_started_elsewhere_or_forgotten() {
        for from in [
            S::Creating,
            S::Starting,
            S::Running,
            S::Stopping,
            S::Stopped,
            S::Failed,
        ] {
            assert_eq!(
                from.next(D::Running, Event::HostLost),
                Ok(Next::Record(S::Lost)),
                "from {from}"
            );
        }
        // A delete its host never carried out is done now.
        assert_eq!(
            S::Deleting.next(D::Deleted, Event::HostLost),
            Ok(Next::Forget)
        );
        assert_eq!(S::Lost.next(D::Running, Event::HostLost), Ok(Next::Stay));
        assert_eq!(S::Lost.next(D::Stopped, Event::Start), Ok(Next::Relocate));
        assert_eq!(S::Lost.next(D::Running, Event::Delete), Ok(Next::Forget));
        assert_eq!(S::Lost.next(D::Running, STOP), Ok(Next::Stay));
        // A job of the host that went away ends without moving it.
        let reached = Event::Reached {
            running: true,
            later_jobs: false,
        };
        assert_eq!(S::Lost.next(D::Running, reached), Ok(Next::Stay));
        // The host came back with it.
        assert_eq!(
            S::Lost.next(D::Running, Event::Observed { running: true }),
            Ok(Next::Record(S::Running))
        );
        assert_eq!(
            S::Lost.next(D::Running, Event::Observed { running: false }),
            Ok(Next::Record(S::Stopped))
        );
    }
}
