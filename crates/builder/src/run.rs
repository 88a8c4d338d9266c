//! Running a parsed Dockerfile with no Docker daemon: every stage is a workspace of the
//! [`Runtime`] started from its base image, every `RUN` a process in it (the same sandbox as
//! developers' workspaces), `COPY` a tar stream unpacked inside it (so no path is ever resolved on
//! the host through the sandbox's symlinks), and the result the sandbox's tree streamed out and
//! stored as an image. Each step that changes files is cached (see [`build`]); `COPY` takes
//! patterns; `RUN --mount` is in [`mounts`], `ADD`'s remote files and archives in [`add`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use warren_runtime::{
    ExecIo, ExecRequest, ExitStatus, Limits, RootSource, Runtime, WorkspaceConfig, WorkspaceId,
};

use crate::BuildError;
use crate::{Command, CopySource, Dockerfile, Files, Ignore, Instruction, expand};

mod add;
pub use add::egress_filter;
mod mounts;

/// Where images come from and go.
pub trait ImageStore {
    /// The environment, user, folder, command and digest of an image (an error if there is no
    /// such image: the step cache asks this to know whether a step's image exists).
    fn settings(&self, reference: &str) -> Result<ImageSettings, BuildError>;
    /// Stores a root filesystem (a tar stream) as `name`; returns its digest.
    fn store(
        &self,
        name: &str,
        tar: &mut dyn Read,
        settings: &ImageSettings,
    ) -> Result<String, BuildError>;
    /// Names the tree of the image `from` as `name`, with these settings (no tree is read).
    fn retag(&self, name: &str, from: &str, settings: &ImageSettings)
    -> Result<String, BuildError>;
    /// Removes the name `name` (an image stored under it that must not be used: cut short).
    fn untag(&self, name: &str) -> Result<(), BuildError>;
    /// Stores the image a writable layer lies over with the layer applied, reading only what
    /// the layer holds; `None` when this store cannot (the caller streams the whole tree).
    fn store_changes(
        &self,
        name: &str,
        layer: &warren_runtime::WritableLayer,
        settings: &ImageSettings,
    ) -> Result<Option<String>, BuildError> {
        let _ = (name, layer, settings);
        Ok(None)
    }
}

/// What an image says about running it, as Docker's image config does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSettings {
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// What runs: `entrypoint` followed by `cmd` (Docker's rule).
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// `PORT/PROTOCOL`, such as `8080/tcp`.
    pub exposed_ports: Vec<String>,
    /// `MAINTAINER`.
    pub author: Option<String>,
    /// The image's digest (when read from the store).
    pub digest: String,
}

/// The `PATH` a Linux image without one gets, as Docker gives it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What each build step and prebuild task may use on a shared host. A step still running at
/// its time limit is killed and the build fails naming the limit; every sandbox runs in a cgroup
/// with the memory and process limits (past the memory, the kernel kills a process inside).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLimits {
    pub time: Duration,
    /// Bytes; `None`: unlimited.
    pub memory: Option<u64>,
    /// Processes and threads at once; `None`: unlimited.
    pub pids: Option<u64>,
}

impl StepLimits {
    /// One hour a step; 4096 processes; memory: half of this host's.
    pub fn host_default() -> Self {
        Self {
            time: Duration::from_secs(3600),
            memory: host_memory().map(|m| m / 2),
            pids: Some(4096),
        }
    }

    fn sandbox_limits(&self) -> Limits {
        Limits {
            cpus: None,
            memory: self.memory,
            pids: self.pids,
            // The host's default (`--workspace-disk`).
            disk: None,
        }
    }
}

/// This host's memory in bytes.
fn host_memory() -> Option<u64> {
    // SAFETY: sysinfo only writes the struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some(info.totalram.saturating_mul(u64::from(info.mem_unit)))
}

/// What ends a step early: a cancel of the build, and the step's time limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop<'a> {
    pub cancel: Option<&'a AtomicBool>,
    pub time: Duration,
}

/// Why a step was stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Cancelled,
    TimedOut,
}

impl Stop<'_> {
    /// When a step started now must end (`None`: a limit too far away to count is none).
    fn deadline(&self) -> Option<std::time::Instant> {
        std::time::Instant::now().checked_add(self.time)
    }

    /// Whether a step with this deadline is to stop now, and why.
    fn due(&self, deadline: Option<std::time::Instant>) -> Option<Stopped> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            Some(Stopped::Cancelled)
        } else if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            Some(Stopped::TimedOut)
        } else {
            None
        }
    }

    /// The error of `what`, stopped for `why`.
    fn error(&self, why: Stopped, what: &str) -> BuildError {
        match why {
            Stopped::Cancelled => BuildError::Cancelled,
            Stopped::TimedOut => BuildError::TimedOut {
                what: what.to_owned(),
                limit: self.time,
            },
        }
    }
}

#[derive(Debug)]
pub struct BuildRequest<'a> {
    pub dockerfile: &'a Dockerfile,
    /// The Dockerfile's name, for errors.
    pub file: &'a str,
    pub context: &'a Path,
    pub ignore: &'a Ignore,
    pub build_args: &'a BTreeMap<String, String>,
    /// NAME:TAG of the result.
    pub tag: &'a str,
    /// Names the build's sandboxes (`<prefix>-<stage>-<n>`): a-z, 0-9 and -.
    pub sandbox_prefix: &'a str,
    /// Stops the build (the running step is killed) when it turns true.
    pub cancel: Option<&'a AtomicBool>,
    /// Where `RUN --mount=type=cache` folders are kept between builds (none: such a mount is
    /// refused).
    pub mount_cache: Option<&'a Path>,
    /// Whose build caches this build may use and fill (a project's id; empty for a local
    /// `warren build`): step results and cache mounts are never shared across scopes, so one
    /// tenant's `RUN curl ... | sh` cannot become another's cached step.
    pub cache_scope: &'a str,
    pub limits: StepLimits,
    /// Where what the build copies is spooled, and how much at once.
    pub spool: Spool,
}

impl BuildRequest<'_> {
    pub(crate) fn stop(&self) -> Stop<'_> {
        Stop {
            cancel: self.cancel,
            time: self.limits.time,
        }
    }
}

/// A started sandbox of a build or prebuild, deleted when dropped, whatever happens.
pub(crate) struct Sandbox<'a> {
    runtime: &'a dyn Runtime,
    pub id: WorkspaceId,
}

impl<'a> Sandbox<'a> {
    /// Creates (after removing any left by an earlier run) and starts the sandbox `name` over
    /// `image`. Only a start recorded for its trace pulls the image in the background; a
    /// step reads little of it.
    pub(crate) fn start(
        runtime: &'a dyn Runtime,
        name: &str,
        image: &str,
        record_trace_secs: Option<u64>,
        limits: &StepLimits,
    ) -> Result<Self, BuildError> {
        let id = WorkspaceId::new(name)?;
        let _ = runtime.delete(&id);
        runtime.create(&WorkspaceConfig {
            id: id.clone(),
            root: RootSource::Image {
                reference: image.to_owned(),
                record_trace_secs,
                lazy_only: record_trace_secs.is_none(),
            },
            hostname: None,
            limits: limits.sandbox_limits(),
            env: Vec::new(),
            vm: None,
            // Removed by the host if this process dies before it can.
            owner: warren_runtime::Owner::this_process(),
            tenant: None,
        })?;
        let sandbox = Sandbox { runtime, id };
        runtime.start(&sandbox.id)?;
        Ok(sandbox)
    }
}

impl Drop for Sandbox<'_> {
    fn drop(&mut self) {
        match self.runtime.delete(&self.id) {
            Ok(_) | Err(warren_runtime::Error::NotFound(_)) => {}
            Err(e) => tracing::warn!(sandbox = %self.id, error = %e, "cannot delete a sandbox"),
        }
    }
}

