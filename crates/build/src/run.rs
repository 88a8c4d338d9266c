//! Running a parsed Dockerfile with no Docker daemon: every stage is a workspace of the
//! [`Runtime`] started from its base image, every `RUN` a process in it (the same sandbox as
//! developers' workspaces), `COPY` a tar stream unpacked inside it (so no path is ever resolved on
//! the host through the sandbox's symlinks), and the result the sandbox's tree streamed out and
//! stored as an image. Each step that changes files is cached (see [`build`]); `COPY` takes
//! patterns. Not yet: `RUN --mount`, `ADD`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use warren_runtime::{
    ExecIo, ExecRequest, ExitStatus, Limits, RootSource, Runtime, WorkspaceConfig, WorkspaceId,
};

use crate::{Command, CopySource, Dockerfile, Files, Ignore, Instruction, expand};

/// Where images come from and go.
pub trait ImageStore {
    /// The environment, user, folder, command and digest of an image (an error if there is no
    /// such image: the step cache asks this to know whether a step's image exists).
    fn settings(&self, reference: &str) -> Result<ImageSettings, String>;
    /// Stores a root filesystem (a tar stream) as `name`; returns its digest.
    fn store(
        &self,
        name: &str,
        tar: &mut dyn Read,
        settings: &ImageSettings,
    ) -> Result<String, String>;
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSettings {
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub cmd: Vec<String>,
    /// The image's digest (when read from the store).
    pub digest: String,
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
}

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct BuildError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Deletes the build's sandboxes, whatever happens.
struct Sandboxes<'a> {
    runtime: &'a dyn Runtime,
    ids: Vec<WorkspaceId>,
}

impl Drop for Sandboxes<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.runtime.delete(id);
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
    cmd: Vec<String>,
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
fn cache_tag(key: &blake3::Hash) -> String {
    format!("warren-build-cache:{}", &key.to_hex()[..32])
}

/// What the build has so far: its sandboxes, the stages done, the steps run.
struct Build<'a> {
    runtime: &'a dyn Runtime,
    store: &'a dyn ImageStore,
    req: &'a BuildRequest<'a>,
    sandboxes: Sandboxes<'a>,
    /// Stage name (and number) → its final state.
    stages: BTreeMap<String, usize>,
    done: Vec<State>,
    run: usize,
    cached: usize,
}

