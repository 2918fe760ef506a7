//! The running proxy: the configuration in force and the machinery that serves it. [`start`]
//! binds the listeners and starts the tasks (certificates, admin endpoint, xDS client, pool
//! sweeps, app health); the xDS client hands it each accepted update ([`xds::Runtime`]), the
//! admin endpoint reads it ([`admin::View`]).
use crate::access_log::{AccessLog, Outputs};
use crate::cluster::balance::ClusterManager;
use crate::config::Direction;
use crate::config::{ClusterDef, ConfigError, EndpointDef, HttpDef, InvalidResource, ListenerDef, RouteDef};
use crate::context::Limits;
use crate::context::ListenerInfo;
use crate::health::HealthCheck;
use crate::listener::{ListenerCtx, Listeners};
use crate::metrics::Metrics;
use crate::report::{Reporter, Taps};
use crate::route::RouteTable;
use crate::stack::HttpStack;
use crate::tcp::TcpTarget;
use crate::telemetry::ListenerTelemetry;
use crate::trace::{Exporters, Tracer};
use crate::{admin, crypto, drain, health, identity, inbound, transport, xds};
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use weft_api::registry::{InstanceRegistration, Upstream};

/// How long a stopping proxy serves what is in flight, at most (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `weft proxy` is told on its command line.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Control plane address (host:port), for xDS and the API.
    pub control: String,
    /// The mesh root the control plane's certificate is verified with (PEM file); `None`: the
    /// one recorded for `control` in this machine's credentials file.
    pub ca_file: Option<std::path::PathBuf>,
    /// Join token: proves which service this proxy belongs to.
    pub token: Option<String>,
    /// Where the xDS stream goes, if not to `control` (host:port; same TLS and root).
    pub xds: Option<String>,
    /// Unique id of this proxy (xDS node id, registry instance id).
    pub id: String,
    pub service: Option<String>,
    pub app: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    /// A mesh gateway's address for its own datacenter's sidecars (see
    /// [`weft_api::registry::InstanceRegistration::mesh_gateway_local`]).
    pub mesh_gateway_local: Option<SocketAddr>,
    pub upstreams: Vec<(String, SocketAddr)>,
    /// A transparent instance's capture listener (see [`crate::capture`]).
    pub capture: Option<SocketAddr>,
    /// Where mesh DNS is served (see [`crate::dns`]), and where other names are asked.
    pub dns: Option<SocketAddr>,
    /// Whether a transparent instance's namespace has IPv6 (`--ipv6`): the capture, inbound and
    /// DNS listeners listen on IPv6 too, and mesh names have IPv6 addresses.
    pub ipv6: bool,
    pub dns_upstreams: Vec<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    pub admin: SocketAddr,
    pub health: Option<HealthCheck>,
    pub health_interval: Duration,
    pub limits: Limits,
    /// On a stop, the longest the proxy keeps serving what is in flight after leaving the
    /// mesh (see [`drain`]).
    pub drain_timeout: Duration,
}

/// Configuration as last accepted from the control plane, for /config_dump.
#[derive(Debug, Default, Clone, Serialize)]
struct Dump {
    listeners: BTreeMap<String, ListenerDef>,
    routes: BTreeMap<String, RouteDef>,
    clusters: BTreeMap<String, ClusterDef>,
    endpoints: BTreeMap<String, Vec<EndpointDef>>,
    /// Type URL → version of the config in force.
    versions: BTreeMap<String, String>,
    control_plane_connected: bool,
    last_rejected: Option<String>,
}

