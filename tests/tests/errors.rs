//! Bad input gets one clear error that names the file, the field and the reason, and changes
//! nothing. Responses the proxy makes itself say why.
use std::time::Duration;
use weft_tests::*;

fn no_panic(out: &std::process::Output) {
    let err = stderr(out);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
}

const ROUTE_OK: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r1}
spec:
  parentRefs: [{name: backend}]
  rules: [{backendRefs: [{name: backend}]}]
";

#[test]
fn apply_rejects_bad_files_and_stores_nothing() {
    let m = SmallMesh::start("apply", 1);
    let cases: &[(&str, &str, &[&str])] = &[
        ("syntax.yaml", "kind: Service\nmetadata: {name: x\n", &["syntax.yaml: document 1: invalid YAML (line"]),
        (
            "unknown-field.yaml",
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {loadBalancr: round-robin}\n",
            &["unknown-field.yaml: document 1, field spec.loadBalancr: unknown field `loadBalancr`"],
        ),
        (
            "wrong-type.yaml",
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {connectTimeout: [1]}\n",
            &["wrong-type.yaml: document 1, field spec.connectTimeout: invalid type"],
        ),
        (
            "unknown-kind.yaml",
            "apiVersion: weft.dev/v1alpha1\nkind: VirtualService\nmetadata: {name: x}\nspec: {}\n",
            &[
                "unknown-kind.yaml: document 1, field kind: unknown kind \"VirtualService\"; weft accepts Service, HTTPRoute",
            ],
        ),
        (
            // The first document is fine; the second is not (README's example).
            "route.yaml",
            &format!(
                "{ROUTE_OK}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r2}}\nspec:\n  parentRefs: [{{name: backend}}]\n  rules: [{{backendRefs: [{{name: backend, weight: -1}}]}}]\n"
            ),
            &[
                "route.yaml: document 2, field spec.rules[0].backendRefs[0].weight: invalid value: integer `-1`, expected u32; nothing was applied",
            ],
        ),
    ];
    for (file, yaml, expected) in cases {
        let out = apply_yaml(&m.dir, &m.control.addr, file, yaml);
        assert!(!out.status.success(), "{file} was accepted");
        no_panic(&out);
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "one line for {file}: {err}");
        for e in *expected {
            assert!(err.contains(e), "{file}: expected {e:?} in {err:?}");
        }
        assert!(err.contains("nothing was applied"), "{err}");
        // Nothing stored: no routes, and the Service resource does not exist.
        assert_eq!(m.control.api("/api/v1/resources/httproutes").unwrap(), serde_json::json!([]));
        assert_eq!(m.control.api("/api/v1/resources/services").unwrap(), serde_json::json!([]));
    }
    // And the good document alone applies.
    let out = apply_yaml(&m.dir, &m.control.addr, "ok.yaml", ROUTE_OK);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "httproute/r1 created");
    assert_eq!(stdout(&apply_yaml(&m.dir, &m.control.addr, "ok.yaml", ROUTE_OK)).trim(), "httproute/r1 unchanged");
}

