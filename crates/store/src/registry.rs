//! An OCI registry (distribution API v2) as a [`BlobStore`]: blobs by digest, range reads,
//! monolithic uploads, manifests by tag or digest; Basic and Bearer-token authentication from a
//! `WWW-Authenticate` challenge; retries with exponential backoff on dropped connections, 5xx and
//! 429 answers.
//!
//! Plain HTTP is used for loopback registries (`localhost`, `127.x`) and when asked; HTTPS
//! otherwise.

use std::io::{Read, Seek as _, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ureq::Agent;
use ureq::http::Response;
use warren_image::Digest;

use crate::blob::{BlobStore, StoreError, Verified};
use crate::manifest::{
    DOCKER_LIST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
};

/// `host[:port]/repository[:tag|@digest]`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    pub host: String,
    pub repository: String,
    /// A tag or a digest; `latest` when absent.
    pub reference: String,
}

/// The registry of an image reference (`HOST[:PORT]` of `HOST[:PORT]/REPO[:TAG]`), told from a
/// local name as Docker tells them: the first part contains a `.` or a `:`, or is `localhost`.
pub fn registry_host(reference: &str) -> Option<&str> {
    let (host, _) = reference.split_once('/')?;
    (host.contains(['.', ':']) || host == "localhost").then_some(host)
}

