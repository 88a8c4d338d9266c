//! `warren up` end to end, driven with the CLI and with plain HTTP: users, projects from a local
//! git repository, workspaces through their whole life, on SQLite and on PostgreSQL; who may
//! touch what; bad input; and `kill -9` of the server in the middle of every lifecycle step.
// A test that meets an unexpected error should stop right there.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
mod common;

use common::{SecondHost, Warren};
use warren_testkit::{
    DebianRootfs, Postgres, Registry, debian_rootfs, enter_own_network, git, require_program,
};

fn setup() {
    enter_own_network();
    require_program("git", "git");
}

/// A git repository with one commit on `main`, as a project's source.
fn git_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("warren.yml"), "image: dev:1\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    repo
}

fn end_to_end(seed: u32, database_url: Option<String>) {
    // Users may add file:// repositories only from the folders the server allows.
    let repos = tempfile::tempdir().unwrap();
    let mut warren = Warren::new(seed, database_url);
    warren.env.push((
        "WARREN_FILE_REPOS".into(),
        repos.path().display().to_string(),
    ));
    let password = warren.start().expect("a first start creates the admin");
    // How the host mounts images, as detected for this kernel.
    let detected =
        std::fs::read_to_string(warren.data.path().join("runtime/image-sharing.json")).unwrap();
    let said = warren.image_mounts.clone().unwrap_or_default();
    let shared = detected.contains(r#""mode":"shared""#);
    if shared {
        assert_eq!(
            said,
            "one per image and tenant, shared by its workspaces (idmapped FUSE)"
        );
    } else {
        assert!(said.starts_with("one per workspace (this kernel"), "{said}");
    }
    warren.login("admin", &password);
    warren.import_dev_image();
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["user", "add", "alice"])
        .env("XDG_CONFIG_HOME", warren.configs.path().join("admin"))
        .env("WARREN_SERVER", warren.url())
        .env("WARREN_PASSWORD", "alice-secret-1")
        .output()
        .unwrap();
    common::ok(out);
    warren.login("alice", "alice-secret-1");

    let repo = git_repo(repos.path());
    // Elsewhere on the server's disk (here: its own mirrors) is refused to a user.
    let elsewhere = git_repo(warren.data.path());
    let refused = warren.cli(
        "alice",
        &[
            "project",
            "add",
            "other",
            &format!("file://{}", elsewhere.display()),
        ],
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only an admin may add it"),
        "{refused:?}"
    );
    let added = warren.ok(
        "alice",
        &[
            "project",
            "add",
            "app",
            &format!("file://{}", repo.display()),
        ],
    );
    assert!(warren.ok("alice", &["project", "ls"]).contains("app"));
    let hook = added
        .lines()
        .find_map(|l| l.split_once(&warren.url()).map(|(_, path)| path.to_owned()))
        .expect("the webhook is shown once");
    // The database keeps the secret's digest, never the secret.
    if warren.database_url.is_none() {
        let secret = hook.split("secret=").nth(1).unwrap().as_bytes();
        for file in ["warren.db", "warren.db-wal"] {
            let bytes = std::fs::read(warren.data.path().join(file)).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "the webhook secret is kept as given in {file}"
            );
        }
    }
    // The branch heads are read at once, and again when the webhook is called.
    let head = |rev: &str| {
        let out = Command::new("git")
            .args(["rev-parse", rev])
            .current_dir(&repo)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let branches = |refresh: bool| -> Value {
        let mut args = vec!["project", "branches", "app", "--json"];
        if refresh {
            args.push("--refresh");
        }
        warren.json("alice", &args)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while branches(false).as_array().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first branch heads were never read"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(branches(false)[0]["head"], head("main").as_str());
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "second"]);
    let wrong = hook.replace("secret=", "secret=0");
    assert_eq!(
        warren.http("POST", &wrong, None, None).0,
        404,
        "a wrong secret is refused"
    );
    assert_eq!(warren.http("POST", &hook, None, None).0, 204);
    let listed = branches(false);
    let feature = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "feature")
        .expect("the hook read the new branch");
    assert_eq!(feature["head"], head("feature").as_str());
    assert_eq!(branches(true).as_array().unwrap().len(), 2);
    // Each head's commit is prebuilt (the project's environment is `image: dev:1`).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list: Value = warren.json("alice", &["prebuild", "ls", "app", "--json"]);
        let list = list.as_array().unwrap();
        if list.len() == 2 && list.iter().all(|p| p["state"] == "succeeded") {
            break;
        }
        assert!(
            Instant::now() < deadline && !list.iter().any(|p| p["state"] == "failed"),
            "{list:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Variables: plain ones are shown, secrets are sealed at rest and never sent back.
    warren.ok("alice", &["env", "set", "API_URL=https://api.example.com"]);
    warren.ok(
        "alice",
        &[
            "env",
            "set",
            "--secret",
            "--project",
            "app",
            "DEPLOY_TOKEN=hunter2-very-secret",
        ],
    );
    let mine: Value = warren.json("alice", &["env", "ls", "--json"]);
    assert_eq!(mine[0]["value"], "https://api.example.com");
    let project_vars = warren.ok("alice", &["env", "ls", "--project", "app", "--json"]);
    assert!(!project_vars.contains("hunter2"), "{project_vars}");
    let project_vars: Value = serde_json::from_str(&project_vars).unwrap();
    assert_eq!(project_vars[0]["secret"], true);
    assert_eq!(project_vars[0]["hint"], "19 characters");
    if warren.database_url.is_none() {
        for file in ["warren.db", "warren.db-wal"] {
            let bytes = std::fs::read(warren.data.path().join(file)).unwrap_or_default();
            assert!(
                !bytes.windows(7).any(|w| w == b"hunter2"),
                "{file} holds the secret in clear"
            );
        }
    }
    let key = std::fs::metadata(warren.data.path().join("secret.key")).unwrap();
    let variables_inside = |warren: &Warren| {
        warren.ok(
            "alice",
            &[
                "ws",
                "exec",
                "dev",
                "--",
                "sh",
                "-c",
                "echo $API_URL $DEPLOY_TOKEN",
            ],
        )
    };
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );

    warren.ok(
        "alice",
        &[
            "ws",
            "create",
            "dev",
            "--image",
            "dev:1",
            "--project",
            "app",
            "--memory",
            "512MiB",
        ],
    );
    let list: Value = warren.json("alice", &["ws", "ls", "--json"]);
    assert_eq!(list[0]["name"], "dev");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(list[0]["project"], "app");
    assert_eq!(
        variables_inside(&warren),
        "https://api.example.com hunter2-very-secret\n",
        "the workspace's processes get the project's and the owner's variables"
    );
    // One owner's workspaces of an image share the host's mount of it; another owner's have
    // their own (where the kernel lets the host share mounts at all).
    warren.ok("alice", &["ws", "create", "dev2", "--image", "dev:1"]);
    warren.ok("admin", &["ws", "create", "admins", "--image", "dev:1"]);
    assert_eq!(warren.image_mounts(), if shared { 2 } else { 3 });
    warren.ok("alice", &["ws", "rm", "dev2"]);
    warren.ok("admin", &["ws", "rm", "admins"]);
    // The host reports the workspace's resource use (every 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let shown: Value = warren.json("alice", &["ws", "show", "dev"]);
        if !shown["stats"].is_null() {
            break shown["stats"].clone();
        }
        assert!(Instant::now() < deadline, "no stats reported: {shown}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(stats["memory_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["memory_limit"].as_u64(), Some(512 << 20), "{stats}");
    let out = warren.cli(
        "alice",
        &[
            "ws",
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "echo kept > /root/kept; echo out; echo err >&2; exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    warren.ok("alice", &["ws", "stop", "dev"]);
    assert_eq!(
        warren.workspace_processes(),
        0,
        "a stopped workspace runs nothing"
    );
    warren.ok("alice", &["ws", "start", "dev"]);
    assert_eq!(
        warren.ok("alice", &["ws", "exec", "dev", "--", "cat", "/root/kept"]),
        "kept\n"
    );
    warren.ok("alice", &["ws", "rm", "dev"]);
    assert!(!warren.ok("alice", &["ws", "ls"]).contains("dev"));
    assert_eq!(warren.workspace_processes(), 0);
    let left: Vec<_> = std::fs::read_dir(warren.data.path().join("runtime/workspaces"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "nothing left of the workspace: {left:?}");
    let jobs: Value = warren.json("admin", &["job", "ls", "--json"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "done"),
        "{jobs}"
    );
}

#[test]
fn end_to_end_on_sqlite() {
    setup();
    end_to_end(1, None);
}

#[test]
fn end_to_end_on_postgres() {
    setup();
    let pg = Postgres::start();
    end_to_end(2, Some(pg.url()));
}

#[test]
fn every_endpoint_refuses_strangers_and_other_users() {
    setup();
    let warren = Warren::up_with_admin(3, None);
    let admin = warren.token("admin");
    for user in ["alice", "bob"] {
        let (status, _) = warren.http(
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(
                json!({"name": user, "password": format!("{user}-password")})
                    .to_string()
                    .as_bytes(),
            ),
        );
        assert_eq!(status, 201);
        warren.login(user, &format!("{user}-password"));
    }
    let (alice, bob) = (warren.token("alice"), warren.token("bob"));
    warren.import_dev_image();
    let post = |path: &str, token: &str, body: Value| {
        warren.http("POST", path, Some(token), Some(body.to_string().as_bytes()))
    };
    assert_eq!(
        post(
            "/api/v1/projects",
            &alice,
            json!({"name": "app", "git_url": "https://example.com/app.git"})
        )
        .0,
        201
    );
    let key_file = warren.configs.path().join("alice-key");
    common::keygen(&key_file);
    let key = std::fs::read_to_string(key_file.with_extension("pub")).unwrap();
    let (status, challenge) = warren.http("GET", "/api/v1/keys/challenge", Some(&alice), None);
    assert_eq!(status, 200, "{challenge}");
    let signature = common::ssh_sign(
        &key_file,
        challenge["namespace"].as_str().unwrap(),
        challenge["message"].as_str().unwrap(),
    );
    // Alice's signature proves the key for her, not for bob.
    let (status, answer) = post(
        "/api/v1/keys",
        &bob,
        json!({"name": "stolen", "public_key": key, "signature": signature}),
    );
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        post(
            "/api/v1/keys",
            &alice,
            json!({"name": "laptop", "public_key": key, "signature": signature})
        )
        .0,
        201
    );
    let (status, ws) = post(
        "/api/v1/workspaces",
        &alice,
        json!({"name": "mine", "image": "dev:1"}),
    );
    assert_eq!(status, 202, "{ws}");
    let ws_id = ws["id"].as_str().unwrap().to_owned();

    // Every route the server documents is routed (no answer is the fallback's "no such
    // endpoint"), and without a token (or with a wrong one) every one that names a security
    // scheme answers 401.
    let (status, doc) = warren.http("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200, "{doc}");
    let paths = doc["paths"].as_object().expect("the document lists paths");
    let mut protected = 0;
    for (template, item) in paths {
        let path = template
            .replace("{workspace}", "mine")
            .replace("{project}", "app")
            .replace("{key}", "laptop")
            .replace("{user}", "alice")
            .replace("{id}", "x")
            .replace("{name}", "X")
            .replace("{task}", "t")
            .replace("{port}", "8000");
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_uppercase();
            // An operation's own requirements, else the document's.
            let secured = op
                .get("security")
                .unwrap_or(&doc["security"])
                .as_array()
                .is_some_and(|s| {
                    s.iter()
                        .any(|r| r.as_object().is_some_and(|r| !r.is_empty()))
                });
            for token in [None, Some("wrn_not-a-token")] {
                let (status, body) = warren.http(&method, &path, token, None);
                assert!(
                    !body["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("no such endpoint")),
                    "{method} {path} is documented but not routed: {body}"
                );
                if secured {
                    assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
                    assert!(body["error"].as_str().is_some(), "{body}");
                }
            }
            protected += usize::from(secured);
        }
    }
    assert!(
        protected >= 40,
        "only {protected} protected operations documented"
    );

    // Bob sees none of Alice's things, by name or by id, and cannot act on them.
    for (method, path) in [
        ("GET", "/api/v1/projects/app".to_owned()),
        ("DELETE", "/api/v1/projects/app".to_owned()),
        ("DELETE", "/api/v1/keys/laptop".to_owned()),
        ("GET", "/api/v1/workspaces/mine".to_owned()),
        ("GET", format!("/api/v1/workspaces/{ws_id}")),
        ("POST", format!("/api/v1/workspaces/{ws_id}/start")),
        ("POST", format!("/api/v1/workspaces/{ws_id}/stop")),
        ("POST", "/api/v1/workspaces/mine/exec".to_owned()),
        ("DELETE", format!("/api/v1/workspaces/{ws_id}")),
        ("GET", "/api/v1/env?project=app".to_owned()),
        ("DELETE", "/api/v1/env/X?project=app".to_owned()),
        ("GET", "/api/v1/projects/app/branches".to_owned()),
        ("POST", "/api/v1/projects/app/refresh".to_owned()),
        ("GET", format!("/api/v1/workspaces/{ws_id}/ports")),
        ("PUT", format!("/api/v1/workspaces/{ws_id}/ports/8000")),
        ("PUT", format!("/api/v1/workspaces/{ws_id}/idle-timeout")),
        ("PUT", "/api/v1/projects/app/idle-timeout".to_owned()),
        ("GET", format!("/api/v1/workspaces/{ws_id}/jobs")),
        ("POST", format!("/api/v1/workspaces/{ws_id}/retry")),
    ] {
        let body = if path.ends_with("/exec") {
            json!({"argv": ["true"]})
        } else if path.ends_with("/8000") {
            json!({"access": "public"})
        } else if path.ends_with("/idle-timeout") {
            json!({"seconds": 3600})
        } else {
            json!({})
        }
        .to_string();
        let (status, answer) = warren.http(method, &path, Some(&bob), Some(body.as_bytes()));
        assert_eq!(status, 404, "bob: {method} {path}: {answer}");
    }
    for path in [
        "/api/v1/workspaces",
        "/api/v1/projects",
        "/api/v1/keys",
        "/api/v1/jobs",
    ] {
        let (status, list) = warren.http("GET", path, Some(&bob), None);
        assert_eq!(
            (status, list.as_array().map(Vec::len)),
            (200, Some(0)),
            "bob lists {path}: {list}"
        );
    }
    for path in ["/api/v1/users", "/api/v1/hosts"] {
        assert_eq!(
            warren.http("GET", path, Some(&bob), None).0,
            403,
            "{path} is for admins"
        );
    }
    // Where workspaces run is the admins' to say, even for the owner's own.
    for (path, body) in [
        (
            format!("/api/v1/workspaces/{ws_id}/move"),
            json!({"host": "elsewhere"}),
        ),
        ("/api/v1/hosts/elsewhere/drain".to_owned(), json!({})),
        ("/api/v1/hosts/elsewhere/resume".to_owned(), json!({})),
    ] {
        assert_eq!(post(&path, &alice, body).0, 403, "{path} is for admins");
    }
    assert_eq!(
        post(
            "/api/v1/users",
            &bob,
            json!({"name": "eve", "password": "eve-password"})
        )
        .0,
        403
    );
    // Alice and the admin do see it.
    assert_eq!(
        warren
            .http("GET", "/api/v1/workspaces/mine", Some(&alice), None)
            .0,
        200
    );
    assert_eq!(
        warren
            .http(
                "GET",
                &format!("/api/v1/workspaces/{ws_id}"),
                Some(&admin),
                None
            )
            .0,
        200
    );
    let (status, _) = warren.http("DELETE", "/api/v1/workspaces/mine", Some(&alice), None);
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while warren
        .http("GET", "/api/v1/workspaces/mine", Some(&alice), None)
        .0
        != 404
    {
        assert!(Instant::now() < deadline, "the workspace was never deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn bad_input_gets_a_4xx_with_a_message() {
    setup();
    let warren = Warren::up_with_admin(4, None);
    let token = warren.token("admin");
    let cases: Vec<(&str, String, u16)> = vec![
        ("/api/v1/workspaces", "{not json".into(), 400),
        (
            "/api/v1/workspaces",
            r#"{"name": "a", "image": "dev:1", "colour": "red"}"#.into(),
            422,
        ),
        (
            "/api/v1/workspaces",
            r#"{"name": 5, "image": "dev:1"}"#.into(),
            422,
        ),
        (
            "/api/v1/workspaces",
            r#"{"name": "Bad Name", "image": "dev:1"}"#.into(),
            400,
        ),
        (
            "/api/v1/workspaces",
            r#"{"name": "ok", "image": ""}"#.into(),
            400,
        ),
        (
            "/api/v1/workspaces",
            r#"{"name": "ok", "image": "dev:1", "cpus": -1}"#.into(),
            400,
        ),
        (
            "/api/v1/workspaces",
            r#"{"name": "ok", "image": "dev:1", "project": "nope"}"#.into(),
            404,
        ),
        (
            "/api/v1/workspaces",
            json!({"name": "ok", "image": "dev:1", "environment": {"file": "warren.yml", "text": "image: dev:1\nresources:\n  memory: 1MiB\n"}}).to_string(),
            400,
        ),
        (
            "/api/v1/projects",
            r#"{"name": "p", "git_url": "ftp://example.com/x"}"#.into(),
            400,
        ),
        (
            "/api/v1/projects",
            r#"{"name": "p", "git_url": "https://x/y", "root_folder": "../up"}"#.into(),
            400,
        ),
        (
            "/api/v1/keys",
            r#"{"name": "k", "public_key": "ssh-ed25519 notbase64!"}"#.into(),
            400,
        ),
        (
            "/api/v1/users",
            r#"{"name": "u", "password": "short"}"#.into(),
            400,
        ),
        (
            "/api/v1/login",
            r#"{"user": "admin", "password": "wrong"}"#.into(),
            401,
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = warren.http("POST", path, Some(&token), Some(body.as_bytes()));
        let shown: String = body.chars().take(80).collect();
        assert_eq!(status, expected, "POST {path} {shown}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|m| !m.is_empty()),
            "POST {path} {shown} must say what was wrong: {answer}"
        );
        if body.contains("resources") {
            assert!(
                answer["error"].as_str().is_some_and(|m| {
                    m.contains("the environment file's resources: memory must be at least 4 MiB")
                }),
                "{answer}"
            );
        }
    }
    // A body over the limit is refused with 413 once the limit is passed; the rest of the
    // body may meet a closed connection, which is the client's to see.
    {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", warren.port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let body = format!(r#"{{"name": "x", "image": "{}"}}"#, "a".repeat(2 << 20));
        let head = format!(
            "POST /api/v1/workspaces HTTP/1.1\r\nHost: warren\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut writer = conn.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let _ = writer
                .write_all(head.as_bytes())
                .and_then(|()| writer.write_all(body.as_bytes()));
        });
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#"{"error":"#), "{answer}");
        let _ = sender.join();
    }
    let (status, answer) = warren.http("GET", "/api/v1/no/such/thing", Some(&token), None);
    assert_eq!(status, 404, "{answer}");
    let (status, doc) = warren.http("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    assert!(
        doc["paths"]["/api/v1/workspaces/{workspace}/stop"]["post"].is_object(),
        "{doc}"
    );

    // Guessing passwords slows down: after five failures in a row, the next attempt must wait
    // (429, with how long); once it has waited, the right password works.
    warren.add_user("carol");
    let login = |password: &str| {
        warren.http(
            "POST",
            "/api/v1/login",
            None,
            Some(
                json!({"user": "carol", "password": password})
                    .to_string()
                    .as_bytes(),
            ),
        )
    };
    for _ in 0..5 {
        assert_eq!(login("guess").0, 401);
    }
    let (status, answer) = login("carol-password");
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|m| m.contains("too many failed logins for `carol`")),
        "{answer}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(login("carol-password").0, 200);
    assert_eq!(login("guess").0, 401, "a success starts the count again");
}

/// Behind a reverse proxy every connection comes from the proxy. With the proxy trusted
/// (`--trusted-proxy`), the login throttle keys on the client the proxy names, so one client
/// guessing a password slows down only itself, not everyone behind the proxy.
#[test]
fn behind_a_trusted_proxy_a_guesser_slows_down_only_itself() {
    setup();
    let mut warren = Warren::new(52, None);
    warren
        .env
        .push(("WARREN_TRUSTED_PROXIES".into(), "127.0.0.0/8".into()));
    let password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &password);
    warren.add_user("carol");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let login_from = |client: &str, password: &str| {
        agent
            .post(&format!("{}/api/v1/login", warren.url()))
            .header("X-Forwarded-For", client)
            .header("Content-Type", "application/json")
            .send(json!({"user": "carol", "password": password}).to_string())
            .unwrap()
            .status()
            .as_u16()
    };
    for _ in 0..5 {
        assert_eq!(login_from("198.51.100.7", "guess"), 401);
    }
    // Asked at once (the wait is a second): neither verifies a password.
    assert_eq!(login_from("198.51.100.7", "carol-password"), 429);
    // A guesser cannot pass for another client by writing the header itself: what the proxy
    // appended (the right end) is the client.
    assert_eq!(
        login_from("203.0.113.20, 198.51.100.7", "carol-password"),
        429
    );
    // Carol herself, elsewhere behind the same proxy, is not slowed down.
    assert_eq!(login_from("203.0.113.20", "carol-password"), 200);
}

/// Polls until every workspace has settled in the state its owner asked for (or is gone).
fn settled(warren: &Warren, token: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, list) = warren.http("GET", "/api/v1/workspaces", Some(token), None);
        if status == 200 {
            let all = list.as_array().unwrap();
            if all.iter().all(|w| w["state"] == w["desired"]) {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "not settled in {within:?}: {list}\n{}",
                warren.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_killed_server_resumes_every_step() {
    setup();
    let mut warren = Warren::up_with_admin(5, None);
    let token = warren.token("admin");
    warren.import_dev_image();
    let call = |warren: &Warren, method: &str, path: &str, body: Value| {
        let (status, answer) = warren.http(
            method,
            path,
            Some(&token),
            Some(body.to_string().as_bytes()),
        );
        assert!((200..300).contains(&status), "{method} {path}: {answer}");
    };
    // Kill at several points after each request: at once, and a little later (mid-step).
    for (round, delay_ms) in [0u64, 40, 150].into_iter().enumerate() {
        let name = format!("crash-{round}");
        let kill_restart = |warren: &mut Warren| {
            std::thread::sleep(Duration::from_millis(delay_ms));
            warren.kill9();
            assert!(warren.start().is_none(), "the admin is made only once");
        };
        call(
            &warren,
            "POST",
            "/api/v1/workspaces",
            json!({"name": name, "image": "dev:1"}),
        );
        kill_restart(&mut warren);
        settled(&warren, &token, Duration::from_secs(30));
        let out = warren.cli(
            "admin",
            &[
                "ws",
                "exec",
                &name,
                "--",
                "sh",
                "-c",
                "echo data > /root/data",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        call(
            &warren,
            "POST",
            &format!("/api/v1/workspaces/{name}/stop"),
            json!({}),
        );
        kill_restart(&mut warren);
        let list = settled(&warren, &token, Duration::from_secs(30));
        assert_eq!(
            list.as_array()
                .unwrap()
                .iter()
                .find(|w| w["name"] == name.as_str())
                .unwrap()["state"],
            "stopped"
        );

        call(
            &warren,
            "POST",
            &format!("/api/v1/workspaces/{name}/start"),
            json!({}),
        );
        kill_restart(&mut warren);
        settled(&warren, &token, Duration::from_secs(30));
        assert_eq!(
            warren.ok("admin", &["ws", "exec", &name, "--", "cat", "/root/data"]),
            "data\n",
            "data written before the kill is kept"
        );

        call(
            &warren,
            "DELETE",
            &format!("/api/v1/workspaces/{name}"),
            json!({}),
        );
        kill_restart(&mut warren);
        let list = settled(&warren, &token, Duration::from_secs(30));
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .all(|w| w["name"] != name.as_str()),
            "{list}"
        );
    }
    assert_eq!(warren.workspace_processes(), 0);
    let left: Vec<_> = std::fs::read_dir(warren.data.path().join("runtime/workspaces"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_second_host_runs_the_workspaces_whose_image_it_holds() {
    setup();
    let warren = Warren::up_with_admin(6, None);
    warren.import_dev_image();

    // The second host: its own data folder, uid ranges, bridge and addresses.
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    let mut second = SecondHost::new(&warren);
    assert!(
        second
            .run(&["image", "import", rootfs.to_str().unwrap(), "only-second:1"])
            .status
            .success()
    );
    second.join(&warren, "second");
    let on_second = |args: &[&str]| second.run(args);
    // The image decides the host.
    warren.ok(
        "admin",
        &["ws", "create", "far", "--image", "only-second:1"],
    );
    warren.ok("admin", &["ws", "create", "near", "--image", "dev:1"]);
    let show = |name: &str| -> Value { warren.json("admin", &["ws", "show", name]) };
    assert_eq!(show("far")["host"], "second");
    assert_ne!(show("near")["host"], "second");
    let listed =
        String::from_utf8_lossy(&on_second(&["runtime", "ls", "--json"]).stdout).into_owned();
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["state"], "running");
    // Stopped behind the control plane's back on the second host: its report brings it back.
    let far_id = format!("ws-{}", show("far")["id"].as_str().unwrap());
    assert!(on_second(&["runtime", "stop", &far_id]).status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed =
            String::from_utf8_lossy(&on_second(&["runtime", "ls", "--json"]).stdout).into_owned();
        let listed: Value = serde_json::from_str(&listed).unwrap();
        if listed[0]["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never brought back: {listed}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Reached through the second host's agent (more in ssh.rs).
    let out = warren.ok("admin", &["ws", "exec", "far", "--", "echo", "reached"]);
    assert_eq!(out, "reached\n");

    // A registry image goes where most of its chunks are cached, even to the busier host: the
    // second host reads part of it through a workspace of its own.
    let registry = Registry::start();
    let remote = format!("{}/team/dev:1", registry.host());
    warren.ok("admin", &["image", "push", "dev:1", &remote]);
    assert!(
        on_second(&["runtime", "run", "reader", "--image", &remote])
            .status
            .success()
    );
    let read = on_second(&[
        "runtime",
        "exec",
        "reader",
        "--",
        "sh",
        "-c",
        "cat /usr/bin/* >/dev/null",
    ]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    // The second host is the busier one (two workspaces to one).
    warren.ok(
        "admin",
        &["ws", "create", "far2", "--image", "only-second:1"],
    );
    // The agent reports its images every 10 s.
    std::thread::sleep(Duration::from_secs(12));
    warren.ok("admin", &["ws", "create", "lazy", "--image", &remote]);
    assert_eq!(show("lazy")["host"], "second");
    warren.ok("admin", &["ws", "rm", "lazy"]);
    warren.ok("admin", &["ws", "rm", "far2"]);
    assert!(
        on_second(&["runtime", "rm", "-f", "reader"])
            .status
            .success()
    );
    warren.ok("admin", &["ws", "stop", "far"]);
    warren.ok("admin", &["ws", "start", "far"]);
    warren.ok("admin", &["ws", "rm", "far"]);
    warren.ok("admin", &["ws", "rm", "near"]);
    let listed =
        String::from_utf8_lossy(&on_second(&["runtime", "ls", "--json"]).stdout).into_owned();
    assert_eq!(listed.trim(), "[]", "nothing left on the second host");
}

#[test]
fn a_workspace_that_stops_by_itself_is_brought_back() {
    setup();
    let warren = Warren::up_with_admin(7, None);
    warren.import_dev_image();
    warren.ok("admin", &["ws", "create", "solo", "--image", "dev:1"]);
    warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "solo",
            "--",
            "sh",
            "-c",
            "echo mine > /root/mine",
        ],
    );
    let ws: Value = warren.json("admin", &["ws", "show", "solo"]);
    let runtime_id = format!("ws-{}", ws["id"].as_str().unwrap());
    // Stopped behind Warren's back (as `poweroff` inside or a killed shim would).
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--data")
        .arg(warren.data.path())
        .args(["runtime", "stop", "--time", "0", &runtime_id])
        .env("WARREN_UID_BASE", warren.uid_base.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(warren.workspace_processes(), 0);
    // Its owner asked for it running: it is started again, with its files.
    let deadline = Instant::now() + Duration::from_secs(30);
    while warren.workspace_processes() == 0 {
        assert!(
            Instant::now() < deadline,
            "never brought back: {}",
            warren.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let token = warren.token("admin");
    settled(&warren, &token, Duration::from_secs(30));
    assert_eq!(
        warren.ok("admin", &["ws", "exec", "solo", "--", "cat", "/root/mine"]),
        "mine\n"
    );
    warren.ok("admin", &["ws", "rm", "solo"]);
}

#[test]
fn a_force_stop_does_not_wait_for_a_start_and_everything_settles() {
    setup();
    let warren = Warren::up_with_admin(8, None);
    warren.import_dev_image();
    let token = warren.token("admin");
    for round in 0..3 {
        let name = format!("hasty-{round}");
        warren.ok(
            "admin",
            &["ws", "create", &name, "--image", "dev:1", "--no-wait"],
        );
        std::thread::sleep(Duration::from_millis(50 * round));
        warren.ok("admin", &["ws", "stop", &name, "--force", "--no-wait"]);
        let list = settled(&warren, &token, Duration::from_secs(30));
        let ws = list
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name.as_str())
            .unwrap()
            .clone();
        assert_eq!(ws["state"], "stopped", "{ws}");
    }
    assert_eq!(
        warren.workspace_processes(),
        0,
        "force-stopped workspaces run nothing"
    );
    for round in 0..3 {
        warren.ok("admin", &["ws", "rm", &format!("hasty-{round}")]);
    }
}

/// An image that cannot be had is refused when the workspace is created, naming the image or
/// its registry; one that goes away later fails the start, which says why.
#[test]
fn a_workspace_image_that_cannot_be_had_is_named_at_once() {
    setup();
    let warren = Warren::up_with_admin(3, None);
    let admin = warren.token("admin");
    let create = |name: &str, image: &str| {
        let started = std::time::Instant::now();
        let answer = warren.http(
            "POST",
            "/api/v1/workspaces",
            Some(&admin),
            Some(json!({"name": name, "image": image}).to_string().as_bytes()),
        );
        (answer, started.elapsed())
    };
    let ((status, answer), took) = create("gone", "127.0.0.1:9/none:1");
    assert_eq!(status, 422, "{answer}");
    assert_eq!(
        answer["error"],
        "image 127.0.0.1:9/none:1: registry 127.0.0.1:9 refused the connection"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let ((status, answer), _) = create("missing", "nosuch:1");
    assert_eq!(status, 422, "{answer}");
    assert_eq!(
        answer["error"],
        "image nosuch:1 not found (`warren image ls` lists this host's images)"
    );
    // Neither was recorded.
    let (_, list) = warren.http("GET", "/api/v1/workspaces", Some(&admin), None);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // An image removed after the workspace was made: its next start says so.
    warren.import_image(&debian_rootfs(DebianRootfs::Minbase), "short:1");
    warren.ok("admin", &["ws", "create", "brief", "--image", "short:1"]);
    warren.ok("admin", &["ws", "stop", "brief"]);
    warren.ok("admin", &["image", "rm", "short:1"]);
    warren.ok("admin", &["ws", "start", "brief", "--no-wait"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, ws) = warren.http("GET", "/api/v1/workspaces/brief", Some(&admin), None);
        if ws["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("image short:1 not found"))
        {
            assert_ne!(ws["state"], "running", "{ws}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the start did not say why it failed: {ws}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `warren up --tls-cert --tls-key`: the API, the web UI and the previews over HTTPS (HTTP/2
/// offered), and the sign-in cookie marked Secure.
/// A CA, and a certificate it signed for 127.0.0.1 with its key: (CA, certificate, key).
fn signed_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-days", "1", "-subj", "/CN=warren test CA"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "cert.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "cert.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// Agents talk to a server off their machine only over HTTPS, with its certificate checked by
/// the fingerprint `host add` prints or by the CA given; a wrong one stops the agent at once.
#[test]
fn agents_reach_an_https_server_only_with_its_certificate_trusted() {
    setup();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = signed_certificate(certs.path());
    let mut warren = Warren::new(58, None);
    warren
        .env
        .push(("WARREN_TLS_CERT".into(), cert.display().to_string()));
    warren
        .env
        .push(("WARREN_TLS_KEY".into(), key.display().to_string()));
    warren.tls_ca = Some(ca.clone());
    let password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &password);
    // As OpenSSL names the certificate: "sha256 Fingerprint=AB:CD:...".
    let openssl = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&openssl.stdout);
    let expected = format!(
        "sha256:{}",
        printed
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_ascii_lowercase()
    );

    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    let mut second = SecondHost::new(&warren);
    assert!(
        second
            .run(&["image", "import", rootfs.to_str().unwrap(), "only-second:1"])
            .status
            .success()
    );
    second
        .env
        .push(("WARREN_SERVER_FINGERPRINT".into(), expected.clone()));
    let added = second.join(&warren, "second");
    assert!(
        added.contains(&format!("--server-fingerprint {expected}")),
        "{added}"
    );
    // Jobs over HTTPS, and the tunnel too: a command reaches the workspace through it.
    warren.ok(
        "admin",
        &["ws", "create", "far", "--image", "only-second:1"],
    );
    assert_eq!(
        warren.json("admin", &["ws", "show", "far"])["host"],
        "second"
    );
    let out = warren.ok("admin", &["ws", "exec", "far", "--", "echo", "reached"]);
    assert_eq!(out, "reached\n");

    second.stop_agent();
    second.env.clear();
    let https = warren.url();
    let refused = |args: &[&str], why: &str| {
        let out = second.agent_once(args);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "warren agent {args:?} started");
        assert!(said.contains(why), "warren agent {args:?}: {said}");
    };
    // A token never goes in the clear off this machine.
    refused(&["--server", "http://10.0.0.1:7070"], "in the clear");
    // Another certificate than the pinned one; a CA no public list holds.
    let wrong = format!("sha256:{}", "0".repeat(64));
    refused(
        &["--server", &https, "--server-fingerprint", &wrong],
        "not the pinned one",
    );
    refused(&["--server", &https], "is not the server this agent trusts");
    refused(
        &["--server", &https, "--server-fingerprint", "sha256:abc"],
        "64 hex digits",
    );

    // The same host with the CA instead of the fingerprint.
    second
        .env
        .push(("WARREN_SERVER_CA".into(), ca.display().to_string()));
    second.start_agent(&warren);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = warren.cli("admin", &["ws", "exec", "far", "--", "echo", "again"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent with the CA never came back: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    warren.ok("admin", &["ws", "rm", "far"]);
}

#[test]
fn warren_serves_https_itself_and_its_cookie_is_secure() {
    let mut warren = Warren::new(55, None);
    warren.ssh_port = 0;
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    warren
        .env
        .push(("WARREN_TLS_CERT".into(), cert.display().to_string()));
    warren
        .env
        .push(("WARREN_TLS_KEY".into(), key.display().to_string()));
    let password = warren.start().expect("a first start creates the admin");
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "20", "--cacert"])
            .arg(&cert)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let https = format!("https://127.0.0.1:{}", warren.port);
    let page = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &format!("{https}/login"),
    ]);
    assert_eq!(page, "200 2", "the sign-in page over HTTP/2");
    let signed_in = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-d",
        &format!("user=admin&password={password}"),
        &format!("{https}/login"),
    ]);
    let cookie = signed_in
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-warren_session=")
        })
        .unwrap_or_else(|| panic!("no session cookie: {signed_in}"));
    for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    // No page of the UI may be framed by another (a preview, say).
    let lower = signed_in.to_ascii_lowercase();
    assert!(lower.contains("x-frame-options: deny"), "{signed_in}");
    assert!(lower.contains("frame-ancestors 'none'"), "{signed_in}");
    // The API answers there too; plain HTTP to the same port does not.
    let me = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{https}/api/v1/me"),
    ]);
    assert_eq!(me, "401");
    let plain = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{}/login", warren.port),
    ]);
    assert_ne!(plain, "200");
    // The previews' listener speaks HTTPS as well.
    let preview = curl(&[
        "-w",
        " %{http_code}",
        &format!(
            "https://127.0.0.1:{}/preview/admin/nothing/8000/",
            warren.preview_port
        ),
    ]);
    assert!(
        preview.starts_with("no preview here") && preview.ends_with(" 404"),
        "{preview}"
    );
}

/// With a registry, a workspace's writable layer is saved at each stop: `ws move` carries a file
/// written on one host to another; when that host dies (its agent and shims killed) the
/// workspace is `lost`, and a start makes it anew elsewhere from its last saved layer; `host
/// drain` empties a host.
#[test]
fn workspaces_move_between_hosts_with_their_files_and_outlive_a_lost_host() {
    setup();
    let registry = Registry::start();
    let mut warren = Warren::new(61, None);
    warren.env.extend([
        (
            "WARREN_REGISTRY".into(),
            format!("{}/team", registry.host()),
        ),
        ("WARREN_HOST_LOST_SECONDS".into(), "5".into()),
        ("WARREN_SAVE_RUNNING_EVERY".into(), "10s".into()),
    ]);
    let password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &password);
    warren.import_dev_image();
    let image = format!("{}/team/dev:1", registry.host());
    warren.ok("admin", &["image", "push", "dev:1", &image]);
    let mut hosts = Vec::new();
    for (n, name) in [(1, "b"), (2, "c")] {
        let mut host = SecondHost::nth(&warren, n);
        host.env
            .push(("WARREN_TRUSTED_REGISTRIES".into(), registry.host()));
        host.join(&warren, name);
        hosts.push(host);
    }
    let show = || warren.json("admin", &["ws", "show", "web"]);
    let exec = |script: &str| warren.ok("admin", &["ws", "exec", "web", "--", "sh", "-c", script]);

    warren.ok("admin", &["ws", "create", "web", "--image", &image]);
    if show()["host"] != "b" {
        warren.ok("admin", &["ws", "move", "web", "--host", "b"]);
    }
    assert_eq!(show()["host"], "b");
    exec("echo written on b > /root/note");
    // Moved: stopped, its layer saved to the registry (where no user may name it), made anew
    // on c.
    let moved = warren.ok("admin", &["ws", "move", "web", "--host", "c"]);
    assert!(moved.contains("web is on c"), "{moved}");
    let ws = show();
    assert_eq!(
        (ws["host"].as_str(), ws["state"].as_str()),
        (Some("c"), Some("running")),
        "{ws}"
    );
    let saved = ws["saved_layer"].as_str().unwrap_or_default().to_owned();
    assert!(
        saved.starts_with(&format!("{}/team/warren-layers:layer-", registry.host())),
        "{ws}"
    );
    assert!(
        ws["placement"]
            .as_str()
            .unwrap_or_default()
            .contains("moved from b"),
        "{ws}"
    );
    assert_eq!(exec("cat /root/note"), "written on b\n");
    // Nothing of it is left on b.
    let left = |host: &SecondHost| -> usize {
        let listed = host.run(&["runtime", "ls", "--json"]);
        let listed: Value = serde_json::from_slice(&listed.stdout).unwrap_or(json!([]));
        listed.as_array().map_or(0, Vec::len)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while left(&hosts[0]) > 0 {
        assert!(Instant::now() < deadline, "b still has the workspace");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Written on c while it runs: in the next periodic save (made frozen, then thawed).
    exec("echo written on c > /root/late");
    let saved_at = |ws: &Value| ws["saved_at"].as_i64().unwrap_or(0);
    let moved_at = saved_at(&ws);
    let deadline = Instant::now() + Duration::from_secs(60);
    let saved = loop {
        let ws = show();
        if saved_at(&ws) > moved_at {
            break ws["saved_layer"].as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "never saved while running: {ws}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(show()["state"], "running");
    let log = std::fs::read_to_string(hosts[1].data.path().join("agent.log")).unwrap();
    assert!(
        log.contains("read a running workspace's layer while it was frozen"),
        "{log}"
    );
    // Thawed: it runs commands again (and the next save is 10 s away).
    exec("echo written on c after its last save > /root/later");

    // Host c dies.
    hosts[1].kill9_everything();
    common::wait_until_lost(show);
    let started = warren.ok("admin", &["ws", "start", "web"]);
    assert!(
        started.contains("from its layer saved") && started.contains(&saved),
        "{started}"
    );
    let ws = show();
    assert_ne!(ws["host"], "c", "{ws}");
    assert_eq!(ws["state"], "running", "{ws}");
    assert!(
        ws["placement"]
            .as_str()
            .unwrap_or_default()
            .contains("was lost"),
        "{ws}"
    );
    assert_eq!(exec("cat /root/note"), "written on b\n");
    assert_eq!(exec("cat /root/late"), "written on c\n");
    assert_eq!(
        exec("cat /root/later 2>&1 || true"),
        "cat: /root/later: No such file or directory\n"
    );

    // Drained, b gives its workspaces to the only other live host, the server's own.
    if show()["host"] != "b" {
        warren.ok("admin", &["ws", "move", "web", "--host", "b"]);
    }
    let drained = warren.ok("admin", &["host", "drain", "b"]);
    assert!(drained.contains("web is moving to"), "{drained}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ws = show();
        if ws["host"] != "b" && ws["state"] == "running" && left(&hosts[0]) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "b never emptied: {ws}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(exec("cat /root/note"), "written on b\n");
    let listed = warren.json("admin", &["host", "ls", "--json"]);
    let b = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "b")
        .unwrap()
        .clone();
    assert_eq!(
        (b["workspaces"].as_i64(), b["draining"].as_bool()),
        (Some(0), Some(true)),
        "{b}"
    );
    // Nobody names a saved layer to start from it, not even an admin: it is the workspace's.
    let named = warren.cli("admin", &["ws", "create", "thief", "--image", &saved]);
    assert!(!named.status.success());
    assert!(
        String::from_utf8_lossy(&named.stderr).contains("not to be named"),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    // A drained host takes no new workspace.
    let refused = warren.cli("admin", &["ws", "move", "web", "--host", "b"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("draining"));
    warren.ok("admin", &["host", "resume", "b"]);
    warren.ok("admin", &["ws", "rm", "web"]);
}
