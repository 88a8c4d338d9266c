//! The Dockerfile parser: parser directives, comments, line continuations, heredocs, flags, and
//! every instruction, into stages of typed steps. Words are kept raw (quotes included) for
//! [`expand`](crate::expand) at build time, when the build arguments are known. Errors name the
//! file and line.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::words::split_words;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// A whole Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dockerfile {
    /// The escape character (`\` unless a `# escape=` directive says otherwise).
    pub escape: char,
    /// `ARG`s before the first `FROM` (usable in `FROM` lines, and by stages that declare them
    /// again).
    pub global_args: Vec<ArgDecl>,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<String>,
}

/// One `FROM` and the steps after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub line: usize,
    /// The base: an image reference or an earlier stage's name (raw; may hold `$ARG`s).
    pub base: String,
    pub name: Option<String>,
    pub platform: Option<String>,
    pub steps: Vec<Step>,
}

/// An instruction and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub line: usize,
    pub instruction: Instruction,
}

/// A command in shell form (run by the stage's `SHELL`) or exec form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

/// A here-document: `<<EOF` (variables expanded) or `<<"EOF"` (literal); `<<-` strips leading
/// tabs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heredoc {
    pub delimiter: String,
    pub body: String,
    pub expand: bool,
}

/// A `RUN --mount=...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// `bind` (the default), `cache`, `tmpfs`, `secret` or `ssh`.
    pub kind: String,
    pub target: Option<String>,
    /// The other options (`id`, `sharing`, `from`, `source`, `mode`, `uid`, `gid`, `ro`, ...).
    pub options: BTreeMap<String, String>,
}

/// A `COPY`/`ADD` source: a path or pattern in the context (or stage), or a here-document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopySource {
    Path(String),
    Heredoc(Heredoc),
}

/// What `COPY` and `ADD` share: what goes where, owned and moded how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Files {
    pub sources: Vec<CopySource>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Instruction {
    Run {
        command: Command,
        mounts: Vec<Mount>,
        /// `--network=none`: the step runs with no network but its own loopback.
        no_network: bool,
        /// The here-documents the command refers to.
        heredocs: Vec<Heredoc>,
    },
    Copy {
        files: Files,
        /// An earlier stage (or an image) to copy from, instead of the build context.
        from: Option<String>,
        /// `--parents`: sources keep their folders under the destination.
        parents: bool,
    },
    Add {
        files: Files,
        /// The digest a remote source must have.
        checksum: Option<String>,
    },
    Arg(Vec<ArgDecl>),
    /// Raw key and value words (expanded at build time).
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Workdir(String),
    User(String),
    Shell(Vec<String>),
    /// Ports as written (`8080`, `53/udp`, `${PORT}`): expanded and normalized at build time.
    Expose(Vec<String>),
    Entrypoint(Command),
    Cmd(Command),
    /// `HEALTHCHECK NONE`: no check (none is inherited; a check itself is refused).
    HealthcheckNone,
    Maintainer(String),
}

