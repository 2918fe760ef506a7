//! Translation of the mesh state into standard Envoy v3 resources, done once per change: the
//! pipeline ([`Snapshot`]: which resources exist, what is made again and what is reused) is
//! here, the encoders of each resource in `translate/envoy.rs`.
//!
//! Global resources (one per service) are shared by every stream:
//! - `Cluster` named after the service (EDS over ADS);
//! - `ClusterLoadAssignment` with one `LbEndpoint` per instance, grouped by zone;
//! - `RouteConfiguration` named after the service: HTTPRoute rules, then a default route;
//! - `Listener` named after the service carrying an `ApiListener`, for proxyless gRPC clients
//!   (`xds:///service`).
//!
//! - `Secret` `ROOTCA`: the trust bundle, a validation context (SDS).
//!
//! A weft proxy additionally gets resources of its own, derived from its registration: its
//! inbound listener with the static `inbound|app` cluster, and one outbound listener per
//! upstream; of the service clusters, only those its upstreams reach.
//!
//! Mutual TLS: a weft proxy's service clusters carry an `UpstreamTlsContext` that expects the
//! service's SPIFFE ID, and its inbound listener a `DownstreamTlsContext` that requires a client
//! certificate; both name the SDS secrets `default` (the proxy's own certificate, which the
//! proxy makes itself) and `ROOTCA`. A strict service's inbound listener has only TLS filter
//! chains, so plaintext matches nothing and is closed; a permissive one has plaintext chains
//! too. Proxyless clients get the clusters without TLS (they reach permissive services).
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;
use weft_api::identity::{ROOT_SECRET, spiffe_id};
use weft_api::names;
use weft_api::peering::MeshGatewayMode;
use weft_api::registry::InstanceRegistration;
use weft_api::resource::{
    AuthorizationPolicySpec, EscapedSlashes, JwksSource, MtlsMode, Object, Protocol, RateLimitPolicy,
    RequestAuthenticationSpec, Resource, ServiceSpec, TrafficPolicySpec,
};
use weft_api::{Instance, ServiceSummary};

mod envoy;
mod telemetry;
use envoy::{
    HostRule, HttpRoutes, InboundFilters, Remote, api_listener, capture_listener, eds_cluster, gateway_cluster,
    inbound_route, load_assignment, local_rate_limit, mesh_gateway_listener, passthrough_cluster, proxy_listener,
    root_secret, route_config, static_cluster, tls_socket, upstream_tls,
};
use telemetry::Telemetry;

/// The resource types weft serves, in the order clients subscribe to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Type {
    Listener,
    Route,
    Cluster,
    Endpoint,
    Secret,
}

impl Type {
    pub const ALL: [Type; 5] = [Type::Listener, Type::Route, Type::Cluster, Type::Endpoint, Type::Secret];

    pub fn url(self) -> String {
        match self {
            Type::Listener => Listener::type_url(),
            Type::Route => RouteConfiguration::type_url(),
            Type::Cluster => Cluster::type_url(),
            Type::Endpoint => ClusterLoadAssignment::type_url(),
            Type::Secret => Secret::type_url(),
        }
    }

    pub fn from_url(url: &str) -> Option<Type> {
        Type::ALL.into_iter().find(|t| t.url() == url)
    }

    /// Listeners and clusters are wildcard by default in the xDS protocol; routes and endpoints
    /// are only sent when named.
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, Type::Listener | Type::Cluster)
    }
}

/// One encoded resource. Encoded once per change and shared by every stream that sends it.
#[derive(Debug)]
pub struct Res {
    pub name: String,
    pub version: String,
    pub any: Any,
}

impl Res {
    fn new<M: Message + Name>(name: String, msg: &M) -> Arc<Res> {
        let value = msg.encode_to_vec();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        Arc::new(Res { name, version: format!("{:016x}", h.finish()), any: Any { type_url: M::type_url(), value } })
    }
}

pub type ResMap = BTreeMap<String, Arc<Res>>;

/// The mesh-wide modes of services whose `Service` resource sets none (`weft control --mtls`,
/// `--egress`), and how sidecars reach peer datacenters (`--mesh-gateway-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Defaults {
    pub mtls: MtlsMode,
    pub egress: weft_api::resource::Egress,
    pub mesh_gateway: weft_api::peering::MeshGatewayMode,
}

impl Defaults {
    /// How callers reach a service's instances in peer datacenters: its `Service`'s own mode,
    /// else the mesh's.
    pub fn mesh_gateway_of(&self, spec: Option<&ServiceSpec>) -> MeshGatewayMode {
        spec.and_then(|s| s.mesh_gateway_mode).unwrap_or(self.mesh_gateway)
    }
}

