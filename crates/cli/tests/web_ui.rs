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
        // VS Code opens the project's checkout.
        assert_eq!(vscode.as_deref(), Some("vscode://vscode-remote/ssh-remote+web.warren/workspace"));
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

/// Clicks the element `css` finds (again, if a live part of the page replaced it meanwhile).
async fn click(browser: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clicked = match browser.find(Locator::Css(css)).await {
            Ok(element) => element.click().await,
            Err(e) => Err(e),
        };
        match clicked {
            Ok(()) => return,
            Err(e) => assert!(Instant::now() < deadline, "cannot click {css}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks `css`, whose `hx-confirm` asks first, and says yes.
async fn click_and_confirm(browser: &Client, css: &str) {
    click(browser, css).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.accept_alert().await.is_err() {
        assert!(Instant::now() < deadline, "{css} asked nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types `value` into the field `name` of the form `css` finds.
async fn fill(browser: &Client, form: &str, name: &str, value: &str) {
    let Ok(field) = browser
        .find(Locator::Css(&format!("{form} [name={name}]")))
        .await
    else {
        let page = browser
            .execute("return document.body.innerText", vec![])
            .await
            .unwrap();
        panic!("no field {name} in {form}: {page}");
    };
    field.send_keys(value).await.unwrap();
}

async fn text_of(browser: &Client, css: &str) -> String {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `true` once the page's text holds `text`.
fn page_has(text: &str) -> String {
    format!("return document.body.innerText.includes({});", json!(text))
}

/// A project's prebuilds as `warren prebuild ls --json` lists them.
fn prebuilds(warren: &Warren) -> Vec<Value> {
    let listed = warren.ok("admin", &["prebuild", "ls", "app", "--json"]);
    serde_json::from_str::<Value>(&listed)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The rest of the UI in the browser: a project added by clicking (its webhook URL shown
/// once and working), its branches with their latest prebuilds, a prebuild's steps (run and
/// cached) and live log, Cancel and Retry; settings (an SSH key proven and removed, a secret
/// that is never shown, an API token shown once that works until revoked); the admin page
/// (users, hosts with their load, jobs with failures first; 404 for anyone else); and a
/// workspace's job timeline with its error and Retry.
#[test]
fn projects_prebuilds_settings_and_admin_work_in_the_browser() {
    enter_own_network();
    let mut warren = Warren::new(56, None);
    let admin_password = warren.start().expect("a first start creates the admin");
    warren.login("admin", &admin_password);
    let rootfs = debian_rootfs(DebianRootfs::Git);
    warren.import_image(&rootfs, "debian:bookworm");
    warren.add_user("bob");
    // `main` prebuilds in a few seconds; `broken` fails to build; `slow` (pushed later) has a
    // prebuild task that waits, to be cancelled.
    let repos = tempfile::tempdir().unwrap();
    let repo = repos.path().join("app");
    std::fs::create_dir_all(&repo).unwrap();
    let env = |task: &str| {
        format!(
            "image:\n  file: Dockerfile\ntasks:\n  - name: web\n    prebuild: {task}\n    workspace: sleep 600\n"
        )
    };
    std::fs::write(
        repo.join("Dockerfile"),
        "FROM debian:bookworm\nRUN echo one > /one\n",
    )
    .unwrap();
    std::fs::write(repo.join("warren.yml"), env("echo prebuild-says-hello")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    git(&repo, &["checkout", "-q", "-b", "broken"]);
    std::fs::write(
        repo.join("Dockerfile"),
        "FROM debian:bookworm\nRUN echo broken-step && exit 3\n",
    )
    .unwrap();
    git(&repo, &["commit", "-q", "-am", "broken"]);
    git(&repo, &["checkout", "-q", "main"]);
    let url = format!("file://{}", repo.display());

    // A workspace whose start fails: its image is gone (every try says so, then it fails).
    warren.import_image(&rootfs, "short:1");
    warren.ok("admin", &["ws", "create", "brief", "--image", "short:1"]);
    warren.ok("admin", &["ws", "stop", "brief"]);
    warren.ok("admin", &["image", "rm", "short:1"]);
    warren.ok("admin", &["ws", "start", "brief", "--no-wait"]);

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let site = warren.url();
        let browser = driver.browser().await;
        sign_in(&browser, &site, "admin", &admin_password).await;

        // A project, by clicking: its webhook URL is shown once, and works.
        browser.goto(&format!("{site}/projects")).await.unwrap();
        click(&browser, "#add-project").await;
        let form = "dialog#add form";
        fill(&browser, form, "name", "app").await;
        fill(&browser, form, "git_url", &url).await;
        click(&browser, &format!("{form} button[type=submit]")).await;
        let webhook = browser
            .wait()
            .for_element(Locator::Css("#webhook"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(webhook.starts_with(&format!("{site}/api/v1/hooks/git/")) && webhook.contains("?secret="), "{webhook}");
        let (status, answer) = warren.http("POST", webhook.strip_prefix(&site).unwrap(), None, None);
        assert_eq!(status, 204, "{answer}");
        click(&browser, ".added a.button[href^='/projects/']").await;
        until(&browser, "the two branches", Duration::from_secs(60),
            "return document.querySelectorAll('#branches tr[data-branch]').length === 2;").await;
        let shown = browser.execute("return document.documentElement.outerHTML;", vec![]).await.unwrap();
        assert!(!shown.as_str().unwrap().contains("secret="), "the webhook's secret is shown again");
        // A URL's login is never shown back, on a page or by the API.
        warren.ok("admin", &["project", "add", "creds", "https://bob:hunter2@127.0.0.1:9/r.git"]);
        browser.goto(&format!("{site}/projects")).await.unwrap();
        let shown = browser.execute("return document.documentElement.outerHTML;", vec![]).await.unwrap();
        assert!(shown.as_str().unwrap().contains("127.0.0.1:9/r.git"), "{shown}");
        assert!(!shown.as_str().unwrap().contains("hunter2"), "a URL's password is shown");
        assert!(!warren.ok("admin", &["project", "ls", "--json"]).contains("hunter2"));
        browser.goto(&format!("{site}/projects/app")).await.unwrap();

        // `main`'s prebuild: its steps as they run, then the one that ran; its log, live.
        let deadline = Instant::now() + Duration::from_secs(60);
        let main = loop {
            if let Some(p) = prebuilds(&warren).into_iter().find(|p| p["branch"] == "main") {
                break p["id"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "main was never prebuilt");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        browser.goto(&format!("{site}/prebuilds/{main}")).await.unwrap();
        browser.execute("window.stayed = true; return true;", vec![]).await.unwrap();
        until(&browser, "main's prebuild succeeded", Duration::from_secs(600),
            "return document.getElementById('prebuild-state').textContent === 'succeeded';").await;
        until(&browser, "its steps' end", Duration::from_secs(30),
            "return document.getElementById('steps').dataset.state === 'succeeded';").await;
        let stayed = browser.execute("return window.stayed === true;", vec![]).await.unwrap();
        assert_eq!(stayed, Value::Bool(true), "the page was reloaded");
        let log = text_of(&browser, "#prebuild-log").await;
        assert!(log.contains("prebuild-says-hello"), "{log}");
        let steps: Value = browser
            .execute("return [...document.querySelectorAll('#steps li')].map(li => [li.textContent, li.classList.contains('cached')]);", vec![])
            .await
            .unwrap();
        let steps = steps.as_array().unwrap();
        let step = |title: &str| steps.iter().find(|s| s[0].as_str().unwrap().starts_with(title)).cloned();
        assert_eq!(step("[0] line 2: RUN echo one"), Some(json!(["[0] line 2: RUN echo one > /one", false])), "{steps:?}");
        assert!(step("prebuild task web").is_some() && step("storing ").is_some(), "{steps:?}");
        screenshot(&browser, "prebuild").await;

        // A branch pushed now is read at once from the project's page, and prebuilt.
        git(&repo, &["checkout", "-q", "-b", "slow", "main"]);
        std::fs::write(repo.join("warren.yml"), env("echo slow-starts && sleep 600")).unwrap();
        git(&repo, &["commit", "-q", "-am", "slow"]);
        browser.goto(&format!("{site}/projects/app")).await.unwrap();
        click(&browser, "button[hx-post$='/refresh']").await;
        until(&browser, "the new branch", Duration::from_secs(60),
            "return !!document.querySelector('#branches tr[data-branch=slow] .pill');").await;

        // `slow`'s: cancelled while its task runs, then retried; the build step that `main`
        // ran comes from the cache.
        click(&browser, "tr[data-branch=slow] a.prebuild-link").await;
        let slow = prebuilds(&warren).into_iter().find(|p| p["branch"] == "slow").unwrap();
        let slow = slow["id"].as_str().unwrap().to_owned();
        until(&browser, "slow's page", Duration::from_secs(10),
            &format!("return location.pathname === '/prebuilds/{slow}';")).await;
        until(&browser, "slow's task", Duration::from_secs(600), &page_has("slow-starts")).await;
        click_and_confirm(&browser, "#summary button[hx-post$='/cancel']").await;
        until(&browser, "slow cancelled", Duration::from_secs(60),
            "return document.getElementById('prebuild-state').textContent === 'cancelled';").await;
        until(&browser, "its steps' end", Duration::from_secs(30),
            "return document.getElementById('steps').dataset.state === 'cancelled';").await;
        click(&browser, "#summary button[hx-post$='/retry']").await;
        until(&browser, "the new prebuild's page", Duration::from_secs(30),
            &format!("return !location.pathname.endsWith({}) && !!document.getElementById('prebuild-state');", json!(slow))).await;
        until(&browser, "the retry's task", Duration::from_secs(600), &page_has("slow-starts")).await;
        let cached: Value = browser
            .execute("return [...document.querySelectorAll('#steps li.cached')].map(li => li.textContent);", vec![])
            .await
            .unwrap();
        assert!(cached.as_array().unwrap().iter().any(|s| s.as_str().unwrap().starts_with("[0] line 2:")), "{cached}");
        click_and_confirm(&browser, "#summary button[hx-post$='/cancel']").await;
        until(&browser, "the retry cancelled", Duration::from_secs(60),
            "return document.getElementById('prebuild-state').textContent === 'cancelled';").await;

        // The project's page: each branch with its latest prebuild (`broken`'s failed).
        let deadline = Instant::now() + Duration::from_secs(600);
        while !prebuilds(&warren).iter().any(|p| p["branch"] == "broken" && p["state"] == "failed") {
            assert!(Instant::now() < deadline, "broken never failed: {:?}", prebuilds(&warren));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        browser.goto(&format!("{site}/projects/app")).await.unwrap();
        let broken_row = text_of(&browser, "tr[data-branch=broken]").await;
        assert!(broken_row.contains("failed"), "{broken_row}");
        let main_row = text_of(&browser, "tr[data-branch=main]").await;
        assert!(main_row.contains("succeeded"), "{main_row}");
        let slow_row = text_of(&browser, "tr[data-branch=slow]").await;
        assert!(slow_row.contains("cancelled"), "{slow_row}");
        screenshot(&browser, "project").await;

        // Settings: a variable, a secret whose value is never shown, an API token shown
        // once that works until it is revoked, and an SSH key proven and removed.
        browser.goto(&format!("{site}/settings")).await.unwrap();
        let vars = "#variables form";
        fill(&browser, vars, "name", "GREETING").await;
        fill(&browser, vars, "value", "hello").await;
        click(&browser, &format!("{vars} button")).await;
        until(&browser, "the variable", Duration::from_secs(10), "return !!document.querySelector('tr[data-var=GREETING]');").await;
        fill(&browser, vars, "name", "API_KEY").await;
        fill(&browser, vars, "value", "s3cret-value").await;
        click(&browser, &format!("{vars} input[name=secret]")).await;
        click(&browser, &format!("{vars} button")).await;
        until(&browser, "the secret", Duration::from_secs(10), "return !!document.querySelector('tr[data-var=API_KEY]');").await;
        let secret = text_of(&browser, "tr[data-var=API_KEY]").await;
        assert!(secret.contains("secret · 12 characters"), "{secret}");
        let listed = warren.ok("admin", &["env", "ls", "--json"]);
        assert!(listed.contains("GREETING") && listed.contains("hello") && !listed.contains("s3cret"), "{listed}");

        let tokens = "#tokens form";
        fill(&browser, tokens, "name", "ci").await;
        click(&browser, &format!("{tokens} button")).await;
        let token = browser.wait().for_element(Locator::Css("#new-token")).await.unwrap().text().await.unwrap();
        assert!(token.starts_with("wrn_"), "{token}");
        let (status, me) = warren.http("GET", "/api/v1/me", Some(&token), None);
        assert_eq!((status, me["name"].as_str()), (200, Some("admin")), "{me}");

        // A key: a wrong proof is refused; the right one adds it, with its fingerprint.
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("id_ed25519");
        assert!(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap().success());
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let form = "#keys form";
        fill(&browser, form, "name", "laptop").await;
        fill(&browser, form, "public_key", public.trim()).await;
        fill(&browser, form, "signature", "-----BEGIN SSH SIGNATURE-----\nnope\n-----END SSH SIGNATURE-----").await;
        click(&browser, &format!("{form} button[type=submit]")).await;
        until(&browser, "the refusal", Duration::from_secs(10),
            "const slot = document.querySelector('#keys [data-errors]'); return !!slot && slot.textContent.includes('signature');").await;
        let sign = text_of(&browser, "code.command").await;
        let sign = sign.replace("~/.ssh/id_ed25519", key.to_str().unwrap());
        let signed = Command::new("sh").args(["-c", &sign]).output().unwrap();
        assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
        let signature = String::from_utf8(signed.stdout).unwrap();
        browser.find(Locator::Css(&format!("{form} [name=signature]"))).await.unwrap().clear().await.unwrap();
        fill(&browser, form, "signature", &signature).await;
        click(&browser, &format!("{form} button[type=submit]")).await;
        until(&browser, "the key", Duration::from_secs(10), "return !!document.querySelector('tr[data-key=laptop]');").await;
        let fingerprint = Command::new("ssh-keygen").arg("-lf").arg(key.with_extension("pub")).output().unwrap();
        let fingerprint = String::from_utf8(fingerprint.stdout).unwrap();
        let fingerprint = fingerprint.split_whitespace().nth(1).unwrap();
        let row = text_of(&browser, "tr[data-key=laptop]").await;
        assert!(row.contains(fingerprint), "{row} lacks {fingerprint}");
        screenshot(&browser, "settings").await;
        // Reloaded, the token is not shown again; revoked, it stops working.
        browser.refresh().await.unwrap();
        let shown = browser.execute("return document.documentElement.outerHTML;", vec![]).await.unwrap();
        assert!(!shown.as_str().unwrap().contains(&token), "the token is shown again");
        assert!(!shown.as_str().unwrap().contains("s3cret-value"), "the secret is shown");
        click_and_confirm(&browser, "#tokens tr[data-name=ci] button.danger").await;
        until(&browser, "the token revoked", Duration::from_secs(10), "return !document.querySelector('#tokens tr[data-name=ci]');").await;
        assert_eq!(warren.http("GET", "/api/v1/me", Some(&token), None).0, 401);
        click_and_confirm(&browser, "tr[data-key=laptop] button.danger").await;
        until(&browser, "the key removed", Duration::from_secs(10), "return !document.querySelector('tr[data-key=laptop]');").await;
        assert!(!warren.ok("admin", &["key", "ls"]).contains("laptop"));

        // The workspace whose start failed: its timeline says why, and Retry (its image back)
        // starts it.
        browser.goto(&format!("{site}/workspaces/brief")).await.unwrap();
        until(&browser, "brief failed", Duration::from_secs(180),
            "return !!document.querySelector('#jobs button.retry');").await;
        let timeline = text_of(&browser, "#jobs").await;
        assert!(timeline.contains("start") && timeline.contains("image short:1 not found"), "{timeline}");
        warren.import_image(&rootfs, "short:1");
        click(&browser, "#jobs button.retry").await;
        until(&browser, "brief running", Duration::from_secs(180), &state_is("brief", "running")).await;
        until(&browser, "the retried start in the timeline", Duration::from_secs(30),
            "return [...document.querySelectorAll('#jobs tr.job')].some(r => r.textContent.includes('start') && r.textContent.includes('done'));").await;

        // The admin page: users (one added here), the host with its load, and the failed
        // jobs first.
        let hosts = warren.ok("admin", &["host", "ls"]);
        assert!(hosts.contains("LOAD") && hosts.contains("CPUS"), "{hosts}");
        warren.ok("admin", &["job", "ls"]);
        browser.goto(&format!("{site}/admin")).await.unwrap();
        let users = "#users form";
        fill(&browser, users, "name", "carol").await;
        fill(&browser, users, "password", "carol-password").await;
        click(&browser, &format!("{users} button")).await;
        until(&browser, "carol", Duration::from_secs(10), "return !!document.querySelector('tr[data-user=carol]');").await;
        assert!(text_of(&browser, "#users").await.contains("bob"));
        let host = text_of(&browser, "#hosts tbody tr").await;
        assert!(host.contains("just now") && host.contains(" CPUs") && host.contains("free of"), "{host}");
        let first = text_of(&browser, "#jobs tbody tr").await;
        assert!(first.contains("failed"), "{first}");
        screenshot(&browser, "admin").await;

        // Anyone else: no admin page, and none of these projects or prebuilds.
        browser.find(Locator::Css("header button")).await.unwrap().click().await.unwrap();
        browser.wait().for_element(Locator::Css("form.signin")).await.unwrap();
        sign_in(&browser, &site, "bob", "bob-password").await;
        assert!(text_of(&browser, "header").await.contains("Settings"));
        assert!(!text_of(&browser, "header").await.contains("Admin"));
        for page in ["/admin".to_owned(), "/projects/app".to_owned(), format!("/prebuilds/{main}")] {
            browser.goto(&format!("{site}{page}")).await.unwrap();
            let body = text_of(&browser, "main").await;
            assert!(body.contains("404"), "{page}: {body}");
        }
        browser.goto(&format!("{site}/projects")).await.unwrap();
        assert!(browser.find_all(Locator::Css("tr[data-name]")).await.unwrap().is_empty());
        browser.close().await.unwrap();
    });
    // What the browser did went through the API's own rules.
    assert!(warren.ok("admin", &["user", "ls"]).contains("carol"));
    let listed = warren.ok("admin", &["ws", "ls"]);
    assert!(
        listed.contains("brief") && listed.contains("running"),
        "{listed}"
    );
}
