//! HTTPRoute (Gateway API) applied with `weft apply` changes live traffic: weighted splits
//! between services and header/path matches.
use weft_tests::*;

#[test]
fn httproute_splits_and_matches() {
    let dir = TestDir::new("routing");
    let control = Control::start(&dir);
    let _v1 = Instance::start(&dir, &control.addr, "backend-v1", "v1", "b1", &[]);
    let _v2 = Instance::start(&dir, &control.addr, "backend-v2", "v2", "b2", &[]);
    let _main = Instance::start(&dir, &control.addr, "backend", "v0", "b0", &[]);
    wait_until(std::time::Duration::from_secs(15), "all healthy", || {
        ["backend", "backend-v1", "backend-v2"].iter().all(|s| control.healthy_ids(s).len() == 1)
    });
    let edge = Edge::start(&dir, &control, &["backend"]);
    let url = edge.url("backend", "/");
    let served = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.push(&url);
        curl(&args).unwrap().headers["x-served-by"].clone()
    };
    assert_eq!(served(&[]), "b0");
    let route = dir.path.join("route.yaml");
    std::fs::write(
        &route,
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary}
spec:
  parentRefs: [{name: backend}]
  rules:
  - matches: [{headers: [{name: x-canary, value: \"yes\"}]}]
    backendRefs: [{name: backend-v2}]
  - backendRefs: [{name: backend-v1, weight: 75}, {name: backend-v2, weight: 25}]
",
    )
    .unwrap();
    let out = weft(&["apply", "-f", route.to_str().unwrap(), "--control", &control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(std::time::Duration::from_secs(5), "route in force", || served(&[]) != "b0");
    for _ in 0..10 {
        assert_eq!(served(&["-H", "x-canary: yes"]), "b2");
    }
    let mut v1 = 0;
    for _ in 0..200 {
        match served(&[]).as_str() {
            "b1" => v1 += 1,
            "b2" => {}
            other => panic!("unexpected backend {other}"),
        }
    }
    assert!((120..=180).contains(&v1), "75/25 split gave {v1}/200 to v1");
    // Deleting the route restores the default.
    assert!(weft(&["delete", "httproute", "canary", "--control", &control.addr]).status.success());
    wait_until(std::time::Duration::from_secs(5), "default route back", || served(&[]) == "b0");
}
