//! Integration harness: starts real `weft` processes (control plane, sidecars, demo apps) on
//! 127.0.0.1 with ports picked per test, and drives them with real clients (curl, the gRPC
//! demo client, Python grpcio, raw TCP, WebSocket). Every process is killed by PID when its
//! handle drops; every wait is bounded.
#![forbid(unsafe_code)]

pub mod hosts;
pub mod inprocess;
pub mod jwt;

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `weft` binary under test: `$WEFT_BIN`, or the debug build in `$CARGO_TARGET_DIR`
/// (default: the workspace's `target/`).
pub fn weft_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/weft");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bin weft --bin weft-proxy` first (scripts/test does)",
        p.display()
    );
    p
}

/// Python with grpcio installed: `$WEFT_PYTHON`, or the repository's `.venv`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(p.exists(), "{} is missing: scripts/test creates it with grpcio", p.display());
    p
}

/// This test's CLI credentials file (`WEFT_CONFIG`), given to every process it starts: the
/// control planes it runs record their root and admin credential there, and the CLI and the
/// proxies find them there. nextest runs each test in a process of its own, so tests never
/// share one. A test process cannot remove its own at exit, so each removes those of test
/// processes that have ended.
pub fn credentials_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        const PREFIX: &str = "weft-test-credentials-";
        let dir = std::env::temp_dir();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX)?.strip_suffix(".json")?.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        dir.join(format!("{PREFIX}{}.json", std::process::id()))
    })
}

/// A join token for `service` from the control plane at `control` (through the CLI).
pub fn join_token(control: &str, service: &str) -> String {
    let out = weft(&["token", "create", "--service", service, "--control", control]);
    assert!(out.status.success(), "weft token create failed: {}", stderr(&out));
    stdout(&out).trim().to_owned()
}

/// `weft apply -f` of `yaml`, written to `name` in the test's directory, at the control plane
/// at `control`.
pub fn apply_yaml(dir: &TestDir, control: &str, name: &str, yaml: &str) -> Output {
    let file = dir.path.join(name);
    std::fs::write(&file, yaml).unwrap();
    weft(&["apply", "-f", file.to_str().unwrap(), "--control", control])
}

/// `weft apply` of `yaml` (written to `name` in `dir`), which must succeed.
pub fn apply_ok(dir: &TestDir, control: &str, name: &str, yaml: &str) {
    let out = apply_yaml(dir, control, name, yaml);
    assert!(out.status.success(), "weft apply {name}: {}", stderr(&out));
}

/// A port for a process under test to bind. Ports come from a block of this test process's
/// own below the kernel's ephemeral range (32768+): a port the kernel hands out for `bind(0)`
/// or for an outgoing connection (a proxy's upstream, a curl) could be taken again between
/// picking it here and the child binding it, which made tests fail at random under load.
/// The block is claimed by keeping its first port bound for the test process's life, so two
/// test processes never share one (a test that restarts a process on the same port relies on
/// nobody else taking it meanwhile).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    let base = port_block();
    static NEXT: AtomicU16 = AtomicU16::new(0);
    for _ in 1..PORT_BLOCK {
        let port = base + 1 + NEXT.fetch_add(1, Ordering::Relaxed) % (PORT_BLOCK - 1);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Every port of the block is in use: fall back to one the kernel picks.
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const PORT_BLOCK: u16 = 100;

/// The first port of this process's block (20000..32000), held bound as its claim; the search
/// starts at a block picked by the process id.
fn port_block() -> u16 {
    const FIRST: u16 = 20_000;
    const BLOCKS: u16 = 120;
    static CLAIM: std::sync::OnceLock<(Option<std::net::TcpListener>, u16)> = std::sync::OnceLock::new();
    let start = (std::process::id() % u32::from(BLOCKS)) as u16;
    CLAIM
        .get_or_init(|| {
            (0..BLOCKS)
                .map(|i| FIRST + (start + i) % BLOCKS * PORT_BLOCK)
                .find_map(|base| std::net::TcpListener::bind(("127.0.0.1", base)).ok().map(|l| (Some(l), base)))
                .unwrap_or((None, FIRST + start * PORT_BLOCK))
        })
        .1
}

/// A scratch directory for one test, holding data dirs and process logs. On a failing test
/// the logs are printed, so CI output shows what each process said.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("weft-test-{name}-{}-{}", std::process::id(), fastrand_u32()));
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }
}

