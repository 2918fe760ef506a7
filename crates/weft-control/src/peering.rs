//! Peering with other datacenters: the API that makes and accepts peering tokens, and the
//! exchange that keeps two peered control planes told of each other.
//!
//! The acceptor trades the token's one-time secret for the exchange's secret
//! (`POST /api/v1/peering/establish`), then calls `POST /api/v1/peering/exchange` again and
//! again (the elected replica, where there are several): each call carries its own state
//! and the digest of the creator's state it holds; the creator stores the acceptor's state
//! and answers as soon as its own state differs from that digest (or after
//! [`EXCHANGE_WAIT_SECS`] with it unchanged). A change on the acceptor's side sends a new call
//! at once. So each side learns the other's changes as they happen, over connections only
//! the acceptor opens. While a peer cannot be reached, its last state stays in force.
use crate::peers::{PeerRecord, Role, digest, new_secret};
use crate::state::Mesh;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weft_api::peering::{
    AcceptPeer, CreatePeer, EXCHANGE_WAIT_SECS, EstablishRequest, EstablishResponse, ExchangeRequest, ExchangeResponse,
    PeerState, PeerSummary, PeeringToken,
};
use weft_client::{ControlApi, ControlEndpoint};

/// How long a peering token is accepted unless `weft peer create --ttl` says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Routes the admin credential guards (`weft peer ...`, `weft get peers`).
pub fn admin_routes() -> Router<Arc<Mesh>> {
    Router::new()
        .route("/api/v1/peers", get(list).post(create))
        .route("/api/v1/peers/accept", post(accept))
        .route("/api/v1/peers/{name}", axum::routing::delete(delete))
}

