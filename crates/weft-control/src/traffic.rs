//! The mesh's own view of its traffic, from the proxies' report streams
//! ([`weft_api::report`], served by report.rs): each proxy sends its cumulative request counts every few seconds
//! and the events of the taps in force; the control plane keeps the last [`KEEP`] of counts per
//! proxy, answers `weft stat` from their differences over a window, and relays tap events to
//! whoever asked (`weft tap`, `weft top`). The control plane never connects to a proxy: the
//! streams come in on the connection each proxy holds for xDS.
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;
use weft_api::report::{ControlMessage, EdgeStats, TapEvent, TapStart, TapStop, control_message, latency_bounds};

/// How much history of counts is kept per proxy: the longest `weft stat --window`.
pub const KEEP: Duration = Duration::from_secs(15 * 60);
/// Every report of the last two minutes is kept; before that, one a minute (so a proxy's
/// history is about 40 reports, not 180).
const FINE: Duration = Duration::from_secs(120);
const COARSE: Duration = Duration::from_secs(60);
/// Tap events waiting for a slow reader; more are dropped (and counted for it).
const TAP_QUEUE: usize = 1024;

/// What the control plane knows of the proxies' traffic.
#[derive(Default)]
pub struct Traffic {
    proxies: Mutex<HashMap<String, Reporting>>,
    taps: Mutex<HashMap<String, TapSession>>,
    sessions: AtomicU64,
}

/// One proxy's report stream.
struct Reporting {
    session: u64,
    /// Its counts as reported, oldest first.
    history: VecDeque<(Instant, Vec<EdgeStats>)>,
    orders: mpsc::Sender<Result<ControlMessage, Status>>,
}

/// One `weft tap`: its order, and where its events go.
struct TapSession {
    order: TapStart,
    events: mpsc::Sender<TapEvent>,
    dropped: Arc<AtomicU64>,
}

/// What `weft stat` groups requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatBy {
    /// Requests to each service, as its instances' sidecars saw them (inbound).
    Services,
    /// Requests by route, as the callers' sidecars saw them (outbound, where routes match).
    Routes,
    /// Requests to each instance (inbound).
    Instances,
    /// Requests from each service to each, as the callers' sidecars saw them (outbound).
    Edges,
}

/// One row of `weft stat`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatRow {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Every request of the row was over mutual TLS (edges).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<bool>,
    pub requests: u64,
    /// Share of requests that succeeded (not 5xx, gRPC OK); `null` without requests.
    pub success_rate: Option<f64>,
    pub rps: f64,
    /// Latency to the response head, from the histogram buckets (as Prometheus estimates it).
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
}

#[derive(Default)]
struct Group {
    service: Option<String>,
    from: Option<String>,
    to: Option<String>,
    mtls: bool,
    requests: u64,
    failures: u64,
    rps: f64,
    buckets: Vec<u64>,
}