/// The address a serving mesh gateway of this datacenter offers its own sidecars (its
/// `--mesh-gateway-local`), if `instance` is one.
pub fn local_gateway(instance: &Instance) -> Option<&str> {
    let gateway = instance.serving() && is_mesh_gateway(&instance.registration);
    instance.registration.mesh_gateway_local.as_deref().filter(|_| gateway)
}

/// Mesh-wide security settings the translation needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Every root proxies trust (PEM), the signing one first.
    pub bundle: String,
    /// What services that set none get.
    pub defaults: Defaults,
    pub trust_domain: String,
    pub namespace: String,
    /// Issuers' keys, by where they are read from.
    pub jwks: BTreeMap<JwksSource, Arc<str>>,
    /// Services' virtual IPs (allocated and stored by the state, [`vip_for`]).
    pub vips: Arc<BTreeMap<String, Ipv4Addr>>,
    /// This datacenter's name.
    pub datacenter: String,
    /// What each peering (by name) imports: the peer's last state.
    pub peers: Arc<BTreeMap<String, weft_api::peering::PeerState>>,
}

/// A virtual IP for `service` not among `used`: one derived from its name (FNV-1a), else the
/// next free one after it, in [`names::VIP_RANGE`] (network and broadcast addresses left out).
/// `None` when the range is full.
pub fn vip_for(service: &str, used: &std::collections::BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let (base, prefix) = names::VIP_RANGE;
    let hosts = (1u32 << (32 - prefix)) - 2;
    let hash = service.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let start = (hash % u64::from(hosts)) as u32;
    (0..hosts).map(|i| Ipv4Addr::from(u32::from(base) + 1 + (start + i) % hosts)).find(|ip| !used.contains(ip))
}

/// What the control plane serves at one moment, made by a pipeline of two stages from the
/// state (resources, settings, registered instances):
///
/// 1. [`Config`]: listeners, clusters, routes and the trust bundle, made from the resources,
///    the settings and which services exist. A snapshot whose inputs to it are unchanged (any
///    change of instances alone: a registration, a health change) shares the previous
///    snapshot's, with every proxy's own listeners and clusters already made.
/// 2. Endpoints, one resource per service (and per caller's zone where a service prefers
///    callers' zones), each encoded again only if what it is made of changed.
pub struct Snapshot {
    pub version: u64,
    pub services: BTreeMap<String, ServiceSummary>,
    config: Arc<Config>,
    endpoints: ResMap,
    /// For services that prefer callers' zones: their endpoints as seen from each zone.
    zonal_endpoints: HashMap<(String, String), Arc<Res>>,
    /// What each endpoint resource (by service and caller's zone) was made of, hashed.
    endpoint_inputs: HashMap<(String, Option<String>), u64>,
}

/// Stage 1 of the pipeline: everything but endpoints.
struct Config {
    resources: BTreeMap<String, Resource>,
    settings: Settings,
    /// Services that exist: declared, or registered by an instance.
    names: Vec<String>,
    specs: BTreeMap<String, ServiceSpec>,
    /// Listeners (proxyless clients' API listeners), routes, clusters and the trust bundle.
    global: HashMap<Type, ResMap>,
    /// The service clusters with mutual TLS, as weft proxies get them.
    mesh_clusters: ResMap,
    /// The clusters a call to each service can reach: itself, and its routes' backends and
    /// mirrors.
    reach: HashMap<String, std::collections::BTreeSet<String>>,
    policies: Vec<Object<AuthorizationPolicySpec>>,
    authns: Vec<Object<RequestAuthenticationSpec>>,
    /// TrafficPolicy rate limits, by service (enforced by its own sidecars).
    rate_limits: HashMap<String, RateLimitPolicy>,
    /// Telemetry resources: which listeners log and trace which requests.
    telemetry: Telemetry,
    /// Services exported to some peer: a mesh gateway routes to these.
    exported: std::collections::BTreeSet<String>,
    /// Services some peer exports to this datacenter, with the server name its sidecars send
    /// for each: a mesh gateway's local listener routes these to the peers' gateways.
    imported: Vec<(String, String)>,
    /// Each weft proxy's own resources, by what they are made of, made at its first request.
    nodes: std::sync::Mutex<HashMap<NodeShape, Arc<NodeResources>>>,
}

/// What a weft proxy's own listeners and clusters are made of, besides the config: proxies of
/// the same shape get the same resources.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NodeShape {
    service: Option<String>,
    inbound: Option<String>,
    app: Option<String>,
    upstreams: Vec<(String, String)>,
    capture: Option<String>,
    mesh_gateway_local: Option<String>,
}

