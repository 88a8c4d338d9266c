//! The web UI in a real browser: Debian's Chromium, headless, driven through chromedriver
//! (WebDriver) against a real `warren up` with a real prebuild. A user signs in, makes a
//! workspace from the prebuild by clicking, sees it turn running without reloading, reads its
//! task's live output, stops and starts it; another user sees none of it and gets 404 on its
//! pages; a request without the page's CSRF token is refused.
//!
//! The screenshots it takes are written to `docs/screenshots/` when
//! `WARREN_UPDATE_SCREENSHOTS=1` (the README shows them), else to a temporary folder.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Warren;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use warren_testkit::{DebianRootfs, debian_rootfs, enter_own_network, free_port, git};

/// chromedriver on a port of its own, killed at the end with every browser it started (its
/// process group: a test that fails midway leaves no Chromium behind).
struct Driver(Child, u16);

impl Driver {
    fn start() -> Self {
        use std::os::unix::process::CommandExt as _;
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (`./dev deps` installs chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self(child, port)
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,860"],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.1))
            .await
            .expect("chromium starts under chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(group) = i32::try_from(self.0.id()) {
            // SAFETY: a signal to the process group this test made; no memory is involved.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.0.wait();
    }
}

fn screenshots() -> PathBuf {
    if std::env::var_os("WARREN_UPDATE_SCREENSHOTS").is_some() {
        let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap();
        Path::new(&manifest).join("../../docs/screenshots")
    } else {
        std::env::temp_dir().join(format!("warren-ui-{}", std::process::id()))
    }
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{name}");
    let dir = screenshots();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Waits for `script` (the body of a function) to return true in the page.
async fn until(browser: &Client, what: &str, limit: Duration, script: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let answer = browser.execute(script, vec![]).await.unwrap();
        if answer == Value::Bool(true) {
            return;
        }
        let page = browser
            .execute("return document.body.innerText", vec![])
            .await
            .unwrap();
        assert!(Instant::now() < deadline, "{what} never happened: {page}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Fills the sign-in form and sends it (the answer may refuse).
async fn send_sign_in(browser: &Client, url: &str, user: &str, password: &str) {
    browser.goto(&format!("{url}/login")).await.unwrap();
    let form = browser.find(Locator::Css("form.signin")).await.unwrap();
    for (field, value) in [("user", user), ("password", password)] {
        let input = form
            .find(Locator::Css(&format!("input[name={field}]")))
            .await
            .unwrap();
        input.send_keys(value).await.unwrap();
    }
    let submit = form
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap();
    submit.click().await.unwrap();
}

async fn sign_in(browser: &Client, url: &str, user: &str, password: &str) {
    send_sign_in(browser, url, user, password).await;
    browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("#workspace-rows"))
        .await
        .unwrap();
}

/// A task serving HTTP on port 8000 inside the workspace (one process per connection): a
/// page naming the path it was asked for, or, for a request that asks to upgrade, `101` and
/// then `echo: ` before whatever it reads.
const SITE: &str = r#"  - name: site
    workspace: |
      exec perl -MIO::Socket::INET -e '
        $SIG{CHLD} = "IGNORE";
        my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1:8000", Listen => 16, ReuseAddr => 1) or die "listen: $!";
        print "site listens on 8000\n";
        while (my $c = $s->accept) {
          next if fork();
          my ($path) = <$c> =~ m{^\S+ (\S+)};
          my ($up, $cookie) = (0, "");
          while (my $h = <$c>) { last if $h =~ /^\r?\n$/; $up = 1 if $h =~ /^upgrade:/i; $cookie .= $h if $h =~ /^cookie:/i; }
          if ($up) {
            print $c "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n";
            while (sysread($c, my $piece, 4096)) { syswrite($c, "echo: $piece"); }
            exit 0;
          }
          my $body = "<h1>hello from the workspace</h1><p>path $path</p><p>$cookie</p>";
          print $c "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: " . length($body) . "\r\nConnection: close\r\n\r\n$body";
          exit 0;
        }'
ports:
  - port: 8000
    label: site
"#;

/// Chooses who may open port 8000 on the workspace's page, and waits for the answer.
async fn choose_access(browser: &Client, access: &str) {
    browser
        .execute(
            "document.getElementById('ports').dataset.before = 'yes'; return true;",
            vec![],
        )
        .await
        .unwrap();
    let select = browser
        .find(Locator::Css("tr[data-port='8000'] select"))
        .await
        .unwrap();
    select.select_by_value(access).await.unwrap();
    let swapped = format!(
        "const ports = document.getElementById('ports'); \
         return !ports.dataset.before && ports.querySelector('select').value === '{access}';"
    );
    until(
        browser,
        "the port's new access",
        Duration::from_secs(10),
        &swapped,
    )
    .await;
}

/// `GET url` without any cookie: the status and the body.
fn http_get(url: &str) -> (u16, String) {
    use std::io::Read;
    let mut stream = send_get(url, "Connection: close");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Connects to `url`'s host and sends `GET` for its path with `Host` and `headers` (CRLF
/// separated, without the last one); the answer is the caller's to read.
fn send_get(url: &str, headers: &str) -> std::net::TcpStream {
    use std::io::Write;
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(loopback(host)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n\r\n"
    )
    .unwrap();
    stream
}

/// `name.localhost:port` as this process reaches it (browsers resolve every `*.localhost`
/// to loopback; the C library need not).
fn loopback(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if name.ends_with(".localhost") => format!("127.0.0.1:{port}"),
        _ => host.to_owned(),
    }
}

/// Asks `url` to upgrade, writes `line` into the upgraded connection and returns what came
/// back.
fn upgraded_echo(url: &str, line: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = send_get(url, "Connection: Upgrade\r\nUpgrade: echo");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "the upgrade's head ended early: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(line.as_bytes()).unwrap();
    let mut echoed = vec![0u8; 64];
    let n = stream.read(&mut echoed).unwrap();
    String::from_utf8_lossy(&echoed[..n]).into_owned()
}

/// Whether the list's live rows have had their first events (until then a row may be
/// replaced by the same row, which WebDriver sees as a stale element).
const SYNCED: &str = "return document.getElementById('workspace-rows').dataset.synced === 'true';";

/// The state its pill shows, for the workspace's row.
fn state_is(name: &str, state: &str) -> String {
    format!(
        "const row = document.querySelector('tr[data-name=\"{name}\"]'); \
         return !!row && row.querySelector('.pill').dataset.state === '{state}';"
    )
}

#[test]
fn a_user_works_with_a_workspace_in_the_browser_and_another_sees_none_of_it() {
    enter_own_network();
    let mut warren = Warren::new(53, None);
    // Host-based previews: Chromium resolves every `*.localhost` to loopback.
    warren
        .env
        .push(("WARREN_PREVIEW_DOMAIN".into(), "localhost".into()));
    let admin_password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &admin_password);
    warren.import_image(&debian_rootfs(DebianRootfs::Git), "debian:bookworm");
    warren.add_user("bob");
    // A project whose `main` is prebuilt, with a task that prints a line.
    let repos = tempfile::tempdir().unwrap();
    let repo = repos.path().join("app");
    let example = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
        .join("../../examples/warren-app");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&example)
            .arg(&repo)
            .status()
            .unwrap()
            .success()
    );
    // A second task serves HTTP on the workspace's loopback (and echoes an upgraded
    // connection), for its preview URL.
    let env_file = repo.join("warren.yml");
    let env = std::fs::read_to_string(&env_file).unwrap();
    std::fs::write(&env_file, format!("{env}{SITE}")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let url = format!("file://{}", repo.display());
    warren.ok("admin", &["project", "add", "app", &url]);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list: Value =
            serde_json::from_str(&warren.ok("admin", &["prebuild", "ls", "app", "--json"]))
                .unwrap();
        match list[0]["state"].as_str() {
            Some("succeeded") => break,
            Some("failed" | "cancelled") => panic!("the prebuild ended: {list}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "the prebuild never ended");
        std::thread::sleep(Duration::from_millis(500));
    }

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let site = warren.url();
        let browser = driver.browser().await;

        // Signing in: a wrong password is refused on the page.
        browser.goto(&format!("{site}/")).await.unwrap();
        browser
            .wait()
            .for_element(Locator::Css("form.signin"))
            .await
            .unwrap();
        screenshot(&browser, "sign-in").await;
        send_sign_in(&browser, &site, "admin", "wrong").await;
        let refused = browser
            .wait()
            .for_element(Locator::Css("form.signin .error"))
            .await
            .unwrap();
        assert!(refused.text().await.unwrap().contains("wrong user name or password"));
        sign_in(&browser, &site, "admin", &admin_password).await;
        let cookie = browser.get_named_cookie("warren_session").await.unwrap();
        assert_eq!(cookie.http_only(), Some(true));
        assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");

        // A workspace from the branch's prebuild, by clicking.
        browser.find(Locator::Css("#new-workspace")).await.unwrap().click().await.unwrap();
        let dialog = browser.find(Locator::Css("dialog#new form")).await.unwrap();
        dialog.find(Locator::Css("input[name=name]")).await.unwrap().send_keys("web").await.unwrap();
        let source = dialog.find(Locator::Css("select[name=source]")).await.unwrap();
        let option = source
            .find(Locator::Css("option[value^='project:']"))
            .await
            .unwrap();
        assert!(
            option.text().await.unwrap().contains("app / main — ready"),
            "{}",
            option.text().await.unwrap()
        );
        option.click().await.unwrap();
        dialog
            .find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(&browser, "the new row", Duration::from_secs(30), "return !!document.querySelector('tr[data-name=\"web\"]');").await;
        until(&browser, "the list's first events", Duration::from_secs(10), SYNCED).await;
        // From here on the page is not reloaded: the mark stays while the state changes.
        browser.execute("window.stayed = true; return true;", vec![]).await.unwrap();
        until(&browser, "web running", Duration::from_secs(180), &state_is("web", "running")).await;
        let stayed = browser.execute("return window.stayed === true;", vec![]).await.unwrap();
        assert_eq!(stayed, Value::Bool(true), "the page was reloaded");
        let row = browser.find(Locator::Css("tr[data-name=web]")).await.unwrap();
        let text = row.text().await.unwrap();
        assert!(text.contains("app / main @"), "{text}");
        let ssh = row.find(Locator::Css("[data-copy]")).await.unwrap().attr("data-copy").await.unwrap().unwrap_or_default();
        let expected = format!("ssh -p {} web@", warren.ssh_port);
        assert!(ssh.starts_with(&expected), "{ssh}");
        let vscode = row.find(Locator::Css("a.button")).await.unwrap().attr("href").await.unwrap();
        assert_eq!(vscode.as_deref(), Some("vscode://vscode-remote/ssh-remote+web.warren/root"));
        screenshot(&browser, "workspaces").await;

        // Its page: the task's output, live.
        let link = row.find(Locator::Css("td.name a")).await.unwrap();
        let page = link.attr("href").await.unwrap().unwrap();
        link.click().await.unwrap();
        let tab = browser
            .wait()
            .for_element(Locator::XPath("//button[@data-tab][starts-with(normalize-space(.), 'counter')]"))
            .await
            .unwrap();
        tab.click().await.unwrap();
        until(&browser, "the task's line", Duration::from_secs(60),
            "const log = [...document.querySelectorAll('pre.log')].find(l => !l.hidden); \
             return !!log && log.textContent.includes('counter starts at 100');").await;
        screenshot(&browser, "workspace").await;

        // Its port, private: its owner opens the preview on a host (an origin) of its own;
        // nobody else gets anything.
        let id = page.trim_start_matches("/workspaces/").to_owned();
        let link = browser
            .wait()
            .for_element(Locator::Css("tr[data-port='8000'] a"))
            .await
            .unwrap();
        let opener = link.attr("href").await.unwrap().unwrap();
        assert_eq!(opener, format!("/previews/{id}/8000"));
        let preview = link.attr("data-url").await.unwrap().unwrap();
        assert_eq!(
            preview,
            format!("http://8000-{id}.localhost:{}/", warren.preview_port)
        );
        let label = browser.find(Locator::Css("tr[data-port='8000']")).await.unwrap();
        assert!(label.text().await.unwrap().contains("site"));
        // Without the ticket the UI hands out, not even its owner's browser is let in.
        browser.goto(&format!("{preview}hello")).await.unwrap();
        let shown = browser.find(Locator::Css("body")).await.unwrap().text().await.unwrap();
        assert!(shown.contains("no preview here"), "{shown}");
        browser.goto(&format!("{site}{opener}")).await.unwrap();
        let shown = browser.find(Locator::Css("body")).await.unwrap().text().await.unwrap();
        assert!(shown.contains("hello from the workspace") && shown.contains("path /"), "{shown}");
        browser.goto(&format!("{preview}hello?x=1")).await.unwrap();
        let shown = browser.find(Locator::Css("body")).await.unwrap().text().await.unwrap();
        assert!(shown.contains("hello from the workspace") && shown.contains("path /hello?x=1"), "{shown}");
        assert!(!shown.contains("warren_"), "the workspace saw a cookie of Warren's: {shown}");
        assert_eq!(http_get(&format!("{preview}hello")).0, 404);
        browser.goto(&format!("{preview}a%20b/")).await.unwrap();
        let shown = browser.find(Locator::Css("body")).await.unwrap().text().await.unwrap();
        assert!(shown.contains("path /a%20b/"), "the path was not passed as sent: {shown}");
        // Anyone signed in: still not the anonymous; public: anyone.
        browser.goto(&format!("{site}{page}")).await.unwrap();
        choose_access(&browser, "users").await;
        assert_eq!(http_get(&format!("{preview}hello")).0, 404);
        choose_access(&browser, "public").await;
        let (status, body) = http_get(&format!("{preview}hello"));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("hello from the workspace"), "{body}");
        assert_eq!(upgraded_echo(&format!("{preview}socket"), "ping"), "echo: ping");
        // A public port is also served path-based (one origin for all, so public ones only).
        let by_path = format!("http://127.0.0.1:{}/preview/admin/web/8000/", warren.preview_port);
        let (status, body) = http_get(&format!("{by_path}there"));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("path /there"), "{body}");
        assert_eq!(upgraded_echo(&format!("{by_path}socket"), "pong"), "echo: pong");

        // A request without the page's CSRF token changes nothing.
        let status = browser
            .execute_async(
                "const done = arguments[arguments.length - 1]; \
                 fetch(`/workspaces/${arguments[0]}/stop`, {method: 'POST'}).then(r => done(r.status));",
                vec![json!(id)],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(403));
        let forged = browser
            .execute_async(
                "const done = arguments[arguments.length - 1]; \
                 fetch(`/workspaces/${arguments[0]}/stop`, {method: 'POST', headers: {'X-CSRF-Token': 'guess'}}).then(r => done(r.status));",
                vec![json!(id)],
            )
            .await
            .unwrap();
        assert_eq!(forged, json!(403));
        tokio::time::sleep(Duration::from_secs(2)).await;
        until(&browser, "web still running", Duration::from_secs(1), &state_is("web", "running")).await;

        // Stop and start from its row.
        browser.goto(&format!("{site}/")).await.unwrap();
        until(&browser, "the list's first events", Duration::from_secs(10), SYNCED).await;
        browser.execute("window.stayed = true; return true;", vec![]).await.unwrap();
        let stop = browser.find(Locator::Css("tr[data-name=web] button[hx-post$='/stop']")).await.unwrap();
        stop.click().await.unwrap();
        until(&browser, "web stopped", Duration::from_secs(120), &state_is("web", "stopped")).await;
        let start = browser.find(Locator::Css("tr[data-name=web] button[hx-post$='/start']")).await.unwrap();
        start.click().await.unwrap();
        until(&browser, "web running again", Duration::from_secs(180), &state_is("web", "running")).await;
        let stayed = browser.execute("return window.stayed === true;", vec![]).await.unwrap();
        assert_eq!(stayed, Value::Bool(true), "the page was reloaded");

        // Signing out ends the session: its pages ask to sign in again.
        browser.find(Locator::Css("header button")).await.unwrap().click().await.unwrap();
        browser.wait().for_element(Locator::Css("form.signin")).await.unwrap();
        browser.goto(&format!("{site}{page}")).await.unwrap();
        browser.wait().for_element(Locator::Css("form.signin")).await.unwrap();

        // Another user sees none of it, and its page is 404 for them; so is the preview again
        // once it is private (in this same browser: signing out ended the owner's grant), and
        // the path-based one.
        warren.ok("admin", &["ws", "port", "web", "8000", "private"]);
        assert_eq!(http_get(&format!("{by_path}there")).0, 404);
        sign_in(&browser, &site, "bob", "bob-password").await;
        browser.goto(&format!("{preview}hello")).await.unwrap();
        let shown = browser.find(Locator::Css("body")).await.unwrap().text().await.unwrap();
        assert!(shown.contains("no preview here"), "{shown}");
        browser.goto(&format!("{site}{opener}")).await.unwrap();
        let shown = browser.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
        assert!(shown.contains("404"), "{shown}");
        browser.goto(&format!("{site}/")).await.unwrap();
        let rows = browser.find_all(Locator::Css("#workspace-rows tr")).await.unwrap();
        assert!(rows.is_empty(), "bob sees {} rows", rows.len());
        browser.goto(&format!("{site}{page}")).await.unwrap();
        let body = browser.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
        assert!(body.contains("404") && body.contains("no workspace"), "{body}");
        let status = browser
            .execute_async(
                "const done = arguments[arguments.length - 1]; \
                 fetch(arguments[0]).then(r => done(r.status));",
                vec![json!(format!("{page}/tasks/counter/events"))],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(404));
        browser.close().await.unwrap();
    });
    // What the browser did went through the API's own rules: the workspace is there, running.
    let listed = warren.ok("admin", &["ws", "ls"]);
    assert!(
        listed.contains("web") && listed.contains("running"),
        "{listed}"
    );
}
