//! An instance's own network namespace, as a pod has (`weft run --transparent`): the app and
//! its sidecar share it, with an address of its own on a bridge of the host (`weft0`), and
//! iptables rules inside it send the app's TCP through the sidecar:
//! - inbound: every TCP connection that arrives (but to the sidecar's own ports) goes to the
//!   sidecar's inbound listener, so nothing reaches the app around it;
//! - outbound: every TCP connection the app opens (but to loopback, and to the control plane)
//!   goes to the sidecar's capture listener, which reads where it was going: the app's own are
//!   pointed there at `connect()` by programs attached to the app's cgroup ([`crate::redirect`]),
//!   anything else in the namespace by the nat rule (`SO_ORIGINAL_DST`); DNS (UDP and TCP port
//!   53) goes to the sidecar's resolver;
//! - the sidecar's own connections carry a socket mark ([`weft_api::names::CAPTURE_MARK`])
//!   and are let through;
//! - IPv6, where the host has it and ip6tables: the namespace has the IPv6 form of its address
//!   ([`weft_api::names::mesh_ipv6`]) and no link-local one, and the same rules in ip6tables
//!   capture IPv6 connections both ways (the app's own are redirected at `connect()` as IPv4's);
//!   without it, IPv6 is off on the namespace's link, so nothing reaches the app, or leaves it, over IPv6
//!   around the sidecar.
//!
//! Everything weft makes is named `weft…` and recorded under [`STATE_DIR`] with the pid of the
//! `weft run` that made it, so the next start or `weft cleanup` removes what a killed one left:
//! the namespace (its rules and its end of the veth pair go with it), `/etc/netns/NAME/`, the
//! app's cgroup (named as the namespace), and the bridge once no instance uses it. The host
//! namespace's own filter rules are never touched.
//!
//! [`Hosts`] (`weft up --hosts N`) simulates a network of N hosts on this machine: namespaces
//! `weft-h-K-…` joined by a switch (a bridge in a namespace of its own), each a host with its own
//! address and instance range, as the test suite's multi-host fixture builds them.
use crate::redirect::{self, ConnectRedirect};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use weft_api::names::{CAPTURE_MARK, capture_ports, mesh_ipv6};

/// Where weft records the namespaces it made (a tmpfs: gone at reboot, as the namespaces are).
pub const STATE_DIR: &str = "/run/weft/netns";
/// The bridge instances' namespaces are joined to, in the namespace `weft run` runs in.
pub const BRIDGE: &str = "weft0";
/// Addresses of instances' namespaces (`--netns-range`); the first is the bridge's.
pub const DEFAULT_RANGE: &str = "10.240.0.0/16";
/// Prefixes of the namespaces weft makes: an instance's, and a simulated host's.
const INSTANCE_PREFIX: &str = "weft-i-";
const HOST_PREFIX: &str = "weft-h-";
/// This namespace's end of the link to the simulated hosts' switch ([`Hosts`]).
pub const HOSTS_LINK: &str = "weft-hosts";
/// The most simulated hosts: host K is 10.241.0.K, its instances 10.240.K.0/24.
pub const MAX_HOSTS: u8 = 32;

/// An IPv4 range, `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Range, String> {
        let (ip, prefix) =
            s.split_once('/').ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX, e.g. 10.240.0.0/16"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (8..=30).contains(p)).ok_or_else(|| {
            format!("{s:?}: the prefix must be a number from 8 to 30 (room for the bridge and instances)")
        })?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Range { base: Ipv4Addr::from(u32::from(ip) & mask), prefix })
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Range {
    /// The bridge's address: the range's first.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// An address's IPv6 form's prefix length: the range's within [`weft_api::names::MESH_IPV6_PREFIX`].
    fn prefix6(&self) -> u8 {
        96 + self.prefix
    }

    /// Instances' addresses: all but the network, the bridge's and the broadcast address.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.base);
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }
}

/// What weft recorded of one namespace it made.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The namespace (`ip netns` name).
    netns: String,
    /// The host side of its veth pair.
    veth: String,
    address: Ipv4Addr,
    /// The `weft run` that made it; when it is gone, so should the namespace be.
    owner: u32,
    /// The network namespace it was made from (where its bridge and veth end are):
    /// `/proc/self/ns/net`'s inode.
    host: u64,
}

