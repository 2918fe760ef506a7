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
use weft_tests::hosts::{Fabric, Host, ipv6_of};
use weft_tests::*;

/// The namespaces weft made for instances of `service` (of any service: "").
fn instance_netns(service: &str) -> Vec<String> {
    let list = stdout(&run("ip", &["netns", "list"]));
    let prefix = if service.is_empty() { "weft-i-".to_owned() } else { format!("weft-i-{service}-") };
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
    /// The control plane as the CLI on its host reaches it, and as instances do.
    control: String,
    reached_at: String,
    ca: String,
    admin: String,
}

/// The bridge's address: where instances reach the host, and the control plane on it.
const GATEWAY: &str = "10.240.0.1";

impl Mesh {
    fn start(tag: &str) -> Option<Mesh> {
        let host = Host::new(tag)?;
        Some(Mesh::start_on(host, tag, GATEWAY))
    }

    /// A control plane on `host`, reached by instances at `address` (named in its
    /// certificate).
    fn start_on(host: Host, tag: &str, address: &str) -> Mesh {
        let dir = TestDir::new(&format!("transparent-{tag}"));
        let data = dir.path.join("control");
        let port = free_port();
        let control = Proc::spawn(
            &dir,
            "control",
            host.cmd(weft_bin())
                .args(["control", "--listen", &format!("0.0.0.0:{port}"), "--server-name", address])
                .arg("--data-dir")
                .arg(&data),
        );
        let token = data.join("admin.token");
        wait_until(Duration::from_secs(20), "the control plane", || token.exists());
        Mesh {
            reached_at: format!("{address}:{port}"),
            control: format!("127.0.0.1:{port}"),
            ca: data.join("ca/trust-bundle.pem").display().to_string(),
            admin: std::fs::read_to_string(&token).unwrap().trim().to_owned(),
            host,
            dir,
            _control: control,
        }
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
    fn instance(&self, service: &str, port: u16, app: &[impl AsRef<std::ffi::OsStr>]) -> Proc {
        self.instance_on(&self.host, &[], service, port, app)
    }

    /// The same on `host`, with `flags` for `weft run`.
    fn instance_on(
        &self,
        host: &Host,
        flags: &[&str],
        service: &str,
        port: u16,
        app: &[impl AsRef<std::ffi::OsStr>],
    ) -> Proc {
        self.instance_with(host, flags, &[], service, port, app)
    }

    /// The same with `env` in `weft run`'s environment.
    fn instance_with(
        &self,
        host: &Host,
        flags: &[&str],
        env: &[(&str, &str)],
        service: &str,
        port: u16,
        app: &[impl AsRef<std::ffi::OsStr>],
    ) -> Proc {
        let name = format!("{service}-{}", fastrand_suffix());
        let mut cmd = host.cmd(weft_bin());
        cmd.args(self.run_args(flags, service, port, app)).envs(env.iter().copied());
        Proc::spawn(&self.dir, &name, cmd.env("WEFT_TOKEN", self.token(service)))
    }

    /// `weft run --transparent`'s arguments for `app` as an instance of `service`.
    fn run_args(
        &self,
        flags: &[&str],
        service: &str,
        port: u16,
        app: &[impl AsRef<std::ffi::OsStr>],
    ) -> Vec<std::ffi::OsString> {
        let port = port.to_string();
        let head =
            ["run", "--transparent", "--service", service, "--port", &port].into_iter().chain(flags.iter().copied());
        let control = ["--control", &self.reached_at, "--ca-file", &self.ca, "--"];
        head.chain(control).map(Into::into).chain(app.iter().map(|a| a.as_ref().to_owned())).collect()
    }

    /// A join token for `service`.
    fn token(&self, service: &str) -> String {
        let token = stdout(&self.weft(&["token", "create", "--service", service])).trim().to_owned();
        assert!(!token.is_empty(), "a join token for {service}");
        token
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
        metrics_from(&self.host, instance_ip)
    }

    /// The addresses of `service`'s healthy instances.
    fn instance_ips(&self, service: &str) -> Vec<String> {
        let mut ips: Vec<String> = self
            .endpoints(service)
            .iter()
            .filter_map(|e| e["registration"]["inbound"].as_str()?.split(':').next().map(str::to_owned))
            .collect();
        ips.sort();
        ips
    }
}

/// An instance's metrics, read from `host` (where its bridge is).
fn metrics_from(host: &Host, instance_ip: &str) -> String {
    stdout(&host.run("curl", &["-s", &format!("http://{instance_ip}:15020/metrics")]))
}

fn fastrand_suffix() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A gRPC call of an unmodified grpcio client: Demo/Hello to `target`; the reply's bytes.
const GRPC_HELLO: &str = "import grpc, sys\n\
channel = grpc.insecure_channel(sys.argv[1])\n\
reply = channel.unary_unary('/weft.demo.v1.Demo/Hello')(b'\\x0a\\x04mesh', timeout=15)\n\
print(reply.decode('utf-8', 'replace'))\n";

fn demo_app(service: &str) -> Vec<String> {
    vec![weft_bin().display().to_string(), "demo-app".into(), "--service".into(), service.into()]
}

/// `service`'s demo app, which first makes `calls` (curl's arguments: flags, then a URL) and
/// writes their status codes, separated by spaces, to the file returned.
fn calling_app(dir: &TestDir, service: &str, calls: &[&str]) -> (std::path::PathBuf, Vec<String>) {
    let file = dir.path.join(format!("{service}-calls"));
    let script: String = calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let gap = if i == 0 { "" } else { " " };
            format!("curl -s -o /dev/null -w '{gap}%{{http_code}}' {call} >> {}; ", file.display())
        })
        .collect();
    let mut app = vec!["sh".to_owned(), "-c".to_owned(), format!("{script}exec \"$@\""), "app".to_owned()];
    app.extend(demo_app(service));
    (file, app)
}

