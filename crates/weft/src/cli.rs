//! Command-line interface: every subcommand and flag, and where each goes.
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use weft_api::resource::MtlsMode;
use weft_proxy::{HealthCheck, Limits, ProxyOptions};

pub const DEFAULT_CONTROL: &str = "127.0.0.1:15010";

#[derive(Parser)]
#[command(name = "weft", version, about = "weft: a service mesh in one binary", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane: registry, config store, xDS server and admin API.
    Control(ControlArgs),
    /// Run a sidecar proxy for one service instance.
    Proxy(ProxyArgs),
    /// Start an app with its sidecar; both stop together.
    Run(RunArgs),
    /// Run a whole mesh on this machine: the bundled demo, or the one in -f FILE.
    Up(UpArgs),
    /// Validate and store configuration resources from a YAML file.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Show services, endpoints, proxies, certificates, join tokens or resources.
    Get {
        /// services | endpoints | proxies | certs | tokens | service | httproutes | authorizationpolicies | requestauthentications | trafficpolicies
        kind: String,
        /// A name (for endpoints: the service).
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
        output: String,
        /// `get certs`: flag certificates expiring within this window.
        #[arg(long, default_value = "1h", value_parser = duration)]
        expiring_within: Duration,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Join tokens: how a proxy proves which service it belongs to.
    Token {
        #[command(subcommand)]
        action: TokenAction,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        action: CaAction,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Delete a resource.
    Delete {
        /// service | httproute | authorizationpolicy | requestauthentication | trafficpolicy
        kind: String,
        name: String,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// The bundled demo app: HTTP/1.1, HTTP/2, gRPC and WebSocket on one port.
    DemoApp(DemoAppArgs),
    /// Call the demo app's gRPC service (a gRPC client for trying the mesh).
    DemoClient(DemoClientArgs),
}

#[derive(Subcommand)]
pub enum TokenAction {
    /// Issue a join token for one service; prints the token.
    Create {
        #[arg(long)]
        service: String,
        /// How long the token may be used to join (certificates it obtains renew on their own).
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
    },
    /// Revoke a join token (its id, or the token itself): proxies can no longer use it.
    Revoke { token: String },
}

#[derive(Subcommand)]
pub enum CaAction {
    /// Show the trust domain and the signing root.
    Show,
    /// Introduce a new root: trusted everywhere first, then signing; the old root stays trusted
    /// for the overlap period.
    Rotate {
        #[arg(long, default_value = "1h", value_parser = duration)]
        overlap: Duration,
    },
}

#[derive(Args, Clone)]
pub struct ControlAddr {
    /// Control plane address.
    #[arg(long = "control", env = "WEFT_CONTROL", default_value = DEFAULT_CONTROL, global = true)]
    pub control: String,
    /// Mesh root (PEM) the control plane's TLS certificate is verified with (default: the one
    /// a control plane on this machine recorded in the credentials file).
    #[arg(long = "ca-file", env = "WEFT_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Admin credential for the API (default: from the credentials file).
    #[arg(long = "admin-token", env = "WEFT_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
}

#[derive(Args)]
pub struct ControlArgs {
    /// Address for xDS (gRPC) and the admin API (HTTP/JSON).
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub listen: SocketAddr,
    /// Where the embedded store keeps its file.
    #[arg(long, default_value = ".weft/control")]
    pub data_dir: PathBuf,
    /// After a restart, how long restored instances keep their endpoints while proxies reconnect.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub reconnect_grace: Duration,
    /// Trust domain of every SPIFFE ID (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE).
    #[arg(long, default_value = weft_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Namespace in every SPIFFE ID.
    #[arg(long, default_value = weft_api::identity::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Lifetime of proxy certificates (at least 1m); proxies renew at half of it.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_ttl: Duration,
    /// Sign with this intermediate CA (PEM: the CA first, then its chain up to the root)
    /// instead of a root of the control plane's own. Needs --ca-key.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Mutual TLS mode of services whose Service resource sets none: strict or permissive.
    #[arg(long, default_value = "strict", value_parser = ["strict", "permissive"])]
    pub mtls: String,
    /// Another name (DNS or IP) clients use for the control plane; repeatable.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// Also serve xDS without TLS on this loopback address, for proxyless gRPC clients.
    #[arg(long)]
    pub plaintext_xds: Option<SocketAddr>,
}

impl ControlArgs {
    pub fn config(self) -> anyhow::Result<weft_control::ControlConfig> {
        if self.cert_ttl < weft_control::ca::MIN_CERT_TTL {
            anyhow::bail!("--cert-ttl {:?} is too short: certificates live at least 1m", self.cert_ttl);
        }
        for (what, v) in [("--trust-domain", &self.trust_domain), ("--namespace", &self.namespace)] {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
                anyhow::bail!("{what} {v:?}: use lowercase letters, digits, '-', '.' and '_'");
            }
        }
        Ok(weft_control::ControlConfig {
            listen: self.listen,
            data_dir: self.data_dir,
            reconnect_grace: self.reconnect_grace,
            ca: weft_control::CaConfig {
                trust_domain: self.trust_domain,
                namespace: self.namespace,
                cert_ttl: self.cert_ttl,
                provided: self.ca_cert.zip(self.ca_key),
            },
            default_mtls: if self.mtls == "permissive" { MtlsMode::Permissive } else { MtlsMode::Strict },
            server_names: self.server_names,
            plaintext_xds: self.plaintext_xds,
        })
    }
}

#[derive(Args, Clone)]
pub struct ProxyArgs {
    /// Service this instance belongs to. Without it the proxy only serves --upstream listeners.
    #[arg(long)]
    pub service: Option<String>,
    /// Port of the local application.
    #[arg(long = "app-port")]
    pub app_port: Option<u16>,
    /// Host of the local application.
    #[arg(long, default_value = "127.0.0.1")]
    pub app_host: std::net::IpAddr,
    /// Address of the inbound listener other proxies reach this instance on (port 0: pick one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub inbound: SocketAddr,
    /// Upstream service reachable on a local port: SERVICE=PORT or SERVICE=HOST:PORT. Repeatable.
    #[arg(long = "upstream", value_parser = upstream)]
    pub upstreams: Vec<(String, SocketAddr)>,
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
    #[command(flatten)]
    pub control: ControlAddr,
}

#[derive(Args)]
pub struct RunArgs {
    /// Port the app listens on (also passed to it as $PORT).
    #[arg(long)]
    pub port: u16,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// The app's command line.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct UpArgs {
    /// Mesh file; without it, the bundled demo mesh runs.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
}

#[derive(Args)]
pub struct DemoAppArgs {
    /// Address to serve on (default 127.0.0.1:$PORT, else 127.0.0.1:8080).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "WEFT_SERVICE", default_value = "demo")]
    pub service: String,
    #[arg(long = "app-version", env = "WEFT_VERSION", default_value = "v1")]
    pub app_version: String,
    #[arg(long, env = "WEFT_INSTANCE")]
    pub instance: Option<String>,
    /// Upstream to call from `/` and Hello (the local sidecar listener), HOST:PORT.
    #[arg(long, env = "WEFT_UPSTREAM")]
    pub upstream: Option<SocketAddr>,
}

#[derive(Args)]
pub struct DemoClientArgs {
    /// Address to call (e.g. a sidecar's upstream listener).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,
    #[arg(long, default_value = "weft")]
    pub name: String,
    /// Call HelloStream and print this many replies instead of one Hello.
    #[arg(long)]
    pub stream: Option<u32>,
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

fn label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

impl Cli {
    pub fn workers(&self) -> Option<usize> {
        match &self.command {
            Command::Proxy(p) => p.workers,
            Command::Run(r) => r.proxy.workers,
            _ => None,
        }
    }

    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Apply { .. }
            | Command::Get { .. }
            | Command::Delete { .. }
            | Command::Token { .. }
            | Command::Ca { .. }
            | Command::DemoClient(_) => "warn",
            _ => "info",
        }
    }
}

