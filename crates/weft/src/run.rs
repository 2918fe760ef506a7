//! `weft run`: an app and its sidecar as one unit, in one process of the sidecar binary, which
//! `weft run` becomes (see crates/weft-proxy/src/main.rs for how it supervises the app).
//!
//! `weft run --transparent` instead stays, as the owner of the instance's network namespace
//! ([`crate::netns`]): it makes the namespace and its capture rules, runs the sidecar (and the
//! sidecar the app) inside it, passes signals on, and removes the namespace when they are done.
use crate::cli::RunArgs;
use crate::netns::{InstanceNet, preflight};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use weft_api::names::capture_ports;

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    if !a.transparent {
        return Err(exec(a));
    }
    transparent(a).await
}

/// Runs the sidecar for the app in place of this process; returns only if it cannot.
fn exec(a: RunArgs) -> anyhow::Error {
    let mut args = a.proxy;
    args.app_port = Some(a.port);
    crate::sidecar::exec(&args, &a.command)
}

async fn transparent(a: RunArgs) -> anyhow::Result<ExitCode> {
    preflight()?;
    // From now on a SIGINT/SIGTERM is this process's to handle: one during the set-up stops
    // it once the namespace is made, which it then removes.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Every replica's addresses (`--control A,B,C`).
    let mut control: Vec<SocketAddr> = Vec::new();
    for replica in a.proxy.control.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        control.extend(replica.to_socket_addrs().map_err(|e| anyhow::anyhow!("--control {replica}: {e}"))?);
    }
    if control.iter().any(|c| c.ip().is_loopback()) {
        anyhow::bail!(
            "--control {} is this host's loopback, which the instance's own network namespace cannot reach: give an address of the control plane on the bridge ({}) or on another interface, where it listens (e.g. `weft control --listen 0.0.0.0:15010 --server-name {}`)",
            a.proxy.control,
            a.netns_range.gateway(),
            a.netns_range.gateway()
        );
    }
    let service = a.proxy.service.clone().unwrap_or_default();
    let mut args = a.proxy;
    if args.dns_upstreams.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        args.dns_upstreams = weft_proxy::dns::nameservers(&conf);
        if args.dns_upstreams.is_empty() {
            tracing::warn!(
                "/etc/resolv.conf names no resolver the instance's namespace can reach (only loopback ones, or none): names outside the mesh will not resolve; give one with --dns-upstream"
            );
        }
    }
    let mut net = InstanceNet::create(args.id.as_deref().unwrap_or(&service), a.netns_range)?;
    net.capture(&control)?;
    use futures::FutureExt;
    if term.recv().now_or_never().is_some() || int.recv().now_or_never().is_some() {
        tracing::info!("stopped before the sidecar started");
        drop(net);
        return Ok(ExitCode::from(128 + 15));
    }
    let ip = std::net::IpAddr::V4(net.address());
    let ports = capture_ports();
    args.app_port = Some(a.port);
    args.inbound = SocketAddr::new(ip, ports.inbound);
    args.admin = SocketAddr::new(ip, ports.admin);
    args.capture = Some(SocketAddr::from(([127, 0, 0, 1], ports.outbound)));
    args.dns = Some(SocketAddr::from(([127, 0, 0, 1], ports.dns)));
    args.ipv6 = net.ipv6().is_some();
    let ipv6 = net.ipv6().map_or_else(|| "off".to_owned(), |v6| v6.to_string());
    tracing::info!(netns = net.name(), address = %ip, %ipv6, "instance namespace ready; starting the sidecar in it");
    let sidecar = crate::sidecar::binary()?;
    let mut cmd = crate::sidecar::command(net.command(&sidecar), &args, &a.command);
    if let Some((var, value)) = net.redirect_handoff()? {
        cmd.env(var, value);
    }
    // Killed with this process (then the next start or `weft cleanup` removes the namespace).
    let mut child = weft_proxy::supervise::spawn_command(tokio::process::Command::from(cmd))
        .map_err(|e| anyhow::anyhow!("cannot start the sidecar in {}: {e}", net.name()))?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status?,
            _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
            _ = int.recv() => nix::sys::signal::Signal::SIGINT,
        };
        // The sidecar drains and stops the app; this waits for it, then removes the namespace.
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, sig);
        }
    };
    drop(net);
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
