//! Translation of the mesh state into standard Envoy v3 resources, done once per change.
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
//! inbound listener with the static `inbound|app` cluster, and one outbound listener per upstream.
//!
//! Mutual TLS: a weft proxy's service clusters carry an `UpstreamTlsContext` that expects the
//! service's SPIFFE ID, and its inbound listener a `DownstreamTlsContext` that requires a client
//! certificate; both name the SDS secrets `default` (the proxy's own certificate, which the
//! proxy makes itself) and `ROOTCA`. A strict service's inbound listener has only TLS filter
//! chains, so plaintext matches nothing and is closed; a permissive one has plaintext chains
//! too. Proxyless clients get the clusters without TLS (they reach permissive services).
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, LoadBalancingPolicy, OutlierDetection as EnvoyOutlierDetection, circuit_breakers,
    cluster, load_balancing_policy,
};
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, Metadata, SocketAddress,
    TrafficDirection, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as CoreHeaderValue, HeaderValueOption, header_value_option,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy as EnvoyRetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher,
    redirect_action, retry_policy, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager,
    http_connection_manager::PathWithEscapedSlashesAction, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
use envoy_types::pb::envoy::extensions::load_balancing_policies::random::v3::Random;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context, secret, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, Percent, TokenBucket as EnvoyTokenBucket, fractional_percent,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Struct, UInt32Value, UInt64Value, Value, value};
use prost::{Message, Name};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use weft_api::identity::{CERT_SECRET, ROOT_SECRET, spiffe_id};
use weft_api::names;
use weft_api::registry::InstanceRegistration;
use weft_api::resource::{ActiveHealthCheck, DEFAULT_HEALTH_CHECK_INTERVAL, DEFAULT_HEALTH_CHECK_TIMEOUT};
use weft_api::resource::{
    AuthorizationPolicySpec, ConsistentHash, DEFAULT_BASE_EJECTION_TIME, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONSECUTIVE_5XX, DEFAULT_MAX_EJECTION_PERCENT, DEFAULT_MAX_EJECTION_TIME, DEFAULT_PANIC_THRESHOLD,
    DEFAULT_RETRY_ON, EscapedSlashes, FaultInjection, HeaderMatchType, HttpRouteMatch, HttpRouteRule, JwksSource,
    LoadBalancer, MtlsMode, Object, OutlierDetection, PathMatchType, PathModifierType, Protocol, RateLimitPolicy,
    RequestAuthenticationSpec, Resource, RetryPolicy, ServiceSpec, TokenBucket, TrafficPolicySpec, percent_per_million,
};
use weft_api::resource::{DEFAULT_MIN_RETRIES_PER_SECOND, DEFAULT_RETRY_BUDGET_TTL};
use weft_api::{Instance, ServiceSummary};

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

/// Mesh-wide security settings the translation needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Every root proxies trust (PEM), the signing one first.
    pub bundle: String,
    pub default_mtls: MtlsMode,
    pub trust_domain: String,
    pub namespace: String,
    /// Issuers' keys, by where they are read from.
    pub jwks: BTreeMap<JwksSource, Arc<str>>,
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
}

impl NodeShape {
    fn of(reg: &InstanceRegistration) -> NodeShape {
        NodeShape {
            service: reg.service.clone(),
            inbound: reg.inbound.clone(),
            app: reg.app.clone(),
            upstreams: reg.upstreams.iter().map(|u| (u.service.clone(), u.listen.clone())).collect(),
        }
    }
}

struct NodeResources {
    listeners: ResMap,
    clusters: ResMap,
}

/// Node shapes a config keeps made resources for; past it (proxies come and go with new
/// addresses), it starts over.
const MAX_NODE_SHAPES: usize = 100_000;

