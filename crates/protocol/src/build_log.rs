//! The lines that mark the steps of a prebuild's log. The build writes them among its steps'
//! own output; the web UI reads a prebuild's step list back from them (what ran, what came
//! from the cache, where it stopped). A build's output can print such a line too: the list
//! is what the log says, shown only to those who may read the log.

/// The first words of the lines that begin a phase of a prebuild, in the order they come.
pub const PHASES: [&str; 7] = [
    "fetching ",
    "made before: reusing it",
    "building the environment from ",
    "checking out ",
    "prebuild task ",
    "storing ",
    "recording the first start",
];

/// The line after a Dockerfile step's that says it was taken from the cache.
pub const CACHED: &str = "    cached";

/// The line that begins a Dockerfile step: `[stage] line N: INSTRUCTION`.
pub fn step_line(stage: usize, line: usize, instruction: &str) -> String {
    format!("[{stage}] line {line}: {instruction}")
}

/// What one line of a log marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A step begins; the line is its title.
    Step,
    /// The step before came from the cache.
    Cached,
}

/// What `line` (without its end of line) marks, if anything.
pub fn mark(line: &str) -> Option<Mark> {
    if line == CACHED {
        return Some(Mark::Cached);
    }
    let dockerfile_step = line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
        .is_some_and(|(stage, rest)| {
            !stage.is_empty()
                && stage.bytes().all(|b| b.is_ascii_digit())
                && (rest.starts_with("FROM ") || rest.starts_with("line "))
        });
    (dockerfile_step || PHASES.iter().any(|p| line.starts_with(p))).then_some(Mark::Step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logs_step_lines_are_told_from_the_steps_output() {
        let step = step_line(0, 2, "RUN echo one");
        assert_eq!(step, "[0] line 2: RUN echo one");
        for line in [
            "fetching file:///r",
            "building the environment from Dockerfile",
            "[0] FROM debian:bookworm",
            &step,
            "[12] line 30: COPY . /src",
            "checking out abc into /w",
            "prebuild task web",
            "storing warren-prebuild:k",
            "recording the first start's reads for 5s",
        ] {
            assert_eq!(mark(line), Some(Mark::Step), "{line}");
        }
        assert_eq!(mark(CACHED), Some(Mark::Cached));
        for line in [
            "Hit:1 http://deb.debian.org bookworm InRelease",
            "[x] line 3",
            "[] line 3",
            "[0] lineup",
            "  cached",
            "    cached!",
            "",
        ] {
            assert_eq!(mark(line), None, "{line}");
        }
    }
}