/// What is not the mesh's, as a transparent app meets it: names outside the mesh are asked of
/// the host's resolver (here one on the host, given with --dns-upstream), mesh names are
/// answered over TCP too, and a server outside the mesh is reached unchanged, counted as
/// passthrough by the caller's sidecar.
#[test]
fn names_and_destinations_outside_the_mesh() {
    let Some(mesh) = Mesh::start("outside") else { return };
    let backend_app = demo_app("larder");
    let _backend = mesh.instance("larder", 8080, &backend_app);
    wait_until(Duration::from_secs(30), "larder healthy", || mesh.endpoints("larder").len() == 1);
    // The host's resolver and a web server outside the mesh, on the host (the bridge is up).
    let dns_check = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/dns_check.py");
    let dns_check = dns_check.to_str().unwrap();
    let _resolver = Proc::spawn(
        &mesh.dir,
        "resolver",
        mesh.host.cmd("python3").args([dns_check, "serve", "0.0.0.0:5353", "outside.example", "192.0.2.7"]),
    );
    let web_port = free_port().to_string();
    let _web = Proc::spawn(
        &mesh.dir,
        "web",
        mesh.host.cmd("python3").args(["-m", "http.server", &web_port, "--bind", GATEWAY]).current_dir(&mesh.dir.path),
    );
    let client_app = demo_app("grocer");
    let upstream = format!("{GATEWAY}:5353");
    let _client = mesh.instance_on(&mesh.host, &["--dns-upstream", &upstream], "grocer", 8080, &client_app);
    wait_until(Duration::from_secs(30), "grocer healthy", || mesh.endpoints("grocer").len() == 1);
    let client_ns = instance_netns("grocer");
    assert_eq!(client_ns.len(), 1, "{client_ns:?}");
    let client_ns = &client_ns[0];
    let client_ip = mesh.instance_ips("grocer")[0].clone();

    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://larder/"]);
    assert_eq!(stdout(&out), "200", "curl http://larder/: {}", stderr(&out));
    let vip = stdout(&in_netns(client_ns, "getent", &["ahostsv4", "larder"]))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(vip.starts_with("240.240."), "larder's virtual IP: {vip:?}");
    let services = stdout(&mesh.weft(&["get", "services"]));
    assert!(
        services.lines().any(|l| l.starts_with("larder") && l.ends_with(&vip)),
        "weft get services shows it:\n{services}"
    );
    let out = in_netns(client_ns, "python3", &[dns_check, "ask-tcp", "127.0.0.1", "larder.default"]);
    assert_eq!(stdout(&out).trim(), vip, "mesh DNS over TCP: {}", stderr(&out));
    let out = in_netns(client_ns, "getent", &["hosts", "outside.example"]);
    assert!(
        stdout(&out).starts_with("192.0.2.7"),
        "forwarded to the host's resolver: {} {}",
        stdout(&out),
        stderr(&out)
    );
    let out = in_netns(client_ns, "getent", &["hosts", "nothing.default.svc.weft.local"]);
    assert!(!out.status.success(), "the mesh's zone has no such service: {}", stdout(&out));

    // A server outside the mesh: reached unchanged, and counted.
    let passthrough = |m: &str| metric_sum(m, "weft_tcp_connections_opened_total", &["service=\"passthrough\""]);
    let before = passthrough(&mesh.metrics(&client_ip));
    let outside = format!("http://{GATEWAY}:{web_port}/");
    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &outside]);
    assert_eq!(stdout(&out), "200", "{outside}: {}", stderr(&out));
    assert_eq!(passthrough(&mesh.metrics(&client_ip)), before + 1.0, "counted as passthrough");

    // registry-only: the same call is refused, and counted; the mesh is still reached.
    let policy = mesh.dir.path.join("registry-only.yaml");
    std::fs::write(
        &policy,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: grocer}\nspec: {egress: registry-only}\n",
    )
    .unwrap();
    let out = mesh.weft(&["apply", "-f", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = |m: &str| metric_sum(m, "weft_proxy_errors_total", &["reason=\"egress-refused\""]);
    wait_until(Duration::from_secs(10), "the outside server refused", || {
        let out = in_netns(client_ns, "curl", &["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &outside]);
        stdout(&out) != "200" && refused(&mesh.metrics(&client_ip)) >= 1.0
    });
    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://larder/"]);
    assert_eq!(stdout(&out), "200", "the mesh is still reached: {}", stderr(&out));
}

/// Where the host has IPv6 (here it does), an instance's namespace has its address's IPv6 form
/// and no link-local address, mesh names answer AAAA, and IPv6 is captured both ways as IPv4
/// is: the app's own IPv6 connection is redirected at connect(), a process outside its cgroup
/// is captured by ip6tables' nat rule, both reach a service by name or an instance by its IPv6
/// address through both sidecars, and a plaintext client on the host calling an instance's
/// IPv6 address is refused while the service is strict, and served once it is permissive.
#[test]
fn ipv6_is_captured_as_ipv4_is() {
    let Some(mesh) = Mesh::start("ipv6") else { return };
    let _depot = mesh.instance("depot", 8080, &demo_app("depot"));
    wait_until(Duration::from_secs(30), "depot healthy", || mesh.endpoints("depot").len() == 1);
    // Kiosk's app calls depot over IPv6 as it starts (redirected at connect()), then serves.
    let (calls, app) = calling_app(&mesh.dir, "kiosk", &["-6 http://depot/"]);
    let _kiosk = mesh.instance("kiosk", 8080, &app);
    wait_until(Duration::from_secs(30), "kiosk healthy", || mesh.endpoints("kiosk").len() == 1);
    let kiosk_ns = &instance_netns("kiosk")[0];
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "200", "the app's own call over IPv6");
    assert_eq!(nat_redirected(kiosk_ns, "ip6tables"), 0, "the app's IPv6 connection went around the nat rule");
    let (depot, kiosk) = (mesh.instance_ips("depot")[0].clone(), mesh.instance_ips("kiosk")[0].clone());
    let out = in_netns(kiosk_ns, "ip", &["-6", "-o", "addr", "show", "dev", "eth0"]);
    let eth0 = stdout(&out);
    assert!(eth0.contains(&format!(" {}/112 ", ipv6_of(&kiosk))), "the IPv6 form of {kiosk} on eth0: {eth0}");
    assert!(!eth0.contains("fe80"), "no link-local address to reach the app at: {eth0}");

    let first = |out: Output| stdout(&out).split_whitespace().next().unwrap_or_default().to_owned();
    let vip = first(in_netns(kiosk_ns, "getent", &["ahostsv4", "depot"]));
    let vip6 = first(in_netns(kiosk_ns, "getent", &["ahostsv6", "depot.default"]));
    assert_eq!(vip6, ipv6_of(&vip).to_string(), "depot's AAAA is its virtual IP's IPv6 form");

    // By name over IPv6: the sidecar's route to depot.
    let to_depot = || {
        metric_sum(&mesh.metrics(&kiosk), "weft_requests_total", &["direction=\"outbound\"", "dst_service=\"depot\""])
    };
    let before = to_depot();
    let out = in_netns(kiosk_ns, "curl", &["-6", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://depot/"]);
    assert_eq!(stdout(&out), "200", "curl -6 http://depot/: {}", stderr(&out));
    assert_eq!(to_depot(), before + 1.0, "through kiosk's sidecar's route to depot");

    // Store's instance at its IPv6 address and app port: through both sidecars (over mutual
    // TLS: depot is strict, and refuses plaintext, as the host's below).
    let inbound = || metric_sum(&mesh.metrics(&depot), "weft_tcp_connections_opened_total", &["direction=\"inbound\""]);
    let before = inbound();
    let direct = format!("http://[{}]:8080/", ipv6_of(&depot));
    let out = in_netns(kiosk_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &direct]);
    assert_eq!(stdout(&out), "200", "{direct}: {}", stderr(&out));
    assert!(inbound() > before, "depot's sidecar took it");
    assert!(nat_redirected(kiosk_ns, "ip6tables") > 0, "curl outside the app's cgroup: through ip6tables' rule");

    // A server outside the mesh at an IPv6 address (the host's, on the bridge): reached
    // unchanged, and counted as passthrough.
    let web_port = free_port().to_string();
    let gateway6 = ipv6_of(GATEWAY).to_string();
    let _web = Proc::spawn(
        &mesh.dir,
        "web6",
        mesh.host
            .cmd("python3")
            .args(["-m", "http.server", &web_port, "--bind", &gateway6])
            .current_dir(&mesh.dir.path),
    );
    let passthrough =
        || metric_sum(&mesh.metrics(&kiosk), "weft_tcp_connections_opened_total", &["service=\"passthrough\""]);
    let before = passthrough();
    let outside = format!("http://[{gateway6}]:{web_port}/");
    wait_until(Duration::from_secs(10), "the server outside the mesh, over IPv6", || {
        stdout(&in_netns(kiosk_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &outside])) == "200"
    });
    assert!(passthrough() > before, "counted as passthrough");

    // A plaintext client on the host, outside the mesh, at depot's IPv6 address.
    let plain = || {
        let args = ["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &direct];
        stdout(&mesh.host.run("curl", &args))
    };
    assert_ne!(plain(), "200", "a plaintext client reached depot's app over IPv6 around its sidecar");
    let permissive = mesh.dir.path.join("permissive.yaml");
    std::fs::write(
        &permissive,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: depot}\nspec: {mtls: permissive}\n",
    )
    .unwrap();
    let out = mesh.weft(&["apply", "-f", permissive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(10), "permissive depot serves plaintext over IPv6", || plain() == "200");
}

/// Packets the namespace's nat rule (`tool`: iptables, ip6tables) has sent to the capture
/// listener (port 15001).
fn nat_redirected(netns: &str, tool: &str) -> u64 {
    redirected_packets(&in_netns(netns, tool, &NAT_OUTPUT_RULES))
}

/// `iptables` arguments that list the capture rules with their counters.
const NAT_OUTPUT_RULES: [&str; 7] = ["-t", "nat", "-L", "WEFT_OUTPUT", "-n", "-v", "-x"];

/// The packets counted by the REDIRECT to the capture listener, as [`NAT_OUTPUT_RULES`] list it.
fn redirected_packets(out: &Output) -> u64 {
    let rule = stdout(out).lines().find(|l| l.contains("redir ports 15001")).map(str::to_owned);
    let rule = rule.unwrap_or_else(|| panic!("no REDIRECT to 15001: {}", stdout(out)));
    rule.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{rule}"))
}

/// The app's own connections (it and whatever it starts) are pointed at the sidecar when
/// they are made, by programs on the app's cgroup: the nat rule never sees them, whether they
/// go to the mesh or out of it. Anything else in the namespace is still captured by the nat
/// rule.
#[test]
fn the_apps_own_connections_are_redirected_at_connect() {
    let Some(mesh) = Mesh::start("connect") else { return };
    let _store = mesh.instance("store", 8080, &demo_app("store"));
    wait_until(Duration::from_secs(30), "store healthy", || mesh.endpoints("store").len() == 1);
    let web_port = free_port().to_string();
    let _web = Proc::spawn(
        &mesh.dir,
        "web",
        mesh.host.cmd("python3").args(["-m", "http.server", &web_port, "--bind", GATEWAY]).current_dir(&mesh.dir.path),
    );
    wait_until(Duration::from_secs(10), "the web server outside the mesh", || {
        stdout(
            &mesh.host.run(
                "curl",
                &["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{GATEWAY}:{web_port}/")],
            ),
        ) == "200"
    });
    // The app calls store and the server outside the mesh as it starts, then serves.
    let outside = format!("http://{GATEWAY}:{web_port}/");
    let (calls, app) = calling_app(&mesh.dir, "shop", &["http://store/", &outside]);
    let _shop = mesh.instance("shop", 8080, &app);
    wait_until(Duration::from_secs(30), "shop healthy", || mesh.endpoints("shop").len() == 1);
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "200 200", "the app's calls to the mesh and out of it");
    let netns = &instance_netns("shop")[0];
    assert_eq!(nat_redirected(netns, "iptables"), 0, "the app's connections went around the nat rule");
    let shop = mesh.instance_ips("shop")[0].clone();
    let metrics = mesh.metrics(&shop);
    let opened =
        |service: &str| metric_sum(&metrics, "weft_tcp_connections_opened_total", &[&format!("service=\"{service}\"")]);
    assert_eq!(opened("passthrough"), 1.0, "the call out of the mesh counted as passthrough:\n{metrics}");
    let to_store = metric_sum(&metrics, "weft_requests_total", &["direction=\"outbound\"", "dst_service=\"store\""]);
    assert_eq!(to_store, 1.0, "the call to store went through the sidecar's route to store:\n{metrics}");

    // Not of the app: the nat rule captures it.
    let out = in_netns(netns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://store/"]);
    assert_eq!(stdout(&out), "200", "curl http://store/ from outside the app's cgroup: {}", stderr(&out));
    assert!(nat_redirected(netns, "iptables") > 0, "the nat rule captured it");
}

/// Where the connect-time redirection cannot be set up (no cgroup v2 where `weft run` runs: a
/// host on cgroup v1, or a `/sys` without it, here a mount namespace where an empty tmpfs hides
/// it), `weft run` says so in one line and the namespace's nat rule captures the app's
/// connections: the app still reaches the mesh by name.
#[test]
fn without_cgroup_v2_the_nat_rule_captures_the_app() {
    let Some(mesh) = Mesh::start("no-cgroup2") else { return };
    let _pantry = mesh.instance("pantry", 8080, &demo_app("pantry"));
    wait_until(Duration::from_secs(30), "pantry healthy", || mesh.endpoints("pantry").len() == 1);
    let (calls, app) = calling_app(&mesh.dir, "cook", &["http://pantry/"]);
    let hide = format!("mount -t tmpfs none {} && exec \"$@\"", cgroup2_root());
    let mut cmd = mesh.host.cmd("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c", &hide, "sh"])
        .arg(weft_bin())
        .args(mesh.run_args(&[], "cook", 8080, &app))
        .env("WEFT_TOKEN", mesh.token("cook"));
    let mut cook = Proc::spawn(&mesh.dir, "cook", &mut cmd);
    wait_until(Duration::from_secs(30), "cook healthy", || mesh.endpoints("cook").len() == 1);
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "200", "the app's call to pantry");
    let log = std::fs::read_to_string(mesh.dir.path.join("cook.log")).unwrap();
    let said = log.lines().filter(|l| l.contains("captured by the namespace's nat rule alone")).count();
    assert_eq!(said, 1, "one line says why:\n{log}");
    // Its namespace is mounted where only that mount namespace sees it: entered by the sidecar.
    let sidecar = cook.children()[0];
    let enter = format!("--net=/proc/{sidecar}/ns/net");
    let out = run("nsenter", &[[enter.as_str(), "iptables"].as_slice(), &NAT_OUTPUT_RULES].concat());
    assert!(redirected_packets(&out) > 0, "the nat rule captured the app's call");
    assert_eq!(cook.stop(), Some(0), "weft run stops cleanly");
}

