//! Access logs, from an HTTP connection manager's `access_log`: where each JSON object goes
//! (stderr, stdout or a file) and which requests are logged. The filters weft honours are
//! status code comparisons, gRPC statuses, sampling (`runtime_filter`'s percentage), `and` /
//! `or`, and a CEL expression in two forms only: `xds.route_name == 'a' || ...` and
//! `xds.route_name != 'a' && ...`. Anything else is refused: a filter the proxy cannot evaluate
//! would log more or less than was asked.
use super::decode::{decode, per_million};
use super::schema;
use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, access_log, access_log_filter, comparison_filter, extension_filter,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
use envoy_types::pb::envoy::extensions::access_loggers::filters::cel::v3::ExpressionFilter;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{StderrAccessLog, StdoutAccessLog};
use prost::Name;
use serde::Serialize;
use std::path::PathBuf;

/// One access log of a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLogDef {
    pub output: LogOutput,
    /// Which requests are logged; all of them when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<LogFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogOutput {
    Stderr,
    Stdout,
    /// Appended to, created owner-only.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFilter {
    /// The status the client got, compared with `value`.
    Status {
        op: Comparison,
        value: u32,
    },
    /// A gRPC request whose status is (or, `exclude`, is not) one of these; never a request
    /// that is not gRPC.
    Grpc {
        statuses: Vec<u16>,
        exclude: bool,
    },
    /// This share of requests, drawn per request.
    Sampled {
        per_million: u32,
    },
    /// The request matched one of these routes.
    RouteIn(Vec<String>),
    /// The request matched none of these routes.
    RouteNotIn(Vec<String>),
    All(Vec<LogFilter>),
    Any(Vec<LogFilter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    Eq,
    Ne,
    Ge,
    Le,
}

const CEL_FILTER: &str = "envoy.access_loggers.extension_filters.cel";

/// Decodes a connection manager's access logs.
pub(super) fn access_logs(logs: &[AccessLog]) -> Result<Vec<AccessLogDef>, String> {
    logs.iter()
        .enumerate()
        .map(|(i, l)| access_log(l).map_err(|e| format!("access_log[{i}] ({:?}): {e}", l.name)))
        .collect()
}

fn access_log(l: &AccessLog) -> Result<AccessLogDef, String> {
    let Some(access_log::ConfigType::TypedConfig(cfg)) = &l.config_type else {
        return Err("needs a typed_config (a stderr, stdout or file access log)".into());
    };
    let output = if cfg.type_url == StderrAccessLog::type_url() {
        schema::check(&cfg.value, &schema::STDERR_ACCESS_LOG, "typed_config")?;
        LogOutput::Stderr
    } else if cfg.type_url == StdoutAccessLog::type_url() {
        schema::check(&cfg.value, &schema::STDOUT_ACCESS_LOG, "typed_config")?;
        LogOutput::Stdout
    } else if cfg.type_url == FileAccessLog::type_url() {
        schema::check(&cfg.value, &schema::FILE_ACCESS_LOG, "typed_config")?;
        let file: FileAccessLog = decode(cfg, "Listener").map_err(|e| e.reason)?;
        if !file.path.starts_with('/') {
            return Err(format!("file path {:?} is not absolute", file.path));
        }
        LogOutput::File(file.path.into())
    } else {
        return Err(format!("logger {} is not supported (stderr, stdout or file)", cfg.type_url));
    };
    let filter = l.filter.as_ref().map(filter).transpose()?;
    Ok(AccessLogDef { output, filter })
}

