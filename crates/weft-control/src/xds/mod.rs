//! The ADS server: state-of-the-world and delta streams over the same session logic.
//!
//! Invariants:
//! - A stream sends a resource only when its encoded version differs from what the stream last
//!   sent, so a change reaches only the streams that subscribe to what changed.
//! - The node is read from the first request only (gRPC clients omit it afterwards).
//! - A stream whose node carries a weft registration *is* that instance's liveness: the
//!   instance is registered when the stream opens and removed when that same stream ends.
//! - Only a stream that presents a valid join token (gRPC `authorization: Bearer …`) for the
//!   registration's service may register; proxyless clients, which send no registration, need
//!   none.
use crate::state::Mesh;
use crate::translate::{ResMap, Snapshot, Type};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weft_api::identity::ROOT_SECRET;
use weft_api::names;
use weft_api::registry::{InstanceRegistration, ProxyStatus};

/// The ADS server; every stream it serves ends (UNAVAILABLE) once `stopping` turns true, so a
/// stopping control plane's connections can close.
pub fn server(mesh: Arc<Mesh>, stopping: watch::Receiver<bool>) -> AggregatedDiscoveryServiceServer<Ads> {
    AggregatedDiscoveryServiceServer::new(Ads { mesh, streams: Arc::new(AtomicU64::new(1)), stopping })
}

/// A stream's responses, boxed on their way through its channel: a channel's block holds 32
/// slots of its item, and a response with a gRPC status is hundreds of bytes, kept for as long
/// as the stream lives (thousands of streams).
type Item<R> = Box<Result<R, Status>>;
pub type Responses<R> = tokio_stream::adapters::Map<ReceiverStream<Item<R>>, fn(Item<R>) -> Result<R, Status>>;

pub struct Ads {
    mesh: Arc<Mesh>,
    streams: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let token = bearer(req.metadata());
        Ok(Response::new(self.spawn::<Sotw>(req.into_inner(), token)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let token = bearer(req.metadata());
        Ok(Response::new(self.spawn::<Delta>(req.into_inner(), token)))
    }
}

/// The bearer token of a request's `authorization` metadata.
pub(crate) fn bearer(md: &tonic::metadata::MetadataMap) -> Option<String> {
    let v = md.get("authorization")?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).to_owned())
}

impl Ads {
    /// Serves one ADS stream in a task of its own: requests from `inbound`, responses to the
    /// stream returned. Any stream of requests will do (tonic's, or a channel in tests).
    fn spawn<F: Flavor>(
        &self,
        inbound: impl Stream<Item = Result<F::Req, Status>> + Unpin + Send + 'static,
        token: Option<String>,
    ) -> Responses<F::Resp> {
        // One response waits while another is being sent: a stream that reads slowly holds the
        // session back (its next push then carries the latest snapshot) rather than letting
        // responses pile up in memory.
        let (tx, rx) = mpsc::channel(1);
        let id = self.streams.fetch_add(1, Ordering::Relaxed);
        let (mesh, mut stopping) = (self.mesh.clone(), self.stopping.clone());
        tokio::spawn(async move {
            let mut session = Session::new(id, mesh.clone(), F::DELTA, token);
            tokio::select! {
                served = serve::<F>(&mut session, inbound, &tx) => {
                    if let Err(status) = served {
                        let _ = tx.send(Box::new(Err(status))).await;
                    }
                    session.close();
                }
                // The control plane is stopping, not the proxy leaving: its instance stays
                // registered (and restored after a restart). A stop signal that can no longer
                // come never ends the stream.
                Ok(()) = async { stopping.wait_for(|s| *s).await.map(drop) } => {
                    let _ = tx.send(Box::new(Err(Status::unavailable("the control plane is stopping")))).await;
                }
            }
        });
        ReceiverStream::new(rx).map(|item: Item<F::Resp>| *item)
    }
}

