//! The SSH gateway of `warren up`, driven with the real OpenSSH client (ssh, scp, sftp,
//! ssh-agent, tmux for the terminal) against real container workspaces: commands and their exit
//! status, separate streams, a full-screen terminal that resizes, file copies both ways, port
//! forwarding (`-L`, `-D`), agent forwarding, what VS Code Remote-SSH does, refusals with a
//! message, and many sessions at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{SecondHost, Warren, keygen};
use warren_testkit::{DebianRootfs, debian_rootfs, enter_own_network, free_port, require_program};

/// A workspace image with what developers' tools expect: OpenSSH's sftp-server and client
/// (`ssh-add`), `top`, and busybox for a small HTTP server.
fn dev_image() -> PathBuf {
    debian_rootfs(DebianRootfs::SshServer)
}

fn setup() {
    enter_own_network();
    for (program, package) in [
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("sftp", "openssh-client"),
        ("ssh-agent", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("tmux", "tmux"),
        ("curl", "curl"),
    ] {
        require_program(program, package);
    }
}

/// A developer: a key pair, and the ssh config `warren ssh-config --write` made for them.
struct Developer {
    name: String,
    home: PathBuf,
    key: PathBuf,
}

impl Developer {
    /// Makes `name`'s key, registers it, and writes their ssh config.
    fn new(warren: &Warren, name: &str) -> Self {
        let home = warren.configs.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let key = home.join("id_ed25519");
        keygen(&key);
        warren.ok(
            name,
            &[
                "key",
                "add",
                "laptop",
                key.with_extension("pub").to_str().unwrap(),
            ],
        );
        Self {
            name: name.to_owned(),
            home,
            key,
        }
    }

    /// Attaches to `task` of workspace `host` over SSH, waits for `ready` on its terminal,
    /// types `line` into it, waits for the task's `got: <line>`, and leaves.
    fn attach_and_type(&self, host: &str, task: &str, ready: &str, line: &str) {
        let mut attached = self
            .tool("ssh")
            .args(["-tt", "-o", &format!("SetEnv=WARREN_TASK={task}"), host])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut typed = attached.stdin.take().unwrap();
        let mut screen = BufReader::new(attached.stdout.take().unwrap());
        let mut seen = String::new();
        let mut read_until = |want: &str, seen: &mut String| {
            while !seen.contains(want) {
                let mut piece = String::new();
                assert!(
                    screen.read_line(&mut piece).unwrap() > 0,
                    "attach ended: {seen}"
                );
                seen.push_str(&piece);
            }
        };
        read_until(ready, &mut seen);
        typed.write_all(format!("{line}\r").as_bytes()).unwrap();
        read_until(&format!("got: {line}"), &mut seen);
        let _ = attached.kill();
        let _ = attached.wait();
    }

    fn write_ssh_config(&self, warren: &Warren) {
        let out = warren.ok(&self.name, &["ssh-config", "--write"]);
        assert!(out.contains("wrote"), "{out}");
    }

    /// `ssh` (or `scp`, `sftp`) with this developer's config and key, never asking anything.
    fn tool(&self, program: &str) -> Command {
        self.tool_with_key(program, &self.key)
    }

    fn tool_with_key(&self, program: &str, key: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-F")
            .arg(self.home.join(".ssh/config"))
            .arg("-i")
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]);
        cmd
    }

    /// `sftp` puts `local` into the workspace as /root/sftp.bin and gets it back: the same bytes.
    fn sftp_round_trip(&self, local: &Path, scratch: &Path) {
        let batch = scratch.join("batch");
        let back = scratch.join("sftp-back.bin");
        std::fs::write(
            &batch,
            format!(
                "put {} /root/sftp.bin\nget /root/sftp.bin {}\n",
                local.display(),
                back.display()
            ),
        )
        .unwrap();
        let out = self
            .tool("sftp")
            .arg("-b")
            .arg(&batch)
            .arg("web.warren")
            .output()
            .unwrap();
        assert!(out.status.success(), "sftp: {}", stderr(&out));
        assert_eq!(sha256(&back), sha256(local));
        std::fs::remove_file(&back).unwrap();
    }

    /// A 16 MiB file of random bytes put into the workspace with `scp` (as /root/up.bin) and
    /// back: the same bytes. Returns the scratch folder and the file, for more round trips.
    fn scp_a_new_file(&self) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("data.bin");
        random_file(&local, 16);
        self.scp_round_trip(&local, dir.path());
        (dir, local)
    }

    /// `scp` puts `local` into the workspace as /root/up.bin and gets it back: the same bytes.
    fn scp_round_trip(&self, local: &Path, scratch: &Path) {
        let out = self
            .tool("scp")
            .arg(local)
            .arg("web.warren:/root/up.bin")
            .output()
            .unwrap();
        assert!(out.status.success(), "scp up: {}", stderr(&out));
        let back = scratch.join("back.bin");
        let out = self
            .tool("scp")
            .arg("web.warren:/root/up.bin")
            .arg(&back)
            .output()
            .unwrap();
        assert!(out.status.success(), "scp down: {}", stderr(&out));
        assert_eq!(sha256(&back), sha256(local));
    }

    /// An interactive `ssh -t web.warren` in a 100x30 tmux window of the test's own.
    fn terminal(&self, warren: &Warren) -> Tmux {
        let tmux = Tmux(warren.configs.path().join("tmux.sock"));
        let ssh_line = format!(
            "ssh -F {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -t web.warren",
            self.home.join(".ssh/config").display(),
            self.key.display()
        );
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            &ssh_line,
        ]);
        tmux
    }

    /// Serves `text` on the workspace's own loopback (busybox httpd on port 8000) and reaches
    /// it through `ssh -L`; the forwarding lasts as long as what is returned.
    fn forward_to_a_server_inside(&self, text: &str) -> Background {
        self.ssh_ok(
            "web.warren",
            &format!(
                "mkdir -p /srv && echo {text} > /srv/index.html && busybox httpd -p 127.0.0.1:8000 -h /srv"
            ),
        );
        let local_port = free_port();
        let forward = Background(
            self.tool("ssh")
                .args([
                    "-N",
                    "-L",
                    &format!("{local_port}:127.0.0.1:8000"),
                    "web.warren",
                ])
                .spawn()
                .unwrap(),
        );
        let page = eventually("ssh -L", || {
            curl(&[&format!("http://127.0.0.1:{local_port}/")])
        });
        assert_eq!(page, format!("{text}\n"));
        forward
    }

    fn ssh(&self, host: &str, command: &str) -> Output {
        self.tool("ssh")
            .arg(host)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// With `ssh -A`, the key in the developer's own agent is usable inside `web.warren`,
    /// through a socket in a private folder that goes away with the session.
    fn forwards_the_agent(&self, scratch: &Path) {
        let agent_sock = scratch.join("agent.sock");
        let mut agent = Background(
            Command::new("ssh-agent")
                .args(["-D", "-a"])
                .arg(&agent_sock)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        eventually("ssh-agent", || agent_sock.exists().then_some(()));
        let out = Command::new("ssh-add")
            .arg(&self.key)
            .env("SSH_AUTH_SOCK", &agent_sock)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-add: {}", stderr(&out));
        let out = self
            .tool("ssh")
            .args([
                "-A",
                "web.warren",
                "ssh-add -l; stat -c %a \"$SSH_AUTH_SOCK\" \"$(dirname \"$SSH_AUTH_SOCK\")\"; dirname \"$SSH_AUTH_SOCK\"",
            ])
            .env("SSH_AUTH_SOCK", &agent_sock)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listed}{}", stderr(&out));
        let fingerprint = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.key.with_extension("pub"))
            .output()
            .unwrap();
        let fingerprint = String::from_utf8_lossy(&fingerprint.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned();
        assert!(listed.contains(&fingerprint), "{listed}");
        assert!(
            listed.contains("\n700\n"),
            "the socket's folder is private: {listed}"
        );
        // A VM's guest removes it when the host closes the session's request, a moment later.
        let folder = listed.lines().last().unwrap_or_default();
        let folder = std::path::Path::new(folder);
        assert!(
            folder.starts_with("/tmp") || folder.starts_with("/run"),
            "{listed}"
        );
        eventually("the agent socket to go with its session", || {
            let gone = format!("test -e {} || echo gone", folder.display());
            (self.ssh_ok("web.warren", &gone).trim() == "gone").then_some(())
        });
        let _ = agent.0.kill();
    }

    fn ssh_ok(&self, host: &str, command: &str) -> String {
        let out = self.ssh(host, command);
        assert!(
            out.status.success(),
            "ssh {host} {command:?}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A background `ssh` (a forwarding), killed when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Retries `f` until it returns `Some` (a forwarding's listener takes a moment to appear).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: gave up after 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn curl(args: &[&str]) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A file of `mib` MiB that does not compress.
fn random_file(path: &Path, mib: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
        }
        f.write_all(&block).unwrap();
    }
}

/// A tmux server of the test's own (its socket in `dir`).
struct Tmux(PathBuf);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// The terminal's size is the window's, before and after a resize.
    fn follows_the_window(&self) {
        self.run(&["send-keys", "-t", "t", "stty size", "Enter"]);
        self.wait_for("30 100");
        self.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
        self.run(&["send-keys", "-t", "t", "clear; stty size", "Enter"]);
        self.wait_for("40 120");
    }

    fn wait_for(&self, text: &str) -> String {
        eventually(&format!("the terminal to show {text:?}"), || {
            let screen = self.screen();
            screen.contains(text).then_some(screen)
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .arg("kill-server")
            .output();
    }
}

/// One `warren up` with a running workspace `web` owned by alice, bob and the admin as
/// developers with keys.
fn with_workspace(seed: u32) -> (Warren, Developer, Developer, Developer) {
    let warren = Warren::up_with_admin(seed, None);
    warren.import_image(&dev_image(), "dev:1");
    warren.add_user("alice");
    warren.add_user("bob");
    warren.ok("alice", &["ws", "create", "web", "--image", "dev:1"]);
    let alice = Developer::new(&warren, "alice");
    let bob = Developer::new(&warren, "bob");
    let admin = Developer::new(&warren, "admin");
    for dev in [&alice, &bob, &admin] {
        dev.write_ssh_config(&warren);
    }
    (warren, alice, bob, admin)
}

#[test]
fn ssh_reaches_the_workspace_with_every_channel() {
    setup();
    let (warren, alice, bob, admin) = with_workspace(11);
    warren.ok("alice", &["env", "set", "GREETING=hello from warren"]);

    // exec: the exit status comes back; stdin, stdout and stderr stay apart; variables arrive.
    let out = alice.ssh("web.warren", "exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let mut child = alice
        .tool("ssh")
        .args(["-o", "SetEnv=LC_DEMO=set-by-client", "web.warren"])
        .arg(r#"tr a-z A-Z; echo "to stderr" >&2; echo "$GREETING/$LC_DEMO/$(id -u)""#)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"standard input\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "STANDARD INPUT\nhello from warren/set-by-client/0\n"
    );
    assert_eq!(stderr(&out), "to stderr\n");
    // Killed by a signal: OpenSSH reports no exit status for that (255), and no output is lost.
    let out = alice.ssh("web.warren", "echo before; kill -KILL $$");
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before\n");

    // An interactive terminal runs a full-screen program and follows the window's size.
    let tmux = alice.terminal(&warren);
    tmux.follows_the_window();
    tmux.run(&["send-keys", "-t", "t", "top -d 1", "Enter"]);
    tmux.wait_for("load average");
    tmux.run(&["send-keys", "-t", "t", "q"]);
    eventually("top to quit", || {
        (!tmux.screen().contains("load average")).then_some(())
    });
    tmux.run(&["send-keys", "-t", "t", "clear; echo done-$((6*7))", "Enter"]);
    tmux.wait_for("done-42");
    tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
    drop(tmux);

    // scp and sftp, both ways, the same bytes.
    let (dir, local) = alice.scp_a_new_file();
    let inside = alice.ssh_ok("web.warren", "sha256sum /root/up.bin");
    assert!(inside.starts_with(&sha256(&local)), "{inside}");
    alice.sftp_round_trip(&local, dir.path());

    // Port forwarding to a server on the workspace's own loopback: -L, and -D as SOCKS.
    let _forward = alice.forward_to_a_server_inside("served-inside");
    let socks_port = free_port();
    let _socks = Background(
        alice
            .tool("ssh")
            .args(["-N", "-D", &format!("127.0.0.1:{socks_port}"), "web.warren"])
            .spawn()
            .unwrap(),
    );
    let page = eventually("ssh -D", || {
        curl(&[
            "--socks5-hostname",
            &format!("127.0.0.1:{socks_port}"),
            "http://localhost:8000/",
        ])
    });
    assert_eq!(page, "served-inside\n");
    // Nothing listens there: the channel is refused, with the reason.
    let out = alice
        .tool("ssh")
        .args(["-W", "127.0.0.1:9", "web.warren"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));

    // Agent forwarding: the developer's key is usable inside, and only during the session.
    alice.forwards_the_agent(dir.path());

    // Refusals, each with a message: a key nobody registered, another user's workspace, a
    // workspace that does not exist. An admin reaches alice's as `web.alice`.
    let stranger = dir.path().join("stranger");
    keygen(&stranger);
    let out = alice
        .tool_with_key("ssh", &stranger)
        .args(["web.warren", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("Permission denied (publickey)"),
        "{}",
        stderr(&out)
    );
    let port = warren.ssh_port.to_string();
    // Straight to the gateway, without the config's entries (the host key as `ssh-config`
    // wrote it).
    let direct = |dev: &Developer, login: &str, args: &[&str], command: &[&str]| {
        dev.tool("ssh")
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                dev.home.join(".ssh/warren_known_hosts").display()
            ))
            .args(["-p", &port])
            .args(args)
            .arg(format!("{login}@127.0.0.1"))
            .args(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = direct(&bob, "web.alice", &[], &["echo reached"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("no workspace `web.alice` for user `bob`"),
        "{}",
        stderr(&out)
    );
    let out = direct(&bob, "web", &[], &["echo reached"]);
    assert!(
        stderr(&out).contains("no workspace `web` for user `bob`"),
        "{}",
        stderr(&out)
    );
    let out = direct(&alice, "nope", &[], &["echo reached"]);
    assert!(
        stderr(&out).contains("no workspace `nope`"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    let out = direct(&admin, "web.alice", &[], &["echo reached"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "reached\n",
        "{}",
        stderr(&out)
    );
    // -L to another user's workspace is refused too.
    let out = direct(&bob, "web.alice", &["-W", "127.0.0.1:8000"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no workspace"), "{}", stderr(&out));

    // A stopped workspace says so, and starts when the client asks for it.
    warren.ok("alice", &["ws", "stop", "web"]);
    let out = alice.ssh("web.warren", "echo reached");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("workspace `web` is stopped"),
        "{}",
        stderr(&out)
    );
    let out = alice
        .tool("ssh")
        .args([
            "-o",
            "SetEnv=WARREN_START=1",
            "web.warren",
            "cat /root/up.bin | sha256sum",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&local)));

    // `warren ws open` names the entry `ssh-config` wrote.
    let link = warren.ok("alice", &["ws", "open", "web", "--folder", "/srv"]);
    assert_eq!(
        link.trim(),
        "vscode://vscode-remote/ssh-remote+web.warren/srv"
    );
    let link = warren.ok("admin", &["ws", "open", "web.alice"]);
    assert!(
        link.trim().ends_with("ssh-remote+web.alice.warren/root"),
        "{link}"
    );
}

/// What VS Code Remote-SSH does: a non-pty `bash` fed a script on stdin that starts a server
/// and prints its port, then a `direct-tcpip` channel (through `-D`) to that port.
#[test]
fn vscode_remote_ssh_connects_to_the_server_its_script_started() {
    setup();
    let (_warren, alice, _bob, _admin) = with_workspace(12);
    let socks_port = free_port();
    let mut child = alice
        .tool("ssh")
        .args([
            "-T",
            "-D",
            &format!("127.0.0.1:{socks_port}"),
            "web.warren",
            "bash",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            br#"
set -e
SERVER_DIR=$HOME/.vscode-server/bin/test-commit
mkdir -p "$SERVER_DIR/www"
echo "vscode-server answering" > "$SERVER_DIR/www/index.html"
PORT=$((20000 + RANDOM % 20000))
busybox httpd -p 127.0.0.1:$PORT -h "$SERVER_DIR/www"
echo "0a1b2c: start"
echo "listeningOn==$PORT=="
echo "0a1b2c: end"
"#,
        )
        .unwrap();
    stdin.flush().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("the script ended without printing its port")
            .unwrap();
        if let Some(rest) = line.strip_prefix("listeningOn==") {
            break rest.trim_end_matches("==").to_owned();
        }
    };
    let page = eventually("the server through the SOCKS tunnel", || {
        curl(&[
            "--socks5-hostname",
            &format!("127.0.0.1:{socks_port}"),
            &format!("http://127.0.0.1:{port}/"),
        ])
    });
    assert_eq!(page, "vscode-server answering\n");
    // The bash session is still there (VS Code keeps it), and ends when its stdin does.
    stdin.write_all(b"echo still-here\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "0a1b2c: end");
    assert_eq!(lines.next().unwrap().unwrap(), "still-here");
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn fifty_sessions_and_ten_copies_at_once() {
    setup();
    let (_warren, alice, _bob, _admin) = with_workspace(13);
    let alice = std::sync::Arc::new(alice);
    let sessions: Vec<_> = (0..50)
        .map(|i| {
            let alice = alice.clone();
            std::thread::spawn(move || alice.ssh_ok("web.warren", &format!("echo session-{i}")))
        })
        .collect();
    for (i, s) in sessions.into_iter().enumerate() {
        assert_eq!(s.join().unwrap(), format!("session-{i}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let copies: Vec<_> = (0..10)
        .map(|i| {
            let alice = alice.clone();
            let local = dir.path().join(format!("f{i}"));
            let back = dir.path().join(format!("b{i}"));
            random_file(&local, 8 + i);
            std::thread::spawn(move || {
                for (from, to) in [
                    (
                        local.display().to_string(),
                        format!("web.warren:/root/f{i}"),
                    ),
                    (format!("web.warren:/root/f{i}"), back.display().to_string()),
                ] {
                    let out = alice.tool("scp").arg(&from).arg(&to).output().unwrap();
                    assert!(out.status.success(), "scp {from} {to}: {}", stderr(&out));
                }
                assert_eq!(sha256(&back), sha256(&local));
            })
        })
        .collect();
    for c in copies {
        c.join().unwrap();
    }
}

/// One user opens more sessions than the gateway gives one user (64): each holds a blocking
/// thread of the gateway while its command runs, so without a cap one user could take them all.
/// The 65th is refused with the reason; once some end, new ones open again.
#[test]
fn a_user_has_at_most_sixty_four_sessions_at_once() {
    setup();
    let (warren, alice, _bob, _admin) = with_workspace(46);
    let mut held: Vec<std::process::Child> = (0..64)
        .map(|_| {
            alice
                .tool("ssh")
                .args(["web.warren", "sleep 120"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = warren.ok(
            "alice",
            &[
                "ws",
                "exec",
                "web",
                "--",
                "sh",
                "-c",
                "pgrep -c -x sleep || true",
            ],
        );
        if out.trim() == "64" {
            break;
        }
        assert!(Instant::now() < deadline, "only {out} sessions started");
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = alice.ssh("web.warren", "true");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("64 sessions open already"),
        "{}",
        stderr(&out)
    );
    for child in &mut held[..8] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !alice.ssh("web.warren", "true").status.success() {
        assert!(
            Instant::now() < deadline,
            "no session opened after some ended"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for mut child in held {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// 1 GiB each way through scp and sftp, checksums equal.
#[test]
fn a_gibibyte_each_way() {
    setup();
    let (_warren, alice, _bob, _admin) = with_workspace(14);
    let dir = tempfile::Builder::new()
        .prefix("warren-ssh-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let local = dir.path().join("big.bin");
    random_file(&local, 1024);
    let want = sha256(&local);
    let scp_back = dir.path().join("scp-back.bin");
    for (from, to) in [
        (
            local.display().to_string(),
            "web.warren:/root/big.bin".to_owned(),
        ),
        (
            "web.warren:/root/big.bin".to_owned(),
            scp_back.display().to_string(),
        ),
    ] {
        let out = alice.tool("scp").arg(&from).arg(&to).output().unwrap();
        assert!(out.status.success(), "scp {from} {to}: {}", stderr(&out));
    }
    assert_eq!(sha256(&scp_back), want);
    std::fs::remove_file(&scp_back).unwrap();
    alice.sftp_round_trip(&local, dir.path());
    assert!(
        alice
            .ssh_ok("web.warren", "sha256sum /root/big.bin /root/sftp.bin")
            .lines()
            .all(|l| l.starts_with(&want))
    );
}

/// `user` creates workspace `name` from `image` with this devcontainer.json.
fn create_from_devcontainer(warren: &Warren, user: &str, name: &str, image: &str, json: &str) {
    let folder = warren.configs.path().join(name).join(".devcontainer");
    std::fs::create_dir_all(&folder).unwrap();
    let env_file = folder.join("devcontainer.json");
    std::fs::write(&env_file, json).unwrap();
    let env_file = env_file.to_str().unwrap();
    warren.ok(
        user,
        &[
            "ws",
            "create",
            name,
            "--image",
            image,
            "--env-file",
            env_file,
        ],
    );
}

/// Workspace tasks from a devcontainer.json: `postCreateCommand` once, `postStartCommand` on
/// every start in a persistent terminal whose output `warren ws logs` shows; a developer
/// attaches over SSH, types into it, leaves, and the task goes on.
#[test]
fn workspace_tasks_keep_running_and_take_an_attached_terminal() {
    setup();
    let warren = Warren::up_with_admin(15, None);
    warren.import_image(&dev_image(), "dev:1");
    warren.add_user("alice");
    let alice = Developer::new(&warren, "alice");
    create_from_devcontainer(
        &warren,
        "alice",
        "web",
        "dev:1",
        r#"{
  "image": "dev:1",
  // Sessions, commands and tasks run as this user.
  "remoteUser": "www-data",
  // Once, on the first start.
  "postCreateCommand": "echo created >> /tmp/created",
  // On every start; it keeps running and answers what it is sent.
  "postStartCommand": "echo started >> /tmp/started; echo ready-$(wc -l < /tmp/started)-$(id -un); while read -r line; do echo \"got: $line\"; done"
}"#,
    );
    alice.write_ssh_config(&warren);
    let logs = |task: &str| warren.ok("alice", &["ws", "logs", "web", task]);
    eventually("the first start's tasks", || {
        logs("postStartCommand")
            .contains("ready-1-www-data")
            .then_some(())
    });
    let listed = warren.ok("alice", &["ws", "logs", "web"]);
    assert!(
        listed.contains("postCreateCommand") && listed.contains("exited"),
        "{listed}"
    );
    assert!(
        listed.contains("postStartCommand") && listed.contains("running"),
        "{listed}"
    );

    // Attach, type a line, leave: the task saw it and still runs. The recent past comes
    // first, then what is new.
    alice.attach_and_type("web.warren", "postStartCommand", "ready-1", "hello task");
    assert!(logs("postStartCommand").contains("got: hello task"));
    let listed = warren.ok("alice", &["ws", "logs", "web"]);
    assert!(
        listed.contains("running"),
        "detaching stopped the task: {listed}"
    );
    let out = alice
        .tool("ssh")
        .args(["-o", "SetEnv=WARREN_TASK=nope", "web.warren"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(stderr(&out).contains("no task `nope`"), "{}", stderr(&out));

    // A second start runs postStartCommand again, postCreateCommand not; the log keeps both.
    warren.ok("alice", &["ws", "stop", "web"]);
    warren.ok("alice", &["ws", "start", "web"]);
    eventually("the second start's tasks", || {
        logs("postStartCommand")
            .contains("ready-2-www-data")
            .then_some(())
    });
    let log = logs("postStartCommand");
    assert!(
        log.contains("ready-1") && log.contains("got: hello task"),
        "{log}"
    );
    // Commands run as the file's user: through the API directly, over SSH through that user's
    // own login shell (www-data's is nologin, which answers as it would under sshd).
    assert_eq!(
        warren.ok("alice", &["ws", "exec", "web", "--", "cat", "/tmp/created"]),
        "created\n"
    );
    assert_eq!(
        warren.ok("alice", &["ws", "exec", "web", "--", "id", "-un"]),
        "www-data\n"
    );
    let out = alice.ssh("web.warren", "id -un");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!out.status.success());
    assert!(
        said.contains("This account is currently not available"),
        "{said}"
    );
    let shown = warren.ok("alice", &["ws", "show", "web"]);
    assert!(shown.contains(r#""user": "www-data""#), "{shown}");
    let out = warren.cli("alice", &["ws", "logs", "web", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no task `nope`"), "{}", stderr(&out));
}

/// `warren gateway` on its own, over the same database as a `warren up` that runs none.
#[test]
fn the_gateway_runs_on_its_own() {
    setup();
    let mut warren = Warren::new(16, None);
    warren.ssh_port = 0;
    let password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &password);
    warren.import_image(&debian_rootfs(DebianRootfs::Minbase), "dev:1");
    warren.ok("admin", &["ws", "create", "solo", "--image", "dev:1"]);
    let out = warren.cli("admin", &["ssh-config"]);
    assert!(stderr(&out).contains("warren gateway"), "{}", stderr(&out));
    let admin = Developer::new(&warren, "admin");
    // No entries to write, but an (empty) config for the tools.
    std::fs::create_dir_all(admin.home.join(".ssh")).unwrap();
    std::fs::write(admin.home.join(".ssh/config"), "").unwrap();
    let port = free_port();
    let mut gateway = Background(
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--data")
            .arg(warren.data.path())
            .args(["gateway", "--ssh-listen", &format!("127.0.0.1:{port}")])
            .env("WARREN_UID_BASE", warren.uid_base.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(gateway.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(
        first.contains(&format!("listening on 127.0.0.1:{port}")),
        "{first}"
    );
    let out = admin
        .tool("ssh")
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-p",
            &port.to_string(),
            "solo@127.0.0.1",
            "echo from $(hostname)",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("from "));
}

/// The pid and command line of the QEMU process named `name` (`-name`).
fn qemu_process(name: &str) -> (String, String) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with("qemu-system-x86_64"))
            && args.windows(2).any(|w| w[0] == "-name" && w[1] == name)
        {
            let pid = entry.file_name().to_string_lossy().into_owned();
            return (pid, args.join(" "));
        }
    }
    panic!("no QEMU process named {name}")
}

/// A VM workspace (its environment file says `runtime: vm`) is used exactly like a container:
/// commands with their status and streams, a terminal, copies, port forwarding, its tasks, and
/// its files kept across a stop and start — through the same gateway; its layer is saved to
/// the registry, at a stop and (paused) while it runs.
#[test]
fn a_vm_workspace_is_reached_like_a_container() {
    setup();
    warren_testkit::require_vm_tools();
    let registry = warren_testkit::Registry::start();
    let mut warren = Warren::new(17, None);
    warren.env = vec![
        (
            "WARREN_REGISTRY".into(),
            format!("{}/team", registry.host()),
        ),
        ("WARREN_SAVE_RUNNING_EVERY".into(), "10s".into()),
        (
            "WARREN_VM_KERNEL".into(),
            warren_testkit::guest_kernel().display().to_string(),
        ),
        (
            "WARREN_GUEST".into(),
            warren_testkit::static_guest().display().to_string(),
        ),
    ];
    let password = warren.start().unwrap();
    warren.login("admin", &password);
    warren.import_image(&dev_image(), "dev:1");
    warren.add_user("alice");
    let alice = Developer::new(&warren, "alice");
    // KSM is the admin's to allow, per trust domain; alice's VMs get mergeable memory.
    let out = warren.cli("alice", &["user", "ksm", "alice", "on"]);
    assert!(!out.status.success(), "only an admin may");
    warren.ok("admin", &["user", "ksm", "alice", "on"]);
    let env_file = warren.configs.path().join("warren.yml");
    std::fs::write(
        &env_file,
        "image: dev:1\nruntime: vm\nresources:\n  cpus: 1\n  memory: 1GiB\ntasks:\n  - name: hello\n    workspace: echo \"task in $(uname -r)\"; sleep 600\n",
    )
    .unwrap();
    warren.ok(
        "alice",
        &[
            "ws",
            "create",
            "web",
            "--image",
            "dev:1",
            "--env-file",
            env_file.to_str().unwrap(),
        ],
    );
    alice.write_ssh_config(&warren);
    let shown: serde_json::Value = warren.json("alice", &["ws", "show", "web"]);
    assert_eq!(shown["runtime"], "vm", "{shown}");
    // The environment file's resources size the VM.
    assert_eq!(shown["memory"], 1 << 30, "{shown}");
    assert_eq!(shown["cpus"], 1.0, "{shown}");
    let runtime_id = format!("ws-{}", shown["id"].as_str().unwrap());
    let (pid, qemu) = qemu_process(&format!("warren-{runtime_id}"));
    assert!(
        qemu.contains("mem-merge=on") && qemu.contains("merge=on"),
        "{qemu}"
    );
    // Merging can happen: the guest's RAM is a private mapping marked mergeable (a shared
    // one, which vhost-user daemons need, KSM never merges), and no such daemon runs for it.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut mergeable_kib = 0u64;
    let (mut size, mut private) = (0u64, false);
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Size:") {
            size = kib.trim().trim_end_matches("kB").trim().parse().unwrap();
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if private && flags.split_whitespace().any(|f| f == "mg") {
                mergeable_kib = mergeable_kib.max(size);
            }
        } else {
            // A mapping's first line: `start-end perms offset dev inode [path]`.
            let mut fields = line.split_whitespace();
            if let (Some(range), Some(perms)) = (fields.next(), fields.next())
                && range.contains('-')
                && !range.ends_with(':')
                && perms.len() == 4
            {
                private = perms.ends_with('p');
            }
        }
    }
    assert!(
        mergeable_kib >= 1 << 20,
        "a private mergeable mapping of the guest's RAM: largest {mergeable_kib} KiB"
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&format!("/{runtime_id}/vm/")) || cmdline.contains("qemu-system"),
            "no device daemon: {cmdline}"
        );
    }
    assert!(qemu.contains("free-page-reporting=on"), "{qemu}");
    assert!(
        qemu.contains("-smp 1 ") && qemu.contains("-m 1024M "),
        "{qemu}"
    );

    // Commands: status, streams, the guest's own kernel.
    let out = alice.ssh("web.warren", "exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let mut child = alice
        .tool("ssh")
        .arg("web.warren")
        .arg(r#"tr a-z A-Z; echo "to stderr" >&2; uname -r"#)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"in a vm\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.starts_with("IN A VM\n") && stdout.contains("-amd64"),
        "{stdout}"
    );
    assert_eq!(stderr(&out), "to stderr\n");

    // A terminal that follows the window's size.
    let tmux = alice.terminal(&warren);
    tmux.follows_the_window();
    tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
    drop(tmux);

    // Copies both ways, the same bytes.
    let (dir, local) = alice.scp_a_new_file();
    // What the guest's root wrote (over 9p here) is in the writable layer, owned on the host by
    // the workspace's root id, not by root.
    let upper = warren
        .data
        .path()
        .join(format!("runtime/workspaces/{runtime_id}/upper/root/up.bin"));
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&upper).unwrap());
    assert!(
        owner >= warren.uid_base && (owner - warren.uid_base).is_multiple_of(65536),
        "{} is owned by {owner}",
        upper.display()
    );

    // -L to a server on the guest's own loopback.
    drop(alice.forward_to_a_server_inside("served-in-vm"));

    // -A: the developer's key is usable in the guest.
    alice.forwards_the_agent(dir.path());

    // Its task ran in the guest.
    eventually("the task's output", || {
        warren
            .ok("alice", &["ws", "logs", "web", "hello"])
            .contains("task in 6.")
            .then_some(())
    });
    // The host reports how it runs.
    let accel = eventually("the host's report", || {
        let shown: serde_json::Value = warren.json("alice", &["ws", "show", "web"]);
        shown["accel"].as_str().map(str::to_owned)
    });
    // The accelerator Warren detected on this host (this machine's nested KVM cannot boot
    // the guest, so TCG here; KVM on a host whose KVM boots it).
    let detected = warren_runtime::vm::remembered_accel(
        &warren.data.path().join("runtime"),
        &warren_testkit::guest_kernel(),
    )
    .expect("the VM's start detected its accelerator");
    assert_eq!(accel, detected.as_str());

    // Stop and start: the files are kept.
    warren.ok("alice", &["ws", "stop", "web"]);
    warren.ok("alice", &["ws", "start", "web"]);
    let inside = alice.ssh_ok("web.warren", "sha256sum /root/up.bin");
    assert!(inside.starts_with(&sha256(&local)), "{inside}");

    // Saved while it runs: the guest writes its page cache through and pauses while the host
    // reads the layer, then goes on; the saved layer holds what it wrote.
    let saved_at = || -> i64 {
        let shown: serde_json::Value = warren.json("alice", &["ws", "show", "web"]);
        shown["saved_at"].as_i64().unwrap_or(0)
    };
    let stopped_save = saved_at();
    assert!(stopped_save > 0, "the stop saved no layer");
    alice.ssh_ok(
        "web.warren",
        "echo written while running > /root/running-note",
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while saved_at() <= stopped_save {
        assert!(Instant::now() < deadline, "never saved while running");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        warren
            .log()
            .contains("read a running workspace's layer while it was frozen")
    );
    assert_eq!(alice.ssh_ok("web.warren", "echo on"), "on\n");
    let shown: serde_json::Value = warren.json("admin", &["ws", "show", "web"]);
    let layer = shown["saved_layer"].as_str().unwrap().to_owned();
    let tree = tempfile::tempdir().unwrap();
    let mut mount = warren
        .cli_command(
            "admin",
            &["image", "mount", &layer, tree.path().to_str().unwrap()],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let note = eventually("the saved layer mounted", || {
        std::fs::read_to_string(tree.path().join("root/running-note")).ok()
    });
    let _ = Command::new("kill").arg(mount.id().to_string()).status();
    let _ = mount.wait();
    assert_eq!(note, "written while running\n");
    warren.ok("alice", &["ws", "rm", "web"]);
}

/// A workspace on a second host is reached through that host's agent, which dialled the server
/// (no address of the host is known to the server): `ws exec` with its streams and exit
/// status, `ws logs -f` to a task's end, a task's terminal attached over the server's
/// SSH gateway, and sessions relayed there by the gateway (commands, terminals, scp, sftp,
/// `-L`, `-A`); with the agent gone the server says so.
#[test]
fn a_second_hosts_workspace_is_reached_through_its_agent() {
    setup();
    let warren = Warren::up_with_admin(28, None);
    let mut second = SecondHost::new(&warren);
    let imported = second.run(&["image", "import", dev_image().to_str().unwrap(), "far:1"]);
    assert!(imported.status.success(), "{}", stderr(&imported));
    second.join(&warren, "second");
    warren.add_user("alice");
    let alice = Developer::new(&warren, "alice");
    create_from_devcontainer(
        &warren,
        "alice",
        "web",
        "far:1",
        r#"{
  "image": "far:1",
  "postCreateCommand": "for i in 1 2 3; do echo line-$i; sleep 1; done",
  "postStartCommand": "echo ready; while read -r line; do echo \"got: $line\"; done"
}"#,
    );
    let ws: serde_json::Value = warren.json("alice", &["ws", "show", "web"]);
    assert_eq!(ws["host"], "second", "{ws}");

    // `sh -c SCRIPT` in the workspace, through the server and the second host's agent.
    let sh = |script: &str| warren.cli("alice", &["ws", "exec", "web", "--", "sh", "-c", script]);
    let out = sh("echo out; echo err >&2; exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(stderr(&out), "err\n");

    // A command whose caller goes away goes with it, on the other host too. (Processes come
    // and go while `cat` reads: only what it read counts.)
    let sleeping = || {
        let all = String::from_utf8_lossy(&sh("cat /proc/[0-9]*/cmdline 2>/dev/null; true").stdout)
            .into_owned();
        all.contains("sleep\u{0}4321")
    };
    let mut caller = warren
        .cli_command("alice", &["ws", "exec", "web", "--", "sleep", "4321"])
        .spawn()
        .unwrap();
    eventually("the command runs", || sleeping().then_some(()));
    let _ = caller.kill();
    let _ = caller.wait();
    eventually("the command is killed", || (!sleeping()).then_some(()));

    // Followed to the task's end, every line.
    let followed = warren.ok("alice", &["ws", "logs", "web", "postCreateCommand", "-f"]);
    let followed = followed.replace("\r\n", "\n");
    assert!(
        followed.starts_with("line-1\nline-2\nline-3\n") && followed.contains("ended (exit 0)"),
        "{followed}"
    );
    // postStartCommand starts once postCreateCommand has ended.
    eventually("the list shows postStartCommand running", || {
        let listed = warren.ok("alice", &["ws", "logs", "web"]);
        listed
            .lines()
            .any(|l| l.starts_with("postStartCommand") && l.contains("running"))
            .then_some(())
    });

    alice.write_ssh_config(&warren);
    alice.attach_and_type("web.warren", "postStartCommand", "ready", "from afar");
    let log = warren.ok("alice", &["ws", "logs", "web", "postStartCommand"]);
    assert!(log.contains("got: from afar"), "{log}");
    let listed = warren.ok("alice", &["ws", "logs", "web"]);
    assert!(
        listed.contains("running"),
        "detaching stopped the task: {listed}"
    );

    // The server's SSH gateway relays sessions there through the agent: a command's streams
    // and exit status, a terminal, scp, -L to a server on the workspace's loopback, and -A.
    let out = alice.ssh("web.warren", "echo out; echo err >&2; exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(stderr(&out), "err\n");
    let out = alice
        .tool("ssh")
        .args(["-tt", "web.warren", "test -t 0 && stty size"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().contains(' '),
        "a terminal with a size: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (dir, _) = alice.scp_a_new_file();
    alice.sftp_round_trip(&dir.path().join("data.bin"), dir.path());
    let forward = alice.forward_to_a_server_inside("from-the-second-host");
    drop(forward);
    alice.forwards_the_agent(dir.path());

    // Without its agent, the host cannot be reached, and the answer says why.
    second.stop_agent();
    let out = warren.cli("alice", &["ws", "exec", "web", "--", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not connected"), "{}", stderr(&out));
    // (The second host's workspace goes with it: see `SecondHost`'s drop.)
}

/// A workspace nobody uses for its idle timeout is stopped, and says why; one with an open SSH
/// session stays up although the session sends nothing for the whole time.
#[test]
fn an_idle_workspace_stops_and_one_with_an_open_session_keeps_running() {
    setup();
    let (warren, alice, _bob, _admin) = with_workspace(54);
    warren.ok(
        "alice",
        &[
            "ws",
            "create",
            "quiet",
            "--image",
            "dev:1",
            "--idle-timeout",
            "60s",
        ],
    );
    let shown = warren.json("alice", &["ws", "show", "quiet"]);
    assert_eq!(shown["idle_timeout"], 60, "{shown}");
    // Timeouts below a minute would stop a workspace between two records of a lasting use.
    let refused = warren.cli("alice", &["ws", "idle", "web", "30s"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("60 s to 30 days"),
        "{}",
        stderr(&refused)
    );
    let _session = Background(
        alice
            .tool("ssh")
            .args(["web.warren", "sleep 600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let set = warren.ok("alice", &["ws", "idle", "web", "1m"]);
    assert!(set.contains("1 min (set on its workspace)"), "{set}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let stopped = loop {
        let quiet = warren.json("alice", &["ws", "show", "quiet"]);
        if quiet["state"] == "stopped" {
            break quiet;
        }
        assert!(
            Instant::now() < deadline,
            "quiet was never stopped: {quiet}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let reason = stopped["stop_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("idle") && reason.contains("1 min"),
        "{stopped}"
    );
    let listed = warren.ok("alice", &["ws", "ls"]);
    assert!(listed.contains("nobody used it for 1 min"), "{listed}");
    let web = warren.json("alice", &["ws", "show", "web"]);
    assert_eq!(web["state"], "running", "{web}");
    assert!(web["last_active_at"].as_i64().is_some(), "{web}");
    // A start clears the reason.
    warren.ok("alice", &["ws", "start", "quiet"]);
    let quiet = warren.json("alice", &["ws", "show", "quiet"]);
    assert!(quiet["stop_reason"].is_null(), "{quiet}");
}

/// A server replica named `name` on `pg` (it advertises its own URL; git polled every 2 s),
/// with `more` variables; not started.
fn replica(seed: u32, pg: &warren_testkit::Postgres, name: &str, more: &[(&str, &str)]) -> Warren {
    let mut replica = Warren::new(seed, Some(pg.url()));
    let url = replica.url();
    replica.env.extend([
        ("WARREN_HOST_NAME".into(), name.into()),
        ("WARREN_ADVERTISE_URL".into(), url),
        ("WARREN_GIT_POLL_SECONDS".into(), "2".into()),
    ]);
    replica
        .env
        .extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    replica
}

/// Starts `r2` as another replica beside the running `first` and logs the admin in there:
/// replicas share the key that seals secrets and the gateway's host key.
fn start_beside(first: &Warren, r2: &mut Warren, password: &str) {
    for file in ["secret.key", "ssh_host_ed25519_key"] {
        std::fs::copy(first.data.path().join(file), r2.data.path().join(file)).unwrap();
    }
    assert!(r2.start().is_none(), "the admin exists already");
    r2.login("admin", password);
}

/// Two `warren up` replicas on one PostgreSQL database and a third host's agent: every host
/// keeps a tunnel to each replica, so either replica reaches any workspace (commands, SSH with
/// scp and -L, a workspace on the other replica's own host); with replica 1 killed, the agent's
/// jobs go on through replica 2 and replica 2 takes the git poller over.
#[test]
fn replicas_on_one_database_reach_every_host_and_take_over_from_each_other() {
    setup();
    let pg = warren_testkit::Postgres::start();
    let mut r1 = replica(59, &pg, "r1", &[]);
    let password = r1.start().expect("a first start creates the admin");
    r1.login("admin", &password);
    let mut r2 = replica(
        60,
        &pg,
        "r2",
        &[
            ("WARREN_BRIDGE", "warren2"),
            ("WARREN_SUBNET", "10.90.0.0/16"),
        ],
    );
    start_beside(&r1, &mut r2, &password);

    let mut second = SecondHost::new(&r1);
    let imported = second.run(&["image", "import", dev_image().to_str().unwrap(), "far:1"]);
    assert!(imported.status.success(), "{}", stderr(&imported));
    second.join(&r1, "second");
    r1.import_dev_image();
    // Made through replica 2, on the host that holds its image.
    r2.ok("admin", &["ws", "create", "web", "--image", "far:1"]);
    assert_eq!(r2.json("admin", &["ws", "show", "web"])["host"], "second");
    // Replica 2 reaches it through the tunnel the agent opened to it (the agent was given
    // replica 1 and learned of replica 2).
    let out = eventually("a command through replica 2", || {
        let out = r2.cli("admin", &["ws", "exec", "web", "--", "echo", "via r2"]);
        out.status.success().then_some(out)
    });
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via r2\n");
    let admin = Developer::new(&r2, "admin");
    admin.write_ssh_config(&r2);
    assert_eq!(admin.ssh_ok("web.warren", "echo relayed"), "relayed\n");
    let (_dir, _) = admin.scp_a_new_file();
    drop(admin.forward_to_a_server_inside("through-replica-2"));
    // A workspace on replica 1's own host, reached through replica 2.
    r1.ok("admin", &["ws", "create", "near", "--image", "dev:1"]);
    assert_eq!(r1.json("admin", &["ws", "show", "near"])["host"], "r1");
    let out = eventually("replica 1's host through replica 2", || {
        let out = r2.cli("admin", &["ws", "exec", "near", "--", "echo", "near"]);
        out.status.success().then_some(out)
    });
    assert_eq!(String::from_utf8_lossy(&out.stdout), "near\n");
    r2.ok("admin", &["ws", "rm", "near"]);

    // A project whose branches replica 1 polls now.
    let repos = tempfile::tempdir().unwrap();
    let repo = repos.path().join("app");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("README"), "one\n").unwrap();
    let git = |args: &[&str]| warren_testkit::git(&repo, args);
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "one"]);
    r2.ok(
        "admin",
        &[
            "project",
            "add",
            "app",
            &format!("file://{}", repo.display()),
        ],
    );

    r1.kill9();
    let killed = Instant::now();
    // The agent's jobs go on through replica 2.
    r2.ok("admin", &["ws", "stop", "web"]);
    r2.ok("admin", &["ws", "start", "web"]);
    assert_eq!(r2.json("admin", &["ws", "show", "web"])["state"], "running");
    // Replica 2 polls the branches now.
    std::fs::write(repo.join("README"), "two\n").unwrap();
    git(&["commit", "-q", "-am", "two"]);
    let head = git(&["rev-parse", "HEAD"]);
    let token = r2.token("admin");
    eventually("replica 2 reads the new head", || {
        let (_, branches) = r2.http("GET", "/api/v1/projects/app/branches", Some(&token), None);
        branches.to_string().contains(head.trim()).then_some(())
    });
    let took = killed.elapsed();
    let took_over = |log: String| {
        log.lines()
            .any(|l| l.contains("this replica does this work now") && l.contains("git poller"))
    };
    assert!(took_over(r1.log()), "replica 1 polled first");
    assert!(took_over(r2.log()), "replica 2 took the poller over");
    eprintln!("stop, start and the new head through replica 2 in {took:?} after the kill");
    assert_eq!(admin.ssh_ok("web.warren", "echo still"), "still\n");
    r2.ok("admin", &["ws", "rm", "web"]);
}

/// The several-hosts story in one cluster: PostgreSQL; docker-registry 20 ms and 100 Mbit/s
/// away; two replicas, r1 the only host that makes prebuilds; two agent hosts, b and c. The
/// prebuild made on r1's host starts on b, which never saw it, with under half of it fetched;
/// SSH through replica 2 reaches it there (exit status, scp, -L); it moves to c with its
/// files; replica 1 dies and replica 2 carries the jobs and the git poller on; c dies, and the
/// workspace, lost, starts on b from its last saved layer; draining b empties it.
#[test]
fn a_cluster_outlives_a_replica_and_a_host() {
    setup();
    let pg = warren_testkit::Postgres::start();
    let registry = warren_testkit::Registry::start();
    let link = warren_testkit::DelayLine::start(
        registry.addr(),
        warren_testkit::LinkShape {
            rtt: Duration::from_millis(20),
            down_bits: Some(100e6),
            up_bits: None,
        },
    );
    let shared = format!("{}/team", link.host());
    let cluster = [
        ("WARREN_REGISTRY", shared.as_str()),
        ("WARREN_HOST_LOST_SECONDS", "5"),
    ];
    let mut r1 = replica(62, &pg, "r1", &cluster);
    let password = r1.start().expect("a first start creates the admin");
    r1.login("admin", &password);
    let mut r2 = replica(63, &pg, "r2", &cluster);
    r2.env.extend([
        ("WARREN_BRIDGE".into(), "warren3".into()),
        ("WARREN_SUBNET".into(), "10.91.0.0/16".into()),
        ("WARREN_PREBUILDS".into(), "false".into()),
    ]);
    start_beside(&r1, &mut r2, &password);
    // The project's Dockerfile starts from the image with sftp-server and busybox.
    r1.import_image(&dev_image(), "debian:bookworm");
    let mut hosts = Vec::new();
    for (n, name) in [(1, "b"), (2, "c")] {
        let mut host = SecondHost::nth(&r1, n);
        host.env.extend([
            ("WARREN_TRUSTED_REGISTRIES".into(), link.host()),
            ("WARREN_PREBUILDS".into(), "false".into()),
        ]);
        host.join(&r1, name);
        hosts.push(host);
    }

    // Prebuilt on r1's host and pushed to the registry.
    let repos = tempfile::tempdir().unwrap();
    let (repo, url) = common::repository(
        repos.path(),
        "counter",
        &common::examples().join("warren-app"),
    );
    r1.ok("admin", &["project", "add", "counter", &url]);
    let commit = warren_testkit::git(&repo, &["rev-parse", "HEAD"]);
    let pb = common::prebuild_of(&r1, "counter", &commit);
    assert_eq!(pb["state"], "succeeded", "{pb}");
    assert_eq!(pb["host"], "r1", "{pb}");

    // Placed through replica 2 on b, the one host left to take it (the others drain).
    for host in ["r1", "r2", "c"] {
        r2.ok("admin", &["host", "drain", host]);
    }
    r2.ok("admin", &["ws", "create", "web", "--project", "counter"]);
    let show = || r2.json("admin", &["ws", "show", "web"]);
    assert_eq!(show()["host"], "b", "{}", show());
    let exec = |script: &str| r2.ok("admin", &["ws", "exec", "web", "--", "sh", "-c", script]);
    assert_eq!(exec("cat /var/tmp/counter"), "100\n");
    let cache = hosts[0].data.path().join("cache");
    let at_first_command = common::walkdir_bytes(&cache);
    for host in ["r2", "c"] {
        r2.ok("admin", &["host", "resume", host]);
    }

    // SSH through replica 2 to b.
    let admin = Developer::new(&r2, "admin");
    admin.write_ssh_config(&r2);
    let out = admin.ssh("web.warren", "exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // A session lands in the project's checkout, on b as anywhere.
    let folder = show()["folder"].as_str().unwrap().to_owned();
    let out = admin.ssh("web.warren", "pwd");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{folder}\n"),
        "{}",
        stderr(&out)
    );
    let (_dir, _) = admin.scp_a_new_file();
    drop(admin.forward_to_a_server_inside("on-b-through-r2"));
    // Meanwhile the rest of the image came in the background: the first command had needed
    // less than half of it.
    let whole = common::cache_once_pulled(&cache);
    assert!(
        at_first_command > 0 && at_first_command * 2 < whole,
        "the first command ran with {at_first_command} of {whole} bytes of the image cached"
    );

    // Moved to c with its files.
    exec("echo written on b > /root/note");
    let moved = r2.ok("admin", &["ws", "move", "web", "--host", "c"]);
    assert!(moved.contains("web is on c"), "{moved}");
    assert_eq!(exec("cat /root/note"), "written on b\n");

    // Replica 1 dies: jobs and the git poller go on through replica 2.
    r1.kill9();
    r2.ok("admin", &["ws", "stop", "web"]);
    r2.ok("admin", &["ws", "start", "web"]);
    assert_eq!(show()["state"], "running");
    std::fs::write(repo.join("README"), "two\n").unwrap();
    let head = common::commit_all(&repo, "two");
    let token = r2.token("admin");
    eventually("replica 2 reads the new head", || {
        let (_, branches) = r2.http(
            "GET",
            "/api/v1/projects/counter/branches",
            Some(&token),
            None,
        );
        branches.to_string().contains(head.trim()).then_some(())
    });

    // c dies: the workspace is lost, then starts on b from the layer its stop saved.
    exec("echo written on c > /root/late");
    r2.ok("admin", &["ws", "stop", "web"]);
    r2.ok("admin", &["ws", "start", "web"]);
    hosts[1].kill9_everything();
    common::wait_until_lost(show);
    let started = r2.ok("admin", &["ws", "start", "web"]);
    assert!(started.contains("from its layer saved"), "{started}");
    assert_eq!(show()["host"], "b", "{}", show());
    assert_eq!(
        exec("cat /root/note /root/late"),
        "written on b\nwritten on c\n"
    );

    // Drained, b gives it to the only other live host, replica 2's.
    r2.ok("admin", &["host", "drain", "b"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while show()["host"] != "r2" || show()["state"] != "running" {
        assert!(Instant::now() < deadline, "b never emptied: {}", show());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(exec("cat /root/note"), "written on b\n");
    r2.ok("admin", &["ws", "rm", "web"]);
}
