//! The environment-file corpus: every folder under `tests/corpus/` is a small repository. Each is
//! loaded as Warren would load it, and the resolved `EnvSpec` (as JSON) with its warnings, or the
//! rendered errors, are compared with the snapshot in `tests/snapshots/`.
//!
//! A folder may hold `_target` naming the project folder to load (default: the repository root).
//! To accept changed output: `cargo insta review` (or `INSTA_UPDATE=always` and read the diff).
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use warren_envfile::{Loaded, ReadOptions, RepoPath, SpecError, load};

/// This crate's folder, as the test runner gives it (not as compiled in: the target folder is
/// shared between checkouts, and a binary built for another may be reused).
fn manifest_dir() -> std::ffi::OsString {
    std::env::var_os("CARGO_MANIFEST_DIR").expect("tests run under cargo test or nextest")
}

fn render_case(dir: &Path) -> String {
    let name = dir.file_name().unwrap().to_str().unwrap();
    let target = std::fs::read_to_string(dir.join("_target"))
        .map(|t| RepoPath::resolve(&RepoPath::root(), t.trim()).unwrap())
        .unwrap_or_else(|_| RepoPath::root());
    let options = ReadOptions {
        local_env: BTreeMap::from([("USER".to_owned(), "ada".to_owned())]),
        local_workspace_folder: Some(format!("/src/{name}")),
    };
    let mut out = String::new();
    match load(dir, &target, &options) {
        Ok(Loaded { spec, warnings }) => {
            out.push_str("OK\n");
            out.push_str(&serde_json::to_string_pretty(&spec).unwrap());
            out.push('\n');
            for w in warnings {
                writeln!(out, "{w}").unwrap();
            }
        }
        Err(SpecError::Rejected(rejected)) => {
            out.push_str("REJECTED\n");
            for d in rejected.warnings.iter().chain(&rejected.errors) {
                if d.file == rejected.file {
                    out.push_str(&d.render(&rejected.text));
                } else {
                    writeln!(out, "{d}").unwrap();
                }
            }
        }
        Err(other) => writeln!(out, "FAILED\n{other}").unwrap(),
    }
    out
}

#[test]
fn corpus_matches_snapshots() {
    let root = Path::new(&manifest_dir()).join("tests/corpus");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 25,
        "the corpus shrank to {} cases",
        cases.len()
    );
    for dir in cases {
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let rendered = render_case(&dir);
        insta::with_settings!({ snapshot_suffix => name.clone(), prepend_module_to_snapshot => false, omit_expression => true }, {
            insta::assert_snapshot!("corpus", rendered);
        });
    }
}

/// Every case named `broken-*` must be refused, and every other one accepted; the snapshots say
/// how, this says that the corpus means what its names say.
#[test]
fn corpus_names_match_outcomes() {
    let root = Path::new(&manifest_dir()).join("tests/corpus");
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let rendered = render_case(&dir);
        let expect_ok = !name.starts_with("broken-") && name != "devcontainer-nested-only";
        assert_eq!(
            rendered.starts_with("OK\n"),
            expect_ok,
            "{name}:\n{rendered}"
        );
        if !expect_ok {
            assert!(!rendered.contains("panicked"), "{name}");
        }
    }
}
