//! The agent's tunnel: one connection the agent opens to the control plane and keeps open, over
//! which the control plane calls this host's API ([`crate::host_api`]). The agent dials out, so
//! a host behind NAT or a firewall that only lets it out is reachable all the same.
//!
//! The agent asks `GET /api/v1/agent/tunnel` with its host token and
//! `Upgrade: warren-host-tunnel`; once the server switches protocols, the roles turn: the
//! control plane speaks HTTP/2 as the client, the agent serves. HTTP/2 carries many calls at
//! once, each streaming both ways (a `logs -f`, an attached terminal), and its pings notice a
//! connection gone dead on either side.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;

use crate::server_link::ServerLink;
use crate::servers::Servers;

pub use warren_protocol::tunnel::{KEEP_ALIVE, PATH, PROTOCOL};

/// Most the upgrade may take once connected.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the tunnel to the server open until `shutdown`, serving `api` over it; reconnects
/// after a failure, waiting longer each time (up to 30 s).
pub async fn hold(link: Arc<ServerLink>, api: Router, shutdown: Arc<Notify>) {
    let server = link.server.clone();
    // Waiting from now on, so a shutdown between the two waits below is not missed.
    let stop = shutdown.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    let mut wait = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = serve_once(&link, api.clone()) => r,
            _ = &mut stop => return,
        };
        match result {
            Ok(()) => tracing::info!(server, "the tunnel to the control plane closed"),
            Err(e) => tracing::warn!(server, error = %e, "no tunnel to the control plane"),
        }
        // A tunnel that held a while starts the waits over.
        if started.elapsed() > Duration::from_secs(60) {
            wait = Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return,
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// How often the list of replicas is asked for again.
const REFRESH_SERVERS: Duration = Duration::from_secs(10);

/// Keeps a tunnel open to every replica of `servers` but `except` (this process's own, for a
/// replica's host) until `shutdown`, asking every [`REFRESH_SERVERS`] which replicas there are.
pub async fn hold_all(
    servers: Arc<Servers>,
    except: Option<String>,
    api: Router,
    shutdown: Arc<Notify>,
) {
    let stop = shutdown.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    let mut held: std::collections::HashMap<String, Arc<Notify>> = Default::default();
    loop {
        if let Err(e) = servers.refresh().await {
            tracing::debug!(error = %e, "cannot ask which replicas there are");
        }
        let links = servers.links();
        for link in links
            .iter()
            .filter(|l| except.as_deref() != Some(l.server.as_str()))
        {
            if !held.contains_key(&link.server) {
                let stop = Arc::new(Notify::new());
                tokio::spawn(hold(link.clone(), api.clone(), stop.clone()));
                held.insert(link.server.clone(), stop);
            }
        }
        held.retain(|server, stop| {
            let named = links.iter().any(|l| &l.server == server);
            if !named {
                tracing::info!(server, "a replica went away: its tunnel closes");
                stop.notify_one();
            }
            named
        });
        tokio::select! {
            () = tokio::time::sleep(REFRESH_SERVERS) => {}
            () = &mut stop => break,
        }
    }
    for stop in held.values() {
        stop.notify_one();
    }
}

/// One tunnel: connects (over TLS to an `https` server), upgrades, serves until the
/// connection ends.
async fn serve_once(link: &ServerLink, api: Router) -> Result<(), String> {
    let stream = link.connect(false).await.map_err(|e| e.to_string())?;
    let authority = &link.authority;
    let upgraded = tokio::time::timeout(UPGRADE_TIMEOUT, async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection.with_upgrades());
        let request = Request::get(PATH)
            .header(header::HOST, authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", link.token()))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, PROTOCOL)
            .body(Empty::<axum::body::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = answer.status();
            let body = answer
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(format!(
                "the server answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            ));
        }
        hyper::upgrade::on(answer)
            .await
            .map_err(|e| format!("upgrade: {e}"))
    })
    .await
    .map_err(|_| format!("{authority} did not answer within {UPGRADE_TIMEOUT:?}"))??;
    tracing::info!(server = link.server, "tunnel to the control plane open");
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        // Calls at once: commands run to their end hold theirs (the server lets each user
        // hold 16), and each relayed SSH session or forwarded connection one (the gateway lets
        // each user hold 64 and 256): room for many users before one crowds out the others.
        .max_concurrent_streams(16_384)
        .max_frame_size(warren_protocol::tunnel::MAX_FRAME_SIZE)
        .serve_connection(upgraded, hyper_util::service::TowerToHyperService::new(api))
        .await
        .map_err(|e| e.to_string())
}
