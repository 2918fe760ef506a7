//! The proxy's configuration model, decoded and validated from xDS resources.
//!
//! Invariant: config fails closed. A resource is accepted only if the proxy honours every field
//! set in it; anything it would otherwise have to ignore (an HTTP filter such as RBAC, a TLS
//! transport socket, a retry policy, a filter-chain match on source addresses) makes the whole
//! update a NACK naming the field, and the previous configuration stays in force. A proxy that
//! silently dropped a security filter would fail open.
//!
//! One module per resource: [`listener()`] in `listener.rs`, [`route()`] in `route.rs`,
//! [`cluster()`] and [`load_assignment()`] in `cluster.rs`, the TLS transport sockets and
//! the trust bundle in [`tls`]; what they share is in `decode.rs`. Their public items are
//! re-exported here, so that each is `crate::config::X`.
use std::net::SocketAddr;

mod access_log;
mod cluster;
mod decode;
mod fields;
mod listener;
mod route;
mod schema;
pub mod tls;
mod tracing;

pub use access_log::{AccessLogDef, Comparison, LogFilter, LogOutput};
pub use cluster::{
    ClusterDef, EndpointDef, HTTP_PROTOCOL_OPTIONS, HealthCheckDef, OutlierDef, PoolDef, RetryLimit, UpstreamProtocol,
    cluster, load_assignment,
};
pub use decode::InvalidResource;
pub use listener::{BucketDef, Direction, Failover, HttpDef, InboundPolicyDef, ListenerDef, RateLimitDef, listener};
pub use route::{
    FaultAbortDef, FaultDef, FaultDelayDef, HashDef, HeaderEdits, MirrorDef, PathDef, RedirectDef, RetryDef, RetryOn,
    Rewrite, RouteDef, RuleDef, StrMatch, VirtualHostDef, route,
};
pub use tls::{BundleDef, DownstreamTlsDef, UpstreamTlsDef};
pub use tracing::TracingDef;

/// What to do with `%2F` and `%5C` in a path (Envoy's `path_with_escaped_slashes_action`):
/// the same setting as a `Service`'s `escapedSlashes`.
pub use weft_api::resource::EscapedSlashes;

