//! A prebuild: a project's environment at one commit, made ready ahead of time. From a
//! checkout of the commit (see [`crate::git`]), it reads the environment file, builds the
//! environment's image, copies the checkout into the workspace folder, runs the prebuild tasks
//! and stores the result as the prebuild image — every step in a sandbox of the runtime. It can
//! then start the image once, running the workspace tasks, to record which chunks a start
//! reads, so later cold starts prefetch them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use warren_envfile::{EnvSpec, ImageSource, Phase, RepoPath};
pub use warren_envfile::{read_options, session_user, workspace_tasks};
use warren_runtime::Runtime;

use crate::run::{Sandbox, Step, StepLimits, Stop, commit, run};
use crate::{BuildError, BuildRequest, Ignore, ImageStore};

/// What to prebuild.
#[derive(Debug)]
pub struct PrebuildRequest<'a> {
    /// The repository's work tree at the commit, with its `.git`.
    pub checkout: &'a Path,
    /// Identifies the repository in the prebuild's key (its URL).
    pub repository: &'a str,
    pub commit: &'a str,
    /// The project's root folder, or its environment file, relative to the repository.
    pub target: &'a str,
    /// The project's environment variables (never a user's secrets).
    pub variables: &'a [(String, String)],
    /// Names the prebuild's sandboxes: a-z, 0-9 and -.
    pub sandbox_prefix: &'a str,
    /// Start the result once for this long to record its access trace (`None`: do not).
    pub record_trace: Option<Duration>,
    pub cancel: Option<&'a AtomicBool>,
    /// Where the builds' `RUN --mount=type=cache` folders are kept.
    pub mount_cache: Option<&'a Path>,
    /// Whose prebuilds and build caches this one may reuse (the project's id; empty for a
    /// local `warren prebuild`).
    pub scope: &'a str,
    /// What each build step and prebuild task may use.
    pub limits: StepLimits,
    /// Where what its build copies is spooled, and how much at once.
    pub spool: crate::Spool,
}

/// A finished prebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prebuilt {
    /// The prebuild image (`warren-prebuild:<key>`).
    pub image: String,
    pub digest: String,
    /// The environment file, relative to the repository, and its text.
    pub env_file: String,
    pub env_text: String,
    /// The image was there already: a prebuild of the same key was made before.
    pub reused: bool,
    pub steps_run: usize,
    pub steps_cached: usize,
}

/// The key a prebuild is stored and reused by: whose it is (the project), the repository,
/// the commit, where the environment is read from, the environment file's content, and the
/// project's variables (they reach the build).
pub fn prebuild_key(
    scope: &str,
    repository: &str,
    commit: &str,
    target: &str,
    env_text: &str,
    variables: &[(String, String)],
) -> String {
    let mut h = blake3::Hasher::new();
    for part in [scope, repository, commit, target] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    h.update(blake3::hash(env_text.as_bytes()).as_bytes());
    for (k, v) in variables {
        for part in [k, v] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize().to_hex()[..32].to_owned()
}

fn cancelled(req: &PrebuildRequest<'_>) -> Result<(), BuildError> {
    if req.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        Err(BuildError::Cancelled)
    } else {
        Ok(())
    }
}

/// The environment file of the checkout, read and checked; errors name the file, line and
/// column.
fn environment(req: &PrebuildRequest<'_>) -> Result<(EnvSpec, String), BuildError> {
    let target = if req.target.is_empty() {
        RepoPath::root()
    } else {
        RepoPath::resolve(&RepoPath::root(), req.target)
            .map_err(|e| BuildError::Refused(format!("`{}`: {e}", req.target)))?
    };
    match warren_envfile::load(req.checkout, &target, &read_options(req.repository)) {
        Ok(loaded) => {
            let text = std::fs::read_to_string(loaded.spec.source.path.on_disk(req.checkout))
                .map_err(BuildError::io(&loaded.spec.source.path))?;
            Ok((loaded.spec, text))
        }
        Err(warren_envfile::SpecError::Rejected(r)) => Err(BuildError::Refused(r.render_errors())),
        Err(e) => Err(BuildError::Refused(e.to_string())),
    }
}

/// A path of the checkout named by the environment file, which must stay inside it.
fn in_checkout(checkout: &Path, path: &RepoPath) -> Result<PathBuf, BuildError> {
    let root = checkout
        .canonicalize()
        .map_err(BuildError::io("the checkout"))?;
    let real = path
        .on_disk(&root)
        .canonicalize()
        .map_err(BuildError::io(path))?;
    if real.starts_with(&root) {
        Ok(real)
    } else {
        Err(BuildError::Refused(format!(
            "{path} leads out of the repository"
        )))
    }
}