impl Instruction {
    /// The instruction in a few words, for a log's step line: its keyword and the first
    /// line of what it does, cut at 100 characters.
    pub fn summary(&self) -> String {
        let command = |c: &Command| match c {
            Command::Shell(text) => text.clone(),
            Command::Exec(argv) => argv.join(" "),
        };
        let sources = |f: &Files| {
            let names: Vec<&str> = f
                .sources
                .iter()
                .map(|s| match s {
                    CopySource::Path(p) => p.as_str(),
                    CopySource::Heredoc(h) => h.delimiter.as_str(),
                })
                .collect();
            format!("{} {}", names.join(" "), f.dest)
        };
        let pairs = |kv: &[(String, String)]| {
            kv.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let text = match self {
            Self::Run { command: c, .. } => format!("RUN {}", command(c)),
            Self::Copy { files, .. } => format!("COPY {}", sources(files)),
            Self::Add { files, .. } => format!("ADD {}", sources(files)),
            Self::Arg(decls) => {
                let names: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
                format!("ARG {}", names.join(" "))
            }
            Self::Env(kv) => format!("ENV {}", pairs(kv)),
            Self::Label(kv) => format!("LABEL {}", pairs(kv)),
            Self::Workdir(dir) => format!("WORKDIR {dir}"),
            Self::User(user) => format!("USER {user}"),
            Self::Shell(argv) => format!("SHELL {}", argv.join(" ")),
            Self::Expose(ports) => format!("EXPOSE {}", ports.join(" ")),
            Self::Entrypoint(c) => format!("ENTRYPOINT {}", command(c)),
            Self::Cmd(c) => format!("CMD {}", command(c)),
            Self::HealthcheckNone => "HEALTHCHECK NONE".to_owned(),
            Self::Maintainer(who) => format!("MAINTAINER {who}"),
        };
        // Its first line, with runs of blanks (a continuation's indent) as one space.
        let first = text.lines().next().unwrap_or_default();
        let words = first.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut cut: String = words.chars().take(100).collect();
        if cut.len() < words.len() || text.lines().nth(1).is_some() {
            cut.push('…');
        }
        cut
    }
}

const INSTRUCTIONS: &[&str] = &[
    "FROM",
    "RUN",
    "COPY",
    "ADD",
    "ARG",
    "ENV",
    "LABEL",
    "WORKDIR",
    "USER",
    "SHELL",
    "EXPOSE",
    "VOLUME",
    "ENTRYPOINT",
    "CMD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "MAINTAINER",
    "ONBUILD",
];

/// The most a Dockerfile may hold.
const MAX_BYTES: usize = 4 << 20;

/// Parses a Dockerfile's text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Dockerfile, ParseError> {
    let fail = |line: usize, message: String| ParseError {
        file: file.to_owned(),
        line,
        message,
    };
    if text.len() > MAX_BYTES {
        return Err(fail(
            1,
            format!("the file is {} bytes; the limit is {MAX_BYTES}", text.len()),
        ));
    }
    let lines: Vec<&str> = text.lines().collect();
    let (escape, mut i) = directives(&lines).map_err(|(n, m)| fail(n, m))?;
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    while i < lines.len() {
        // One logical line: continuations joined, comments and blank lines inside skipped.
        let start = i;
        let first = lines[i].trim();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let mut logical = String::new();
        let mut current: &str = lines[start].trim_start();
        loop {
            let trimmed = current.trim_end();
            let Some(head) = trimmed.strip_suffix(escape) else {
                logical.push_str(trimmed);
                break;
            };
            logical.push_str(head);
            // The next line that is neither blank nor a comment continues this one.
            let mut next = None;
            while let Some(l) = lines.get(i) {
                i += 1;
                let t = l.trim();
                if !t.is_empty() && !t.starts_with('#') {
                    next = Some(*l);
                    break;
                }
            }
            match next {
                Some(l) => current = l,
                None => break,
            }
        }
        let (keyword, rest) = match logical.split_once(char::is_whitespace) {
            Some((k, r)) => (k.to_ascii_uppercase(), r.trim()),
            None => (logical.to_ascii_uppercase(), ""),
        };
        let line = start + 1;
        // Here-documents follow the instruction's line.
        let heredocs = if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            let markers = heredoc_markers(rest);
            let mut docs = Vec::new();
            for (delimiter, strip_tabs, expand) in markers {
                let mut body = String::new();
                loop {
                    let Some(raw) = lines.get(i) else {
                        return Err(fail(
                            line,
                            format!("here-document `{delimiter}` is never closed"),
                        ));
                    };
                    i += 1;
                    let content = if strip_tabs {
                        raw.trim_start_matches('\t')
                    } else {
                        raw
                    };
                    if content == delimiter {
                        break;
                    }
                    body.push_str(content);
                    body.push('\n');
                }
                docs.push(Heredoc {
                    delimiter,
                    body,
                    expand,
                });
            }
            docs
        } else {
            Vec::new()
        };
        let err = |m: String| fail(line, format!("{keyword}: {m}"));
        if keyword == "FROM" {
            stages.push(from(rest, escape, line).map_err(err)?);
            continue;
        }
        let instruction = instruction(&keyword, rest, escape, heredocs).map_err(|m| {
            if INSTRUCTIONS.contains(&keyword.as_str()) {
                err(m)
            } else {
                fail(line, m)
            }
        })?;
        match (stages.last_mut(), instruction) {
            (Some(stage), instruction) => stage.steps.push(Step { line, instruction }),
            (None, Instruction::Arg(decls)) => global_args.extend(decls),
            (None, _) => {
                return Err(fail(line, format!("{keyword} before the first FROM")));
            }
        }
    }
    if stages.is_empty() {
        return Err(fail(
            lines.len().max(1),
            "no FROM: a Dockerfile starts from an image".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for s in &stages {
        if let Some(name) = &s.name
            && !seen.insert(name.to_ascii_lowercase())
        {
            return Err(fail(
                s.line,
                format!("FROM: a stage named `{name}` exists already"),
            ));
        }
    }
    Ok(Dockerfile {
        escape,
        global_args,
        stages,
    })
}

/// Parser directives at the top (`# escape=`, `# syntax=`, `# check=`): the escape character
/// and where the rest begins.
fn directives(lines: &[&str]) -> Result<(char, usize), (usize, String)> {
    let mut escape = '\\';
    let mut seen = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(body) = line.trim().strip_prefix('#') else {
            return Ok((escape, n));
        };
        let Some((key, value)) = body.split_once('=') else {
            return Ok((escape, n));
        };
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Ok((escape, n));
        }
        if seen.contains(&key) {
            return Err((n + 1, format!("the `{key}` directive is given twice")));
        }
        if key == "escape" {
            escape = match value.trim() {
                "\\" => '\\',
                "`" => '`',
                other => {
                    return Err((n + 1, format!("escape must be \\ or `, not `{other}`")));
                }
            };
        }
        seen.push(key);
    }
    Ok((escape, lines.len()))
}