impl NodeShape {
    fn of(reg: &InstanceRegistration) -> NodeShape {
        NodeShape {
            service: reg.service.clone(),
            inbound: reg.inbound.clone(),
            app: reg.app.clone(),
            upstreams: reg.upstreams.iter().map(|u| (u.service.clone(), u.listen.clone())).collect(),
            capture: reg.capture.clone(),
            mesh_gateway_local: reg.mesh_gateway_local.clone(),
        }
    }
}

struct NodeResources {
    listeners: ResMap,
    clusters: ResMap,
}

/// Whether a proxy is a mesh gateway: of the service `mesh-gateway`, with no app.
fn is_mesh_gateway(reg: &InstanceRegistration) -> bool {
    reg.service.as_deref() == Some(weft_api::peering::MESH_GATEWAY) && reg.app.is_none()
}

/// Node shapes a config keeps made resources for; past it (proxies come and go with new
/// addresses), it starts over.
const MAX_NODE_SHAPES: usize = 100_000;

impl Snapshot {
    /// The snapshot of the mesh's `resources` and registered instances (`registered`), reusing
    /// what is unchanged from `previous`.
    pub(crate) fn build(
        resources: &BTreeMap<String, Resource>,
        registered: &[&Instance],
        settings: &Settings,
        version: u64,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let mut instances: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        for &i in registered {
            if let Some(svc) = &i.registration.service {
                instances.entry(svc).or_default().push(i);
            }
        }
        let declared = resources.values().filter_map(|r| match r {
            Resource::Service(o) => Some(o.metadata.name.as_str()),
            _ => None,
        });
        let imported = settings.peers.values().flat_map(|p| p.services.iter().map(|s| s.name.as_str()));
        let mut names: Vec<String> =
            declared.chain(instances.keys().copied()).chain(imported).map(str::to_owned).collect();
        names.sort();
        names.dedup();
        let config = match previous {
            Some(p) if p.config.made_from(resources, settings, &names) => p.config.clone(),
            _ => Arc::new(Config::build(resources, settings, names)),
        };
        // Zones callers may be in: their instances' `zone` labels.
        let zones: std::collections::BTreeSet<&str> = registered
            .iter()
            .filter_map(|i| i.registration.labels.get("zone").map(String::as_str).filter(|z| !z.is_empty()))
            .collect();
        let mut snapshot = Snapshot {
            version,
            services: BTreeMap::new(),
            config: config.clone(),
            endpoints: ResMap::new(),
            zonal_endpoints: HashMap::new(),
            endpoint_inputs: HashMap::new(),
        };
        let default_spec = ServiceSpec::default();
        // This datacenter's mesh gateways' addresses for its own sidecars.
        let own_gateways: Vec<String> = instances
            .get(weft_api::peering::MESH_GATEWAY)
            .into_iter()
            .flatten()
            .filter_map(|i| local_gateway(i).map(str::to_owned))
            .collect();
        for name in &config.names {
            let spec = config.specs.get(name).unwrap_or(&default_spec);
            // A versioned service is a subset of another's instances.
            let members: Vec<&Instance> = match &spec.selector {
                Some(sel) => instances
                    .get(sel.service.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|i| sel.selects(i.registration.service.as_deref(), &i.registration.labels))
                    .copied()
                    .collect(),
                None => instances.get(name.as_str()).cloned().unwrap_or_default(),
            };
            let remote = remotes(settings, name, spec.failover.as_deref());
            // In local mode the sidecars' way to each peer is their own datacenter's mesh
            // gateway, which goes on to the peers' (in the same failover order).
            let via = match settings.defaults.mesh_gateway_of(Some(spec)) {
                MeshGatewayMode::Remote => remote.clone(),
                MeshGatewayMode::Local => {
                    remote.iter().map(|r| Remote { gateways: &own_gateways, ..r.clone() }).collect()
                }
            };
            let made_of = endpoints_made_of(&members, &via);
            let res = snapshot.endpoint(previous, name, None, made_of, &members, &via);
            snapshot.endpoints.insert(name.clone(), res);
            if spec.locality.as_ref().is_some_and(|l| l.prefer_same_zone) {
                for zone in &zones {
                    let res = snapshot.endpoint(previous, name, Some(zone), made_of, &members, &via);
                    snapshot.zonal_endpoints.insert((name.clone(), (*zone).to_owned()), res);
                }
            }
            if !own_gateways.is_empty() && !remote.is_empty() {
                let name = names::remote_cluster(name);
                let made_of = endpoints_made_of(&[], &remote);
                let res = snapshot.endpoint(previous, &name, None, made_of, &[], &remote);
                snapshot.endpoints.insert(name, res);
            }
            // A mesh gateway reaches the service's own instances only.
            if config.exported.contains(name) {
                let local = names::local_cluster(name);
                let made_of = endpoints_made_of(&members, &[]);
                let res = snapshot.endpoint(previous, &local, None, made_of, &members, &[]);
                snapshot.endpoints.insert(local, res);
            }
            snapshot.services.insert(
                name.clone(),
                ServiceSummary {
                    name: name.clone(),
                    declared: config.specs.contains_key(name),
                    instances: members.len(),
                    healthy: members.iter().filter(|i| i.serving()).count(),
                    protocol: spec.protocol.as_str().to_owned(),
                    load_balancer: spec.load_balancer.as_str().to_owned(),
                    vip: config.settings.vips.get(name).copied(),
                    imported: settings
                        .peers
                        .iter()
                        .filter_map(|(peer, state)| {
                            let s = state.services.iter().find(|s| s.name == *name)?;
                            Some(weft_api::registry::Imported {
                                peer: peer.clone(),
                                datacenter: state.datacenter.clone(),
                                healthy: s.healthy,
                                instances: s.instances,
                            })
                        })
                        .collect(),
                },
            );
        }
        snapshot
    }

