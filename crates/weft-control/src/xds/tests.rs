//! The ADS streams driven in-process: requests through a channel, responses read from the
//! session's task, with tokio's clock paused. "No response" is checked by letting the paused
//! clock run past a timeout, which happens only once every task is idle: deterministic.
use super::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::google::protobuf::{Any, Struct, Value};
use prost::{Message, Name};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use weft_api::registry::Upstream;
use weft_api::resource::{Kind, Resource as WeftResource};

/// A mesh on a scratch directory, removed on drop.
struct TestMesh {
    ads: Ads,
    dir: PathBuf,
}

impl TestMesh {
    fn new(name: &str) -> TestMesh {
        let dir = std::env::temp_dir().join(format!("weft-xds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = crate::ca::CaConfig {
            trust_domain: "test.local".into(),
            datacenter: "dc1".into(),
            namespace: "default".into(),
            cert_ttl: Duration::from_secs(3600),
            provided: None,
        };
        let mesh = Arc::new(Mesh::open(&dir, Duration::from_secs(1), ca, Default::default()).unwrap());
        TestMesh {
            ads: Ads { mesh, streams: Arc::new(AtomicU64::new(1)), stopping: tokio::sync::watch::channel(false).1 },
            dir,
        }
    }

    fn apply_service(&self, name: &str) {
        let doc = serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": name}, "spec": {}
        });
        self.ads.mesh.apply(vec![WeftResource::from_json(0, doc).unwrap()], Vec::new()).unwrap();
    }

    fn delete_service(&self, name: &str) {
        assert!(self.ads.mesh.delete(Kind::Service, name).unwrap());
    }

    /// What `weft get proxies` shows for the only connected proxy.
    fn proxy_status(&self) -> ProxyStatus {
        let proxies = self.ads.mesh.proxies();
        assert_eq!(proxies.len(), 1, "{proxies:?}");
        proxies.into_iter().next().unwrap()
    }

    fn stream<F: Flavor>(&self) -> Client<F> {
        let (tx, requests) = mpsc::channel(8);
        // A token for any service: the tests' registrations name "frontend" or none.
        let token = self.ads.mesh.security.create_token("frontend", Duration::from_secs(3600)).unwrap().1;
        let responses = self.ads.spawn::<F>(ReceiverStream::new(requests), Some(token));
        Client { tx, responses }
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The resource type a response carries.
trait TypeUrl {
    fn type_url(&self) -> &str;
}

impl TypeUrl for DiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }
}

impl TypeUrl for DeltaDiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }
}

struct Client<F: Flavor> {
    tx: mpsc::Sender<Result<F::Req, Status>>,
    responses: super::Responses<F::Resp>,
}

impl<F: Flavor> Client<F>
where
    F::Resp: TypeUrl,
{
    async fn send(&self, req: F::Req) {
        self.tx.send(Ok(req)).await.unwrap();
    }

    /// The next response; the timeout is only a safety net against a hung test.
    async fn next(&mut self) -> F::Resp {
        let next = tokio::time::timeout(Duration::from_secs(30), self.responses.next()).await;
        next.expect("a response").expect("the stream is open").expect("not an error")
    }

    /// Exactly one response for each of `types`, in whatever order the server sends them.
    async fn next_of(&mut self, types: &[String]) -> BTreeMap<String, F::Resp> {
        let mut got = BTreeMap::new();
        while got.len() < types.len() {
            let resp = self.next().await;
            let t = resp.type_url().to_owned();
            assert!(types.contains(&t), "unexpected response for {t}");
            assert!(got.insert(t.clone(), resp).is_none(), "two responses for {t}");
        }
        got
    }

    /// Whether the stream stays quiet (checked once every task has gone idle).
    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(5), self.responses.next()).await.is_err()
    }
}

const INBOUND_ADDR: &str = "127.0.0.1:7001";
const BACKEND_ADDR: &str = "127.0.0.1:7100";

