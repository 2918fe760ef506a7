//! What the proxy honours of each xDS message, checked on the wire before decoding.
//!
//! A resource is walked field by field in its encoded form: a field not listed in its
//! message's [`Schema`] makes the resource a NACK naming the field and where it is
//! (`filter_chains[0].filter_chain_match sets source_ports`). Fields whose meaning depends on
//! their value (an HTTP filter's type, a transport socket) are listed here and refused by the
//! decoder in `config`, which can name them better.
use super::fields::FIELDS;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

pub enum Field {
    /// Honoured as it is.
    Plain(&'static str),
    /// A message field, itself checked.
    Message(&'static str, &'static Schema),
    /// A repeated message field, each element checked.
    Repeated(&'static str, &'static Schema),
}

impl Field {
    fn name(&self) -> &'static str {
        match self {
            Field::Plain(n) | Field::Message(n, _) | Field::Repeated(n, _) => n,
        }
    }
}

/// The fields of one message (by its full protobuf name) that the proxy honours.
pub struct Schema {
    pub message: &'static str,
    pub fields: &'static [Field],
}

/// Walks `wire`, an encoded `schema.message`, and fails with every field it sets that the
/// schema does not list. `at` says where the message is, for the error ("" at the top).
pub fn check(wire: &[u8], schema: &Schema, at: &str) -> Result<(), String> {
    let names = FIELDS.iter().find(|(m, _)| *m == schema.message).map_or(&[][..], |(_, f)| *f);
    let mut wire = wire;
    let mut unsupported: Vec<String> = Vec::new();
    let mut counts: Vec<(u32, usize)> = Vec::new();
    let malformed = |e: prost::DecodeError| format!("{} cannot be decoded: {e}", where_(at));
    while !wire.is_empty() {
        let (tag, wire_type) = decode_key(&mut wire).map_err(malformed)?;
        let name = names.iter().find(|(t, _)| *t == tag).map(|(_, n)| *n);
        let field = name.and_then(|n| schema.fields.iter().find(|f| f.name() == n));
        let nested = match field {
            Some(Field::Message(n, s)) => Some((*n, *s, None)),
            Some(Field::Repeated(n, s)) => {
                let i = match counts.iter_mut().find(|(t, _)| *t == tag) {
                    Some((_, c)) => {
                        *c += 1;
                        *c - 1
                    }
                    None => {
                        counts.push((tag, 1));
                        0
                    }
                };
                Some((*n, *s, Some(i)))
            }
            Some(Field::Plain(_)) => None,
            None => {
                let label = name.map_or_else(|| format!("field {tag} of {}", schema.message), str::to_owned);
                if !unsupported.contains(&label) {
                    unsupported.push(label);
                }
                None
            }
        };
        match nested {
            Some((n, child, index)) if wire_type == WireType::LengthDelimited => {
                let len = decode_varint(&mut wire).map_err(malformed)? as usize;
                if len > wire.len() {
                    return Err(format!("{} cannot be decoded: truncated", where_(at)));
                }
                let (inner, rest) = wire.split_at(len);
                wire = rest;
                let sep = if at.is_empty() { "" } else { "." };
                let path = match index {
                    Some(i) => format!("{at}{sep}{n}[{i}]"),
                    None => format!("{at}{sep}{n}"),
                };
                check(inner, child, &path)?;
            }
            _ => skip_field(wire_type, tag, &mut wire, DecodeContext::default()).map_err(malformed)?,
        }
    }
    match unsupported.as_slice() {
        [] => Ok(()),
        [one] => Err(format!("{} sets {one}, which weft does not support", where_(at))),
        many => Err(format!("{} sets {}, which weft does not support", where_(at), many.join(", "))),
    }
}

fn where_(at: &str) -> &str {
    if at.is_empty() { "it" } else { at }
}

use Field::{Message, Plain, Repeated};

static ADDRESS: Schema =
    Schema { message: "envoy.config.core.v3.Address", fields: &[Message("socket_address", &SOCKET_ADDRESS)] };
