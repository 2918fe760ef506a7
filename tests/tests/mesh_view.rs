//! `weft stat`, `weft tap` and `weft top` as a user runs them, on the demo mesh started by
//! `weft up` inside a network namespace of the test's own where every proxy's admin port is
//! firewalled: what these commands show comes over the connections the proxies hold to the
//! control plane, never from the control plane reaching a proxy.
use std::process::Command;
use std::time::{Duration, Instant};
use weft_tests::*;

/// A network namespace of the test's, removed (with its firewall rules) when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let name = format!("weft-{name}-{}", std::process::id());
        assert!(run("ip", &["netns", "add", &name]).status.success(), "ip netns add (the tests run as root)");
        assert!(run("ip", &["netns", "exec", &name, "ip", "link", "set", "lo", "up"]).status.success());
        Netns(name)
    }

    /// `program args` inside the namespace.
    fn cmd(&self, program: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program).args(args);
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let mut c = self.cmd(std::path::Path::new(program), args);
        c.env("WEFT_CONFIG", credentials_file());
        c.output().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

fn tap_lines(dir: &TestDir, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.path.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn stat_tap_and_top_work_with_every_proxy_admin_port_firewalled() {
    let ns = Netns::new("view");
    let dir = TestDir::new("mesh-view");
    let (control, front, back, up_port) = (free_port(), free_port(), free_port(), free_port());
    let file = dir.path.join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            "control: {{listen: 127.0.0.1:{control}}}
gateway: {{frontend: {front}, backend: {back}}}
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
    let weft_path = weft_bin();
    let weft_cli = weft_path.to_str().unwrap();
    let mut up = Proc::spawn(&dir, "up", &mut ns.cmd(&weft_path, &["up", "-f", file.to_str().unwrap()]));
    wait_up(&dir, &mut up);
    let control = format!("127.0.0.1:{control}");
    let weft = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--control", &control]);
        ns.run(weft_cli, &all)
    };
    let curl = |args: &[&str]| {
        let out = ns.run("curl", &[&["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"], args].concat());
        stdout(&out).trim().parse::<u16>().unwrap_or(0)
    };

    // Every proxy's admin port: firewalled, and shown to be.
    let proxies: serde_json::Value = serde_json::from_slice(&weft(&["get", "proxies", "-o", "json"]).stdout).unwrap();
    let admins: Vec<String> =
        proxies.as_array().unwrap().iter().filter_map(|p| p["admin"].as_str().map(str::to_owned)).collect();
    assert_eq!(admins.len(), 4, "three sidecars and the gateway: {proxies}");
    for a in &admins {
        let port = a.rsplit_once(':').unwrap().1;
        let rule = ["-A", "INPUT", "-p", "tcp", "--dport", port, "-j", "DROP"];
        assert!(ns.run("iptables", &rule).status.success(), "iptables in the test's namespace");
        assert_eq!(curl(&["--max-time", "1", &format!("http://{a}/ready")]), 0, "{a} is still reachable");
    }

    // tap: a request within a second of it being made, with what it was and who sent it.
    let tap =
        Proc::spawn(&dir, "tap", &mut ns.cmd(&weft_path, &["tap", "backend", "-o", "json", "--control", &control]));
    std::thread::sleep(Duration::from_millis(1500)); // the tap's order reaches the proxies
    let made = Instant::now();
    assert_eq!(curl(&[&format!("http://127.0.0.1:{back}/status/201")]), 201);
    wait_until(Duration::from_secs(1), "weft tap to show the request", || {
        tap_lines(&dir, "tap").iter().any(|l| l["path"] == "/status/201")
    });
    assert!(made.elapsed() < Duration::from_millis(1500));
    let seen: Vec<serde_json::Value> =
        tap_lines(&dir, "tap").into_iter().filter(|l| l["path"] == "/status/201").collect();
    assert_eq!(seen.len(), 1, "backend's sidecar saw it once (its caller is the gateway, not backend): {seen:?}");
    let e = &seen[0];
    assert_eq!(
        (e["direction"].as_str(), e["method"].as_str(), e["status"].as_u64()),
        (Some("inbound"), Some("GET"), Some(201))
    );
    assert_eq!(e["src_identity"], "spiffe://weft.local/ns/default/sa/gateway", "{e}");
    assert_eq!(e["dst_identity"], "spiffe://weft.local/ns/default/sa/backend", "{e}");
    assert_eq!(e["mtls"], true, "{e}");
    assert!(e["proxy"].as_str().unwrap().starts_with("backend-"), "{e}");
    assert!(e.get("headers").is_none(), "headers only when asked: {e}");
    drop(tap);

    // Headers when asked, credentials redacted; -n stops; --to narrows to one callee.
    let tap_once = |args: &[&str], request: &dyn Fn()| -> serde_json::Value {
        let mut cmd = ns.cmd(&weft_path, &[args, &["-n", "1", "-o", "json", "--control", &control]].concat());
        cmd.env("WEFT_CONFIG", credentials_file());
        let tap = std::thread::spawn(move || cmd.output().unwrap());
        std::thread::sleep(Duration::from_millis(1500));
        request();
        let out = tap.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!stdout(&out).contains("s3cret"), "credentials never leave the proxy: {}", stdout(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = tap_once(&["tap", "backend", "--headers"], &|| {
        let url = format!("http://127.0.0.1:{back}/status/202");
        assert_eq!(curl(&["-H", "authorization: Bearer s3cret", "-H", "x-demo: yes", &url]), 202);
    });
    let headers = e["headers"].as_array().unwrap_or_else(|| panic!("{e}"));
    let header = |n: &str| headers.iter().find(|h| h[0] == n).map(|h| h[1].as_str().unwrap().to_owned());
    assert_eq!(header("authorization").as_deref(), Some("[redacted]"), "{e}");
    assert_eq!(header("x-demo").as_deref(), Some("yes"), "{e}");
    let e = tap_once(&["tap", "frontend", "--to", "backend"], &|| {
        assert_eq!(curl(&[&format!("http://127.0.0.1:{front}/")]), 200);
    });
    let who = (e["direction"].as_str(), e["src_service"].as_str(), e["dst_service"].as_str());
    assert_eq!(who, (Some("outbound"), Some("frontend"), Some("backend")), "{e}");

    // top: the busiest paths, tallied from a tap.
    let top =
        Proc::spawn(&dir, "top", &mut ns.cmd(&weft_path, &["top", "backend", "-o", "json", "--control", &control]));
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..5 {
        assert_eq!(curl(&[&format!("http://127.0.0.1:{back}/info")]), 200);
    }
    assert_eq!(curl(&[&format!("http://127.0.0.1:{back}/status/503")]), 503);
    wait_until(Duration::from_secs(5), "weft top to tally both paths", || {
        tap_lines(&dir, "top").last().and_then(|t| t.as_array().cloned()).is_some_and(|rows| {
            let count =
                |p: &str| rows.iter().find(|r| r["path"] == p).map(|r| (r["count"].as_u64(), r["successes"].as_u64()));
            count("/info") == Some((Some(5), Some(5))) && count("/status/503") == Some((Some(1), Some(0)))
        })
    });
    drop(top);

    // stat: counts of a fresh window, exact, per service, edge and instance.
    // A report between the tallied requests above (among them a 503) and the measured ones,
    // so some window holds the measured ones alone.
    std::thread::sleep(Duration::from_secs(8));
    for _ in 0..40 {
        assert_eq!(curl(&[&format!("http://127.0.0.1:{back}/info")]), 200);
    }
    let stat = |args: &[&str]| -> serde_json::Value {
        let out = weft(&[&["stat"], args, &["--window", "10s", "-o", "json"]].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mut row = serde_json::Value::Null;
    wait_until(Duration::from_secs(20), "weft stat to count the 40 requests, all successful", || {
        row = stat(&["services", "backend"])["rows"][0].clone();
        row["requests"].as_u64() == Some(40) && row["success_rate"] == 1.0
    });
    assert!(row["rps"].as_f64().unwrap() > 0.0 && row["latency_ms_p99"].as_f64().unwrap() > 0.0, "{row}");
    let edges = stat(&["edges"]);
    let edge = edges["rows"].as_array().unwrap().iter().find(|r| r["from"] == "gateway" && r["to"] == "backend");
    assert_eq!(edge.map(|e| (e["requests"].as_u64(), e["mtls"].as_bool())), Some((Some(40), Some(true))), "{edges}");
    let instances = stat(&["instances", "backend"]);
    let per_instance: u64 = instances["rows"].as_array().unwrap().iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(per_instance, 40, "{instances}");
    // The table a user reads.
    let out = weft(&["stat", "--window", "10s"]);
    assert!(stdout(&out).lines().any(|l| l.starts_with("backend") && l.contains("100.00%")), "{}", stdout(&out));
    // A window the control plane does not keep is refused, saying why.
    let out = weft(&["stat", "--window", "2h"]);
    assert!(!out.status.success() && stderr(&out).contains("out of range"), "{}", stderr(&out));
}
