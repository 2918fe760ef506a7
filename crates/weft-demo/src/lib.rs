//! The demo application shipped with weft (`weft demo-app`): one port serving HTTP/1.1, HTTP/2
//! (h2c), gRPC and WebSocket. Every answer names the service, version and instance that gave
//! it, so traffic through the mesh can be followed. With an upstream it also calls that
//! upstream (through its sidecar) and includes the answer.
#![forbid(unsafe_code)]

pub mod pb {
    tonic::include_proto!("weft.demo.v1");
}

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use pb::demo_client::DemoClient;
use pb::demo_server::{Demo, DemoServer};
use pb::{HelloReply, HelloRequest};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Status, Streaming};

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub listen: SocketAddr,
    pub service: String,
    pub version: String,
    pub instance: String,
    /// The upstream service this app calls, if any, HOST:PORT: its sidecar's local listener
    /// (`127.0.0.1:9001`), or, in a transparent instance, the service's name (`backend:80`).
    pub upstream: Option<String>,
    /// The share of `/` and `/info` requests answered `500` on purpose (0 to 100; exactly
    /// that share, spread evenly), to show failures in metrics and logs.
    pub fail_percent: u8,
}

struct App {
    cfg: DemoConfig,
    /// Requests to `/` and `/info` so far, for `fail_percent`.
    served: std::sync::atomic::AtomicU64,
    http: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
}

impl App {
    fn reply(&self, message: String) -> HelloReply {
        HelloReply {
            message,
            service: self.cfg.service.clone(),
            version: self.cfg.version.clone(),
            instance: self.cfg.instance.clone(),
        }
    }

    /// Whether this request is one of the `fail_percent` share answered 500.
    fn fails_now(&self) -> Option<Response> {
        let p = u64::from(self.cfg.fail_percent.min(100));
        let n = self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ((n + 1) * p / 100 > n * p / 100).then(|| {
            let text = format!("failed on purpose by {} (--fail-percent {p})\n", self.who());
            served_by(self, (axum::http::StatusCode::INTERNAL_SERVER_ERROR, text).into_response())
        })
    }

    fn who(&self) -> String {
        format!("{} {} (instance {})", self.cfg.service, self.cfg.version, self.cfg.instance)
    }
}

pub async fn run(cfg: DemoConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("demo app cannot listen on {}: {e}", cfg.listen))?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let app = Arc::new(App { cfg, http, served: Default::default() });
    let grpc = tonic::service::Routes::new(DemoServer::from_arc(app.clone())).prepare().into_axum_router();
    let router = Router::new()
        .route("/", get(index))
        .route("/info", get(info))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/bytes/{n}", get(bytes_stream))
        .route("/echo", post(echo))
        .route("/count", post(count))
        .route("/status/{code}", any(status))
        .route("/delay/{ms}", get(delay))
        .route("/ws", get(ws))
        .with_state(app.clone())
        .merge(grpc);
    tracing::info!(listen = %app.cfg.listen, who = %app.who(), "demo app serving");
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Calls the demo gRPC service at `target` and prints what comes back.
pub async fn call(target: SocketAddr, name: &str, stream: Option<u32>) -> anyhow::Result<()> {
    let mut client = DemoClient::connect(format!("http://{target}"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {target}: {e}"))?;
    let req = HelloRequest { name: name.to_owned(), count: stream.unwrap_or(0) };
    match stream {
        None => {
            let r = client
                .hello(req)
                .await
                .map_err(|s| anyhow::anyhow!("gRPC call failed: {} ({:?})", s.message(), s.code()))?;
            println!("{}", r.into_inner().message);
        }
        Some(_) => {
            let mut replies = client
                .hello_stream(req)
                .await
                .map_err(|s| anyhow::anyhow!("gRPC call failed: {}", s.message()))?
                .into_inner();
            while let Some(r) = replies
                .message()
                .await
                .map_err(|s| anyhow::anyhow!("stream ended with {:?}: {}", s.code(), s.message()))?
            {
                println!("{}", r.message);
            }
        }
    }
    Ok(())
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// The headers that carry a request's trace context (W3C, then B3). The app copies them from the
/// request it serves to the requests it makes on its behalf, so each of its calls continues the
/// trace the mesh started (every app in a traced mesh must, in whatever way its framework has).
const TRACE_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

fn served_by(app: &App, mut r: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&app.cfg.instance) {
        r.headers_mut().insert("x-served-by", v);
    }
    r
}

async fn index(State(app): State<Arc<App>>, req: axum::extract::Request) -> Response {
    if let Some(failed) = app.fails_now() {
        return failed;
    }
    let mut text = format!("hello from {} via {}\n", app.who(), proto(req.version()));
    if let Some(up) = &app.cfg.upstream {
        let mut call = axum::http::Request::get(format!("http://{up}/")).body(Body::empty()).expect("valid request");
        for name in TRACE_HEADERS {
            if let Some(v) = req.headers().get(*name) {
                call.headers_mut().insert(*name, v.clone());
            }
        }
        match app.http.request(call).await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                text.push_str(&format!("  upstream ({status}): {}", String::from_utf8_lossy(&body)));
            }
            Err(e) => text.push_str(&format!("  upstream call failed: {e}\n")),
        }
    }
    served_by(&app, text.into_response())
}

