//! `weft up`: the bundled demo mesh and a mesh file, as a new user runs them.
use std::process::Command;
use std::time::Duration;
use weft_tests::*;

fn descendants(p: &Proc) -> Vec<i32> {
    let mut all = p.children();
    let mut i = 0;
    while i < all.len() {
        let pid = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                all.extend(text.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
        i += 1;
    }
    all
}

#[test]
fn bundled_demo_mesh_serves_http1_http2_and_grpc_then_stops_cleanly() {
    let dir = TestDir::new("demo");
    let mut up = Proc::spawn(&dir, "up", Command::new(weft_bin()).arg("up"));
    wait_up(&dir, &mut up);
    let r = curl(&["http://127.0.0.1:8080/"]).expect("HTTP/1.1 response");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("hello from frontend v1 (instance frontend-v1-0) via HTTP/1.1"), "{}", r.body);
    assert!(r.body.contains("upstream (200 OK): hello from backend v"), "{}", r.body);
    let r = curl(&["--http2-prior-knowledge", "http://127.0.0.1:8080/"]).expect("HTTP/2 response");
    assert!(r.body.contains("via HTTP/2"), "{}", r.body);
    assert!(r.body.contains("(instance backend-v"), "{}", r.body);
    let out = weft(&["demo-client", "--target", "127.0.0.1:8080"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("from frontend v1 (instance frontend-v1-0) -> hello weft from backend v"),
        "{}",
        stdout(&out)
    );
    // Both backend versions and all three instances take traffic.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let r = curl(&["http://127.0.0.1:8081/"]).unwrap();
        seen.insert(r.headers["x-served-by"].clone());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let out = weft(&["get", "endpoints", "backend"]);
    assert_eq!(
        stdout(&out).lines().filter(|l| l.contains("healthy") && l.contains("connected")).count(),
        3,
        "{}",
        stdout(&out)
    );

    let procs = descendants(&up);
    assert!(procs.len() >= 8, "4 sidecars and 4 apps: {procs:?}");
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(up.wait(Duration::from_secs(20)), Some(0));
    wait_until(Duration::from_secs(5), "no process left behind", || procs.iter().all(|p| !alive(*p)));
    assert!(curl(&["http://127.0.0.1:8080/"]).is_none(), "gateway still answering");
}

#[test]
fn mesh_file_with_resources_and_sigterm() {
    let dir = TestDir::new("meshfile");
    let (control, gw) = (free_port(), free_port());
    let up_port = free_port();
    let file = dir.path.join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            r#"control: {{listen: "127.0.0.1:{control}"}}
gateway: {{web: {gw}}}
services:
  - name: api
    labels: {{version: v1}}
    healthPath: /healthz
  - name: web
    command: [weft, demo-app]
    env: {{EXTRA: "1"}}
    upstreams: {{api: {up_port}}}
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Service
    metadata: {{name: api}}
    spec: {{loadBalancer: round-robin}}
  - apiVersion: weft.dev/v1alpha1
    kind: AuthorizationPolicy
    metadata: {{name: gateway-and-web-only}}
    spec: {{rules: [{{from: [{{services: [gateway, web]}}]}}]}}
  # Names services whose instances register only after the resources are applied.
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{name: web}}
    spec:
      parentRefs: [{{name: web}}]
      rules: [{{backendRefs: [{{name: web}}]}}]
"#
        ),
    )
    .unwrap();
    let mut up = Proc::spawn(&dir, "up", Command::new(weft_bin()).args(["up", "-f", file.to_str().unwrap()]));
    wait_up(&dir, &mut up);
    let r = curl(&[&format!("http://127.0.0.1:{gw}/")]).expect("response");
    assert!(r.body.contains("hello from web v1 (instance web-0)"), "{}", r.body);
    assert!(r.body.contains("hello from api v1 (instance api-v1-0)"), "{}", r.body);
    // The gateway's identity is `gateway`: the mesh-wide policy lets in only it and web.
    let out = weft(&["get", "certs", "-o", "json", "--control", &format!("127.0.0.1:{control}")]);
    let certs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        certs
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["instance"] == "gateway" && c["identity"] == "spiffe://weft.local/ns/default/sa/gateway"),
        "{certs}"
    );
    let out = weft(&["get", "services", "-o", "json", "--control", &format!("127.0.0.1:{control}")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(svc.as_array().unwrap().iter().any(|s| s["name"] == "api" && s["loadBalancer"] == "round-robin"), "{svc}");
    let out = weft(&["get", "httproutes", "-o", "json", "--control", &format!("127.0.0.1:{control}")]);
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(routes[0]["metadata"]["name"] == "web" && routes[0].get("status").is_none(), "{routes}");
    let procs = descendants(&up);
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(up.wait(Duration::from_secs(20)), Some(0));
    wait_until(Duration::from_secs(5), "no process left behind", || procs.iter().all(|p| !alive(*p)));
}

/// A `weft up` killed (SIGKILL) cannot remove its temporary data, which holds the mesh's CA key
/// and admin credential: the next `weft up` does, and forgets its credentials entry; a
/// stopped one (SIGTERM) removes its own.
#[test]
fn the_next_weft_up_removes_what_a_killed_one_left() {
    let dir = TestDir::new("up-stale");
    let mesh = |name: &str| {
        let (control, board) = (free_port(), free_port());
        let file = dir.path.join(format!("{name}.yaml"));
        let text = format!(
            "control: {{listen: 127.0.0.1:{control}}}\ndashboard: {{listen: 127.0.0.1:{board}}}\nservices: [{{name: a, healthPath: /healthz}}]\n"
        );
        std::fs::write(&file, text).unwrap();
        let mut up = Proc::spawn(&dir, name, Command::new(weft_bin()).args(["up", "-f", file.to_str().unwrap()]));
        wait_up(&dir, &mut up);
        let data = std::env::temp_dir().join(format!("weft-up-{}", up.child.id()));
        (up, data, format!("127.0.0.1:{control}"))
    };
    let known = |address: &str| std::fs::read_to_string(credentials_file()).unwrap_or_default().contains(address);
    let (mut first, first_data, first_control) = mesh("first");
    assert!(first_data.join("ca").is_dir() && known(&first_control), "{}", first_data.display());
    first.kill();
    assert!(first_data.exists(), "a killed weft up cannot clean up after itself");
    let (mut second, second_data, second_control) = mesh("second");
    assert!(!first_data.exists(), "the next weft up removes {}", first_data.display());
    assert!(!known(&first_control) && known(&second_control), "the credentials of the killed mesh are forgotten");
    let said = std::fs::read_to_string(dir.path.join("second.log")).unwrap();
    assert!(said.contains(&format!("removed {}", first_data.display())), "{said}");
    assert!(second_data.exists(), "a running mesh's data is its own");
    second.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(second.wait(Duration::from_secs(20)), Some(0));
    assert!(!second_data.exists() && !known(&second_control), "a stopped weft up removes its own");
}