/// What a service's inbound listeners check before the app: JWT, then authorization.
struct InboundFilters {
    mtls: MtlsMode,
    jwt: Option<crate::authn::ServiceJwt>,
    rbac: crate::authz::ServiceRbac,
    rate_limit: Option<LocalRateLimit>,
}

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
        let mut names: Vec<String> = declared.chain(instances.keys().copied()).map(str::to_owned).collect();
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
            let made_of = endpoints_made_of(&members);
            let res = snapshot.endpoint(previous, name, None, made_of, &members);
            snapshot.endpoints.insert(name.clone(), res);
            if spec.locality.as_ref().is_some_and(|l| l.prefer_same_zone) {
                for zone in &zones {
                    let res = snapshot.endpoint(previous, name, Some(zone), made_of, &members);
                    snapshot.zonal_endpoints.insert((name.clone(), (*zone).to_owned()), res);
                }
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
    ) -> Arc<Res> {
        let key = (name.to_owned(), zone.map(str::to_owned));
        let reused = previous.filter(|p| p.endpoint_inputs.get(&key) == Some(&made_of)).and_then(|p| match zone {
            None => p.endpoints.get(name).cloned(),
            Some(z) => p.zonal_endpoints.get(&(name.to_owned(), z.to_owned())).cloned(),
        });
        self.endpoint_inputs.insert(key, made_of);
        reused.unwrap_or_else(|| Res::new(name.to_owned(), &load_assignment(name, members, zone)))
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
/// and whether it serves, in order.
fn endpoints_made_of(members: &[&Instance]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for i in members {
        (&i.id, &i.registration.inbound, &i.registration.labels, i.serving()).hash(&mut h);
    }
    h.finish()
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
            }
        }
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
        put(Type::Secret, Res::new(ROOT_SECRET.to_owned(), &root_secret(&settings.bundle)));
        let mut mesh_clusters = ResMap::new();
        let mut reach = HashMap::new();
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
                    r.rules.iter().map(move |rule| (r.hostnames.as_slice(), (rule, policy)))
                })
                .collect();
            let backends = rules.iter().flat_map(|(_, (rule, _))| {
                let mirrors = rule.filters.iter().filter_map(|f| f.request_mirror.as_ref());
                rule.backend_refs.iter().map(|b| &b.name).chain(mirrors.map(|m| &m.backend_ref.name))
            });
            reach.insert(name.clone(), std::iter::once(name).chain(backends).cloned().collect());
            let policy = traffic.get(name.as_str()).copied();
            let mut cluster = eds_cluster(name, spec, policy, route_retries.contains(name.as_str()));
            put(Type::Cluster, Res::new(name.clone(), &cluster));
            let identity = spiffe_id(&settings.trust_domain, &settings.namespace, identity_of);
            cluster.transport_socket = Some(tls_socket(&upstream_tls(&identity)));
            mesh_clusters.insert(name.clone(), Res::new(name.clone(), &cluster));
            let hash = spec.consistent_hash.as_ref().filter(|_| spec.load_balancer.is_consistent_hash());
            put(Type::Route, Res::new(name.clone(), &route_config(name, &rules, policy, hash)));
            put(Type::Listener, Res::new(name.clone(), &api_listener(name)));
        }
        let rate_limits = traffic
            .iter()
            .filter_map(|(name, p)| Some(((*name).to_owned(), p.rate_limit.as_deref()?.clone())))
            .collect();
        Config {
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
        self.spec(service).and_then(|s| s.mtls).unwrap_or(self.settings.default_mtls)
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
    fn node_clusters(&self, reg: &InstanceRegistration) -> ResMap {
        let reachable = reg.upstreams.iter().flat_map(|u| self.reach.get(&u.service).into_iter().flatten());
        let mut all: ResMap = reachable.filter_map(|c| Some((c.clone(), self.mesh_clusters.get(c)?.clone()))).collect();
        if let Some(app) = &reg.app {
            let protocol = reg.service.as_deref().map(|s| self.protocol(s)).unwrap_or_default();
            let c = static_cluster(names::INBOUND_CLUSTER, app, protocol);
            all.insert(names::INBOUND_CLUSTER.to_owned(), Res::new(names::INBOUND_CLUSTER.to_owned(), &c));
        }
        all
    }

    fn node_listeners(&self, reg: &InstanceRegistration) -> ResMap {
        let mut out = ResMap::new();
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
            );
            out.insert(name.clone(), Res::new(name, &l));
        }
        for up in &reg.upstreams {
            let name = names::outbound_listener(&up.service, &up.listen);
            // Invariant: the listener names a RouteConfiguration in RDS exactly when RDS serves
            // one of that name. A service nobody declared or registered has none, so its
            // listener carries the same default route inline, to a cluster that does not exist:
            // the proxy answers such requests with a clear error (unknown-cluster) until the
            // service appears. The listener's bytes differ between the two, so creating or
            // deleting the service re-pushes it.
            let http = if self.global[&Type::Route].contains_key(&up.service) {
                HttpRoutes::Rds(&up.service)
            } else {
                HttpRoutes::Inline(Box::new(route_config(&up.service, &[], None, None)))
            };
            let l = proxy_listener(
                &name,
                &up.listen,
                TrafficDirection::Outbound,
                &up.service,
                self.protocol(&up.service),
                self.escaped_slashes(&up.service),
                http,
                &up.service,
                None,
            );
            out.insert(name.clone(), Res::new(name, &l));
        }
        out
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn socket_address(addr: &str) -> Address {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.parse().unwrap_or(0))),
            ..Default::default()
        })),
    }
}

fn duration(d: std::time::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// The load balancer as an ordered `load_balancing_policy` list: a client uses the first
/// policy it supports. weft's proxy reads least_request (two choices) as P2C peak-EWMA;
/// gRPC clients that lack least_request fall back to round_robin.
fn load_balancing_policy(lb: LoadBalancer) -> LoadBalancingPolicy {
    let policy = |name: &str, any: Any| load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig { name: name.to_owned(), typed_config: Some(any) }),
    };
    let round_robin =
        policy("envoy.load_balancing_policies.round_robin", envoy_types::util::pack_any(RoundRobin::default()));
    let ring_hash =
        || policy("envoy.load_balancing_policies.ring_hash", envoy_types::util::pack_any(RingHash::default()));
    let policies = match lb {
        LoadBalancer::P2cEwma => {
            let lr = LeastRequest { choice_count: Some(UInt32Value { value: 2 }), ..Default::default() };
            vec![policy("envoy.load_balancing_policies.least_request", envoy_types::util::pack_any(lr)), round_robin]
        }
        LoadBalancer::RoundRobin => vec![round_robin],
        LoadBalancer::Random => {
            vec![
                policy("envoy.load_balancing_policies.random", envoy_types::util::pack_any(Random::default())),
                round_robin,
            ]
        }
        LoadBalancer::RingHash => vec![ring_hash()],
        // gRPC clients lack Maglev: they hash on a ring.
        LoadBalancer::Maglev => {
            vec![
                policy("envoy.load_balancing_policies.maglev", envoy_types::util::pack_any(Maglev::default())),
                ring_hash(),
            ]
        }
    };
    LoadBalancingPolicy { policies }
}

/// A TrafficPolicy's retries as Envoy's route retry policy.
fn retry_policy(r: &RetryPolicy) -> EnvoyRetryPolicy {
    let on: Vec<&str> =
        if r.retry_on.is_empty() { DEFAULT_RETRY_ON.to_vec() } else { r.retry_on.iter().map(String::as_str).collect() };
    let base = r.backoff.as_ref().and_then(|b| b.base_interval).unwrap_or(std::time::Duration::from_millis(25));
    let max = r.backoff.as_ref().and_then(|b| b.max_interval).unwrap_or(base * 10);
    EnvoyRetryPolicy {
        retry_on: on.join(","),
        num_retries: Some(UInt32Value { value: r.attempts.unwrap_or(2) }),
        per_try_timeout: r.per_try_timeout.map(duration),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(duration(base)),
            max_interval: Some(duration(max)),
        }),
        ..Default::default()
    }
}