static SOCKET_ADDRESS: Schema =
    Schema { message: "envoy.config.core.v3.SocketAddress", fields: &[Plain("address"), Plain("port_value")] };

/// Listener filters and transport sockets are refused by name in the decoder.
pub static LISTENER: Schema = Schema {
    message: "envoy.config.listener.v3.Listener",
    fields: &[
        Plain("name"),
        Message("address", &ADDRESS),
        Repeated("filter_chains", &FILTER_CHAIN),
        Plain("traffic_direction"),
        Plain("listener_filters"),
        Plain("bind_to_port"),
        Plain("use_original_dst"),
    ],
};
static FILTER_CHAIN: Schema = Schema {
    message: "envoy.config.listener.v3.FilterChain",
    fields: &[
        Plain("name"),
        Repeated("filters", &FILTER),
        Message("filter_chain_match", &FILTER_CHAIN_MATCH),
        Plain("transport_socket"),
    ],
};
/// The proxy detects the protocol (and TLS) itself: a chain may be matched on them, or (on a
/// mesh gateway's listener) on the TLS server name, nothing else.
static FILTER_CHAIN_MATCH: Schema = Schema {
    message: "envoy.config.listener.v3.FilterChainMatch",
    fields: &[Plain("application_protocols"), Plain("transport_protocol"), Plain("server_names")],
};
/// `typed_config` is decoded by its type URL in the decoder (HCM, tcp_proxy; others refused).
static FILTER: Schema =
    Schema { message: "envoy.config.listener.v3.Filter", fields: &[Plain("name"), Plain("typed_config")] };

pub static HTTP_CONNECTION_MANAGER: Schema = Schema {
    message: "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    fields: &[
        Plain("stat_prefix"),
        Message("rds", &RDS),
        Message("route_config", &ROUTE_CONFIGURATION),
        Repeated("http_filters", &HTTP_FILTER),
        // Paths are always normalised; the escaped-slash action is decoded.
        Plain("normalize_path"),
        Plain("merge_slashes"),
        Plain("path_with_escaped_slashes_action"),
        Repeated("access_log", &ACCESS_LOG),
        Message("tracing", &TRACING),
    ],
};
/// Tracing: the provider's `typed_config` is checked by the decoder (config/tracing.rs).
static TRACING: Schema = Schema {
    message: "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing",
    fields: &[Message("random_sampling", &PERCENT), Message("provider", &TRACING_HTTP)],
};
static PERCENT: Schema = Schema { message: "envoy.type.v3.Percent", fields: &[Plain("value")] };
static TRACING_HTTP: Schema =
    Schema { message: "envoy.config.trace.v3.Tracing.Http", fields: &[Plain("name"), Plain("typed_config")] };
pub static OPEN_TELEMETRY: Schema = Schema {
    message: "envoy.config.trace.v3.OpenTelemetryConfig",
    fields: &[Message("grpc_service", &GRPC_SERVICE), Plain("service_name")],
};
static GRPC_SERVICE: Schema = Schema {
    message: "envoy.config.core.v3.GrpcService",
    fields: &[Message("google_grpc", &GOOGLE_GRPC), Plain("envoy_grpc"), Plain("timeout")],
};
/// No credentials: the collector is reached in plaintext. `stat_prefix` names stats only.
static GOOGLE_GRPC: Schema = Schema {
    message: "envoy.config.core.v3.GrpcService.GoogleGrpc",
    fields: &[Plain("target_uri"), Plain("stat_prefix")],
};
/// Access logs: the logger's `typed_config` and an extension filter's are checked by the
/// decoder (config/access_log.rs), which knows their types.
static ACCESS_LOG: Schema = Schema {
    message: "envoy.config.accesslog.v3.AccessLog",
    fields: &[Plain("name"), Message("filter", &ACCESS_LOG_FILTER), Plain("typed_config")],
};
static ACCESS_LOG_FILTER: Schema = Schema {
    message: "envoy.config.accesslog.v3.AccessLogFilter",
    fields: &[
        Message("status_code_filter", &STATUS_CODE_FILTER),
        Message("runtime_filter", &RUNTIME_FILTER),
        Message("and_filter", &AND_FILTER),
        Message("or_filter", &OR_FILTER),
        Message("grpc_status_filter", &GRPC_STATUS_FILTER),
        Message("extension_filter", &EXTENSION_FILTER),
    ],
};
static STATUS_CODE_FILTER: Schema =
    Schema { message: "envoy.config.accesslog.v3.StatusCodeFilter", fields: &[Message("comparison", &COMPARISON)] };
