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
