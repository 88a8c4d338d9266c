//! The `warren` command's parts: each subcommand's module, and the host glue they share (the
//! API client, the host's prebuilder and image store). The binary (`main.rs`) parses arguments
//! and maps failures to exit codes; `warren-bench` drives the same parts against real peers.
// The terminal is this crate's interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod agent_cmd;
pub mod build_cmd;
pub mod client;
pub mod control_cmd;
pub mod image_cmd;
pub mod prebuild_cmd;
pub mod runtime_cmd;
pub mod spec_cmd;
pub mod ssh_cmd;

/// A duration given on the command line, in seconds: `90s`, `30m`, `2h`, `7d`, or `0`.
pub fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = match unit {
        "" if number == "0" => 1,
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("`{text}` is not a duration such as 90s, 30m, 2h or 7d (0: never)"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}` is not a duration such as 90s, 30m, 2h or 7d"))?;
    number
        .checked_mul(unit)
        .ok_or_else(|| anyhow::anyhow!("`{text}` is too long"))
}

/// An idle timeout on the command line: seconds, or `None` for `default` (the next level's).
#[derive(Debug, Clone, Copy)]
pub struct IdleTimeoutArg(pub Option<u64>);

pub fn parse_idle_timeout(text: &str) -> anyhow::Result<IdleTimeoutArg> {
    match text {
        "default" => Ok(IdleTimeoutArg(None)),
        text => parse_duration(text).map(|s| IdleTimeoutArg(Some(s))),
    }
}

/// A size given on the command line, such as `512MiB` or `20GiB`.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    warren_envfile::ByteSize::parse(text)
        .map(|b| b.0)
        .ok_or_else(|| anyhow::anyhow!("`{text}` is not a size such as 512MiB or 20GiB"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_as_written() {
        for (text, seconds) in [
            ("0", 0),
            ("90s", 90),
            ("30m", 1800),
            ("2h", 7200),
            ("7d", 604_800),
            ("45min", 2700),
        ] {
            assert_eq!(super::parse_duration(text).ok(), Some(seconds), "{text}");
        }
        for bad in ["", "2", "h", "2x", "-1h", "1.5h"] {
            assert!(super::parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            super::parse_idle_timeout("default").ok().map(|t| t.0),
            Some(None)
        );
    }
}
