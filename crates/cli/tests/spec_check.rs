//! `warren spec check` as a user runs it: the real binary on real folders.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn warren(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .current_dir(cwd)
        .env("USER", "ada")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn repo_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".git")).unwrap();
    for (path, content) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

#[test]
fn a_valid_file_prints_the_environment_and_its_warnings() {
    let repo = repo_with(&[(
        ".devcontainer/devcontainer.json",
        "{ // comment\n \"image\": \"debian:bookworm\",\n \"features\": {},\n \"postStartCommand\": \"make dev\",\n}\n",
    )]);
    let out = warren(&["spec", "check"], repo.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("image      debian:bookworm"), "{stdout}");
    assert!(stdout.contains("tasks on every start:"), "{stdout}");
    assert!(
        stdout.contains("postStartCommand (sh): make dev"),
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .contains(".devcontainer/devcontainer.json:3:2: warning: `features` is not supported"),
        "{stderr}"
    );
}

#[test]
fn json_output_is_the_resolved_spec() {
    let repo = repo_with(&[("sub/warren.yml", "image: debian:bookworm\nports: [3000]\n")]);
    let out = warren(&["spec", "check", "sub", "--json"], repo.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["spec"]["source"]["path"], "sub/warren.yml");
    assert_eq!(report["spec"]["ports"][0]["port"], 3000);
    assert_eq!(report["warnings"], serde_json::json!([]));
}

#[test]
fn an_invalid_file_exits_2_with_positions() {
    let repo = repo_with(&[(
        "hocus.yml",
        "image:\n  file: Dockerfile\n  buildContext: ../..\ntasks: []\n",
    )]);
    let out = warren(&["spec", "check"], repo.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "hocus.yml:3:17: error: `image.buildContext`: `../..` escapes the repository"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("3 |   buildContext: ../.."), "{stderr}");

    let out = warren(&["spec", "check", "--json"], repo.path());
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["errors"][0]["line"], 3);
    assert_eq!(report["errors"][0]["column"], 17);
}

#[test]
fn a_folder_without_an_environment_file_exits_2() {
    let repo = repo_with(&[("README.md", "hello\n")]);
    let out = warren(&["spec", "check"], repo.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no environment file in `.`"));
}

#[test]
fn a_missing_path_is_a_plain_failure() {
    let repo = repo_with(&[]);
    let out = warren(&["spec", "check", "nope"], repo.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot open `nope`"));
}