/// The running proxy: the config in force and the machinery that serves it.
pub struct Proxy {
    opts: ProxyOptions,
    clusters: Arc<ClusterManager>,
    routes: RwLock<HashMap<String, Arc<ArcSwap<RouteTable>>>>,
    /// Each inbound listener's policy (JWT, authorization), by listener name (kept across LDS
    /// updates, so open connections follow a change).
    policies: RwLock<HashMap<String, inbound::LivePolicy>>,
    /// Each listener's access logs and tracer, by listener name (kept likewise); the logs'
    /// outputs and the tracers' collectors.
    telemetry: RwLock<HashMap<String, Arc<ListenerTelemetry>>>,
    /// What the proxy reports to the control plane: its counts, and the taps in force.
    reporter: Arc<Reporter>,
    outputs: Outputs,
    exporters: Exporters,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
    dump: Mutex<Dump>,
    /// True once the first full config is applied; listeners accept only from then on.
    ready: tokio::sync::watch::Sender<bool>,
    /// The proxy's certificate and the mesh's trust bundle.
    creds: Arc<identity::Credentials>,
    /// Mutual TLS termination, shared by every inbound listener.
    acceptor: tokio_rustls::TlsAcceptor,
    drain: Arc<drain::Drain>,
    /// Proves to the control plane that a re-registration of this instance id is this proxy's
    /// ([`weft_api::names::NODE_INSTANCE_KEY`]).
    instance_key: String,
    /// Mesh DNS (`--dns`): answers services' names with their virtual IPs.
    resolver: Option<Arc<crate::dns::Resolver>>,
}