/// A sidecar's node, shaped as weft-proxy sends it: service `frontend` with an inbound
/// listener, calling `backend` on a local port.
fn sidecar_node() -> Node {
    let registration = InstanceRegistration {
        service: Some("frontend".into()),
        inbound: Some(INBOUND_ADDR.into()),
        app: Some("127.0.0.1:7000".into()),
        admin: None,
        labels: Default::default(),
        upstreams: vec![Upstream { service: "backend".into(), listen: BACKEND_ADDR.into() }],
        capture: None,
        mesh_gateway_local: None,
        healthy: true,
    };
    let value = Value { kind: Some(value::Kind::StringValue(serde_json::to_string(&registration).unwrap())) };
    Node {
        id: "frontend-0".into(),
        cluster: "frontend".into(),
        user_agent_name: "weft".into(),
        metadata: Some(Struct { fields: [(names::NODE_METADATA_KEY.to_owned(), value)].into() }),
        ..Default::default()
    }
}

fn inbound_name() -> String {
    names::inbound_listener(INBOUND_ADDR)
}

fn outbound_name() -> String {
    names::outbound_listener("backend", BACKEND_ADDR)
}

fn decode<M: Message + Default>(any: &Any) -> M {
    M::decode(any.value.as_slice()).unwrap()
}

/// The typed config of the listener's filter of type `M`.
fn filter_config<M: Message + Name + Default>(l: &Listener) -> M {
    let mut configs = l.filter_chains.iter().flat_map(|c| &c.filters).filter_map(|f| match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    });
    let any = configs.find(|any| any.type_url == M::type_url());
    decode(any.unwrap_or_else(|| panic!("{} has no {} filter", l.name, M::full_name())))
}

fn route_specifier(l: &Listener) -> RouteSpecifier {
    filter_config::<HttpConnectionManager>(l).route_specifier.expect("a route specifier")
}

/// Checks the listener carries the traffic of `service` in `direction`.
fn assert_carries(l: &Listener, direction: TrafficDirection, service: &str) {
    assert_eq!(l.traffic_direction, direction as i32, "{}", l.name);
    assert_eq!(filter_config::<HttpConnectionManager>(l).stat_prefix, service, "{}", l.name);
    assert_eq!(filter_config::<TcpProxy>(l).stat_prefix, service, "{}", l.name);
}

/// Checks the outbound listener routes `backend` inline: one default route to the cluster of
/// that name, as for a service that does not exist.
fn assert_inline_backend_route(l: &Listener) {
    let RouteSpecifier::RouteConfig(rc) = route_specifier(l) else { panic!("{} should route inline", l.name) };
    assert_eq!(rc.name, "backend");
    let routes: Vec<_> = rc.virtual_hosts.iter().flat_map(|vh| &vh.routes).collect();
    assert_eq!(routes.len(), 1, "{routes:?}");
    let Some(route::Action::Route(action)) = &routes[0].action else { panic!("{routes:?}") };
    assert_eq!(action.cluster_specifier, Some(route_action::ClusterSpecifier::Cluster("backend".into())));
}

fn assert_rds_backend_route(l: &Listener) {
    let RouteSpecifier::Rds(rds) = route_specifier(l) else { panic!("{} should use RDS", l.name) };
    assert_eq!(rds.route_config_name, "backend");
}

fn sotw(type_url: String, resource_names: &[&str], node: Option<Node>) -> DiscoveryRequest {
    let resource_names = resource_names.iter().map(|&n| n.to_owned()).collect();
    DiscoveryRequest { node, type_url, resource_names, ..Default::default() }
}

/// The ACK of `resp`: its nonce and version, with the subscription unchanged.
fn ack(resp: &DiscoveryResponse, resource_names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..sotw(resp.type_url.clone(), resource_names, None)
    }
}

fn names_of<M: Message + Default>(resp: &DiscoveryResponse, name: fn(M) -> String) -> Vec<String> {
    resp.resources.iter().map(|a| name(decode(a))).collect()
}

fn listeners(resp: &DiscoveryResponse) -> BTreeMap<String, Listener> {
    resp.resources.iter().map(decode::<Listener>).map(|l| (l.name.clone(), l)).collect()
}

