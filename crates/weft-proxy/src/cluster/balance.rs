//! Clusters and load balancing. A [`Cluster`] holds the current [`EndpointSet`] of a service
//! and picks an endpoint per request or connection: power of two choices over peak-EWMA cost
//! by default, or round robin. Endpoints that just refused a connection are skipped while any
//! other endpoint is left.
use crate::app_protocol::LearnedProtocol;
use crate::clock;
use crate::cluster::endpoint::{Admitted, ClusterShared, Endpoint, PoolSettings, SWEEPS};
use crate::cluster::outlier::{self, Observed};
use crate::cluster::retry_budget::RatioBudget;
use crate::config::UpstreamTlsDef;
use crate::config::{ClusterDef, EndpointDef, HealthCheckDef, OutlierDef, RetryLimit, UpstreamProtocol};
use crate::metrics::Metrics;
use crate::transport::{Connect, TcpConnect, UpstreamTls};
use arc_swap::ArcSwap;
use arc_swap::ArcSwapOption;
use hash::HashTable;
pub use hash::key_hash;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use weft_api::resource::{DEFAULT_CONNECT_TIMEOUT, LoadBalancer};

#[derive(Default)]
pub struct EndpointSet {
    /// Healthy endpoints only.
    pub ready: Vec<Arc<Endpoint>>,
    /// Every endpoint, healthy or not, by address (so updates can reuse them).
    pub all: Vec<Arc<Endpoint>>,
    /// For `ring-hash` and `maglev`: the ready endpoints' table.
    hash: Option<HashTable>,
    /// `ready` is ordered by priority: where each priority's endpoints end in it, in order
    /// (one entry, `ready.len()`, when there is one priority).
    levels: Vec<usize>,
    /// The endpoints that stand for a peer datacenter (its mesh gateways), with the identity
    /// its instances prove: few, and none in a cluster of this datacenter's instances alone.
    peers: Vec<(std::net::SocketAddr, Arc<str>)>,
}

impl EndpointSet {
    /// The identity of a peer datacenter's instances behind endpoint `addr`, if it is one.
    pub fn peer_identity(&self, addr: std::net::SocketAddr) -> Option<Arc<str>> {
        self.peers.iter().find(|(a, _)| *a == addr).map(|(_, id)| id.clone())
    }

    fn new(all: Vec<Arc<Endpoint>>, lb: LoadBalancer) -> EndpointSet {
        let mut ready: Vec<Arc<Endpoint>> =
            all.iter().filter(|e| e.healthy.load(Ordering::Relaxed) && !e.health_check.failed()).cloned().collect();
        ready.sort_by_key(|e| e.priority);
        let mut levels: Vec<usize> = (1..ready.len()).filter(|&i| ready[i].priority != ready[i - 1].priority).collect();
        levels.push(ready.len());
        let addrs: Vec<std::net::SocketAddr> = ready.iter().map(|e| e.addr).collect();
        let hash = match lb {
            LoadBalancer::RingHash => Some(HashTable::ring(&addrs)),
            LoadBalancer::Maglev => Some(HashTable::maglev(&addrs)),
            _ => None,
        };
        let peers = all.iter().filter_map(|e| Some((e.addr, e.identity.clone()?))).collect();
        EndpointSet { ready, all, hash, levels, peers }
    }
}

#[derive(Clone)]
pub struct Settings {
    pub load_balancer: LoadBalancer,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    pub max_requests: Option<u32>,
    pub retry_limit: RetryLimit,
    pub outlier: Option<OutlierDef>,
    /// A passthrough cluster: a connection goes to its own original destination.
    pub original_dst: bool,
}

/// A cluster's settings and endpoints, replaced as one: a request reads both with a single
/// load, and an endpoint set's hash table is always the one its settings' balancer uses.
pub struct ClusterState {
    pub settings: Settings,
    pub set: Arc<EndpointSet>,
}

