//! An in-process mesh: the control plane, sidecars and apps as tasks of the test's own tokio
//! runtime, talking over loopback exactly as processes do (TLS to the control plane, xDS,
//! mutual TLS between sidecars). Run under `#[tokio::test(start_paused = true)]`, time moves only
//! when every task waits on a timer, so what a policy does over time (ejections, rate limits,
//! health checks, delays, connection lifetimes) is tested exactly, in milliseconds of real time.
//!
//! The proxies' random choices (balancing, fault and mirror sampling, backoff jitter) come from
//! the test thread's generator, seeded at [`Mesh::start`] (`WEFT_TEST_SEED`, default 19), so a
//! run can be repeated; the order in which loopback sockets become ready still varies.
//!
//! Every part is configured by the flags a user types (`weft control`, `weft proxy`), so the
//! defaults are the shipped ones. What only processes show (signals, exit codes, ports held by
//! another process, resident memory, real clients such as curl) stays with the process-level
//! tests of this crate.
use crate::TestDir;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use weft_client::{ControlApi, ControlEndpoint};

/// A control plane serving on 127.0.0.1 (a port of its own choosing), with its data in a
/// scratch directory.
pub struct Mesh {
    pub control: SocketAddr,
    ca_file: PathBuf,
    api: ControlApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: TestDir,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Mesh::start_with(&[]).await
    }

    /// A control plane started with `flags` of `weft control` besides its address and data
    /// directory.
    pub async fn start_with(flags: &[&str]) -> Mesh {
        let _ = rustls::crypto::ring::default_provider().install_default();
        fastrand::seed(std::env::var("WEFT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(19));
        // What the parts log (`WEFT_LOG`, default warnings), shown with a failing test's output.
        let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let dir = TestDir::new("inprocess");
        let data = dir.path.join("control");
        let mut all = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned(), "--data-dir".to_owned()];
        all.push(data.display().to_string());
        all.extend(flags.iter().map(|f| f.to_string()));
        let config =
            weft_control::args::ControlArgs::from_flags(&all).expect("control flags").config().expect("config");
        let bound = weft_control::bind(config).await.expect("control plane binds");
        let control = bound.local_addr();
        let ca_file = bound.trust_bundle_file().to_owned();
        let endpoint = ControlEndpoint {
            address: control.to_string(),
            ca_file: ca_file.clone(),
            credential: Some(bound.admin_token().to_owned()),
        };
        let api = ControlApi::new(endpoint).expect("API client");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        Mesh { control, ca_file, api, stop: Some(stop), _dir: dir }
    }

    /// Stops the control plane (its port closes; the proxies keep running).
    pub async fn stop_control(&mut self) {
        drop(self.stop.take());
        wait_until("the control plane's port closed", async || {
            tokio::net::TcpStream::connect(self.control).await.is_err()
        })
        .await;
    }

    /// `weft apply` of `yaml`, which must be accepted.
    pub async fn apply(&self, yaml: &str) {
        if let Err(e) = self.try_apply(yaml).await {
            panic!("apply refused: {e}\n{yaml}");
        }
    }

    /// `weft apply` of `yaml`: the control plane's refusal (`path: reason`), if it refuses.
    pub async fn try_apply(&self, yaml: &str) -> Result<(), String> {
        let docs = weft_api::resource::parse_documents(yaml).map_err(|e| e.to_string())?;
        let body = serde_json::json!({ "resources": docs }).to_string();
        let (status, answer) = self
            .api
            .call(http::Method::POST, "/api/v1/apply", Some(body), Duration::from_secs(5))
            .await
            .map_err(|e| e.message)?;
        if status.is_success() {
            return Ok(());
        }
        let v: Value = serde_json::from_slice(&answer).unwrap_or_default();
        let e = &v["errors"][0];
        Err(format!("{status}: {}: {}", e["path"].as_str().unwrap_or("-"), e["reason"].as_str().unwrap_or("-")))
    }

    /// A join token for `identity` (a service's name, or any name for a proxy without one).
    pub async fn token(&self, identity: &str) -> String {
        let body = serde_json::json!({ "service": identity, "ttlSeconds": 3600 }).to_string();
        let answer = self.api.call_ok(http::Method::POST, "/api/v1/tokens", Some(body)).await.expect("token");
        let v: Value = serde_json::from_slice(&answer).expect("token JSON");
        v["token"].as_str().expect("token").to_owned()
    }

    /// `weft proxy FLAGS --control … --ca-file …` with a join token for `identity`: started, not
    /// yet necessarily holding config (see [`Proxy::wait_endpoints`]).
    pub async fn proxy(&self, identity: &str, flags: &[&str]) -> Proxy {
        let mut all: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        all.extend(["--control".to_owned(), self.control.to_string(), "--ca-file".to_owned()]);
        all.push(self.ca_file.display().to_string());
        let mut opts = weft_proxy::args::ProxyArgs::from_flags(&all).expect("proxy flags").options().expect("options");
        opts.token = Some(self.token(identity).await);
        let running = weft_proxy::start(opts).await.expect("proxy starts");
        Proxy { running, client: client() }
    }

    /// The sidecar `id` of `service` in front of `app`, with `flags` besides.
    pub async fn sidecar(&self, service: &str, id: &str, app: &App, flags: &[&str]) -> Proxy {
        let port = app.addr.port().to_string();
        let mut all = vec!["--service", service, "--id", id, "--app-port", &port];
        all.extend(flags);
        self.proxy(service, &all).await
    }

    /// A proxy with no app of its own (identity `identity`) serving each of `services` on a
    /// local port: how a test, as a client outside the mesh, sends traffic in.
    pub async fn edge(&self, identity: &str, services: &[&str]) -> Proxy {
        let upstreams: Vec<String> = services.iter().map(|s| format!("{s}=127.0.0.1:0")).collect();
        let mut flags = vec!["--id", identity];
        for u in &upstreams {
            flags.extend(["--upstream", u]);
        }
        self.proxy(identity, &flags).await
    }

    /// Instances of `service` the registry calls healthy.
    pub async fn healthy(&self, service: &str) -> usize {
        let path = format!("/api/v1/services/{service}/endpoints");
        let Ok(answer) = self.api.call_ok(http::Method::GET, &path, None).await else { return 0 };
        let v: Value = serde_json::from_slice(&answer).unwrap_or_default();
        v.as_array().map_or(0, |a| a.iter().filter(|e| e["healthy"] == true).count())
    }
}