/// An instance's network namespace, removed when dropped.
pub struct InstanceNet {
    record: Record,
    range: Range,
    /// The app's cgroup, whose connections are redirected at `connect()` (see
    /// [`InstanceNet::capture`]).
    redirect: Option<ConnectRedirect>,
    /// Whether the namespace has IPv6 (see [`InstanceNet::ipv6`]).
    ipv6: bool,
}

/// Whether this process may make namespaces and rules: root, or CAP_NET_ADMIN and
/// CAP_SYS_ADMIN (for `ip netns`). `Err` says what is missing, in one line.
pub fn preflight() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    if effective & (CAP_NET_ADMIN | CAP_SYS_ADMIN) != CAP_NET_ADMIN | CAP_SYS_ADMIN {
        bail!(
            "--transparent needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to make the instance's network namespace and its capture rules: run it with sudo, or leave out --transparent and give the app its upstreams with --upstream"
        );
    }
    for tool in ["ip", iptables_restore().as_str()] {
        if which(tool).is_none() {
            bail!("--transparent needs `{tool}` (Debian: apt-get install iproute2 iptables)");
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The iptables flavour: `WEFT_IPTABLES` (`iptables-nft` or `iptables-legacy`), else the
/// system's `iptables`.
fn iptables() -> String {
    std::env::var("WEFT_IPTABLES").unwrap_or_else(|_| "iptables".to_owned())
}

fn iptables_restore() -> String {
    format!("{}-restore", iptables())
}

/// The same flavour's IPv6 tool (`ip6tables`, `ip6tables-nft`, …).
fn ip6tables() -> String {
    iptables().replacen("iptables", "ip6tables", 1)
}

/// Whether instances' namespaces can have IPv6 captured: the kernel has IPv6 and the
/// iptables flavour its IPv6 tools.
fn ipv6_capturable() -> bool {
    Path::new("/proc/sys/net/ipv6").exists() && which(&format!("{}-restore", ip6tables())).is_some()
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// Runs `program` inside namespace `netns`.
fn in_netns(netns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, program]).args(args);
    c
}

fn this_netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).unwrap_or(0)
}

fn records() -> Vec<(PathBuf, Record)> {
    let Ok(dir) = std::fs::read_dir(STATE_DIR) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let path = e.path();
            let r = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            Some((path, r))
        })
        .collect()
}

/// Whether process `pid` runs: not gone, and not a zombie (dead, not yet reaped by its new
/// parent after its own was killed).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // "PID (COMMAND) STATE ...": the command may hold spaces and parentheses.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X")
}

/// A lock over the records (address allocation, cleanup), held while it lives.
struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    fn take() -> anyhow::Result<StateLock> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("cannot make {STATE_DIR}"))?;
        let f = std::fs::File::create(Path::new(STATE_DIR).with_extension("lock"))?;
        #[allow(deprecated)] // flock(2) on the file; released when it is closed
        nix::fcntl::flock(std::os::fd::AsRawFd::as_raw_fd(&f), nix::fcntl::FlockArg::LockExclusive)?;
        Ok(StateLock { _file: f })
    }
}

/// Removes what weft made for instances whose `weft run` is gone: their namespaces, resolver
/// files and records, and this namespace's bridge if no instance of it is left. Returns the
/// namespaces removed.
pub fn cleanup() -> anyhow::Result<Vec<String>> {
    let _lock = StateLock::take()?;
    Ok(cleanup_locked())
}

