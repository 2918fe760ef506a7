//! Config fails closed: a proxy refuses (NACKs) config it cannot honour and keeps serving its
//! last good config; config for a service that is gone is removed from the proxy.
//!
//! The NACK test puts a relay between an edge proxy and the real control plane. The relay
//! passes the ADS stream through and, when told to, adds to every Listener what a future
//! control plane might send (an RBAC HTTP filter, a TLS transport socket): what a proxy that
//! ignored it would silently fail open on.
use envoy_types::pb::envoy::config::core::v3::TransportSocket;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_filter,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use weft_tests::*;

const PASS: u8 = 0;
const ADD_CORS_FILTER: u8 = 1;
const ADD_TLS_SOCKET: u8 = 2;

struct Relay {
    control: String,
    mode: Arc<AtomicU8>,
}

fn tamper(mode: u8, any: &mut Any) {
    let mut l = Listener::decode(any.value.as_slice()).unwrap();
    for chain in &mut l.filter_chains {
        match mode {
            ADD_TLS_SOCKET => {
                chain.transport_socket =
                    Some(TransportSocket { name: "envoy.transport_sockets.tls".into(), config_type: None })
            }
            ADD_CORS_FILTER => {
                for f in &mut chain.filters {
                    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(cfg)) =
                        &mut f.config_type
                    else {
                        continue;
                    };
                    if cfg.type_url != HttpConnectionManager::type_url() {
                        continue;
                    }
                    let mut hcm = HttpConnectionManager::decode(cfg.value.as_slice()).unwrap();
                    let cors = Any {
                        type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors".into(),
                        value: vec![],
                    };
                    let filter = HttpFilter {
                        name: "envoy.filters.http.cors".into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(cors)),
                        ..Default::default()
                    };
                    hcm.http_filters.insert(0, filter);
                    cfg.value = hcm.encode_to_vec();
                }
            }
            _ => {}
        }
    }
    any.value = l.encode_to_vec();
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Relay {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.control))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // The proxy's join token goes on to the control plane, which checks it.
        let token = req.metadata().get("authorization").cloned();
        let (up_tx, up_rx) = tokio::sync::mpsc::channel(16);
        let mut requests = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(r)) = requests.message().await {
                if up_tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        let mut upstream_req = tonic::Request::new(ReceiverStream::new(up_rx));
        if let Some(t) = token {
            upstream_req.metadata_mut().insert("authorization", t);
        }
        let mut upstream = client.stream_aggregated_resources(upstream_req).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mode = self.mode.clone();
        tokio::spawn(async move {
            while let Ok(Some(mut resp)) = upstream.message().await {
                let m = mode.load(Ordering::SeqCst);
                if m != PASS && resp.type_url == Listener::type_url() {
                    resp.resources.iter_mut().for_each(|any| tamper(m, any));
                }
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("the test relay passes state-of-the-world streams only"))
    }
}

fn apply_service(dir: &TestDir, control: &Control, name: &str, protocol: &str) {
    let path = dir.path.join(format!("{name}-{protocol}.yaml"));
    let yaml = format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  protocol: {protocol}\n"
    );
    std::fs::write(&path, yaml).unwrap();
    let out = weft(&["apply", "-f", path.to_str().unwrap(), "--control", &control.addr]);
    assert!(out.status.success(), "weft apply: {}", stderr(&out));
}

fn last_rejected(edge: &Edge) -> String {
    let dump = get_json(&edge.admin(), "/config_dump").unwrap_or_default();
    dump["last_rejected"].as_str().unwrap_or_default().to_owned()
}

fn status(url: &str) -> u16 {
    curl(&["-s", url]).map_or(0, |r| r.status)
}

