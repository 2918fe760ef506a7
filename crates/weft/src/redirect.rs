//! Redirection at `connect()`, the fast way for a transparent app's connections to reach its
//! sidecar (as Cilium's socket load balancing and Merbridge do): small eBPF programs attached
//! to a cgroup of the app's own, so nothing is translated per packet. For IPv4 and IPv6 alike:
//! - `cgroup/connect4`, `cgroup/connect6`: a TCP `connect()` to anywhere but loopback, port 53
//!   and the control plane (as the nat rules leave them; and IPv4-mapped IPv6 addresses, IPv4
//!   on the wire, which the IPv4 rule captures) is pointed at the capture listener
//!   (`127.0.0.1`, `[::1]`), and where it was going is recorded under the socket's cookie;
//! - `sock_ops` (one per family), when that socket sends its SYN (its own port known by then):
//!   the record moves under the socket's own address, where the sidecar finds it by the peer
//!   address of the connection it accepts ([`weft_proxy::capture::origins`] is the layout).
//!
//! The sidecar is outside the cgroup, so its own connections are untouched. Whatever else runs
//! in the namespace (outside the cgroup) is still captured by the namespace's nat rules.
//!
//! The programs are assembled here, instruction by instruction: they are about 150
//! instructions between them, and a BPF toolchain (clang, or Rust's bpf-linker) would
//! otherwise be needed to build weft at all. The kernel's verifier checks them when they are
//! loaded.
use anyhow::{Context, bail};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use weft_proxy::capture::bpf::{self, Attr};

/// An app's cgroup with the programs attached; the cgroup is removed when dropped (once the
/// app is gone from it).
pub struct ConnectRedirect {
    cgroup: PathBuf,
    origins: OwnedFd,
    origins6: OwnedFd,
    procs: OwnedFd,
}

impl ConnectRedirect {
    /// Makes cgroup `name` and attaches programs that send its TCP connections to `capture`
    /// (IPv6's to `[::1]` at the same port), but those to `exempt` (the control plane's
    /// addresses).
    pub fn attach(name: &str, capture: SocketAddrV4, exempt: &[SocketAddr]) -> anyhow::Result<ConnectRedirect> {
        let root = cgroup2_root().context("no cgroup2 file system is mounted here (under `ip netns exec`, whose processes get a /sys without it, `nsenter --net=/run/netns/NAME` keeps it)")?;
        let cgroup = root.join(name);
        std::fs::create_dir(&cgroup).with_context(|| format!("cannot make the cgroup {}", cgroup.display()))?;
        let redirect = ConnectRedirect {
            procs: std::fs::OpenOptions::new()
                .write(true)
                .open(cgroup.join("cgroup.procs"))
                .with_context(|| format!("cannot open {}/cgroup.procs", cgroup.display()))?
                .into(),
            origins: lru_map("weft_origins", 8, 8)?,
            origins6: lru_map("weft_origins6", 20, 20)?,
            cgroup,
        };
        let (pending, pending6) = (lru_map("weft_pending", 8, 8)?, lru_map("weft_pending6", 8, 20)?);
        let dir: OwnedFd = std::fs::File::open(&redirect.cgroup)?.into();
        let connect4 = connect4(&pending, capture, exempt);
        let connect6 = connect6(&pending6, capture.port(), exempt);
        for (attach_type, name, program) in [
            (ATTACH_CGROUP_INET4_CONNECT, "weft_connect4", connect4),
            (ATTACH_CGROUP_INET6_CONNECT, "weft_connect6", connect6),
        ] {
            let prog = load(PROG_TYPE_CGROUP_SOCK_ADDR, attach_type, name, &program)?;
            attach(&dir, &prog, attach_type)?;
        }
        for (name, program) in [
            ("weft_sock_ops", sock_ops(nix::libc::AF_INET, &pending, &redirect.origins)),
            ("weft_sock_ops6", sock_ops(nix::libc::AF_INET6, &pending6, &redirect.origins6)),
        ] {
            let prog = load(PROG_TYPE_SOCK_OPS, 0, name, &program)?;
            attach(&dir, &prog, ATTACH_CGROUP_SOCK_OPS)?;
        }
        Ok(redirect)
    }

