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
    let app_pids = m.backends[0].app_pids();
    assert_eq!(app_pids.len(), 1, "weft run (now its sidecar) has one child, the app: {app_pids:?}");
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
    let app_pids = m.backends[1].app_pids();
    let code = m.backends[1].proc.stop();
    assert_eq!(code, Some(0), "weft run exits 0 on SIGTERM when the app stops cleanly");
    assert_eq!(m.control.healthy_ids("backend"), vec!["backend-0".to_owned()]);
    assert_eq!(app_pids.len(), 1, "{app_pids:?}");
    assert!(app_pids.iter().all(|p| !alive(*p)), "app outlived weft run");
}

/// A rolling restart under steady load: each of three instances in turn is stopped with
/// SIGTERM (`weft run` deregisters, serves what is in flight, then stops the app) and replaced,
/// twice over, while eight clients keep sending slow GETs and POSTs with bodies. Not one request
/// fails: none is cut by its instance leaving.
#[test]
fn rolling_restart_under_load_loses_no_request() {
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut m = SmallMesh::start("rolling", 3);
    let base = format!("http://127.0.0.1:{}", m.edge.ports["backend"]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, base) = (stop.clone(), base.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
                let client: hyper_util::client::legacy::Client<_, Body> =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
                let workers: Vec<_> = (0..8)
                    .map(|w| {
                        let (client, stop, base) = (client.clone(), stop.clone(), base.clone());
                        tokio::spawn(async move {
                            let (mut sent, mut failures) = (0u32, Vec::new());
                            // Bounded: at most 4,000 requests per client.
                            while !stop.load(Ordering::Relaxed) && sent < 4000 {
                                sent += 1;
                                let post = (w + sent as usize).is_multiple_of(2);
                                // A slow GET, or a POST whose body comes in three parts 10 ms apart
                                // (the app holds each ~30 ms either way).
                                let (uri, body): (String, Body) = if post {
                                    let parts = futures::stream::iter(0..3).then(|i| async move {
                                        if i > 0 {
                                            tokio::time::sleep(Duration::from_millis(10)).await;
                                        }
                                        Ok(http_body::Frame::data(bytes::Bytes::from(format!("part {i};"))))
                                    });
                                    (
                                        format!("{base}/echo"),
                                        http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(parts)),
                                    )
                                } else {
                                    (
                                        format!("{base}/delay/30"),
                                        http_body_util::BodyExt::boxed(http_body_util::Empty::new()),
                                    )
                                };
                                let req = http::Request::builder()
                                    .method(if post { "POST" } else { "GET" })
                                    .uri(uri)
                                    .body(body)
                                    .unwrap();
                                let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                                    let status = resp.status();
                                    let why = resp.headers().get("x-weft-error").cloned();
                                    let got = http_body_util::BodyExt::collect(resp.into_body())
                                        .await
                                        .map_err(|e| e.to_string())?
                                        .to_bytes();
                                    if status != 200 || (post && got != "part 0;part 1;part 2;") {
                                        return Err(format!("{status} {why:?} {:?}", String::from_utf8_lossy(&got)));
                                    }
                                    Ok(())
                                })
                                .await
                                .unwrap_or_else(|_| Err("timed out".into()));
                                if let Err(e) = outcome {
                                    failures.push(format!("{} {e}", if post { "POST" } else { "GET" }));
                                }
                            }
                            (sent, failures)
                        })
                    })
                    .collect();
                let (mut sent, mut failures) = (0, Vec::new());
                for w in workers {
                    let (s, f) = w.await.unwrap();
                    sent += s;
                    failures.extend(f);
                }
                (sent, failures)
            })
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..2 {
        for i in 0..3 {
            let old = &mut m.backends[i];
            old.proc.signal(nix::sys::signal::Signal::SIGTERM);
            let code = old.proc.wait(Duration::from_secs(20));
            assert_eq!(code, Some(0), "round {round}: backend {i} did not stop cleanly on SIGTERM");
            let id = format!("backend-{round}-{i}");
            let new = Instance::start(&m.dir, &m.control.addr, "backend", &format!("v{}", i + 1), &id, &[]);
            wait_until(Duration::from_secs(15), "the replacement healthy", || {
                m.control.healthy_ids("backend").contains(&id)
            });
            m.backends[i] = new;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (sent, failures) = load.join().unwrap();
    eprintln!("{sent} requests during six restarts, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(sent > 500, "only {sent} requests were sent");
}

/// A sidecar stopped with SIGTERM while it carries requests (`weft proxy` beside an app that
/// keeps running, as when a sidecar is upgraded): it leaves the mesh at once but finishes what
/// it carries: slow GETs and POSTs whose bodies are still arriving all get their answers, and
/// then it exits 0.
#[test]
fn a_sidecar_stopped_with_requests_in_flight_finishes_them() {
    use futures::StreamExt;
    let dir = TestDir::new("sidecar-drain");
    let control = Control::start(&dir);
    let mut sidecars = Vec::new();
    let mut apps = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let mut app = std::process::Command::new(weft_bin());
        app.args(["demo-app", "--listen", &format!("127.0.0.1:{port}"), "--service", "backend"]);
        apps.push(Proc::spawn(&dir, &format!("app-{i}"), &mut app));
        let mut cmd = std::process::Command::new(weft_bin());
        cmd.args(["proxy", "--service", "backend", "--app-port", &port.to_string(), "--health-interval", "1h"]);
        cmd.args(["--control", &control.addr, "--id", &format!("backend-{i}")]);
        cmd.env("WEFT_TOKEN", join_token(&control.addr, "backend"));
        sidecars.push(Proc::spawn(&dir, &format!("backend-{i}"), &mut cmd));
    }
    wait_until(Duration::from_secs(15), "two healthy instances", || control.healthy_ids("backend").len() == 2);
    let edge = Edge::start(&dir, &control, &["backend"]);
    wait_until(Duration::from_secs(5), "edge sees two", || edge.endpoint_addrs("backend").len() == 2);
    let base = format!("http://127.0.0.1:{}", edge.ports["backend"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
    let client: hyper_util::client::legacy::Client<_, Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let requests: Vec<_> = (0..16)
        .map(|n| {
            let (client, base) = (client.clone(), base.clone());
            rt.spawn(async move {
                let post = n % 2 == 0;
                // A GET the app answers after 800 ms, or a POST whose body takes 600 ms to send.
                let (uri, body): (String, Body) = if post {
                    let parts = futures::stream::iter(0..4).then(|i| async move {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok(http_body::Frame::data(bytes::Bytes::from(format!("part {i};"))))
                    });
                    (format!("{base}/echo"), http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(parts)))
                } else {
                    (format!("{base}/delay/800"), http_body_util::BodyExt::boxed(http_body_util::Empty::new()))
                };
                let req =
                    http::Request::builder().method(if post { "POST" } else { "GET" }).uri(uri).body(body).unwrap();
                let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                let (status, why) = (resp.status(), resp.headers().get("x-weft-error").cloned());
                let got = http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| format!("{e:?}"))?;
                let got = got.to_bytes();
                if status != 200 || (post && got != "part 0;part 1;part 2;part 3;") {
                    return Err(format!("{status} {why:?} {:?}", String::from_utf8_lossy(&got)));
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    // And HTTP/2 clients (the edge speaks HTTP/2 to the sidecars for them).
    let h2: Vec<_> = (0..6)
        .map(|_| {
            let url = format!("{base}/delay/800");
            std::thread::spawn(move || curl(&["--http2-prior-knowledge", "--max-time", "10", &url]))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let stopped = std::time::Instant::now();
    sidecars[0].signal(nix::sys::signal::Signal::SIGTERM);
    let results: Vec<Result<(), String>> = rt.block_on(async {
        let mut out = Vec::new();
        for r in requests {
            out.push(r.await.unwrap());
        }
        out
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of 16 requests failed: {failed:?}", failed.len());
    for r in h2 {
        let r = r.join().unwrap();
        assert!(r.as_ref().is_some_and(|r| r.status == 200), "an HTTP/2 request failed: {r:?}");
    }
    assert_eq!(sidecars[0].wait(Duration::from_secs(10)), Some(0), "the sidecar exits 0 after draining");
    let took = stopped.elapsed();
    eprintln!("the sidecar exited {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(6), "the drain took {took:?}, more than its 5 s timeout");
    assert!(!control.healthy_ids("backend").contains(&"backend-0".to_owned()), "backend-0 left the registry");
    drop(apps);
}
