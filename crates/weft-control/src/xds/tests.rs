//! The ADS streams driven in-process: requests through a channel, responses read from the
//! session's task, with tokio's clock paused. "No response" is checked by letting the paused
//! clock run past a timeout, which happens only once every task is idle: deterministic.
use super::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::google::protobuf::{Struct, Value};
use prost::{Message, Name};
use std::path::PathBuf;
use std::time::Duration;
use weft_api::registry::Upstream;
use weft_api::resource::{Kind, Resource};

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
        let mesh = Arc::new(Mesh::open(&dir, Duration::from_secs(1)).unwrap());
        TestMesh { ads: Ads { mesh, streams: Arc::new(AtomicU64::new(1)) }, dir }
    }

    fn apply_service(&self, name: &str) {
        let doc = serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": name}, "spec": {}
        });
        self.ads.mesh.apply(vec![Resource::from_json(0, doc).unwrap()]).unwrap();
    }

    fn delete_service(&self, name: &str) {
        assert!(self.ads.mesh.delete(Kind::Service, name).unwrap());
    }

    fn stream<F: Flavor>(&self) -> Client<F> {
        let (tx, requests) = mpsc::channel(8);
        let responses = self.ads.spawn::<F>(ReceiverStream::new(requests)).into_inner();
        Client { tx, responses }
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client<F: Flavor> {
    tx: mpsc::Sender<Result<F::Req, Status>>,
    responses: mpsc::Receiver<Result<F::Resp, Status>>,
}

impl<F: Flavor> Client<F> {
    async fn send(&self, req: F::Req) {
        self.tx.send(Ok(req)).await.unwrap();
    }

    async fn next(&mut self) -> F::Resp {
        let next = tokio::time::timeout(Duration::from_secs(30), self.responses.recv()).await;
        next.expect("a response").expect("the stream is open").expect("not an error")
    }

    /// Whether the stream stays quiet (checked once every task has gone idle).
    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(5), self.responses.recv()).await.is_err()
    }
}

/// A sidecar's node: service `frontend` with an inbound listener, calling `backend`.
fn sidecar_node() -> Node {
    let registration = InstanceRegistration {
        service: Some("frontend".into()),
        inbound: Some("127.0.0.1:7001".into()),
        app: Some("127.0.0.1:7000".into()),
        admin: None,
        labels: Default::default(),
        upstreams: vec![Upstream { service: "backend".into(), listen: "127.0.0.1:7100".into() }],
        healthy: true,
    };
    let value = Value { kind: Some(value::Kind::StringValue(serde_json::to_string(&registration).unwrap())) };
    Node {
        id: "frontend-0".into(),
        metadata: Some(Struct { fields: [(names::NODE_METADATA_KEY.to_owned(), value)].into() }),
        ..Default::default()
    }
}

fn sotw(type_url: String, node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest { node, type_url, ..Default::default() }
}

fn ack(resp: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: resp.type_url.clone(),
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    }
}

fn names_of<M: Message + Default>(resp: &DiscoveryResponse, name: fn(&M) -> String) -> Vec<String> {
    resp.resources.iter().map(|a| name(&M::decode(a.value.as_slice()).unwrap())).collect()
}

fn listeners(resp: &DiscoveryResponse) -> Vec<Listener> {
    resp.resources.iter().map(|a| Listener::decode(a.value.as_slice()).unwrap()).collect()
}