/// Routes a peer calls, with the peering's own secrets.
pub fn peer_routes() -> Router<Arc<Mesh>> {
    Router::new()
        .route("/api/v1/peering/establish", post(establish))
        .route("/api/v1/peering/exchange", post(exchange).delete(ended_by_peer))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Answer = Result<Response, Refused>;

fn bad_request(e: axum::extract::rejection::JsonRejection) -> Refused {
    Refused(StatusCode::BAD_REQUEST, e.body_text())
}

fn failed(e: impl std::fmt::Display) -> Refused {
    Refused(StatusCode::INTERNAL_SERVER_ERROR, format!("the control plane could not store the peering: {e}"))
}

/// Whether `name` may name a new peering: a valid name no peering has.
fn fresh_name(mesh: &Mesh, name: &str) -> Result<(), Refused> {
    weft_api::resource::valid_name(name)
        .map_err(|why| Refused(StatusCode::BAD_REQUEST, format!("peer name {name:?} {why}")))?;
    if mesh.peer(name).is_some() {
        return Err(Refused(
            StatusCode::CONFLICT,
            format!("a peering named {name:?} exists; delete it first (weft peer delete {name}) or pick another name"),
        ));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateBody {
    #[serde(flatten)]
    peer: CreatePeer,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// `weft peer create NAME`: a pending peering and its token.
async fn create(
    State(mesh): State<Arc<Mesh>>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(body) = body.map_err(bad_request)?;
    let name = body.peer.name;
    fresh_name(&mesh, &name)?;
    let ttl = body.ttl_seconds.map_or(DEFAULT_TOKEN_TTL, Duration::from_secs);
    if ttl.is_zero() {
        return Err(Refused(StatusCode::BAD_REQUEST, "ttlSeconds must be at least 1".into()));
    }
    let secret = new_secret();
    let expires = now() + ttl.as_secs();
    let record = PeerRecord {
        name: name.clone(),
        role: Role::Creator,
        secret_sha256: Some(digest(&secret)),
        token_expires: Some(expires),
        stream_secret_sha256: None,
        control: Vec::new(),
        ca: String::new(),
        stream_secret: None,
        remote: None,
        terminated: false,
    };
    mesh.put_peer(record).map_err(failed)?;
    let mut control: Vec<String> = match mesh.replicas().await {
        Ok(replicas) => replicas.into_iter().map(|r| r.address).collect(),
        Err(_) => Vec::new(),
    };
    let me = mesh.replica().address;
    control.retain(|a| *a != me);
    control.insert(0, me);
    let own = mesh.state_for_peer(&name);
    let token = PeeringToken {
        peer_name: name.clone(),
        datacenter: own.datacenter,
        trust_domain: own.trust_domain,
        control,
        ca: own.roots,
        secret,
        expires,
    };
    tracing::info!(peer = %name, expires, "peering token created");
    Ok(Json(json!({ "name": name, "token": token.encode(), "expires": expires })).into_response())
}

/// `weft peer accept --name NAME TOKEN`: establishes the peering with the datacenter that made
/// the token, at once (so a bad or expired token is reported to whoever accepts it).
async fn accept(
    State(mesh): State<Arc<Mesh>>,
    body: Result<Json<AcceptPeer>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(body) = body.map_err(bad_request)?;
    let name = body.name;
    fresh_name(&mesh, &name)?;
    let token = PeeringToken::decode(&body.token).map_err(|e| Refused(StatusCode::BAD_REQUEST, e))?;
    if token.expires <= now() {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!(
                "the peering token expired {} s ago; ask datacenter {:?} for a new one (weft peer create)",
                now() - token.expires,
                token.datacenter
            ),
        ));
    }
    let own = mesh.state_for_peer(&name);
    if token.trust_domain == own.trust_domain {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!(
                "datacenter {:?} has this datacenter's trust domain {:?}; peered datacenters need trust domains of their own (weft control --trust-domain)",
                token.datacenter, own.trust_domain
            ),
        ));
    }
    if let Some(other) = trust_domain_taken(&mesh, &name, &token.trust_domain) {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!(
                "peering {other:?} has trust domain {:?} already; one peering per trust domain",
                token.trust_domain
            ),
        ));
    }
    let api = client(&token.control, &token.ca, None).map_err(|e| Refused(StatusCode::BAD_REQUEST, e))?;
    let request =
        EstablishRequest { secret: token.secret.clone(), datacenter: own.datacenter, trust_domain: own.trust_domain };
    let body = serde_json::to_string(&request).expect("requests serialize");
    let answer = api.call_ok(http::Method::POST, "/api/v1/peering/establish", Some(body)).await.map_err(|e| {
        let status = if e.status.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::BAD_GATEWAY };
        Refused(status, format!("datacenter {:?} did not establish the peering: {}", token.datacenter, e.message))
    })?;
    let established: EstablishResponse = serde_json::from_slice(&answer)
        .map_err(|e| Refused(StatusCode::BAD_GATEWAY, format!("the peer answered something else: {e}")))?;
    let record = PeerRecord {
        name: name.clone(),
        role: Role::Acceptor,
        secret_sha256: None,
        token_expires: None,
        stream_secret_sha256: None,
        control: token.control,
        ca: token.ca,
        stream_secret: Some(established.stream_secret),
        remote: Some(PeerState {
            datacenter: token.datacenter,
            trust_domain: token.trust_domain,
            ..Default::default()
        }),
        terminated: false,
    };
    mesh.put_peer(record).map_err(failed)?;
    tracing::info!(peer = %name, "peering established");
    let summary = summaries(&mesh).into_iter().find(|s| s.name == name);
    Ok(Json(summary).into_response())
}

async fn list(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(summaries(&mesh)).into_response()
}

