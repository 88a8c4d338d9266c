//! A repository at one commit, on the host: one bare mirror per repository URL, brought up to
//! date with `git fetch`, and a checkout cloned from it. Neither runs anything the repository
//! brings (a fetch and a fresh clone run no hooks, filters are only those of Warren's own git
//! configuration); what the repository asks to run — Dockerfile steps, prebuild tasks — runs
//! in a sandbox.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `commit` is a full commit id (SHA-1 or SHA-256).
pub fn is_commit_id(commit: &str) -> bool {
    matches!(commit.len(), 40 | 64) && commit.bytes().all(|b| b.is_ascii_hexdigit())
}

fn git(log: &mut dyn Write, dir: Option<&Path>, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    // A user names the URL: git runs with none of the host's configuration and credentials
    // (no system or global config, so no credential helper, no `insteadOf`; an empty home;
    // ssh without root's config, keys or agent), so a URL can reach only what it could
    // without the host's identity.
    let out = cmd
        .args(["-c", "credential.helper="])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", "/nonexistent")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=20 -o IdentityAgent=none \
             -o IdentitiesOnly=yes -o IdentityFile=/dev/null",
        )
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    let _ = log.write_all(&out.stderr);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "git {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The mirror folder of `url` under `mirrors`.
fn mirror_of(mirrors: &Path, url: &str) -> PathBuf {
    let name = blake3::hash(url.as_bytes()).to_hex();
    mirrors.join(format!("{}.git", &name[..24]))
}

/// The mirror of `url`, created when absent, locked while the caller holds the lock file.
fn mirror(mirrors: &Path, url: &str) -> Result<(PathBuf, std::fs::File), String> {
    std::fs::create_dir_all(mirrors).map_err(|e| format!("{}: {e}", mirrors.display()))?;
    let mirror = mirror_of(mirrors, url);
    // One fetch of a repository at a time (two prebuilds of one project may run together).
    let lock = std::fs::File::create(mirror.with_extension("lock"))
        .map_err(|e| format!("{}: {e}", mirror.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock the mirror: {e}"))?;
    if !mirror.join("HEAD").exists() {
        let _ = std::fs::remove_dir_all(&mirror);
        let path = mirror.to_string_lossy();
        git(
            &mut std::io::sink(),
            None,
            &["init", "--quiet", "--bare", &path],
        )?;
    }
    Ok((mirror, lock))
}

fn fetch(mirror: &Path, url: &str, log: &mut dyn Write) -> Result<(), String> {
    git(
        log,
        Some(mirror),
        &[
            "fetch",
            "--quiet",
            "--prune",
            "--force",
            "--no-recurse-submodules",
            "--",
            url,
            "+refs/heads/*:refs/heads/*",
        ],
    )
    .map(drop)
}

/// Brings the mirror of `url` up to date; every branch and its head commit.
pub fn fetch_heads(mirrors: &Path, url: &str) -> Result<Vec<(String, String)>, String> {
    let (mirror, _lock) = mirror(mirrors, url)?;
    fetch(&mirror, url, &mut std::io::sink())?;
    let out = git(
        &mut std::io::sink(),
        Some(&mirror),
        &[
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "refs/heads/",
        ],
    )?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| {
            let (commit, name) = l.split_once(' ')?;
            Some((
                name.strip_prefix("refs/heads/")?.to_owned(),
                commit.to_owned(),
            ))
        })
        .collect())
}

/// How many commits `to` has that `from` lacks, by the mirror of `url` (`None` when either is
/// not in it).
pub fn commits_between(mirrors: &Path, url: &str, from: &str, to: &str) -> Option<u64> {
    if !is_commit_id(from) || !is_commit_id(to) {
        return None;
    }
    let mirror = mirror_of(mirrors, url);
    let range = format!("{from}..{to}");
    let out = git(
        &mut std::io::sink(),
        Some(&mirror),
        &["rev-list", "--count", &range],
    )
    .ok()?;
    String::from_utf8_lossy(&out).trim().parse().ok()
}

/// Clones `commit` of the repository at `url` into `into` (which must not exist): the work tree
/// at that commit (detached), with the whole history and `origin` pointing at `url`.
pub fn checkout(
    mirrors: &Path,
    url: &str,
    commit: &str,
    into: &Path,
    log: &mut dyn Write,
) -> Result<(), String> {
    if !is_commit_id(commit) {
        return Err(format!("`{commit}` is not a full commit id"));
    }
    let (mirror, lock) = mirror(mirrors, url)?;
    let wanted = format!("{commit}^{{commit}}");
    let present = || {
        git(
            &mut std::io::sink(),
            Some(&mirror),
            &["cat-file", "-e", &wanted],
        )
        .is_ok()
    };
    if !present() {
        let _ = writeln!(log, "fetching {url}");
        fetch(&mirror, url, log)?;
        if !present() {
            return Err(format!("commit {commit} is not on any branch of {url}"));
        }
    }
    let from = mirror.to_string_lossy();
    let to = into.to_string_lossy();
    git(
        log,
        None,
        &["clone", "--quiet", "--no-checkout", "--", &from, &to],
    )?;
    drop(lock);
    git(log, Some(into), &["remote", "set-url", "origin", url])?;
    git(
        log,
        Some(into),
        &["checkout", "--quiet", "--detach", commit],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_testkit::git as run;

    #[test]
    fn a_commit_is_checked_out_from_a_mirror_kept_between_calls() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        run(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("a.txt"), "one").unwrap();
        run(&repo, &["add", "."]);
        run(&repo, &["commit", "-q", "-m", "one"]);
        let first = run(&repo, &["rev-parse", "HEAD"]);
        std::fs::write(repo.join("a.txt"), "two").unwrap();
        run(&repo, &["commit", "-q", "-am", "two"]);
        let second = run(&repo, &["rev-parse", "HEAD"]);
        let url = format!("file://{}", repo.display());
        let mirrors = tmp.path().join("mirrors");
        let mut log = Vec::new();
        let a = tmp.path().join("a");
        checkout(&mirrors, &url, &first, &a, &mut log).unwrap();
        assert_eq!(std::fs::read_to_string(a.join("a.txt")).unwrap(), "one");
        assert_eq!(run(&a, &["remote", "get-url", "origin"]), url);
        let b = tmp.path().join("b");
        checkout(&mirrors, &url, &second, &b, &mut log).unwrap();
        assert_eq!(commits_between(&mirrors, &url, &first, &second), Some(1));
        assert_eq!(
            fetch_heads(&mirrors, &url).unwrap(),
            [("main".to_owned(), second.clone())]
        );
        assert_eq!(std::fs::read_to_string(b.join("a.txt")).unwrap(), "two");
        // A commit on no branch, and no commit id at all.
        let missing = "0".repeat(40);
        let err = checkout(&mirrors, &url, &missing, &tmp.path().join("c"), &mut log);
        assert!(err.unwrap_err().contains("is not on any branch"));
        let err = checkout(&mirrors, &url, "main", &tmp.path().join("d"), &mut log);
        assert!(err.unwrap_err().contains("not a full commit id"));
    }
}
