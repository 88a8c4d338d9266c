//! Workspace networking: a bridge per host (or per runtime, when several share a host), a veth
//! per workspace, outbound NAT, and nftables rules that keep workspaces apart.
//!
//! Each bridge gets its own table, `inet warren_<bridge>`, replaced whole (in one nftables
//! transaction) whenever a workspace on it starts, so a second bridge on the same host (another
//! `warren runtime run --bridge`, an agent, a second server) is held exactly as the first:
//!
//! - Workspaces cannot reach each other: their bridge ports are isolated (no layer-2 path), the
//!   `forward` chain drops routing back into the bridge, and a workspace on another bridge is
//!   refused by that bridge's own table (nothing new may enter a bridge).
//! - Workspaces cannot reach the host: the `input` chain drops everything new arriving from the
//!   bridge, whatever address it is sent to, so no service of the host (Warren's API, the agent,
//!   anything on the host's LAN addresses) is reachable from inside. Only replies to the host's
//!   own connections pass.
//! - Egress policy: link-local addresses (169.254.0.0/16, where clouds serve instance
//!   credentials) and the networks an admin denies (`--deny-net`) are dropped; networks an admin
//!   allows (`--allow-net`) pass (never to the host itself: the `input` chain has no exception).
//! - Nothing from outside reaches a workspace uninvited; outbound traffic is masqueraded.
//! - A workspace may only send from its own address (checked per port in the bridge family),
//!   so it cannot pretend to be another one. IPv6 from workspaces is dropped (not offered yet).
//!
//! Uses the `ip` and `nft` commands (iproute2, nftables) through `sys::run`.

use std::process::Command;

use ipnet::Ipv4Net;

use crate::Error;
use crate::record::WorkspaceRecord;
use crate::sys::{run, run_with_input};

const TABLE: &str = "warren";

/// Always dropped for workspaces unless allowed: link-local, where cloud metadata services
/// answer (169.254.169.254) and hand out the host's credentials.
pub const LINK_LOCAL: Ipv4Net = match Ipv4Net::new(std::net::Ipv4Addr::new(169, 254, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("a valid network"),
};

/// Where workspaces may not go, and the exceptions an admin makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Dropped besides link-local and the host's own addresses.
    pub denied: Vec<Ipv4Net>,
    /// Passed even when denied or link-local (never into the host itself).
    pub allowed: Vec<Ipv4Net>,
    /// Registries (`HOST[:PORT]`) the admin trusts: the host reaches them for a tenant without
    /// this policy (a team's registry on the LAN or on this machine), and they are the only
    /// ones a user may start a workspace from.
    pub registries: Vec<String>,
}

impl EgressPolicy {
    /// Whether `host` (`HOST[:PORT]` of an image reference) is a registry the admin trusts.
    pub fn trusts_registry(&self, host: &str) -> bool {
        self.registries.iter().any(|r| r.eq_ignore_ascii_case(host))
    }

    /// Why the host refuses to connect to `ip` on a tenant's behalf (`ADD <url>`); `None`: it
    /// may. `host` is the host's own IPv4 networks ([`host_networks`]). Stricter than what a
    /// workspace may reach, since the connection leaves from the host itself, where no
    /// bridge's rules apply: besides link-local and denied networks, loopback, the host's own
    /// addresses and every network directly attached to the host (the workspaces' bridges, the
    /// LAN) are refused, and IPv6 (workspaces have none) except IPv4-mapped addresses. An
    /// address an admin allows is fetched.
    pub fn refuses(&self, ip: std::net::IpAddr, host: &[Ipv4Net]) -> Option<&'static str> {
        use std::net::IpAddr;
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return Some("an IPv6 address (workspaces have no IPv6)"),
            },
        };
        if self.allowed.iter().any(|n| n.contains(&v4)) {
            return None;
        }
        if v4.is_loopback() {
            Some("a loopback address")
        } else if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() {
            Some("not a unicast address")
        } else if host.iter().any(|n| n.addr() == v4) {
            Some("one of the host's own addresses")
        } else if LINK_LOCAL.contains(&v4) {
            Some("link-local")
        } else if self.denied.iter().any(|n| n.contains(&v4)) {
            Some("in a network the admin denied")
        } else if host.iter().any(|n| n.contains(&v4)) {
            Some("in a network attached to the host (a workspace bridge or the host's LAN)")
        } else {
            None
        }
    }
}