/// A stage's state while its steps run.
struct State {
    /// The stage's number (names its sandboxes).
    stage: usize,
    /// The image the stage's filesystem is at: its base, or the last step's cache image.
    image: String,
    /// A sandbox whose filesystem is `image`, once a step needed one.
    sandbox: Option<WorkspaceId>,
    /// What identifies `image` with every setting so far: the step cache's key.
    key: blake3::Hash,
    env: Vec<(String, String)>,
    args: BTreeMap<String, String>,
    workdir: String,
    user: Option<String>,
    shell: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    /// A `CMD` of this stage's own (an `ENTRYPOINT` clears only an inherited one).
    cmd_set: bool,
    labels: BTreeMap<String, String>,
    exposed_ports: std::collections::BTreeSet<String>,
    author: Option<String>,
}

impl State {
    /// The key after a step: the one before, the step, and every setting that shapes it.
    fn chain(&mut self, step: &impl serde::Serialize, content: &[u8]) {
        let mut h = blake3::Hasher::new();
        h.update(self.key.as_bytes());
        h.update(serde_json::to_string(step).unwrap_or_default().as_bytes());
        let settings = (
            &self.env,
            &self.args,
            &self.workdir,
            &self.user,
            &self.shell,
        );
        h.update(
            serde_json::to_string(&settings)
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(blake3::hash(content).as_bytes());
        self.key = h.finalize();
    }

    fn lookup(&self, name: &str) -> Option<String> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| self.args.get(name).cloned())
    }

    fn set_env(&mut self, key: String, value: String) {
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value));
    }

    /// A new stage's state over an image with these settings. An image with no `PATH` gets
    /// Docker's default one, so `ENV PATH=/opt/bin:${PATH}` and the steps find `sh`.
    fn over_image(
        stage: usize,
        image: String,
        key: blake3::Hash,
        settings: &ImageSettings,
    ) -> State {
        let mut env: Vec<(String, String)> = settings
            .env
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
        }
        State {
            stage,
            image,
            sandbox: None,
            key,
            env,
            args: BTreeMap::new(),
            workdir: settings.workdir.clone().unwrap_or_else(|| "/".into()),
            user: settings.user.clone(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            entrypoint: settings.entrypoint.clone(),
            cmd: settings.cmd.clone(),
            cmd_set: false,
            labels: settings.labels.clone(),
            exposed_ports: settings.exposed_ports.iter().cloned().collect(),
            author: settings.author.clone(),
        }
    }

    /// A new stage's state over an earlier stage: its filesystem and every setting of it
    /// (Docker's `FROM <stage>`), its own arguments and sandbox aside.
    fn over_stage(stage: usize, earlier: &State) -> State {
        State {
            stage,
            image: earlier.image.clone(),
            sandbox: None,
            key: earlier.key,
            env: earlier.env.clone(),
            args: BTreeMap::new(),
            workdir: earlier.workdir.clone(),
            user: earlier.user.clone(),
            shell: earlier.shell.clone(),
            entrypoint: earlier.entrypoint.clone(),
            cmd: earlier.cmd.clone(),
            cmd_set: false,
            labels: earlier.labels.clone(),
            exposed_ports: earlier.exposed_ports.clone(),
            author: earlier.author.clone(),
        }
    }

    /// What the image made of this stage says about running it.
    fn settings(&self) -> ImageSettings {
        ImageSettings {
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            user: self.user.clone(),
            workdir: Some(self.workdir.clone()),
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            labels: self.labels.clone(),
            exposed_ports: self.exposed_ports.iter().cloned().collect(),
            author: self.author.clone(),
            digest: String::new(),
        }
    }
}

/// How a build went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub digest: String,
    /// Steps that changed the filesystem (RUN, COPY, WORKDIR) and were run...
    pub steps_run: usize,
    /// ...and those taken from the step cache instead.
    pub steps_cached: usize,
}

/// The cache image of a step: the image its key names.
fn cache_tag(scope: &str, key: &blake3::Hash) -> String {
    let key = if scope.is_empty() {
        *key
    } else {
        let mut h = blake3::Hasher::new();
        h.update(b"scope\0");
        h.update(scope.as_bytes());
        h.update(b"\0");
        h.update(key.as_bytes());
        h.finalize()
    };
    format!("warren-build-cache:{}", &key.to_hex()[..32])
}

/// What the build has so far: its sandboxes, the stages done, the steps run.
struct Build<'a> {
    runtime: &'a dyn Runtime,
    store: &'a dyn ImageStore,
    req: &'a BuildRequest<'a>,
    /// Every sandbox the build started, deleted when the build ends.
    sandboxes: Vec<Sandbox<'a>>,
    /// Stage name (and number) → its final state.
    stages: BTreeMap<String, usize>,
    done: Vec<State>,
    run: usize,
    cached: usize,
}

impl Build<'_> {
    /// A sandbox at `state.image`, started when first needed.
    fn sandbox(&mut self, state: &mut State) -> Result<WorkspaceId, BuildError> {
        if let Some(id) = &state.sandbox {
            return Ok(id.clone());
        }
        let name = format!(
            "{}-{}-{}",
            self.req.sandbox_prefix,
            state.stage,
            self.sandboxes.len()
        );
        let sandbox = Sandbox::start(self.runtime, &name, &state.image, None, &self.req.limits)?;
        let id = sandbox.id.clone();
        self.sandboxes.push(sandbox);
        state.sandbox = Some(id.clone());
        Ok(id)
    }

    /// The tar stream of `files` taken from an earlier stage's sandbox.
    fn stage_files(
        &mut self,
        stage: &str,
        state: &State,
        files: &Files,
        how: &CopyHow,
        what: &str,
    ) -> Result<Spooled, BuildError> {
        let k = *self
            .stages
            .get(&stage.to_ascii_lowercase())
            .ok_or_else(|| {
                BuildError::Refused(format!("{what}={stage}: no earlier stage of that name"))
            })?;
        let mut source = std::mem::replace(&mut self.done[k], placeholder(k));
        let escape = self.req.dockerfile.escape;
        let stop = self.req.stop();
        let made = self.sandbox(&mut source).and_then(|id| {
            stage_tar(
                self.runtime,
                &id,
                state,
                files,
                how,
                escape,
                stop,
                &self.req.spool,
            )
        });
        self.done[k] = source;
        made
    }

    /// A step that changes the filesystem: taken from the cache when its key is there, else
    /// run in the sandbox and stored under its key.
    fn change(
        &mut self,
        state: &mut State,
        log: &mut dyn Write,
        step: impl FnOnce(&mut Self, &WorkspaceId, &State, &mut dyn Write) -> Result<(), BuildError>,
    ) -> Result<(), BuildError> {
        let tag = cache_tag(self.req.cache_scope, &state.key);
        if self.store.settings(&tag).is_ok() {
            let _ = writeln!(log, "{}", warren_protocol::build_log::CACHED);
            state.image = tag;
            // Its filesystem is now behind the image: a later step starts a fresh one.
            if let Some(old) = state.sandbox.take() {
                let _ = self.runtime.delete(&old);
            }
            self.cached += 1;
            return Ok(());
        }
        let id = self.sandbox(state)?;
        let started = std::time::Instant::now();
        step(self, &id, state, log)?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "step run");
        commit(
            self.runtime,
            self.store,
            &id,
            &tag,
            &ImageSettings::default(),
            self.req.stop(),
        )?;
        state.image = tag;
        self.run += 1;
        Ok(())
    }
}

