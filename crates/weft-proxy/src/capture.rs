//! Transparent capture: the connections an app opens reach the sidecar's capture listener,
//! each still addressed, as far as the app knows, to where it sent it. Two ways get them there
//! (see `weft run --transparent`):
//! - redirected at `connect()`: programs attached to the app's cgroup point the socket at the
//!   capture listener before it sends anything, and record where it was going, under the
//!   socket's own address, in a map the sidecar is handed (one for IPv4, one for IPv6:
//!   [`set_connect_origins`]); nothing is translated per packet;
//! - the namespace's nat rule (`REDIRECT`), for anything else in the namespace (a process outside
//!   the app's cgroup): the destination is read back with `SO_ORIGINAL_DST`.
//!
//! The capture listener hands each to the listener that address belongs to:
//! - a service's virtual IP (any port): that service's outbound listener (routes, policies,
//!   mutual TLS, retries, as for an explicit upstream);
//! - an instance's address: a TCP connection to that very instance, over mutual TLS (so an app
//!   cannot reach another's port around its sidecar);
//! - anything else: out of the mesh, unchanged (passthrough), and counted.
//!
//! Here: where a connection was going. The handing on is the capture listener's
//! ([`crate::listener::Capture`]).
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// Where a captured connection from `peer` was going.
pub fn original_dst(stream: &tokio::net::TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    if let Some(origin) = connect_origin(peer) {
        return Ok(origin);
    }
    use nix::sys::socket::{getsockopt, sockopt};
    if peer.is_ipv4() {
        let a = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        Ok(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
    } else {
        let a = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
        Ok(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)))
    }
}

/// The variable `weft run --transparent` hands the sidecar the connect-time redirection in:
/// `ORIGINS,ORIGINS6,PROCS`, three file descriptors it inherits: the maps of origins (IPv4's,
/// IPv6's), and the app's cgroup's `cgroup.procs` (the cgroup the programs are attached to,
/// which the app is started in).
pub const HANDOFF_VAR: &str = "WEFT_CONNECT_REDIRECT";

/// Takes what [`HANDOFF_VAR`] hands over, if anything: the maps are the proxy's from now on
/// ([`set_connect_origins`]); the app's `cgroup.procs` is returned. None is inherited further.
pub fn take_handoff() -> anyhow::Result<Option<OwnedFd>> {
    let Ok(v) = std::env::var(HANDOFF_VAR) else { return Ok(None) };
    let fds: Vec<std::os::fd::RawFd> = v.split(',').filter_map(|f| f.parse().ok()).collect();
    let [map4, map6, procs] = fds[..] else {
        anyhow::bail!(
            "{HANDOFF_VAR}={v:?}: expected three file descriptors, ORIGINS,ORIGINS6,PROCS (set by `weft run --transparent`)"
        )
    };
    let held = |fd| inherited(fd).map_err(|e| anyhow::anyhow!("{HANDOFF_VAR}: file descriptor {fd}: {e}"));
    set_connect_origins(held(map4)?, held(map6)?);
    Ok(Some(held(procs)?))
}