#[tokio::test(start_paused = true)]
async fn state_of_the_world_stream() {
    let m = TestMesh::new("sotw");
    let mut c = m.stream::<Sotw>();
    let (cds_url, lds_url, rds_url) = (Cluster::type_url(), Listener::type_url(), RouteConfiguration::type_url());
    let routes = ["backend", "frontend"];

    // Clusters first, as proxies ask: its app's static cluster, and those its upstream
    // reaches (`backend` does not exist yet; its own service's is of no use to it).
    c.send(sotw(cds_url.clone(), &[], Some(sidecar_node()))).await;
    let cds = c.next().await;
    assert_eq!(names_of(&cds, |c: Cluster| c.name), [names::INBOUND_CLUSTER]);
    c.send(ack(&cds, &[])).await;
    assert!(c.quiet().await, "an ACK calls for no response");
    assert_eq!(m.proxy_status().acked.get(&cds_url), Some(&cds.version_info));

    // Listeners: direction and service set; `backend` does not exist, so its route is inline.
    c.send(sotw(lds_url.clone(), &[], None)).await;
    let lds = c.next().await;
    let ls = listeners(&lds);
    assert_eq!(ls.keys().cloned().collect::<Vec<_>>(), [inbound_name(), outbound_name()]);
    assert_carries(&ls[&inbound_name()], TrafficDirection::Inbound, "frontend");
    assert_carries(&ls[&outbound_name()], TrafficDirection::Outbound, "backend");
    assert_inline_backend_route(&ls[&outbound_name()]);

    // A NACK is recorded for the proxy, with its reason, and answered with nothing.
    let mut nack = ack(&lds, &[]);
    nack.error_detail =
        Some(RpcStatus { code: 3, message: "HTTP filter \"x\" is not supported".into(), details: vec![] });
    c.send(nack).await;
    assert!(c.quiet().await);
    let status = m.proxy_status();
    assert_eq!((status.node.as_str(), status.service.as_deref()), ("frontend-0", Some("frontend")));
    assert_eq!(status.last_error.as_deref(), Some("HTTP filter \"x\" is not supported"));
    assert_eq!(status.acked.get(&lds_url), None, "a NACK is no ACK");
    assert_eq!(status.rejecting.get(&lds_url).map(String::as_str), Some("HTTP filter \"x\" is not supported"));

    // No RouteConfiguration is made up for `backend`: only the registered `frontend` has one.
    c.send(sotw(rds_url.clone(), &routes, None)).await;
    let rds = c.next().await;
    assert_eq!(names_of(&rds, |r: RouteConfiguration| r.name), ["frontend"]);
    c.send(ack(&rds, &routes)).await;
    assert!(c.quiet().await);

    // Declaring `backend` pushes new versions: its cluster, its route, and the listener
    // switching to RDS.
    m.apply_service("backend");
    let pushed = c.next_of(&[lds_url.clone(), rds_url.clone(), cds_url.clone()]).await;
    assert_ne!(pushed[&cds_url].version_info, cds.version_info);
    assert_ne!(pushed[&lds_url].version_info, lds.version_info);
    assert_eq!(names_of(&pushed[&cds_url], |c: Cluster| c.name), ["backend", names::INBOUND_CLUSTER]);
    // Routes go only where they changed: `frontend`'s did not.
    assert_eq!(names_of(&pushed[&rds_url], |r: RouteConfiguration| r.name), ["backend"]);
    let ls = listeners(&pushed[&lds_url]);
    assert_rds_backend_route(&ls[&outbound_name()]);
    assert_carries(&ls[&outbound_name()], TrafficDirection::Outbound, "backend");
    c.send(ack(&pushed[&cds_url], &[])).await;
    c.send(ack(&pushed[&lds_url], &[])).await;
    c.send(ack(&pushed[&rds_url], &routes)).await;
    assert!(c.quiet().await);
    let status = m.proxy_status();
    assert!(status.rejecting.is_empty(), "an ACK of the type ends its rejection: {status:?}");
    assert!(status.last_error.is_some(), "the last NACK stays on record");

    // Deleting it takes its cluster away again, and the listener back to inline. Its route
    // is not pushed: a route response cannot say a route is gone (nothing names it any more).
    m.delete_service("backend");
    let pushed = c.next_of(&[lds_url.clone(), cds_url.clone()]).await;
    assert_eq!(names_of(&pushed[&cds_url], |c: Cluster| c.name), [names::INBOUND_CLUSTER]);
    assert_inline_backend_route(&listeners(&pushed[&lds_url])[&outbound_name()]);
    c.send(ack(&pushed[&cds_url], &[])).await;
    c.send(ack(&pushed[&lds_url], &[])).await;
    assert!(c.quiet().await, "no route response for a removal");
}