/// `weft peer delete NAME`: forgets the peering and all it imported; the peer is told (best
/// effort: it also finds out at its next exchange).
async fn delete(State(mesh): State<Arc<Mesh>>, Path(name): Path<String>) -> Answer {
    let Some(record) = mesh.peer(&name) else {
        return Err(Refused(StatusCode::NOT_FOUND, format!("no peering named {name:?} (weft get peers)")));
    };
    mesh.delete_peer(&name).map_err(failed)?;
    if let (Role::Acceptor, Some(secret)) = (record.role, &record.stream_secret)
        && let Ok(api) = client(&record.control, &record.ca, Some(secret.clone()))
    {
        let told = api.call(http::Method::DELETE, "/api/v1/peering/exchange", None, Duration::from_secs(2)).await;
        if let Err(e) = told {
            tracing::info!(peer = %name, error = %e, "could not tell the peer the peering is deleted; it finds out at its next exchange");
        }
    }
    tracing::info!(peer = %name, "peering deleted");
    Ok(Json(json!({ "deleted": name })).into_response())
}

/// The acceptor's first call: the token's one-time secret for the exchange's.
async fn establish(
    State(mesh): State<Arc<Mesh>>,
    body: Result<Json<EstablishRequest>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(req) = body.map_err(bad_request)?;
    let wanted = digest(&req.secret);
    let found =
        mesh.peers().into_iter().find(|r| r.role == Role::Creator && r.secret_sha256.as_deref() == Some(&wanted));
    let Some(mut record) = found else {
        return Err(Refused(
            StatusCode::UNAUTHORIZED,
            "this peering token is unknown here or was used already; ask for a new one (weft peer create)".into(),
        ));
    };
    if record.token_expires.is_some_and(|t| t <= now()) {
        return Err(Refused(
            StatusCode::UNAUTHORIZED,
            "this peering token has expired; ask for a new one (weft peer create)".into(),
        ));
    }
    let own = mesh.state_for_peer(&record.name).trust_domain;
    if req.trust_domain == own || req.trust_domain.is_empty() {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!(
                "trust domain {:?} is this datacenter's own; peered datacenters need trust domains of their own",
                req.trust_domain
            ),
        ));
    }
    if let Some(other) = trust_domain_taken(&mesh, &record.name, &req.trust_domain) {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!("peering {other:?} here has trust domain {:?} already", req.trust_domain),
        ));
    }
    let stream_secret = new_secret();
    record.secret_sha256 = None;
    record.token_expires = None;
    record.stream_secret_sha256 = Some(digest(&stream_secret));
    record.remote =
        Some(PeerState { datacenter: req.datacenter, trust_domain: req.trust_domain, ..Default::default() });
    mesh.put_peer(record).map_err(failed)?;
    Ok(Json(EstablishResponse { stream_secret }).into_response())
}

/// The peering (other than `name`) that has trust domain `td` already, if any.
fn trust_domain_taken(mesh: &Mesh, name: &str, td: &str) -> Option<String> {
    mesh.peers()
        .into_iter()
        .find(|r| r.name != name && r.remote.as_ref().is_some_and(|s| s.trust_domain == td))
        .map(|r| r.name)
}

/// The trust domain a peering was established with: the only one its peer may speak for.
fn pinned(record: &PeerRecord) -> Option<&str> {
    record.remote.as_ref().map(|s| s.trust_domain.as_str()).filter(|td| !td.is_empty())
}

/// The creator's peering whose exchange secret the caller presents.
fn caller(mesh: &Mesh, headers: &HeaderMap) -> Result<PeerRecord, Refused> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
    let wanted = bearer.map(digest);
    let found = mesh
        .peers()
        .into_iter()
        .find(|r| r.role == Role::Creator && wanted.is_some() && r.stream_secret_sha256 == wanted && !r.terminated);
    found.ok_or_else(|| {
        Refused(StatusCode::UNAUTHORIZED, "no peering here has this secret: it was deleted (weft peer delete)".into())
    })
}

