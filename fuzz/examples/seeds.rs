//! Writes the generated seeds of fuzz/corpus/ (run from fuzz/: `cargo run --example seeds`):
//! xDS resources as the control plane's translator makes them for a mesh of the README's
//! resources; a ClientHello as rustls writes it; a CSR as the proxy makes it; a join token of
//! another control plane. Hand-written seeds (HTTP requests, YAML, JWTs) sit beside them.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use weft_api::registry::{InstanceRegistration, Upstream};
use weft_control::fuzzing::{TokenKey, Type};
use weft_control::{CaConfig, Mesh};

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend}
spec: {protocol: http, loadBalancer: p2c-ewma, connectTimeout: 1s, mtls: strict}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend-v1}
spec:
  selector: {service: backend, labels: {version: v1}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend-v2}
spec:
  selector: {service: backend, labels: {version: v2}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: sessions}
spec: {loadBalancer: ring-hash, consistentHash: {header: x-user}}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: frontend-may-read}
spec:
  service: backend
  action: ALLOW
  rules:
  - from: [{services: [frontend]}]
    to: [{methods: [GET], paths: ["/api/*"]}]
    when: [{header: x-tenant, values: [blue]}]
---
apiVersion: weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: backend-jwt}
spec:
  service: backend
  required: true
  issuers:
  - issuer: https://auth.example.com
    audiences: [backend]
    jwks: '{"keys":[{"kty":"oct","kid":"k1","alg":"HS256","k":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"}]}'
    clockSkew: 30s
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend-limits}
spec:
  targetRef: {kind: Service, name: backend}
  connectionPool: {maxRequests: 100, maxConnectionsPerInstance: 50, idleTimeout: 30s}
  retry:
    attempts: 2
    perTryTimeout: 500ms
    retryOn: [5xx, reset, connect-failure]
    backoff: {baseInterval: 25ms, maxInterval: 250ms}
    budget: {percent: 20, minRetryConcurrency: 3}
  outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s, maxEjectionPercent: 10}
  rateLimit:
    service: {requests: 1000, interval: 1s, burst: 200}
    perCaller: {requests: 100, interval: 1s}
  fault:
    delay: {fixedDelay: 200ms, percentage: 10}
    abort: {httpStatus: 503, percentage: 1}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-split}
spec:
  parentRefs: [{name: backend}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: backend-v2}]
  - backendRefs: [{name: backend-v1, weight: 90}, {name: backend-v2, weight: 10}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: streams-to-v2}
spec:
  parentRefs: [{name: sessions}]
  rules:
  - matches: [{method: {service: weft.demo.v1.Demo, method: HelloStream}}]
    backendRefs: [{name: backend-v2}]
  - backendRefs: [{name: backend-v1}]
---
apiVersion: weft.dev/v1alpha1
kind: Telemetry
metadata: {name: mesh-errors}
spec:
  accessLog: {errorsOnly: true, percentage: 50}
  tracing: {collector: 127.0.0.1:4317, samplingPercentage: 10}
---
apiVersion: weft.dev/v1alpha1
kind: Telemetry
metadata: {name: split-logs}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: backend-split}
  accessLog: {output: /var/log/weft/split.log}
"#;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let corpus = Path::new("corpus");
    let tmp = std::env::temp_dir().join(format!("weft-seeds-{}", std::process::id()));
    let ca = CaConfig {
        trust_domain: "weft.local".into(),
        datacenter: "dc1".into(),
        namespace: "default".into(),
        cert_ttl: Duration::from_secs(3600),
        provided: None,
    };
    let mesh = Mesh::open(&tmp, Duration::from_secs(1), ca.clone(), Default::default()).unwrap();
    let resources = weft_api::resource::parse_documents(MESH).unwrap();
    mesh.apply(resources, vec![]).expect("the seed mesh applies");
    let reg = |service: &str, port: u16, version: &str| InstanceRegistration {
        service: Some(service.into()),
        inbound: Some(format!("127.0.0.1:{port}")),
        app: Some(format!("127.0.0.1:{}", port + 1000)),
        admin: None,
        labels: [("version".to_owned(), version.to_owned())].into(),
        upstreams: vec![Upstream { service: "backend".into(), listen: "127.0.0.1:9000".into() }],
        capture: None,
        mesh_gateway_local: None,
        healthy: true,
    };
    let frontend = reg("frontend", 7000, "v1");
    let backend = reg("backend", 7001, "v1");
    mesh.connect("backend-1", backend.clone(), 1, None).expect("registered");
    mesh.connect("backend-2", reg("backend", 7002, "v2"), 2, None).expect("registered");
    mesh.connect("frontend-1", frontend.clone(), 3, None).expect("registered");
    // A transparent instance: its capture listener, virtual listeners and passthrough cluster.
    let transparent = InstanceRegistration {
        upstreams: vec![],
        capture: Some("127.0.0.1:15001".into()),
        ..reg("client", 7003, "v1")
    };
    mesh.connect("client-1", transparent.clone(), 4, None).expect("registered");
    let snapshot = mesh.subscribe().borrow().clone();
    for (kind, t) in [Type::Listener, Type::Route, Type::Cluster, Type::Endpoint, Type::Secret].into_iter().enumerate()
    {
        for (node, who) in [
            (Some(&frontend), "frontend"),
            (Some(&backend), "backend"),
            (Some(&transparent), "client"),
            (None, "shared"),
        ] {
            for (name, res) in snapshot.available(t, node) {
                let mut seed = vec![kind as u8];
                seed.extend_from_slice(&res.any.value);
                let file = format!("{}-{}", name.replace(['/', ':', '|', ' '], "_"), who);
                write(&corpus.join("xds"), &file, &seed);
            }
        }
    }
    // A join token of another control plane.
    let key = TokenKey::open(&tmp.join("other")).unwrap();
    write(&corpus.join("token"), "issued-elsewhere", key.issue("backend", 4_102_444_800).1.as_bytes());
    // A CSR as the proxy makes one.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&pair).unwrap();
    write(&corpus.join("csr"), "rcgen.pem", csr.pem().unwrap().as_bytes());
    write(&corpus.join("csr"), "rcgen.der", csr.der());
    // A ClientHello as rustls writes it (the proxy's own mTLS client).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"weft-mtls".to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut client = rustls::ClientConnection::new(Arc::new(config), "backend.weft.local".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    write(&corpus.join("detect"), "clienthello-rustls", &hello);
    let _ = std::fs::remove_dir_all(&tmp);
}
