//! The variables of `devcontainer.json`: `${localEnv:NAME}` (and its old spelling `${env:NAME}`),
//! `${localWorkspaceFolder}`, `${localWorkspaceFolderBasename}`, `${containerWorkspaceFolder}`,
//! `${containerWorkspaceFolderBasename}`, and `${containerEnv:NAME}`.
//!
//! Everything but `containerEnv` is known when the file is read and is replaced then. "Local"
//! means the machine that reads the file: for a prebuild, the project's environment variables
//! and the checked-out repository. `${containerEnv:NAME}` names a variable of the running
//! workspace, so it is kept as written (in `remoteEnv` and lifecycle commands, the only places the
//! specification allows it) and resolved inside the workspace with [`expand_container_env`].

use std::collections::BTreeMap;

use crate::diag::Pos;
use crate::tree::{Cx, Node, Value};

/// The values the variables are replaced with.
#[derive(Debug, Clone)]
pub(crate) struct Vars<'a> {
    pub(crate) local_env: &'a BTreeMap<String, String>,
    pub(crate) local_workspace_folder: &'a str,
    /// Unknown while `workspaceFolder` itself is being read.
    pub(crate) container_workspace_folder: Option<&'a str>,
}

fn basename(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

/// Replaces the variables in `text`; reports unknown or misplaced ones as warnings at `pos`.
pub(crate) fn substitute(
    cx: &mut Cx<'_>,
    pos: Pos,
    field: &str,
    text: &str,
    vars: &Vars<'_>,
    container_env_allowed: bool,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &after[..end];
        let written = &rest[start..start + 2 + end + 1];
        rest = &after[end + 1..];
        let mut parts = inner.splitn(3, ':');
        let kind = parts.next().unwrap_or_default();
        let name = parts.next();
        let default = parts.next();
        match (kind, name) {
            ("localEnv" | "env", Some(name)) => match vars.local_env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    if let Some(default) = default {
                        out.push_str(default);
                    } else {
                        cx.warn(pos, format!("`{field}`: `{written}`: `{name}` is not set; it is replaced by an empty string"));
                    }
                }
            },
            ("containerEnv", Some(_)) => {
                if !container_env_allowed {
                    cx.warn(pos, format!("`{field}`: `{written}` is only known inside a running workspace (use it in `remoteEnv` or a lifecycle command); it is kept as written"));
                }
                out.push_str(written);
            }
            ("localWorkspaceFolder", None) => out.push_str(vars.local_workspace_folder),
            ("localWorkspaceFolderBasename", None) => {
                out.push_str(basename(vars.local_workspace_folder))
            }
            ("containerWorkspaceFolder" | "containerWorkspaceFolderBasename", None) => {
                match vars.container_workspace_folder {
                    Some(folder) if kind == "containerWorkspaceFolder" => out.push_str(folder),
                    Some(folder) => out.push_str(basename(folder)),
                    None => {
                        cx.warn(pos, format!("`{field}`: `{written}` cannot be used in `workspaceFolder` itself; it is kept as written"));
                        out.push_str(written);
                    }
                }
            }
            _ => {
                cx.warn(pos, format!("`{field}`: `{written}` is not a variable Warren knows; it is kept as written"));
                out.push_str(written);
            }
        }
    }
    out.push_str(rest);
    out
}

/// Substitutes variables in every string of `node` (not in keys), `field` naming it for messages.
pub(crate) fn substitute_tree(
    cx: &mut Cx<'_>,
    node: &mut Node,
    field: &str,
    vars: &Vars<'_>,
    container_env_allowed: bool,
) {
    match &mut node.value {
        Value::Str(s) if s.contains("${") => {
            let replaced = substitute(cx, node.pos, field, s, vars, container_env_allowed);
            node.value = Value::Str(replaced);
        }
        Value::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_tree(
                    cx,
                    item,
                    &format!("{field}[{i}]"),
                    vars,
                    container_env_allowed,
                );
            }
        }
        Value::Map(entries) => {
            for entry in entries {
                let sub = format!("{field}.{}", entry.key);
                substitute_tree(cx, &mut entry.value, &sub, vars, container_env_allowed);
            }
        }
        _ => {}
    }
}

/// Resolves `${containerEnv:NAME}` and `${containerEnv:NAME:default}` in `text` with `lookup`
/// (the workspace's environment). An unset variable without a default becomes empty.
pub fn expand_container_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    const OPEN: &str = "${containerEnv:";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let (name, default) = match after[..end].split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (&after[..end], None),
        };
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => out.push_str(default.unwrap_or_default()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Diagnostics;
    use crate::tree::Dialect;

    #[test]
    fn local_variables_are_replaced() {
        let env = BTreeMap::from([("USER".to_owned(), "ada".to_owned())]);
        let vars = Vars {
            local_env: &env,
            local_workspace_folder: "/src/shop",
            container_workspace_folder: Some("/workspaces/shop"),
        };
        let mut d = Diagnostics::new("devcontainer.json");
        let mut cx = Cx {
            diags: &mut d,
            dialect: Dialect::Json,
        };
        let s = |cx: &mut Cx<'_>, t: &str| substitute(cx, Pos::START, "f", t, &vars, true);
        assert_eq!(s(&mut cx, "${localEnv:USER}-${env:USER}"), "ada-ada");
        assert_eq!(s(&mut cx, "${localEnv:NOPE:fallback:x}"), "fallback:x");
        assert_eq!(s(&mut cx, "${localWorkspaceFolderBasename}"), "shop");
        assert_eq!(
            s(&mut cx, "${containerWorkspaceFolder}/bin"),
            "/workspaces/shop/bin"
        );
        assert_eq!(
            s(&mut cx, "${containerEnv:PATH}:/x"),
            "${containerEnv:PATH}:/x"
        );
        assert_eq!(s(&mut cx, "cost: ${"), "cost: ${");
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);

        let mut cx = Cx {
            diags: &mut d,
            dialect: Dialect::Json,
        };
        assert_eq!(s(&mut cx, "${localEnv:NOPE}"), "");
        assert_eq!(s(&mut cx, "${devcontainerId}"), "${devcontainerId}");
        assert_eq!(d.warnings.len(), 2);
    }

    #[test]
    fn container_env_is_expanded_inside_the_workspace() {
        let lookup = |n: &str| (n == "PATH").then(|| "/usr/bin".to_owned());
        assert_eq!(
            expand_container_env("${containerEnv:PATH}:/opt/bin", lookup),
            "/usr/bin:/opt/bin"
        );
        assert_eq!(
            expand_container_env("${containerEnv:HOME:/root}", lookup),
            "/root"
        );
        assert_eq!(expand_container_env("${containerEnv:X}", lookup), "");
        assert_eq!(
            expand_container_env("${containerEnv:X", lookup),
            "${containerEnv:X"
        );
    }
}
