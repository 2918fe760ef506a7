//! The mesh's live state: applied resources and registered instances. Every change is written
//! to the store first, then applied in memory, then translated once into a new [`Snapshot`]
//! that all xDS streams watch.
use crate::ca::CaConfig;
use crate::peers::PeerRecord;
use crate::security::Security;
use crate::store::etcd::{Event, Push};
use crate::store::{Change, Store, Table, Write, jwks_key, jwks_source};
use crate::translate::{Defaults, Settings, Snapshot};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use weft_api::registry::{InstanceRegistration, ProxyStatus};
use weft_api::resource::{ApplyError, JwksSource, Kind, Resource};
use weft_api::{Instance, ServiceSummary};

pub struct Mesh {
    inner: Mutex<Inner>,
    /// The data directory: the CA's and the credentials' files.
    data_dir: std::path::PathBuf,
    /// Where this control plane serves (its name among replicas) and when it started.
    pub me: std::sync::OnceLock<(String, u64)>,
    /// How long an instance stays after its proxy's stream ended, in a shared store (while
    /// its proxy reconnects to another replica), or after a restart, in the embedded one.
    grace: Duration,
    store: Arc<Store>,
    pub security: Security,
    snapshot: watch::Sender<Arc<Snapshot>>,
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    /// By xDS stream: the node and the SHA-256 (hex) of the instance key it presented.
    proxy_keys: Mutex<BTreeMap<u64, (String, String)>>,
    /// The proxies' reported traffic and the taps in force.
    pub traffic: Arc<crate::traffic::Traffic>,
    /// By peering: how its exchanges went here.
    peer_sync: Mutex<BTreeMap<String, PeerSync>>,
}

/// When a peering's last exchange succeeded here (Unix seconds), and the error of the last one
/// if it failed.
type PeerSync = (Option<u64>, Option<String>);

#[derive(Default)]
pub(crate) struct Inner {
    pub resources: BTreeMap<String, Resource>,
    pub instances: BTreeMap<String, Entry>,
    pub settings: Settings,
    /// Peerings with other datacenters, by name.
    pub peers: BTreeMap<String, PeerRecord>,
}

pub(crate) struct Entry {
    pub instance: Instance,
    /// The xDS stream that registered the instance; only that stream's end removes it.
    stream: Option<u64>,
    /// SHA-256 (hex) of the instance key of the proxy that registered the instance: only that
    /// proxy may register the id again while the entry lives. `None` for an entry stored by a
    /// version without instance keys (then the same service suffices).
    owner: Option<String>,
    /// Set for instances restored from the store after a restart, until their proxy reconnects.
    stale_until: Option<Instant>,
}

/// An instance as the store keeps it: what the registry shows, and its owner (see [`Entry`]).
#[derive(serde::Deserialize)]
struct Stored {
    #[serde(flatten)]
    instance: Instance,
    #[serde(default, rename = "ownerKeySha256")]
    owner: Option<String>,
}

#[derive(serde::Serialize)]
struct StoredRef<'a> {
    #[serde(flatten)]
    instance: &'a Instance,
    #[serde(rename = "ownerKeySha256", skip_serializing_if = "Option::is_none")]
    owner: Option<&'a str>,
}