/// Builds the Dockerfile. Every step that changes the filesystem is stored as an image named
/// by a key of everything that shaped it (the base image's digest, the steps and settings
/// before, the step, the bytes it copies), so a rebuild runs only what changed and what comes
/// after it. `log` gets every step's output.
pub fn build(
    runtime: &dyn Runtime,
    store: &dyn ImageStore,
    req: &BuildRequest<'_>,
    log: &mut dyn Write,
) -> Result<Built, BuildError> {
    let escape = req.dockerfile.escape;
    let fail = |line: usize, e: BuildError| e.at(format_args!("{}:{line}", req.file));
    let global: BTreeMap<String, String> = req
        .dockerfile
        .global_args
        .iter()
        .filter_map(|a| {
            req.build_args
                .get(&a.name)
                .cloned()
                .or_else(|| a.default.clone())
                .map(|v| (a.name.clone(), v))
        })
        .collect();
    let mut b = Build {
        runtime,
        store,
        req,
        sandboxes: Vec::new(),
        stages: BTreeMap::new(),
        done: Vec::new(),
        run: 0,
        cached: 0,
    };
    let stages = &req.dockerfile.stages;
    for (n, stage) in stages.iter().enumerate() {
        let at = |e: BuildError| fail(stage.line, e);
        let base = expand(&stage.base, escape, &|k| global.get(k).cloned())
            .map_err(|e| at(BuildError::Refused(format!("FROM: {e}"))))?;
        let _ = writeln!(log, "[{n}] FROM {base}");
        let mut state = match b.stages.get(&base.to_ascii_lowercase()) {
            Some(&k) => State::over_stage(n, &b.done[k]),
            None => {
                refuse_reserved(&base).map_err(|e| at(BuildError::Refused(format!("FROM {e}"))))?;
                let settings = store
                    .settings(&base)
                    .map_err(|e| at(e.at(format_args!("FROM {base}"))))?;
                let key = blake3::hash(settings.digest.as_bytes());
                State::over_image(n, base.clone(), key, &settings)
            }
        };
        for step in &stage.steps {
            if req.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(fail(step.line, BuildError::Cancelled));
            }
            let _ = writeln!(
                log,
                "{}",
                warren_protocol::build_log::step_line(n, step.line, &step.instruction.summary())
            );
            run_step(&mut b, &mut state, &step.instruction, log, &global)
                .map_err(|m| fail(step.line, m))?;
        }
        b.stages.insert(n.to_string(), n);
        if let Some(name) = &stage.name {
            b.stages.insert(name.to_ascii_lowercase(), n);
        }
        b.done.push(state);
    }
    let line = stages.last().map_or(1, |s| s.line);
    let state = b
        .done
        .pop()
        .ok_or_else(|| fail(1, BuildError::refused("no stage")))?;
    let settings = state.settings();
    // The last stage's tree is its last step's image (or its base): only the settings change.
    let digest = store
        .retag(req.tag, &state.image, &settings)
        .map_err(|e| fail(line, e))?;
    Ok(Built {
        digest,
        steps_run: b.run,
        steps_cached: b.cached,
    })
}

fn expand_with(state: &State, escape: char, word: &str) -> Result<String, BuildError> {
    expand(word, escape, &|k| state.lookup(k)).map_err(|e| BuildError::Refused(e.to_string()))
}

fn run_step(
    b: &mut Build<'_>,
    state: &mut State,
    instruction: &Instruction,
    log: &mut dyn Write,
    global: &BTreeMap<String, String>,
) -> Result<(), BuildError> {
    let req = b.req;
    let escape = req.dockerfile.escape;
    match instruction {
        Instruction::Arg(decls) => {
            for d in decls {
                let value = match req.build_args.get(&d.name) {
                    Some(v) => Some(v.clone()),
                    None => match &d.default {
                        Some(v) => Some(expand_with(state, escape, v)?),
                        None => global.get(&d.name).cloned(),
                    },
                };
                if let Some(v) = value {
                    state.args.insert(d.name.clone(), v);
                }
            }
            state.chain(instruction, b"");
        }
        Instruction::Env(pairs) => {
            for (k, v) in pairs {
                let value = expand_with(state, escape, v)?;
                state.set_env(k.clone(), value);
            }
            state.chain(instruction, b"");
        }
        Instruction::Workdir(dir) => {
            let dir = inside(&state.workdir, &expand_with(state, escape, dir)?);
            state.chain(instruction, dir.as_bytes());
            // Made from the folder before, which exists.
            b.change(state, log, |b, id, state, log| {
                let mkdir = vec!["mkdir".into(), "-p".into(), dir.clone()];
                run(
                    b.runtime,
                    id,
                    state.step(mkdir, Some("root"), None),
                    log,
                    b.req.stop(),
                )
            })?;
            state.workdir = dir;
        }
        Instruction::User(user) => {
            state.user = Some(expand_with(state, escape, user)?);
            state.chain(instruction, b"");
        }
        Instruction::Shell(argv) => {
            state.shell = argv.clone();
            state.chain(instruction, b"");
        }
        Instruction::Run {
            command,
            mounts,
            no_network,
            heredocs,
        } => {
            let mounts = b.prepare_mounts(state, mounts)?;
            let (argv, stdin) = match command {
                Command::Exec(argv) => (argv.clone(), None),
                // `RUN <<EOF`: the here-document is the script; `RUN <<EOF python3`: it is the
                // command's input.
                Command::Shell(text)
                    if text.trim_start().starts_with("<<") && heredocs.len() == 1 =>
                {
                    let rest = text
                        .trim_start()
                        .split_once(char::is_whitespace)
                        .map(|(_, rest)| rest.trim())
                        .unwrap_or("");
                    let body = heredocs[0].body.clone();
                    let mut argv = state.shell.clone();
                    if rest.is_empty() {
                        argv.push(body);
                        (argv, None)
                    } else {
                        argv.push(rest.to_owned());
                        (argv, Some(body.into_bytes()))
                    }
                }
                Command::Shell(text) => {
                    let mut argv = state.shell.clone();
                    argv.push(text.clone());
                    (argv, None)
                }
            };
            let bound = mounts
                .iter()
                .map(|m| m.key())
                .collect::<Result<Vec<_>, _>>()?
                .concat();
            state.chain(instruction, &bound);
            b.change(state, log, |b, id, state, log| {
                let user = state.user.clone();
                b.mount(id, &mounts)?;
                let mut step = state.step(argv, user.as_deref(), stdin);
                step.no_network = *no_network;
                run(b.runtime, id, step, log, b.req.stop())?;
                b.unmount(id, &mounts)
            })?;
        }
        Instruction::Copy {
            files,
            from,
            parents,
        } => {
            let how = CopyHow {
                parents: *parents,
                exclude: Ignore::patterns(&files.exclude, "--exclude")
                    .map_err(BuildError::Refused)?,
            };
            let tar = match from {
                None => context_tar(req, state, files, &how)?,
                Some(stage) => b.stage_files(stage, state, files, &how, "COPY --from")?,
            };
            let dest = expand_with(state, escape, &files.dest)?;
            let into = if *parents || copies_into_folder(&dest, files) {
                inside(&state.workdir, &dest)
            } else {
                parent_of(&inside(&state.workdir, &dest))
            };
            state.chain(instruction, tar_key(tar.reader()?)?.as_bytes());
            let meta = Meta::of(files)?;
            b.change(state, log, |b, id, state, log| {
                unpack(b, id, state, log, Box::new(tar.reader()?), &into, &meta)
            })?;
        }
        Instruction::Add { files, checksum } => {
            let dest = expand_with(state, escape, &files.dest)?;
            let folder = inside(&state.workdir, &dest);
            let into = if copies_into_folder(&dest, files) {
                folder.clone()
            } else {
                parent_of(&folder)
            };
            let meta = Meta::of(files)?;
            let (plain, remote, archives) =
                add::sort_sources(req, state, files, checksum.as_deref(), &b.runtime.egress())?;
            let mut key = Vec::new();
            let mut parts: Vec<(Spooled, String)> = Vec::new();
            if !plain.sources.is_empty() {
                parts.push((
                    context_tar(req, state, &plain, &CopyHow::default())?,
                    into.clone(),
                ));
            }
            if !remote.is_empty() {
                parts.push((
                    add::remote_tar(&remote, &dest, files, &meta, &req.spool)?,
                    into.clone(),
                ));
            }
            for (tar, _) in &parts {
                key.extend_from_slice(tar_key(tar.reader()?)?.as_bytes());
            }
            for archive in &archives {
                key.extend_from_slice(tar_key(archive.open()?)?.as_bytes());
            }
            state.chain(instruction, &key);
            b.change(state, log, |b, id, state, log| {
                for (tar, to) in parts {
                    unpack(b, id, state, log, Box::new(tar.reader()?), &to, &meta)?;
                }
                // An archive's own owners and modes are kept, as Docker keeps them.
                for archive in &archives {
                    unpack(
                        b,
                        id,
                        state,
                        log,
                        archive.open()?,
                        &folder,
                        &Meta::default(),
                    )?;
                }
                Ok(())
            })?;
        }
        // Docker's rule: what runs is the entrypoint followed by the command; an entrypoint
        // clears a command inherited from the base (not one this stage set); a shell-form
        // entrypoint takes no command.
        Instruction::Entrypoint(c) => {
            state.entrypoint = command_argv(state, c);
            if !state.cmd_set || matches!(c, Command::Shell(_)) {
                state.cmd.clear();
            }
        }
        Instruction::Cmd(c) => {
            state.cmd = command_argv(state, c);
            state.cmd_set = true;
        }
        Instruction::Label(pairs) => {
            for (k, v) in pairs {
                let key = expand_with(state, escape, k)?;
                let value = expand_with(state, escape, v)?;
                state.labels.insert(key, value);
            }
        }
        Instruction::Expose(ports) => {
            for port in ports {
                let port = expand_with(state, escape, port)?;
                state.exposed_ports.insert(exposed_port(&port)?);
            }
        }
        Instruction::Maintainer(name) => state.author = Some(name.clone()),
        Instruction::HealthcheckNone => {}
    }
    Ok(())
}

