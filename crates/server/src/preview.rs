//! Preview URLs: HTTP and WebSocket traffic to a port on a workspace's own loopback,
//! `/preview/<owner>/<workspace>/<port>/...`, through the workspace's host (in process, or its
//! agent's tunnel), streamed both ways.
//!
//! Previews are served on a listener of their own (`warren up --preview-listen`), never on the
//! web UI's: a preview's page is the workspace's code, and on the UI's origin it could read the
//! UI's pages (and their CSRF token) as whoever views it. On another port it is another
//! origin; the browser still sends the UI's session cookie (cookies ignore ports), which is how
//! a private preview knows its owner. That cookie is taken out of what the workspace is sent,
//! and a workspace cannot set it back.
//!
//! Who may reach a port is its owner's choice (`private`, the default: the owner's session;
//! `users`: anyone signed in; `public`). Anything else answers 404, the same as a preview that
//! does not exist.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use hyper_util::rt::TokioIo;

use crate::error::{ApiError, ApiResult};
use crate::model::WorkspaceState;
use crate::state::AppState;
use crate::workspaces::{self, Workspace};
use warren_api::PortAccess;

/// Where preview URLs are served.
#[derive(Debug, Clone, Default)]
pub struct PreviewConfig {
    /// The start of every preview URL, when set (`--preview-url`, e.g. behind a proxy).
    pub url: Option<String>,
    /// The preview listener's port: without a URL, previews are linked on the host name the
    /// browser used for the UI, at this port.
    pub port: Option<u16>,
    /// Whether the listener serves HTTPS.
    pub https: bool,
}

/// Longest a workspace's server may take to answer a request's head (long polls included).
const HEAD_WITHIN: Duration = Duration::from_secs(300);
/// Longest the HTTP handshake over a new connection to a port may take.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// The preview listener's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/preview/{owner}/{workspace}/{port}", any(without_slash))
        .route("/preview/{owner}/{workspace}/{port}/", any(root))
        .route("/preview/{owner}/{workspace}/{port}/{*rest}", any(path))
        .fallback(|| async { refused() })
        .with_state(state)
}

/// A preview's URL, or `None` when this server serves none.
pub fn url_of(
    state: &AppState,
    ui_headers: &HeaderMap,
    owner: &str,
    workspace: &str,
    port: u16,
) -> Option<String> {
    let tail = format!("/preview/{owner}/{workspace}/{port}/");
    match (&state.previews.url, state.previews.port) {
        (Some(base), _) => Some(format!("{}{tail}", base.trim_end_matches('/'))),
        (None, Some(listener)) => {
            let host = ui_headers.get(header::HOST)?.to_str().ok()?;
            // `name:port`, `[v6]:port`, or a name alone.
            let name = match host.rsplit_once(':') {
                Some((name, digits))
                    if digits.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') =>
                {
                    name
                }
                _ => host,
            };
            let scheme = if state.previews.https {
                "https"
            } else {
                "http"
            };
            Some(format!("{scheme}://{name}:{listener}{tail}"))
        }
        (None, None) => None,
    }
}

fn refused() -> Response {
    (
        StatusCode::NOT_FOUND,
        "no preview here (a private preview needs its owner signed in to Warren in this browser)\n",
    )
        .into_response()
}

async fn without_slash(Path((owner, workspace, port)): Path<(String, String, String)>) -> Response {
    axum::response::Redirect::permanent(&format!("/preview/{owner}/{workspace}/{port}/"))
        .into_response()
}

async fn root(
    State(state): State<AppState>,
    Path((owner, workspace, port)): Path<(String, String, u16)>,
    request: Request,
) -> Response {
    proxy(&state, &owner, &workspace, port, "", request).await
}

async fn path(
    State(state): State<AppState>,
    Path((owner, workspace, port, rest)): Path<(String, String, u16, String)>,
    request: Request,
) -> Response {
    proxy(&state, &owner, &workspace, port, &rest, request).await
}

