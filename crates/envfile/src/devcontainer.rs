//! `.devcontainer/devcontainer.json` and `.devcontainer.json`, per the Development Containers
//! specification, for the image-based and Dockerfile-based forms.
//!
//! Lifecycle commands map to phases: `onCreateCommand` then `updateContentCommand` run in the
//! prebuild; `postCreateCommand` once on the first start; `postStartCommand` on every start;
//! `postAttachCommand` when an IDE attaches. Each may be a string (run by `/bin/sh`), an array
//! (run without a shell) or an object of named commands that run in parallel.
//!
//! Every field Warren does not act on is reported by name as a warning, never dropped silently.

use crate::fields::{self, PathKind};
use crate::model::{Command, ImageSource, Phase, Port, RuntimeKind, Shell, Task};
use crate::reader::{Draft, TaskNames, command};
use crate::tree::{Cx, Fields, Node, Value};
use crate::vars::{self, Vars};

/// The lifecycle hooks in the order they run, with their phase and stage.
const HOOKS: [(&str, Phase, u32); 5] = [
    ("onCreateCommand", Phase::Prebuild, 0),
    ("updateContentCommand", Phase::Prebuild, 1),
    ("postCreateCommand", Phase::FirstStart, 0),
    ("postStartCommand", Phase::EveryStart, 0),
    ("postAttachCommand", Phase::Attach, 0),
];

/// Fields of the specification that Warren knowingly does not act on, and why.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "dockerComposeFile",
        "Docker Compose dev containers are not supported; use `image` or `build`",
    ),
    ("service", "Docker Compose dev containers are not supported"),
    (
        "runServices",
        "Docker Compose dev containers are not supported",
    ),
    (
        "features",
        "dev container features are not supported; install what they provide in the Dockerfile",
    ),
    (
        "overrideFeatureInstallOrder",
        "dev container features are not supported",
    ),
    (
        "runArgs",
        "workspaces are not started with `docker run`, so its arguments do not apply",
    ),
    (
        "mounts",
        "extra mounts into the workspace are not supported",
    ),
    (
        "workspaceMount",
        "the repository is always checked out at `workspaceFolder`",
    ),
    ("appPort", "use `forwardPorts` instead"),
    (
        "privileged",
        "workspaces are never privileged; Docker runs inside without it",
    ),
    (
        "capAdd",
        "workspaces get a fixed capability set inside their user namespace",
    ),
    ("securityOpt", "workspaces have a fixed security profile"),
    (
        "init",
        "every workspace already has an init process that reaps zombies",
    ),
    ("overrideCommand", "workspaces always run Warren's init"),
    (
        "shutdownAction",
        "workspaces are stopped with `warren ws stop`",
    ),
    (
        "initializeCommand",
        "it would run on the host that starts the workspace, which Warren never allows",
    ),
    (
        "waitFor",
        "a workspace is ready once its prebuild exists; first-start commands run after that",
    ),
    (
        "otherPortsAttributes",
        "only `label` of `portsAttributes` is used",
    ),
    ("userEnvProbe", "sessions get the image's login environment"),
    (
        "updateRemoteUserUID",
        "ownership is mapped by the workspace's user namespace",
    ),
];

pub(crate) struct Context<'a> {
    pub(crate) vars: Vars<'a>,
}