fn cleanup_locked() -> Vec<String> {
    let mut removed = Vec::new();
    for (path, r) in records() {
        if alive(r.owner) && r.owner != std::process::id() {
            continue;
        }
        remove_netns(&r);
        let _ = std::fs::remove_file(&path);
        removed.push(r.netns);
    }
    // Namespaces named by weft with no record (killed between making one and recording it).
    let listed = ip(&["netns", "list"]).unwrap_or_default();
    let recorded: Vec<String> = records().into_iter().map(|(_, r)| r.netns).collect();
    for name in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        let ours = name.starts_with(INSTANCE_PREFIX) || name.starts_with(HOST_PREFIX);
        if ours && !recorded.iter().any(|r| r == name) {
            let orphan = Record {
                netns: name.to_owned(),
                veth: String::new(),
                address: Ipv4Addr::UNSPECIFIED,
                owner: 0,
                host: 0,
            };
            remove_netns(&orphan);
            removed.push(name.to_owned());
        }
    }
    // The cgroups of instances whose namespace is gone (their app is gone with the sidecar).
    for name in redirect::cgroups_named(INSTANCE_PREFIX) {
        if !recorded.contains(&name) {
            redirect::remove_cgroup(&name);
        }
    }
    remove_bridge_if_unused();
    // The switch's namespace is gone, and this end of its link with it; only a half-made
    // link is left here.
    if !records().iter().any(|(_, r)| r.host == this_netns() && r.veth == HOSTS_LINK)
        && ip(&["link", "show", HOSTS_LINK]).is_ok()
    {
        let _ = ip(&["link", "del", HOSTS_LINK]);
    }
    removed
}

/// Removes this namespace's bridge unless an instance made from here still uses it.
fn remove_bridge_if_unused() {
    let host = this_netns();
    let used = records().iter().any(|(_, r)| r.host == host && r.netns.starts_with(INSTANCE_PREFIX));
    if !used && ip(&["link", "show", BRIDGE]).is_ok() {
        let _ = ip(&["link", "del", BRIDGE]);
    }
}

fn remove_netns(r: &Record) {
    let _ = ip(&["netns", "del", &r.netns]);
    if !r.veth.is_empty() {
        // Gone with the namespace's end; only a half-made pair is left here.
        let _ = ip(&["link", "del", &r.veth]);
    }
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&r.netns));
    redirect::remove_cgroup(&r.netns);
}

