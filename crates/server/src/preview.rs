//! Preview URLs: HTTP and WebSocket traffic to a port on a workspace's own loopback, through
//! the workspace's host (in process, or its agent's tunnel), streamed both ways. Served on a
//! listener of their own (`warren up --preview-listen`), never on the web UI's origin: a
//! preview's page is the workspace's code, and on the UI's origin it could read the UI's pages
//! (and their CSRF token) as whoever views it.
//!
//! Two forms:
//! - Host-based, with a preview domain (`--preview-domain D`, a wildcard DNS name):
//!   `<port>-<workspace id>.D`. Each port is an origin of its own, so one preview's page cannot
//!   read another's. A port that is not public needs a grant for its host: the UI hands a
//!   signed-in user's browser a single-use ticket (`/previews/<id>/<port>` on the UI), which
//!   the preview host exchanges for a cookie of its own (`/__warren/enter`). The UI's session
//!   never authorizes a preview.
//! - Path-based, without a domain: `/preview/<owner>/<workspace>/<port>/`. Every such preview
//!   shares one origin, where a page of one could read another as its viewer, so only public
//!   ports are served this way.
//!
//! Who may reach a port is its owner's choice: `private` (the default: its owner), `users`
//! (anyone signed in) or `public`. Any refusal is the same 404 as a preview that does not exist.
//! Warren's cookies never reach the workspace, and the workspace cannot set them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hyper_util::rt::TokioIo;

use crate::auth::token_hash;
use crate::db::{now_ms, random_bytes};
use crate::error::{ApiError, ApiResult};
use crate::model::WorkspaceState;
use crate::state::AppState;
use crate::workspaces::{self, Workspace};
use warren_api::PortAccess;

/// Where preview URLs are served.
#[derive(Debug, Clone, Default)]
pub struct PreviewConfig {
    /// Path-based: the start of every preview URL, when set (`--preview-url`, behind a proxy).
    /// Host-based: its scheme and port are the previews' (its host is not used).
    pub url: Option<String>,
    /// The preview listener's port.
    pub port: Option<u16>,
    /// Whether the listener serves HTTPS.
    pub https: bool,
    /// Host-based previews under this domain (`--preview-domain`).
    pub domain: Option<String>,
}

/// Longest a workspace's server may take to answer a request's head (long polls included).
const HEAD_WITHIN: Duration = Duration::from_secs(300);
/// Longest the HTTP handshake over a new connection to a port may take.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// An upgraded connection (a WebSocket) with no byte either way for this long is closed.
const UPGRADED_IDLE: Duration = Duration::from_secs(600);
/// Preview connections at once per workspace, and in all (each holds a stream to its host).
const PER_WORKSPACE: usize = 64;
const IN_ALL: usize = 512;
/// How long a ticket and a preview cookie are good for.
const TICKET_MS: i64 = 2 * 60 * 1000;
const GRANT_MS: i64 = 12 * 3600 * 1000;
/// The preview host's own cookie (with `__Host-` over HTTPS: only that host may set it), and
/// where a ticket is exchanged for it.
const PREVIEW_COOKIE: &str = "warren_preview";
const SECURE_PREVIEW_COOKIE: &str = "__Host-warren_preview";
/// How often a connection that lasts is checked against who may still reach the port.
const RECHECK: Duration = Duration::from_secs(60);
const ENTER: &str = "/__warren/enter";

/// The preview listener: every request, host-based or path-based.
pub fn router(state: AppState) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// The connections previews hold now.
#[derive(Debug, Default)]
pub struct PreviewSlots {
    per_workspace: Arc<crate::state::PerUser>,
    all: Arc<crate::state::PerUser>,
}

async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    if let Some(target) = host_target(&state, &request) {
        return match target {
            Some((id, port)) => by_host(&state, &id, port, request).await,
            None => refused(),
        };
    }
    by_path(&state, request).await
}

/// Whether the request names a host-based preview (`Some`), and which: `(workspace id,
/// port)`, or `None` for a name under the domain that names none.
fn host_target(state: &AppState, request: &Request) -> Option<Option<(String, u16)>> {
    let domain = state.previews.domain.as_deref()?;
    let host = request
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            let value = request.headers().get(header::HOST)?.to_str().ok()?;
            Some(value.rsplit_once(':').map_or(value, |(h, _)| h).to_owned())
        })?
        .to_ascii_lowercase();
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    Some(parse_label(label))
}

