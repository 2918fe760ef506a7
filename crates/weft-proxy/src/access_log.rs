//! Access logs: one JSON object per request, for the listeners the control plane switched them
//! on for (`Telemetry`; in xDS, the connection manager's `access_log`).
//!
//! Off the request path: a finished request's record is turned into an [`Entry`] (a few
//! pointers and the strings noted at arrival) and offered to its output's bounded queue; a
//! thread per output formats and writes. A full queue drops the entry and counts it
//! (`weft_access_log_entries_total{result="dropped"}`): a slow disk never slows traffic. A
//! listener without access logs reads one flag per request and notes nothing.
use crate::config::{AccessLogDef, Comparison, Direction, LogFilter, LogOutput};
use crate::metrics::Metrics;
use crate::record::{RequestInfo, RequestRecord};
use crate::shared::Shared;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Entries an output holds while its thread writes; more are dropped.
const QUEUE: usize = 4096;

/// A listener's access logs: for each, which requests it takes and where they go.
pub struct AccessLog {
    logs: Vec<(Option<LogFilter>, Arc<Output>)>,
}

impl AccessLog {
    /// Offers `rec` (a request with [`RequestRecord::request`] noted) to every log whose filter
    /// passes it.
    pub fn record(&self, rec: &RequestRecord) {
        let Some(info) = &rec.request else { return };
        let mut entry: Option<Entry> = None;
        for (filter, out) in &self.logs {
            if filter.as_ref().is_none_or(|f| passes(f, rec)) {
                let e = entry.get_or_insert_with(|| Entry::of(rec, info));
                out.offer(e.clone());
            }
        }
    }
}

/// Whether `rec` passes `f`.
fn passes(f: &LogFilter, rec: &RequestRecord) -> bool {
    match f {
        LogFilter::Status { op, value } => {
            let status = u32::from(rec.status);
            match op {
                Comparison::Eq => status == *value,
                Comparison::Ne => status != *value,
                Comparison::Ge => status >= *value,
                Comparison::Le => status <= *value,
            }
        }
        LogFilter::Grpc { statuses, exclude } => {
            rec.grpc && statuses.contains(&rec.grpc_status.unwrap_or(0)) != *exclude
        }
        LogFilter::Sampled { per_million } => crate::route::sampled(*per_million),
        LogFilter::RouteIn(names) => rec.route.as_deref().is_some_and(|r| names.iter().any(|n| n == r)),
        LogFilter::RouteNotIn(names) => !rec.route.as_deref().is_some_and(|r| names.iter().any(|n| n == r)),
        LogFilter::All(fs) => fs.iter().all(|f| passes(f, rec)),
        LogFilter::Any(fs) => fs.iter().any(|f| passes(f, rec)),
    }
}

/// One line of an access log.
#[derive(Clone, Serialize)]
struct Entry {
    #[serde(serialize_with = "rfc3339")]
    time: std::time::SystemTime,
    direction: Direction,
    method: String,
    authority: Option<String>,
    path: String,
    protocol: &'static str,
    status: u16,
    grpc_status: Option<u16>,
    /// From arrival until the response's end.
    duration_ms: f64,
    /// From arrival until the response head.
    response_head_ms: f64,
    /// Request body bytes received from the client.
    bytes_in: u64,
    bytes_out: u64,
    /// The endpoint of the last attempt.
    upstream: Option<SocketAddr>,
    src_service: Option<Arc<str>>,
    dst_service: Arc<str>,
    /// The caller's SPIFFE ID: the one it proved (inbound), or this proxy's (outbound).
    src_identity: Option<Arc<str>>,
    /// The called side's SPIFFE ID: the one the instance proved (outbound), or this proxy's
    /// (inbound).
    dst_identity: Option<Arc<str>>,
    route: Option<Arc<str>>,
    attempts: usize,
    /// The `x-weft-error` reason, when the proxy answered itself.
    error: Option<&'static str>,
    trace_id: Option<String>,
}

impl Entry {
    fn of(rec: &RequestRecord, info: &RequestInfo) -> Entry {
        let listener = &rec.conn.listener;
        let (src_identity, dst_identity) = match listener.direction {
            Direction::inbound => (rec.peer_identity().cloned(), listener.own_identity.clone()),
            Direction::outbound => (listener.own_identity.clone(), rec.peer_identity().cloned()),
        };
        Entry {
            time: info.time,
            direction: listener.direction,
            method: info.method.to_string(),
            authority: info.authority.as_ref().map(|a| a.to_string()),
            path: info.path.clone(),
            protocol: match info.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status: rec.status,
            grpc_status: rec.grpc_status,
            duration_ms: rec.started.elapsed().as_secs_f64() * 1000.0,
            response_head_ms: rec.head_latency.as_secs_f64() * 1000.0,
            bytes_in: info.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            bytes_out: rec.bytes_out,
            upstream: rec.attempts.last().map(|a| a.endpoint),
            src_service: rec.src_service().map(Arc::from),
            dst_service: rec.dst_service().clone(),
            src_identity,
            dst_identity,
            route: rec.route.clone(),
            attempts: rec.attempts.len(),
            error: rec.error,
            trace_id: info.trace_id.clone(),
        }
    }
}