async fn info(State(app): State<Arc<App>>, req: axum::extract::Request) -> Response {
    if let Some(failed) = app.fails_now() {
        return failed;
    }
    let body = serde_json::json!({
        "service": app.cfg.service, "version": app.cfg.version,
        "instance": app.cfg.instance, "protocol": proto(req.version()),
    });
    served_by(&app, Json(body).into_response())
}

/// Streams `n` bytes without ever holding them all.
async fn bytes_stream(State(app): State<Arc<App>>, Path(n): Path<u64>) -> Response {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'w'; CHUNK]);
    let stream = futures::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64) as usize;
            Some((Ok::<_, std::io::Error>(chunk.slice(..take)), left - take as u64))
        }
    });
    let mut r = Body::from_stream(stream).into_response();
    r.headers_mut().insert("content-length", HeaderValue::from(n));
    served_by(&app, r)
}

async fn echo(State(app): State<Arc<App>>, body: Body) -> Response {
    served_by(&app, Body::from_stream(body.into_data_stream()).into_response())
}

async fn count(State(app): State<Arc<App>>, body: Body) -> Response {
    let mut n = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => n += c.len() as u64,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("body error: {e}\n")).into_response(),
        }
    }
    served_by(&app, format!("{n}\n").into_response())
}

async fn status(State(app): State<Arc<App>>, Path(code): Path<u16>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    served_by(&app, (code, format!("status {code}\n")).into_response())
}

/// Answers after `ms` milliseconds (at most a minute): a slow upstream, for timeouts.
async fn delay(State(app): State<Arc<App>>, Path(ms): Path<u64>) -> Response {
    let ms = ms.min(60_000);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    served_by(&app, format!("waited {ms} ms\n").into_response())
}

async fn ws(State(app): State<Arc<App>>, upgrade: WebSocketUpgrade) -> Response {
    let who = app.who();
    upgrade.on_upgrade(move |mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(format!("{who}: {t}").into()),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

#[tonic::async_trait]
impl Demo for App {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<tonic::Response<HelloReply>, Status> {
        let (incoming, _, req) = req.into_parts();
        let name = req.name;
        let mut message = format!("hello {name} from {}", self.who());
        if let Some(up) = &self.cfg.upstream {
            let mut client = DemoClient::connect(format!("http://{up}"))
                .await
                .map_err(|e| Status::unavailable(format!("upstream {up}: {e}")))?;
            let mut call = Request::new(HelloRequest { name, count: 0 });
            for name in TRACE_HEADERS {
                if let Some(v) = incoming.get(*name) {
                    call.metadata_mut().insert(*name, v.clone());
                }
            }
            let r = client.hello(call).await?.into_inner();
            message = format!("{message} -> {}", r.message);
        }
        Ok(tonic::Response::new(self.reply(message)))
    }

    type HelloStreamStream = ReplyStream;

    async fn hello_stream(&self, req: Request<HelloRequest>) -> Result<tonic::Response<ReplyStream>, Status> {
        let req = req.into_inner();
        let replies: Vec<Result<HelloReply, Status>> = (0..req.count)
            .map(|i| Ok(self.reply(format!("hello {} #{i} from {}", req.name, self.who()))))
            .chain((req.name == "fail").then(|| Err(Status::aborted(format!("failed on purpose by {}", self.who())))))
            .collect();
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(replies))))
    }

    type EchoStream = ReplyStream;

    async fn echo(&self, req: Request<Streaming<HelloRequest>>) -> Result<tonic::Response<ReplyStream>, Status> {
        let who = self.who();
        let template = self.reply(String::new());
        let out = req
            .into_inner()
            .map(move |r| r.map(|r| HelloReply { message: format!("{} from {who}", r.name), ..template.clone() }));
        Ok(tonic::Response::new(Box::pin(out)))
    }
}