fn fastrand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    t.subsec_nanos()
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(entries) = std::fs::read_dir(&self.path)
        {
            {
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        eprintln!("----- {} (last 40 lines) -----", e.path().display());
                        for l in tail.iter().rev() {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process, killed (SIGKILL, by PID) when dropped unless it already exited.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(dir: &TestDir, name: &str, cmd: &mut Command) -> Proc {
        let log = std::fs::File::create(dir.path.join(format!("{name}.log"))).unwrap();
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        cmd.env("WEFT_LOG", std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into()));
        cmd.env("WEFT_CONFIG", credentials_file());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name: name.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(10))
    }

    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// PIDs of this process's children.
    pub fn children(&self) -> Vec<i32> {
        let mut out = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for t in tasks.flatten() {
                let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Waits (up to 90 s) for `weft up`, spawned as `up`, to print its banner, and returns its
/// output so far; fails if it exited instead.
pub fn wait_up(dir: &TestDir, up: &mut Proc) -> String {
    let log = dir.path.join(format!("{}.log", up.name));
    wait_until(Duration::from_secs(90), "weft up banner", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("weft mesh is up")
            || up.wait(Duration::ZERO).is_some()
    });
    let banner = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(banner.contains("weft mesh is up"), "weft up exited:\n{banner}");
    banner
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `f` every 20 ms until it returns true; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion (bounded by a timeout through `timeout(1)`).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .env("WEFT_CONFIG", credentials_file())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs the weft CLI.
pub fn weft(args: &[&str]) -> Output {
    run(weft_bin().to_str().unwrap(), args)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An app that answers every connection with the same bytes after one read, then closes it.
/// Returns its port and what it read from each connection (the request heads it was sent).
pub fn fake_app(answer: Vec<u8>) -> (u16, std::sync::mpsc::Receiver<Vec<u8>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (seen, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = seen.send(buf[..n].to_vec());
            let _ = s.write_all(&answer);
        }
    });
    (port, rx)
}

/// `weft proxy` as the sidecar of an app already listening on `app_port` (one TCP health
/// check, the next an hour later), registered as instance `service`; returns once the control
/// plane reports it healthy.
pub fn app_sidecar(dir: &TestDir, control: &Control, service: &str, app_port: u16, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(weft_bin());
    cmd.args(["proxy", "--service", service, "--app-port", &app_port.to_string(), "--health-interval", "1h"]);
    cmd.args(["--control", &control.addr, "--id", service]).args(extra);
    cmd.env("WEFT_TOKEN", join_token(&control.addr, service));
    let proc = Proc::spawn(dir, service, &mut cmd);
    wait_until(Duration::from_secs(10), &format!("{service} healthy"), || control.healthy_ids(service).len() == 1);
    proc
}

/// TCP socket states in /proc/net/tcp.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_CLOSE_WAIT: u8 = 0x08;

/// The TCP sockets process `pid` holds, as (state, local port, remote port), read from /proc.
pub fn tcp_sockets(pid: i32) -> Vec<(u8, u16, u16)> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|l| Some(l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned()))
        .collect();
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9
                && inodes.contains(f[9])
                && let (Some(local), Some(remote), Ok(state)) = (port(f[1]), port(f[2]), u8::from_str_radix(f[3], 16))
            {
                found.push((state, local, remote));
            }
        }
    }
    found
}