/// Builds the environment's image (or checks the named one is here); its reference.
fn environment_image(
    runtime: &dyn Runtime,
    store: &dyn ImageStore,
    req: &PrebuildRequest<'_>,
    spec: &EnvSpec,
    key: &str,
    log: &mut dyn Write,
) -> Result<(String, usize, usize), BuildError> {
    match &spec.image {
        ImageSource::Reference { reference } => {
            crate::run::refuse_reserved(reference)
                .map_err(|e| BuildError::Refused(format!("image {e}")))?;
            store
                .settings(reference)
                .map_err(|e| BuildError::Store(format!("image {reference}: {e}")))?;
            Ok((reference.clone(), 0, 0))
        }
        ImageSource::Dockerfile {
            dockerfile,
            context,
            args,
            target,
        } => {
            let file = in_checkout(req.checkout, dockerfile)?;
            let context_dir = in_checkout(req.checkout, context)?;
            let text = std::fs::read_to_string(&file).map_err(BuildError::io(dockerfile))?;
            let shown = dockerfile.to_string();
            let mut parsed =
                crate::parse(&shown, &text).map_err(|e| BuildError::Refused(e.to_string()))?;
            if let Some(target) = target {
                let at = parsed
                    .stages
                    .iter()
                    .position(|s| {
                        s.name
                            .as_deref()
                            .is_some_and(|n| n.eq_ignore_ascii_case(target))
                    })
                    .ok_or_else(|| {
                        BuildError::Refused(format!("{shown} has no stage named `{target}`"))
                    })?;
                parsed.stages.truncate(at + 1);
            }
            let ignore = match std::fs::read_to_string(context_dir.join(".dockerignore")) {
                Ok(text) => Ignore::parse(&text).map_err(BuildError::Refused)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Ignore::parse("").map_err(BuildError::Refused)?
                }
                Err(e) => return Err(BuildError::io(format_args!("{context}/.dockerignore"))(e)),
            };
            let tag = format!("warren-env:{key}");
            let prefix = format!("{}-env", req.sandbox_prefix);
            let build_args: BTreeMap<String, String> = args.clone();
            let _ = writeln!(log, "building the environment from {shown}");
            let built = crate::build(
                runtime,
                store,
                &BuildRequest {
                    dockerfile: &parsed,
                    file: &shown,
                    context: &context_dir,
                    ignore: &ignore,
                    build_args: &build_args,
                    tag: &tag,
                    sandbox_prefix: &prefix,
                    cancel: req.cancel,
                    mount_cache: req.mount_cache,
                    cache_scope: req.scope,
                    limits: req.limits,
                    spool: req.spool.clone(),
                },
                log,
            )?;
            Ok((tag, built.steps_run, built.steps_cached))
        }
    }
}

/// The checkout as a tar stream (symlinks as symlinks, never followed).
fn checkout_tar(checkout: &Path) -> Result<Vec<u8>, BuildError> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    tar.append_dir_all(".", checkout)
        .map_err(BuildError::io("cannot pack the checkout"))?;
    tar.into_inner()
        .map_err(BuildError::io("cannot pack the checkout"))
}

