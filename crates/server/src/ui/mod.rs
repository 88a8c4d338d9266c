//! The web UI: pages rendered on the server (askama) and made live with htmx and server-sent
//! events; its CSS and JS are in the binary. It holds no rules of its own: every page and action
//! calls the same functions as `/api/v1`, as the signed-in user, so it shows and does exactly
//! what the API lets that user see and do (another user's workspace is 404 here too).
//!
//! Sign-in makes a session: a random token in an HttpOnly, SameSite=Strict cookie (Secure when
//! the request came over https), stored hashed with an expiry. Every request that changes
//! something also carries the session's CSRF token in `X-CSRF-Token` (htmx sends it from the
//! page's `hx-headers`), and a browser's `Origin`, when sent, must be this server's.

mod live;
mod pages;
mod projects;
mod settings;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::auth::{Caller, token_hash};
use crate::db::{now_ms, random_bytes};
use crate::error::ApiError;
use crate::state::AppState;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "warren_session";
/// Its name over HTTPS: the `__Host-` prefix makes a browser refuse it from anything but
/// this host, with `Secure` and `Path=/` (no other page can plant one beside it).
const SECURE_COOKIE: &str = "__Host-warren_session";
/// How long a sign-in lasts.
const SESSION_MS: i64 = 7 * 24 * 3600 * 1000;
/// The header that carries the CSRF token.
const CSRF_HEADER: &str = "x-csrf-token";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::workspaces))
        .route("/login", get(pages::login_page).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/workspaces", post(pages::create_workspace))
        .route("/workspaces/{key}", get(pages::workspace))
        .route("/workspaces/{key}/{action}", post(pages::workspace_action))
        .route("/workspaces/{key}/ports", post(pages::set_port_access))
        .route("/workspaces/{key}/tasks/{task}/events", get(live::task_log))
        .route("/events/workspaces", get(live::workspaces))
        .route("/workspaces/{key}/jobs", get(pages::workspace_jobs))
        .route("/previews/{id}/{port}", get(pages::open_preview))
        .route(
            "/projects",
            get(projects::projects).post(projects::add_project),
        )
        .route("/projects/{key}", get(projects::project))
        .route("/projects/{key}/refresh", post(projects::refresh_project))
        .route("/projects/{key}/delete", post(projects::delete_project))
        .route("/projects/{key}/prebuilds", post(projects::prebuild_branch))
        .route("/prebuilds/{id}", get(projects::prebuild))
        .route("/prebuilds/{id}/summary", get(projects::prebuild_summary))
        .route("/prebuilds/{id}/events", get(live::prebuild_log))
        .route("/prebuilds/{id}/{action}", post(projects::prebuild_action))
        .route("/settings", get(settings::settings))
        .route("/settings/keys", post(settings::add_key))
        .route("/settings/keys/{id}/delete", post(settings::delete_key))
        .route("/settings/variables", post(settings::set_variable))
        .route(
            "/settings/variables/{name}/delete",
            post(settings::delete_variable),
        )
        .route("/settings/tokens", post(settings::create_token))
        .route("/settings/tokens/{id}/delete", post(settings::delete_token))
        .route("/admin", get(settings::admin))
        .route("/admin/users", post(settings::add_user))
        .route("/assets/{file}", get(asset))
        .layer(axum::middleware::map_response(not_in_frames))
}

/// No page of the UI may be shown in another page's frame (clicks tricked through it).
async fn not_in_frames(mut answer: Response) -> Response {
    let headers = answer.headers_mut();
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    answer
}

/// The UI's answer to a path it does not have: its 404 page (the API answers its own).
pub fn not_found() -> Response {
    UiError(ApiError::not_found("such page")).into_response()
}

