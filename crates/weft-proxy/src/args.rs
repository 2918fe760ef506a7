//! The sidecar's command line: the flags of `weft-proxy` (which `weft proxy` and `weft run`
//! take too, and hand on to it), and how they become [`ProxyOptions`].
use crate::context::Limits;
use crate::health::HealthCheck;
use crate::proxy::ProxyOptions;
use clap::Args;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use weft_api::names::DEFAULT_CONTROL;

#[derive(Args, Clone, Debug, PartialEq)]
pub struct ProxyArgs {
    /// Service this instance belongs to. Without it the proxy only serves --upstream listeners.
    #[arg(long)]
    pub service: Option<String>,
    /// Port of the local application.
    #[arg(long = "app-port")]
    pub app_port: Option<u16>,
    /// Host of the local application.
    #[arg(long, default_value = "127.0.0.1")]
    pub app_host: IpAddr,
    /// Address of the inbound listener other proxies reach this instance on (port 0: pick one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub inbound: SocketAddr,
    /// Upstream service reachable on a local port: SERVICE=PORT or SERVICE=HOST:PORT. Repeatable.
    #[arg(long = "upstream", value_parser = upstream)]
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Run as this datacenter's mesh gateway, listening here (the address peer datacenters'
    /// sidecars reach): TLS connections for an exported service are passed, still encrypted,
    /// to its instances. Needs a join token for the service `mesh-gateway`; no app.
    #[arg(long = "mesh-gateway", conflicts_with_all = ["service", "app_port", "upstreams", "capture"])]
    pub mesh_gateway: Option<SocketAddr>,
    /// A mesh gateway's address for this datacenter's own sidecars (`weft control
    /// --mesh-gateway-mode local`): connections to a peer's services arrive here and go on,
    /// still encrypted, to the peer's mesh gateway.
    #[arg(long = "mesh-gateway-local", requires = "mesh_gateway")]
    pub mesh_gateway_local: Option<SocketAddr>,
    /// Transparent instances: the capture listener every TCP connection the app opens is
    /// redirected to (by `weft run --transparent`'s rules); the proxy hands each to the
    /// service it was for, by virtual IP or instance address, and marks its own connections.
    #[arg(long)]
    pub capture: Option<SocketAddr>,
    /// Serve mesh DNS here (UDP and TCP): services' names to their virtual IPs, other names
    /// asked of --dns-upstream.
    #[arg(long)]
    pub dns: Option<SocketAddr>,
    /// Transparent instances whose namespace has IPv6 (set by `weft run --transparent` where
    /// it does): the capture and DNS listeners listen on ::1 too, the inbound listener on every
    /// IPv6 address, on the same ports, and mesh names answer AAAA with their virtual IPs'
    /// IPv6 form (in fd77:6566:7400::/96).
    #[arg(long, requires = "capture")]
    pub ipv6: bool,
    /// A resolver mesh DNS forwards other names to (IP or IP:PORT). Repeatable.
    #[arg(long = "dns-upstream", value_parser = dns_upstream)]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Label of this instance, KEY=VALUE (e.g. version=v1, zone=a). Repeatable.
    #[arg(long = "label", value_parser = label)]
    pub labels: Vec<(String, String)>,
    /// Unique id of this instance (default: SERVICE-PID-RANDOM, 8 random hex digits).
    #[arg(long)]
    pub id: Option<String>,
    /// Admin endpoint (/live, /ready, /metrics, /config_dump). Port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// HTTP health check path on the app (default: a TCP connect check).
    #[arg(long)]
    pub health_path: Option<String>,
    /// Interval between health checks; two failures in a row mark the instance unhealthy.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub health_interval: Duration,
    /// How long to wait for a client's first bytes before treating a connection as opaque TCP.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub detect_timeout: Duration,
    /// Largest HTTP request head / header list accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: u32,
    /// Time allowed for an HTTP/1 client to send its request head.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Open client connections per listener; new ones beyond it are closed at once.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// How long a pooled connection to an upstream may sit unused before it is closed.
    #[arg(long, default_value = "90s", value_parser = duration)]
    pub upstream_idle_timeout: Duration,
    /// On SIGTERM: after leaving the mesh, how long the proxy keeps serving requests and
    /// connections in flight at most (it stops sooner once none are left), before the app
    /// (`weft run`) is stopped.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Worker threads for the proxy (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Join token for this proxy's service (`weft token create --service NAME`).
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Send the xDS stream here instead of to --control (HOST:PORT, TLS with the same root).
    #[arg(long)]
    pub xds: Option<String>,
    /// Control plane address (HOST:PORT), or its replicas' (A,B,C), tried in turn.
    #[arg(long = "control", env = "WEFT_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: String,
    /// Mesh root (PEM) the control plane's TLS certificate is verified with (default: the one
    /// a control plane on this machine recorded in the credentials file).
    #[arg(long = "ca-file", env = "WEFT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

pub fn duration(s: &str) -> Result<Duration, String> {
    weft_api::duration::parse(s)
}

fn upstream(s: &str) -> Result<(String, SocketAddr), String> {
    let (svc, target) = s.split_once('=').ok_or("expected SERVICE=PORT or SERVICE=HOST:PORT")?;
    let addr = match target.parse::<u16>() {
        Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        Err(_) => target.parse().map_err(|_| format!("{target:?} is neither a port nor HOST:PORT"))?,
    };
    Ok((svc.to_owned(), addr))
}

fn dns_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is neither an IP address nor IP:PORT"))
}