/// `<<EOF`, `<<-EOF`, `<<"EOF"`, `<<'EOF'` markers in an instruction's arguments, in order:
/// (delimiter, strip tabs, expand variables).
fn heredoc_markers(args: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(at) = rest.find("<<") {
        let mut tail = &rest[at + 2..];
        let strip = tail.starts_with('-');
        if strip {
            tail = &tail[1..];
        }
        let (quoted, body) = match tail.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), &tail[1..]),
            _ => (None, tail),
        };
        let len = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .count();
        let closes = quoted.is_none_or(|q| body[len..].starts_with(q));
        if len > 0 && closes {
            out.push((body[..len].to_owned(), strip, quoted.is_none()));
        }
        rest = &body[len..];
    }
    out
}

fn from(rest: &str, escape: char, line: usize) -> Result<Stage, String> {
    let (flags, words) = flags(rest, escape, &["platform"])?;
    let platform = flags
        .into_iter()
        .find(|(k, _)| k == "platform")
        .map(|(_, v)| v);
    let (base, name) = match words.as_slice() {
        [base] => (base.clone(), None),
        [base, kw, name] if kw.eq_ignore_ascii_case("as") => {
            let ok = !name.is_empty()
                && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(format!("`{name}` is not a stage name"));
            }
            (base.clone(), Some(name.clone()))
        }
        [] => return Err("which image? (FROM image [AS name])".into()),
        _ => return Err("expected `FROM image` or `FROM image AS name`".into()),
    };
    Ok(Stage {
        line,
        base,
        name,
        platform,
        steps: Vec::new(),
    })
}

/// Leading `--name=value` / `--name` flags (only `allowed` ones) and the remaining words.
type Flags = Vec<(String, String)>;

