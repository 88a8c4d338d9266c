//! Who is calling, by address: the connection's peer, or, behind a reverse proxy the admin
//! trusts (`--trusted-proxy`), the client that proxy names in `X-Forwarded-For`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;

/// The caller's address. Behind trusted proxies, the login throttle keys on it, so one
/// client guessing passwords slows down only itself, not everyone behind the same proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        client_of(parts, &state.trusted_proxies)
            .map(Self)
            .ok_or_else(|| ApiError::internal("reading the caller's address", "no peer"))
    }
}

/// The address that connected (`None` when the server was not given connection info).
pub fn peer_of(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip())
}

/// The client of a request: its peer, or the one trusted proxies name ([`client_addr`]).
pub fn client_of(parts: &Parts, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let forwarded: Vec<&[u8]> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    Some(client_addr(peer_of(parts)?, &forwarded, trusted))
}

/// The client behind `peer`: `peer` itself unless it is a trusted proxy; then, reading the
/// `X-Forwarded-For` chain (every header line's entries, in order) from its right end, the
/// first address that is not a trusted proxy. A client cannot choose it as long as every
/// trusted proxy appends (or sets) the address that connected to it: whatever a client wrote
/// stands further left, where the walk stops at the first entry that is not a bare address
/// (not ASCII, a port, brackets: the nearest hop known so far answers then). Addresses are
/// compared canonical (`::ffff:10.0.0.2` is `10.0.0.2`), so a dual-stack listener matches.
pub fn client_addr(peer: IpAddr, forwarded: &[&[u8]], trusted: &[ipnet::IpNet]) -> IpAddr {
    let trusts = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer.to_canonical();
    if !trusts(&peer) {
        return peer;
    }
    let mut nearest = peer;
    // From the right end, lazily: a long header costs no more than the hops read.
    let hops = forwarded
        .iter()
        .rev()
        .flat_map(|line| line.rsplit(|b| *b == b','));
    for hop in hops {
        let Some(ip) = std::str::from_utf8(hop)
            .ok()
            .and_then(|text| text.trim().parse::<IpAddr>().ok())
        else {
            break;
        };
        let ip = ip.to_canonical();
        if !trusts(&ip) {
            return ip;
        }
        nearest = ip;
    }
    nearest
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(peer: &str, forwarded: &[&str], trusted: &[ipnet::IpNet]) -> IpAddr {
        let lines: Vec<&[u8]> = forwarded.iter().map(|l| l.as_bytes()).collect();
        client_addr(ip(peer), &lines, trusted)
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        // A caller that is not a proxy we trust cannot name another address.
        assert_eq!(
            client("203.0.113.9", &["198.51.100.1"], &trusted),
            ip("203.0.113.9")
        );
        // Through a trusted proxy: the address it appended.
        assert_eq!(
            client("10.0.0.2", &["198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        // A client's own forged entries stand left of what the proxy appended.
        assert_eq!(
            client("10.0.0.2", &["1.2.3.4, 198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        // Two trusted proxies in a row, over two headers.
        assert_eq!(
            client("10.0.0.2", &["198.51.100.1", "10.0.0.3"], &trusted),
            ip("198.51.100.1")
        );
        // Nothing but proxies: the farthest one.
        assert_eq!(
            client("10.0.0.2", &["10.0.0.5, 10.0.0.3"], &trusted),
            ip("10.0.0.5")
        );
        // No header: the proxy itself. Junk a client wrote does not hide what the proxy
        // appended; junk where the proxies write stops the walk at the nearest hop known.
        assert_eq!(client("10.0.0.2", &[], &trusted), ip("10.0.0.2"));
        assert_eq!(
            client("10.0.0.2", &["unknown, 198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("10.0.0.2", &["198.51.100.1, junk, 10.0.0.3"], &trusted),
            ip("10.0.0.3")
        );
        // Bytes that are not ASCII stop the walk where they stand, not before the proxy's
        // own entry; a port or brackets stop it too.
        let lines: Vec<&[u8]> = vec![&b"\xff, 198.51.100.1"[..]];
        assert_eq!(
            client_addr(ip("10.0.0.2"), &lines, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("10.0.0.2", &["198.51.100.1:443"], &trusted),
            ip("10.0.0.2")
        );
        // An IPv4 proxy seen on a dual-stack socket, and an IPv4-mapped entry.
        assert_eq!(
            client("::ffff:10.0.0.2", &["::ffff:198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        // With no proxy trusted, the header is never read.
        assert_eq!(client("10.0.0.2", &["198.51.100.1"], &[]), ip("10.0.0.2"));
    }
}