/// A consistent-hash key as the route's hash policy.
fn hash_policy(h: &ConsistentHash) -> route_action::HashPolicy {
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier};
    let specifier = match (&h.header, &h.cookie) {
        (Some(name), _) => {
            PolicySpecifier::Header(Header { header_name: name.to_ascii_lowercase(), ..Default::default() })
        }
        (None, Some(name)) => PolicySpecifier::Cookie(Cookie { name: name.clone(), ..Default::default() }),
        (None, None) => PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true }),
    };
    route_action::HashPolicy { policy_specifier: Some(specifier), terminal: false }
}

const FAULT_FILTER: &str = "envoy.filters.http.fault";
const RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";

/// A TrafficPolicy's rate limits as Envoy's local rate limit filter: the service-wide bucket
/// is the filter's own, the per-caller one a descriptor; with only a per-caller limit the
/// filter's bucket (which Envoy requires) is never consumed.
fn local_rate_limit(service: &str, r: &RateLimitPolicy) -> LocalRateLimit {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{LocalRateLimitDescriptor, rate_limit_descriptor};
    let bucket = |b: &TokenBucket| EnvoyTokenBucket {
        max_tokens: b.burst.unwrap_or(b.requests),
        tokens_per_fill: Some(UInt32Value { value: b.requests }),
        fill_interval: Some(duration(b.interval.unwrap_or(std::time::Duration::from_secs(1)))),
    };
    let always = RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: fractional_percent::DenominatorType::Hundred as i32,
        }),
        ..Default::default()
    };
    LocalRateLimit {
        stat_prefix: service.to_owned(),
        token_bucket: r.service.as_ref().or(r.per_caller.as_ref()).map(bucket),
        filter_enabled: Some(always.clone()),
        filter_enforced: Some(always),
        descriptors: r
            .per_caller
            .as_ref()
            .map(|b| LocalRateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry {
                    key: names::CALLER_DESCRIPTOR.to_owned(),
                    value: String::new(),
                }],
                token_bucket: Some(bucket(b)),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        always_consume_default_token_bucket: Some(BoolValue { value: r.service.is_some() }),
        rate_limited_as_resource_exhausted: true,
        ..Default::default()
    }
}

/// A TrafficPolicy's faults as the fault filter's per-route config.
fn http_fault(f: &FaultInjection) -> HttpFault {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, fault_abort};
    let share = |p: Option<f64>| FractionalPercent {
        numerator: percent_per_million(p),
        denominator: fractional_percent::DenominatorType::Million as i32,
    };
    HttpFault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(duration(d.fixed_delay))),
            percentage: Some(share(d.percentage)),
        }),
        abort: f.abort.as_ref().map(|a| FaultAbort {
            error_type: Some(match (a.grpc_status, a.http_status) {
                (Some(g), _) => fault_abort::ErrorType::GrpcStatus(g),
                (None, s) => fault_abort::ErrorType::HttpStatus(u32::from(s.unwrap_or(503))),
            }),
            percentage: Some(share(a.percentage)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A TrafficPolicy's active health check as Envoy's.
fn health_check(h: &ActiveHealthCheck) -> envoy_types::pb::envoy::config::core::v3::HealthCheck {
    use envoy_types::pb::envoy::config::core::v3::health_check;
    let n = |value: u32| Some(UInt32Value { value });
    let checker = match &h.http {
        Some(http) => health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            path: http.path.clone(),
            ..Default::default()
        }),
        None => health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck::default()),
    };
    envoy_types::pb::envoy::config::core::v3::HealthCheck {
        timeout: Some(duration(h.timeout.unwrap_or(DEFAULT_HEALTH_CHECK_TIMEOUT))),
        interval: Some(duration(h.interval.unwrap_or(DEFAULT_HEALTH_CHECK_INTERVAL))),
        unhealthy_threshold: n(h.unhealthy_threshold.unwrap_or(2)),
        healthy_threshold: n(h.healthy_threshold.unwrap_or(1)),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// A TrafficPolicy's outlier detection as Envoy's: consecutive 5xx (on unless 0) and
/// consecutive gateway failures (on when set) enforced every time.
fn outlier_detection(od: &OutlierDetection) -> EnvoyOutlierDetection {
    let n = |value: u32| Some(UInt32Value { value });
    let five_xx = od.consecutive_5xx.unwrap_or(DEFAULT_CONSECUTIVE_5XX);
    let base = od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME);
    EnvoyOutlierDetection {
        consecutive_5xx: n(five_xx.max(1)),
        enforcing_consecutive_5xx: n(if five_xx == 0 { 0 } else { 100 }),
        consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(n),
        enforcing_consecutive_gateway_failure: n(if od.consecutive_gateway_errors.is_some() { 100 } else { 0 }),
        base_ejection_time: Some(duration(base)),
        max_ejection_time: Some(duration(od.max_ejection_time.unwrap_or(DEFAULT_MAX_EJECTION_TIME.max(base)))),
        max_ejection_percent: n(od.max_ejection_percent.unwrap_or(DEFAULT_MAX_EJECTION_PERCENT)),
        // Success-rate and failure-percentage ejection are not offered: off.
        enforcing_success_rate: n(0),
        ..Default::default()
    }
}

/// A retry budget's defaults (Envoy's budget, when a `TrafficPolicy` names none): retries in
/// flight may be 20% of the requests in flight, or 10, whichever is more. Envoy's own default
/// without a budget, 3 retries in flight, turned retries down under a handful of concurrent
/// clients.
const DEFAULT_RETRY_BUDGET_PERCENT: f64 = 20.0;
const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 10;

/// The cluster of a service; `retried`: some route's own policy retries requests to it.
fn eds_cluster(name: &str, spec: &ServiceSpec, policy: Option<&TrafficPolicySpec>, retried: bool) -> Cluster {
    let max_requests = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|p| p.max_requests);
    let per_instance = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|p| p.max_connections_per_instance);
    let pending = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|p| p.max_pending_requests);
    let retry = policy.and_then(|p| p.retry.as_ref());
    let budget = retry.and_then(|r| r.budget.as_ref());
    // A ratio budget (Linkerd's) has no Envoy field: it travels in the cluster's metadata.
    let ratio_budget = budget.filter(|b| b.ratio.is_some());
    // Otherwise retried requests get Envoy's budget, with weft's defaults for what is unset.
    let budget = (ratio_budget.is_none() && (retry.is_some() || retried)).then(|| {
        let b = budget.cloned().unwrap_or_default();
        (
            b.percent.unwrap_or(DEFAULT_RETRY_BUDGET_PERCENT),
            b.min_retry_concurrency.unwrap_or(DEFAULT_MIN_RETRY_CONCURRENCY),
        )
    });
    let limited = max_requests.is_some() || budget.is_some() || per_instance.is_some();
    let circuit_breakers = limited.then(|| CircuitBreakers {
        per_host_thresholds: per_instance
            .map(|value| circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value }),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        thresholds: vec![circuit_breakers::Thresholds {
            max_pending_requests: per_instance.map(|_| UInt32Value { value: pending.unwrap_or(1024) }),
            max_requests: max_requests.map(|value| UInt32Value { value }),
            retry_budget: budget.map(|(percent, min)| circuit_breakers::thresholds::RetryBudget {
                budget_percent: Some(Percent { value: percent }),
                min_retry_concurrency: Some(UInt32Value { value: min }),
                ..Default::default()
            }),
            ..Default::default()
        }],
    });
    let outlier = policy.and_then(|p| p.outlier_detection.as_deref());
    let health_checks = policy.and_then(|p| p.health_check.as_deref()).map(health_check).into_iter().collect();
    let pool = policy.and_then(|p| p.connection_pool.as_ref());
    Cluster {
        metadata: ratio_budget.map(ratio_budget_metadata),
        typed_extension_protocol_options: pool.map(pool_protocol_options).unwrap_or_default(),
        health_checks,
        circuit_breakers,
        outlier_detection: outlier.map(outlier_detection),
        common_lb_config: outlier.map(|od| cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent {
                value: f64::from(od.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD)),
            }),
            ..Default::default()
        }),
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: Some(ads()), service_name: String::new() }),
        connect_timeout: Some(duration(spec.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT))),
        load_balancing_policy: Some(load_balancing_policy(spec.load_balancer)),
        ..Default::default()
    }
}