/// Stands in for a stage's state while it is borrowed.
fn placeholder(stage: usize) -> State {
    State {
        stage,
        image: String::new(),
        sandbox: None,
        key: blake3::hash(b""),
        env: Vec::new(),
        args: BTreeMap::new(),
        workdir: "/".into(),
        user: None,
        shell: Vec::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        cmd_set: false,
        labels: BTreeMap::new(),
        exposed_ports: Default::default(),
        author: None,
    }
}

/// An `EXPOSE` port as Docker keeps it: `8080` is `8080/tcp`; a range is refused, as Docker
/// keeps each port of one.
fn exposed_port(word: &str) -> Result<String, BuildError> {
    let (port, protocol) = word.split_once('/').unwrap_or((word, "tcp"));
    let protocol = protocol.to_ascii_lowercase();
    if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
        return Err(BuildError::Refused(format!(
            "EXPOSE {word}: the protocol is tcp, udp or sctp"
        )));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("{p}/{protocol}")),
        _ => Err(BuildError::Refused(format!(
            "EXPOSE {word}: expected a port from 1 to 65535"
        ))),
    }
}

fn command_argv(state: &State, c: &Command) -> Vec<String> {
    match c {
        Command::Exec(argv) => argv.clone(),
        Command::Shell(text) => {
            let mut argv = state.shell.clone();
            argv.push(text.clone());
            argv
        }
    }
}

/// `path` resolved against the folder `cwd` (inside the sandbox).
fn inside(cwd: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn parent_of(path: &str) -> String {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((parent, _)) => parent.to_owned(),
    }
}

/// Whether `dest` is a folder the sources go into (rather than a file's new name).
fn copies_into_folder(dest: &str, files: &Files) -> bool {
    dest.ends_with('/')
        || dest == "."
        || files.sources.len() > 1
        || files
            .sources
            .iter()
            .any(|s| matches!(s, CopySource::Path(p) if is_glob(p)))
}

/// A process for [`run`].
pub(crate) struct Step {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
    pub stdin: Option<Box<dyn Read + Send>>,
    /// In a network namespace of its own with only loopback (`RUN --network=none`).
    pub no_network: bool,
}

impl State {
    /// A process run with the stage's variables, in its folder.
    fn step(&self, argv: Vec<String>, user: Option<&str>, stdin: Option<Vec<u8>>) -> Step {
        let mut env: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        Step {
            argv,
            env,
            cwd: self.workdir.clone(),
            user: user.map(str::to_owned),
            stdin: stdin.map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn Read + Send>),
            no_network: false,
        }
    }
}

/// How much of a failed process's error output its error repeats.
const TAIL_LINES: usize = 5;

