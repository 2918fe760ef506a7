//! The control plane's JSON admin API, used by the `weft` CLI and by proxies to report health.
//!
//! | method | path | what |
//! |---|---|---|
//! Every route needs the admin credential (`Authorization: Bearer …`, created at first start in
//! `DATA_DIR/admin.token`) except /healthz, /metrics and the three routes proxies use, which
//! take the proxy's join token instead.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /healthz | liveness of the control plane (no credential) |
//! | GET | /metrics | the control plane's Prometheus metrics (no credential) |
//! | GET | /api/v1/prometheus/targets | every proxy's metrics endpoint, Prometheus HTTP service discovery (metrics or admin credential) |
//! | POST | /api/v1/certificates | a proxy's CSR → its certificate (join token) |
//! | PUT | /api/v1/instances/{id}/health | a proxy reports its app's health (join token) |
//! | DELETE | /api/v1/instances/{id} | a proxy deregisters on a clean stop (join token) |
//! | GET | /api/v1/certificates | every proxy's current certificate |
//! | GET, POST | /api/v1/tokens | join tokens: list, create `{service, ttlSeconds}` |
//! | DELETE | /api/v1/tokens/{id} | revoke a join token (by id or the token itself) |
//! | GET | /api/v1/ca | trust domain, signing root and trust bundle |
//! | POST | /api/v1/ca/rotate | rotate the root `{overlapSeconds}` |
//! | GET | /api/v1/services | services with instance counts |
//! | GET | /api/v1/services/{name}/endpoints | instances of a service |
//! | GET | /api/v1/proxies | connected xDS clients, what they ACKed, their last NACK |
//! | GET | /api/v1/replicas | the control plane's replicas: address, health, leader, proxies, start |
//! | GET | /api/v1/store/backup | the mesh's resources, tokens, virtual IPs and secrets (`weft store backup`) |
//! | GET | /api/v1/check | `weft check`'s control-plane checks, and the control plane's clock |
//! | GET | /api/v1/resources/{kind}[/{name}] | applied resources |
//! | POST | /api/v1/apply | validate and store resources (all or nothing) |
//! | DELETE | /api/v1/resources/{kind}/{name} | delete a resource |
//! | GET, POST | /api/v1/peers | peerings with other datacenters: list, create `{name, ttlSeconds}` → its token |
//! | POST | /api/v1/peers/accept | accept a peer's token `{name, token}` |
//! | DELETE | /api/v1/peers/{name} | end a peering |
//! | POST | /api/v1/peering/establish | a peer trades its token's one-time secret (the secret is the credential) |
//! | POST, DELETE | /api/v1/peering/exchange | a peer's exchange of states, or its end (the peering's secret) |
use crate::security::IssueError;
use crate::state::Mesh;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use weft_api::Resource;
use weft_api::identity::CertificateRequest;
use weft_api::registry::HealthReport;
use weft_api::resource::{ApplyError, Kind};