fn label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `weft-proxy`'s command line, when it is read from a list of flags.
#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    proxy: ProxyArgs,
}

impl ProxyArgs {
    /// The arguments these flags give (the others at their defaults, or from the environment).
    pub fn from_flags(flags: &[String]) -> Result<ProxyArgs, clap::Error> {
        use clap::Parser;
        Flags::try_parse_from(std::iter::once("weft-proxy").chain(flags.iter().map(String::as_str))).map(|f| f.proxy)
    }

    pub fn options(&self) -> anyhow::Result<ProxyOptions> {
        let app = self.app_port.map(|p| SocketAddr::new(self.app_host, p));
        if let Some(addr) = self.mesh_gateway
            && addr.ip().is_unspecified()
        {
            anyhow::bail!(
                "--mesh-gateway {addr}: give the address peer datacenters reach this gateway at, not an unspecified one"
            );
        }
        if let Some(addr) = self.mesh_gateway_local {
            if addr.ip().is_unspecified() {
                anyhow::bail!(
                    "--mesh-gateway-local {addr}: give the address this datacenter's sidecars reach this gateway at, not an unspecified one"
                );
            }
            if Some(addr) == self.mesh_gateway {
                anyhow::bail!(
                    "--mesh-gateway-local {addr}: the same address as --mesh-gateway; the gateway tells its own sidecars' connections from peers' by the address they arrive at, so give it another"
                );
            }
        }
        if app.is_some() && self.service.is_none() {
            anyhow::bail!("--service is required when the proxy fronts an app (--app-port)");
        }
        if self.service.is_some() && app.is_none() {
            anyhow::bail!("--app-port is required with --service: the proxy needs the app it fronts");
        }
        // The default id carries random bits, so nobody can name a live instance in advance.
        let id = self.id.clone().unwrap_or_else(|| {
            let service = self.service.as_deref().unwrap_or("proxy");
            format!("{service}-{}-{}", std::process::id(), crate::crypto::random_hex(4))
        });
        let health = app.map(|addr| match &self.health_path {
            Some(path) => HealthCheck::Http { addr, path: path.clone() },
            None => HealthCheck::Tcp { addr },
        });
        let labels: BTreeMap<String, String> = self.labels.iter().cloned().collect();
        Ok(ProxyOptions {
            control: self.control.clone(),
            ca_file: self.ca_file.clone(),
            token: self.token.clone(),
            xds: self.xds.clone(),
            id,
            service: match self.mesh_gateway {
                Some(_) => Some(weft_api::peering::MESH_GATEWAY.to_owned()),
                None => self.service.clone(),
            },
            inbound: self.mesh_gateway.or(app.map(|_| self.inbound)),
            mesh_gateway_local: self.mesh_gateway_local,
            app,
            upstreams: self.upstreams.clone(),
            capture: self.capture,
            dns: self.dns,
            ipv6: self.ipv6,
            dns_upstreams: self.dns_upstreams.clone(),
            labels,
            admin: self.admin,
            health,
            health_interval: self.health_interval,
            limits: Limits {
                detect_timeout: self.detect_timeout,
                max_header_bytes: self.max_header_bytes,
                header_read_timeout: self.header_read_timeout,
                max_connections: self.max_connections,
                upstream_idle_timeout: self.upstream_idle_timeout,
            },
            drain_timeout: self.drain_timeout,
        })
    }