/// The IPv4 networks of the host's interfaces, each as the host's address with its prefix.
pub fn host_networks() -> Vec<Ipv4Net> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter_map(|a| {
        let addr = a.address?.as_sockaddr_in()?.ip();
        let mask = a.netmask?.as_sockaddr_in()?.ip();
        Ipv4Net::with_netmask(addr, mask).ok()
    })
    .collect()
}

/// Creates the bridge if missing, (re)writes its rules, and enables forwarding.
pub(crate) fn ensure_host(
    bridge: &str,
    subnet: Ipv4Net,
    gateway: std::net::Ipv4Addr,
    egress: &EgressPolicy,
) -> Result<(), Error> {
    let exists = || run(Command::new("ip").args(["link", "show", "dev", bridge])).is_ok();
    if !exists() {
        // Workspaces made at once may all find it missing: whoever loses the race to add it
        // finds it there (it failed their first try before: `File exists`).
        if let Err(e) = run(Command::new("ip").args(["link", "add", bridge, "type", "bridge"]))
            && !exists()
        {
            return Err(e);
        }
    }
    run(Command::new("ip").args([
        "addr",
        "replace",
        &format!("{gateway}/{}", subnet.prefix_len()),
        "dev",
        bridge,
    ]))?;
    run(Command::new("ip").args(["link", "set", bridge, "up"]))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(Error::io(
        "cannot enable forwarding in",
        "/proc/sys/net/ipv4/ip_forward",
    ))?;
    // The table carries a digest of its rules as its comment: a start that wants the same
    // rules only reads them (one `nft` run, as cheap as the old existence check); any other
    // rules (a new policy, a new Warren, a flushed ruleset) are rewritten.
    let wanted = inet_rules(bridge, subnet, egress);
    let current = run(Command::new("nft").args(["list", "table", "inet", &table_of(bridge)]));
    if !current.is_ok_and(|t| t.contains(&format!("comment \"{}\"", rules_digest(&wanted)))) {
        // Before 2026-12 one table, `inet warren`, held the rules of whichever bridge came
        // first: replaced by this bridge's own table in the same transaction, if it is this
        // bridge's.
        let mut rules = String::new();
        if run(Command::new("nft").args(["list", "table", "inet", TABLE]))
            .is_ok_and(|old| old.contains(&format!("iifname \"{bridge}\" drop")))
        {
            rules.push_str(&format!(
                "table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
            ));
        }
        rules.push_str(&wanted);
        run_with_input(Command::new("nft").args(["-f", "-"]), Some(&rules))?;
    }
    if run(Command::new("nft").args(["list", "table", "bridge", TABLE])).is_err() {
        run_with_input(Command::new("nft").args(["-f", "-"]), Some(&bridge_rules()))?;
    }
    Ok(())
}

/// The name of `bridge`'s table: distinct for distinct bridges (`warren_<name>` for a
/// lowercase alphanumeric name, else `warren_h_<hex of the name>`).
pub(crate) fn table_of(bridge: &str) -> String {
    if !bridge.is_empty()
        && bridge
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        format!("{TABLE}_{bridge}")
    } else {
        let hex: String = bridge.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{TABLE}_h_{hex}")
    }
}

fn nets(list: &[Ipv4Net]) -> String {
    list.iter()
        .map(|n| n.trunc().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The digest a table's comment carries: of the rules after the comment line.
fn rules_digest(rules: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let body = rules.split_once("    comment ").map_or(rules, |(_, rest)| {
        rest.split_once('\n').map_or(rest, |(_, after)| after)
    });
    let mut h = std::hash::DefaultHasher::new();
    body.hash(&mut h);
    format!("warren rules {:016x}", h.finish())
}

/// The table of one bridge, as one nftables transaction that replaces any earlier one.
fn inet_rules(bridge: &str, subnet: Ipv4Net, egress: &EgressPolicy) -> String {
    let body = inet_rules_body(bridge, subnet, egress);
    let table = table_of(bridge);
    let head = format!("table inet {table} {{\n");
    match body.split_once(&head) {
        Some((before, after)) => format!(
            "{before}{head}    comment \"{}\"\n{after}",
            rules_digest(after)
        ),
        None => body,
    }
}

fn inet_rules_body(bridge: &str, subnet: Ipv4Net, egress: &EgressPolicy) -> String {
    let table = table_of(bridge);
    let mut denied = vec![LINK_LOCAL];
    denied.extend(egress.denied.iter().copied());
    let allowed = if egress.allowed.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", nets(&egress.allowed))
    };
    let denied = nets(&denied);
    format!(
        r#"table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    set allowed {{
        type ipv4_addr; flags interval; auto-merge
        {allowed}
    }}
    set denied {{
        type ipv4_addr; flags interval; auto-merge
        elements = {{ {denied} }}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" oifname "{bridge}" drop
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" drop
        iifname "{bridge}" ip daddr @allowed accept
        iifname "{bridge}" ip daddr @denied drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{bridge}" masquerade
    }}
}}
"#
    )
}

