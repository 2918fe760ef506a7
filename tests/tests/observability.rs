//! The proxy's admin endpoint: liveness, readiness, Prometheus metrics and the config dump.
use weft_tests::*;

#[test]
fn metrics_pass_promtool_and_count_traffic() {
    let m = SmallMesh::start("metrics", 1);
    for _ in 0..5 {
        assert_eq!(curl(&[&m.edge.url("backend", "/")]).unwrap().status, 200);
    }
    assert_eq!(curl(&[&m.edge.url("backend", "/status/404")]).unwrap().status, 404);
    assert_eq!(curl(&[&m.edge.url("backend", "/status/503")]).unwrap().status, 503);
    let r = curl(&[&format!("http://{}/metrics", m.edge.admin())]).unwrap();
    assert_eq!(r.status, 200);
    let path = m.dir.path.join("metrics.txt");
    std::fs::write(&path, &r.body).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .expect("promtool (Debian package prometheus) must be installed: scripts/test installs it");
    assert!(out.status.success(), "promtool: {}{}", stdout(&out), stderr(&out));
    let body = &r.body;
    // The edge's outbound requests: the caller is the edge (its certificate names it), the
    // callee the backend instance whose identity mutual TLS proved, over its default route.
    let out = [
        r#"direction="outbound""#,
        r#"src_service="edge""#,
        r#"dst_service="backend""#,
        r#"peer_identity="spiffe://weft.local/ns/default/sa/backend""#,
        r#"route="default""#,
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> { out.iter().copied().chain(extra.iter().copied()).collect() };
    assert_eq!(metric_sum(body, "weft_requests_total", &with(&[r#"code="200""#, r#"class="success""#])), 5.0);
    assert_eq!(metric_sum(body, "weft_requests_total", &with(&[r#"code="404""#, r#"class="success""#])), 1.0);
    assert_eq!(metric_sum(body, "weft_requests_total", &with(&[r#"code="503""#, r#"class="failure""#])), 1.0);
    assert_eq!(metric_sum(body, "weft_request_duration_seconds_count", &out), 7.0);
    assert!(
        metric_sum(body, "weft_tcp_connections_opened_total", &[r#"direction="outbound""#, r#"service="backend""#])
            >= 7.0
    );
    // The backend's sidecar counts the same requests inbound, from the edge's proven identity.
    let inbound = curl(&[&format!("http://{}/metrics", m.backends[0].admin())]).unwrap().body;
    let edge_in = [
        r#"direction="inbound""#,
        r#"src_service="edge""#,
        r#"dst_service="backend""#,
        r#"peer_identity="spiffe://weft.local/ns/default/sa/edge""#,
        r#"route="default""#,
        r#"code="200""#,
    ];
    assert_eq!(metric_sum(&inbound, "weft_requests_total", &edge_in), 5.0, "{inbound}");
    assert!(inbound.contains(
        r#"weft_xds_updates_total{type_url="type.googleapis.com/envoy.config.listener.v3.Listener",result="ack"}"#
    ));
}

#[test]
fn live_ready_and_config_dump() {
    let m = SmallMesh::start("admin", 2);
    let admin = m.backends[0].admin();
    assert_eq!(curl(&[&format!("http://{admin}/live")]).unwrap().status, 200);
    assert_eq!(curl(&[&format!("http://{admin}/ready")]).unwrap().status, 200);
    assert_eq!(curl(&[&format!("http://{admin}/nope")]).unwrap().status, 404);
    let dump = get_json(&m.edge.admin(), "/config_dump").unwrap();
    assert_eq!(dump["control_plane_connected"], true);
    let listener = &dump["listeners"][format!("outbound|backend|127.0.0.1:{}", m.edge.ports["backend"])];
    assert_eq!(listener["http"]["rds"], "backend", "{dump}");
    assert_eq!(listener["tcp_cluster"], "backend");
    assert_eq!(dump["clusters"]["backend"]["load_balancer"], "p2c-ewma");
    let eps = dump["endpoints"]["backend"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    assert!(eps.iter().all(|e| e["healthy"] == true && e["labels"]["instance"].is_string()));
    // The backend's own dump shows its inbound listener and the static app cluster.
    let own = get_json(&admin, "/config_dump").unwrap();
    assert!(
        own["clusters"]["inbound|app"]["static_endpoints"][0]["address"]
            .as_str()
            .unwrap()
            .ends_with(&m.backends[0].app_port.to_string())
    );
}

/// Access logs switched on for one service by `weft apply` are written within a second: one
/// JSON object per request at each end (the caller's sidecar, outbound, and the service's own,
/// inbound), to an owner-only file. Deleted, they stop.
#[test]
fn access_logs_follow_a_telemetry_resource_live() {
    let m = SmallMesh::start("access-log", 1);
    let log = m.dir.path.join("access.log");
    let doc = m.dir.path.join("telemetry.yaml");
    std::fs::write(
        &doc,
        format!(
            "apiVersion: weft.dev/v1alpha1
kind: Telemetry
metadata: {{name: backend-logs}}
spec:
  targetRef: {{kind: Service, name: backend}}
  accessLog: {{output: {}}}
",
            log.display()
        ),
    )
    .unwrap();
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
            .collect()
    };
    assert_eq!(curl(&[&m.edge.url("backend", "/")]).unwrap().status, 200);
    assert!(lines().is_empty(), "nothing is logged by default");
    let out = weft(&["apply", "-f", doc.to_str().unwrap(), "--control", &m.control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let url = m.edge.url("backend", "/status/503?token=secret");
    wait_until(std::time::Duration::from_secs(1), "both ends to log a request", || {
        assert_eq!(curl(&["-H", &traceparent, "-d", "0123456789", &url]).unwrap().status, 503);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let l = lines();
        ["outbound", "inbound"].iter().all(|d| l.iter().any(|e| e["direction"] == *d))
    });
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the log file is owner-only");
    let all = lines();
    let entry = |direction: &str| all.iter().rev().find(|e| e["direction"] == direction).unwrap().clone();
    let (out, inb) = (entry("outbound"), entry("inbound"));
    let backend_id = "spiffe://weft.local/ns/default/sa/backend";
    let edge_id = "spiffe://weft.local/ns/default/sa/edge";
    for e in [&out, &inb] {
        assert_eq!(e["method"], "POST", "{e}");
        assert_eq!(e["bytes_in"], 10, "{e}");
        assert_eq!(e["path"], "/status/503", "the path without its query: {e}");
        assert_eq!(e["protocol"], "HTTP/1.1", "{e}");
        assert_eq!(e["status"], 503, "{e}");
        assert_eq!(e["grpc_status"], serde_json::Value::Null, "{e}");
        assert_eq!(e["src_service"], "edge", "{e}");
        assert_eq!(e["dst_service"], "backend", "{e}");
        assert_eq!(e["src_identity"], edge_id, "{e}");
        assert_eq!(e["dst_identity"], backend_id, "{e}");
        assert_eq!(e["route"], "default", "{e}");
        assert_eq!(e["attempts"], 1, "{e}");
        assert_eq!(e["error"], serde_json::Value::Null, "the app answered 503, not the proxy: {e}");
        assert_eq!(e["trace_id"], trace, "{e}");
        assert!(e["duration_ms"].as_f64().unwrap() > 0.0, "{e}");
        assert!(e["duration_ms"].as_f64() >= e["response_head_ms"].as_f64(), "{e}");
        assert!(e["bytes_out"].as_u64().unwrap() > 0, "{e}");
        assert!(e["time"].as_str().unwrap().starts_with("20"), "{e}");
        assert!(e["authority"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    }
    let app = format!("127.0.0.1:{}", m.backends[0].app_port);
    assert_eq!(inb["upstream"], app.as_str(), "the inbound side's upstream is the app: {inb}");
    assert_ne!(out["upstream"], app.as_str(), "the caller's upstream is the backend's sidecar: {out}");
    assert!(!std::fs::read_to_string(&log).unwrap().contains("secret"), "no query string is logged");
    let out = weft(&["delete", "telemetry", "backend-logs", "--control", &m.control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(std::time::Duration::from_secs(5), "the edge's access log to be gone", || {
        let dump = get_json(&m.edge.admin(), "/config_dump").unwrap();
        dump["listeners"].as_object().unwrap().values().all(|l| l.get("access_log").is_none())
    });
    wait_until(std::time::Duration::from_secs(5), "the backend's access log to be gone", || {
        let dump = get_json(&m.backends[0].admin(), "/config_dump").unwrap();
        dump["listeners"].as_object().unwrap().values().all(|l| l.get("access_log").is_none())
    });
    let before = lines().len();
    for _ in 0..10 {
        assert_eq!(curl(&[&m.edge.url("backend", "/")]).unwrap().status, 200);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(lines().len(), before, "logged after the Telemetry was deleted");
}

/// `weft check` passes on a healthy mesh, and fails naming the cause when a proxy rejects its
/// config, when a certificate is near expiry (its renewal refused) and when the control plane
/// is down.
#[test]
fn weft_check_names_what_is_wrong() {
    let mut m = SmallMesh::start_with("check", 1, &["--cert-ttl", "1m"]);
    let control = m.control.addr.clone();
    let check = || {
        let out = weft(&["check", "--control", &control]);
        (out.status.success(), stdout(&out))
    };
    let (ok, text) = check();
    assert!(ok, "{text}");
    for line in ["ok   control plane reachable", "ok   config accepted", "ok   certificates", "ok   clock"] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    let out = weft(&["check", "-o", "json", "--control", &control]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ok"], true, "{json}");

    // A config the proxies cannot honour: an access log in a directory that does not exist.
    let doc = m.dir.path.join("telemetry.yaml");
    std::fs::write(
        &doc,
        "apiVersion: weft.dev/v1alpha1
kind: Telemetry
metadata: {name: nowhere}
spec:
  accessLog: {output: /nonexistent-weft-dir/access.log}
",
    )
    .unwrap();
    assert!(weft(&["apply", "-f", doc.to_str().unwrap(), "--control", &control]).status.success());
    wait_until(std::time::Duration::from_secs(10), "check to fail on the rejected config", || {
        let (ok, text) = check();
        !ok && text.contains("FAIL config accepted") && text.contains("cannot open access log file")
    });
    assert!(weft(&["delete", "telemetry", "nowhere", "--control", &control]).status.success());
    wait_until(std::time::Duration::from_secs(10), "check to pass once the config is taken", || check().0);

    // Certificates that cannot renew: every join token revoked, the 1-minute certificates run
    // out (proxies renew at half; a quarter left is near expiry).
    let out = weft(&["get", "tokens", "-o", "json", "--control", &control]);
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in tokens.as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        assert!(weft(&["token", "revoke", id, "--control", &control]).status.success());
    }
    wait_until(std::time::Duration::from_secs(60), "check to fail on certificates near expiry", || {
        let (ok, text) = check();
        !ok && text.contains("FAIL certificates") && text.contains("spiffe://weft.local/ns/default/sa/backend")
    });

    // The control plane down: named, with the fix.
    m.control.proc.kill();
    let (ok, text) = check();
    assert!(!ok && text.contains("FAIL control plane reachable"), "{text}");
    assert!(text.contains("fix: start it"), "{text}");
}
