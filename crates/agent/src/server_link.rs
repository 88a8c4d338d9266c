//! How an agent reaches its server. A host token never crosses a network in the clear: plain
//! `http://` is taken only for a server on this machine (a loopback address or `localhost`);
//! anything else is `https://` with the server's certificate verified — by the CA file the
//! admin gives (`--server-ca`), by the SHA-256 fingerprint of the server's own certificate that
//! `warren host add` prints (`--server-fingerprint`; exactly that certificate, whatever its
//! names and dates), or else by the public CAs (Mozilla's list, `webpki-roots`).
//!
//! The job calls (claim, log, finish) share one HTTP/2 connection, made again when it breaks;
//! the tunnel ([`crate::tunnel`]) has its own HTTP/1.1 connection, which it upgrades.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore};
pub use warren_protocol::tunnel::{fingerprint, parse_fingerprint};

/// Most a connection (TCP, then TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most a job call may take, answer included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most of an answer read.
const ANSWER_LIMIT: usize = 64 << 20;

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Certificates the public CAs vouch for.
    PublicCas,
    /// Certificates these CAs (PEM) vouch for.
    Cas(Vec<CertificateDer<'static>>),
    /// Exactly the certificate with this SHA-256 digest (of its DER form).
    Pinned([u8; 32]),
}

impl Trust {
    /// From the agent's options: a CA file, a fingerprint, or neither (not both).
    pub fn from_options(ca: Option<&Path>, fingerprint: Option<&str>) -> Result<Trust, String> {
        match (ca, fingerprint) {
            (Some(_), Some(_)) => {
                Err("give the server's CA or its certificate's fingerprint, not both".into())
            }
            (Some(file), None) => {
                let certs = CertificateDer::pem_file_iter(file)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                if certs.is_empty() {
                    return Err(format!("{}: no certificate (PEM) in it", file.display()));
                }
                Ok(Trust::Cas(certs))
            }
            (None, Some(text)) => parse_fingerprint(text).map(Trust::Pinned),
            (None, None) => Ok(Trust::PublicCas),
        }
    }
}

/// A connection to the server, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server did not answer (it may come back).
    #[error("{0}")]
    Unreachable(String),
    /// It answered, but not with the certificate this agent trusts: a setting to fix.
    #[error("{0}")]
    Untrusted(String),
}

/// Why a call got no answer to use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The server was not reached, or went away mid-call: another replica may do.
    #[error("{0}")]
    Unreachable(String),
    /// It answered, with an error (or something that is no answer).
    #[error("{0}")]
    Answered(String),
}

/// The server an agent works for, and its token.
pub struct ServerLink {
    /// As given (`https://HOST:PORT`), for messages.
    pub server: String,
    host: String,
    port: u16,
    /// `HOST[:PORT]` as the `Host` header says it.
    pub authority: String,
    token: String,
    tls: Option<Tls>,
    /// The job calls' connection.
    calls: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>>,
}

struct Tls {
    name: ServerName<'static>,
    /// Offering HTTP/2 (the job calls) and HTTP/1.1 (the tunnel, which upgrades).
    h2: TlsConnector,
    http1: TlsConnector,
}

