//! Replicas of the control plane sharing the mesh in etcd (`weft control --store etcd://…`):
//! a real etcd cluster (Debian's etcd-server, three members on loopback) and real replicas.
use std::process::Command;
use std::time::Duration;
use weft_tests::hosts::{Shell, readme_blocks};
use weft_tests::*;

/// An etcd cluster of `n` members on loopback, each with its own data directory.
struct Etcd {
    members: Vec<Proc>,
    /// `etcd://A,B,C` for `--store`.
    url: String,
}

impl Etcd {
    fn start(dir: &TestDir, n: usize) -> Etcd {
        Etcd::start_on(dir, (0..n).map(|_| (free_port(), free_port())).collect())
    }

    /// `etcd://…` for members on these (client, peer) ports.
    fn url_of(ports: &[(u16, u16)]) -> String {
        let endpoints: Vec<String> = ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect();
        format!("etcd://{}", endpoints.join(","))
    }

    /// Members on these (client, peer) ports.
    fn start_on(dir: &TestDir, ports: Vec<(u16, u16)>) -> Etcd {
        let etcd = which("etcd").expect("etcd is not installed: apt-get install etcd-server (scripts/test does)");
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let (client, peer) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
                let mut cmd = Command::new(&etcd);
                cmd.args(["--name", &format!("e{i}"), "--data-dir"]).arg(dir.path.join(format!("etcd-{i}")));
                cmd.args(["--listen-client-urls", &client, "--advertise-client-urls", &client]);
                cmd.args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer]);
                cmd.args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"]);
                cmd.args(["--initial-cluster-token", &format!("weft-test-{}", std::process::id())]);
                Proc::spawn(dir, &format!("etcd-{i}"), &mut cmd)
            })
            .collect();
        let url = Etcd::url_of(&ports);
        let health = ports.iter().map(|(c, _)| format!("http://127.0.0.1:{c}")).collect::<Vec<_>>().join(",");
        wait_until(Duration::from_secs(30), "etcd cluster healthy", || {
            run("etcdctl", &["--endpoints", &health, "endpoint", "health"]).status.success()
        });
        Etcd { members, url }
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// A replica of the control plane on etcd, with its own data directory.
fn replica(dir: &TestDir, etcd: &Etcd, key: &std::path::Path, name: &str) -> Control {
    replica_with(dir, etcd, key, name, &[])
}

fn replica_with(dir: &TestDir, etcd: &Etcd, key: &std::path::Path, name: &str, extra: &[&str]) -> Control {
    let data = dir.path.join(format!("replica-{name}"));
    let addr = format!("127.0.0.1:{}", free_port());
    let key = key.to_str().unwrap();
    let mut flags = vec!["--store", &etcd.url, "--store-key-file", key, "--reconnect-grace", "3s"];
    flags.extend(extra);
    Control::start_at_with(dir, &addr, data, &flags)
}