/// A ratio retry budget as the cluster's `weft` metadata: `retry_budget` with `ratio`,
/// `min_retries_per_second` and `ttl_seconds`.
fn ratio_budget_metadata(b: &weft_api::resource::RetryBudget) -> envoy_types::pb::envoy::config::core::v3::Metadata {
    let number = |n: f64| Value { kind: Some(value::Kind::NumberValue(n)) };
    let budget = Struct {
        fields: [
            ("ratio".to_owned(), number(b.ratio.unwrap_or(0.2))),
            (
                "min_retries_per_second".to_owned(),
                number(f64::from(b.min_retries_per_second.unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND))),
            ),
            ("ttl_seconds".to_owned(), number(b.ttl.unwrap_or(DEFAULT_RETRY_BUDGET_TTL).as_secs_f64())),
        ]
        .into(),
    };
    let weft =
        Struct { fields: [("retry_budget".to_owned(), Value { kind: Some(value::Kind::StructValue(budget)) })].into() };
    envoy_types::pb::envoy::config::core::v3::Metadata {
        filter_metadata: [(names::ENDPOINT_METADATA_NAMESPACE.to_owned(), weft)].into(),
        ..Default::default()
    }
}

/// Connection limits of a TrafficPolicy as the cluster's HTTP protocol options (the callee's
/// sidecar is spoken to in the client's HTTP version).
fn pool_protocol_options(pool: &weft_api::resource::ConnectionPool) -> HashMap<String, Any> {
    use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as CommonHttpProtocolOptions;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
    if pool.max_requests_per_connection.is_none()
        && pool.idle_timeout.is_none()
        && pool.max_connection_duration.is_none()
    {
        return HashMap::new();
    }
    let options = HttpProtocolOptions {
        common_http_protocol_options: Some(CommonHttpProtocolOptions {
            idle_timeout: pool.idle_timeout.map(duration),
            max_connection_duration: pool.max_connection_duration.map(duration),
            max_requests_per_connection: pool.max_requests_per_connection.map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            Default::default(),
        )),
        ..Default::default()
    };
    HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        envoy_types::util::pack_any(options),
    )])
}

/// The HTTP version a sidecar speaks to its app: the one the service declares (`http`:
/// HTTP/1.1; `http2`, `grpc`: HTTP/2), whatever its clients speak; otherwise the client's.
fn app_protocol_options(protocol: Protocol) -> HashMap<String, Any> {
    use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    let config = match protocol {
        Protocol::Http => ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default()),
        Protocol::Http2 | Protocol::Grpc => ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()),
        Protocol::Auto | Protocol::Tcp => return HashMap::new(),
    };
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig { protocol_config: Some(config) },
        )),
        ..Default::default()
    };
    HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        envoy_types::util::pack_any(options),
    )])
}

