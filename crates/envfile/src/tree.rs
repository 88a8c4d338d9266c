//! A located value tree: what YAML and JSONC files both parse into, with the position of every
//! value and key, and the helpers the format readers use to pull typed fields out of it while
//! reporting every type error with its position.
//!
//! The readers never deserialize with serde directly: a serde error knows where it happened but
//! not what the field means, and stops at the first problem. Walking the tree lets a reader say
//! "`tasks[1].workspaceShell`: expected one of bash, zsh, ash, fish" and keep going.

use std::collections::BTreeMap;

use crate::diag::{Diagnostics, Pos};

/// The most nodes one file may expand to (after YAML aliases), so that a small file cannot make
/// the reader allocate without bound ("billion laughs").
pub(crate) const MAX_NODES: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) value: Value,
    pub(crate) pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    /// A number as written; `int` is set when it is an integer that fits `i64`.
    Number {
        raw: String,
        int: Option<i64>,
    },
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_pos: Pos,
    pub(crate) value: Node,
}

impl Node {
    /// How many nodes this subtree holds, itself included.
    pub(crate) fn size(&self) -> usize {
        1 + match &self.value {
            Value::Seq(items) => items.iter().map(Node::size).sum(),
            Value::Map(entries) => entries.iter().map(|e| e.value.size()).sum(),
            _ => 0,
        }
    }
}

/// Which surface syntax a tree came from, so messages use that syntax's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Yaml,
    Json,
}

/// What a reader walks the tree with: the diagnostics sink and the dialect.
#[derive(Debug)]
pub(crate) struct Cx<'d> {
    pub(crate) diags: &'d mut Diagnostics,
    pub(crate) dialect: Dialect,
}

impl Cx<'_> {
    /// The top-level mapping of a YAML file; `empty` is the error for a file with nothing in it.
    pub(crate) fn top_level<'n>(&mut self, root: &'n Node, empty: &str) -> Option<Fields<'n>> {
        if root.value == Value::Null {
            self.error(root.pos, format!("the file is empty: expected {empty}"));
            return None;
        }
        let mut top = self.map(root, "(top level)")?;
        top.path.clear();
        Some(top)
    }

    pub(crate) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.error(pos, message);
    }

    pub(crate) fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.warn(pos, message);
    }

    /// "a string", "a list", ...: what a value is, in this dialect's words.
    pub(crate) fn describe(&self, v: &Value) -> &'static str {
        match (v, self.dialect) {
            (Value::Null, _) => "nothing (null)",
            (Value::Bool(_), _) => "a boolean",
            (Value::Number { .. }, _) => "a number",
            (Value::Str(_), _) => "a string",
            (Value::Seq(_), Dialect::Yaml) => "a list",
            (Value::Seq(_), Dialect::Json) => "an array",
            (Value::Map(_), Dialect::Yaml) => "a mapping",
            (Value::Map(_), Dialect::Json) => "an object",
        }
    }

    pub(crate) fn map_word(&self) -> &'static str {
        match self.dialect {
            Dialect::Yaml => "a mapping",
            Dialect::Json => "an object",
        }
    }

    pub(crate) fn seq_word(&self) -> &'static str {
        match self.dialect {
            Dialect::Yaml => "a list",
            Dialect::Json => "an array",
        }
    }

    /// Reports "`field`: expected X, found Y" at the node.
    pub(crate) fn mismatch(&mut self, node: &Node, field: &str, expected: &str) {
        let found = self.describe(&node.value);
        self.error(
            node.pos,
            format!("`{field}`: expected {expected}, found {found}"),
        );
    }

    pub(crate) fn map<'n>(&mut self, node: &'n Node, field: &str) -> Option<Fields<'n>> {
        match &node.value {
            Value::Map(entries) => Some(Fields::new(field, node.pos, entries)),
            _ => {
                let expected = self.map_word();
                self.mismatch(node, field, expected);
                None
            }
        }
    }

    pub(crate) fn seq<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ => {
                let expected = self.seq_word();
                self.mismatch(node, field, expected);
                None
            }
        }
    }

    /// A string; an empty one is an error, since no field Warren reads means anything empty.
    pub(crate) fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) if s.trim().is_empty() => {
                self.error(node.pos, format!("`{field}`: expected a non-empty string"));
                None
            }
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.mismatch(node, field, "a string");
                None
            }
        }
    }

    /// A scalar taken as text, as an environment variable value is: `PORT: 3000` means "3000".
    pub(crate) fn scalar_text(&mut self, node: &Node, field: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Number { raw, .. } => Some(raw.clone()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.mismatch(node, field, "a string");
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub(crate) fn integer(&mut self, node: &Node, field: &str, min: i64, max: i64) -> Option<i64> {
        match &node.value {
            Value::Number { int: Some(n), .. } if (min..=max).contains(n) => Some(*n),
            Value::Number { raw, .. } => {
                self.error(
                    node.pos,
                    format!("`{field}`: expected a whole number from {min} to {max}, found {raw}"),
                );
                None
            }
            _ => {
                self.mismatch(node, field, "a whole number");
                None
            }
        }
    }

    /// A mapping of names to scalar values (environment variables, build args).
    pub(crate) fn string_map(&mut self, node: &Node, field: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(fields) = self.map(node, field) else {
            return out;
        };
        for entry in fields.entries {
            if entry.key.is_empty() {
                self.error(entry.key_pos, format!("`{field}`: a name may not be empty"));
                continue;
            }
            if entry.value.value == Value::Null {
                // `NAME: null` unsets a variable (devcontainer.json documents this for remoteEnv).
                continue;
            }
            let sub = format!("{field}.{}", entry.key);
            if let Some(v) = self.scalar_text(&entry.value, &sub) {
                out.insert(entry.key.clone(), v);
            }
        }
        out
    }
}

/// The fields of one mapping, tracking which ones a reader has looked at so that the rest can be
/// reported as unknown or unsupported.
#[derive(Debug)]
pub(crate) struct Fields<'n> {
    pub(crate) path: String,
    pub(crate) pos: Pos,
    entries: &'n [Entry],
    taken: Vec<bool>,
}