/// Runs a process in the sandbox to its end, its output going to `log` as it comes; an error
/// unless it exits 0. When the build is cancelled, or the step reaches its time limit, the
/// process is killed and the step fails.
pub(crate) fn run(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    step: Step,
    log: &mut dyn Write,
    stop: Stop<'_>,
) -> Result<(), BuildError> {
    let request = ExecRequest {
        argv: step.argv.clone(),
        env: step.env,
        cwd: Some(step.cwd),
        land_in: None,
        user: step.user,
        tty: None,
        no_network: step.no_network,
    };
    let exec = runtime.exec(id, &request)?;
    let ExecIo::Pipes {
        stdin: mut input,
        stdout,
        stderr,
    } = exec.io
    else {
        return Err(BuildError::refused("the sandbox gave a terminal"));
    };
    let stdin = step.stdin;
    let feeder = std::thread::spawn(move || {
        if let Some(mut from) = stdin {
            let _ = std::io::copy(&mut from, &mut input);
        }
    });
    // Both outputs into one channel, so the log gets them in the order they came.
    let (tx, rx) = std::sync::mpsc::channel::<(bool, Vec<u8>)>();
    let readers: Vec<_> = [(false, stdout), (true, stderr)]
        .into_iter()
        .map(|(is_err, mut from)| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    if tx.send((is_err, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut tail: Vec<u8> = Vec::new();
    // A limit too far away to count is no limit.
    let deadline = stop.deadline();
    // Why the process was killed, and when.
    let mut killed: Option<(Stopped, std::time::Instant)> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((is_err, bytes)) => {
                let _ = log.write_all(&bytes);
                if is_err {
                    tail.extend_from_slice(&bytes);
                    let keep = tail.len().saturating_sub(16 * 1024);
                    tail.drain(..keep);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // Checked on every pass: a step that never stops writing is stopped all the same.
        match killed {
            None => {
                if let Some(why) = stop.due(deadline) {
                    killed = Some((why, std::time::Instant::now()));
                    let _ = exec.process.signal(libc::SIGKILL);
                }
            }
            // Something the step started in the background still holds (or writes to) its
            // output: it goes with the sandbox, which the build deletes.
            Some((_, at)) if at.elapsed() > Duration::from_secs(5) => break,
            Some(_) => {}
        }
    }
    if let Some((why, _)) = killed {
        // The readers and the feeder end when the sandbox goes; they are not waited for.
        let _ = exec.process.wait();
        return Err(stop.error(why, &format!("`{}`", step.argv.join(" "))));
    }
    for r in readers {
        let _ = r.join();
    }
    let _ = feeder.join();
    let status = exec.process.wait()?;
    match status {
        ExitStatus::Code(0) => Ok(()),
        status => {
            let tail = String::from_utf8_lossy(&tail);
            let lines: Vec<&str> = tail.lines().collect();
            let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
            Err(BuildError::Refused(format!(
                "`{}` ended with {} {}",
                step.argv.join(" "),
                match status {
                    ExitStatus::Code(c) => format!("exit {c}"),
                    ExitStatus::Signal(s) => format!("signal {s}"),
                },
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(":\n{tail}")
                }
            )))
        }
    }
}

pub use warren_protocol::{CANCELLED, RESERVED_REPOSITORIES, refuse_reserved};

/// Unpacks a tar stream into the folder `into` of the sandbox (as root: owners come from the
/// stream, names resolved by the image's own users and groups, which must exist).
fn unpack(
    b: &Build<'_>,
    id: &WorkspaceId,
    state: &State,
    log: &mut dyn Write,
    tar: Box<dyn Read + Send>,
    into: &str,
    meta: &Meta,
) -> Result<(), BuildError> {
    const SCRIPT: &str = r#"set -e
if [ -n "$2" ] && ! getent passwd "$2" >/dev/null; then echo "--chown: the image has no user $2" >&2; exit 1; fi
if [ -n "$3" ] && ! getent group "$3" >/dev/null; then echo "--chown: the image has no group $3" >&2; exit 1; fi
mkdir -p "$1"
tar -x -f - -C "$1"
"#;
    let argv = [
        "/bin/sh",
        "-c",
        SCRIPT,
        "sh",
        into,
        meta.user.as_deref().unwrap_or(""),
        meta.group.as_deref().unwrap_or(""),
    ]
    .map(String::from)
    .to_vec();
    let mut step = state.step(argv, Some("root"), None);
    step.stdin = Some(tar);
    run(b.runtime, id, step, log, b.req.stop())
}

/// What a COPY's files are for the step cache: every entry's name, type, mode, owner, link and
/// content, but not its modification time — a fresh checkout of the same files hits the cache.
fn tar_key(tar: impl Read) -> Result<blake3::Hash, BuildError> {
    let mut h = blake3::Hasher::new();
    let mut archive = tar::Archive::new(tar);
    let unreadable = BuildError::io("the files to copy");
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(BuildError::io("the files to copy"))?;
        let header = entry.header().clone();
        h.update(&entry.path_bytes());
        for name in [header.username_bytes(), header.groupname_bytes()] {
            h.update(name.unwrap_or_default());
            h.update(&[0]);
        }
        h.update(&[0, header.entry_type().as_byte()]);
        for n in [
            header.mode().unwrap_or(0).into(),
            header.uid().unwrap_or(0),
            header.gid().unwrap_or(0),
            header.size().unwrap_or(0),
        ] {
            h.update(&n.to_le_bytes());
        }
        if let Some(link) = entry.link_name_bytes() {
            h.update(&link);
        }
        h.update(&[0]);
        std::io::copy(&mut entry, &mut h).map_err(BuildError::io("the files to copy"))?;
    }
    Ok(h.finalize())
}

/// A context path, checked: inside the context, through no symlink.
fn context_path(context: &Path, source: &str) -> Result<(PathBuf, String), BuildError> {
    let mut rel = PathBuf::new();
    for c in Path::new(source).components() {
        match c {
            Component::Normal(p) => rel.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !rel.pop() {
                    return Err(BuildError::Refused(format!(
                        "`{source}` is outside the build context"
                    )));
                }
            }
            Component::Prefix(_) => {
                return Err(BuildError::Refused(format!("`{source}` is not a path")));
            }
        }
    }
    // No folder on the way may be a symlink: it could lead out of the context.
    let mut at = context.to_path_buf();
    for c in rel.components() {
        at.push(c);
        let meta = std::fs::symlink_metadata(&at).map_err(BuildError::io(format_args!(
            "`{source}` (in the build context)"
        )))?;
        if meta.file_type().is_symlink() && at != context.join(&rel) {
            return Err(BuildError::Refused(format!(
                "`{source}` goes through a symlink"
            )));
        }
    }
    let rel_text = rel.to_string_lossy().into_owned();
    Ok((context.join(&rel), rel_text))
}

/// The owner and mode `--chown` and `--chmod` give copied files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Meta {
    uid: u64,
    gid: u64,
    /// Names, resolved by the image's own users and groups when unpacked inside.
    user: Option<String>,
    group: Option<String>,
    mode: Option<u32>,
    /// Leave entries' owners as they are (a copy from a stage without `--chown`); else every
    /// entry gets the owner above (root without `--chown`).
    keep_owner: bool,
}

impl Meta {
    fn of(files: &Files) -> Result<Meta, BuildError> {
        let mode = files
            .chmod
            .as_deref()
            .map(|m| {
                u32::from_str_radix(m, 8)
                    .map_err(|_| BuildError::Refused(format!("--chmod={m}: not an octal mode")))
            })
            .transpose()?;
        let Some(spec) = files.chown.as_deref() else {
            return Ok(Meta {
                mode,
                ..Meta::default()
            });
        };
        // `--chown=user` alone: the group of the same name (or number).
        let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 32
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        let mut meta = Meta {
            mode,
            ..Meta::default()
        };
        match u.parse() {
            Ok(n) => meta.uid = n,
            Err(_) if name_ok(u) => meta.user = Some(u.to_owned()),
            Err(_) => {
                return Err(BuildError::Refused(format!(
                    "--chown={spec}: `{u}` is not a user name or id"
                )));
            }
        }
        match g.parse() {
            Ok(n) => meta.gid = n,
            Err(_) if name_ok(g) => meta.group = Some(g.to_owned()),
            Err(_) => {
                return Err(BuildError::Refused(format!(
                    "--chown={spec}: `{g}` is not a group name or id"
                )));
            }
        }
        Ok(meta)
    }

    fn apply(&self, header: &mut tar::Header, is_symlink: bool) -> Result<(), BuildError> {
        if !self.keep_owner {
            header.set_uid(self.uid);
            header.set_gid(self.gid);
            // A name left in the header would win over the id when unpacked (tar resolves
            // names in the image): the given name, or none.
            header
                .set_username(self.user.as_deref().unwrap_or(""))
                .map_err(|e| BuildError::Refused(format!("--chown: {e}")))?;
            header
                .set_groupname(self.group.as_deref().unwrap_or(""))
                .map_err(|e| BuildError::Refused(format!("--chown: {e}")))?;
        }
        if let Some(m) = self.mode
            && !is_symlink
        {
            header.set_mode(m);
        }
        Ok(())
    }
}

/// How a `COPY` lays its sources out: `--parents` keeps each source's folders (from the
/// context's root, or from a `/./` in the source) under the destination; `--exclude` leaves out
/// what its patterns match, relative to each source folder (a file source by its name).
#[derive(Debug, Default)]
struct CopyHow {
    parents: bool,
    exclude: Ignore,
}

/// What of a matched source `--parents` keeps: all of it, or what follows a `/./` in the
/// source as written.
fn kept_path(written: &str, rel: &str) -> String {
    let Some((pivot, _)) = written.split_once("/./") else {
        return rel.to_owned();
    };
    let pivot = pivot
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/");
    if pivot.is_empty() {
        return rel.to_owned();
    }
    rel.strip_prefix(&format!("{pivot}/"))
        .unwrap_or(rel)
        .to_owned()
}

