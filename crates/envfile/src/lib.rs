//! Environment files -> one validated [`EnvSpec`].
//!
//! Warren reads three kinds of file (see `docs/environment-file.md`): its own `warren.yml`,
//! Hocus's `hocus.yml` as Hocus defined it, and the Development Containers specification's
//! `devcontainer.json`. Each is parsed into a located value tree ([`tree`]), then a reader per
//! format walks the tree into an [`EnvSpec`], collecting every error and warning with its file,
//! line and column. Parsing is pure ([`parse`]); [`load`] adds discovery and the checks that need
//! the checked-out repository (referenced files exist and no symlink leads out of it).
//!
//! This crate does not run anything: it neither builds images nor resolves `${containerEnv:..}`
//! (the runtime does, with [`expand_container_env`]).

mod devcontainer;
mod diag;
mod discover;
mod fields;
mod hocus;
mod jsonc;
mod model;
mod reader;
mod tree;
mod vars;
mod warren;
mod workspace;
mod yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Pos, Severity};
pub use discover::{CANDIDATES, Discovered, discover};
pub use fields::check_image_reference;
pub use model::{
    ByteSize, Command, EnvSpec, Format, ImageSource, Phase, Port, RepoPath, Resources, RuntimeKind,
    Shell, SourceFile, Task,
};
pub use vars::expand_container_env;
pub use workspace::{read_options, session_user, workspace_tasks};

use diag::Diagnostics;
use fields::{PathKind, PathRef};
use reader::Draft;
use tree::{Cx, Dialect};

/// The largest environment file Warren reads.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// What the "local" side of `devcontainer.json` variables means for this read.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// `${localEnv:NAME}`: for a prebuild, the project's environment variables.
    pub local_env: BTreeMap<String, String>,
    /// `${localWorkspaceFolder}`: where the repository is checked out on the reading machine.
    /// When unset, `/src/<repository folder name>` is used.
    pub local_workspace_folder: Option<String>,
}

/// A file that was read successfully, with the warnings it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub spec: EnvSpec,
    pub warnings: Vec<Diagnostic>,
}

/// A file that could not be used: every error found, and the warnings too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} has {} error(s)", errors.len())]
pub struct Rejected {
    /// Relative to the repository root.
    pub file: String,
    /// The file's text, for rendering the diagnostics with their source lines.
    pub text: String,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Rejected {
    /// Every error with its position and source line, as a user reads them.
    pub fn render_errors(&self) -> String {
        self.errors.iter().map(|d| d.render(&self.text)).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no environment file in `{dir}`: expected one of {}", CANDIDATES.join(", "))]
    NotFound { dir: String },
    #[error(
        "no environment file in `{dir}`, but found {}; name one of them explicitly",
        found.join(", ")
    )]
    OnlyNested { dir: String, found: Vec<String> },
    #[error(
        "`{file}` is not an environment file name; expected warren.yml, hocus.yml or devcontainer.json"
    )]
    UnknownName { file: String },
    #[error("`{path}` is outside the repository `{}`", repo.display())]
    OutsideRepository { path: String, repo: PathBuf },
    #[error("cannot read `{}`: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

/// Which format a file name is, if any.
pub fn format_of(file_name: &str) -> Option<Format> {
    match file_name {
        "warren.yml" | "warren.yaml" => Some(Format::Warren),
        "hocus.yml" | "hocus.yaml" | ".hocus.yml" | ".hocus.yaml" => Some(Format::Hocus),
        "devcontainer.json" | ".devcontainer.json" => Some(Format::DevContainer),
        _ => None,
    }
}

/// Parses one environment file's text. `file` is its path in the repository; relative paths in
/// it resolve against its folder and may not leave the repository.
pub fn parse(
    file: &RepoPath,
    format: Format,
    text: &str,
    options: &ReadOptions,
) -> Result<Loaded, Rejected> {
    parse_draft(file, format, text, options).map(|(loaded, _)| loaded)
}

fn parse_draft(
    file: &RepoPath,
    format: Format,
    text: &str,
    options: &ReadOptions,
) -> Result<(Loaded, Vec<PathRef>), Rejected> {
    let mut diags = Diagnostics::new(file.as_str());
    let mut draft = Draft::new(file.clone(), format);
    if text.len() > MAX_FILE_BYTES {
        diags.error(
            Pos::START,
            format!(
                "the file is {} bytes; the limit is {MAX_FILE_BYTES}",
                text.len()
            ),
        );
    } else {
        let dialect = match format {
            Format::Warren | Format::Hocus => Dialect::Yaml,
            Format::DevContainer => Dialect::Json,
        };
        let root = match dialect {
            Dialect::Yaml => yaml::parse(text, &mut diags),
            Dialect::Json => jsonc::parse(text, &mut diags),
        };
        if let Some(root) = root {
            let mut cx = Cx {
                diags: &mut diags,
                dialect,
            };
            match format {
                Format::Warren => warren::read(&mut cx, &root, &mut draft),
                Format::Hocus => hocus::read(&mut cx, &root, &mut draft),
                Format::DevContainer => {
                    let folder = options
                        .local_workspace_folder
                        .clone()
                        .unwrap_or_else(|| "/src/repository".to_owned());
                    let ctx = devcontainer::Context {
                        vars: vars::Vars {
                            local_env: &options.local_env,
                            local_workspace_folder: &folder,
                            container_workspace_folder: None,
                        },
                    };
                    devcontainer::read(&mut cx, &root, &mut draft, &ctx);
                }
            }
        }
    }
    finish(diags, text, draft.spec).map(|loaded| (loaded, draft.paths))
}

