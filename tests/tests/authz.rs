//! Authorization policy, end to end: DENY and ALLOW rules by caller identity, applied live;
//! refusals are typed (403 `denied` with the policy's name, gRPC PERMISSION_DENIED) and counted.
use std::time::{Duration, Instant};
use weft_tests::*;

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
    apply_ok(
        &m.dir,
        &m.control.addr,
        "deny.yaml",
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
    apply_ok(
        &m.dir,
        &m.control.addr,
        "allow.yaml",
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

/// Other spellings of a denied path (merged slashes, percent-encoded letters, dot segments,
/// path parameters, encoded slashes) are normalised before authorization, so `DENY /admin/*`
/// refuses them all, and the app is sent the normal form that policy saw. Both sidecars
/// normalise: the caller's (through the edge) and the app's own (plaintext, permissive mode).
#[test]
fn other_spellings_of_a_denied_path_are_denied() {
    let dir = TestDir::new("authz-paths");
    let control = Control::start_with(&dir, &["--mtls", "permissive"]);
    let (port, seen) = fake_app(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n".to_vec());
    let _sidecar = app_sidecar(&dir, &control, "paths", port, &[]);
    let edge = Edge::start(&dir, &control, &["paths"]);
    wait_until(Duration::from_secs(5), "edge has the endpoint", || edge.endpoint_addrs("paths").len() == 1);
    apply_ok(
        &dir,
        &control.addr,
        "deny.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin}\nspec:\n  service: paths\n  action: DENY\n  rules:\n  - to: [{paths: [\"/admin/*\"]}]\n",
    );
    let get = |path: &str| curl(&["--path-as-is", &edge.url("paths", path)]).expect("a response");
    let inbound = control.endpoints("paths")[0]["registration"]["inbound"].as_str().unwrap().to_owned();
    let direct = |path: &str| curl(&["--path-as-is", &format!("http://{inbound}{path}")]).expect("a response");
    within("admin denied", || get("/admin/x").status == 403 && direct("/admin/x").status == 403);
    for path in ["//admin/x", "/%61dmin/x", "/public/../admin/x", "/./admin/x", "/public/%2e%2e/admin/x"] {
        for r in [get(path), direct(path)] {
            assert_eq!((r.status, r.headers.get("x-weft-error").map(String::as_str)), (403, Some("denied")), "{path}");
        }
    }
    // Path parameters could be stripped by the app (`/admin;x/y` is `/admin/y` to Tomcat).
    for path in ["/admin;x", "/admin;x/y", "/public/..;/admin/x"] {
        for r in [get(path), direct(path)] {
            let reason = r.headers.get("x-weft-error").map(String::as_str);
            assert_eq!((r.status, reason), (400, Some("invalid-path")), "{path}");
        }
    }
    // Straight to the app's sidecar, too, the app gets the normal form.
    while seen.try_recv().is_ok() {}
    assert_eq!(direct("//public/./b/%7e").status, 200);
    let head = String::from_utf8(seen.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert!(head.starts_with("GET /public/b/~ HTTP/1.1\r\n"), "{head}");
    // Allowed requests reach the app in normal form, the query as sent.
    while seen.try_recv().is_ok() {}
    let r = get("/public/./a//b/../%63?q=%2e./x");
    assert_eq!(r.status, 200, "{r:?}");
    let head = String::from_utf8(seen.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert!(head.starts_with("GET /public/a/c?q=%2e./x HTTP/1.1\r\n"), "{head}");

    // `%2F` is kept by default (one segment, as Istio's default); a service whose app decodes
    // it has it decoded (and then denied), or refused.
    assert_eq!(get("/admin%2fx").status, 200);
    let head = String::from_utf8(seen.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert!(head.starts_with("GET /admin%2Fx HTTP/1.1\r\n"), "{head}");
    let service = |mode: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: paths}}\nspec: {{escapedSlashes: {mode}}}\n"
        )
    };
    apply_ok(&dir, &control.addr, "decode.yaml", &service("decode"));
    within("%2F decoded", || get("/admin%2Fx").status == 403);
    assert_eq!(get("/admin%5Cx").status, 403);
    apply_ok(&dir, &control.addr, "reject.yaml", &service("reject"));
    within("%2F refused", || get("/admin%2Fx").status == 400);
    assert_eq!(get("/public%2fx").headers.get("x-weft-error").map(String::as_str), Some("invalid-path"));
}
