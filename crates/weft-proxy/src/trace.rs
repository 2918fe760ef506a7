//! Distributed tracing: each request's trace context on a listener that traces, one span per
//! proxy hop, and the spans' export over OTLP/gRPC.
//!
//! At arrival ([`Tracer::start`]) the proxy reads the request's context: W3C `traceparent`,
//! else B3 (the single `b3` header or the `x-b3-*` ones). It continues that trace with the
//! caller's sampling decision (parent-based), or starts one and draws the decision at the
//! listener's rate. The request then goes on naming this hop's span as the parent of what
//! comes next (`traceparent`, and the B3 headers when it came with them), so the app's onward
//! calls, and the proxies they pass, continue the same trace. `tracestate` passes unchanged.
//! An app that does not copy these headers from the request it serves to the requests it
//! makes splits each trace in two.
//!
//! When the response has ended, a sampled request's record becomes one span (SERVER inbound,
//! CLIENT outbound; each attempt an event) offered to its collector's bounded queue, which a
//! task per collector sends in batches. A full queue or a failed export drops spans and counts
//! them (`weft_trace_spans_total{result="dropped"}`): a slow or absent collector never slows
//! or fails traffic. Ids come from a CSPRNG (ChaCha per thread, seeded by the OS).
use crate::config::{Direction, TracingDef};
use crate::metrics::Metrics;
use crate::record::{Outcome, RequestRecord, TraceContext, hex};
use crate::shared::Shared;
use http::{HeaderMap, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Spans waiting for export, per collector; more are dropped (and counted).
const QUEUE: usize = 2048;
/// Spans per export request.
const BATCH: usize = 512;
/// How long the first span of a batch waits for others.
const LINGER: Duration = Duration::from_millis(200);

/// A listener's tracing: its sampling rate for new traces and where its spans go.
pub struct Tracer {
    sampling_per_million: u32,
    /// The spans' `service.name`.
    service: Arc<str>,
    exporter: Arc<Exporter>,
}

/// Which B3 headers a request came with (they are updated alongside `traceparent`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum B3 {
    None,
    Single,
    Multi,
}

/// A trace and a span in it.
type Ids = ([u8; 16], [u8; 8]);

/// The context a request arrived with.
struct Received {
    /// The trace and the caller's span.
    ids: Option<Ids>,
    sampled: Option<bool>,
    b3: B3,
}

impl Tracer {
    /// Reads `headers`' context, decides, and rewrites them for the next hop.
    pub fn start(&self, headers: &mut HeaderMap) -> TraceContext {
        let got = received(headers);
        let mut rng = rand::rng();
        let sampled = got.sampled.unwrap_or_else(|| crate::route::sampled(self.sampling_per_million));
        let (trace_id, parent) = match got.ids {
            Some((trace, parent)) => (trace, Some(parent)),
            None => (nonzero(&mut rng), None),
        };
        let ctx = TraceContext { trace_id, span_id: nonzero(&mut rng), parent, sampled };
        write(&ctx, got.b3, headers);
        ctx
    }

    /// Offers a sampled request's span for export.
    pub fn finish(&self, rec: &RequestRecord) {
        let Some(ctx) = rec.trace.filter(|t| t.sampled) else { return };
        self.exporter.offer(self.service.clone(), span(rec, &ctx));
    }
}

fn nonzero<const N: usize>(rng: &mut impl Rng) -> [u8; N] {
    loop {
        let mut b = [0u8; N];
        rng.fill(&mut b[..]);
        if b != [0u8; N] {
            return b;
        }
    }
}

fn received(headers: &HeaderMap) -> Received {
    if let Some((trace, parent, sampled)) = headers.get("traceparent").and_then(|v| traceparent(v.as_bytes())) {
        let b3 = if headers.contains_key("b3") {
            B3::Single
        } else if headers.contains_key("x-b3-traceid") {
            B3::Multi
        } else {
            B3::None
        };
        return Received { ids: Some((trace, parent)), sampled: Some(sampled), b3 };
    }
    if let Some(v) = headers.get("b3") {
        let (ids, sampled) = b3_single(v.as_bytes());
        return Received { ids, sampled, b3: B3::Single };
    }
    let trace = headers.get("x-b3-traceid").and_then(|v| b3_trace_id(v.as_bytes()));
    let span = headers.get("x-b3-spanid").and_then(|v| parse_hex::<8>(v.as_bytes()));
    let debug = headers.get("x-b3-flags").is_some_and(|v| v == "1");
    let sampled = match headers.get("x-b3-sampled").map(HeaderValue::as_bytes) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    };
    let multi = headers.contains_key("x-b3-traceid") || headers.contains_key("x-b3-sampled");
    Received { ids: trace.zip(span), sampled, b3: if multi { B3::Multi } else { B3::None } }
}

