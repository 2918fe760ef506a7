//! Control-plane scale benchmark.
//!
//! Starts one `weft control` (TLS, join tokens, as shipped), or `--replicas R` of them sharing
//! an etcd it starts (Debian's `etcd-server`), and connects N simulated weft proxies, spread
//! over the replicas in turn. Each is what a sidecar is to the control plane: an xDS node carrying a
//! registration (an instance of one of `--services` client services, with an inbound listener,
//! an app and two upstreams: `bench` and the next client service), authenticated with its service's join token, on a TLS
//! connection of its own (`--streams-per-connection` > 1 multiplexes streams instead), and it
//! subscribes as the sidecar does: all clusters, all listeners and the trust bundle, then the
//! endpoints of every cluster it gets and the routes of its upstreams. It ACKs every response.
//!
//! Then, `--changes` times, a new instance of `bench` registers, and the benchmark measures per
//! client the time from that change until the client holds the new endpoint set and has ACKed
//! it, and the control plane's CPU time for the whole change. Reports p50 / p99 / max, CPU per
//! change, connect time and the control plane's RSS per connected client (with replicas: each
//! replica's RSS growth over the clients connected to it, the worst replica's).
#![forbid(unsafe_code)]

use clap::Parser;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use prost::{Message, Name};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Barrier, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use weft_api::identity::ROOT_SECRET;
use weft_api::names;

#[derive(Parser)]
struct Args {
    /// Simulated proxies.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// ADS streams per TLS connection: 1 (the default) is one connection per proxy, as real
    /// proxies have; more multiplexes streams over fewer connections.
    #[arg(long, default_value_t = 1)]
    streams_per_connection: usize,
    /// Client services the simulated proxies are instances of.
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Use delta xDS instead of state of the world.
    #[arg(long)]
    delta: bool,
    /// The weft binary that runs the control plane.
    #[arg(long, default_value = "target/release/weft")]
    weft: PathBuf,
    /// Endpoint changes to measure.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Seconds all clients may take to connect and get their first config.
    #[arg(long, default_value_t = 300)]
    connect_timeout: u64,
    /// Replicas of the control plane, on an etcd this benchmark starts (1: the embedded
    /// store, as `weft control` runs by default).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The etcd binary (with `--replicas` > 1).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
}

/// How to reach the control plane: its replicas' addresses, TLS and one join token per service.
struct Control {
    addrs: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
    tokens: HashMap<String, String>,
}

