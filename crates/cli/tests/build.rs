//! `warren build` as root against real sandboxes: a multi-stage Dockerfile with ARG, ENV,
//! WORKDIR, COPY (files, folders, here-documents, --from a stage, .dockerignore), RUN (shell,
//! exec and here-document forms) and CMD, checked inside a workspace of the result; and the
//! failures a user meets: a failing RUN names its line and shows the error's tail, a COPY out
//! of the context is refused.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;

use common::ok;
use warren_testkit::{DebianRootfs, debian_rootfs, enter_own_network, require_program};

mod common;

fn warren(data: &Path, args: &[&str]) -> Output {
    common::warren_at(data, args, &[("WARREN_UID_BASE", "2900000000")])
}

/// A data folder (under /var/tmp: sandboxes need a real filesystem) holding Debian's minbase
/// as `tag`, imported by `run`.
fn data_with_minbase(
    prefix: &str,
    run: &dyn Fn(&Path, &[&str]) -> Output,
    tag: &str,
) -> tempfile::TempDir {
    let data = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap();
    let rootfs = debian_rootfs(DebianRootfs::Minbase);
    ok(run(
        data.path(),
        &["image", "import", rootfs.to_str().unwrap(), tag],
    ));
    data
}

const DOCKERFILE: &str = r#"ARG GREETING=hello
FROM base:1 AS tools
RUN echo tool > /tool.txt