/// A resource as the store keeps it (JSON).
fn stored_resource(json: &str) -> Result<Resource, String> {
    let value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Resource::from_json(0, value).map_err(|e| e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Outcome of applying one resource.
#[derive(Debug, serde::Serialize)]
pub struct Applied {
    pub kind: Kind,
    pub name: String,
    pub action: &'static str,
}

impl Mesh {
    /// The mesh of a control plane with the embedded store in `dir`.
    pub fn open(dir: &Path, grace: Duration, ca: CaConfig, defaults: Defaults) -> anyhow::Result<Mesh> {
        Mesh::with_store(Arc::new(Store::embedded(dir)?), dir, grace, ca, defaults)
    }

    /// The mesh as `store` holds it; `dir` holds the CA and the credentials.
    pub fn with_store(
        store: Arc<Store>,
        dir: &Path,
        grace: Duration,
        ca: CaConfig,
        defaults: Defaults,
    ) -> anyhow::Result<Mesh> {
        let security = Security::open(dir, ca, store.clone())?;
        let settings = Settings {
            bundle: security.ca.bundle(),
            defaults,
            trust_domain: security.ca.config().trust_domain.clone(),
            namespace: security.ca.config().namespace.clone(),
            jwks: Default::default(),
            vips: Default::default(),
            datacenter: security.ca.config().datacenter.clone(),
            peers: Default::default(),
        };
        let mut inner = Inner { settings, ..Default::default() };
        let mut vips = BTreeMap::new();
        for (service, ip) in store.load(Table::Vips)? {
            let ip = ip.parse().map_err(|_| anyhow::anyhow!("stored virtual IP {ip:?} of {service} is invalid"))?;
            vips.insert(service, ip);
        }
        inner.settings.vips = Arc::new(vips);
        for (key, text) in store.load(Table::Jwks)? {
            if let Some(source) = jwks_source(&key) {
                inner.settings.jwks.insert(source, text.into());
            }
        }
        for (name, json) in store.load(Table::Peers)? {
            let record: PeerRecord =
                serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("stored peering {name} is invalid: {e}"))?;
            inner.peers.insert(name, record);
        }
        inner.settings.peers = Arc::new(inner.imports());
        for (key, json) in store.load(Table::Resources)? {
            let r = stored_resource(&json).map_err(|e| anyhow::anyhow!("stored resource {key} is invalid: {e}"))?;
            inner.resources.insert(key, r);
        }
        // Restored after a restart, an instance waits a grace period for its proxy. In a
        // shared store, instances live by the leases of the replicas holding them.
        let stale_until = (!store.shared()).then(|| Instant::now() + grace);
        for (id, json) in store.load(Table::Instances)? {
            let Stored { mut instance, owner } = serde_json::from_str(&json)?;
            instance.connected = false;
            inner.instances.insert(id, Entry { instance, stream: None, owner, stale_until });
        }
        tracing::info!(
            resources = inner.resources.len(),
            instances = inner.instances.len(),
            "restored state from {}",
            if store.shared() { "etcd".to_owned() } else { dir.display().to_string() }
        );
        let snapshot = inner.snapshot(1, None);
        let mesh = Mesh {
            inner: Mutex::new(inner),
            data_dir: dir.to_owned(),
            me: Default::default(),
            grace,
            store,
            security,
            snapshot: watch::Sender::new(Arc::new(snapshot)),
            proxies: Mutex::default(),
            proxy_keys: Mutex::default(),
            traffic: Default::default(),
            peer_sync: Mutex::default(),
        };
        // Restored services without a virtual IP (stored by an older version) get one.
        mesh.publish(&mut mesh.lock());
        Ok(mesh)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds and publishes the snapshot. Called with the state lock held, so snapshots are
    /// published in the order of the changes that caused them.
    fn publish(&self, inner: &mut Inner) {
        self.allocate_vips(inner);
        let previous = self.snapshot.borrow().clone();
        let snap = inner.snapshot(previous.version + 1, Some(&previous));
        self.snapshot.send_replace(Arc::new(snap));
    }

    /// Gives every service without one a virtual IP, stored before it is used. An address
    /// that cannot be stored is not handed out (the service gets one at the next change).
    fn allocate_vips(&self, inner: &mut Inner) {
        let names = inner.service_names();
        if names.iter().all(|n| inner.settings.vips.contains_key(n)) {
            return;
        }
        let mut vips = (*inner.settings.vips).clone();
        for name in names {
            if vips.contains_key(&name) {
                continue;
            }
            let used: BTreeSet<std::net::Ipv4Addr> = vips.values().copied().collect();
            let Some(vip) = crate::translate::vip_for(&name, &used) else {
                tracing::error!(service = %name, "every virtual IP is in use; the service cannot be reached by name from transparent instances");
                continue;
            };
            if let Err(e) = self.store.write(&[Write::PutVip(&name, &vip.to_string())]) {
                tracing::error!(service = %name, error = %e, "cannot store the service's virtual IP");
                continue;
            }
            vips.insert(name, vip);
        }
        inner.settings.vips = Arc::new(vips);
    }

    /// Validates references and stores all resources, or none. `jwks`: the keys the
    /// resources' JWKS sources were read to (see [`crate::jwks::load_for_apply`]).
    ///
    /// A reference to a service that does not exist is accepted, as Gateway API and
    /// Kubernetes accept one: the service may be declared or start later (a mesh file's
    /// instances register after its resources are applied). It is reported in the resource's
    /// status ([`Mesh::resources_with_status`]) until then.
    pub fn apply(
        &self,
        resources: Vec<Resource>,
        jwks: Vec<(JwksSource, Arc<str>)>,
    ) -> Result<Vec<Applied>, ApplyError> {
        let mut inner = self.lock();
        // A service takes one TrafficPolicy: a second one would contradict or silently shadow it.
        let mut policy_of: BTreeMap<String, String> = inner
            .resources
            .values()
            .filter_map(|r| match r {
                Resource::TrafficPolicy(o) => Some((o.spec.target_ref.key(), o.metadata.name.clone())),
                _ => None,
            })
            .collect();
        for (doc, r) in resources.iter().enumerate() {
            let Resource::TrafficPolicy(o) = r else { continue };
            let target = o.spec.target_ref.key();
            if o.spec.target_ref.targets_route() {
                let name = &o.spec.target_ref.name;
                let exists = |r: &Resource| matches!(r, Resource::HttpRoute(h) if h.metadata.name == *name);
                if !inner.resources.values().any(exists) && !resources.iter().any(exists) {
                    return Err(ApplyError::new(
                        doc,
                        "spec.targetRef.name",
                        format!("HTTPRoute {name:?} does not exist; apply it first"),
                    ));
                }
            }
            match policy_of.get(&target) {
                Some(other) if *other != o.metadata.name => {
                    return Err(ApplyError::new(
                        doc,
                        "spec.targetRef.name",
                        format!(
                            "{target} already has TrafficPolicy {other:?}; it takes one TrafficPolicy: put these settings in {other:?}, or delete it first"
                        ),
                    ));
                }
                _ => drop(policy_of.insert(target, o.metadata.name.clone())),
            }
        }
        let mut applied = Vec::new();
        let mut writes = Vec::new();
        let encoded: Vec<(String, String)> = resources
            .iter()
            .map(|r| (r.key(), serde_json::to_string(r).expect("resources always serialize")))
            .collect();
        for (r, (key, json)) in resources.iter().zip(&encoded) {
            let action = match inner.resources.get(key) {
                None => "created",
                Some(old) if old == r => "unchanged",
                Some(_) => "configured",
            };
            applied.push(Applied { kind: r.kind(), name: r.name().to_owned(), action });
            writes.push(Write::PutResource(key, json));
        }
        let jwks_keys: Vec<Option<String>> = jwks.iter().map(|(s, _)| jwks_key(s)).collect();
        for ((_, text), key) in jwks.iter().zip(&jwks_keys) {
            if let Some(key) = key {
                writes.push(Write::PutJwks(key, text));
            }
        }
        self.store
            .write(&writes)
            .map_err(|e| ApplyError::new(0, "", format!("control plane could not store the change: {e}")))?;
        for r in resources {
            inner.resources.insert(r.key(), r);
        }
        inner.settings.jwks.extend(jwks);
        self.publish(&mut inner);
        Ok(applied)
    }

    /// Whether this control plane does what must happen once in the mesh (see [`Store::leads`]).
    pub fn leads(&self) -> bool {
        self.store.leads()
    }

    /// The mesh-wide modes (`weft control --mtls`, `--egress`, `--mesh-gateway-mode`).
    pub fn defaults(&self) -> crate::translate::Defaults {
        self.lock().settings.defaults
    }

    pub fn has_jwks(&self, source: &JwksSource) -> bool {
        self.lock().settings.jwks.contains_key(source)
    }

    /// Keys read from `source` (here, or by the replica that reads them); stored, and
    /// published only if they changed.
    pub fn set_jwks(&self, source: JwksSource, text: Arc<str>) {
        let mut inner = self.lock();
        if inner.settings.jwks.get(&source) == Some(&text) {
            return;
        }
        if let Some(key) = jwks_key(&source)
            && let Err(e) = self.store.write(&[Write::PutJwks(&key, &text)])
        {
            tracing::warn!(source = ?source, error = %e, "cannot store the JWKS read; it is served from memory");
        }
        tracing::info!(source = ?source, "JWKS changed; pushing it to the sidecars");
        inner.settings.jwks.insert(source, text);
        self.publish(&mut inner);
    }

    /// Forgets keys no resource uses any more (in the store too, where this control plane is
    /// the one that reads them).
    pub fn retain_jwks(&self, keep: impl Fn(&JwksSource) -> bool) {
        let mut inner = self.lock();
        let gone: Vec<String> = inner.settings.jwks.keys().filter(|s| !keep(s)).filter_map(jwks_key).collect();
        inner.settings.jwks.retain(|s, _| keep(s));
        if self.store.leads() && !gone.is_empty() {
            let deletes: Vec<Write> = gone.iter().map(|k| Write::DeleteJwks(k)).collect();
            if let Err(e) = self.store.write(&deletes) {
                tracing::warn!(error = %e, "cannot forget unused JWKS in the store");
            }
        }
    }

    pub fn delete(&self, kind: Kind, name: &str) -> anyhow::Result<bool> {
        let mut inner = self.lock();
        let key = weft_api::resource::key(kind, name);
        if !inner.resources.contains_key(&key) {
            return Ok(false);
        }
        self.store.write(&[Write::DeleteResource(&key)])?;
        inner.resources.remove(&key);
        self.publish(&mut inner);
        Ok(true)
    }

    pub fn resources(&self, kind: Kind) -> Vec<Resource> {
        self.lock().resources.values().filter(|r| r.kind() == kind).cloned().collect()
    }

    /// The resources of `kind` as the API shows them: one that refers to services that do
    /// not exist (yet) has a `status.unresolvedRefs` naming each (the field and the service),
    /// as Gateway API reports a `BackendNotFound` reference.
    pub fn resources_with_status(&self, kind: Kind) -> Vec<serde_json::Value> {
        let inner = self.lock();
        let known = inner.service_names();
        let shown = inner.resources.values().filter(|r| r.kind() == kind).map(|r| {
            let mut v = serde_json::to_value(r).expect("resources always serialize");
            let unresolved: Vec<serde_json::Value> = r
                .service_refs()
                .into_iter()
                .filter(|(_, svc)| !known.contains(*svc))
                .map(|(field, svc)| {
                    let message = format!(
                        "service {svc:?} does not exist (yet); start an instance of it or apply a Service named {svc:?}"
                    );
                    serde_json::json!({"field": field, "service": svc, "reason": "BackendNotFound", "message": message})
                })
                .collect();
            if !unresolved.is_empty() {
                v["status"] = serde_json::json!({ "unresolvedRefs": unresolved });
            }
            v
        });
        shown.collect()
    }

    /// Registers (or re-registers) the instance behind an xDS stream. An id that is registered
    /// already (connected, or restored after a restart and awaiting its proxy) may only be
    /// registered again by the proxy that holds it: same service, same instance key (`key`).
    /// So a reconnecting proxy gets its id back, and nobody else can take it over.
    pub fn connect(
        &self,
        id: &str,
        registration: InstanceRegistration,
        stream: u64,
        key: Option<&str>,
    ) -> Result<(), String> {
        let mut inner = self.lock();
        let owner = key.map(|k| hex(ring::digest::digest(&ring::digest::SHA256, k.as_bytes()).as_ref()));
        if let Some(held) = inner.instances.get(id) {
            let service = held.instance.registration.service.as_deref().unwrap_or("-");
            let same_service = held.instance.registration.service == registration.service;
            let same_proxy = held.owner.is_none() || held.owner == owner;
            if !(same_service && same_proxy) {
                tracing::warn!(instance = id, held_by = service, refused = ?registration.service, "registration of an instance id held by another proxy refused");
                return Err(format!(
                    "instance id {id:?} is held by another proxy (an instance of service {service:?}{}); give this instance an id of its own (--id), or stop the other proxy first",
                    if held.stream.is_some() { "" } else { ", expected back after the control plane's restart" },
                ));
            }
        }
        let healthy = registration.healthy;
        let instance = Instance { id: id.to_owned(), registration, healthy, connected: true };
        let entry = Entry { instance, stream: Some(stream), owner, stale_until: None };
        self.persist(&entry);
        tracing::info!(instance = id, service = ?entry.instance.registration.service, healthy, "instance registered");
        inner.instances.insert(id.to_owned(), entry);
        self.publish(&mut inner);
        Ok(())
    }

    /// The xDS stream of an instance ended: its proxy stopped, crashed or lost the connection.
    /// With a shared store, the instance stays for the grace period: its proxy may be
    /// reconnecting to another replica (this one may be stopping), which then holds it.
    pub fn disconnect(&self, id: &str, stream: u64) {
        let mut inner = self.lock();
        let Some(entry) = inner.instances.get_mut(id).filter(|e| e.stream == Some(stream)) else { return };
        if self.store.shared() {
            entry.stream = None;
            entry.stale_until = Some(Instant::now() + self.grace);
            return;
        }
        self.remove_locked(&mut inner, id, "xDS stream closed");
    }

    /// Removes an instance on request (a clean stop). Returns whether it existed.
    pub fn deregister(&self, id: &str) -> bool {
        let mut inner = self.lock();
        if !inner.instances.contains_key(id) {
            return false;
        }
        self.remove_locked(&mut inner, id, "deregistered");
        true
    }

    fn remove_locked(&self, inner: &mut Inner, id: &str, why: &str) {
        if let Err(e) = self.store.write(&[Write::DeleteInstance(id)]) {
            tracing::error!(instance = id, error = %e, "cannot remove instance from the store");
        }
        inner.instances.remove(id);
        tracing::info!(instance = id, why, "instance removed");
        self.publish(inner);
    }

    /// The service of a registered instance (`Some(None)` for one without a service).
    pub fn instance_service(&self, id: &str) -> Option<Option<String>> {
        self.lock().instances.get(id).map(|e| e.instance.registration.service.clone())
    }

    pub fn set_health(&self, id: &str, healthy: bool) -> bool {
        let mut inner = self.lock();
        let Some(entry) = inner.instances.get_mut(id) else { return false };
        if entry.instance.healthy != healthy {
            entry.instance.healthy = healthy;
            entry.instance.registration.healthy = healthy;
            self.persist(entry);
            tracing::info!(instance = id, healthy, "health changed");
            self.publish(&mut inner);
        }
        true
    }

    /// Writes an instance: as held here if its proxy's stream is here, else as an update of
    /// whoever holds it.
    fn persist(&self, entry: &Entry) {
        let stored = StoredRef { instance: &entry.instance, owner: entry.owner.as_deref() };
        let json = serde_json::to_string(&stored).expect("instances always serialize");
        let id = &entry.instance.id;
        let write =
            if entry.stream.is_some() { Write::PutInstance(id, &json) } else { Write::UpdateInstance(id, &json) };
        if let Err(e) = self.store.write(&[write]) {
            tracing::error!(instance = %entry.instance.id, error = %e, "cannot store instance");
        }
    }

    /// Every connected weft proxy's metrics endpoint, as Prometheus HTTP service discovery
    /// lists target groups: one per proxy, labelled with its id (`instance`), service (`app`;
    /// a gateway's from its certificate), `version` and `zone`. An admin endpoint on an
    /// unspecified address (`0.0.0.0:PORT`) is listed at the instance's own address.
    pub fn scrape_targets(&self) -> Vec<serde_json::Value> {
        let certs: BTreeMap<String, String> =
            self.security.certificates().into_iter().map(|c| (c.instance, c.identity)).collect();
        let proxies = self.proxies();
        let inner = self.lock();
        let mut targets: Vec<serde_json::Value> = proxies
            .iter()
            .filter(|p| p.weft)
            .filter_map(|p| {
                let admin: std::net::SocketAddr = p.admin.as_deref()?.parse().ok()?;
                let inbound = inner.instances.get(&p.node).and_then(|e| e.instance.registration.inbound.as_deref());
                let admin = match inbound.and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
                    Some(inbound) if admin.ip().is_unspecified() => {
                        std::net::SocketAddr::new(inbound.ip(), admin.port())
                    }
                    _ => admin,
                };
                let app = p.service.clone().or_else(|| {
                    let id = certs.get(&p.node)?;
                    Some(id.rsplit_once("/sa/")?.1.to_owned())
                });
                let mut labels = serde_json::json!({"instance": p.node});
                for (name, value) in
                    [("app", app.as_ref()), ("version", p.labels.get("version")), ("zone", p.labels.get("zone"))]
                {
                    if let Some(v) = value {
                        labels[name] = v.as_str().into();
                    }
                }
                Some(serde_json::json!({"targets": [admin.to_string()], "labels": labels}))
            })
            .collect();
        targets.sort_by(|a, b| a["labels"]["instance"].as_str().cmp(&b["labels"]["instance"].as_str()));
        targets
    }

    pub fn services(&self) -> Vec<ServiceSummary> {
        self.snapshot.borrow().services.values().cloned().collect()
    }

    /// Instances of `service`, or `None` if no such service is known.
    pub fn endpoints(&self, service: &str) -> Option<Vec<Instance>> {
        let inner = self.lock();
        if !inner.service_names().contains(service) {
            return None;
        }
        let selector = inner.resources.values().find_map(|r| match r {
            Resource::Service(o) if o.metadata.name == service => o.spec.selector.clone(),
            _ => None,
        });
        let of_service = inner.instances.values().map(|e| &e.instance).filter(|i| match &selector {
            Some(sel) => sel.selects(i.registration.service.as_deref(), &i.registration.labels),
            None => i.registration.service.as_deref() == Some(service),
        });
        Some(of_service.cloned().collect())
    }

    /// Everything in force on `service`: its settings (with defaults filled in), the routes
    /// attached to it and those sending traffic to it, and the policies that apply to it.
    /// `None` if no such service is known.
    pub fn in_force(&self, service: &str) -> Option<serde_json::Value> {
        let inner = self.lock();
        if !inner.service_names().contains(service) {
            return None;
        }
        let snapshot = self.snapshot.borrow().clone();
        let mut spec = None;
        let (mut attached, mut routed_from, mut authz, mut authn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut traffic = None;
        for r in inner.resources.values() {
            let refs = r.service_refs();
            let names = |prefix: &str| refs.iter().any(|(path, s)| path.starts_with(prefix) && *s == service);
            match r {
                Resource::Service(o) if o.metadata.name == service => spec = Some(o.spec.clone()),
                Resource::HttpRoute(_) | Resource::GrpcRoute(_) => {
                    let entry = serde_json::json!({"kind": r.kind(), "name": r.name()});
                    if names("spec.parentRefs") {
                        attached.push(entry);
                    } else if refs.iter().any(|(_, s)| *s == service) {
                        routed_from.push(entry);
                    }
                }
                Resource::TrafficPolicy(o)
                    if !o.spec.target_ref.targets_route() && o.spec.target_ref.name == service =>
                {
                    traffic = Some(serde_json::json!({"name": o.metadata.name, "spec": o.spec}));
                }
                Resource::AuthorizationPolicy(o) if o.spec.service.as_deref().is_none_or(|s| s == service) => {
                    authz.push(serde_json::json!({"name": o.metadata.name, "action": o.spec.action}));
                }
                Resource::RequestAuthentication(o) if o.spec.service.as_deref().is_none_or(|s| s == service) => {
                    authn.push(o.metadata.name.clone());
                }
                _ => {}
            }
        }
        // Policies for one of the attached routes.
        for route in &mut attached {
            let policy = inner.resources.values().find_map(|r| match r {
                Resource::TrafficPolicy(o)
                    if o.spec.target_ref.targets_route() && route["name"] == *o.spec.target_ref.name =>
                {
                    Some(serde_json::json!({"name": o.metadata.name, "spec": o.spec}))
                }
                _ => None,
            });
            if let Some(p) = policy {
                route["trafficPolicy"] = p;
            }
        }
        let declared = spec.is_some();
        let spec = spec.unwrap_or_default();
        Some(serde_json::json!({
            "service": service,
            "declared": declared,
            "protocol": spec.protocol.as_str(),
            "loadBalancer": spec.load_balancer.as_str(),
            "consistentHash": spec.consistent_hash,
            "connectTimeout": format!("{}ms", spec.connect_timeout.unwrap_or(weft_api::resource::DEFAULT_CONNECT_TIMEOUT).as_millis()),
            "mtls": snapshot.mtls(service),
            "meshGatewayMode": inner.settings.defaults.mesh_gateway_of(Some(&spec)),
            "selector": spec.selector,
            "routes": attached,
            "routedFrom": routed_from,
            "trafficPolicy": traffic,
            "authorizationPolicies": authz,
            "requestAuthentications": authn,
        }))
    }

    pub fn proxy_update(&self, stream: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.proxies.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&stream) {
            f(p)
        }
    }

    /// A weft proxy's xDS stream opened; `key` is the instance key it presented.
    pub fn proxy_connected(&self, stream: u64, status: ProxyStatus, key: Option<&str>) {
        if let Some(k) = key {
            let digest = hex(ring::digest::digest(&ring::digest::SHA256, k.as_bytes()).as_ref());
            self.proxy_keys.lock().unwrap_or_else(|p| p.into_inner()).insert(stream, (status.node.clone(), digest));
        }
        self.proxies.lock().unwrap_or_else(|p| p.into_inner()).insert(stream, status);
    }

    pub fn proxy_gone(&self, stream: u64) {
        self.proxy_keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&stream);
        self.proxies.lock().unwrap_or_else(|p| p.into_inner()).remove(&stream);
    }

    /// Whether `node` has an xDS stream open that presented instance key `key`: a proof, for
    /// its other streams, that they are that proxy's.
    pub fn owns(&self, node: &str, key: &str) -> bool {
        let digest = hex(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref());
        self.proxy_keys.lock().unwrap_or_else(|p| p.into_inner()).values().any(|(n, d)| n == node && *d == digest)
    }

    /// Every registered instance, connected or not.
    pub fn instances(&self) -> Vec<Instance> {
        self.lock().instances.values().map(|e| e.instance.clone()).collect()
    }

    /// A backup of the mesh as this control plane holds it now (see [`crate::backup`]).
    pub fn backup(&self) -> crate::backup::Backup {
        let inner = self.lock();
        let mut tables = BTreeMap::new();
        let resources = inner
            .resources
            .iter()
            .map(|(k, r)| (k.clone(), serde_json::to_string(r).expect("resources always serialize")));
        tables.insert(Table::Resources.name().to_owned(), resources.collect());
        let vips = inner.settings.vips.iter().map(|(s, ip)| (s.clone(), ip.to_string()));
        tables.insert(Table::Vips.name().to_owned(), vips.collect());
        let peers = inner
            .peers
            .iter()
            .map(|(name, p)| (name.clone(), serde_json::to_string(p).expect("peerings always serialize")));
        tables.insert(Table::Peers.name().to_owned(), peers.collect());
        drop(inner);
        let tokens = self
            .security
            .tokens()
            .into_iter()
            .map(|t| (t.id.clone(), serde_json::to_string(&t).expect("tokens always serialize")));
        tables.insert(Table::Tokens.name().to_owned(), tokens.collect());
        crate::backup::Backup::new(tables, &self.data_dir)
    }

    /// This control plane as a replica, now.
    pub fn replica(&self) -> weft_api::registry::Replica {
        let (address, started) = self.me.get().cloned().unwrap_or_default();
        weft_api::registry::Replica {
            address,
            started,
            proxies: self.proxies().len(),
            leader: self.store.leads(),
            healthy: self.store.readable().is_ok(),
        }
    }

    /// Every replica of this control plane (itself alone with the embedded store).
    pub async fn replicas(&self) -> anyhow::Result<Vec<weft_api::registry::Replica>> {
        match &*self.store {
            Store::Etcd(s) => s.replicas().await,
            Store::Embedded(_) => Ok(vec![self.replica()]),
        }
    }

    /// With etcd: stands for election, and says what this replica is every 2 s (under its
    /// lease, so it is gone from `weft get replicas` when the replica is).
    pub async fn announce(self: Arc<Self>) {
        let Store::Etcd(s) = &*self.store else { return };
        let address = self.replica().address;
        let campaign = s.campaign(address);
        let announce = async {
            loop {
                if let Err(e) = s.announce(&self.replica()).await {
                    tracing::debug!(error = %e, "cannot announce this replica in etcd");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        };
        tokio::join!(campaign, announce);
    }

    /// Whether the store answers.
    pub fn store_readable(&self) -> anyhow::Result<()> {
        self.store.readable()
    }

    /// Waits until every change made so far is durable (see [`Store::flushed`]): what the API
    /// does before it answers that a change was made.
    pub async fn flushed(&self) -> anyhow::Result<()> {
        self.store.flushed().await
    }

    /// Changes found in the shared store (made by any replica, this one included), applied
    /// here unless they are already so, and published once: a replica catching up with
    /// thousands of registrations builds one snapshot for all that arrived together.
    fn changed(&self, batch: Vec<Change>) {
        let mut inner = self.lock();
        let mut any = false;
        for c in batch {
            any |= self.apply_change(&mut inner, c);
        }
        if any {
            self.publish(&mut inner);
        }
    }

    /// Applies one change from the shared store; whether anything changed here.
    fn apply_change(&self, inner: &mut Inner, c: Change) -> bool {
        match c.table {
            Table::Resources => match c.value.as_deref().map(stored_resource) {
                Some(Ok(r)) if inner.resources.get(&c.key) != Some(&r) => {
                    inner.resources.insert(c.key.clone(), r);
                    true
                }
                Some(Ok(_)) => false,
                Some(Err(e)) => {
                    tracing::error!(key = %c.key, error = %e, "a resource in etcd is invalid; ignored");
                    false
                }
                None => inner.resources.remove(&c.key).is_some(),
            },
            Table::Instances => self.instance_changed(inner, &c),
            Table::Vips => match c.value.as_deref().map(str::parse::<std::net::Ipv4Addr>) {
                Some(Ok(ip)) if inner.settings.vips.get(&c.key) != Some(&ip) => {
                    let mut vips = (*inner.settings.vips).clone();
                    vips.insert(c.key.clone(), ip);
                    inner.settings.vips = Arc::new(vips);
                    true
                }
                _ => false,
            },
            Table::Tokens => {
                self.security.token_changed(&c.key, c.value.as_deref());
                false
            }
            Table::Jwks => match (jwks_source(&c.key), c.value) {
                (Some(source), Some(text)) if inner.settings.jwks.get(&source).map(|t| &**t) != Some(text.as_str()) => {
                    inner.settings.jwks.insert(source, text.into());
                    true
                }
                _ => false,
            },
            Table::Peers => {
                match c.value.as_deref().map(serde_json::from_str::<PeerRecord>) {
                    Some(Ok(r)) => drop(inner.peers.insert(c.key.clone(), r)),
                    Some(Err(e)) => {
                        tracing::error!(peer = %c.key, error = %e, "a peering in etcd is invalid; ignored");
                        return false;
                    }
                    None => drop(inner.peers.remove(&c.key)),
                }
                inner.refresh_imports()
            }
        }
    }

    /// An instance written or removed by a replica. Its record in etcd is the truth, but
    /// for what only this replica knows: whether its proxy's stream is here.
    fn instance_changed(&self, inner: &mut Inner, c: &Change) -> bool {
        let Some(json) = &c.value else {
            return match inner.instances.get(&c.key) {
                // Removed while its proxy is connected here (this replica's lease was lost,
                // or the lease it was under was another's): written again, under this one's.
                Some(e) if e.stream.is_some() => {
                    self.persist(e);
                    false
                }
                Some(_) => {
                    inner.instances.remove(&c.key);
                    tracing::info!(instance = %c.key, "instance removed (by another replica, or its lease expired)");
                    true
                }
                None => false,
            };
        };
        let Ok(Stored { instance, owner }) = serde_json::from_str::<Stored>(json) else {
            tracing::error!(instance = %c.key, "an instance in etcd is invalid; ignored");
            return false;
        };
        match inner.instances.get_mut(&c.key) {
            Some(e) => {
                if !c.ours {
                    // Its proxy is connected to another replica now: no stream here ends it.
                    e.stream = None;
                }
                let changed = e.instance != instance || e.owner != owner;
                if changed {
                    (e.instance, e.owner, e.stale_until) = (instance, owner, None);
                }
                changed
            }
            None => {
                inner.instances.insert(c.key.clone(), Entry { instance, stream: None, owner, stale_until: None });
                true
            }
        }
    }

    /// Writes again every instance whose proxy is connected here (under a new lease).
    fn rewrite_held(&self) {
        let inner = self.lock();
        for e in inner.instances.values().filter(|e| e.stream.is_some()) {
            self.persist(e);
        }
    }

    /// Every peering.
    pub fn peers(&self) -> Vec<PeerRecord> {
        self.lock().peers.values().cloned().collect()
    }

    pub fn peer(&self, name: &str) -> Option<PeerRecord> {
        self.lock().peers.get(name).cloned()
    }

    /// Stores a peering (new, or changed by its exchange) and puts what it imports in force.
    pub fn put_peer(&self, record: PeerRecord) -> anyhow::Result<()> {
        let mut inner = self.lock();
        if inner.peers.get(&record.name) == Some(&record) {
            return Ok(());
        }
        let json = serde_json::to_string(&record).expect("peerings always serialize");
        self.store.write(&[Write::PutPeer(&record.name, &json)])?;
        inner.peers.insert(record.name.clone(), record);
        if inner.refresh_imports() {
            self.publish(&mut inner);
        }
        Ok(())
    }

    /// Forgets a peering and everything it imported. Returns whether it existed.
    pub fn delete_peer(&self, name: &str) -> anyhow::Result<bool> {
        let mut inner = self.lock();
        if !inner.peers.contains_key(name) {
            return Ok(false);
        }
        self.store.write(&[Write::DeletePeer(name)])?;
        inner.peers.remove(name);
        if inner.refresh_imports() {
            self.publish(&mut inner);
        }
        Ok(true)
    }

    /// Notes an exchange with `peer`: a success (`error` None) or why it failed.
    pub fn peer_synced(&self, peer: &str, error: Option<String>) {
        let mut sync = self.peer_sync.lock().unwrap_or_else(|p| p.into_inner());
        let entry = sync.entry(peer.to_owned()).or_default();
        if error.is_none() {
            entry.0 = Some(crate::ca::unix(std::time::SystemTime::now()));
        }
        entry.1 = error;
    }

    /// The last successful exchange with `peer` and the last error since.
    pub fn peer_sync(&self, peer: &str) -> PeerSync {
        self.peer_sync.lock().unwrap_or_else(|p| p.into_inner()).get(peer).cloned().unwrap_or_default()
    }

    /// What this datacenter tells peer `peer`: its identity, roots and serving mesh gateways,
    /// and the services exported to that peer with how many of their own instances serve
    /// (never what this datacenter imports itself: no traffic goes round between peers).
    pub fn state_for_peer(&self, peer: &str) -> weft_api::peering::PeerState {
        let inner = self.lock();
        let snapshot = self.snapshot.borrow().clone();
        let mut exported: BTreeSet<&str> = BTreeSet::new();
        for r in inner.resources.values() {
            if let Resource::ExportedServices(o) = r {
                exported.extend(o.spec.to_peer(peer));
            }
        }
        let services = exported
            .into_iter()
            .map(|name| {
                let s = snapshot.services.get(name);
                weft_api::peering::ExportedState {
                    name: name.to_owned(),
                    healthy: s.map_or(0, |s| s.healthy as u32),
                    instances: s.map_or(0, |s| s.instances as u32),
                }
            })
            .collect();
        let gateways = inner
            .instances
            .values()
            .map(|e| &e.instance)
            .filter(|i| i.serving() && i.registration.service.as_deref() == Some(weft_api::peering::MESH_GATEWAY))
            .filter_map(|i| i.registration.inbound.clone())
            .collect();
        let s = &inner.settings;
        weft_api::peering::PeerState {
            datacenter: s.datacenter.clone(),
            trust_domain: s.trust_domain.clone(),
            namespace: s.namespace.clone(),
            roots: s.bundle.clone(),
            gateways,
            services,
        }
    }

    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Publishes the CA's current trust bundle (after a rotation step or a root's retirement).
    pub fn refresh_bundle(&self) {
        let mut inner = self.lock();
        inner.settings.bundle = self.security.ca.bundle();
        self.publish(&mut inner);
    }

    /// Connected weft proxies that have not acknowledged the current trust bundle yet.
    pub fn proxies_without_bundle(&self) -> Vec<String> {
        let want = self.snapshot.borrow().bundle_version();
        let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        proxies
            .values()
            .filter(|p| p.weft && p.trust_bundle.as_deref() != Some(&want))
            .map(|p| p.node.clone())
            .collect()
    }

    /// `weft ca rotate`: trust a new root everywhere, then sign with it. The new root signs
    /// only once every connected proxy holds the bundle that trusts it (or after `wait`), so
    /// no proxy meets a certificate it cannot verify.
    /// With replicas, each step is shared through the store: the others trust the new root
    /// (and push it to their proxies) at once, and sign with it when this one does; if this
    /// one is gone by then, they finish the rotation after `wait`.
    pub async fn rotate(&self, overlap: Duration, wait: Duration) -> anyhow::Result<RotateReport> {
        let new_root = self.security.ca.begin_rotation(overlap, wait)?;
        if let Err(e) = self.store.secrets_changed(&self.data_dir, Push::NewRotation).await {
            // Not shared: undone here, as if it never started.
            self.store.pull_secrets(&self.data_dir).await?;
            self.security.ca.reload()?;
            return Err(e);
        }
        self.refresh_bundle();
        let deadline = Instant::now() + wait;
        let mut lagging = self.proxies_without_bundle();
        while !lagging.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            lagging = self.proxies_without_bundle();
        }
        if !lagging.is_empty() {
            tracing::warn!(
                ?lagging,
                "proxies did not acknowledge the new trust bundle in time; activating the new root anyway"
            );
        }
        self.finish_rotation().await?;
        Ok(RotateReport { new_root, lagging, overlap_secs: overlap.as_secs() })
    }

    /// The new root signs from now on, here and (through the store) at every replica.
    async fn finish_rotation(&self) -> anyhow::Result<()> {
        if let Err(e) = self.security.ca.activate_next() {
            // Another replica finished it first (its files replaced these): take its result.
            self.store.pull_secrets(&self.data_dir).await?;
            anyhow::ensure!(self.store.shared() && self.security.ca.reload().is_ok(), e);
            self.refresh_bundle();
            return Ok(());
        }
        self.refresh_bundle();
        self.store.secrets_changed(&self.data_dir, Push::All).await
    }

    /// Another replica changed the mesh's secrets (a rotation's step): read them again.
    async fn secrets_changed(&self) {
        let reloaded = async {
            self.store.pull_secrets(&self.data_dir).await?;
            self.security.ca.reload()
        };
        match reloaded.await {
            Ok(true) => {
                tracing::info!(root = %self.security.ca.root_fingerprint(), "the CA changed at another replica; its bundle is pushed to the proxies");
                self.refresh_bundle();
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the CA as another replica changed it"),
        }
    }

    /// Drops instances whose proxies did not come back within the grace period (after a
    /// restart; with a shared store, after their stream here ended).
    fn expire(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let expired: Vec<String> = inner
            .instances
            .iter()
            .filter(|(_, e)| e.stale_until.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if self.store.shared() {
                // Removed here when etcd says so: not if another replica holds it by now.
                if let Err(e) = self.store.write(&[Write::ReleaseInstance(&id)]) {
                    tracing::error!(instance = %id, error = %e, "cannot release instance in the store");
                }
                if let Some(e) = inner.instances.get_mut(&id) {
                    e.stale_until = None;
                }
                continue;
            }
            self.remove_locked(&mut inner, &id, "proxy did not reconnect after control plane restart");
        }
    }
}

impl Inner {
    /// The snapshot of this state, reusing what is unchanged since `previous`.
    fn snapshot(&self, version: u64, previous: Option<&Snapshot>) -> Snapshot {
        let registered: Vec<&Instance> = self.instances.values().map(|e| &e.instance).collect();
        Snapshot::build(&self.resources, &registered, &self.settings, version, previous)
    }

    /// What the peerings import, by peering name.
    fn imports(&self) -> BTreeMap<String, weft_api::peering::PeerState> {
        self.peers.iter().filter_map(|(name, r)| Some((name.clone(), r.imports()?.clone()))).collect()
    }

    /// Puts the peerings' imports in the settings; whether they changed.
    fn refresh_imports(&mut self) -> bool {
        let imports = self.imports();
        if *self.settings.peers == imports {
            return false;
        }
        self.settings.peers = Arc::new(imports);
        true
    }

    /// Services that exist: declared by a Service resource or registered by an instance.
    pub fn service_names(&self) -> BTreeSet<String> {
        let declared = self.resources.values().filter(|r| r.kind() == Kind::Service).map(|r| r.name().to_owned());
        let registered = self.instances.values().filter_map(|e| e.instance.registration.service.clone());
        declared.chain(registered).collect()
    }
}

/// What `weft ca rotate` reports.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotateReport {
    pub new_root: String,
    /// Proxies that had not acknowledged the new bundle when the new root began to sign.
    pub lagging: Vec<String>,
    pub overlap_secs: u64,
}