    /// What the sidecar is handed ([`weft_proxy::capture::HANDOFF_VAR`]): the maps and the
    /// cgroup's `cgroup.procs`, inherited by the processes this one starts from now on.
    pub fn handoff(&self) -> anyhow::Result<String> {
        let fds = [&self.origins, &self.origins6, &self.procs];
        for fd in fds {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
                .context("cannot hand the connect-time redirection to the sidecar")?;
        }
        Ok(fds.map(|fd| fd.as_raw_fd().to_string()).join(","))
    }
}

impl Drop for ConnectRedirect {
    fn drop(&mut self) {
        // Removing the cgroup detaches the programs; the maps go with the last descriptor. Not
        // while a process is left in it, which the next start's cleanup stops.
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// beside v1's controllers). Not under `ip netns exec`, which gives its processes a `/sys` of
/// their own without the cgroup mounts (`nsenter --net` keeps them).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let at = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(at))
    })
}

/// Removes cgroup `name` if it is there, first stopping what is left in it: apps whose
/// `weft run` is gone (killed with their sidecar, maybe not yet exited).
pub fn remove_cgroup(name: &str) {
    let Some(cgroup) = cgroup2_root().map(|r| r.join(name)) else { return };
    if !cgroup.exists() {
        return;
    }
    let populated =
        || std::fs::read_to_string(cgroup.join("cgroup.events")).is_ok_and(|e| e.lines().any(|l| l == "populated 1"));
    if populated() {
        let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while populated() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir(&cgroup);
}

/// The names of the cgroups under the root that start with `prefix`.
pub fn cgroups_named(prefix: &str) -> Vec<String> {
    let Some(dir) = cgroup2_root().and_then(|r| std::fs::read_dir(r).ok()) else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n.starts_with(prefix)).collect()
}

const PROG_TYPE_SOCK_OPS: u32 = 13;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
const ATTACH_CGROUP_INET4_CONNECT: u32 = 10;
const ATTACH_CGROUP_INET6_CONNECT: u32 = 11;
/// Programs attached beside others of their type (the two `sock_ops`).
const F_ALLOW_MULTI: u32 = 2;
const MAP_TYPE_LRU_HASH: u32 = 9;
/// Connections between `connect()` and their SYN, or accepted by no one yet: plenty.
const MAP_ENTRIES: u32 = 16384;

fn lru_map(name: &str, key_size: u32, value_size: u32) -> anyhow::Result<OwnedFd> {
    let mut a = Attr::default();
    a.u32(0, MAP_TYPE_LRU_HASH).u32(4, key_size).u32(8, value_size).u32(12, MAP_ENTRIES).bytes(28, name.as_bytes());
    let fd = bpf::call(bpf::MAP_CREATE, &mut a).with_context(|| format!("cannot make the BPF map {name}"))?;
    Ok(owned(fd))
}

#[allow(unsafe_code)]
fn owned(fd: i32) -> OwnedFd {
    // SAFETY: a descriptor bpf(2) has just returned, owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn load(prog_type: u32, expected_attach: u32, name: &str, insns: &[Insn]) -> anyhow::Result<OwnedFd> {
    let code: Vec<u8> = insns.iter().flat_map(|i| i.bytes()).collect();
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::default();
    a.u32(0, prog_type)
        .u32(4, insns.len() as u32)
        .u64(8, code.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .bytes(48, name.as_bytes())
        .u32(68, expected_attach);
    match bpf::call(bpf::PROG_LOAD, &mut a) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let log = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
            bail!(
                "the kernel refused the BPF program {name}: {e}{}",
                if log.is_empty() { String::new() } else { format!("\n{log}") }
            )
        }
    }
}

fn attach(cgroup: &OwnedFd, prog: &OwnedFd, attach_type: u32) -> anyhow::Result<()> {
    let mut a = Attr::default();
    a.u32(0, cgroup.as_fd().as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, attach_type)
        .u32(12, F_ALLOW_MULTI);
    bpf::call(bpf::PROG_ATTACH, &mut a).context("cannot attach a BPF program to the app's cgroup")?;
    Ok(())
}

/// One eBPF instruction.
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | self.dst;
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R10: u8 = 10;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_MAP_DELETE: i32 = 3;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;

