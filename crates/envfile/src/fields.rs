//! Field readers shared by the three formats: image references, repository paths, environment
//! maps, ports, sizes, extensions. Each reports its own errors with the field's path.

use std::collections::BTreeMap;

use crate::diag::Pos;
use crate::model::{ByteSize, Port, RepoPath};
use crate::tree::{Cx, Node, Value};

/// A repository path a file refers to, kept with its position so that the checks against the
/// checked-out tree (exists, no symlink out of the repository) can point at it.
#[derive(Debug, Clone)]
pub(crate) struct PathRef {
    pub(crate) path: RepoPath,
    pub(crate) pos: Pos,
    pub(crate) field: String,
    pub(crate) kind: PathKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    File,
    Dir,
}

/// Reads a path relative to `base` (the environment file's folder) and records it in `refs`.
pub(crate) fn repo_path(
    cx: &mut Cx<'_>,
    node: &Node,
    field: &str,
    base: &RepoPath,
    kind: PathKind,
    refs: &mut Vec<PathRef>,
) -> Option<RepoPath> {
    let text = cx.string(node, field)?;
    match RepoPath::resolve(base, &text) {
        Ok(path) => {
            refs.push(PathRef {
                path: path.clone(),
                pos: node.pos,
                field: field.to_owned(),
                kind,
            });
            Some(path)
        }
        Err(why) => {
            cx.error(node.pos, format!("`{field}`: {why}"));
            None
        }
    }
}

pub(crate) fn image_reference(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<String> {
    let text = cx.string(node, field)?;
    match check_image_reference(&text) {
        Ok(()) => Some(text),
        Err(why) => {
            cx.error(
                node.pos,
                format!(
                    "`{field}`: `{text}` is not an image reference ({why}); expected something like `debian:bookworm` or `registry.example.com/team/dev:1.2`"
                ),
            );
            None
        }
    }
}

/// Checks the grammar of an OCI image reference: `[host[:port]/]path[:tag][@algo:hex]`.
pub fn check_image_reference(text: &str) -> Result<(), &'static str> {
    if text.len() > 4096 {
        return Err("too long");
    }
    let (rest, digest) = match text.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (text, None),
    };
    if let Some(d) = digest {
        let (algo, hex) = d.split_once(':').ok_or("the digest has no algorithm")?;
        let algo_ok = !algo.is_empty()
            && algo
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        if !algo_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("the digest is malformed");
        }
    }
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let mut chars = tag.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok
            || tag.len() > 128
            || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err("the tag is malformed");
        }
    }
    if name.is_empty() {
        return Err("the name is empty");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 {
        let first = components[0];
        if first.contains(['.', ':']) || first == "localhost" {
            let host_ok = first
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
            if !host_ok {
                return Err("the registry host is malformed");
            }
            components.remove(0);
        }
    }
    for component in components {
        let ok = !component.is_empty()
            && component.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !ok {
            return Err("repository names are lowercase letters, digits and . _ -");
        }
    }
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Environment variables: names are shell identifiers; values are scalars taken as text.
pub(crate) fn env_map(cx: &mut Cx<'_>, node: &Node, field: &str) -> BTreeMap<String, String> {
    if let Value::Map(entries) = &node.value {
        for entry in entries {
            if !entry.key.is_empty() && !is_env_name(&entry.key) {
                cx.error(
                    entry.key_pos,
                    format!(
                        "`{field}`: `{}` is not a valid variable name; expected letters, digits and _, not starting with a digit",
                        entry.key
                    ),
                );
            }
        }
    }
    let mut map = cx.string_map(node, field);
    map.retain(|k, _| is_env_name(k));
    map
}

pub(crate) fn port_number(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<u16> {
    cx.integer(node, field, 1, 65535)
        .and_then(|n| u16::try_from(n).ok())
}

/// Reports ports listed more than once; keeps the first.
pub(crate) fn dedup_ports(cx: &mut Cx<'_>, ports: Vec<(Port, Pos)>) -> Vec<Port> {
    let mut out: Vec<Port> = Vec::new();
    for (port, pos) in ports {
        if out.iter().any(|p| p.port == port.port) {
            cx.warn(
                pos,
                format!(
                    "port {} is listed twice; the first entry is used",
                    port.port
                ),
            );
        } else {
            out.push(port);
        }
    }
    out
}

/// A number of CPUs, 1 to 1024.
pub(crate) fn cpu_count(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<u32> {
    cx.integer(node, field, 1, 1024)
        .and_then(|n| u32::try_from(n).ok())
}

/// A size: a string with a unit (`8GiB`), or a whole number of bytes.
pub(crate) fn byte_size(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<ByteSize> {
    let parsed = match &node.value {
        Value::Str(s) => ByteSize::parse(s),
        Value::Number { int: Some(n), .. } => u64::try_from(*n)
            .ok()
            .and_then(|n| ByteSize::parse(&n.to_string())),
        _ => {
            cx.mismatch(node, field, "a size such as \"8GiB\"");
            return None;
        }
    };
    if parsed.is_none() {
        cx.error(
            node.pos,
            format!("`{field}`: expected a size above zero such as \"512MiB\", \"8GiB\" or \"1.5TB\" (units are powers of 1024)"),
        );
    }
    parsed
}

/// VS Code extension identifiers: `publisher.name`, optionally `@version`.
pub(crate) fn extensions(cx: &mut Cx<'_>, node: &Node, field: &str) -> Vec<String> {
    let Some(items) = cx.seq(node, field) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let sub = format!("{field}[{i}]");
        let Some(id) = cx.string(item, &sub) else {
            continue;
        };
        let bare = id.split('@').next().unwrap_or_default();
        let well_formed = bare.split_once('.').is_some_and(|(publisher, name)| {
            let part_ok = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            part_ok(publisher) && part_ok(name)
        });
        if well_formed {
            out.push(id);
        } else {
            cx.error(
                item.pos,
                format!("`{sub}`: `{id}` is not an extension identifier; expected `publisher.name`, such as `rust-lang.rust-analyzer`"),
            );
        }
    }
    out
}

/// An absolute folder inside the workspace.
pub(crate) fn workspace_folder(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<String> {
    let text = cx.string(node, field)?;
    let ok = text.starts_with('/')
        && text != "/"
        && !text.split('/').any(|p| p == ".." || p == ".")
        && !text.contains('\0');
    if ok {
        Some(text.trim_end_matches('/').to_owned())
    } else {
        cx.error(
            node.pos,
            format!("`{field}`: expected an absolute folder below `/` without `.` or `..`, such as `/workspace`; found `{text}`"),
        );
        None
    }
}

/// A user name or numeric uid (`dev`, `1000`, `dev:dev`).
pub(crate) fn user(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<String> {
    let text = cx.scalar_text(node, field)?;
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:$".contains(c));
    if ok {
        Some(text)
    } else {
        cx.error(node.pos, format!("`{field}`: `{text}` is not a user name"));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::check_image_reference as check;

    #[test]
    fn image_references() {
        for good in [
            "debian",
            "debian:bookworm",
            "mcr.microsoft.com/devcontainers/base:ubuntu",
            "localhost:5000/team/dev:1.2",
            "127.0.0.1:5000/x",
            "ghcr.io/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a/b-c/d_e:v1.0-rc1",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Debian",
            "debian:",
            "debian:-x",
            "a//b",
            "x@sha256:zz",
            "a/B",
            "-a",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
