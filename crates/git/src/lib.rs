//! A repository at one commit, on the host: one bare mirror per repository URL, brought up to
//! date with `git fetch`, and a checkout cloned from it. Neither runs anything the repository
//! brings (a fetch and a fresh clone run no hooks, filters are only those of Warren's own git
//! configuration); what the repository asks to run — Dockerfile steps, prebuild tasks — runs
//! in a sandbox.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a repository could not be had; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// A repository URL whose login git could be handed in the URL itself.
    #[error("{0}")]
    Url(&'static str),
    #[error("cannot run git: {0}")]
    Spawn(#[source] std::io::Error),
    /// git ran and failed: its subcommand and what it said.
    #[error("git {command}: {said}")]
    Failed { command: String, said: String },
    #[error("cannot lock the mirror: {0}")]
    Lock(#[source] std::io::Error),
    #[error("{}: {source}", path.display())]
    Mirror {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not a full commit id")]
    NotACommit(String),
    #[error("commit {commit} is not on any branch of {url}")]
    NotOnABranch { commit: String, url: String },
}

/// Whether `commit` is a full commit id (SHA-1 or SHA-256).
pub fn is_commit_id(commit: &str) -> bool {
    matches!(commit.len(), 40 | 64) && commit.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A repository URL as git is given it. An `http(s)` URL may carry a user and a password
/// (`https://user:token@host/...`); in git's arguments they would reach every process list
/// (git's and its remote helper's), the logs and the checkout's `origin`. So git gets the URL
/// without them, and them through a credential helper reading its environment, for that URL's
/// host only (a redirect elsewhere, or a proxy, gets nothing).
struct Remote {
    url: String,
    login: Option<Login>,
}

struct Login {
    /// `scheme://host[:port]`: where the helper answers.
    origin: String,
    user: std::ffi::OsString,
    password: std::ffi::OsString,
}

impl Remote {
    fn of(url: &str) -> Result<Remote, GitError> {
        let plain = || Remote {
            url: url.to_owned(),
            login: None,
        };
        let lower = url.to_ascii_lowercase();
        let Some(rest) = ["http://", "https://"]
            .iter()
            .find_map(|p| lower.strip_prefix(p))
        else {
            return Ok(plain());
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let Ok(mut parsed) = url::Url::parse(url) else {
            // git may read what this parser does not: never hand it a login in the URL.
            return if authority.contains('@') {
                Err(GitError::Url(
                    "a repository URL with a user or password that cannot be read as a URL",
                ))
            } else {
                Ok(plain())
            };
        };
        if parsed.username().is_empty() && parsed.password().is_none() {
            return Ok(plain());
        }
        let decode = |s: &str| -> Result<std::ffi::OsString, GitError> {
            let bytes: Vec<u8> = percent_encoding::percent_decode_str(s).collect();
            if bytes.iter().any(|&b| b == b'\n' || b == 0) {
                return Err(GitError::Url(
                    "a repository URL's user or password holds a line break",
                ));
            }
            Ok(std::os::unix::ffi::OsStringExt::from_vec(bytes))
        };
        let user = decode(parsed.username())?;
        let password = decode(parsed.password().unwrap_or(""))?;
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let origin = parsed.origin().ascii_serialization();
        Ok(Remote {
            url: parsed.into(),
            login: Some(Login {
                origin,
                user,
                password,
            }),
        })
    }
}

/// `url` as it may be shown: without a user and password it carries.
pub fn redacted(url: &str) -> String {
    Remote::of(url).map_or_else(|_| "(a repository URL)".into(), |r| r.url)
}

/// Answers git's `get` with the login from the environment (never in an argument).
const CREDENTIAL_HELPER: &str = r#"!f() { test "$1" = get || exit 0; printf 'username=%s\npassword=%s\n' "$WARREN_GIT_USERNAME" "$WARREN_GIT_PASSWORD"; }; f"#;

fn git(log: &mut dyn Write, dir: Option<&Path>, args: &[&str]) -> Result<Vec<u8>, GitError> {
    git_as(log, dir, args, None)
}

/// [`git`], logged in as `login` at its origin when given.
fn git_as(
    log: &mut dyn Write,
    dir: Option<&Path>,
    args: &[&str],
    login: Option<&Login>,
) -> Result<Vec<u8>, GitError> {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd.args(["-c", "credential.helper="]);
    if let Some(login) = login {
        cmd.arg("-c")
            .arg(format!(
                "credential.{}.helper={CREDENTIAL_HELPER}",
                login.origin
            ))
            .env("WARREN_GIT_USERNAME", &login.user)
            .env("WARREN_GIT_PASSWORD", &login.password);
    }
    // A user names the URL: git runs with none of the host's configuration and credentials
    // (no system or global config, so no credential helper, no `insteadOf`; an empty home;
    // ssh without root's config, keys or agent), so a URL can reach only what it could
    // without the host's identity.
    let out = cmd
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
        .map_err(GitError::Spawn)?;
    let _ = log.write_all(&out.stderr);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(GitError::Failed {
            command: args.first().copied().unwrap_or_default().to_owned(),
            said: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The mirror folder of `url` under `mirrors`.
fn mirror_of(mirrors: &Path, url: &str) -> PathBuf {
    let name = blake3::hash(url.as_bytes()).to_hex();
    mirrors.join(format!("{}.git", &name[..24]))
}

/// The mirror of `url`, created when absent, locked while the caller holds the lock file.
fn mirror(mirrors: &Path, url: &str) -> Result<(PathBuf, std::fs::File), GitError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GitError::Mirror { path, source }
    };
    std::fs::create_dir_all(mirrors).map_err(failed(mirrors))?;
    let mirror = mirror_of(mirrors, url);
    // One fetch of a repository at a time (two prebuilds of one project may run together).
    let lock_path = mirror.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).map_err(failed(&lock_path))?;
    lock.lock().map_err(GitError::Lock)?;
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

fn fetch(mirror: &Path, url: &str, log: &mut dyn Write) -> Result<(), GitError> {
    let remote = Remote::of(url)?;
    git_as(
        log,
        Some(mirror),
        &[
            "fetch",
            "--quiet",
            "--prune",
            "--force",
            "--no-recurse-submodules",
            "--",
            &remote.url,
            "+refs/heads/*:refs/heads/*",
        ],
        remote.login.as_ref(),
    )
    .map(drop)
}

/// Brings the mirror of `url` up to date; every branch and its head commit.
pub fn fetch_heads(mirrors: &Path, url: &str) -> Result<Vec<(String, String)>, GitError> {
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
/// at that commit (detached), with the whole history and `origin` pointing at `url` (without
/// the user and password it may carry: the checkout goes into an image).
pub fn checkout(
    mirrors: &Path,
    url: &str,
    commit: &str,
    into: &Path,
    log: &mut dyn Write,
) -> Result<(), GitError> {
    if !is_commit_id(commit) {
        return Err(GitError::NotACommit(commit.to_owned()));
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
    let shown = redacted(url);
    if !present() {
        let _ = writeln!(log, "fetching {shown}");
        fetch(&mirror, url, log)?;
        if !present() {
            return Err(GitError::NotOnABranch {
                commit: commit.to_owned(),
                url: shown,
            });
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
    git(log, Some(into), &["remote", "set-url", "origin", &shown])?;
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
        assert!(matches!(err, Err(GitError::NotOnABranch { .. })), "{err:?}");
        let err = checkout(&mirrors, &url, "main", &tmp.path().join("d"), &mut log);
        assert!(matches!(err, Err(GitError::NotACommit(_))), "{err:?}");
    }

    /// Smart HTTP behind basic auth, as a forge serves a private repository: `git http-backend`
    /// under a small Python server that wants `user:password` and takes half a second per
    /// request (so a process list is read while git runs). Prints its port.
    const AUTH_SERVER: &str = r#"
import base64, http.server, os, subprocess, sys, time
root, auth = sys.argv[1], os.environ["WANT_LOGIN"]
want = "Basic " + base64.b64encode(auth.encode()).decode()
class H(http.server.BaseHTTPRequestHandler):
    def serve(self, method):
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        time.sleep(0.5)
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=method, REMOTE_USER="u",
                   CONTENT_TYPE=self.headers.get("Content-Type", ""), CONTENT_LENGTH=str(length),
                   HTTP_CONTENT_ENCODING=self.headers.get("Content-Encoding", ""),
                   GIT_PROTOCOL=self.headers.get("Git-Protocol", ""))
        out = subprocess.run(["/usr/lib/git-core/git-http-backend"], input=body, env=env,
                             capture_output=True).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, rest = out.partition(sep)
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
    def do_GET(self):
        self.serve("GET")
    def do_POST(self):
        self.serve("POST")
    def log_message(self, *args):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

    /// A private repository's URL carries a token. Before, git got it in its arguments: every
    /// local user could read it in the process list (git's and `git-remote-http`'s), and it
    /// went into the prebuild log and the checkout's `origin`, which is in the image. Now git
    /// gets it from a credential helper: the fetch works, and the token is nowhere else.
    #[test]
    fn a_token_in_a_repository_url_reaches_only_the_server() {
        use std::io::BufRead as _;
        use std::os::unix::process::CommandExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("private.git");
        let work = tmp.path().join("work");
        std::fs::create_dir(&work).unwrap();
        run(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("a.txt"), "secret code").unwrap();
        run(&work, &["add", "."]);
        run(&work, &["commit", "-q", "-m", "one"]);
        let commit = run(&work, &["rev-parse", "HEAD"]);
        run(
            tmp.path(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                repo.to_str().unwrap(),
            ],
        );
        let token = "tok%2Fen-4f9d1c";
        /// The server, killed with all it started (a `python3` that is a wrapper runs the
        /// interpreter as its child) however the test ends.
        struct Server(std::process::Child);
        impl Drop for Server {
            fn drop(&mut self) {
                // SAFETY: killpg has no memory effects; the group is the server's own.
                unsafe { libc::killpg(self.0.id() as i32, libc::SIGKILL) };
                let _ = self.0.wait();
            }
        }
        let mut server = std::process::Command::new("python3")
            .args(["-c", AUTH_SERVER])
            .arg(tmp.path())
            // Not an argument: the process list is what the test reads.
            .env("WANT_LOGIN", "alice:tok/en-4f9d1c")
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map(Server)
            .unwrap();
        let mut port = String::new();
        std::io::BufReader::new(server.0.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let url = format!("http://alice:{token}@127.0.0.1:{}/private.git", port.trim());
        // Every process's arguments, read over and over while git runs.
        let done = std::sync::atomic::AtomicBool::new(false);
        let seen = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let mut seen = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                        if let Ok(argv) = std::fs::read(entry.path().join("cmdline")) {
                            let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
                            if argv.contains("4f9d1c") {
                                seen.push(argv);
                            }
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                seen
            });
            let mirrors = tmp.path().join("mirrors");
            let mut log = Vec::new();
            let into = tmp.path().join("checkout");
            let made = checkout(&mirrors, &url, &commit, &into, &mut log);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            made.unwrap();
            assert_eq!(
                std::fs::read_to_string(into.join("a.txt")).unwrap(),
                "secret code"
            );
            let origin = run(&into, &["remote", "get-url", "origin"]);
            assert_eq!(
                origin,
                format!("http://127.0.0.1:{}/private.git", port.trim())
            );
            let log = String::from_utf8_lossy(&log).into_owned();
            assert!(log.contains("fetching http://127.0.0.1:"), "{log}");
            assert!(!log.contains("4f9d1c"), "{log}");
            let config = std::fs::read_to_string(into.join(".git/config")).unwrap();
            assert!(!config.contains("4f9d1c"), "{config}");
            // A wrong token is refused, and says so without showing it.
            let err = fetch_heads(&mirrors, &url.replace("4f9d1c", "000000"))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("000000"), "{err}");
            // A login in a URL this parser cannot read (git might) is refused, not passed on.
            let odd = "https://u:tok-4f9d1c@[fe80::1%25eth0]/r.git";
            let err = fetch_heads(&mirrors, odd).unwrap_err();
            assert!(matches!(err, GitError::Url(_)), "{err}");
            assert!(err.to_string().contains("cannot be read as a URL"), "{err}");
            assert_eq!(redacted(odd), "(a repository URL)");
            watcher.join().unwrap()
        });
        drop(server);
        assert!(
            seen.is_empty(),
            "the token in a process's arguments: {seen:?}"
        );
    }
}