static COMPARISON: Schema = Schema {
    message: "envoy.config.accesslog.v3.ComparisonFilter",
    fields: &[Plain("op"), Message("value", &RUNTIME_UINT32)],
};
/// No runtime here: only the default value.
static RUNTIME_UINT32: Schema =
    Schema { message: "envoy.config.core.v3.RuntimeUInt32", fields: &[Plain("default_value"), Plain("runtime_key")] };
/// The key names no runtime value (weft has none); the percentage is sampled per request.
static RUNTIME_FILTER: Schema = Schema {
    message: "envoy.config.accesslog.v3.RuntimeFilter",
    fields: &[
        Plain("runtime_key"),
        Message("percent_sampled", &FRACTIONAL_PERCENT),
        Plain("use_independent_randomness"),
    ],
};
static AND_FILTER: Schema =
    Schema { message: "envoy.config.accesslog.v3.AndFilter", fields: &[Repeated("filters", &ACCESS_LOG_FILTER)] };
static OR_FILTER: Schema =
    Schema { message: "envoy.config.accesslog.v3.OrFilter", fields: &[Repeated("filters", &ACCESS_LOG_FILTER)] };
static GRPC_STATUS_FILTER: Schema =
    Schema { message: "envoy.config.accesslog.v3.GrpcStatusFilter", fields: &[Plain("statuses"), Plain("exclude")] };
static EXTENSION_FILTER: Schema =
    Schema { message: "envoy.config.accesslog.v3.ExtensionFilter", fields: &[Plain("name"), Plain("typed_config")] };
pub static CEL_FILTER: Schema = Schema {
    message: "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
    fields: &[Plain("expression")],
};
/// No `access_log_format`: weft writes its own JSON object per request.
pub static STDERR_ACCESS_LOG: Schema =
    Schema { message: "envoy.extensions.access_loggers.stream.v3.StderrAccessLog", fields: &[] };
pub static STDOUT_ACCESS_LOG: Schema =
    Schema { message: "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", fields: &[] };
pub static FILE_ACCESS_LOG: Schema =
    Schema { message: "envoy.extensions.access_loggers.file.v3.FileAccessLog", fields: &[Plain("path")] };
static RDS: Schema = Schema {
    message: "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
    fields: &[Plain("route_config_name"), Plain("config_source")],
};
/// Only the router is accepted, by its type URL in the decoder.
static HTTP_FILTER: Schema = Schema {
    message: "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
    fields: &[Plain("name"), Plain("typed_config")],
};
pub static ROUTER: Schema = Schema { message: "envoy.extensions.filters.http.router.v3.Router", fields: &[] };
pub static TCP_PROXY: Schema = Schema {
    message: "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    fields: &[Plain("stat_prefix"), Plain("cluster"), Plain("max_connect_attempts")],
};

