//! Telemetry resources as the HTTP connection managers' `access_log` (decoded by the proxy's
//! config/access_log.rs; the round trip is tested in translate/roundtrip.rs).
//!
//! A service's listeners (its instances' inbound one, and every caller's outbound one for it)
//! log as the service's Telemetry says, or the mesh's when it has none. A route's Telemetry
//! applies where routes are evaluated, on the callers' outbound listeners: requests matched by
//! that route are logged as it says, and the service's (or mesh's) log leaves them out.
use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, AndFilter, ComparisonFilter, ExtensionFilter, GrpcStatusFilter, OrFilter,
    RuntimeFilter, StatusCodeFilter, access_log, access_log_filter, comparison_filter, extension_filter,
    grpc_status_filter,
};
use envoy_types::pb::envoy::config::core::v3::RuntimeUInt32;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
use envoy_types::pb::envoy::extensions::access_loggers::filters::cel::v3::ExpressionFilter;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{StderrAccessLog, StdoutAccessLog};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::util::pack_any;
use std::collections::{BTreeMap, HashMap};
use weft_api::resource::{AccessLogSpec, HttpRouteSpec, Resource, percent_per_million};

/// The Telemetry resources in force; the first by name wins for each target.
#[derive(Debug, Default)]
pub(super) struct AccessLogs {
    mesh: Option<AccessLogSpec>,
    services: HashMap<String, AccessLogSpec>,
    /// By route name: the route's Telemetry and the services the route is for.
    routes: BTreeMap<String, (AccessLogSpec, Vec<String>)>,
}

/// Which of a listener's requests one access log takes, by the route they matched.
enum Scope<'a> {
    All,
    Route(&'a str),
    Except(Vec<&'a str>),
}

impl AccessLogs {
    pub(super) fn new<'a>(
        resources: &BTreeMap<String, Resource>,
        routes: impl Iterator<Item = (&'a str, &'a HttpRouteSpec)> + Clone,
    ) -> AccessLogs {
        let mut logs = AccessLogs::default();
        for r in resources.values() {
            let Resource::Telemetry(t) = r else { continue };
            let Some(spec) = &t.spec.access_log else { continue };
            if let Some(route) = t.spec.route() {
                let parents = routes
                    .clone()
                    .filter(|(name, _)| *name == route)
                    .flat_map(|(_, r)| r.parent_refs.iter().map(|p| p.name.clone()))
                    .collect();
                logs.routes.entry(route.to_owned()).or_insert((spec.clone(), parents));
            } else if let Some(service) = t.spec.service() {
                logs.services.entry(service.to_owned()).or_insert_with(|| spec.clone());
            } else if logs.mesh.is_none() {
                logs.mesh = Some(spec.clone());
            }
        }
        logs
    }

    /// The access logs of a listener carrying `service`'s traffic; `routed` when its requests
    /// are routed by the service's HTTPRoutes (callers' outbound listeners).
    pub(super) fn for_listener(&self, service: &str, routed: bool) -> Vec<AccessLog> {
        let own: Vec<(&str, &AccessLogSpec)> = if routed {
            let mut own: Vec<(&str, &AccessLogSpec)> = self
                .routes
                .iter()
                .filter(|(_, (_, parents))| parents.iter().any(|p| p == service))
                .map(|(name, (spec, _))| (name.as_str(), spec))
                .collect();
            own.sort_by_key(|(name, _)| *name);
            own
        } else {
            Vec::new()
        };
        let mut out: Vec<AccessLog> =
            own.iter().filter(|(_, s)| s.enabled).map(|(name, spec)| access_log(spec, Scope::Route(name))).collect();
        if let Some(base) = self.services.get(service).or(self.mesh.as_ref()).filter(|s| s.enabled) {
            let scope = if own.is_empty() { Scope::All } else { Scope::Except(own.iter().map(|(n, _)| *n).collect()) };
            out.push(access_log(base, scope));
        }
        out
    }
}

fn access_log(spec: &AccessLogSpec, scope: Scope<'_>) -> AccessLog {
    let (name, config) = match spec.output.as_deref() {
        None | Some("stderr") => ("envoy.access_loggers.stderr", pack_any(StderrAccessLog::default())),
        Some("stdout") => ("envoy.access_loggers.stdout", pack_any(StdoutAccessLog::default())),
        Some(path) => {
            ("envoy.access_loggers.file", pack_any(FileAccessLog { path: path.to_owned(), ..Default::default() }))
        }
    };
    let mut filters = Vec::new();
    if spec.errors_only {
        filters.push(filter(access_log_filter::FilterSpecifier::OrFilter(OrFilter {
            filters: vec![
                filter(access_log_filter::FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
                    comparison: Some(ComparisonFilter {
                        op: comparison_filter::Op::Ge as i32,
                        value: Some(RuntimeUInt32 { default_value: 500, runtime_key: String::new() }),
                    }),
                })),
                filter(access_log_filter::FilterSpecifier::GrpcStatusFilter(GrpcStatusFilter {
                    statuses: vec![grpc_status_filter::Status::Ok as i32],
                    exclude: true,
                })),
            ],
        })));
    }
    if spec.percentage.is_some_and(|p| p < 100.0) {
        filters.push(filter(access_log_filter::FilterSpecifier::RuntimeFilter(RuntimeFilter {
            runtime_key: "weft.access_log.percentage".to_owned(),
            percent_sampled: Some(FractionalPercent {
                numerator: percent_per_million(spec.percentage),
                denominator: fractional_percent::DenominatorType::Million as i32,
            }),
            use_independent_randomness: true,
        })));
    }
    let expression = match scope {
        Scope::All => None,
        Scope::Route(name) => Some(format!("xds.route_name == '{name}'")),
        Scope::Except(names) => {
            Some(names.iter().map(|n| format!("xds.route_name != '{n}'")).collect::<Vec<_>>().join(" && "))
        }
    };
    if let Some(expression) = expression {
        filters.push(filter(access_log_filter::FilterSpecifier::ExtensionFilter(ExtensionFilter {
            name: "envoy.access_loggers.extension_filters.cel".to_owned(),
            config_type: Some(extension_filter::ConfigType::TypedConfig(pack_any(ExpressionFilter {
                expression,
                ..Default::default()
            }))),
        })));
    }
    let filter = match filters.len() {
        0 => None,
        1 => filters.pop(),
        _ => Some(filter(access_log_filter::FilterSpecifier::AndFilter(AndFilter { filters }))),
    };
    AccessLog { name: name.to_owned(), filter, config_type: Some(access_log::ConfigType::TypedConfig(config)) }
}

fn filter(f: access_log_filter::FilterSpecifier) -> AccessLogFilter {
    AccessLogFilter { filter_specifier: Some(f) }
}
