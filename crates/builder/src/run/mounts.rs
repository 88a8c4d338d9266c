//! `RUN --mount`: what a step sees at a path while it runs, and not in the image after it.
//!
//! - `type=cache`: a folder kept on the host between builds (by `id`, default the target),
//!   stored as a tar file there — never unpacked on the host — and unpacked into the sandbox
//!   for the step, packed back after it;
//! - `type=tmpfs`: an empty folder for the step;
//! - `type=bind`: a folder of the context (or, with `from=`, of an earlier stage), part of the
//!   step's cache key like a COPY's files.
//!
//! Whatever the image had at the target is moved aside for the step and put back after it.
//! `type=secret` and `type=ssh` are refused: builds get no secrets.

use std::io::Read;
use std::path::PathBuf;

use warren_runtime::WorkspaceId;

use super::{Build, CopySource, Files, Started, State, Step, expand_with, inside, run};
use crate::{BuildError, Mount};

/// A prepared mount.
pub(super) struct RunMount {
    target: String,
    content: Content,
    /// Folder mode and owner (`mode=`, `uid=`, `gid=`).
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
}

enum Content {
    Empty,
    /// A tar of what is bound.
    Bound(super::Spooled),
    /// The cache's tar file on the host (absent until a first step wrote it).
    Cache(PathBuf),
}

impl RunMount {
    /// What goes into the step's cache key.
    pub(super) fn key(&self) -> Result<Vec<u8>, BuildError> {
        let mut k = self.target.clone().into_bytes();
        if let Content::Bound(tar) = &self.content {
            k.extend_from_slice(super::tar_key(tar.reader()?)?.as_bytes());
        }
        Ok(k)
    }
}

fn number(m: &Mount, option: &str) -> Result<Option<u32>, BuildError> {
    m.options
        .get(option)
        .map(|v| {
            let parsed = if option == "mode" {
                u32::from_str_radix(v.trim_start_matches("0o"), 8)
            } else {
                v.parse()
            };
            parsed.map_err(|_| BuildError::Refused(format!("--mount {option}={v}: not a number")))
        })
        .transpose()
}

