//! Tests of the Dockerfile parser.

use super::*;

const EVERYTHING: &str = r#"# syntax=docker/dockerfile:1
# escape=\
ARG BASE=debian:bookworm
ARG TOOLS
FROM --platform=linux/amd64 ${BASE} AS build
# a comment
ARG VERSION=1.0
ENV PATH=/opt/bin:$PATH LANG="C.UTF-8"
ENV OLD style value
WORKDIR /src
COPY --chown=1000:1000 --chmod=644 go.* ./
RUN --mount=type=cache,target=/root/.cache,sharing=locked \
    --network=none \
    apt-get update && \
    # a comment inside a continuation
    apt-get install -y \

      curl
RUN ["/bin/echo", "exec form"]
RUN <<EOF
set -e
echo "$VERSION"
EOF
RUN <<-'SCRIPT' bash
	echo literal $HOME
	SCRIPT
COPY <<CONF /etc/app.conf
key=value
CONF

FROM build
COPY --from=build --link /src/out /usr/local/bin/
ADD --checksum=sha256:abc https://example.com/x.tar.gz /x/
LABEL org.opencontainers.image.title="dev env" team=tools
USER dev
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
EXPOSE 8080/tcp 9000
HEALTHCHECK NONE
ENTRYPOINT ["/usr/bin/tini", "--"]
cmd echo lowercase works
"#;

fn run(command: Command) -> Instruction {
    Instruction::Run {
        command,
        mounts: vec![],
        no_network: false,
        heredocs: vec![],
    }
}

#[test]
fn every_instruction_is_read() {
    let d = parse("Dockerfile", EVERYTHING).unwrap();
    assert_eq!(d.escape, '\\');
    assert_eq!(
        d.global_args,
        [
            ArgDecl {
                name: "BASE".into(),
                default: Some("debian:bookworm".into())
            },
            ArgDecl {
                name: "TOOLS".into(),
                default: None
            }
        ]
    );
    assert_eq!(d.stages.len(), 2);
    let build = &d.stages[0];
    assert_eq!(
        (
            build.base.as_str(),
            build.name.as_deref(),
            build.platform.as_deref()
        ),
        ("${BASE}", Some("build"), Some("linux/amd64"))
    );
    let steps: Vec<&Instruction> = build.steps.iter().map(|s| &s.instruction).collect();
    assert_eq!(
        steps[1],
        &Instruction::Env(vec![
            ("PATH".into(), "/opt/bin:$PATH".into()),
            ("LANG".into(), "\"C.UTF-8\"".into())
        ])
    );
    assert_eq!(
        steps[2],
        &Instruction::Env(vec![("OLD".into(), "style value".into())])
    );
    let Instruction::Copy { files, .. } = steps[4] else {
        panic!("{:?}", steps[4])
    };
    assert_eq!(files.sources, [CopySource::Path("go.*".into())]);
    assert_eq!(
        (
            files.dest.as_str(),
            files.chown.as_deref(),
            files.chmod.as_deref()
        ),
        ("./", Some("1000:1000"), Some("644"))
    );
    let Instruction::Run {
        command,
        mounts,
        no_network,
        ..
    } = steps[5]
    else {
        panic!("{:?}", steps[5])
    };
    assert_eq!(mounts[0].kind, "cache");
    assert_eq!(mounts[0].target.as_deref(), Some("/root/.cache"));
    assert_eq!(mounts[0].options["sharing"], "locked");
    assert!(no_network);
    assert_eq!(
        command,
        &Command::Shell("apt-get update &&     apt-get install -y       curl".into())
    );
    assert_eq!(build.steps[5].line, 12);
    assert_eq!(
        steps[6],
        &run(Command::Exec(vec!["/bin/echo".into(), "exec form".into()]))
    );
    let Instruction::Run { heredocs, .. } = steps[7] else {
        panic!("{:?}", steps[7])
    };
    assert_eq!(heredocs[0].body, "set -e\necho \"$VERSION\"\n");
    assert!(heredocs[0].expand);
    let Instruction::Run {
        heredocs, command, ..
    } = steps[8]
    else {
        panic!("{:?}", steps[8])
    };
    assert_eq!(command, &Command::Shell("<<-'SCRIPT' bash".into()));
    assert_eq!(heredocs[0].body, "echo literal $HOME\n");
    assert!(!heredocs[0].expand);
    let Instruction::Copy { files, .. } = steps[9] else {
        panic!("{:?}", steps[9])
    };
    assert_eq!(files.dest, "/etc/app.conf");
    assert!(matches!(&files.sources[0], CopySource::Heredoc(h) if h.body == "key=value\n"));

    let last: Vec<&Instruction> = d.stages[1].steps.iter().map(|s| &s.instruction).collect();
    assert!(
        matches!(last[0], Instruction::Copy { from: Some(f), files, parents: false } if f == "build" && files.link)
    );
    assert!(matches!(last[1], Instruction::Add { checksum: Some(c), .. } if c == "sha256:abc"));
    assert_eq!(
        last[2],
        &Instruction::Label(vec![
            (
                "org.opencontainers.image.title".into(),
                "\"dev env\"".into()
            ),
            ("team".into(), "tools".into())
        ])
    );
    assert_eq!(
        last[4],
        &Instruction::Shell(vec![
            "/bin/bash".into(),
            "-o".into(),
            "pipefail".into(),
            "-c".into()
        ])
    );
    assert_eq!(
        last[5],
        &Instruction::Expose(vec!["8080/tcp".into(), "9000".into()])
    );
    assert_eq!(last[6], &Instruction::HealthcheckNone);
    assert_eq!(
        last[8],
        &Instruction::Cmd(Command::Shell("echo lowercase works".into()))
    );
}