    /// The endpoints of service `name` as seen from `zone`: the previous snapshot's if they
    /// were made of the same, else encoded anew.
    fn endpoint(
        &mut self,
        previous: Option<&Snapshot>,
        name: &str,
        zone: Option<&str>,
        made_of: u64,
        members: &[&Instance],
        remote: &[Remote<'_>],
    ) -> Arc<Res> {
        let key = (name.to_owned(), zone.map(str::to_owned));
        let reused = previous.filter(|p| p.endpoint_inputs.get(&key) == Some(&made_of)).and_then(|p| match zone {
            None => p.endpoints.get(name).cloned(),
            Some(z) => p.zonal_endpoints.get(&(name.to_owned(), z.to_owned())).cloned(),
        });
        self.endpoint_inputs.insert(key, made_of);
        reused.unwrap_or_else(|| Res::new(name.to_owned(), &load_assignment(name, members, zone, remote)))
    }

    /// The mutual TLS mode of a service's inbound listeners.
    pub fn mtls(&self, service: &str) -> MtlsMode {
        self.config.mtls(service)
    }

    /// The version of the trust bundle resource, which proxies ACK once they hold it.
    pub fn bundle_version(&self) -> String {
        self.config.global[&Type::Secret].get(ROOT_SECRET).map(|r| r.version.clone()).unwrap_or_default()
    }

    /// Resources of type `t` a client may see: for a weft proxy, its own listeners and clusters
    /// plus the shared clusters, routes and endpoints; for any other client, the shared ones.
    pub fn available(&self, t: Type, node: Option<&InstanceRegistration>) -> ResMap {
        match (t, node) {
            (Type::Endpoint, None) => self.endpoints.clone(),
            (Type::Endpoint, Some(reg)) => {
                let mut all = self.endpoints.clone();
                if let Some(zone) = reg.labels.get("zone") {
                    for ((name, z), res) in &self.zonal_endpoints {
                        if z == zone {
                            all.insert(name.clone(), res.clone());
                        }
                    }
                }
                all
            }
            (Type::Listener, Some(reg)) => self.config.node(reg).listeners.clone(),
            (Type::Cluster, Some(reg)) => self.config.node(reg).clusters.clone(),
            _ => self.config.global[&t].clone(),
        }
    }
}

/// What a service's endpoint resources are made of, hashed: each member's id, address, labels
/// and whether it serves, in order, and the peers' gateways standing for theirs.
fn endpoints_made_of(members: &[&Instance], remote: &[Remote<'_>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for i in members {
        (&i.id, &i.registration.inbound, &i.registration.labels, i.serving()).hash(&mut h);
    }
    for r in remote {
        (r.datacenter, r.gateways, r.serving, &r.identity).hash(&mut h);
    }
    h.finish()
}

/// The peer datacenters that export `service` to this one, in failover order: the service's
/// `failover` list (datacenters not exporting it left out), or else every one, by peering name.
fn remotes<'a>(settings: &'a Settings, service: &str, order: Option<&[String]>) -> Vec<Remote<'a>> {
    let exporting = settings.peers.values().filter_map(|p| {
        let s = p.services.iter().find(|s| s.name == service)?;
        Some(Remote {
            datacenter: &p.datacenter,
            gateways: &p.gateways,
            serving: s.healthy > 0,
            identity: spiffe_id(&p.trust_domain, &p.namespace, service),
        })
    });
    match order {
        None => exporting.collect(),
        Some(order) => {
            let mut found: Vec<Remote<'a>> = exporting.filter(|r| order.iter().any(|d| d == r.datacenter)).collect();
            found.sort_by_key(|r| order.iter().position(|d| d == r.datacenter));
            found
        }
    }
}

