//! Who may register an instance id: only the proxy that holds it. A join token for one service
//! cannot take over (and so remove) another service's live instance, and the holder still gets
//! its id back after a control-plane restart.
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use weft_tests::*;

#[test]
fn a_join_token_for_one_service_cannot_take_over_another_services_instance() {
    let mut m = SmallMesh::start("id-takeover", 1);
    let victim = m.backends[0].id.clone();
    let registered = |c: &Control| {
        c.endpoints("backend")
            .iter()
            .map(|e| (e["id"].as_str().unwrap_or_default().to_owned(), e["registration"]["inbound"].clone()))
            .collect::<Vec<_>>()
    };
    let before = registered(&m.control);
    assert!(before.len() == 1 && before[0].1.is_string(), "{before:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let looping = request_loop(m.edge.url("backend", "/"), stop.clone(), Duration::from_secs(60));

    // `weft run --service frontend --id <backend's instance>` with frontend's join token.
    let (app, inbound, admin) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(weft_bin());
    cmd.args(["run", "--service", "frontend", "--id", &victim, "--control", &m.control.addr]);
    cmd.args(["--port", &app.to_string(), "--health-path", "/healthz"]);
    cmd.args(["--inbound", &format!("127.0.0.1:{inbound}"), "--admin", &format!("127.0.0.1:{admin}")]);
    cmd.arg("--").arg(weft_bin()).arg("demo-app");
    cmd.env("WEFT_TOKEN", join_token(&m.control.addr, "frontend"));
    let mut impostor = Proc::spawn(&m.dir, "impostor", &mut cmd);
    let log = m.dir.path.join("impostor.log");
    wait_until(Duration::from_secs(10), "the impostor's registration refused", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("is held by another proxy")
    });
    assert_eq!(registered(&m.control), before);
    assert!(m.control.endpoints("frontend").is_empty(), "{:?}", m.control.endpoints("frontend"));
    assert_eq!(impostor.stop(), Some(0));
    // The instance is still there, connected, after the impostor left.
    assert_eq!(registered(&m.control), before);
    assert!(m.control.endpoints("backend").iter().all(|e| e["connected"] == true));

    // Its own proxy gets the id back after a control-plane restart.
    assert_eq!(m.control.proc.stop(), Some(0));
    let (addr, data) = (m.control.addr.clone(), m.control.data_dir.clone());
    m.control = Control::start_at(&m.dir, &addr, data);
    wait_until(Duration::from_secs(10), "the instance reconnected", || {
        m.control.endpoints("backend").iter().any(|e| e["id"] == victim.as_str() && e["connected"] == true)
    });
    assert_eq!(registered(&m.control), before);
    let log = std::fs::read_to_string(m.dir.path.join(format!("{victim}.log"))).unwrap();
    assert!(!log.contains("refused this proxy"), "{log}");

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = looping.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} requests");
}
