//! Prebuilds end to end, as root, against real git repositories (file://), real sandboxes and
//! a real `warren up`: each example in `examples/` is prebuilt when its project is added,
//! a workspace started from the prebuild has the prebuild's output, its branch checked out and
//! its task running; a new commit makes a new prebuild and the older workspace shows it is
//! behind; another project on the same repository gets its own prebuild. Failures: a
//! failing `RUN` fails the prebuild with its Dockerfile line and the error's tail, a COPY out of
//! the repository is refused, a running prebuild is cancelled, a failed one retried.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    SecondHost, Warren, commit_all, ended, examples, ok, prebuild_of, prebuilds, repository,
    walkdir_bytes,
};
use serde_json::Value;
use warren_testkit::{
    DebianRootfs, DelayLine, LinkShape, Registry, debian_rootfs, enter_own_network, git,
};

/// This crate's folder, as the test runner gives it (not as compiled in: the target folder is
/// shared between checkouts, and a binary built for another may be reused).
fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn wait_for_log(warren: &Warren, ws: &str, task: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = warren.ok("admin", &["ws", "logs", ws, task]);
        if log.contains(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ws}/{task}: {expected:?} never came: {log}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn every_example_prebuilds_and_a_workspace_starts_from_it_on_its_branch() {
    enter_own_network();
    let warren = Warren::up_with_admin(22, None);
    // What `warren image bootstrap debian:bookworm --include git` makes, from a fixture.
    warren.import_image(&debian_rootfs(DebianRootfs::Git), "debian:bookworm");
    let repos = tempfile::tempdir().unwrap();
    // (example, task, what the task shows, a file the prebuild made and what it holds)
    let cases = [
        (
            "hocus-app",
            "greeter",
            "prebuilt at",
            "/workspace/prebuilt.txt",
            "prebuilt at",
        ),
        (
            "devcontainer-app",
            "postStartCommand",
            "prebuilt.txt: 1 line(s)",
            "/srv/notes/prebuilt.txt",
            "made by the prebuild",
        ),
        (
            "warren-app",
            "counter",
            "counter starts at 100",
            "/var/tmp/counter",
            "100",
        ),
    ];
    for (n, (example, task, shown, file, content)) in cases.into_iter().enumerate() {
        let (repo, url) = repository(repos.path(), example, &examples().join(example));
        let commit = git(&repo, &["rev-parse", "HEAD"]);
        // Adding the project reads its branches; the new head is prebuilt.
        warren.ok("admin", &["project", "add", example, &url]);
        let pb = prebuild_of(&warren, example, &commit);
        let id = pb["id"].as_str().unwrap();
        let log = warren.ok("admin", &["prebuild", "logs", id]);
        assert_eq!(pb["state"], "succeeded", "{example}: {pb}\n{log}");
        assert_eq!(pb["branch"], "main");
        assert_eq!(pb["behind"], 0);
        assert!(log.contains("checking out"), "{log}");
        assert!(
            pb["image"]
                .as_str()
                .unwrap()
                .starts_with("warren-prebuild:"),
            "{pb}"
        );

        let ws = format!("pb{n}");
        warren.ok("admin", &["ws", "create", &ws, "--project", example]);
        let out = warren.ok("admin", &["ws", "exec", &ws, "--", "cat", file]);
        assert!(out.contains(content), "{example}: {file}: {out}");
        wait_for_log(&warren, &ws, task, shown);
        wait_for_log(&warren, &ws, "warren-git", "on branch main");
        let shown_ws = json(&warren.ok("admin", &["ws", "show", &ws]));
        assert_eq!(shown_ws["branch"], "main", "{shown_ws}");
        assert_eq!(shown_ws["behind"], 0, "{shown_ws}");
        assert_eq!(shown_ws["prebuild"], pb["id"]);
    }

    // The hocus example's workspace is on `main` with git set up for its owner.
    let folder = "/workspace";
    let out = warren.ok(
        "admin",
        &[
            "ws", "exec", "pb0", "--", "sh", "-c",
            &format!("cd {folder} && git rev-parse --abbrev-ref HEAD && git config user.name && git status --porcelain | grep -v prebuilt.txt | wc -l"),
        ],
    );
    assert_eq!(out, "main\nadmin\n0\n", "{out}");

    // Commands, sessions and VS Code land in the checkout (the devcontainer's default
    // workspaceFolder, warren.yml's and hocus.yml's /workspace); in the home folder once it
    // is gone, and an explicit folder must exist.
    for ws in ["pb0", "pb1", "pb2"] {
        let folder = json(&warren.ok("admin", &["ws", "show", ws]))["folder"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            warren.ok("admin", &["ws", "exec", ws, "--", "pwd"]),
            format!("{folder}\n")
        );
        let link = warren.ok("admin", &["ws", "open", ws]);
        assert!(link.trim().ends_with(&format!(".warren{folder}")), "{link}");
    }
    let folder_of = |ws: &str| json(&warren.ok("admin", &["ws", "show", ws]))["folder"].clone();
    assert_eq!(folder_of("pb0"), "/workspace");
    assert!(
        folder_of("pb1")
            .as_str()
            .unwrap()
            .starts_with("/workspaces/")
    );
    let exec = |script: &str| warren.ok("admin", &["ws", "exec", "pb0", "--", "sh", "-c", script]);
    exec("mv /workspace /workspace.away");
    assert_eq!(exec("pwd"), "/root\n");
    let missing = warren.cli(
        "admin",
        &["ws", "exec", "pb0", "--workdir", "/workspace", "--", "pwd"],
    );
    assert!(!missing.status.success());
    exec("mv /workspace.away /workspace");

    // A new commit is prebuilt; the earlier workspace is one commit behind.
    let repo = repos.path().join("hocus-app");
    std::fs::write(repo.join("NOTES.md"), "not in the image\n").unwrap();
    let second = commit_all(&repo, "second");
    warren.ok("admin", &["project", "branches", "hocus-app", "--refresh"]);
    let pb = prebuild_of(&warren, "hocus-app", &second);
    let log = warren.ok("admin", &["prebuild", "logs", pb["id"].as_str().unwrap()]);
    assert_eq!(pb["state"], "succeeded", "{pb}\n{log}");
    // Nothing the Dockerfile reads changed: its image comes whole from the step cache.
    assert!(log.contains("environment: 0 steps run"), "{log}");
    let shown_ws = json(&warren.ok("admin", &["ws", "show", "pb0"]));
    assert_eq!(shown_ws["behind"], 1, "{shown_ws}");
    // `ws create PROJECT --branch B`: a workspace named after both.
    warren.ok("admin", &["ws", "create", "hocus-app", "--branch", "main"]);
    let out = warren.ok(
        "admin",
        &[
            "ws",
            "exec",
            "hocus-app-main",
            "--",
            "cat",
            "/workspace/NOTES.md",
        ],
    );
    assert_eq!(out, "not in the image\n");

    // Another project on the same repository and folder: its own prebuild (a project's
    // prebuilds and build caches are never another's).
    let url = format!("file://{}", repo.display());
    warren.ok("admin", &["project", "add", "hocus-again", &url]);
    let again = prebuild_of(&warren, "hocus-again", &second);
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["reused"], false, "{again}");
    assert_ne!(again["image"], pb["image"]);

    // The first prebuild is still needed by pb0; once pb0 goes, it is archived and its image
    // removed from the host.
    let first = prebuilds(&warren, "hocus-app")
        .into_iter()
        .find(|p| p["commit"] != second.as_str())
        .unwrap();
    warren.ok("admin", &["project", "branches", "hocus-app", "--refresh"]);
    let state = |id: &Value| -> Value {
        json(&warren.ok("admin", &["prebuild", "show", id.as_str().unwrap()]))["state"].clone()
    };
    assert_eq!(state(&first["id"]), "succeeded");
    for ws in ["pb0", "hocus-app-main", "pb1", "pb2"] {
        warren.ok("admin", &["ws", "rm", ws]);
    }
    warren.ok("admin", &["project", "branches", "hocus-app", "--refresh"]);
    assert_eq!(state(&first["id"]), "archived");
    assert_eq!(state(&pb["id"]), "succeeded", "the head's prebuild stays");
    let image = first["image"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while warren.ok("admin", &["image", "ls"]).contains(image) {
        assert!(Instant::now() < deadline, "{image} was never removed");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn failing_cancelled_and_refused_prebuilds_say_why_on_sqlite() {
    enter_own_network();
    failing_cancelled_and_refused(23, None);
}

#[test]
fn failing_cancelled_and_refused_prebuilds_say_why_on_postgres() {
    enter_own_network();
    let pg = warren_testkit::Postgres::start();
    failing_cancelled_and_refused(24, Some(pg.url()));
}

fn failing_cancelled_and_refused(seed: u32, database_url: Option<String>) {
    let warren = Warren::up_with_admin(seed, database_url);
    warren.import_image(&debian_rootfs(DebianRootfs::Git), "debian:bookworm");
    let repos = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    std::fs::write(
        source.path().join("warren.yml"),
        "image:\n  file: Dockerfile\ntasks:\n  - name: slow\n    prebuild: sleep 600\n",
    )
    .unwrap();
    std::fs::write(
        source.path().join("Dockerfile"),
        "FROM debian:bookworm\nRUN echo about to fail >&2 && exit 3\n",
    )
    .unwrap();
    let (repo, url) = repository(repos.path(), "app", source.path());
    let first = git(&repo, &["rev-parse", "HEAD"]);
    warren.ok("admin", &["project", "add", "app", &url]);

    // A failing RUN: the line and the error's tail, in the prebuild and from `logs -f`.
    let pb = prebuild_of(&warren, "app", &first);
    assert_eq!(pb["state"], "failed", "{pb}");
    let error = pb["error"].as_str().unwrap();
    assert!(error.contains("Dockerfile:2"), "{error}");
    assert!(error.contains("about to fail"), "{error}");
    let id = pb["id"].as_str().unwrap().to_owned();
    let follow = warren.cli("admin", &["prebuild", "logs", &id, "--follow"]);
    assert!(!follow.status.success());
    assert!(String::from_utf8_lossy(&follow.stdout).contains("about to fail"));
    assert!(String::from_utf8_lossy(&follow.stderr).contains("failed"));
    // No workspace from a branch with no succeeded prebuild.
    let refused = warren.cli("admin", &["ws", "create", "w", "--project", "app"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no succeeded prebuild"),
        "{refused:?}"
    );
    // A retry is a new prebuild of the same commit (which fails the same way).
    let retried = warren.ok("admin", &["prebuild", "retry", &id]);
    let new_id = retried
        .trim()
        .strip_prefix("prebuild ")
        .and_then(|s| s.strip_suffix(" queued"))
        .unwrap_or_else(|| panic!("{retried}"));
    assert_ne!(new_id, id);
    let again = ended(&warren, "app", |p| p["id"] == new_id);
    assert_eq!(again["state"], "failed", "{again}");

    // A COPY out of the repository is refused.
    std::fs::write(
        repo.join("Dockerfile"),
        "FROM debian:bookworm\nCOPY ../../etc/shadow /x\n",
    )
    .unwrap();
    let escaping = commit_all(&repo, "escape");
    warren.ok("admin", &["project", "branches", "app", "--refresh"]);
    let pb = prebuild_of(&warren, "app", &escaping);
    assert_eq!(pb["state"], "failed");
    assert!(
        pb["error"].as_str().unwrap().contains("Dockerfile:2"),
        "{pb}"
    );

    // A prebuild task that would run for ten minutes, cancelled while it runs.
    std::fs::write(repo.join("Dockerfile"), "FROM debian:bookworm\n").unwrap();
    let slow = commit_all(&repo, "slow");
    warren.ok("admin", &["project", "branches", "app", "--refresh"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let id = loop {
        let found = prebuilds(&warren, "app")
            .into_iter()
            .find(|p| p["commit"] == slow.as_str());
        if let Some(pb) = &found
            && warren
                .ok("admin", &["prebuild", "logs", pb["id"].as_str().unwrap()])
                .contains("prebuild task slow")
        {
            break pb["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the slow task never started");
        std::thread::sleep(Duration::from_millis(300));
    };
    let cancelled_at = Instant::now();
    warren.ok("admin", &["prebuild", "cancel", &id]);
    let pb = prebuild_of(&warren, "app", &slow);
    assert_eq!(pb["state"], "cancelled", "{pb}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(60));
    // Its sandboxes are gone.
    let left: Vec<String> = std::fs::read_dir(warren.data.path().join("runtime/workspaces"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pb-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_host_that_makes_no_prebuilds_leaves_them_to_another_agent() {
    enter_own_network();
    let mut warren = Warren::new(25, None);
    warren.env.push(("WARREN_PREBUILDS".into(), "false".into()));
    let password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &password);
    let mut second = SecondHost::new(&warren);
    let base = debian_rootfs(DebianRootfs::Git);
    ok(second.run(&["image", "import", base.to_str().unwrap(), "debian:bookworm"]));
    second.join(&warren, "builder");

    let repos = tempfile::tempdir().unwrap();
    let (repo, url) = repository(repos.path(), "counter", &examples().join("warren-app"));
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    warren.ok("admin", &["project", "add", "counter", &url]);
    let pb = prebuild_of(&warren, "counter", &commit);
    let log = warren.ok("admin", &["prebuild", "logs", pb["id"].as_str().unwrap()]);
    assert_eq!(pb["state"], "succeeded", "{pb}\n{log}");
    assert_eq!(pb["host"], "builder", "{pb}");
    // The log came over HTTP from the agent, as it ran.
    assert!(log.contains("prebuild task counter"), "{log}");
    // The workspace goes where the prebuild's image is.
    warren.ok("admin", &["ws", "create", "counter"]);
    let shown = json(&warren.ok("admin", &["ws", "show", "counter"]));
    assert_eq!(shown["host"], "builder", "{shown}");
    // (Commands through the API run on the server's own host; this one is read there.)
    let runtime_id = format!("ws-{}", shown["id"].as_str().unwrap());
    let out = ok(second.run(&[
        "runtime",
        "exec",
        &runtime_id,
        "-T",
        "--",
        "cat",
        "/var/tmp/counter",
    ]));
    assert_eq!(out, "100\n");
    warren.ok("admin", &["ws", "rm", "counter"]);
}

/// With `--registry`, a succeeded prebuild is pushed there (with its trace), and a host that never
/// saw it starts its workspace lazily from the registry into its own chunk cache; `ws show`
/// says why that host was chosen.
#[test]
fn a_prebuild_in_the_registry_starts_on_a_host_that_never_saw_it() {
    enter_own_network();
    let registry = Registry::start();
    // A registry in another region: 20 ms away, 100 Mbit/s down.
    let link = DelayLine::start(
        registry.addr(),
        LinkShape {
            rtt: Duration::from_millis(20),
            down_bits: Some(100e6),
            up_bits: None,
        },
    );
    let mut warren = Warren::new(57, None);
    warren
        .env
        .push(("WARREN_REGISTRY".into(), format!("{}/team", link.host())));
    let password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &password);
    warren.import_image(&debian_rootfs(DebianRootfs::Git), "debian:bookworm");
    warren.import_dev_image();
    let mut second = SecondHost::new(&warren);
    second
        .env
        .push(("WARREN_TRUSTED_REGISTRIES".into(), link.host()));
    second.env.push(("WARREN_PREBUILDS".into(), "false".into()));
    second.join(&warren, "second");

    let repos = tempfile::tempdir().unwrap();
    let (repo, url) = repository(repos.path(), "counter", &examples().join("warren-app"));
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    warren.ok("admin", &["project", "add", "counter", &url]);
    let pb = prebuild_of(&warren, "counter", &commit);
    let log = warren.ok("admin", &["prebuild", "logs", pb["id"].as_str().unwrap()]);
    assert_eq!(pb["state"], "succeeded", "{pb}\n{log}");
    assert_ne!(pb["host"], "second", "{pb}");
    let image = pb["image"].as_str().unwrap();
    let pushed_to = format!("{}/team/warren-prebuild:", link.host());
    assert!(image.starts_with(&pushed_to), "{pb}");
    assert!(log.contains(&format!("pushed {image}")), "{log}");
    // The registry holds the image and its startup trace.
    let tags = ureq::get(format!(
        "http://{}/v2/team/warren-prebuild/tags/list",
        registry.host()
    ))
    .call()
    .unwrap()
    .body_mut()
    .read_to_string()
    .unwrap();
    let tag = image.rsplit(':').next().unwrap();
    assert!(tags.contains(&format!("\"{tag}\"")), "{tags}");
    assert!(tags.contains(".trace\""), "{tags}");

    // The server's host is the busier one; the second holds none of the image either.
    warren.ok("admin", &["ws", "create", "busy", "--image", "dev:1"]);
    warren.ok("admin", &["ws", "create", "counter"]);
    let shown = json(&warren.ok("admin", &["ws", "show", "counter"]));
    assert_eq!(shown["host"], "second", "{shown}");
    assert_eq!(shown["image"], image, "{shown}");
    let why = shown["placement"].as_str().unwrap_or_default();
    assert!(
        why.contains("none holds any of the image: the least busy (0 workspaces)"),
        "{shown}"
    );
    // It runs the prebuild's content (the prebuild task's output), reached through the agent.
    let out = warren.ok(
        "admin",
        &["ws", "exec", "counter", "--", "cat", "/var/tmp/counter"],
    );
    assert_eq!(out, "100\n");
    let cache = second.data.path().join("cache");
    let at_first_command = walkdir_bytes(&cache);
    // From the registry into the second host's cache: nothing in its image store.
    assert_eq!(ok(second.run(&["image", "ls", "--json"])).trim(), "[]");
    // The rest comes in the background; the first command needed less than half of it.
    let whole = common::cache_once_pulled(&cache);
    eprintln!(
        "first command with {at_first_command} of {whole} bytes of the image cached ({:.0}%)",
        at_first_command as f64 * 100.0 / whole as f64
    );
    assert!(
        at_first_command > 0 && at_first_command * 2 < whole,
        "the first command ran with {at_first_command} bytes of the image in the cache, of {whole}"
    );
    // Placed there again, the next one is where the image is cached now (the agent reports
    // every 10 s).
    std::thread::sleep(Duration::from_secs(11));
    warren.ok(
        "admin",
        &["ws", "create", "counter2", "--project", "counter"],
    );
    let shown = json(&warren.ok("admin", &["ws", "show", "counter2"]));
    assert_eq!(shown["host"], "second", "{shown}");
    assert!(
        shown["placement"]
            .as_str()
            .is_some_and(|w| w.contains("the one holding most of the image")),
        "{shown}"
    );
    for ws in ["counter", "counter2", "busy"] {
        warren.ok("admin", &["ws", "rm", ws]);
    }
}

/// `warren up` killed (SIGKILL) at each step of a prebuild — the fetch, a build step, the
/// checkout, a prebuild task, the store, the trace's recording — is started again: the
/// prebuild is redone and succeeds, and no sandbox of the killed run outlives it (the agent
/// removes sandboxes whose process is gone before it takes a job).
#[test]
fn a_prebuild_killed_at_any_step_leaves_no_sandbox_behind() {
    enter_own_network();
    let mut warren = Warren::up_with_admin(26, None);
    warren.import_image(&debian_rootfs(DebianRootfs::Git), "debian:bookworm");
    let repos = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    std::fs::write(
        source.path().join("warren.yml"),
        "image:\n  file: Dockerfile\ntasks:\n  - name: web\n    prebuild: sleep 3 && echo made > made.txt\n    workspace: sleep 600\n",
    )
    .unwrap();
    let dockerfile =
        |round: usize| format!("FROM debian:bookworm\nRUN sleep 3 && echo {round} > /round\n");
    std::fs::write(source.path().join("Dockerfile"), dockerfile(0)).unwrap();
    let (repo, url) = repository(repos.path(), "app", source.path());
    warren.ok("admin", &["project", "add", "app", &url]);
    let steps = [
        "fetching",
        "[0] line 2",
        "checking out",
        "prebuild task web",
        "storing",
        "recording the first start",
    ];
    for (round, step) in steps.into_iter().enumerate() {
        // A new commit with a new build step: nothing of it is cached.
        if round > 0 {
            std::fs::write(repo.join("Dockerfile"), dockerfile(round)).unwrap();
            commit_all(&repo, &format!("round {round}"));
            warren.ok("admin", &["project", "branches", "app", "--refresh"]);
        }
        let commit = git(&repo, &["rev-parse", "HEAD"]);
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let running = prebuilds(&warren, "app")
                .into_iter()
                .find(|p| p["commit"] == commit.as_str());
            if let Some(pb) = running {
                let id = pb["id"].as_str().unwrap();
                let log = warren.ok("admin", &["prebuild", "logs", id]);
                if log.contains(step) {
                    break;
                }
                assert!(
                    matches!(pb["state"].as_str(), Some("queued" | "running")),
                    "round {round}: the prebuild ended before `{step}`: {pb}\n{log}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: `{step}` never came"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        warren.kill9();
        assert!(warren.start().is_none(), "the admin is made only once");
        let pb = prebuild_of(&warren, "app", &commit);
        assert_eq!(pb["state"], "succeeded", "round {round} (`{step}`): {pb}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = json(&warren.ok("admin", &["runtime", "ls", "--json"]));
            let left: Vec<String> = listed
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|w| w["config"]["id"].as_str().map(str::to_owned))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} (`{step}`): sandboxes outlived their prebuild: {left:?}\n{}",
                warren.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
