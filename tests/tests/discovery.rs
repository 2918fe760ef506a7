//! Registration, health and failover with real processes: instances join and leave while a
//! client keeps sending requests through an edge proxy.
use std::time::{Duration, Instant};
use weft_tests::*;

/// Sends GETs through the edge for `dur`, returning (elapsed, status, served-by) per request.
fn request_loop(url: &str, dur: Duration) -> Vec<(Duration, u16, String)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < dur && out.len() < 5000 {
        let r = curl(&[url]);
        let (status, by) = match r {
            Some(r) if r.status == 200 => (r.status, r.headers.get("x-served-by").cloned().unwrap_or_default()),
            Some(r) => (r.status, format!("{:?} {}", r.headers.get("x-weft-error"), r.body.trim())),
            None => (0, String::new()),
        };
        out.push((start.elapsed(), status, by));
    }
    out
}

#[test]
fn new_instance_gets_traffic_within_a_second_of_becoming_healthy() {
    let mut m = SmallMesh::start("join", 1);
    let url = m.edge.url("backend", "/");
    let late = Instance::start(&m.dir, &m.control.addr, "backend", "v2", "backend-late", &[]);
    // The moment the app itself answers its health check.
    wait_until(Duration::from_secs(15), "late app healthy", || {
        curl(&[&format!("http://127.0.0.1:{}/healthz", late.app_port)]).is_some_and(|r| r.status == 200)
    });
    let healthy_at = Instant::now();
    wait_until(Duration::from_secs(5), "traffic reaches the new instance", || {
        curl(&[&url]).is_some_and(|r| r.headers.get("x-served-by").map(String::as_str) == Some("backend-late"))
    });
    let took = healthy_at.elapsed();
    eprintln!("new instance received traffic {took:?} after its app became healthy");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    m.backends.push(late);
}

#[test]
fn sigkill_of_an_instance_loses_no_request() {
    let mut m = SmallMesh::start("sigkill", 3);
    let url = m.edge.url("backend", "/");
    let victim_addr = format!("127.0.0.1:{}", m.backends[0].inbound);
    let edge_admin = m.edge.admin();
    // Kill 0.7 s into the loop, then time how long until the edge no longer holds the endpoint.
    let killer = {
        let pid = m.backends[0].proc.pid();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let held = || {
                let dump = get_json(&edge_admin, "/config_dump").unwrap_or_default();
                dump["endpoints"]["backend"]
                    .as_array()
                    .is_none_or(|a| a.iter().any(|e| e["address"] == victim_addr.as_str()))
            };
            wait_until(Duration::from_secs(10), "edge drops the killed endpoint", || !held())
        })
    };
    // Several clients at once, so the kill lands on requests in every stage: connecting,
    // written and waiting, and reading the response.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || request_loop(&url, Duration::from_secs(3)))
        })
        .collect();
    let results: Vec<_> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let removal = killer.join().unwrap();
    eprintln!("killed endpoint left the edge's endpoint set {removal:?} after SIGKILL; {} requests", results.len());
    let failures: Vec<_> = results.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), results.len());
    assert!(results.len() > 50, "too few requests in the window: {}", results.len());
    assert!(removal < Duration::from_secs(2), "removal took {removal:?}");
    assert!(!m.control.healthy_ids("backend").contains(&"backend-0".to_owned()));
    m.backends[0].proc.kill();
}

#[test]
fn app_crash_takes_instance_out_and_sidecar_stops_with_it() {
    let mut m = SmallMesh::start("appcrash", 2);
    let app_pids = m.backends[0].proc.children();
    assert_eq!(app_pids.len(), 1, "weft run has one child (the app): {app_pids:?}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pids[0]), nix::sys::signal::Signal::SIGKILL);
    let took = wait_until(Duration::from_secs(5), "crashed instance removed", || {
        !m.control.healthy_ids("backend").contains(&"backend-0".to_owned())
    });
    assert!(took < Duration::from_secs(2), "removal took {took:?}");
    // `weft run` exits when its app dies, with a failure code.
    let code = m.backends[0].proc.wait(Duration::from_secs(5));
    assert!(matches!(code, Some(c) if c != 0), "weft run exit code {code:?}");
    for _ in 0..20 {
        let r = curl(&[&m.edge.url("backend", "/")]).expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-served-by"], "backend-1");
    }
}

#[test]
fn instance_failing_its_health_check_gets_no_traffic() {
    // The app answers /status/503 as its "health" path: the instance registers but never
    // becomes healthy, so it gets no traffic.
    let m = SmallMesh::start("health", 1);
    let sick =
        Instance::start(&m.dir, &m.control.addr, "backend", "v9", "backend-sick", &["--health-path", "/status/503"]);
    wait_until(Duration::from_secs(10), "sick instance registered", || {
        m.control.endpoints("backend").iter().any(|e| e["id"] == "backend-sick")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!m.control.healthy_ids("backend").contains(&"backend-sick".to_owned()));
    for _ in 0..20 {
        let r = curl(&[&m.edge.url("backend", "/")]).expect("response");
        assert_eq!(r.headers["x-served-by"], "backend-0");
    }
    drop(sick);
}

#[test]
fn clean_stop_deregisters_before_exit() {
    let mut m = SmallMesh::start("cleanstop", 2);
    let code = m.backends[1].proc.stop();
    assert_eq!(code, Some(0), "weft run exits 0 on SIGTERM when the app stops cleanly");
    assert_eq!(m.control.healthy_ids("backend"), vec!["backend-0".to_owned()]);
    let app_pids = m.backends[1].proc.children();
    assert!(app_pids.iter().all(|p| !alive(*p)), "app outlived weft run");
}