fn delta(type_url: String, subscribe: &[&str], node: Option<Node>) -> DeltaDiscoveryRequest {
    let resource_names_subscribe = subscribe.iter().map(|&n| n.to_owned()).collect();
    DeltaDiscoveryRequest { node, type_url, resource_names_subscribe, ..Default::default() }
}

fn delta_ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest { type_url: resp.type_url.clone(), response_nonce: resp.nonce.clone(), ..Default::default() }
}

fn changed(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    resp.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn delta_stream_sends_changes_and_removals_only() {
    let m = TestMesh::new("delta");
    m.apply_service("a");
    let mut c = m.stream::<Delta>();
    let (cds_url, lds_url, rds_url) = (Cluster::type_url(), Listener::type_url(), RouteConfiguration::type_url());

    // Initial subscriptions return everything there is for this proxy: its app's cluster, and
    // the clusters its upstreams reach (`backend`, which does not exist yet). Neither `a` nor
    // its own service's cluster is of use to it.
    c.send(delta(cds_url.clone(), &[], Some(sidecar_node()))).await;
    let cds = c.next().await;
    assert_eq!(changed(&cds), [names::INBOUND_CLUSTER]);
    assert!(cds.removed_resources.is_empty());
    c.send(delta_ack(&cds)).await;
    assert!(c.quiet().await, "an ACK calls for no response");

    c.send(delta(lds_url.clone(), &[], None)).await;
    let lds = c.next().await;
    assert_eq!(changed(&lds), [inbound_name(), outbound_name()]);
    let outbound: Listener = decode(lds.resources[1].resource.as_ref().unwrap());
    assert_carries(&outbound, TrafficDirection::Outbound, "backend");
    assert_inline_backend_route(&outbound);
    c.send(delta_ack(&lds)).await;

    // `backend` does not exist: no RouteConfiguration is made up for it.
    c.send(delta(rds_url.clone(), &["backend"], None)).await;
    assert!(c.quiet().await);

    // Declaring `backend` sends only what changed: its cluster and route, and the outbound
    // listener (now on RDS); the inbound listener stays as it was.
    m.apply_service("backend");
    let pushed = c.next_of(&[lds_url.clone(), rds_url.clone(), cds_url.clone()]).await;
    assert_eq!(changed(&pushed[&cds_url]), ["backend"]);
    assert_eq!(changed(&pushed[&rds_url]), ["backend"]);
    assert_eq!(changed(&pushed[&lds_url]), [outbound_name()]);
    assert_rds_backend_route(&decode(pushed[&lds_url].resources[0].resource.as_ref().unwrap()));
    assert!(pushed.values().all(|r| r.removed_resources.is_empty()));
    let version = |r: &DeltaDiscoveryResponse| r.system_version_info.parse::<u64>().unwrap();
    assert!(version(&pushed[&cds_url]) > version(&cds), "a change is a new system version");
    for r in pushed.values() {
        c.send(delta_ack(r)).await;
    }
    assert!(c.quiet().await);

    // Deleting `a`, which this proxy does not call, sends it nothing.
    m.delete_service("a");
    assert!(c.quiet().await);

    // Deleting `backend` removes its cluster and route; its listener goes back to inline.
    m.delete_service("backend");
    let pushed = c.next_of(&[lds_url.clone(), rds_url.clone(), cds_url.clone()]).await;
    assert_eq!(pushed[&cds_url].removed_resources, ["backend"]);
    assert_eq!(pushed[&rds_url].removed_resources, ["backend"]);
    assert!(pushed[&cds_url].resources.is_empty() && pushed[&rds_url].resources.is_empty());
    assert_eq!(changed(&pushed[&lds_url]), [outbound_name()]);
    assert_inline_backend_route(&decode(pushed[&lds_url].resources[0].resource.as_ref().unwrap()));
    for r in pushed.values() {
        c.send(delta_ack(r)).await;
    }
    assert!(c.quiet().await);
}

/// A change is pushed at once; a burst of changes (a fleet of proxies starting) reaches a
/// stream as a few pushes of the latest state, at most one per `PUSH_INTERVAL`, not one each.
#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_reaches_a_stream_as_a_few_pushes_of_the_latest_state() {
    let m = TestMesh::new("burst");
    let mut c = m.stream::<Sotw>();
    let cds_url = Cluster::type_url();
    // A proxyless client: it gets every service's cluster.
    let node = Node { id: "grpc-client".into(), ..Default::default() };
    c.send(sotw(cds_url.clone(), &[], Some(node))).await;
    let first = c.next().await;
    c.send(ack(&first, &[])).await;

    let t0 = tokio::time::Instant::now();
    m.apply_service("s0");
    let pushed = c.next().await;
    assert!(t0.elapsed() < PUSH_INTERVAL, "the first change waits for nothing");
    assert_eq!(names_of(&pushed, |c: Cluster| c.name), ["s0"]);
    c.send(ack(&pushed, &[])).await;

    // 20 changes, 10 ms apart: 200 ms of changes.
    for i in 1..=20 {
        m.apply_service(&format!("s{i}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut pushes = 0;
    loop {
        let r = c.next().await;
        pushes += 1;
        c.send(ack(&r, &[])).await;
        if names_of(&r, |c: Cluster| c.name).len() == 21 {
            break;
        }
    }
    assert!(pushes <= 3, "{pushes} pushes for 20 changes over 200 ms");
    assert!(c.quiet().await, "nothing after the latest state");
}

/// A proxy that has not answered its last config gets no new one until it does, and then the
/// latest, once, not every change in between (flow control: a proxy that reads or applies
/// slowly is not buried under configs, and its connection not stalled).
#[tokio::test(start_paused = true)]
async fn a_proxy_gets_no_new_config_before_it_answers_the_last() {
    let m = TestMesh::new("flow");
    let mut c = m.stream::<Sotw>();
    let cds_url = Cluster::type_url();
    let node = Node { id: "grpc-client".into(), ..Default::default() };
    c.send(sotw(cds_url.clone(), &[], Some(node))).await;
    let first = c.next().await;

    m.apply_service("s0");
    m.apply_service("s1");
    assert!(c.quiet().await, "nothing while the first config is unanswered");
    c.send(ack(&first, &[])).await;
    let latest = c.next().await;
    assert_eq!(names_of(&latest, |c: Cluster| c.name), ["s0", "s1"], "the latest, with the ACK");
    assert!(c.quiet().await, "once");

    // A NACK answers too: the next change is pushed.
    let mut nack = ack(&latest, &[]);
    nack.error_detail = Some(RpcStatus { code: 3, message: "no".into(), details: vec![] });
    c.send(nack).await;
    assert!(c.quiet().await, "not the rejected config again");
    m.apply_service("s2");
    assert_eq!(names_of(&c.next().await, |c: Cluster| c.name), ["s0", "s1", "s2"]);

    // Delta streams alike.
    let mut d = m.stream::<Delta>();
    d.send(delta(cds_url.clone(), &[], Some(Node { id: "grpc-delta".into(), ..Default::default() }))).await;
    let first = d.next().await;
    m.apply_service("s3");
    assert!(d.quiet().await, "nothing while the first config is unanswered");
    d.send(delta_ack(&first)).await;
    assert_eq!(changed(&d.next().await), ["s3"]);
}