/// A cluster's state, read once for one request or connection: its decisions (admission,
/// replay, failover, picks) agree with each other.
pub struct ClusterView<'c> {
    pub cluster: &'c Cluster,
    state: Arc<ClusterState>,
}

impl std::ops::Deref for ClusterView<'_> {
    type Target = ClusterState;

    fn deref(&self) -> &ClusterState {
        &self.state
    }
}

impl ClusterView<'_> {
    /// Picks an endpoint not in `tried`, preferring ones that are neither failing to connect
    /// nor ejected.
    ///
    /// `hash` is the request's consistent-hash key (from the route), for `ring-hash` and
    /// `maglev`: the first usable endpoint in the table's order for it. Without one, those
    /// balancers pick at random.
    pub fn pick(&self, tried: &[std::net::SocketAddr], hash: Option<u64>) -> Option<Arc<Endpoint>> {
        let (cluster, settings, set) = (self.cluster, &self.settings, &self.set);
        let usable = |e: &&Arc<Endpoint>| !tried.contains(&e.addr);
        // Ejections count only while enough endpoints are left un-ejected (the panic
        // threshold); the count is taken only once a candidate turns out to be ejected. The
        // clock is read only for clusters with outlier detection.
        let now = settings.outlier.map(|_| clock::now());
        let panic = std::cell::OnceCell::new();
        let in_service = |e: &&Arc<Endpoint>| match (&settings.outlier, now) {
            (Some(outlier), Some(now)) if e.outlier.ejected(now) => *panic.get_or_init(|| {
                let ejected = set.ready.iter().filter(|e| e.outlier.ejected(now)).count();
                outlier::panicking(set.ready.len(), ejected, outlier.panic_threshold)
            }),
            _ => true,
        };
        let fresh = |e: &&Arc<Endpoint>| usable(e) && !e.failing() && in_service(e);
        if let (Some(table), Some(hash)) = (&set.hash, hash) {
            let mut candidates = table.candidates(hash, set.ready.len()).map(|i| &set.ready[i]).filter(|e| usable(e));
            let first = candidates.next()?;
            return Some(if fresh(&first) { first } else { candidates.find(|e| fresh(e)).unwrap_or(first) }.clone());
        }
        let lb = settings.load_balancer;
        // Priorities in order (the caller's zone, the other zones, then peer datacenters in
        // their failover order): the first with a fresh endpoint.
        let mut start = 0;
        for &end in &set.levels {
            if let Some(e) = cluster.choose(&set.ready[start..end], lb, fresh) {
                return Some(e);
            }
            start = end;
        }
        cluster.choose(&set.ready, lb, usable)
    }
}

pub struct Cluster {
    pub name: Arc<str>,
    state: ArcSwap<ClusterState>,
    /// Whether the control plane currently defines this cluster.
    pub defined: std::sync::atomic::AtomicBool,
    next: AtomicUsize,
    connector: Arc<dyn Connect>,
    /// TLS origination towards the endpoints; shared with each of them.
    tls: Arc<ArcSwapOption<UpstreamTls>>,
    /// Whether `tls` is set: read per response, without loading `tls`.
    mesh: AtomicBool,
    /// Connection limits; shared with each endpoint likewise.
    pool: Arc<PoolSettings>,
    /// Requests waiting for a connection to one of the endpoints (shared with them).
    waiting: Arc<AtomicU32>,
    /// Requests in flight, counted only while the cluster has a `max_requests` or a retry
    /// budget.
    in_flight: std::sync::atomic::AtomicU32,
    retries_in_flight: std::sync::atomic::AtomicU32,
    /// Outlier ejections so far (`weft_outlier_ejections_total`).
    ejections: Counter,
    /// Requests and retries over the window of a ratio retry budget.
    ratio_budget: RatioBudget,
    /// For a plaintext cluster that leaves the HTTP version to the client: what its upstream
    /// (a sidecar's app) speaks.
    pub learned: Arc<LearnedProtocol>,
    /// The active health check task and what it checks.
    health_check: std::sync::Mutex<Option<(HealthCheckDef, tokio::task::AbortHandle)>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((_, task)) = self.health_check.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

impl Cluster {
    fn new(name: &str, connector: Arc<dyn Connect>, ejections: Counter) -> Cluster {
        Cluster {
            name: name.into(),
            state: ArcSwap::from_pointee(ClusterState {
                settings: Settings {
                    load_balancer: LoadBalancer::default(),
                    connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                    original_dst: false,
                    protocol: UpstreamProtocol::Downstream,
                    max_requests: None,
                    retry_limit: RetryLimit::default(),
                    outlier: None,
                },
                set: Default::default(),
            }),
            defined: false.into(),
            next: AtomicUsize::new(0),
            connector,
            tls: Arc::new(ArcSwapOption::empty()),
            mesh: AtomicBool::new(false),
            pool: Default::default(),
            waiting: Default::default(),
            in_flight: Default::default(),
            retries_in_flight: Default::default(),
            ejections,
            ratio_budget: Default::default(),
            learned: Default::default(),
            health_check: Default::default(),
        }
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.state.load().set.clone()
    }

