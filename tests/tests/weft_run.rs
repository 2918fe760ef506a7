//! `weft run` as a supervisor: what the app's environment holds, and how the app's end is
//! reported.
use std::process::{Command, Output};
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
    for secret in ["WEFT_TOKEN", "WEFT_ADMIN_TOKEN", "WEFT_CONFIG"] {
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