#[test]
fn the_escape_directive_changes_continuations() {
    let d = parse(
        "Dockerfile",
        "# escape=`\nFROM mcr.microsoft.com/windows\nRUN dir c:\\ `\n  && echo done\n",
    )
    .unwrap();
    assert_eq!(d.escape, '`');
    assert_eq!(
        d.stages[0].steps[0].instruction,
        run(Command::Shell("dir c:\\   && echo done".into()))
    );
}

fn error(text: &str) -> String {
    parse("Dockerfile", text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_file_and_line() {
    assert_eq!(
        error("FROM a\nONBUILD RUN x\n"),
        "Dockerfile:2: ONBUILD: ONBUILD is not supported: Warren builds environments, not base images for others"
    );
    assert_eq!(
        error("FROM a\nRUNN make\n"),
        "Dockerfile:2: unknown instruction `RUNN` (did you mean RUN?)"
    );
    assert_eq!(error("RUN x\n"), "Dockerfile:1: RUN before the first FROM");
    assert!(error("# just a comment\n").contains("no FROM"));
    assert_eq!(
        error("FROM a\nRUN <<END\necho\n"),
        "Dockerfile:2: here-document `END` is never closed"
    );
    assert!(error("FROM a\nRUN --mount=type=nfs,target=/x true\n").contains("type `nfs`"));
    assert!(error("FROM a\nRUN --mount=type=cache true\n").contains("needs target="));
    assert!(error("FROM a\nRUN --privileged true\n").contains("unknown flag --privileged"));
    assert!(error("FROM a\nCOPY onlyone\n").contains("at least one source"));
    assert!(error("FROM a\nSHELL /bin/sh -c\n").contains("JSON array"));
    assert!(error("FROM a AS 1x\n").contains("not a stage name"));
    assert!(error("FROM a AS x\nFROM b AS X\n").contains("exists already"));
    assert!(error("FROM a\nENV =x\n").contains("not KEY=VALUE"));
    assert!(error("FROM a\nARG 9x\n").contains("not an argument name"));
    assert!(error("FROM a\nRUN echo \"open\n").contains("unterminated"));
    assert!(error("# escape=x\nFROM a\n").starts_with("Dockerfile:1: escape must be"));
    assert!(error("FROM a\nWORKDIR\n").contains("which folder"));
}

/// What Warren cannot do as Docker does is refused, with the line, never accepted and ignored.
#[test]
fn what_is_not_supported_is_refused_with_its_line() {
    for (text, expected) in [
        (
            "FROM a\nRUN --network=host curl x\n",
            "Dockerfile:2: RUN: --network=host is refused",
        ),
        (
            "FROM a\nRUN --network=bridge true\n",
            "Dockerfile:2: RUN: --network=bridge (expected default or none)",
        ),
        (
            "FROM a\nRUN --security=insecure true\n",
            "Dockerfile:2: RUN: --security=insecure is refused",
        ),
        (
            "FROM a\n\nADD --keep-git-dir=true https://x/y.git /src\n",
            "Dockerfile:3: ADD: --keep-git-dir: ADD does not fetch git repositories",
        ),
        (
            "FROM a\nADD --exclude=*.md docs /docs/\n",
            "Dockerfile:2: ADD: --exclude: not supported on ADD here",
        ),
        (
            "FROM a\nSTOPSIGNAL SIGINT\n",
            "Dockerfile:2: STOPSIGNAL: STOPSIGNAL is not supported",
        ),
        (
            "FROM a\nHEALTHCHECK CMD curl -f http://localhost/\n",
            "Dockerfile:2: HEALTHCHECK: HEALTHCHECK is not supported",
        ),
        (
            "FROM a\nVOLUME /data\n",
            "Dockerfile:2: VOLUME: VOLUME is not supported",
        ),
        (
            "FROM a\nCOPY --parents <<EOF /x/\nhi\nEOF\n",
            "Dockerfile:2: COPY: --parents: a here-document has no folders to keep",
        ),
    ] {
        let err = error(text);
        assert!(err.starts_with(expected), "{text:?}: {err}");
    }
    // What is accepted: the sandbox is the default security, NONE turns no check off.
    for text in [
        "FROM a\nRUN --security=sandbox --network=default true\n",
        "FROM a\nHEALTHCHECK none\n",
        "FROM a\nCOPY --parents --exclude=*.md ./a/./b /dst/\n",
    ] {
        parse("Dockerfile", text).unwrap();
    }
}

#[test]
fn a_continuation_at_the_end_of_the_file_ends_the_instruction() {
    let d = parse("Dockerfile", "FROM a\nRUN echo \\\n").unwrap();
    assert_eq!(
        d.stages[0].steps[0].instruction,
        run(Command::Shell("echo".into()))
    );
}

proptest::proptest! {
    // Whatever the text, the parser answers (a Dockerfile or an error), never panics.
    #[test]
    fn any_text_gets_an_answer(text in "(FROM|RUN|COPY|ENV|ARG|<<|EOF|\\\\|\"|'|#| |\n|--mount=|[a-z=,/.$`]){0,60}") {
        let _ = parse("Dockerfile", &text);
    }
}

#[test]
fn a_step_reads_in_a_few_words_in_the_log() {
    let text = "FROM debian\nRUN apt-get update && \\\n    apt-get install -y git\nCOPY --chown=1:1 a b /dst/\nRUN [\"/bin/echo\", \"hi\"]\nENV A=1 B=2\nWORKDIR /src\nRUN echo ".to_owned()
        + &"x".repeat(200)
        + "\n";
    let parsed = parse("Dockerfile", &text).unwrap();
    let summaries: Vec<String> = parsed.stages[0]
        .steps
        .iter()
        .map(|s| s.instruction.summary())
        .collect();
    assert_eq!(summaries[0], "RUN apt-get update && apt-get install -y git");
    assert_eq!(summaries[1], "COPY a b /dst/");
    assert_eq!(summaries[2], "RUN /bin/echo hi");
    assert_eq!(summaries[3], "ENV A=1 B=2");
    assert_eq!(summaries[4], "WORKDIR /src");
    assert_eq!(summaries[5].chars().count(), 101, "{}", summaries[5]);
    assert!(summaries[5].ends_with("xx…"), "{}", summaries[5]);
}
