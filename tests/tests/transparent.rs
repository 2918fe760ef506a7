//! Transparent instances (`weft run --transparent`): an unmodified app in a network namespace
//! of its own calls `http://backend/` and its sidecar captures it, resolves the name, and
//! carries it over mutual TLS to backend's sidecar, which captured the inbound side too.
//!
//! Everything runs inside a network namespace the test makes (a "host"): the control plane,
//! the bridge `weft run` makes, the instances' namespaces joined to it. The host is removed at
//! the end, after `weft cleanup` inside it has removed what weft made.
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;
use weft_tests::*;

/// A simulated host: a network namespace with its loopback up.
struct Host {
    name: String,
}

impl Host {
    /// `None` (and a line saying why) where this machine cannot make namespaces.
    fn new(tag: &str) -> Option<Host> {
        let name = format!("weft-t-{tag}-{}", std::process::id());
        let made = run("ip", &["netns", "add", &name]);
        if !made.status.success() {
            eprintln!(
                "SKIPPED: cannot create network namespaces here ({}); the transparent tests need root",
                stderr(&made).trim()
            );
            return None;
        }
        let host = Host { name };
        assert!(host.run("ip", &["link", "set", "lo", "up"]).status.success());
        Some(host)
    }

    /// `program` in the host's network namespace. Through `nsenter --net` rather than `ip
    /// netns exec`, which would also give it a mount namespace of its own: the namespaces
    /// `weft run` makes there would be mounted where no one else sees them, as on a real host
    /// they are not.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program).args(args).output().unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.cmd(weft_bin()).arg("cleanup").output();
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// The namespaces weft made for instances of `service`.
fn instance_netns(service: &str) -> Vec<String> {
    let list = stdout(&run("ip", &["netns", "list"]));
    let prefix = format!("weft-i-{service}-");
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Runs `program args` inside namespace `netns` (with its resolv.conf, as the app sees it).
fn in_netns(netns: &str, program: &str, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.args(["20", "ip", "netns", "exec", netns, program]).args(args);
    c.output().unwrap()
}

struct Mesh {
    host: Host,
    dir: TestDir,
    _control: Proc,
    control: String,
    ca: String,
    admin: String,
}

/// The bridge's address: where instances reach the host, and the control plane on it.
const GATEWAY: &str = "10.240.0.1";

impl Mesh {
    fn start(tag: &str) -> Option<Mesh> {
        let host = Host::new(tag)?;
        let dir = TestDir::new(&format!("transparent-{tag}"));
        let data = dir.path.join("control");
        let port = free_port();
        let control = Proc::spawn(
            &dir,
            "control",
            host.cmd(weft_bin())
                .args(["control", "--listen", &format!("0.0.0.0:{port}"), "--server-name", GATEWAY])
                .arg("--data-dir")
                .arg(&data),
        );
        let token = data.join("admin.token");
        wait_until(Duration::from_secs(20), "the control plane", || token.exists());
        let m = Mesh {
            control: format!("127.0.0.1:{port}"),
            ca: data.join("ca/trust-bundle.pem").display().to_string(),
            admin: std::fs::read_to_string(&token).unwrap().trim().to_owned(),
            host,
            dir,
            _control: control,
        };
        Some(m)
    }

    fn weft(&self, args: &[&str]) -> Output {
        self.host
            .cmd(weft_bin())
            .args(args)
            .args(["--control", &self.control, "--ca-file", &self.ca, "--admin-token", &self.admin])
            .output()
            .unwrap()
    }

    /// `weft run --transparent` of `app` as an instance of `service`.
    fn instance(&self, service: &str, port: u16, app: &[&str]) -> Proc {
        let token = stdout(&self.weft(&["token", "create", "--service", service])).trim().to_owned();
        assert!(!token.is_empty(), "a join token for {service}");
        let control = self.control.replace("127.0.0.1", GATEWAY);
        Proc::spawn(
            &self.dir,
            service,
            self.host
                .cmd(weft_bin())
                .args(["run", "--transparent", "--service", service, "--port", &port.to_string()])
                .args(["--control", &control, "--ca-file", &self.ca, "--"])
                .args(app)
                .env("WEFT_TOKEN", token),
        )
    }

    fn endpoints(&self, service: &str) -> Vec<Value> {
        let out = self.weft(&["get", "endpoints", service, "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["healthy"] == true)
            .collect()
    }

    fn metrics(&self, instance_ip: &str) -> String {
        stdout(&self.host.run("curl", &["-s", &format!("http://{instance_ip}:15020/metrics")]))
    }
}

fn demo_app(service: &str) -> Vec<String> {
    vec![weft_bin().display().to_string(), "demo-app".into(), "--service".into(), service.into()]
}

#[test]
fn an_unmodified_app_reaches_a_service_by_name_through_both_sidecars() {
    let Some(mesh) = Mesh::start("by-name") else { return };
    let backend_app = demo_app("backend");
    let backend_app: Vec<&str> = backend_app.iter().map(String::as_str).collect();
    let _backend = mesh.instance("backend", 8080, &backend_app);
    let client_app = demo_app("client");
    let client_app: Vec<&str> = client_app.iter().map(String::as_str).collect();
    let _client = mesh.instance("client", 8080, &client_app);
    wait_until(Duration::from_secs(30), "backend and client healthy", || {
        mesh.endpoints("backend").len() == 1 && mesh.endpoints("client").len() == 1
    });
    let backend_ip =
        mesh.endpoints("backend")[0]["registration"]["inbound"].as_str().unwrap().split(':').next().unwrap().to_owned();
    let client_ns = instance_netns("client");
    assert_eq!(client_ns.len(), 1, "{client_ns:?}");
    let client_ns = &client_ns[0];

    // curl (glibc's resolver) and Python by the mesh's names, as the app would in production.
    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://backend/"]);
    assert_eq!(stdout(&out), "200", "curl http://backend/: {}", stderr(&out));
    let py = "import urllib.request; print(urllib.request.urlopen('http://backend.default/').status)";
    let out = in_netns(client_ns, "python3", &["-c", py]);
    assert_eq!(stdout(&out).trim(), "200", "{}", stderr(&out));
    let out = in_netns(client_ns, "getent", &["hosts", "backend.default.svc.weft.local"]);
    assert!(stdout(&out).starts_with("240.240."), "a virtual IP: {}", stdout(&out));

    // Backend's sidecar saw the client's SPIFFE identity: mutual TLS all the way.
    let client_id = "spiffe://weft.local/ns/default/sa/client";
    let served = |m: &str| {
        metric_sum(m, "weft_requests_total", &["direction=\"inbound\"", &format!("peer_identity=\"{client_id}\"")])
    };
    wait_until(Duration::from_secs(10), "backend counts the client's requests", || {
        served(&mesh.metrics(&backend_ip)) >= 2.0
    });

    // Calling backend's instance address and app port directly still goes through both sidecars.
    let before =
        metric_sum(&mesh.metrics(&backend_ip), "weft_tcp_connections_opened_total", &["direction=\"inbound\""]);
    let direct = format!("http://{backend_ip}:8080/");
    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &direct]);
    assert_eq!(stdout(&out), "200", "{direct}: {}", stderr(&out));
    let after = metric_sum(&mesh.metrics(&backend_ip), "weft_tcp_connections_opened_total", &["direction=\"inbound\""]);
    assert!(after > before, "the direct call reached backend's sidecar ({before} → {after})");

    // A plaintext client outside the mesh (the host) is refused: backend is strict.
    let out = mesh.host.run("curl", &["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &direct]);
    assert_ne!(stdout(&out), "200", "a plaintext client reached backend's app around its sidecar");
}

#[test]
fn a_killed_instance_leaves_nothing_after_cleanup() {
    let Some(mesh) = Mesh::start("cleanup") else { return };
    let links_before = stdout(&mesh.host.run("ip", &["-o", "link"]));
    let app = demo_app("leftover");
    let app: Vec<&str> = app.iter().map(String::as_str).collect();
    let mut instance = mesh.instance("leftover", 8080, &app);
    wait_until(Duration::from_secs(30), "the instance healthy", || mesh.endpoints("leftover").len() == 1);
    assert_eq!(instance_netns("leftover").len(), 1);
    instance.kill();
    assert_eq!(instance_netns("leftover").len(), 1, "a SIGKILLed weft run cannot clean up after itself");
    let out = mesh.host.cmd(weft_bin()).arg("cleanup").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("weft-i-leftover-"), "cleanup names what it removed: {}", stdout(&out));
    assert!(instance_netns("leftover").is_empty());
    assert_eq!(stdout(&mesh.host.run("ip", &["-o", "link"])), links_before, "the bridge and veth are gone");
}