/// Applies what the shared store's watch reports, in its order, for as long as the process
/// runs (nothing to do with the embedded store).
pub async fn follow_store(mesh: Arc<Mesh>) {
    let Some(mut events) = mesh.store.take_changes() else { return };
    let mut next = events.recv().await;
    while let Some(ev) = next.take() {
        match ev {
            Event::Changed(c) => {
                // With the changes already waiting behind it (up to a bound), in order.
                let mut batch = vec![c];
                while batch.len() < 4096 {
                    match events.try_recv() {
                        Ok(Event::Changed(c)) => batch.push(c),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                mesh.changed(batch);
            }
            Event::LeaseRenewed => mesh.rewrite_held(),
            Event::Secrets => mesh.secrets_changed().await,
        }
        if next.is_none() {
            next = events.recv().await;
        }
    }
}

pub async fn expire_stale(mesh: Arc<Mesh>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        mesh.expire();
        if mesh.security.ca.expire_retired() {
            mesh.refresh_bundle();
            if let Err(e) = mesh.store.secrets_changed(&mesh.data_dir, Push::All).await {
                tracing::warn!(error = %e, "cannot share the CA's retired roots");
            }
        }
        // A rotation whose replica did not finish it (gone, or restarted) is finished by the
        // elected replica.
        if mesh.store.leads() && mesh.security.ca.rotation_due() {
            tracing::warn!("a CA rotation was not finished in time by the replica that started it; finishing it here");
            if let Err(e) = mesh.finish_rotation().await {
                tracing::error!(error = %e, "cannot finish the CA rotation");
            }
        }
        if mesh.store.leads() {
            mesh.security.sweep_tokens();
        }
        mesh.security.forget_expired();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Mesh {
        let ca = CaConfig {
            trust_domain: "test.local".into(),
            datacenter: "dc1".into(),
            namespace: "default".into(),
            cert_ttl: Duration::from_secs(3600),
            provided: None,
        };
        Mesh::open(dir, Duration::from_secs(60), ca, Default::default()).unwrap()
    }

    fn reg(service: &str) -> InstanceRegistration {
        InstanceRegistration {
            service: Some(service.into()),
            inbound: Some("127.0.0.1:1".into()),
            app: None,
            admin: None,
            labels: Default::default(),
            upstreams: vec![],
            capture: None,
            mesh_gateway_local: None,
            healthy: true,
        }
    }

    fn service_of(mesh: &Mesh, id: &str) -> Option<String> {
        mesh.instance_service(id).flatten()
    }

    #[test]
    fn an_instance_id_stays_with_the_proxy_that_registered_it() {
        let dir = std::env::temp_dir().join(format!("weft-state-test-{}", fastrand::u64(..)));
        let mesh = open(&dir);
        mesh.connect("b-1", reg("b"), 1, Some("key-b")).unwrap();
        // Another service's proxy, or another proxy of the same service, cannot take the id.
        let e = mesh.connect("b-1", reg("a"), 2, Some("key-a")).unwrap_err();
        assert!(e.contains("\"b-1\" is held by another proxy") && e.contains("service \"b\""), "{e}");
        assert!(mesh.connect("b-1", reg("b"), 3, Some("key-other")).is_err());
        assert!(mesh.connect("b-1", reg("b"), 3, None).is_err());
        assert_eq!(service_of(&mesh, "b-1").as_deref(), Some("b"));
        // The holder reconnects (a network blip: its old stream has not even ended yet).
        mesh.connect("b-1", reg("b"), 4, Some("key-b")).unwrap();
        // The old stream's end no longer removes the instance; the new one's does.
        mesh.disconnect("b-1", 1);
        assert_eq!(service_of(&mesh, "b-1").as_deref(), Some("b"));
        mesh.disconnect("b-1", 4);
        assert_eq!(service_of(&mesh, "b-1"), None);
        // A free id is anyone's.
        mesh.connect("b-1", reg("a"), 5, Some("key-a")).unwrap();
        assert_eq!(service_of(&mesh, "b-1").as_deref(), Some("a"));

        // After a restart the restored entry still belongs to its proxy, which gets it back.
        drop(mesh);
        let mesh = open(&dir);
        assert!(mesh.connect("b-1", reg("b"), 1, Some("key-b")).is_err());
        mesh.connect("b-1", reg("a"), 1, Some("key-a")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