/// Two replicas share one mesh: the same CA and credentials (the second takes them from etcd,
/// where they are encrypted), the registry (an instance connected to one is reached by a proxy
/// connected to the other, over mutual TLS with certificates from either) and resources (a
/// route applied at one takes effect at proxies of the other within a second). An etcd member
/// killed changes nothing. `weft get replicas` lists both, one the leader. When a replica is
/// killed, a proxy given both replicas moves to the other; an instance whose proxy knows only
/// the killed replica leaves the registry when that replica's lease expires, and comes back,
/// once, with the replica.
#[test]
fn replicas_share_one_mesh_through_etcd() {
    let dir = TestDir::new("ha-share");
    let mut etcd = Etcd::start(&dir, 3);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "5f".repeat(32)).unwrap();
    let a = replica(&dir, &etcd, &key, "a");
    let mut b = replica(&dir, &etcd, &key, "b");
    let read = |c: &Control, f: &str| std::fs::read_to_string(c.data_dir.join(f)).unwrap();
    assert_eq!(read(&a, "ca/root.pem"), read(&b, "ca/root.pem"), "one mesh root");
    assert_eq!(a.admin_token(), b.admin_token(), "one admin credential");
    // Nothing secret in etcd in the clear.
    let endpoints: Vec<String> =
        etcd.url.trim_start_matches("etcd://").split(',').map(|e| format!("http://{e}")).collect();
    let dump = run("etcdctl", &["--endpoints", &endpoints.join(","), "get", "--prefix", "/weft/v1/secrets/"]);
    assert!(dump.status.success(), "{}", stderr(&dump));
    let root_key = read(&a, "ca/root.key");
    let body = root_key.lines().nth(1).unwrap();
    assert!(!stdout(&dump).contains(body) && stdout(&dump).contains("/weft/v1/secrets/ca/root.key"));

    // web's proxy knows both replicas, b first; solo's knows only b.
    let both = format!("{},{}", b.addr, a.addr);
    let web = Instance::start(&dir, &both, "web", "v1", "web-0", &[]);
    let _solo = Instance::start(&dir, &b.addr, "solo", "v1", "solo-0", &[]);
    wait_until(Duration::from_secs(15), "web and solo healthy, seen at replica a", || {
        a.healthy_ids("web") == ["web-0"] && a.healthy_ids("solo") == ["solo-0"]
    });
    let edge = Edge::start(&dir, &a, &["web"]);
    let url = edge.url("web", "/");
    wait_until(Duration::from_secs(10), "the edge (at a) reaches web (at b)", || {
        curl(&[&url]).is_some_and(|r| r.status == 200)
    });

    // A route applied at b takes effect at the edge, whose replica is a.
    let out = apply_yaml(
        &dir,
        &b.addr,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: tagged}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {add: [{name: x-applied-at, value: b}]}\n    backendRefs: [{name: web}]\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let took = wait_until(Duration::from_secs(5), "the route in force at a's proxy", || {
        run("curl", &["-s", "-D", "-", "-o", "/dev/null", &url]).stdout.windows(14).any(|w| w == b"x-applied-at: ")
    });
    assert!(took < Duration::from_secs(1), "a route applied at one replica took {took:?} to reach a proxy of another");
    let routes = stdout(&weft(&["get", "httproutes", "--control", &a.addr]));
    assert!(routes.contains("tagged"), "replica a lists the route applied at b:\n{routes}");

    // An etcd member dies: the mesh goes on (a change at a reaches b through the others).
    etcd.members[0].kill();
    let out = weft(&["delete", "httproute", "tagged", "--control", &a.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(5), "the route gone at b too", || {
        let out = weft(&["get", "httproutes", "--control", &b.addr]);
        out.status.success() && !stdout(&out).contains("tagged")
    });

    // `weft get replicas`: both, one of them the leader, and the proxies at each.
    wait_until(Duration::from_secs(5), "two replicas, one leader, web and solo at b", || {
        let r = replicas(&a);
        let at_b = r.iter().find(|x| x["address"] == b.addr.as_str()).map(|x| x["proxies"].as_u64());
        r.len() == 2 && r.iter().filter(|x| x["leader"] == true).count() == 1 && at_b == Some(Some(2))
    });
    let table = stdout(&weft(&["get", "replicas", "--control", &a.addr]));
    assert!(table.starts_with("REPLICA") && table.contains(&a.addr) && table.contains(&b.addr), "{table}");

    // b dies: web's proxy (given both) moves to a; solo's has nowhere to go, so solo leaves
    // with b's lease (3 s); web stays.
    b.proc.kill();
    wait_until(Duration::from_secs(10), "web's proxy connected to a", || {
        log_says(&dir, "web-0", "connected to control plane", &a.addr)
    });
    wait_until(Duration::from_secs(10), "solo gone with b's lease", || a.endpoints("solo").is_empty());
    assert_eq!(a.healthy_ids("web"), ["web-0"], "web stayed registered");
    wait_until(Duration::from_secs(10), "a alone, and the leader", || {
        let r = replicas(&a);
        r.len() == 1 && r[0]["address"] == a.addr.as_str() && r[0]["leader"] == true
    });

    // b is back: solo registers again, once.
    let b = Control::start_at_with(
        &dir,
        &b.addr,
        b.data_dir.clone(),
        &["--store", &etcd.url, "--store-key-file", key.to_str().unwrap(), "--reconnect-grace", "3s"],
    );
    wait_until(Duration::from_secs(20), "solo back, through b", || a.healthy_ids("solo") == ["solo-0"]);
    assert_eq!(b.endpoints("solo").len(), 1, "solo once");
    assert_eq!(b.endpoints("web").len(), 1, "web once");
    drop(web);
    drop(etcd.members);
}

