//! A minimal QMP client (QEMU's JSON control protocol over the VM's unix socket): enough to
//! read and set device properties and to ask for a power-down.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Error;

pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn qmp_error(e: impl std::fmt::Display) -> Error {
    Error::Qmp(e.to_string())
}

impl Qmp {
    /// Connects and leaves capability negotiation mode.
    pub(crate) fn connect(path: &Path) -> Result<Self, Error> {
        let stream = UnixStream::connect(path).map_err(qmp_error)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(qmp_error)?;
        let writer = stream.try_clone().map_err(qmp_error)?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_error(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(qmp_error)? == 0 {
            return Err(qmp_error("the VM closed its control socket"));
        }
        serde_json::from_str(&line).map_err(qmp_error)
    }

    /// Runs a command; returns its `return` value (events in between are skipped).
    pub(crate) fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        let mut request = serde_json::to_vec(&json!({
            "execute": command,
            "arguments": arguments,
        }))
        .map_err(qmp_error)?;
        request.push(b'\n');
        self.writer.write_all(&request).map_err(qmp_error)?;
        loop {
            let reply = self.read()?;
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                return Err(qmp_error(format!(
                    "{command}: {}",
                    error
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                )));
            }
        }
    }
}

/// The balloon's device path (its `id` on the command line).
pub(crate) const BALLOON: &str = "/machine/peripheral/balloon0";

/// Asks the guest's balloon driver to report its memory statistics every `seconds`.
pub(crate) fn enable_balloon_stats(path: &Path, seconds: u64) -> Result<(), Error> {
    Qmp::connect(path)?.execute(
        "qom-set",
        json!({"path": BALLOON, "property": "guest-stats-polling-interval", "value": seconds}),
    )?;
    Ok(())
}

/// The guest's memory as its balloon driver last reported it: (total, free, available) bytes.
pub(crate) fn balloon_stats(path: &Path) -> Result<(u64, u64, u64), Error> {
    let value = Qmp::connect(path)?.execute(
        "qom-get",
        json!({"path": BALLOON, "property": "guest-stats"}),
    )?;
    let stat = |name: &str| {
        value
            .get("stats")
            .and_then(|s| s.get(name))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok((
        stat("stat-total-memory"),
        stat("stat-free-memory"),
        stat("stat-available-memory"),
    ))
}