impl RegistryRef {
    /// Parses `host/repo[:tag|@digest]`. The first component must look like a host (contain a
    /// `.` or a `:`, or be `localhost`).
    pub fn parse(text: &str) -> Result<RegistryRef, StoreError> {
        let bad = |reason: &str| StoreError::BadReference {
            reference: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (_, rest) = text
            .split_once('/')
            .ok_or_else(|| bad("expected host/repository[:tag]"))?;
        let host = registry_host(text).ok_or_else(|| {
            bad("the first part must be a registry host such as `127.0.0.1:5000`")
        })?;
        let (repository, reference) = if let Some((r, d)) = rest.split_once('@') {
            (r, d.to_owned())
        } else {
            match rest.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t.to_owned()),
                _ => (rest, "latest".to_owned()),
            }
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(bad("the repository and tag may not be empty"));
        }
        // The distribution spec's grammar, so nothing but a repository name and a tag or digest
        // reaches the registry's URL (no `..`, `?` or `#`).
        if !repository.split('/').all(path_component) {
            return Err(bad(
                "a repository is lowercase letters and digits, parts joined by `.`, `_`, `__` or `-`, separated by `/`",
            ));
        }
        if !(tag(&reference) || digest(&reference)) {
            return Err(bad(
                "a tag is up to 128 letters, digits, `_`, `.` and `-` (not first); a digest is ALGORITHM:HEX",
            ));
        }
        Ok(RegistryRef {
            host: host.to_owned(),
            repository: repository.to_owned(),
            reference,
        })
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: one part of a repository name.
fn path_component(part: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes: Vec<char> = part.chars().collect();
    if bytes.first().is_none_or(|c| !alnum(*c)) || bytes.last().is_none_or(|c| !alnum(*c)) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__`, or any number of `-`.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let run: String = bytes[start..i].iter().collect();
        if !(run == "." || run == "_" || run == "__" || run.chars().all(|c| c == '-')) {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn tag(text: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.len() <= 128 && text.starts_with(ok) && text.chars().all(|c| ok(c) || c == '.' || c == '-')
}

/// `ALGORITHM:ENCODED` (`sha256:<hex>`, ...).
fn digest(text: &str) -> bool {
    text.split_once(':').is_some_and(|(algorithm, encoded)| {
        !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
            && !encoded.is_empty()
            && encoded
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "=_-".contains(c))
    })
}

/// Retry policy for requests.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: 6,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl Retry {
    /// For a mounted image: a read waits while the registry is away (about a minute of
    /// attempts) rather than fail at once, so a dropped connection or a registry restart is
    /// survived.
    pub fn patient() -> Retry {
        Retry {
            attempts: 40,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Decides, for each address a registry's name resolves to, whether the host may connect:
/// `Some(why)` refuses it. Given to a store whose registry a tenant named, so the host never
/// fetches from its own services, the cloud's metadata address or a denied network for them.
pub type AddressFilter = Arc<dyn Fn(std::net::IpAddr) -> Option<String> + Send + Sync>;

/// A resolver keeping only the addresses a filter passes; every connection (every redirect
/// too) is resolved through it.
pub struct FilteringResolver(pub AddressFilter);

impl std::fmt::Debug for FilteringResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FilteringResolver")
    }
}

impl ureq::unversioned::resolver::Resolver for FilteringResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let all = ureq::unversioned::resolver::DefaultResolver::default()
            .resolve(uri, config, timeout)?;
        let mut kept = self.empty();
        let mut refused = None;
        for &addr in all.iter() {
            match (self.0)(addr.ip()) {
                None => kept.push(addr),
                Some(why) => refused = Some((addr.ip(), why)),
            }
        }
        match refused {
            Some((ip, why)) if kept.is_empty() => Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{ip} is {why}: refused by the egress policy (an admin may open a network with --allow-net)"
                ),
            ))),
            _ => Ok(kept),
        }
    }
}

/// Whether a token service may be sent a password: over HTTPS, or plain HTTP on this machine.
fn realm_is_safe(realm: &str) -> bool {
    let Some((scheme, rest)) = realm.split_once("://") else {
        return false;
    };
    if scheme.eq_ignore_ascii_case("https") {
        return true;
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return false;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Debug)]
pub struct RegistryStore {
    base: String,
    host: String,
    repository: String,
    agent: Agent,
    credentials: Option<(String, String)>,
    authorization: Mutex<Option<String>>,
    retry: Retry,
}

/// Connections kept open per registry between requests. A mount has up to 20 requests in flight
/// (eight trace batches, four readahead fetches, its FUSE threads' misses, pages of the chunk
/// table); with fewer kept (ureq's default is 3) each burst opens new connections, a round trip
/// each before the first byte.
const IDLE_CONNECTIONS: usize = 32;

/// How every registry request is made.
fn agent_config() -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    Agent::config_builder()
        .max_idle_connections(IDLE_CONNECTIONS)
        .max_idle_connections_per_host(IDLE_CONNECTIONS)
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .max_redirects(5)
}

/// Adds the current `Authorization`, if there is one, to a request.
fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

/// Builds and sends one attempt of a request, given the agent and the current Authorization.
type Attempt<'a> = &'a dyn Fn(&Agent, Option<&str>) -> Result<Response<ureq::Body>, ureq::Error>;

/// What one attempt of a request came to.
enum Outcome {
    Done(Response<ureq::Body>),
    /// Worth trying again (dropped connection, 5xx, 429).
    Retry(String),
}

impl RegistryStore {
    /// A store for `host/repository`. Credentials, when given, answer Basic challenges and are
    /// sent to the token endpoint of Bearer challenges.
    pub fn new(
        host: &str,
        repository: &str,
        credentials: Option<(String, String)>,
        insecure: bool,
    ) -> RegistryStore {
        // Plain HTTP only to this machine (`localhost.example.org` is not it).
        let loopback = realm_is_safe(&format!("http://{host}/"));
        let scheme = if insecure || loopback {
            "http"
        } else {
            "https"
        };
        let config = agent_config().build();
        RegistryStore {
            base: format!("{scheme}://{host}"),
            host: host.to_owned(),
            repository: repository.to_owned(),
            agent: Agent::new_with_config(config),
            credentials,
            authorization: Mutex::new(None),
            retry: Retry::default(),
        }
    }

    /// Connects only to addresses `filter` passes (and through no proxy, which would be
    /// resolved instead of the registry).
    pub fn with_address_filter(mut self, filter: AddressFilter) -> RegistryStore {
        self.agent = Agent::with_parts(
            agent_config().proxy(None).build(),
            ureq::unversioned::transport::DefaultConnector::default(),
            FilteringResolver(filter),
        );
        self
    }

    /// Ends every request (sending, waiting, reading the answer) after `limit` at the most: for
    /// a question that must be answered soon (is this image there?), never for a blob read.
    pub fn with_request_limit(mut self, limit: Duration) -> RegistryStore {
        self.agent = Agent::new_with_config(agent_config().timeout_global(Some(limit)).build());
        self
    }

    pub fn with_retry(mut self, retry: Retry) -> RegistryStore {
        self.retry = retry;
        self
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    fn transport(&self, op: &str, message: String) -> StoreError {
        StoreError::Transport {
            store: self.describe(),
            op: op.to_owned(),
            message,
        }
    }

    /// Sends a request built by `make` (called again for each attempt), authenticating on a 401
    /// challenge and retrying transient failures.
    fn send(&self, op: &str, make: Attempt<'_>) -> Result<Response<ureq::Body>, StoreError> {
        let mut delay = self.retry.first_delay;
        let mut authenticated_once = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let auth = self.authorization.lock().expect("auth lock").clone();
            let outcome = match make(&self.agent, auth.as_deref()) {
                Ok(resp) if resp.status() == 401 && !authenticated_once => {
                    let challenge = resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    self.authenticate(&challenge)?;
                    authenticated_once = true;
                    attempt -= 1;
                    continue;
                }
                Ok(resp) if resp.status().is_server_error() || resp.status() == 429 => {
                    Outcome::Retry(format!("HTTP {}", resp.status().as_u16()))
                }
                Ok(resp) => Outcome::Done(resp),
                Err(e) => Outcome::Retry(e.to_string()),
            };
            match outcome {
                Outcome::Done(resp) => return Ok(resp),
                Outcome::Retry(why) if attempt >= self.retry.attempts => {
                    return Err(
                        self.transport(op, format!("{why} (gave up after {attempt} attempts)"))
                    );
                }
                Outcome::Retry(why) => {
                    tracing::warn!(registry = %self.describe(), op, attempt, error = %why, "registry request failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.retry.max_delay);
                }
            }
        }
    }

    /// Answers a `WWW-Authenticate` challenge: Basic with the credentials, or Bearer by fetching
    /// a token from the realm.
    fn authenticate(&self, challenge: &str) -> Result<(), StoreError> {
        let auth_err = |message: String| StoreError::Auth {
            store: self.describe(),
            message,
        };
        let basic = self.credentials.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let header = if scheme.eq_ignore_ascii_case("basic") {
            basic.ok_or_else(|| auth_err(format!("the registry wants a user name and password (add an entry for {} to the registry auth file, WARREN_REGISTRY_AUTH or <data>/registry-auth.json)", self.host)))?
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let param = |name: &str| {
                params.split(',').find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k.eq_ignore_ascii_case(name)).then(|| v.trim_matches('"').to_owned())
                })
            };
            let realm = param("realm").ok_or_else(|| {
                auth_err(format!("bearer challenge without a realm: {challenge}"))
            })?;
            // The registry names its token service; the password goes there only encrypted
            // (or on this machine).
            if basic.is_some() && !realm_is_safe(&realm) {
                return Err(auth_err(format!(
                    "the token service {realm} is plain HTTP: the registry's password is not sent there"
                )));
            }
            let mut url = realm.clone();
            let mut sep = if realm.contains('?') { '&' } else { '?' };
            for key in ["service", "scope"] {
                if let Some(v) = param(key) {
                    url.push_str(&format!("{sep}{key}={}", v.replace(' ', "%20")));
                    sep = '&';
                }
            }
            let mut resp = with_auth(self.agent.get(&url), basic.as_deref())
                .call()
                .map_err(|e| auth_err(format!("token request to {realm} failed: {e}")))?;
            if !resp.status().is_success() {
                return Err(auth_err(format!(
                    "token request to {realm} answered HTTP {}",
                    resp.status().as_u16()
                )));
            }
            let text = resp
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_string()
                .map_err(|e| auth_err(format!("reading the token answer failed: {e}")))?;
            let body: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| auth_err(format!("the token answer is not JSON: {e}")))?;
            let token = body
                .get("token")
                .or_else(|| body.get("access_token"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| auth_err("the token answer holds no token".into()))?;
            format!("Bearer {token}")
        } else {
            return Err(auth_err(format!(
                "unsupported authentication challenge `{challenge}`"
            )));
        };
        *self.authorization.lock().expect("auth lock") = Some(header);
        Ok(())
    }

    fn http_error(&self, op: &str, mut resp: Response<ureq::Body>) -> StoreError {
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(4096)
            .read_to_string()
            .unwrap_or_default();
        if status == 401 || status == 403 {
            return StoreError::Auth {
                store: self.describe(),
                message: format!("{op}: HTTP {status}: {body}"),
            };
        }
        StoreError::Http {
            store: self.describe(),
            op: op.to_owned(),
            status,
            body,
        }
    }

    fn read_body(
        &self,
        op: &str,
        mut resp: Response<ureq::Body>,
        limit: u64,
    ) -> Result<Vec<u8>, StoreError> {
        resp.body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.transport(op, e.to_string()))
    }

    /// What lands under a digest must be that digest, in both directions.
    fn check_digest(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError> {
        if Digest::of(data) == *digest {
            Ok(())
        } else {
            Err(StoreError::DigestMismatch {
                digest: *digest,
                store: self.describe(),
            })
        }
    }

    /// Uploads `body` (bytes, or a file sent from its start at each attempt) as blob `digest`,
    /// monolithically: one POST for a location, one PUT of the whole.
    fn upload(&self, digest: &Digest, body: Upload<'_>) -> Result<(), StoreError> {
        let op = format!("upload blob {digest}");
        let start = self.send(&op, &|agent, auth| {
            with_auth(agent.post(self.url("blobs/uploads/")), auth).send_empty()
        })?;
        if start.status() != 202 {
            return Err(self.http_error(&op, start));
        }
        let location = start
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| self.transport(&op, "the registry gave no upload location".into()))?
            .to_owned();
        let mut url = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let done = self.send(&op, &|agent, auth| {
            let put = with_auth(
                agent
                    .put(&url)
                    .header("Content-Type", "application/octet-stream"),
                auth,
            );
            match body {
                Upload::Bytes(data) => put.send(data),
                Upload::File(mut file) => {
                    file.seek(SeekFrom::Start(0)).map_err(ureq::Error::Io)?;
                    put.send(file)
                }
            }
        })?;
        if done.status() != 201 {
            return Err(self.http_error(&op, done));
        }
        Ok(())
    }
}

impl RegistryStore {
    /// The response to `GET` of the whole blob, once it is known to be there (200), and the
    /// operation's name for errors.
    fn fetch_blob(&self, digest: &Digest) -> Result<(String, Response<ureq::Body>), StoreError> {
        let op = format!("fetch blob {digest}");
        let resp = self.send(&op, &|agent, auth| {
            with_auth(agent.get(self.url(&format!("blobs/{digest}"))), auth).call()
        })?;
        match resp.status().as_u16() {
            200 => Ok((op, resp)),
            404 => Err(StoreError::BlobNotFound {
                digest: *digest,
                store: self.describe(),
            }),
            _ => Err(self.http_error(&op, resp)),
        }
    }
}

/// What [`RegistryStore::upload`] sends.
#[derive(Clone, Copy)]
enum Upload<'a> {
    Bytes(&'a [u8]),
    File(&'a std::fs::File),
}

impl BlobStore for RegistryStore {
    fn describe(&self) -> String {
        format!("registry {}/{}", self.host, self.repository)
    }

    fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let op = format!("look up blob {digest}");
        let resp = self.send(&op, &|agent, auth| {
            with_auth(agent.head(self.url(&format!("blobs/{digest}"))), auth).call()
        })?;
        match resp.status().as_u16() {
            200 => Ok(Some(
                resp.headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            404 => Ok(None),
            _ => Err(self.http_error(&op, resp)),
        }
    }

    fn put_blob_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        // Checked first, then sent from the file itself (no spool copy): never held in memory.
        let (file, size) = crate::blob::open_sized(&self.describe(), path)?;
        Verified::new(Box::new(&file), *digest, size, self.describe()).finish()?;
        self.upload(digest, Upload::File(&file))
    }

    fn put_blob_stream(
        &self,
        digest: &Digest,
        size: u64,
        src: &mut dyn Read,
    ) -> Result<(), StoreError> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        // Spooled to a nameless file (each attempt sends it from its start), checked on the way.
        let io = |op: &str| {
            let op = op.to_owned();
            move |cause| StoreError::Io {
                store: self.describe(),
                op,
                cause,
            }
        };
        let mut spool = tempfile::tempfile().map_err(io("make a spool file"))?;
        let mut checked = Verified::new(Box::new(src), *digest, size, self.describe());
        std::io::copy(&mut checked, &mut spool).map_err(io("spool a blob"))?;
        self.upload(digest, Upload::File(&spool))
    }

    fn put_blob(&self, digest: &Digest, data: &[u8]) -> Result<(), StoreError> {
        self.check_digest(digest, data)?;
        if self.has_blob(digest)? {
            return Ok(());
        }
        self.upload(digest, Upload::Bytes(data))
    }

    fn get_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let (op, resp) = self.fetch_blob(digest)?;
        let data = self.read_body(&op, resp, limit)?;
        self.check_digest(digest, &data)?;
        Ok(data)
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Verified<'_>, StoreError> {
        let (_, resp) = self.fetch_blob(digest)?;
        // Past its size, `Verified` stops it; ureq's own limit only must not come first.
        let body = resp
            .into_body()
            .into_with_config()
            .limit(size.saturating_add(1))
            .reader();
        Ok(Verified::new(
            Box::new(body),
            *digest,
            size,
            self.describe(),
        ))
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let op = format!("read {len} bytes at {offset} of blob {digest}");
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let resp = self.send(&op, &|agent, auth| {
            with_auth(
                agent
                    .get(self.url(&format!("blobs/{digest}")))
                    .header("Range", &range),
                auth,
            )
            .call()
        })?;
        let data = match resp.status().as_u16() {
            206 => self.read_body(&op, resp, len)?,
            // A registry that ignores Range sends the whole blob: what comes before the range
            // is read past, never kept.
            200 => {
                let mut body = resp
                    .into_body()
                    .into_with_config()
                    .limit(offset + len)
                    .reader();
                std::io::copy(&mut (&mut body).take(offset), &mut std::io::sink())
                    .map_err(|e| self.transport(&op, e.to_string()))?;
                let mut data = Vec::with_capacity(len as usize);
                body.take(len)
                    .read_to_end(&mut data)
                    .map_err(|e| self.transport(&op, e.to_string()))?;
                data
            }
            404 => {
                return Err(StoreError::BlobNotFound {
                    digest: *digest,
                    store: self.describe(),
                });
            }
            _ => return Err(self.http_error(&op, resp)),
        };
        if data.len() as u64 != len {
            return Err(self.transport(&op, format!("got {} bytes", data.len())));
        }
        Ok(data)
    }

    fn put_manifest(&self, tag: &str, manifest: &[u8]) -> Result<Digest, StoreError> {
        let op = format!("store manifest {tag}");
        let media_type = crate::manifest::media_type_of(manifest)
            .unwrap_or_else(|| MANIFEST_MEDIA_TYPE.to_owned());
        let resp = self.send(&op, &|agent, auth| {
            with_auth(
                agent
                    .put(self.url(&format!("manifests/{tag}")))
                    .header("Content-Type", &media_type),
                auth,
            )
            .send(manifest)
        })?;
        if resp.status() != 201 {
            return Err(self.http_error(&op, resp));
        }
        Ok(Digest::of(manifest))
    }

    fn get_manifest(&self, reference: &str) -> Result<(Vec<u8>, Digest), StoreError> {
        let op = format!("fetch manifest {reference}");
        let accept = [
            MANIFEST_MEDIA_TYPE,
            INDEX_MEDIA_TYPE,
            DOCKER_MANIFEST_MEDIA_TYPE,
            DOCKER_LIST_MEDIA_TYPE,
        ]
        .join(", ");
        let resp = self.send(&op, &|agent, auth| {
            with_auth(
                agent
                    .get(self.url(&format!("manifests/{reference}")))
                    .header("Accept", &accept),
                auth,
            )
            .call()
        })?;
        match resp.status().as_u16() {
            200 => {
                let data = self.read_body(&op, resp, 4 << 20)?;
                let digest = Digest::of(&data);
                if let Ok(expected) = reference.parse::<Digest>()
                    && expected != digest
                {
                    return Err(StoreError::DigestMismatch {
                        digest: expected,
                        store: self.describe(),
                    });
                }
                Ok((data, digest))
            }
            404 => Err(StoreError::ManifestNotFound {
                reference: reference.to_owned(),
                store: self.describe(),
            }),
            _ => Err(self.http_error(&op, resp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_goes_over_plain_http_only_to_this_machine() {
        for safe in [
            "https://auth.example.org/token",
            "http://127.0.0.1:5000/token",
            "HTTP://localhost/token",
            "http://[::1]:80/t",
        ] {
            assert!(realm_is_safe(safe), "{safe}");
        }
        for unsafe_ in [
            "http://auth.example.org/token",
            "http://localhost.evil.example/token",
            "http://127.0.0.1.evil.example/token",
            "http://localhost@evil.example/token",
            "HTTP://evil.example/",
            "ftp://localhost/x",
            "localhost/token",
        ] {
            assert!(!realm_is_safe(unsafe_), "{unsafe_}");
        }
    }

    #[test]
    fn references_parse() {
        let r = RegistryRef::parse("127.0.0.1:5000/team/dev:1.2").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "team/dev", "1.2")
        );
        let r = RegistryRef::parse("localhost/x").unwrap();
        assert_eq!(r.reference, "latest");
        let r = RegistryRef::parse("ghcr.io/a/b@sha256:abc").unwrap();
        assert_eq!(r.reference, "sha256:abc");
        assert!(RegistryRef::parse("debian:bookworm").is_err());
        assert!(RegistryRef::parse("team/dev").is_err());
        let r = RegistryRef::parse("r.example/a--b/c__d/e.f_g:v1.0-rc_2").unwrap();
        assert_eq!(r.repository, "a--b/c__d/e.f_g");
        // Nothing but a name and a tag or digest reaches the registry's URL.
        for bad in [
            "r.example/../../api/x",
            "r.example/a/..:1",
            "r.example/a?x=1:1",
            "r.example/a#frag",
            "r.example/Upper:1",
            "r.example/a/:1",
            "r.example/a:-leading",
            "r.example/a:t?x",
            "r.example/a@sha256:ab/../c",
            "r.example/a@:abc",
            "r.example/a.:1",
            "r.example/a___b:1",
        ] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad}");
        }
    }
}