/// The issue's scenario: three etcd members, three replicas, proxies spread over them (most
/// on b), a steady 200 requests a second through sidecars. b is killed: not one request
/// fails, each of b's proxies is at another replica within 5 s, and a route applied at a
/// survivor is in force at a proxy that moved within 1 s. An etcd member is killed: nothing
/// changes. b starts again and rejoins: three replicas, each instance once.
#[test]
fn three_replicas_lose_no_request_when_one_dies() {
    let dir = TestDir::new("ha-three");
    let mut etcd = Etcd::start(&dir, 3);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "2d".repeat(32)).unwrap();
    let (a, mut b, c) =
        (replica(&dir, &etcd, &key, "a"), replica(&dir, &etcd, &key, "b"), replica(&dir, &etcd, &key, "c"));
    let order =
        |first: &Control, second: &Control, third: &Control| format!("{},{},{}", first.addr, second.addr, third.addr);
    // The edge and web-0 on b, web-1 on a, web-2 on c.
    let _web: Vec<Instance> = [order(&b, &c, &a), order(&a, &b, &c), order(&c, &a, &b)]
        .iter()
        .enumerate()
        .map(|(i, at)| Instance::start(&dir, at, "web", "v1", &format!("web-{i}"), &[]))
        .collect();
    let edge = Edge::start_via(&dir, &order(&b, &a, &c), "edge-0", &["web"]);
    wait_until(Duration::from_secs(20), "three web instances at the edge", || edge.endpoint_addrs("web").len() == 3);
    wait_until(Duration::from_secs(10), "proxies spread: two on b, one on a and c", || {
        let at =
            |x: &Control| replicas(&a).iter().find(|r| r["address"] == x.addr.as_str()).map(|r| r["proxies"].as_u64());
        at(&b) == Some(Some(2)) && at(&a) == Some(Some(1)) && at(&c) == Some(Some(1))
    });

    let url = edge.url("web", "/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = steady_load(url.clone(), 200, stop.clone(), Duration::from_secs(120));
    let loaded = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));

    b.proc.kill();
    let killed = std::time::Instant::now();
    wait_until(Duration::from_secs(15), "b's proxies at other replicas", || {
        log_says(&dir, "edge", "connected to control plane", &a.addr)
            && log_says(&dir, "web-0", "connected to control plane", &c.addr)
    });
    let moved = killed.elapsed();
    assert!(moved < Duration::from_secs(5), "b's proxies took {moved:?} to reach other replicas");

    // A route applied at c is in force at the edge (now a's) within a second.
    let out = apply_yaml(
        &dir,
        &c.addr,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: tagged}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {add: [{name: x-applied-at, value: c}]}\n    backendRefs: [{name: web}]\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tagged = || {
        run("curl", &["-s", "-D", "-", "-o", "/dev/null", &url]).stdout.windows(16).any(|w| w == b"x-applied-at: c\r")
    };
    let took = wait_until(Duration::from_secs(5), "the route in force at the edge", tagged);
    assert!(took < Duration::from_secs(1), "a route applied at c took {took:?} to reach a proxy of a");

    // An etcd member dies: nothing changes (a change at a is in force, through the others).
    etcd.members[1].kill();
    let out = weft(&["delete", "httproute", "tagged", "--control", &a.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(5), "the route gone at the edge", || !tagged());

    // b comes back: three replicas, each instance once.
    let b = Control::start_at_with(
        &dir,
        &b.addr,
        b.data_dir.clone(),
        &["--store", &etcd.url, "--store-key-file", key.to_str().unwrap(), "--reconnect-grace", "3s"],
    );
    wait_until(Duration::from_secs(15), "three replicas again", || replicas(&a).len() == 3);
    std::thread::sleep(Duration::from_secs(4)); // past b's old lease
    for at in [&a, &b, &c] {
        let mut ids = at.healthy_ids("web");
        ids.sort();
        assert_eq!(ids, ["web-0", "web-1", "web-2"], "web's instances at {}", at.addr);
        assert_eq!(at.endpoints("web").len(), 3, "no duplicate at {}", at.addr);
    }
    assert_eq!(edge.endpoint_addrs("web").len(), 3, "the edge holds three");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (report, secs) = (load.join().unwrap(), loaded.elapsed().as_secs_f64());
    eprintln!(
        "measured: b's proxies moved in {moved:?}, a route at c in force at a's proxy in {took:?}, {} requests in {secs:.1} s",
        report.ok
    );
    assert!(report.ok as f64 > 190.0 * secs, "{} requests in {secs:.1} s: not a steady 200 a second", report.ok);
    report.assert_none_failed();
    drop(etcd.members);
}