/// Why an xDS update was rejected as a whole (NACK). Nothing of a rejected update is applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Invalid(#[from] InvalidResource),
    #[error("Listener {name:?}: cannot bind {address}: {source} (is another process using the port?)")]
    Bind { name: String, address: SocketAddr, source: std::io::Error },
    #[error("weft does not handle resource type {0}")]
    UnsupportedType(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, TrafficDirection, TransportSocket, address, socket_address,
    };
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
    use envoy_types::pb::envoy::config::route::v3::{
        HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, header_matcher,
        route, route_action, route_match,
    };
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
    };
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    use envoy_types::pb::google::protobuf::{self, Any, UInt32Value};
    use envoy_types::util::pack_any;
    use prost::Message;
    use std::time::Duration;

    fn listener_with(filter: Any, chain: impl FnOnce(&mut FilterChain), l: impl FnOnce(&mut Listener)) -> Any {
        let mut fc = FilterChain {
            filters: vec![Filter { name: "f".into(), config_type: Some(filter::ConfigType::TypedConfig(filter)) }],
            ..Default::default()
        };
        chain(&mut fc);
        let mut listener = Listener {
            name: "l".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(9000)),
                    ..Default::default()
                })),
            }),
            traffic_direction: TrafficDirection::Outbound as i32,
            filter_chains: vec![fc],
            ..Default::default()
        };
        l(&mut listener);
        pack_any(listener)
    }

    fn tcp_proxy(cluster: &str) -> Any {
        pack_any(TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })
    }

    fn route_table(action: RouteAction) -> RouteConfiguration {
        RouteConfiguration {
            name: "backend".into(),
            virtual_hosts: vec![VirtualHost {
                name: "backend".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("backend".into())),
                        ..action
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn hcm(filters: Vec<HttpFilter>) -> Any {
        pack_any(HttpConnectionManager {
            stat_prefix: "backend".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(route_table(
                RouteAction::default(),
            ))),
            http_filters: filters,
            ..Default::default()
        })
    }

    fn http_filter(name: &str, config: Any) -> HttpFilter {
        HttpFilter {
            name: name.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(config)),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_listeners_with_direction_and_service() {
        let def = listener(&listener_with(tcp_proxy("backend"), |_| {}, |_| {})).unwrap();
        assert_eq!(def.address, "127.0.0.1:9000".parse().unwrap());
        assert_eq!((def.direction, def.service.as_str()), (Direction::outbound, "backend"));
        assert_eq!(def.tcp_cluster.as_deref(), Some("backend"));
        let router = http_filter("envoy.filters.http.router", pack_any(Router::default()));
        let def = listener(&listener_with(
            hcm(vec![router]),
            |_| {},
            |l| l.traffic_direction = TrafficDirection::Inbound as i32,
        ))
        .unwrap();
        assert_eq!(def.direction, Direction::inbound);
        assert!(matches!(def.http, Some(HttpDef::Inline(_))));
    }

    /// Everything the proxy cannot honour is refused, naming what it is.
    #[test]
    fn unsupported_config_is_refused_with_what_and_why() {
        let refused = |any: Any| listener(&any).unwrap_err().to_string();
        assert_eq!(
            refused(listener_with(tcp_proxy("b"), |_| {}, |l| l.traffic_direction = 0)),
            "Listener \"l\": traffic_direction must be INBOUND or OUTBOUND"
        );
        let cors =
            Any { type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors".into(), value: vec![] };
        let router = http_filter("envoy.filters.http.router", pack_any(Router::default()));
        assert_eq!(
            refused(listener_with(
                hcm(vec![http_filter("envoy.filters.http.cors", cors), router.clone()]),
                |c| c.name = "http".into(),
                |_| {}
            )),
            "Listener \"l\": filter chain \"http\": HTTP filter \"envoy.filters.http.cors\" \
             (type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors) is not supported; weft would have to ignore it"
        );
        // The fault filter is honoured per route; settings on the filter itself are refused.
        let fault = HttpFault { max_active_faults: Some(UInt32Value { value: 1 }), ..Default::default() };
        assert!(
            refused(listener_with(
                hcm(vec![http_filter("envoy.filters.http.fault", pack_any(fault)), router.clone()]),
                |_| {},
                |_| {}
            ))
            .contains("weft takes fault settings per route")
        );
        // RBAC is honoured, but only what weft can evaluate: a CEL condition is refused.
        let cel = envoy_types::pb::envoy::config::rbac::v3::Rbac {
            policies: [(
                "p".to_owned(),
                envoy_types::pb::envoy::config::rbac::v3::Policy {
                    condition: Some(Default::default()),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let rbac = pack_any(HttpRbac { rules: Some(cel), ..Default::default() });
        assert_eq!(
            refused(listener_with(
                hcm(vec![http_filter("envoy.filters.http.rbac", rbac), router]),
                |c| c.name = "http".into(),
                |_| {}
            )),
            "Listener \"l\": filter chain \"http\": HTTP filter \"envoy.filters.http.rbac\": policy \"p\": CEL conditions are not supported"
        );
        let tls = TransportSocket { name: "envoy.transport_sockets.tls".into(), config_type: None };
        assert_eq!(
            refused(listener_with(tcp_proxy("b"), |c| c.transport_socket = Some(tls.clone()), |_| {})),
            "Listener \"l\": filter chain \"\": transport socket \"envoy.transport_sockets.tls\" on a chain not matched on transport_protocol tls is not supported"
        );
        let by_source = |c: &mut FilterChain| {
            c.filter_chain_match = Some(envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
                source_ports: vec![443],
                ..Default::default()
            })
        };
        assert_eq!(
            refused(listener_with(tcp_proxy("b"), by_source, |_| {})),
            "Listener \"l\": filter_chains[0].filter_chain_match sets source_ports, which weft does not support"
        );
        let codes = RetryPolicy { retriable_status_codes: vec![409], ..Default::default() };
        let retries = RouteAction { retry_policy: Some(codes), ..Default::default() };
        assert_eq!(
            route(&pack_any(route_table(retries))).unwrap_err().to_string(),
            "RouteConfiguration \"backend\": virtual_hosts[0].routes[0].route.retry_policy sets retriable_status_codes, which weft does not support"
        );
        let on = RetryPolicy { retry_on: "5xx,retriable-4xx".into(), ..Default::default() };
        let retries = RouteAction { retry_policy: Some(on), ..Default::default() };
        assert!(
            route(&pack_any(route_table(retries)))
                .unwrap_err()
                .to_string()
                .contains("retry_on \"retriable-4xx\" is not supported"),
        );
        let mirror =
            RouteAction { idle_timeout: Some(protobuf::Duration { seconds: 5, nanos: 0 }), ..Default::default() };
        let mut inline = hcm(vec![]);
        let mut h = HttpConnectionManager::decode(inline.value.as_slice()).unwrap();
        h.route_specifier = Some(http_connection_manager::RouteSpecifier::RouteConfig(route_table(mirror)));
        inline.value = h.encode_to_vec();
        assert_eq!(
            refused(listener_with(inline, |c| c.name = "http".into(), |_| {})),
            "Listener \"l\": filter chain \"http\": http_connection_manager.route_config.virtual_hosts[0].routes[0].route \
             sets idle_timeout, which weft does not support"
        );
        let mut c = Cluster { name: "c".into(), ..Default::default() };
        c.lb_subset_config = Some(Default::default());
        assert_eq!(
            cluster(&pack_any(c.clone())).unwrap_err().to_string(),
            "Cluster \"c\": it sets lb_subset_config, which weft does not support"
        );
        c.lb_subset_config = None;
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32));
        // Envoy's outlier detection ejects on success rate unless told not to.
        c.outlier_detection = Some(Default::default());
        assert!(cluster(&pack_any(c.clone())).unwrap_err().to_string().contains("success-rate ejection"));
        c.outlier_detection.as_mut().unwrap().enforcing_success_rate = Some(UInt32Value { value: 0 });
        c.outlier_detection.as_mut().unwrap().enforcing_consecutive_5xx = Some(UInt32Value { value: 50 });
        assert!(cluster(&pack_any(c.clone())).unwrap_err().to_string().contains("weft enforces 0 or 100"));
        c.outlier_detection.as_mut().unwrap().enforcing_consecutive_5xx = None;
        let od = cluster(&pack_any(c.clone())).unwrap().outlier.unwrap();
        assert_eq!((od.consecutive_5xx, od.consecutive_gateway, od.panic_threshold), (Some(5), None, 50.0));
        c.outlier_detection = None;
        c.cluster_discovery_type = None;
        c.transport_socket = Some(tls);
        assert_eq!(
            cluster(&pack_any(c)).unwrap_err().to_string(),
            "Cluster \"c\": transport socket \"envoy.transport_sockets.tls\" has no typed_config"
        );
        let e = cluster(&pack_any(Cluster { name: "c".into(), ..Default::default() })).unwrap_err().to_string();
        assert_eq!(e, "Cluster \"c\": only EDS, STATIC and ORIGINAL_DST clusters are supported");
        // A passthrough cluster balances nothing: its lb_policy must say so.
        let original_dst = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::OriginalDst as i32,
            )),
            ..Default::default()
        };
        let e = cluster(&pack_any(original_dst)).unwrap_err().to_string();
        assert_eq!(e, "Cluster \"c\": an ORIGINAL_DST cluster must have lb_policy CLUSTER_PROVIDED");
    }

    #[test]
    fn route_timeout_is_decoded() {
        let timeout =
            RouteAction { timeout: Some(protobuf::Duration { seconds: 1, nanos: 500_000_000 }), ..Default::default() };
        let def = route(&pack_any(route_table(timeout))).unwrap();
        assert_eq!(def.virtual_hosts[0].rules[0].timeout, Some(Duration::from_millis(1500)));
        let zero = RouteAction { timeout: Some(protobuf::Duration::default()), ..Default::default() };
        assert_eq!(route(&pack_any(route_table(zero))).unwrap().virtual_hosts[0].rules[0].timeout, None);
    }

    /// A header match the route table could not honour is refused, naming the header; it is
    /// never dropped (the route would then match every request). An exact `:method` is kept.
    #[test]
    fn pseudo_header_matches_other_than_an_exact_method_are_refused() {
        let with_header = |name: &str, pattern: string_matcher::MatchPattern| {
            let mut rc = route_table(RouteAction::default());
            rc.virtual_hosts[0].routes[0].r#match.as_mut().unwrap().headers = vec![HeaderMatcher {
                name: name.into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(pattern),
                    ..Default::default()
                })),
                ..Default::default()
            }];
            route(&pack_any(rc))
        };
        let exact = |v: &str| string_matcher::MatchPattern::Exact(v.into());
        let regex = |v: &str| {
            string_matcher::MatchPattern::SafeRegex(envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: v.into(),
                ..Default::default()
            })
        };
        for (name, pattern, why) in [
            (":method", regex("GET|HEAD"), "only an exact :method match is supported"),
            (":method", exact("GET HEAD"), "\"GET HEAD\" is not an HTTP method"),
            (":authority", exact("admin.local"), "pseudo-header matches other than an exact :method are not supported"),
            (":path", regex("/admin.*"), "pseudo-header matches other than an exact :method are not supported"),
            (":scheme", exact("https"), "pseudo-header matches other than an exact :method are not supported"),
            ("bad header", exact("x"), "not a valid header name"),
        ] {
            let err = with_header(name, pattern).unwrap_err().to_string();
            assert!(err.contains(&format!("route 0 \"\": header {name:?}: {why}")), "{name}: {err}");
        }
        let def = with_header(":method", exact("DELETE")).unwrap();
        assert_eq!(def.virtual_hosts[0].rules[0].headers, [(":method".to_owned(), StrMatch::Exact("DELETE".into()))]);
    }
}