pub(crate) fn read(cx: &mut Cx<'_>, root: &Node, draft: &mut Draft, ctx: &Context<'_>) {
    let Draft { file, spec, paths } = draft;
    if !matches!(root.value, Value::Map(_)) {
        cx.mismatch(
            root,
            "(top level)",
            "an object such as {\"image\": \"debian:bookworm\"}",
        );
        return;
    }
    let mut root = root.clone();
    let Value::Map(entries) = &mut root.value else {
        return;
    };

    // `workspaceFolder` first: the other fields may refer to it.
    let mut vars = ctx.vars.clone();
    let basename = vars
        .local_workspace_folder
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("workspace");
    let mut workspace_folder = format!("/workspaces/{basename}");
    if let Some(entry) = entries.iter_mut().find(|e| e.key == "workspaceFolder") {
        vars::substitute_tree(cx, &mut entry.value, "workspaceFolder", &vars, false);
        if entry.value.value != Value::Null
            && let Some(folder) = fields::workspace_folder(cx, &entry.value, "workspaceFolder")
        {
            workspace_folder = folder;
        }
    }
    vars.container_workspace_folder = Some(&workspace_folder);
    for entry in entries.iter_mut().filter(|e| e.key != "workspaceFolder") {
        let allowed = entry.key == "remoteEnv" || HOOKS.iter().any(|(hook, ..)| *hook == entry.key);
        vars::substitute_tree(cx, &mut entry.value, &entry.key, &vars, allowed);
    }
    spec.workspace_folder = workspace_folder.clone();

    let mut top = cx.map(&root, "").expect("checked to be an object");
    top.take("workspaceFolder");
    top.take("$schema");
    let base = file.parent();

    if let Some(n) = top.take("name") {
        spec.name = cx.string(n, "name");
    }

    // The image: `image`, or `build` (with the older top-level `dockerFile` / `context`).
    let image = top.take("image");
    let build = top.take("build");
    let legacy_dockerfile = top.take("dockerFile");
    let legacy_context = top.take("context");
    let compose =
        matches!(&root.value, Value::Map(e) if e.iter().any(|e| e.key == "dockerComposeFile"));
    let built = build.is_some() || legacy_dockerfile.is_some();
    match (image, built) {
        (Some(n), true) => {
            cx.error(
                n.pos,
                "both `image` and `build` are set: expected one of them",
            );
        }
        (Some(n), false) => {
            if let Some(reference) = fields::image_reference(cx, n, "image") {
                spec.image = ImageSource::Reference { reference };
            }
        }
        (None, true) => {
            let mut dockerfile = legacy_dockerfile.map(|n| (n, "dockerFile"));
            let mut context = legacy_context.map(|n| (n, "context"));
            let mut args = Default::default();
            let mut target = None;
            if let Some(b) = build
                && let Some(mut f) = cx.map(b, "build")
            {
                dockerfile = f
                    .take("dockerfile")
                    .map(|n| (n, "build.dockerfile"))
                    .or(dockerfile);
                context = f.take("context").map(|n| (n, "build.context")).or(context);
                args = f
                    .take("args")
                    .map(|n| fields::env_map(cx, n, "build.args"))
                    .unwrap_or_default();
                target = f.take("target").and_then(|n| cx.string(n, "build.target"));
                for (key, why) in [
                    (
                        "cacheFrom",
                        "the build cache is Warren's own, keyed by content",
                    ),
                    ("options", "builds do not run `docker build`"),
                ] {
                    if let Some(n) = f.take(key) {
                        cx.warn(
                            n.pos,
                            format!("`build.{key}` is not supported ({why}); it is ignored"),
                        );
                    }
                }
                warn_unknown(cx, &f);
            }
            match dockerfile {
                None => cx.error(
                    build.map_or(root.pos, |b| b.pos),
                    "`build`: missing `dockerfile`: expected the path of a Dockerfile, relative to devcontainer.json",
                ),
                Some((n, field)) => {
                    let dockerfile = fields::repo_path(cx, n, field, &base, PathKind::File, paths);
                    let context = match context {
                        Some((n, field)) => fields::repo_path(cx, n, field, &base, PathKind::Dir, paths),
                        None => Some(base.clone()),
                    };
                    if let (Some(dockerfile), Some(context)) = (dockerfile, context) {
                        spec.image = ImageSource::Dockerfile { dockerfile, context, args, target };
                    }
                }
            }
        }
        (None, false) => {
            let why = if compose {
                " (Docker Compose files are not supported)"
            } else {
                ""
            };
            cx.error(
                root.pos,
                format!("no image: expected `image` (such as \"debian:bookworm\") or `build` with a `dockerfile`{why}"),
            );
        }
    }
    if let (Some(n), false) = (legacy_context, built) {
        cx.warn(
            n.pos,
            "`context` only applies with `dockerFile`; it is ignored",
        );
    }

    // Lifecycle commands.
    let mut names = TaskNames::default();
    for (hook, phase, stage) in HOOKS {
        if let Some(n) = top.take(hook) {
            spec.tasks
                .extend(lifecycle(cx, n, hook, phase, stage, &mut names));
        }
    }

    if let Some(n) = top.take("forwardPorts") {
        spec.ports = forward_ports(cx, n);
    }
    if let Some(n) = top.take("portsAttributes") {
        port_labels(cx, n, &mut spec.ports);
    }
    if let Some(n) = top.take("containerEnv") {
        spec.env = fields::env_map(cx, n, "containerEnv");
    }
    if let Some(n) = top.take("remoteEnv") {
        spec.remote_env = fields::env_map(cx, n, "remoteEnv");
    }
    if let Some(n) = top.take("remoteUser") {
        spec.user = fields::user(cx, n, "remoteUser");
    }
    if let Some(n) = top.take("containerUser") {
        spec.container_user = fields::user(cx, n, "containerUser");
    }
    if let Some(n) = top.take("customizations") {
        customizations(cx, n, spec);
    }
    if let Some(n) = top.take("hostRequirements") {
        host_requirements(cx, n, &mut spec.resources);
    }
    for entry in top.untaken() {
        if UNSUPPORTED.iter().any(|(key, _)| *key == entry.key) {
            cx.warn(entry.key_pos, unsupported_message(&entry.key));
        } else {
            cx.warn(
                entry.key_pos,
                format!(
                    "`{}` is not a devcontainer.json field Warren knows; it is ignored",
                    entry.key
                ),
            );
        }
    }
}