impl Traffic {
    /// The counts of the last `window`, grouped `by`, only rows about `name` when given.
    pub fn stat(&self, by: StatBy, name: Option<&str>, window: Duration) -> Vec<StatRow> {
        let now = Instant::now();
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        for (node, p) in proxies.iter() {
            let Some((last_at, last)) = p.history.back() else { continue };
            // The newest report at least `window` old, or the oldest there is.
            let Some((base_at, base)) = p
                .history
                .iter()
                .rev()
                .find(|(t, _)| now.saturating_duration_since(*t) >= window)
                .or(p.history.front())
                .filter(|(t, _)| t < last_at)
            else {
                continue;
            };
            let seconds = last_at.duration_since(*base_at).as_secs_f64();
            for e in last {
                let before = base.iter().find(|b| same_edge(b, e));
                let (requests, failures, buckets) = match before {
                    Some(b) if b.requests <= e.requests => (
                        e.requests - b.requests,
                        e.failures.saturating_sub(b.failures),
                        e.latency_buckets
                            .iter()
                            .zip(b.latency_buckets.iter().chain(std::iter::repeat(&0)))
                            .map(|(n, o)| n.saturating_sub(*o))
                            .collect(),
                    ),
                    _ => (e.requests, e.failures, e.latency_buckets.clone()),
                };
                let inbound = e.direction == "inbound";
                let (key, service, from, to) = match by {
                    StatBy::Services if inbound => (e.dst_service.clone(), None, None, None),
                    StatBy::Instances if inbound => (node.clone(), Some(e.dst_service.clone()), None, None),
                    StatBy::Routes if !inbound && !e.route.is_empty() => {
                        (format!("{}/{}", e.dst_service, e.route), Some(e.dst_service.clone()), None, None)
                    }
                    StatBy::Edges if !inbound => (
                        format!("{} → {}", e.src_service, e.dst_service),
                        None,
                        Some(e.src_service.clone()),
                        Some(e.dst_service.clone()),
                    ),
                    _ => continue,
                };
                let about = |n: &str| {
                    key == n
                        || service.as_deref() == Some(n)
                        || from.as_deref() == Some(n)
                        || to.as_deref() == Some(n)
                        || (by == StatBy::Routes && e.route == n)
                };
                if name.is_some_and(|n| !about(n)) {
                    continue;
                }
                let g = groups.entry(key).or_insert_with(|| Group {
                    service,
                    from,
                    to,
                    mtls: true,
                    buckets: vec![0; buckets.len()],
                    ..Default::default()
                });
                g.requests += requests;
                g.failures += failures;
                g.mtls &= !e.peer_identity.is_empty();
                if seconds > 0.0 {
                    g.rps += requests as f64 / seconds;
                }
                for (sum, n) in g.buckets.iter_mut().zip(buckets) {
                    *sum += n;
                }
            }
        }
        groups
            .into_iter()
            .map(|(name, g)| StatRow {
                name,
                mtls: (by == StatBy::Edges).then_some(g.mtls),
                requests: g.requests,
                success_rate: (g.requests > 0).then(|| 1.0 - g.failures as f64 / g.requests as f64),
                rps: g.rps,
                latency_ms_p50: quantile(&g.buckets, 0.5),
                latency_ms_p95: quantile(&g.buckets, 0.95),
                latency_ms_p99: quantile(&g.buckets, 0.99),
                service: g.service,
                from: g.from,
                to: g.to,
            })
            .collect()
    }

    /// Starts a tap: every connected proxy gets the order (proxies that connect later, when
    /// they do); events come on the returned stream until it is dropped, which stops the tap.
    pub fn tap(self: &Arc<Self>, mut order: TapStart) -> TapStream {
        order.id = format!("tap-{}", self.sessions.fetch_add(1, Ordering::Relaxed));
        let (events, rx) = mpsc::channel(TAP_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let session = TapSession { order: order.clone(), events, dropped: dropped.clone() };
        self.taps.lock().unwrap_or_else(|p| p.into_inner()).insert(order.id.clone(), session);
        self.order(control_message::Kind::Start(order.clone()));
        TapStream { traffic: self.clone(), id: order.id, events: rx, dropped }
    }

    fn order(&self, kind: control_message::Kind) {
        let msg = ControlMessage { kind: Some(kind) };
        for p in self.proxies.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = p.orders.try_send(Ok(msg.clone()));
        }
    }

    fn stop_tap(&self, id: &str) {
        self.taps.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.order(control_message::Kind::Stop(TapStop { id: id.to_owned() }));
    }