fn bridge_rules() -> String {
    format!(
        r#"table bridge {TABLE} {{
    set addresses {{
        type ifname . ipv4_addr
    }}
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        iifname "wv*" ether type ip iifname . ip saddr @addresses accept
        iifname "wv*" ether type arp iifname . arp saddr ip @addresses accept
        iifname "wv*" drop
    }}
}}
"#
    )
}

fn element(rec: &WorkspaceRecord) -> String {
    format!(
        "element bridge {TABLE} addresses {{ \"{}\" . {} }}",
        rec.veth(),
        rec.address
    )
}

/// Gives the container (its init is `pid`) its interface and address on the bridge.
pub(crate) fn attach(rec: &WorkspaceRecord, pid: i32) -> Result<(), Error> {
    let veth = rec.veth();
    if run(Command::new("ip").args(["link", "show", "dev", &veth])).is_ok() {
        run(Command::new("ip").args(["link", "del", &veth]))?;
    }
    let pid = pid.to_string();
    run(Command::new("ip").args([
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pid,
    ]))?;
    run(Command::new("ip").args(["link", "set", &veth, "master", &rec.bridge, "up"]))?;
    run(Command::new("bridge").args(["link", "set", "dev", &veth, "isolated", "on"]))?;
    let inside = format!(
        "addr add {}/{} dev eth0\nlink set lo up\nlink set eth0 up\nroute add default via {}\n",
        rec.address, rec.prefix_len, rec.gateway
    );
    run_with_input(
        Command::new("nsenter")
            .args(["--target", &pid, "--net", "--"])
            .args(["ip", "-batch", "-"]),
        Some(&inside),
    )?;
    run(Command::new("nft").arg(format!("add {}", element(rec))))?;
    Ok(())
}

/// Gives a VM workspace a tap on the bridge, named like a container's veth (so the same rules
/// hold it to its address) and usable by the workspace's host uid, which QEMU runs as.
pub(crate) fn attach_tap(rec: &WorkspaceRecord) -> Result<(), Error> {
    let tap = rec.veth();
    if run(Command::new("ip").args(["link", "show", "dev", &tap])).is_ok() {
        run(Command::new("ip").args(["link", "del", &tap]))?;
    }
    run(Command::new("ip").args([
        "tuntap",
        "add",
        "dev",
        &tap,
        "mode",
        "tap",
        "user",
        &rec.uid_base.to_string(),
        "group",
        &rec.uid_base.to_string(),
    ]))?;
    run(Command::new("ip").args(["link", "set", &tap, "master", &rec.bridge, "up"]))?;
    run(Command::new("bridge").args(["link", "set", "dev", &tap, "isolated", "on"]))?;
    run(Command::new("nft").arg(format!("add {}", element(rec))))?;
    Ok(())
}

/// Removes the workspace's address rule and interface; returns what could not be removed.
pub(crate) fn detach(rec: &WorkspaceRecord) -> Vec<String> {
    let mut failed = Vec::new();
    let _ = run(Command::new("nft").arg(format!("delete {}", element(rec))));
    let veth = rec.veth();
    if run(Command::new("ip").args(["link", "show", "dev", &veth])).is_ok()
        && let Err(e) = run(Command::new("ip").args(["link", "del", &veth]))
    {
        failed.push(format!("interface {veth} ({e})"));
    }
    failed.extend(leftovers(rec));
    failed
}