impl InstanceNet {
    /// Makes instance `id`'s namespace with an address from `range`, joined to this
    /// namespace's bridge (made if missing), with `resolv.conf` naming the sidecar's resolver.
    /// What a killed `weft run` left is removed first.
    pub fn create(id: &str, range: Range) -> anyhow::Result<InstanceNet> {
        let _lock = StateLock::take()?;
        cleanup_locked();
        let host = this_netns();
        let used: Vec<Ipv4Addr> = records()
            .into_iter()
            .filter(|(_, r)| r.host == host && r.netns.starts_with(INSTANCE_PREFIX))
            .map(|(_, r)| r.address)
            .collect();
        let address = range.hosts().find(|a| !used.contains(a)).with_context(|| {
            format!("every address of {range} is in use by an instance; give --netns-range a larger one")
        })?;
        let suffix = weft_proxy::crypto::random_hex(4);
        let netns = format!("{INSTANCE_PREFIX}{}-{suffix}", sanitize(id));
        let record =
            Record { netns: netns.clone(), veth: format!("wv{suffix}"), address, owner: std::process::id(), host };
        // Recorded before anything is made, so whatever happens next can be cleaned up.
        let path = Path::new(STATE_DIR).join(format!("{netns}.json"));
        std::fs::write(&path, serde_json::to_vec(&record)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut net = InstanceNet { record, range, redirect: None, ipv6: false };
        net.build().with_context(|| format!("cannot set up the network namespace {netns}"))?;
        Ok(net)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let r = &self.record;
        let gateway = self.range.gateway();
        make_bridge(self.range)?;
        ip(&["netns", "add", &r.netns])?;
        ip(&["link", "add", &r.veth, "type", "veth", "peer", "name", "eth0", "netns", &r.netns])?;
        ip(&["link", "set", &r.veth, "master", BRIDGE, "up"])?;
        let inside = |args: &[&str]| run(&mut in_netns(&r.netns, "ip", args));
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{}/{}", r.address, self.range.prefix), "dev", "eth0"])?;
        // IPv6 where it can be captured (the bridge has its gateway): the address's IPv6 form
        // and no link-local one (nothing else to reach the app at); else IPv6 is off on the
        // link, and loopback keeps ::1.
        let ipv6 = ipv6_capturable() && bridge_has_ipv6(self.range);
        if ipv6 {
            inside(&["link", "set", "eth0", "addrgenmode", "none"])?;
            let v6 = format!("{}/{}", mesh_ipv6(r.address), self.range.prefix6());
            inside(&["-6", "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        } else {
            run(&mut in_netns(
                &r.netns,
                "sh",
                &["-c", "f=/proc/sys/net/ipv6/conf/eth0/disable_ipv6; [ ! -e $f ] || echo 1 > $f"],
            ))?;
        }
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["route", "add", "default", "via", &gateway.to_string()])?;
        if ipv6 {
            inside(&["-6", "route", "add", "default", "via", &mesh_ipv6(gateway).to_string()])?;
        }
        self.ipv6 = ipv6;
        // `ip netns exec` shows processes this file as /etc/resolv.conf: the sidecar's resolver.
        let etc = Path::new("/etc/netns").join(&r.netns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("resolv.conf"),
            "# weft: the sidecar answers mesh names and forwards the rest\nnameserver 127.0.0.1\noptions edns0\n",
        )?;
        if ipv6 {
            std::fs::write(etc.join("gai.conf"), GAI_CONF)?;
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.record.netns
    }

    pub fn address(&self) -> Ipv4Addr {
        self.record.address
    }

    /// The namespace's IPv6 address, if it has IPv6: the host has it (the kernel, ip6tables of
    /// the flavour in use, IPv6 on the bridge). Its connections are then captured over IPv6
    /// too.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then(|| mesh_ipv6(self.record.address))
    }

    /// Installs the capture rules inside the namespace and checks that they are in force, and
    /// attaches the connect-time redirection to a cgroup for the app (named as the namespace),
    /// which then takes the app's own connections around the nat rules (see
    /// [`crate::redirect`]); without it (no cgroup v2 here) the nat rules capture them all.
    /// `control`: the control plane's address, which the sidecar reaches directly.
    pub fn capture(&mut self, control: &[SocketAddr]) -> anyhow::Result<()> {
        self.install(&iptables(), &capture_rules(control, false))?;
        if self.ipv6 {
            self.install(&ip6tables(), &capture_rules(control, true))?;
        }
        let listener = SocketAddrV4::new(Ipv4Addr::LOCALHOST, capture_ports().outbound);
        match ConnectRedirect::attach(&self.record.netns, listener, control) {
            Ok(r) => self.redirect = Some(r),
            Err(e) => tracing::warn!(
                "the app's connections are captured by the namespace's nat rule alone (translated packet by packet): the redirection at connect() could not be set up: {e:#}"
            ),
        }
        Ok(())
    }

    /// Installs `rules` with `tool`'s restore inside the namespace, and checks that they are
    /// in force.
    fn install(&self, tool: &str, rules: &str) -> anyhow::Result<()> {
        let (restore, save) = (format!("{tool}-restore"), format!("{tool}-save"));
        let mut cmd = in_netns(&self.record.netns, &restore, &["--noflush"]);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot run {restore}"))?;
        use std::io::Write;
        child.stdin.take().expect("piped").write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{restore} refused the capture rules: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let saved = run(&mut in_netns(&self.record.netns, &save, &["-t", "nat"]))?;
        let expected = rules.lines().filter(|l| l.starts_with("-A ")).count();
        let found = saved.lines().filter(|l| l.starts_with("-A ") && l.contains("WEFT")).count();
        if found != expected {
            bail!("the capture rules are not in force after {restore}: {found} of {expected} rules found by {save}");
        }
        Ok(())
    }

    /// What the sidecar is handed of the connect-time redirection, if it is set up: the
    /// variable and its value (see [`weft_proxy::capture::HANDOFF_VAR`]).
    pub fn redirect_handoff(&self) -> anyhow::Result<Option<(&'static str, String)>> {
        match &self.redirect {
            Some(r) => Ok(Some((weft_proxy::capture::HANDOFF_VAR, r.handoff()?))),
            None => Ok(None),
        }
    }

    /// The command that runs `program` inside the namespace (with its resolv.conf).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.record.netns]).arg(program);
        c
    }
}

impl Drop for InstanceNet {
    fn drop(&mut self) {
        drop(self.redirect.take());
        let Ok(_lock) = StateLock::take() else { return };
        remove_netns(&self.record);
        let _ = std::fs::remove_file(Path::new(STATE_DIR).join(format!("{}.json", self.record.netns)));
        remove_bridge_if_unused();
    }
}

/// The namespace's `/etc/gai.conf` where it has IPv6: RFC 6724's default policy table, under
/// which `getaddrinfo` puts a name's IPv4 address before a unique local IPv6 one (glibc's
/// built-in table is RFC 3484's, which puts any IPv6 first), so an app that takes the first
/// address of a mesh name connects over IPv4, as sidecars reach each other.
const GAI_CONF: &str = "# weft: RFC 6724's default policy table (IPv4 before unique local IPv6)
precedence ::1/128 50
precedence ::/0 40
precedence ::ffff:0:0/96 35
precedence 2002::/16 30
precedence 2001::/32 5
precedence fc00::/7 3
precedence ::/96 1
precedence fec0::/10 1
precedence 3ffe::/16 1
label ::1/128 0
label ::/0 1
label ::ffff:0:0/96 4
label 2002::/16 2
label 2001::/32 5
label fc00::/7 13
label ::/96 3
label fec0::/10 11
label 3ffe::/16 12
";

/// Makes this namespace's bridge, with the range's first address, unless it is there.
fn make_bridge(range: Range) -> anyhow::Result<()> {
    if ip(&["link", "show", BRIDGE]).is_err() {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/{}", range.gateway(), range.prefix), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
    }
    Ok(())
}

/// Whether the bridge has the IPv6 form of the range's gateway, given it if it can: not where
/// IPv6 is off for new links (`net.ipv6.conf.default.disable_ipv6`).
fn bridge_has_ipv6(range: Range) -> bool {
    let gateway = mesh_ipv6(range.gateway());
    let has = || ip(&["-6", "-o", "addr", "show", "dev", BRIDGE]).is_ok_and(|out| out.contains(&gateway.to_string()));
    has() || {
        let _ = ip(&["-6", "addr", "add", &format!("{gateway}/{}", range.prefix6()), "dev", BRIDGE, "nodad"]);
        has()
    }
}

/// This namespace's bridge, for a process that needs its address before any instance is
/// made (`weft up` serves the control plane there); removed when dropped, unless an instance
/// still uses it.
pub struct Bridge {
    pub gateway: Ipv4Addr,
}

impl Bridge {
    pub fn ensure(range: Range) -> anyhow::Result<Bridge> {
        let _lock = StateLock::take()?;
        cleanup_locked();
        make_bridge(range).with_context(|| format!("cannot make the bridge {BRIDGE}"))?;
        Ok(Bridge { gateway: range.gateway() })
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let Ok(_lock) = StateLock::take() else { return };
        remove_bridge_if_unused();
    }
}

/// Simulated hosts on this machine (`weft up --hosts N`): host K is a network namespace
/// `weft-h-K-…` at 10.241.0.K on a switch (a bridge in a namespace of its own, `weft-h-sw-…`),
/// whose instances get 10.240.K.0/24 and which routes the other hosts' instance ranges to them.
/// This namespace joins the switch at [`Hosts::here`] through the link [`HOSTS_LINK`], with a
/// route to every host's instances, so it can be the operator's machine: the control plane and
/// the gateway run here. Where instances get IPv6, the same in each address's IPv6 form.
/// Everything is recorded like instances' namespaces and removed when dropped, or by the next
/// start or `weft cleanup` after a SIGKILL.
pub struct Hosts {
    records: Vec<Record>,
    pub here: Ipv4Addr,
}

/// One simulated host.
pub struct SimHost {
    /// Its namespace: run a process there with `nsenter --net=/run/netns/NAME`.
    pub netns: String,
    pub address: Ipv4Addr,
    /// Its instances' addresses (`weft run --netns-range`).
    pub range: Range,
}

impl Hosts {
    pub fn create(n: u8) -> anyhow::Result<Hosts> {
        anyhow::ensure!((1..=MAX_HOSTS).contains(&n), "--hosts must be from 1 to {MAX_HOSTS}");
        let _lock = StateLock::take()?;
        cleanup_locked();
        if ip(&["link", "show", HOSTS_LINK]).is_ok() {
            bail!(
                "simulated hosts are already running here (the link {HOSTS_LINK} is up): stop that `weft up --hosts` first"
            );
        }
        let suffix = weft_proxy::crypto::random_hex(3);
        let here = Ipv4Addr::new(10, 241, 0, 254);
        let mut hosts = Hosts { records: Vec::new(), here };
        let switch = hosts.record(format!("{HOST_PREFIX}sw-{suffix}"), HOSTS_LINK, here)?;
        for k in 1..=n {
            hosts.record(format!("{HOST_PREFIX}{k}-{suffix}"), "", Ipv4Addr::new(10, 241, 0, k))?;
        }
        hosts.build(&switch).context("cannot set up the simulated hosts")?;
        Ok(hosts)
    }