fn static_cluster(name: &str, addr: &str, protocol: Protocol) -> Cluster {
    let endpoint = lb_endpoint(addr, HealthStatus::Healthy, None);
    Cluster {
        typed_extension_protocol_options: app_protocol_options(protocol),
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32)),
        connect_timeout: Some(duration(DEFAULT_CONNECT_TIMEOUT)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint],
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(value::Kind::StringValue(s.to_owned())) }
}

fn lb_endpoint(addr: &str, health: HealthStatus, instance: Option<&Instance>) -> LbEndpoint {
    let metadata = instance.map(|i| {
        let mut fields: HashMap<String, Value> =
            i.registration.labels.iter().map(|(k, v)| (k.clone(), string_value(v))).collect();
        fields.insert("instance".to_owned(), string_value(&i.id));
        Metadata {
            filter_metadata: HashMap::from([(names::ENDPOINT_METADATA_NAMESPACE.to_owned(), Struct { fields })]),
            ..Default::default()
        }
    });
    LbEndpoint {
        health_status: health as i32,
        metadata,
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(addr)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The instances of a service by zone; `near` (a caller's zone) puts that zone's at priority 0
/// and the others at 1, which clients treat as a failover order.
fn load_assignment(name: &str, members: &[&Instance], near: Option<&str>) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for i in members {
        let Some(addr) = &i.registration.inbound else { continue };
        let health = if i.serving() { HealthStatus::Healthy } else { HealthStatus::Unhealthy };
        let zone = i.registration.labels.get("zone").map(String::as_str).unwrap_or("");
        by_zone.entry(zone).or_default().push(lb_endpoint(addr, health, Some(i)));
    }
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: by_zone
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality { zone: zone.to_owned(), ..Default::default() }),
                lb_endpoints,
                // gRPC clients ignore localities without a weight.
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                priority: u32::from(near.is_some_and(|n| n != zone)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A rule of an HTTPRoute with the route's hostnames (empty: any host).
type HostRule<'a> = (&'a [String], PolicedRule<'a>);

/// A rule with the TrafficPolicy that targets its HTTPRoute, if any.
type PolicedRule<'a> = (&'a HttpRouteRule, Option<&'a TrafficPolicySpec>);

/// Gateway API precedence (HTTPRouteRule): exact paths, then regular expressions (their place
/// is implementation-specific in the spec; after prefixes, a catch-all `/` would hide them),
/// then prefixes, longer first; then a method match, then more header matches, then more
/// query parameter matches; ties keep the order in which rules were applied.
fn precedence(m: &HttpRouteMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(p) if p.kind == PathMatchType::Exact => (0, p.value.len()),
        Some(p) if p.kind == PathMatchType::RegularExpression => (1, p.value.len()),
        Some(p) => (2, p.value.len()),
        None => (2, 1),
    };
    (kind, usize::MAX - len, m.method.is_none(), usize::MAX - m.headers.len(), usize::MAX - m.query_params.len())
}

fn string_match(kind: HeaderMatchType, value: &str) -> StringMatcher {
    let pattern = match kind {
        HeaderMatchType::Exact => string_matcher::MatchPattern::Exact(value.to_owned()),
        HeaderMatchType::RegularExpression => string_matcher::MatchPattern::SafeRegex(regex(value)),
    };
    StringMatcher { match_pattern: Some(pattern), ..Default::default() }
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher { regex: pattern.to_owned(), ..Default::default() }
}

fn header_options(
    headers: &[weft_api::resource::HeaderValue],
    action: header_value_option::HeaderAppendAction,
) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .map(|h| HeaderValueOption {
            header: Some(CoreHeaderValue {
                key: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        })
        .collect()
}

/// A rule's filters on a route: header modifiers on the route, rewrites on its action.
fn apply_filters(route: &mut Route, rule: &HttpRouteRule) {
    use header_value_option::HeaderAppendAction::{AppendIfExistsOrAdd, OverwriteIfExistsOrAdd};
    for f in &rule.filters {
        if let Some(m) = &f.request_header_modifier {
            route.request_headers_to_add.extend(header_options(&m.set, OverwriteIfExistsOrAdd));
            route.request_headers_to_add.extend(header_options(&m.add, AppendIfExistsOrAdd));
            route.request_headers_to_remove.extend(m.remove.iter().map(|n| n.to_ascii_lowercase()));
        }
        if let Some(m) = &f.response_header_modifier {
            route.response_headers_to_add.extend(header_options(&m.set, OverwriteIfExistsOrAdd));
            route.response_headers_to_add.extend(header_options(&m.add, AppendIfExistsOrAdd));
            route.response_headers_to_remove.extend(m.remove.iter().map(|n| n.to_ascii_lowercase()));
        }
        if let (Some(m), Some(route::Action::Route(action))) = (&f.request_mirror, &mut route.action) {
            action.request_mirror_policies.push(route_action::RequestMirrorPolicy {
                cluster: m.backend_ref.name.clone(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent {
                        numerator: m.per_million(),
                        denominator: fractional_percent::DenominatorType::Million as i32,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if let (Some(u), Some(route::Action::Route(action))) = (&f.url_rewrite, &mut route.action) {
            if let Some(h) = &u.hostname {
                action.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h.clone()));
            }
            match u.path.as_ref().map(|p| (p.kind, p.replace_full_path.as_deref(), p.replace_prefix_match.as_deref())) {
                Some((PathModifierType::ReplacePrefixMatch, _, Some(to))) => action.prefix_rewrite = to.to_owned(),
                Some((PathModifierType::ReplaceFullPath, Some(to), _)) => {
                    action.regex_rewrite =
                        Some(RegexMatchAndSubstitute { pattern: Some(regex("^/.*$")), substitution: to.to_owned() });
                }
                _ => {}
            }
        }
    }
}

fn route_action(rule: &HttpRouteRule) -> route::Action {
    if let Some(r) = rule.filters.iter().find_map(|f| f.request_redirect.as_ref()) {
        return route::Action::Redirect(redirect_action(r));
    }
    let specifier = if rule.backend_refs.len() == 1 {
        route_action::ClusterSpecifier::Cluster(rule.backend_refs[0].name.clone())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: rule
                .backend_refs
                .iter()
                .filter(|b| b.weight > 0)
                .map(|b| weighted_cluster::ClusterWeight {
                    name: b.name.clone(),
                    weight: Some(UInt32Value { value: b.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let timeout = rule.timeouts.as_ref().and_then(|t| t.effective()).filter(|t| !t.is_zero()).map(duration);
    route::Action::Route(RouteAction { cluster_specifier: Some(specifier), timeout, ..Default::default() })
}

fn redirect_action(r: &weft_api::resource::RequestRedirect) -> RedirectAction {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let code = match r.status_code.unwrap_or(302) {
        301 => RedirectResponseCode::MovedPermanently,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::Found,
    };
    let path = r.path.as_ref().and_then(|p| match p.kind {
        PathModifierType::ReplaceFullPath => p.replace_full_path.clone().map(PathRewriteSpecifier::PathRedirect),
        PathModifierType::ReplacePrefixMatch => p.replace_prefix_match.clone().map(PathRewriteSpecifier::PrefixRewrite),
    });
    RedirectAction {
        scheme_rewrite_specifier: r.scheme.clone().map(SchemeRewriteSpecifier::SchemeRedirect),
        host_redirect: r.hostname.clone().unwrap_or_default(),
        port_redirect: r.port.map_or(0, u32::from),
        path_rewrite_specifier: path,
        response_code: code as i32,
        ..Default::default()
    }
}

fn exact_header(value: &str) -> header_matcher::HeaderMatchSpecifier {
    header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_owned())),
        ..Default::default()
    })
}

fn default_route(cluster: &str) -> Route {
    Route {
        name: "default".to_owned(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The routes of the rules given, in Gateway API precedence, then the service's default route.
fn routes(service: &str, rules: &[PolicedRule<'_>]) -> Vec<Route> {
    let mut matched: Vec<(&HttpRouteMatch, &HttpRouteRule, Option<&TrafficPolicySpec>)> = Vec::new();
    let always = HttpRouteMatch::default();
    for (rule, policy) in rules {
        if rule.matches.is_empty() {
            matched.push((&always, rule, *policy));
        }
        matched.extend(rule.matches.iter().map(|m| (m, *rule, *policy)));
    }
    matched.sort_by_key(|(m, _, _)| precedence(m));
    let mut routes: Vec<Route> = matched
        .into_iter()
        .map(|(m, rule, policy)| {
            let path = match &m.path {
                Some(p) if p.kind == PathMatchType::Exact => route_match::PathSpecifier::Path(p.value.clone()),
                Some(p) if p.kind == PathMatchType::RegularExpression => {
                    route_match::PathSpecifier::SafeRegex(regex(&p.value))
                }
                Some(p) => route_match::PathSpecifier::Prefix(p.value.clone()),
                None => route_match::PathSpecifier::Prefix("/".to_owned()),
            };
            let mut headers: Vec<HeaderMatcher> = m
                .headers
                .iter()
                .map(|h| HeaderMatcher {
                    name: h.name.to_ascii_lowercase(),
                    header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(string_match(
                        h.kind, &h.value,
                    ))),
                    ..Default::default()
                })
                .collect();
            if let Some(method) = &m.method {
                headers.push(HeaderMatcher {
                    name: ":method".to_owned(),
                    header_match_specifier: Some(exact_header(method)),
                    ..Default::default()
                });
            }
            let query_parameters = m
                .query_params
                .iter()
                .map(|q| QueryParameterMatcher {
                    name: q.name.clone(),
                    query_parameter_match_specifier: Some(
                        query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_match(
                            q.kind, &q.value,
                        )),
                    ),
                })
                .collect();
            let mut route = Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(path),
                    headers,
                    query_parameters,
                    ..Default::default()
                }),
                action: Some(route_action(rule)),
                ..Default::default()
            };
            apply_filters(&mut route, rule);
            if let Some(p) = policy {
                apply_policy(&mut route, p);
            }
            route
        })
        .collect();
    routes.push(default_route(service));
    routes
}

/// A TrafficPolicy's per-request settings on a route: retries and faults, where the route
/// has none yet (a policy for its HTTPRoute is applied before the service's).
fn apply_policy(route: &mut Route, p: &TrafficPolicySpec) {
    let Some(route::Action::Route(action)) = &mut route.action else { return };
    if action.retry_policy.is_none()
        && let Some(r) = &p.retry
    {
        action.retry_policy = Some(retry_policy(r));
        route.request_body_buffer_limit = r.max_body_bytes.map(|b| UInt64Value { value: u64::from(b) });
    }
    if let Some(f) = p.fault.as_deref()
        && !route.typed_per_filter_config.contains_key(FAULT_FILTER)
    {
        route.typed_per_filter_config.insert(FAULT_FILTER.to_owned(), envoy_types::util::pack_any(http_fault(f)));
    }
}

/// A service's route table: a virtual host per hostname that routes name (their rules, then
/// the rules of routes without hostnames), and a `*` host for every other request.
fn route_config(
    service: &str,
    rules: &[HostRule<'_>],
    policy: Option<&TrafficPolicySpec>,
    hash: Option<&ConsistentHash>,
) -> RouteConfiguration {
    let mut hostnames: Vec<&String> = rules.iter().flat_map(|(h, _)| h.iter()).collect();
    hostnames.sort();
    hostnames.dedup();
    let any_host: Vec<PolicedRule<'_>> = rules.iter().filter(|(h, _)| h.is_empty()).map(|(_, r)| *r).collect();
    let mut virtual_hosts: Vec<VirtualHost> = hostnames
        .into_iter()
        .map(|host| {
            let named: Vec<PolicedRule<'_>> = rules
                .iter()
                .filter(|(h, _)| h.contains(host))
                .map(|(_, r)| *r)
                .chain(any_host.iter().copied())
                .collect();
            VirtualHost {
                name: format!("{service}|{host}"),
                domains: vec![host.clone()],
                routes: routes(service, &named),
                ..Default::default()
            }
        })
        .collect();
    virtual_hosts.push(VirtualHost {
        name: service.to_owned(),
        domains: vec!["*".to_owned()],
        routes: routes(service, &any_host),
        ..Default::default()
    });
    // Every request addressed to the service gets its retries and faults, whichever version
    // serves it, unless a policy for the rule's HTTPRoute set them.
    let hash_policy: Vec<route_action::HashPolicy> = hash.map(hash_policy).into_iter().collect();
    for route in virtual_hosts.iter_mut().flat_map(|v| v.routes.iter_mut()) {
        if let Some(p) = policy {
            apply_policy(route, p);
        }
        if let Some(route::Action::Route(action)) = &mut route.action {
            action.hash_policy.clone_from(&hash_policy);
        }
    }
    RouteConfiguration { name: service.to_owned(), virtual_hosts, ..Default::default() }
}

fn inbound_route() -> RouteConfiguration {
    RouteConfiguration {
        name: names::INBOUND_ROUTE.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: names::INBOUND_ROUTE.to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![default_route(names::INBOUND_CLUSTER)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

enum HttpRoutes<'a> {
    Rds(&'a str),
    Inline(Box<RouteConfiguration>),
}

fn http_connection_manager(stat_prefix: &str, routes: HttpRoutes<'_>) -> HttpConnectionManager {
    let route_specifier = match routes {
        HttpRoutes::Rds(name) => http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_owned(),
        }),
        HttpRoutes::Inline(rc) => http_connection_manager::RouteSpecifier::RouteConfig(*rc),
    };
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        route_specifier: Some(route_specifier),
        http_filters: vec![
            // Configured per route, where a TrafficPolicy injects faults.
            HttpFilter {
                name: FAULT_FILTER.to_owned(),
                config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(
                    HttpFault::default(),
                ))),
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.router".to_owned(),
                config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(Router::default()))),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn api_listener(service: &str) -> Listener {
    let hcm = http_connection_manager(service, HttpRoutes::Rds(service));
    Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener { api_listener: Some(envoy_types::util::pack_any(hcm)) }),
        ..Default::default()
    }
}

/// A listener with protocol detection: an HTTP filter chain matched on the detected
/// application protocol, and an opaque TCP chain for everything else. A declared protocol
/// keeps only the chain that applies.
///
/// `service` is the service whose traffic the listener carries (the proxy's own for inbound):
/// it is the filters' `stat_prefix`, which proxies use to label metrics.
///
/// `inbound` (inbound listeners): the chains are matched on `transport_protocol: tls` and
/// terminate mutual TLS, and in permissive mode the plaintext chains follow them; the HTTP
/// chain checks JWTs, then every chain authorizes. A service that requires a JWT has no TCP
/// chain: a connection that is not HTTP could not carry one.
#[allow(clippy::too_many_arguments)]
fn proxy_listener(
    name: &str,
    addr: &str,
    direction: TrafficDirection,
    service: &str,
    protocol: Protocol,
    slashes: EscapedSlashes,
    http: HttpRoutes<'_>,
    tcp_cluster: &str,
    inbound: Option<&InboundFilters>,
) -> Listener {
    let mut plain = Vec::new();
    let rbac = inbound.map(|f| &f.rbac).filter(|r| !r.is_empty());
    let jwt = inbound.and_then(|f| f.jwt.as_ref());
    if protocol != Protocol::Tcp {
        let mut hcm = http_connection_manager(service, http);
        // Paths are normalised before routing and authorization, as Istio's default does.
        hcm.normalize_path = Some(BoolValue { value: true });
        hcm.merge_slashes = true;
        hcm.path_with_escaped_slashes_action = match slashes {
            EscapedSlashes::Keep => PathWithEscapedSlashesAction::KeepUnchanged,
            EscapedSlashes::Decode => PathWithEscapedSlashesAction::UnescapeAndForward,
            EscapedSlashes::Reject => PathWithEscapedSlashesAction::RejectRequest,
        } as i32;
        let jwt_filter = jwt.map(|j| HttpFilter {
            name: "envoy.filters.http.jwt_authn".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(j.filter.clone()))),
            ..Default::default()
        });
        let rbac_filters = rbac.map(|r| r.http()).unwrap_or_default().into_iter().map(|f| HttpFilter {
            name: "envoy.filters.http.rbac".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(f))),
            ..Default::default()
        });
        let rate_limit = inbound.and_then(|f| f.rate_limit.as_ref()).map(|r| HttpFilter {
            name: RATE_LIMIT_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(r.clone()))),
            ..Default::default()
        });
        hcm.http_filters.splice(0..0, jwt_filter.into_iter().chain(rbac_filters).chain(rate_limit));
        plain.push(FilterChain {
            name: "http".to_owned(),
            filter_chain_match: (protocol == Protocol::Auto).then(|| FilterChainMatch {
                application_protocols: vec!["http/1.1".to_owned(), "h2c".to_owned()],
                ..Default::default()
            }),
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(hcm))),
            }],
            ..Default::default()
        });
    }
    if matches!(protocol, Protocol::Auto | Protocol::Tcp) && !jwt.is_some_and(|j| j.required) {
        let tcp = TcpProxy {
            stat_prefix: service.to_owned(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(tcp_cluster.to_owned())),
            ..Default::default()
        };
        let mut filters: Vec<Filter> = rbac
            .map(|r| r.network(service))
            .unwrap_or_default()
            .into_iter()
            .map(|f| Filter {
                name: "envoy.filters.network.rbac".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(f))),
            })
            .collect();
        filters.push(Filter {
            name: "envoy.filters.network.tcp_proxy".to_owned(),
            config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(tcp))),
        });
        plain.push(FilterChain { name: "tcp".to_owned(), filters, ..Default::default() });
    }
    let chains = match inbound.map(|f| f.mtls) {
        None => plain,
        Some(mode) => {
            let socket = tls_socket(&downstream_tls());
            let mut chains: Vec<FilterChain> = plain
                .iter()
                .map(|c| {
                    // Inside TLS the application protocol is the one ALPN negotiated.
                    let alpn = match c.name.as_str() {
                        "http" => vec!["h2".to_owned(), "http/1.1".to_owned()],
                        _ => vec![],
                    };
                    FilterChain {
                        name: format!("{}-mtls", c.name),
                        filter_chain_match: Some(FilterChainMatch {
                            transport_protocol: "tls".to_owned(),
                            application_protocols: alpn,
                            ..Default::default()
                        }),
                        transport_socket: Some(socket.clone()),
                        filters: c.filters.clone(),
                        ..Default::default()
                    }
                })
                .collect();
            if mode == MtlsMode::Permissive {
                chains.extend(plain);
            }
            chains
        }
    };
    Listener {
        name: name.to_owned(),
        address: Some(socket_address(addr)),
        filter_chains: chains,
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig { name: name.to_owned(), sds_config: Some(ads()) }
}

