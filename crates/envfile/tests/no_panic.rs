//! Property tests: no input makes the readers panic, and every refusal carries a usable position.
//!
//! Three generators: arbitrary text; structured documents built from the fields the readers know
//! (so that deep reader paths are reached, not just the syntax error path); and those documents
//! cut short or with a character spliced in.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use serde_json::{Map, Value};
use warren_envfile::{Format, ReadOptions, RepoPath, parse};

const KEYS: &[&str] = &[
    "name",
    "image",
    "file",
    "buildContext",
    "args",
    "target",
    "runtime",
    "resources",
    "cpus",
    "memory",
    "disk",
    "user",
    "workspaceFolder",
    "env",
    "ports",
    "port",
    "label",
    "tasks",
    "prebuild",
    "init",
    "workspace",
    "workspaceShell",
    "shell",
    "extensions",
    "vscode",
    "build",
    "dockerfile",
    "context",
    "dockerFile",
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
    "forwardPorts",
    "portsAttributes",
    "containerEnv",
    "remoteEnv",
    "remoteUser",
    "containerUser",
    "customizations",
    "warren",
    "hostRequirements",
    "storage",
    "gpu",
    "features",
    "dockerComposeFile",
    "x-extra",
    "3000",
];

const STRINGS: &[&str] = &[
    "debian:bookworm",
    "Dockerfile",
    ".",
    "..",
    "../..",
    "/etc",
    "bash",
    "fish",
    "powershell",
    "vm",
    "container",
    "8GiB",
    "0",
    "4gb",
    "${localEnv:USER}",
    "${containerEnv:PATH}",
    "${containerWorkspaceFolder}",
    "${unknown}",
    "${",
    "rust-lang.rust-analyzer",
    "",
    " ",
    "localhost:3000",
    "db:5432",
    "é",
    "a\nb",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-5i64..70000).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(STRINGS).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

fn document() -> impl Strategy<Value = Value> {
    let leaf = scalar();
    let tree = leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|entries| {
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    });
    prop::collection::vec((prop::sample::select(KEYS), tree), 0..8).prop_map(|entries| {
        Value::Object(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    })
}

/// Parses `text` as every format and checks the shape of the outcome.
fn check_all(text: &str) -> Result<(), TestCaseError> {
    let options = ReadOptions::default();
    for (file, format) in [
        ("warren.yml", Format::Warren),
        ("sub/hocus.yml", Format::Hocus),
        (".devcontainer/devcontainer.json", Format::DevContainer),
    ] {
        let file = RepoPath::resolve(&RepoPath::root(), file).unwrap();
        match parse(&file, format, text, &options) {
            Ok(loaded) => {
                prop_assert!(loaded.spec.tasks.iter().all(|t| !t.name.is_empty()));
                for w in &loaded.warnings {
                    prop_assert!(w.line >= 1 && w.column >= 1, "{w}");
                }
            }
            Err(rejected) => {
                prop_assert!(!rejected.errors.is_empty());
                for e in &rejected.errors {
                    prop_assert!(e.line >= 1 && e.column >= 1, "{e}");
                    // Rendering must not panic either, whatever the position.
                    let _ = e.render(text);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    // 512 cases per property in the suite; set PROPTEST_CASES for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        check_all(&text)?;
    }

    #[test]
    fn syntax_like_text_never_panics(text in r#"[-:\[\]{},"'#&*!|>%@` \n\ta-z0-9./$]{0,200}"#) {
        check_all(&text)?;
    }

    #[test]
    fn structured_documents_never_panic(doc in document()) {
        // JSON is also YAML, so one document exercises all three readers.
        check_all(&serde_json::to_string_pretty(&doc).unwrap())?;
        check_all(&serde_json::to_string(&doc).unwrap())?;
    }

    #[test]
    fn damaged_documents_never_panic(doc in document(), cut in any::<prop::sample::Index>(), insert in any::<char>()) {
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let at = boundaries[cut.index(boundaries.len())];
        check_all(&text[..at])?;
        let mut spliced = text.clone();
        spliced.insert(at, insert);
        check_all(&spliced)?;
    }
}

#[test]
fn pathological_inputs_are_refused_cleanly() {
    let deep_yaml = format!("{}1{}", "[".repeat(50_000), "]".repeat(50_000));
    check_all(&deep_yaml).unwrap();
    let deep_json = format!("{}{}", "{\"a\":".repeat(50_000), "}".repeat(50_000));
    check_all(&deep_json).unwrap();
    let huge = "a".repeat(warren_envfile::MAX_FILE_BYTES + 1);
    check_all(&huge).unwrap();
}
