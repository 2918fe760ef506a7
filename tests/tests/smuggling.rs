//! Raw HTTP/1.1 probes (request smuggling in the manner of PortSwigger's research, and the
//! rules of RFC 9110/9112) sent over raw TCP through both paths of real sidecars: outbound
//! (client → edge proxy → mutual TLS → the app's sidecar → app) and inbound (client → the
//! app's sidecar, plaintext in permissive mode → app). Each probe asserts what the client gets
//! and exactly what the app receives. The app is a raw TCP recorder owned by the test.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;
use weft_tests::*;

/// What the app read.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// A whole request (head and body), as received.
    Request(String),
    /// A connection that ended in the middle of a request: what had arrived.
    Incomplete(String),
    /// Bytes after the app answered `101 Switching Protocols`.
    Switched(String),
}

/// The app: reads requests (framed by `Content-Length` or chunked), records each, answers
/// `200 ok`, or `101` to a request with an `Upgrade` header (then records what follows).
fn recording_app() -> (u16, Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || serve_app_connection(s, tx));
        }
    });
    (port, rx)
}

/// Reads what is there onto `buf`; false at the end of the stream (or an error).
fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 65536];
    match s.read(&mut chunk) {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn serve_app_connection(mut s: TcpStream, seen: Sender<Seen>) {
    let mut buf = Vec::new();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut reader = s.try_clone().unwrap();
    let mut fill = |buf: &mut Vec<u8>| read_more(&mut reader, buf);
    loop {
        let Some(head_end) = (loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break Some(i + 4);
            }
            if !fill(&mut buf) {
                break None;
            }
        }) else {
            if !buf.is_empty() {
                let _ = seen.send(Seen::Incomplete(text(&buf)));
            }
            return;
        };
        let head = text(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')).map(|v| v.trim().to_owned()))
        };
        let end = if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            loop {
                if buf.len() >= head_end + n {
                    break Some(head_end + n);
                }
                if !fill(&mut buf) {
                    break None;
                }
            }
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                if let Some(i) = find(&buf[head_end..], b"0\r\n\r\n") {
                    break Some(head_end + i + 5);
                }
                if !fill(&mut buf) {
                    break None;
                }
            }
        } else {
            Some(head_end)
        };
        let Some(end) = end else {
            let _ = seen.send(Seen::Incomplete(text(&buf)));
            return;
        };
        let _ = seen.send(Seen::Request(text(&buf[..end])));
        buf.drain(..end);
        if let Some(protocol) = header("upgrade") {
            let answer =
                format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\r\n");
            let _ = s.write_all(answer.as_bytes());
            if !buf.is_empty() {
                let _ = seen.send(Seen::Switched(text(&buf)));
            }
            let mut after = Vec::new();
            while fill(&mut after) {
                let _ = seen.send(Seen::Switched(text(&after)));
                after.clear();
            }
            return;
        }
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
            return;
        }
    }
}

/// A response as the client read it.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// Lower-case header lines.
    head: String,
    body: String,
}

impl Resp {
    fn weft_error(&self) -> Option<&str> {
        self.head.lines().find_map(|l| l.strip_prefix("x-weft-error: "))
    }
}

/// A raw client connection.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        // A probe may be refused while it is still being written: what counts is the answer.
        let _ = self.s.write_all(bytes);
    }

    fn fill(&mut self) -> bool {
        read_more(&mut self.s, &mut self.buf)
    }

    /// The next response; None if the connection closed (or stalled) without one.
    fn response(&mut self) -> Option<Resp> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill() {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
        let chunked = head.contains("transfer-encoding: chunked");
        let end = loop {
            if chunked {
                if let Some(i) = find(&self.buf[head_end..], b"0\r\n\r\n") {
                    break head_end + i + 5;
                }
            } else if self.buf.len() >= head_end + length {
                break head_end + length;
            }
            if !self.fill() {
                return None;
            }
        };
        let body = String::from_utf8_lossy(&self.buf[head_end..end]).into_owned();
        self.buf.drain(..end);
        Some(Resp { status, head, body })
    }
}