/// The tar stream of `COPY` sources from the build context.
fn context_tar(
    req: &BuildRequest<'_>,
    state: &State,
    files: &Files,
    how: &CopyHow,
) -> Result<Spooled, BuildError> {
    let escape = req.dockerfile.escape;
    let given = Meta::of(files)?;
    let dest = expand_with(state, escape, &files.dest)?;
    let into_folder = how.parents || copies_into_folder(&dest, files);
    let mut tar = Spooled::builder(&req.spool)?;
    tar.follow_symlinks(false);
    for source in &files.sources {
        match source {
            CopySource::Heredoc(doc) => {
                let body = if doc.expand {
                    expand_with(
                        state,
                        escape,
                        &format!("\"{}\"", doc.body.replace('"', "\\\"")),
                    )?
                } else {
                    doc.body.clone()
                };
                let name = if into_folder {
                    doc.delimiter.clone()
                } else {
                    leaf(&dest)
                };
                let mut header = tar::Header::new_gnu();
                header.set_size(body.len() as u64);
                header.set_mode(0o644);
                given.apply(&mut header, false)?;
                header.set_mtime(0);
                tar.append_data(&mut header, &name, body.as_bytes())
                    .map_err(BuildError::io("a spool file"))?;
            }
            CopySource::Path(raw) => {
                let written = expand_with(state, escape, raw)?;
                let sources = if is_glob(&written) {
                    glob_context(req, &written)?
                } else {
                    vec![written.clone()]
                };
                for source in sources {
                    let (path, rel) = context_path(req.context, &source)?;
                    if !rel.is_empty() && req.ignore.excludes(&rel) {
                        return Err(BuildError::Refused(format!(
                            "`{source}` is left out by .dockerignore"
                        )));
                    }
                    let meta = std::fs::symlink_metadata(&path)
                        .map_err(BuildError::io(format!("`{source}`")))?;
                    let kept = if how.parents {
                        kept_path(&written, &rel)
                    } else {
                        String::new()
                    };
                    if meta.is_dir() {
                        if !kept.is_empty() {
                            add_one(&mut tar, &path, Path::new(&kept), &given)?;
                        }
                        let tree = Tree {
                            req,
                            exclude: &how.exclude,
                            meta: &given,
                        };
                        tree.add(&mut tar, &path, &rel, "", Path::new(&kept))?;
                    } else if !how.exclude.excludes(&leaf(&rel)) {
                        let name = if how.parents {
                            kept
                        } else if into_folder {
                            leaf(&rel)
                        } else {
                            leaf(&dest)
                        };
                        add_one(&mut tar, &path, Path::new(&name), &given)?;
                    }
                }
            }
        }
    }
    Spooled::finish(tar)
}

fn is_glob(source: &str) -> bool {
    source.contains(['*', '?', '['])
}

/// The context paths a `COPY` pattern matches (`*`, `?`, `[...]` within a folder, `**` across
/// them), in order; an error if none does.
fn glob_context(req: &BuildRequest<'_>, pattern: &str) -> Result<Vec<String>, BuildError> {
    let cleaned: Vec<&str> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if cleaned.contains(&"..") {
        return Err(BuildError::Refused(format!(
            "`{pattern}` is outside the build context"
        )));
    }
    let matcher = globset::GlobBuilder::new(&cleaned.join("/"))
        .literal_separator(true)
        .build()
        .map_err(|e| BuildError::Refused(format!("`{pattern}`: {e}")))?
        .compile_matcher();
    let mut found = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = req.context.join(&rel);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if req.ignore.excludes(&child) {
                continue;
            }
            if matcher.is_match(&child) {
                found.push(child.clone());
            }
            // Folders are searched, symlinks to folders not (they could lead out).
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(child);
            }
        }
    }
    if found.is_empty() {
        return Err(BuildError::Refused(format!(
            "`{pattern}` matches nothing in the build context"
        )));
    }
    found.sort();
    Ok(found)
}

fn leaf(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A context folder's tree going into a `COPY`'s tar stream.
struct Tree<'a> {
    req: &'a BuildRequest<'a>,
    exclude: &'a Ignore,
    meta: &'a Meta,
}

impl Tree<'_> {
    /// Adds what is in `dir` (at `rel` in the context, `below` in the source folder) under
    /// `name`, leaving out what `.dockerignore` or `--exclude` does.
    fn add(
        &self,
        tar: &mut tar::Builder<Spooled>,
        dir: &Path,
        rel: &str,
        below: &str,
        name: &Path,
    ) -> Result<(), BuildError> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(BuildError::io(dir.display()))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let join = |base: &str| {
                if base.is_empty() {
                    file_name.clone()
                } else {
                    format!("{base}/{file_name}")
                }
            };
            let (child_rel, child_below) = (join(rel), join(below));
            if self.req.ignore.excludes(&child_rel) || self.exclude.excludes(&child_below) {
                continue;
            }
            let child_name = name.join(&file_name);
            let path = entry.path();
            add_one(tar, &path, &child_name, self.meta)?;
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                self.add(tar, &path, &child_rel, &child_below, &child_name)?;
            }
        }
        Ok(())
    }
}

fn add_one(
    tar: &mut tar::Builder<Spooled>,
    path: &Path,
    name: &Path,
    given: &Meta,
) -> Result<(), BuildError> {
    let meta = std::fs::symlink_metadata(path).map_err(BuildError::io(path.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&meta);
    given.apply(&mut header, meta.file_type().is_symlink())?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(BuildError::io(name.display()))?;
        tar.append_link(&mut header, name, target)
            .map_err(BuildError::io("a spool file"))
    } else if meta.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, name, std::io::empty())
            .map_err(BuildError::io("a spool file"))
    } else if meta.is_file() {
        let file = std::fs::File::open(path).map_err(BuildError::io(name.display()))?;
        tar.append_data(&mut header, name, file)
            .map_err(BuildError::io("a spool file"))
    } else {
        Err(BuildError::Refused(format!(
            "{}: only files, folders and symlinks are copied",
            path.display()
        )))
    }
}

/// The tar stream of `COPY --from=<stage>` sources, made inside that stage's sandbox.
#[allow(clippy::too_many_arguments)]
fn stage_tar(
    runtime: &dyn Runtime,
    source: &WorkspaceId,
    state: &State,
    files: &Files,
    how: &CopyHow,
    escape: char,
    stop: Stop<'_>,
    spool: &Spool,
) -> Result<Spooled, BuildError> {
    let dest = expand_with(state, escape, &files.dest)?;
    let into_folder = how.parents || copies_into_folder(&dest, files);
    let mut all = Vec::new();
    for s in &files.sources {
        let CopySource::Path(raw) = s else {
            return Err(BuildError::refused(
                "a here-document cannot come --from a stage",
            ));
        };
        let written = expand_with(state, escape, raw)?;
        let path = inside("/", &written);
        let (parent, name) = (parent_of(&path), leaf(&path));
        // A folder's contents go under the destination; a file goes by its name, or by the
        // destination's when that names a file.
        let script = r#"if [ -d "$1/$2" ]; then echo d >&3; tar -c -f - -C "$1/$2" .; else tar -c -f - -C "$1" "$2"; fi 3>&2"#;
        let argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            parent.clone(),
            name.clone(),
        ];
        let (code, out, err) = capture(runtime, source, argv, stop, spool)?;
        if code != 0 {
            return Err(BuildError::Refused(format!(
                "COPY --from: {}",
                String::from_utf8_lossy(&err).trim()
            )));
        }
        let is_dir = err.starts_with(b"d\n");
        // `--parents`: a folder's contents go under its own path, a file under its parent's
        // (from the root, or from a `/./` in the source).
        let prefix = how.parents.then(|| {
            let rel = path.trim_start_matches('/');
            let kept = kept_path(written.trim_start_matches('/'), rel);
            if is_dir {
                kept
            } else {
                parent_of(&format!("/{kept}"))
                    .trim_start_matches('/')
                    .to_owned()
            }
        });
        let rename = (!into_folder).then(|| (name, leaf(&dest)));
        all.push((out, rename, prefix, is_dir));
    }
    // One archive of them all, with a file renamed where the destination names it, and
    // `--chown` / `--chmod` applied (without `--chown`, owners stay as they are).
    let given = Meta {
        keep_owner: files.chown.is_none(),
        ..Meta::of(files)?
    };
    let mut joined = Spooled::builder(spool)?;
    for (spooled, rename, prefix, is_dir) in all {
        let place = |path: &Path| match &prefix {
            Some(prefix) if !prefix.is_empty() => Path::new(prefix).join(path),
            _ => path.to_path_buf(),
        };
        let mut archive = tar::Archive::new(spooled.reader()?);
        for entry in archive
            .entries()
            .map_err(BuildError::io("the copied files"))?
        {
            let mut entry = entry.map_err(BuildError::io("the copied files"))?;
            let mut header = entry.header().clone();
            let mut path = entry
                .path()
                .map_err(BuildError::io("the copied files"))?
                .into_owned();
            // `--exclude`: a folder's entries by their path in it, a file by its name.
            let within = path.to_string_lossy().into_owned();
            let within = within.trim_start_matches("./");
            let excluded = if is_dir {
                !within.is_empty() && within != "." && how.exclude.excludes(within)
            } else {
                how.exclude.excludes(&leaf(within))
            };
            if excluded {
                continue;
            }
            if let Some((from, to)) = &rename
                && path == Path::new(from)
            {
                path = PathBuf::from(to);
            }
            let path = place(&path);
            let is_symlink = header.entry_type().is_symlink();
            given.apply(&mut header, is_symlink)?;
            if header.entry_type().is_symlink() || header.entry_type().is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(BuildError::io("the copied files"))?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                // A hard link names another entry of this archive, which moved too.
                let target = if header.entry_type().is_hard_link() {
                    place(&target)
                } else {
                    target
                };
                joined
                    .append_link(&mut header, &path, target)
                    .map_err(BuildError::io("a spool file"))?;
            } else {
                joined
                    .append_data(&mut header, &path, &mut entry)
                    .map_err(BuildError::io("a spool file"))?;
            }
        }
    }
    Spooled::finish(joined)
}