/// What weft made, as `ip` and iptables/nftables show it: the namespaces whose names start
/// with one of `netns` (this test's; others run beside it) and the host's links, addresses and
/// rules.
fn made_state(host: &Host, netns: &[&str]) -> String {
    let list = stdout(&run("ip", &["netns", "list"]));
    let mut state: String = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| netns.iter().any(|p| n.starts_with(p)))
        .map(|n| format!("{n}\n"))
        .collect();
    for (program, args) in [
        ("ip", vec!["-o", "link"]),
        ("ip", vec!["-o", "addr"]),
        ("ip", vec!["route"]),
        ("ip", vec!["-6", "route"]),
        ("iptables-save", vec![]),
        ("ip6tables-save", vec![]),
        ("nft", vec!["list", "ruleset"]),
    ] {
        let out = host.run(program, &args);
        // iptables-save dates its output: the rules are what counts.
        let text: String = stdout(&out).lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        state += &format!("\n== {program} {args:?}\n{text}");
    }
    state += &format!("\n== cgroups\n{:?}\n", cgroups_named(netns));
    state
}

/// Where the cgroup v2 hierarchy is mounted here.
fn cgroup2_root() -> String {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_once(" - ").is_some_and(|(_, fs)| fs.starts_with("cgroup2 ")))
        .and_then(|l| l.split_whitespace().nth(4))
        .expect("a cgroup2 mount");
    root.to_owned()
}