/// The files the pages load, from the binary. htmx 2.0.11 (npm `htmx.org`, 0BSD), as published.
async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match file.as_str() {
        "htmx.min.js" => (
            include_bytes!("../../assets/htmx.min.js"),
            "text/javascript",
        ),
        "warren.js" => (include_bytes!("../../assets/warren.js"), "text/javascript"),
        "warren.css" => (include_bytes!("../../assets/warren.css"), "text/css"),
        _ => return not_found(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A signed-in user of the UI: who, and the token their forms must carry.
pub(crate) struct Session {
    pub caller: Caller,
    pub csrf: String,
    /// The stored form of its token, to ask later whether it still holds.
    pub token_hash: String,
}

impl Session {
    /// Whether the sign-in still holds (not signed out, not expired); a database that cannot
    /// answer now is not a sign-out.
    pub async fn holds(&self, state: &AppState) -> bool {
        sqlx::query_scalar::<_, i64>(
            "SELECT 1 FROM sessions WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(&self.token_hash)
        .bind(now_ms())
        .fetch_optional(&state.db.pool)
        .await
        .map_or(true, |found| found.is_some())
    }
}

/// The session of a request that changes something: its CSRF token was checked.
pub(crate) struct Acting(pub Session);

/// Why a UI request is refused: the API's error, shown as a page or an htmx fragment.
pub(crate) struct UiError(pub ApiError);

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<sqlx::Error> for UiError {
    fn from(e: sqlx::Error) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        if self.0.status == StatusCode::UNAUTHORIZED {
            // A page sends the browser to sign in; htmx is told to go there itself.
            let mut answer = Redirect::to("/login").into_response();
            answer
                .headers_mut()
                .insert("hx-redirect", HeaderValue::from_static("/login"));
            return answer;
        }
        let page = pages::ErrorPage {
            status: self.0.status.as_u16(),
            message: self.0.message,
            frame: pages::Frame::nobody(),
        };
        (self.0.status, pages::html(&page)).into_response()
    }
}

/// The cookie `name`'s value, when the request carries it exactly once: two of one name mean
/// another page planted one (a longer path is sent first), and neither is believed.
pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = cookies_named(headers, name);
    let value = found.next()?;
    found.next().is_none().then_some(value)
}

/// Every value of the cookie `name` a request carries, in the order sent.
pub(crate) fn cookies_named<'a>(
    headers: &'a HeaderMap,
    name: &str,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(move |c| c.name() == name)
        // `split_parse` borrows from the header's text, which outlives this call.
        .filter_map(|c| c.value_raw())
}