pub static ROUTE_CONFIGURATION: Schema = Schema {
    message: "envoy.config.route.v3.RouteConfiguration",
    fields: &[Plain("name"), Repeated("virtual_hosts", &VIRTUAL_HOST)],
};
static VIRTUAL_HOST: Schema = Schema {
    message: "envoy.config.route.v3.VirtualHost",
    fields: &[Plain("name"), Plain("domains"), Repeated("routes", &ROUTE)],
};
/// Header values to add are checked field by field in the decoder.
static ROUTE: Schema = Schema {
    message: "envoy.config.route.v3.Route",
    fields: &[
        Plain("name"),
        Message("match", &ROUTE_MATCH),
        Message("route", &ROUTE_ACTION),
        Message("redirect", &REDIRECT_ACTION),
        Plain("request_headers_to_add"),
        Plain("request_headers_to_remove"),
        Plain("response_headers_to_add"),
        Plain("response_headers_to_remove"),
        Plain("typed_per_filter_config"),
        Plain("request_body_buffer_limit"),
    ],
};
/// Descriptors and percentages are checked by the decoder.
pub static LOCAL_RATE_LIMIT: Schema = Schema {
    message: "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    fields: &[
        Plain("stat_prefix"),
        Message("token_bucket", &TOKEN_BUCKET),
        Plain("filter_enabled"),
        Plain("filter_enforced"),
        Plain("descriptors"),
        Plain("always_consume_default_token_bucket"),
        Plain("rate_limited_as_resource_exhausted"),
    ],
};
static TOKEN_BUCKET: Schema = Schema {
    message: "envoy.type.v3.TokenBucket",
    fields: &[Plain("max_tokens"), Plain("tokens_per_fill"), Plain("fill_interval")],
};
/// Per route (`typed_per_filter_config`); the decoder checks the oneofs' values.
pub static HTTP_FAULT: Schema = Schema {
    message: "envoy.extensions.filters.http.fault.v3.HTTPFault",
    fields: &[Message("delay", &FAULT_DELAY), Message("abort", &FAULT_ABORT)],
};
static FAULT_DELAY: Schema = Schema {
    message: "envoy.extensions.filters.common.fault.v3.FaultDelay",
    fields: &[Plain("fixed_delay"), Message("percentage", &FRACTIONAL_PERCENT)],
};
static FAULT_ABORT: Schema = Schema {
    message: "envoy.extensions.filters.http.fault.v3.FaultAbort",
    fields: &[Plain("http_status"), Plain("grpc_status"), Message("percentage", &FRACTIONAL_PERCENT)],
};
static FRACTIONAL_PERCENT: Schema =
    Schema { message: "envoy.type.v3.FractionalPercent", fields: &[Plain("numerator"), Plain("denominator")] };
static REQUEST_MIRROR_POLICY: Schema = Schema {
    message: "envoy.config.route.v3.RouteAction.RequestMirrorPolicy",
    fields: &[Plain("cluster"), Message("runtime_fraction", &RUNTIME_FRACTIONAL_PERCENT)],
};
/// Values are checked by the decoder.
static REDIRECT_ACTION: Schema = Schema {
    message: "envoy.config.route.v3.RedirectAction",
    fields: &[
        Plain("https_redirect"),
        Plain("scheme_redirect"),
        Plain("host_redirect"),
        Plain("port_redirect"),
        Plain("path_redirect"),
        Plain("prefix_rewrite"),
        Plain("response_code"),
    ],
};
/// The decoder checks which one is set.
static HASH_POLICY: Schema = Schema {
    message: "envoy.config.route.v3.RouteAction.HashPolicy",
    fields: &[Plain("header"), Plain("cookie"), Plain("connection_properties"), Plain("terminal")],
};
/// No runtime here: only the default value.
static RUNTIME_FRACTIONAL_PERCENT: Schema = Schema {
    message: "envoy.config.core.v3.RuntimeFractionalPercent",
    fields: &[Message("default_value", &FRACTIONAL_PERCENT)],
};
static ROUTE_MATCH: Schema = Schema {
    message: "envoy.config.route.v3.RouteMatch",
    fields: &[
        Plain("prefix"),
        Plain("path"),
        Message("safe_regex", &REGEX_MATCHER),
        Repeated("headers", &HEADER_MATCHER),
        Repeated("query_parameters", &QUERY_PARAMETER_MATCHER),
    ],
};
static HEADER_MATCHER: Schema = Schema {
    message: "envoy.config.route.v3.HeaderMatcher",
    fields: &[Plain("name"), Message("string_match", &STRING_MATCHER)],
};
static QUERY_PARAMETER_MATCHER: Schema = Schema {
    message: "envoy.config.route.v3.QueryParameterMatcher",
    fields: &[Plain("name"), Message("string_match", &STRING_MATCHER)],
};
static STRING_MATCHER: Schema = Schema {
    message: "envoy.type.matcher.v3.StringMatcher",
    fields: &[Plain("exact"), Message("safe_regex", &REGEX_MATCHER)],
};
static REGEX_MATCHER: Schema = Schema { message: "envoy.type.matcher.v3.RegexMatcher", fields: &[Plain("regex")] };
static ROUTE_ACTION: Schema = Schema {
    message: "envoy.config.route.v3.RouteAction",
    fields: &[
        Plain("cluster"),
        Message("weighted_clusters", &WEIGHTED_CLUSTER),
        Plain("timeout"),
        Plain("prefix_rewrite"),
        Message("regex_rewrite", &REGEX_MATCH_AND_SUBSTITUTE),
        Plain("host_rewrite_literal"),
        Message("retry_policy", &RETRY_POLICY),
        Repeated("request_mirror_policies", &REQUEST_MIRROR_POLICY),
        Repeated("hash_policy", &HASH_POLICY),
    ],
};
/// `retry_on` values are checked by the decoder.
static RETRY_POLICY: Schema = Schema {
    message: "envoy.config.route.v3.RetryPolicy",
    fields: &[
        Plain("retry_on"),
        Plain("num_retries"),
        Plain("per_try_timeout"),
        Message("retry_back_off", &RETRY_BACK_OFF),
    ],
};
static RETRY_BACK_OFF: Schema = Schema {
    message: "envoy.config.route.v3.RetryPolicy.RetryBackOff",
    fields: &[Plain("base_interval"), Plain("max_interval")],
};
static REGEX_MATCH_AND_SUBSTITUTE: Schema = Schema {
    message: "envoy.type.matcher.v3.RegexMatchAndSubstitute",
    fields: &[Message("pattern", &REGEX_MATCHER), Plain("substitution")],
};
static WEIGHTED_CLUSTER: Schema =
    Schema { message: "envoy.config.route.v3.WeightedCluster", fields: &[Repeated("clusters", &CLUSTER_WEIGHT)] };