pub fn router(mesh: Arc<Mesh>) -> Router {
    let admin = Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}/endpoints", get(endpoints))
        .route("/api/v1/services/{name}/policy", get(in_force))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/replicas", get(replicas))
        .route("/api/v1/store/backup", get(backup))
        .route("/api/v1/resources/{kind}", get(list))
        .route("/api/v1/resources/{kind}/{name}", get(get_one).delete(delete))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/certificates", get(certificates))
        .route("/api/v1/tokens", get(tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/ca", get(ca_info))
        .route("/api/v1/ca/rotate", post(rotate))
        .route("/api/v1/check", get(check))
        .route("/api/v1/stat/{by}", get(stat))
        .route("/api/v1/tap", get(tap))
        .merge(crate::peering::admin_routes())
        .route_layer(axum::middleware::from_fn_with_state(mesh.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/certificates", post(issue))
        .route("/api/v1/instances/{id}/health", put(health))
        .route("/api/v1/instances/{id}", axum::routing::delete(deregister))
        .route("/api/v1/prometheus/targets", get(scrape_targets))
        .merge(crate::peering::peer_routes())
        .merge(admin)
        .with_state(mesh)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim())
}

async fn require_admin(State(mesh): State<Arc<Mesh>>, req: axum::extract::Request, next: Next) -> Response {
    if mesh.security.is_admin(bearer(req.headers())) {
        return next.run(req).await;
    }
    let why =
        if bearer(req.headers()).is_some() { "the admin credential is wrong" } else { "no admin credential was sent" };
    ApiError(
        StatusCode::UNAUTHORIZED,
        format!(
            "{why}: this API needs the control plane's admin credential (DATA_DIR/admin.token). The weft CLI reads it from WEFT_ADMIN_TOKEN or from the credentials file the control plane writes (~/.config/weft/credentials.json, or $WEFT_CONFIG)"
        ),
    )
    .into_response()
}

async fn metrics(State(mesh): State<Arc<Mesh>>) -> Response {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &mesh.security.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out).into_response()
}

/// Prometheus HTTP service discovery: a target group per proxy.
async fn scrape_targets(State(mesh): State<Arc<Mesh>>, headers: HeaderMap) -> ApiResult {
    if !mesh.security.is_metrics_reader(bearer(&headers)) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "the scrape targets need the metrics credential (DATA_DIR/{}) or the admin one",
                crate::security::METRICS_TOKEN_FILE
            ),
        ));
    }
    Ok(Json(mesh.scrape_targets()).into_response())
}

async fn issue(
    State(mesh): State<Arc<Mesh>>,
    headers: HeaderMap,
    body: Result<Json<CertificateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    match mesh.security.issue(bearer(&headers), &req) {
        Ok(cert) => Ok(Json(cert).into_response()),
        Err(e @ IssueError::Csr(_)) => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::FORBIDDEN, e.to_string())),
    }
}

/// A proxy acting on its own instance: its join token must name the instance's service.
fn instance_caller(mesh: &Mesh, headers: &HeaderMap, id: &str) -> Result<(), ApiError> {
    if mesh.security.is_admin(bearer(headers)) {
        return Ok(());
    }
    let service = mesh.instance_service(id).ok_or_else(|| no_instance(id))?;
    mesh.security
        .check_token("api", bearer(headers), service.as_deref())
        .map(drop)
        .map_err(|e| ApiError(StatusCode::FORBIDDEN, e.to_string()))
}

async fn certificates(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.security.certificates()).into_response()
}

async fn tokens(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.security.tokens()).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateToken {
    service: String,
    ttl_seconds: u64,
}

async fn create_token(
    State(mesh): State<Arc<Mesh>>,
    body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    weft_api::resource::valid_name(&body.service)
        .map_err(|why| ApiError(StatusCode::BAD_REQUEST, format!("service name {:?} {why}", body.service)))?;
    if body.ttl_seconds == 0 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "ttlSeconds must be at least 1".into()));
    }
    let (info, token) = mesh
        .security
        .create_token(&body.service, std::time::Duration::from_secs(body.ttl_seconds))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    stored(&mesh).await?;
    Ok(Json(json!({ "token": token, "info": info })).into_response())
}