/// A response as curl saw it.
#[derive(Debug)]
pub struct CurlResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// `curl -s -i` with extra args; returns None if curl could not get a response at all.
pub fn curl(args: &[&str]) -> Option<CurlResponse> {
    let mut all = vec!["-s", "-i", "--max-time", "20"];
    all.extend_from_slice(args);
    let out = run("curl", &all);
    if !out.status.success() {
        return None;
    }
    let text = stdout(&out);
    // Skip interim responses (100 Continue, 101 is final for upgrades).
    let mut rest = text.as_str();
    loop {
        let (head, body) = rest.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        if status == 100 {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        return Some(CurlResponse { status, headers, body: body.to_owned() });
    }
}

pub fn get_json(addr: &str, path: &str) -> Option<Value> {
    let out = run("curl", &["-s", "-f", "--max-time", "5", &format!("http://{addr}{path}")]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// GETs sent to `url` every 20 ms until `stop` (or `max`); returns (ok, the failures).
pub fn request_loop(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: Duration,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        let deadline = Instant::now() + max;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match curl(&["--max-time", "5", &url]) {
                Some(r) if r.status == 200 => ok += 1,
                r => failed.push(format!("{r:?}")),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, failed)
    })
}

/// What [`steady_load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u32,
    /// Each failed request: when it was sent (since the start) and what came back.
    pub failed: Vec<(Duration, String)>,
}

impl LoadReport {
    /// Fails, with the first 20 failures (when each was sent, since the start), if any
    /// request failed.
    pub fn assert_none_failed(&self) {
        assert!(
            self.failed.is_empty(),
            "{} of {} requests failed (at s since the start): {:?}",
            self.failed.len(),
            self.ok as usize + self.failed.len(),
            &self.failed[..self.failed.len().min(20)]
        );
    }
}

/// GETs of `url` at `per_second`, each on its own (over a pool of kept-alive connections,
/// as a busy client sends them), whatever the answers take, until `stop` (or `max`). A
/// request fails if the answer is not 200 or takes over 5 s.
pub fn steady_load(
    url: String,
    per_second: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: Duration,
) -> std::thread::JoinHandle<LoadReport> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async move {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
            let uri: http::Uri = url.parse().unwrap();
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
            let mut sent = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < max {
                tick.tick().await;
                let (client, uri, at) = (client.clone(), uri.clone(), start.elapsed());
                sent.push(tokio::spawn(async move {
                    let answer = tokio::time::timeout(Duration::from_secs(5), async {
                        let resp = client.get(uri).await.map_err(|e| format!("{e:?}"))?;
                        let (status, why) = (resp.status(), resp.headers().get("x-weft-error").cloned());
                        http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| format!("{e:?}"))?;
                        if status == 200 { Ok(()) } else { Err(format!("{status} {why:?}")) }
                    });
                    (at, answer.await.unwrap_or_else(|_| Err("no answer within 5 s".into())))
                }));
            }
            let mut report = LoadReport::default();
            for t in sent {
                match t.await.unwrap() {
                    (_, Ok(())) => report.ok += 1,
                    (at, Err(e)) => report.failed.push((at, e)),
                }
            }
            report
        })
    })
}

/// Whether `name`'s log (in `dir`) has a line with both `what` and `at`.
pub fn log_says(dir: &TestDir, name: &str, what: &str, at: &str) -> bool {
    std::fs::read_to_string(dir.path.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(what) && l.contains(at))
}

/// A control plane process. Its API and xDS are TLS on `addr`; proxyless xDS clients use the
/// loopback plaintext listener `xds_plain`.
pub struct Control {
    pub proc: Proc,
    pub addr: String,
    pub xds_plain: String,
    pub data_dir: PathBuf,
}

impl Control {
    pub fn start(dir: &TestDir) -> Control {
        Control::start_with(dir, &[])
    }

    /// A control plane with extra flags (e.g. `--mtls permissive`).
    pub fn start_with(dir: &TestDir, extra: &[&str]) -> Control {
        Control::start_at_with(dir, &format!("127.0.0.1:{}", free_port()), dir.path.join("control-data"), extra)
    }

    pub fn start_at(dir: &TestDir, addr: &str, data_dir: PathBuf) -> Control {
        Control::start_at_with(dir, addr, data_dir, &[])
    }

    pub fn start_at_with(dir: &TestDir, addr: &str, data_dir: PathBuf, extra: &[&str]) -> Control {
        let xds_plain = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(weft_bin());
        cmd.args(["control", "--listen", addr, "--plaintext-xds", &xds_plain, "--data-dir"]).arg(&data_dir).args(extra);
        let proc = Proc::spawn(dir, &format!("control-{}", fastrand_u32()), &mut cmd);
        let c = Control { proc, addr: addr.to_owned(), xds_plain, data_dir };
        wait_until(Duration::from_secs(10), "control plane API", || c.api("/api/v1/services").is_some());
        c
    }