    /// The command line that gives `weft-proxy` these arguments, except the join token: a
    /// command line is readable by every user of the machine (`ps`), so the token goes in the
    /// sidecar's environment (`WEFT_TOKEN`) instead.
    pub fn to_args(&self) -> Vec<String> {
        // Destructured whole, so a flag added to ProxyArgs and not handed on does not compile.
        let ProxyArgs {
            service,
            app_port,
            app_host,
            inbound,
            mesh_gateway,
            mesh_gateway_local,
            upstreams,
            capture,
            dns,
            ipv6,
            dns_upstreams,
            labels,
            id,
            admin,
            health_path,
            health_interval,
            detect_timeout,
            max_header_bytes,
            header_read_timeout,
            max_connections,
            upstream_idle_timeout,
            drain_timeout,
            workers,
            token: _,
            xds,
            control,
            ca_file,
        } = self;
        let ms = |d: &Duration| format!("{}ms", d.as_millis());
        let mut out = Vec::new();
        let mut flag = |name: &str, value: String| out.extend([format!("--{name}"), value]);
        service.iter().for_each(|v| flag("service", v.clone()));
        app_port.iter().for_each(|v| flag("app-port", v.to_string()));
        flag("app-host", app_host.to_string());
        flag("inbound", inbound.to_string());
        mesh_gateway.iter().for_each(|a| flag("mesh-gateway", a.to_string()));
        mesh_gateway_local.iter().for_each(|a| flag("mesh-gateway-local", a.to_string()));
        upstreams.iter().for_each(|(s, a)| flag("upstream", format!("{s}={a}")));
        capture.iter().for_each(|a| flag("capture", a.to_string()));
        dns.iter().for_each(|a| flag("dns", a.to_string()));
        dns_upstreams.iter().for_each(|a| flag("dns-upstream", a.to_string()));
        labels.iter().for_each(|(k, v)| flag("label", format!("{k}={v}")));
        id.iter().for_each(|v| flag("id", v.clone()));
        flag("admin", admin.to_string());
        health_path.iter().for_each(|v| flag("health-path", v.clone()));
        flag("health-interval", ms(health_interval));
        flag("detect-timeout", ms(detect_timeout));
        flag("max-header-bytes", max_header_bytes.to_string());
        flag("header-read-timeout", ms(header_read_timeout));
        flag("max-connections", max_connections.to_string());
        flag("upstream-idle-timeout", ms(upstream_idle_timeout));
        flag("drain-timeout", ms(drain_timeout));
        workers.iter().for_each(|v| flag("workers", v.to_string()));
        xds.iter().for_each(|v| flag("xds", v.clone()));
        flag("control", control.clone());
        ca_file.iter().for_each(|v| flag("ca-file", v.display().to_string()));
        if *ipv6 {
            out.push("--ipv6".to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[String]) -> ProxyArgs {
        ProxyArgs::from_flags(args).unwrap()
    }

    #[test]
    fn the_arguments_handed_on_are_the_arguments_given() {
        let given: Vec<String> = [
            "--service=web",
            "--app-port=8080",
            "--app-host=127.0.0.2",
            "--inbound=127.0.0.1:7000",
            "--upstream=api=7001",
            "--upstream=db=127.0.0.3:5432",
            "--capture=127.0.0.1:15001",
            "--dns=127.0.0.1:15053",
            "--ipv6",
            "--dns-upstream=10.255.255.53",
            "--dns-upstream=10.0.0.2:5353",
            "--label=version=v2",
            "--label=zone=a",
            "--id=web-1",
            "--admin=127.0.0.1:9000",
            "--health-path=/healthz",
            "--health-interval=2s",
            "--detect-timeout=250ms",
            "--max-header-bytes=1000",
            "--header-read-timeout=3s",
            "--max-connections=7",
            "--upstream-idle-timeout=1m",
            "--drain-timeout=9s",
            "--workers=2",
            "--xds=127.0.0.1:15011",
            "--control=127.0.0.1:15099",
            "--ca-file=/etc/weft/root.pem",
        ]
        .map(str::to_owned)
        .to_vec();
        let args = parse(&given);
        assert_eq!(parse(&args.to_args()), args);
        let gateway = parse(&["--mesh-gateway=127.0.0.1:15443".to_owned(), "--id=gw".to_owned()]);
        assert_eq!(parse(&gateway.to_args()), gateway);
        // The defaults as shipped survive the trip too.
        let defaults = parse(&[]);
        assert_eq!(parse(&defaults.to_args()), defaults);
    }

    #[test]
    fn the_join_token_is_never_on_the_command_line() {
        let args = parse(&["--token=secret-token".to_owned()]);
        assert_eq!(args.token.as_deref(), Some("secret-token"));
        assert!(!args.to_args().iter().any(|a| a.contains("secret-token")), "{:?}", args.to_args());
    }
}