/// A process started in a sandbox as root from `/` with no input: its output to read, its
/// error output being collected, and its control.
pub(crate) struct Started {
    stdout: std::fs::File,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    process: Box<dyn warren_runtime::Process>,
}

impl Started {
    fn new(runtime: &dyn Runtime, id: &WorkspaceId, argv: Vec<String>) -> Result<Self, BuildError> {
        let exec = runtime.exec(
            id,
            &ExecRequest {
                argv,
                env: Vec::new(),
                cwd: Some("/".into()),
                land_in: None,
                user: Some("root".into()),
                tty: None,
                no_network: false,
            },
        )?;
        let ExecIo::Pipes {
            stdin,
            stdout,
            stderr,
        } = exec.io
        else {
            return Err(BuildError::refused("the sandbox gave a terminal"));
        };
        drop(stdin);
        // Error output is kept up to 1 MiB (the rest is read and dropped).
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut stderr = stderr;
            let _ = (&mut stderr).take(1 << 20).read_to_end(&mut bytes);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            bytes
        });
        Ok(Self {
            stdout,
            stderr,
            process: exec.process,
        })
    }

    /// Its exit code and error output, once it ends (its output read or dropped first).
    fn finish(self) -> Result<(i32, Vec<u8>), BuildError> {
        drop(self.stdout);
        let err = self.stderr.join().unwrap_or_default();
        let code = self.process.wait()?.as_shell_code();
        Ok((code, err))
    }
}

/// Where a build's spool files go, and how much they may hold at once: a folder of the host's
/// (`<data>/tmp`, 0700, beside the image store), never the host's memory, and a budget shared
/// by all the build's spool files (their bytes come back when they are closed), so a
/// Dockerfile copying many large sources cannot fill the host's disk.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    budget: u64,
    left: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Spool {
    /// Most a build's spool files hold at once: two copies (a stage's tar stream and the
    /// joined one) of a `COPY --from` at its 4 GiB limit, and some.
    pub const DEFAULT_BUDGET: u64 = 10 << 30;

    pub fn new(dir: &Path, budget: u64) -> Self {
        // Made once here, not at every spool file (a failure shows when the first is made).
        let _ = std::fs::create_dir_all(dir);
        Self {
            dir: dir.to_path_buf(),
            budget,
            left: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(budget)),
        }
    }

    fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes `n` bytes of the budget, or none when fewer are left.
    fn take(&self, n: u64) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }
}

/// A tar stream on its way into a sandbox: a nameless file (`tempfile`'s: `O_TMPFILE`, 0600,
/// gone when closed) in the build's [`Spool`] folder, counted against its budget.
pub(crate) struct Spooled {
    file: std::fs::File,
    spool: Spool,
    len: u64,
}

impl Spooled {
    pub(crate) fn new(spool: &Spool) -> Result<Self, BuildError> {
        let file = tempfile::tempfile_in(&spool.dir).map_err(BuildError::io(format_args!(
            "cannot make a spool file in {}",
            spool.dir.display()
        )))?;
        Ok(Spooled {
            file,
            spool: spool.clone(),
            len: 0,
        })
    }

    /// The whole stream from its start, on a descriptor of its own (readers do not share an
    /// offset).
    pub(crate) fn reader(&self) -> Result<std::fs::File, BuildError> {
        use std::os::fd::AsRawFd as _;
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        std::fs::File::open(&path).map_err(BuildError::io("cannot read the spool file"))
    }

    /// A tar builder writing into a new spool file.
    pub(crate) fn builder(spool: &Spool) -> Result<tar::Builder<Spooled>, BuildError> {
        Ok(tar::Builder::new(Spooled::new(spool)?))
    }

    /// The spool file a finished builder wrote.
    pub(crate) fn finish(tar: tar::Builder<Spooled>) -> Result<Spooled, BuildError> {
        let mut spooled = tar
            .into_inner()
            .map_err(BuildError::io("cannot write a spool file"))?;
        spooled
            .file
            .flush()
            .map_err(BuildError::io("cannot write a spool file"))?;
        Ok(spooled)
    }
}

impl Write for Spooled {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.spool.take(buf.len() as u64) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "what the build copies is more than {} MiB at once",
                    self.spool.budget >> 20
                ),
            ));
        }
        match self.file.write(buf) {
            Ok(n) => {
                // What was taken but not written goes back.
                self.spool.give((buf.len() - n) as u64);
                self.len += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.spool.give(buf.len() as u64);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        self.spool.give(self.len);
    }
}

/// Most a `COPY --from` brings from one source (spooled to the host's temporary folder on its
/// way).
const CAPTURE_LIMIT: u64 = 4 << 30;

/// Copies a started process's output into `into`, killing the process (and whatever it left
/// in the sandbox) when the build is cancelled, at the step time limit, or past `limit` bytes:
/// what runs there is the tenant's. An error says which.
pub(crate) fn read_bounded(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    started: &Started,
    stop: Stop<'_>,
    limit: u64,
    what: &str,
    into: &mut dyn Write,
) -> Result<(), BuildError> {
    let copied = watched(runtime, id, started, stop, what, || {
        std::io::copy(&mut (&started.stdout).take(limit + 1), into)
    })?;
    match copied {
        Ok(n) if n > limit => {
            let _ = started.process.signal(libc::SIGKILL);
            let _ = runtime.quiesce(id);
            Err(BuildError::Refused(format!(
                "{what}: more than {} MiB",
                limit >> 20
            )))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(BuildError::io(what)(e)),
    }
}

/// Runs `read` (which reads the started process's output) while watching the build: when it is
/// cancelled or reaches the step time limit, the process is killed, with whatever it left in
/// the sandbox holding the pipe, and the error says which.
fn watched<T>(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    started: &Started,
    stop: Stop<'_>,
    what: &str,
    read: impl FnOnce() -> T,
) -> Result<T, BuildError> {
    let deadline = stop.deadline();
    let (killed, done) = (std::sync::OnceLock::new(), AtomicBool::new(false));
    let read = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Some(why) = stop.due(deadline) {
                    let _ = killed.set(why);
                    let _ = started.process.signal(libc::SIGKILL);
                    let _ = runtime.quiesce(id);
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let read = read();
        done.store(true, Ordering::Relaxed);
        read
    });
    match killed.get() {
        Some(&why) => Err(stop.error(why, what)),
        None => Ok(read),
    }
}

/// Runs a process in a sandbox as root; its exit code, stdout (at most [`CAPTURE_LIMIT`],
/// spooled) and stderr.
fn capture(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    argv: Vec<String>,
    stop: Stop<'_>,
    spool: &Spool,
) -> Result<(i32, Spooled, Vec<u8>), BuildError> {
    let started = Started::new(runtime, id, argv)?;
    let mut out = Spooled::new(spool)?;
    read_bounded(
        runtime,
        id,
        &started,
        stop,
        CAPTURE_LIMIT,
        "copying from a stage",
        &mut out,
    )?;
    let (code, err) = started.finish()?;
    Ok((code, out, err))
}

