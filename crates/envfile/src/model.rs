//! The one environment model every reader produces.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A validated development environment, whatever file it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvSpec {
    /// The file this was read from.
    pub source: SourceFile,
    /// A display name, when the file gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: ImageSource,
    pub runtime: RuntimeKind,
    pub resources: Resources,
    /// Where the repository is checked out inside the workspace (absolute).
    pub workspace_folder: String,
    /// The user developers' sessions and tasks run as; the image's user when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The user the workspace's own processes run as; the image's user when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_user: Option<String>,
    /// Environment of every process in the workspace.
    pub env: BTreeMap<String, String>,
    /// Extra environment of developer sessions and tasks only. Values may hold
    /// `${containerEnv:NAME}`, which is resolved inside the workspace (see
    /// [`crate::expand_container_env`]).
    pub remote_env: BTreeMap<String, String>,
    pub ports: Vec<Port>,
    /// Commands, each bound to a lifecycle phase; see [`Phase`].
    pub tasks: Vec<Task>,
    /// IDE extensions to install (VS Code identifiers, `publisher.name`).
    pub extensions: Vec<String>,
}

impl EnvSpec {
    /// The tasks of one phase, in the order they start.
    pub fn tasks_in(&self, phase: Phase) -> impl Iterator<Item = &Task> {
        self.tasks.iter().filter(move |t| t.phase == phase)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Relative to the repository root.
    pub path: RepoPath,
    pub format: Format,
}

/// Which kind of environment file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `warren.yml`, Warren's own format.
    Warren,
    /// `hocus.yml` and its spellings, as Hocus defined it.
    Hocus,
    /// `devcontainer.json`, the Development Containers specification.
    DevContainer,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Warren => "warren.yml",
            Format::Hocus => "hocus.yml",
            Format::DevContainer => "devcontainer.json",
        })
    }
}

/// Where the environment's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ImageSource {
    /// An existing image, by reference (`debian:bookworm`, `registry.example/team/dev:1`).
    Reference { reference: String },
    /// An image built from a Dockerfile in the repository.
    #[serde(rename_all = "camelCase")]
    Dockerfile {
        dockerfile: RepoPath,
        context: RepoPath,
        args: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
}

/// How the workspace is isolated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A system container: user namespaces, shared kernel, cheapest.
    #[default]
    Container,
    /// A virtual machine with its own kernel.
    Vm,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Container => "container",
            RuntimeKind::Vm => "vm",
        })
    }
}

/// Requested resources; `None` means the host's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<ByteSize>,
}

/// A size in bytes. Written in files as `8GiB`, `512M`, `4gb` (all units are powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"8GiB"`, `"1.5g"`, `"512 MB"`, `"1024"` (bytes). `None` if malformed or zero.
    pub fn parse(text: &str) -> Option<ByteSize> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return None,
        };
        let bytes = match number.split_once('.') {
            None => number.parse::<u64>().ok()?.checked_mul(1u64 << shift)?,
            Some((whole, frac)) => {
                if frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let whole = if whole.is_empty() {
                    0
                } else {
                    whole.parse::<u64>().ok()?
                };
                let scale = 10u128.pow(u32::try_from(frac.len()).ok()?);
                let frac: u128 = frac.parse().ok()?;
                let total = (u128::from(whole) * scale + frac) * (1u128 << shift) / scale;
                u64::try_from(total).ok()?
            }
        };
        (bytes > 0).then_some(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        while unit + 1 < UNITS.len() && self.0 >= 1u64 << (10 * (unit + 1)) {
            unit += 1;
        }
        let scaled = self.0 as f64 / (1u64 << (10 * unit)) as f64;
        if scaled.fract() == 0.0 {
            write!(f, "{scaled} {}", UNITS[unit])
        } else {
            write!(f, "{scaled:.2} {}", UNITS[unit])
        }
    }
}

/// A port inside the workspace that developers reach (forwarded, or shown in the UI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A command bound to a lifecycle phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Unique within its phase; how logs and terminals are addressed.
    pub name: String,
    pub phase: Phase,
    /// Order within the phase: every task of stage `n` finishes before stage `n + 1` starts;
    /// tasks that share a stage run in parallel.
    pub stage: u32,
    pub shell: Shell,
    pub command: Command,
}

/// When a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// While the prebuild is made, once per commit; its output is part of the prebuild image.
    Prebuild,
    /// Once, on the workspace's first start.
    FirstStart,
    /// On every start of the workspace, in a persistent session a developer can attach to.
    EveryStart,
    /// Each time a developer's IDE attaches.
    Attach,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Prebuild => "prebuild",
            Phase::FirstStart => "first start",
            Phase::EveryStart => "every start",
            Phase::Attach => "attach",
        })
    }
}

