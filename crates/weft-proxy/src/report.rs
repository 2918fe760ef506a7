//! The proxy's side of the report stream ([`weft_api::report`]): opened on the channel the xDS
//! stream uses (one connection to the control plane), it carries this proxy's request counts
//! every [`INTERVAL`] and the events of the taps the control plane orders. The control plane
//! never connects to a proxy, so `weft stat` and `weft tap` work wherever proxies run.
//!
//! Counts are the proxy's own `weft_requests_total` and `weft_request_duration_seconds` series,
//! cumulative: what `weft stat` computes agrees with what Prometheus scrapes.
//!
//! Taps: while one is in force, every request on this proxy notes what it was (as for an
//! access log) and, when its response has ended, is matched against the taps; a match within
//! the tap's rate goes to a bounded queue to the stream. Over the rate, or with the queue full,
//! events are dropped and the count reported. Without a tap a request reads one flag.
use crate::config::Direction;
use crate::metrics::Metrics;
use crate::record::RequestRecord;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::report::proxy_reports_client::ProxyReportsClient;
use weft_api::report::{
    ControlMessage, Header, Hello, ProxyMessage, Stats, TapEvent, TapEvents, TapStart, control_message, proxy_message,
};

pub use weft_api::report::INTERVAL;

/// Tap events waiting for the stream; more are dropped (and counted).
const QUEUE: usize = 1024;
/// Events in one message.
const BATCH: usize = 256;
/// The most events per second a tap may ask of one proxy.
const MAX_RATE: u32 = 1000;

/// Request headers whose values a tap never shows.
const REDACTED: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"];

/// What this proxy reports: its metrics, and the taps in force.
pub struct Reporter {
    pub metrics: Arc<Metrics>,
    pub taps: Arc<Taps>,
}

/// The taps in force on this proxy, shared by all its listeners.
#[derive(Default)]
pub struct Taps {
    on: AtomicBool,
    headers: AtomicBool,
    list: ArcSwap<Vec<Arc<Tap>>>,
    /// The current report stream's queue.
    sink: ArcSwapOption<mpsc::Sender<TapEvent>>,
    dropped: AtomicU64,
    /// This proxy's instance id.
    node: Mutex<String>,
}

struct Tap {
    order: TapStart,
    /// (second, events in it): the tap's rate, per second of wall-clock time.
    window: Mutex<(u64, u32)>,
}

