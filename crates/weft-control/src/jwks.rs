//! The issuers' signing keys (JWKS) for RequestAuthentication: read from a URL or a file by
//! the control plane, at apply time (a source that cannot be read fails the apply) and then
//! every `refreshInterval`. Sidecars get the keys inline in their `jwt_authn` filter, so they
//! need no route to the issuer. A refresh that fails keeps the last good keys.
use crate::state::Mesh;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_api::resource::{DEFAULT_JWKS_REFRESH, JwksSource, Resource};

/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a source that has never been read (after a restart) is tried again.
const RETRY_UNREAD: Duration = Duration::from_secs(5);

/// Reads and checks one source; the error says what to fix.
pub async fn load(source: &JwksSource) -> Result<String, String> {
    let text = match source {
        JwksSource::Inline(text) => text.clone(),
        JwksSource::File(path) => tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read JWKS file {path:?} on the control plane's machine: {e}"))?,
        JwksSource::Uri(uri) => tokio::time::timeout(FETCH_TIMEOUT, fetch(uri))
            .await
            .map_err(|_| format!("fetching {uri} timed out after {FETCH_TIMEOUT:?}"))??,
    };
    weft_api::jwks::parse(&text).map_err(|e| format!("{}: {e}", describe(source)))?;
    Ok(text)
}

fn describe(source: &JwksSource) -> String {
    match source {
        JwksSource::Inline(_) => "inline jwks".into(),
        JwksSource::File(p) => format!("JWKS file {p:?}"),
        JwksSource::Uri(u) => format!("JWKS from {u}"),
    }
}

async fn fetch(uri: &str) -> Result<String, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let parsed: hyper::Uri = uri.parse().map_err(|e| format!("{uri:?} is not a URL: {e}"))?;
    let resp = client.get(parsed).await.map_err(|e| format!("fetching {uri} failed: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("fetching {uri} answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading {uri} failed (at most {MAX_JWKS_BYTES} bytes): {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| format!("{uri} did not answer UTF-8 text"))
}

/// Every source the resources use, with its refresh interval (the shortest asked for).
pub fn sources<'a>(resources: impl Iterator<Item = &'a Resource>) -> BTreeMap<JwksSource, Duration> {
    let mut out = BTreeMap::new();
    for r in resources {
        if let Resource::RequestAuthentication(o) = r {
            for iss in &o.spec.issuers {
                if let Some(src) = iss.jwks_source() {
                    let every = iss.refresh_interval.unwrap_or(DEFAULT_JWKS_REFRESH);
                    let e = out.entry(src).or_insert(every);
                    *e = (*e).min(every);
                }
            }
        }
    }
    out
}

/// Reads every source of `resources` that is read from outside; the first failure is
/// returned with the document and field it comes from.
pub async fn load_for_apply(
    resources: &[Resource],
) -> Result<Vec<(JwksSource, Arc<str>)>, weft_api::resource::ApplyError> {
    let mut out = Vec::new();
    for (doc, r) in resources.iter().enumerate() {
        let Resource::RequestAuthentication(o) = r else { continue };
        for (i, iss) in o.spec.issuers.iter().enumerate() {
            let Some(src) = iss.jwks_source() else { continue };
            let field = match src {
                JwksSource::Uri(_) => "jwksUri",
                JwksSource::File(_) => "jwksFile",
                JwksSource::Inline(_) => "jwks",
            };
            let text = load(&src)
                .await
                .map_err(|e| weft_api::resource::ApplyError::new(doc, format!("spec.issuers[{i}].{field}"), e))?;
            out.push((src, text.into()));
        }
    }
    Ok(out)
}

/// Re-reads each source when its interval is up; runs for the control plane's lifetime.
/// With replicas, the elected one reads and stores the keys, and the others take them from
/// the store: one reader for the issuer, and the same keys at every replica's sidecars.
pub async fn refresh(mesh: Arc<Mesh>) {
    let mut read_at: BTreeMap<JwksSource, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !mesh.leads() {
            read_at.clear();
            continue;
        }
        let wanted = sources(mesh.resources(weft_api::Kind::RequestAuthentication).iter());
        read_at.retain(|s, _| wanted.contains_key(s));
        mesh.retain_jwks(|s| wanted.contains_key(s));
        let now = Instant::now();
        for (src, every) in wanted {
            let known = mesh.has_jwks(&src);
            let wait = if known { every } else { RETRY_UNREAD };
            if read_at.get(&src).is_some_and(|t| now.duration_since(*t) < wait) {
                continue;
            }
            read_at.insert(src.clone(), now);
            match load(&src).await {
                Ok(text) => mesh.set_jwks(src, text.into()),
                Err(e) if known => {
                    tracing::warn!(error = %e, "JWKS refresh failed; sidecars keep the keys read before")
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "JWKS could not be read; sidecars refuse every token of this issuer (jwt-unknown-key) until it can"
                ),
            }
        }
    }
}