/// Stores the sandbox's tree: its writable layer over its image when the runtime and the store
/// can (what the steps wrote is read, nothing else), else the whole tree streamed out (its own
/// filesystem only: not /proc, /sys, /dev or binds).
pub(crate) fn commit(
    runtime: &dyn Runtime,
    store: &dyn ImageStore,
    id: &WorkspaceId,
    name: &str,
    settings: &ImageSettings,
    stop: Stop<'_>,
) -> Result<String, BuildError> {
    // What the steps or tasks left running ends with them (as with Docker, whose RUN
    // container ends): nothing of the sandbox may change its files while the host reads them.
    runtime
        .quiesce(id)
        .map_err(|e| BuildError::from(e).at("cannot end what the sandbox left running"))?;
    let started = std::time::Instant::now();
    if let Ok(Some(layer)) = runtime.writable_layer(id)
        && let Some(digest) = store.store_changes(name, &layer, settings)?
    {
        tracing::debug!(
            image = name,
            ms = started.elapsed().as_millis() as u64,
            "stored the sandbox's changes"
        );
        return Ok(digest);
    }
    tracing::debug!(image = name, "storing the sandbox's whole tree");
    let argv = [
        "tar",
        "-c",
        "-f",
        "-",
        "--one-file-system",
        "--numeric-owner",
        "-C",
        "/",
        ".",
    ];
    let started = Started::new(runtime, id, argv.map(String::from).to_vec())
        .map_err(|e| e.at("cannot read the result"))?;
    // The tenant's own `tar`: held to the step time limit like a step.
    let stored = watched(runtime, id, &started, stop, "storing the result", || {
        store.store(name, &mut (&started.stdout), settings)
    });
    let finished = started.finish();
    let outcome = match (stored, finished) {
        (Err(stopped), _) => Err(stopped),
        (Ok(_), Err(e)) => Err(e),
        // GNU tar exits 1 when a file changed while it was read (logs, sockets): still an
        // image.
        (Ok(_), Ok((code, err))) if code > 1 => Err(BuildError::Refused(format!(
            "reading the result failed: {}",
            String::from_utf8_lossy(&err).trim()
        ))),
        (Ok(stored), Ok(_)) => stored,
    };
    // A stream cut short (stopped, or `tar` failing) may still have read as a whole archive
    // and been stored: it must not stay under the step's key, where the next build would
    // take it as cached.
    if outcome.is_err() {
        let _ = store.untag(name);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_reference_a_user_writes_reaches_a_projects_images() {
        for reference in [
            "warren-prebuild:0123",
            "warren-env:ab",
            "warren-build-cache:cd",
            "warren-prebuild@sha256:00",
            "sha256:4f0c9d4ab3f1e0d1c3b2a190e1d6c1e0f4f3b1d2a7c6e5f40312a1b0c9d8e7f6",
            "SHA256:4f0c",
            // Pushed to the server's registry: still a project's or a workspace's own.
            "127.0.0.1:5000/team/warren-prebuild:0123",
            "registry.example.com/warren/warren-layers:layer-1-2",
            "registry.example.com/warren/Warren-Prebuild@sha256:00",
        ] {
            assert!(refuse_reserved(reference).is_err(), "{reference}");
        }
        for reference in [
            "dev:1",
            "debian:bookworm",
            "127.0.0.1:5000/team/dev:1",
            "127.0.0.1:5000/team/warren-prebuild-tools:1",
        ] {
            assert_eq!(refuse_reserved(reference), Ok(()), "{reference}");
        }
    }

    #[test]
    fn the_copy_key_ignores_modification_times_only() {
        let tar = |mtime: u64, content: &[u8], mode: u32| {
            let mut b = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(mode);
            header.set_mtime(mtime);
            header.set_cksum();
            b.append_data(&mut header, "a.txt", content).unwrap();
            b.into_inner().unwrap()
        };
        let key = tar_key(&tar(1, b"x", 0o644)[..]).unwrap();
        assert_eq!(key, tar_key(&tar(2, b"x", 0o644)[..]).unwrap());
        assert_ne!(key, tar_key(&tar(1, b"y", 0o644)[..]).unwrap());
        assert_ne!(key, tar_key(&tar(1, b"x", 0o755)[..]).unwrap());
    }

    #[test]
    fn paths_resolve_inside_the_sandbox() {
        assert_eq!(inside("/app", "src"), "/app/src");
        assert_eq!(inside("/app", "/etc/x"), "/etc/x");
        assert_eq!(inside("/app", "../../x"), "/x");
        assert_eq!(inside("/", "."), "/");
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(leaf("conf/"), "conf");
    }

    #[test]
    fn copy_patterns_match_inside_the_context_only() {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ctx.path().join("src/deep")).unwrap();
        for f in [
            "src/a.rs",
            "src/b.rs",
            "src/deep/c.rs",
            "src/notes.md",
            "skip.rs",
        ] {
            std::fs::write(ctx.path().join(f), b"x").unwrap();
        }
        let dockerfile = crate::parse("Dockerfile", "FROM a\n").unwrap();
        let ignore = Ignore::parse("skip.rs\n").unwrap();
        let args = BTreeMap::new();
        let req = BuildRequest {
            dockerfile: &dockerfile,
            file: "Dockerfile",
            context: ctx.path(),
            ignore: &ignore,
            build_args: &args,
            tag: "t:1",
            sandbox_prefix: "t",
            cancel: None,
            mount_cache: None,
            cache_scope: "",
            limits: StepLimits::host_default(),
            spool: Spool::new(&std::env::temp_dir(), Spool::DEFAULT_BUDGET),
        };
        assert_eq!(
            glob_context(&req, "src/*.rs").unwrap(),
            ["src/a.rs", "src/b.rs"]
        );
        assert_eq!(
            glob_context(&req, "./src/**/*.rs").unwrap(),
            ["src/a.rs", "src/b.rs", "src/deep/c.rs"]
        );
        assert!(
            glob_context(&req, "*.rs")
                .unwrap_err()
                .to_string()
                .contains("matches nothing")
        );
        assert!(
            glob_context(&req, "../*")
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
    }

    #[test]
    fn context_paths_stay_in_the_context() {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::create_dir(ctx.path().join("src")).unwrap();
        std::fs::write(ctx.path().join("src/a"), b"a").unwrap();
        std::os::unix::fs::symlink("/etc", ctx.path().join("escape")).unwrap();
        assert_eq!(context_path(ctx.path(), "./src/a").unwrap().1, "src/a");
        assert!(
            context_path(ctx.path(), "../x")
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        assert!(
            context_path(ctx.path(), "src/../../x")
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        assert!(
            context_path(ctx.path(), "escape/shadow")
                .unwrap_err()
                .to_string()
                .contains("symlink")
        );
        // The symlink itself is copied as a link, not followed.
        assert!(context_path(ctx.path(), "escape").is_ok());
        let chown = |c: &str| {
            Meta::of(&Files {
                sources: Vec::new(),
                dest: "/".into(),
                chown: Some(c.into()),
                chmod: None,
                link: false,
                exclude: Vec::new(),
            })
        };
        let m = chown("1000:100").unwrap();
        assert_eq!((m.uid, m.gid, m.user, m.group), (1000, 100, None, None));
        let m = chown("dev").unwrap();
        assert_eq!(
            (m.user.as_deref(), m.group.as_deref()),
            (Some("dev"), Some("dev"))
        );
        let m = chown("dev:100").unwrap();
        assert_eq!((m.user.as_deref(), m.gid), (Some("dev"), 100));
        assert!(chown("a b").is_err());
    }
}