async fn revoke_token(State(mesh): State<Arc<Mesh>>, Path(id): Path<String>) -> ApiResult {
    match mesh.security.revoke(&id) {
        Ok(Some(info)) => {
            stored(&mesh).await?;
            Ok(Json(info).into_response())
        }
        Ok(None) => {
            Err(ApiError(StatusCode::NOT_FOUND, format!("no join token {id:?} was issued here (or it has expired)")))
        }
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn ca_info(State(mesh): State<Arc<Mesh>>) -> Response {
    let ca = &mesh.security.ca;
    Json(json!({
        "trustDomain": ca.config().trust_domain,
        "namespace": ca.config().namespace,
        "certTtlSeconds": ca.config().cert_ttl.as_secs(),
        "root": ca.root_pem(),
        "rootFingerprint": ca.root_fingerprint(),
        "bundle": ca.bundle(),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rotate {
    overlap_seconds: u64,
}

async fn rotate(
    State(mesh): State<Arc<Mesh>>,
    body: Result<Json<Rotate>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let overlap = std::time::Duration::from_secs(body.overlap_seconds);
    match mesh.rotate(overlap, std::time::Duration::from_secs(10)).await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(e) => Err(ApiError(StatusCode::CONFLICT, format!("{e:#}"))),
    }
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// What answers a path nothing serves (a misspelled one, a trailing slash, other case or
/// percent-encoding): 404. Only a gRPC request outside `/api/` gets gRPC's own answer for an
/// unknown method, UNIMPLEMENTED, which gRPC clients expect.
pub async fn unknown_path(req: axum::extract::Request) -> Response {
    let path = req.uri().path();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"));
    if grpc && !path.starts_with("/api/") {
        return tonic::Status::unimplemented(format!("no gRPC method {path}")).into_http();
    }
    let msg = format!("no API at {} {path}; the paths are listed under `weft control` in the README", req.method());
    ApiError(StatusCode::NOT_FOUND, msg).into_response()
}

fn kind(s: &str) -> Result<Kind, ApiError> {
    Kind::parse(s).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "unknown kind {s:?}; known kinds: services, httproutes, authorizationpolicies, requestauthentications, trafficpolicies"
            ),
        )
    })
}

async fn services(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.services()).into_response()
}

async fn endpoints(State(mesh): State<Arc<Mesh>>, Path(name): Path<String>) -> ApiResult {
    let e =
        mesh.endpoints(&name).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no service named {name:?}")))?;
    Ok(Json(e).into_response())
}

async fn in_force(State(mesh): State<Arc<Mesh>>, Path(name): Path<String>) -> ApiResult {
    let v =
        mesh.in_force(&name).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no service named {name:?}")))?;
    Ok(Json(v).into_response())
}

async fn check(State(mesh): State<Arc<Mesh>>) -> Response {
    let time = crate::ca::unix(std::time::SystemTime::now());
    Json(json!({"time": time, "checks": crate::check::run(&mesh)})).into_response()
}

#[derive(Deserialize)]
struct StatQuery {
    name: Option<String>,
    /// A duration (`1m`, `30s`); one minute by default.
    window: Option<String>,
}

/// `GET /api/v1/stat/{services|routes|instances|edges}?name=&window=`: from the proxies'
/// reports (see traffic.rs).
async fn stat(
    State(mesh): State<Arc<Mesh>>,
    Path(by): Path<String>,
    axum::extract::Query(q): axum::extract::Query<StatQuery>,
) -> ApiResult {
    let by: crate::traffic::StatBy = serde_json::from_value(json!(by)).map_err(|_| {
        ApiError(StatusCode::BAD_REQUEST, format!("cannot group by {by:?}: services, routes, instances or edges"))
    })?;
    let window = match q.window.as_deref() {
        None => std::time::Duration::from_secs(60),
        Some(w) => {
            weft_api::duration::parse(w).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("window: {e}")))?
        }
    };
    if window < weft_api::report::INTERVAL * 2 || window > crate::traffic::KEEP {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "window {window:?} is out of range: from {:?} (two reports) to {:?} (what is kept)",
                weft_api::report::INTERVAL * 2,
                crate::traffic::KEEP
            ),
        ));
    }
    let rows = mesh.traffic.stat(by, q.name.as_deref(), window);
    Ok(Json(json!({"window_seconds": window.as_secs(), "rows": rows})).into_response())
}

#[derive(Deserialize)]
struct TapQuery {
    service: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    headers: bool,
    /// Events per second per proxy (default 100).
    rate: Option<u32>,
}