fn filter(f: &AccessLogFilter) -> Result<LogFilter, String> {
    use access_log_filter::FilterSpecifier as F;
    Ok(match &f.filter_specifier {
        Some(F::StatusCodeFilter(s)) => {
            let c = s.comparison.as_ref().ok_or("status_code_filter needs a comparison")?;
            let op = match comparison_filter::Op::try_from(c.op) {
                Ok(comparison_filter::Op::Eq) => Comparison::Eq,
                Ok(comparison_filter::Op::Ge) => Comparison::Ge,
                Ok(comparison_filter::Op::Le) => Comparison::Le,
                Ok(comparison_filter::Op::Ne) => Comparison::Ne,
                Err(_) => return Err(format!("status_code_filter op {} is unknown", c.op)),
            };
            LogFilter::Status { op, value: c.value.as_ref().map_or(0, |v| v.default_value) }
        }
        Some(F::GrpcStatusFilter(g)) => {
            let statuses = g
                .statuses
                .iter()
                .map(|s| u16::try_from(*s).ok().filter(|s| *s <= 16).ok_or(format!("gRPC status {s} is unknown")))
                .collect::<Result<_, _>>()?;
            LogFilter::Grpc { statuses, exclude: g.exclude }
        }
        Some(F::RuntimeFilter(r)) => {
            let share = r.percent_sampled.as_ref().ok_or("runtime_filter needs percent_sampled")?;
            LogFilter::Sampled { per_million: per_million(share) }
        }
        Some(F::AndFilter(a)) => LogFilter::All(a.filters.iter().map(filter).collect::<Result<_, _>>()?),
        Some(F::OrFilter(o)) => LogFilter::Any(o.filters.iter().map(filter).collect::<Result<_, _>>()?),
        Some(F::ExtensionFilter(e)) => {
            let Some(extension_filter::ConfigType::TypedConfig(cfg)) = &e.config_type else {
                return Err(format!("extension_filter {:?} needs a typed_config", e.name));
            };
            if cfg.type_url != ExpressionFilter::type_url() {
                return Err(format!("extension_filter {} is not supported (only {CEL_FILTER})", cfg.type_url));
            }
            schema::check(&cfg.value, &schema::CEL_FILTER, "extension_filter.typed_config")?;
            let cel: ExpressionFilter = decode(cfg, "Listener").map_err(|e| e.reason)?;
            route_expression(&cel.expression)?
        }
        _ => return Err("an access log filter needs one of the supported kinds".into()),
    })
}

/// `xds.route_name == 'a' || xds.route_name == 'b'` or `xds.route_name != 'a' && ...`.
fn route_expression(expr: &str) -> Result<LogFilter, String> {
    let unsupported = || {
        format!(
            "CEL expression {expr:?} is not supported: weft evaluates `xds.route_name == 'NAME'` joined by `||`, or `xds.route_name != 'NAME'` joined by `&&`"
        )
    };
    let (joiner, op) = if expr.contains("!=") { ("&&", "!=") } else { ("||", "==") };
    let names = expr
        .split(joiner)
        .map(|term| {
            let rest = term.trim().strip_prefix("xds.route_name")?.trim_start().strip_prefix(op)?.trim();
            let name = rest.strip_prefix('\'')?.strip_suffix('\'')?;
            (!name.is_empty() && !name.contains(['\'', '\\'])).then(|| name.to_owned())
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(unsupported)?;
    Ok(if op == "==" { LogFilter::RouteIn(names) } else { LogFilter::RouteNotIn(names) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_expressions_in_the_two_supported_forms() {
        assert_eq!(
            route_expression("xds.route_name == 'a' || xds.route_name=='b-2'"),
            Ok(LogFilter::RouteIn(vec!["a".into(), "b-2".into()]))
        );
        assert_eq!(route_expression("xds.route_name != 'a'"), Ok(LogFilter::RouteNotIn(vec!["a".into()])));
        for bad in [
            "xds.route_name == 'a' && xds.route_name == 'b'",
            "xds.route_name == 'a' || response.code == 500",
            "xds.route_name != 'a' || xds.route_name != 'b'",
            "xds.route_name == a",
            "xds.route_name == ''",
            "true",
        ] {
            assert!(route_expression(bad).is_err(), "{bad}");
        }
    }
}