/// What of the workspace's network still exists.
pub(crate) fn leftovers(rec: &WorkspaceRecord) -> Vec<String> {
    let mut found = Vec::new();
    let veth = rec.veth();
    if run(Command::new("ip").args(["link", "show", "dev", &veth])).is_ok() {
        found.push(format!("interface {veth}"));
    }
    if run(Command::new("nft").arg(format!("get {}", element(rec)))).is_ok() {
        found.push(format!("nftables address rule for {veth}"));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bridge_has_its_own_table_with_the_egress_policy() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap_or_default();
        let policy = EgressPolicy {
            denied: vec![net("10.1.2.0/24")],
            allowed: vec![net("169.254.9.9/32")],
            registries: Vec::new(),
        };
        let rules = inet_rules("warren0", net("10.88.0.0/16"), &policy);
        assert!(
            rules.starts_with("table inet warren_warren0 {}\ndelete table inet warren_warren0\n")
        );
        assert!(rules.contains(r#"iifname "warren0" oifname "warren0" drop"#));
        assert!(rules.contains(r#"ip saddr 10.88.0.0/16 oifname != "warren0" masquerade"#));
        assert!(rules.contains(r#"iifname "warren0" drop"#));
        assert!(rules.contains("elements = { 169.254.0.0/16, 10.1.2.0/24 }"));
        assert!(rules.contains("elements = { 169.254.9.9/32 }"));
        let other = inet_rules("nftbr9", net("10.98.0.0/16"), &EgressPolicy::default());
        assert!(other.contains("table inet warren_nftbr9 {"));
        assert!(other.contains(r#"iifname "nftbr9" drop"#));
        assert!(bridge_rules().contains("@addresses"));
        // The comment names these rules: the same rules, the same comment; others, another.
        let digest = |r: &str| r.split_once("comment \"").map(|(_, c)| c[..30].to_owned());
        assert!(rules.contains("    comment \"warren rules "), "{rules}");
        assert_eq!(
            digest(&rules),
            digest(&inet_rules("warren0", net("10.88.0.0/16"), &policy))
        );
        assert_ne!(
            digest(&rules),
            digest(&inet_rules(
                "warren0",
                net("10.88.0.0/16"),
                &EgressPolicy::default()
            ))
        );
        assert_eq!(digest(&rules).map(|d| d.len()), Some(30));
    }

    #[test]
    fn the_host_fetches_nothing_a_workspace_could_not_reach() {
        let ip = |s: &str| {
            s.parse::<std::net::IpAddr>()
                .unwrap_or(std::net::IpAddr::from([0; 4]))
        };
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap_or_default();
        let policy = EgressPolicy {
            denied: vec![net("10.1.0.0/16")],
            allowed: vec![net("169.254.7.0/24")],
            registries: Vec::new(),
        };
        let host = [
            net("192.0.2.10/24"),
            net("10.88.0.1/16"),
            net("127.0.0.1/8"),
        ];
        let refused = |s: &str| policy.refuses(ip(s), &host);
        assert_eq!(refused("169.254.169.254"), Some("link-local"));
        assert_eq!(refused("::ffff:169.254.169.254"), Some("link-local"));
        assert!(refused("fe80::1").is_some_and(|w| w.contains("IPv6")));
        assert!(refused("fd00:ec2::254").is_some_and(|w| w.contains("IPv6")));
        assert_eq!(refused("127.0.0.1"), Some("a loopback address"));
        assert!(refused("::1").is_some());
        assert_eq!(refused("0.0.0.0"), Some("not a unicast address"));
        assert_eq!(
            refused("192.0.2.10"),
            Some("one of the host's own addresses")
        );
        assert!(refused("10.88.0.7").is_some_and(|w| w.contains("attached to the host")));
        assert!(refused("192.0.2.99").is_some_and(|w| w.contains("attached to the host")));
        assert_eq!(refused("10.1.2.3"), Some("in a network the admin denied"));
        assert_eq!(refused("169.254.7.7"), None, "allowed");
        assert_eq!(refused("198.51.100.1"), None);
    }

    #[test]
    fn distinct_bridges_get_distinct_tables() {
        assert_eq!(table_of("warren0"), "warren_warren0");
        assert_eq!(table_of("br-1"), "warren_h_62722d31");
        assert_ne!(table_of("br-1"), table_of("br_1"));
        assert_ne!(table_of("h"), table_of("H"));
    }
}
