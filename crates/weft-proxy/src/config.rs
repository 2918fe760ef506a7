//! The proxy's configuration model, decoded and validated from xDS resources. A resource that
//! does not decode into these types is NACKed and the previous configuration stays in force.
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, HealthStatus, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, header_matcher, route, route_action, route_match};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::{Any, value};
use prost::{Message, Name};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use weft_api::names;
use weft_api::resource::{DEFAULT_CONNECT_TIMEOUT, LoadBalancer};

/// Why a resource was rejected; the text goes back to the control plane in the NACK.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct InvalidResource {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

fn invalid(kind: &'static str, name: &str, reason: impl Into<String>) -> InvalidResource {
    InvalidResource { kind, name: name.to_owned(), reason: reason.into() }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerDef {
    pub name: String,
    pub address: SocketAddr,
    pub http: Option<HttpDef>,
    pub tcp_cluster: Option<String>,
}

impl ListenerDef {
    pub fn inbound(&self) -> bool {
        self.name.starts_with("inbound|")
    }

    /// The service this listener's traffic belongs to, for metrics and logs.
    pub fn service(&self) -> &str {
        self.name.split('|').nth(1).unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpDef {
    Rds(String),
    Inline(RouteDef),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDef {
    pub name: String,
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleDef {
    pub path: PathDef,
    pub headers: Vec<(String, String)>,
    /// (cluster, weight)
    pub backends: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathDef {
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterDef {
    pub name: String,
    pub load_balancer: LoadBalancer,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Endpoints given inline (static clusters); EDS clusters get theirs separately.
    pub static_endpoints: Option<Vec<EndpointDef>>,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointDef {
    pub address: SocketAddr,
    pub healthy: bool,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
}

fn decode<M: Message + Name + Default>(any: &Any, kind: &'static str) -> Result<M, InvalidResource> {
    if any.type_url != M::type_url() {
        return Err(invalid(kind, "", format!("expected {}, got {}", M::type_url(), any.type_url)));
    }
    M::decode(any.value.as_slice()).map_err(|e| invalid(kind, "", format!("cannot decode: {e}")))
}

fn socket_addr(kind: &'static str, name: &str, a: Option<&Address>) -> Result<SocketAddr, InvalidResource> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(invalid(kind, name, "needs a socket address"));
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(invalid(kind, name, "needs a numeric port"));
    };
    let ip = sa
        .address
        .parse()
        .map_err(|_| invalid(kind, name, format!("address {:?} is not an IP address", sa.address)))?;
    let port = u16::try_from(port).map_err(|_| invalid(kind, name, format!("port {port} is out of range")))?;
    Ok(SocketAddr::new(ip, port))
}

pub fn listener(any: &Any) -> Result<ListenerDef, InvalidResource> {
    let l: Listener = decode(any, "Listener")?;
    let address = socket_addr("Listener", &l.name, l.address.as_ref())?;
    let mut def = ListenerDef { name: l.name.clone(), address, http: None, tcp_cluster: None };
    for chain in &l.filter_chains {
        for f in &chain.filters {
            let Some(filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
                return Err(invalid("Listener", &l.name, format!("filter {:?} has no typed_config", f.name)));
            };
            if cfg.type_url == HttpConnectionManager::type_url() {
                let hcm: HttpConnectionManager = decode(cfg, "Listener")?;
                def.http = Some(match hcm.route_specifier {
                    Some(http_connection_manager::RouteSpecifier::Rds(rds)) => HttpDef::Rds(rds.route_config_name),
                    Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                        HttpDef::Inline(route_config(&rc)?)
                    }
                    _ => return Err(invalid("Listener", &l.name, "HTTP connection manager needs rds or route_config")),
                });
            } else if cfg.type_url == TcpProxy::type_url() {
                let tcp: TcpProxy = decode(cfg, "Listener")?;
                match tcp.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => def.tcp_cluster = Some(c),
                    _ => return Err(invalid("Listener", &l.name, "tcp_proxy needs a cluster")),
                }
            } else {
                return Err(invalid("Listener", &l.name, format!("unsupported network filter {}", cfg.type_url)));
            }
        }
    }
    if def.http.is_none() && def.tcp_cluster.is_none() {
        return Err(invalid("Listener", &l.name, "has neither an HTTP connection manager nor a tcp_proxy filter"));
    }
    Ok(def)
}

pub fn route(any: &Any) -> Result<RouteDef, InvalidResource> {
    route_config(&decode(any, "RouteConfiguration")?)
}

fn route_config(rc: &RouteConfiguration) -> Result<RouteDef, InvalidResource> {
    let bad = |reason: String| invalid("RouteConfiguration", &rc.name, reason);
    let mut rules = Vec::new();
    // Mesh routing has one destination per route table, so every virtual host applies.
    for vh in &rc.virtual_hosts {
        for r in &vh.routes {
            let m = r.r#match.as_ref().ok_or_else(|| bad("route without match".into()))?;
            let path = match &m.path_specifier {
                Some(route_match::PathSpecifier::Prefix(p)) => PathDef::Prefix(p.clone()),
                Some(route_match::PathSpecifier::Path(p)) => PathDef::Exact(p.clone()),
                None => PathDef::Prefix("/".into()),
                Some(other) => return Err(bad(format!("unsupported path match {other:?}"))),
            };
            let mut headers = Vec::new();
            for h in &m.headers {
                let exact = match &h.header_match_specifier {
                    Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => match &sm.match_pattern {
                        Some(string_matcher::MatchPattern::Exact(v)) => v.clone(),
                        _ => return Err(bad(format!("header {:?}: only exact matches are supported", h.name))),
                    },
                    _ => return Err(bad(format!("header {:?}: only exact string matches are supported", h.name))),
                };
                headers.push((h.name.to_ascii_lowercase(), exact));
            }
            let Some(route::Action::Route(action)) = &r.action else {
                return Err(bad("only route actions are supported".into()));
            };
            let backends = match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    w.clusters.iter().map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value))).collect()
                }
                _ => return Err(bad("route action needs a cluster or weighted_clusters".into())),
            };
            if backends.iter().all(|(_, w)| *w == 0) {
                return Err(bad("weighted clusters all have weight 0".into()));
            }
            rules.push(RuleDef { path, headers, backends });
        }
    }
    Ok(RouteDef { name: rc.name.clone(), rules })
}