fn unsupported_message(key: &str) -> String {
    let why = UNSUPPORTED
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, why)| why);
    format!("`{key}` is not supported by Warren ({why}); it is ignored")
}

fn warn_unknown(cx: &mut Cx<'_>, fields: &Fields<'_>) {
    fields.warn_unknown(cx, "is not a devcontainer.json field Warren knows");
}

fn lifecycle(
    cx: &mut Cx<'_>,
    node: &Node,
    hook: &str,
    phase: Phase,
    stage: u32,
    names: &mut TaskNames,
) -> Vec<Task> {
    let task = |name: String, command: Command| Task {
        name,
        phase,
        stage,
        shell: Shell::Sh,
        command,
    };
    match &node.value {
        Value::Map(entries) => {
            let mut out = Vec::new();
            for entry in entries {
                if entry.value.value == Value::Null {
                    continue;
                }
                let field = format!("{hook}.{}", entry.key);
                let Some(name) =
                    names.check_text(cx, entry.key_pos, &field, format!("{hook}:{}", entry.key))
                else {
                    continue;
                };
                if let Some(c) = command(cx, &entry.value, &field) {
                    out.push(task(name, c));
                }
            }
            out
        }
        _ => {
            let name = names.check_text(cx, node.pos, hook, hook.to_owned());
            match (name, command(cx, node, hook)) {
                (Some(name), Some(c)) => vec![task(name, c)],
                _ => Vec::new(),
            }
        }
    }
}

fn forward_ports(cx: &mut Cx<'_>, node: &Node) -> Vec<Port> {
    let Some(items) = cx.seq(node, "forwardPorts") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("forwardPorts[{i}]");
        let port = match &item.value {
            Value::Str(s) => {
                let (host, port) = s.rsplit_once(':').unwrap_or(("localhost", s));
                match port.parse::<u16>() {
                    Ok(p) if p > 0 && (host == "localhost" || host == "127.0.0.1") => Some(p),
                    Ok(p) if p > 0 => {
                        cx.warn(item.pos, format!("`{field}`: `{s}` is a port of another host or Compose service, which Warren cannot forward; it is ignored"));
                        None
                    }
                    _ => {
                        cx.error(
                            item.pos,
                            format!(
                                "`{field}`: expected a port number or \"host:port\", found \"{s}\""
                            ),
                        );
                        None
                    }
                }
            }
            _ => fields::port_number(cx, item, &field),
        };
        if let Some(port) = port {
            found.push((Port { port, label: None }, item.pos));
        }
    }
    fields::dedup_ports(cx, found)
}