/// A program being written: every conditional jump goes to its end, which allows the
/// connection as it now is (returns 1).
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// Jumps to the end, patched by [`Asm::finish`].
    to_end: Vec<usize>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Asm {
        self.insns.push(Insn { code, dst, src, off, imm });
        self
    }
    /// dst = src (64 bits)
    fn mov(&mut self, dst: u8, src: u8) -> &mut Asm {
        self.op(0xbf, dst, src, 0, 0)
    }
    /// dst = imm
    fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Asm {
        self.op(0xb7, dst, 0, 0, imm)
    }
    /// dst += imm (64 bits)
    fn add_imm(&mut self, dst: u8, imm: i32) -> &mut Asm {
        self.op(0x07, dst, 0, 0, imm)
    }
    /// dst &= imm
    fn and_imm(&mut self, dst: u8, imm: i32) -> &mut Asm {
        self.op(0x57, dst, 0, 0, imm)
    }
    /// dst = *(u32 *)(src + off)
    fn load32(&mut self, dst: u8, src: u8, off: i16) -> &mut Asm {
        self.op(0x61, dst, src, off, 0)
    }
    /// *(u32 *)(dst + off) = src
    fn store32(&mut self, dst: u8, off: i16, src: u8) -> &mut Asm {
        self.op(0x63, dst, src, off, 0)
    }
    /// *(u64 *)(dst + off) = src
    fn store64(&mut self, dst: u8, off: i16, src: u8) -> &mut Asm {
        self.op(0x7b, dst, src, off, 0)
    }
    /// dst = the map `fd` (a 64-bit load the kernel resolves).
    fn map(&mut self, dst: u8, fd: &OwnedFd) -> &mut Asm {
        self.op(0x18, dst, 1, 0, fd.as_raw_fd()).op(0, 0, 0, 0, 0)
    }
    /// dst = the stack address `off` (from the frame pointer).
    fn stack(&mut self, dst: u8, off: i32) -> &mut Asm {
        self.mov(dst, R10).add_imm(dst, off)
    }
    fn call(&mut self, helper: i32) -> &mut Asm {
        self.op(0x85, 0, 0, 0, helper)
    }
    /// To the end if the low 32 bits of `reg` are `imm` (a 32-bit compare).
    fn end_if_eq(&mut self, reg: u8, imm: u32) -> &mut Asm {
        self.to_end.push(self.insns.len());
        self.op(0x16, reg, 0, 0, imm as i32)
    }
    /// To the end unless the low 32 bits of `reg` are `imm`.
    fn end_unless_eq(&mut self, reg: u8, imm: u32) -> &mut Asm {
        self.to_end.push(self.insns.len());
        self.op(0x56, reg, 0, 0, imm as i32)
    }
    /// To the end if `reg` is 0 (all 64 bits: a pointer's null check).
    fn end_if_null(&mut self, reg: u8) -> &mut Asm {
        self.to_end.push(self.insns.len());
        self.op(0x15, reg, 0, 0, 0)
    }
    /// Skips the next `n` instructions unless the low 32 bits of `reg` are `imm`.
    fn skip_unless_eq(&mut self, reg: u8, imm: u32, n: i16) -> &mut Asm {
        self.op(0x56, reg, 0, n, imm as i32)
    }
    fn finish(mut self) -> Vec<Insn> {
        let end = self.insns.len();
        for at in std::mem::take(&mut self.to_end) {
            self.insns[at].off = (end - at - 1) as i16;
        }
        self.mov_imm(R0, 1).op(0x95, 0, 0, 0, 0);
        self.insns
    }
}