fn finish(diags: Diagnostics, text: &str, spec: EnvSpec) -> Result<Loaded, Rejected> {
    let file = spec.source.path.to_string();
    let (errors, warnings) = diags.into_parts();
    if errors.is_empty() {
        Ok(Loaded { spec, warnings })
    } else {
        Err(Rejected {
            file,
            text: text.to_owned(),
            errors,
            warnings,
        })
    }
}

/// Reads the environment of the repository checked out at `repo_root`. `target` is either a
/// folder (the project's root folder; the file is discovered there) or an environment file.
pub fn load(
    repo_root: &Path,
    target: &RepoPath,
    options: &ReadOptions,
) -> Result<Loaded, SpecError> {
    let root = repo_root.canonicalize().map_err(|cause| SpecError::Read {
        path: repo_root.to_path_buf(),
        cause,
    })?;
    let on_disk = target.on_disk(&root);
    let (file, mut extra_warnings) = if on_disk.is_dir() {
        let found = discover(&root, target)?;
        (found.file, found.ignored)
    } else {
        (target.clone(), Vec::new())
    };
    let name = file.as_str().rsplit('/').next().unwrap_or_default();
    let format = format_of(name).ok_or_else(|| SpecError::UnknownName {
        file: file.to_string(),
    })?;
    let path = file.on_disk(&root);
    let real = path.canonicalize().map_err(|cause| SpecError::Read {
        path: path.clone(),
        cause,
    })?;
    if !real.starts_with(&root) {
        return Err(SpecError::OutsideRepository {
            path: file.to_string(),
            repo: root,
        });
    }
    let bytes = std::fs::read(&real).map_err(|cause| SpecError::Read {
        path: path.clone(),
        cause,
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = diag::LineIndex::new(
                std::str::from_utf8(&e.as_bytes()[..e.utf8_error().valid_up_to()])
                    .unwrap_or_default(),
            )
            .pos(e.utf8_error().valid_up_to());
            let mut diags = Diagnostics::new(file.as_str());
            diags.error(at, "the file is not valid UTF-8");
            let (errors, warnings) = diags.into_parts();
            return Err(Rejected {
                file: file.to_string(),
                text: String::new(),
                errors,
                warnings,
            }
            .into());
        }
    };
    let mut options = options.clone();
    if options.local_workspace_folder.is_none() {
        options.local_workspace_folder = Some(root.display().to_string());
    }
    let (loaded, paths) = match parse_draft(&file, format, &text, &options) {
        Ok(ok) => ok,
        Err(mut rejected) => {
            rejected.warnings.splice(0..0, extra_warnings);
            return Err(rejected.into());
        }
    };
    let mut diags = Diagnostics::new(file.as_str());
    for path_ref in &paths {
        check_on_disk(&root, path_ref, &mut diags);
    }
    let (errors, warnings) = diags.into_parts();
    extra_warnings.extend(loaded.warnings);
    extra_warnings.extend(warnings);
    if errors.is_empty() {
        Ok(Loaded {
            spec: loaded.spec,
            warnings: extra_warnings,
        })
    } else {
        Err(Rejected {
            file: file.to_string(),
            text,
            errors,
            warnings: extra_warnings,
        }
        .into())
    }
}

/// A referenced path must exist, be of the right kind, and not lead out of the repository
/// through a symlink.
fn check_on_disk(root: &Path, path_ref: &PathRef, diags: &mut Diagnostics) {
    let PathRef {
        path,
        pos,
        field,
        kind,
    } = path_ref;
    let real = match path.on_disk(root).canonicalize() {
        Ok(real) => real,
        Err(_) => {
            diags.error(
                *pos,
                format!("`{field}`: `{path}` does not exist in the repository"),
            );
            return;
        }
    };
    if !real.starts_with(root) {
        diags.error(
            *pos,
            format!("`{field}`: `{path}` is a symlink that leads out of the repository"),
        );
        return;
    }
    match kind {
        PathKind::File if !real.is_file() => {
            diags.error(*pos, format!("`{field}`: `{path}` is not a file"))
        }
        PathKind::Dir if !real.is_dir() => {
            diags.error(*pos, format!("`{field}`: `{path}` is not a folder"))
        }
        _ => {}
    }
}