fn flags(rest: &str, escape: char, allowed: &[&str]) -> Result<(Flags, Vec<String>), String> {
    let words = split_words(rest, escape)?;
    let mut out = Vec::new();
    let mut n = 0;
    for w in &words {
        let Some(flag) = w.strip_prefix("--") else {
            break;
        };
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        if !allowed.contains(&name) {
            return Err(if allowed.is_empty() {
                format!("takes no flags (found --{name})")
            } else {
                format!(
                    "unknown flag --{name} (known: {})",
                    allowed
                        .iter()
                        .map(|a| format!("--{a}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
        out.push((name.to_owned(), value.to_owned()));
        n += 1;
    }
    Ok((out, words[n..].to_vec()))
}

/// The arguments after the flags, as raw text (for shell-form commands).
fn after_flags(rest: &str, count: usize, escape: char) -> String {
    let mut text = rest.trim_start();
    for _ in 0..count {
        // Flags hold no spaces outside quotes; skipping word by word through split_words keeps
        // quoted flag values whole.
        let words = split_words(text, escape).unwrap_or_default();
        let Some(first) = words.first() else { break };
        text = text[text.find(first.as_str()).unwrap_or(0) + first.len()..].trim_start();
    }
    text.to_owned()
}

/// Exec form if the text is a JSON array of strings; otherwise shell form (as Docker does).
fn command(text: &str) -> Command {
    let t = text.trim();
    if t.starts_with('[')
        && let Ok(argv) = serde_json::from_str::<Vec<String>>(t)
    {
        return Command::Exec(argv);
    }
    Command::Shell(t.to_owned())
}

fn one_word(rest: &str, what: &str) -> Result<String, String> {
    let t = rest.trim();
    if t.is_empty() {
        Err(format!("which {what}?"))
    } else {
        Ok(t.to_owned())
    }
}

fn key_values(rest: &str, escape: char, legacy: bool) -> Result<Vec<(String, String)>, String> {
    let words = split_words(rest, escape)?;
    if words.is_empty() {
        return Err("expected KEY=VALUE".into());
    }
    if !words[0].contains('=') {
        // The old `ENV KEY value with spaces` form.
        if !legacy || words.len() < 2 {
            return Err(format!("`{}` is not KEY=VALUE", words[0]));
        }
        let value = rest.trim()[words[0].len()..].trim().to_owned();
        return Ok(vec![(words[0].clone(), value)]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("`{w}` is not KEY=VALUE")),
        })
        .collect()
}

/// COPY/ADD sources and destination (exec form, words, or here-documents).
fn copy_args(
    words: Vec<String>,
    text: &str,
    heredocs: Vec<Heredoc>,
) -> Result<(Vec<CopySource>, String), String> {
    let items = match command(text) {
        Command::Exec(items) => items,
        Command::Shell(_) => words,
    };
    let Some((dest, sources)) = items.split_last() else {
        return Err("expected sources and a destination".into());
    };
    let mut docs = heredocs.into_iter();
    let sources: Vec<CopySource> = sources
        .iter()
        .map(|s| {
            if s.starts_with("<<") {
                docs.next().map(CopySource::Heredoc)
            } else {
                Some(CopySource::Path(s.clone()))
            }
        })
        .collect::<Option<_>>()
        .ok_or("a here-document source without its body")?;
    if sources.is_empty() {
        return Err("expected at least one source before the destination".into());
    }
    Ok((sources, dest.clone()))
}

/// A `COPY`'s or `ADD`'s flags and files.
fn files(
    rest: &str,
    escape: char,
    heredocs: Vec<Heredoc>,
    allowed: &[&str],
) -> Result<(Flags, Files), String> {
    let (fl, words) = flags(rest, escape, allowed)?;
    let text = after_flags(rest, fl.len(), escape);
    let (sources, dest) = copy_args(words, &text, heredocs)?;
    let files = Files {
        sources,
        dest,
        chown: flag(&fl, "chown"),
        chmod: flag(&fl, "chmod"),
        link: fl.iter().any(|(k, _)| k == "link"),
        exclude: fl
            .iter()
            .filter(|(k, _)| k == "exclude")
            .map(|(_, v)| v.clone())
            .collect(),
    };
    Ok((fl, files))
}

fn mount(spec: &str) -> Result<Mount, String> {
    let mut kind = "bind".to_owned();
    let mut target = None;
    let mut options = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k {
            "type" => kind = v.to_owned(),
            "target" | "dst" | "destination" => target = Some(v.to_owned()),
            "id" | "sharing" | "from" | "source" | "src" | "mode" | "uid" | "gid" | "ro"
            | "readonly" | "rw" | "readwrite" | "required" | "size" | "env" => {
                options.insert(k.to_owned(), v.to_owned());
            }
            other => return Err(format!("--mount: unknown option `{other}`")),
        }
    }
    if !matches!(kind.as_str(), "bind" | "cache" | "tmpfs" | "secret" | "ssh") {
        return Err(format!(
            "--mount: type `{kind}` (expected bind, cache, tmpfs, secret or ssh)"
        ));
    }
    if target.is_none() && matches!(kind.as_str(), "bind" | "cache" | "tmpfs") {
        return Err(format!("--mount: a {kind} mount needs target="));
    }
    if let Some(sharing) = options.get("sharing")
        && !matches!(sharing.as_str(), "shared" | "private" | "locked")
    {
        return Err(format!(
            "--mount: sharing `{sharing}` (expected shared, private or locked)"
        ));
    }
    Ok(Mount {
        kind,
        target,
        options,
    })
}

fn flag(flags: &Flags, name: &str) -> Option<String> {
    flags
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn instruction(
    keyword: &str,
    rest: &str,
    escape: char,
    heredocs: Vec<Heredoc>,
) -> Result<Instruction, String> {
    Ok(match keyword {
        "RUN" => {
            let (fl, _) = flags(rest, escape, &["mount", "network", "security"])?;
            let text = after_flags(rest, fl.len(), escape);
            if text.is_empty() {
                return Err("what should it run?".into());
            }
            let no_network = match flag(&fl, "network").as_deref() {
                None | Some("default") => false,
                Some("none") => true,
                Some("host") => {
                    return Err(
                        "--network=host is refused: a build step never gets the host's network (default or none)"
                            .into(),
                    );
                }
                Some(n) => return Err(format!("--network={n} (expected default or none)")),
            };
            match flag(&fl, "security").as_deref() {
                None | Some("sandbox") => {}
                Some("insecure") => {
                    return Err(
                        "--security=insecure is refused: a build step gets no more privilege than a workspace"
                            .into(),
                    );
                }
                Some(s) => return Err(format!("--security={s} (expected sandbox)")),
            }
            Instruction::Run {
                mounts: fl
                    .iter()
                    .filter(|(k, _)| k == "mount")
                    .map(|(_, v)| mount(v))
                    .collect::<Result<_, _>>()?,
                no_network,
                command: command(&text),
                heredocs,
            }
        }
        "COPY" => {
            let (fl, files) = files(
                rest,
                escape,
                heredocs,
                &["from", "chown", "chmod", "link", "exclude", "parents"],
            )?;
            let parents = match flag(&fl, "parents").as_deref() {
                None | Some("false") => false,
                Some("" | "true") => true,
                Some(v) => return Err(format!("--parents={v} (expected true or false)")),
            };
            if parents
                && files
                    .sources
                    .iter()
                    .any(|s| matches!(s, CopySource::Heredoc(_)))
            {
                return Err("--parents: a here-document has no folders to keep".into());
            }
            Instruction::Copy {
                files,
                from: flag(&fl, "from"),
                parents,
            }
        }
        "ADD" => {
            let (fl, files) = files(
                rest,
                escape,
                heredocs,
                &[
                    "chown",
                    "chmod",
                    "checksum",
                    "link",
                    "exclude",
                    "keep-git-dir",
                ],
            )?;
            if fl.iter().any(|(k, _)| k == "exclude") {
                return Err(
                    "--exclude: not supported on ADD here; use COPY --exclude, or .dockerignore"
                        .into(),
                );
            }
            if fl.iter().any(|(k, _)| k == "keep-git-dir") {
                return Err(
                    "--keep-git-dir: ADD does not fetch git repositories here; clone it in a RUN step"
                        .into(),
                );
            }
            Instruction::Add {
                files,
                checksum: flag(&fl, "checksum"),
            }
        }
        "ARG" => {
            let words = split_words(rest, escape)?;
            if words.is_empty() {
                return Err("which argument?".into());
            }
            Instruction::Arg(
                words
                    .into_iter()
                    .map(|w| {
                        let (name, default) = match w.split_once('=') {
                            Some((n, d)) => (n.to_owned(), Some(d.to_owned())),
                            None => (w.clone(), None),
                        };
                        let valid = !name.is_empty()
                            && !name.starts_with(|c: char| c.is_ascii_digit())
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if valid {
                            Ok(ArgDecl { name, default })
                        } else {
                            Err(format!("`{name}` is not an argument name"))
                        }
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        "ENV" => Instruction::Env(key_values(rest, escape, true)?),
        "LABEL" => Instruction::Label(key_values(rest, escape, false)?),
        "WORKDIR" => Instruction::Workdir(one_word(rest, "folder")?),
        "USER" => Instruction::User(one_word(rest, "user")?),
        "STOPSIGNAL" => {
            return Err(
                "STOPSIGNAL is not supported: a workspace's processes are stopped with SIGTERM, then SIGKILL; remove the line"
                    .into(),
            );
        }
        "MAINTAINER" => Instruction::Maintainer(one_word(rest, "maintainer")?),
        "HEALTHCHECK" => {
            if one_word(rest, "check")?.eq_ignore_ascii_case("NONE") {
                Instruction::HealthcheckNone
            } else {
                return Err(
                    "HEALTHCHECK is not supported: Warren does not probe a workspace's processes; remove the line (HEALTHCHECK NONE is accepted)"
                        .into(),
                );
            }
        }
        "SHELL" => match command(rest) {
            Command::Exec(argv) if !argv.is_empty() => Instruction::Shell(argv),
            _ => return Err(r#"expected a JSON array, such as ["/bin/bash", "-c"]"#.into()),
        },
        "EXPOSE" => Instruction::Expose(split_words(rest, escape)?),
        "VOLUME" => {
            return Err(
                "VOLUME is not supported: every folder of a workspace is kept across stop and start, and a build keeps what steps write there; remove the line"
                    .into(),
            );
        }
        "ENTRYPOINT" => Instruction::Entrypoint(command(rest)),
        "CMD" => Instruction::Cmd(command(rest)),
        "ONBUILD" => {
            return Err(
                "ONBUILD is not supported: Warren builds environments, not base images for others"
                    .into(),
            );
        }
        other => {
            let suggestion = INSTRUCTIONS
                .iter()
                .map(|i| (strsim::levenshtein(i, other), i))
                .min()
                .filter(|(d, _)| *d <= 2)
                .map(|(_, i)| format!(" (did you mean {i}?)"))
                .unwrap_or_default();
            return Err(format!("unknown instruction `{other}`{suggestion}"));
        }
    })
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