/// As the programs see 4 bytes of an address or a port in their context: a 32-bit load of the
/// bytes in network order.
fn wire(bytes: [u8; 4]) -> u32 {
    u32::from_ne_bytes(bytes)
}
fn wire_ip(ip: Ipv4Addr) -> u32 {
    wire(ip.octets())
}
fn wire_port(port: u16) -> u32 {
    let b = port.to_be_bytes();
    wire([b[0], b[1], 0, 0])
}
/// An IPv6 address as four such loads.
fn words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 1, 2, 3].map(|i| wire([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

// struct bpf_sock_addr
const SA_USER_IP4: i16 = 4;
const SA_USER_IP6: i16 = 8;
const SA_USER_PORT: i16 = 24;
const SA_TYPE: i16 = 32;
const SA_PROTOCOL: i16 = 36;
// struct bpf_sock_ops
const SO_OP: i16 = 0;
const SO_FAMILY: i16 = 20;
const SO_LOCAL_IP4: i16 = 28;
const SO_LOCAL_IP6: i16 = 48;
const SO_LOCAL_PORT: i16 = 68;
const SOCK_OPS_TCP_CONNECT_CB: u32 = 3;

/// The start of a connect program: `R6` the context, to the end unless the socket is TCP; then
/// `R8` the destination port, to the end if it is 53 (DNS, to the resolver by the nat rule).
fn tcp_connect(a: &mut Asm) {
    a.mov(R6, R1)
        .load32(R2, R6, SA_TYPE)
        .end_unless_eq(R2, nix::libc::SOCK_STREAM as u32)
        .load32(R2, R6, SA_PROTOCOL)
        .end_unless_eq(R2, nix::libc::IPPROTO_TCP as u32)
        .load32(R8, R6, SA_USER_PORT)
        .end_if_eq(R8, wire_port(53));
}

/// The end of a connect program: records the destination (`value`: the registers holding the
/// words of its address, then `R8`, its port) in `pending` under the socket's cookie, and
/// points the socket at `to` (its address's field at `ip_field` of the context).
fn record_and_point(a: &mut Asm, pending: &OwnedFd, value: &[u8], ip_field: i16, to: (&[u32], u16)) {
    let start = -8 - 4 * (value.len() as i16 + 1);
    for (i, reg) in value.iter().chain([&R8]).enumerate() {
        a.store32(R10, start + 4 * i as i16, *reg);
    }
    a.mov(R1, R6)
        .call(HELPER_GET_SOCKET_COOKIE)
        .store64(R10, -8, R0)
        .map(R1, pending)
        .stack(R2, -8)
        .stack(R3, start.into())
        .mov_imm(R4, 0)
        .call(HELPER_MAP_UPDATE)
        // Not recorded: left as it is, to the nat rule.
        .end_unless_eq(R0, 0);
    for (i, w) in to.0.iter().enumerate() {
        a.mov_imm(R2, *w as i32).store32(R6, ip_field + 4 * i as i16, R2);
    }
    a.mov_imm(R2, wire_port(to.1) as i32).store32(R6, SA_USER_PORT, R2);
}

/// `cgroup/connect4`: points the app's TCP connections at `capture`, recording where each was
/// going in `pending` under its socket's cookie.
fn connect4(pending: &OwnedFd, capture: SocketAddrV4, exempt: &[SocketAddr]) -> Vec<Insn> {
    let mut a = Asm::default();
    tcp_connect(&mut a);
    a.load32(R7, R6, SA_USER_IP4).mov(R2, R7).and_imm(R2, 0xff).end_if_eq(R2, 127);
    for e in exempt {
        if let SocketAddr::V4(e) = e {
            a.skip_unless_eq(R7, wire_ip(*e.ip()), 1).end_if_eq(R8, wire_port(e.port()));
        }
    }
    record_and_point(&mut a, pending, &[R7], SA_USER_IP4, (&[wire_ip(*capture.ip())], capture.port()));
    a.finish()
}

/// `cgroup/connect6`: as [`connect4`], for IPv6 sockets, to the capture listener at `[::1]:port`;
/// loopback (`::1`) and IPv4-mapped addresses (IPv4 on the wire, which the IPv4 nat rule
/// captures) are left as they are.
fn connect6(pending: &OwnedFd, port: u16, exempt: &[SocketAddr]) -> Vec<Insn> {
    let mut a = Asm::default();
    tcp_connect(&mut a);
    a.load32(R2, R6, SA_USER_IP6)
        .load32(R3, R6, SA_USER_IP6 + 4)
        .load32(R4, R6, SA_USER_IP6 + 8)
        .load32(R7, R6, SA_USER_IP6 + 12)
        // ::1 and ::ffff:a.b.c.d both start with 64 bits of 0.
        .skip_unless_eq(R2, 0, 4)
        .skip_unless_eq(R3, 0, 3)
        .end_if_eq(R4, wire([0, 0, 0xff, 0xff]))
        .skip_unless_eq(R4, 0, 1)
        .end_if_eq(R7, words(Ipv6Addr::LOCALHOST)[3]);
    for e in exempt {
        if let SocketAddr::V6(e) = e {
            let w = words(*e.ip());
            a.skip_unless_eq(R2, w[0], 4)
                .skip_unless_eq(R3, w[1], 3)
                .skip_unless_eq(R4, w[2], 2)
                .skip_unless_eq(R7, w[3], 1)
                .end_if_eq(R8, wire_port(e.port()));
        }
    }
    record_and_point(&mut a, pending, &[R2, R3, R4, R7], SA_USER_IP6, (&words(Ipv6Addr::LOCALHOST), port));
    a.finish()
}

/// `sock_ops` for sockets of `family` (`AF_INET`, `AF_INET6`): as a recorded socket sends its
/// SYN, moves its record from `pending` to `origins`, under the socket's own address (its
/// words, then its port).
fn sock_ops(family: i32, pending: &OwnedFd, origins: &OwnedFd) -> Vec<Insn> {
    let local: &[i16] = if family == nix::libc::AF_INET6 {
        &[SO_LOCAL_IP6, SO_LOCAL_IP6 + 4, SO_LOCAL_IP6 + 8, SO_LOCAL_IP6 + 12]
    } else {
        &[SO_LOCAL_IP4]
    };
    let key = -8 - 4 * (local.len() as i16 + 1);
    let mut a = Asm::default();
    a.mov(R6, R1)
        .load32(R2, R6, SO_OP)
        .end_unless_eq(R2, SOCK_OPS_TCP_CONNECT_CB)
        .load32(R2, R6, SO_FAMILY)
        .end_unless_eq(R2, family as u32)
        .mov(R1, R6)
        .call(HELPER_GET_SOCKET_COOKIE)
        .store64(R10, -8, R0)
        .map(R1, pending)
        .stack(R2, -8)
        .call(HELPER_MAP_LOOKUP)
        .end_if_null(R0)
        .mov(R7, R0);
    for (i, field) in local.iter().chain([&SO_LOCAL_PORT]).enumerate() {
        a.load32(R2, R6, *field).store32(R10, key + 4 * i as i16, R2);
    }
    a.map(R1, origins)
        .stack(R2, key.into())
        .mov(R3, R7)
        .mov_imm(R4, 0)
        .call(HELPER_MAP_UPDATE)
        .map(R1, pending)
        .stack(R2, -8)
        .call(HELPER_MAP_DELETE);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_compared_as_the_context_holds_them() {
        let a: SocketAddrV4 = "10.96.0.7:8080".parse().unwrap();
        let v = weft_proxy::capture::origins::value(a);
        assert_eq!(wire_ip(*a.ip()).to_ne_bytes(), v[..4]);
        assert_eq!(wire_port(a.port()).to_ne_bytes(), v[4..]);
        let a6: std::net::SocketAddrV6 = "[fd77:6566:7400::f0f0:7]:8080".parse().unwrap();
        let v = weft_proxy::capture::origins::value6(a6);
        let w: Vec<u8> = words(*a6.ip()).iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(w, v[..16]);
        assert_eq!(wire_port(a6.port()).to_ne_bytes(), v[16..]);
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_ends_allow() {
        let pending: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let exempt: [SocketAddr; 2] = ["10.240.0.1:15010".parse().unwrap(), "[fd00::1]:15010".parse().unwrap()];
        for insns in [
            connect4(&pending, "127.0.0.1:15001".parse().unwrap(), &exempt),
            connect6(&pending, 15001, &exempt),
            sock_ops(nix::libc::AF_INET6, &pending, &pending),
        ] {
            let end = insns.len() - 2;
            for (i, insn) in insns.iter().enumerate() {
                if matches!(insn.code, 0x15 | 0x16 | 0x56) {
                    assert!(i + 1 + insn.off as usize <= end, "instruction {i} jumps past the end");
                }
            }
            assert_eq!((insns[end].code, insns[end].imm, insns[end + 1].code), (0xb7, 1, 0x95));
        }
    }
}
