//! The control plane's JSON admin API, used by the `weft` CLI and by proxies to report health.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /healthz | liveness of the control plane |
//! | GET | /api/v1/services | services with instance counts |
//! | GET | /api/v1/services/{name}/endpoints | instances of a service |
//! | GET | /api/v1/proxies | connected xDS clients, what they ACKed, their last NACK |
//! | GET | /api/v1/resources/{kind}[/{name}] | applied resources |
//! | POST | /api/v1/apply | validate and store resources (all or nothing) |
//! | DELETE | /api/v1/resources/{kind}/{name} | delete a resource |
//! | PUT | /api/v1/instances/{id}/health | a proxy reports its app's health |
//! | DELETE | /api/v1/instances/{id} | a proxy deregisters on a clean stop |
use crate::state::Mesh;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use weft_api::Resource;
use weft_api::registry::HealthReport;
use weft_api::resource::{ApplyError, Kind};

pub fn router(mesh: Arc<Mesh>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}/endpoints", get(endpoints))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/resources/{kind}", get(list))
        .route("/api/v1/resources/{kind}/{name}", get(get_one).delete(delete))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/instances/{id}/health", put(health))
        .route("/api/v1/instances/{id}", axum::routing::delete(deregister))
        .with_state(mesh)
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn kind(s: &str) -> Result<Kind, ApiError> {
    Kind::parse(s).ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, format!("unknown kind {s:?}; known kinds: services, httproutes"))
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

async fn proxies(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.proxies()).into_response()
}

async fn list(State(mesh): State<Arc<Mesh>>, Path(k): Path<String>) -> ApiResult {
    Ok(Json(mesh.resources(kind(&k)?)).into_response())
}

async fn get_one(State(mesh): State<Arc<Mesh>>, Path((k, name)): Path<(String, String)>) -> ApiResult {
    let k = kind(&k)?;
    let r = mesh.resources(k).into_iter().find(|r| r.name() == name);
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
    Ok(match parsed.and_then(|r| mesh.apply(r)) {
        Ok(applied) => Json(json!({ "applied": applied })).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "errors": [e] }))).into_response(),
    })
}

async fn delete(State(mesh): State<Arc<Mesh>>, Path((k, name)): Path<(String, String)>) -> ApiResult {
    let k = kind(&k)?;
    match mesh.delete(k, &name) {
        Ok(true) => Ok(Json(json!({ "deleted": { "kind": k, "name": name } })).into_response()),
        Ok(false) => Err(ApiError(StatusCode::NOT_FOUND, format!("no {k} named {name:?}"))),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn no_instance(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no instance {id:?} is registered"))
}

async fn health(State(mesh): State<Arc<Mesh>>, Path(id): Path<String>, Json(report): Json<HealthReport>) -> ApiResult {
    if !mesh.set_health(&id, report.healthy) {
        return Err(no_instance(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn deregister(State(mesh): State<Arc<Mesh>>, Path(id): Path<String>) -> ApiResult {
    if !mesh.deregister(&id) {
        return Err(no_instance(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