/// The shell a script is run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shell {
    Sh,
    Bash,
    Zsh,
    Ash,
    Fish,
}

impl Shell {
    pub const NAMES: [&str; 5] = ["sh", "bash", "zsh", "ash", "fish"];

    pub fn from_name(name: &str) -> Option<Shell> {
        Some(match name {
            "sh" => Shell::Sh,
            "bash" => Shell::Bash,
            "zsh" => Shell::Zsh,
            "ash" => Shell::Ash,
            "fish" => Shell::Fish,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Shell::Sh => "sh",
            Shell::Bash => "bash",
            Shell::Zsh => "zsh",
            Shell::Ash => "ash",
            Shell::Fish => "fish",
        }
    }
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A script run by the task's shell.
    Script(String),
    /// A program and its arguments, run without a shell.
    Exec(Vec<String>),
}

impl Command {
    /// The program and arguments to run this command with `shell`.
    pub fn argv(&self, shell: Shell) -> Vec<String> {
        match self {
            Command::Script(script) => vec![shell.name().to_owned(), "-c".into(), script.clone()],
            Command::Exec(argv) => argv.clone(),
        }
    }
}

/// A normalized path inside the repository: relative, `/`-separated, no `.` or `..` parts;
/// `.` is the repository root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RepoPath(String);

impl RepoPath {
    pub fn root() -> RepoPath {
        RepoPath(".".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The folder holding this path (the root for a top-level entry).
    pub fn parent(&self) -> RepoPath {
        match self.0.rsplit_once('/') {
            Some((dir, _)) => RepoPath(dir.to_owned()),
            None => RepoPath::root(),
        }
    }

    /// Resolves `input` (as written in a file) against the folder `base`. Errors say why the
    /// path is not acceptable.
    pub fn resolve(base: &RepoPath, input: &str) -> Result<RepoPath, String> {
        if input.is_empty() {
            return Err("the path is empty".into());
        }
        if input.starts_with('/') || input.starts_with('\\') {
            return Err(format!(
                "`{input}` is absolute; paths are relative to the file's folder"
            ));
        }
        if input.contains('\0') {
            return Err("the path contains a NUL byte".into());
        }
        let mut parts: Vec<&str> = base.0.split('/').filter(|p| *p != ".").collect();
        for part in input.split(['/', '\\']) {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(format!("`{input}` escapes the repository"));
                    }
                }
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            Ok(RepoPath::root())
        } else {
            Ok(RepoPath(parts.join("/")))
        }
    }

    /// This path under the repository checked out at `root`.
    pub fn on_disk(&self, root: &Path) -> PathBuf {
        if self.0 == "." {
            root.to_path_buf()
        } else {
            root.join(&self.0)
        }
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("8GiB"), Some(ByteSize(8 << 30)));
        assert_eq!(ByteSize::parse("4gb"), Some(ByteSize(4 << 30)));
        assert_eq!(ByteSize::parse("512 M"), Some(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("1.5G"), Some(ByteSize(3 << 29)));
        assert_eq!(ByteSize::parse("1024"), Some(ByteSize(1024)));
        assert_eq!(ByteSize::parse("0"), None);
        assert_eq!(ByteSize::parse("8 parsecs"), None);
        assert_eq!(ByteSize::parse("99999999999T"), None);
        assert_eq!(ByteSize::parse("1."), None);
        assert_eq!(ByteSize(8 << 30).to_string(), "8 GiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.50 GiB");
    }

    #[test]
    fn repo_paths_resolve_relative_to_their_folder() {
        let dc = RepoPath::resolve(&RepoPath::root(), ".devcontainer").unwrap();
        assert_eq!(
            RepoPath::resolve(&dc, "Dockerfile").unwrap().as_str(),
            ".devcontainer/Dockerfile"
        );
        assert_eq!(RepoPath::resolve(&dc, "..").unwrap(), RepoPath::root());
        assert_eq!(
            RepoPath::resolve(&dc, "../src/./x").unwrap().as_str(),
            "src/x"
        );
        assert!(
            RepoPath::resolve(&dc, "../..")
                .unwrap_err()
                .contains("escapes")
        );
        assert!(
            RepoPath::resolve(&dc, "/etc")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(RepoPath::resolve(&RepoPath::root(), "a/../../b").is_err());
        assert_eq!(dc.parent(), RepoPath::root());
    }
}