/// How the rig declares service `app`.
#[derive(PartialEq)]
enum Declared {
    /// `protocol: http`, and a DENY policy on `/denied/*`.
    HttpWithPolicy,
    /// `protocol: auto` and no policy: opaque TCP passes (a DENY rule on paths would close
    /// every opaque TCP connection).
    Auto,
}

/// The mesh around the recording app: service `app` as `declared`, permissive mTLS (so a raw
/// client can reach the sidecar's inbound port), and an edge proxy exposing the service.
struct Rig {
    _dir: TestDir,
    _control: Control,
    _sidecar: Proc,
    edge: Edge,
    inbound: u16,
    seen: Receiver<Seen>,
}

const SENTINEL: &str = "GET /sentinel HTTP/1.1\r\nHost: app\r\n\r\n";

impl Rig {
    fn start(name: &str, declared: Declared, sidecar_flags: &[&str]) -> Rig {
        let dir = TestDir::new(name);
        let control = Control::start_with(&dir, &["--mtls", "permissive"]);
        let protocol = if declared == Declared::Auto { "auto" } else { "http" };
        let service = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: app}}\nspec: {{protocol: {protocol}}}\n"
        );
        let policy = "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-denied}\nspec:\n  service: app\n  action: DENY\n  rules:\n  - to: [{paths: [\"/denied/*\"]}]\n";
        let mut resources = vec![("service.yaml", service.as_str())];
        if declared == Declared::HttpWithPolicy {
            resources.push(("policy.yaml", policy));
        }
        for (file, yaml) in resources {
            let path = dir.path.join(file);
            std::fs::write(&path, yaml).unwrap();
            let out = weft(&["apply", "-f", path.to_str().unwrap(), "--control", &control.addr]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let (app, seen) = recording_app();
        let inbound = free_port();
        let mut flags = vec!["--inbound".to_owned(), format!("127.0.0.1:{inbound}")];
        flags.extend(sidecar_flags.iter().map(|f| f.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let sidecar = app_sidecar(&dir, &control, "app", app, &flags);
        let edge = Edge::start(&dir, &control, &["app"]);
        wait_until(Duration::from_secs(5), "edge sees the app", || edge.endpoint_addrs("app").len() == 1);
        let rig = Rig { _dir: dir, _control: control, _sidecar: sidecar, edge, inbound, seen };
        for port in rig.ports() {
            if declared == Declared::HttpWithPolicy {
                wait_until(Duration::from_secs(5), "policy in force", || {
                    let mut c = Client::connect(port);
                    c.send(b"GET /denied/x HTTP/1.1\r\nHost: app\r\n\r\n");
                    c.response().is_some_and(|r| r.status == 403)
                });
            }
            // Whatever the app got so far (e.g. the sidecar's probes of what it speaks).
            rig.app_saw(port);
        }
        rig
    }

    /// The outbound path (through the edge) and the inbound one (the sidecar directly).
    fn ports(&self) -> [u16; 2] {
        [self.edge.ports["app"], self.inbound]
    }

    /// What the app received since the last call, up to a sentinel request sent now on a new
    /// connection. Whatever the app got for an earlier probe arrived before the probe's answer,
    /// so before the sentinel.
    fn app_saw(&self, port: u16) -> Vec<Seen> {
        let mut c = Client::connect(port);
        c.send(SENTINEL.as_bytes());
        let r = c.response().expect("an answer to the sentinel");
        assert_eq!(r.status, 200, "sentinel: {r:?}");
        let mut seen = Vec::new();
        loop {
            match self.seen.recv_timeout(Duration::from_secs(10)).expect("the sentinel reaches the app") {
                Seen::Request(r) if r.starts_with("GET /sentinel ") => return seen,
                other => seen.push(other),
            }
        }
    }

    /// Sends `probe` on a new connection; returns the first response (None: closed without
    /// one) and what the app received.
    fn probe(&self, port: u16, probe: &[u8]) -> (Option<Resp>, Vec<Seen>) {
        let mut c = Client::connect(port);
        c.send(probe);
        let r = c.response();
        (r, self.app_saw(port))
    }

    /// Whether the edge counted refusals for `reason` in its metrics.
    fn counted(&self, reason: &str) {
        let metrics = stdout(&run("curl", &["-s", &format!("http://{}/metrics", self.edge.admin())]));
        let series = format!("weft_proxy_errors_total{{direction=\"outbound\",service=\"app\",reason=\"{reason}\"}}");
        assert!(metrics.contains(&series), "{series} not in\n{metrics}");
    }

    /// A probe the proxy must refuse itself with `status` and `reason`, the app receiving
    /// nothing.
    fn refused(&self, probe: &[u8], status: u16, reason: Option<&str>) {
        for port in self.ports() {
            let what = format!("port {port}: {:?}", String::from_utf8_lossy(&probe[..probe.len().min(120)]));
            let (r, seen) = self.probe(port, probe);
            let r = r.unwrap_or_else(|| panic!("{what}: no answer"));
            assert_eq!(r.status, status, "{what}: {r:?}");
            assert_eq!(r.weft_error(), reason, "{what}: {r:?}");
            assert_eq!(seen, [], "{what}: the app received it");
        }
    }

    /// A probe both paths forward: the client gets the app's `200 ok`, the app gets exactly
    /// `expected`.
    fn forwarded(&self, probe: &[u8], expected: &str) {
        for port in self.ports() {
            let what = format!("port {port}: {:?}", String::from_utf8_lossy(&probe[..probe.len().min(120)]));
            let (r, seen) = self.probe(port, probe);
            let r = r.unwrap_or_else(|| panic!("{what}: no answer"));
            assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{what}: {r:?}");
            assert_eq!(seen, [Seen::Request(expected.to_owned())], "{what}");
        }
    }
}

/// Item 18: an h2c upgrade is never forwarded (the app never sees `Upgrade: h2c` or
/// `HTTP2-Settings`, so it cannot switch protocols and carry requests no policy checked);
/// `Upgrade` without `Connection: upgrade` is no upgrade; a real upgrade keeps working and
/// loses its other hop-by-hop headers.
#[test]
fn h2c_upgrade_is_never_forwarded() {
    let rig = Rig::start("smuggle-h2c", Declared::HttpWithPolicy, &[]);
    for port in rig.ports() {
        // The app answers 101 to any Upgrade it sees; a DENY rule covers /denied/*.
        let mut c = Client::connect(port);
        c.send(
            b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
              HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        );
        let r = c.response().expect("an answer");
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "port {port}: {r:?}");
        // The next request on the connection is routed and authorized, not spliced to the app.
        c.send(b"GET /denied/y HTTP/1.1\r\nHost: app\r\n\r\n");
        let r = c.response().expect("an answer");
        assert_eq!((r.status, r.weft_error()), (403, Some("denied")), "port {port}: {r:?}");
        assert_eq!(rig.app_saw(port), [Seen::Request("GET /x HTTP/1.1\r\nhost: app\r\n\r\n".into())], "port {port}");
    }
    // `Upgrade` that `Connection` does not list is not an upgrade, and is not forwarded.
    rig.forwarded(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n\r\n",
        "GET /ws HTTP/1.1\r\nhost: app\r\n\r\n",
    );
    rig.forwarded(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n",
        "GET /ws HTTP/1.1\r\nhost: app\r\n\r\n",
    );
    // A real upgrade: the app gets `Connection: upgrade` and `Upgrade`, not the headers
    // `Connection` names nor `Keep-Alive`; then the connections are spliced.
    for port in rig.ports() {
        let mut c = Client::connect(port);
        c.send(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, X-Hop\r\nUpgrade: websocket\r\nX-Hop: 1\r\n\
              Keep-Alive: timeout=5\r\nX-Kept: 1\r\n\r\n",
        );
        let r = c.response().expect("an answer");
        assert_eq!(r.status, 101, "port {port}: {r:?}");
        c.send(b"spliced bytes");
        let first = rig.seen.recv_timeout(Duration::from_secs(10)).expect("the upgrade request");
        let Seen::Request(head) = first else { panic!("port {port}: {first:?}") };
        let mut lines: Vec<&str> = head.trim_end().lines().collect();
        lines[1..].sort();
        assert_eq!(
            lines,
            ["GET /ws HTTP/1.1", "connection: upgrade", "host: app", "upgrade: websocket", "x-kept: 1"],
            "port {port}"
        );
        let mut after = String::new();
        while after.len() < "spliced bytes".len() {
            match rig.seen.recv_timeout(Duration::from_secs(10)).expect("the spliced bytes") {
                Seen::Switched(s) => after.push_str(&s),
                other => panic!("port {port}: {other:?}"),
            }
        }
        assert_eq!(after, "spliced bytes", "port {port}");
    }
}

/// Item 19: `Host` and the request target are validated, and an absolute-form target's
/// authority replaces `Host` (RFC 9112 §3.2.2, as Envoy and nginx do); routing and
/// authorization see what the app gets.
#[test]
fn host_and_target_are_validated() {
    let rig = Rig::start("smuggle-host", Declared::HttpWithPolicy, &[]);
    for probe in [
        &b"GET /x HTTP/1.1\r\nHost: app\r\nHost: evil\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app evil\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: user@app\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: Host\r\n\r\n",
        b"GET ftp://app/x HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET http://user@app/x HTTP/1.1\r\nHost: app\r\n\r\n",
        b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n",
    ] {
        rig.refused(probe, 400, Some("bad-request"));
    }
    rig.forwarded(
        b"GET http://evil.example/x?y=1 HTTP/1.1\r\nHost: app\r\n\r\n",
        "GET /x?y=1 HTTP/1.1\r\nhost: evil.example\r\n\r\n",
    );
    // Authorization sees the path the app would get.
    rig.refused(b"GET http://app/denied/x HTTP/1.1\r\nHost: app\r\n\r\n", 403, Some("denied"));
    rig.forwarded(b"OPTIONS * HTTP/1.1\r\nHost: app\r\n\r\n", "OPTIONS * HTTP/1.1\r\nhost: app\r\n\r\n");
    // HTTP/1.0 needs no Host.
    rig.forwarded(b"GET /x HTTP/1.0\r\n\r\n", "GET /x HTTP/1.0\r\n\r\n");
}

/// Item 20: whatever begins like an HTTP request is HTTP, however malformed, on a service of
/// protocol `auto` too: the proxy answers it, and its bytes never reach the app as opaque TCP.
/// What RFC 9112 allows (leading empty lines, bare LF line ends) is served; a 9 KB URL works;
/// what is not HTTP at all is still opaque TCP.
#[test]
fn malformed_http_is_answered_not_passed_on() {
    let rig = Rig::start("smuggle-lines", Declared::Auto, &[]);
    for probe in [
        &b"GET /x HTTP/1.2\r\nHost: app\r\n\r\n"[..],
        b"GET /x\r\n\r\n",
        b"GET\t/x HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /x\tHTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /x HTTP/1.1 \r\nHost: app\r\n\r\n",
        b"GET  /x HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /x y HTTP/1.1\r\nHost: app\r\n\r\n",
    ] {
        rig.refused(probe, 400, None);
    }
    // Not HTTP: the app gets the bytes as they were sent (here it answers them as HTTP).
    for port in rig.ports() {
        let (r, seen) = rig.probe(port, b"hello, not HTTP\r\n\r\n");
        assert_eq!(r.map(|r| r.body), Some("ok".to_owned()), "port {port}");
        assert_eq!(seen, [Seen::Request("hello, not HTTP\r\n\r\n".into())], "port {port}");
    }
    rig.forwarded(b"\r\nGET /x HTTP/1.1\r\nHost: app\r\n\r\n", "GET /x HTTP/1.1\r\nhost: app\r\n\r\n");
    rig.forwarded(b"\r\n\r\nGET /x HTTP/1.1\r\nHost: app\r\n\r\n", "GET /x HTTP/1.1\r\nhost: app\r\n\r\n");
    rig.forwarded(b"GET /x HTTP/1.1\nHost: app\n\n", "GET /x HTTP/1.1\r\nhost: app\r\n\r\n");
    // Methods are case-sensitive tokens: `get` is another method, but HTTP all the same.
    rig.forwarded(b"get /x HTTP/1.1\r\nHost: app\r\n\r\n", "get /x HTTP/1.1\r\nhost: app\r\n\r\n");
    let long = format!("/{}", "a".repeat(9 * 1024));
    rig.forwarded(
        format!("GET {long} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes(),
        &format!("GET {long} HTTP/1.1\r\nhost: app\r\n\r\n"),
    );
    // A 70 KB request line is too large a head.
    rig.refused(format!("GET /{} HTTP/1.1\r\nHost: app\r\n\r\n", "a".repeat(70_000)).as_bytes(), 431, None);
}

/// Item 21: `--max-header-bytes` holds to the byte, whether the head comes in one write or
/// many.
#[test]
fn header_limit_is_exact() {
    // The default, 64 KiB.
    const LIMIT: usize = 64 * 1024;
    let rig = Rig::start("smuggle-limits", Declared::HttpWithPolicy, &[]);
    // A head of exactly `size` bytes.
    let head = |size: usize| {
        let fixed = "GET /x HTTP/1.1\r\nHost: app\r\nx-pad: \r\n\r\n".len();
        format!("GET /x HTTP/1.1\r\nHost: app\r\nx-pad: {}\r\n\r\n", "p".repeat(size - fixed))
    };
    let fits = head(LIMIT);
    for port in rig.ports() {
        let (r, _) = rig.probe(port, fits.as_bytes());
        assert_eq!(r.map(|r| r.status), Some(200), "port {port}: a head of exactly the limit");
    }
    // One byte over, and 70.8 KB, in one write; one byte over in small pieces.
    let over = head(LIMIT + 1);
    rig.refused(over.as_bytes(), 431, None);
    rig.refused(head(70_800).as_bytes(), 431, None);
    for port in rig.ports() {
        let mut c = Client::connect(port);
        for piece in over.as_bytes().chunks(1000) {
            c.send(piece);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(c.response().map(|r| r.status), Some(431), "port {port}: a head over the limit in pieces");
    }
    // At most 100 header fields, however small (hyper's limit).
    let fields = |n: usize| (1..n).map(|i| format!("x-{i}: 1\r\n")).collect::<String>();
    for port in rig.ports() {
        let (r, _) = rig.probe(port, format!("GET /x HTTP/1.1\r\nHost: app\r\n{}\r\n", fields(100)).as_bytes());
        assert_eq!(r.map(|r| r.status), Some(200), "port {port}: 100 fields");
    }
    rig.refused(format!("GET /x HTTP/1.1\r\nHost: app\r\n{}\r\n", fields(101)).as_bytes(), 431, None);
    rig.counted("header-too-large");
}

/// Item 21: a malformed chunked request body is the client's fault: `400 bad-request`, not
/// `502` (the head may have reached the app already: bodies are streamed).
#[test]
fn malformed_chunked_body_gets_400() {
    let rig = Rig::start("smuggle-chunked", Declared::HttpWithPolicy, &[]);
    for body in ["zz\r\nabc\r\n0\r\n\r\n", "3\r\nabcX\r\n0\r\n\r\n", "ffffffffffffffffffff\r\n"] {
        for port in rig.ports() {
            let mut c = Client::connect(port);
            c.send(format!("POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{body}").as_bytes());
            let r = c.response().expect("an answer");
            assert_eq!((r.status, r.weft_error()), (400, Some("bad-request")), "port {port}: {body:?}: {r:?}");
            rig.app_saw(port);
        }
    }
}

/// The smuggling corpus: conflicting or obfuscated framing, obs-fold, bare CR, invalid header
/// names. Each is refused (the app gets nothing) or normalised (the app gets one unambiguous
/// request).
#[test]
fn smuggling_probes_are_refused_or_normalised() {
    let rig = Rig::start("smuggle-corpus", Declared::HttpWithPolicy, &[]);
    // Both framings: Transfer-Encoding wins and the connection is closed after the answer
    // (RFC 9112 §6.1), so nothing after the chunked body (`G`) becomes a request.
    for probe in [
        &b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG"[..],
        b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    ] {
        for port in rig.ports() {
            let what = format!("port {port}: {:?}", String::from_utf8_lossy(probe));
            let mut c = Client::connect(port);
            c.send(probe);
            let r = c.response().expect("an answer");
            assert_eq!(r.status, 200, "{what}: {r:?}");
            assert!(r.head.contains("connection: close"), "{what}: {r:?}");
            assert!(c.response().is_none(), "{what}: the connection stays open");
            let expected = "POST /x HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
            assert_eq!(rig.app_saw(port), [Seen::Request(expected.into())], "{what}");
        }
    }
    for probe in [
        // Obfuscated Transfer-Encoding.
        &b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        // Conflicting or malformed Content-Length.
        b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: +3\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 0x3\r\n\r\nabc",
        // obs-fold, bare CR, invalid field names and values.
        b"GET /x HTTP/1.1\r\nHost: app\r\nX-A: 1\r\n folded\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app\r\nX-A: 1\rX-B: 2\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app\r\nX A: 1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app\r\n: 1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app\r\nX-A\x00: 1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app\r\nX-A: 1\x00\r\n\r\n",
    ] {
        // The HTTP parser's own answer: a bare 400 (no x-weft-error; counted as bad-request).
        rig.refused(probe, 400, None);
    }
    // A service declared `protocol: http` has no opaque TCP: what is not HTTP gets 400.
    rig.refused(b"hello, not HTTP\r\n\r\n", 400, None);
    rig.counted("bad-request");
    // Pipelined requests in one write are each routed and authorized.
    for port in rig.ports() {
        let mut c = Client::connect(port);
        c.send(
            b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\nGET /denied/y HTTP/1.1\r\nHost: app\r\n\r\n",
        );
        assert_eq!(c.response().map(|r| r.status), Some(200), "port {port}");
        assert_eq!(c.response().map(|r| r.status), Some(403), "port {port}");
        let expected = "POST /x HTTP/1.1\r\nhost: app\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(rig.app_saw(port), [Seen::Request(expected.into())], "port {port}");
    }
    // A `Connection` that names the framing header does not unframe the body.
    rig.forwarded(
        b"POST /x HTTP/1.1\r\nHost: app\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\nabc",
        "POST /x HTTP/1.1\r\nhost: app\r\ncontent-length: 3\r\n\r\nabc",
    );
    rig.forwarded(
        b"POST /x HTTP/1.1\r\nHost: app\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    // Normalised: duplicate equal Content-Lengths, chunk extensions.
    rig.forwarded(
        b"POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        "POST /x HTTP/1.1\r\nhost: app\r\ncontent-length: 3\r\n\r\nabc",
    );
    rig.forwarded(
        b"POST /x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
}