/// What the client asked for, per type, and what this stream has sent.
#[derive(Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// name → version last sent on this stream.
    sent: HashMap<String, String>,
    last_nonce: String,
    /// Whether the last response (`last_nonce`) is still unanswered: new snapshots wait for
    /// its ACK or NACK (flow control, as Istio's), so a proxy that reads or applies slowly
    /// gets the latest config once it can take it, not every one in between.
    awaiting: bool,
}

struct Session {
    id: u64,
    mesh: Arc<Mesh>,
    delta: bool,
    node: Option<String>,
    registration: Option<InstanceRegistration>,
    /// Instance id registered by this stream.
    registered: Option<String>,
    snapshot: Arc<Snapshot>,
    subs: HashMap<Type, Subscription>,
    nonce: u64,
    /// The join token the stream presented.
    token: Option<String>,
}

impl Session {
    fn new(id: u64, mesh: Arc<Mesh>, delta: bool, token: Option<String>) -> Session {
        let snapshot = mesh.subscribe().borrow().clone();
        Session {
            id,
            mesh,
            delta,
            node: None,
            registration: None,
            registered: None,
            snapshot,
            subs: HashMap::new(),
            nonce: 0,
            token,
        }
    }

    fn identify(&mut self, node: Option<&Node>) -> Result<(), Status> {
        if self.node.is_some() {
            return Ok(());
        }
        let node =
            node.ok_or_else(|| Status::invalid_argument("the first request of an xDS stream must carry a node"))?;
        let field = |key: &str| {
            node.metadata.as_ref().and_then(|m| m.fields.get(key)).and_then(|v| match &v.kind {
                Some(value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            })
        };
        let registration = field(names::NODE_METADATA_KEY)
            .map(|s| {
                serde_json::from_str::<InstanceRegistration>(s).map_err(|e| {
                    Status::invalid_argument(format!(
                        "node metadata {} is not a valid registration: {e}",
                        names::NODE_METADATA_KEY
                    ))
                })
            })
            .transpose()?;
        if let Some(reg) = &registration {
            self.mesh
                .security
                .check_token("xds", self.token.as_deref(), reg.service.as_deref())
                .map_err(|e| Status::permission_denied(format!("proxy {:?} may not join: {e}", node.id)))?;
        }
        if let Some(reg) = &registration
            && reg.service.is_some()
            && reg.inbound.is_some()
        {
            self.mesh
                .connect(&node.id, reg.clone(), self.id, field(names::NODE_INSTANCE_KEY))
                .map_err(|e| Status::permission_denied(e.to_string()))?;
            self.registered = Some(node.id.clone());
        }
        self.node = Some(node.id.clone());
        self.mesh.proxy_connected(
            self.id,
            ProxyStatus {
                node: node.id.clone(),
                service: registration.as_ref().and_then(|r| r.service.clone()),
                delta: self.delta,
                last_error: None,
                acked: Default::default(),
                weft: registration.is_some(),
                trust_bundle: None,
                admin: registration.as_ref().and_then(|r| r.admin.clone()),
                labels: registration.as_ref().map(|r| r.labels.clone()).unwrap_or_default(),
                rejecting: Default::default(),
            },
            registration.as_ref().and(field(names::NODE_INSTANCE_KEY)),
        );
        tracing::debug!(stream = self.id, node = %node.id, delta = self.delta, "xDS stream opened");
        self.registration = registration;
        self.snapshot = self.mesh.subscribe().borrow().clone();
        Ok(())
    }

    /// Resources of type `t` that match the stream's subscription.
    fn visible(&self, t: Type) -> ResMap {
        let sub = &self.subs[&t];
        let mut all = self.snapshot.available(t, self.registration.as_ref());
        if !sub.wildcard {
            all.retain(|name, _| sub.names.contains(name));
        }
        all
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Records the ACK or NACK a request carries, if any.
    fn acknowledge(&mut self, t: Type, nonce: &str, version: &str, error: Option<&RpcStatus>) -> Answer {
        if nonce.is_empty() {
            return Answer::Request;
        }
        let sub = self.subs.entry(t).or_default();
        if nonce == sub.last_nonce {
            sub.awaiting = false;
        } else if !self.delta {
            // State of the world: an answer to a response that has since been superseded is
            // ignored.
            return Answer::Stale;
        }
        let url = t.url();
        match error {
            Some(e) => {
                tracing::warn!(stream = self.id, node = ?self.node, type_url = %url, error = %e.message, "proxy rejected config (NACK)");
                let e = e.message.clone();
                self.mesh.proxy_update(self.id, |p| {
                    p.rejecting.insert(url, e.clone());
                    p.last_error = Some(e);
                });
                Answer::Nack
            }
            None => {
                let v = version.to_owned();
                let bundle = (t == Type::Secret).then(|| sub.sent.get(ROOT_SECRET).cloned()).flatten();
                self.mesh.proxy_update(self.id, |p| {
                    p.rejecting.remove(&url);
                    p.acked.insert(url, v);
                    if bundle.is_some() {
                        p.trust_bundle = bundle;
                    }
                });
                Answer::Ack
            }
        }
    }

    fn close(&mut self) {
        if let (Some(id), Some(_)) = (&self.registered, &self.registration) {
            self.mesh.disconnect(id, self.id);
        }
        self.mesh.proxy_gone(self.id);
        tracing::debug!(stream = self.id, node = ?self.node, "xDS stream closed");
    }
}

/// What a request says about the last response of its type.
enum Answer {
    /// No nonce: a first request or a change of subscription.
    Request,
    Ack,
    Nack,
    Stale,
}

/// The type a request is for, if weft serves it.
fn served_type(url: &str) -> Option<Type> {
    let t = Type::from_url(url);
    if t.is_none() {
        tracing::debug!(type_url = %url, "ignoring request for a type weft does not serve");
    }
    t
}

/// The difference between state-of-the-world and delta xDS.
trait Flavor: Send + 'static {
    const DELTA: bool;
    type Req: Send + 'static;
    type Resp: Send + 'static;
    fn node(req: &Self::Req) -> Option<&Node>;
    /// Handles one request; returns the response it calls for, if any.
    fn request(s: &mut Session, req: Self::Req) -> Option<Self::Resp>;
    /// The response a new snapshot calls for on type `t`, if any.
    fn push(s: &mut Session, t: Type, force: bool) -> Option<Self::Resp>;
}

/// The shortest time between two pushes of new snapshots on one stream (Istio debounces its
/// pushes by the same, but delays every change by it).
const PUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

async fn serve<F: Flavor>(
    s: &mut Session,
    mut inbound: impl Stream<Item = Result<F::Req, Status>> + Unpin,
    tx: &mpsc::Sender<Item<F::Resp>>,
) -> Result<(), Status> {
    let mut updates = s.mesh.subscribe();
    let mut next_push = None;
    loop {
        tokio::select! {
            msg = inbound.next() => {
                let Some(req) = msg.transpose()? else { return Ok(()) };
                s.identify(F::node(&req))?;
                if let Some(resp) = F::request(s, req)
                    && tx.send(Box::new(Ok(resp))).await.is_err() {
                    return Ok(());
                }
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                // Pushes are paced: a change is pushed at once, but at most one push per
                // PUSH_INTERVAL, so a burst of changes (a fleet of proxies starting) reaches
                // each stream as few pushes of the latest snapshot.
                if let Some(at) = next_push {
                    tokio::time::sleep_until(at).await;
                }
                next_push = Some(tokio::time::Instant::now() + PUSH_INTERVAL);
                s.snapshot = updates.borrow_and_update().clone();
                // A type whose last response is unanswered gets the snapshot with its answer.
                let types: Vec<Type> =
                    Type::ALL.into_iter().filter(|t| s.subs.get(t).is_some_and(|sub| !sub.awaiting)).collect();
                for t in types {
                    if let Some(resp) = F::push(s, t, false)
                        && tx.send(Box::new(Ok(resp))).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

struct Sotw;

impl Flavor for Sotw {
    const DELTA: bool = false;
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn request(s: &mut Session, req: DiscoveryRequest) -> Option<DiscoveryResponse> {
        let t = served_type(&req.type_url)?;
        let first = !s.subs.contains_key(&t);
        match s.acknowledge(t, &req.response_nonce, &req.version_info, req.error_detail.as_ref()) {
            Answer::Stale => return None,
            // Not the rejected config again; a newer snapshot that came meanwhile, yes.
            Answer::Nack => return Self::push(s, t, false),
            Answer::Request | Answer::Ack => {}
        }
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        let wildcard = names.contains("*") || (names.is_empty() && t.wildcard_by_default());
        let sub = s.subs.entry(t).or_default();
        let changed = first || sub.names != names || sub.wildcard != wildcard;
        sub.names = names;
        sub.wildcard = wildcard;
        Self::push(s, t, changed)
    }

    fn push(s: &mut Session, t: Type, force: bool) -> Option<DiscoveryResponse> {
        let view = s.visible(t);
        let sub = &s.subs[&t];
        let same = view.len() == sub.sent.len() && view.values().all(|r| sub.sent.get(&r.name) == Some(&r.version));
        if (same && !force) || (view.is_empty() && !sub.wildcard) {
            return None;
        }
        // Listeners and clusters go whole (one left out is removed); routes and endpoints only
        // where they changed, as the protocol allows (one left out stays as it was), so a
        // change of one service's endpoints does not resend every service's.
        let resources: Vec<Any> = view
            .values()
            .filter(|r| force || t.wildcard_by_default() || sub.sent.get(&r.name) != Some(&r.version))
            .map(|r| r.any.clone())
            .collect();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for r in view.values() {
            (&r.name, &r.version).hash(&mut h);
        }
        let sub = s.subs.get_mut(&t).expect("subscribed");
        sub.sent = view.values().map(|r| (r.name.clone(), r.version.clone())).collect();
        if resources.is_empty() && !view.is_empty() {
            // Only removals, which a route or endpoint response cannot say.
            return None;
        }
        let nonce = s.next_nonce();
        let sub = s.subs.get_mut(&t).expect("subscribed");
        sub.last_nonce = nonce.clone();
        sub.awaiting = true;
        Some(DiscoveryResponse {
            version_info: format!("{:016x}", h.finish()),
            resources,
            type_url: t.url(),
            nonce,
            ..Default::default()
        })
    }
}

struct Delta;

impl Flavor for Delta {
    const DELTA: bool = true;
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn request(s: &mut Session, req: DeltaDiscoveryRequest) -> Option<DeltaDiscoveryResponse> {
        let t = served_type(&req.type_url)?;
        let first = !s.subs.contains_key(&t);
        // Delta responses are independent of each other: any answer is recorded, none blocks.
        s.acknowledge(t, &req.response_nonce, "", req.error_detail.as_ref());
        let sub = s.subs.entry(t).or_default();
        if first {
            sub.wildcard = req.resource_names_subscribe.is_empty() && t.wildcard_by_default();
            sub.sent = req.initial_resource_versions;
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
                sub.sent.remove(&name);
            }
        }
        Self::push(s, t, false)
    }

    fn push(s: &mut Session, t: Type, _force: bool) -> Option<DeltaDiscoveryResponse> {
        let view = s.visible(t);
        let sub = &s.subs[&t];
        let changed: Vec<Resource> = view
            .values()
            .filter(|r| sub.sent.get(&r.name) != Some(&r.version))
            .map(|r| Resource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = sub.sent.keys().filter(|n| !view.contains_key(*n)).cloned().collect();
        if changed.is_empty() && removed.is_empty() {
            return None;
        }
        let nonce = s.next_nonce();
        let system_version_info = s.snapshot.version.to_string();
        let sub = s.subs.get_mut(&t).expect("subscribed");
        for n in &removed {
            sub.sent.remove(n);
        }
        for r in &changed {
            sub.sent.insert(r.name.clone(), r.version.clone());
        }
        sub.last_nonce = nonce.clone();
        sub.awaiting = true;
        Some(DeltaDiscoveryResponse {
            system_version_info,
            resources: changed,
            type_url: t.url(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests;
