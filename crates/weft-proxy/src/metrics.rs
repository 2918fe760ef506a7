//! Prometheus metrics. Label sets are resolved once per listener ([`TrafficMetrics`]), so a
//! request only increments pre-resolved counters and histograms.
pub use crate::config::Direction;
use crate::record::{RequestRecord, TcpRecord, service_of};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    pub direction: Direction,
    pub service: String,
}

/// Who called whom over which route: the labels every golden request metric carries. Bounded
/// by the mesh's services, identities and routes (no path, no client address).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EdgeLabels {
    direction: Direction,
    src_service: SrcService,
    dst_service: Arc<str>,
    /// The SPIFFE ID mutual TLS proved of the other side: the caller inbound, the called
    /// instance outbound; empty when the peer is not authenticated.
    peer_identity: Option<Arc<str>>,
    /// The route that matched: an HTTPRoute's or GRPCRoute's name, `default` for a service's
    /// fallback route; empty when none matched.
    route: Option<Arc<str>>,
}

/// A request's labels: its edge, the status code, `success` or `failure`, and the gRPC status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    #[prometheus(flatten)]
    edge: EdgeLabels,
    code: u16,
    class: Class,
    grpc_status: Option<u16>,
}

/// A request's class: `success` or `failure` (as success rates count it, [`RequestRecord::failed`]).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values as Prometheus shows them
enum Class {
    success,
    failure,
}

/// The calling service: named (outbound, the proxy's own), or read from the caller's SPIFFE ID
/// (`spiffe://…/sa/SERVICE`) when the label is written, so a request allocates nothing for it.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
enum SrcService {
    Named(Option<Arc<str>>),
    OfIdentity(Option<Arc<str>>),
}