impl Config {
    fn build(resources: &BTreeMap<String, Resource>, settings: &Settings, names: Vec<String>) -> Config {
        let mut specs: BTreeMap<String, ServiceSpec> = BTreeMap::new();
        // HTTPRoutes, and GRPCRoutes as the HTTPRoutes they amount to.
        let mut routes: Vec<(&str, std::borrow::Cow<'_, weft_api::resource::HttpRouteSpec>)> = Vec::new();
        // TrafficPolicies for one HTTPRoute, by route name.
        let mut route_policies: HashMap<&str, &TrafficPolicySpec> = HashMap::new();
        let mut policies = Vec::new();
        let mut authns = Vec::new();
        // The first TrafficPolicy (by name) targeting a service applies to it.
        let mut traffic: HashMap<&str, &TrafficPolicySpec> = HashMap::new();
        for r in resources.values() {
            match r {
                Resource::Service(o) => drop(specs.insert(o.metadata.name.clone(), o.spec.clone())),
                Resource::HttpRoute(o) => routes.push((o.metadata.name.as_str(), std::borrow::Cow::Borrowed(&o.spec))),
                Resource::GrpcRoute(o) => {
                    routes.push((o.metadata.name.as_str(), std::borrow::Cow::Owned(o.spec.as_http())))
                }
                Resource::AuthorizationPolicy(o) => policies.push(o.clone()),
                Resource::RequestAuthentication(o) => authns.push(o.clone()),
                Resource::TrafficPolicy(o) if o.spec.target_ref.targets_route() => {
                    route_policies.entry(o.spec.target_ref.name.as_str()).or_insert(&o.spec);
                }
                Resource::TrafficPolicy(o) => drop(traffic.entry(o.spec.target_ref.name.as_str()).or_insert(&o.spec)),
                Resource::Telemetry(_) | Resource::ExportedServices(_) => {}
            }
        }
        let telemetry = Telemetry::new(resources, routes.iter().map(|(name, r)| (*name, r.as_ref())));
        // Services some route's own TrafficPolicy retries requests to: their clusters carry
        // a retry budget even when their own policy has no retry.
        let route_retries: std::collections::HashSet<&str> = routes
            .iter()
            .filter(|(route, _)| route_policies.get(route).is_some_and(|p| p.retry.is_some()))
            .flat_map(|(_, r)| r.rules.iter().flat_map(|rule| rule.backend_refs.iter().map(|b| b.name.as_str())))
            .collect();

        let mut global: HashMap<Type, ResMap> = Type::ALL.into_iter().map(|t| (t, ResMap::new())).collect();
        let mut put = |t: Type, res: Arc<Res>| {
            global.get_mut(&t).expect("all types present").insert(res.name.clone(), res);
        };
        let peer_roots: Vec<(&str, &str)> = settings
            .peers
            .values()
            .filter(|p| !p.trust_domain.is_empty() && !p.roots.is_empty())
            .map(|p| (p.trust_domain.as_str(), p.roots.as_str()))
            .collect();
        let bundle = root_secret(&settings.bundle, &settings.trust_domain, &peer_roots);
        put(Type::Secret, Res::new(ROOT_SECRET.to_owned(), &bundle));
        let mut mesh_clusters = ResMap::new();
        let mut reach = HashMap::new();
        let mut imported = Vec::new();
        let default_spec = ServiceSpec::default();
        for name in &names {
            let spec = specs.get(name).unwrap_or(&default_spec);
            // A versioned service's instances present the identity of the service they are of.
            let identity_of = spec.selector.as_ref().map_or(name.as_str(), |sel| sel.service.as_str());
            let rules: Vec<HostRule<'_>> = routes
                .iter()
                .filter(|(_, r)| r.parent_refs.iter().any(|p| &p.name == name))
                .flat_map(|(route, r)| {
                    let policy = route_policies.get(route).copied();
                    r.rules.iter().map(move |rule| (r.hostnames.as_slice(), (rule, policy, *route)))
                })
                .collect();
            let backends = rules.iter().flat_map(|(_, (rule, _, _))| {
                let mirrors = rule.filters.iter().filter_map(|f| f.request_mirror.as_ref());
                rule.backend_refs.iter().map(|b| &b.name).chain(mirrors.map(|m| &m.backend_ref.name))
            });
            reach.insert(name.clone(), std::iter::once(name).chain(backends).cloned().collect());
            let policy = traffic.get(name.as_str()).copied();
            let mut cluster = eds_cluster(name, spec, policy, route_retries.contains(name.as_str()));
            put(Type::Cluster, Res::new(name.clone(), &cluster));
            // Instances of the service in peer datacenters prove their own trust domain's
            // identity, reached through their gateways by the service's server name.
            let mut identities = vec![spiffe_id(&settings.trust_domain, &settings.namespace, identity_of)];
            let mut sni = None;
            for p in settings.peers.values().filter(|p| p.services.iter().any(|s| s.name == *name)) {
                identities.push(spiffe_id(&p.trust_domain, &p.namespace, name));
                sni.get_or_insert_with(|| weft_api::peering::server_name(name, &p.namespace));
            }
            if let Some(sni) = &sni {
                imported.push((name.clone(), sni.clone()));
            }
            cluster.transport_socket = Some(tls_socket(&upstream_tls(&identities, sni)));
            mesh_clusters.insert(name.clone(), Res::new(name.clone(), &cluster));
            let hash = spec.consistent_hash.as_ref().filter(|_| spec.load_balancer.is_consistent_hash());
            put(Type::Route, Res::new(name.clone(), &route_config(name, &rules, policy, hash)));
            put(Type::Listener, Res::new(name.clone(), &api_listener(name)));
        }
        let rate_limits = traffic
            .iter()
            .filter_map(|(name, p)| Some(((*name).to_owned(), p.rate_limit.as_deref()?.clone())))
            .collect();
        let exported = resources
            .values()
            .filter_map(|r| match r {
                Resource::ExportedServices(o) => Some(o.spec.services.iter().map(|s| s.name.clone())),
                _ => None,
            })
            .flatten()
            .collect();
        Config {
            exported,
            imported,
            resources: resources.clone(),
            settings: settings.clone(),
            names,
            specs,
            global,
            mesh_clusters,
            reach,
            policies,
            authns,
            rate_limits,
            telemetry,
            nodes: Default::default(),
        }
    }

    /// Whether this config is what these inputs make.
    fn made_from(&self, resources: &BTreeMap<String, Resource>, settings: &Settings, names: &[String]) -> bool {
        self.names == names && self.settings == *settings && self.resources == *resources
    }

    fn spec(&self, service: &str) -> Option<&ServiceSpec> {
        self.specs.get(service)
    }

    fn mtls(&self, service: &str) -> MtlsMode {
        self.spec(service).and_then(|s| s.mtls).unwrap_or(self.settings.defaults.mtls)
    }

    fn protocol(&self, service: &str) -> Protocol {
        self.spec(service).map(|s| s.protocol).unwrap_or_default()
    }

    fn escaped_slashes(&self, service: &str) -> EscapedSlashes {
        self.spec(service).map(|s| s.escaped_slashes).unwrap_or_default()
    }

    /// A weft proxy's own listeners and clusters, made once per node shape.
    fn node(&self, reg: &InstanceRegistration) -> Arc<NodeResources> {
        let shape = NodeShape::of(reg);
        let lock = || self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(made) = lock().get(&shape) {
            return made.clone();
        }
        let made = Arc::new(NodeResources { listeners: self.node_listeners(reg), clusters: self.node_clusters(reg) });
        let mut nodes = lock();
        if nodes.len() >= MAX_NODE_SHAPES {
            nodes.clear();
        }
        nodes.insert(shape, made.clone());
        made
    }

    /// The clusters a proxy's upstreams can reach, and its app's. A sidecar names the services
    /// its app calls, so it never needs the others' clusters, nor so their endpoints: what a
    /// proxy holds, and what each change sends it, grows with what it calls, not with the mesh.
    /// A transparent instance may call any service, so it gets them all, and the passthrough
    /// cluster.
    fn node_clusters(&self, reg: &InstanceRegistration) -> ResMap {
        let mut all: ResMap = match &reg.capture {
            Some(_) => {
                let mut all = self.mesh_clusters.clone();
                let p = passthrough_cluster();
                all.insert(p.name.clone(), Res::new(p.name.clone(), &p));
                all
            }
            None => {
                let reachable = reg.upstreams.iter().flat_map(|u| self.reach.get(&u.service).into_iter().flatten());
                reachable.filter_map(|c| Some((c.clone(), self.mesh_clusters.get(c)?.clone()))).collect()
            }
        };
        if is_mesh_gateway(reg) {
            let local = self.exported.iter().map(|s| (s, names::local_cluster(s)));
            let remote = self.imported.iter().map(|(s, _)| (s, names::remote_cluster(s)));
            let remote = remote.filter(|_| reg.mesh_gateway_local.is_some());
            for (service, name) in local.chain(remote) {
                let timeout = self.spec(service).and_then(|s| s.connect_timeout);
                let c = gateway_cluster(&name, timeout.unwrap_or(weft_api::resource::DEFAULT_CONNECT_TIMEOUT));
                all.insert(name.clone(), Res::new(name, &c));
            }
        }
        if let Some(app) = &reg.app {
            let protocol = reg.service.as_deref().map(|s| self.protocol(s)).unwrap_or_default();
            let c = static_cluster(names::INBOUND_CLUSTER, app, protocol);
            all.insert(names::INBOUND_CLUSTER.to_owned(), Res::new(names::INBOUND_CLUSTER.to_owned(), &c));
        }
        all
    }

    fn node_listeners(&self, reg: &InstanceRegistration) -> ResMap {
        let mut out = ResMap::new();
        if let (true, Some(addr)) = (is_mesh_gateway(reg), &reg.inbound) {
            let routes: Vec<(String, String)> = self
                .exported
                .iter()
                .map(|s| (weft_api::peering::server_name(s, &self.settings.namespace), names::local_cluster(s)))
                .collect();
            let name = names::mesh_gateway_listener(addr);
            out.insert(name.clone(), Res::new(name.clone(), &mesh_gateway_listener(&name, addr, &routes)));
        }
        // Its own datacenter's sidecars' connections to peers' services, on to the peers'.
        if let (true, Some(addr)) = (is_mesh_gateway(reg), &reg.mesh_gateway_local) {
            let routes: Vec<(String, String)> =
                self.imported.iter().map(|(s, sni)| (sni.clone(), names::remote_cluster(s))).collect();
            let name = names::mesh_gateway_listener(addr);
            out.insert(name.clone(), Res::new(name.clone(), &mesh_gateway_listener(&name, addr, &routes)));
        }
        if let (Some(inbound), Some(_)) = (&reg.inbound, &reg.app) {
            let protocol = reg.service.as_deref().map(|s| self.protocol(s)).unwrap_or_default();
            let name = names::inbound_listener(inbound);
            let http = HttpRoutes::Inline(Box::new(inbound_route()));
            let service = reg.service.as_deref().unwrap_or(names::INBOUND_CLUSTER);
            let mtls = reg.service.as_deref().map(|s| self.mtls(s)).unwrap_or_default();
            let policies: Vec<&Object<AuthorizationPolicySpec>> = self.policies.iter().collect();
            let s = &self.settings;
            let filters = InboundFilters {
                mtls,
                jwt: crate::authn::for_service(service, &self.authns, &s.jwks),
                rbac: crate::authz::for_service(service, &policies, &s.trust_domain, &s.namespace),
                rate_limit: self.rate_limits.get(service).map(|r| local_rate_limit(service, r)),
            };
            let l = proxy_listener(
                &name,
                inbound,
                TrafficDirection::Inbound,
                service,
                protocol,
                self.escaped_slashes(service),
                http,
                names::INBOUND_CLUSTER,
                Some(&filters),
                self.telemetry.for_listener(service, false, service),
            );
            out.insert(name.clone(), Res::new(name, &l));
        }
        // A gateway's spans are named after the gateway.
        let own = reg.service.as_deref().unwrap_or(names::GATEWAY);
        // Explicit upstreams, each on its own local address; a transparent instance's capture
        // listener and a listener per service at its virtual IP (bound to no socket: the
        // capture listener hands connections to it).
        let explicit = reg
            .upstreams
            .iter()
            .map(|u| (u.service.as_str(), names::outbound_listener(&u.service, &u.listen), u.listen.clone(), true));
        let virtuals = reg.capture.iter().flat_map(|_| {
            self.names.iter().filter_map(|service| {
                let vip = *self.settings.vips.get(service)?;
                Some((service.as_str(), names::virtual_listener(service, vip), format!("{vip}:0"), false))
            })
        });
        for (service, name, listen, bind) in explicit.chain(virtuals) {
            // Invariant: the listener names a RouteConfiguration in RDS exactly when RDS serves
            // one of that name. A service nobody declared or registered has none, so its
            // listener carries the same default route inline, to a cluster that does not exist:
            // the proxy answers such requests with a clear error (unknown-cluster) until the
            // service appears. The listener's bytes differ between the two, so creating or
            // deleting the service re-pushes it.
            let http = if self.global[&Type::Route].contains_key(service) {
                HttpRoutes::Rds(service)
            } else {
                HttpRoutes::Inline(Box::new(route_config(service, &[], None, None)))
            };
            let mut l = proxy_listener(
                &name,
                &listen,
                TrafficDirection::Outbound,
                service,
                self.protocol(service),
                self.escaped_slashes(service),
                http,
                service,
                None,
                self.telemetry.for_listener(service, true, own),
            );
            if !bind {
                l.bind_to_port = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
            }
            out.insert(name.clone(), Res::new(name, &l));
        }
        if let Some(capture) = &reg.capture {
            let egress =
                reg.service.as_deref().and_then(|s| self.spec(s)?.egress).unwrap_or(self.settings.defaults.egress);
            let l = capture_listener(capture, egress);
            out.insert(l.name.clone(), Res::new(l.name.clone(), &l));
        }
        out
    }
}

#[cfg(test)]
mod roundtrip;
#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::registry::Upstream;