/// TLS settings both sides share: the proxy's own certificate and the mesh's trust bundle.
fn common_tls(identity: Option<&str>) -> CommonTlsContext {
    let default_validation_context = identity.map(|id| CertificateValidationContext {
        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(id.to_owned())),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(CERT_SECRET)],
        validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context,
                validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// Origination: the upstream must present a certificate for `identity`.
fn upstream_tls(identity: &str) -> UpstreamTlsContext {
    UpstreamTlsContext { common_tls_context: Some(common_tls(Some(identity))), ..Default::default() }
}

/// Termination: the client must present a certificate chaining to the bundle.
fn downstream_tls() -> DownstreamTlsContext {
    DownstreamTlsContext {
        common_tls_context: Some(common_tls(None)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

fn tls_socket<M: Message + Name>(ctx: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url: M::type_url(),
            value: ctx.encode_to_vec(),
        })),
    }
}

fn root_secret(bundle: &str) -> Secret {
    Secret {
        name: ROOT_SECRET.to_owned(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(bundle.as_bytes().to_vec())),
                ..Default::default()
            }),
            ..Default::default()
        })),
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

    /// The backend of each route `routes` makes of the rules (one backend per rule), in order.
    fn order(rules: serde_json::Value) -> Vec<String> {
        let rules: Vec<HttpRouteRule> = serde_json::from_value(rules).unwrap();
        let policed: Vec<PolicedRule<'_>> = rules.iter().map(|r| (r, None)).collect();
        routes("svc", &policed)
            .into_iter()
            .map(|r| match r.action {
                Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(c)),
                    ..
                })) => c,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn rule(backend: &str, m: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"matches": [m], "backendRefs": [{"name": backend}]})
    }

    /// The spec's criteria, each breaking a tie of the ones before it: an exact path, the
    /// longest prefix, a method match, the most header matches, the most query parameter
    /// matches; then the first rule. Rules are given in the reverse of that order.
    #[test]
    fn rules_are_ordered_by_gateway_api_precedence() {
        let rules = serde_json::json!([
            rule("first-of-equals", serde_json::json!({})),
            rule("second-of-equals", serde_json::json!({})),
            rule("query", serde_json::json!({"queryParams": [{"name": "q", "value": "1"}]})),
            rule(
                "two-queries",
                serde_json::json!({"queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "1"}]})
            ),
            rule(
                "header",
                serde_json::json!({"headers": [{"name": "x-a", "value": "1"}], "queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "1"}, {"name": "s", "value": "1"}]})
            ),
            rule(
                "two-headers",
                serde_json::json!({"headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "1"}]})
            ),
            rule("method", serde_json::json!({"method": "DELETE"})),
            rule(
                "method-and-header",
                serde_json::json!({"method": "DELETE", "headers": [{"name": "x-a", "value": "1"}]})
            ),
            rule(
                "prefix",
                serde_json::json!({"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "1"}, {"name": "x-c", "value": "1"}], "method": "GET"})
            ),
            rule("longer-prefix", serde_json::json!({"path": {"type": "PathPrefix", "value": "/api/v1"}})),
            rule("exact", serde_json::json!({"path": {"type": "Exact", "value": "/"}})),
        ]);
        assert_eq!(
            order(rules),
            [
                "exact",
                "longer-prefix",
                "prefix",
                "method-and-header",
                "method",
                "two-headers",
                "header",
                "two-queries",
                "query",
                "first-of-equals",
                "second-of-equals",
                "svc",
            ]
        );
    }

    /// The issue's case: `DELETE` with a matching header goes to the method rule.
    #[test]
    fn a_method_match_outranks_a_header_match() {
        let rules = serde_json::json!([
            rule("by-header", serde_json::json!({"headers": [{"name": "x-canary", "value": "yes"}]})),
            rule("by-method", serde_json::json!({"method": "DELETE"})),
        ]);
        assert_eq!(order(rules), ["by-method", "by-header", "svc"]);
    }
}
