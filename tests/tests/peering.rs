//! Two datacenters, one mesh (issue 23): two control planes, each with its own CA and trust
//! domain, peered by `weft peer create` / `weft peer accept` as the README shows; DC2 exports
//! `backend` through its mesh gateway. Everything runs on loopback, one process per part.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_tests::*;

const EXPORT: &str = "apiVersion: weft.dev/v1alpha1
kind: ExportedServices
metadata: {name: to-dc1}
spec:
  services:
  - name: backend
    consumers: [{peer: dc1}]
";

/// A datacenter's control plane, with `flags` besides its name and trust domain.
fn datacenter_with(dir: &TestDir, name: &str, flags: &[&str]) -> Control {
    let addr = format!("127.0.0.1:{}", free_port());
    let td = format!("{name}.weft");
    let flags = [&["--datacenter", name, "--trust-domain", &td][..], flags].concat();
    Control::start_at_with(dir, &addr, dir.path.join(name), &flags)
}

fn datacenter(dir: &TestDir, name: &str) -> Control {
    datacenter_with(dir, name, &[])
}

/// A mesh gateway of the datacenter at `control`, listening on `addr` (and for its own
/// datacenter's sidecars on `local`, if given).
fn mesh_gateway(dir: &TestDir, control: &Control, id: &str, addr: &str, local: Option<&str>) -> (Proc, u16) {
    let admin = free_port();
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.args(["proxy", "--mesh-gateway", addr, "--id", id, "--control", &control.addr]);
    cmd.args(["--admin", &format!("127.0.0.1:{admin}")]);
    if let Some(local) = local {
        cmd.args(["--mesh-gateway-local", local]);
    }
    cmd.env("WEFT_TOKEN", join_token(&control.addr, "mesh-gateway"));
    let proc = Proc::spawn(dir, id, &mut cmd);
    wait_until(Duration::from_secs(10), "mesh gateway ready", || {
        run("curl", &["-s", "-f", &format!("http://127.0.0.1:{admin}/ready")]).status.success()
    });
    (proc, admin)
}

/// Two datacenters' control planes, DC2 running an instance of `service` behind its mesh
/// gateway and exporting it to DC1; not peered yet.
struct Exporting {
    dc1: Control,
    dc2: Control,
    remote: Instance,
    /// The mesh gateway and its admin port.
    gateway: (Proc, u16),
    gateway_addr: String,
}

fn exporting(dir: &TestDir, service: &str) -> Exporting {
    exporting_to(datacenter(dir, "dc1"), dir, service)
}

/// As [`exporting`], to the given DC1.
fn exporting_to(dc1: Control, dir: &TestDir, service: &str) -> Exporting {
    let dc2 = datacenter(dir, "dc2");
    let remote = Instance::start(dir, &dc2.addr, service, "v1", &format!("dc2-{service}-0"), &[]);
    let gateway_addr = format!("127.0.0.1:{}", free_port());
    let gateway = mesh_gateway(dir, &dc2, "dc2-gateway", &gateway_addr, None);
    let export = EXPORT.replace("name: backend", &format!("name: {service}"));
    let out = apply_yaml(dir, &dc2.addr, "export.yaml", &export);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(15), "DC2's instance healthy", || dc2.healthy_ids(service).len() == 1);
    Exporting { dc1, dc2, remote, gateway, gateway_addr }
}

/// Peers DC1 and DC2 as the README shows: DC2 makes a token for DC1, DC1 accepts it.
fn peer(dc1: &Control, dc2: &Control) {
    let token = peer_as(dc1, dc2, "dc2");
    // One peering per peer: the same token again is refused (its secret was for one use too:
    // `peering_mistakes_are_named`).
    let again = weft(&["peer", "accept", "--name", "dc2-again", &token, "--control", &dc1.addr]);
    assert!(!again.status.success() && stderr(&again).contains("one peering per trust domain"), "{}", stderr(&again));
}

/// DC1 peers with `other` (datacenter `name`), which makes the token; the token.
fn peer_as(dc1: &Control, other: &Control, name: &str) -> String {
    let made = weft(&["peer", "create", "dc1", "--control", &other.addr]);
    assert!(made.status.success(), "weft peer create: {}", stderr(&made));
    let token = stdout(&made).trim().to_owned();
    let accepted = weft(&["peer", "accept", "--name", name, &token, "--control", &dc1.addr]);
    assert!(accepted.status.success(), "weft peer accept: {}", stderr(&accepted));
    assert!(stdout(&accepted).contains(&format!("established with datacenter {name}")), "{}", stdout(&accepted));
    token
}

/// Who answered a GET of `url` (the demo app's `x-served-by`), if it was answered with 200.
fn served_by(url: &str) -> Option<String> {
    let r = curl(&[url])?;
    (r.status == 200).then(|| r.headers.get("x-served-by").cloned()).flatten()
}