impl Build<'_> {
    /// A sandbox at `state.image`, started when first needed.
    fn sandbox(&mut self, state: &mut State) -> Result<WorkspaceId, String> {
        if let Some(id) = &state.sandbox {
            return Ok(id.clone());
        }
        let id = WorkspaceId::new(&format!(
            "{}-{}-{}",
            self.req.sandbox_prefix,
            state.stage,
            self.sandboxes.ids.len()
        ))
        .map_err(|e| e.to_string())?;
        let _ = self.runtime.delete(&id);
        self.runtime
            .create(&WorkspaceConfig {
                id: id.clone(),
                root: RootSource::Image {
                    reference: state.image.clone(),
                },
                hostname: None,
                limits: Limits::default(),
                env: Vec::new(),
            })
            .map_err(|e| e.to_string())?;
        self.sandboxes.ids.push(id.clone());
        self.runtime.start(&id).map_err(|e| e.to_string())?;
        state.sandbox = Some(id.clone());
        Ok(id)
    }

    /// A step that changes the filesystem: taken from the cache when its key is there, else
    /// run in the sandbox and stored under its key.
    fn change(
        &mut self,
        state: &mut State,
        log: &mut dyn Write,
        step: impl FnOnce(&mut Self, &WorkspaceId, &State, &mut dyn Write) -> Result<(), String>,
    ) -> Result<(), String> {
        let tag = cache_tag(&state.key);
        if self.store.settings(&tag).is_ok() {
            let _ = writeln!(log, "    cached");
            state.image = tag;
            // Its filesystem is now behind the image: a later step starts a fresh one.
            if let Some(old) = state.sandbox.take() {
                let _ = self.runtime.delete(&old);
            }
            self.cached += 1;
            return Ok(());
        }
        let id = self.sandbox(state)?;
        step(self, &id, state, log)?;
        commit(
            self.runtime,
            self.store,
            &id,
            &tag,
            &ImageSettings::default(),
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
    let fail = |line: usize, message: String| BuildError {
        file: req.file.to_owned(),
        line,
        message,
    };
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
        sandboxes: Sandboxes {
            runtime,
            ids: Vec::new(),
        },
        stages: BTreeMap::new(),
        done: Vec::new(),
        run: 0,
        cached: 0,
    };
    let stages = &req.dockerfile.stages;
    for (n, stage) in stages.iter().enumerate() {
        let at = |m: String| fail(stage.line, m);
        let base = expand(&stage.base, escape, &|k| global.get(k).cloned())
            .map_err(|e| at(format!("FROM: {e}")))?;
        let (image, key) = match b.stages.get(&base.to_ascii_lowercase()) {
            Some(&k) => (b.done[k].image.clone(), b.done[k].key),
            None => {
                let digest = store
                    .settings(&base)
                    .map_err(|e| at(format!("FROM {base}: {e}")))?
                    .digest;
                (base.clone(), blake3::hash(digest.as_bytes()))
            }
        };
        let settings = store
            .settings(&image)
            .map_err(|e| at(format!("FROM {base}: {e}")))?;
        let _ = writeln!(log, "[{n}] FROM {base}");
        let mut state = State {
            stage: n,
            image,
            sandbox: None,
            key,
            env: settings
                .env
                .iter()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
            args: BTreeMap::new(),
            workdir: settings.workdir.clone().unwrap_or_else(|| "/".into()),
            user: settings.user.clone(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            cmd: settings.cmd.clone(),
        };
        for step in &stage.steps {
            let _ = writeln!(log, "[{n}] line {}", step.line);
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
    let mut state = b.done.pop().ok_or_else(|| fail(1, "no stage".into()))?;
    let settings = ImageSettings {
        env: state.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        user: state.user.clone(),
        workdir: Some(state.workdir.clone()),
        cmd: state.cmd.clone(),
        digest: String::new(),
    };
    let id = b.sandbox(&mut state).map_err(|e| fail(line, e))?;
    let digest = commit(runtime, store, &id, req.tag, &settings).map_err(|e| fail(line, e))?;
    Ok(Built {
        digest,
        steps_run: b.run,
        steps_cached: b.cached,
    })
}

fn expand_with(state: &State, escape: char, word: &str) -> Result<String, String> {
    expand(word, escape, &|k| state.lookup(k)).map_err(|e| e.to_string())
}

fn run_step(
    b: &mut Build<'_>,
    state: &mut State,
    instruction: &Instruction,
    log: &mut dyn Write,
    global: &BTreeMap<String, String>,
) -> Result<(), String> {
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
                run(b.runtime, id, mkdir, state, Some("root"), None, log)
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
            network: _,
            heredocs,
        } => {
            if !mounts.is_empty() {
                return Err("RUN --mount is not run yet (the parser reads it)".into());
            }
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
            state.chain(instruction, b"");
            b.change(state, log, |b, id, state, log| {
                let user = state.user.clone();
                run(b.runtime, id, argv, state, user.as_deref(), stdin, log)
            })?;
        }
        Instruction::Copy { files, from } => {
            let tar = match from {
                None => context_tar(req, state, files)?,
                Some(stage) => {
                    let k = *b.stages.get(&stage.to_ascii_lowercase()).ok_or_else(|| {
                        format!("COPY --from={stage}: no earlier stage of that name")
                    })?;
                    let mut source = std::mem::replace(&mut b.done[k], placeholder(k));
                    let made = b
                        .sandbox(&mut source)
                        .and_then(|id| stage_tar(b.runtime, &id, state, files, escape));
                    b.done[k] = source;
                    made?
                }
            };
            let dest = expand_with(state, escape, &files.dest)?;
            let into = if copies_into_folder(&dest, files) {
                inside(&state.workdir, &dest)
            } else {
                parent_of(&inside(&state.workdir, &dest))
            };
            state.chain(instruction, &tar);
            b.change(state, log, |b, id, state, log| {
                let argv = vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    r#"mkdir -p "$1" && tar -x -f - -C "$1""#.into(),
                    "sh".into(),
                    into,
                ];
                run(b.runtime, id, argv, state, Some("root"), Some(tar), log)
            })?;
        }
        Instruction::Add { .. } => {
            return Err("ADD is not run yet: use COPY (and RUN curl/tar) for now".into());
        }
        Instruction::Cmd(c) | Instruction::Entrypoint(c) => {
            state.cmd = command_argv(state, c);
            state.chain(instruction, b"");
        }
        Instruction::Label(_)
        | Instruction::Expose(_)
        | Instruction::Volume(_)
        | Instruction::StopSignal(_)
        | Instruction::Healthcheck(_)
        | Instruction::Maintainer(_) => {}
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
        cmd: Vec::new(),
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

/// Runs a process in the sandbox to its end, its output going to `log`; an error unless it
/// exits 0.
fn run(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    argv: Vec<String>,
    state: &State,
    user: Option<&str>,
    stdin: Option<Vec<u8>>,
    log: &mut dyn Write,
) -> Result<(), String> {
    let mut env: Vec<String> = state.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(state.env.iter().map(|(k, v)| format!("{k}={v}")));
    let request = ExecRequest {
        argv: argv.clone(),
        env,
        cwd: Some(state.workdir.clone()),
        user: user.map(str::to_owned),
        tty: None,
    };
    let exec = runtime.exec(id, &request).map_err(|e| e.to_string())?;
    let ExecIo::Pipes {
        stdin: mut input,
        stdout,
        stderr,
    } = exec.io
    else {
        return Err("the sandbox gave a terminal".into());
    };
    let feeder = std::thread::spawn(move || {
        if let Some(bytes) = stdin {
            let _ = input.write_all(&bytes);
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = { stderr }.read_to_end(&mut bytes);
        bytes
    });
    let mut out = Vec::new();
    let _ = { stdout }.read_to_end(&mut out);
    let err = err_thread.join().unwrap_or_default();
    let _ = feeder.join();
    let _ = log.write_all(&out);
    let _ = log.write_all(&err);
    match exec.process.wait().map_err(|e| e.to_string())? {
        ExitStatus::Code(0) => Ok(()),
        status => {
            let tail = String::from_utf8_lossy(&err);
            let tail: String = tail
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            Err(format!(
                "`{}` ended with {} {}",
                argv.join(" "),
                match status {
                    ExitStatus::Code(c) => format!("exit {c}"),
                    ExitStatus::Signal(s) => format!("signal {s}"),
                },
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(":\n{tail}")
                }
            ))
        }
    }
}

/// A context path, checked: inside the context, through no symlink.
fn context_path(context: &Path, source: &str) -> Result<(PathBuf, String), String> {
    let mut rel = PathBuf::new();
    for c in Path::new(source).components() {
        match c {
            Component::Normal(p) => rel.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !rel.pop() {
                    return Err(format!("`{source}` is outside the build context"));
                }
            }
            Component::Prefix(_) => return Err(format!("`{source}` is not a path")),
        }
    }
    // No folder on the way may be a symlink: it could lead out of the context.
    let mut at = context.to_path_buf();
    for c in rel.components() {
        at.push(c);
        let meta = std::fs::symlink_metadata(&at)
            .map_err(|e| format!("`{source}`: {e} (in the build context)"))?;
        if meta.file_type().is_symlink() && at != context.join(&rel) {
            return Err(format!("`{source}` goes through a symlink"));
        }
    }
    let rel_text = rel.to_string_lossy().into_owned();
    Ok((context.join(&rel), rel_text))
}

fn owner(chown: Option<&str>) -> Result<(u64, u64), String> {
    let Some(spec) = chown else {
        return Ok((0, 0));
    };
    let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(format!(
            "--chown={spec}: give numeric ids for now (names are resolved in a later version)"
        )),
    }
}

