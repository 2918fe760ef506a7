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

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn kind(s: &str) -> Result<Kind, Response> {
    Kind::parse(s).ok_or_else(|| {
        error(StatusCode::NOT_FOUND, format!("unknown kind {s:?}; known kinds: services, httproutes"))
    })
}

async fn services(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.services()).into_response()
}

async fn endpoints(State(mesh): State<Arc<Mesh>>, Path(name): Path<String>) -> Response {
    match mesh.endpoints(&name) {
        Some(e) => Json(e).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no service named {name:?}")),
    }
}

async fn proxies(State(mesh): State<Arc<Mesh>>) -> Response {
    Json(mesh.proxies()).into_response()
}

async fn list(State(mesh): State<Arc<Mesh>>, Path(k): Path<String>) -> Response {
    match kind(&k) {
        Ok(k) => Json(mesh.resources(k)).into_response(),
        Err(r) => r,
    }
}

async fn get_one(State(mesh): State<Arc<Mesh>>, Path((k, name)): Path<(String, String)>) -> Response {
    let k = match kind(&k) {
        Ok(k) => k,
        Err(r) => return r,
    };
    match mesh.resources(k).into_iter().find(|r| r.name() == name) {
        Some(r) => Json(r).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no {k} named {name:?}")),
    }
}

#[derive(Deserialize)]
struct ApplyBody {
    resources: Vec<serde_json::Value>,
}

async fn apply(State(mesh): State<Arc<Mesh>>, body: Result<Json<ApplyBody>, axum::extract::rejection::JsonRejection>) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let parsed: Result<Vec<Resource>, ApplyError> =
        body.resources.into_iter().enumerate().map(|(i, v)| Resource::from_json(i, v)).collect();
    match parsed.and_then(|r| mesh.apply(r)) {
        Ok(applied) => Json(json!({ "applied": applied })).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "errors": [e] }))).into_response(),
    }
}

async fn delete(State(mesh): State<Arc<Mesh>>, Path((k, name)): Path<(String, String)>) -> Response {
    let k = match kind(&k) {
        Ok(k) => k,
        Err(r) => return r,
    };
    match mesh.delete(k, &name) {
        Ok(true) => Json(json!({ "deleted": { "kind": k, "name": name } })).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no {k} named {name:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn health(State(mesh): State<Arc<Mesh>>, Path(id): Path<String>, Json(report): Json<HealthReport>) -> Response {
    if mesh.set_health(&id, report.healthy) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no instance {id:?} is registered"))
    }
}

async fn deregister(State(mesh): State<Arc<Mesh>>, Path(id): Path<String>) -> Response {
    if mesh.deregister(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no instance {id:?} is registered"))
    }
}
