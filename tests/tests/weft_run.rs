//! `weft run` as a supervisor: what the app's environment holds, how the app's end is
//! reported, and its sidecar: a hardened process of its own, stopped after the app.
use std::process::{Command, Output};
use std::time::Duration;
use weft_tests::*;

/// `weft run` of `sh -c script` as an instance of `envapp`, with the join token and the admin
/// credential in its environment, as an operator would give them.
fn run_app(dir: &TestDir, control: &Control, script: &str) -> Output {
    let token = join_token(&control.addr, "envapp");
    let port = |p: u16| format!("127.0.0.1:{p}");
    Command::new("timeout")
        .arg("60")
        .arg(weft_bin())
        .args(["run", "--service", "envapp", "--control", &control.addr, "--port", &free_port().to_string()])
        .args(["--inbound", &port(free_port()), "--admin", &port(free_port())])
        .args(["--", "sh", "-c", script])
        .env("WEFT_CONFIG", credentials_file())
        .env("WEFT_TOKEN", &token)
        .env("WEFT_ADMIN_TOKEN", control.admin_token())
        .current_dir(&dir.path)
        .output()
        .unwrap()
}

#[test]
fn the_app_never_sees_weft_credentials() {
    let dir = TestDir::new("run-env");
    let control = Control::start(&dir);
    let out = run_app(&dir, &control, "env");
    assert!(out.status.success(), "{}", stderr(&out));
    let env = stdout(&out);
    let vars: Vec<&str> = env.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    assert!(vars.contains(&"WEFT_SERVICE") && vars.contains(&"PORT"), "{env}");
    for secret in ["WEFT_TOKEN", "WEFT_ADMIN_TOKEN", "WEFT_CONFIG", "NOTIFY_SOCKET"] {
        assert!(!vars.contains(&secret), "the app was given {secret}:\n{env}");
    }
    assert!(!env.contains(&control.admin_token()), "{env}");
}

#[test]
fn an_app_killed_by_a_signal_exits_with_128_plus_the_signal() {
    let dir = TestDir::new("run-signal");
    let control = Control::start(&dir);
    for (script, code) in [("kill -TERM $$", 143), ("kill -KILL $$", 137), ("exit 3", 3)] {
        let out = run_app(&dir, &control, script);
        assert_eq!(out.status.code(), Some(code), "{script}: {}", stderr(&out));
    }
}

/// `weft run` becomes its sidecar, the `weft-proxy` binary: built as a position-independent
/// executable with full RELRO, holding no control plane or CLI code, and the parent of the app.
#[test]
fn the_sidecar_is_a_hardened_process_of_its_own() {
    let dir = TestDir::new("run-sidecar");
    let control = Control::start(&dir);
    let web = Instance::start(&dir, &control.addr, "web", "v1", "web-0", &[]);
    wait_until(Duration::from_secs(15), "web healthy", || control.healthy_ids("web") == ["web-0"]);
    assert_eq!(web.app_pids().len(), 1, "the sidecar is the app's parent");
    let exe = std::fs::read_link(format!("/proc/{}/exe", web.proc.pid())).unwrap();
    assert_eq!(exe.file_name().unwrap(), "weft-proxy", "weft run did not become the sidecar");
    let exe = exe.to_str().unwrap();
    let header = stdout(&run("readelf", &["-h", exe]));
    assert!(header.lines().any(|l| l.trim_start().starts_with("Type:") && l.contains("DYN")), "not PIE:\n{header}");
    let segments = stdout(&run("readelf", &["-l", "-W", exe]));
    assert!(segments.contains("GNU_RELRO"), "no RELRO segment:\n{segments}");
    let dynamic = stdout(&run("readelf", &["-d", "-W", exe]));
    assert!(dynamic.contains("BIND_NOW") || dynamic.contains("(FLAGS)") && dynamic.contains(" NOW"), "{dynamic}");
    let has = |name: &str| run("grep", &["-q", "-a", "-F", name, exe]).status.success();
    assert!(has("weft_proxy"), "the sidecar binary is not the proxy");
    for other in ["weft_control", "weft_demo"] {
        assert!(!has(other), "the sidecar binary holds {other}");
    }
}

/// A stop of `weft run` goes in two steps: the sidecar leaves the mesh and drains, then the
/// app is stopped, and the calls the app makes while it stops still go through its sidecar,
/// which stops last.
#[test]
fn a_stopping_app_can_still_call_through_its_sidecar() {
    let dir = TestDir::new("run-two-phase");
    let control = Control::start(&dir);
    let _backend = Instance::start(&dir, &control.addr, "backend", "v1", "backend-0", &[]);
    wait_until(Duration::from_secs(15), "backend healthy", || control.healthy_ids("backend") == ["backend-0"]);
    let upstream = free_port();
    let out = dir.path.join("on-stop");
    // On SIGTERM the app calls the backend through its sidecar and records the status.
    let script = r#"trap 'curl -s -o /dev/null -w "%{http_code}" "http://$WEFT_UPSTREAM/" > "$OUT"; exit 0' TERM
while :; do sleep 0.05; done"#;
    let mut cmd = Command::new(weft_bin());
    cmd.args(["run", "--service", "caller", "--id", "caller-0", "--control", &control.addr]);
    cmd.args(["--port", &free_port().to_string(), "--upstream", &format!("backend={upstream}")]);
    cmd.args(["--", "sh", "-c", script]).env("OUT", &out);
    cmd.env("WEFT_TOKEN", join_token(&control.addr, "caller"));
    let mut caller = Proc::spawn(&dir, "caller", &mut cmd);
    let url = format!("http://127.0.0.1:{upstream}/");
    wait_until(Duration::from_secs(15), "the caller's sidecar reaches the backend", || {
        curl(&[&url]).is_some_and(|r| r.status == 200)
    });
    assert_eq!(caller.stop(), Some(0), "weft run exits with the app's code");
    let status = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(status, "200", "the app's call while stopping was not served");
    let log = std::fs::read_to_string(dir.path.join("caller.log")).unwrap();
    let (drained, stopped) = (log.find("draining").expect("the sidecar drained"), log.rfind("proxy stopped").unwrap());
    assert!(drained < stopped, "{log}");
}

/// If the sidecar is killed, its app dies with it: it is out of the mesh without it.
#[test]
fn a_killed_sidecar_takes_its_app_with_it() {
    let dir = TestDir::new("run-dead-sidecar");
    let control = Control::start(&dir);
    let mut web = Instance::start(&dir, &control.addr, "web", "v1", "web-0", &[]);
    wait_until(Duration::from_secs(15), "web healthy", || control.healthy_ids("web") == ["web-0"]);
    let app = web.app_pids()[0];
    web.proc.kill();
    wait_until(Duration::from_secs(5), "the app dies with its sidecar", || !alive(app));
}