    /// Rebuilds the ready set from the endpoints' current health.
    pub fn refresh(&self) {
        self.state.rcu(|s| ClusterState {
            settings: s.settings.clone(),
            set: Arc::new(EndpointSet::new(s.set.all.clone(), s.settings.load_balancer)),
        });
    }

    /// Replaces the settings; the ready set is rebuilt if the balancer changed (its hash
    /// table goes with the balancer).
    fn set_settings(&self, settings: Settings) {
        self.state.rcu(|s| {
            let set = if s.settings.load_balancer == settings.load_balancer {
                s.set.clone()
            } else {
                Arc::new(EndpointSet::new(s.set.all.clone(), settings.load_balancer))
            };
            ClusterState { settings: settings.clone(), set }
        });
    }

    /// Starts, replaces or stops the active health check task (`def` is `None` to stop).
    /// Stopping it forgets what the checks found.
    fn set_health_check(self: &Arc<Self>, def: Option<&HealthCheckDef>) {
        let mut current = self.health_check.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().map(|(d, _)| d) == def {
            return;
        }
        if let Some((_, task)) = current.take() {
            task.abort();
        }
        if let Some(def) = def {
            let task = tokio::spawn(check_health(Arc::downgrade(self), def.clone()));
            *current = Some((def.clone(), task.abort_handle()));
        } else {
            drop(current);
            for e in &self.endpoints().all {
                e.health_check.reset();
            }
            self.refresh();
        }
    }

    /// Sets the TLS origination; connections pooled under another setting are closed.
    fn set_tls(&self, tls: Option<Arc<UpstreamTls>>) {
        let same = match (self.tls.load().as_deref(), tls.as_deref()) {
            (None, None) => true,
            (Some(a), Some(b)) => a.def == b.def,
            _ => false,
        };
        if !same {
            self.mesh.store(tls.is_some(), Ordering::Relaxed);
            self.tls.store(tls);
            for ep in &self.endpoints().all {
                ep.drop_pools();
            }
        }
    }

    /// Replaces the endpoint set, keeping existing endpoint objects (and their pools and
    /// latency estimates) for addresses that remain.
    pub fn set_endpoints(&self, defs: &[EndpointDef]) {
        let old = self.endpoints();
        let mut all = Vec::with_capacity(defs.len());
        for d in defs {
            let ep = match old
                .all
                .iter()
                .find(|e| e.addr == d.address && e.labels == d.labels && e.priority == d.priority)
            {
                Some(e) => {
                    e.healthy.store(d.healthy, Ordering::Relaxed);
                    e.clone()
                }
                None => Arc::new(Endpoint::new(
                    d.address,
                    d.healthy,
                    d.labels.clone(),
                    d.priority,
                    ClusterShared {
                        connector: self.connector.clone(),
                        tls: self.tls.clone(),
                        pool: self.pool.clone(),
                        waiting: self.waiting.clone(),
                    },
                )),
            };
            all.push(ep);
        }
        self.state.rcu(|s| ClusterState {
            settings: s.settings.clone(),
            set: Arc::new(EndpointSet::new(all.clone(), s.settings.load_balancer)),
        });
    }

