//! `warren.yml`: Warren's own environment file. The reference is `docs/environment-file.md`.
//!
//! Unknown fields are errors here (with a "did you mean"), because in our own format a typo is
//! far more likely than a field from a newer version.

use crate::fields::{self, PathKind};
use crate::model::{Command, ImageSource, Phase, Port, Resources, RuntimeKind, Shell, Task};
use crate::reader::{Draft, command, each_task};
use crate::tree::{Cx, Node, Value};

const TOP: &[&str] = &[
    "name",
    "image",
    "runtime",
    "resources",
    "user",
    "workspaceFolder",
    "env",
    "ports",
    "tasks",
    "extensions",
];
const IMAGE: &[&str] = &["file", "buildContext", "args", "target"];
const RESOURCES: &[&str] = &["cpus", "memory", "disk"];
const TASK: &[&str] = &["name", "shell", "prebuild", "init", "workspace"];
const PORT: &[&str] = &["port", "label"];

pub(crate) fn read(cx: &mut Cx<'_>, root: &Node, draft: &mut Draft) {
    let Draft { file, spec, paths } = draft;
    let Some(mut top) = cx.top_level(
        root,
        "a mapping with at least `image`, such as `image: debian:bookworm`",
    ) else {
        return;
    };

    if let Some(n) = top.take("name") {
        spec.name = cx.string(n, "name");
    }
    let base = file.parent();
    if let Some(image) = top.require(cx, "image", "an image reference, or a mapping with `file`") {
        match &image.value {
            Value::Map(_) => {
                let mut f = cx.map(image, "image").expect("checked to be a map");
                let dockerfile = f
                    .require(cx, "file", "the path of a Dockerfile")
                    .and_then(|n| {
                        fields::repo_path(cx, n, "image.file", &base, PathKind::File, paths)
                    });
                let context = match f.take("buildContext") {
                    Some(n) => {
                        fields::repo_path(cx, n, "image.buildContext", &base, PathKind::Dir, paths)
                    }
                    None => Some(base.clone()),
                };
                let args = f
                    .take("args")
                    .map(|n| fields::env_map(cx, n, "image.args"))
                    .unwrap_or_default();
                let target = f.take("target").and_then(|n| cx.string(n, "image.target"));
                f.deny_unknown(cx, IMAGE);
                if let (Some(dockerfile), Some(context)) = (dockerfile, context) {
                    spec.image = ImageSource::Dockerfile {
                        dockerfile,
                        context,
                        args,
                        target,
                    };
                }
            }
            _ => {
                if let Some(reference) = fields::image_reference(cx, image, "image") {
                    spec.image = ImageSource::Reference { reference };
                }
            }
        }
    }
    if let Some(n) = top.take("runtime") {
        spec.runtime = runtime(cx, n).unwrap_or_default();
    }
    if let Some(n) = top.take("resources") {
        spec.resources = resources(cx, n);
    }
    if let Some(n) = top.take("user") {
        spec.user = fields::user(cx, n, "user");
    }
    if let Some(n) = top.take("workspaceFolder")
        && let Some(folder) = fields::workspace_folder(cx, n, "workspaceFolder")
    {
        spec.workspace_folder = folder;
    }
    if let Some(n) = top.take("env") {
        spec.env = fields::env_map(cx, n, "env");
    }
    if let Some(n) = top.take("ports") {
        spec.ports = ports(cx, n);
    }
    if let Some(n) = top.take("tasks") {
        spec.tasks = tasks(cx, n);
    }
    if let Some(n) = top.take("extensions") {
        spec.extensions = fields::extensions(cx, n, "extensions");
    }
    top.deny_unknown(cx, TOP);
}

fn runtime(cx: &mut Cx<'_>, node: &Node) -> Option<RuntimeKind> {
    let text = cx.string(node, "runtime")?;
    match text.as_str() {
        "container" => Some(RuntimeKind::Container),
        "vm" => Some(RuntimeKind::Vm),
        other => {
            cx.error(
                node.pos,
                format!("`runtime`: expected `container` or `vm`, found `{other}`"),
            );
            None
        }
    }
}