/// `<port>-<workspace id>`.
fn parse_label(label: &str) -> Option<(String, u16)> {
    let (port, id) = label.split_once('-')?;
    let port = port_number(port)?;
    let is_id = !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| (id.to_owned(), port))
}

/// A port as written in a preview's name: digits only, no leading zero (one name per port).
fn port_number(text: &str) -> Option<u16> {
    let port: u16 = text.parse().ok().filter(|&p| p > 0)?;
    (port.to_string() == text).then_some(port)
}

/// A port's host label.
fn label_of(id: &str, port: u16) -> String {
    format!("{port}-{id}")
}

/// The preview's URL: host-based with a domain, else path-based; `None` when this server
/// serves no previews.
pub fn url_of(
    state: &AppState,
    ui_headers: &HeaderMap,
    ws: &Workspace,
    port: u16,
) -> Option<String> {
    let listener = state.previews.port?;
    let scheme = if state.previews.https {
        "https"
    } else {
        "http"
    };
    // The preview URL's scheme and port: `--preview-url`'s when set, else the listener's.
    let (scheme, port_part) = match &state.previews.url {
        Some(url) => {
            let (scheme, rest) = url.split_once("://").unwrap_or((scheme, url));
            let authority = rest.split('/').next().unwrap_or_default();
            let port_part = match authority.rsplit_once(':') {
                Some((_, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!(":{p}"),
                _ => String::new(),
            };
            (scheme.to_owned(), port_part)
        }
        None => (scheme.to_owned(), format!(":{listener}")),
    };
    if let Some(domain) = &state.previews.domain {
        return Some(format!(
            "{scheme}://{}.{domain}{port_part}/",
            label_of(&ws.id.0, port)
        ));
    }
    let tail = format!("/preview/{}/{}/{port}/", ws.owner, ws.name);
    if let Some(base) = &state.previews.url {
        return Some(format!("{}{tail}", base.trim_end_matches('/')));
    }
    let host = ui_headers.get(header::HOST)?.to_str().ok()?;
    // `name:port`, `[v6]:port`, or a name alone.
    let name = match host.rsplit_once(':') {
        Some((name, digits))
            if digits.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') =>
        {
            name
        }
        _ => host,
    };
    Some(format!("{scheme}://{name}{port_part}{tail}"))
}

/// A single-use ticket that lets `user_id`'s browser into port `port` of workspace `ws` (the
/// UI checked that they may), and the URL that spends it; `None` without a preview domain.
pub(crate) async fn ticket_url(
    state: &AppState,
    ws: &Workspace,
    port: u16,
    session: &crate::ui::Session,
) -> ApiResult<Option<String>> {
    let Some(domain) = &state.previews.domain else {
        return Ok(None);
    };
    let Some(url) = url_of(state, &HeaderMap::new(), ws, port) else {
        return Ok(None);
    };
    let ticket = hex::encode(random_bytes::<32>());
    let host = format!("{}.{domain}", label_of(&ws.id.0, port));
    let from = Grant {
        user_id: session.caller.user_id.clone(),
        session_hash: session.token_hash.clone(),
    };
    grant(state, &ticket, "ticket", &from, &host, TICKET_MS).await?;
    Ok(Some(format!(
        "{}{}?ticket={ticket}",
        url.trim_end_matches('/'),
        ENTER
    )))
}

/// Who a grant is for: a user, while one UI session of theirs lasts.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Grant {
    user_id: String,
    session_hash: String,
}

async fn grant(
    state: &AppState,
    token: &str,
    kind: &str,
    to: &Grant,
    host: &str,
    lasts_ms: i64,
) -> ApiResult<()> {
    let now = now_ms();
    sqlx::query("DELETE FROM preview_grants WHERE expires_at <= $1")
        .bind(now)
        .execute(&state.db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO preview_grants (token_hash, kind, user_id, session_hash, host, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(token_hash(token))
    .bind(kind)
    .bind(&to.user_id)
    .bind(&to.session_hash)
    .bind(host)
    .bind(now + lasts_ms)
    .execute(&state.db.pool)
    .await?;
    Ok(())
}

/// Who a grant of `kind` for `host` is for, while it and its UI session hold.
async fn granted(
    state: &AppState,
    token: &str,
    kind: &str,
    host: &str,
) -> ApiResult<Option<Grant>> {
    Ok(sqlx::query_as::<_, Grant>(
        "SELECT g.user_id, g.session_hash FROM preview_grants g JOIN sessions s ON s.token_hash = g.session_hash
         WHERE g.token_hash = $1 AND g.kind = $2 AND g.host = $3 AND g.expires_at > $4 AND s.expires_at > $4",
    )
    .bind(token_hash(token))
    .bind(kind)
    .bind(host)
    .bind(now_ms())
    .fetch_optional(&state.db.pool)
    .await?)
}

fn refused() -> Response {
    (
        StatusCode::NOT_FOUND,
        "no preview here (a port that is not public opens from its workspace's page in Warren)\n",
    )
        .into_response()
}

fn failed(e: &ApiError) -> Response {
    (e.status, format!("{}\n", e.message)).into_response()
}

/// `<port>-<id>.<domain>`: the ticket exchange, or the port, for whoever its grant names.
async fn by_host(state: &AppState, id: &str, port: u16, request: Request) -> Response {
    let Some(domain) = &state.previews.domain else {
        return refused();
    };
    let host = format!("{}.{domain}", label_of(id, port));
    if request.uri().path() == ENTER {
        let query = request.uri().query().unwrap_or_default().to_owned();
        return enter(state, &host, &query).await;
    }
    let ws = match workspaces::select(&state.db, "WHERE w.id = $1", &[id]).await {
        Ok(found) => match found.into_iter().next() {
            Some(ws) => ws,
            None => return refused(),
        },
        Err(e) => return failed(&e),
    };
    let access = match port_access(state, &ws.id.0, port).await {
        Ok(access) => access,
        Err(e) => return failed(&e),
    };
    let pass = if access == PortAccess::Public {
        Pass::Public
    } else {
        // Every value the browser sent is tried (a page under the domain may have planted
        // another cookie of the name): a grant holds only for its own host.
        let name = if state.previews.https {
            SECURE_PREVIEW_COOKIE
        } else {
            PREVIEW_COOKIE
        };
        let mut found = None;
        let tokens: Vec<String> = crate::ui::cookies_named(request.headers(), name)
            .map(str::to_owned)
            .collect();
        for token in tokens {
            let pass = Pass::Grant {
                token,
                host: host.clone(),
            };
            match passes(state, &ws, port, &pass).await {
                Ok(true) => {
                    found = Some(pass);
                    break;
                }
                Ok(false) => {}
                Err(e) => return failed(&e),
            }
        }
        match found {
            Some(pass) => pass,
            None => return refused(),
        }
    };
    proxy(state, &ws, port, "", request, pass).await
}

/// How a request was let in, to ask again while its connection lasts.
#[derive(Debug, Clone)]
enum Pass {
    /// The port is public.
    Public,
    /// A grant (the cookie's token) for this host.
    Grant { token: String, host: String },
}

/// Whether `pass` still lets its holder reach `port` of `ws`.
async fn passes(state: &AppState, ws: &Workspace, port: u16, pass: &Pass) -> ApiResult<bool> {
    let access = port_access(state, &ws.id.0, port).await?;
    Ok(match pass {
        Pass::Public => access == PortAccess::Public,
        Pass::Grant { token, host } => {
            access == PortAccess::Public
                || match granted(state, token, "cookie", host).await? {
                    Some(grant) => access == PortAccess::Users || grant.user_id == ws.owner_id,
                    None => false,
                }
        }
    })
}

/// Completes when `pass` no longer holds (the port closed, the grant or its session ended),
/// looking every [`RECHECK`]; a database that cannot answer is asked again later.
async fn revoked(state: AppState, ws: Workspace, port: u16, pass: Pass) {
    loop {
        tokio::time::sleep(RECHECK).await;
        if let Ok(false) = passes(&state, &ws, port, &pass).await {
            return;
        }
    }
}

/// `/__warren/enter?ticket=T`: spends the ticket and gives the browser this host's cookie,
/// then goes to the preview's front page.
async fn enter(state: &AppState, host: &str, query: &str) -> Response {
    let field = |name: &str| {
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    };
    let Some(ticket) = field("ticket") else {
        return refused();
    };
    // Spent as it is read: of two requests with one ticket, one gets it.
    let spent = sqlx::query_as::<_, Grant>(
        "DELETE FROM preview_grants WHERE token_hash = $1 AND kind = 'ticket' AND host = $2 AND expires_at > $3
         RETURNING user_id, session_hash",
    )
    .bind(token_hash(&ticket))
    .bind(host)
    .bind(now_ms())
    .fetch_optional(&state.db.pool)
    .await;
    let from = match spent {
        Ok(Some(from)) => from,
        Ok(None) => return refused(),
        Err(e) => return failed(&e.into()),
    };
    let token = hex::encode(random_bytes::<32>());
    if let Err(e) = grant(state, &token, "cookie", &from, host, GRANT_MS).await {
        return failed(&e);
    }
    // Lax: the browser comes here from the UI, another site.
    let name = if state.previews.https {
        SECURE_PREVIEW_COOKIE
    } else {
        PREVIEW_COOKIE
    };
    let cookie = cookie::Cookie::build((name, token))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Lax)
        .secure(state.previews.https)
        .max_age(cookie::time::Duration::seconds(GRANT_MS / 1000))
        .build();
    match HeaderValue::from_str(&cookie.to_string()) {
        Ok(value) => ([(header::SET_COOKIE, value)], Redirect::to("/")).into_response(),
        Err(_) => refused(),
    }
}

/// `/preview/<owner>/<workspace>/<port>/...`: public ports only.
async fn by_path(state: &AppState, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/preview/") else {
        return refused();
    };
    let mut parts = rest.splitn(4, '/');
    let (Some(owner), Some(workspace), Some(port)) = (parts.next(), parts.next(), parts.next())
    else {
        return refused();
    };
    let Some(port) = port_number(port) else {
        return refused();
    };
    let Some(tail) = parts.next() else {
        let query = request
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        return Redirect::permanent(&format!("/preview/{owner}/{workspace}/{port}/{query}"))
            .into_response();
    };
    let found = workspaces::select(
        &state.db,
        "WHERE w.name = $1 AND u.name = $2",
        &[workspace, owner],
    )
    .await;
    let ws = match found {
        Ok(found) => match found.into_iter().next() {
            Some(ws) => ws,
            None => return refused(),
        },
        Err(e) => return failed(&e),
    };
    match port_access(state, &ws.id.0, port).await {
        Ok(PortAccess::Public) => {}
        Ok(_) => return refused(),
        Err(e) => return failed(&e),
    }
    let prefix = format!("/preview/{owner}/{workspace}/{port}");
    // What the workspace's server is asked: the path under the prefix, as the browser sent it.
    let mut request = request;
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    match format!("/{tail}{query}").parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return refused(),
    }
    proxy(state, &ws, port, &prefix, request, Pass::Public).await
}

