//! The CLI side of the control plane's admin API: `weft apply`, `weft get`, `weft delete`.
use crate::cli::ControlAddr;
use anyhow::Context;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use weft_api::identity::{IssuedCertificate, TokenInfo};
use weft_api::resource::{ApplyError, Kind, parse_documents};
use weft_api::{Instance, ServiceSummary};
use weft_client::{ControlApi, ControlEndpoint};

pub struct Api {
    api: ControlApi,
}

impl Api {
    /// A client for the control plane `addr` names: its root from --ca-file / WEFT_CA_FILE or
    /// the credentials file, its admin credential from --admin-token / WEFT_ADMIN_TOKEN or the
    /// credentials file.
    pub fn new(addr: &ControlAddr) -> anyhow::Result<Api> {
        let recorded = addr.control.split(',').find_map(|a| weft_api::credentials::load(a.trim()));
        let credential = addr.admin_token.clone().or_else(|| recorded.map(|e| e.admin_token));
        let endpoint = ControlEndpoint::resolve(&addr.control, addr.ca_file.as_deref(), credential)?;
        Api::with(endpoint)
    }

    pub fn with(endpoint: ControlEndpoint) -> anyhow::Result<Api> {
        Ok(Api { api: ControlApi::new(endpoint)? })
    }

    /// Sends a request; returns the status and the JSON body (Null when empty).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Value)> {
        let (status, bytes) = self.api.call(method, path, body.map(|b| b.to_string()), Duration::from_secs(30)).await?;
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok((status, value))
    }

    /// A live answer, read as it comes.
    pub async fn stream(&self, path: &str) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        Ok(self.api.stream(path, Duration::from_secs(10)).await?)
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

pub async fn apply(control: &ControlAddr, file: &Path) -> anyhow::Result<()> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {name}"))?;
    let with_file = |mut e: ApplyError| {
        e.file = Some(name.clone());
        anyhow::anyhow!("{e}; nothing was applied")
    };
    let docs = parse_documents(&text).map_err(with_file)?;
    let applied = Api::new(control)?.apply(&docs).await?.map_err(with_file)?;
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

pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", render_table(header, rows));
}

/// Columns padded to their widest cell, three spaces apart.
pub(crate) fn render_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("   ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
    out
}

fn print(value: &Value, output: &str) -> anyhow::Result<bool> {
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(value)?),
        "yaml" => print!("{}", serde_norway::to_string(value)?),
        _ => return Ok(false),
    }
    Ok(true)
}