    /// Counts an attempt against the cluster's `max_requests`, or refuses it at once; a
    /// request's `first` attempt also counts towards a ratio retry budget.
    pub fn admit(&self, settings: &Settings, first: bool) -> Result<Option<Admitted<'_>>, crate::error::ProxyError> {
        if let RetryLimit::Ratio { ttl, .. } = settings.retry_limit
            && first
        {
            self.ratio_budget.deposit(clock::now(), ttl);
        }
        let budget = matches!(settings.retry_limit, RetryLimit::Budget { .. });
        if settings.max_requests.is_none() && !budget {
            return Ok(None);
        }
        let (counted, admitted) = Admitted::enter(&self.in_flight);
        if let Some(limit) = settings.max_requests
            && counted >= limit
        {
            return Err(crate::error::ProxyError::Overflow { cluster: self.name.clone(), limit });
        }
        Ok(Some(admitted))
    }

    /// A retry, if the cluster's retry limit allows one more in flight; counted until dropped.
    pub fn admit_retry(&self) -> Option<Admitted<'_>> {
        let allowed = match self.state.load().settings.retry_limit {
            RetryLimit::Fixed(n) => n,
            RetryLimit::Budget { percent, min } => {
                let live = f64::from(self.in_flight.load(Ordering::Relaxed));
                ((live * percent / 100.0) as u32).max(min)
            }
            RetryLimit::Ratio { ratio, min_per_second, ttl } => {
                if !self.ratio_budget.withdraw(clock::now(), ttl, ratio, min_per_second) {
                    return None;
                }
                u32::MAX
            }
        };
        let (counted, retry) = Admitted::enter(&self.retries_in_flight);
        (counted < allowed).then_some(retry)
    }

    /// Whether the cluster's endpoints are mesh sidecars (reached through mutual TLS).
    pub fn is_mesh(&self) -> bool {
        self.mesh.load(Ordering::Relaxed)
    }

    /// Whether connections go to their own original destination (a passthrough cluster).
    pub fn original_dst(&self) -> bool {
        self.state.load().settings.original_dst
    }

    pub fn connect_timeout(&self) -> std::time::Duration {
        self.state.load().settings.connect_timeout
    }

    /// The identity the cluster's endpoints must prove (mesh clusters only); read per request
    /// only when the cluster is a mesh one.
    pub fn identity(&self) -> Option<Arc<str>> {
        if !self.is_mesh() {
            return None;
        }
        self.tls.load().as_ref().map(|t| t.identity.clone())
    }

    /// What the cluster's upstream (a sidecar's app) speaks, probed now if not yet known.
    pub async fn learn_protocol(&self) -> crate::app_protocol::Speaks {
        self.learned.learn(&*self.connector).await
    }

    /// For in-process tests: takes the plaintext endpoints for mesh sidecars.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn pretend_mesh(&self) {
        self.mesh.store(true, Ordering::Relaxed);
    }

    /// The cluster's settings and endpoints as one request (or connection) sees them.
    pub fn view(&self) -> ClusterView<'_> {
        ClusterView { cluster: self, state: self.state.load_full() }
    }

    /// Counts an attempt's result towards outlier detection (if the cluster has it), and
    /// ejects the endpoint when its failures in a row reach the limit, unless the most
    /// endpoints that may be ejected at once already are.
    pub fn observe(&self, outlier: Option<&OutlierDef>, ep: &Endpoint, what: Observed) {
        let Some(def) = outlier else { return };
        if !ep.outlier.record(def, what) {
            return;
        }
        let now = clock::now();
        let set = self.endpoints();
        let ejected = set.ready.iter().filter(|e| e.outlier.ejected(now)).count();
        if ep.outlier.ejected(now) || ejected >= outlier::max_ejected(set.ready.len(), def.max_ejection_percent) {
            ep.outlier.forgive();
            return;
        }
        let time = ep.outlier.eject(def, now);
        self.ejections.inc();
        tracing::warn!(
            cluster = %self.name,
            endpoint = %ep.addr,
            ejected_for_ms = time.as_millis() as u64,
            "endpoint ejected after failing requests in a row (outlier detection)"
        );
    }

    fn choose(
        &self,
        eps: &[Arc<Endpoint>],
        lb: LoadBalancer,
        ok: impl Fn(&&Arc<Endpoint>) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let n = eps.len();
        if n == 0 {
            return None;
        }
        match lb {
            LoadBalancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|i| &eps[(start + i) % n]).find(|e| ok(e)).cloned()
            }
            // Consistent hashing without a key picks at random too.
            LoadBalancer::Random | LoadBalancer::RingHash | LoadBalancer::Maglev => {
                let start = fastrand::usize(..n);
                (0..n).map(|i| &eps[(start + i) % n]).find(|e| ok(e)).cloned()
            }
            // One endpoint (as an inbound sidecar's app): nothing to compare.
            LoadBalancer::P2cEwma if n == 1 => ok(&&eps[0]).then(|| eps[0].clone()),
            LoadBalancer::P2cEwma => {
                // Two distinct random candidates; fall back to a scan when they are unusable.
                // The clock is read once for every cost compared.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (ea, eb) = (&eps[a], &eps[b]);
                match (ok(&ea), ok(&eb)) {
                    (true, true) => {
                        let now = clock::now();
                        Some(if eb.cost_at(now) < ea.cost_at(now) { eb } else { ea }.clone())
                    }
                    (true, false) => Some(ea.clone()),
                    (false, true) => Some(eb.clone()),
                    (false, false) => {
                        let now = clock::now();
                        eps.iter().filter(|e| ok(e)).min_by(|x, y| x.cost_at(now).total_cmp(&y.cost_at(now))).cloned()
                    }
                }
            }
        }
    }
}