/// The session token a request carries: the `__Host-` cookie over HTTPS, else the plain one.
fn session_token(headers: &HeaderMap, https: bool) -> Option<&str> {
    if https {
        cookie_value(headers, SECURE_COOKIE)
    } else {
        cookie_value(headers, COOKIE)
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, UiError> {
        let peer = crate::client::peer_of(parts).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let token = session_token(&parts.headers, over_https(peer, &parts.headers, state))
            .ok_or_else(|| UiError(ApiError::unauthorized()))?;
        let found: Option<(String, String, i64, String)> = sqlx::query_as(
            "SELECT u.id, u.name, u.is_admin, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(token_hash(token))
        .bind(now_ms())
        .fetch_optional(&state.db.pool)
        .await?;
        let (user_id, name, is_admin, csrf) =
            found.ok_or_else(|| UiError(ApiError::unauthorized()))?;
        Ok(Self {
            caller: Caller {
                user_id,
                name,
                is_admin: is_admin != 0,
            },
            csrf,
            token_hash: token_hash(token),
        })
    }
}

impl FromRequestParts<AppState> for Acting {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, UiError> {
        check_origin(&parts.headers)?;
        let session = Session::from_request_parts(parts, state).await?;
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !constant_time_eq(sent, session.csrf.as_bytes()) {
            return Err(UiError(ApiError::forbidden(
                "this request lacks the page's CSRF token: reload the page and try again",
            )));
        }
        Ok(Self(session))
    }
}

/// A browser names the page a request comes from (`Origin`) on every POST: it must be a page
/// of this server. Requests without one (older browsers, non-browsers) still need the token.
fn check_origin(headers: &HeaderMap) -> Result<(), UiError> {
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST))
    else {
        return Ok(());
    };
    let origin = origin.as_bytes();
    let same = [b"http://".as_slice(), b"https://"]
        .iter()
        .any(|scheme| origin.strip_prefix(*scheme) == Some(host.as_bytes()));
    if same {
        Ok(())
    } else {
        Err(UiError(ApiError::forbidden(
            "this request comes from another site's page",
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the browser reached this server over https: served by Warren itself, or through a
/// proxy the config trusts that says so (`X-Forwarded-Proto`).
fn over_https(peer: std::net::IpAddr, headers: &HeaderMap, state: &AppState) -> bool {
    if state.https {
        return true;
    }
    let from_trusted = state.trusted_proxies.iter().any(|p| p.contains(&peer));
    from_trusted
        && headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// This server's address as the browser reached it, for a URL to be used elsewhere (a
/// webhook's).
fn site_of(peer: std::net::IpAddr, headers: &HeaderMap, state: &AppState) -> String {
    let scheme = if over_https(peer, headers, state) {
        "https"
    } else {
        "http"
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

/// A new session for `user_id`, and the `Set-Cookie` that hands it to the browser.
async fn new_session(
    state: &AppState,
    user_id: &str,
    https: bool,
) -> Result<HeaderValue, ApiError> {
    use base64::Engine as _;
    let b64 = |bytes: [u8; 32]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let (token, csrf) = (b64(random_bytes()), b64(random_bytes()));
    let now = now_ms();
    // Expired sign-ins go as new ones are made.
    sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
        .bind(now)
        .execute(&state.db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO sessions (token_hash, user_id, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(token_hash(&token))
    .bind(user_id)
    .bind(csrf)
    .bind(now)
    .bind(now + SESSION_MS)
    .execute(&state.db.pool)
    .await?;
    set_cookie(token, SESSION_MS / 1000, https)
}

fn set_cookie(value: String, max_age_s: i64, https: bool) -> Result<HeaderValue, ApiError> {
    let name = if https { SECURE_COOKIE } else { COOKIE };
    let cookie = cookie::Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(https)
        .max_age(cookie::time::Duration::seconds(max_age_s))
        .build();
    HeaderValue::from_str(&cookie.to_string())
        .map_err(|e| ApiError::internal("cannot make the session cookie", e))
}

/// Ends the session, and the cookie that clears it in the browser.
async fn end_session(
    session: &Session,
    state: &AppState,
    https: bool,
) -> Result<HeaderValue, ApiError> {
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
        .bind(&session.token_hash)
        .execute(&state.db.pool)
        .await?;
    set_cookie(String::new(), 0, https)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::post("/x");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.body(()).unwrap_or_default().into_parts().0
    }

    #[test]
    fn only_this_servers_pages_may_post() {
        assert!(check_origin(&parts(&[("host", "devbox:8080")]).headers).is_ok());
        let from = |origin| parts(&[("host", "devbox:8080"), ("origin", origin)]).headers;
        assert!(check_origin(&from("http://devbox:8080")).is_ok());
        assert!(check_origin(&from("https://devbox:8080")).is_ok());
        for other in [
            "http://evil.example",
            "http://devbox:8081",
            "http://devbox:8080.evil.example",
            "null",
        ] {
            assert!(check_origin(&from(other)).is_err(), "{other}");
        }
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let headers = parts(&[("cookie", "a=1; warren_session=tok; b=2")]).headers;
        assert_eq!(cookie_value(&headers, COOKIE), Some("tok"));
        // A second one of the name (planted with a longer path by another page): neither.
        let planted = parts(&[("cookie", "warren_session=planted; warren_session=tok")]).headers;
        assert_eq!(cookie_value(&planted, COOKIE), None);
        // Over HTTPS only the `__Host-` cookie counts.
        let both = parts(&[("cookie", "warren_session=plain; __Host-warren_session=tok")]).headers;
        assert_eq!(session_token(&both, true), Some("tok"));
        assert_eq!(session_token(&both, false), Some("plain"));
        assert_eq!(
            cookie_value(&parts(&[("cookie", "a=1")]).headers, COOKIE),
            None
        );
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site() {
        let text = set_cookie("tok".into(), 60, true)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        for part in [
            "warren_session=tok",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(text.contains(part), "{text}");
        }
        let plain = set_cookie("tok".into(), 60, false)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        assert!(!plain.contains("Secure"), "{plain}");
    }
}