#[test]
fn a_peer_datacenter_takes_over_when_local_instances_die_and_gives_back_when_they_return() {
    let dir = TestDir::new("peering-failover");
    let Exporting { dc1, dc2, remote, gateway: (_gateway, gateway_admin), gateway_addr } = exporting(&dir, "backend");
    let mut local = Instance::start(&dir, &dc1.addr, "backend", "v1", "dc1-backend-0", &[]);
    wait_until(Duration::from_secs(15), "DC1's backend healthy", || dc1.healthy_ids("backend").len() == 1);
    let edge = Edge::start(&dir, &dc1, &["backend"]);
    peer(&dc1, &dc2);

    // DC2's backend appears in DC1 as one endpoint, at DC2's gateway, after DC1's own.
    wait_until(Duration::from_secs(5), "DC1's sidecars see DC2's gateway", || {
        edge.endpoint_addrs("backend").contains(&gateway_addr)
    });
    let services = dc1.api("/api/v1/services").unwrap();
    let backend = services.as_array().unwrap().iter().find(|s| s["name"] == "backend").unwrap().clone();
    assert_eq!(backend["imported"][0]["datacenter"], "dc2", "{backend}");
    assert_eq!(backend["imported"][0]["healthy"], 1, "{backend}");
    let peers = stdout(&weft(&["get", "peers", "--control", &dc1.addr]));
    assert!(peers.contains("dc2") && peers.contains("active") && peers.contains("backend (1/1)"), "{peers}");
    // Local first: every request goes to DC1's instance while it serves.
    for _ in 0..20 {
        assert_eq!(served_by(&edge.url("backend", "/")).as_deref(), Some("dc1-backend-0"));
    }

    // All of DC1's backend instances die under a steady 100 req/s.
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(edge.url("backend", "/"), 100, stop.clone(), Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    for pid in local.app_pids() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    local.proc.kill();
    let moved = wait_until(Duration::from_secs(10), "DC2 answers for DC1", || {
        served_by(&edge.url("backend", "/")).as_deref() == Some("dc2-backend-0")
    });
    eprintln!("requests answered by DC2 {:?} after DC1's instances died", moved);
    // A while on DC2 alone, then DC1's instance comes back and takes its traffic back.
    std::thread::sleep(Duration::from_secs(3));
    let back = Instance::start(&dir, &dc1.addr, "backend", "v1", "dc1-backend-1", &[]);
    let returned = wait_until(Duration::from_secs(15), "traffic back in DC1", || {
        served_by(&edge.url("backend", "/")).as_deref() == Some("dc1-backend-1")
    });
    eprintln!("requests answered by DC1 again {:?} after its new instance started", returned);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let report = load.join().unwrap();
    let since_kill = |at: &Duration| at.saturating_sub(Duration::from_secs(2));
    eprintln!(
        "{} requests, {} failed: {:?}",
        report.ok as usize + report.failed.len(),
        report.failed.len(),
        report.failed.iter().map(|(at, e)| (since_kill(at), e.clone())).collect::<Vec<_>>()
    );
    // The window: requests in flight on the killed instance (the sidecar retries connect
    // failures on another endpoint, DC2's gateway among them). None fails after it.
    let window = Duration::from_millis(500);
    let late: Vec<_> = report.failed.iter().filter(|(at, _)| since_kill(at) > window).collect();
    assert!(late.is_empty(), "requests failed after the failover window: {late:?}");
    assert!(report.ok > 500, "{report:?}");
    let _ = killed_at;
    // DC1's caller labels what DC2 answered with DC2's identity, what DC1 answered with DC1's.
    let edge_metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", edge.admin())]));
    for td in ["dc1.weft", "dc2.weft"] {
        let callee = format!(r#"peer_identity="spiffe://{td}/ns/default/sa/backend""#);
        let n = metric_sum(&edge_metrics, "weft_requests_total", &["direction=\"outbound\"", &callee]);
        assert!(n > 0.0, "no outbound request labelled {callee}:\n{edge_metrics}");
    }
    // The gateway passed TLS through: it counted connections, never an HTTP request.
    let metrics = run("curl", &["-s", &format!("http://127.0.0.1:{gateway_admin}/metrics")]);
    let metrics = stdout(&metrics);
    assert!(metric_sum(&metrics, "weft_tcp_connections_opened_total", &[]) > 0.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, "weft_requests_total", &[]), 0.0, "{metrics}");
    drop((remote, back));
}

#[test]
fn identities_cross_datacenters_as_they_are_and_trust_stops_at_each_trust_domain() {
    let dir = TestDir::new("peering-identity");
    let Exporting { dc1, dc2, remote, gateway: _gateway, .. } = exporting(&dir, "backend");
    // DC1 declares backend but runs no instance of it.
    let declared = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {}\n";
    assert!(apply_yaml(&dir, &dc1.addr, "backend.yaml", declared).status.success());
    let edge = Edge::start(&dir, &dc1, &["backend"]);
    // Before peering, DC1 has no instance of backend: a typed error.
    let before = curl(&[&edge.url("backend", "/")]).unwrap();
    assert_eq!((before.status, before.headers.get("x-weft-error").map(String::as_str)), (503, Some("no-endpoints")));
    peer(&dc1, &dc2);
    wait_until(Duration::from_secs(5), "DC1 reaches DC2's backend", || {
        served_by(&edge.url("backend", "/")).as_deref() == Some("dc2-backend-0")
    });

    // DC2's backend sidecar saw DC1's edge as itself, with DC1's trust domain: the gateway
    // between them never held either end of the TLS session.
    let metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", remote.admin())]));
    let caller = r#"peer_identity="spiffe://dc1.weft/ns/default/sa/edge""#;
    assert!(metric_sum(&metrics, "weft_requests_total", &["direction=\"inbound\"", caller]) > 0.0, "{metrics}");

    // DC2 denies DC1's trust domain: enforced on requests that come through the gateway.
    let deny = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-dc1}
spec:
  service: backend
  action: DENY
  rules:
  - from: [{trustDomains: [dc1.weft]}]
";
    let out = apply_yaml(&dir, &dc2.addr, "deny.yaml", deny);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(5), "DC1 refused by DC2's policy", || {
        curl(&[&edge.url("backend", "/")]).is_some_and(|r| r.status == 403)
    });
    assert!(weft(&["delete", "authorizationpolicy", "no-dc1", "--control", &dc2.addr]).status.success());
    wait_until(Duration::from_secs(5), "DC1 served again", || served_by(&edge.url("backend", "/")).is_some());

    // Each root vouches for its own trust domain only. Client certificates made with each CA's
    // key for each trust domain, presented to DC2's backend sidecar directly:
    let present = |signer: &str, domain: &str| -> bool {
        let cert = client_cert(&dir.path.join(signer).join("ca"), &format!("spiffe://{domain}/ns/default/sa/edge"));
        let (c, k) = (dir.path.join(format!("{signer}-{domain}.pem")), dir.path.join(format!("{signer}-{domain}.key")));
        std::fs::write(&c, cert.0).unwrap();
        std::fs::write(&k, cert.1).unwrap();
        let url = format!("https://127.0.0.1:{}/", remote.inbound);
        let args = ["-s", "-k", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cert"];
        let out = run("curl", &[&args[..], &[c.to_str().unwrap(), "--key", k.to_str().unwrap(), &url]].concat());
        stdout(&out).trim() == "200"
    };
    assert!(present("dc1", "dc1.weft"), "DC1's CA for DC1's identity: trusted by DC2");
    assert!(present("dc2", "dc2.weft"), "DC2's CA for DC2's identity: trusted");
    assert!(!present("dc1", "dc2.weft"), "DC1's CA must not vouch for a DC2 identity");
    assert!(!present("dc2", "dc1.weft"), "DC2's CA must not vouch for a DC1 identity");

    // The peering removed: within a second nothing of DC2 is left in DC1's sidecars, and
    // DC1 (with no backend of its own) answers with a typed error.
    let started = Instant::now();
    assert!(weft(&["peer", "delete", "dc2", "--control", &dc1.addr]).status.success());
    wait_until(Duration::from_secs(1), "DC2's endpoints gone from DC1", || edge.endpoint_addrs("backend").is_empty());
    eprintln!("imported endpoints gone {:?} after the peering was deleted", started.elapsed());
    let after = curl(&[&edge.url("backend", "/")]).unwrap();
    assert_eq!((after.status, after.headers.get("x-weft-error").map(String::as_str)), (503, Some("no-endpoints")));
    // DC2 was told: it shows the peering as ended.
    wait_until(Duration::from_secs(5), "DC2 sees the peering ended", || {
        stdout(&weft(&["get", "peers", "--control", &dc2.addr])).contains("terminated")
    });
}

