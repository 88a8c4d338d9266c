//! Failed logins, remembered in memory to slow password guessing down.

/// Slows password guessing: after [`FREE_FAILURES`] failed logins in a row for one user name
/// from one address, each further attempt waits twice as long as the last (1 s, 2 s, ... up to
/// 5 minutes). Keyed by address too, so a stranger cannot lock a user out from elsewhere. A
/// success clears the record. Kept in memory: a restart forgets it.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: std::sync::Mutex<std::collections::HashMap<(String, std::net::IpAddr), Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: std::time::Instant,
}

pub const FREE_FAILURES: u32 = 5;
/// Failed logins from one address, whatever names they try, before it is slowed down too.
pub const FREE_FAILURES_PER_ADDRESS: u32 = 50;
/// Most records kept: beyond, the oldest go (a flood of names cannot grow memory without end).
const MOST_RECORDS: usize = 100_000;
const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// Records older than this are dropped (and with them, the slowing down).
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// The address a record is kept under: an IPv4 address itself, an IPv6 one's /64 (one
/// client commonly holds a whole /64 and could otherwise take a new address per guess).
fn throttled_as(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())
        }
        v4 => v4,
    }
}

impl LoginThrottle {
    fn wait_after(count: u32) -> std::time::Duration {
        if count < FREE_FAILURES {
            return std::time::Duration::ZERO;
        }
        let exp = (count - FREE_FAILURES).min(16);
        std::time::Duration::from_secs(1 << exp).min(LONGEST_WAIT)
    }

    /// How long `user` from `addr` must still wait before its next attempt (zero: go ahead).
    pub fn wait(
        &self,
        user: &str,
        addr: std::net::IpAddr,
        now: std::time::Instant,
    ) -> std::time::Duration {
        let addr = throttled_as(addr);
        let Ok(mut map) = self.failures.lock() else {
            return std::time::Duration::ZERO;
        };
        map.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
        let of_user = map
            .get(&(user.to_owned(), addr))
            .map_or(std::time::Duration::ZERO, |f| {
                (f.last + Self::wait_after(f.count)).saturating_duration_since(now)
            });
        // The address as a whole (the empty name), with a larger free budget: trying many
        // names from one place is slowed down as trying one name is.
        let of_address = map
            .get(&(String::new(), addr))
            .map_or(std::time::Duration::ZERO, |f| {
                let over = f
                    .count
                    .saturating_sub(FREE_FAILURES_PER_ADDRESS - FREE_FAILURES);
                (f.last + Self::wait_after(over)).saturating_duration_since(now)
            });
        of_user.max(of_address)
    }

    pub fn failed(&self, user: &str, addr: std::net::IpAddr, now: std::time::Instant) {
        let addr = throttled_as(addr);
        if let Ok(mut map) = self.failures.lock() {
            if map.len() >= MOST_RECORDS {
                let mut by_age: Vec<_> = map.iter().map(|(k, f)| (f.last, k.clone())).collect();
                by_age.sort_unstable_by_key(|(last, _)| *last);
                for (_, key) in by_age.into_iter().take(MOST_RECORDS / 10) {
                    map.remove(&key);
                }
            }
            for key in [(user.to_owned(), addr), (String::new(), addr)] {
                let f = map.entry(key).or_insert(Failures {
                    count: 0,
                    last: now,
                });
                f.count = f.count.saturating_add(1);
                f.last = now;
            }
        }
    }

    /// A success clears the name's record and refunds the one failure counted for the
    /// address before the password was verified.
    pub fn succeeded(&self, user: &str, addr: std::net::IpAddr) {
        let addr = throttled_as(addr);
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&(user.to_owned(), addr));
            let key = (String::new(), addr);
            if let Some(f) = map.get_mut(&key) {
                f.count = f.count.saturating_sub(1);
                if f.count == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn failed_logins_slow_down_per_user_and_address() {
        let throttle = LoginThrottle::default();
        let (here, there): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(throttle.wait("alice", here, t0), Duration::ZERO);
            throttle.failed("alice", here, t0);
        }
        assert_eq!(throttle.wait("alice", here, t0), Duration::from_secs(1));
        assert_eq!(
            throttle.wait("alice", there, t0),
            Duration::ZERO,
            "other addresses"
        );
        assert_eq!(
            throttle.wait("bob", here, t0),
            Duration::ZERO,
            "other users"
        );
        let t1 = t0 + Duration::from_secs(1);
        throttle.failed("alice", here, t1);
        assert_eq!(throttle.wait("alice", here, t1), Duration::from_secs(2));
        for _ in 0..30 {
            throttle.failed("alice", here, t1);
        }
        assert_eq!(throttle.wait("alice", here, t1), Duration::from_secs(300));
        throttle.succeeded("alice", here);
        assert_eq!(throttle.wait("alice", here, t1), Duration::ZERO);
    }

    #[test]
    fn an_ipv6_client_is_one_address_across_its_64() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for n in 0..FREE_FAILURES {
            let addr: std::net::IpAddr = format!("2001:db8:1:2::{n:x}").parse().unwrap();
            throttle.failed("alice", addr, t0);
        }
        let rotated: std::net::IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert_eq!(throttle.wait("alice", rotated, t0), Duration::from_secs(1));
        let next_64: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(throttle.wait("alice", next_64, t0), Duration::ZERO);
        // An IPv4 address is the same whether it came as IPv4 or IPv4-mapped IPv6.
        let v4: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            throttle.failed("bob", mapped, t0);
        }
        assert_eq!(throttle.wait("bob", v4, t0), Duration::from_secs(1));
    }

    #[test]
    fn many_names_from_one_address_are_slowed_too() {
        let throttle = LoginThrottle::default();
        let here: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        // Four tries per name stay under each name's budget, not under the address's.
        for n in 0..FREE_FAILURES_PER_ADDRESS {
            let name = format!("user{}", n / (FREE_FAILURES - 1));
            assert_eq!(throttle.wait(&name, here, t0), Duration::ZERO, "try {n}");
            throttle.failed(&name, here, t0);
        }
        assert_eq!(
            throttle.wait("fresh-name", here, t0),
            Duration::from_secs(1)
        );
        let elsewhere: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(throttle.wait("fresh-name", elsewhere, t0), Duration::ZERO);
        // Each login counts as a failure until verified: successes are refunded, so a machine
        // that logs in often is never slowed down.
        for _ in 0..3 * FREE_FAILURES_PER_ADDRESS {
            assert_eq!(throttle.wait("ci", elsewhere, t0), Duration::ZERO);
            throttle.failed("ci", elsewhere, t0);
            throttle.succeeded("ci", elsewhere);
        }
    }
}