/// A server certificate for 127.0.0.1, signed with the control plane's root key.
fn relay_certificate(control: &Control) -> (String, String) {
    let ca_dir = control.data_dir.join("ca");
    let root_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("root.key")).unwrap()).unwrap();
    let root_pem = std::fs::read_to_string(ca_dir.join("root.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn unsupported_listener_config_is_nacked_and_the_last_good_config_keeps_serving() {
    let dir = TestDir::new("nack");
    let control = Control::start(&dir);
    let _backend = Instance::start(&dir, &control.addr, "backend", "v1", "backend-0", &[]);
    wait_until(Duration::from_secs(15), "backend healthy", || control.healthy_ids("backend").len() == 1);

    // The relay runs on a runtime of its own; everything else in the test is blocking.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let relay_listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let relay_addr = relay_listener.local_addr().unwrap().to_string();
    let mode = Arc::new(AtomicU8::new(PASS));
    // The relay speaks TLS with a certificate from the mesh root (as the control plane does),
    // and passes the stream on to the control plane's plaintext xDS listener.
    let relay = Relay { control: control.xds_plain.clone(), mode: mode.clone() };
    let (cert, key) = relay_certificate(&control);
    let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
    rt.spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(relay))
            .serve_with_incoming(TcpListenerStream::new(relay_listener)),
    );

    let edge = Edge::start_with(
        &dir,
        &control.addr,
        &control.addr,
        "edge-nack",
        "edge",
        &["backend"],
        &["--xds", &relay_addr],
    );
    wait_until(Duration::from_secs(10), "traffic through the edge", || status(&edge.url("backend", "/")) == 200);
    let listeners_before = get_json(&edge.admin(), "/config_dump").unwrap()["listeners"].clone();

    for (mode_value, protocol, what) in [
        (ADD_CORS_FILTER, "http", "HTTP filter \"envoy.filters.http.cors\""),
        (ADD_TLS_SOCKET, "auto", "transport socket \"envoy.transport_sockets.tls\""),
    ] {
        mode.store(mode_value, Ordering::SeqCst);
        // A change to the service makes the control plane push new listeners.
        apply_service(&dir, &control, "backend", protocol);
        wait_until(Duration::from_secs(10), "the edge NACKs", || last_rejected(&edge).contains(what));
        let nack = last_rejected(&edge);
        assert!(nack.starts_with("Listener \"outbound|backend|"), "{nack}");
        assert!(nack.contains("is not supported"), "{nack}");
        // The control plane shows the NACK, with the reason, for this proxy.
        let out = weft(&["get", "proxies", "--control", &control.addr]);
        let table = stdout(&out);
        let row = table.lines().find(|l| l.starts_with("edge-nack")).unwrap_or_default();
        assert!(row.contains(what), "weft get proxies:\n{table}");
        // The last good config stays in force, and serves.
        let listeners = get_json(&edge.admin(), "/config_dump").unwrap()["listeners"].clone();
        assert_eq!(listeners, listeners_before, "listeners changed although the update was refused");
        for _ in 0..20 {
            assert_eq!(status(&edge.url("backend", "/")), 200);
        }
    }

    // Config the proxy can honour is accepted again.
    mode.store(PASS, Ordering::SeqCst);
    apply_service(&dir, &control, "backend", "http");
    wait_until(Duration::from_secs(10), "the edge takes the new listeners", || {
        get_json(&edge.admin(), "/config_dump").unwrap_or_default()["listeners"] != listeners_before
    });
    assert_eq!(status(&edge.url("backend", "/")), 200);
}

#[test]
fn removing_a_service_removes_its_cluster_and_route_table() {
    let m = SmallMesh::start("removal", 1);
    apply_service(&m.dir, &m.control, "gone", "http");
    let edge = Edge::start(&m.dir, &m.control, &["gone", "backend"]);
    let dump = || get_json(&edge.admin(), "/config_dump").unwrap_or_default();
    let has = |section: &str, name: &str| dump()[section].as_object().is_some_and(|o| o.contains_key(name));
    assert!(has("clusters", "gone") && has("routes", "gone"), "{:#}", dump());
    let r = curl(&["-s", &edge.url("gone", "/")]).unwrap();
    assert_eq!((r.status, r.headers.get("x-weft-error").map(String::as_str)), (503, Some("no-endpoints")));

    let out = weft(&["delete", "service", "gone", "--control", &m.control.addr]);
    assert!(out.status.success(), "weft delete: {}", stderr(&out));
    wait_until(Duration::from_secs(10), "the edge forgets gone", || {
        !has("clusters", "gone") && !has("routes", "gone") && !has("endpoints", "gone")
    });
    // What is still in use stays; the listener for `gone` answers with a clear error.
    assert!(has("clusters", "backend") && has("routes", "backend"), "{:#}", dump());
    let r = curl(&["-s", &edge.url("gone", "/")]).unwrap();
    assert_eq!((r.status, r.headers.get("x-weft-error").map(String::as_str)), (503, Some("unknown-cluster")));
    assert_eq!(curl(&["-s", &edge.url("backend", "/")]).unwrap().status, 200);
}