impl ProxyArgs {
    pub fn options(&self, app_port: Option<u16>) -> anyhow::Result<ProxyOptions> {
        let app_port = app_port.or(self.app_port);
        let app = app_port.map(|p| SocketAddr::new(self.app_host, p));
        if app.is_some() && self.service.is_none() {
            anyhow::bail!("--service is required when the proxy fronts an app (--app-port)");
        }
        if self.service.is_some() && app.is_none() {
            anyhow::bail!("--app-port is required with --service: the proxy needs the app it fronts");
        }
        // The default id carries random bits, so nobody can name a live instance in advance.
        let id = self.id.clone().unwrap_or_else(|| {
            let service = self.service.as_deref().unwrap_or("proxy");
            format!("{service}-{}-{}", std::process::id(), weft_proxy::crypto::random_hex(4))
        });
        let health = app.map(|addr| match &self.health_path {
            Some(path) => HealthCheck::Http { addr, path: path.clone() },
            None => HealthCheck::Tcp { addr },
        });
        let labels: BTreeMap<String, String> = self.labels.iter().cloned().collect();
        Ok(ProxyOptions {
            control: self.control.control.clone(),
            ca_file: self.control.ca_file.clone(),
            token: self.token.clone(),
            xds: self.xds.clone(),
            id,
            service: self.service.clone(),
            inbound: app.map(|_| self.inbound),
            app,
            upstreams: self.upstreams.clone(),
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
}
