//! `warren build` as root against real sandboxes: a multi-stage Dockerfile with ARG, ENV,
//! WORKDIR, COPY (files, folders, here-documents, --from a stage, .dockerignore), RUN (shell,
//! exec and here-document forms) and CMD, checked inside a workspace of the result; and the
//! failures a user meets: a failing RUN names its line and shows the error's tail, a COPY out
//! of the context is refused.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;

use common::ok;
use warren_testkit::{debian_rootfs, enter_own_network, require_program};

mod common;

fn warren(data: &Path, args: &[&str]) -> Output {
    common::warren_at(data, args, &[("WARREN_UID_BASE", "2900000000")])
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
    let data = tempfile::Builder::new()
        .prefix("warren-build-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let rootfs = debian_rootfs("minbase", &[]);
    ok(warren(
        data.path(),
        &["image", "import", rootfs.to_str().unwrap(), "base:1"],
    ));
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
    let shown: serde_json::Value = serde_json::from_str(&ok(warren(
        data.path(),
        &["image", "inspect", "app:1", "--json"],
    )))
    .unwrap();
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