static CLUSTER_WEIGHT: Schema = Schema {
    message: "envoy.config.route.v3.WeightedCluster.ClusterWeight",
    fields: &[Plain("name"), Plain("weight")],
};

/// `load_balancing_policy` lists policies in order of preference; the decoder takes the first
/// it knows, as Envoy does. Transport sockets are refused by name in the decoder.
pub static CLUSTER: Schema = Schema {
    message: "envoy.config.cluster.v3.Cluster",
    fields: &[
        Plain("name"),
        Plain("type"),
        Message("eds_cluster_config", &EDS_CLUSTER_CONFIG),
        Plain("connect_timeout"),
        Plain("lb_policy"),
        Plain("load_balancing_policy"),
        Message("load_assignment", &CLUSTER_LOAD_ASSIGNMENT),
        Plain("transport_socket"),
        Plain("typed_extension_protocol_options"),
        Message("circuit_breakers", &CIRCUIT_BREAKERS),
        Message("outlier_detection", &OUTLIER_DETECTION),
        Message("common_lb_config", &COMMON_LB_CONFIG),
        Repeated("health_checks", &HEALTH_CHECK),
        Plain("metadata"),
    ],
};
/// The checker's settings are checked by the decoder.
static HEALTH_CHECK: Schema = Schema {
    message: "envoy.config.core.v3.HealthCheck",
    fields: &[
        Plain("timeout"),
        Plain("interval"),
        Plain("unhealthy_threshold"),
        Plain("healthy_threshold"),
        Message("http_health_check", &HTTP_HEALTH_CHECK),
        Plain("tcp_health_check"),
    ],
};
static HTTP_HEALTH_CHECK: Schema =
    Schema { message: "envoy.config.core.v3.HealthCheck.HttpHealthCheck", fields: &[Plain("path")] };
