//! Any bytes, read as each kind of environment file: the readers must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_envfile::{Format, ReadOptions, RepoPath, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let options = ReadOptions::default();
    for (file, format) in [
        ("warren.yml", Format::Warren),
        ("hocus.yml", Format::Hocus),
        (".devcontainer/devcontainer.json", Format::DevContainer),
    ] {
        let file = RepoPath::resolve(&RepoPath::root(), file).expect("a valid path");
        if let Err(rejected) = parse(&file, format, text, &options) {
            assert!(!rejected.errors.is_empty());
            for e in &rejected.errors {
                let _ = e.render(text);
            }
        }
    }
});