impl std::fmt::Debug for ServerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLink")
            .field("server", &self.server)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerLink {
    /// Checks `server` (`https://HOST[:PORT]`, or `http://` on this machine) and how its
    /// certificate is trusted.
    pub fn new(server: &str, token: String, trust: Trust) -> Result<ServerLink, String> {
        let url = url::Url::parse(server).map_err(|e| format!("server address {server}: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("server address {server} names no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(format!(
                "server address {server}: expected https://HOST[:PORT] and nothing more"
            ));
        }
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let tls = match url.scheme() {
            "https" => Some(Tls::new(&host, &trust)?),
            "http" if on_this_machine(&host) => {
                if trust != Trust::PublicCas {
                    return Err(format!(
                        "server address {server}: a CA or fingerprint is for https:// servers"
                    ));
                }
                None
            }
            "http" => {
                return Err(format!(
                    "server address {server}: the host token would cross the network in the clear; \
                     serve the server over HTTPS (`warren up --tls-cert --tls-key`, or a proxy) and give \
                     https://{authority} with --server-fingerprint (printed by `warren host add`) or --server-ca"
                ));
            }
            other => return Err(format!("server address {server}: {other}: is not http(s)")),
        };
        Ok(ServerLink {
            server: server.trim_end_matches('/').to_owned(),
            port: url.port_or_known_default().unwrap_or(443),
            host,
            authority,
            token,
            tls,
            calls: tokio::sync::Mutex::new(None),
        })
    }

    /// This host's token, for the tunnel's request.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A new connection to the server, TLS when its address says `https`; `h2` offers HTTP/2
    /// (else HTTP/1.1 only) to a TLS server.
    pub async fn connect(&self, h2: bool) -> Result<Box<dyn Stream>, ConnectError> {
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    ConnectError::Unreachable(format!("cannot connect to {}: {e}", self.authority))
                })?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(Box::new(tcp) as Box<dyn Stream>);
            };
            let connector = if h2 { &tls.h2 } else { &tls.http1 };
            match connector.connect(tls.name.clone(), tcp).await {
                Ok(stream) => Ok(Box::new(stream) as Box<dyn Stream>),
                // rustls says a certificate (or any TLS) failure is invalid data.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    Err(ConnectError::Untrusted(format!(
                        "{} is not the server this agent trusts: {e}",
                        self.authority
                    )))
                }
                Err(e) => Err(ConnectError::Unreachable(format!(
                    "TLS with {}: {e}",
                    self.authority
                ))),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                ConnectError::Unreachable(format!(
                    "{} did not answer within {CONNECT_TIMEOUT:?}",
                    self.authority
                ))
            })?
    }

    /// Calls `/api/v1{path}` with the host token (POSTing `body` as JSON when there is one);
    /// answers the JSON answer, or why there is none (the server's own error message when it
    /// gave one).
    pub async fn call(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CallError> {
        let unreachable = |e: String| CallError::Unreachable(format!("{}: {e}", self.server));
        let answered = |e: String| CallError::Answered(format!("{}: {e}", self.server));
        let call = async {
            let mut sender = self.sender().await.map_err(CallError::Unreachable)?;
            let request = match body {
                Some(body) => Request::post(format!("/api/v1{path}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(
                        serde_json::to_vec(body).map_err(|e| answered(e.to_string()))?,
                    ))),
                None => Request::get(format!("/api/v1{path}")).body(Full::default()),
            };
            let mut request = request.map_err(|e| answered(e.to_string()))?;
            let headers = request.headers_mut();
            headers.insert(
                header::HOST,
                header::HeaderValue::from_str(&self.authority)
                    .map_err(|e| answered(e.to_string()))?,
            );
            headers.insert(
                header::AUTHORIZATION,
                header::HeaderValue::from_str(&format!("Bearer {}", self.token))
                    .map_err(|e| answered(e.to_string()))?,
            );
            let answer = match sender.send_request(request).await {
                Ok(answer) => answer,
                Err(e) => {
                    // The connection is gone: the next call makes another.
                    *self.calls.lock().await = None;
                    return Err(unreachable(e.to_string()));
                }
            };
            let status = answer.status();
            let bytes = Limited::new(answer.into_body(), ANSWER_LIMIT)
                .collect()
                .await
                .map_err(|e| unreachable(format!("the answer to {path}: {e}")))?
                .to_bytes();
            let value: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| answered(format!("the answer to {path} is not JSON: {e}")))?
            };
            if status.is_success() {
                Ok(value)
            } else {
                let said = value["error"]
                    .as_str()
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("an error"));
                Err(answered(format!("answered {status}: {said}")))
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| unreachable(format!("did not answer {path} within {CALL_TIMEOUT:?}")))?
    }

    /// The job calls' connection, made when there is none or it closed.
    async fn sender(&self) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
        let mut held = self.calls.lock().await;
        if let Some(sender) = held.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let stream = self.connect(true).await.map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(crate::tunnel::KEEP_ALIVE)
            .keep_alive_timeout(crate::tunnel::KEEP_ALIVE)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{}: {e}", self.server))?;
        tokio::spawn(connection);
        *held = Some(sender.clone());
        Ok(sender)
    }

    /// Whether the server answers with a certificate this agent trusts, checked once at start:
    /// a wrong CA or fingerprint is a setting to fix, not something to retry forever.
    pub async fn check(&self) -> Result<(), String> {
        match self.connect(false).await {
            Err(ConnectError::Untrusted(why)) => Err(why),
            // A server that is down now may come up later.
            Err(ConnectError::Unreachable(_)) | Ok(_) => Ok(()),
        }
    }
}

impl Tls {
    fn new(host: &str, trust: &Trust) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match trust {
            Trust::Pinned(sha256) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    sha256: *sha256,
                    provider,
                }))
                .with_no_client_auth(),
            Trust::Cas(certs) => {
                let mut roots = RootCertStore::empty();
                for cert in certs {
                    roots
                        .add(cert.clone())
                        .map_err(|e| format!("the server's CA: {e}"))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::PublicCas => builder
                .with_root_certificates(RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                })
                .with_no_client_auth(),
        };
        let with_alpn = |protocols: &[&[u8]]| {
            let mut config = config.clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            TlsConnector::from(Arc::new(config))
        };
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_owned())
                .map_err(|e| format!("server name {host}: {e}"))?,
        };
        Ok(Tls {
            name,
            h2: with_alpn(&[b"h2"]),
            http1: with_alpn(&[b"http/1.1"]),
        })
    }
}

/// A loopback address, or `localhost`.
fn on_this_machine(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Trusts exactly one certificate, by the SHA-256 of its DER form; the handshake's signatures
/// are still checked against it, so only the holder of its key passes.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if seen == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "its certificate is {}, not the pinned one",
                fingerprint(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_in_the_clear_only_to_this_machine() {
        let link = |s: &str| ServerLink::new(s, "wrh_x".into(), Trust::PublicCas).map(drop);
        assert!(link("http://127.0.0.1:7070").is_ok());
        assert!(link("http://localhost:7070").is_ok());
        assert!(link("http://[::1]:7070").is_ok());
        let refused = link("http://10.0.0.5:7070").unwrap_err();
        assert!(Trust::from_options(Some(Path::new("/nonexistent")), None).is_err());
        assert!(refused.contains("in the clear"), "{refused}");
        assert!(link("http://devbox.example:7070").is_err());
        assert!(link("https://devbox.example:7070").is_ok());
        assert!(link("ftp://devbox.example").is_err());
        assert!(link("https://devbox.example/api").is_err());
    }
}