/// Sends the request to the workspace's port and streams the answer back. `prefix`: the
/// path the browser sees the preview under (path-based), for `X-Forwarded-Prefix`.
async fn proxy(
    state: &AppState,
    ws: &Workspace,
    port: u16,
    prefix: &str,
    request: Request,
    pass: Pass,
) -> Response {
    if ws.state != WorkspaceState::Running {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "workspace `{}` is {}: start it to see its preview\n",
                ws.name, ws.state
            ),
        )
            .into_response();
    }
    let Some(slot) = state
        .preview_slots
        .per_workspace
        .admit(&ws.id.0, PER_WORKSPACE)
    else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "this workspace's previews are busy: try again\n",
        )
            .into_response();
    };
    let Some(all) = state.preview_slots.all.admit("", IN_ALL) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "previews are busy: try again\n",
        )
            .into_response();
    };
    let slots = (slot, all);
    // Preview traffic is use: the workspace is not idle while a request or a socket lasts.
    let in_use = state.presence.in_use(&ws.id.0);
    let (mut parts, body) = request.into_parts();
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let client = crate::client::client_of(&parts, &state.trusted_proxies)
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let Ok(mut upstream) = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
        .body(body)
    else {
        return (
            StatusCode::BAD_REQUEST,
            "not a request a server can be sent\n",
        )
            .into_response();
    };
    *upstream.headers_mut() =
        forwarded_headers(&parts.headers, port, prefix, client, state.previews.https);
    let mut answer = match send(state, ws, port, upstream).await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("{}\n", e.message)).into_response(),
    };
    let theirs = hyper::upgrade::on(&mut answer);
    let (mut head, incoming) = answer.into_parts();
    let upgrading = head.status == StatusCode::SWITCHING_PROTOCOLS;
    answer_headers(&mut head.headers, upgrading);
    if !prefix.is_empty() {
        // Path-based previews share one origin: each page gets an opaque one of its own, with
        // no cookies or storage, and sets none.
        head.headers.remove(header::SET_COOKIE);
        head.headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads",
            ),
        );
    }
    // Until who may reach the port changes (it is closed, the grant or its session ends).
    let revoked = revoked(state.clone(), ws.clone(), port, pass);
    if upgrading {
        // A WebSocket (or another upgrade): both sides joined, until either ends it, it
        // stays silent both ways for UPGRADED_IDLE, or the pass no longer holds.
        drop(incoming);
        if let Some(ours) = on_upgrade {
            tokio::spawn(async move {
                let _held = (in_use, slots);
                if let (Ok(ours), Ok(theirs)) = (ours.await, theirs.await) {
                    let joined =
                        join_until_idle(TokioIo::new(ours), TokioIo::new(theirs), UPGRADED_IDLE);
                    tokio::select! {
                        () = joined => {}
                        () = revoked => {}
                    }
                }
            });
        }
        return Response::from_parts(head, Body::empty());
    }
    // The body streams as it comes (until the pass no longer holds); the use (and the slots)
    // last as long as it does.
    let held = (in_use, slots);
    let stream = futures_util::StreamExt::map(
        futures_util::StreamExt::take_until(
            http_body_util::BodyExt::into_data_stream(incoming),
            Box::pin(revoked),
        ),
        move |piece| {
            let _held = &held;
            piece
        },
    );
    Response::from_parts(head, Body::from_stream(stream))
}