/// Local mode (`weft control --mesh-gateway-mode local`): DC1's sidecars send their calls to
/// DC2 to DC1's own mesh gateway, at its `--mesh-gateway-local` address, which passes them on,
/// still encrypted, to DC2's gateway. (That DC1's sidecars need no route to DC2 at all is
/// shown on simulated hosts: `the_readme_goes_through_the_local_mesh_gateway`.)
#[test]
fn in_local_mode_calls_to_a_peer_go_through_the_datacenters_own_gateway() {
    let dir = TestDir::new("peering-local");
    let dc1 = datacenter_with(&dir, "dc1", &["--mesh-gateway-mode", "local"]);
    let Exporting { dc1, dc2, remote, gateway: (_dc2_gateway, dc2_admin), gateway_addr } =
        exporting_to(dc1, &dir, "backend");
    let (wan, local) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (mut dc1_gateway, dc1_admin) = mesh_gateway(&dir, &dc1, "dc1-gateway", &wan, Some(&local));
    let edge = Edge::start(&dir, &dc1, &["backend"]);
    peer(&dc1, &dc2);
    // DC2's backend is reached at DC1's gateway, never at DC2's directly.
    wait_until(Duration::from_secs(5), "DC1's sidecars see DC1's gateway for DC2", || {
        edge.endpoint_addrs("backend") == [local.clone()]
    });
    for _ in 0..20 {
        assert_eq!(served_by(&edge.url("backend", "/")).as_deref(), Some("dc2-backend-0"));
    }
    // Both gateways passed the connections on without reading them; DC2's backend saw DC1's
    // caller as itself.
    for (gateway, admin) in [("DC1's", dc1_admin), ("DC2's", dc2_admin)] {
        let metrics = stdout(&run("curl", &["-s", &format!("http://127.0.0.1:{admin}/metrics")]));
        assert!(metric_sum(&metrics, "weft_tcp_connections_opened_total", &[]) > 0.0, "{gateway}: {metrics}");
        assert_eq!(metric_sum(&metrics, "weft_requests_total", &[]), 0.0, "{gateway}: {metrics}");
    }
    let metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", remote.admin())]));
    let caller = r#"peer_identity="spiffe://dc1.weft/ns/default/sa/edge""#;
    assert!(metric_sum(&metrics, "weft_requests_total", &["direction=\"inbound\"", caller]) >= 20.0, "{metrics}");
    assert!(weft(&["check", "--control", &dc1.addr]).status.success(), "weft check passes in local mode");
    // A Service's own mode wins over the mesh's: `remote` sends backend's callers straight to
    // DC2's gateway; deleted, the mesh's local mode holds again.
    let remote_mode =
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {meshGatewayMode: remote}\n";
    apply_ok(&dir, &dc1.addr, "backend.yaml", remote_mode);
    wait_until(Duration::from_secs(5), "backend's callers straight to DC2", || {
        edge.endpoint_addrs("backend") == [gateway_addr.clone()]
    });
    assert_eq!(served_by(&edge.url("backend", "/")).as_deref(), Some("dc2-backend-0"));
    assert!(weft(&["delete", "service", "backend", "--control", &dc1.addr]).status.success());
    wait_until(Duration::from_secs(5), "back through DC1's gateway", || {
        edge.endpoint_addrs("backend") == [local.clone()]
    });

    // DC1's gateway stopped: DC2 cannot be reached (DC1's sidecars do not go around it), and
    // `weft check` names why.
    dc1_gateway.stop();
    wait_until(Duration::from_secs(10), "no way to DC2 left", || edge.endpoint_addrs("backend").is_empty());
    let after = curl(&[&edge.url("backend", "/")]).unwrap();
    assert_eq!((after.status, after.headers.get("x-weft-error").map(String::as_str)), (503, Some("no-endpoints")));
    let check = weft(&["check", "--control", &dc1.addr]);
    assert!(!check.status.success(), "{}", stdout(&check));
    assert!(stdout(&check).contains("no mesh gateway serves a --mesh-gateway-local address"), "{}", stdout(&check));
}