pub fn cluster(any: &Any) -> Result<ClusterDef, InvalidResource> {
    let c: Cluster = decode(any, "Cluster")?;
    // The first policy of load_balancing_policy that weft knows wins; without one, lb_policy.
    let from_list = c.load_balancing_policy.iter().flat_map(|p| &p.policies).find_map(|p| {
        let url = p.typed_extension_config.as_ref()?.typed_config.as_ref()?.type_url.as_str();
        if url == LeastRequest::type_url() {
            Some(LoadBalancer::P2cEwma)
        } else if url == RoundRobin::type_url() {
            Some(LoadBalancer::RoundRobin)
        } else {
            None
        }
    });
    let load_balancer = match (from_list, cluster::LbPolicy::try_from(c.lb_policy)) {
        (Some(lb), _) => lb,
        (None, Ok(cluster::LbPolicy::RoundRobin)) => LoadBalancer::RoundRobin,
        (None, Ok(cluster::LbPolicy::LeastRequest)) => LoadBalancer::P2cEwma,
        _ => return Err(invalid("Cluster", &c.name, format!("unsupported lb_policy {}", c.lb_policy))),
    };
    let connect_timeout = c
        .connect_timeout
        .as_ref()
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let static_endpoints = match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32 => None,
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Static as i32 => {
            let cla = c
                .load_assignment
                .as_ref()
                .ok_or_else(|| invalid("Cluster", &c.name, "static cluster without load_assignment"))?;
            Some(endpoints(cla)?)
        }
        _ => return Err(invalid("Cluster", &c.name, "only EDS and STATIC clusters are supported")),
    };
    Ok(ClusterDef { name: c.name, load_balancer, connect_timeout, static_endpoints })
}

pub fn load_assignment(any: &Any) -> Result<(String, Vec<EndpointDef>), InvalidResource> {
    let cla: ClusterLoadAssignment = decode(any, "ClusterLoadAssignment")?;
    Ok((cla.cluster_name.clone(), endpoints(&cla)?))
}

fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointDef>, InvalidResource> {
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        let zone = loc.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default();
        for e in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(invalid("ClusterLoadAssignment", &cla.cluster_name, "endpoint without an address"));
            };
            let address = socket_addr("ClusterLoadAssignment", &cla.cluster_name, ep.address.as_ref())?;
            let healthy =
                matches!(HealthStatus::try_from(e.health_status), Ok(HealthStatus::Healthy | HealthStatus::Unknown));
            let labels = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(names::ENDPOINT_METADATA_NAMESPACE))
                .map(|s| {
                    s.fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(value::Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(EndpointDef { address, healthy, zone: zone.clone(), labels });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::SocketAddress;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain};
    use envoy_types::util::pack_any;

    fn listener_with(filter: Any) -> Any {
        pack_any(Listener {
            name: "l".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(9000)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter { name: "f".into(), config_type: Some(filter::ConfigType::TypedConfig(filter)) }],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    #[test]
    fn decodes_tcp_listener_and_rejects_unknown_filters_with_reason() {
        let tcp = TcpProxy {
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster("backend".into())),
            ..Default::default()
        };
        let def = listener(&listener_with(pack_any(tcp))).unwrap();
        assert_eq!(def.address, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(def.tcp_cluster.as_deref(), Some("backend"));

        let e = listener(&listener_with(pack_any(Cluster::default()))).unwrap_err().to_string();
        assert_eq!(e, "Listener \"l\": unsupported network filter type.googleapis.com/envoy.config.cluster.v3.Cluster");
        let e = cluster(&pack_any(Cluster { name: "c".into(), ..Default::default() })).unwrap_err().to_string();
        assert_eq!(e, "Cluster \"c\": only EDS and STATIC clusters are supported");
    }
}