/// One exchange, creator's side: the acceptor's state is stored; the answer waits for this
/// datacenter's state to differ from what the acceptor holds.
async fn exchange(
    State(mesh): State<Arc<Mesh>>,
    headers: HeaderMap,
    body: Result<Json<ExchangeRequest>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let mut record = caller(&mesh, &headers)?;
    let Json(req) = body.map_err(bad_request)?;
    let name = record.name.clone();
    if let Some(td) = pinned(&record)
        && td != req.state.trust_domain
    {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            format!("this peering was established with trust domain {td:?}, not {:?}", req.state.trust_domain),
        ));
    }
    record.remote = Some(req.state);
    mesh.put_peer(record).map_err(failed)?;
    mesh.peer_synced(&name, None);
    let mut changes = mesh.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(EXCHANGE_WAIT_SECS);
    loop {
        let own = mesh.state_for_peer(&name);
        if req.seen.as_deref() != Some(own.digest().as_str()) || tokio::time::Instant::now() >= deadline {
            return Ok(Json(ExchangeResponse { state: own }).into_response());
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                return Ok(Json(ExchangeResponse { state: own }).into_response());
            },
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// The acceptor deleted the peering.
async fn ended_by_peer(State(mesh): State<Arc<Mesh>>, headers: HeaderMap) -> Answer {
    let mut record = caller(&mesh, &headers)?;
    tracing::info!(peer = %record.name, "the peer deleted the peering; nothing of it is imported any more");
    record.end();
    mesh.put_peer(record).map_err(failed)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A client of a peer's API: its addresses, trusting `ca` (PEM), with `secret` as bearer.
fn client(control: &[String], ca: &str, secret: Option<String>) -> Result<ControlApi, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let cert = cert.map_err(|e| format!("the peer's roots are not valid PEM: {e}"))?;
        roots.add(cert).map_err(|e| format!("the peer's roots hold an unusable certificate: {e}"))?;
    }
    if roots.is_empty() || control.is_empty() {
        return Err("the peering token names no control plane or no roots; ask for a new one".into());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let endpoint = ControlEndpoint {
        address: control.join(","),
        ca_file: std::path::PathBuf::from("(the roots of the peering token)"),
        credential: secret,
    };
    Ok(ControlApi::with_tls(endpoint, tls))
}

/// Keeps every accepted peering's exchange going (on the elected replica), for as long as the
/// control plane runs.
pub async fn run(mesh: Arc<Mesh>) {
    let mut running: std::collections::HashMap<String, tokio::task::JoinHandle<()>> = Default::default();
    loop {
        running.retain(|_, task| !task.is_finished());
        for record in mesh.peers() {
            if record.role == Role::Acceptor && !record.terminated && !running.contains_key(&record.name) {
                let task = tokio::spawn(dial(mesh.clone(), record.name.clone()));
                running.insert(record.name, task);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The acceptor's side of one peering's exchange; ends when the peering is deleted or ended.
async fn dial(mesh: Arc<Mesh>, name: String) {
    let mut backoff = Duration::from_millis(250);
    let mut api: Option<(Vec<String>, String, ControlApi)> = None;
    // Whether the last exchange succeeded: until one has (at start, after a failure), the
    // call asks for the peer's state at once instead of waiting for it to change, so a peer
    // back from a restart is seen as such within one round trip.
    let mut synced = false;
    loop {
        let Some(mut record) = mesh.peer(&name).filter(|r| r.role == Role::Acceptor && !r.terminated) else {
            return;
        };
        if !mesh.leads() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if api.as_ref().is_none_or(|(c, ca, _)| *c != record.control || *ca != record.ca) {
            match client(&record.control, &record.ca, record.stream_secret.clone()) {
                Ok(a) => api = Some((record.control.clone(), record.ca.clone(), a)),
                Err(e) => {
                    mesh.peer_synced(&name, Some(e));
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            }
        }
        let Some((_, _, client)) = &api else { continue };
        let own = mesh.state_for_peer(&name);
        let seen = record.remote.as_ref().filter(|_| synced).map(PeerState::digest);
        let request = ExchangeRequest { state: own.clone(), seen };
        let body = serde_json::to_string(&request).expect("requests serialize");
        let call = client.call(
            http::Method::POST,
            "/api/v1/peering/exchange",
            Some(body),
            Duration::from_secs(EXCHANGE_WAIT_SECS + 10),
        );
        let answer = tokio::select! {
            answer = call => answer,
            _ = own_changed(&mesh, &name, own.digest()) => continue,
        };
        let problem = match answer {
            Ok((status, bytes)) if status.is_success() => match serde_json::from_slice::<ExchangeResponse>(&bytes) {
                Ok(r) if pinned(&record).is_some_and(|td| td != r.state.trust_domain) => Some(format!(
                    "the peer speaks for trust domain {:?}, not {:?} it was peered with; its last state stays",
                    r.state.trust_domain,
                    pinned(&record).unwrap_or_default()
                )),
                Ok(r) => {
                    if !r.state.roots.is_empty() {
                        // The peer's CA signs its API's certificate too: follow its rotations.
                        record.ca = r.state.roots.clone();
                    }
                    record.remote = Some(r.state);
                    match mesh.put_peer(record) {
                        Ok(()) => None,
                        Err(e) => Some(format!("cannot store what the peer sent: {e}")),
                    }
                }
                Err(e) => Some(format!("the peer answered something else: {e}")),
            },
            Ok((StatusCode::UNAUTHORIZED, _)) => {
                tracing::warn!(peer = %name, "the peer deleted the peering; nothing of it is imported any more");
                record.end();
                if let Err(e) = mesh.put_peer(record) {
                    tracing::error!(peer = %name, error = %e, "cannot store the peering's end");
                }
                mesh.peer_synced(&name, Some("the peer deleted the peering".into()));
                return;
            }
            Ok((status, bytes)) => Some(format!("{status}: {}", String::from_utf8_lossy(&bytes))),
            Err(e) => Some(e.message),
        };
        synced = problem.is_none();
        match problem {
            None => {
                mesh.peer_synced(&name, None);
                backoff = Duration::from_millis(250);
            }
            Some(e) => {
                if mesh.peer_sync(&name).1.as_deref() != Some(e.as_str()) {
                    tracing::warn!(peer = %name, error = %e, "peering exchange failed; the peer's last state stays in force; retrying");
                }
                mesh.peer_synced(&name, Some(e));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Resolves when this datacenter's state for `peer` is no longer the one of `digest`.
async fn own_changed(mesh: &Mesh, peer: &str, digest: String) {
    let mut changes = mesh.subscribe();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        if mesh.state_for_peer(peer).digest() != digest {
            return;
        }
    }
}

/// Every peering as `weft get peers` shows it.
pub fn summaries(mesh: &Mesh) -> Vec<PeerSummary> {
    let now = now();
    mesh.peers()
        .into_iter()
        .map(|r| {
            let (last_sync, error) = mesh.peer_sync(&r.name);
            let state = if r.terminated {
                "terminated"
            } else if !r.established() {
                if r.token_expires.is_some_and(|t| t <= now) { "expired" } else { "pending" }
            } else if error.is_some()
                || (r.role == Role::Creator
                    && last_sync.is_none_or(|t| now.saturating_sub(t) > 2 * EXCHANGE_WAIT_SECS + 5))
            {
                "unreachable"
            } else {
                "active"
            };
            let exported = mesh.state_for_peer(&r.name).services.into_iter().map(|s| s.name).collect();
            let remote = r.remote.clone().unwrap_or_default();
            // Services imported through no gateway are unreachable: say so, rather than let
            // failover find nothing.
            let error = error.or_else(|| {
                (state == "active" && !remote.services.is_empty() && remote.gateways.is_empty()).then(|| {
                    format!(
                        "datacenter {} runs no serving mesh gateway (weft proxy --mesh-gateway): its services cannot be reached",
                        remote.datacenter
                    )
                })
            });
            PeerSummary {
                name: r.name.clone(),
                state: state.to_owned(),
                role: r.role.as_str().to_owned(),
                datacenter: Some(remote.datacenter).filter(|d| !d.is_empty()),
                trust_domain: Some(remote.trust_domain).filter(|d| !d.is_empty()),
                last_sync,
                error,
                exported,
                imported: remote.services,
                gateways: remote.gateways,
            }
        })
        .collect()
}
