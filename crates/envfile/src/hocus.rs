//! `hocus.yml` (also `hocus.yaml`, `.hocus.yml`, `.hocus.yaml`), read as Hocus defined it:
//!
//! ```yaml
//! image:
//!   file: hocus/Dockerfile      # required, relative to the file's folder
//!   buildContext: hocus         # required
//! tasks:                        # required; may be empty
//!   - name: api                 # required, unique
//!     prebuild: npm ci          # run in the prebuild (tasks run in parallel)
//!     workspace: npm run dev    # run in a terminal on every workspace start
//!     workspaceShell: fish      # bash (default), zsh, ash or fish
//! vscode:
//!   extensions: [dbaeumer.vscode-eslint]
//! ```
//!
//! Prebuild commands run with bash, as in Hocus; `workspaceShell` is the shell of the task's
//! workspace terminal. Fields Hocus did not define are reported as warnings and ignored.

use crate::fields::{self, PathKind};
use crate::model::{Command, ImageSource, Phase, Shell, Task};
use crate::reader::{Draft, each_task};
use crate::tree::{Cx, Fields, Node};
use crate::warren::shell;

const HOCUS_SHELLS: [&str; 4] = ["bash", "zsh", "ash", "fish"];

pub(crate) fn read(cx: &mut Cx<'_>, root: &Node, draft: &mut Draft) {
    let Draft { file, spec, paths } = draft;
    let Some(mut top) = cx.top_level(root, "a mapping with `image` and `tasks`") else {
        return;
    };
    let base = file.parent();

    if let Some(image) = top.require(cx, "image", "a mapping with `file` and `buildContext`")
        && let Some(mut f) = cx.map(image, "image")
    {
        let dockerfile = f
            .require(cx, "file", "the path of a Dockerfile")
            .and_then(|n| fields::repo_path(cx, n, "image.file", &base, PathKind::File, paths));
        let context = f
            .require(cx, "buildContext", "the folder sent to the build")
            .and_then(|n| {
                fields::repo_path(cx, n, "image.buildContext", &base, PathKind::Dir, paths)
            });
        warn_unknown(cx, &f);
        if let (Some(dockerfile), Some(context)) = (dockerfile, context) {
            spec.image = ImageSource::Dockerfile {
                dockerfile,
                context,
                args: Default::default(),
                target: None,
            };
        }
    }
    if let Some(n) = top.require(
        cx,
        "tasks",
        "a list of tasks (it may be empty: `tasks: []`)",
    ) {
        spec.tasks = tasks(cx, n);
    }
    if let Some(n) = top.take("vscode")
        && let Some(mut f) = cx.map(n, "vscode")
    {
        if let Some(ext) = f.take("extensions") {
            spec.extensions = fields::extensions(cx, ext, "vscode.extensions");
        }
        warn_unknown(cx, &f);
    }
    warn_unknown(cx, &top);
}

fn warn_unknown(cx: &mut Cx<'_>, fields: &Fields<'_>) {
    fields.warn_unknown(cx, "is not part of hocus.yml");
}

fn tasks(cx: &mut Cx<'_>, node: &Node) -> Vec<Task> {
    let mut out = Vec::new();
    each_task(cx, node, |cx, field, item, mut f, name| {
        let prebuild = f
            .take("prebuild")
            .and_then(|n| cx.string(n, &format!("{field}.prebuild")));
        let workspace = f
            .take("workspace")
            .and_then(|n| cx.string(n, &format!("{field}.workspace")));
        let workspace_shell = match f.take("workspaceShell") {
            None => Some(Shell::Bash),
            Some(n) => shell(cx, n, &format!("{field}.workspaceShell"), &HOCUS_SHELLS),
        };
        if f.take("prebuild").is_none() && f.take("workspace").is_none() {
            cx.error(
                item.pos,
                format!("`{field}` has nothing to run: expected `prebuild`, `workspace` or both"),
            );
        }
        warn_unknown(cx, &f);
        let (Some(name), Some(workspace_shell)) = (name, workspace_shell) else {
            return;
        };
        if let Some(script) = prebuild {
            out.push(Task {
                name: name.clone(),
                phase: Phase::Prebuild,
                stage: 0,
                shell: Shell::Bash,
                command: Command::Script(script),
            });
        }
        if let Some(script) = workspace {
            out.push(Task {
                name,
                phase: Phase::EveryStart,
                stage: 0,
                shell: workspace_shell,
                command: Command::Script(script),
            });
        }
    });
    out
}