#[test]
fn operator_mistakes_get_one_clear_line() {
    let dir = TestDir::new("mistakes");
    // Unreachable control plane.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = weft(&["get", "services", "--control", &dead]);
    assert!(!out.status.success());
    no_panic(&out);
    assert_eq!(stderr(&out).trim().lines().count(), 1);
    assert!(stderr(&out).contains(&format!("no mesh root to verify the control plane at {dead}")), "{}", stderr(&out));
    // With a root to verify it by, the address is what is wrong.
    let root = dir.path.join("root.pem");
    std::fs::write(&root, rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.pem()).unwrap();
    let out = weft(&["get", "services", "--control", &dead, "--ca-file", root.to_str().unwrap()]);
    assert!(!out.status.success());
    no_panic(&out);
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("cannot reach the control plane at {dead}")), "{}", stderr(&out));

    // Port already in use, for the proxy and for the control plane.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = weft(&["proxy", "--upstream", &format!("backend={port}"), "--control", &dead]);
    assert!(!out.status.success());
    no_panic(&out);
    assert!(
        stderr(&out).contains(&format!("cannot listen on 127.0.0.1:{port} for upstream backend")),
        "{}",
        stderr(&out)
    );
    let data = dir.path.join("d");
    let out = weft(&["control", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", data.to_str().unwrap()]);
    assert!(!out.status.success());
    no_panic(&out);
    assert!(stderr(&out).contains(&format!("cannot listen on 127.0.0.1:{port}")), "{}", stderr(&out));

    // A missing flag.
    let out = weft(&["run", "--service", "x", "--", "true"]);
    assert!(!out.status.success());
    no_panic(&out);
    assert!(stderr(&out).contains("--port <PORT>"), "{}", stderr(&out));
    let out = weft(&["proxy", "--service", "x"]);
    assert!(!out.status.success());
    no_panic(&out);
    assert!(stderr(&out).contains("--app-port is required with --service"), "{}", stderr(&out));

    // A bad mesh file for `weft up`.
    let mesh = dir.path.join("mesh.yaml");
    std::fs::write(&mesh, "services:\n  - name: a\n    instancs: 2\n").unwrap();
    let out = weft(&["up", "-f", mesh.to_str().unwrap()]);
    assert!(!out.status.success());
    no_panic(&out);
    assert!(
        stderr(&out).contains("mesh.yaml: field services[0].instancs: unknown field `instancs`"),
        "{}",
        stderr(&out)
    );
}

/// A raw TCP app owned by the test: reads a request on each connection, writes `answer`
/// (perhaps nothing) and closes. Returns its port.
#[test]
fn proxy_says_why_when_it_answers_itself() {
    let dir = TestDir::new("proxyerrors");
    let control = Control::start(&dir);
    // A declared service with no instances.
    let svc = dir.path.join("ghost.yaml");
    std::fs::write(&svc, "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: ghost}\nspec: {}\n").unwrap();
    assert!(weft(&["apply", "-f", svc.to_str().unwrap(), "--control", &control.addr]).status.success());

    // "gone": healthy when checked once, then the app stops listening (checks are hourly).
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_port = gone.local_addr().unwrap().port();
    // "reset": reads the request, closes without answering.
    let (reset_port, _) = fake_app(Vec::new());
    // "bighead": answers with a 20 KB response head, over the 16 KiB weft accepts upstream.
    let big = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n", "a".repeat(20_000));
    let (bighead_port, _) = fake_app(big.into_bytes());
    let _sidecars: Vec<Proc> = [("gone", gone_port), ("reset", reset_port), ("bighead", bighead_port)]
        .into_iter()
        .map(|(svc, port)| app_sidecar(&dir, &control, svc, port, &[]))
        .collect();
    drop(gone);
    let edge = Edge::start(&dir, &control, &["ghost", "gone", "reset", "bighead", "nothing"]);
    wait_until(Duration::from_secs(5), "edge has endpoints", || {
        edge.endpoint_addrs("reset").len() == 1 && edge.endpoint_addrs("bighead").len() == 1
    });

    let cases = [
        ("ghost", 503, "no-endpoints"),
        ("gone", 502, "connect-failed"),
        ("reset", 502, "upstream-reset"),
        ("bighead", 502, "upstream-bad-response"),
        ("nothing", 503, "unknown-cluster"),
    ];
    for (svc, status, reason) in cases {
        let r = curl(&[&edge.url(svc, "/")]).expect("a response");
        assert_eq!(r.status, status, "{svc}: {r:?}");
        assert_eq!(r.headers.get("x-weft-error").map(String::as_str), Some(reason), "{svc}: {r:?}");
        assert!(r.body.starts_with("weft: "), "{svc}: {}", r.body);
    }
    // gRPC clients get a gRPC status instead.
    let out = weft(&["demo-client", "--target", &format!("127.0.0.1:{}", edge.ports["ghost"])]);
    assert!(
        stderr(&out).contains("service \\\"ghost\\\" has no healthy endpoints") || stderr(&out).contains("ghost"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("Unavailable"), "{}", stderr(&out));
    // Each is counted by reason.
    let metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", edge.admin())]));
    assert!(
        metrics.contains("weft_proxy_errors_total{direction=\"outbound\",service=\"ghost\",reason=\"no-endpoints\"}"),
        "{metrics}"
    );
}

/// A flood of requests the proxy answers itself (here 600 to a service with no instance) is
/// counted one by one, but logged once per reason per 10 s, the line saying how many like it
/// were left out.
#[test]
fn a_flood_of_refusals_is_counted_not_logged_line_by_line() {
    let dir = TestDir::new("log-flood");
    let control = Control::start(&dir);
    let edge = Edge::start(&dir, &control, &["ghost"]);
    let url = edge.url("ghost", "/");
    let mut args = vec!["-s", "-w", "%{http_code}\\n"];
    for _ in 0..300 {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let answered = || -> Vec<String> {
        let out = run("curl", &args);
        stdout(&out).lines().map(str::to_owned).collect()
    };
    let codes: Vec<String> = answered().into_iter().chain(answered()).collect();
    assert_eq!(codes.len(), 600);
    assert!(codes.iter().all(|c| c == "503"), "{:?}", &codes[..5]);
    let metrics = curl(&[&format!("http://{}/metrics", edge.admin())]).unwrap().body;
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("weft_proxy_errors_total{") && l.contains("service=\"ghost\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, 600, "every refusal is counted:\n{metrics}");
    let log = std::fs::read_to_string(dir.path.join("edge.log")).unwrap();
    let lines = log.lines().filter(|l| l.contains("answered") && l.contains("itself")).count();
    assert_eq!(lines, 1, "600 refusals within 10 s make one log line:\n{log}");
}
