//! `warren agent`: this machine runs workspaces for a Warren server elsewhere. It claims its
//! host's jobs over HTTP with the host token from `warren host add`, carries them out with the
//! local container runtime, and reports the images it holds so workspaces land where their image
//! already is. It also keeps a tunnel open to the server, through which the server reaches this
//! host's workspaces (exec, task lists and logs, attach).

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use warren_agent::{
    Agent, ControlPlane, Failure, HostImage, HostReport, ImageLister, Job, Outcome, PlaneError,
};
use warren_image::ChunkId;
use warren_store::ChunkCache;

use crate::runtime_cmd::HostFlags;
use warren_agent::server_link::{CallError, ServerLink, Trust};
use warren_agent::servers::Servers;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The Warren server: https://HOST[:PORT] (plain http:// only on this machine)
    #[arg(long, env = "WARREN_SERVER")]
    server: String,
    /// The CA (PEM) that signed the server's certificate (default: the public CAs)
    #[arg(long, env = "WARREN_SERVER_CA")]
    server_ca: Option<std::path::PathBuf>,
    /// The SHA-256 fingerprint of the server's own certificate, as `warren host add` prints it
    /// (sha256:HEX): that certificate and no other, whatever CA signed it
    #[arg(long, env = "WARREN_SERVER_FINGERPRINT", conflicts_with = "server_ca")]
    server_fingerprint: Option<String>,
    /// A file (mode 0600) holding this host's token; without it the token is read from
    /// `WARREN_HOST_TOKEN`. Never an argument: every user of the host sees those (`ps`).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Gone: a token given as an argument is seen by every user of the host
    #[arg(long, hide = true)]
    token: Option<String>,
    #[command(flatten)]
    host: HostFlags,
    #[command(flatten)]
    agent: HostAgentFlags,
}

/// What this host's agent takes on (`warren up` and `warren agent`).
#[derive(Debug, Args)]
pub struct HostAgentFlags {
    /// Whether this host makes prebuilds (`false`: leave them to other hosts' agents)
    #[arg(long, env = "WARREN_PREBUILDS", default_value_t = true, action = clap::ArgAction::Set)]
    prebuilds: bool,
    /// Prebuilds this host makes at once (each in its own slots, beside the workspace jobs)
    #[arg(long, env = "WARREN_PREBUILD_SLOTS", default_value_t = 1)]
    prebuild_slots: usize,
    #[command(flatten)]
    limits: crate::build_cmd::StepLimitFlags,
}

impl HostAgentFlags {
    /// Refuses limits no build could run with.
    pub fn check(&self) -> anyhow::Result<()> {
        self.limits.limits().map(drop)
    }

    /// This host's agent (`host` as the control plane knows it), claiming jobs from `plane`:
    /// workspace jobs with `runtime`, prebuilds (when it makes them) into the store under
    /// `data`, each workspace's image checked before it is made or started.
    pub fn agent<C: ControlPlane>(
        &self,
        host: String,
        runtime: Arc<dyn warren_runtime::Runtime>,
        plane: Arc<C>,
        wake: Arc<tokio::sync::Notify>,
        data: &Path,
    ) -> anyhow::Result<Agent<C>> {
        let limits = self.limits.limits()?;
        let prebuilder = self.prebuilds.then(|| {
            Arc::new(crate::prebuild_cmd::HostPrebuilder {
                data: data.to_path_buf(),
                runtime: runtime.clone(),
                limits,
            }) as Arc<dyn warren_agent::Prebuilder>
        });
        Ok(
            Agent::new(host, runtime, prebuilder, plane, wake, image_lister(data))
                .with_prebuild_slots(self.prebuild_slots)
                .with_image_check(crate::image_cmd::image_check(data))
                .with_layer_saver(crate::image_cmd::layer_saver(data)),
        )
    }
}

/// The control plane over HTTP(S), through the replicas the agent knows.
#[derive(Debug)]
struct HttpControlPlane {
    servers: Arc<Servers>,
}

impl ControlPlane for HttpControlPlane {
    async fn claim(
        &self,
        _host: &str,
        report: Option<HostReport>,
        prebuilds: bool,
    ) -> Result<Option<Job>, PlaneError> {
        let body = json!({"report": report, "prebuilds": prebuilds});
        let answer = self
            .servers
            .call("/agent/claim", Some(&body))
            .await
            .map_err(unreachable)?;
        if answer.is_null() {
            return Ok(None);
        }
        serde_json::from_value(answer)
            .map(Some)
            .map_err(|e| PlaneError::Answer(e.to_string()))
    }

    async fn log(&self, job: &Job, text: Vec<u8>) -> Result<bool, PlaneError> {
        let body = json!(warren_api::LogRequest {
            job: job.id.clone(),
            text: String::from_utf8_lossy(&text).into_owned(),
        });
        let answer = self
            .servers
            .call("/agent/log", Some(&body))
            .await
            .map_err(unreachable)?;
        let answer: warren_api::LogAnswer =
            serde_json::from_value(answer).map_err(|e| PlaneError::Answer(e.to_string()))?;
        Ok(answer.go_on)
    }

    async fn finish(&self, job: &Job, result: Result<Outcome, Failure>) -> Result<(), PlaneError> {
        let body = json!({"job": job.id, "result": result});
        self.servers
            .call("/agent/finish", Some(&body))
            .await
            .map(drop)
            .map_err(unreachable)
    }
}