/// `GET /api/v1/tap?service=&path=&method=&to=&headers=&rate=`: a live stream of the requests
/// the proxies see, one JSON object per line, until the client goes away (which stops the
/// tap). A line `{"dropped": N}` every few seconds counts the events left out so far.
async fn tap(State(mesh): State<Arc<Mesh>>, axum::extract::Query(q): axum::extract::Query<TapQuery>) -> ApiResult {
    let known = mesh.services();
    for (field, name) in [("service", &q.service), ("to", &q.to)] {
        if !name.is_empty() && !known.iter().any(|s| &s.name == name) {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("{field}: no service {name:?} (weft get services)")));
        }
    }
    if !q.path.is_empty() && !q.path.starts_with('/') {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("path {:?} does not start with /", q.path)));
    }
    let order = weft_api::report::TapStart {
        id: String::new(),
        service: q.service,
        path_prefix: q.path,
        method: q.method.to_ascii_uppercase(),
        to: q.to,
        headers: q.headers,
        max_per_second: q.rate.unwrap_or(100),
    };
    let stream = mesh.traffic.tap(order);
    let tick = tokio::time::interval(std::time::Duration::from_secs(2));
    let lines = futures::stream::unfold((stream, tick), |(mut stream, mut tick)| async move {
        let line = tokio::select! {
            e = stream.events.recv() => serde_json::to_vec(&crate::traffic::event_json(&e?)).ok()?,
            _ = tick.tick() => serde_json::to_vec(&json!({"dropped": stream.dropped.load(std::sync::atomic::Ordering::Relaxed)})).ok()?,
        };
        let mut line = line;
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line)), (stream, tick)))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(lines)).into_response())
}

async fn proxies(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.proxies()).into_response()
}

async fn backup(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.backup()).into_response()
}

async fn replicas(State(mesh): State<Arc<Mesh>>) -> ApiResult {
    let replicas = mesh.replicas().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    Ok(Json(replicas).into_response())
}

async fn list(State(mesh): State<Arc<Mesh>>, Path(k): Path<String>) -> ApiResult {
    Ok(Json(mesh.resources_with_status(kind(&k)?)).into_response())
}

async fn get_one(State(mesh): State<Arc<Mesh>>, Path((k, name)): Path<(String, String)>) -> ApiResult {
    let k = kind(&k)?;
    let r = mesh.resources_with_status(k).into_iter().find(|r| r["metadata"]["name"] == name.as_str());
    let r = r.ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no {k} named {name:?}")))?;
    Ok(Json(r).into_response())
}

#[derive(Deserialize)]
struct ApplyBody {
    resources: Vec<serde_json::Value>,
}

async fn apply(
    State(mesh): State<Arc<Mesh>>,
    body: Result<Json<ApplyBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let parsed: Result<Vec<Resource>, ApplyError> =
        body.resources.into_iter().enumerate().map(|(i, v)| Resource::from_json(i, v)).collect();
    // Issuers' keys are read before anything is stored: a source that cannot be read fails
    // the apply.
    let outcome = match parsed {
        Ok(r) => match crate::jwks::load_for_apply(&r).await {
            Ok(jwks) => mesh.apply(r, jwks),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    Ok(match outcome {
        Ok(applied) => {
            stored(&mesh).await?;
            Json(json!({ "applied": applied })).into_response()
        }
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "errors": [e] }))).into_response(),
    })
}

async fn delete(State(mesh): State<Arc<Mesh>>, Path((k, name)): Path<(String, String)>) -> ApiResult {
    let k = kind(&k)?;
    match mesh.delete(k, &name) {
        Ok(true) => {
            stored(&mesh).await?;
            Ok(Json(json!({ "deleted": { "kind": k, "name": name } })).into_response())
        }
        Ok(false) => Err(ApiError(StatusCode::NOT_FOUND, format!("no {k} named {name:?}"))),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// A change is answered once it is durable: at once with the embedded store, once etcd has
/// confirmed it with a shared one.
async fn stored(mesh: &Mesh) -> Result<(), ApiError> {
    mesh.flushed().await.map_err(|e| {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the change is made at this control plane, but {e}"))
    })
}

fn no_instance(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no instance {id:?} is registered"))
}

async fn health(
    State(mesh): State<Arc<Mesh>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(report): Json<HealthReport>,
) -> ApiResult {
    instance_caller(&mesh, &headers, &id)?;
    if !mesh.set_health(&id, report.healthy) {
        return Err(no_instance(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn deregister(State(mesh): State<Arc<Mesh>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    instance_caller(&mesh, &headers, &id)?;
    if !mesh.deregister(&id) {
        return Err(no_instance(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