fn port_labels(cx: &mut Cx<'_>, node: &Node, ports: &mut [Port]) {
    let Some(attrs) = cx.map(node, "portsAttributes") else {
        return;
    };
    for entry in attrs.untaken() {
        let field = format!("portsAttributes.{}", entry.key);
        let Some(mut f) = cx.map(&entry.value, &field) else {
            continue;
        };
        if let Some(label) = f
            .take("label")
            .and_then(|n| cx.string(n, &format!("{field}.label")))
        {
            match ports.iter_mut().find(|p| p.port.to_string() == entry.key) {
                Some(port) => port.label = Some(label),
                None => cx.warn(
                    entry.key_pos,
                    format!(
                        "`{field}`: port {} is not in `forwardPorts`; its label is ignored",
                        entry.key
                    ),
                ),
            }
        }
        for other in f.untaken() {
            cx.warn(
                other.key_pos,
                format!(
                    "`{field}.{}` is not supported (only `label` is used); it is ignored",
                    other.key
                ),
            );
        }
    }
}

fn customizations(cx: &mut Cx<'_>, node: &Node, spec: &mut crate::model::EnvSpec) {
    let Some(mut f) = cx.map(node, "customizations") else {
        return;
    };
    if let Some(vscode) = f.take("vscode")
        && let Some(mut v) = cx.map(vscode, "customizations.vscode")
    {
        if let Some(n) = v.take("extensions") {
            spec.extensions = fields::extensions(cx, n, "customizations.vscode.extensions");
        }
        if let Some(n) = v.take("settings") {
            cx.warn(
                n.pos,
                "`customizations.vscode.settings` is not applied by Warren yet; it is ignored",
            );
        }
        warn_unknown(cx, &v);
    }
    if let Some(warren) = f.take("warren")
        && let Some(mut w) = cx.map(warren, "customizations.warren")
    {
        if let Some(n) = w.take("runtime")
            && let Some(text) = cx.string(n, "customizations.warren.runtime")
        {
            match text.as_str() {
                        "container" => spec.runtime = RuntimeKind::Container,
                        "vm" => spec.runtime = RuntimeKind::Vm,
                        other => cx.error(n.pos, format!("`customizations.warren.runtime`: expected \"container\" or \"vm\", found \"{other}\"")),
                    }
        }
        for entry in w.untaken() {
            cx.error(
                entry.key_pos,
                format!(
                    "unknown field `customizations.warren.{}`; expected `runtime`",
                    entry.key
                ),
            );
        }
    }
    for entry in f.untaken() {
        cx.warn(
            entry.key_pos,
            format!(
                "`customizations.{}` is for another tool; Warren ignores it",
                entry.key
            ),
        );
    }
}

fn host_requirements(cx: &mut Cx<'_>, node: &Node, resources: &mut crate::model::Resources) {
    let Some(mut f) = cx.map(node, "hostRequirements") else {
        return;
    };
    if let Some(n) = f.take("cpus") {
        resources.cpus = fields::cpu_count(cx, n, "hostRequirements.cpus");
    }
    if let Some(n) = f.take("memory") {
        resources.memory = fields::byte_size(cx, n, "hostRequirements.memory");
    }
    if let Some(n) = f.take("storage") {
        resources.disk = fields::byte_size(cx, n, "hostRequirements.storage");
    }
    if let Some(n) = f.take("gpu") {
        cx.warn(
            n.pos,
            "`hostRequirements.gpu` is not supported: workspaces have no GPU; it is ignored",
        );
    }
    warn_unknown(cx, &f);
}