impl Proxy {
    fn route_table(&self, name: &str) -> Arc<ArcSwap<RouteTable>> {
        if let Some(t) = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return t.clone();
        }
        let mut w = self.routes.write().unwrap_or_else(|p| p.into_inner());
        w.entry(name.to_owned()).or_insert_with(|| Arc::new(ArcSwap::from_pointee(RouteTable::empty()))).clone()
    }

    fn policy(&self, listener: &str) -> inbound::LivePolicy {
        let mut w = self.policies.write().unwrap_or_else(|p| p.into_inner());
        w.entry(listener.to_owned()).or_default().clone()
    }

    fn telemetry(&self, listener: &str) -> Arc<ListenerTelemetry> {
        let mut w = self.telemetry.write().unwrap_or_else(|p| p.into_inner());
        w.entry(listener.to_owned())
            .or_insert_with(|| Arc::new(ListenerTelemetry::new(self.reporter.taps.clone())))
            .clone()
    }

    fn dump(&self) -> std::sync::MutexGuard<'_, Dump> {
        self.dump.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a full LDS update: each listener gets the stack of its direction.
    fn apply_listeners(&self, defs: Vec<ListenerDef>) -> Result<(), ConfigError> {
        let mut with_ctx = Vec::with_capacity(defs.len());
        // The source of what this proxy sends: its service, or (a gateway) the one its
        // certificate names.
        let own_identity: Option<Arc<str>> = self.creds.status().identity.map(Arc::from);
        let own =
            self.opts.service.clone().or_else(|| Some(crate::record::service_of(own_identity.as_deref()?)?.to_owned()));
        let mut new_policies: Vec<(inbound::LivePolicy, Arc<inbound::InboundPolicy>)> = Vec::with_capacity(defs.len());
        // Access logs and tracers go in force once the whole update is.
        type Recorders = (Arc<ListenerTelemetry>, Option<Arc<AccessLog>>, Option<Arc<Tracer>>);
        let mut new_telemetry: Vec<Recorders> = Vec::with_capacity(defs.len());
        for def in defs {
            // Inbound traffic is the local service's, whatever the control plane calls it.
            let service = match (def.direction, &self.opts.service) {
                (Direction::inbound, Some(own)) => own.as_str(),
                _ => def.service.as_str(),
            };
            let metrics = self.metrics.traffic(def.direction, service);
            let policy = self.policy(&def.name);
            let telemetry = self.telemetry(&def.name);
            let built = inbound::InboundPolicy::build(&def.policy, &policy.load())
                .and_then(|p| Ok((p, self.outputs.build(&def.access_log, &self.metrics)?)));
            let new_policy = match built {
                Ok((p, log)) => {
                    let tracer = self.exporters.build(def.tracing.as_ref(), own.as_deref(), &self.metrics);
                    new_telemetry.push((telemetry.clone(), log, tracer));
                    Arc::new(p)
                }
                Err(reason) => {
                    for (live, previous) in new_policies {
                        live.swap(previous);
                    }
                    let e = InvalidResource { kind: "Listener", name: def.name.clone(), reason };
                    return Err(e.into());
                }
            };
            // In force before the listener accepts anything; put back if the update fails.
            let previous = policy.swap(new_policy);
            new_policies.push((policy.clone(), previous));
            let http = def.http.as_ref().map(|h| {
                let routes = match h {
                    HttpDef::Rds(name) => self.route_table(name),
                    HttpDef::Inline(rd) => Arc::new(ArcSwap::from_pointee(RouteTable::build(rd, &self.clusters))),
                };
                Arc::new(HttpStack::new(
                    def.direction,
                    routes,
                    def.escaped_slashes,
                    policy.clone(),
                    metrics.clone(),
                    telemetry.clone(),
                ))
            });
            let tcp = def.tcp_cluster.as_deref().map(|c| TcpTarget {
                cluster: self.clusters.get(c),
                failover: def.tcp_failover.unwrap_or_default(),
                endpoint: None,
            });
            let ctx = ListenerCtx {
                info: Arc::new(ListenerInfo {
                    name: def.name.as_str().into(),
                    direction: def.direction,
                    service: service.into(),
                    own_service: own.as_deref().map(Arc::from),
                    own_identity: own_identity.clone(),
                    drain: self.drain.clone(),
                }),
                http,
                tcp,
                tls: def.tls.as_ref().map(|_| self.acceptor.clone()),
                policy,
                plaintext: def.plaintext || def.tls.is_none(),
                metrics,
                capture: def.use_original_dst.then(|| {
                    Arc::new(crate::listener::Capture {
                        virtuals: self.listeners.virtuals.clone(),
                        clusters: self.clusters.clone(),
                    })
                }),
                server_names: def
                    .server_names
                    .iter()
                    .map(|(name, cluster)| {
                        let target = TcpTarget {
                            cluster: self.clusters.get(cluster),
                            failover: Default::default(),
                            endpoint: None,
                        };
                        (name.as_str().into(), target)
                    })
                    .collect(),
            };
            with_ctx.push((def, ctx));
        }
        let listeners: BTreeMap<String, ListenerDef> =
            with_ctx.iter().map(|(d, _)| (d.name.clone(), d.clone())).collect();
        if let Err(e) = self.listeners.update(with_ctx) {
            for (live, previous) in new_policies {
                live.swap(previous);
            }
            return Err(e);
        }
        for (cell, log, tracer) in new_telemetry {
            cell.access_log.set(log);
            cell.tracer.set(tracer);
        }
        if let Some(resolver) = &self.resolver {
            // The mesh's names are in this proxy's own namespace and trust domain.
            let (trust_domain, namespace) = own_identity
                .as_deref()
                .and_then(weft_api::identity::spiffe_parts)
                .map(|(td, ns, _)| (td, ns))
                .unwrap_or((weft_api::identity::DEFAULT_TRUST_DOMAIN, weft_api::identity::DEFAULT_NAMESPACE));
            let services = listeners.values().filter(|l| !l.bind_to_port).filter_map(|l| match l.address.ip() {
                std::net::IpAddr::V4(vip) => Some((l.service.as_str(), vip)),
                std::net::IpAddr::V6(_) => None,
            });
            resolver.update(crate::dns::MeshNames::new(services, namespace, trust_domain));
        }
        // Route tables no listener names any more are gone (RDS stops sending them too).
        let rds: Vec<&str> = listeners
            .values()
            .filter_map(|l| match &l.http {
                Some(HttpDef::Rds(name)) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        self.routes.write().unwrap_or_else(|p| p.into_inner()).retain(|name, _| rds.contains(&name.as_str()));
        self.policies.write().unwrap_or_else(|p| p.into_inner()).retain(|name, _| listeners.contains_key(name));
        self.telemetry.write().unwrap_or_else(|p| p.into_inner()).retain(|name, _| listeners.contains_key(name));
        let mut dump = self.dump();
        dump.routes.retain(|name, _| rds.contains(&name.as_str()));
        dump.listeners = listeners;
        drop(dump);
        self.clusters.prune();
        Ok(())
    }

    fn apply_routes(&self, defs: Vec<RouteDef>) {
        for def in defs {
            self.route_table(&def.name).store(Arc::new(RouteTable::build(&def, &self.clusters)));
            self.dump().routes.insert(def.name.clone(), def);
        }
        self.clusters.prune();
    }

    /// Applies a full CDS update; clusters left out lose their endpoints and leave the dump.
    fn apply_clusters(&self, defs: Vec<ClusterDef>) {
        self.clusters.update(&defs, &|tls| Arc::new(transport::UpstreamTls::new(&self.creds, tls)));
        let mut dump = self.dump();
        dump.clusters = defs.into_iter().map(|d| (d.name.clone(), d)).collect();
        let Dump { clusters, endpoints, .. } = &mut *dump;
        endpoints.retain(|name, _| clusters.contains_key(name));
    }

    /// Endpoints for clusters CDS does not define (a late EDS response) are ignored.
    fn apply_endpoints(&self, sets: Vec<(String, Vec<EndpointDef>)>) {
        for (name, eps) in sets {
            if let Some(c) = self.clusters.defined(&name) {
                c.set_endpoints(&eps);
                self.dump().endpoints.insert(name, eps);
            }
        }
    }

    fn registration(&self) -> InstanceRegistration {
        let o = &self.opts;
        InstanceRegistration {
            service: o.service.clone(),
            inbound: o.inbound.map(|a| a.to_string()),
            app: o.app.map(|a| a.to_string()),
            admin: Some(o.admin.to_string()),
            labels: o.labels.clone(),
            upstreams: o
                .upstreams
                .iter()
                .map(|(s, a)| Upstream { service: s.clone(), listen: a.to_string() })
                .collect(),
            capture: o.capture.map(|a| a.to_string()),
            mesh_gateway_local: o.mesh_gateway_local.map(|a| a.to_string()),
            healthy: self.healthy.load(Ordering::Relaxed),
        }
    }
}

/// A started proxy; [`RunningProxy::stop`] takes it out of the mesh.
pub struct RunningProxy {
    proxy: Arc<Proxy>,
    control: Arc<weft_client::ControlApi>,
    tasks: tokio::task::JoinSet<()>,
    deregistered: bool,
}

impl RunningProxy {
    pub fn admin(&self) -> SocketAddr {
        self.proxy.opts.admin
    }

    pub fn inbound(&self) -> Option<SocketAddr> {
        self.proxy.opts.inbound
    }

    /// Whether the proxy captures its app's connections (a transparent instance).
    pub fn captures(&self) -> bool {
        self.proxy.opts.capture.is_some()
    }

    /// Waits for the first full config from the control plane: from then on the listeners
    /// serve, and mesh DNS knows the mesh's names.
    pub async fn configured(&self) {
        let _ = self.proxy.ready.subscribe().wait_for(|r| *r).await;
    }

    /// The local address the app reaches `service` at (as bound: port 0 is resolved).
    pub fn upstream(&self, service: &str) -> Option<SocketAddr> {
        self.proxy.opts.upstreams.iter().find(|(s, _)| s == service).map(|(_, a)| *a)
    }

    /// Leaves the endpoint sets of other proxies, then keeps serving what is in flight (and
    /// what callers send before they learn of it) for at most the drain timeout: the app is
    /// stopped only after this.
    pub async fn drain(&mut self) {
        self.deregister().await;
        let o = &self.proxy.opts;
        tracing::info!(id = %o.id, timeout = ?o.drain_timeout, "draining");
        self.proxy.drain.run(o.drain_timeout).await;
    }

    /// Stops serving (after [`RunningProxy::drain`], or at once when the app is gone).
    pub async fn stop(mut self) {
        self.deregister().await;
        self.tasks.abort_all();
        tracing::info!(id = %self.proxy.opts.id, "proxy stopped");
    }

    async fn deregister(&mut self) {
        let o = &self.proxy.opts;
        if o.service.is_some() && o.inbound.is_some() && !std::mem::replace(&mut self.deregistered, true) {
            self.control.deregister(&o.id).await;
        }
    }
}

/// Binds every listener given on the command line (so conflicts fail here, in one line),
/// then starts the admin endpoint, the xDS client and the health checker.
pub async fn start(mut opts: ProxyOptions) -> anyhow::Result<RunningProxy> {
    let limits = Arc::new(opts.limits.clone());
    let ready = tokio::sync::watch::Sender::new(false);
    let listeners = Listeners::new(limits, ready.subscribe());
    // IPv6 (`--ipv6`): loopback's for what the app sends, every address for what arrives.
    let ipv6 = |ip: Ipv6Addr, of: SocketAddr| opts.ipv6.then(|| SocketAddr::new(ip.into(), of.port()));
    if let Some(addr) = opts.inbound {
        let addr = listeners.prebind(addr, "inbound traffic (--inbound)")?;
        if let Some(v6) = ipv6(Ipv6Addr::UNSPECIFIED, addr) {
            listeners.prebind_alias(addr, v6, "inbound traffic over IPv6 (--inbound, --ipv6)")?;
        }
        opts.inbound = Some(addr);
    }
    for (svc, addr) in &mut opts.upstreams {
        *addr = listeners.prebind(*addr, &format!("upstream {svc}"))?;
    }
    if let Some(addr) = opts.capture {
        let addr = listeners.prebind(addr, "captured connections (--capture)")?;
        if let Some(v6) = ipv6(Ipv6Addr::LOCALHOST, addr) {
            listeners.prebind_alias(addr, v6, "captured IPv6 connections (--capture, --ipv6)")?;
        }
        opts.capture = Some(addr);
        // Its own connections must not be captured again.
        transport::set_mark(weft_api::names::CAPTURE_MARK);
    }
    let resolver = match opts.dns {
        Some(addr) => {
            let r = crate::dns::Resolver::new(opts.dns_upstreams.clone(), opts.ipv6);
            crate::dns::serve(addr, r.clone())?;
            if let Some(v6) = ipv6(Ipv6Addr::LOCALHOST, addr) {
                crate::dns::serve(v6, r.clone())?;
            }
            Some(r)
        }
        None => None,
    };
    let admin = tokio::net::TcpListener::bind(opts.admin)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} for the admin endpoint (--admin): {e}", opts.admin))?;
    opts.admin = admin.local_addr()?;
    // Without an app to check, a proxy others reach (a mesh gateway) serves from the start.
    let healthy = Arc::new(AtomicBool::new(opts.health.is_none() && opts.inbound.is_some()));
    let endpoint = weft_client::ControlEndpoint::resolve(&opts.control, opts.ca_file.as_deref(), opts.token.clone())?;
    // Every client of the control plane trusts the live bundle once xDS delivers it, so a
    // rotated root that the control plane's certificate chains to is trusted as soon as proxies
    // learn it; the roots in the file only bootstrap.
    let bootstrap = endpoint.roots()?;
    let creds = identity::Credentials::new();
    let xds_tls = Arc::new(creds.control_plane_config(bootstrap.clone(), &[b"h2"]));
    let control = Arc::new(weft_client::ControlApi::with_tls(endpoint, creds.control_plane_config(bootstrap, &[])));
    let acceptor = tokio_rustls::TlsAcceptor::from(creds.server_config());
    let metrics = Metrics::new();
    let proxy = Arc::new(Proxy {
        clusters: Arc::new(ClusterManager::default().with_metrics(metrics.clone())),
        routes: RwLock::default(),
        policies: RwLock::default(),
        telemetry: RwLock::default(),
        outputs: Outputs::default(),
        exporters: Exporters::default(),
        reporter: Arc::new(Reporter { metrics: metrics.clone(), taps: Arc::new(Taps::default()) }),
        listeners,
        metrics,
        healthy,
        dump: Mutex::default(),
        ready,
        creds,
        acceptor,
        drain: Default::default(),
        instance_key: crypto::random_hex(16),
        resolver,
        opts,
    });
    let mut tasks = tokio::task::JoinSet::new();
    // The first certificate: a refused join token stops the proxy here, with the control
    // plane's reason; an unreachable control plane is retried in the background.
    let csr = weft_api::identity::CertificateRequest {
        instance: proxy.opts.id.clone(),
        service: proxy.opts.service.clone(),
        csr: String::new(),
    };
    if let Err(e) = identity::first_certificate(&proxy.creds, &control, &csr).await {
        anyhow::bail!("the control plane refused this proxy a certificate: {e}");
    }
    tasks.spawn(identity::run(proxy.creds.clone(), control.clone(), csr, proxy.metrics.clone()));
    tasks.spawn(admin::serve(admin, proxy.clone()));
    let xds_endpoint = weft_client::ControlEndpoint {
        address: proxy.opts.xds.clone().unwrap_or_else(|| proxy.opts.control.clone()),
        ..control.endpoint.clone()
    };
    tasks.spawn(xds::run(proxy.clone(), xds_endpoint, xds_tls));
    let pools = proxy.clone();
    tasks.spawn(async move { pools.clusters.sweep_pools(pools.opts.limits.upstream_idle_timeout).await });
    if let (Some(check), Some(_)) = (proxy.opts.health.clone(), &proxy.opts.service) {
        tasks.spawn(health::run(
            check,
            proxy.opts.health_interval,
            proxy.opts.id.clone(),
            proxy.healthy.clone(),
            control.clone(),
        ));
    }
    let o = &proxy.opts;
    let inbound = o.inbound.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    tracing::info!(id = %o.id, service = ?o.service, inbound, admin = %o.admin, control = %o.control, "proxy started");
    Ok(RunningProxy { proxy, control, tasks, deregistered: false })
}