/// The tar stream of `COPY` sources from the build context.
fn context_tar(req: &BuildRequest<'_>, state: &State, files: &Files) -> Result<Vec<u8>, String> {
    let escape = req.dockerfile.escape;
    let (uid, gid) = owner(files.chown.as_deref())?;
    let mode = files
        .chmod
        .as_deref()
        .map(|m| u32::from_str_radix(m, 8).map_err(|_| format!("--chmod={m}: not an octal mode")))
        .transpose()?;
    let dest = expand_with(state, escape, &files.dest)?;
    let into_folder = copies_into_folder(&dest, files);
    let mut tar = tar::Builder::new(Vec::new());
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
                header.set_mode(mode.unwrap_or(0o644));
                header.set_uid(uid);
                header.set_gid(gid);
                header.set_mtime(0);
                tar.append_data(&mut header, &name, body.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            CopySource::Path(raw) => {
                let source = expand_with(state, escape, raw)?;
                let sources = if is_glob(&source) {
                    glob_context(req, &source)?
                } else {
                    vec![source]
                };
                for source in sources {
                    let (path, rel) = context_path(req.context, &source)?;
                    if !rel.is_empty() && req.ignore.excludes(&rel) {
                        return Err(format!("`{source}` is left out by .dockerignore"));
                    }
                    let meta =
                        std::fs::symlink_metadata(&path).map_err(|e| format!("`{source}`: {e}"))?;
                    if meta.is_dir() {
                        add_tree(&mut tar, req, &path, &rel, Path::new(""), uid, gid, mode)?;
                    } else {
                        let name = if into_folder { leaf(&rel) } else { leaf(&dest) };
                        add_one(&mut tar, &path, Path::new(&name), uid, gid, mode)?;
                    }
                }
            }
        }
    }
    tar.into_inner().map_err(|e| e.to_string())
}