    pub(crate) fn connected(&self, node: &str, orders: mpsc::Sender<Result<ControlMessage, Status>>) -> u64 {
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        for t in self.taps.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = orders.try_send(Ok(ControlMessage { kind: Some(control_message::Kind::Start(t.order.clone())) }));
        }
        let r = Reporting { session, history: VecDeque::new(), orders };
        self.proxies.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_owned(), r);
        session
    }

    pub(crate) fn disconnected(&self, node: &str, session: u64) {
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        if proxies.get(node).is_some_and(|p| p.session == session) {
            proxies.remove(node);
        }
    }

    pub(crate) fn stats(&self, node: &str, session: u64, edges: Vec<EdgeStats>) {
        let now = Instant::now();
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = proxies.get_mut(node).filter(|p| p.session == session) else { return };
        p.history.push_back((now, edges));
        // One report older than KEEP stays, as the base of the longest window.
        while p.history.len() > 2 && p.history.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= KEEP) {
            p.history.pop_front();
        }
        let mut last_kept: Option<Instant> = None;
        p.history.retain(|(t, _)| {
            if now.duration_since(*t) < FINE {
                return true;
            }
            let keep = last_kept.is_none_or(|k| t.duration_since(k) >= COARSE);
            if keep {
                last_kept = Some(*t);
            }
            keep
        });
    }

    pub(crate) fn tap_events(&self, events: Vec<TapEvent>, dropped_by_proxy: u64) {
        let taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        if dropped_by_proxy > 0
            && let Some(t) = taps.values().next()
        {
            // A proxy's count is not per tap; with one tap (the usual case) it is that tap's.
            t.dropped.fetch_add(dropped_by_proxy, Ordering::Relaxed);
        }
        for e in events {
            if let Some(t) = taps.get(&e.tap_id)
                && t.events.try_send(e).is_err()
            {
                t.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn same_edge(a: &EdgeStats, b: &EdgeStats) -> bool {
    a.direction == b.direction
        && a.src_service == b.src_service
        && a.dst_service == b.dst_service
        && a.route == b.route
        && a.peer_identity == b.peer_identity
}

/// The `q` quantile (milliseconds) of cumulative bucket counts, interpolated within its bucket
/// as Prometheus's `histogram_quantile` does; in the last (unbounded) bucket, the highest bound.
fn quantile(cumulative: &[u64], q: f64) -> Option<f64> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let bounds: Vec<f64> = latency_bounds().collect();
    let rank = q * total as f64;
    let i = cumulative.iter().position(|c| *c as f64 >= rank)?;
    let upper = bounds[i];
    if upper.is_infinite() {
        return Some(bounds[i - 1] * 1000.0);
    }
    let (lower, below) = if i == 0 { (0.0, 0) } else { (bounds[i - 1], cumulative[i - 1]) };
    let in_bucket = (cumulative[i] - below) as f64;
    let seconds = lower + (upper - lower) * ((rank - below as f64) / in_bucket.max(1.0));
    Some(seconds * 1000.0)
}

/// A tap event as `weft tap` shows it.
pub fn event_json(e: &TapEvent) -> serde_json::Value {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let mut v = serde_json::json!({
        "time_ms": e.time_unix_ms,
        "proxy": e.node,
        "direction": e.direction,
        "method": e.method,
        "authority": opt(&e.authority),
        "path": e.path,
        "status": e.status,
        "grpc_status": (e.grpc_status >= 0).then_some(e.grpc_status),
        "latency_ms": e.latency_us as f64 / 1000.0,
        "src_service": opt(&e.src_service),
        "dst_service": e.dst_service,
        "src_identity": opt(&e.src_identity),
        "dst_identity": opt(&e.dst_identity),
        "route": opt(&e.route),
        "upstream": opt(&e.upstream),
        "attempts": e.attempts,
        "error": opt(&e.error),
        // Mutual TLS proved the other side: the caller (inbound), or the called instance.
        "mtls": if e.direction == "inbound" { !e.src_identity.is_empty() } else { !e.dst_identity.is_empty() },
    });
    if !e.headers.is_empty() {
        v["headers"] = e.headers.iter().map(|h| serde_json::json!([h.name, h.value])).collect();
    }
    v
}

/// The events of one tap; dropping it stops the tap.
pub struct TapStream {
    traffic: Arc<Traffic>,
    id: String,
    pub events: mpsc::Receiver<TapEvent>,
    /// Events left out so far: over a proxy's rate, or not read fast enough.
    pub dropped: Arc<AtomicU64>,
}

impl Drop for TapStream {
    fn drop(&mut self) {
        self.traffic.stop_tap(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(direction: &str, src: &str, dst: &str, requests: u64, failures: u64, fast: u64) -> EdgeStats {
        // `fast` requests under 0.1 ms, the rest between 0.8 and 1.6 ms.
        let buckets = latency_bounds().enumerate().map(|(i, _)| if i < 4 { fast } else { requests }).collect();
        EdgeStats {
            direction: direction.into(),
            src_service: src.into(),
            dst_service: dst.into(),
            route: "default".into(),
            peer_identity: format!("spiffe://t/ns/default/sa/{src}"),
            requests,
            failures,
            latency_buckets: buckets,
        }
    }

    #[test]
    fn stat_takes_differences_over_the_window_and_groups_them() {
        let t = Traffic::default();
        let (orders, _rx) = mpsc::channel(1);
        let s = t.connected("backend-0", orders);
        let start = Instant::now() - Duration::from_secs(70);
        let mut history = VecDeque::new();
        history.push_back((start, vec![edge("inbound", "frontend", "backend", 100, 10, 0)]));
        history.push_back((start + Duration::from_secs(10), vec![edge("inbound", "frontend", "backend", 200, 10, 0)]));
        history
            .push_back((start + Duration::from_secs(70), vec![edge("inbound", "frontend", "backend", 800, 70, 400)]));
        t.proxies.lock().unwrap().get_mut("backend-0").unwrap().history = history;
        let rows = t.stat(StatBy::Services, None, Duration::from_secs(60));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.name.as_str(), r.requests), ("backend", 600), "the last 60 s: 800 - 200");
        assert!((r.success_rate.unwrap() - 0.9).abs() < 1e-9, "{r:?}");
        assert!((r.rps - 10.0).abs() < 1e-9, "{r:?}");
        // 400 of 600 under 0.1 ms: the median is there, p95 in the 0.8-1.6 ms bucket.
        assert!(r.latency_ms_p50.unwrap() <= 0.1, "{r:?}");
        assert!((0.8..=1.6).contains(&r.latency_ms_p95.unwrap()), "{r:?}");
        assert!(t.stat(StatBy::Edges, None, Duration::from_secs(60)).is_empty(), "inbound only");
        assert_eq!(t.stat(StatBy::Instances, Some("backend"), Duration::from_secs(60))[0].name, "backend-0");
        assert!(t.stat(StatBy::Services, Some("other"), Duration::from_secs(60)).is_empty());
        // Gone with its stream; a late report of an old stream is ignored.
        t.disconnected("backend-0", s);
        t.stats("backend-0", s, vec![]);
        assert!(t.stat(StatBy::Services, None, Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn history_is_thinned_to_one_report_a_minute_after_two_minutes() {
        let t = Traffic::default();
        let (orders, _rx) = mpsc::channel(1);
        let s = t.connected("a", orders);
        let start = Instant::now() - Duration::from_secs(600);
        let history: VecDeque<_> = (0..120).map(|i| (start + Duration::from_secs(5 * i), vec![])).collect();
        t.proxies.lock().unwrap().get_mut("a").unwrap().history = history;
        t.stats("a", s, vec![]);
        let kept: Vec<Instant> = t.proxies.lock().unwrap()["a"].history.iter().map(|(at, _)| *at).collect();
        let now = Instant::now();
        let recent = kept.iter().filter(|at| now.duration_since(**at) < FINE).count();
        assert!((24..=26).contains(&recent), "every report of the last two minutes: {recent}");
        assert!(kept.len() < recent + 10, "one a minute before that: {} kept", kept.len());
        assert_eq!(kept[0], start, "the oldest stays, as the base of the longest window");
        for pair in kept.windows(2).filter(|w| now.duration_since(w[1]) >= FINE) {
            assert!(pair[1].duration_since(pair[0]) >= COARSE);
        }
    }

    #[test]
    fn a_tap_reaches_connected_and_later_proxies_and_stops_when_dropped() {
        let t = Arc::new(Traffic::default());
        let (early, mut early_rx) = mpsc::channel(4);
        t.connected("a", early);
        let mut stream = t.tap(TapStart { service: "backend".into(), ..Default::default() });
        let started = early_rx.try_recv().unwrap().unwrap();
        assert!(matches!(started.kind, Some(control_message::Kind::Start(ref o)) if o.service == "backend"));
        let (late, mut late_rx) = mpsc::channel(4);
        t.connected("b", late);
        assert!(late_rx.try_recv().is_ok(), "a proxy connecting during a tap gets it");
        let id = match started.kind {
            Some(control_message::Kind::Start(o)) => o.id,
            _ => unreachable!(),
        };
        t.tap_events(vec![TapEvent { tap_id: id.clone(), path: "/x".into(), ..Default::default() }], 3);
        assert_eq!(stream.events.try_recv().unwrap().path, "/x");
        assert_eq!(stream.dropped.load(Ordering::Relaxed), 3);
        drop(stream);
        assert!(
            matches!(early_rx.try_recv().unwrap().unwrap().kind, Some(control_message::Kind::Stop(s)) if s.id == id)
        );
    }
}