pub async fn get(
    control: &ControlAddr,
    kind: &str,
    name: Option<&str>,
    output: &str,
    expiring: Duration,
) -> anyhow::Result<()> {
    let api = Api::new(control)?;
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
                    let vip = s.vip.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                    let imported: Vec<String> = s
                        .imported
                        .iter()
                        .map(|i| format!("{} ({}/{})", i.datacenter, i.healthy, i.instances))
                        .collect();
                    vec![
                        s.name,
                        s.instances.to_string(),
                        s.healthy.to_string(),
                        s.protocol,
                        s.load_balancer,
                        declared,
                        if imported.is_empty() { "-".into() } else { imported.join(",") },
                        vip,
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "INSTANCES",
                    "HEALTHY",
                    "PROTOCOL",
                    "LOAD-BALANCER",
                    "DECLARED",
                    "VIRTUAL-IP",
                    "IMPORTED-FROM",
                ],
                rows,
            );
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
        "policy" | "policies" | "in-force" => {
            let svc = name.ok_or_else(|| anyhow::anyhow!("which service? usage: weft get policy SERVICE"))?;
            let v = api.get_json(&format!("/api/v1/services/{svc}/policy")).await?;
            print(&v, if output == "table" { "yaml" } else { output })?;
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
        "replicas" | "replica" => {
            let v = api.get_json("/api/v1/replicas").await?;
            if print(&v, output)? {
                return Ok(());
            }
            let mut replicas: Vec<weft_api::registry::Replica> = serde_json::from_value(v)?;
            replicas.sort_by(|a, b| a.address.cmp(&b.address));
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let rows = replicas
                .into_iter()
                .map(|r| {
                    vec![
                        r.address,
                        if r.healthy { "healthy" } else { "store unreachable" }.to_owned(),
                        if r.leader { "yes" } else { "-" }.to_owned(),
                        r.proxies.to_string(),
                        format!("{}s", now.saturating_sub(r.started)),
                    ]
                })
                .collect();
            table(&["REPLICA", "HEALTH", "LEADER", "PROXIES", "UP"], rows);
        }
        "peers" | "peer" | "peerings" => {
            let v = api.get_json("/api/v1/peers").await?;
            if print(&v, output)? {
                return Ok(());
            }
            let peers: Vec<weft_api::peering::PeerSummary> = serde_json::from_value(v)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let rows = peers
                .into_iter()
                .map(|p| {
                    let imported: Vec<String> =
                        p.imported.iter().map(|s| format!("{} ({}/{})", s.name, s.healthy, s.instances)).collect();
                    let list = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(",") };
                    vec![
                        p.name,
                        p.state,
                        p.role,
                        p.datacenter.unwrap_or_else(|| "-".into()),
                        p.trust_domain.unwrap_or_else(|| "-".into()),
                        p.last_sync.map_or("-".into(), |t| format!("{}s ago", now.saturating_sub(t))),
                        list(p.exported),
                        list(imported),
                        p.error.unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            table(
                &["PEER", "STATE", "ROLE", "DATACENTER", "TRUST-DOMAIN", "LAST-SYNC", "EXPORTED", "IMPORTED", "ERROR"],
                rows,
            );
        }
        "certs" | "certificates" | "cert" => {
            let v = api.get_json("/api/v1/certificates").await?;
            if print(&v, output)? {
                return Ok(());
            }
            let certs: Vec<IssuedCertificate> = serde_json::from_value(v)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let rows = certs
                .into_iter()
                .map(|c| {
                    let left = c.not_after.saturating_sub(now);
                    let flag = if left <= expiring.as_secs() { "EXPIRING" } else { "ok" };
                    vec![c.instance, c.identity, c.serial, format!("in {left}s"), c.root, flag.to_owned()]
                })
                .collect();
            table(&["INSTANCE", "IDENTITY", "SERIAL", "EXPIRES", "ROOT", "STATUS"], rows);
        }
        "tokens" | "token" => {
            let v = api.get_json("/api/v1/tokens").await?;
            if print(&v, output)? {
                return Ok(());
            }
            let tokens: Vec<TokenInfo> = serde_json::from_value(v)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let rows = tokens
                .into_iter()
                .map(|t| {
                    let state = if t.revoked { "revoked" } else { "valid" };
                    vec![t.id, t.service, format!("in {}s", t.expires.saturating_sub(now)), state.to_owned()]
                })
                .collect();
            table(&["ID", "SERVICE", "EXPIRES", "STATE"], rows);
        }
        other => {
            let k = Kind::parse(other).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown kind {other:?}; use services, endpoints, policy, proxies, replicas, peers, certs, tokens, service, httproutes, grpcroutes, authorizationpolicies, requestauthentications, trafficpolicies, telemetries or exportedservices"
                )
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

pub async fn delete(control: &ControlAddr, kind: &str, name: &str) -> anyhow::Result<()> {
    let k = Kind::parse(kind).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown kind {kind:?}; use service, httproute, grpcroute, authorizationpolicy, requestauthentication, trafficpolicy, telemetry or exportedservices"
        )
    })?;
    let path = format!("/api/v1/resources/{}/{name}", k.as_str().to_ascii_lowercase());
    let (status, v) = Api::new(control)?.call(Method::DELETE, &path, None).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!("{}/{name} deleted", k.as_str().to_ascii_lowercase());
    Ok(())
}

