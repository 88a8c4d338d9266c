//! Workspace networking: one bridge for the host's workspaces, a veth per workspace, outbound
//! NAT, and nftables rules that keep workspaces apart.
//!
//! - Workspaces cannot reach each other: their bridge ports are isolated (no layer-2 path) and
//!   the `forward` chain drops bridge-to-bridge routing.
//! - Workspaces cannot reach the host: the `input` chain drops everything new arriving from the
//!   bridge, whatever address it is sent to, so no service of the host (Warren's API, the agent)
//!   is reachable from inside. Only replies to the host's own connections pass.
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

/// Creates the bridge and the rules if they are missing (idempotent), and enables forwarding.
pub(crate) fn ensure_host(
    bridge: &str,
    subnet: Ipv4Net,
    gateway: std::net::Ipv4Addr,
) -> Result<(), Error> {
    if run(Command::new("ip").args(["link", "show", "dev", bridge])).is_err() {
        run(Command::new("ip").args(["link", "add", bridge, "type", "bridge"]))?;
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
    if run(Command::new("nft").args(["list", "table", "inet", TABLE])).is_err() {
        run_with_input(
            Command::new("nft").args(["-f", "-"]),
            Some(&inet_rules(bridge, subnet)),
        )?;
    }
    if run(Command::new("nft").args(["list", "table", "bridge", TABLE])).is_err() {
        run_with_input(Command::new("nft").args(["-f", "-"]), Some(&bridge_rules()))?;
    }
    Ok(())
}

fn inet_rules(bridge: &str, subnet: Ipv4Net) -> String {
    format!(
        r#"table inet {TABLE} {{
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
    fn rules_name_the_bridge_and_subnet() {
        let rules = inet_rules("warren0", "10.88.0.0/16".parse().unwrap_or_default());
        assert!(rules.contains(r#"iifname "warren0" oifname "warren0" drop"#));
        assert!(rules.contains(r#"ip saddr 10.88.0.0/16 oifname != "warren0" masquerade"#));
        assert!(rules.contains(r#"iifname "warren0" drop"#));
        assert!(bridge_rules().contains("@addresses"));
    }
}