/// Probes `cluster`'s endpoints until the task is aborted (the cluster's check changed or
/// went) or the cluster is gone.
async fn check_health(cluster: Weak<Cluster>, def: HealthCheckDef) {
    let mut tick = tokio::time::interval(def.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else { return };
        let set = cluster.endpoints();
        let checked = set.all.iter().filter(|e| e.healthy.load(Ordering::Relaxed));
        let probes = checked.map(|e| async { (e.clone(), e.probe(&def, &cluster.name).await) });
        let mut changed = false;
        for (ep, passed) in futures::future::join_all(probes).await {
            if ep.health_check.record(&def, passed) {
                changed = true;
                if passed {
                    tracing::info!(cluster = %cluster.name, endpoint = %ep.addr, "endpoint passes its health checks again");
                } else {
                    tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, path = ?def.http_path, "endpoint failed its health checks; not sending to it");
                }
            }
        }
        if changed {
            cluster.refresh();
        }
    }
}

/// All clusters by name. Route tables and listeners hold `Arc<Cluster>` resolved once when
/// their config is applied, so requests never look clusters up by name.
///
/// Invariant: the map holds the clusters CDS defines plus undefined ones something still
/// refers to (a route to a service that went away answers `invalid-backend`); an undefined
/// cluster has no endpoints, so no pool stays open for it, and [`ClusterManager::prune`] lets
/// it go once nothing refers to it.
pub struct ClusterManager {
    clusters: RwLock<HashMap<String, Arc<Cluster>>>,
    connector: Arc<dyn Connect>,
    metrics: Option<Arc<Metrics>>,
    /// Wakes the pool sweeper when a cluster's idle timeout may have changed.
    pools_changed: tokio::sync::Notify,
}

impl Default for ClusterManager {
    fn default() -> Self {
        ClusterManager::new(Arc::new(TcpConnect))
    }
}

impl ClusterManager {
    /// Clusters whose endpoints are reached through `connector`.
    pub fn new(connector: Arc<dyn Connect>) -> ClusterManager {
        ClusterManager { clusters: RwLock::default(), connector, metrics: None, pools_changed: Default::default() }
    }