/// Retries and outlier ejection act across datacenters as within one: DC2's backend answers
/// every request with 500, so DC1's caller ejects DC2's gateway (it stands for DC2's
/// instances) and DC3, next in the service's failover order, takes the traffic.
#[test]
fn retries_and_outlier_ejection_work_across_datacenters() {
    let dir = TestDir::new("peering-outlier");
    let dc1 = datacenter(&dir, "dc1");
    let mut far = Vec::new();
    for (dc, fail) in [("dc2", "100"), ("dc3", "0")] {
        let control = datacenter(&dir, dc);
        let id = format!("{dc}-backend-0");
        let env = [("WEFT_DEMO_FAIL_PERCENT", fail)];
        let instance = Instance::start_env(&dir, &control.addr, "backend", "v1", &id, &[], &env);
        let addr = format!("127.0.0.1:{}", free_port());
        let gateway = mesh_gateway(&dir, &control, &format!("{dc}-gateway"), &addr, None);
        assert!(apply_yaml(&dir, &control.addr, "export.yaml", EXPORT).status.success());
        wait_until(Duration::from_secs(15), "backend healthy", || control.healthy_ids("backend").len() == 1);
        peer_as(&dc1, &control, dc);
        far.push((control, instance, gateway, addr));
    }
    let policy = "apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend}
spec: {failover: [dc2, dc3]}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend}
spec:
  targetRef: {name: backend}
  retry: {attempts: 2, retryOn: [5xx]}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 60s, maxEjectionPercent: 50}
";
    let out = apply_yaml(&dir, &dc1.addr, "backend.yaml", policy);
    assert!(out.status.success(), "{}", stderr(&out));
    let edge = Edge::start(&dir, &dc1, &["backend"]);
    let mut gateways: Vec<String> = far.iter().map(|f| f.3.clone()).collect();
    gateways.sort();
    wait_until(Duration::from_secs(10), "both peers' gateways at DC1's caller", || {
        let mut found = edge.endpoint_addrs("backend");
        found.sort();
        found == gateways
    });
    let answers: Vec<Option<String>> = (0..20).map(|_| served_by(&edge.url("backend", "/"))).collect();
    eprintln!("who answered, in order: {answers:?}");
    // DC2 first (the failover order): its three 500s in a row eject its gateway, within the
    // first request's attempts; from then on DC3 answers every request.
    assert!(answers[1..].iter().all(|a| a.as_deref() == Some("dc3-backend-0")), "{answers:?}");
    let metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", edge.admin())]));
    assert!(metric_sum(&metrics, "weft_outlier_ejections_total", &[]) >= 1.0, "{metrics}");
    assert!(metric_sum(&metrics, "weft_request_retries_total", &["dst_service=\"backend\""]) >= 2.0, "{metrics}");
    // DC2's backend did see the requests that failed there (through its gateway).
    let dc2_metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", far[0].1.admin())]));
    let failed = metric_sum(&dc2_metrics, "weft_requests_total", &["direction=\"inbound\"", "code=\"500\""]);
    assert!(failed >= 3.0, "{dc2_metrics}");
}

