//! Authorization policy, end to end: DENY and ALLOW rules by caller identity, applied live;
//! refusals are typed (403 `denied` with the policy's name, gRPC PERMISSION_DENIED) and counted.
use std::time::{Duration, Instant};
use weft_tests::*;

fn apply(dir: &TestDir, control: &Control, name: &str, yaml: &str) {
    let path = dir.path.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = weft(&["apply", "-f", path.to_str().unwrap(), "--control", &control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// How long until `f` holds, checked every 20 ms; panics after 5 s.
fn within(what: &str, f: impl FnMut() -> bool) -> Duration {
    wait_until(Duration::from_secs(5), what, f)
}

#[test]
fn policies_refuse_and_allow_callers_by_identity_live() {
    let m = SmallMesh::start("authz", 1);
    let frontend =
        Edge::start_with(&m.dir, &m.control.addr, &m.control.addr, "frontend-0", "frontend", &["backend"], &[]);
    let other = Edge::start_with(&m.dir, &m.control.addr, &m.control.addr, "other-0", "other", &["backend"], &[]);
    let status = |e: &Edge| curl(&[&e.url("backend", "/")]).map_or(0, |r| r.status);
    wait_until(Duration::from_secs(10), "both callers reach backend", || {
        status(&frontend) == 200 && status(&other) == 200
    });

    // DENY frontend → backend: refused within a second of `weft apply`; another caller is not.
    let applied = Instant::now();
    apply(
        &m.dir,
        &m.control,
        "deny",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-frontend}\nspec:\n  service: backend\n  action: DENY\n  rules:\n  - from: [{services: [frontend]}]\n",
    );
    within("frontend denied", || status(&frontend) == 403);
    assert!(applied.elapsed() < Duration::from_secs(1), "took {:?}", applied.elapsed());
    let r = curl(&[&frontend.url("backend", "/")]).unwrap();
    assert_eq!(r.headers.get("x-weft-error").map(String::as_str), Some("denied"), "{r:?}");
    assert_eq!(r.headers.get("x-weft-policy").map(String::as_str), Some("deny-frontend"), "{r:?}");
    assert_eq!(status(&other), 200);
    // gRPC gets PERMISSION_DENIED.
    let out = weft(&["demo-client", "--target", &format!("127.0.0.1:{}", frontend.ports["backend"])]);
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(said.contains("PermissionDenied") || said.contains("permission denied"), "{said}");

    // Deleting the policy restores access within a second.
    let deleted = Instant::now();
    assert!(weft(&["delete", "authorizationpolicy", "deny-frontend", "--control", &m.control.addr]).status.success());
    within("frontend allowed again", || status(&frontend) == 200);
    assert!(deleted.elapsed() < Duration::from_secs(1), "took {:?}", deleted.elapsed());

    // Default deny for backend plus one ALLOW rule: exactly that caller gets through.
    apply(
        &m.dir,
        &m.control,
        "allow",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: backend-default-deny}\nspec: {service: backend}\n---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: frontend-may-get}\nspec:\n  service: backend\n  rules:\n  - from: [{identities: [\"spiffe://weft.local/ns/default/sa/frontend\"]}]\n    to: [{methods: [GET], paths: [\"/\", \"/info\"]}]\n",
    );
    within("other refused by default deny", || status(&other) == 403);
    let r = curl(&[&other.url("backend", "/")]).unwrap();
    assert_eq!(r.headers.get("x-weft-policy").map(String::as_str), Some("default-deny"), "{r:?}");
    assert_eq!(status(&frontend), 200);
    // The allowed caller only for what the rule names.
    let post = curl(&["-X", "POST", "-d", "x", &frontend.url("backend", "/echo")]).unwrap();
    assert_eq!(post.status, 403, "{post:?}");

    // Every decision is counted by policy and outcome.
    let metrics = curl(&[&format!("http://{}/metrics", m.backends[0].admin())]).unwrap().body;
    for line in [
        "policy=\"deny-frontend\",decision=\"deny\"",
        "policy=\"default-deny\",decision=\"deny\"",
        "policy=\"frontend-may-get\",decision=\"allow\"",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[test]
fn invalid_policies_are_refused_at_apply() {
    let dir = TestDir::new("authz-invalid");
    let control = Control::start(&dir);
    let path = dir.path.join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\nspec:\n  rules:\n  - from: [{identities: [frontend]}]\n",
    )
    .unwrap();
    let out = weft(&["apply", "-f", path.to_str().unwrap(), "--control", &control.addr]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spec.rules[0].from[0].identities[0]") && stderr(&out).contains("not a SPIFFE ID"),
        "{}",
        stderr(&out)
    );
    assert_eq!(control.api("/api/v1/resources/authorizationpolicies").unwrap(), serde_json::json!([]));
}
