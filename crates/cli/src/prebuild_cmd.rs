//! Prebuilds: how this host makes them (the agent's [`HostPrebuilder`]) and `warren prebuild`,
//! which lists, follows, cancels and retries them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};
use warren_agent::{Failure, Outcome, PrebuildJob, Prebuilder};
use warren_api::{PrebuildState, PrebuildView};
use warren_runtime::Runtime;

use crate::client::Client;
use crate::image_cmd::LocalImages;

/// Makes prebuilds with this host's runtime into its local image store.
#[derive(Debug)]
pub struct HostPrebuilder {
    pub data: PathBuf,
    pub runtime: Arc<dyn Runtime>,
    pub limits: warren_builder::StepLimits,
}

impl HostPrebuilder {
    /// Pushes the made image to `registry` (`HOST[:PORT]/REPO`) under its own name, with its
    /// trace; answers the registry reference. A registry that cannot take it fails the
    /// prebuild (its workspaces could start only on this host).
    fn push(&self, image: &str, registry: &str, log: &mut dyn Write) -> Result<String, Failure> {
        let destination = format!("{registry}/{image}");
        let _ = writeln!(log, "pushing {image} to {destination}");
        let started = std::time::Instant::now();
        let mut size = 0;
        crate::image_cmd::push(&self.data, image, &destination, |_, total| size = total).map_err(
            |e| Failure::transient(format!("cannot push {image} to {destination}: {e:#}")),
        )?;
        let _ = writeln!(
            log,
            "pushed {destination} (an image of {} MiB, only what the registry lacked sent; {:.1} s)",
            size >> 20,
            started.elapsed().as_secs_f64()
        );
        Ok(destination)
    }
}

impl Prebuilder for HostPrebuilder {
    fn prebuild(
        &self,
        job: &PrebuildJob,
        log: &mut dyn Write,
        cancel: &AtomicBool,
    ) -> Result<Outcome, Failure> {
        let tmp = self.data.join("tmp");
        let host_trouble =
            |e: std::io::Error| Failure::transient(format!("{}: {e}", tmp.display()));
        std::fs::create_dir_all(&tmp).map_err(host_trouble)?;
        let work = tempfile::Builder::new()
            .prefix("prebuild-")
            .tempdir_in(&tmp)
            .map_err(host_trouble)?;
        let checkout = work.path().join("repo");
        warren_builder::git::checkout(
            &self.data.join("git/agent"),
            &job.git_url,
            &job.commit,
            &checkout,
            log,
        )
        .map_err(|e| Failure::transient(e.to_string()))?;
        let id: String = job
            .prebuild_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(16)
            .collect::<String>()
            .to_ascii_lowercase();
        let prefix = format!("pb-{id}");
        let store = LocalImages {
            data: self.data.clone(),
            indexes: Default::default(),
            egress: Some(self.runtime.egress()),
        };
        let made = warren_builder::prebuild(
            self.runtime.as_ref(),
            &store,
            &warren_builder::PrebuildRequest {
                checkout: &checkout,
                repository: &job.git_url,
                commit: &job.commit,
                target: &job.target,
                variables: &job.variables,
                sandbox_prefix: &prefix,
                record_trace: (job.record_trace_secs > 0)
                    .then(|| Duration::from_secs(job.record_trace_secs)),
                cancel: Some(cancel),
                mount_cache: Some(&self.data.join("build-mounts")),
                scope: &job.project_id,
                limits: self.limits,
                spool: warren_builder::Spool::new(
                    &self.data.join("tmp"),
                    warren_builder::Spool::DEFAULT_BUDGET,
                ),
            },
            log,
        )?;
        let _ = writeln!(
            log,
            "prebuild {} ({}){}",
            made.image,
            made.digest,
            if made.reused { ", reused" } else { "" }
        );
        let pushed = match &job.registry {
            Some(registry) => Some(self.push(&made.image, registry, log)?),
            None => None,
        };
        Ok(Outcome::Prebuilt {
            image: made.image,
            digest: made.digest,
            env_file: made.env_file,
            env_text: made.env_text,
            reused: made.reused,
            steps_run: made.steps_run,
            steps_cached: made.steps_cached,
            pushed,
        })
    }