/// The cgroups named with one of `prefixes` (weft names an app's as its namespace).
fn cgroups_named(prefixes: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cgroup2_root())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
        .collect();
    names.sort();
    names
}

/// `weft cleanup` on `host` after a SIGKILL: the namespaces named `prefix…` that the killed
/// process left are gone. (Cleanup names each it removes, but a test running beside this one
/// may get there first: every `weft run` and `weft cleanup` on the machine removes what a dead
/// one left.)
fn cleanup_removes(host: &Host, prefix: &str) {
    let out = host.cmd(weft_bin()).arg("cleanup").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let left = stdout(&run("ip", &["netns", "list"])).lines().any(|l| l.starts_with(prefix));
    assert!(!left, "{prefix}… left after weft cleanup, which said: {}", stdout(&out));
}

/// After SIGKILL of `weft run`, `weft cleanup` or the next start leaves the host as it was;
/// after SIGKILL of the sidecar alone, `weft run` cleans up itself; after SIGTERM, too.
#[test]
fn a_killed_instance_leaves_nothing_behind() {
    const LEFTOVER: &[&str] = &["weft-i-leftover-"];
    let Some(mesh) = Mesh::start("cleanup") else { return };
    let before = made_state(&mesh.host, LEFTOVER);
    let app = demo_app("leftover");
    let healthy = |n: usize| {
        wait_until(Duration::from_secs(30), "the instance healthy", || mesh.endpoints("leftover").len() == n);
    };

    // SIGKILL of weft run, then weft cleanup.
    let mut instance = mesh.instance("leftover", 8080, &app);
    healthy(1);
    assert_eq!(instance_netns("leftover").len(), 1);
    assert_eq!(cgroups_named(LEFTOVER).len(), 1, "the app's cgroup");
    instance.kill();
    assert_eq!(instance_netns("leftover").len(), 1, "a SIGKILLed weft run cannot clean up after itself");
    cleanup_removes(&mesh.host, "weft-i-leftover-");
    assert_eq!(made_state(&mesh.host, LEFTOVER), before, "weft cleanup left the host as it was");

    // SIGKILL of weft run, then a fresh start: it removes what the killed one left.
    let mut killed = mesh.instance("leftover", 8080, &app);
    wait_until(Duration::from_secs(30), "a namespace", || instance_netns("leftover").len() == 1);
    let left = instance_netns("leftover");
    killed.kill();
    let mut fresh = mesh.instance("leftover", 8080, &app);
    wait_until(Duration::from_secs(30), "the fresh start removed the leftover", || {
        let now = instance_netns("leftover");
        now.len() == 1 && now != left
    });
    // SIGTERM: the instance stops and weft run removes its namespace.
    healthy(1);
    assert_eq!(fresh.stop(), Some(0), "weft run exits 0 after a SIGTERM");
    assert_eq!(made_state(&mesh.host, LEFTOVER), before, "a stopped weft run left the host as it was");

    // SIGKILL of the sidecar alone: weft run sees it go and cleans up.
    let mut instance = mesh.instance("leftover", 8080, &app);
    healthy(1);
    let sidecar = instance.children()[0];
    let exe = std::fs::read_link(format!("/proc/{sidecar}/exe")).unwrap();
    assert!(exe.ends_with("weft-proxy"), "weft run's child is its sidecar: {}", exe.display());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sidecar), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(instance.wait(Duration::from_secs(10)), Some(137), "weft run reports its sidecar's end");
    assert_eq!(made_state(&mesh.host, LEFTOVER), before, "weft run cleaned up after its killed sidecar");
}