/// `weft ca rotate` at one replica is the whole mesh's: the other replica trusts the new root
/// and signs with it too (its proxies' certificates are re-issued from it), and traffic between
/// proxies of the two replicas goes on.
#[test]
fn a_root_rotation_at_one_replica_reaches_every_replica() {
    let dir = TestDir::new("ha-rotate");
    let etcd = Etcd::start(&dir, 1);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "6e".repeat(32)).unwrap();
    let a = replica(&dir, &etcd, &key, "a");
    let b = replica(&dir, &etcd, &key, "b");
    let _web = Instance::start(&dir, &b.addr, "web", "v1", "web-0", &[]);
    wait_until(Duration::from_secs(15), "web healthy", || a.healthy_ids("web") == ["web-0"]);
    let edge = Edge::start(&dir, &a, &["web"]);
    let url = edge.url("web", "/");
    wait_until(Duration::from_secs(10), "the edge reaches web", || curl(&[&url]).is_some_and(|r| r.status == 200));
    let out = weft(&["ca", "rotate", "--overlap", "1h", "--control", &a.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new_root = stdout(&out).split_whitespace().nth(2).unwrap_or_default().to_owned();
    assert!(!new_root.is_empty(), "{}", stdout(&out));
    wait_until(Duration::from_secs(10), "b signs with the new root", || {
        b.api("/api/v1/ca").is_some_and(|v| v["rootFingerprint"] == new_root.as_str())
    });
    wait_until(Duration::from_secs(15), "web's certificate re-issued by b from the new root", || {
        stdout(&weft(&["get", "certs", "--control", &b.addr]))
            .lines()
            .any(|l| l.contains("web-0") && l.contains(&new_root))
    });
    let bundle =
        b.api("/api/v1/ca").map(|v| v["bundle"].as_str().unwrap_or_default().matches("BEGIN CERTIFICATE").count());
    assert_eq!(bundle, Some(2), "b's bundle: the new root and the retiring one");
    assert_eq!(curl(&[&url]).map(|r| r.status), Some(200), "traffic across the two replicas' proxies");
    let again = weft(&["ca", "rotate", "--overlap", "1h", "--control", &b.addr]);
    assert!(again.status.success(), "a second rotation, at the other replica: {}", stderr(&again));
    drop(etcd.members);
}

/// `weft get replicas -o json` at `at`.
fn replicas(at: &Control) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(&weft(&["get", "replicas", "-o", "json", "--control", &at.addr]).stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Certificates of one minute keep renewing for three minutes under load while a replica
/// dies, and a root rotation started at that replica, stuck waiting for a proxy that does
/// not answer (stopped), is finished by the others: they sign with the new root, every
/// proxy's certificate is re-issued from it, and not one request fails.
#[test]
fn certificates_renew_and_a_rotation_completes_through_a_replica_death() {
    let dir = TestDir::new("ha-renew");
    let etcd = Etcd::start(&dir, 1);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "4b".repeat(32)).unwrap();
    let start = |name: &str| replica_with(&dir, &etcd, &key, name, &["--cert-ttl", "1m"]);
    let (mut a, b, c) = (start("a"), start("b"), start("c"));
    let list = |x: &[&Control]| x.iter().map(|c| c.addr.as_str()).collect::<Vec<_>>().join(",");
    let web0 = Instance::start(&dir, &list(&[&a, &b, &c]), "web", "v1", "web-0", &[]);
    let web1 = Instance::start(&dir, &list(&[&b, &c, &a]), "web", "v1", "web-1", &[]);
    let edge = Edge::start_via(&dir, &list(&[&c, &b, &a]), "edge-0", &["web"]);
    wait_until(Duration::from_secs(20), "two web instances at the edge", || edge.endpoint_addrs("web").len() == 2);
    wait_until(Duration::from_secs(10), "web answers", || {
        curl(&[&edge.url("web", "/")]).is_some_and(|r| r.status == 200)
    });
    let admins = [web0.admin(), web1.admin(), edge.admin()];
    let renewals = || -> Vec<u64> {
        admins.iter().map(|a| get_json(a, "/certs").and_then(|v| v["renewals"].as_u64()).unwrap_or(0)).collect()
    };
    let before = renewals();

    let url = edge.url("web", "/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = steady_load(url, 100, stop.clone(), Duration::from_secs(240));
    let loaded = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(40));

    // A proxy of a's stops answering; a rotation started at a waits for it.
    let admin = free_port();
    let mut cmd = Command::new(weft_bin());
    cmd.args(["proxy", "--control", &a.addr, "--id", "lag-0", "--admin", &format!("127.0.0.1:{admin}")]);
    cmd.env("WEFT_TOKEN", join_token(&a.addr, "lag"));
    let lag = Proc::spawn(&dir, "lag-0", &mut cmd);
    wait_until(Duration::from_secs(15), "lag-0 ready", || {
        run("curl", &["-s", "-f", &format!("http://127.0.0.1:{admin}/ready")]).status.success()
    });
    lag.signal(nix::sys::signal::Signal::SIGSTOP);
    let old_root = a.api("/api/v1/ca").map(|v| v["rootFingerprint"].to_string()).unwrap();
    let at_a = a.addr.clone();
    let rotate = std::thread::spawn(move || weft(&["ca", "rotate", "--overlap", "1h", "--control", &at_a]));
    wait_until(Duration::from_secs(5), "b trusts the new root", || {
        b.api("/api/v1/ca")
            .is_some_and(|v| v["bundle"].as_str().unwrap_or_default().matches("BEGIN CERTIFICATE").count() == 2)
    });
    assert_eq!(
        a.api("/api/v1/ca").map(|v| v["rootFingerprint"].to_string()),
        Some(old_root.clone()),
        "mid-rotation: the new root does not sign yet"
    );
    a.proc.kill();
    let out = rotate.join().unwrap();
    assert!(!out.status.success(), "the rotation could not have finished at a: {}", stdout(&out));

    // b and c finish it: both sign with the new root, and re-issue every certificate from it.
    let root_of = |x: &Control| x.api("/api/v1/ca").map(|v| v["rootFingerprint"].to_string());
    let finished = wait_until(Duration::from_secs(30), "b and c sign with the new root", || {
        let (rb, rc) = (root_of(&b), root_of(&c));
        rb.is_some() && rb != Some(old_root.clone()) && rb == rc
    });
    let new_root = root_of(&b).unwrap().trim_matches('"').to_owned();
    wait_until(Duration::from_secs(30), "every proxy's certificate from the new root", || {
        let issued = format!(
            "{}{}",
            stdout(&weft(&["get", "certs", "--control", &b.addr])),
            stdout(&weft(&["get", "certs", "--control", &c.addr]))
        );
        ["web-0", "web-1", "edge-0"].iter().all(|id| issued.lines().any(|l| l.contains(id) && l.contains(&new_root)))
    });

    // Three minutes of one-minute certificates, renewed through it all.
    std::thread::sleep(Duration::from_secs(180).saturating_sub(loaded.elapsed()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = load.join().unwrap();
    let after = renewals();
    eprintln!(
        "measured: rotation finished {finished:?} after its replica died; renewals per proxy {before:?} -> {after:?}; {} requests",
        report.ok
    );
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a - b >= 5, "{} renewed {} times in 3 minutes of 1-minute certificates", admins[i], a - b);
    }
    for admin in &admins {
        let status = get_json(admin, "/certs").unwrap();
        assert!(status["renewal_error"].is_null(), "{admin}: {status}");
    }
    report.assert_none_failed();
    assert!(report.ok > 15_000, "{} requests in 3 minutes: not a steady 100 a second", report.ok);
    drop(etcd.members);
}

/// An issuer's keys are read by one replica, the elected one, and reach sidecars of every
/// replica through the store; when that replica dies, the next one elected reads them.
#[test]
fn one_replica_reads_an_issuers_keys_for_all() {
    use weft_tests::jwt::{JwksServer, SigningKey, jwks, unix_now};
    let dir = TestDir::new("ha-jwks");
    let etcd = Etcd::start(&dir, 1);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "3c".repeat(32)).unwrap();
    let mut a = replica(&dir, &etcd, &key, "a");
    wait_until(Duration::from_secs(10), "a elected", || replicas(&a).iter().any(|r| r["leader"] == true));
    let b = replica(&dir, &etcd, &key, "b");
    let (k1, k2, k3) = (SigningKey::new("k1"), SigningKey::new("k2"), SigningKey::new("k3"));
    let issuer = JwksServer::start(jwks(&[&k1]));
    let out = apply_yaml(
        &dir,
        &b.addr,
        "jwt.yaml",
        &format!(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: web-jwt}}\nspec:\n  service: web\n  required: true\n  issuers:\n  - issuer: https://issuer.test\n    jwksUri: http://127.0.0.1:{}/jwks\n    refreshInterval: 2s\n",
            issuer.port
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // web and the edge are b's, which does not lead.
    let _web = Instance::start(&dir, &b.addr, "web", "v1", "web-0", &[]);
    let edge = Edge::start(&dir, &b, &["web"]);
    let url = edge.url("web", "/");
    let with = |k: &SigningKey, kid: &str| {
        let token = k.sign(kid, serde_json::json!({"iss": "https://issuer.test", "sub": "u", "exp": unix_now() + 300}));
        let auth = format!("authorization: Bearer {token}");
        curl(&["-H", &auth, &url]).map(|r| r.status)
    };
    wait_until(Duration::from_secs(15), "web takes k1's tokens", || with(&k1, "k1") == Some(200));
    assert_eq!(curl(&[&url]).map(|r| r.status), Some(401), "a token is required");

    // One reader: a read every 2-3 s (the refresh is checked each second), not one per
    // replica (which would be at least 8 in 12 s).
    let before = issuer.reads();
    std::thread::sleep(Duration::from_secs(12));
    let reads = issuer.reads() - before;
    assert!((2..=7).contains(&reads), "{reads} reads of the JWKS in 12 s at a 2 s refresh, with two replicas");

    // b stands for election all along, quietly (no warning while a leads).
    assert!(!log_says(&dir, &b.proc.name, "cannot stand for election", ""), "b's log warns of its campaign");

    // New keys reach b's sidecars through the store.
    issuer.set(jwks(&[&k2]));
    wait_until(Duration::from_secs(8), "web takes k2's tokens", || with(&k2, "k2") == Some(200));

    // The reader dies: b is elected and reads from then on.
    a.proc.kill();
    wait_until(Duration::from_secs(10), "b elected", || {
        let r = replicas(&b);
        r.len() == 1 && r[0]["leader"] == true
    });
    issuer.set(jwks(&[&k3]));
    wait_until(Duration::from_secs(8), "web takes k3's tokens", || with(&k3, "k3") == Some(200));
    assert_eq!(with(&k1, "k1"), Some(401), "k1 is no longer listed");
    drop(etcd.members);
}