    /// Records a namespace to make (before making it, so whatever happens can be cleaned up).
    fn record(&mut self, netns: String, veth: &str, address: Ipv4Addr) -> anyhow::Result<String> {
        let record = Record { netns, veth: veth.to_owned(), address, owner: std::process::id(), host: this_netns() };
        let path = Path::new(STATE_DIR).join(format!("{}.json", record.netns));
        std::fs::write(&path, serde_json::to_vec(&record)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let name = record.netns.clone();
        self.records.push(record);
        Ok(name)
    }

    fn build(&self, switch: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", switch])?;
        let in_switch = |args: &[&str]| run(&mut in_netns(switch, "ip", args));
        in_switch(&["link", "add", "br0", "type", "bridge"])?;
        in_switch(&["link", "set", "br0", "up"])?;
        // This namespace's link to the switch.
        ip(&["link", "add", HOSTS_LINK, "type", "veth", "peer", "name", "here", "netns", switch])?;
        in_switch(&["link", "set", "here", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/24", self.here), "dev", HOSTS_LINK])?;
        // IPv6 too, where instances get it: each address's IPv6 form, routed the same way.
        let here6 = format!("{}/120", mesh_ipv6(self.here));
        let ipv6 = ipv6_capturable() && ip(&["-6", "addr", "add", &here6, "dev", HOSTS_LINK, "nodad"]).is_ok();
        ip(&["link", "set", HOSTS_LINK, "up"])?;
        let hosts = self.hosts();
        for (k, h) in hosts.iter().enumerate() {
            let port = format!("p{}", k + 1);
            ip(&["netns", "add", &h.netns])?;
            in_switch(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &h.netns])?;
            in_switch(&["link", "set", &port, "master", "br0", "up"])?;
            let inside = |args: &[&str]| run(&mut in_netns(&h.netns, "ip", args));
            inside(&["link", "set", "lo", "up"])?;
            inside(&["addr", "add", &format!("{}/24", h.address), "dev", "eth0"])?;
            if ipv6 {
                inside(&["-6", "addr", "add", &format!("{}/120", mesh_ipv6(h.address)), "dev", "eth0", "nodad"])?;
            }
            inside(&["link", "set", "eth0", "up"])?;
            // A host forwards between its instances' bridge and the network.
            let forward = if ipv6 {
                "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"
            } else {
                "echo 1 > /proc/sys/net/ipv4/ip_forward"
            };
            run(&mut in_netns(&h.netns, "sh", &["-c", forward]))?;
            let range6 = |r: Range| format!("{}/{}", mesh_ipv6(r.base), r.prefix6());
            for other in hosts.iter().filter(|o| o.netns != h.netns) {
                inside(&["route", "add", &other.range.to_string(), "via", &other.address.to_string()])?;
                if ipv6 {
                    inside(&[
                        "-6",
                        "route",
                        "add",
                        &range6(other.range),
                        "via",
                        &mesh_ipv6(other.address).to_string(),
                    ])?;
                }
            }
            // Gone with the link when the switch's namespace is removed.
            ip(&["route", "add", &h.range.to_string(), "via", &h.address.to_string(), "dev", HOSTS_LINK])?;
            if ipv6 {
                let via = mesh_ipv6(h.address).to_string();
                ip(&["-6", "route", "add", &range6(h.range), "via", &via, "dev", HOSTS_LINK])?;
            }
        }
        Ok(())
    }

    /// The hosts, first to last.
    pub fn hosts(&self) -> Vec<SimHost> {
        self.records
            .iter()
            .filter(|r| r.veth.is_empty())
            .map(|r| {
                let k = r.address.octets()[3];
                SimHost {
                    netns: r.netns.clone(),
                    address: r.address,
                    range: Range { base: Ipv4Addr::new(10, 240, k, 0), prefix: 24 },
                }
            })
            .collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let Ok(_lock) = StateLock::take() else { return };
        // Hosts first (their instances' links go with them), then the switch.
        for r in self.records.iter().rev() {
            remove_netns(r);
            let _ = std::fs::remove_file(Path::new(STATE_DIR).join(format!("{}.json", r.netns)));
        }
    }
}

fn sanitize(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(24).collect()
}

/// The nat table rules of an instance's namespace (iptables-restore input), IPv4's or IPv6's
/// (`ip6tables-restore` input).
fn capture_rules(control: &[SocketAddr], ipv6: bool) -> String {
    let p = capture_ports();
    let (loopback, host) = if ipv6 { ("::1/128", 128) } else { ("127.0.0.0/8", 32) };
    let mut r = String::from("*nat\n:WEFT_INBOUND - [0:0]\n:WEFT_OUTPUT - [0:0]\n");
    r += "-A PREROUTING -p tcp -j WEFT_INBOUND\n";
    for own in [p.inbound, p.admin] {
        r += &format!("-A WEFT_INBOUND -p tcp --dport {own} -j RETURN\n");
    }
    r += &format!("-A WEFT_INBOUND -p tcp -j REDIRECT --to-ports {}\n", p.inbound);
    r += "-A OUTPUT -j WEFT_OUTPUT\n";
    r += &format!("-A WEFT_OUTPUT -m mark --mark {CAPTURE_MARK:#x} -j RETURN\n");
    for proto in ["udp", "tcp"] {
        r += &format!("-A WEFT_OUTPUT -p {proto} --dport 53 -j REDIRECT --to-ports {}\n", p.dns);
    }
    for c in control.iter().filter(|c| c.is_ipv6() == ipv6) {
        r += &format!("-A WEFT_OUTPUT -d {}/{host} -p tcp --dport {} -j RETURN\n", c.ip(), c.port());
    }
    r += &format!("-A WEFT_OUTPUT -d {loopback} -j RETURN\n");
    r += &format!("-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports {}\n", p.outbound);
    r += "COMMIT\n";
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_with_clear_errors() {
        let r: Range = "10.240.7.9/16".parse().unwrap();
        assert_eq!(r.to_string(), "10.240.0.0/16");
        assert_eq!(r.gateway(), Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(r.hosts().next(), Some(Ipv4Addr::new(10, 240, 0, 2)));
        let small: Range = "10.1.2.0/30".parse().unwrap();
        assert_eq!(small.hosts().collect::<Vec<_>>(), vec![Ipv4Addr::new(10, 1, 2, 2)]);
        for bad in ["10.240.0.0", "10.240.0.0/31", "fd00::/64", "10.240.0.0/x"] {
            let e = bad.parse::<Range>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_sidecar_its_resolver_and_the_control_plane_are_never_captured() {
        let control: [SocketAddr; 2] = ["10.240.0.1:15010".parse().unwrap(), "[fd00::1]:15010".parse().unwrap()];
        let rules = capture_rules(&control, false);
        let lines: Vec<&str> = rules.lines().collect();
        let at =
            |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {rules}"));
        let redirect = at("--to-ports 15001");
        assert!(at("--mark 0x1337") < redirect);
        assert!(at("-d 10.240.0.1/32 -p tcp --dport 15010 -j RETURN") < redirect);
        assert!(at("-d 127.0.0.0/8") < redirect);
        assert!(at("--mark") < at("--dport 53"), "the resolver's own queries go out");
        assert!(at("--dport 15006 -j RETURN") < at("REDIRECT --to-ports 15006"));
        assert!(!rules.contains("fd00::1"), "IPv4's rules name IPv4 addresses only");
        // IPv6's: the same, with IPv6's loopback and the control plane's IPv6 address.
        let rules6 = capture_rules(&control, true);
        assert_eq!(rules6.lines().count(), rules.lines().count(), "{rules6}");
        assert!(rules6.contains("-A WEFT_OUTPUT -d fd00::1/128 -p tcp --dport 15010 -j RETURN"), "{rules6}");
        assert!(rules6.contains("-A WEFT_OUTPUT -d ::1/128 -j RETURN"), "{rules6}");
        assert!(!rules6.contains("10.240.0.1"), "{rules6}");
    }
}
