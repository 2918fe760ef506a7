//! Root rotations and control-plane restarts in either order: every client of the control
//! plane in a sidecar (certificates, xDS, health reports) trusts the live trust bundle, and the
//! control plane's own certificate follows the signing root, so renewals never stop.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_tests::*;

const TTL: &[&str] = &["--cert-ttl", "1m"];

fn serial(admin: &str) -> Option<String> {
    get_json(admin, "/certs").and_then(|v| v["serial"].as_str().map(str::to_owned))
}

/// `weft ca rotate`; returns the new root's fingerprint once every proxy holds a certificate
/// from it.
fn rotate(m: &SmallMesh, overlap: &str) -> String {
    let out = weft(&["ca", "rotate", "--overlap", overlap, "--control", &m.control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new_root = stdout(&out).split_whitespace().nth(2).unwrap_or_default().to_owned();
    wait_until(Duration::from_secs(10), "every proxy re-issued from the new root", || {
        let out = weft(&["get", "certs", "--control", &m.control.addr]);
        let rows: Vec<String> = stdout(&out).lines().skip(1).map(str::to_owned).collect();
        rows.len() == 2 && rows.iter().all(|r| r.contains(&new_root))
    });
    new_root
}

/// Stops the control plane and starts it again on the same address and data.
fn restart(m: &mut SmallMesh) {
    assert_eq!(m.control.proc.stop(), Some(0));
    let (addr, data) = (m.control.addr.clone(), m.control.data_dir.clone());
    m.control = Control::start_at_with(&m.dir, &addr, data, TTL);
    wait_until(Duration::from_secs(10), "proxies reconnect", || {
        m.control.api("/api/v1/proxies").and_then(|v| v.as_array().map(|a| a.len())) == Some(2)
    });
}

/// Whether the control plane's certificate chains to the control plane's signing root alone.
fn control_chains_to_signing_root(m: &SmallMesh) -> bool {
    let root = m.control.api("/api/v1/ca").and_then(|v| v["root"].as_str().map(str::to_owned)).unwrap_or_default();
    let file = m.dir.path.join("signing-root.pem");
    std::fs::write(&file, root).unwrap();
    let url = format!("https://{}/healthz", m.control.addr);
    run("curl", &["-s", "-f", "--max-time", "5", "--cacert", file.to_str().unwrap(), &url]).status.success()
}

#[test]
fn renewals_continue_through_rotations_and_control_plane_restarts_in_either_order() {
    let mut m = SmallMesh::start_with("rotation", 1, TTL);
    let stop = Arc::new(AtomicBool::new(false));
    let looping = request_loop(m.edge.url("backend", "/"), stop.clone(), Duration::from_secs(240));
    let admins = [m.backends[0].admin(), m.edge.admin()];
    // `/ready` of both sidecars, every 200 ms: each answer that is not 200.
    let not_ready = {
        let (admins, stop) = (admins.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(240);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for a in &admins {
                    match curl(&["--max-time", "5", &format!("http://{a}/ready")]) {
                        Some(r) if r.status == 200 => {}
                        r => bad.push(format!("{a}: {r:?}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            bad
        })
    };

    // Restart, then rotate with a short overlap: the control plane's certificate follows the
    // new root, and once the old root has left the bundle the control plane is still trusted.
    restart(&mut m);
    rotate(&m, "3s");
    assert!(control_chains_to_signing_root(&m), "the control plane still presents a certificate of the old root");
    wait_until(Duration::from_secs(10), "the old root leaves the bundle", || {
        m.control
            .api("/api/v1/ca")
            .is_some_and(|v| v["bundle"].as_str().unwrap_or_default().matches("BEGIN").count() == 1)
    });

    // Rotate, then restart: the restarted control plane's certificate chains to a root the
    // sidecars learnt from the bundle, not from the file they read at start.
    rotate(&m, "3s");
    restart(&mut m);
    assert!(control_chains_to_signing_root(&m));

    // Two certificate lifetimes: every sidecar renews (at half-life) at least three times.
    let mut seen: Vec<Vec<String>> = admins.iter().map(|a| serial(a).into_iter().collect()).collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(125) {
        std::thread::sleep(Duration::from_secs(1));
        for (a, s) in admins.iter().zip(&mut seen) {
            if let Some(now) = serial(a).filter(|now| !s.contains(now)) {
                s.push(now);
            }
        }
    }
    for (a, s) in admins.iter().zip(&seen) {
        assert!(s.len() > 3, "{a} renewed only {} times in two lifetimes: {s:?}", s.len() - 1);
        let certs = get_json(a, "/certs").unwrap();
        assert!(certs["renewal_error"].is_null(), "{a}: {certs}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = looping.join().unwrap();
    let not_ready = not_ready.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        not_ready.is_empty(),
        "/ready was not 200 {} times: {:?}",
        not_ready.len(),
        &not_ready[..not_ready.len().min(5)]
    );
    assert!(ok > 1000, "only {ok} requests");
}