    fn parse(docs: serde_json::Value) -> BTreeMap<String, Resource> {
        let docs: Vec<serde_json::Value> = serde_json::from_value(docs).unwrap();
        let all = docs.into_iter().enumerate().map(|(i, d)| Resource::from_json(i, d).unwrap());
        all.map(|r| (format!("{:?}/{}", r.kind(), r.name()), r)).collect()
    }

    fn service(name: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": name}, "spec": {}})
    }

    fn instance(id: &str, service: &str, port: u16, upstreams: &[&str]) -> Instance {
        let registration = InstanceRegistration {
            service: Some(service.into()),
            inbound: Some(format!("127.0.0.1:{port}")),
            app: Some(format!("127.0.0.1:{}", port + 1)),
            admin: None,
            labels: Default::default(),
            upstreams: upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| Upstream { service: (*u).into(), listen: format!("127.0.0.1:{}", 9000 + i) })
                .collect(),
            capture: None,
            mesh_gateway_local: None,
            healthy: true,
        };
        Instance { id: id.into(), registration, healthy: true, connected: true }
    }

    /// A sidecar gets the clusters its upstreams reach (the service, its routes' backends and
    /// mirrors) and its app's; not the rest of the mesh, nor so the rest's endpoints.
    #[test]
    fn a_proxy_gets_the_clusters_its_upstreams_reach_and_no_others() {
        let route = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "split"},
            "spec": {"parentRefs": [{"name": "api"}], "rules": [{
                "backendRefs": [{"name": "api-v1", "weight": 90}, {"name": "api-v2", "weight": 10}],
                "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}]
            }]}
        });
        let all = ["api", "api-v1", "api-v2", "shadow", "billing", "web"].map(service);
        let resources = parse(serde_json::json!(all.iter().chain([&route]).collect::<Vec<_>>()));
        let web = instance("web-0", "web", 7000, &["api"]);
        let snapshot = Snapshot::build(&resources, &[&web], &Settings::default(), 1, None);
        let clusters = snapshot.available(Type::Cluster, Some(&web.registration));
        let names: Vec<&str> = clusters.keys().map(String::as_str).collect();
        assert_eq!(names, ["api", "api-v1", "api-v2", names::INBOUND_CLUSTER, "shadow"]);
        // A client that is not a weft sidecar (proxyless gRPC) gets every service's.
        assert_eq!(snapshot.available(Type::Cluster, None).len(), all.len());
    }

    /// A change of instances alone reuses the config stage whole and re-encodes only the
    /// endpoints of the service whose instances changed.
    #[test]
    fn a_registration_re_encodes_only_its_services_endpoints() {
        let resources = parse(serde_json::json!([service("api"), service("web")]));
        let (api, web) = (instance("api-0", "api", 7000, &[]), instance("web-0", "web", 7100, &["api"]));
        let settings = Settings::default();
        let first = Snapshot::build(&resources, &[&api, &web], &settings, 1, None);
        let listeners = first.available(Type::Listener, Some(&web.registration));
        let api2 = instance("api-1", "api", 7200, &[]);
        let second = Snapshot::build(&resources, &[&api, &api2, &web], &settings, 2, Some(&first));
        assert!(Arc::ptr_eq(&first.config, &second.config), "the config stage is shared");
        let again = second.available(Type::Listener, Some(&web.registration));
        assert!(listeners.values().zip(again.values()).all(|(a, b)| Arc::ptr_eq(a, b)), "made once per shape");
        assert!(Arc::ptr_eq(&first.endpoints["web"], &second.endpoints["web"]), "web's are unchanged");
        assert!(!Arc::ptr_eq(&first.endpoints["api"], &second.endpoints["api"]));
        assert_ne!(first.endpoints["api"].version, second.endpoints["api"].version);
        // A change of resources makes the config anew.
        let more = parse(serde_json::json!([service("api"), service("web"), service("billing")]));
        let third = Snapshot::build(&more, &[&api, &api2, &web], &settings, 3, Some(&second));
        assert!(!Arc::ptr_eq(&second.config, &third.config));
        assert!(Arc::ptr_eq(&second.endpoints["api"], &third.endpoints["api"]), "endpoints are still reused");
    }
}