/// A running proxy of the in-process mesh.
pub struct Proxy {
    pub running: weft_proxy::RunningProxy,
    client: Client,
}

impl Proxy {
    /// `http://ADDR{path}` of the local listener for `service`.
    pub fn url(&self, service: &str, path: &str) -> String {
        let addr = self.running.upstream(service).unwrap_or_else(|| panic!("no upstream {service}"));
        format!("http://{addr}{path}")
    }

    /// The proxy's `/config_dump`.
    pub async fn config_dump(&self) -> Value {
        let (_, body) = self.client.get(&format!("http://{}/config_dump", self.running.admin())).await;
        serde_json::from_slice(&body).unwrap_or_default()
    }

    /// Waits (at most 10 s of the test's clock) until the proxy holds `n` endpoints of `service`.
    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        wait_until(&format!("{n} endpoints of {service}"), async || {
            self.config_dump().await["endpoints"][service].as_array().map_or(0, Vec::len) == n
        })
        .await;
    }

    /// Waits until `/config_dump`'s value at `pointer` (a JSON pointer) is set.
    pub async fn wait_config(&self, pointer: &str) {
        self.wait_dump(&format!("{pointer} in force"), |dump| !dump.pointer(pointer).unwrap_or(&Value::Null).is_null())
            .await;
    }

    /// Waits until `/config_dump` passes `check`.
    pub async fn wait_dump(&self, what: &str, check: impl Fn(&Value) -> bool) {
        wait_until(what, async || check(&self.config_dump().await)).await;
    }

    /// The sum of counter `name` over the series whose labels include all of `labels`.
    pub async fn counter(&self, name: &str, labels: &[&str]) -> u64 {
        let (_, body) = self.client.get(&format!("http://{}/metrics", self.running.admin())).await;
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
            .filter(|l| labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// Polls `check` every 10 ms of the test's clock, for at most 10 s of it.
pub async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An HTTP/1.1 app on 127.0.0.1: answers each request with the status its script picks from
/// the path, after its delay, and counts what it answered (all but `OPTIONS *`, which its
/// sidecar sends once to learn its HTTP versions).
pub struct App {
    pub addr: SocketAddr,
    /// Requests the app answered (its script may count its own way instead).
    pub count: Arc<AtomicU32>,
}

impl App {
    /// Answers every request 200.
    pub async fn ok() -> App {
        App::scripted(Duration::ZERO, |_, count| {
            count.fetch_add(1, Ordering::SeqCst);
            200
        })
        .await
    }

    /// The `n`-th request (from 1) is answered 503 when `fails(n)`, else 200.
    pub async fn failing(fails: fn(u32) -> bool) -> App {
        App::scripted(
            Duration::ZERO,
            move |_, count| if fails(count.fetch_add(1, Ordering::SeqCst) + 1) { 503 } else { 200 },
        )
        .await
    }

    /// Answers with `answer(path, count)` after `delay`.
    pub async fn scripted(delay: Duration, answer: impl Fn(&str, &AtomicU32) -> u16 + Send + Sync + 'static) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("app binds");
        let addr = listener.local_addr().expect("app address");
        let count = Arc::new(AtomicU32::new(0));
        let (seen, answer) = (count.clone(), Arc::new(answer));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (seen, answer) = (seen.clone(), answer.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        // A sidecar's probe of the app's HTTP versions is answered apart.
                        let probe = req.uri() == "*";
                        let status = if probe { 200 } else { answer(req.uri().path(), &seen) };
                        async move {
                            if !probe {
                                tokio::time::sleep(delay).await;
                            }
                            let mut r = http::Response::new(Full::new(Bytes::from_static(b"x")));
                            *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        App { addr, count }
    }

    pub fn answered(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }
}

/// An HTTP/1.1 client with a pool of keep-alive connections.
#[derive(Clone)]
pub struct Client(HyperClient<HttpConnector, Empty<Bytes>>);

pub fn client() -> Client {
    Client(HyperClient::builder(TokioExecutor::new()).build_http())
}

/// A response as a test looks at it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub took: Duration,
}

impl Client {
    /// A GET: the status and the body (status 0: no answer).
    pub async fn get(&self, url: &str) -> (u16, Bytes) {
        match self.0.get(url.parse().expect("url")).await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default())
            }
            Err(_) => (0, Bytes::new()),
        }
    }

    /// A GET, timed on the test's clock, with the response's headers.
    pub async fn request(&self, url: &str) -> Answer {
        let started = tokio::time::Instant::now();
        match self.0.get(url.parse().expect("url")).await {
            Ok(r) => {
                let (parts, body) = r.into_parts();
                let _ = body.collect().await;
                Answer { status: parts.status.as_u16(), headers: parts.headers, took: started.elapsed() }
            }
            Err(_) => Answer { status: 0, headers: http::HeaderMap::new(), took: started.elapsed() },
        }
    }

    /// `n` GETs of `url`, `concurrency` at a time: each answer, in the order they ended.
    pub async fn load(&self, url: &str, n: usize, concurrency: usize) -> Vec<Answer> {
        let next = Arc::new(AtomicU32::new(0));
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, next, url) = (self.clone(), next.clone(), url.to_owned());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while (next.fetch_add(1, Ordering::Relaxed) as usize) < n {
                        out.push(client.request(&url).await);
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("load worker"));
        }
        all
    }

    /// The statuses of [`Client::load`].
    pub async fn statuses(&self, url: &str, n: usize, concurrency: usize) -> Vec<u16> {
        self.load(url, n, concurrency).await.into_iter().map(|a| a.status).collect()
    }

    /// A GET of `url` every `every` of the test's clock for `window`: the statuses.
    pub async fn paced(&self, url: &str, every: Duration, window: Duration) -> Vec<u16> {
        let end = tokio::time::Instant::now() + window;
        let mut tick = tokio::time::interval(every);
        let mut sent = Vec::new();
        while tick.tick().await < end {
            let (client, url) = (self.clone(), url.to_owned());
            sent.push(tokio::spawn(async move { client.get(&url).await.0 }));
        }
        let mut out = Vec::new();
        for s in sent {
            out.push(s.await.expect("request"));
        }
        out
    }
}