/// Mistakes get one clear line: etcd without a store key, a bad key, an unreachable etcd.
#[test]
fn etcd_store_mistakes_are_named() {
    let dir = TestDir::new("ha-mistakes");
    let run_control = |extra: &[&str]| {
        let mut cmd = Command::new(weft_bin());
        cmd.args(["control", "--listen", &format!("127.0.0.1:{}", free_port()), "--data-dir"]);
        cmd.arg(dir.path.join("data")).args(extra).env_remove("WEFT_STORE_KEY");
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        stderr(&out)
    };
    let e = run_control(&["--store", "etcd://127.0.0.1:1"]);
    assert!(e.contains("needs --store-key-file (or WEFT_STORE_KEY)") && e.contains("openssl rand -hex 32"), "{e}");
    let bad = dir.path.join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let e = run_control(&["--store", "etcd://127.0.0.1:1", "--store-key-file", bad.to_str().unwrap()]);
    assert!(e.contains("the store key must be 64 hexadecimal digits"), "{e}");
    let e = run_control(&["--store", "etcd:/x"]);
    assert!(e.contains("expected `embedded` or etcd://HOST:PORT"), "{e}");
    let good = dir.path.join("good.key");
    std::fs::write(&good, "aa".repeat(32)).unwrap();
    let e = run_control(&[
        "--store",
        &format!("etcd://127.0.0.1:{}", free_port()),
        "--store-key-file",
        good.to_str().unwrap(),
        "--etcd-wait",
        "2s",
    ]);
    assert!(e.contains("cannot reach etcd at 127.0.0.1:") && e.contains("(waited 2s, --etcd-wait)"), "{e}");
}