async fn proxy(
    state: &AppState,
    owner: &str,
    workspace: &str,
    port: u16,
    rest: &str,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let viewer = crate::ui::Session::from_request_parts(&mut parts, state)
        .await
        .ok();
    let ws = match allowed(state, owner, workspace, port, viewer.as_ref()).await {
        Ok(Some(ws)) => ws,
        Ok(None) => return refused(),
        Err(e) => return (e.status, e.message).into_response(),
    };
    if ws.state != WorkspaceState::Running {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "workspace `{workspace}` is {}: start it to see its preview\n",
                ws.state
            ),
        )
            .into_response();
    }
    // Preview traffic is use: the workspace is not idle while a request or a socket lasts.
    let in_use = state.presence.in_use(&ws.id.0);
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let prefix = format!("/preview/{owner}/{workspace}/{port}");
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip());
    let chain: Vec<&[u8]> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let client = crate::client::client_addr(peer, &chain, &state.trusted_proxies);
    // The path as the browser sent it (still percent-encoded), without the preview's prefix.
    let path = parts
        .uri
        .path()
        .strip_prefix(prefix.as_str())
        .filter(|p| p.starts_with('/'))
        .map_or_else(|| format!("/{rest}"), str::to_owned);
    let Ok(mut upstream) = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{path}{query}"))
        .body(body)
    else {
        return (
            StatusCode::BAD_REQUEST,
            "not a request a server can be sent\n",
        )
            .into_response();
    };
    *upstream.headers_mut() = forwarded_headers(&parts.headers, port, &prefix, client);
    let mut answer = match send(state, &ws, port, upstream).await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("{}\n", e.message)).into_response(),
    };
    let theirs = hyper::upgrade::on(&mut answer);
    let (mut head, incoming) = answer.into_parts();
    strip_hop_by_hop(
        &mut head.headers,
        head.status == StatusCode::SWITCHING_PROTOCOLS,
    );
    keep_warren_cookies_out(&mut head.headers);
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        // A WebSocket (or another upgrade): both sides' connections, joined, for as long as
        // either keeps it.
        drop(incoming);
        if let Some(ours) = on_upgrade {
            tokio::spawn(async move {
                let _in_use = in_use;
                if let (Ok(ours), Ok(theirs)) = (ours.await, theirs.await) {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(ours),
                        &mut TokioIo::new(theirs),
                    )
                    .await;
                }
            });
        }
        return Response::from_parts(head, Body::empty());
    }
    // The body streams as it comes; the use lasts as long as it does.
    let stream = futures_util::StreamExt::map(
        http_body_util::BodyExt::into_data_stream(incoming),
        move |piece| {
            let _in_use = &in_use;
            piece
        },
    );
    Response::from_parts(head, Body::from_stream(stream))
}

/// The workspace `owner`/`workspace` when `viewer` may reach its `port`, else `None`.
async fn allowed(
    state: &AppState,
    owner: &str,
    workspace: &str,
    port: u16,
    viewer: Option<&crate::ui::Session>,
) -> ApiResult<Option<Workspace>> {
    let Some(ws) = workspaces::select(
        &state.db,
        "WHERE w.name = $1 AND u.name = $2",
        &[workspace, owner],
    )
    .await?
    .into_iter()
    .next() else {
        return Ok(None);
    };
    let access = port_access(state, &ws.id.0, port).await?;
    let may = match access {
        PortAccess::Public => true,
        PortAccess::Users => viewer.is_some(),
        PortAccess::Private => viewer.is_some_and(|v| v.caller.user_id == ws.owner_id),
    };
    Ok(may.then_some(ws))
}

/// Who may reach `port` of workspace `id` (private unless its owner said otherwise).
pub(crate) async fn port_access(state: &AppState, id: &str, port: u16) -> ApiResult<PortAccess> {
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT access FROM workspace_ports WHERE workspace_id = $1 AND port = $2",
    )
    .bind(id)
    .bind(i64::from(port))
    .fetch_optional(&state.db.pool)
    .await?;
    Ok(stored
        .and_then(|a| a.parse().ok())
        .unwrap_or(PortAccess::Private))
}

/// Sends `request` to `port` of the workspace over a new connection through its host.
async fn send(
    state: &AppState,
    ws: &Workspace,
    port: u16,
    request: axum::http::Request<Body>,
) -> ApiResult<axum::http::Response<hyper::body::Incoming>> {
    let stream = state.hosts.connect_port(&ws.into(), port).await?;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("port {port} of workspace `{}`: {what}: {e}", ws.name),
        )
    };
    let (mut sender, connection) = tokio::time::timeout(
        HANDSHAKE_WITHIN,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|e| failed("no HTTP handshake", &e))?
    .map_err(|e| failed("no HTTP handshake", &e))?;
    tokio::spawn(connection.with_upgrades());
    tokio::time::timeout(HEAD_WITHIN, sender.send_request(request))
        .await
        .map_err(|e| failed("no answer", &e))?
        .map_err(|e| failed("no answer", &e))
}