/// A job call no replica answered, or answered with an error.
fn unreachable(e: CallError) -> PlaneError {
    PlaneError::Unreachable(e.to_string())
}

/// The names of the images in the local store under `data`.
/// The images this host holds: every image of its local store (wholly), and the registry images
/// its workspaces were made from, with the share of their chunks in the host's chunk cache.
pub fn image_lister(data: &Path) -> ImageLister {
    let data = data.to_path_buf();
    // A sample of a registry image's chunk ids, fetched once per reference (a few pages of its
    // chunk table).
    let indexes: Mutex<HashMap<String, Arc<Vec<ChunkId>>>> = Mutex::default();
    Arc::new(move |workspaces: &[warren_runtime::WorkspaceInfo]| {
        let local: Vec<String> = warren_store::LocalStore::open(&data.join("images"))
            .and_then(|s| s.tags())
            .map(|tags| tags.into_keys().collect())
            .unwrap_or_default();
        let mut out: Vec<HostImage> = local
            .iter()
            .map(|image| HostImage {
                image: image.clone(),
                cached: 1.0,
            })
            .collect();
        let mut remote: Vec<String> = workspaces
            .iter()
            .filter_map(|ws| match &ws.config.root {
                warren_runtime::RootSource::Image { reference, .. } => Some(reference.clone()),
                warren_runtime::RootSource::Dir { .. } => None,
            })
            .collect();
        // Images its workspaces ran before (moved away, deleted) while this agent ran: their
        // chunks may still be cached, and a workspace of them is best placed here.
        let ran_before: Vec<String> = indexes
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let now_running = remote.clone();
        remote.extend(ran_before);
        remote.retain(|r| !local.contains(r));
        remote.sort();
        remote.dedup();
        for reference in remote {
            let known = indexes.lock().ok().and_then(|m| m.get(&reference).cloned());
            let ids = match known {
                Some(ids) => ids,
                None => match crate::image_cmd::chunk_ids(&data, &reference) {
                    Ok(ids) => {
                        let ids = Arc::new(ids);
                        if let Ok(mut m) = indexes.lock() {
                            m.insert(reference.clone(), ids.clone());
                        }
                        ids
                    }
                    Err(e) => {
                        tracing::debug!(image = reference, error = %e, "cannot read an image's index");
                        continue;
                    }
                },
            };
            let cached = ChunkCache::share_on_disk(&data.join("cache"), &ids);
            if cached > 0.0 || now_running.contains(&reference) {
                out.push(HostImage {
                    cached,
                    image: reference,
                });
            }
        }
        out
    })
}

/// This host's token, from `--token-file` (which only root may read) or `WARREN_HOST_TOKEN`.
fn host_token(file: Option<&Path>) -> anyhow::Result<String> {
    let token = match file {
        Some(file) => crate::client::read_private(file, "a host token")?
            .with_context(|| format!("cannot read {}: no such file", file.display()))?,
        None => std::env::var("WARREN_HOST_TOKEN").map_err(|_| {
            anyhow::anyhow!(
                "no host token: set WARREN_HOST_TOKEN or give --token-file (`warren host add` printed it)"
            )
        })?,
    };
    Ok(token.trim().to_owned())
}

pub fn agent(args: AgentArgs, data: &Path) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("warren agent runs workspaces (namespaces, mounts, cgroups): run it as root");
    }
    crate::control_cmd::close_data_folder(data)?;
    let runtime = args.host.runtime_for_workspaces(data)?;
    let image_mounts = runtime.image_sharing().to_string();
    let runtime: Arc<dyn warren_runtime::Runtime> = Arc::new(runtime);
    args.agent.check()?;
    if args.token.is_some() {
        anyhow::bail!(
            "--token is no longer taken (every user of this host could read it from the process list): \
             set WARREN_HOST_TOKEN, or give --token-file FILE (mode 0600)"
        );
    }
    let token = host_token(args.token_file.as_deref())?;
    let trust = Trust::from_options(
        args.server_ca.as_deref(),
        args.server_fingerprint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let link = Arc::new(
        ServerLink::new(&args.server, token.clone(), trust.clone()).map_err(anyhow::Error::msg)?,
    );
    let servers = Arc::new(Servers::new(link.clone(), token, trust));
    let host_api = warren_agent::host_api::router(runtime.clone());
    let wake = Arc::new(tokio::sync::Notify::new());
    let agent = args.agent.agent(
        "remote".into(),
        runtime,
        Arc::new(HttpControlPlane {
            servers: servers.clone(),
        }),
        wake,
        data,
    )?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tokio.block_on(async move {
        // A certificate that is not the one trusted is a setting to fix, said at once.
        link.check().await.map_err(anyhow::Error::msg)?;
        let shutdown = Arc::new(tokio::sync::Notify::new());
        println!(
            "agent running for {} (workspaces under {}; image mounts: {image_mounts})",
            args.server,
            data.display()
        );
        let run = tokio::spawn(agent.run(shutdown.clone()));
        // The control plane reaches this host's workspaces (exec, tasks, logs, attach, SSH)
        // through the tunnels the agent keeps open to each of its replicas.
        let tunnel = tokio::spawn(warren_agent::tunnel::hold_all(
            servers,
            None,
            host_api,
            shutdown.clone(),
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        shutdown.notify_waiters();
        let _ = tokio::join!(run, tunnel);
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
