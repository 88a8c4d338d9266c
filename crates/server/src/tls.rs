//! HTTPS served by Warren itself (`warren up --tls-cert FILE --tls-key FILE`): rustls, with
//! HTTP/2 offered (a browser then holds every event stream of a page on one connection) and
//! HTTP/1.1. Without it, Warren serves plain HTTP, for a reverse proxy in front or for loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate chain and private key files (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// Reads the files into an acceptor, and the fingerprint of the certificate it serves (for
/// agents to pin); errors name the file and what is wrong with it.
pub fn acceptor(files: &TlsFiles) -> Result<(TlsAcceptor, String), String> {
    let named = |path: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| named(&files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| named(&files.cert, &e))?;
    if certs.is_empty() {
        return Err(named(&files.cert, &"no certificate (PEM) in it"));
    }
    let fingerprint = warren_protocol::tunnel::fingerprint(certs[0].as_ref());
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| named(&files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), fingerprint))
}

/// Serves `app` over TLS on `listener` until `stop` is notified (connections under way finish
/// on their own). Each handler sees the client's address (`ConnectInfo`), as over plain HTTP.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router, stop: Arc<Notify>) {
    use tower::{Service as _, ServiceExt as _};
    let mut make = app.into_make_service_with_connect_info::<SocketAddr>();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: the listener stays, and tries again shortly.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.notified() => return,
        };
        let Ok(service) = make.call(peer).await;
        // As over plain HTTP: small writes (a tunnel's request-answer traffic) go out at once.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(tcp)).await
            else {
                return;
            };
            let hyper_service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    service.clone().oneshot(request.map(axum::body::Body::new))
                },
            );
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), hyper_service)
                .await;
        });
    }
}