fn is_glob(source: &str) -> bool {
    source.contains(['*', '?', '['])
}

/// The context paths a `COPY` pattern matches (`*`, `?`, `[...]` within a folder, `**` across
/// them), in order; an error if none does.
fn glob_context(req: &BuildRequest<'_>, pattern: &str) -> Result<Vec<String>, String> {
    let cleaned: Vec<&str> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if cleaned.contains(&"..") {
        return Err(format!("`{pattern}` is outside the build context"));
    }
    let matcher = globset::GlobBuilder::new(&cleaned.join("/"))
        .literal_separator(true)
        .build()
        .map_err(|e| format!("`{pattern}`: {e}"))?
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
        return Err(format!("`{pattern}` matches nothing in the build context"));
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

#[allow(clippy::too_many_arguments)]
fn add_tree(
    tar: &mut tar::Builder<Vec<u8>>,
    req: &BuildRequest<'_>,
    dir: &Path,
    rel: &str,
    name: &Path,
    uid: u64,
    gid: u64,
    mode: Option<u32>,
) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let file_name = entry.file_name();
        let child_rel = if rel.is_empty() {
            file_name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", file_name.to_string_lossy())
        };
        if req.ignore.excludes(&child_rel) {
            continue;
        }
        let child_name = name.join(&file_name);
        let path = entry.path();
        add_one(tar, &path, &child_name, uid, gid, mode)?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            add_tree(tar, req, &path, &child_rel, &child_name, uid, gid, mode)?;
        }
    }
    Ok(())
}

fn add_one(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    name: &Path,
    uid: u64,
    gid: u64,
    mode: Option<u32>,
) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&meta);
    header.set_uid(uid);
    header.set_gid(gid);
    if let Some(m) = mode
        && !meta.file_type().is_symlink()
    {
        header.set_mode(m);
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| e.to_string())?;
        tar.append_link(&mut header, name, target)
            .map_err(|e| e.to_string())
    } else if meta.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, name, std::io::empty())
            .map_err(|e| e.to_string())
    } else if meta.is_file() {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        tar.append_data(&mut header, name, file)
            .map_err(|e| e.to_string())
    } else {
        Err(format!(
            "{}: only files, folders and symlinks are copied",
            path.display()
        ))
    }
}

