//! The proxy's admin endpoint: liveness, readiness, Prometheus metrics and the config dump.
use weft_tests::*;

#[test]
fn metrics_pass_promtool_and_count_traffic() {
    let m = SmallMesh::start("metrics", 1);
    for _ in 0..5 {
        assert_eq!(curl(&[&m.edge.url("backend", "/")]).unwrap().status, 200);
    }
    assert_eq!(curl(&[&m.edge.url("backend", "/status/404")]).unwrap().status, 404);
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
    let find = |needle: &str| {
        r.body
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{needle} not in\n{}", r.body))
    };
    assert_eq!(find(r#"weft_requests_total{direction="outbound",service="backend",code="200"}"#), 5.0);
    assert_eq!(find(r#"weft_requests_total{direction="outbound",service="backend",code="404"}"#), 1.0);
    assert_eq!(find(r#"weft_request_duration_seconds_count{direction="outbound",service="backend"}"#), 6.0);
    assert!(find(r#"weft_tcp_connections_opened_total{direction="outbound",service="backend"}"#) >= 6.0);
    // The backend's sidecar counts the same requests inbound.
    let inbound = curl(&[&format!("http://{}/metrics", m.backends[0].admin())]).unwrap().body;
    assert!(
        inbound.contains(r#"weft_requests_total{direction="inbound",service="backend",code="200"} 5"#),
        "{inbound}"
    );
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