FROM base:1
ARG GREETING
ENV APP_HOME=/app
WORKDIR $APP_HOME
COPY app.txt ./
COPY conf/ /etc/app/
COPY --chmod=755 run.sh /usr/local/bin/run-app
COPY --from=tools /tool.txt /opt/tool.txt
COPY . /ctx/
COPY conf/*.conf run.s? /globbed/
COPY <<NOTE /etc/note.txt
made by $GREETING
NOTE
RUN echo "$GREETING from $(pwd)" > built.txt && cat app.txt >> built.txt
RUN ["/bin/sh", "-c", "echo exec-form > /exec.txt"]
RUN <<SCRIPT
set -e
echo heredoc > /heredoc.txt
SCRIPT
RUN <<INPUT tr a-z A-Z > /upper.txt
fed on stdin
INPUT
CMD ["cat", "/app/built.txt"]
"#;

#[test]
fn a_multi_stage_dockerfile_builds_in_the_sandbox() {
    enter_own_network();
    require_program("tar", "tar");
    let data = data_with_minbase("warren-build-", &warren, "base:1");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(ctx.path().join("app.txt"), "app\n").unwrap();
    std::fs::create_dir(ctx.path().join("conf")).unwrap();
    std::fs::write(ctx.path().join("conf/x.conf"), "x=1\n").unwrap();
    std::fs::write(ctx.path().join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::write(ctx.path().join("secret.txt"), "do not ship\n").unwrap();
    std::fs::write(ctx.path().join(".dockerignore"), "secret.txt\n").unwrap();
    let out = ok(warren(
        data.path(),
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "-t",
            "app:1",
            "--build-arg",
            "GREETING=hi",
        ],
    ));
    assert!(out.starts_with("built app:1 (sha256:"), "{out}");
    assert!(out.contains(": 13 steps run, 0 from the cache"), "{out}");
    // No sandbox is left behind.
    let listed = ok(warren(data.path(), &["runtime", "ls", "--json"]));
    assert_eq!(listed.trim(), "[]", "{listed}");

    ok(warren(
        data.path(),
        &["runtime", "run", "check", "--image", "app:1"],
    ));
    let inside = |cmd: &str| {
        ok(warren(
            data.path(),
            &["runtime", "exec", "check", "-T", "--", "sh", "-c", cmd],
        ))
    };
    assert_eq!(inside("cat /app/built.txt"), "hi from /app\napp\n");
    assert_eq!(
        inside("cat /etc/app/x.conf /opt/tool.txt /etc/note.txt"),
        "x=1\ntool\nmade by hi\n"
    );
    assert_eq!(
        inside("stat -c %a /usr/local/bin/run-app && run-app"),
        "755\nrun\n"
    );
    assert_eq!(
        inside("cat /exec.txt /heredoc.txt /upper.txt"),
        "exec-form\nheredoc\nFED ON STDIN\n"
    );
    assert_eq!(
        inside("ls /ctx | sort | tr '\\n' ' '"),
        "Dockerfile app.txt conf run.sh "
    );
    assert_eq!(
        inside("ls /globbed | sort | tr '\\n' ' '"),
        "run.sh x.conf "
    );
    let shown: serde_json::Value = common::json(warren(
        data.path(),
        &["image", "inspect", "app:1", "--json"],
    ));
    assert_eq!(
        shown["config"]["cmd"],
        serde_json::json!(["cat", "/app/built.txt"])
    );
    assert!(
        shown["config"]["env"].to_string().contains("APP_HOME=/app"),
        "{shown}"
    );
    ok(warren(data.path(), &["runtime", "rm", "-f", "check"]));

    // The step cache: nothing changed, nothing runs; a file copied late changed, only the
    // steps from its COPY on run again.
    let rebuild = || {
        ok(warren(
            data.path(),
            &[
                "build",
                ctx.path().to_str().unwrap(),
                "-t",
                "app:2",
                "--build-arg",
                "GREETING=hi",
            ],
        ))
    };
    let out = rebuild();
    assert!(out.contains(": 0 steps run, 13 from the cache"), "{out}");
    std::fs::write(ctx.path().join("run.sh"), "#!/bin/sh\necho run again\n").unwrap();
    let out = rebuild();
    assert!(out.contains(": 9 steps run, 4 from the cache"), "{out}");
    ok(warren(
        data.path(),
        &["runtime", "run", "check2", "--image", "app:2"],
    ));
    let again = ok(warren(
        data.path(),
        &["runtime", "exec", "check2", "-T", "--", "run-app"],
    ));
    assert_eq!(again, "run again\n");
    ok(warren(data.path(), &["runtime", "rm", "-f", "check2"]));

    // Failures name the line and say why.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM base:1\nRUN true\nRUN echo broken >&2; exit 3\n",
    )
    .unwrap();
    let out = warren(
        data.path(),
        &["build", ctx.path().to_str().unwrap(), "-t", "bad:1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Dockerfile:3:") && err.contains("exit 3") && err.contains("broken"),
        "{err}"
    );
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM base:1\nCOPY ../../etc/shadow /x\n",
    )
    .unwrap();
    let out = warren(
        data.path(),
        &["build", ctx.path().to_str().unwrap(), "-t", "bad:1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Dockerfile:2:") && err.contains("outside the build context"),
        "{err}"
    );
    std::os::unix::fs::symlink("/etc", ctx.path().join("etc-link")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM base:1\nCOPY etc-link/shadow /x\n",
    )
    .unwrap();
    let out = warren(
        data.path(),
        &["build", ctx.path().to_str().unwrap(), "-t", "bad:1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("goes through a symlink"), "{err}");
    let listed = ok(warren(data.path(), &["runtime", "ls", "--json"]));
    assert_eq!(
        listed.trim(),
        "[]",
        "a failed build leaves no sandbox: {listed}"
    );
}

/// Serves `body` to every HTTP request on 127.0.0.1 (for `ADD <url>`); its port.
fn serve(body: &'static [u8]) -> u16 {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(body);
        }
    });
    port
}

#[test]
fn mounts_add_chown_and_isolation_inside_run_steps() {
    enter_own_network();
    // `ADD <url>` below fetches from this test's loopback, which the egress policy refuses
    // unless an admin allows it.
    let run = |data: &Path, args: &[&str]| {
        common::warren_at(
            data,
            args,
            &[
                ("WARREN_UID_BASE", "3000000000"),
                ("WARREN_ALLOW_NETS", "127.0.0.1/32"),
            ],
        )
    };
    let data = data_with_minbase("warren-build-", &run, "base:1");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ctx.path().join("files")).unwrap();
    std::fs::write(ctx.path().join("files/a.txt"), "bound\n").unwrap();
    std::fs::write(ctx.path().join("plain.txt"), "plain\n").unwrap();
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(bundle.path().join("inner.txt"), "from the archive\n").unwrap();
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(ctx.path().join("bundle.tar.gz"))
        .arg("-C")
        .arg(bundle.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let body: &[u8] = b"remote body\n";
    let port = serve(body);
    let sum = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(body))
    };
    // A port on the host, where a sandbox must not reach it.
    let host_port = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let dockerfile = format!(
        r#"FROM base:1
RUN echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1234:' >> /etc/group
COPY --chown=app:app files/ /home/app/files/
RUN rm -r /usr/share/doc /etc/debian_version && mkdir /usr/share/doc && echo fresh > /usr/share/doc/only
ADD bundle.tar.gz /opt/bundle/
ADD --checksum=sha256:{sum} http://127.0.0.1:{port}/remote.txt /opt/
ADD plain.txt /opt/plain.txt
ARG BUMP
RUN --mount=type=cache,target=/var/cache/thing n=$(cat /var/cache/thing/n 2>/dev/null || echo 0); echo $((n+1)) > /var/cache/thing/n; cp /var/cache/thing/n /cache-count
RUN --mount=type=bind,source=files,target=/src cat /src/a.txt > /bound.txt
RUN --mount=type=tmpfs,target=/scratch echo x > /scratch/y
ARG HOSTPORT={hp}
RUN <<'CHECK'
set -u
bad() {{ echo "ESCAPE: $*" >&2; exit 1; }}
command -v perl >/dev/null && command -v mknod >/dev/null || {{ echo "the checks need perl and mknod" >&2; exit 1; }}
[ "$(ls /proc | grep -c '^[0-9]')" -lt 10 ] || bad "host processes are visible"
echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && bad "a host sysctl is writable"
mknod /tmp/disk b 8 0 2>/dev/null && bad "a block device was made"
read -r inside outside count < /proc/self/uid_map
[ "$outside" != 0 ] || bad "root inside is root outside"
hostname sandboxed 2>/dev/null || true
perl -MIO::Socket::INET -e 'exit(IO::Socket::INET->new(PeerAddr => "10.88.0.1:$ARGV[0]", Timeout => 2) ? 0 : 1)' "$HOSTPORT" && bad "a host port answers"
echo isolated > /isolation.txt
CHECK
"#,
        hp = host_port.local_addr().unwrap().port()
    );
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let build = |bump: &str| {
        ok(run(
            data.path(),
            &[
                "build",
                ctx.path().to_str().unwrap(),
                "-t",
                "mounts:1",
                "--build-arg",
                &format!("BUMP={bump}"),
            ],
        ))
    };
    build("1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        hostname
    );
    ok(run(
        data.path(),
        &["runtime", "run", "check", "--image", "mounts:1"],
    ));
    let inside = |cmd: &str| {
        ok(run(
            data.path(),
            &["runtime", "exec", "check", "-T", "--", "sh", "-c", cmd],
        ))
    };
    assert_eq!(
        inside("stat -c %u:%g:%U /home/app/files/a.txt"),
        "1234:1234:app\n"
    );
    assert_eq!(
        inside("cat /opt/bundle/inner.txt /opt/remote.txt /opt/plain.txt"),
        "from the archive\nremote body\nplain\n"
    );
    assert_eq!(inside("stat -c %a /opt/remote.txt"), "600\n");
    assert_eq!(inside("cat /cache-count /bound.txt"), "1\nbound\n");
    // Nothing a mount held is in the image.
    assert_eq!(
        inside("ls -A /var/cache/thing /src /scratch | grep -v : | grep -c . || true"),
        "0\n"
    );
    assert_eq!(inside("cat /isolation.txt"), "isolated\n");
    // What a step removed is gone from the image; a folder made anew holds only the new.
    assert_eq!(
        inside("ls /usr/share/doc; test -e /etc/debian_version || echo removed"),
        "only\nremoved\n"
    );
    ok(run(data.path(), &["runtime", "rm", "-f", "check"]));

    // The cache outlives the build: the rerun step finds what the last one left.
    let out = build("2");
    assert!(out.contains("from the cache"), "{out}");
    ok(run(
        data.path(),
        &["runtime", "run", "check", "--image", "mounts:1"],
    ));
    assert_eq!(inside("cat /cache-count"), "2\n");
    ok(run(data.path(), &["runtime", "rm", "-f", "check"]));

    // A wrong checksum, an unknown user and a secret mount are refused, naming the line.
    for (bad, expected) in [
        (
            format!(
                "FROM base:1\nADD --checksum=sha256:{} http://127.0.0.1:{port}/r.txt /r\n",
                "0".repeat(64)
            ),
            "Dockerfile:2",
        ),
        (
            "FROM base:1\nCOPY --chown=nobody-here plain.txt /p\n".to_owned(),
            "no user nobody-here",
        ),
        (
            "FROM base:1\nRUN --mount=type=secret,id=x,target=/s true\n".to_owned(),
            "without secrets",
        ),
    ] {
        std::fs::write(ctx.path().join("Dockerfile"), bad).unwrap();
        let out = run(
            data.path(),
            &["build", ctx.path().to_str().unwrap(), "-t", "bad:1"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expected), "{err}");
    }
}

#[test]
fn a_base_image_comes_from_a_registry_when_it_is_not_local() {
    enter_own_network();
    require_program("skopeo", "skopeo");
    let run = |data: &Path, args: &[&str]| {
        common::warren_at(data, args, &[("WARREN_UID_BASE", "3100000000")])
    };
    let registry = warren_testkit::Registry::start();
    let source = data_with_minbase("warren-build-", &run, "base:1");
    // The same base as a Warren image and as a standard OCI image.
    let warren_ref = format!("{}/team/base:1", registry.host());
    let oci_ref = format!("{}/std/base:1", registry.host());
    ok(run(
        source.path(),
        &["image", "push", "base:1", &warren_ref],
    ));
    let layout = source.path().join("layout");
    ok(run(
        source.path(),
        &[
            "image",
            "export",
            "base:1",
            &format!("oci:{}:base", layout.display()),
        ],
    ));
    warren_testkit::run(
        std::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:base", layout.display()))
            .arg(format!("docker://{oci_ref}")),
    );
    let data = tempfile::Builder::new()
        .prefix("warren-build-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let ctx = tempfile::tempdir().unwrap();
    for (n, base) in [&warren_ref, &oci_ref].into_iter().enumerate() {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM {base}\nRUN echo {n} > /n\n"),
        )
        .unwrap();
        let out = ok(run(
            data.path(),
            &[
                "build",
                ctx.path().to_str().unwrap(),
                "-t",
                &format!("from-registry:{n}"),
            ],
        ));
        assert!(out.contains("1 steps run"), "{out}");
    }
    let listed = ok(run(data.path(), &["image", "ls"]));
    assert!(
        listed.contains(&warren_ref) && listed.contains(&oci_ref),
        "{listed}"
    );
    // A name that is neither local nor a registry reference says what a base may be.
    std::fs::write(ctx.path().join("Dockerfile"), "FROM nowhere:1\n").unwrap();
    let out = run(
        data.path(),
        &["build", ctx.path().to_str().unwrap(), "-t", "x:1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Dockerfile:1") && err.contains("registry image"),
        "{err}"
    );
}

/// The Dockerfile options Docker users rely on do what Docker does: a base with no `PATH`
/// gets Docker's default one; `COPY --from --chown --chmod` sets both; `--exclude` and
/// `--parents` shape a copy; `RUN --network=none` has no network but its loopback; labels,
/// ports, the entrypoint and the command are kept in the image's config as Docker combines
/// them; a later stage inherits an earlier one's settings. What Warren does not do is refused
/// with its line.
#[test]
fn dockerfile_options_work_as_docker_or_are_refused() {
    enter_own_network();
    // An image from a folder has no settings at all: no PATH.
    let data = data_with_minbase("warren-build-options-", &warren, "bare:1");
    let ctx = tempfile::tempdir().unwrap();
    for (path, body) in [
        ("docs/a.md", "a"),
        ("docs/b.txt", "b"),
        ("docs/deep/c.md", "c"),
        ("docs/deep/d.txt", "d"),
        ("src/app/main.txt", "main"),
        ("src/lib/util.txt", "util"),
    ] {
        let file = ctx.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, body).unwrap();
    }
    let dockerfile = r#"FROM bare:1 AS build
ENV FROM_BUILD=kept
RUN mkdir -p /src/out /src/notes && echo artifact > /src/artifact \
 && echo note > /src/notes/n.md && echo keep > /src/notes/k.txt \
 && echo owned > /src/owned && chown 1234:1234 /src/owned
CMD ["inherited"]

FROM build AS tools
ENV PATH="/opt/tools:${PATH}"
RUN ["sh", "-c", "echo \"$PATH\" > /path.txt"]
COPY --from=build --chown=1000:1000 --chmod=755 /src/artifact /opt/tools/artifact
COPY --from=build --chmod=600 /src/owned /opt/owned
COPY --from=build --exclude=*.md /src/notes /opt/notes/
COPY --exclude=**/*.md docs /docs/
COPY --parents ./src/app/main.txt src/lib/util.txt /p/
COPY --parents ./src/./app/main.txt /q/
RUN --network=none { cat /proc/net/dev; timeout 5 bash -c 'exec 3<>/dev/tcp/10.88.0.1/9' 2>&1; true; \
 timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/9' 2>&1; true; \
 nsenter -t 1 -n true 2>/dev/null && echo rejoined; true; } > /none.txt
RUN cat /proc/net/dev > /default.txt && echo "$FROM_BUILD" > /from-build.txt
ARG TEAM=tools
LABEL org.example.team=$TEAM "org.example.note"="two words"
EXPOSE 8080 53/udp
MAINTAINER dev@example.org
ENTRYPOINT ["/opt/tools/artifact"]
"#;
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    ok(warren(
        data.path(),
        &["build", ctx.path().to_str().unwrap(), "-t", "opts:1"],
    ));
    ok(warren(
        data.path(),
        &["runtime", "run", "opts", "--image", "opts:1"],
    ));
    let inside = |cmd: &str| {
        ok(warren(
            data.path(),
            &["runtime", "exec", "opts", "-T", "--", "sh", "-c", cmd],
        ))
    };
    assert_eq!(
        inside("cat /path.txt"),
        "/opt/tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    assert_eq!(
        inside("stat -c '%u:%g %a' /opt/tools/artifact /opt/owned"),
        "1000:1000 755\n1234:1234 600\n",
        "--chown and --chmod both apply; --chmod alone keeps the owner"
    );
    assert_eq!(
        inside("cd /opt/notes && find . -type f | sort"),
        "./k.txt\n"
    );
    assert_eq!(
        inside("cd /docs && find . -type f | sort"),
        "./b.txt\n./deep/d.txt\n"
    );
    assert_eq!(
        inside("cd /p && find . -type f | sort; cd /q && find . -type f"),
        "./src/app/main.txt\n./src/lib/util.txt\n./app/main.txt\n"
    );
    let none = inside("cat /none.txt");
    assert!(
        none.contains("lo:") && !none.contains("eth0"),
        "only loopback: {none}"
    );
    assert!(none.contains("Network is unreachable"), "{none}");
    assert!(
        !none.contains("rejoined"),
        "a root step cannot rejoin the sandbox's network: {none}"
    );
    assert!(
        none.contains("Connection refused"),
        "loopback is up: {none}"
    );
    assert!(inside("cat /default.txt").contains("eth0"));
    assert_eq!(
        inside("cat /from-build.txt"),
        "kept\n",
        "a stage's ENV in the next"
    );
    ok(warren(data.path(), &["runtime", "rm", "-f", "opts"]));

    let shown: serde_json::Value = common::json(warren(
        data.path(),
        &["image", "inspect", "opts:1", "--json"],
    ));
    let config = &shown["config"];
    assert_eq!(
        config["labels"],
        serde_json::json!({"org.example.team": "tools", "org.example.note": "two words"})
    );
    assert_eq!(
        config["exposedPorts"],
        serde_json::json!(["53/udp", "8080/tcp"])
    );
    assert_eq!(config["author"], "dev@example.org");
    assert!(
        config["env"].to_string().contains("FROM_BUILD=kept"),
        "{config}"
    );
    // An entrypoint clears the command the stage inherited.
    assert_eq!(
        config["entrypoint"],
        serde_json::json!(["/opt/tools/artifact"])
    );
    assert_eq!(config["cmd"], serde_json::json!([]), "{config}");
    let text = ok(warren(data.path(), &["image", "inspect", "opts:1"]));
    for line in [
        "label    org.example.team=tools",
        "ports    53/udp 8080/tcp",
        r#"entrypoint ["/opt/tools/artifact"]"#,
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }

    // A command set in the same stage stays beside a later entrypoint; a shell-form
    // entrypoint takes none.
    for (tail, entrypoint, cmd) in [
        (
            "CMD [\"--serve\"]\nENTRYPOINT [\"/bin/app\"]\n",
            serde_json::json!(["/bin/app"]),
            serde_json::json!(["--serve"]),
        ),
        (
            "ENTRYPOINT [\"/bin/app\"]\nCMD --serve now\n",
            serde_json::json!(["/bin/app"]),
            serde_json::json!(["/bin/sh", "-c", "--serve now"]),
        ),
        (
            "CMD [\"--serve\"]\nENTRYPOINT exec /bin/app\n",
            serde_json::json!(["/bin/sh", "-c", "exec /bin/app"]),
            serde_json::json!([]),
        ),
    ] {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM bare:1\n{tail}"),
        )
        .unwrap();
        ok(warren(
            data.path(),
            &["build", ctx.path().to_str().unwrap(), "-t", "run:1"],
        ));
        let shown: serde_json::Value = common::json(warren(
            data.path(),
            &["image", "inspect", "run:1", "--json"],
        ));
        assert_eq!(shown["config"]["entrypoint"], entrypoint, "{tail}");
        assert_eq!(shown["config"]["cmd"], cmd, "{tail}");
    }

    // Refused before any step runs, with the line.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM bare:1\nRUN true\nVOLUME /data\n",
    )
    .unwrap();
    let out = warren(
        data.path(),
        &["build", ctx.path().to_str().unwrap(), "-t", "vol:1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Dockerfile:3: VOLUME: VOLUME is not supported"),
        "{err}"
    );
}