/// The tar stream of `COPY --from=<stage>` sources, made inside that stage's sandbox.
fn stage_tar(
    runtime: &dyn Runtime,
    source: &WorkspaceId,
    state: &State,
    files: &Files,
    escape: char,
) -> Result<Vec<u8>, String> {
    let dest = expand_with(state, escape, &files.dest)?;
    let into_folder = copies_into_folder(&dest, files);
    let mut all = Vec::new();
    for s in &files.sources {
        let CopySource::Path(raw) = s else {
            return Err("a here-document cannot come --from a stage".into());
        };
        let path = inside("/", &expand_with(state, escape, raw)?);
        let (parent, name) = (parent_of(&path), leaf(&path));
        // A folder's contents go under the destination; a file goes by its name, or by the
        // destination's when that names a file.
        let script = r#"if [ -d "$1/$2" ]; then tar -c -f - -C "$1/$2" .; else tar -c -f - -C "$1" "$2"; fi"#;
        let argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            parent,
            name.clone(),
        ];
        let (code, out, err) = capture(runtime, source, argv)?;
        if code != 0 {
            return Err(format!(
                "COPY --from: {}",
                String::from_utf8_lossy(&err).trim()
            ));
        }
        let rename = (!into_folder).then(|| (name, leaf(&dest)));
        all.push((out, rename));
    }
    // One archive of them all, with a file renamed where the destination names it.
    let mut joined = tar::Builder::new(Vec::new());
    for (bytes, rename) in all {
        let mut archive = tar::Archive::new(&bytes[..]);
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let mut header = entry.header().clone();
            let mut path = entry.path().map_err(|e| e.to_string())?.into_owned();
            if let Some((from, to)) = &rename
                && path == Path::new(from)
            {
                path = PathBuf::from(to);
            }
            if header.entry_type().is_symlink() || header.entry_type().is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                joined
                    .append_link(&mut header, &path, target)
                    .map_err(|e| e.to_string())?;
            } else {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
                joined
                    .append_data(&mut header, &path, &data[..])
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    joined.into_inner().map_err(|e| e.to_string())
}

/// A process started in a sandbox as root from `/` with no input: its output to read, its
/// error output being collected, and its control.
struct Started {
    stdout: std::fs::File,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    process: Box<dyn warren_runtime::Process>,
}

impl Started {
    fn new(runtime: &dyn Runtime, id: &WorkspaceId, argv: Vec<String>) -> Result<Self, String> {
        let exec = runtime
            .exec(
                id,
                &ExecRequest {
                    argv,
                    env: Vec::new(),
                    cwd: Some("/".into()),
                    user: Some("root".into()),
                    tty: None,
                },
            )
            .map_err(|e| e.to_string())?;
        let ExecIo::Pipes {
            stdin,
            stdout,
            stderr,
        } = exec.io
        else {
            return Err("the sandbox gave a terminal".into());
        };
        drop(stdin);
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = { stderr }.read_to_end(&mut bytes);
            bytes
        });
        Ok(Self {
            stdout,
            stderr,
            process: exec.process,
        })
    }

    /// Its exit code and error output, once it ends (its output read or dropped first).
    fn finish(self) -> Result<(i32, Vec<u8>), String> {
        drop(self.stdout);
        let err = self.stderr.join().unwrap_or_default();
        let code = self
            .process
            .wait()
            .map_err(|e| e.to_string())?
            .as_shell_code();
        Ok((code, err))
    }
}

/// Runs a process in a sandbox as root; its exit code, stdout and stderr.
fn capture(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    argv: Vec<String>,
) -> Result<(i32, Vec<u8>, Vec<u8>), String> {
    let mut started = Started::new(runtime, id, argv)?;
    let mut out = Vec::new();
    let _ = started.stdout.read_to_end(&mut out);
    let (code, err) = started.finish()?;
    Ok((code, out, err))
}

/// Streams the sandbox's tree out (its own filesystem only: not /proc, /sys, /dev or binds)
/// and stores it.
fn commit(
    runtime: &dyn Runtime,
    store: &dyn ImageStore,
    id: &WorkspaceId,
    name: &str,
    settings: &ImageSettings,
) -> Result<String, String> {
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
    let mut started = Started::new(runtime, id, argv.map(String::from).to_vec())
        .map_err(|e| format!("cannot read the result: {e}"))?;
    let stored = store.store(name, &mut started.stdout, settings);
    let (code, err) = started.finish()?;
    // GNU tar exits 1 when a file changed while it was read (logs, sockets): still an image.
    if code > 1 {
        return Err(format!(
            "reading the result failed: {}",
            String::from_utf8_lossy(&err).trim()
        ));
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

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
                .contains("matches nothing")
        );
        assert!(glob_context(&req, "../*").unwrap_err().contains("outside"));
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
                .contains("outside")
        );
        assert!(
            context_path(ctx.path(), "src/../../x")
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            context_path(ctx.path(), "escape/shadow")
                .unwrap_err()
                .contains("symlink")
        );
        // The symlink itself is copied as a link, not followed.
        assert!(context_path(ctx.path(), "escape").is_ok());
        assert_eq!(owner(Some("1000:100")).unwrap(), (1000, 100));
        assert!(owner(Some("dev")).is_err());
    }
}