/// `weft peer create`: prints the token alone on stdout (so `$(weft peer create …)` works).
pub async fn peer_create(control: &ControlAddr, name: &str, ttl: Duration) -> anyhow::Result<()> {
    let body = json!({ "name": name, "ttlSeconds": ttl.as_secs().max(1) });
    let (status, v) = Api::new(control)?.call(Method::POST, "/api/v1/peers", Some(body)).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!("{}", v["token"].as_str().unwrap_or_default());
    eprintln!(
        "peering token for peer {name:?}, usable once within {}s; give it to the other datacenter: weft peer accept --name NAME TOKEN",
        ttl.as_secs()
    );
    Ok(())
}

pub async fn peer_accept(control: &ControlAddr, name: &str, token: &str) -> anyhow::Result<()> {
    let body = json!({ "name": name, "token": token });
    let (status, v) = Api::new(control)?.call(Method::POST, "/api/v1/peers/accept", Some(body)).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!(
        "peering {name:?} established with datacenter {} (trust domain {})",
        v["datacenter"].as_str().unwrap_or("?"),
        v["trustDomain"].as_str().unwrap_or("?")
    );
    Ok(())
}

pub async fn peer_delete(control: &ControlAddr, name: &str) -> anyhow::Result<()> {
    let (status, v) = Api::new(control)?.call(Method::DELETE, &format!("/api/v1/peers/{name}"), None).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!("peering {name:?} deleted");
    Ok(())
}

/// `weft token create`: prints the token alone on stdout (so `$(weft token create …)` works).
pub async fn token_create(control: &ControlAddr, service: &str, ttl: Duration) -> anyhow::Result<()> {
    let body = json!({ "service": service, "ttlSeconds": ttl.as_secs().max(1) });
    let (status, v) = Api::new(control)?.call(Method::POST, "/api/v1/tokens", Some(body)).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!("{}", v["token"].as_str().unwrap_or_default());
    eprintln!(
        "join token {} for service {service:?}, valid for {}s; give it to the proxy with --token or WEFT_TOKEN",
        v["info"]["id"].as_str().unwrap_or_default(),
        ttl.as_secs()
    );
    Ok(())
}

pub async fn token_revoke(control: &ControlAddr, token: &str) -> anyhow::Result<()> {
    let (status, v) = Api::new(control)?.call(Method::DELETE, &format!("/api/v1/tokens/{token}"), None).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!(
        "join token {} (service {}) revoked",
        v["id"].as_str().unwrap_or_default(),
        v["service"].as_str().unwrap_or_default()
    );
    Ok(())
}

pub async fn ca_rotate(control: &ControlAddr, overlap: Duration) -> anyhow::Result<()> {
    let body = json!({ "overlapSeconds": overlap.as_secs() });
    let (status, v) = Api::new(control)?.call(Method::POST, "/api/v1/ca/rotate", Some(body)).await?;
    if !status.is_success() {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or(status.as_str()));
    }
    println!(
        "new root {} is signing; the previous root stays trusted for {}s",
        v["newRoot"].as_str().unwrap_or_default(),
        overlap.as_secs()
    );
    if let Some(lagging) = v["lagging"].as_array().filter(|l| !l.is_empty()) {
        println!("warning: these proxies had not acknowledged the new trust bundle: {lagging:?}");
    }
    Ok(())
}

pub async fn ca_show(control: &ControlAddr, output: &str) -> anyhow::Result<()> {
    let v = Api::new(control)?.get_json("/api/v1/ca").await?;
    if print(&v, output)? {
        return Ok(());
    }
    println!("trust domain  {}", v["trustDomain"].as_str().unwrap_or_default());
    println!("namespace     {}", v["namespace"].as_str().unwrap_or_default());
    println!("cert lifetime {}s", v["certTtlSeconds"]);
    println!("signing root  {}", v["rootFingerprint"].as_str().unwrap_or_default());
    print!("{}", v["root"].as_str().unwrap_or_default());
    Ok(())
}
