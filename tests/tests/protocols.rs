//! Every protocol the proxy carries, end to end: client → edge proxy → inbound sidecar → app.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;
use weft_tests::*;

#[test]
fn http1_keepalive_chunked_and_pooling() {
    let m = SmallMesh::start("http1", 1);
    let url = m.edge.url("backend", "/");
    // Two requests on one client connection.
    let out = run("curl", &["-s", "-v", &url, &url]);
    let err = stderr(&out);
    assert!(err.contains("Re-using existing connection") || err.contains("Reusing existing connection"), "{err}");
    assert_eq!(stdout(&out).matches("hello from backend v1 (instance backend-0) via HTTP/1.1").count(), 2);
    // A chunked request body streams through.
    let body = m.dir.path.join("body.txt");
    std::fs::write(&body, "x".repeat(100_000)).unwrap();
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "-T",
        body.to_str().unwrap(),
        &m.edge.url("backend", "/count"),
    ])
    .expect("response");
    assert_eq!((r.status, r.body.trim()), (200, "100000"));
    // Many client connections, few upstream ones: the edge pools its connections to the sidecar.
    for _ in 0..30 {
        assert_eq!(curl(&[&url]).unwrap().status, 200);
    }
    let metrics = run("curl", &["-s", &format!("http://{}/metrics", m.backends[0].admin())]);
    let opened: f64 = stdout(&metrics)
        .lines()
        .find(|l| l.starts_with("weft_tcp_connections_opened_total{direction=\"inbound\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("inbound connection counter");
    assert!(opened <= 3.0, "the backend sidecar saw {opened} connections for 33 requests");
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), the ones `Connection` names included, stay on their
/// hop in both directions, and an upstream's `Connection: close` does not close the client's
/// connection.
#[test]
fn hop_by_hop_headers_stay_on_their_hop() {
    let dir = TestDir::new("hopbyhop");
    let control = Control::start(&dir);
    let answer = "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: upstream-only\r\nKeep-Alive: timeout=5\r\n\
                  X-Kept: yes\r\nContent-Length: 3\r\n\r\nok\n";
    let (port, seen) = fake_app(answer.as_bytes().to_vec());
    let _sidecar = app_sidecar(&dir, &control, "hop", port, &[]);
    let edge = Edge::start(&dir, &control, &["hop"]);
    wait_until(Duration::from_secs(5), "edge has the endpoint", || edge.endpoint_addrs("hop").len() == 1);

    let url = edge.url("hop", "/");
    let (secret, fine) = ("X-Secret: client-only", "X-Fine: yes");
    let w = "connects=%{num_connects}\n";
    let out = run(
        "curl",
        &["-s", "-i", "-m", "20", "-H", "Connection: X-Secret", "-H", secret, "-H", fine, "-w", w, &url, &url],
    );
    let text = stdout(&out).to_ascii_lowercase();
    assert_eq!(text.matches("http/1.1 200").count(), 2, "{text}");
    assert_eq!(text.matches("x-kept: yes").count(), 2, "{text}");
    for gone in ["x-hop", "keep-alive", "connection: close"] {
        assert!(!text.contains(gone), "{gone:?} reached the client: {text}");
    }
    assert!(text.contains("connects=1") && text.contains("connects=0"), "client connection not reused: {text}");
    let sent = std::iter::from_fn(|| seen.recv_timeout(Duration::from_secs(5)).ok())
        .map(|head| String::from_utf8_lossy(&head).to_ascii_lowercase())
        .find(|head| head.contains("x-fine: yes"))
        .expect("the app got the request");
    assert!(!sent.contains("x-secret") && !sent.contains("connection:"), "{sent}");
}

#[test]
fn http2_prior_knowledge_end_to_end() {
    let m = SmallMesh::start("http2", 1);
    let r = curl(&["--http2-prior-knowledge", &m.edge.url("backend", "/")]).expect("response");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("hello from backend v1 (instance backend-0) via HTTP/2"), "{}", r.body);
}

#[test]
fn grpc_unary_and_streaming_keep_trailers() {
    let m = SmallMesh::start("grpc", 1);
    let target = format!("127.0.0.1:{}", m.edge.ports["backend"]);
    let out = weft(&["demo-client", "--target", &target, "--name", "mesh"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "hello mesh from backend v1 (instance backend-0)");
    let out = weft(&["demo-client", "--target", &target, "--stream", "3"]);
    assert_eq!(stdout(&out).lines().count(), 3, "{}", stdout(&out));
    // Three messages, then a status in the trailers: the error must arrive intact.
    let out = weft(&["demo-client", "--target", &target, "--stream", "3", "--name", "fail"]);
    assert_eq!(stdout(&out).lines().count(), 3);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stream ended with Aborted: failed on purpose by backend v1 (instance backend-0)"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_end_to_end() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let m = tokio::task::spawn_blocking(|| SmallMesh::start("ws", 1)).await.unwrap();
    let url = format!("ws://127.0.0.1:{}/ws", m.edge.ports["backend"]);
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.expect("websocket handshake through the mesh");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::Text(format!("ping {i}").into())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("backend v1 (instance backend-0): ping {i}"));
    }
    ws.close(None).await.unwrap();
    tokio::task::spawn_blocking(move || drop(m)).await.unwrap();
}

