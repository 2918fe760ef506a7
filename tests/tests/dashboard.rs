//! The dashboard as a user meets it: `weft up` serves it and prints its URL; headless Chromium
//! (Debian's package, driven by Selenium: tests/py/dashboard_check.py) looks at it while the
//! demo mesh carries traffic. Screenshots are kept in target/test-artifacts/dashboard/.
//! `weft dashboard` serves the same page for a control plane elsewhere.
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use weft_tests::*;

#[test]
fn the_dashboard_shows_the_live_mesh_in_chromium() {
    let dir = TestDir::new("dashboard");
    let (control, front, back, up_port, board) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let file = dir.path.join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            "control: {{listen: 127.0.0.1:{control}}}
gateway: {{frontend: {front}, backend: {back}}}
dashboard: {{listen: 127.0.0.1:{board}}}
services:
  - name: backend
    instances: 2
    healthPath: /healthz
  - name: frontend
    healthPath: /healthz
    upstreams: {{backend: {up_port}}}
"
        ),
    )
    .unwrap();
    let mut up = Proc::spawn(&dir, "up", Command::new(weft_bin()).args(["up", "-f", file.to_str().unwrap()]));
    let banner = wait_up(&dir, &mut up);
    let url = format!("http://127.0.0.1:{board}/");
    assert!(banner.contains(&format!("dashboard      {url}")), "weft up prints the dashboard's URL:\n{banner}");

    let stop = Arc::new(AtomicBool::new(false));
    let load = request_loop(format!("http://127.0.0.1:{front}/"), stop.clone(), Duration::from_secs(90));
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/dashboard");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/dashboard_check.py");
    let out = Command::new(python()).args([script, &url, shots.to_str().unwrap()]).output().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(ok > 0 && failed.is_empty(), "{ok} ok, failed: {failed:?}");
    for shot in ["1-graph.png", "2-tap.png", "3-bottom.png"] {
        assert!(std::fs::metadata(shots.join(shot)).is_ok_and(|m| m.len() > 10_000), "{shot} was not kept");
    }

    // `weft dashboard`: the same page for this control plane, on loopback only, read-only,
    // and only under its own address.
    let control = format!("127.0.0.1:{control}");
    let port = free_port();
    let _board = Proc::spawn(
        &dir,
        "dashboard",
        Command::new(weft_bin()).args(["dashboard", "--listen", &format!("127.0.0.1:{port}"), "--control", &control]),
    );
    let page = format!("http://127.0.0.1:{port}/");
    wait_until(Duration::from_secs(10), "weft dashboard to serve", || curl(&[&page]).is_some_and(|r| r.status == 200));
    assert!(curl(&[&page]).unwrap().body.contains("<title>weft dashboard</title>"));
    let services = curl(&[&format!("{page}api/v1/services")]).unwrap();
    assert!(services.status == 200 && services.body.contains("\"backend\""), "{}", services.body);
    let posted = curl(&["-X", "POST", &format!("{page}api/v1/tokens")]).unwrap();
    assert_eq!(posted.status, 405, "the dashboard only reads: {}", posted.body);
    let rebound = curl(&["-H", "Host: attacker.example", &format!("{page}api/v1/services")]).unwrap();
    assert_eq!(rebound.status, 403, "another host's page cannot use it: {}", rebound.body);
    let out = weft(&["dashboard", "--listen", "0.0.0.0:0", "--control", &control]);
    assert!(!out.status.success() && stderr(&out).contains("loopback"), "{}", stderr(&out));
}