impl Build<'_> {
    /// Checks a step's mounts and gathers what they bring.
    pub(super) fn prepare_mounts(
        &mut self,
        state: &State,
        mounts: &[Mount],
    ) -> Result<Vec<RunMount>, BuildError> {
        let escape = self.req.dockerfile.escape;
        let mut out = Vec::new();
        for m in mounts {
            let raw = m.target.as_deref().ok_or_else(|| {
                BuildError::Refused(format!("--mount type={}: which target?", m.kind))
            })?;
            let target = inside(&state.workdir, &expand_with(state, escape, raw)?);
            if target == "/" {
                return Err(BuildError::refused("--mount: the target cannot be /"));
            }
            let content = match m.kind.as_str() {
                "cache" => {
                    let root = self.req.mount_cache.ok_or_else(|| {
                        BuildError::refused(
                            "RUN --mount=type=cache: this build has no folder for caches",
                        )
                    })?;
                    let id = m
                        .options
                        .get("id")
                        .cloned()
                        .unwrap_or_else(|| target.clone());
                    // Per scope (project): one project's cache is never another's.
                    let mut h = blake3::Hasher::new();
                    h.update(self.req.cache_scope.as_bytes());
                    h.update(b"\0");
                    h.update(id.as_bytes());
                    let name = h.finalize().to_hex();
                    Content::Cache(root.join(format!("{}.tar", &name[..32])))
                }
                "tmpfs" => Content::Empty,
                "bind" => {
                    let source = m.options.get("source").map_or(".", String::as_str);
                    let files = Files {
                        sources: vec![CopySource::Path(source.to_owned())],
                        dest: "./".into(),
                        chown: None,
                        chmod: None,
                        link: false,
                        exclude: Vec::new(),
                    };
                    let tar = match m.options.get("from") {
                        None => {
                            let (path, _) = super::context_path(self.req.context, source)?;
                            if !path.is_dir() {
                                return Err(BuildError::Refused(format!(
                                    "--mount=type=bind,source={source}: only folders are bound"
                                )));
                            }
                            super::context_tar(self.req, state, &files, &Default::default())?
                        }
                        Some(stage) => self.stage_files(
                            stage,
                            state,
                            &files,
                            &Default::default(),
                            "--mount from",
                        )?,
                    };
                    Content::Bound(tar)
                }
                kind @ ("secret" | "ssh") => {
                    return Err(BuildError::Refused(format!(
                        "RUN --mount=type={kind}: builds run without secrets or keys"
                    )));
                }
                other => {
                    return Err(BuildError::Refused(format!(
                        "RUN --mount=type={other}: no such mount type"
                    )));
                }
            };
            let owner = match (number(m, "uid")?, number(m, "gid")?) {
                (None, None) => None,
                (u, g) => Some((u.unwrap_or(0), g.unwrap_or(0))),
            };
            out.push(RunMount {
                target,
                content,
                mode: number(m, "mode")?,
                owner,
            });
        }
        Ok(out)
    }

    /// Puts the mounts' content in place before the step.
    pub(super) fn mount(&self, id: &WorkspaceId, mounts: &[RunMount]) -> Result<(), BuildError> {
        const SCRIPT: &str = r#"set -e
t="$1"
if [ -e "$t" ] || [ -L "$t" ]; then rm -rf "$t.warren-hidden"; mv "$t" "$t.warren-hidden"; fi
mkdir -p "$t"
if [ "$2" = 1 ]; then tar -x -f - -C "$t"; fi
if [ -n "$3" ]; then chmod "$3" "$t"; fi
if [ -n "$4" ]; then chown "$4" "$t"; fi
"#;
        for m in mounts {
            let stdin: Option<Box<dyn Read + Send>> = match &m.content {
                Content::Empty => None,
                Content::Bound(tar) => Some(Box::new(tar.reader()?)),
                Content::Cache(file) => match std::fs::File::open(file) {
                    Ok(f) => Some(Box::new(f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(BuildError::io("the build's cache")(e)),
                },
            };
            let has = if stdin.is_some() { "1" } else { "0" };
            let mode = m.mode.map(|m| format!("{m:o}")).unwrap_or_default();
            let owner = m.owner.map(|(u, g)| format!("{u}:{g}")).unwrap_or_default();
            self.root_script(id, SCRIPT, &[&m.target, has, &mode, &owner], stdin)?;
        }
        Ok(())
    }

    /// After the step: caches packed back to the host, every target as it was.
    pub(super) fn unmount(&self, id: &WorkspaceId, mounts: &[RunMount]) -> Result<(), BuildError> {
        const SCRIPT: &str = r#"set -e
t="$1"
rm -rf "$t"
if [ -e "$t.warren-hidden" ] || [ -L "$t.warren-hidden" ]; then mv "$t.warren-hidden" "$t"; else mkdir -p "$t"; fi
"#;
        for m in mounts.iter().rev() {
            if let Content::Cache(file) = &m.content {
                save_cache(self.runtime, id, &m.target, file, self.req.stop())?;
            }
            self.root_script(id, SCRIPT, &[&m.target], None)?;
        }
        Ok(())
    }

    fn root_script(
        &self,
        id: &WorkspaceId,
        script: &str,
        args: &[&str],
        stdin: Option<Box<dyn Read + Send>>,
    ) -> Result<(), BuildError> {
        let mut argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        run(
            self.runtime,
            id,
            Step {
                argv,
                env: Vec::new(),
                cwd: "/".into(),
                user: Some("root".into()),
                stdin,
                no_network: false,
            },
            &mut std::io::sink(),
            self.req.stop(),
        )
        .map_err(|e| e.at(format_args!("--mount at {}", args.first().unwrap_or(&""))))
    }
}

/// Packs the cache folder into its tar file on the host (written whole, then renamed).
/// Most a `RUN --mount=type=cache` folder keeps between builds (a file on the host's disk).
const CACHE_LIMIT: u64 = 10 << 30;

fn save_cache(
    runtime: &dyn warren_runtime::Runtime,
    id: &WorkspaceId,
    target: &str,
    file: &std::path::Path,
    stop: super::Stop<'_>,
) -> Result<(), BuildError> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(BuildError::io(dir.display()))?;
    }
    let argv = ["tar", "-c", "-f", "-", "--numeric-owner", "-C", target, "."]
        .map(String::from)
        .to_vec();
    let started = Started::new(runtime, id, argv)?;
    let partial = file.with_extension(format!("tar.{}", std::process::id()));
    let written = std::fs::File::create(&partial)
        .map_err(BuildError::io(partial.display()))
        .and_then(|mut out| {
            super::read_bounded(
                runtime,
                id,
                &started,
                stop,
                CACHE_LIMIT,
                &format!("packing the cache at {target}"),
                &mut out,
            )?;
            out.sync_all().map_err(BuildError::io(partial.display()))
        });
    let (code, err) = started.finish()?;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if code > 1 {
        let _ = std::fs::remove_file(&partial);
        return Err(BuildError::Refused(format!(
            "cannot pack the cache at {target}: {}",
            String::from_utf8_lossy(&err).trim()
        )));
    }
    std::fs::rename(&partial, file).map_err(BuildError::io(file.display()))
}