/// Owns inherited file descriptor `fd`, closed on exec from now on (so the app does not get it).
#[allow(unsafe_code)]
fn inherited(fd: std::os::fd::RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl on a number is harmless whatever it is; it fails unless the descriptor is
    // open. It was handed to this process alone (named in HANDOFF_VAR, which is read once),
    // so nothing else here owns it.
    unsafe {
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The maps of connections redirected at `connect()` (IPv4's, IPv6's), once handed over.
static CONNECT_ORIGINS: OnceLock<(OwnedFd, OwnedFd)> = OnceLock::new();

/// Hands the proxy the maps the connect-time redirection records origins in (BPF maps, see
/// [`origins`] for their layout). Only the first call counts.
fn set_connect_origins(map4: OwnedFd, map6: OwnedFd) {
    let _ = CONNECT_ORIGINS.set((map4, map6));
}

/// Where the app's connection from `peer` was going, if it was redirected at `connect()`; its
/// entry is taken out of the map.
fn connect_origin(peer: SocketAddr) -> Option<SocketAddr> {
    let (map4, map6) = CONNECT_ORIGINS.get()?;
    match peer {
        SocketAddr::V4(peer) => {
            let mut value = [0u8; 8];
            take(map4, &origins::key(peer), &mut value)?;
            Some(origins::value_of(value).into())
        }
        SocketAddr::V6(peer) => {
            let mut value = [0u8; 20];
            take(map6, &origins::key6(peer), &mut value)?;
            Some(origins::value6_of(value).into())
        }
    }
}

/// Looks `key` up in `map` and deletes it, its value into `value`.
fn take(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> Option<()> {
    let mut attr = bpf::Attr::default();
    attr.u32(0, map.as_raw_fd() as u32).u64(8, key.as_ptr() as u64).u64(16, value.as_mut_ptr() as u64);
    bpf::call(bpf::MAP_LOOKUP_AND_DELETE_ELEM, &mut attr).ok().map(drop)
}

/// The layout of the map of origins, shared by the programs that fill it (written by `weft run
/// --transparent`) and the proxy that reads it.
pub mod origins {
    use super::*;

    /// Key: the app socket's own address: its IPv4 address in network order, then its port as
    /// a 32-bit number in host order (as a `sock_ops` program sees `local_ip4`, `local_port`).
    pub fn key(a: SocketAddrV4) -> [u8; 8] {
        laid_out(&a.ip().octets(), host_port(a.port()))
    }

    /// Value: where it was going, as `connect()` was given it: the IPv4 address in network
    /// order, then the port in network order in the low 16 bits of a 32-bit field (as a
    /// `cgroup/connect4` program sees `user_ip4`, `user_port`).
    pub fn value(a: SocketAddrV4) -> [u8; 8] {
        laid_out(&a.ip().octets(), wire_port(a.port()))
    }

    pub fn value_of(v: [u8; 8]) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(v[0], v[1], v[2], v[3]), u16::from_be_bytes([v[4], v[5]]))
    }

    /// IPv6's key: the 16 bytes of the address (as `local_ip6`), then the port as [`key`]'s.
    pub fn key6(a: SocketAddrV6) -> [u8; 20] {
        laid_out(&a.ip().octets(), host_port(a.port()))
    }

    /// IPv6's value: the 16 bytes of the address (as `user_ip6`), then the port as [`value`]'s.
    pub fn value6(a: SocketAddrV6) -> [u8; 20] {
        laid_out(&a.ip().octets(), wire_port(a.port()))
    }

    pub fn value6_of(v: [u8; 20]) -> SocketAddrV6 {
        let ip: [u8; 16] = v[..16].try_into().expect("16 bytes");
        SocketAddrV6::new(Ipv6Addr::from(ip), u16::from_be_bytes([v[16], v[17]]), 0, 0)
    }

    /// An address's bytes, then a port's 4 bytes.
    fn laid_out<const N: usize>(ip: &[u8], port: [u8; 4]) -> [u8; N] {
        let mut b = [0u8; N];
        b[..ip.len()].copy_from_slice(ip);
        b[ip.len()..].copy_from_slice(&port);
        b
    }

    /// A port as a 32-bit number in host order (`local_port`).
    fn host_port(port: u16) -> [u8; 4] {
        u32::from(port).to_ne_bytes()
    }

    /// A port in network order in the low 16 bits of a 32-bit field (`user_port`).
    fn wire_port(port: u16) -> [u8; 4] {
        let b = port.to_be_bytes();
        [b[0], b[1], 0, 0]
    }
}

/// The `bpf(2)` system call, as far as weft uses it.
pub mod bpf {
    use std::io;

    pub const MAP_CREATE: u32 = 0;
    pub const PROG_LOAD: u32 = 5;
    pub const PROG_ATTACH: u32 = 8;
    pub const MAP_LOOKUP_AND_DELETE_ELEM: u32 = 21;

    /// A `union bpf_attr`, filled field by field at the offsets of the command's member.
    #[derive(Clone)]
    #[repr(C, align(8))]
    pub struct Attr([u8; 128]);

    impl Default for Attr {
        fn default() -> Attr {
            Attr([0; 128])
        }
    }

    impl Attr {
        pub fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }

        pub fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
            self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }

        pub fn bytes(&mut self, at: usize, v: &[u8]) -> &mut Attr {
            self.0[at..at + v.len()].copy_from_slice(v);
            self
        }
    }

    /// `bpf(cmd, attr)`: a file descriptor or 0 on success.
    #[allow(unsafe_code)]
    pub fn call(cmd: u32, attr: &mut Attr) -> io::Result<i32> {
        // SAFETY: `attr` is a valid, writable buffer of the size passed, and every pointer the
        // caller stored in it points at memory that outlives the call.
        let r = unsafe {
            libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr.0.as_mut_ptr(), attr.0.len() as libc::c_long)
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as i32) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_laid_out_as_the_kernel_hands_them_to_the_programs() {
        let a: SocketAddrV4 = "10.96.0.7:8080".parse().unwrap();
        // user_ip4 / user_port, as a little- or big-endian 32-bit load sees them in memory.
        assert_eq!(origins::value(a), [10, 96, 0, 7, 0x1f, 0x90, 0, 0]);
        assert_eq!(origins::value_of(origins::value(a)), a);
        let k = origins::key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(&k[..4], &[127, 0, 0, 1]);
        assert_eq!(u32::from_ne_bytes(k[4..].try_into().unwrap()), 40000);
        let a6: SocketAddrV6 = "[fd77:6566:7400::f0f0:7]:8080".parse().unwrap();
        let v = origins::value6(a6);
        assert_eq!(
            (&v[..2], &v[12..16], &v[16..]),
            (&[0xfd, 0x77][..], &[0xf0, 0xf0, 0, 7][..], &[0x1f, 0x90, 0, 0][..])
        );
        assert_eq!(origins::value6_of(v), a6);
        let k = origins::key6("[::1]:40000".parse().unwrap());
        assert_eq!(k[15], 1);
        assert_eq!(u32::from_ne_bytes(k[16..].try_into().unwrap()), 40000);
    }
}