/// A replica started before etcd (a host booting, its services in any order) waits for it,
/// saying so once, and then serves.
#[test]
fn a_replica_waits_for_etcd_to_start() {
    let dir = TestDir::new("ha-wait");
    let ports = vec![(free_port(), free_port())];
    let url = Etcd::url_of(&ports);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "1f".repeat(32)).unwrap();
    let (addr, xds_plain) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let data_dir = dir.path.join("replica");
    let mut cmd = Command::new(weft_bin());
    cmd.args(["control", "--listen", &addr, "--plaintext-xds", &xds_plain, "--data-dir"]).arg(&data_dir);
    cmd.args(["--store", &url, "--store-key-file", key.to_str().unwrap()]);
    let replica = Control { proc: Proc::spawn(&dir, "replica", &mut cmd), addr, xds_plain, data_dir };
    std::thread::sleep(Duration::from_secs(3));
    let etcd = Etcd::start_on(&dir, ports);
    wait_until(Duration::from_secs(15), "the replica serving", || replica.api("/api/v1/services").is_some());
    let log = std::fs::read_to_string(dir.path.join("replica.log")).unwrap();
    assert_eq!(log.matches("etcd does not answer yet; waiting for it").count(), 1, "said once:\n{log}");
    drop(etcd.members);
}