impl xds::Runtime for Proxy {
    fn node(&self) -> xds::NodeInfo {
        xds::NodeInfo {
            id: self.opts.id.clone(),
            service: self.opts.service.clone(),
            registration: self.registration(),
            instance_key: self.instance_key.clone(),
        }
    }

    fn apply(&self, update: xds::Update) -> Result<(), ConfigError> {
        match update {
            xds::Update::Listeners(defs) => self.apply_listeners(defs)?,
            xds::Update::Clusters(defs) => self.apply_clusters(defs),
            xds::Update::Routes(defs) => self.apply_routes(defs),
            xds::Update::Endpoints(sets) => self.apply_endpoints(sets),
            xds::Update::TrustBundle { name, bundle } => {
                let roots = self.creds.set_bundle(&bundle).map_err(|reason| InvalidResource {
                    kind: "Secret",
                    name,
                    reason,
                })?;
                let peers: Vec<&str> = bundle.peers.iter().map(|(d, _)| d.as_str()).collect();
                tracing::info!(roots, peer_trust_domains = ?peers, "trust bundle updated");
            }
        }
        Ok(())
    }

    fn reporter(&self) -> Option<Arc<Reporter>> {
        Some(self.reporter.clone())
    }

    fn record(&self, event: xds::Event<'_>) {
        match event {
            xds::Event::Connected(up) => self.dump().control_plane_connected = up,
            xds::Event::Accepted { type_url, version } => {
                self.metrics.xds(type_url, true);
                self.dump().versions.insert(type_url.to_owned(), version.to_owned());
            }
            xds::Event::Rejected { type_url, error } => {
                self.metrics.xds(type_url, false);
                self.dump().last_rejected = Some(error.to_owned());
            }
            xds::Event::Synced => {
                if !*self.ready.borrow() {
                    self.ready.send_replace(true);
                    tracing::info!("first full config applied; ready");
                }
            }
        }
    }
}

impl admin::View for Proxy {
    fn cert(&self) -> identity::CertStatus {
        self.creds.status()
    }

    fn metrics(&self, openmetrics: bool) -> String {
        self.metrics.encode(openmetrics)
    }

    fn config_dump(&self) -> serde_json::Value {
        let dump = self.dump().clone();
        let mut json = serde_json::to_value(&dump).unwrap_or_default();
        json["node"] = serde_json::json!({ "id": self.opts.id, "registration": self.registration() });
        json
    }

    fn synced(&self) -> bool {
        *self.ready.borrow()
    }
}