/// Copies both ways at once until either side ends, or nothing moves either way for `idle`.
async fn join_until_idle<A, B>(a: A, b: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = tokio::time::Instant::now();
    let moved_at = std::sync::atomic::AtomicU64::new(0);
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let quiet = async {
        loop {
            tokio::time::sleep(idle / 10).await;
            let last = moved_at.load(std::sync::atomic::Ordering::Relaxed);
            if started.elapsed().as_millis() as u64 - last >= idle.as_millis() as u64 {
                return;
            }
        }
    };
    tokio::select! {
        () = pump(a_read, b_write, started, &moved_at) => {}
        () = pump(b_read, a_write, started, &moved_at) => {}
        () = quiet => {}
    }
}

/// Copies `from` to `to` until either ends, noting when bytes last moved (ms since `started`).
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    started: tokio::time::Instant,
    moved_at: &std::sync::atomic::AtomicU64,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut piece = vec![0u8; 16 << 10];
    while let Ok(n @ 1..) = from.read(&mut piece).await {
        if to.write_all(&piece[..n]).await.is_err() {
            break;
        }
        moved_at.store(
            started.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let _ = to.shutdown().await;
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

/// Removes the hop's headers, and those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "upgrade")
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
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
/// Warren's cookies and without what only Warren may say about the request, with
/// `Host: localhost:<port>` (what dev servers accept) and where the request came from.
fn forwarded_headers(
    from: &HeaderMap,
    port: u16,
    prefix: &str,
    client: IpAddr,
    https: bool,
) -> HeaderMap {
    let upgrading = from.contains_key(header::UPGRADE);
    let mut headers = from.clone();
    strip_hop_by_hop(&mut headers, upgrading);
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let original_host = headers.remove(header::HOST);
    for name in [
        "forwarded",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
    ] {
        headers.remove(name);
    }
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
    if !prefix.is_empty()
        && let Ok(prefix) = HeaderValue::from_str(prefix)
    {
        headers.insert("x-forwarded-prefix", prefix);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Ok(client) = HeaderValue::from_str(&client.to_string()) {
        headers.insert("x-forwarded-for", client);
    }
    headers
}

fn is_warren_cookie(name: &str) -> bool {
    let name = name.trim();
    name.is_empty()
        || name.eq_ignore_ascii_case(crate::ui::COOKIE)
        || name.eq_ignore_ascii_case(PREVIEW_COOKIE)
        || name.to_ascii_lowercase().starts_with("__host-")
}

/// What the browser is sent of the workspace's answer: not the hop's headers, no cookie of
/// Warren's (nor one for another host, nor a nameless one), and nothing that would reach
/// beyond this preview (a service worker's wider scope, clearing the site's data, HSTS for
/// every port of the host).
fn answer_headers(headers: &mut HeaderMap, upgrading: bool) {
    strip_hop_by_hop(headers, upgrading);
    for name in [
        "service-worker-allowed",
        "clear-site-data",
        "strict-transport-security",
    ] {
        headers.remove(name);
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let text = String::from_utf8_lossy(v.as_bytes());
            let name = text.split_once('=').map_or("", |(n, _)| n);
            let names_a_domain = text
                .split(';')
                .skip(1)
                .any(|attr| attr.trim().to_ascii_lowercase().starts_with("domain"));
            text.contains('=') && !is_warren_cookie(name) && !names_a_domain
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

    fn forwarded(pairs: &[(&str, &str)]) -> HeaderMap {
        forwarded_headers(
            &headers(pairs),
            8000,
            "/preview/alice/web/8000",
            std::net::Ipv4Addr::LOCALHOST.into(),
            false,
        )
    }

    #[test]
    fn the_workspace_never_sees_the_viewers_session() {
        let sent = forwarded(&[
            ("host", "devbox:7071"),
            (
                "cookie",
                "theme=dark; warren_session=secret; WARREN_SESSION=x; warren_preview=p; __Host-warren_session=h",
            ),
            ("cookie", "b=2"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "hop"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4"),
            ("accept", "text/html"),
        ]);
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
        assert_eq!(
            sent.get("x-forwarded-proto").map(|v| v.as_bytes()),
            Some(&b"http"[..])
        );
        for gone in ["connection", "x-secret", "forwarded"] {
            assert!(sent.get(gone).is_none(), "{gone}");
        }
        assert_eq!(
            sent.get("accept").map(|v| v.as_bytes()),
            Some(&b"text/html"[..])
        );
        assert!(
            forwarded(&[("cookie", "warren_session=secret")])
                .get("cookie")
                .is_none()
        );
    }

    #[test]
    fn a_websocket_keeps_its_upgrade() {
        let sent = forwarded(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
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
    fn the_workspace_cannot_set_warrens_cookies_or_reach_beyond_its_preview() {
        let mut answer = headers(&[
            ("set-cookie", "warren_session=attacker; Path=/"),
            ("set-cookie", "=warren_session=x; Path=/workspaces"),
            ("set-cookie", "warren_preview=x"),
            ("set-cookie", "app=1; Domain=devbox; Path=/"),
            ("set-cookie", "app=1; Path=/"),
            ("service-worker-allowed", "/"),
            ("clear-site-data", "\"cookies\""),
            ("strict-transport-security", "max-age=1"),
        ]);
        answer_headers(&mut answer, false);
        let left: Vec<_> = answer.get_all("set-cookie").iter().collect();
        assert_eq!(left, [HeaderValue::from_static("app=1; Path=/")]);
        for gone in [
            "service-worker-allowed",
            "clear-site-data",
            "strict-transport-security",
        ] {
            assert!(answer.get(gone).is_none(), "{gone}");
        }
    }

    #[test]
    fn a_preview_host_names_a_port_and_a_workspace_id() {
        assert_eq!(
            parse_label("8000-0123abcd"),
            Some(("0123abcd".to_owned(), 8000))
        );
        for bad in [
            "8000",
            "x-0123",
            "0-0123",
            "70000-0123",
            "8000-",
            "8000-web-alice",
            "8000-01.2",
            // One spelling per port: no sign, no leading zero.
            "+8000-0123",
            "08000-0123",
        ] {
            assert_eq!(parse_label(bad), None, "{bad}");
        }
    }
}