/// Enforcement percentages are checked by the decoder (0 or 100).
static OUTLIER_DETECTION: Schema = Schema {
    message: "envoy.config.cluster.v3.OutlierDetection",
    fields: &[
        Plain("consecutive_5xx"),
        Plain("enforcing_consecutive_5xx"),
        Plain("consecutive_gateway_failure"),
        Plain("enforcing_consecutive_gateway_failure"),
        Plain("enforcing_success_rate"),
        Plain("base_ejection_time"),
        Plain("max_ejection_time"),
        Plain("max_ejection_percent"),
    ],
};
/// The panic threshold applies to ejected endpoints (registry-unhealthy ones are never used).
static COMMON_LB_CONFIG: Schema =
    Schema { message: "envoy.config.cluster.v3.Cluster.CommonLbConfig", fields: &[Plain("healthy_panic_threshold")] };
static CIRCUIT_BREAKERS: Schema = Schema {
    message: "envoy.config.cluster.v3.CircuitBreakers",
    fields: &[Repeated("thresholds", &THRESHOLDS), Plain("per_host_thresholds")],
};
/// `priority` must be DEFAULT, which the decoder checks.
static THRESHOLDS: Schema = Schema {
    message: "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
    fields: &[
        Plain("priority"),
        Plain("max_requests"),
        Plain("max_retries"),
        Message("retry_budget", &RETRY_BUDGET),
        Plain("max_pending_requests"),
        Plain("max_connections"),
    ],
};
static RETRY_BUDGET: Schema = Schema {
    message: "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget",
    fields: &[Plain("budget_percent"), Plain("min_retry_concurrency")],
};
static EDS_CLUSTER_CONFIG: Schema =
    Schema { message: "envoy.config.cluster.v3.Cluster.EdsClusterConfig", fields: &[Plain("eds_config")] };

pub static CLUSTER_LOAD_ASSIGNMENT: Schema = Schema {
    message: "envoy.config.endpoint.v3.ClusterLoadAssignment",
    fields: &[Plain("cluster_name"), Repeated("endpoints", &LOCALITY_LB_ENDPOINTS)],
};
/// Localities are balanced as one set: their weights are accepted and not used. Priorities
/// order them for failover.
static LOCALITY_LB_ENDPOINTS: Schema = Schema {
    message: "envoy.config.endpoint.v3.LocalityLbEndpoints",
    fields: &[
        Plain("locality"),
        Repeated("lb_endpoints", &LB_ENDPOINT),
        Plain("load_balancing_weight"),
        Plain("priority"),
    ],
};
/// Endpoint weights other than 1 are refused by the decoder.
static LB_ENDPOINT: Schema = Schema {
    message: "envoy.config.endpoint.v3.LbEndpoint",
    fields: &[
        Message("endpoint", &ENDPOINT),
        Plain("health_status"),
        Plain("metadata"),
        Plain("load_balancing_weight"),
    ],
};
static ENDPOINT: Schema =
    Schema { message: "envoy.config.endpoint.v3.Endpoint", fields: &[Message("address", &ADDRESS), Plain("hostname")] };

#[cfg(test)]
mod tests {
    use super::*;

    /// Every schema's message and fields must be in the generated table, or checks would
    /// refuse fields the proxy honours.
    #[test]
    fn every_schema_field_is_in_the_generated_table() {
        fn visit(s: &Schema, seen: &mut Vec<&'static str>) {
            if seen.contains(&s.message) {
                return;
            }
            seen.push(s.message);
            let names = FIELDS.iter().find(|(m, _)| *m == s.message).map(|(_, f)| *f);
            let names = names
                .unwrap_or_else(|| panic!("{} is not in fields.rs: add it to scripts/gen-xds-field-names", s.message));
            for f in s.fields {
                assert!(names.iter().any(|(_, n)| *n == f.name()), "{} has no field {}", s.message, f.name());
                if let Field::Message(_, c) | Field::Repeated(_, c) = f {
                    visit(c, seen);
                }
            }
        }
        let mut seen = Vec::new();
        for s in [
            &LISTENER,
            &HTTP_CONNECTION_MANAGER,
            &ROUTER,
            &TCP_PROXY,
            &ROUTE_CONFIGURATION,
            &CLUSTER,
            &CLUSTER_LOAD_ASSIGNMENT,
            &HTTP_FAULT,
            &LOCAL_RATE_LIMIT,
        ] {
            visit(s, &mut seen);
        }
        assert!(seen.len() > 20, "{seen:?}");
    }
}