/// Makes the prebuild (or finds it made before under the same key).
pub fn prebuild(
    runtime: &dyn Runtime,
    store: &dyn ImageStore,
    req: &PrebuildRequest<'_>,
    log: &mut dyn Write,
) -> Result<Prebuilt, BuildError> {
    let (spec, env_text) = environment(req)?;
    let env_file = spec.source.path.to_string();
    let key = prebuild_key(
        req.scope,
        req.repository,
        req.commit,
        req.target,
        &env_text,
        req.variables,
    );
    let image = format!("warren-prebuild:{key}");
    let _ = writeln!(log, "environment file {env_file}; prebuild {image}");
    if let Ok(found) = store.settings(&image) {
        let _ = writeln!(log, "made before: reusing it");
        return Ok(Prebuilt {
            image,
            digest: found.digest,
            env_file,
            env_text,
            reused: true,
            steps_run: 0,
            steps_cached: 0,
        });
    }
    let (base, steps_run, steps_cached) = environment_image(runtime, store, req, &spec, &key, log)?;
    let _ = writeln!(
        log,
        "environment: {steps_run} steps run, {steps_cached} from the cache"
    );
    cancelled(req)?;
    let settings = store.settings(&base)?;
    let sandbox = Sandbox::start(
        runtime,
        &format!("{}-pb", req.sandbox_prefix),
        &base,
        None,
        &req.limits,
    )?;
    let stop = Stop {
        cancel: req.cancel,
        time: req.limits.time,
    };
    let folder = spec.workspace_folder.clone();
    let user = session_user(&spec);
    let _ = writeln!(log, "checking out {} into {folder}", req.commit);
    let unpack =
        r#"mkdir -p "$1" && tar -x -f - -C "$1" && if [ -n "$2" ]; then chown -R "$2:" "$1"; fi"#;
    run(
        runtime,
        &sandbox.id,
        Step {
            argv: [
                "/bin/sh",
                "-c",
                unpack,
                "sh",
                &folder,
                user.as_deref().unwrap_or(""),
            ]
            .map(String::from)
            .to_vec(),
            env: Vec::new(),
            cwd: "/".into(),
            user: Some("root".into()),
            stdin: Some(Box::new(std::io::Cursor::new(checkout_tar(req.checkout)?))),
            no_network: false,
        },
        log,
        stop,
    )?;
    let mut env = settings.env.clone();
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    env.extend(req.variables.iter().map(|(k, v)| format!("{k}={v}")));
    let mut tasks: Vec<_> = spec.tasks_in(Phase::Prebuild).collect();
    tasks.sort_by_key(|t| t.stage);
    for task in tasks {
        cancelled(req)?;
        let _ = writeln!(log, "prebuild task {}", task.name);
        run(
            runtime,
            &sandbox.id,
            Step {
                argv: task.command.argv(task.shell),
                env: env.clone(),
                cwd: folder.clone(),
                user: user.clone(),
                stdin: None,
                no_network: false,
            },
            log,
            stop,
        )
        .map_err(|e| e.at(format_args!("prebuild task `{}`", task.name)))?;
    }
    cancelled(req)?;
    let _ = writeln!(log, "storing {image}");
    let digest = commit(runtime, store, &sandbox.id, &image, &settings, stop)?;
    drop(sandbox);
    if let Some(duration) = req.record_trace {
        record_trace(runtime, req, &spec, &image, duration, log)?;
    }
    Ok(Prebuilt {
        image,
        digest,
        env_file,
        env_text,
        reused: false,
        steps_run,
        steps_cached,
    })
}

/// Starts the prebuild image once with its workspace tasks, recording what the start reads;
/// the image mount stores the trace with the image when the sandbox goes.
fn record_trace(
    runtime: &dyn Runtime,
    req: &PrebuildRequest<'_>,
    spec: &EnvSpec,
    image: &str,
    duration: Duration,
    log: &mut dyn Write,
) -> Result<(), BuildError> {
    let _ = writeln!(
        log,
        "recording the first start's reads for {}s",
        duration.as_secs()
    );
    let sandbox = Sandbox::start(
        runtime,
        &format!("{}-trace", req.sandbox_prefix),
        image,
        Some(duration.as_secs().max(1)),
        &req.limits,
    )?;
    if let Err(e) = runtime.start_tasks(&sandbox.id, &workspace_tasks(spec)) {
        let _ = writeln!(log, "warning: the workspace tasks did not start: {e}");
    }
    let until = Instant::now() + duration;
    while Instant::now() < until {
        cancelled(req)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_folder_is_named_after_the_repository() {
        for (url, folder) in [
            ("https://example.org/team/app.git", "/src/app"),
            ("file:///srv/git/notes/", "/src/notes"),
            ("git@example.org:team/tool.git", "/src/tool"),
        ] {
            assert_eq!(
                read_options(url).local_workspace_folder.as_deref(),
                Some(folder)
            );
        }
    }

    #[test]
    fn the_key_follows_every_part() {
        let vars = |v: &str| vec![("A".to_owned(), v.to_owned())];
        let k = prebuild_key("p1", "u", "c", "", "env", &vars("1"));
        assert_eq!(k.len(), 32);
        assert_eq!(k, prebuild_key("p1", "u", "c", "", "env", &vars("1")));
        for other in [
            prebuild_key("p2", "u", "c", "", "env", &vars("1")),
            prebuild_key("p1", "v", "c", "", "env", &vars("1")),
            prebuild_key("p1", "u", "d", "", "env", &vars("1")),
            prebuild_key("p1", "u", "c", "sub", "env", &vars("1")),
            prebuild_key("p1", "u", "c", "", "env2", &vars("1")),
            prebuild_key("p1", "u", "c", "", "env", &vars("2")),
            prebuild_key("p1", "u", "c", "", "env", &[]),
        ] {
            assert_ne!(k, other);
        }
    }
}
