//! The data plane does not depend on the control plane being up: traffic flows while it is
//! stopped, and after a restart the registry and config come back from the store and every
//! proxy resyncs, without a failed request.
use std::time::{Duration, Instant};
use weft_tests::*;

#[test]
fn traffic_survives_control_plane_stop_and_restart() {
    let mut m = SmallMesh::start("restart", 2);
    let dir = m.dir.path.join("svc.yaml");
    std::fs::write(
        &dir,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {loadBalancer: round-robin}\n",
    )
    .unwrap();
    let out = weft(&["apply", "-f", dir.to_str().unwrap(), "--control", &m.control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let url = m.edge.url("backend", "/");
    let services_before = m.control.api("/api/v1/services").unwrap();

    // A client loop runs through the whole stop / restart sequence.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                results.push(curl(&[&url]).map(|r| r.status).unwrap_or(0));
            }
            results
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.control.proc.stop(), Some(0), "control plane exits cleanly on SIGTERM");
    std::thread::sleep(Duration::from_secs(2));
    // While it is away the proxies still serve, and say so.
    let dump = get_json(&m.edge.admin(), "/config_dump").unwrap();
    assert_eq!(dump["control_plane_connected"], false);

    let control = Control::start_at(&m.dir, &m.control.addr.clone(), m.control.data_dir.clone());
    // Registry and config intact straight after the restart, before any proxy reconnects.
    let services_after = control.api("/api/v1/services").unwrap();
    assert_eq!(services_before, services_after);
    let resource = control.api("/api/v1/resources/service/backend").unwrap();
    assert_eq!(resource["spec"]["loadBalancer"], "round-robin");
    // Every proxy resyncs (two sidecars and the edge).
    wait_until(Duration::from_secs(10), "proxies reconnect", || {
        control.api("/api/v1/proxies").and_then(|v| v.as_array().map(|a| a.len())) == Some(3)
    });
    wait_until(Duration::from_secs(5), "instances connected again", || {
        control.endpoints("backend").iter().all(|e| e["connected"] == true && e["healthy"] == true)
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = client.join().unwrap();
    let failed = results.iter().filter(|s| **s != 200).count();
    eprintln!("{} requests during stop/restart, {failed} failed", results.len());
    assert!(results.len() > 20);
    assert_eq!(failed, 0);
    m.control = control;
}

#[test]
fn proxy_starts_and_waits_when_control_plane_is_down() {
    let dir = TestDir::new("cpdown");
    let addr = format!("127.0.0.1:{}", free_port());
    let admin = free_port();
    // The proxy needs the mesh root and a join token, which the control plane made on an
    // earlier run; then it goes away.
    let mut first = Control::start_at(&dir, &addr, dir.path.join("data"));
    let token = join_token(&addr, "edge");
    first.proc.stop();
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.env("WEFT_TOKEN", token);
    cmd.args([
        "proxy",
        "--control",
        &addr,
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--upstream",
        &format!("backend={}", free_port()),
    ]);
    let _edge = Proc::spawn(&dir, "edge", &mut cmd);
    let ready = format!("http://127.0.0.1:{admin}/ready");
    wait_until(Duration::from_secs(5), "admin up", || curl(&[&ready]).is_some());
    assert_eq!(curl(&[&ready]).unwrap().status, 503, "not ready without config");
    let _control = Control::start_at(&dir, &addr, dir.path.join("data"));
    wait_until(Duration::from_secs(10), "ready after control plane appears", || {
        curl(&[&ready]).is_some_and(|r| r.status == 200)
    });
}