impl EncodeLabelValue for SrcService {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = match self {
            SrcService::Named(n) => n.as_deref(),
            SrcService::OfIdentity(id) => id.as_deref().and_then(service_of),
        };
        EncodeLabelValue::encode(&name.unwrap_or(""), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    direction: Direction,
    dst_service: Arc<str>,
    route: Option<Arc<str>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    direction: Direction,
    service: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    direction: Direction,
    service: String,
    flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdsLabels {
    type_url: String,
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    /// The request counters and latencies alone, for the report stream.
    reported: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<EdgeLabels>,
    retries: Family<RouteLabels, Counter>,
    tcp_duration: HistogramFamily<Labels>,
    errors: Family<ErrorLabels, Counter>,
    tcp_opened: Family<Labels, Counter>,
    tcp_open: Family<Labels, Gauge>,
    tcp_bytes: Family<FlowLabels, Counter>,
    xds: Family<XdsLabels, Counter>,
    cert_expiry: Gauge,
    cert_renewals: Family<ResultLabels, Counter>,
    authz: Family<AuthzLabels, Counter>,
    jwt: Family<JwtLabels, Counter>,
    ejections: Family<ServiceLabel, Counter>,
    access_log: Family<ResultLabels, Counter>,
    trace_spans: Family<ResultLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwtLabels {
    service: String,
    /// `valid`, `missing` (allowed without a token) or the refusal's reason.
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    direction: Direction,
    service: String,
    policy: String,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100µs … ~3.3s, as the report stream's buckets
    Histogram::new(weft_api::report::latency_bounds().filter(|b| b.is_finite()))
}

fn connection_histogram() -> Histogram {
    // 1ms … ~4.5h
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("weft");
        let mut reported = Registry::with_prefix("weft");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily<EdgeLabels> = Family::new_with_constructor(latency_histogram);
        let retries = Family::<RouteLabels, Counter>::default();
        let tcp_duration: HistogramFamily<Labels> = Family::new_with_constructor(connection_histogram);
        let errors = Family::<ErrorLabels, Counter>::default();
        let tcp_opened = Family::<Labels, Counter>::default();
        let tcp_open = Family::<Labels, Gauge>::default();
        let tcp_bytes = Family::<FlowLabels, Counter>::default();
        let xds = Family::<XdsLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by edge (direction, source and destination service, peer identity, route), status code, class and gRPC status",
            requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "HTTP request latency until the response head, by edge",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        reported.register("requests", "", requests.clone());
        reported.register_with_unit(
            "request_duration",
            "",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "request_retries",
            "Requests sent again (retries and failover to another endpoint), by destination service and route",
            retries.clone(),
        );
        registry.register_with_unit(
            "tcp_connection_duration",
            "How long downstream connections stayed open",
            prometheus_client::registry::Unit::Seconds,
            tcp_duration.clone(),
        );
        registry.register("proxy_errors", "Responses the proxy made itself, by reason", errors.clone());
        registry.register("tcp_connections_opened", "Downstream connections accepted", tcp_opened.clone());
        registry.register("tcp_connections_open", "Downstream connections currently open", tcp_open.clone());
        registry.register(
            "tcp_bytes",
            "Bytes forwarded on opaque TCP connections (rx: from client, tx: to client)",
            tcp_bytes.clone(),
        );
        registry.register("xds_updates", "xDS responses by type and outcome (ack or nack)", xds.clone());
        let cert_expiry = Gauge::default();
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When the proxy's certificate expires (Unix seconds; 0 before the first one)",
            cert_expiry.clone(),
        );
        let cert_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "identity_cert_renewals",
            "Certificate requests to the control plane's CA, by result (ok or failed)",
            cert_renewals.clone(),
        );
        let authz = Family::<AuthzLabels, Counter>::default();
        registry.register(
            "authz_decisions",
            "Authorization decisions by policy (default-deny: no ALLOW policy matched; none: no ALLOW policy applies) and decision",
            authz.clone(),
        );
        let jwt = Family::<JwtLabels, Counter>::default();
        registry.register(
            "jwt_authentications",
            "Inbound requests checked for a JWT, by result (valid, missing: allowed without a token, or the refusal's reason)",
            jwt.clone(),
        );
        let ejections = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "outlier_ejections",
            "Endpoints of a service ejected by outlier detection (failures in a row)",
            ejections.clone(),
        );
        let access_log = Family::<ResultLabels, Counter>::default();
        registry.register(
            "access_log_entries",
            "Access log entries by result: written, or dropped because the output's queue was full",
            access_log.clone(),
        );
        let trace_spans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Trace spans by result: exported to the collector, or dropped (its queue was full, or the export failed)",
            trace_spans.clone(),
        );
        Arc::new(Metrics {
            reported,
            access_log,
            trace_spans,
            ejections,
            authz,
            jwt,
            registry,
            requests,
            duration,
            retries,
            tcp_duration,
            errors,
            tcp_opened,
            tcp_open,
            tcp_bytes,
            xds,
            cert_expiry,
            cert_renewals,
        })
    }

    /// Every edge's request counts and latency buckets so far, from the same series `/metrics`
    /// shows (for the report stream).
    pub fn edge_stats(&self) -> Vec<weft_api::report::EdgeStats> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.reported).expect("writing to a String cannot fail");
        let bounds: Vec<f64> = weft_api::report::latency_bounds().collect();
        let mut edges: std::collections::BTreeMap<[String; 5], weft_api::report::EdgeStats> = Default::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels, value)) = sample(line) else { continue };
            let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
            let key = ["direction", "src_service", "dst_service", "route", "peer_identity"].map(label);
            let e = edges.entry(key.clone()).or_insert_with(|| {
                let [direction, src_service, dst_service, route, peer_identity] = key;
                weft_api::report::EdgeStats {
                    direction,
                    src_service,
                    dst_service,
                    route,
                    peer_identity,
                    latency_buckets: vec![0; bounds.len()],
                    ..Default::default()
                }
            });
            match name {
                "weft_requests_total" => {
                    e.requests += value as u64;
                    if label("class") == "failure" {
                        e.failures += value as u64;
                    }
                }
                "weft_request_duration_seconds_bucket" => {
                    let le = label("le");
                    let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
                    if let Some(i) = bounds.iter().position(|b| *b == le || (b - le).abs() <= b * 1e-9) {
                        e.latency_buckets[i] = value as u64;
                    }
                }
                _ => {}
            }
        }
        edges.into_values().filter(|e| e.requests > 0).collect()
    }

    /// The registry in OpenMetrics text, or (`openmetrics == false`) in the Prometheus 0.0.4
    /// text format that promtool and older scrapers read: there a counter's HELP and TYPE
    /// carry the `_total` name of its samples, and `# UNIT` / `# EOF` do not exist.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        if openmetrics {
            return out;
        }
        let counters: Vec<&str> =
            out.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
        let mut text = String::with_capacity(out.len());
        for line in out.lines() {
            if line.starts_with("# UNIT ") || line == "# EOF" {
                continue;
            }
            let meta = line
                .strip_prefix("# HELP ")
                .map(|r| ("# HELP ", r))
                .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
            match meta {
                Some((kind, rest)) if counters.iter().any(|c| rest.split(' ').next() == Some(c)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    text.push_str(&format!("{kind}{name}_total {tail}\n"));
                }
                _ => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// The counter of access log entries with `result` (written or dropped).
    pub fn access_log_entries(&self, result: &'static str) -> Counter {
        self.access_log.get_or_create(&ResultLabels { result }).clone()
    }

    /// The counter of trace spans with `result` (exported or dropped).
    pub fn trace_spans(&self, result: &'static str) -> Counter {
        self.trace_spans.get_or_create(&ResultLabels { result }).clone()
    }

    /// The ejection counter of a service's cluster (resolved once per cluster).
    pub fn outlier_ejections(&self, service: &str) -> Counter {
        self.ejections.get_or_create(&ServiceLabel { service: service.to_owned() }).clone()
    }

    pub fn xds(&self, type_url: &str, ack: bool) {
        let labels = XdsLabels { type_url: type_url.to_owned(), result: if ack { "ack" } else { "nack" } };
        self.xds.get_or_create(&labels).inc();
    }

    /// A certificate request's outcome; `not_after` (Unix seconds) when one was issued.
    pub fn certificate(&self, not_after: u64, ok: bool) {
        if ok {
            self.cert_expiry.set(not_after as i64);
        }
        self.cert_renewals.get_or_create(&ResultLabels { result: if ok { "ok" } else { "failed" } }).inc();
    }

    /// Handles for one listener's traffic: `service` is the listener's (the local one inbound,
    /// the called one outbound).
    pub fn traffic(self: &Arc<Self>, direction: Direction, service: &str) -> Arc<TrafficMetrics> {
        let labels = Labels { direction, service: service.to_owned() };
        Arc::new(TrafficMetrics {
            tcp_opened: self.tcp_opened.get_or_create_owned(&labels),
            tcp_open: self.tcp_open.get_or_create_owned(&labels),
            tcp_duration: self.tcp_duration.get_or_create_owned(&labels),
            recent: Mutex::default(),
            labels,
            root: self.clone(),
        })
    }
}

/// Metric handles for one listener's traffic.
pub struct TrafficMetrics {
    labels: Labels,
    tcp_opened: Counter,
    tcp_open: Gauge,
    tcp_duration: Histogram,
    /// The handles of the label sets this listener's requests used last, newest first: a
    /// request finds its own by comparing a few fields (its strings are mostly the same `Arc`s,
    /// compared by address first) instead of hashing its labels into two families.
    recent: Mutex<Vec<RequestHandles>>,
    root: Arc<Metrics>,
}

/// How many label sets a listener keeps handles for (more live in the families, found there).
const RECENT: usize = 8;

impl RequestLabels {
    /// Whether these are the labels of `rec` (of the listener they were made for, so of its
    /// direction), compared in place: a request allocates and hashes nothing to find them. A
    /// string equal to the request's but held apart (a listener or route table built again
    /// since) is replaced by the request's own, so the next comparison is by address.
    fn are_of(&mut self, rec: &RequestRecord, class: Class) -> bool {
        fn same(a: &mut Option<Arc<str>>, b: Option<&Arc<str>>) -> bool {
            match (a.as_mut(), b) {
                (Some(a), Some(b)) => same_str(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        fn same_str(a: &mut Arc<str>, b: &Arc<str>) -> bool {
            if Arc::ptr_eq(a, b) {
                return true;
            }
            let equal = **a == **b;
            if equal {
                *a = b.clone();
            }
            equal
        }
        let peer = rec.peer_identity();
        let e = &mut self.edge;
        self.code == rec.status
            && self.class == class
            && self.grpc_status == rec.grpc_status
            && same(&mut e.route, rec.route.as_ref())
            && same_str(&mut e.dst_service, rec.dst_service())
            && same(&mut e.peer_identity, peer)
            && match &mut e.src_service {
                SrcService::OfIdentity(p) => same(p, peer),
                SrcService::Named(n) => same(n, rec.conn.listener.own_service.as_ref()),
            }
    }
}

/// A request label set's counter and its edge's latency histogram.
struct RequestHandles {
    labels: RequestLabels,
    requests: Counter,
    duration: Histogram,
}

impl TrafficMetrics {
    /// Counts an authorization decision.
    pub fn authz(&self, decision: &Result<Option<Arc<str>>, crate::authz::Denied>) {
        let (policy, decision) = match decision {
            Ok(Some(p)) => (&**p, "allow"),
            Ok(None) => ("none", "allow"),
            Err(d) => (&*d.policy, "deny"),
        };
        let labels = AuthzLabels {
            direction: self.labels.direction,
            service: self.labels.service.clone(),
            policy: policy.to_owned(),
            decision,
        };
        self.root.authz.get_or_create(&labels).inc();
    }

    /// Counts a JWT check.
    pub fn jwt<T>(&self, outcome: &Result<Option<T>, crate::jwt::JwtError>) {
        let result = match outcome {
            Ok(Some(_)) => "valid",
            Ok(None) => "missing",
            Err(e) => e.reason(),
        };
        self.root.jwt.get_or_create(&JwtLabels { service: self.labels.service.clone(), result }).inc();
    }

    /// Counts a request from its record, once its response has ended. One whose client went
    /// away before an answer (status 0) is not a request anyone saw answered: not counted.
    pub fn request(&self, rec: &RequestRecord) {
        if let Some(reason) = rec.error {
            self.proxy_error(reason);
        }
        if rec.status == 0 {
            return;
        }
        if rec.attempts.len() > 1 {
            let l = RouteLabels {
                direction: self.labels.direction,
                dst_service: rec.dst_service().clone(),
                route: rec.route.clone(),
            };
            self.root.retries.get_or_create(&l).inc_by(rec.attempts.len() as u64 - 1);
        }
        let class = if rec.failed() { Class::failure } else { Class::success };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        match recent.iter_mut().position(|h| h.labels.are_of(rec, class)) {
            Some(i) => recent[..=i].rotate_right(1),
            None => {
                let labels = self.labels_of(rec, class);
                let found = RequestHandles {
                    requests: self.root.requests.get_or_create_owned(&labels),
                    duration: self.root.duration.get_or_create_owned(&labels.edge),
                    labels,
                };
                recent.truncate(RECENT - 1);
                recent.insert(0, found);
            }
        }
        recent[0].requests.inc();
        recent[0].duration.observe(rec.head_latency.as_secs_f64());
    }

    fn labels_of(&self, rec: &RequestRecord, class: Class) -> RequestLabels {
        let peer = rec.peer_identity().cloned();
        let edge = EdgeLabels {
            direction: self.labels.direction,
            src_service: match self.labels.direction {
                Direction::inbound => SrcService::OfIdentity(peer.clone()),
                Direction::outbound => SrcService::Named(rec.conn.listener.own_service.clone()),
            },
            dst_service: rec.dst_service().clone(),
            peer_identity: peer,
            route: rec.route.clone(),
        };
        RequestLabels { edge, code: rec.status, class, grpc_status: rec.grpc_status }
    }

    pub fn proxy_error(&self, reason: &'static str) {
        let l = ErrorLabels { direction: self.labels.direction, service: self.labels.service.clone(), reason };
        self.root.errors.get_or_create(&l).inc();
    }

    /// Counts an accepted connection; the guard keeps it in the open-connections gauge and
    /// observes how long it stayed open.
    pub fn connection(self: &Arc<Self>) -> OpenConnection {
        self.tcp_opened.inc();
        self.tcp_open.inc();
        OpenConnection(self.clone(), tokio::time::Instant::now())
    }

    /// Counts a finished TCP connection from its record.
    pub fn tcp(&self, rec: &TcpRecord) {
        if let Some(reason) = rec.error {
            self.proxy_error(reason);
        }
        for (flow, n) in [("rx", rec.rx), ("tx", rec.tx)] {
            let l = FlowLabels { direction: self.labels.direction, service: self.labels.service.clone(), flow };
            self.root.tcp_bytes.get_or_create(&l).inc_by(n);
        }
    }
}

pub struct OpenConnection(Arc<TrafficMetrics>, tokio::time::Instant);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.tcp_open.dec();
        self.0.tcp_duration.observe(self.1.elapsed().as_secs_f64());
    }
}

/// A sample's labels, unescaped.
type SampleLabels = Vec<(String, String)>;

/// One sample line of the text format: its name, labels and value.
fn sample(line: &str) -> Option<(&str, SampleLabels, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else { return Some((series, Vec::new(), value)) };
    let mut labels = Vec::new();
    let mut chars = rest.strip_suffix('}')?.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), v));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels, value))
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn samples_are_read_back_with_escaped_label_values() {
        let (name, labels, value) =
            sample(r#"weft_requests_total{route="a\"b\\c",dst_service="backend",le="+Inf"} 42"#).unwrap();
        assert_eq!((name, value), ("weft_requests_total", 42.0));
        let expected: SampleLabels = [("route", "a\"b\\c"), ("dst_service", "backend"), ("le", "+Inf")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(labels, expected);
        assert!(sample("weft_requests_total{route=\"unterminated} 1").is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{ConnCtx, ListenerInfo, PeerIdentity};

    /// More label sets than a listener keeps handles for, interleaved: each request still
    /// lands in its own series, and the edge's latency histogram counts every one.
    #[test]
    fn requests_are_counted_by_their_labels_past_the_recent_handles() {
        let metrics = Metrics::new();
        let traffic = metrics.traffic(Direction::inbound, "backend");
        let conn = |caller: &str| {
            Arc::new(ConnCtx {
                peer: "127.0.0.1:1".parse().unwrap(),
                local: "127.0.0.1:2".parse().unwrap(),
                listener: ListenerInfo::new("inbound", Direction::inbound, "backend"),
                // A new `Arc` per connection: found by value, not by address.
                peer_identity: Some(PeerIdentity(format!("spiffe://weft.local/ns/default/sa/{caller}").into())),
            })
        };
        let codes: Vec<u16> = (200..200 + RECENT as u16 + 4).collect();
        for _ in 0..3 {
            for (i, code) in codes.iter().enumerate() {
                for caller in ["frontend", "gateway"] {
                    let mut rec = RequestRecord::start(conn(caller));
                    rec.status = *code;
                    rec.route = Some("default".into());
                    // Each code gets i + 1 requests per caller per round.
                    for _ in 0..=i {
                        traffic.request(&rec);
                    }
                }
            }
        }
        let text = metrics.encode(false);
        for (i, code) in codes.iter().enumerate() {
            for caller in ["frontend", "gateway"] {
                let line = text
                    .lines()
                    .find(|l| {
                        l.starts_with("weft_requests_total{")
                            && l.contains(&format!("src_service=\"{caller}\""))
                            && l.contains(&format!("code=\"{code}\""))
                    })
                    .unwrap_or_else(|| panic!("no series for {caller} {code}:\n{text}"));
                assert!(line.ends_with(&format!(" {}", 3 * (i + 1))), "{line}");
            }
        }
        let per_caller: usize = (1..=codes.len()).sum::<usize>() * 3;
        for caller in ["frontend", "gateway"] {
            let count = text
                .lines()
                .find(|l| l.starts_with("weft_request_duration_seconds_count{") && l.contains(caller))
                .unwrap();
            assert!(count.ends_with(&format!(" {per_caller}")), "{count}");
        }
    }
}
