//! Idle HTTP/1.1 keep-alive connections: after a quiet second between requests the proxy ends
//! hyper's session and keeps only the socket. These tests hold the cases where ending a session
//! would be wrong (a half-sent request head, pipelined requests, a slow answer, an upgraded
//! connection) and check that a released connection serves its next request and that the
//! memory comes back. The last tests are about the other side: pooled upstream connections
//! that sit unused, or that the upstream closes.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use weft_tests::*;

/// These tests talk to sidecars' inbound listeners with raw sockets, as a client outside the
/// mesh does: the services accept plaintext.
const PLAINTEXT_CLIENTS: [&str; 2] = ["--mtls", "permissive"];

/// Longer than two release periods (the release check fires between one and two).
const IDLE: Duration = Duration::from_millis(2300);

/// Reads one response with a Content-Length body; returns status and body.
fn read_response(r: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let mut length = None;
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length.expect("a Content-Length")];
    r.read_exact(&mut body).expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn connect(port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

#[test]
fn idle_connection_is_released_and_serves_again() {
    let m = SmallMesh::start("idle", 1);
    let port = m.edge.ports["backend"];
    let (mut s, mut r) = connect(port);
    let get = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n";
    s.write_all(get).unwrap();
    assert_eq!(read_response(&mut r).0, 200);
    // Released while idle, then served by a new session on the same socket.
    std::thread::sleep(IDLE);
    s.write_all(get).unwrap();
    let (status, body) = read_response(&mut r);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from backend v1"), "{body}");

    // A request head sent in two parts with a pause between: the half-read head must survive.
    s.write_all(b"GET /info HTTP/1.1\r\nHost: backend\r\n").unwrap();
    std::thread::sleep(IDLE);
    s.write_all(b"\r\n").unwrap();
    let (status, body) = read_response(&mut r);
    assert_eq!((status, body.contains("\"instance\":\"backend-0\"")), (200, true), "{body}");

    // A slow answer: the exchange in flight keeps the session.
    s.write_all(b"GET /delay/2300 HTTP/1.1\r\nHost: backend\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r), (200, "waited 2300 ms\n".to_string()));

    // Pipelined: three requests in one write, answered in order.
    s.write_all(b"GET /delay/100 HTTP/1.1\r\nHost: backend\r\n\r\nGET /delay/1 HTTP/1.1\r\nHost: backend\r\n\r\nGET /delay/2 HTTP/1.1\r\nHost: backend\r\n\r\n").unwrap();
    for ms in [100, 1, 2] {
        assert_eq!(read_response(&mut r), (200, format!("waited {ms} ms\n")));
    }
    // A request body sent after a pause.
    s.write_all(b"POST /count HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\n\r\nab").unwrap();
    std::thread::sleep(IDLE);
    s.write_all(b"cde").unwrap();
    assert_eq!(read_response(&mut r), (200, "5\n".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_websocket_is_not_released() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let m = tokio::task::spawn_blocking(|| SmallMesh::start("idle-ws", 1)).await.unwrap();
    let url = format!("ws://127.0.0.1:{}/ws", m.edge.ports["backend"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket handshake through the mesh");
    for i in 0..2 {
        tokio::time::sleep(IDLE).await;
        ws.send(Message::Text(format!("ping {i}").into())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("backend v1 (instance backend-0): ping {i}"));
    }
    tokio::task::spawn_blocking(move || drop(m)).await.unwrap();
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS")
}

#[test]
fn idle_connections_give_their_memory_back() {
    const CONNS: usize = 600;
    let m = SmallMesh::start("idle-mem", 1);
    let port = m.edge.ports["backend"];
    let pid = m.edge.proc.pid();
    let get = b"GET /healthz HTTP/1.1\r\nHost: backend\r\n\r\n";
    // Warm up the pools and allocator first, so the baseline is not an empty process.
    let (mut s, mut r) = connect(port);
    s.write_all(get).unwrap();
    assert_eq!(read_response(&mut r).0, 200);
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..CONNS {
        let (mut s, mut r) = connect(port);
        s.write_all(get).unwrap();
        assert_eq!(read_response(&mut r).0, 200);
        held.push((s, r));
    }
    // hyper holds ~16 KiB per connection while a session lives; released, each costs its socket
    // and a small task (plus, for the first 256 that linger a second, the heap pages they pin),
    // so the growth must stay well under what the sessions would hold.
    let mut grown = 0;
    wait_until(Duration::from_secs(10), "idle connections' memory to come back", || {
        grown = rss_kib(pid).saturating_sub(before);
        grown < (CONNS as u64 * 16) / 3
    });
    // Every connection still works.
    for (s, r) in held.iter_mut().step_by(50) {
        s.write_all(get).unwrap();
        assert_eq!(read_response(r).0, 200, "after {grown} KiB growth");
    }
}

/// Reads until the peer closes (or resets) the connection; true if it did within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn header_read_timeout_holds_slow_heads_and_idle_connections() {
    let dir = TestDir::new("idle-head");
    let control = Control::start_with(&dir, &PLAINTEXT_CLIENTS);
    let b = Instance::start(&dir, &control.addr, "backend", "v1", "backend-0", &["--header-read-timeout", "800ms"]);
    wait_until(Duration::from_secs(10), "backend healthy", || control.healthy_ids("backend").len() == 1);
    // A head completed within the limit, in two parts.
    let (mut s, mut r) = connect(b.inbound);
    s.write_all(b"GET /info HTTP/1.1\r\nHost: backend\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"\r\n").unwrap();
    assert_eq!(read_response(&mut r).0, 200);
    // Another head that stalls: the connection is closed (the default limit, 10 s, would not).
    s.write_all(b"GET /info HTTP/1.1\r\nHost: back").unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(4)), "a stalled request head kept its connection");
    // An idle keep-alive connection is closed after the limit too (released, then parked).
    let (mut s, mut r) = connect(b.inbound);
    s.write_all(b"GET /info HTTP/1.1\r\nHost: backend\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).0, 200);
    assert!(closed_within(&mut s, Duration::from_secs(6)), "an idle connection outlived the limit");
}

/// An upstream that closes each keep-alive connection shortly after answering, without saying
/// `Connection: close`: requests of any method keep succeeding (one that meets a pooled
/// connection closed meanwhile goes out on a new one), and the closed connections are let go
/// rather than left in CLOSE_WAIT.
#[test]
fn upstream_closing_pooled_connections_is_harmless() {
    let dir = TestDir::new("poolclose");
    let control = Control::start_with(&dir, &PLAINTEXT_CLIENTS);
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).unwrap_or(0) > 0 {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    let inbound = free_port();
    let extra = ["--inbound", &format!("127.0.0.1:{inbound}"), "--upstream-idle-timeout", "4s"];
    let sidecar = app_sidecar(&dir, &control, "closer", app_port, &extra);

    let url = format!("http://127.0.0.1:{inbound}/");
    for i in 0..10 {
        // Each request finds the previous one's connection closed by the app 100 ms after it
        // answered (the sweep, every 2 s here, may have let it go first).
        std::thread::sleep(Duration::from_millis(250));
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let r = curl(&["-X", method, "-d", "payload", &url]).expect("a response");
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{method} #{i}: {r:?}");
    }
    // The app closes the last connection 100 ms after answering; the sweep lets it go.
    std::thread::sleep(Duration::from_millis(300));
    wait_until(Duration::from_secs(5), "closed pooled connections let go", || {
        !tcp_sockets(sidecar.pid()).iter().any(|&(state, _, remote)| state == TCP_CLOSE_WAIT && remote == app_port)
    });
}

/// A pooled upstream connection unused for --upstream-idle-timeout is closed.
#[test]
fn pooled_upstream_connections_close_when_unused() {
    let dir = TestDir::new("poolidle");
    let control = Control::start_with(&dir, &PLAINTEXT_CLIENTS);
    let b = Instance::start(&dir, &control.addr, "backend", "v1", "backend-0", &["--upstream-idle-timeout", "1s"]);
    wait_until(Duration::from_secs(15), "instance healthy", || control.healthy_ids("backend").len() == 1);
    let to_app = || {
        tcp_sockets(b.proc.pid())
            .iter()
            .filter(|&&(state, _, remote)| state == TCP_ESTABLISHED && remote == b.app_port)
            .count()
    };
    // The health checker keeps one keep-alive connection of its own to the app.
    let before = to_app();
    let r = curl(&[&format!("http://127.0.0.1:{}/info", b.inbound)]).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(to_app(), before + 1, "the connection to the app stays pooled after the request");
    // Closed between 1 s and 1.5 s after its last use.
    let waited = wait_until(Duration::from_secs(4), "pooled connection closed", || to_app() == before);
    assert!(waited >= Duration::from_millis(700), "closed after only {waited:?}");
}