/// An echo server owned by the test, standing in for a non-HTTP app.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn opaque_tcp_end_to_end() {
    let dir = TestDir::new("tcp");
    let control = Control::start(&dir);
    let app = echo_server();
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.args([
        "proxy",
        "--service",
        "echo",
        "--app-port",
        &app.to_string(),
        "--control",
        &control.addr,
        "--id",
        "echo-0",
    ]);
    cmd.env("WEFT_TOKEN", join_token(&control.addr, "echo"));
    let _sidecar = Proc::spawn(&dir, "echo-sidecar", &mut cmd);
    wait_until(Duration::from_secs(10), "echo healthy", || control.healthy_ids("echo").len() == 1);
    let edge = Edge::start(&dir, &control, &["echo"]);
    wait_until(Duration::from_secs(5), "edge sees echo", || edge.endpoint_addrs("echo").len() == 1);
    let mut s = TcpStream::connect(("127.0.0.1", edge.ports["echo"])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for msg in ["ping\n", "\x00\x01binary\x02", "hello world, this is not HTTP\r\n"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
}

#[test]
fn hundred_megabyte_bodies_stream_in_bounded_memory() {
    let m = SmallMesh::start("bigbody", 1);
    const SIZE: u64 = 100 * 1024 * 1024;
    let file = m.dir.path.join("upload.bin");
    {
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(SIZE).unwrap(); // sparse: zeros without writing 100 MB
    }
    let r = curl(&["-X", "POST", "--data-binary", &format!("@{}", file.display()), &m.edge.url("backend", "/count")]);
    let r = r.expect("upload response");
    assert_eq!((r.status, r.body.trim()), (200, SIZE.to_string().as_str()));
    let out = run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &m.edge.url("backend", &format!("/bytes/{SIZE}")),
        ],
    );
    assert_eq!(stdout(&out), format!("200 {SIZE}"));
    for (name, kib) in [("edge", m.edge.proc.peak_rss_kib()), ("backend sidecar", m.backends[0].proc.peak_rss_kib())] {
        eprintln!("{name} peak RSS: {} KiB", kib);
        assert!(kib < 64 * 1024, "{name} peak RSS {kib} KiB ≥ 64 MiB");
    }
}

/// An app that speaks one HTTP version only (`h2`: HTTP/2 with prior knowledge, h2c; else
/// HTTP/1.1) and answers every request with its version and its body. Runs on a thread until
/// the test process ends; returns the port.
fn single_version_app(h2: bool) -> u16 {
    single_version_app_on(TcpListener::bind("127.0.0.1:0").unwrap(), h2)
}

/// [`single_version_app`] on `listener`.
fn single_version_app_on(listener: TcpListener, h2: bool) -> u16 {
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let version = format!("{:?}", req.version());
                        let body = http_body_util::BodyExt::collect(req.into_body()).await?.to_bytes();
                        let mut out = format!("{version} ").into_bytes();
                        out.extend_from_slice(&body);
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(out))))
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                    }
                });
            }
        });
    });
    port
}

/// The declared protocol of a `Service` is what its sidecars speak to the app: an HTTP/2
/// client reaches an HTTP/1.1-only app and an HTTP/1.1 client an h2c-only app, bodies intact.
#[test]
fn sidecars_translate_between_http1_and_http2_for_apps_that_speak_one() {
    let dir = TestDir::new("translate");
    let control = Control::start(&dir);
    let services = dir.path.join("services.yaml");
    std::fs::write(
        &services,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: legacy}\nspec: {protocol: http}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: modern}\nspec: {protocol: http2}\n",
    )
    .unwrap();
    let out = weft(&["apply", "-f", services.to_str().unwrap(), "--control", &control.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _legacy = app_sidecar(&dir, &control, "legacy", single_version_app(false), &[]);
    let _modern = app_sidecar(&dir, &control, "modern", single_version_app(true), &[]);
    let edge = Edge::start(&dir, &control, &["legacy", "modern"]);
    wait_until(Duration::from_secs(5), "edge has both", || {
        edge.endpoint_addrs("legacy").len() == 1 && edge.endpoint_addrs("modern").len() == 1
    });
    let body = dir.path.join("body.bin");
    let payload: String = (0..50_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    std::fs::write(&body, &payload).unwrap();
    let data = format!("@{}", body.display());
    for (service, client, app_saw) in
        [("legacy", "--http2-prior-knowledge", "HTTP/1.1"), ("modern", "--http1.1", "HTTP/2.0")]
    {
        let r = curl(&[client, "--data-binary", &data, &edge.url(service, "/echo")]).unwrap();
        assert_eq!(r.status, 200, "{service} via {client}: {r:?}");
        assert_eq!(r.body, format!("{app_saw} {payload}"), "{service} via {client}: the app's answer differs");
        // And a GET without a body.
        let r = curl(&[client, &edge.url(service, "/")]).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, format!("{app_saw} ").as_str()), "{service} GET via {client}");
    }
}