    fn remove_images(&self, images: &[String]) -> Result<(), String> {
        let store =
            warren_store::LocalStore::open(&self.data.join("images")).map_err(|e| e.to_string())?;
        for image in images {
            store.remove_tag(image).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
pub enum PrebuildCommand {
    /// A project's prebuilds, newest first
    Ls {
        project: String,
        #[arg(long)]
        json: bool,
    },
    /// Prebuild a branch's head now (when it has none yet)
    Run {
        project: String,
        /// The branch (default: main, master, or the only one)
        #[arg(long)]
        branch: Option<String>,
        /// Follow its log until it ends
        #[arg(short, long)]
        follow: bool,
    },
    /// One prebuild, as JSON
    Show { id: String },
    /// A prebuild's log
    Logs {
        id: String,
        /// Keep printing what comes until the prebuild ends
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop a queued or running prebuild
    Cancel { id: String },
    /// Prebuild a failed or cancelled prebuild's commit again
    Retry { id: String },
}

pub fn prebuild(cmd: PrebuildCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    match cmd {
        PrebuildCommand::Ls { project, json } => {
            let list = client.get(&format!("/projects/{project}/prebuilds"))?;
            let mut rows = list.as_array().cloned().unwrap_or_default();
            for row in &mut rows {
                let short: String = row["commit"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(10)
                    .collect();
                row["commit"] = Value::String(short);
            }
            crate::control_cmd::print_table(
                json,
                &if json { list } else { Value::Array(rows) },
                &[
                    ("id", "ID"),
                    ("branch", "BRANCH"),
                    ("commit", "COMMIT"),
                    ("state", "STATE"),
                    ("behind", "BEHIND"),
                    ("image", "IMAGE"),
                    ("error", "ERROR"),
                ],
            )
        }
        PrebuildCommand::Run {
            project,
            branch,
            follow,
        } => {
            let pb: PrebuildView = client.post_as(
                &format!("/projects/{project}/prebuilds"),
                &warren_api::NewPrebuild { branch },
            )?;
            println!("prebuild {}: {}", pb.id, pb.state);
            if follow {
                return follow_log(&client, &pb.id, true);
            }
            Ok(ExitCode::SUCCESS)
        }
        PrebuildCommand::Show { id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.get(&format!("/prebuilds/{id}"))?)?
            );
            Ok(ExitCode::SUCCESS)
        }
        PrebuildCommand::Logs { id, follow } => follow_log(&client, &id, follow),
        PrebuildCommand::Cancel { id } => {
            let pb: PrebuildView =
                client.post_as(&format!("/prebuilds/{id}/cancel"), &json!({}))?;
            if pb.state == PrebuildState::Running {
                println!("prebuild {id}: cancelling");
            } else {
                println!("prebuild {id}: {}", pb.state);
            }
            Ok(ExitCode::SUCCESS)
        }
        PrebuildCommand::Retry { id } => {
            let pb: PrebuildView = client.post_as(&format!("/prebuilds/{id}/retry"), &json!({}))?;
            println!("prebuild {} queued", pb.id);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints the log (and, with `follow`, what comes until the prebuild ends); fails when the
/// prebuild did not succeed.
fn follow_log(client: &Client, id: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        let piece: warren_api::LogPiece =
            client.get_as(&format!("/prebuilds/{id}/log?offset={offset}"))?;
        out.write_all(piece.text.as_bytes())?;
        out.flush()?;
        offset = piece.offset;
        if !follow || piece.done && piece.text.is_empty() {
            break;
        }
        if !piece.done {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if follow {
        let pb: PrebuildView = client.get_as(&format!("/prebuilds/{id}"))?;
        match pb.state {
            PrebuildState::Succeeded => {
                eprintln!(
                    "prebuild {id} succeeded: {}",
                    pb.image.as_deref().unwrap_or("")
                );
            }
            state => bail!(
                "prebuild {id} {state}: {}",
                pb.error.as_deref().unwrap_or("no reason recorded")
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
