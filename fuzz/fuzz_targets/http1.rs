//! The HTTP/1 request path through the proxy, in process: bytes from a client go through a
//! listener as the proxy builds one (protocol detection, then the HTTP server and the
//! inbound or outbound stack, or opaque TCP) to a stub app (a hyper server recording what
//! reached it), over in-memory streams with tokio's clock paused (timeouts fire at once when
//! everything waits). The first input byte picks the direction, what the service does with
//! escaped slashes and how many writes the rest arrives in; the rest is what the client sends
//! before it closes its side.
//!
//! Properties: nothing panics; what the client gets back is HTTP/1 (or nothing), or HTTP/2 frames
//! starting with the server's SETTINGS when the client sent the HTTP/2 preface; the app sees
//! only normalised paths (what routing and policy saw); inbound, with a policy denying
//! `/admin`, no request for `/admin…` reaches the app.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::authz::{Authz, Match, PolicyDef, What, Who};
use weft_proxy::config::Direction;
use weft_proxy::config::EscapedSlashes;
use weft_proxy::inbound::{InboundPolicy, PolicyCell};
use weft_proxy::path::normalize;
use weft_proxy::testing::{Behaviour, FakeEndpoints, addr, app_listener, one_cluster, serve};

fn deny_admin() -> Arc<PolicyCell> {
    let policy = PolicyDef {
        name: "no-admin".into(),
        who: vec![Who::Any],
        what: vec![What::Path(Match::Prefix("/admin".into()))],
    };
    let cell = Arc::new(PolicyCell::default());
    cell.swap(Arc::new(InboundPolicy { authz: Some(Authz { deny: vec![policy], allow: None }), ..Default::default() }));
    cell
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, sent)) = data.split_first() else { return };
    let direction = if how & 1 == 0 { Direction::inbound } else { Direction::outbound };
    let writes = usize::from(how >> 1 & 7) + 1;
    let slashes = [EscapedSlashes::Keep, EscapedSlashes::Decode, EscapedSlashes::Reject][usize::from(how >> 4) % 3];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    rt.block_on(async {
        let fakes = Arc::new(FakeEndpoints::default());
        let app = fakes.add(addr(10), Behaviour::Answer { delay: Duration::ZERO });
        let clusters = one_cluster(fakes, "app", &[addr(10)]);
        let ctx = app_listener(direction, &clusters, deny_admin(), slashes);
        let (mut client, proxy_side) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve(proxy_side, ctx));
        let exchange = async {
            let (mut rx, mut tx) = tokio::io::split(&mut client);
            let send = async {
                for chunk in sent.chunks(sent.len().div_ceil(writes).max(1)) {
                    if tx.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = tx.shutdown().await;
            };
            let mut got = Vec::new();
            let (_, _) = tokio::join!(send, rx.read_to_end(&mut got));
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(3600), exchange).await.expect("the connection ends");
        if !got.is_empty() {
            if sent.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") {
                assert!(got.len() >= 9 && got[3] == 4, "an HTTP/2 client got {:?}", String::from_utf8_lossy(&got));
            } else {
                assert!(got.starts_with(b"HTTP/1."), "the client got {:?}", String::from_utf8_lossy(&got));
            }
        }
        let _ = served.await;
        let targets = app.targets.lock().unwrap();
        for t in targets.iter() {
            let path = t.split_once('?').map_or(t.as_str(), |(p, _)| p);
            assert_eq!(normalize(path, slashes).as_deref(), Ok(path), "the app was sent a path not in normal form");
        }
        if direction == Direction::inbound {
            assert!(!targets.iter().any(|t| t.starts_with("/admin")), "denied requests reached the app: {targets:?}");
        }
    });
});