    /// Clusters that count their outlier ejections in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> ClusterManager {
        self.metrics = Some(metrics);
        self
    }

    pub fn get(&self, name: &str) -> Arc<Cluster> {
        if let Some(c) = self.clusters.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return c.clone();
        }
        let mut w = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        w.entry(name.to_owned())
            .or_insert_with(|| {
                let ejections = self.metrics.as_ref().map(|m| m.outlier_ejections(name)).unwrap_or_default();
                Arc::new(Cluster::new(name, self.connector.clone(), ejections))
            })
            .clone()
    }

    /// The mesh cluster with an endpoint at `ip` (the first by name, when subsets share it),
    /// and that endpoint: where a transparent app's call to an instance's address goes.
    pub fn endpoint_at(&self, ip: std::net::IpAddr) -> Option<(String, Arc<Endpoint>)> {
        let clusters = self.clusters.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<(String, Arc<Endpoint>)> = clusters
            .iter()
            .filter(|(_, c)| c.defined.load(Ordering::Relaxed) && c.is_mesh())
            .filter_map(|(name, c)| Some((name.clone(), c.endpoints().all.iter().find(|e| e.addr.ip() == ip)?.clone())))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.into_iter().next()
    }

    /// The cluster of that name, if CDS defines it.
    pub fn defined(&self, name: &str) -> Option<Arc<Cluster>> {
        let clusters = self.clusters.read().unwrap_or_else(|p| p.into_inner());
        clusters.get(name).filter(|c| c.defined.load(Ordering::Relaxed)).cloned()
    }

    /// Applies a full CDS update. A cluster left out is undefined from now on and loses its
    /// endpoints (closing their pooled connections).
    pub fn update(&self, defs: &[ClusterDef], tls: &dyn Fn(&UpstreamTlsDef) -> Arc<UpstreamTls>) {
        for def in defs {
            let c = self.get(&def.name);
            c.set_tls(def.tls.as_ref().map(tls));
            c.set_settings(Settings {
                load_balancer: def.load_balancer,
                connect_timeout: def.connect_timeout,
                original_dst: def.original_dst,
                protocol: def.protocol,
                max_requests: def.max_requests,
                retry_limit: def.retry_limit,
                outlier: def.outlier,
            });
            c.set_health_check(def.health_check.as_ref());
            if **c.pool.load() != def.pool {
                c.pool.store(def.pool);
                self.pools_changed.notify_one();
            }
            if let Some(eps) = &def.static_endpoints {
                c.set_endpoints(eps);
                // A sidecar's app: learn which HTTP versions it speaks, once per address.
                if def.tls.is_none()
                    && def.protocol == UpstreamProtocol::Downstream
                    && let [ep] = eps.as_slice()
                    && c.learned.set_target(ep.address)
                    && let Ok(rt) = tokio::runtime::Handle::try_current()
                {
                    let (learned, connector) = (c.learned.clone(), c.connector.clone());
                    rt.spawn(async move { learned.learn(&*connector).await });
                }
            }
            c.defined.store(true, Ordering::Relaxed);
        }
        for (name, c) in self.clusters.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if !defs.iter().any(|d| &d.name == name) && c.defined.swap(false, Ordering::Relaxed) {
                c.set_endpoints(&[]);
            }
        }
        self.prune();
    }

    /// Forgets undefined clusters nothing refers to any more (only the map holds them).
    pub fn prune(&self) {
        self.clusters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, c| c.defined.load(Ordering::Relaxed) || Arc::strong_count(c) > 1);
    }

    /// Sweeps every endpoint's pooled HTTP/1.1 connections (see [`Endpoint::sweep_idle`]) every
    /// `min(idle_timeout / 2, 5 s)`, `idle_timeout` being the shortest of the proxy's and the
    /// clusters' own: a connection is closed after between its cluster's idle timeout and that
    /// plus one period without use, and one the upstream has closed is let go within one period.
    pub async fn sweep_pools(&self, idle_timeout: Duration) {
        let sweeps = |timeout: Duration, period: Duration| timeout.as_nanos().div_ceil(period.as_nanos()) as u64 + 1;
        loop {
            let clusters: Vec<Arc<Cluster>> =
                self.clusters.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            let shortest = clusters.iter().filter_map(|c| c.pool.load().idle_timeout).fold(idle_timeout, Duration::min);
            let period = (shortest / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                // Sooner, with the new period, when a cluster's idle timeout changed.
                _ = self.pools_changed.notified() => continue,
            }
            // Checked in between sweeps k and k+1, looked at in sweep n: idle ≥ (n - k - 1) periods.
            let now = SWEEPS.fetch_add(1, Ordering::Relaxed) + 1;
            for c in clusters {
                let max_sweeps = sweeps(c.pool.load().idle_timeout.unwrap_or(idle_timeout), period);
                for ep in &c.endpoints().all {
                    ep.sweep_idle(now, max_sweeps);
                }
            }
        }
    }
}

