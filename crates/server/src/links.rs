//! How the control plane reaches each host's API (`warren_agent::host_api`): its own host's in
//! process, every other host's through the tunnel that host's agent holds open
//! (`warren_agent::tunnel`). The same requests either way, so nothing about a workspace depends
//! on which host it landed on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::client::conn::http2::SendRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult};
use crate::workspaces::Workspace;

/// Longest a host may take over the body of an error it answered.
const ERROR_WITHIN: Duration = Duration::from_secs(5);

/// Where a call goes: a workspace, and the host it is on.
#[derive(Debug, Clone)]
pub struct Place {
    pub host_id: String,
    /// The host's name, for messages.
    pub host: String,
    /// The workspace's name, for messages.
    pub workspace: String,
    /// The runtime's name for it (`ws-<id>`), which the host's API takes.
    pub runtime_id: String,
}

impl From<&Workspace> for Place {
    fn from(ws: &Workspace) -> Self {
        Self {
            host_id: ws.host_id.0.clone(),
            host: ws.host.clone(),
            workspace: ws.name.clone(),
            runtime_id: ws.id.runtime_id(),
        }
    }
}

/// Every host the control plane can reach now.
pub struct HostLinks {
    /// This process's host and its API, in process.
    local: Option<(String, Router)>,
    /// Whether agents' tunnels end in this process (not in a gateway-only one).
    tunnels: bool,
    /// Other hosts' tunnels, by host id, each with the number it was opened under (a host
    /// that reconnects replaces its old tunnel; only the newest one's end removes it).
    remote: Mutex<HashMap<String, (u64, SendRequest<Body>)>>,
    opened: AtomicU64,
}

impl std::fmt::Debug for HostLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLinks")
            .field("local", &self.local.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

/// The route one call takes.
enum Link {
    Local(Router),
    Remote(SendRequest<Body>),
}

impl HostLinks {
    /// `local`: this process's host id and its API, when this process runs workspaces.
    pub fn new(local: Option<(String, Router)>) -> Self {
        Self {
            local,
            tunnels: true,
            remote: Mutex::default(),
            opened: AtomicU64::new(0),
        }
    }

    /// For a gateway-only process (`warren gateway`): no host's API is reached from it.
    pub fn none() -> Self {
        Self {
            tunnels: false,
            ..Self::new(None)
        }
    }

    /// A host's tunnel is open; returns what [`Self::closed`] takes when it ends.
    pub fn opened(&self, host_id: &str, sender: SendRequest<Body>) -> u64 {
        let number = self.opened.fetch_add(1, Ordering::Relaxed);
        self.tunnels().insert(host_id.to_owned(), (number, sender));
        number
    }

    /// A host's tunnel ended (unless a newer one replaced it meanwhile).
    pub fn closed(&self, host_id: &str, number: u64) {
        let mut tunnels = self.tunnels();
        if tunnels.get(host_id).is_some_and(|(n, _)| *n == number) {
            tunnels.remove(host_id);
        }
    }

    fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, SendRequest<Body>)>> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self, ws: &Place) -> ApiResult<Link> {
        if let Some((id, api)) = &self.local
            && *id == ws.host_id
        {
            return Ok(Link::Local(api.clone()));
        }
        self.tunnels()
            .get(&ws.host_id)
            .map(|(_, sender)| Link::Remote(sender.clone()))
            .ok_or_else(|| {
                if !self.tunnels {
                    return ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "workspace `{}` is on host `{}`: this gateway reaches only its own host's workspaces (connect to the gateway of `warren up`)",
                            ws.workspace, ws.host
                        ),
                    );
                }
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "workspace `{}` is on host `{}`, whose agent is not connected now (is `warren agent` running there?)",
                        ws.workspace, ws.host
                    ),
                )
            })
    }

    /// Sends `request` (its path relative to the workspace: `exec`, `tasks`, ...) to the API
    /// of the workspace's host; the answer's head must come `within`.
    pub async fn call(
        &self,
        ws: &Place,
        method: Method,
        path: &str,
        body: Body,
        within: Duration,
    ) -> ApiResult<Response<Body>> {
        let uri = format!("http://host/workspaces/{}/{path}", ws.runtime_id);
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| ApiError::internal("host request", e))?;
        let unreachable = |e: &dyn std::fmt::Display| {
            tracing::warn!(host = %ws.host, error = %e, "host call failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("host `{}` did not answer: {e}", ws.host),
            )
        };
        let answer = tokio::time::timeout(within, async {
            match self.link(ws)? {
                Link::Local(api) => {
                    use tower::ServiceExt as _;
                    api.oneshot(request).await.map_err(|e| unreachable(&e))
                }
                Link::Remote(mut sender) => {
                    sender.ready().await.map_err(|e| unreachable(&e))?;
                    sender
                        .send_request(request)
                        .await
                        .map(|answer| answer.map(Body::new))
                        .map_err(|e| unreachable(&e))
                }
            }
        })
        .await
        .map_err(|_| unreachable(&format_args!("no answer within {} s", within.as_secs())))??;
        if answer.status().is_success() {
            return Ok(answer);
        }
        // The host's `{"error": ...}`, passed on: a missing task or a command that cannot run
        // is the caller's to fix; anything else is the host's.
        let status = answer.status();
        let text = tokio::time::timeout(ERROR_WITHIN, read_limited(answer.into_body(), 64 << 10))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        // Shown on users' terminals: kept printable, whatever the host sent.
        let message = warren_protocol::printable(
            &serde_json::from_slice::<warren_api::ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&text).into_owned()),
        );
        Err(match status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY => {
                ApiError::new(status, message)
            }
            _ => unreachable(&format_args!("{status}: {message}")),
        })
    }

    /// [`Self::call`] with a JSON body (or none) and a JSON answer of at most `limit` bytes,
    /// read whole `within`.
    pub async fn json<T: DeserializeOwned>(
        &self,
        ws: &Place,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        (within, limit): (Duration, usize),
    ) -> ApiResult<T> {
        let body = match body {
            Some(b) => Body::from(
                serde_json::to_vec(b).map_err(|e| ApiError::internal("host request", e))?,
            ),
            None => Body::empty(),
        };
        let deadline = tokio::time::Instant::now() + within;
        let answer = self.call(ws, method, path, body, within).await?;
        let bytes = tokio::time::timeout_at(deadline, read_limited(answer.into_body(), limit))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("host `{}` did not finish answering in time", ws.host),
                )
            })?
            .map_err(|e| {
                ApiError::new(StatusCode::BAD_GATEWAY, format!("host `{}`: {e}", ws.host))
            })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("host `{}` answered something else: {e}", ws.host),
            )
        })
    }
}