fn resources(cx: &mut Cx<'_>, node: &Node) -> Resources {
    let mut out = Resources::default();
    let Some(mut f) = cx.map(node, "resources") else {
        return out;
    };
    if let Some(n) = f.take("cpus") {
        out.cpus = fields::cpu_count(cx, n, "resources.cpus");
    }
    if let Some(n) = f.take("memory") {
        out.memory = fields::byte_size(cx, n, "resources.memory");
    }
    if let Some(n) = f.take("disk") {
        out.disk = fields::byte_size(cx, n, "resources.disk");
    }
    f.deny_unknown(cx, RESOURCES);
    out
}

fn ports(cx: &mut Cx<'_>, node: &Node) -> Vec<Port> {
    let Some(items) = cx.seq(node, "ports") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("ports[{i}]");
        let port = match &item.value {
            Value::Map(_) => {
                let mut f = cx.map(item, &field).expect("checked to be a map");
                let port = f
                    .require(cx, "port", "a port number")
                    .and_then(|n| fields::port_number(cx, n, &format!("{field}.port")));
                let label = f
                    .take("label")
                    .and_then(|n| cx.string(n, &format!("{field}.label")));
                f.deny_unknown(cx, PORT);
                port.map(|port| Port { port, label })
            }
            _ => fields::port_number(cx, item, &field).map(|port| Port { port, label: None }),
        };
        if let Some(port) = port {
            found.push((port, item.pos));
        }
    }
    fields::dedup_ports(cx, found)
}

fn tasks(cx: &mut Cx<'_>, node: &Node) -> Vec<Task> {
    let mut out = Vec::new();
    let (mut prebuild_stage, mut init_stage) = (0, 0);
    each_task(cx, node, |cx, field, item, mut f, name| {
        let shell = match f.take("shell") {
            None => Some(Shell::Bash),
            Some(n) => shell(cx, n, &format!("{field}.shell"), &Shell::NAMES),
        };
        let mut commands: Vec<(Phase, u32, Command)> = Vec::new();
        if let Some(n) = f.take("prebuild")
            && let Some(c) = command(cx, n, &format!("{field}.prebuild"))
        {
            commands.push((Phase::Prebuild, prebuild_stage, c));
            prebuild_stage += 1;
        }
        if let Some(n) = f.take("init")
            && let Some(c) = command(cx, n, &format!("{field}.init"))
        {
            commands.push((Phase::FirstStart, init_stage, c));
            init_stage += 1;
        }
        if let Some(n) = f.take("workspace")
            && let Some(c) = command(cx, n, &format!("{field}.workspace"))
        {
            commands.push((Phase::EveryStart, 0, c));
        }
        if !["prebuild", "init", "workspace"]
            .iter()
            .any(|k| has_key(item, k))
        {
            cx.error(
                item.pos,
                format!("`{field}` has nothing to run: expected at least one of `prebuild`, `init`, `workspace`"),
            );
        }
        f.deny_unknown(cx, TASK);
        if let (Some(name), Some(shell)) = (name, shell) {
            out.extend(commands.into_iter().map(|(phase, stage, command)| Task {
                name: name.clone(),
                phase,
                stage,
                shell,
                command,
            }));
        }
    });
    out
}

fn has_key(node: &Node, key: &str) -> bool {
    matches!(&node.value, Value::Map(entries) if entries.iter().any(|e| e.key == key && e.value.value != Value::Null))
}

/// A shell name from `allowed`.
pub(crate) fn shell(cx: &mut Cx<'_>, node: &Node, field: &str, allowed: &[&str]) -> Option<Shell> {
    let text = cx.string(node, field)?;
    match Shell::from_name(&text) {
        Some(s) if allowed.contains(&s.name()) => Some(s),
        _ => {
            cx.error(
                node.pos,
                format!(
                    "`{field}`: expected one of {}; found `{text}`",
                    allowed.join(", ")
                ),
            );
            None
        }
    }
}
