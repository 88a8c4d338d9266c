//! `eth0`'s address and default route, and `lo`, set with the classic ioctls (`netif`): the
//! guest has no `ip` command of its own (the workspace's image may not either).

use std::net::Ipv4Addr;

use warren_guest::netif::{Socket, ifreq, ioctl, up};
use warren_guest::proto::GuestNetwork;

fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

pub(crate) fn configure(network: &GuestNetwork) -> Result<(), String> {
    let sock = Socket::inet()?;
    up(&sock, "lo")?;
    let mut req = ifreq("eth0");
    req.ifr_ifru.ifru_addr = sockaddr(network.address);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "address of eth0")?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(network.prefix_len.min(32)))
        .unwrap_or(0);
    let mut req = ifreq("eth0");
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "netmask of eth0")?;
    up(&sock, "eth0")?;
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(network.gateway);
    route.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    ioctl(&sock, libc::SIOCADDRT, &mut route, "default route")
}