/// What a Dockerfile copies is tenant-sized: `COPY --from` of a 640 MiB file, and `COPY` of
/// one from the context, by a build held to 256 MiB of memory. Before, each went through the
/// host's memory whole (the stage's tar stream, then the joined one), and the build was killed.
#[test]
fn what_a_build_copies_never_sits_in_the_hosts_memory() {
    enter_own_network();
    require_program("tar", "tar");
    let data = data_with_minbase("warren-build-big-", &warren, "base:1");
    let ctx = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM base:1 AS big\n\
         RUN head -c 671088640 /dev/urandom > /big\n\
         FROM base:1\n\
         COPY --from=big /big /copied\n\
         COPY context.bin /context.bin\n\
         RUN test $(stat -c %s /copied) = 671088640 && test $(stat -c %s /context.bin) = 671088640\n",
    )
    .unwrap();
    let context_file = std::fs::File::create(ctx.path().join("context.bin")).unwrap();
    context_file.set_len(640 << 20).unwrap();
    // A memory cgroup of its own for the build (v1 here, v2 on most hosts; no swap).
    let name = format!("warren-test-build-{}", std::process::id());
    let (dir, limit_file) = if Path::new("/sys/fs/cgroup/memory").is_dir() {
        (
            Path::new("/sys/fs/cgroup/memory").join(&name),
            "memory.limit_in_bytes",
        )
    } else {
        (Path::new("/sys/fs/cgroup").join(&name), "memory.max")
    };
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(limit_file), (256u64 << 20).to_string()).unwrap();
    // And no swap to spill into, where the host has any.
    for (file, value) in [
        ("memory.memsw.limit_in_bytes", 256u64 << 20),
        ("memory.swap.max", 0),
    ] {
        if dir.join(file).exists() {
            std::fs::write(dir.join(file), value.to_string()).unwrap();
        }
    }
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
            "sh",
        ])
        .arg(&dir)
        .arg(env!("CARGO_BIN_EXE_warren"))
        .arg("--data")
        .arg(data.path())
        .args(["build", ctx.path().to_str().unwrap(), "-t", "big:1"])
        .env("WARREN_UID_BASE", "2900000000")
        .output()
        .unwrap();
    let peak = ["memory.max_usage_in_bytes", "memory.peak"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_dir(&dir);
    assert!(
        out.status.success(),
        "the build, held to 256 MiB (peak {peak}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok(out);
    assert!(out.starts_with("built big:1"), "{out} (peak {peak})");
}

/// A `warren build` killed (SIGKILL) mid-step leaves its sandbox running, owned by a process
/// that is gone; the next build on the host removes it before it starts its own.
#[test]
fn a_killed_builds_sandbox_goes_with_the_next_build() {
    enter_own_network();
    let data = data_with_minbase("warren-build-killed-", &warren, "base:1");
    let ctx = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM base:1\nRUN sleep 600\n",
    )
    .unwrap();
    let sandboxes = || -> Vec<String> {
        let listed: serde_json::Value =
            common::json(warren(data.path(), &["runtime", "ls", "--json"]));
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["config"]["id"].as_str().map(str::to_owned))
            .collect()
    };
    let mut build = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--data")
        .arg(data.path())
        .args(["build", "-t", "slow:1"])
        .arg(ctx.path())
        .env("WARREN_UID_BASE", "2900000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while sandboxes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build made no sandbox"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Its step runs: the sandbox is there when the build dies.
    std::thread::sleep(std::time::Duration::from_secs(1));
    build.kill().unwrap();
    build.wait().unwrap();
    let left = sandboxes();
    assert!(
        !left.is_empty(),
        "nothing to clean up: the test proves nothing"
    );

    std::fs::write(ctx.path().join("Dockerfile"), "FROM base:1\nRUN true\n").unwrap();
    let out = warren(
        data.path(),
        &["build", "-t", "quick:1", ctx.path().to_str().unwrap()],
    );
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    for name in &left {
        assert!(said.contains(&format!("removed {name}")), "{name}: {said}");
    }
    assert_eq!(sandboxes(), Vec::<String>::new());
}