    /// The mesh root file the control plane's TLS certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca").join("trust-bundle.pem")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token")).unwrap_or_default().trim().to_owned()
    }

    /// GET on the admin API (TLS, admin credential), as JSON; None on any failure.
    pub fn api(&self, path: &str) -> Option<Value> {
        let cacert = self.ca_file();
        if !cacert.exists() {
            return None;
        }
        let auth = format!("authorization: Bearer {}", self.admin_token());
        let url = format!("https://{}{path}", self.addr);
        let out = run("curl", &["-s", "-f", "--max-time", "5", "--cacert", cacert.to_str()?, "-H", &auth, &url]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Any API call, as a client with `bearer` (none: no credential) would make it; returns the
    /// status and the JSON body (Null when not JSON). Status 0: no HTTP answer.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>, bearer: Option<&str>) -> (u16, Value) {
        let cacert = self.ca_file();
        let url = format!("https://{}{path}", self.addr);
        let mut args = vec!["-s", "--max-time", "10", "--cacert", cacert.to_str().unwrap(), "-X", method];
        args.extend(["-w", "\n%{http_code}"]);
        let auth = bearer.map(|b| format!("authorization: Bearer {b}"));
        if let Some(a) = &auth {
            args.extend(["-H", a.as_str()]);
        }
        if let Some(b) = body {
            args.extend(["-H", "content-type: application/json", "--data-binary", b]);
        }
        args.push(&url);
        let out = stdout(&run("curl", &args));
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
    }

    pub fn endpoints(&self, service: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/services/{service}/endpoints"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    pub fn healthy_ids(&self, service: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .endpoints(service)
            .iter()
            .filter(|e| e["healthy"] == true)
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }
}

/// An app (the demo app) with its sidecar, started by `weft run`.
pub struct Instance {
    pub proc: Proc,
    pub id: String,
    pub app_port: u16,
    pub inbound: u16,
    pub admin: u16,
}

impl Instance {
    pub fn start(dir: &TestDir, control: &str, service: &str, version: &str, id: &str, extra: &[&str]) -> Instance {
        Instance::start_env(dir, control, service, version, id, extra, &[])
    }

    /// As [`Instance::start`], with `env` in the app's environment (e.g. the demo app's
    /// `WEFT_DEMO_FAIL_PERCENT`).
    pub fn start_env(
        dir: &TestDir,
        control: &str,
        service: &str,
        version: &str,
        id: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Instance {
        let (app_port, inbound, admin) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(weft_bin());
        cmd.args(["run", "--service", service, "--id", id, "--control", control]);
        if !extra.contains(&"--health-path") {
            cmd.args(["--health-path", "/healthz"]);
        }
        cmd.args(["--port", &app_port.to_string(), "--label", &format!("version={version}")]);
        cmd.args(["--inbound", &format!("127.0.0.1:{inbound}"), "--admin", &format!("127.0.0.1:{admin}")]);
        cmd.args(extra).arg("--").arg(weft_bin()).arg("demo-app");
        cmd.env("WEFT_TOKEN", join_token(control, service));
        cmd.envs(env.iter().copied());
        let proc = Proc::spawn(dir, id, &mut cmd);
        Instance { proc, id: id.to_owned(), app_port, inbound, admin }
    }

    pub fn admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin)
    }

    /// The app's PIDs: `weft run` becomes the sidecar, whose child the app is.
    pub fn app_pids(&self) -> Vec<i32> {
        self.proc.children()
    }
}

/// A proxy with no app of its own, exposing upstream services on local ports: the way a
/// test (a client outside the mesh) sends traffic in.
pub struct Edge {
    pub proc: Proc,
    pub admin: u16,
    pub ports: HashMap<String, u16>,
}

impl Edge {
    pub fn start(dir: &TestDir, control: &Control, services: &[&str]) -> Edge {
        Edge::start_via(dir, &control.addr, &format!("edge-{}", fastrand_u32()), services)
    }