/// A client certificate (PEM) and key for `id`, signed with the root in `ca_dir`.
fn client_cert(ca_dir: &std::path::Path, id: &str) -> (String, String) {
    let root_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("root.key")).unwrap()).unwrap();
    let root_pem = std::fs::read_to_string(ca_dir.join("root.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The README's control planes on the simulated hosts: DC1's by `dc1`'s block, DC2's by its
/// step 1 read for DC2 (10.0.0.2, dc2); once both answer.
fn control_planes(
    dir: &TestDir,
    fabric: &weft_tests::hosts::Fabric,
    dc1: &mut weft_tests::hosts::Shell,
    dc1_block: &str,
    dc2: &mut weft_tests::hosts::Shell,
    step1: &str,
) {
    dc1.run_block(dir, fabric, dc1_block);
    dc2.run_block(dir, fabric, &step1.replace("10.0.0.1", "10.0.0.2").replace("dc1", "dc2"));
    for (shell, addr) in [(&*dc1, "10.99.0.1:15010"), (&*dc2, "10.99.0.2:15010")] {
        wait_until(Duration::from_secs(15), "control plane up", || {
            shell.command(fabric, &format!("weft get services --control {addr}")).output().unwrap().status.success()
        });
    }
}

/// The README's "Two datacenters" as written: its blocks, line by line, on two simulated
/// hosts (network namespaces on a switch: 10.99.0.1 for DC1's 10.0.0.1, 10.99.0.2 for DC2's
/// 10.0.0.2), each with a directory and `HOME` of its own.
#[test]
fn the_readme_peers_two_datacenters() {
    let Some(fabric) = weft_tests::hosts::Fabric::new(&format!("peer{}", std::process::id() % 1000), 2) else {
        return;
    };
    // 10 ms each way on every host's link: 20 ms between the datacenters, as on a WAN, where
    // the kernel has netem (sch_netem); where it has not, said, and the hosts are not delayed.
    let mut delayed = true;
    for host in &fabric.hosts {
        let out = host.run("tc", &["qdisc", "add", "dev", "fab", "root", "netem", "delay", "10ms"]);
        if !out.status.success() {
            assert!(stderr(&out).contains("unknown"), "tc netem: {}", stderr(&out));
            eprintln!(
                "NOTE: this kernel has no netem ({}); the two datacenters are not 20 ms apart",
                stderr(&out).trim()
            );
            delayed = false;
            break;
        }
    }
    let dir = TestDir::new("peering-readme");
    let blocks = weft_tests::hosts::readme_blocks("Two datacenters", "sh");
    let yaml = weft_tests::hosts::readme_blocks("Two datacenters", "yaml");
    assert_eq!((blocks.len(), yaml.len()), (6, 2), "the section's six steps, its export.yaml and two-dcs.yaml");
    assert_eq!(yaml[0], EXPORT, "the tests' ExportedServices is the README's");
    let mut dc1 = weft_tests::hosts::Shell::new(1, dir.path.join("dc1"));
    let mut dc2 = weft_tests::hosts::Shell::new(2, dir.path.join("dc2"));
    control_planes(&dir, &fabric, &mut dc1, &blocks[0], &mut dc2, &blocks[0]);
    std::fs::write(dc2.home.join("export.yaml"), &yaml[0]).unwrap();
    dc2.run_block(&dir, &fabric, &blocks[1]);
    std::fs::copy(dc2.home.join("dc1.token"), dc1.home.join("dc1.token")).unwrap();
    let said = dc1.run_block(&dir, &fabric, &blocks[2]);
    assert!(said[1].contains("hello from backend"), "DC2's backend answered DC1: {said:?}");
    // A call across takes the WAN's round trip (a new connection: two, with TLS 1.3's).
    let timed =
        dc1.command(&fabric, "curl -s -o /dev/null -w '%{time_total}' http://127.0.0.1:18080/").output().unwrap();
    let took: f64 = stdout(&timed).trim().parse().unwrap_or(0.0);
    eprintln!("a call from DC1 to DC2's backend (20 ms apart: {delayed}): {:.1} ms", took * 1000.0);
    assert!(!delayed || took >= 0.020, "the call crossed the 20 ms link: {took}s");
    let peers = &said[2];
    eprintln!("DC1's weft get peers:\n{peers}");
    assert!(peers.contains("dc2") && peers.contains("active") && peers.contains("backend (1/1)"), "{peers}");
}

/// The README's local mode as written: DC1's sidecars (host 1) have no way to DC2 (host 2)
/// but through DC1's mesh gateway on host 3. The section's steps for local mode (its blocks 4
/// to 6), then its steps 2 and 3 for DC2 and the call.
#[test]
fn the_readme_goes_through_the_local_mesh_gateway() {
    let Some(fabric) = weft_tests::hosts::Fabric::new(&format!("lpeer{}", std::process::id() % 1000), 3) else {
        return;
    };
    // Host 1 cannot open a connection to DC2's gateway port: only host 3 can.
    let cut = fabric.hosts[0]
        .run("iptables", &["-A", "OUTPUT", "-d", "10.99.0.2", "-p", "tcp", "--dport", "15443", "-j", "REJECT"]);
    assert!(cut.status.success(), "iptables in host 1's namespace: {}", stderr(&cut));
    let dir = TestDir::new("peering-readme-local");
    let blocks = weft_tests::hosts::readme_blocks("Two datacenters", "sh");
    let yaml = weft_tests::hosts::readme_blocks("Two datacenters", "yaml");
    assert!(
        blocks[3].contains("--mesh-gateway-mode local") && blocks[5].contains("--mesh-gateway-local"),
        "{blocks:?}"
    );
    let mut dc1 = weft_tests::hosts::Shell::new(1, dir.path.join("dc1"));
    let mut dc2 = weft_tests::hosts::Shell::new(2, dir.path.join("dc2"));
    let mut gw = weft_tests::hosts::Shell::new(3, dir.path.join("dc1-gateway"));
    control_planes(&dir, &fabric, &mut dc1, &blocks[3], &mut dc2, &blocks[0]);
    dc1.run_block(&dir, &fabric, &blocks[4]);
    for file in ["gateway.token", "mesh-root.pem"] {
        std::fs::copy(dc1.home.join(file), gw.home.join(file)).unwrap();
    }
    gw.run_block(&dir, &fabric, &blocks[5]);
    std::fs::write(dc2.home.join("export.yaml"), &yaml[0]).unwrap();
    dc2.run_block(&dir, &fabric, &blocks[1]);
    // Now DC2's gateway listens: host 3 reaches it, host 1 does not.
    let connects = |host: usize| {
        let probe = "exec 3<>/dev/tcp/10.99.0.2/15443";
        fabric.hosts[host - 1].run("timeout", &["5", "bash", "-c", probe]).status.success()
    };
    wait_until(Duration::from_secs(10), "DC2's gateway reachable from host 3", || connects(3));
    assert!(!connects(1), "host 1 must have no way to DC2's gateway");
    std::fs::copy(dc2.home.join("dc1.token"), dc1.home.join("dc1.token")).unwrap();
    let said = dc1.run_block(&dir, &fabric, &blocks[2]);
    assert!(said[1].contains("hello from backend"), "DC2's backend answered DC1 through DC1's gateway: {said:?}");
    let services = dc1.command(&fabric, "weft get services").output().unwrap();
    assert!(stdout(&services).contains("dc2"), "{}", stdout(&services));
    let check = dc1.command(&fabric, "weft check").output().unwrap();
    assert!(stdout(&check).contains("mesh gateways serve this datacenter's sidecars"), "{}", stdout(&check));
}

/// A peering outlives restarts of either control plane: each keeps it (and the peer's last
/// state) in its store, the exchange resumes by itself, and traffic across never stops.
#[test]
fn a_peering_survives_restarts_of_either_control_plane() {
    let dir = TestDir::new("peering-restart");
    let Exporting { mut dc1, mut dc2, remote: _remote, gateway: _gateway, gateway_addr } = exporting(&dir, "backend");
    let edge = Edge::start(&dir, &dc1, &["backend"]);
    peer(&dc1, &dc2);
    let answered = || served_by(&edge.url("backend", "/")).as_deref() == Some("dc2-backend-0");
    wait_until(Duration::from_secs(5), "DC1 reaches DC2's backend", answered);
    let peers_of = |c: &Control| stdout(&weft(&["get", "peers", "--control", &c.addr]));

    for restarted in ["dc1", "dc2"] {
        let stop = Arc::new(AtomicBool::new(false));
        let load = steady_load(edge.url("backend", "/"), 50, stop.clone(), Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(500));
        let c = if restarted == "dc1" { &mut dc1 } else { &mut dc2 };
        c.proc.kill();
        std::thread::sleep(Duration::from_secs(1));
        let flags = ["--datacenter", restarted, "--trust-domain", &format!("{restarted}.weft")];
        *c = Control::start_at_with(&dir, &c.addr.clone(), dir.path.join(restarted), &flags);
        for side in [&dc1, &dc2] {
            wait_until(Duration::from_secs(15), "the peering active again", || {
                let p = peers_of(side);
                p.contains("active") && (side.addr != dc1.addr || p.contains("backend (1/1)"))
            });
        }
        wait_until(Duration::from_secs(10), "DC1's edge reconnected", || {
            edge.endpoint_addrs("backend").contains(&gateway_addr)
        });
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let report = load.join().unwrap();
        eprintln!("{restarted}'s control plane restarted: {} requests, failed {:?}", report.ok, report.failed);
        assert!(report.failed.is_empty(), "{restarted} restarted: {:?}", report.failed);
        assert!(answered());
    }
}

/// What can go wrong when peering, each refused (or shown) with its reason, changing nothing.
#[test]
fn peering_mistakes_are_named() {
    let dir = TestDir::new("peering-mistakes");
    let dc1 = datacenter(&dir, "dc1");
    let mut dc2 = datacenter(&dir, "dc2");
    let accept = |name: &str, token: &str| weft(&["peer", "accept", "--name", name, token, "--control", &dc1.addr]);
    let create = |c: &Control, name: &str, ttl: &str| {
        let out = weft(&["peer", "create", name, "--ttl", ttl, "--control", &c.addr]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    let refused = |out: std::process::Output, why: &str| {
        assert!(!out.status.success() && stderr(&out).contains(why), "expected {why:?}: {}", stderr(&out));
    };
    refused(accept("dc2", "not-a-token"), "not what `weft peer create` prints");
    let short = create(&dc2, "dc1", "1s");
    std::thread::sleep(Duration::from_millis(2100));
    refused(accept("dc2", &short), "expired");
    refused(weft(&["peer", "create", "dc1", "--control", &dc2.addr]), "exists");
    // A datacenter with DC1's own trust domain cannot be a peer: its identities would be DC1's.
    let addr = format!("127.0.0.1:{}", free_port());
    let twin = Control::start_at_with(&dir, &addr, dir.path.join("twin"), &["--trust-domain", "dc1.weft"]);
    refused(accept("twin", &create(&twin, "dc1", "1h")), "trust domains of their own");
    // A peer speaks for the trust domain it peered with, and never for this one's: a fake
    // acceptor, by hand, with a token of DC1's.
    let token: serde_json::Value = {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(create(&dc1, "fake", "1h")).unwrap();
        serde_json::from_slice(&raw).unwrap()
    };
    let establish = |td: &str| {
        let body = serde_json::json!({"secret": token["secret"], "datacenter": "dc9", "trustDomain": td});
        dc1.call("POST", "/api/v1/peering/establish", Some(&body.to_string()), None)
    };
    let (status, answer) = establish("dc1.weft");
    assert!(status == 400 && answer["error"].as_str().unwrap().contains("this datacenter's own"), "{answer}");
    let (status, answer) = establish("dc9.weft");
    assert_eq!(status, 200, "{answer}");
    let secret = answer["streamSecret"].as_str().unwrap().to_owned();
    let exchange = |td: &str| {
        let state = serde_json::json!({"datacenter": "dc9", "trustDomain": td, "namespace": "default",
            "roots": "", "gateways": [], "services": []});
        let body = serde_json::json!({"state": state});
        dc1.call("POST", "/api/v1/peering/exchange", Some(&body.to_string()), Some(&secret))
    };
    let (status, answer) = exchange("dc2.weft");
    assert!(status == 400 && answer["error"].as_str().unwrap().contains("established with trust domain"), "{answer}");
    assert_eq!(exchange("dc9.weft").0, 200);
    assert_eq!(establish("dc9.weft").0, 401, "the token's secret was for one use");
    assert!(weft(&["peer", "delete", "fake", "--control", &dc1.addr]).status.success());
    // A peer that cannot be reached when its token is accepted.
    assert!(weft(&["peer", "delete", "dc1", "--control", &dc2.addr]).status.success());
    let token = create(&dc2, "dc1", "1h");
    dc2.proc.kill();
    refused(accept("dc2", &token), "cannot reach");
    assert!(stdout(&weft(&["get", "peers", "--control", &dc1.addr])).lines().count() <= 1, "nothing was stored");
    // Established, then the peer goes away: shown as unreachable, with why.
    dc2 = Control::start_at_with(
        &dir,
        &dc2.addr.clone(),
        dir.path.join("dc2"),
        &["--datacenter", "dc2", "--trust-domain", "dc2.weft"],
    );
    assert!(accept("dc2", &token).status.success());
    dc2.proc.kill();
    wait_until(Duration::from_secs(10), "the peering shown unreachable", || {
        let peers = stdout(&weft(&["get", "peers", "--control", &dc1.addr]));
        peers.contains("unreachable") && peers.contains("cannot reach")
    });
    let check = weft(&["check", "--control", &dc1.addr]);
    let said = stdout(&check);
    assert!(
        !check.status.success() && said.contains("peering dc2 is active") && said.contains("cannot reach"),
        "{said}"
    );
}

/// `weft up -f two-dcs.yaml`, the README's file (on free ports): two datacenters peered on
/// this machine; DC1's frontend calls DC1's backend, and DC2's once DC1's is killed.
#[test]
fn weft_up_runs_two_peered_datacenters() {
    two_datacenters_from_the_readme(false);
}

/// The same file with DC1 in local mode: `control.meshGatewayMode: local` and a mesh gateway
/// of DC1's own with `meshGatewayLocal`, which DC1's frontend reaches DC2 through.
#[test]
fn weft_up_runs_two_peered_datacenters_in_local_mode() {
    two_datacenters_from_the_readme(true);
}

fn two_datacenters_from_the_readme(local: bool) {
    let dir = TestDir::new(if local { "peering-up-local" } else { "peering-up" });
    let yaml = weft_tests::hosts::readme_blocks("Two datacenters", "yaml");
    let mut file = yaml.iter().find(|b| b.contains("datacenters:")).expect("README: two-dcs.yaml").clone();
    let dc1_local = free_port();
    if local {
        let control = "    control: {listen: 127.0.0.1:15010}\n";
        assert_eq!(file.matches(control).count(), 1, "{file}");
        let gateway =
            format!("    meshGateway: 127.0.0.1:{}\n    meshGatewayLocal: 127.0.0.1:{dc1_local}\n", free_port());
        let local_mode = "    control: {listen: 127.0.0.1:15010, meshGatewayMode: local}\n";
        file = file.replace(control, &format!("{local_mode}{gateway}"));
    }
    let (control1, front) = (free_port(), free_port());
    let ports =
        [("15010", control1), ("15020", free_port()), ("8080", front), ("9001", free_port()), ("15443", free_port())];
    for (fixed, port) in ports {
        file = file
            .replace(&format!(":{fixed}"), &format!(":{port}"))
            .replace(&format!(": {fixed}}}"), &format!(": {port}}}"));
    }
    let path = dir.path.join("two-dcs.yaml");
    std::fs::write(&path, &file).unwrap();
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.args(["up", "-f", path.to_str().unwrap()]);
    let up = Proc::spawn(&dir, "up", &mut cmd);
    wait_until(Duration::from_secs(60), "both datacenters up and peered", || {
        log_says(&dir, "up", "weft datacenters are up and peered", "dc1, dc2")
    });
    let url = format!("http://127.0.0.1:{front}/");
    let upstream = || curl(&[&url]).filter(|r| r.status == 200).map(|r| r.body).unwrap_or_default();
    assert!(upstream().contains("upstream (200 OK): hello from backend v1"), "{}", upstream());
    // DC1's backend killed (its sidecar, `weft run`, and its app): DC2's answers.
    let cmdline =
        |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
    let backend = up.children().into_iter().find(|p| cmdline(*p).contains("--id backend-v1-0")).expect("DC1's backend");
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    };
    let app: Vec<i32> = std::fs::read_to_string(format!("/proc/{backend}/task/{backend}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    kill(backend);
    app.into_iter().for_each(kill);
    wait_until(Duration::from_secs(10), "DC2's backend answers DC1's frontend", || {
        upstream().contains("upstream (200 OK): hello from backend v2")
    });
    let control1 = format!("127.0.0.1:{control1}");
    let peers = stdout(&weft(&["get", "peers", "--control", &control1]));
    eprintln!("{peers}");
    assert!(peers.contains("dc2") && peers.contains("active"), "{peers}");
    // Where DC1's frontend reaches DC2: DC2's gateway, or in local mode DC1's own.
    let frontend = stdout(&weft(&["get", "endpoints", "frontend", "-o", "json", "--control", &control1]));
    let frontend: serde_json::Value = serde_json::from_str(&frontend).unwrap();
    let admin = frontend[0]["registration"]["admin"].as_str().expect("the frontend's admin address").to_owned();
    let via = format!("127.0.0.1:{dc1_local}");
    let endpoints = Edge::endpoint_addrs_at(&admin, "backend");
    assert_eq!(endpoints.contains(&via), local, "DC1's frontend reaches DC2 at {endpoints:?}");
}

/// A route in DC1 may name a service only DC2 runs: an HTTPRoute splitting DC1's `backend`
/// half to DC2's `reports` sends about half of the requests across, through DC2's gateway.
#[test]
fn a_route_splits_to_a_service_of_the_peer() {
    let dir = TestDir::new("peering-split");
    let Exporting { dc1, dc2, remote: _reports, gateway: _gateway, .. } = exporting(&dir, "reports");
    let _local = Instance::start(&dir, &dc1.addr, "backend", "v1", "dc1-backend-0", &[]);
    wait_until(Duration::from_secs(15), "DC1's backend healthy", || dc1.healthy_ids("backend").len() == 1);
    peer(&dc1, &dc2);
    let split = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: half-to-dc2}
spec:
  parentRefs: [{name: backend}]
  rules:
  - backendRefs: [{name: backend, weight: 50}, {name: reports, weight: 50}]
";
    let out = apply_yaml(&dir, &dc1.addr, "split.yaml", split);
    assert!(out.status.success(), "{}", stderr(&out));
    let edge = Edge::start(&dir, &dc1, &["backend"]);
    wait_until(Duration::from_secs(10), "the split reaches DC2", || {
        served_by(&edge.url("backend", "/")).as_deref() == Some("dc2-reports-0")
    });
    let mut across = 0;
    for _ in 0..200 {
        match served_by(&edge.url("backend", "/")).as_deref() {
            Some("dc2-reports-0") => across += 1,
            Some("dc1-backend-0") => {}
            other => panic!("answered by {other:?}"),
        }
    }
    assert!((60..=140).contains(&across), "{across} of 200 went to DC2 (50% asked)");
}