/// A mesh moves from one machine's embedded store to etcd: `weft store backup` (from the
/// running control plane, and from the stopped one's data directory: the same), `weft store
/// restore` into an empty etcd (refused into one that holds a mesh), then a replica on etcd
/// has the same CA, credentials, resources, virtual IPs and join tokens (a proxy joins with
/// a token issued before the move). Restoring into an empty data directory works the same.
#[test]
fn a_mesh_moves_from_the_embedded_store_to_etcd() {
    let dir = TestDir::new("ha-migrate");
    let mut single = Control::start(&dir);
    let out = apply_yaml(
        &dir,
        &single.addr,
        "mesh.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {mtls: strict}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: moved}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - backendRefs: [{name: web}]\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = join_token(&single.addr, "mover");
    let vip_of = |c: &Control| -> String {
        let v: serde_json::Value =
            serde_json::from_slice(&weft(&["get", "services", "-o", "json", "--control", &c.addr]).stdout)
                .unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "web")
            .map(|s| s["vip"].to_string())
            .unwrap_or_default()
    };
    let vip = vip_of(&single);
    assert!(vip.contains("240.240."), "web's virtual IP: {vip}");
    let root = std::fs::read_to_string(single.data_dir.join("ca/root.pem")).unwrap();

    let online = dir.path.join("online.json");
    let out = weft(&["store", "backup", "-o", online.to_str().unwrap(), "--control", &single.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&online).unwrap().permissions().mode() & 0o777, 0o600, "owner-only");
    assert_eq!(single.proc.stop(), Some(0));
    let offline = dir.path.join("offline.json");
    let out =
        weft(&["store", "backup", "-o", offline.to_str().unwrap(), "--data-dir", single.data_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let parts = |p: &std::path::Path| {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        (v["tables"].clone(), v["secrets"].clone())
    };
    assert_eq!(parts(&online), parts(&offline), "the running control plane's backup and its store's are the same");

    let etcd = Etcd::start(&dir, 1);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "7a".repeat(32)).unwrap();
    let restore = |into: &[&str]| {
        let mut args = vec!["store", "restore", "-i", offline.to_str().unwrap()];
        args.extend(into);
        weft(&args)
    };
    let to_etcd = ["--store", etcd.url.as_str(), "--store-key-file", key.to_str().unwrap()];
    let out = restore(&to_etcd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 2 resources, 1 join tokens"), "{}", stdout(&out));
    let again = restore(&to_etcd);
    assert!(!again.status.success() && stderr(&again).contains("etcd already holds a mesh"), "{}", stderr(&again));

    let r = replica(&dir, &etcd, &key, "r");
    assert_eq!(std::fs::read_to_string(r.data_dir.join("ca/root.pem")).unwrap(), root, "the same CA");
    assert_eq!(vip_of(&r), vip, "the same virtual IP");
    assert!(stdout(&weft(&["get", "httproutes", "--control", &r.addr])).contains("moved"));
    // A proxy joins with the token issued before the move.
    let admin = free_port();
    let mut cmd = Command::new(weft_bin());
    cmd.args(["proxy", "--control", &r.addr, "--id", "mover-0", "--admin", &format!("127.0.0.1:{admin}")]);
    cmd.env("WEFT_TOKEN", &token);
    let _mover = Proc::spawn(&dir, "mover", &mut cmd);
    wait_until(Duration::from_secs(15), "the proxy with the old token ready", || {
        run("curl", &["-s", "-f", &format!("http://127.0.0.1:{admin}/ready")]).status.success()
    });

    // Into an empty data directory, the same.
    let fresh = dir.path.join("fresh");
    let out = restore(&["--data-dir", fresh.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let copy = Control::start_at(&dir, &format!("127.0.0.1:{}", free_port()), fresh.clone());
    assert_eq!(std::fs::read_to_string(fresh.join("ca/root.pem")).unwrap(), root);
    assert_eq!(vip_of(&copy), vip);
    let again = restore(&["--data-dir", fresh.to_str().unwrap()]);
    assert!(stderr(&again).contains("already holds a mesh"), "{}", stderr(&again));
    drop(etcd.members);
}

/// The README's "Run it for real" as written: its shell blocks, line by line, on three
/// simulated hosts (network namespaces on a switch, 10.99.0.1-3 for 10.0.0.1-3), each with a
/// directory and `HOME` of its own; then the first host dies and `hello` still answers.
#[test]
fn the_readme_runs_for_real_on_three_hosts() {
    let Some(fabric) = weft_tests::hosts::Fabric::new(&format!("real{}", std::process::id() % 1000), 3) else {
        return;
    };
    let dir = TestDir::new("ha-real");
    let blocks = readme_blocks("Run it for real", "sh");
    assert_eq!(blocks.len(), 5, "the section's five steps");
    let mut shells: Vec<Shell> = (1..=3).map(|h| Shell::new(h, dir.path.join(format!("host{h}")))).collect();

    shells[0].run_block(&dir, &fabric, &blocks[0]);
    for h in [1, 2] {
        std::fs::copy(shells[0].home.join("store.key"), shells[h].home.join("store.key")).unwrap();
    }
    for shell in shells.iter_mut() {
        shell.run_block(&dir, &fabric, &blocks[1]);
    }
    for shell in shells.iter_mut() {
        shell.run_block(&dir, &fabric, &blocks[2]);
    }
    let list = "10.99.0.1:15010,10.99.0.2:15010,10.99.0.3:15010";
    let replicas = |shell: &Shell| {
        let out = shell.command(&fabric, &format!("weft get replicas --control {list}")).output().unwrap();
        stdout(&out).lines().filter(|l| l.contains(":15010")).count()
    };
    wait_until(Duration::from_secs(30), "three replicas", || replicas(&shells[1]) == 3);
    let said = shells[1].run_block(&dir, &fabric, &blocks[3]);
    assert!(["10.99.0.1", "10.99.0.2", "10.99.0.3"].iter().all(|a| said[0].contains(a)), "{}", said[0]);
    let said = shells[2].run_block(&dir, &fabric, &blocks[4]);
    assert!(said.last().is_some_and(|r| r.contains("hello")), "hello answered: {said:?}");

    // The first host dies: hello answers on, and two replicas remain.
    for p in shells[0].procs.iter_mut() {
        p.kill();
    }
    let call = || {
        let out = shells[2].command(&fabric, "curl -s -f --max-time 5 http://127.0.0.1:18080/").output().unwrap();
        out.status.success() && stdout(&out).contains("hello")
    };
    for _ in 0..20 {
        assert!(call(), "hello stopped answering when a host died");
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_until(Duration::from_secs(30), "two replicas", || replicas(&shells[2]) == 2);
    assert!(call(), "hello answers with two replicas");
}

/// A datacenter whose control plane runs on etcd peers like any other, and the secret of its
/// peering is sealed in etcd under the store key (as the CA's key is), never in the clear.
#[test]
fn a_peering_on_etcd_is_sealed_there() {
    let dir = TestDir::new("ha-peering");
    let etcd = Etcd::start(&dir, 1);
    let key = dir.path.join("store.key");
    std::fs::write(&key, "5f".repeat(32)).unwrap();
    let dc1 = replica_with(&dir, &etcd, &key, "a", &["--datacenter", "dc1", "--trust-domain", "dc1.weft"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let dc2 = Control::start_at_with(
        &dir,
        &addr,
        dir.path.join("dc2"),
        &["--datacenter", "dc2", "--trust-domain", "dc2.weft"],
    );
    let made = weft(&["peer", "create", "dc1", "--control", &dc2.addr]);
    assert!(made.status.success(), "{}", stderr(&made));
    let accepted = weft(&["peer", "accept", "--name", "dc2", stdout(&made).trim(), "--control", &dc1.addr]);
    assert!(accepted.status.success(), "{}", stderr(&accepted));
    wait_until(Duration::from_secs(10), "the peering active on etcd", || {
        stdout(&weft(&["get", "peers", "--control", &dc1.addr])).contains("active")
    });
    let endpoints =
        etcd.url.trim_start_matches("etcd://").split(',').map(|e| format!("http://{e}")).collect::<Vec<_>>();
    let dump = run("etcdctl", &["--endpoints", &endpoints.join(","), "get", "--prefix", "/weft/v1/peers/"]);
    assert!(dump.status.success(), "{}", stderr(&dump));
    let dump = stdout(&dump);
    assert!(dump.contains("/weft/v1/peers/dc2"), "the peering is in etcd: {dump}");
    assert!(!dump.contains("streamSecret") && !dump.contains("dc2.weft"), "a peering in etcd in the clear: {dump}");
}