    /// An edge with node id `id` whose control plane is `control` (e.g. a relay in the test),
    /// with a join token (identity `edge`) from the control plane at `issuer`.
    pub fn start_via(dir: &TestDir, control: &str, id: &str, services: &[&str]) -> Edge {
        Edge::start_with(dir, control, control, id, "edge", services, &[])
    }

    /// An edge whose join token (from `issuer`) names `identity`.
    pub fn start_with(
        dir: &TestDir,
        control: &str,
        issuer: &str,
        id: &str,
        identity: &str,
        services: &[&str],
        extra: &[&str],
    ) -> Edge {
        let token = join_token(issuer, identity);
        // Ports are picked free and then bound by the proxy; a parallel test may take one in
        // between, in which case the proxy exits at once saying so, and is started again.
        for _ in 0..3 {
            let admin = free_port();
            let mut cmd = Command::new(weft_bin());
            cmd.args(["proxy", "--control", control, "--id", id]).args(extra);
            cmd.env("WEFT_TOKEN", &token);
            cmd.args(["--admin", &format!("127.0.0.1:{admin}")]);
            let mut ports = HashMap::new();
            for s in services {
                let p = free_port();
                cmd.args(["--upstream", &format!("{s}={p}")]);
                ports.insert(s.to_string(), p);
            }
            let mut proc = Proc::spawn(dir, "edge", &mut cmd);
            let ready = || run("curl", &["-s", "-f", &format!("http://127.0.0.1:{admin}/ready")]).status.success();
            wait_until(Duration::from_secs(10), "edge proxy ready", || ready() || proc.wait(Duration::ZERO).is_some());
            if ready() {
                return Edge { proc, admin, ports };
            }
            let log = std::fs::read_to_string(dir.path.join("edge.log")).unwrap_or_default();
            assert!(log.contains("Address already in use"), "edge proxy exited:\n{log}");
        }
        panic!("edge proxy could not find free ports three times");
    }

    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[service])
    }

    pub fn admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin)
    }

    /// Addresses of the endpoints the edge currently holds for `service`.
    pub fn endpoint_addrs(&self, service: &str) -> Vec<String> {
        Edge::endpoint_addrs_at(&self.admin(), service)
    }

    /// The addresses of `service`'s endpoints at the proxy whose admin address is `admin`.
    pub fn endpoint_addrs_at(admin: &str, service: &str) -> Vec<String> {
        let dump = get_json(admin, "/config_dump").unwrap_or_default();
        dump["endpoints"][service]
            .as_array()
            .map(|a| a.iter().map(|e| e["address"].as_str().unwrap_or_default().to_owned()).collect())
            .unwrap_or_default()
    }
}

/// Starts a control plane, `backends` instances of `backend` (versions v1, v2, …) and an edge.
pub struct SmallMesh {
    pub dir: TestDir,
    pub control: Control,
    pub backends: Vec<Instance>,
    pub edge: Edge,
}

impl SmallMesh {
    pub fn start(name: &str, backends: usize) -> SmallMesh {
        SmallMesh::start_with(name, backends, &[])
    }

    /// With extra flags for the control plane.
    pub fn start_with(name: &str, backends: usize, control_args: &[&str]) -> SmallMesh {
        let dir = TestDir::new(name);
        let control = Control::start_with(&dir, control_args);
        let backends: Vec<Instance> = (0..backends)
            .map(|i| {
                Instance::start(&dir, &control.addr, "backend", &format!("v{}", i + 1), &format!("backend-{i}"), &[])
            })
            .collect();
        wait_until(Duration::from_secs(15), "backends healthy", || {
            control.healthy_ids("backend").len() == backends.len()
        });
        let edge = Edge::start(&dir, &control, &["backend"]);
        wait_until(Duration::from_secs(5), "edge sees backends", || {
            edge.endpoint_addrs("backend").len() == backends.len()
        });
        SmallMesh { dir, control, backends, edge }
    }
}

/// The sum of metric `name` (a sample name, e.g. `weft_requests_total`) over the series of a
/// Prometheus text `body` whose labels include every one of `labels` (`key="value"`).
pub fn metric_sum(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .filter(|l| {
            let set = l.split_once('{').and_then(|(_, r)| r.rsplit_once('}')).map_or("", |(set, _)| set);
            labels.iter().all(|label| set.split(',').any(|pair| pair == *label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
