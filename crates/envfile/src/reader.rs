//! What the three format readers share: the draft they fill in, commands, and task names.

use std::collections::{BTreeMap, HashMap};

use crate::diag::Pos;
use crate::fields::PathRef;
use crate::model::{
    Command, EnvSpec, Format, ImageSource, RepoPath, Resources, RuntimeKind, SourceFile,
};
use crate::tree::{Cx, Fields, Node, Value};

/// An environment being read: the spec so far and the repository paths it refers to.
#[derive(Debug)]
pub(crate) struct Draft {
    pub(crate) file: RepoPath,
    pub(crate) spec: EnvSpec,
    pub(crate) paths: Vec<PathRef>,
}

impl Draft {
    pub(crate) fn new(file: RepoPath, format: Format) -> Draft {
        Draft {
            spec: empty_spec(file.clone(), format, "/workspace"),
            file,
            paths: Vec::new(),
        }
    }
}

/// A spec with nothing set yet; readers fill it in. It is only handed out when reading found no
/// error, so the placeholder image never escapes.
pub(crate) fn empty_spec(path: RepoPath, format: Format, workspace_folder: &str) -> EnvSpec {
    EnvSpec {
        source: SourceFile { path, format },
        name: None,
        image: ImageSource::Reference {
            reference: String::new(),
        },
        runtime: RuntimeKind::default(),
        resources: Resources::default(),
        workspace_folder: workspace_folder.to_owned(),
        user: None,
        container_user: None,
        env: BTreeMap::new(),
        remote_env: BTreeMap::new(),
        ports: Vec::new(),
        tasks: Vec::new(),
        extensions: Vec::new(),
    }
}

/// A command: a string is a script for the task's shell; a list is a program and its arguments.
pub(crate) fn command(cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<Command> {
    match &node.value {
        Value::Str(_) => cx.string(node, field).map(Command::Script),
        Value::Seq(items) => {
            if items.is_empty() {
                cx.error(
                    node.pos,
                    format!("`{field}`: expected a program and its arguments, found an empty list"),
                );
                return None;
            }
            let before = cx.diags.errors.len();
            let argv: Vec<String> = items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| cx.scalar_text(item, &format!("{field}[{i}]")))
                .collect();
            if argv.first().is_some_and(String::is_empty) {
                cx.error(
                    items[0].pos,
                    format!("`{field}[0]`: the program name is empty"),
                );
            }
            (cx.diags.errors.len() == before).then_some(Command::Exec(argv))
        }
        _ => {
            let expected = format!(
                "a command (a string, or {} of program and arguments)",
                cx.seq_word()
            );
            cx.mismatch(node, field, &expected);
            None
        }
    }
}

/// Each entry of the `tasks` list under `node` that is a map, with its field (`tasks[3]`) and
/// its name checked as [`TaskNames`] does (`None` after an error was said): the part every
/// dialect with a task list reads the same way.
pub(crate) fn each_task<'n>(
    cx: &mut Cx<'_>,
    node: &'n Node,
    mut each: impl FnMut(&mut Cx<'_>, &str, &'n Node, Fields<'n>, Option<String>),
) {
    let Some(items) = cx.seq(node, "tasks") else {
        return;
    };
    let mut names = TaskNames::default();
    for (i, item) in items.iter().enumerate() {
        let field = format!("tasks[{i}]");
        let Some(mut f) = cx.map(item, &field) else {
            continue;
        };
        let name = f
            .require(cx, "name", "a name for the task")
            .and_then(|n| names.check(cx, n, &format!("{field}.name")));
        each(cx, &field, item, f, name);
    }
}

/// Task names: non-empty, at most 255 characters, unique in the file.
#[derive(Debug, Default)]
pub(crate) struct TaskNames {
    seen: HashMap<String, Pos>,
}

impl TaskNames {
    pub(crate) fn check(&mut self, cx: &mut Cx<'_>, node: &Node, field: &str) -> Option<String> {
        let name = cx.scalar_text(node, field)?;
        self.check_text(cx, node.pos, field, name)
    }

    pub(crate) fn check_text(
        &mut self,
        cx: &mut Cx<'_>,
        pos: Pos,
        field: &str,
        name: String,
    ) -> Option<String> {
        if name.trim().is_empty() || name.chars().count() > 255 || name.contains(['\n', '\0']) {
            cx.error(
                pos,
                format!("`{field}`: expected a task name of 1 to 255 characters on one line"),
            );
            return None;
        }
        if let Some(first) = self.seen.get(&name) {
            cx.error(
                pos,
                format!("`{field}`: task name `{name}` is already used at line {}; names must be unique", first.line),
            );
            return None;
        }
        self.seen.insert(name.clone(), pos);
        Some(name)
    }
}
