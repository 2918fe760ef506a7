//! The CLI side of the control plane's admin API: `weft apply`, `weft get`, `weft delete`.
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use weft_api::resource::{ApplyError, Kind, parse_documents};
use weft_api::{Instance, ServiceSummary};

pub struct Api {
    control: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(control: &str) -> Api {
        Api { control: control.to_owned(), client: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// Sends a request; returns the status and the JSON body (Null when empty).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Value)> {
        let uri = format!("http://{}{path}", self.control);
        let mut req = hyper::Request::builder().method(method).uri(&uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req =
            req.body(Full::new(bytes)).with_context(|| format!("invalid control plane address {:?}", self.control))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("the control plane at {} did not answer within 10s", self.control))?
            .map_err(|e| {
                let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
                anyhow::anyhow!(
                    "cannot reach the control plane at {} ({cause}); is `weft control` or `weft up` running? Point elsewhere with --control or WEFT_CONTROL",
                    self.control
                )
            })?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
        Ok((status, value))
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, v) = self.call(Method::GET, path, None).await?;
        if !status.is_success() {
            anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
        }
        Ok(v)
    }

    /// Posts resources; on rejection returns the control plane's [`ApplyError`].
    pub async fn apply(&self, docs: &[weft_api::Resource]) -> anyhow::Result<Result<Value, ApplyError>> {
        let (status, v) = self.call(Method::POST, "/api/v1/apply", Some(json!({ "resources": docs }))).await?;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            let e: ApplyError =
                serde_json::from_value(v["errors"][0].clone()).context("malformed error from the control plane")?;
            return Ok(Err(e));
        }
        if !status.is_success() {
            anyhow::bail!("control plane refused the request: {}", v["error"].as_str().unwrap_or(status.as_str()));
        }
        Ok(Ok(v))
    }
}

pub async fn apply(control: &str, file: &Path) -> anyhow::Result<()> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {name}"))?;
    let with_file = |mut e: ApplyError| {
        e.file = Some(name.clone());
        anyhow::anyhow!("{e}; nothing was applied")
    };
    let docs = parse_documents(&text).map_err(with_file)?;
    let applied = Api::new(control).apply(&docs).await?.map_err(with_file)?;
    for a in applied["applied"].as_array().into_iter().flatten() {
        println!(
            "{}/{} {}",
            a["kind"].as_str().unwrap_or_default().to_ascii_lowercase(),
            a["name"].as_str().unwrap_or_default(),
            a["action"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print(value: &Value, output: &str) -> anyhow::Result<bool> {
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(value)?),
        "yaml" => print!("{}", serde_norway::to_string(value)?),
        _ => return Ok(false),
    }
    Ok(true)
}

pub async fn get(control: &str, kind: &str, name: Option<&str>, output: &str) -> anyhow::Result<()> {
    let api = Api::new(control);
    match kind {
        "services" | "svc" if name.is_none() => {
            let v = api.get_json("/api/v1/services").await?;
            if print(&v, output)? {
                return Ok(());
            }
            let services: Vec<ServiceSummary> = serde_json::from_value(v)?;
            let rows = services
                .into_iter()
                .map(|s| {
                    let declared = if s.declared { "yes" } else { "no" }.to_owned();
                    vec![s.name, s.instances.to_string(), s.healthy.to_string(), s.protocol, s.load_balancer, declared]
                })
                .collect();
            table(&["NAME", "INSTANCES", "HEALTHY", "PROTOCOL", "LOAD-BALANCER", "DECLARED"], rows);
        }
        "endpoints" | "endpoint" | "ep" => {
            let svc = name.ok_or_else(|| anyhow::anyhow!("which service? usage: weft get endpoints SERVICE"))?;
            let v = api.get_json(&format!("/api/v1/services/{svc}/endpoints")).await?;
            if print(&v, output)? {
                return Ok(());
            }
            let instances: Vec<Instance> = serde_json::from_value(v)?;
            let rows = instances
                .into_iter()
                .map(|i| {
                    let labels: Vec<String> = i.registration.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        i.id.clone(),
                        i.registration.inbound.clone().unwrap_or_default(),
                        if i.healthy { "healthy" } else { "unhealthy" }.to_owned(),
                        if i.connected { "connected" } else { "reconnecting" }.to_owned(),
                        labels.join(","),
                    ]
                })
                .collect();
            table(&["INSTANCE", "ADDRESS", "HEALTH", "PROXY", "LABELS"], rows);
        }
        "proxies" | "proxy" => {
            let v = api.get_json("/api/v1/proxies").await?;
            if print(&v, output)? {
                return Ok(());
            }
            let rows = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    vec![
                        p["node"].as_str().unwrap_or_default().to_owned(),
                        p["service"].as_str().unwrap_or("-").to_owned(),
                        if p["delta"].as_bool() == Some(true) { "delta" } else { "sotw" }.to_owned(),
                        p["acked"].as_object().map_or(0, |m| m.len()).to_string(),
                        p["lastError"].as_str().unwrap_or("-").to_owned(),
                    ]
                })
                .collect();
            table(&["NODE", "SERVICE", "XDS", "ACKED-TYPES", "LAST-NACK"], rows);
        }
        other => {
            let k = Kind::parse(other).ok_or_else(|| {
                anyhow::anyhow!("unknown kind {other:?}; use services, endpoints, proxies, service or httproutes")
            })?;
            let path = match name {
                Some(n) => format!("/api/v1/resources/{}/{n}", k.as_str().to_ascii_lowercase()),
                None => format!("/api/v1/resources/{}", k.as_str().to_ascii_lowercase()),
            };
            let v = api.get_json(&path).await?;
            if print(&v, if output == "table" { "yaml" } else { output })? {
                return Ok(());
            }
        }
    }
    Ok(())
}

pub async fn delete(control: &str, kind: &str, name: &str) -> anyhow::Result<()> {
    let k = Kind::parse(kind).ok_or_else(|| anyhow::anyhow!("unknown kind {kind:?}; use service or httproute"))?;
    let path = format!("/api/v1/resources/{}/{name}", k.as_str().to_ascii_lowercase());
    let (status, v) = Api::new(control).call(Method::DELETE, &path, None).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!("{}/{name} deleted", k.as_str().to_ascii_lowercase());
    Ok(())
}