fn hcm(l: &Listener) -> HttpConnectionManager {
    let f = &l.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!("{f:?}") };
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn state_of_the_world_stream() {
    let m = TestMesh::new("sotw");
    let mut c = m.stream::<Sotw>();

    // Clusters first, as proxies ask: the sidecar's own service and its app's static cluster.
    c.send(sotw(Cluster::type_url(), Some(sidecar_node()))).await;
    let cds = c.next().await;
    assert_eq!(names_of::<Cluster>(&cds, |c| c.name.clone()), ["frontend", names::INBOUND_CLUSTER]);
    c.send(ack(&cds)).await;
    assert!(c.quiet().await, "an ACK calls for no response");

    // Listeners: direction and service set; `backend` does not exist, so its route is inline.
    c.send(sotw(Listener::type_url(), None)).await;
    let lds = c.next().await;
    let ls = listeners(&lds);
    let inbound = ls.iter().find(|l| l.name == names::inbound_listener("127.0.0.1:7001")).unwrap();
    let outbound = ls.iter().find(|l| l.name == names::outbound_listener("backend", "127.0.0.1:7100")).unwrap();
    assert_eq!(inbound.traffic_direction, TrafficDirection::Inbound as i32);
    assert_eq!(outbound.traffic_direction, TrafficDirection::Outbound as i32);
    assert_eq!(hcm(inbound).stat_prefix, "frontend");
    assert_eq!(hcm(outbound).stat_prefix, "backend");
    assert!(matches!(hcm(outbound).route_specifier, Some(http_connection_manager::RouteSpecifier::RouteConfig(_))));

    // A NACK is recorded for the proxy, with its reason, and answered with nothing.
    let mut nack = ack(&lds);
    nack.error_detail =
        Some(RpcStatus { code: 3, message: "HTTP filter \"x\" is not supported".into(), details: vec![] });
    c.send(nack).await;
    assert!(c.quiet().await);
    let proxies = m.ads.mesh.proxies();
    assert_eq!(proxies[0].node, "frontend-0");
    assert_eq!(proxies[0].last_error.as_deref(), Some("HTTP filter \"x\" is not supported"));

    // Declaring `backend` pushes its cluster, and the listener switches to RDS.
    m.apply_service("backend");
    let mut seen_cds = None;
    let mut seen_lds = None;
    while seen_cds.is_none() || seen_lds.is_none() {
        let r = c.next().await;
        if r.type_url == Cluster::type_url() {
            seen_cds = Some(r);
        } else if r.type_url == Listener::type_url() {
            seen_lds = Some(r);
        }
    }
    let cds = seen_cds.unwrap();
    assert_eq!(names_of::<Cluster>(&cds, |c| c.name.clone()), ["backend", "frontend", names::INBOUND_CLUSTER]);
    let ls = listeners(&seen_lds.unwrap());
    let outbound = ls.iter().find(|l| l.name.starts_with("outbound|backend|")).unwrap();
    assert!(matches!(hcm(outbound).route_specifier, Some(http_connection_manager::RouteSpecifier::Rds(_))));
    c.send(ack(&cds)).await;

    // Deleting it takes its cluster away again.
    m.delete_service("backend");
    let cds = loop {
        let r = c.next().await;
        if r.type_url == Cluster::type_url() {
            break r;
        }
    };
    assert_eq!(names_of::<Cluster>(&cds, |c| c.name.clone()), ["frontend", names::INBOUND_CLUSTER]);
}

#[tokio::test(start_paused = true)]
async fn delta_stream_sends_changes_and_removals_only() {
    let m = TestMesh::new("delta");
    m.apply_service("a");
    let mut c = m.stream::<Delta>();
    let node = Node { id: "delta-client".into(), ..Default::default() };
    c.send(DeltaDiscoveryRequest { node: Some(node), type_url: Cluster::type_url(), ..Default::default() }).await;
    let first = c.next().await;
    assert_eq!(first.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(first.removed_resources.is_empty());
    let ack = |r: &DeltaDiscoveryResponse| DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    };
    c.send(ack(&first)).await;
    assert!(c.quiet().await, "an ACK calls for no response");

    m.apply_service("b");
    let added = c.next().await;
    assert_eq!(added.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b"], "only what changed");
    c.send(ack(&added)).await;

    m.delete_service("a");
    let removed = c.next().await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, ["a"]);
    c.send(ack(&removed)).await;
    assert!(c.quiet().await);
}