/// `version-traceid-parentid-flags` (W3C Trace Context): version 00 exactly, a later version
/// by its first four fields; version ff, all-zero ids and malformed values are ignored.
fn traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], bool)> {
    if v.len() < 55 || (v.len() > 55 && (v[55] != b'-' || v.starts_with(b"00"))) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' || v.starts_with(b"ff") {
        return None;
    }
    parse_hex::<1>(&v[..2])?;
    let trace = parse_hex::<16>(&v[3..35]).filter(|t| *t != [0; 16])?;
    let parent = parse_hex::<8>(&v[36..52]).filter(|p| *p != [0; 8])?;
    let flags = parse_hex::<1>(&v[53..55])?;
    Some((trace, parent, flags[0] & 1 == 1))
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or only a decision (`0`, `1`, `d`).
fn b3_single(v: &[u8]) -> (Option<Ids>, Option<bool>) {
    let decision = |d: &[u8]| match d {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    };
    let mut parts = v.split(|b| *b == b'-');
    let first = parts.next().unwrap_or_default();
    let Some(span) = parts.next() else { return (None, decision(first)) };
    let ids = b3_trace_id(first).zip(parse_hex::<8>(span));
    (ids, parts.next().and_then(decision))
}

/// A B3 trace id: 128 bits, or 64 (the high half zero).
fn b3_trace_id(v: &[u8]) -> Option<[u8; 16]> {
    let id = match v.len() {
        32 => parse_hex::<16>(v)?,
        16 => {
            let low = parse_hex::<8>(v)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn parse_hex<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).expect("hex digits and dashes are a valid header value")
}

/// Names this hop's span as the parent of what follows.
fn write(ctx: &TraceContext, b3: B3, headers: &mut HeaderMap) {
    let (trace, span) = (hex(&ctx.trace_id), hex(&ctx.span_id));
    let flag = if ctx.sampled { "1" } else { "0" };
    headers.insert("traceparent", value(format!("00-{trace}-{span}-0{flag}")));
    match b3 {
        B3::None => {}
        B3::Single => drop(headers.insert("b3", value(format!("{trace}-{span}-{flag}")))),
        B3::Multi => {
            headers.insert("x-b3-traceid", value(trace));
            headers.insert("x-b3-spanid", value(span));
            match ctx.parent {
                Some(p) => drop(headers.insert("x-b3-parentspanid", value(hex(&p)))),
                None => drop(headers.remove("x-b3-parentspanid")),
            }
            if headers.get("x-b3-flags").is_none_or(|v| v != "1") {
                headers.insert("x-b3-sampled", HeaderValue::from_static(if ctx.sampled { "1" } else { "0" }));
            }
        }
    }
}

fn attr(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn text(key: &str, v: impl Into<String>) -> KeyValue {
    attr(key, any_value::Value::StringValue(v.into()))
}

fn int(key: &str, v: impl Into<i64>) -> KeyValue {
    attr(key, any_value::Value::IntValue(v.into()))
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A finished request as an OpenTelemetry span (HTTP semantic conventions).
fn span(rec: &RequestRecord, ctx: &TraceContext) -> Span {
    let end = SystemTime::now();
    let start = end.checked_sub(rec.started.elapsed()).unwrap_or(end);
    let listener = &rec.conn.listener;
    let mut attributes = Vec::with_capacity(16);
    let mut name = String::from("HTTP");
    if let Some(info) = &rec.request {
        name = info.method.to_string();
        attributes.push(text("http.request.method", info.method.as_str()));
        attributes.push(text("url.path", info.path.as_str()));
        if let Some(a) = &info.authority {
            attributes.push(text("server.address", a.host()));
        }
        let version = match info.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        attributes.push(text("network.protocol.version", version));
        attributes.push(int("http.request.body.size", info.bytes_in.load(std::sync::atomic::Ordering::Relaxed) as i64));
    }
    if rec.status != 0 {
        attributes.push(int("http.response.status_code", rec.status));
    }
    if let Some(s) = rec.grpc_status {
        attributes.push(int("rpc.grpc.status_code", s));
    }
    let kind = match listener.direction {
        Direction::inbound => {
            attributes.push(text("client.address", rec.conn.peer.ip().to_string()));
            span::SpanKind::Server
        }
        Direction::outbound => {
            if let Some(a) = rec.attempts.last() {
                attributes.push(text("network.peer.address", a.endpoint.ip().to_string()));
                attributes.push(int("network.peer.port", a.endpoint.port()));
            }
            span::SpanKind::Client
        }
    };
    if let Some(s) = rec.src_service() {
        attributes.push(text("weft.source.service", s));
    }
    attributes.push(text("weft.destination.service", &**rec.dst_service()));
    if let Some(p) = rec.peer_identity() {
        attributes.push(text("weft.peer.identity", &**p));
    }
    if let Some(r) = &rec.route {
        attributes.push(text("weft.route", &**r));
    }
    if let Some(e) = rec.error {
        attributes.push(text("error.type", e));
    }
    attributes.push(int("http.response.body.size", rec.bytes_out as i64));
    // Each attempt, when there was more than one or it failed: when it ended is not kept, so
    // they are stamped in order at the span's end.
    let events = if rec.attempts.len() > 1 || rec.attempts.iter().any(|a| a.outcome != Outcome::Answered) {
        rec.attempts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut attributes = vec![
                    int("weft.attempt", i as i64 + 1),
                    text("network.peer.address", a.endpoint.ip().to_string()),
                    int("network.peer.port", a.endpoint.port()),
                ];
                if let Outcome::Failed { reason, sent } = a.outcome {
                    attributes.push(text("error.type", reason));
                    attributes.push(attr("weft.request_sent", any_value::Value::BoolValue(sent)));
                }
                span::Event {
                    time_unix_nano: unix_nanos(end),
                    name: "attempt".into(),
                    attributes,
                    dropped_attributes_count: 0,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let failed = rec.failed();
    Span {
        trace_id: ctx.trace_id.to_vec(),
        span_id: ctx.span_id.to_vec(),
        parent_span_id: ctx.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: 1,
        name,
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(end),
        attributes,
        events,
        status: Some(Status {
            message: rec.error.unwrap_or_default().to_owned(),
            code: if failed { status::StatusCode::Error } else { status::StatusCode::Unset } as i32,
        }),
        ..Default::default()
    }
}

/// One collector's export: a bounded queue to the task that sends batches.
pub struct Exporter {
    queue: mpsc::Sender<(Arc<str>, Span)>,
    dropped: Counter,
}

impl Exporter {
    fn offer(&self, service: Arc<str>, span: Span) {
        if self.queue.try_send((service, span)).is_err() {
            self.dropped.inc();
        }
    }
}

/// The collectors in use, shared by every listener that exports to the same one; a collector
/// no listener uses any more is let go (its task ends after sending what it holds).
#[derive(Default)]
pub struct Exporters(Shared<(String, Duration), Exporter>);

impl Exporters {
    /// A listener's tracer from its definition; `own` names its spans' service when the
    /// definition does not.
    pub fn build(&self, def: Option<&TracingDef>, own: Option<&str>, metrics: &Metrics) -> Option<Arc<Tracer>> {
        let def = def?;
        let key = (def.collector.clone(), def.timeout);
        let started = self.0.get_or_try_start(&key, || {
            Ok::<_, std::convert::Infallible>(Exporter::start(&def.collector, def.timeout, metrics))
        });
        let Ok(exporter) = started;
        let service = if def.service_name.is_empty() { own.unwrap_or("unknown") } else { &def.service_name };
        Some(Arc::new(Tracer { sampling_per_million: def.sampling_per_million, service: service.into(), exporter }))
    }
}

impl Exporter {
    fn start(collector: &str, timeout: Duration, metrics: &Metrics) -> Exporter {
        let (queue, spans) = mpsc::channel(QUEUE);
        let (exported, dropped) = (metrics.trace_spans("exported"), metrics.trace_spans("dropped"));
        tokio::spawn(export(collector.to_owned(), timeout, spans, exported, dropped.clone()));
        Exporter { queue, dropped }
    }
}

/// Sends spans as they come, in batches, until every listener using the collector is gone.
async fn export(
    collector: String,
    timeout: Duration,
    mut spans: mpsc::Receiver<(Arc<str>, Span)>,
    exported: Counter,
    dropped: Counter,
) {
    // The target was checked when decoded (host:port), so the URI is valid.
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{collector}")) else { return };
    let mut client = TraceServiceClient::new(endpoint.connect_timeout(timeout).timeout(timeout).connect_lazy());
    let mut batch = Vec::with_capacity(BATCH);
    while spans.recv_many(&mut batch, BATCH).await > 0 {
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            let more = BATCH - batch.len();
            tokio::select! {
                n = spans.recv_many(&mut batch, more) => if n == 0 { break },
                _ = &mut linger => break,
            }
        }
        let n = batch.len() as u64;
        match client.export(request(batch.drain(..))).await {
            Ok(_) => drop(exported.inc_by(n)),
            Err(e) => {
                dropped.inc_by(n);
                if let Some(left_out) = crate::log_limit::allow("trace-export") {
                    tracing::warn!(%collector, error = %e, spans = n, like_it_since_last_line = left_out, "cannot export spans; they are dropped (one line per 10 s)");
                }
            }
        }
    }
}

/// Spans grouped by their service, each group one resource.
fn request(spans: impl Iterator<Item = (Arc<str>, Span)>) -> ExportTraceServiceRequest {
    let mut by_service: Vec<(Arc<str>, Vec<Span>)> = Vec::new();
    for (service, span) in spans {
        match by_service.iter_mut().find(|(s, _)| *s == service) {
            Some((_, v)) => v.push(span),
            None => by_service.push((service, vec![span])),
        }
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![text("service.name", &*service), text("telemetry.sdk.name", "weft")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "weft-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(per_million: u32) -> Tracer {
        let (queue, _) = mpsc::channel(1);
        let exporter = Arc::new(Exporter { queue, dropped: Counter::default() });
        Tracer { sampling_per_million: per_million, service: "svc".into(), exporter }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_str(v).unwrap())).collect()
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn continues_a_w3c_trace_with_its_decision() {
        for (flags, sampled) in [("01", true), ("00", false)] {
            let mut h = headers(&[
                ("traceparent", &format!("00-{TRACE}-00f067aa0ba902b7-{flags}")),
                ("tracestate", "vendor=x"),
            ]);
            let ctx = tracer(if sampled { 0 } else { 1_000_000 }).start(&mut h);
            assert_eq!(hex(&ctx.trace_id), TRACE);
            assert_eq!(ctx.parent.map(|p| hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
            assert_eq!(ctx.sampled, sampled, "the caller's decision wins over the rate");
            let next = h["traceparent"].to_str().unwrap();
            assert_eq!(next, format!("00-{TRACE}-{}-{flags}", hex(&ctx.span_id)));
            assert_ne!(hex(&ctx.span_id), "00f067aa0ba902b7");
            assert_eq!(h["tracestate"], "vendor=x");
        }
    }

    #[test]
    fn starts_a_trace_where_none_is_valid() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            let mut h = headers(&[("traceparent", bad)]);
            let ctx = tracer(1_000_000).start(&mut h);
            assert_eq!(ctx.parent, None, "{bad:?} is not a context");
            assert!(ctx.sampled);
            assert_ne!(hex(&ctx.trace_id), TRACE);
            assert_eq!(
                h["traceparent"].to_str().unwrap(),
                format!("00-{}-{}-01", hex(&ctx.trace_id), hex(&ctx.span_id))
            );
        }
        let never = tracer(0).start(&mut HeaderMap::new());
        assert!(!never.sampled);
        // A later version is read by its first four fields.
        let mut h = headers(&[("traceparent", &format!("01-{TRACE}-00f067aa0ba902b7-01-more"))]);
        assert_eq!(hex(&tracer(0).start(&mut h).trace_id), TRACE);
    }

    #[test]
    fn understands_and_updates_b3() {
        let mut h = headers(&[("b3", &format!("{TRACE}-00f067aa0ba902b7-1-05e3ac9a4f6e3b90"))]);
        let ctx = tracer(0).start(&mut h);
        assert_eq!((hex(&ctx.trace_id).as_str(), ctx.sampled), (TRACE, true));
        assert_eq!(h["b3"].to_str().unwrap(), format!("{TRACE}-{}-1", hex(&ctx.span_id)));
        assert!(h.contains_key("traceparent"));

        let mut h = headers(&[("b3", "0")]);
        assert!(!tracer(1_000_000).start(&mut h).sampled, "a bare decision is followed");

        let mut h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ]);
        let ctx = tracer(0).start(&mut h);
        assert_eq!(hex(&ctx.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert!(ctx.sampled);
        assert_eq!(h["x-b3-spanid"].to_str().unwrap(), hex(&ctx.span_id));
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-sampled"], "1");

        let mut h = headers(&[("x-b3-flags", "1"), ("x-b3-traceid", TRACE), ("x-b3-spanid", "00f067aa0ba902b7")]);
        assert!(tracer(0).start(&mut h).sampled, "debug means sampled");
    }
}