impl<'n> Fields<'n> {
    fn new(path: &str, pos: Pos, entries: &'n [Entry]) -> Fields<'n> {
        Fields {
            path: path.to_owned(),
            pos,
            entries,
            taken: vec![false; entries.len()],
        }
    }

    /// The field's path for messages: `image.file`, or `file` at the top level.
    pub(crate) fn sub(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key`, if present (a `null` value counts as absent).
    pub(crate) fn take(&mut self, key: &str) -> Option<&'n Node> {
        let i = self.entries.iter().position(|e| e.key == key)?;
        self.taken[i] = true;
        let node = &self.entries[i].value;
        (node.value != Value::Null).then_some(node)
    }

    /// The value of `key`, or an error at the mapping saying it is missing.
    pub(crate) fn require(&mut self, cx: &mut Cx<'_>, key: &str, what: &str) -> Option<&'n Node> {
        let found = self.take(key);
        if found.is_none() {
            let place = if self.path.is_empty() {
                "the top level".to_owned()
            } else {
                format!("`{}`", self.path)
            };
            cx.error(
                self.pos,
                format!("missing `{key}` in {place}: expected {what}"),
            );
        }
        found
    }

    /// The entries no reader asked for.
    pub(crate) fn untaken(&self) -> impl Iterator<Item = &'n Entry> + '_ {
        self.entries
            .iter()
            .zip(&self.taken)
            .filter(|(_, taken)| !**taken)
            .map(|(e, _)| e)
    }

    /// Reports every untaken field as a warning: "`path` {why}; it is ignored".
    pub(crate) fn warn_unknown(&self, cx: &mut Cx<'_>, why: &str) {
        for entry in self.untaken() {
            cx.warn(
                entry.key_pos,
                format!("`{}` {why}; it is ignored", self.sub(&entry.key)),
            );
        }
    }

    /// Reports every untaken field as an error naming the known ones (native format: a typo
    /// should not be silently ignored). Fields named `x-...` are the user's own (a place for YAML
    /// anchors, as in Compose files) and are skipped.
    pub(crate) fn deny_unknown(&self, cx: &mut Cx<'_>, known: &[&str]) {
        for entry in self.untaken().filter(|e| !e.key.starts_with("x-")) {
            let mut msg = format!(
                "unknown field `{}`; expected one of: {}",
                self.sub(&entry.key),
                known.join(", ")
            );
            if let Some(close) = closest(&entry.key, known) {
                msg.push_str(&format!(" (did you mean `{close}`?)"));
            }
            cx.error(entry.key_pos, msg);
        }
    }
}

/// The known name closest to `word`, if it is close enough to be a likely typo.
pub(crate) fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| {
            (
                strsim::levenshtein(&word.to_lowercase(), &k.to_lowercase()),
                *k,
            )
        })
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_suggests_typos_only() {
        let known = ["image", "tasks", "ports"];
        assert_eq!(closest("imgae", &known), Some("image"));
        assert_eq!(closest("Tasks", &known), Some("tasks"));
        assert_eq!(closest("completely", &known), None);
    }
}
