//! Transparent capture: the connections an app opens reach the sidecar's capture listener by
//! its namespace's iptables rules (see `weft run --transparent`), each still addressed, as far
//! as the kernel is concerned, to where the app sent it (`SO_ORIGINAL_DST`). The capture
//! listener hands each to the listener that address belongs to:
//! - a service's virtual IP (any port): that service's outbound listener (routes, policies,
//!   mutual TLS, retries, as for an explicit upstream);
//! - an instance's address: a TCP connection to that very instance, over mutual TLS (so an app
//!   cannot reach another's port around its sidecar);
//! - anything else: out of the mesh, unchanged (passthrough), and counted.
//!
//! Here: where a connection was going. The handing on is the capture listener's
//! ([`crate::listener::Capture`]).
use std::net::SocketAddr;

/// Where a captured connection was going: the original destination the NAT rule replaced.
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let v4 = stream.local_addr()?.is_ipv4();
    if v4 {
        let a = getsockopt(stream, sockopt::OriginalDst).map_err(std::io::Error::from)?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        Ok(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
    } else {
        let a = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(std::io::Error::from)?;
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
        Ok(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)))
    }
}