/// Three hosts: the control plane and a client on the first, a backend instance on each of
/// the others. The unmodified client reaches backend by name with curl, Python and grpcio,
/// over mutual TLS across hosts, balanced over both; its direct call to an instance's address
/// goes through both sidecars; a plaintext client on a host is refused while backend is
/// strict and served once it is permissive.
#[test]
fn an_unmodified_app_reaches_instances_on_other_hosts_by_name() {
    let Some(fabric) = Fabric::new("mh", 3) else { return };
    let [h1, h2, h3] = &fabric.hosts[..] else { unreachable!() };
    let host = Host { name: h1.name.clone() };
    let mesh = Mesh::start_on(host, "multi-host", "10.99.0.1");
    let backend_app = demo_app("backend");
    let (r1, r2, r3) = ("10.240.1.0/24", "10.240.2.0/24", "10.240.3.0/24");
    let _b2 = mesh.instance_on(h2, &["--netns-range", r2], "backend", 8080, &backend_app);
    let _b3 = mesh.instance_on(h3, &["--netns-range", r3], "backend", 8080, &backend_app);
    let client_app = demo_app("client");
    let _client = mesh.instance_on(h1, &["--netns-range", r1], "client", 8080, &client_app);
    wait_until(Duration::from_secs(60), "two backends and the client healthy", || {
        mesh.endpoints("backend").len() == 2 && mesh.endpoints("client").len() == 1
    });
    let backends = mesh.instance_ips("backend");
    assert_eq!(backends, ["10.240.2.2", "10.240.3.2"], "one backend on each of the other hosts");
    let client_ns = instance_netns("client");
    assert_eq!(client_ns.len(), 1, "{client_ns:?}");
    let client_ns = &client_ns[0];

    // curl by name, 20 times: every call answered, by both instances.
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let out = in_netns(client_ns, "curl", &["-s", "-w", " %{http_code}", "http://backend/"]);
        let body = stdout(&out);
        assert!(
            body.ends_with(" 200") && body.contains("hello from backend"),
            "curl http://backend/: {body} {}",
            stderr(&out)
        );
        let instance = body.split("(instance ").nth(1).and_then(|r| r.split(')').next()).unwrap_or_default();
        served_by.insert(instance.to_owned());
    }
    assert_eq!(served_by.len(), 2, "balanced across both hosts' instances: {served_by:?}");
    let py = "import urllib.request; print(urllib.request.urlopen('http://backend.default/').status)";
    let out = in_netns(client_ns, "python3", &["-c", py]);
    assert_eq!(stdout(&out).trim(), "200", "{}", stderr(&out));
    let python = python().display().to_string();
    let out = in_netns(client_ns, &python, &["-c", GRPC_HELLO, "dns:///backend:50051"]);
    assert!(stdout(&out).contains("backend"), "grpcio dns:///backend:50051: {} {}", stdout(&out), stderr(&out));
    // As an app's getaddrinfo sees it: the virtual IP first (its IPv6 form after it).
    let out = in_netns(client_ns, "getent", &["ahosts", "backend.default.svc.weft.local"]);
    assert!(stdout(&out).starts_with("240.240."), "a virtual IP: {}", stdout(&out));

    // Each backend's sidecar saw the client's SPIFFE identity: mutual TLS across hosts.
    let client_id = "spiffe://weft.local/ns/default/sa/client";
    let from_client = |m: &str| {
        metric_sum(m, "weft_requests_total", &["direction=\"inbound\"", &format!("peer_identity=\"{client_id}\"")])
    };
    for (host, ip) in [(h2, &backends[0]), (h3, &backends[1])] {
        wait_until(Duration::from_secs(10), "backend counts the client's requests", || {
            from_client(&metrics_from(host, ip)) >= 1.0
        });
    }

    // Calling an instance's address and app port directly still goes through both sidecars.
    let opened = |host: &Host, ip: &str| {
        metric_sum(&metrics_from(host, ip), "weft_tcp_connections_opened_total", &["direction=\"inbound\""])
    };
    let before = opened(h2, &backends[0]);
    let direct = format!("http://{}:8080/", backends[0]);
    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &direct]);
    assert_eq!(stdout(&out), "200", "{direct}: {}", stderr(&out));
    assert!(opened(h2, &backends[0]) > before, "the direct call reached the instance's sidecar");
    // The same at its IPv6 address.
    let before = opened(h2, &backends[0]);
    let direct6 = format!("http://[{}]:8080/", ipv6_of(&backends[0]));
    let out = in_netns(client_ns, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &direct6]);
    assert_eq!(stdout(&out), "200", "{direct6}: {}", stderr(&out));
    assert!(opened(h2, &backends[0]) > before, "the direct call over IPv6 reached the instance's sidecar");

    // A plaintext client outside the mesh (host 3 itself) is refused while backend is strict
    // (the default) and served once it is permissive, over IPv4 and IPv6.
    let plain = |host: &Host| {
        [&direct, &direct6]
            .map(|url| stdout(&host.run("curl", &["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url])))
    };
    assert!(!plain(h3).contains(&"200".to_owned()), "a plaintext client reached backend's app around its sidecar");
    let permissive = mesh.dir.path.join("permissive.yaml");
    std::fs::write(
        &permissive,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {mtls: permissive}\n",
    )
    .unwrap();
    let out = mesh.weft(&["apply", "-f", permissive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(10), "permissive backend serves plaintext", || plain(h3) == ["200", "200"]);
}

/// `weft up` with transparent services (README: mesh file, `transparent: true`): the gateway
/// (explicit upstream, on the host) calls web, whose unmodified app calls `api:80` by
/// name; stopping `weft up` leaves the host as it was.
#[test]
fn weft_up_runs_transparent_services() {
    let Some(host) = Host::new("up") else { return };
    let dir = TestDir::new("transparent-up");
    let (control, gateway) = (free_port(), free_port());
    let file = dir.path.join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            r#"control: {{listen: "127.0.0.1:{control}"}}
gateway: {{web: {gateway}}}
services:
  - name: web
    transparent: true
    env: {{WEFT_UPSTREAM: "api:80"}}
  - name: api
    transparent: true
    instances: 2
"#
        ),
    )
    .unwrap();
    const MADE: &[&str] = &["weft-i-web-", "weft-i-api-"];
    let before = made_state(&host, MADE);
    let mut up = Proc::spawn(&dir, "up", host.cmd(weft_bin()).arg("up").arg("-f").arg(&file));
    wait_up(&dir, &mut up);
    let url = format!("http://127.0.0.1:{gateway}/");
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let out = host.run("curl", &["-s", &url]);
        let body = stdout(&out);
        assert!(body.contains("hello from web"), "{url}: {body} {}", stderr(&out));
        assert!(body.contains("upstream (200 OK): hello from api"), "web reached api by name: {body}");
        backends.extend(body.split("(instance api-").nth(1).and_then(|r| r.split(')').next()).map(str::to_owned));
    }
    assert_eq!(backends.len(), 2, "both api instances served: {backends:?}");
    assert_eq!(instance_netns("web").len() + instance_netns("api").len(), 3);
    assert_eq!(up.stop(), Some(0), "weft up stops cleanly");
    assert!(instance_netns("web").is_empty() && instance_netns("api").is_empty());
    assert_eq!(made_state(&host, MADE), before, "weft up left the host as it was");
}

/// A host drops off the network (its link goes down) under a steady 100 requests a second from
/// a client on another host to a service with an instance on it and one on a third host. New
/// connections to it time out and fail over; requests already sent to it, and the odd one
/// sent again on a pooled connection to it while its instance is still registered, fail at the
/// client's timeout (3 s); once the control plane has removed the instance (its sidecar's
/// stream to the control plane is gone), none fails.
#[test]
fn a_host_dropping_off_moves_traffic_to_the_other_instance() {
    let Some(fabric) = Fabric::new("down", 3) else { return };
    let [h1, h2, h3] = &fabric.hosts[..] else { unreachable!() };
    let mesh = Mesh::start_on(Host { name: h1.name.clone() }, "host-down", "10.99.0.1");
    let app = demo_app("stock");
    let _s2 = mesh.instance_on(h2, &["--netns-range", "10.240.2.0/24"], "stock", 8080, &app);
    let _s3 = mesh.instance_on(h3, &["--netns-range", "10.240.3.0/24"], "stock", 8080, &app);
    let buyer = demo_app("buyer");
    let _buyer = mesh.instance_on(h1, &["--netns-range", "10.240.1.0/24"], "buyer", 8080, &buyer);
    wait_until(Duration::from_secs(60), "two stock instances and the buyer healthy", || {
        mesh.endpoints("stock").len() == 2 && mesh.endpoints("buyer").len() == 1
    });
    let buyer_ns = instance_netns("buyer");
    let load_script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/steady_load.py");
    let mut load = Proc::spawn(
        &mesh.dir,
        "load",
        Command::new("ip").args(["netns", "exec", &buyer_ns[0], "python3"]).arg(&load_script).args([
            "http://stock/",
            "100",
            "30",
            "3",
        ]),
    );
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    assert!(fabric.switch.run("ip", &["link", "set", "p3", "down"]).status.success());
    wait_until(Duration::from_secs(25), "the control plane removes the instance on host 3", || {
        mesh.endpoints("stock").len() == 1
    });
    let removed = started.elapsed().as_secs_f64();
    assert_eq!(load.wait(Duration::from_secs(60)), Some(0), "the load ran to its end");
    let out = std::fs::read_to_string(mesh.dir.path.join("load.log")).unwrap();
    let result: Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let (sent, failed) = (result["sent"].as_u64().unwrap(), result["failed"].as_u64().unwrap());
    eprintln!(
        "host 3 dropped off 4 s into the load, its instance removed at {removed:.1} s: {failed} of {sent} requests failed: {}",
        result["failures"]
    );
    assert_eq!(sent, 3000);
    assert!(failed <= 5, "{failed} failed: {}", result["failures"]);
    let late: Vec<&Value> =
        result["failures"].as_array().unwrap().iter().filter(|f| f[0].as_f64().unwrap() > removed).collect();
    assert!(late.is_empty(), "failures after the instance was removed at {removed:.1} s: {late:?}");
}

/// The capture rules as iptables-legacy and as iptables-nft make them (`WEFT_IPTABLES`): each
/// instance's rules, IPv4's and IPv6's, are in its namespace's tables of that flavour, and its
/// app reaches the other instance by name through them.
#[test]
fn capture_works_with_iptables_legacy_and_nft() {
    let Some(mesh) = Mesh::start("flavours") else { return };
    let mut running = Vec::new();
    for (service, flavour) in [("legacy", "iptables-legacy"), ("nftables", "iptables-nft")] {
        let app = demo_app(service);
        running.push(mesh.instance_with(&mesh.host, &[], &[("WEFT_IPTABLES", flavour)], service, 8080, &app));
    }
    wait_until(Duration::from_secs(30), "both instances healthy", || {
        mesh.endpoints("legacy").len() == 1 && mesh.endpoints("nftables").len() == 1
    });
    for (service, flavour, other) in [("legacy", "iptables-legacy", "nftables"), ("nftables", "iptables-nft", "legacy")]
    {
        let ns = instance_netns(service);
        assert_eq!(ns.len(), 1, "{ns:?}");
        for flavour in [flavour.to_owned(), flavour.replace("iptables", "ip6tables")] {
            let rules = stdout(&in_netns(&ns[0], &format!("{flavour}-save"), &["-t", "nat"]));
            assert!(rules.contains("-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"), "{flavour}:\n{rules}");
        }
        // Healthy at the control plane a moment before the caller's sidecar holds the endpoint.
        let url = format!("http://{other}/");
        wait_until(Duration::from_secs(10), &format!("{service} ({flavour}) reaching {other}"), || {
            stdout(&in_netns(&ns[0], "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])) == "200"
        });
    }
}

/// Mistakes a new user makes get one clear line and change nothing: no root (no
/// CAP_NET_ADMIN), and a control plane on the host's loopback, which an instance's namespace
/// cannot reach.
#[test]
fn transparent_mistakes_get_one_clear_line() {
    let Some(host) = Host::new("mistakes") else { return };
    let before = made_state(&host, &["weft-i-x-"]);
    // A copy an unprivileged user can run wherever the build is (it fails before it looks for
    // the sidecar binary).
    let copy = std::env::temp_dir().join(format!("weft-unprivileged-{}", std::process::id()));
    std::fs::create_dir_all(&copy).unwrap();
    let weft = copy.join("weft");
    std::fs::copy(weft_bin(), &weft).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for path in [&copy, &weft] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let run_as = |prefix: &[&str], control: &str| {
        let mut c = host.cmd("timeout");
        c.arg("20").args(prefix).arg(&weft);
        c.args(["run", "--transparent", "--service", "x", "--port", "8080", "--control", control, "--", "true"]);
        c.output().unwrap()
    };
    let out =
        run_as(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"], "10.240.0.1:15010");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--transparent needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)"), "{}", stderr(&out));
    let out = run_as(&[], "127.0.0.1:15010");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is this host's loopback, which the instance's own network namespace cannot reach"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "one line: {}", stderr(&out));
    assert_eq!(made_state(&host, &["weft-i-x-"]), before, "nothing was made");
    let _ = std::fs::remove_dir_all(&copy);
}

/// `weft up --hosts 3`, the bundled demo as the README runs it: three simulated hosts, the
/// instances spread over them, the gateway here reaching frontend, which reaches backend's
/// instances on the other hosts over mutual TLS. After SIGKILL of `weft up`, `weft cleanup`
/// leaves the host as it was; so does the next start, then a stop.
#[test]
fn weft_up_simulates_hosts_and_leaves_nothing_when_killed() {
    let Some(host) = Host::new("hosts") else { return };
    let dir = TestDir::new("up-hosts");
    const MADE: &[&str] = &["weft-h-", "weft-i-frontend-", "weft-i-backend-v"];
    let before = made_state(&host, MADE);
    let start = |name: &str| {
        let up = Proc::spawn(&dir, name, host.cmd(weft_bin()).args(["up", "--hosts", "3"]));
        let log = dir.path.join(format!("{name}.log"));
        wait_until(Duration::from_secs(90), "weft up banner", || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("Ctrl-C stops the whole mesh")
        });
        (up, std::fs::read_to_string(&log).unwrap())
    };
    let (mut up, banner) = start("up");
    // Four instances, placed on the three hosts in turn.
    let on: Vec<&str> = banner.lines().filter_map(|l| l.split(" on weft-h-").nth(1)).collect();
    assert_eq!(on.len(), 4, "{banner}");
    let mut hosts: Vec<&str> = on.iter().filter_map(|h| h.split(' ').next()).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "every host runs an instance: {banner}");
    let host_of = |id: &str| {
        let line = banner.lines().find(|l| l.contains(&format!(" {id} "))).unwrap_or_default();
        line.split(" on weft-h-").nth(1).and_then(|h| h.split('-').next()).map(str::to_owned)
    };
    for (id, h) in [("backend-v1-0", "1"), ("backend-v1-1", "2"), ("backend-v2-0", "3"), ("frontend-v1-0", "1")] {
        assert_eq!(host_of(id).as_deref(), Some(h), "{id} on host {h}: {banner}");
    }
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let out = host.run("curl", &["-s", "http://127.0.0.1:8080/"]);
        let body = stdout(&out);
        assert!(body.contains("upstream (200 OK): hello from backend"), "{body} {}", stderr(&out));
        backends.extend(body.split("(instance backend-").nth(1).and_then(|r| r.split(')').next()).map(str::to_owned));
    }
    assert_eq!(backends.len(), 3, "every backend instance served, on hosts 1-3: {backends:?}");
    // Across hosts over mutual TLS: backend's sidecars count frontend's identity.
    let frontend = "peer_identity=\"spiffe://weft.local/ns/default/sa/frontend\"";
    let counted: f64 = ["10.240.2.2", "10.240.3.2"]
        .iter()
        .map(|ip| metric_sum(&metrics_from(&host, ip), "weft_requests_total", &["direction=\"inbound\"", frontend]))
        .sum();
    assert!(counted >= 1.0, "backend's sidecars on hosts 2 and 3 saw frontend's identity");
    // IPv6 is routed to the hosts' instances as IPv4 is.
    let out = host.run("ping", &["-c", "1", "-W", "5", &ipv6_of("10.240.3.2").to_string()]);
    assert!(out.status.success(), "host 3's instance over IPv6: {}{}", stdout(&out), stderr(&out));
    assert_ne!(made_state(&host, MADE), before);

    // SIGKILL: what weft up started dies with it (the kernel kills them: PR_SET_PDEATHSIG),
    // a moment later.
    let kill = |up: &mut Proc| {
        let started = up.children();
        assert!(!started.is_empty());
        up.kill();
        wait_until(Duration::from_secs(5), "weft up's instances die with it", || !started.iter().any(|p| alive(*p)));
    };
    kill(&mut up);
    cleanup_removes(&host, "weft-h-sw-");
    assert_eq!(made_state(&host, MADE), before, "weft cleanup after SIGKILL of weft up");

    // SIGKILL, then a fresh start removes what the killed one left; a stop removes the rest.
    let (mut killed, _) = start("up-killed");
    kill(&mut killed);
    let (mut fresh, _) = start("up-fresh");
    let out = host.run("curl", &["-s", "http://127.0.0.1:8080/"]);
    assert!(stdout(&out).contains("hello from backend"), "{}", stdout(&out));
    assert_eq!(fresh.stop(), Some(0), "weft up stops cleanly");
    assert_eq!(made_state(&host, MADE), before, "the fresh start, then a stop, left the host as it was");
}