impl Taps {
    /// Whether any tap is in force (one flag read).
    pub fn active(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Whether a tap in force asked for request headers.
    pub fn want_headers(&self) -> bool {
        self.headers.load(Ordering::Acquire)
    }

    fn update(&self, f: impl FnOnce(&mut Vec<Arc<Tap>>)) {
        let mut list = self.list.load().as_ref().clone();
        f(&mut list);
        self.headers.store(list.iter().any(|t| t.order.headers), Ordering::Release);
        self.on.store(!list.is_empty(), Ordering::Release);
        self.list.store(Arc::new(list));
    }

    fn apply(&self, msg: ControlMessage) {
        match msg.kind {
            Some(control_message::Kind::Start(mut order)) => {
                order.max_per_second = order.max_per_second.clamp(1, MAX_RATE);
                tracing::info!(tap = %order.id, service = %order.service, "tap started");
                let tap = Arc::new(Tap { order, window: Mutex::new((0, 0)) });
                self.update(|l| {
                    l.retain(|t| t.order.id != tap.order.id);
                    l.push(tap);
                });
            }
            Some(control_message::Kind::Stop(stop)) => {
                tracing::info!(tap = %stop.id, "tap stopped");
                self.update(|l| l.retain(|t| t.order.id != stop.id));
            }
            None => {}
        }
    }

    /// Offers a finished request to every tap it matches.
    pub fn offer(&self, rec: &RequestRecord) {
        let Some(sink) = self.sink.load_full() else { return };
        let list = self.list.load();
        for tap in list.iter().filter(|t| matches(&t.order, rec)) {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            let within_rate = {
                let mut w = tap.window.lock().unwrap_or_else(|p| p.into_inner());
                if w.0 != now.as_secs() {
                    *w = (now.as_secs(), 0);
                }
                w.1 += 1;
                w.1 <= tap.order.max_per_second
            };
            let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if !within_rate || sink.try_send(event(&tap.order, rec, now, node)).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Whether `rec` is a request `order` asks for: to its service (at the service's own sidecars)
/// or from it (at its sidecars' outbound listeners), with the path, method and callee asked.
fn matches(order: &TapStart, rec: &RequestRecord) -> bool {
    let Some(info) = &rec.request else { return false };
    let listener = &rec.conn.listener;
    let ours = match listener.direction {
        Direction::inbound => order.to.is_empty() && **rec.dst_service() == *order.service,
        Direction::outbound => {
            listener.own_service.as_deref() == Some(order.service.as_str())
                && (order.to.is_empty() || **rec.dst_service() == *order.to)
        }
    };
    ours && info.path.starts_with(&order.path_prefix)
        && (order.method.is_empty() || info.method.as_str().eq_ignore_ascii_case(&order.method))
}

fn event(order: &TapStart, rec: &RequestRecord, now: Duration, node: String) -> TapEvent {
    let info = rec.request.as_deref().expect("a tapped request was noted at arrival");
    let listener = &rec.conn.listener;
    let (src_identity, dst_identity) = match listener.direction {
        Direction::inbound => (rec.peer_identity().cloned(), listener.own_identity.clone()),
        Direction::outbound => (listener.own_identity.clone(), rec.peer_identity().cloned()),
    };
    let headers = if order.headers {
        info.headers
            .iter()
            .map(|(name, value)| Header {
                value: if REDACTED.contains(&name.as_str()) {
                    "[redacted]".into()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                },
                name: name.to_string(),
            })
            .collect()
    } else {
        Vec::new()
    };
    TapEvent {
        tap_id: order.id.clone(),
        time_unix_ms: now.as_millis() as u64,
        direction: format!("{:?}", listener.direction),
        method: info.method.to_string(),
        authority: info.authority.as_ref().map(|a| a.to_string()).unwrap_or_default(),
        path: info.path.clone(),
        status: u32::from(rec.status),
        grpc_status: rec.grpc_status.map_or(-1, i32::from),
        latency_us: rec.started.elapsed().as_micros() as u64,
        src_service: rec.src_service().unwrap_or_default().to_owned(),
        dst_service: rec.dst_service().to_string(),
        src_identity: src_identity.as_deref().unwrap_or_default().to_owned(),
        dst_identity: dst_identity.as_deref().unwrap_or_default().to_owned(),
        route: rec.route.as_deref().unwrap_or_default().to_owned(),
        error: rec.error.unwrap_or_default().to_owned(),
        node,
        upstream: rec.attempts.last().map(|a| a.endpoint.to_string()).unwrap_or_default(),
        headers,
        attempts: rec.attempts.len() as u32,
    }
}

/// Keeps a report stream open on `channel` while the xDS session lives (the task is ended
/// with it): a stream that ends or is refused is opened again after a pause. A control plane
/// without the report service is not asked again.
pub async fn run(
    channel: tonic::transport::Channel,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    reporter: Arc<Reporter>,
    hello: Hello,
) {
    loop {
        match stream(channel.clone(), bearer.clone(), &reporter, hello.clone()).await {
            Err(s) if s.code() == tonic::Code::Unimplemented => return,
            Err(s) => {
                tracing::warn!(error = %s.message(), "the control plane refused this proxy's report stream; retrying")
            }
            Ok(()) => tracing::debug!("report stream ended; opening it again"),
        }
        tokio::time::sleep(Duration::from_secs(1) + Duration::from_millis(fastrand::u64(0..1000))).await;
    }
}

/// One report stream, until it ends.
async fn stream(
    channel: tonic::transport::Channel,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    reporter: &Reporter,
    hello: Hello,
) -> Result<(), tonic::Status> {
    let with_token = move |mut req: tonic::Request<()>| {
        if let Some(b) = &bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    };
    let mut client = ProxyReportsClient::with_interceptor(channel, with_token);
    let (tx, rx) = mpsc::channel(16);
    *reporter.taps.node.lock().unwrap_or_else(|p| p.into_inner()) = hello.node.clone();
    let _ = tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Hello(hello)) }).await;
    let mut orders = client.report(ReceiverStream::new(rx)).await?.into_inner();
    let (events_tx, mut events) = mpsc::channel(QUEUE);
    let taps = &reporter.taps;
    taps.sink.store(Some(Arc::new(events_tx)));
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let msg = tokio::select! {
            _ = tick.tick() => proxy_message::Kind::Stats(Stats { edges: reporter.metrics.edge_stats() }),
            n = events.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                let dropped = taps.dropped.swap(0, Ordering::Relaxed);
                proxy_message::Kind::Tap(TapEvents { events: std::mem::take(&mut batch), dropped })
            }
            order = orders.message() => match order {
                Ok(Some(o)) => {
                    taps.apply(o);
                    continue;
                }
                Ok(None) | Err(_) => break,
            },
        };
        if tx.send(ProxyMessage { kind: Some(msg) }).await.is_err() {
            break;
        }
    }
    // No tap outlives the stream that ordered it.
    taps.sink.store(None);
    taps.update(Vec::clear);
    Ok(())
}