/// Headers that describe one hop, not the request: never passed on (but an upgrade's own).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    for name in HOP_BY_HOP {
        if upgrading && name == "connection" {
            continue;
        }
        headers.remove(name);
    }
    if !upgrading {
        headers.remove(header::UPGRADE);
    }
}

/// What the workspace's server is sent: the browser's headers without the hop's, without
/// Warren's cookies, with `Host: localhost:<port>` (what dev servers accept) and where the
/// request came from.
fn forwarded_headers(
    from: &HeaderMap,
    port: u16,
    prefix: &str,
    client: std::net::IpAddr,
) -> HeaderMap {
    let upgrading = from.contains_key(header::UPGRADE);
    let mut headers = from.clone();
    strip_hop_by_hop(&mut headers, upgrading);
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let original_host = headers.remove(header::HOST);
    let cookies: Vec<String> = from
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !is_warren_cookie(c.split('=').next().unwrap_or_default()))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(value) = HeaderValue::from_str(&cookies.join("; "))
        && !cookies.is_empty()
    {
        headers.insert(header::COOKIE, value);
    }
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, host);
    }
    if let Some(host) = original_host {
        headers.insert("x-forwarded-host", host);
    }
    if let Ok(prefix) = HeaderValue::from_str(prefix) {
        headers.insert("x-forwarded-prefix", prefix);
    }
    if let Ok(client) = HeaderValue::from_str(&client.to_string()) {
        headers.insert("x-forwarded-for", client);
    }
    headers
}

fn is_warren_cookie(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case(crate::ui::COOKIE)
}

/// A workspace's server may set its own cookies, never Warren's.
fn keep_warren_cookies_out(headers: &mut HeaderMap) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let text = String::from_utf8_lossy(v.as_bytes());
            !is_warren_cookie(text.split('=').next().unwrap_or_default())
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in kept {
        headers.append(header::SET_COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap_or(header::ACCEPT),
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        map
    }

    #[test]
    fn the_workspace_never_sees_the_viewers_session() {
        let sent = forwarded_headers(
            &headers(&[
                ("host", "devbox:7071"),
                (
                    "cookie",
                    "theme=dark; warren_session=secret; WARREN_SESSION=x",
                ),
                ("cookie", "b=2"),
                ("connection", "keep-alive"),
                ("accept", "text/html"),
            ]),
            8000,
            "/preview/alice/web/8000",
            std::net::Ipv4Addr::LOCALHOST.into(),
        );
        assert_eq!(
            sent.get("cookie").map(|v| v.as_bytes()),
            Some(&b"theme=dark; b=2"[..])
        );
        assert_eq!(
            sent.get("host").map(|v| v.as_bytes()),
            Some(&b"localhost:8000"[..])
        );
        assert_eq!(
            sent.get("x-forwarded-host").map(|v| v.as_bytes()),
            Some(&b"devbox:7071"[..])
        );
        assert!(sent.get("connection").is_none());
        assert_eq!(
            sent.get("accept").map(|v| v.as_bytes()),
            Some(&b"text/html"[..])
        );
        let only_ours = forwarded_headers(
            &headers(&[("cookie", "warren_session=secret")]),
            1,
            "/p",
            std::net::Ipv4Addr::LOCALHOST.into(),
        );
        assert!(only_ours.get("cookie").is_none());
    }

    #[test]
    fn a_websocket_keeps_its_upgrade() {
        let sent = forwarded_headers(
            &headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]),
            1,
            "/p",
            std::net::Ipv4Addr::LOCALHOST.into(),
        );
        assert_eq!(
            sent.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            sent.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn the_workspace_cannot_set_warrens_cookie() {
        let mut answer = headers(&[
            ("set-cookie", "warren_session=attacker; Path=/"),
            ("set-cookie", "app=1; Path=/"),
        ]);
        keep_warren_cookies_out(&mut answer);
        let left: Vec<_> = answer.get_all("set-cookie").iter().collect();
        assert_eq!(left, [HeaderValue::from_static("app=1; Path=/")]);
    }
}