/// Without a declared protocol, a sidecar learns what its app speaks (an h2c preface probe and
/// an HTTP/1.1 probe): an HTTP/2 client still reaches an HTTP/1.1-only app and an HTTP/1.1
/// client an h2c-only app; an app speaking both gets the client's version.
#[test]
fn sidecars_learn_what_their_app_speaks() {
    let dir = TestDir::new("learn-protocol");
    let control = Control::start(&dir);
    let _legacy = app_sidecar(&dir, &control, "legacy", single_version_app(false), &[]);
    let _modern = app_sidecar(&dir, &control, "modern", single_version_app(true), &[]);
    let _both = Instance::start(&dir, &control.addr, "both", "v1", "both-0", &[]);
    wait_until(Duration::from_secs(15), "all healthy", || {
        ["legacy", "modern", "both"].iter().all(|s| control.healthy_ids(s).len() == 1)
    });
    let edge = Edge::start(&dir, &control, &["legacy", "modern", "both"]);
    wait_until(Duration::from_secs(5), "edge has all three", || {
        ["legacy", "modern", "both"].iter().all(|s| edge.endpoint_addrs(s).len() == 1)
    });
    for (service, client, app_saw) in
        [("legacy", "--http2-prior-knowledge", "HTTP/1.1"), ("modern", "--http1.1", "HTTP/2.0")]
    {
        let r = curl(&[client, "--data-binary", "payload", &edge.url(service, "/echo")]).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, format!("{app_saw} payload").as_str()), "{service} via {client}");
    }
    // The demo app speaks both: it sees the client's version.
    let r = curl(&["--http2-prior-knowledge", &edge.url("both", "/info")]).unwrap();
    assert!(r.body.contains("HTTP/2"), "{r:?}");
    let r = curl(&["--http1.1", &edge.url("both", "/info")]).unwrap();
    assert!(r.body.contains("HTTP/1.1"), "{r:?}");
}

/// A sidecar that starts before its app (as `weft run` and most deployments start them) learns
/// what the app speaks before its first request needs it: from the moment the instance is
/// healthy, an HTTP/2 client reaches an HTTP/1.1-only app and an HTTP/1.1 client an h2c-only
/// app, without the seconds of 502s a later probe left.
#[test]
fn a_sidecar_started_before_its_app_translates_from_the_first_request() {
    let dir = TestDir::new("learn-late");
    let control = Control::start(&dir);
    let services =
        [("legacy", false, "--http2-prior-knowledge", "HTTP/1.1"), ("modern", true, "--http1.1", "HTTP/2.0")];
    let ports: Vec<u16> = services.iter().map(|_| free_port()).collect();
    let _sidecars: Vec<Proc> = services
        .iter()
        .zip(&ports)
        .map(|((service, ..), port)| {
            let mut cmd = Command::new(weft_bin());
            cmd.args(["proxy", "--service", service, "--app-port", &port.to_string(), "--health-interval", "100ms"]);
            cmd.args(["--control", &control.addr, "--id", service]);
            cmd.env("WEFT_TOKEN", join_token(&control.addr, service));
            Proc::spawn(&dir, service, &mut cmd)
        })
        .collect();
    let edge = Edge::start(&dir, &control, &["legacy", "modern"]);
    wait_until(Duration::from_secs(10), "both registered (not healthy: no app yet)", || {
        ["legacy", "modern"].iter().all(|s| control.endpoints(s).len() == 1)
    });
    // The sidecars have looked for their apps and found nothing listening.
    std::thread::sleep(Duration::from_millis(300));
    for ((service, h2, client, app_saw), port) in services.iter().zip(&ports) {
        single_version_app_on(TcpListener::bind(("127.0.0.1", *port)).unwrap(), *h2);
        wait_until(Duration::from_secs(10), "the edge sees the instance healthy", || {
            let dump = get_json(&edge.admin(), "/config_dump").unwrap_or_default();
            dump["endpoints"][service][0]["healthy"] == true
        });
        let r = curl(&[client, "--data-binary", "payload", &edge.url(service, "/echo")]).unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, format!("{app_saw} payload").as_str()),
            "{service} via {client}, first request after the app started: {r:?}"
        );
    }
}