fn rfc3339<S: serde::Serializer>(t: &std::time::SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let t = time::OffsetDateTime::from(*t);
    let text = t.format(&time::format_description::well_known::Rfc3339).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

/// Where entries go: a bounded queue to the thread that writes them.
struct Output {
    queue: SyncSender<Entry>,
    dropped: Counter,
}

impl Output {
    fn offer(&self, e: Entry) {
        match self.queue.try_send(e) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => drop(self.dropped.inc()),
        }
    }
}

/// The outputs in use, shared by every listener that logs to the same place; an output whose
/// last listener stopped logging closes (its thread ends).
#[derive(Default)]
pub struct Outputs(Shared<LogOutput, Output>);

impl Outputs {
    /// A listener's access logs from their definitions, opening the outputs they need (a file
    /// that cannot be opened fails the update).
    pub fn build(&self, defs: &[AccessLogDef], metrics: &Metrics) -> Result<Option<Arc<AccessLog>>, String> {
        if defs.is_empty() {
            return Ok(None);
        }
        let mut logs = Vec::with_capacity(defs.len());
        for def in defs {
            let out = self.0.get_or_try_start(&def.output, || Output::start(&def.output, metrics))?;
            logs.push((def.filter.clone(), out));
        }
        Ok(Some(Arc::new(AccessLog { logs })))
    }
}

impl Output {
    fn start(output: &LogOutput, metrics: &Metrics) -> Result<Output, String> {
        let sink: Box<dyn Write + Send> = match output {
            LogOutput::Stderr => Box::new(std::io::stderr()),
            LogOutput::Stdout => Box::new(std::io::stdout()),
            LogOutput::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("cannot open access log file {}: {e}", path.display()))?;
                Box::new(file)
            }
        };
        let (queue, entries) = sync_channel(QUEUE);
        let written = metrics.access_log_entries("written");
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_entries(entries, sink, written))
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        Ok(Output { queue, dropped: metrics.access_log_entries("dropped") })
    }
}

/// How long the writer lets entries gather after each write: a busy proxy wakes it about a
/// hundred times a second, not once per request.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);
/// The most one write carries: whole lines only, at most a pipe's atomic write, so lines from
/// other writers of the same stderr never cut into one.
const WRITE_MAX: usize = 4096;

/// Writes entries as they come, as many whole lines per write as fit in [`WRITE_MAX`], until
/// every listener using the output is gone.
fn write_entries(entries: Receiver<Entry>, mut sink: Box<dyn Write + Send>, written: Counter) {
    let mut batch = Vec::with_capacity(WRITE_MAX);
    let mut lines = 0;
    let mut line = Vec::with_capacity(512);
    let mut flush = |batch: &mut Vec<u8>, lines: &mut u64| {
        if batch.is_empty() {
            return;
        }
        match sink.write_all(batch) {
            Ok(()) => drop(written.inc_by(*lines)),
            Err(err) => {
                if let Some(left_out) = crate::log_limit::allow("access-log-write") {
                    tracing::warn!(error = %err, like_it_since_last_line = left_out, "cannot write access log entries (one line per 10 s)");
                }
            }
        }
        batch.clear();
        *lines = 0;
    };
    while let Ok(first) = entries.recv() {
        let mut next = Some(first);
        while let Some(e) = next {
            line.clear();
            if serde_json::to_writer(&mut line, &e).is_ok() {
                line.push(b'\n');
                if batch.len() + line.len() > WRITE_MAX {
                    flush(&mut batch, &mut lines);
                }
                batch.extend_from_slice(&line);
                lines += 1;
            }
            next = entries.try_recv().ok();
        }
        flush(&mut batch, &mut lines);
        std::thread::sleep(GATHER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{ConnCtx, ListenerInfo};

    fn record(status: u16, grpc: Option<u16>, route: &str) -> RequestRecord {
        let conn = Arc::new(ConnCtx {
            peer: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:9000".parse().unwrap(),
            listener: ListenerInfo::new("l", Direction::outbound, "backend"),
            peer_identity: None,
        });
        let mut rec = RequestRecord::start(conn);
        rec.status = status;
        rec.grpc = grpc.is_some();
        rec.grpc_status = grpc;
        rec.route = Some(route.into());
        rec
    }

    #[test]
    fn filters_decide_as_written() {
        let errors = LogFilter::Any(vec![
            LogFilter::Status { op: Comparison::Ge, value: 500 },
            LogFilter::Grpc { statuses: vec![0], exclude: true },
        ]);
        assert!(passes(&errors, &record(503, None, "r")));
        assert!(!passes(&errors, &record(404, None, "r")));
        assert!(passes(&errors, &record(200, Some(14), "r")));
        assert!(!passes(&errors, &record(200, Some(0), "r")));
        let on_a =
            LogFilter::All(vec![LogFilter::RouteIn(vec!["a".into()]), LogFilter::Sampled { per_million: 1_000_000 }]);
        assert!(passes(&on_a, &record(200, None, "a")));
        assert!(!passes(&on_a, &record(200, None, "b")));
        assert!(passes(&LogFilter::RouteNotIn(vec!["a".into()]), &record(200, None, "b")));
        assert!(!passes(&LogFilter::Sampled { per_million: 0 }, &record(200, None, "a")));
    }
}