mod hash;

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize, lb: LoadBalancer) -> Cluster {
        let c = Cluster::new("svc", Arc::new(TcpConnect), Counter::default());
        c.set_settings(Settings {
            load_balancer: lb,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            original_dst: false,
            protocol: UpstreamProtocol::Downstream,
            max_requests: None,
            retry_limit: RetryLimit::default(),
            outlier: None,
        });
        let defs: Vec<EndpointDef> = (0..n)
            .map(|i| EndpointDef {
                address: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                healthy: i != 0,
                zone: String::new(),
                priority: 0,
                labels: Default::default(),
            })
            .collect();
        c.set_endpoints(&defs);
        c
    }

    #[test]
    fn skips_unhealthy_and_tried() {
        let c = cluster(3, LoadBalancer::RoundRobin);
        let view = c.view();
        assert_eq!(view.set.ready.len(), 2);
        let first = view.pick(&[], None).unwrap();
        let second = view.pick(&[first.addr], None).unwrap();
        assert_ne!(first.addr, second.addr);
        assert!(view.pick(&[first.addr, second.addr], None).is_none());
    }

    #[test]
    fn p2c_prefers_less_loaded() {
        let c = cluster(3, LoadBalancer::P2cEwma);
        let view = c.view();
        let busy = view.set.ready[0].clone();
        let _load: Vec<_> = (0..50).map(|_| busy.start()).collect();
        for _ in 0..100 {
            assert_ne!(view.pick(&[], None).unwrap().addr, busy.addr);
        }
    }

    /// An instance that fails at once looks fastest by latency alone; its failures must cost
    /// so that it gets no more than its fair share (here a third) of the requests.
    #[test]
    fn p2c_does_not_feed_a_fast_failing_endpoint() {
        let c = cluster(4, LoadBalancer::P2cEwma);
        let view = c.view();
        let failer = view.set.ready[0].addr;
        let mut picked = 0;
        for _ in 0..300 {
            let ep = view.pick(&[], None).unwrap();
            drop(ep.start());
            if ep.addr == failer {
                picked += 1;
                ep.attempt_failed();
            } else {
                ep.observe(Duration::from_millis(5));
            }
        }
        assert!(picked <= 100, "the failing endpoint got {picked} of 300 requests");
    }

    #[test]
    fn update_keeps_endpoint_identity() {
        let c = cluster(3, LoadBalancer::P2cEwma);
        let before = c.endpoints().all[1].clone();
        let defs: Vec<EndpointDef> = c
            .endpoints()
            .all
            .iter()
            .map(|e| EndpointDef {
                address: e.addr,
                healthy: true,
                zone: String::new(),
                labels: e.labels.clone(),
                priority: 0,
            })
            .collect();
        c.set_endpoints(&defs);
        assert!(Arc::ptr_eq(&before, &c.endpoints().all[1]));
        assert_eq!(c.endpoints().ready.len(), 3);
    }
}
