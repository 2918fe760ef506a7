//! The control plane speaks standard xDS v3 to clients other than weft's proxy: a proxyless
//! gRPC client (Python grpcio), and raw ADS clients using delta and state-of-the-world.
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status;
use prost::{Message, Name};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use weft_tests::*;

#[test]
fn proxyless_grpc_client_reaches_meshed_service() {
    // Proxyless clients speak plaintext to the sidecars: the service must be permissive.
    let m = SmallMesh::start_with("grpcxds", 2, &["--mtls", "permissive"]);
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/weft-demo/proto");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/xds_client.py");
    let out = run(
        python().to_str().unwrap(),
        &[script.to_str().unwrap(), &m.control.xds_plain, "backend", proto.to_str().unwrap(), "20"],
    );
    assert!(out.status.success(), "python xDS client failed:\n{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 20, "{text}");
    assert!(text.lines().all(|l| l.contains("from backend v")), "{text}");
    let instances: BTreeSet<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(instances, BTreeSet::from(["backend-0", "backend-1"]), "gRPC balanced over both endpoints");
}

fn node(id: &str) -> Node {
    Node { id: id.to_owned(), cluster: "tests".to_owned(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_xds_pushes_only_changes() {
    let m = tokio::task::spawn_blocking(|| SmallMesh::start("delta", 1)).await.unwrap();
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", m.control.xds_plain)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node("delta-client")),
        type_url: ClusterLoadAssignment::type_url(),
        resource_names_subscribe: vec!["backend".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let next = async |s: &mut tonic::Streaming<_>| {
        tokio::time::timeout(Duration::from_secs(10), s.message()).await.unwrap().unwrap().unwrap()
    };
    let first: envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse = next(&mut stream).await;
    assert_eq!(first.resources.len(), 1);
    let cla = ClusterLoadAssignment::decode(first.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>(), 1);
    tx.send(DeltaDiscoveryRequest {
        type_url: ClusterLoadAssignment::type_url(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A second instance joins: exactly the changed assignment arrives, with a new version.
    let control = m.control.addr.clone();
    let late = tokio::task::spawn_blocking(move || {
        let dir = TestDir::new("delta-late");
        let i = Instance::start(&dir, &control, "backend", "v2", "backend-late", &[]);
        (i, dir)
    })
    .await
    .unwrap();
    let mut endpoints = 1;
    let mut version = first.resources[0].version.clone();
    while endpoints < 2 {
        let update = next(&mut stream).await;
        assert_eq!(update.type_url, ClusterLoadAssignment::type_url());
        assert!(update.removed_resources.is_empty());
        for r in &update.resources {
            assert_eq!(r.name, "backend");
            assert_ne!(r.version, version);
            version = r.version.clone();
            let cla = ClusterLoadAssignment::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
            endpoints = cla
                .endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .filter(|e| e.health_status == envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy as i32)
                .count();
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: ClusterLoadAssignment::type_url(),
            response_nonce: update.nonce,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(late);
    tokio::task::spawn_blocking(move || drop(m)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sotw_nack_is_recorded_and_visible() {
    let m = tokio::task::spawn_blocking(|| SmallMesh::start("nack", 1)).await.unwrap();
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", m.control.xds_plain)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DiscoveryRequest { node: Some(node("nacker")), type_url: Cluster::type_url(), ..Default::default() })
        .await
        .unwrap();
    let mut stream = client.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    let names: Vec<String> = resp.resources.iter().map(|a| Cluster::decode(a.value.as_slice()).unwrap().name).collect();
    assert_eq!(names, vec!["backend".to_owned()]);
    tx.send(DiscoveryRequest {
        type_url: Cluster::type_url(),
        response_nonce: resp.nonce.clone(),
        error_detail: Some(Status { code: 3, message: "test rejects this config".into(), details: vec![] }),
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = m.control.addr.clone();
    let seen = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(5), "NACK visible in weft get proxies", || {
            let out = weft(&["get", "proxies", "--control", &addr]);
            stdout(&out).lines().any(|l| l.starts_with("nacker") && l.contains("test rejects this config"))
        })
    });
    seen.await.unwrap();
    drop(tx);
    tokio::task::spawn_blocking(move || drop(m)).await.unwrap();
}
