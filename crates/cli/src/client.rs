//! The CLI's side of the API: where the server is, the token `warren login` saved, and calls
//! that turn the server's `{"error": ...}` answers into plain messages.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ureq::Agent;

/// Saved by `warren login`: `$XDG_CONFIG_HOME/warren/cli.json` (or `~/.config/...`), mode 0600.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Login {
    pub server: String,
    pub token: String,
}

pub fn login_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/root/.config"));
    base.join("warren").join("cli.json")
}

pub fn save_login(login: &Login) -> anyhow::Result<PathBuf> {
    let path = login_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(&path, &serde_json::to_vec_pretty(login)?)?;
    Ok(path)
}

/// Writes a file only its owner may read (mode 0600), whole or not at all: the bytes go to a
/// temporary name first and are renamed over `path`.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    warren_hostfs::write_private(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a file that holds `what` (a token, passwords): at most 1 MiB, and only if no one but
/// its owner may read it (the twin of [`write_private`]). `None` when there is no such file.
pub fn read_private(path: &std::path::Path, what: &str) -> anyhow::Result<Option<String>> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "{} holds {what} but others may read it: chmod 600 it",
            path.display()
        );
    }
    let mut text = String::new();
    file.take(1 << 20)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(text))
}

/// The CAs in `WARREN_SERVER_CA` (a PEM file), for a server whose certificate no public CA
/// signed. A file that cannot be read is said and left out (the call then fails naming the
/// certificate).
fn server_ca() -> Option<Vec<ureq::tls::Certificate<'static>>> {
    let path = std::env::var_os("WARREN_SERVER_CA")?;
    let read = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e.to_string())),
                })
                .collect::<Result<Vec<_>, _>>()
        });
    match read {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            eprintln!(
                "warning: WARREN_SERVER_CA {}: no certificate in it",
                path.display()
            );
            None
        }
        Err(e) => {
            eprintln!("warning: WARREN_SERVER_CA {}: {e}", path.display());
            None
        }
    }
}

#[derive(Debug)]
pub struct Client {
    server: String,
    token: Option<String>,
    agent: Agent,
}

impl Client {
    pub fn anonymous(server: &str) -> Self {
        let mut config = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)));
        if let Some(roots) = server_ca() {
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            );
        }
        Self {
            server: server.trim_end_matches('/').to_owned(),
            token: None,
            agent: config.build().into(),
        }
    }

    pub fn with_token(server: &str, token: &str) -> Self {
        let mut client = Self::anonymous(server);
        client.token = Some(token.to_owned());
        client
    }

    /// The server and token from `WARREN_SERVER` / `WARREN_TOKEN`, else from `warren login`.
    pub fn from_login() -> anyhow::Result<Self> {
        let saved: Option<Login> = std::fs::read(login_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let server = std::env::var("WARREN_SERVER")
            .ok()
            .or_else(|| saved.as_ref().map(|l| l.server.clone()))
            .context("not logged in: run `warren login --server URL` first (or set WARREN_SERVER and WARREN_TOKEN)")?;
        let token = std::env::var("WARREN_TOKEN")
            .ok()
            .or_else(|| saved.map(|l| l.token))
            .context("not logged in: run `warren login` first")?;
        Ok(Self::with_token(&server, &token))
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.server);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            ("DELETE", _) => {
                let mut req = self.agent.delete(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            (method, body) => {
                let mut req = match method {
                    "PATCH" => self.agent.patch(&url),
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                let body =
                    serde_json::to_vec(&body.cloned().unwrap_or_else(|| serde_json::json!({})))?;
                req.header("Content-Type", "application/json")
                    .send(&body[..])
            }
        };
        let mut resp = result.with_context(|| format!("cannot reach Warren at {}", self.server))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| match &value {
                    Value::Null => format!(
                        "the server refused {method} {path}: {}",
                        status.canonical_reason().unwrap_or("no reason given")
                    ),
                    other => other.to_string(),
                });
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send("GET", path, None)
    }
    /// POSTs a request body (a `warren_api` type, or JSON).
    pub fn post(&self, path: &str, body: &impl serde::Serialize) -> anyhow::Result<Value> {
        self.send("POST", path, Some(&serde_json::to_value(body)?))
    }
    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send("DELETE", path, None)
    }
    pub fn patch(&self, path: &str, body: &impl serde::Serialize) -> anyhow::Result<Value> {
        self.send("PATCH", path, Some(&serde_json::to_value(body)?))
    }
    pub fn put(&self, path: &str, body: &impl serde::Serialize) -> anyhow::Result<Value> {
        self.send("PUT", path, Some(&serde_json::to_value(body)?))
    }
    /// GETs a typed answer (a `warren_api` type).
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        typed(path, self.get(path)?)
    }
    /// POSTs a request body and reads a typed answer.
    pub fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        typed(path, self.post(path, body)?)
    }
}

/// An answer as the API type it should be; a server of another version may answer otherwise.
fn typed<T: serde::de::DeserializeOwned>(path: &str, answer: Value) -> anyhow::Result<T> {
    serde_json::from_value(answer).with_context(|| {
        format!("the server's answer to {path} is not what this warren expects (another version?)")
    })
}