impl HostLinks {
    /// Task `task`'s terminal in workspace `ws`, both ways, through the workspace's host: what
    /// is written to it is typed into the task, what the task prints is read from it, until
    /// either side closes it.
    pub async fn attach(&self, ws: &Place, task: &str) -> ApiResult<HostStream> {
        let path = format!("tasks/{}/attach", task_segment(task));
        self.both_ways(ws, &path).await
    }

    /// A TCP connection to `port` on the workspace's own loopback, through its host, until
    /// either side closes it.
    pub async fn connect_port(&self, ws: &Place, port: u16) -> ApiResult<HostStream> {
        self.both_ways(ws, &format!("ports/{port}/connect")).await
    }

    /// A TCP connection from inside the workspace to `host:port` (a name resolved by its host),
    /// until either side closes it.
    pub async fn connect(&self, ws: &Place, host: &str, port: u16) -> ApiResult<HostStream> {
        let host = percent_encoding::utf8_percent_encode(host, percent_encoding::NON_ALPHANUMERIC);
        self.both_ways(ws, &format!("connect?host={host}&port={port}"))
            .await
    }

    /// A relayed SSH session with the workspace ([`warren_protocol::relay`]).
    pub async fn session(&self, ws: &Place) -> ApiResult<HostStream> {
        self.both_ways(ws, "sessions").await
    }

    /// A call whose request body (what is written to the answer) and answer body (what is
    /// read from it) both stream, as one byte stream.
    async fn both_ways(&self, ws: &Place, path: &str) -> ApiResult<HostStream> {
        use tokio::io::AsyncWriteExt as _;
        use warren_protocol::tunnel::STREAM_BUFFER;
        let (ours, theirs) = tokio::io::duplex(STREAM_BUFFER);
        let (typed, mut shown) = tokio::io::split(theirs);
        let input = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            typed,
            STREAM_BUFFER,
        ));
        let answer = self
            .call(ws, Method::POST, path, input, OPEN_WITHIN)
            .await?;
        let copy = tokio::spawn(async move {
            let mut output = answer.into_body().into_data_stream();
            while let Some(Ok(bytes)) = futures_util::StreamExt::next(&mut output).await {
                if shown.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = shown.shutdown().await;
        });
        Ok(HostStream {
            terminal: ours,
            copy: copy.abort_handle(),
        })
    }
}

/// Bytes both ways with something on a host (a task's terminal, a workspace's port);
/// dropping it ends the call (whatever the host does).
#[derive(Debug)]
pub struct HostStream {
    terminal: tokio::io::DuplexStream,
    copy: tokio::task::AbortHandle,
}

impl Drop for HostStream {
    fn drop(&mut self) {
        self.copy.abort();
    }
}

impl tokio::io::AsyncRead for HostStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.terminal).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HostStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.terminal).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.terminal).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.terminal).poll_shutdown(cx)
    }
}

/// Longest a host may take to open a task's terminal or a connection to a port.
const OPEN_WITHIN: Duration = Duration::from_secs(30);

/// A task's name as one segment of a host's path.
pub fn task_segment(task: &str) -> String {
    percent_encoding::utf8_percent_encode(task, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A body's bytes, refusing more than `limit`.
async fn read_limited(body: Body, limit: usize) -> Result<axum::body::Bytes, String> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}