impl Control {
    /// A new HTTP/2 connection over TLS to replica `n` (modulo their number), verified against
    /// the mesh's trust bundle.
    async fn connect(&self, n: usize) -> anyhow::Result<Channel> {
        let addr = self.addrs[n % self.addrs.len()].clone();
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let to = addr.clone();
        let connect = tower::service_fn(move |_: http::Uri| {
            let (addr, connector) = (to.clone(), connector.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("an IP address");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .origin(format!("https://{addr}").parse()?)
            .connect_timeout(Duration::from_secs(10))
            // Small receive windows: thousands of simulated proxies share this process, and
            // the control plane may send each as much as its windows allow before it reads.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(256 * 1024);
        for attempt in 0.. {
            match endpoint.connect_with_connector(connect.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if attempt >= 50 => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        unreachable!()
    }

    fn ads(
        &self,
        channel: Channel,
        service: &str,
    ) -> AggregatedDiscoveryServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor + use<>>,
    > {
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", self.tokens[service]).parse().expect("a token is ASCII");
        AggregatedDiscoveryServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        })
        .max_decoding_message_size(256 * 1024 * 1024)
    }
}

/// A simulated proxy's node: an instance of `service` with an inbound listener, calling
/// `upstreams`.
fn node(id: &str, service: &str, upstreams: &[&str], n: usize) -> Node {
    let reg = serde_json::json!({
        "service": service,
        "inbound": format!("127.1.{}.{}:{}", n / 250 % 250, 1 + n % 250, 20000 + n / 62500),
        "app": "127.0.0.1:1",
        "labels": {},
        "upstreams": upstreams.iter().enumerate().map(|(k, u)| serde_json::json!({
            "service": u, "listen": format!("127.0.0.{}:{}", 1 + k, 30000 + n % 20000),
        })).collect::<Vec<_>>(),
        "healthy": true,
    });
    let string = |s: String| Value { kind: Some(value::Kind::StringValue(s)) };
    Node {
        id: id.to_owned(),
        cluster: service.to_owned(),
        user_agent_name: "weft-xds-scale".to_owned(),
        metadata: Some(Struct {
            fields: [
                (names::NODE_METADATA_KEY.to_owned(), string(reg.to_string())),
                (names::NODE_INSTANCE_KEY.to_owned(), string(format!("key-{id}"))),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// The services a node's registration calls: the routes its outbound listeners name.
fn upstream_services(node: &Node) -> Vec<String> {
    let reg = node.metadata.as_ref().and_then(|m| m.fields.get(names::NODE_METADATA_KEY)).and_then(|v| match &v.kind {
        Some(value::Kind::StringValue(s)) => serde_json::from_str::<serde_json::Value>(s).ok(),
        _ => None,
    });
    let upstreams = reg.as_ref().and_then(|r| r["upstreams"].as_array().cloned()).unwrap_or_default();
    upstreams.iter().filter_map(|u| u["service"].as_str().map(str::to_owned)).collect()
}

fn healthy_endpoints(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).filter(|e| e.health_status == 1).count()
}

/// The clusters a sidecar asks endpoints for: all but those whose endpoints are inline.
fn eds_names<'a>(clusters: impl Iterator<Item = &'a Any>) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for any in clusters {
        let c = Cluster::decode(any.value.as_slice())?;
        if c.load_assignment.is_none() {
            out.insert(c.name);
        }
    }
    Ok(out)
}

/// What one simulated proxy reports: `bench`'s healthy endpoints when they change.
struct Reporter {
    last: usize,
    seen: Option<mpsc::UnboundedSender<(usize, Instant)>>,
}

impl Reporter {
    fn endpoints(&mut self, any: &Any, at: Instant) -> anyhow::Result<bool> {
        let cla = ClusterLoadAssignment::decode(any.value.as_slice())?;
        if cla.cluster_name != "bench" {
            return Ok(false);
        }
        let healthy = healthy_endpoints(&cla);
        if let Some(seen) = &self.seen
            && healthy > self.last
            && self.last > 0
        {
            let _ = seen.send((healthy - 1, at));
        }
        self.last = self.last.max(healthy);
        Ok(true)
    }
}

/// The first error of a simulated proxy's stream (before the end).
static FAILED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Responses received by all simulated proxies.
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// A proxy has its first config with 6 things: responses of the 5 types, `bench`'s endpoints.
const READY: usize = 6;

/// One simulated proxy over state-of-the-world ADS. `ready` is waited on once it holds
/// clusters, listeners, the trust bundle and `bench`'s endpoints.
async fn sotw(
    control: Arc<Control>,
    channel: Channel,
    node: Node,
    mut report: Reporter,
    ready: Option<Arc<Barrier>>,
) -> anyhow::Result<()> {
    let service = node.cluster.clone();
    let routes = upstream_services(&node);
    let mut ads = control.ads(channel, &service);
    let (tx, rx) = mpsc::channel(16);
    let req = |t: String, names: &BTreeSet<String>| DiscoveryRequest {
        type_url: t,
        resource_names: names.iter().cloned().collect(),
        ..Default::default()
    };
    let none = BTreeSet::new();
    tx.send(DiscoveryRequest { node: Some(node), ..req(Cluster::type_url(), &none) }).await?;
    tx.send(req(Listener::type_url(), &none)).await?;
    tx.send(req(Secret::type_url(), &BTreeSet::from([ROOT_SECRET.to_owned()]))).await?;
    let mut s = ads.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut subscribed: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut have = BTreeSet::new();
    let mut ready = ready;
    while let Some(r) = s.message().await? {
        let at = Instant::now();
        RECEIVED.fetch_add(1, Ordering::Relaxed);
        let t = r.type_url.clone();
        let mut subscribe = None;
        if t == Cluster::type_url() {
            subscribe = Some((ClusterLoadAssignment::type_url(), eds_names(r.resources.iter())?));
        } else if t == Listener::type_url() {
            subscribe = Some((RouteConfiguration::type_url(), routes.iter().cloned().collect()));
        } else if t == ClusterLoadAssignment::type_url() {
            for a in &r.resources {
                if report.endpoints(a, at)? {
                    have.insert("bench".to_owned());
                }
            }
        }
        have.insert(t.clone());
        let names = subscribed.get(&t).cloned().unwrap_or_default();
        tx.send(DiscoveryRequest { version_info: r.version_info, response_nonce: r.nonce, ..req(t, &names) }).await?;
        if let Some((t, names)) = subscribe
            && subscribed.get(&t) != Some(&names)
        {
            tx.send(req(t.clone(), &names)).await?;
            subscribed.insert(t, names);
        }
        if have.len() >= READY
            && let Some(b) = ready.take()
        {
            b.wait().await;
        }
    }
    Ok(())
}

/// One simulated proxy over delta ADS, subscribing as [`sotw`] does.
async fn delta(
    control: Arc<Control>,
    channel: Channel,
    node: Node,
    mut report: Reporter,
    ready: Option<Arc<Barrier>>,
) -> anyhow::Result<()> {
    let service = node.cluster.clone();
    let routes = upstream_services(&node);
    let mut ads = control.ads(channel, &service);
    let (tx, rx) = mpsc::channel(16);
    let sub = |t: String, names: Vec<String>| DeltaDiscoveryRequest {
        type_url: t,
        resource_names_subscribe: names,
        ..Default::default()
    };
    tx.send(DeltaDiscoveryRequest { node: Some(node), ..sub(Cluster::type_url(), vec![]) }).await?;
    tx.send(sub(Listener::type_url(), vec![])).await?;
    tx.send(sub(Secret::type_url(), vec![ROOT_SECRET.to_owned()])).await?;
    let mut s = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut eds_subscribed = BTreeSet::new();
    let mut have = BTreeSet::new();
    let mut ready = ready;
    while let Some(r) = s.message().await? {
        let at = Instant::now();
        RECEIVED.fetch_add(1, Ordering::Relaxed);
        let t = r.type_url.clone();
        tx.send(DeltaDiscoveryRequest { type_url: t.clone(), response_nonce: r.nonce.clone(), ..Default::default() })
            .await?;
        let resources = r.resources.iter().filter_map(|res| res.resource.as_ref());
        if t == Cluster::type_url() {
            let names = eds_names(resources)?;
            let new: Vec<String> = names.difference(&eds_subscribed).cloned().collect();
            if !new.is_empty() {
                tx.send(sub(ClusterLoadAssignment::type_url(), new)).await?;
                eds_subscribed.extend(names);
            }
        } else if t == Listener::type_url() && !have.contains(&t) {
            tx.send(sub(RouteConfiguration::type_url(), routes.clone())).await?;
        } else if t == ClusterLoadAssignment::type_url() {
            for a in resources {
                if report.endpoints(a, at)? {
                    have.insert("bench".to_owned());
                }
            }
        }
        have.insert(t);
        if have.len() >= READY
            && let Some(b) = ready.take()
        {
            b.wait().await;
        }
    }
    Ok(())
}

/// Runs one simulated proxy until the stream ends or `stop` is set; the first error before
/// then is kept in [`FAILED`], which ends the benchmark.
fn spawn_proxy(
    control: &Arc<Control>,
    channel: Channel,
    node: Node,
    delta_xds: bool,
    report: Reporter,
    ready: Option<Arc<Barrier>>,
    stop: watch::Receiver<bool>,
) {
    let control = control.clone();
    tokio::spawn(async move {
        let id = node.id.clone();
        let mut done = stop.clone();
        let run = async {
            if delta_xds {
                delta(control, channel, node, report, ready).await
            } else {
                sotw(control, channel, node, report, ready).await
            }
        };
        tokio::select! {
            r = run => if let Err(e) = r && !*stop.borrow() {
                let _ = FAILED.set(format!("{id}: {e:#}"));
            },
            _ = done.wait_for(|s| *s) => {}
        }
    });
}

fn proc_field(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status")
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The process's CPU time (user + system) so far.
fn cpu(pid: u32) -> Duration {
    let stat = proc_field(pid, "stat");
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Waits for a file the control plane writes at start.
async fn wait_for(path: &Path) -> anyhow::Result<String> {
    for _ in 0..300 {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the control plane did not write {} within 30 s", path.display())
}

/// A join token for `service`, made by the CLI as an operator would.
fn join_token(args: &Args, addr: &str, data: &Path, admin: &str, service: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(&args.weft)
        .args(["token", "create", "--service", service, "--control", addr, "--ca-file"])
        .arg(data.join("ca/trust-bundle.pem"))
        .args(["--admin-token", admin])
        .env("WEFT_CONFIG", data.join("cli-credentials.json"))
        .output()?;
    anyhow::ensure!(out.status.success(), "weft token create: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.clients > 0 && args.services > 0 && args.streams_per_connection > 0 && args.replicas > 0,
        "counts must be > 0"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let data = std::env::temp_dir().join(format!("weft-xds-scale-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let free_port = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    // With replicas: one etcd member on loopback, and the store key every replica is given.
    let mut etcd = None;
    let mut store: Vec<String> = Vec::new();
    if args.replicas > 1 {
        let (client, peer) = (free_port()?, free_port()?);
        let (client, peer) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
        etcd = Some(
            tokio::process::Command::new(&args.etcd)
                .args(["--name", "bench", "--data-dir"])
                .arg(data.join("etcd"))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("bench={peer}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!("cannot start {}: {e} (apt-get install etcd-server)", args.etcd.display())
                })?,
        );
        let at = client.trim_start_matches("http://").to_owned();
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(&at).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let key = data.join("store.key");
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        std::fs::write(&key, bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
        store = vec!["--store".into(), client.replace("http://", "etcd://"), "--store-key-file".into()];
        store.push(key.display().to_string());
    }
    eprintln!("control plane logs: {}/control-N.log (kept if the run fails)", data.display());
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for r in 0..args.replicas {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let dir = data.join(format!("control-{r}"));
        let mut cmd = tokio::process::Command::new(&args.weft);
        cmd.args(["control", "--listen", &addr, "--data-dir"]).arg(&dir).args(&store);
        // Its log in its directory (kept when a run fails), at WEFT_LOG's level (default warn).
        let log = std::fs::File::create(data.join(format!("control-{r}.log")))?;
        let level = std::env::var("WEFT_LOG").unwrap_or_else(|_| "warn".to_owned());
        let child = cmd.env("WEFT_LOG", level).stderr(log).kill_on_drop(true).spawn()?;
        // Each replica in turn: the first makes the CA, the next take it from etcd.
        wait_for(&dir.join("admin.token")).await?;
        wait_for(&dir.join("ca/trust-bundle.pem")).await?;
        replicas.push(child);
        addrs.push(addr);
    }
    let pids: Vec<u32> = replicas.iter().map(|c| c.id().unwrap_or(0)).collect();
    let first = data.join("control-0");
    let admin = wait_for(&first.join("admin.token")).await?.trim().to_owned();
    let bundle = wait_for(&first.join("ca/trust-bundle.pem")).await?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let services: Vec<String> = (0..args.services).map(|k| format!("client-{k}")).collect();
    let mut tokens = HashMap::new();
    for s in services.iter().map(String::as_str).chain(["bench"]) {
        tokens.insert(s.to_owned(), join_token(&args, &addrs[0], &first, &admin, s)?);
    }
    let control_api = Arc::new(Control { addrs, tls: Arc::new(tls), tokens });
    let cpu = || pids.iter().map(|p| cpu(*p)).sum::<Duration>();
    let rss = || pids.iter().map(|p| rss_kib(*p)).collect::<Vec<u64>>();

    let (stop_tx, stop_rx) = watch::channel(false);
    let instance = |n: usize, channel: Channel| {
        let node = node(&format!("bench-{n}"), "bench", &[], 100_000 + n);
        let report = Reporter { last: 0, seen: None };
        spawn_proxy(&control_api, channel, node, args.delta, report, None, stop_rx.clone());
    };
    // One instance of `bench` exists before the clients connect, so every client starts with 1.
    let base = control_api.connect(0).await?;
    instance(0, base.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss();

    let ready = Arc::new(Barrier::new(args.clients + 1));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (started, cpu_started) = (Instant::now(), cpu());
    let mut channels: Vec<Option<Channel>> = vec![None; args.replicas];
    for i in 0..args.clients {
        // Client i at replica i mod R; a connection carries streams of one replica's clients.
        let channel = &mut channels[i % args.replicas];
        if i / args.replicas % args.streams_per_connection == 0 {
            *channel = Some(control_api.connect(i).await?);
        }
        // Each calls `bench` and the next client service, whose instances register meanwhile.
        let next = &services[(i + 1) % services.len()];
        let node = node(&format!("sim-{i}"), &services[i % services.len()], &["bench", next], i);
        let report = Reporter { last: 0, seen: Some(seen_tx.clone()) };
        let ch = channel.clone().expect("connected above");
        spawn_proxy(&control_api, ch, node, args.delta, report, Some(ready.clone()), stop_rx.clone());
    }
    let failed = async {
        loop {
            if let Some(e) = FAILED.get() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = ready.wait() => {}
        e = failed => anyhow::bail!("a simulated proxy failed: {e}"),
        _ = tokio::time::sleep(Duration::from_secs(args.connect_timeout)) => {
            anyhow::bail!("clients did not all get their first config within {} s", args.connect_timeout)
        }
    }
    let (connected_in, connect_cpu) = (started.elapsed(), cpu() - cpu_started);
    // Until the last registrations' pushes have all arrived: no response for a second.
    let mut last = RECEIVED.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = RECEIVED.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let rss_connected = rss();

    let (mut p50, mut p99, mut max, mut cpus) = (vec![], vec![], vec![], vec![]);
    for change in 1..=args.changes {
        // The new instance registers at each replica in turn: its clients and the others'.
        let (t0, cpu0) = (Instant::now(), cpu());
        instance(change, control_api.connect(change).await?);
        let mut times = Vec::with_capacity(args.clients);
        let deadline = t0 + Duration::from_secs(120);
        while times.len() < args.clients {
            match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
                Ok(Some((n, at))) if n == change => times.push(at.duration_since(t0)),
                Ok(Some(_)) => {}
                _ if FAILED.get().is_some() => {
                    anyhow::bail!("a simulated proxy failed: {}", FAILED.get().expect("set"))
                }
                _ => anyhow::bail!(
                    "change {change}: only {} of {} clients updated within 120 s",
                    times.len(),
                    args.clients
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        cpus.push(cpu() - cpu0);
        times.sort();
        eprintln!(
            "change {change}: p50 {:?} p99 {:?} max {:?}, control plane CPU {:?}",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.last().expect("clients > 0"),
            cpus.last().expect("pushed above")
        );
        p50.push(percentile(&times, 0.5));
        p99.push(percentile(&times, 0.99));
        max.push(*times.last().expect("clients > 0"));
    }
    let _ = stop_tx.send(true);
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    // Each replica's growth over the clients it holds; the worst replica's.
    let held = |r: usize| (args.clients + args.replicas - 1 - r) / args.replicas;
    let per_client = (0..args.replicas)
        .map(|r| rss_connected[r].saturating_sub(rss_before[r]) as f64 / held(r).max(1) as f64)
        .fold(0.0, f64::max);
    let rss_max = rss_connected.iter().max().copied().unwrap_or(0);
    println!(
        "| clients | replicas | xDS | streams/conn | connect + first config | CP CPU to connect | change→ACK p50 (ms) | p99 (ms) | max (ms) | CP CPU per change (ms) | CP RSS connected (largest replica) | RSS per client per replica |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {:.2} s | {:.2} s | {} | {} | {} | {} | {:.1} MiB | {:.1} KiB |",
        args.clients,
        args.replicas,
        if args.delta { "delta" } else { "SotW" },
        args.streams_per_connection,
        connected_in.as_secs_f64(),
        connect_cpu.as_secs_f64(),
        ms(median(p50)),
        ms(median(p99)),
        ms(*max.iter().max().expect("changes > 0")),
        ms(median(cpus)),
        rss_max as f64 / 1024.0,
        per_client
    );
    eprintln!("(medians over {} changes; max is the worst single client over all changes)", args.changes);
    for mut c in replicas.into_iter().chain(etcd) {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
