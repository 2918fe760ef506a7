//! Command-line interface: every subcommand and flag, and where each goes.
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use weft_api::names::DEFAULT_CONTROL;
use weft_proxy::args::{ProxyArgs, duration};

/// The address `weft dashboard` and `weft up` serve the dashboard on unless told otherwise.
pub const DASHBOARD_LISTEN: &str = "127.0.0.1:15080";

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "weft: a service mesh (control plane, CLI, demo; the sidecar is weft-proxy)",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane: registry, config store, xDS server and admin API.
    Control(weft_control::args::ControlArgs),
    /// Run a sidecar proxy for one service instance (runs the `weft-proxy` binary with these
    /// flags in place of this process).
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
        /// services | endpoints | proxies | replicas | peers | certs | tokens | service | httproutes | grpcroutes | authorizationpolicies | requestauthentications | trafficpolicies | telemetries | exportedservices
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
    /// Peerings with other datacenters (each keeps its own CA and trust domain; what one
    /// offers the other is an ExportedServices resource).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
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
    /// Backups of the mesh's state, and their restore (e.g. into etcd).
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Pre-flight and health checks, one line each with the fix; exits 1 if any fails.
    Check {
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Serve the dashboard (embedded in this binary) on a loopback address; it reads the control
    /// plane with this CLI's credentials.
    Dashboard {
        #[arg(long, default_value = DASHBOARD_LISTEN)]
        listen: SocketAddr,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Success rate, requests per second and latency percentiles, from what the proxies report
    /// to the control plane.
    Stat {
        /// services | routes | instances | edges
        #[arg(default_value = "services", value_parser = ["services", "routes", "instances", "edges"])]
        kind: String,
        /// Only the rows about this service (or route, or instance).
        name: Option<String>,
        /// Over the last WINDOW (10s to 15m).
        #[arg(long, default_value = "1m", value_parser = duration)]
        window: Duration,
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// A live stream of the requests to and from a service, as its proxies see them (Ctrl-C
    /// stops it).
    Tap {
        service: String,
        #[command(flatten)]
        filter: TapFilter,
        /// Show the request headers too (credentials redacted); bodies are never shown.
        #[arg(long)]
        headers: bool,
        /// Stop after this many requests.
        #[arg(short = 'n', long)]
        count: Option<usize>,
        /// Output format: one line, or one JSON object, per request.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// A live table of a service's busiest paths, from a tap (Ctrl-C stops it).
    Top {
        service: String,
        #[command(flatten)]
        filter: TapFilter,
        /// How often the table is redrawn.
        #[arg(long, default_value = "1s", value_parser = duration)]
        interval: Duration,
        /// Output format: the table, or one JSON array per interval.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Delete a resource.
    Delete {
        /// service | httproute | grpcroute | authorizationpolicy | requestauthentication | trafficpolicy | telemetry | exportedservices
        kind: String,
        name: String,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// The bundled demo app: HTTP/1.1, HTTP/2, gRPC and WebSocket on one port.
    DemoApp(DemoAppArgs),
    /// Remove what `weft run --transparent` made and a killed one left behind: instances'
    /// network namespaces, their veth pairs and resolver files, and the bridge once unused.
    Cleanup,
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
pub enum PeerAction {
    /// Make a peering token for another datacenter, which it accepts with `weft peer accept`;
    /// prints the token (shown once, usable once).
    Create {
        /// This datacenter's name for the peer.
        name: String,
        /// How long the token may be accepted.
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
    },
    /// Establish the peering a token from another datacenter's `weft peer create` offers.
    Accept {
        /// This datacenter's name for the peer.
        #[arg(long)]
        name: String,
        /// The token (or `-` to read it from standard input).
        token: String,
    },
    /// End a peering: nothing of the peer stays in any proxy, and the peer is told.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum CaAction {
    /// Show the trust domain and the signing root.
    Show {
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Introduce a new root: trusted everywhere first, then signing; the old root stays trusted
    /// for the overlap period.
    Rotate {
        #[arg(long, default_value = "1h", value_parser = duration)]
        overlap: Duration,
    },
}

#[derive(Subcommand)]
pub enum StoreAction {
    /// Write the mesh's resources, join tokens, virtual IPs and secrets (the CA, the
    /// credentials) to a file, owner-only: from the running control plane (--control), or
    /// from the embedded store of a stopped one (--data-dir).
    Backup {
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// The data directory of a stopped control plane, read directly.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        control: ControlAddr,
    },
    /// Restore a backup into an empty store: the embedded one in --data-dir, or etcd
    /// (--store etcd://… with its options, as `weft control` takes them). Start control planes
    /// on it afterwards.
    Restore {
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
        /// With the embedded store: the (empty) data directory to restore into.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        store: Box<weft_control::args::StoreArgs>,
    },
}

/// Which requests a tap shows.
#[derive(Args, Clone)]
pub struct TapFilter {
    /// Only paths starting with this prefix.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only requests from the service to this one.
    #[arg(long)]
    pub to: Option<String>,
    /// At most this many requests per second from each proxy (1 to 1000); more are counted,
    /// not shown, so tapping a busy service cannot hurt it.
    #[arg(long, default_value_t = 100)]
    pub max_rps: u32,
}

#[derive(Args, Clone)]
pub struct ControlAddr {
    /// Control plane address (HOST:PORT), or its replicas' (A,B,C), tried in turn.
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
pub struct RunArgs {
    /// Port the app listens on (also passed to it as $PORT).
    #[arg(long)]
    pub port: u16,
    /// Run the app and its sidecar in a network namespace of their own, with an address on
    /// this host's bridge (weft0), the app's TCP captured by the sidecar both ways and its DNS
    /// answered by it: the app calls services by name (`http://backend/`), unchanged. Needs
    /// root (or CAP_NET_ADMIN and CAP_SYS_ADMIN).
    #[arg(long)]
    pub transparent: bool,
    /// --transparent: the addresses instances' namespaces get (the first is the bridge's).
    #[arg(long, default_value = crate::netns::DEFAULT_RANGE)]
    pub netns_range: crate::netns::Range,
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
    /// Simulate N hosts on this machine (network namespaces on a switch; needs root) and run
    /// every instance transparent on one of them, in turn; the control plane, gateway and
    /// dashboard stay here.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=crate::netns::MAX_HOSTS as i64))]
    pub hosts: Option<u8>,
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
    /// Upstream to call from `/` and Hello, HOST:PORT: the local sidecar listener, or a
    /// service's name in a transparent instance (`backend:80`).
    #[arg(long, env = "WEFT_UPSTREAM")]
    pub upstream: Option<String>,
    /// Answer this share of `/` and `/info` requests with 500, exactly and evenly (0-100).
    #[arg(long, env = "WEFT_DEMO_FAIL_PERCENT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub fail_percent: u8,
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

impl Cli {
    pub fn workers(&self) -> Option<usize> {
        match &self.command {
            // `weft proxy` and `weft run` become the sidecar, which has its own runtime.
            Command::Proxy(_) | Command::Run(_) => Some(1),
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
            | Command::Store { .. }
            | Command::DemoClient(_) => "warn",
            _ => "info",
        }
    }
}
