//! Finding the environment file of a project's root folder.
//!
//! Precedence, first match wins: `warren.yml`, `warren.yaml`, `hocus.yml`, `hocus.yaml`,
//! `.hocus.yml`, `.hocus.yaml`, `.devcontainer/devcontainer.json`, `.devcontainer.json`.
//! The native file wins so a team can move to it while keeping its old file; every other file
//! found is reported as ignored, so nobody edits the wrong one.

use std::path::Path;

use crate::SpecError;
use crate::diag::{Diagnostic, Pos, Severity};
use crate::model::RepoPath;

/// The file names looked for, in order of precedence.
pub const CANDIDATES: [&str; 8] = [
    "warren.yml",
    "warren.yaml",
    "hocus.yml",
    "hocus.yaml",
    ".hocus.yml",
    ".hocus.yaml",
    ".devcontainer/devcontainer.json",
    ".devcontainer.json",
];

/// The file discovery chose, and a warning for each other one it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub file: RepoPath,
    pub ignored: Vec<Diagnostic>,
}

/// Finds the environment file in the folder `dir` of the repository at `repo_root`.
pub fn discover(repo_root: &Path, dir: &RepoPath) -> Result<Discovered, SpecError> {
    let folder = dir.on_disk(repo_root);
    let found: Vec<RepoPath> = CANDIDATES
        .iter()
        .filter(|name| folder.join(name).is_file())
        .filter_map(|name| RepoPath::resolve(dir, name).ok())
        .collect();
    let Some((chosen, others)) = found.split_first() else {
        let nested = nested_devcontainers(repo_root, dir);
        return Err(if nested.is_empty() {
            SpecError::NotFound {
                dir: dir.to_string(),
            }
        } else {
            SpecError::OnlyNested {
                dir: dir.to_string(),
                found: nested,
            }
        });
    };
    let ignored = others
        .iter()
        .map(|other| Diagnostic {
            severity: Severity::Warning,
            file: other.to_string(),
            line: Pos::START.line,
            column: Pos::START.column,
            message: format!("ignored: `{chosen}` takes precedence"),
        })
        .collect();
    Ok(Discovered {
        file: chosen.clone(),
        ignored,
    })
}

/// `.devcontainer/<name>/devcontainer.json` files: the specification allows several
/// configurations side by side, and then one must be chosen by name.
fn nested_devcontainers(repo_root: &Path, dir: &RepoPath) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.on_disk(repo_root).join(".devcontainer")) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("devcontainer.json").is_file())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            RepoPath::resolve(dir, &format!(".devcontainer/{name}/devcontainer.json"))
                .ok()
                .map(|p| p.to_string())
        })
        .collect();
    found.sort();
    found
}
