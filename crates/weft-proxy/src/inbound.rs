//! The inbound stack: requests from other services to the local app. By the time a request is
//! here, mutual TLS termination has set the caller's verified identity on the connection
//! (`rec.conn.peer_identity`); every check that may refuse the request runs before anything
//! is sent to the app, in this order: path normalisation → JWT authentication → authorization → rate limit →
//! route → forward.
//! The app's responses lose any `x-weft-error`/`x-weft-policy` header: callers' sidecars act
//! on those (a `connect-failed` is retried elsewhere for any method), so only a sidecar may
//! set them.
use crate::authz::{Authz, Denied, Subject};
use crate::config::{EscapedSlashes, InboundPolicyDef};
use crate::error::{ERROR_HEADER, POLICY_HEADER, ProxyError};
use crate::http::body::Reply;
use crate::jwt::JwtAuthn;
use crate::metrics::TrafficMetrics;
use crate::path::normalize_request;
use crate::ratelimit::RateLimit;
use crate::record::RequestRecord;
use crate::route::{RouteTable, decide};
use arc_swap::ArcSwap;
use futures::FutureExt;
use futures::future::{Either, Ready, ready};
use http::Request;
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What an inbound listener checks before a request or connection reaches the app: its
/// [`InboundPolicyDef`] with live token buckets.
#[derive(Debug, Clone, Default)]
pub struct InboundPolicy {
    pub jwt: Option<Arc<JwtAuthn>>,
    pub authz: Option<Authz>,
    pub rate_limit: Option<Arc<RateLimit>>,
}

impl InboundPolicy {
    /// The policy `def` describes. Rate limits the policy in force (`old`) already has keep
    /// their buckets, so a listener sent again does not hand every caller a fresh burst.
    pub fn build(def: &InboundPolicyDef, old: &InboundPolicy) -> Result<InboundPolicy, String> {
        let rate_limit = match (&def.rate_limit, &old.rate_limit) {
            (None, _) => None,
            (Some(new), Some(old)) if old.def == *new => Some(old.clone()),
            (Some(new), _) => Some(Arc::new(RateLimit::new(*new)?)),
        };
        Ok(InboundPolicy { jwt: def.jwt.clone(), authz: def.authz.clone(), rate_limit })
    }

    /// Whether an HTTP request has anything to pass.
    fn checks_http(&self) -> bool {
        self.jwt.is_some() || self.authz.is_some() || self.rate_limit.is_some()
    }
}

/// A listener's policy as connections see it: swapped in place when the control plane changes
/// it, so open connections (pooled by callers for a long time) follow at once.
pub type LivePolicy = Arc<PolicyCell>;

/// The policy in force, and whether it checks HTTP requests at all: a listener without policy
/// (the default) passes requests on after reading one flag, without loading the policy.
///
/// Invariant: `checks_http` is set after a policy with checks is stored, and cleared before a
/// policy without any is. A request that reads the flag clear while a policy is being put in
/// force is one that arrived before it; one that reads it set loads that policy or a newer one.
#[derive(Default)]
pub struct PolicyCell {
    policy: ArcSwap<InboundPolicy>,
    checks_http: AtomicBool,
}

impl PolicyCell {
    pub fn load(&self) -> arc_swap::Guard<Arc<InboundPolicy>> {
        self.policy.load()
    }

    /// Puts `new` in force; returns the policy it replaces.
    pub fn swap(&self, new: Arc<InboundPolicy>) -> Arc<InboundPolicy> {
        if new.checks_http() {
            let old = self.policy.swap(new);
            self.checks_http.store(true, Ordering::Release);
            old
        } else {
            self.checks_http.store(false, Ordering::Release);
            self.policy.swap(new)
        }
    }

    /// The policy an HTTP request must pass, if it has any checks.
    fn for_http(&self) -> Option<arc_swap::Guard<Arc<InboundPolicy>>> {
        self.checks_http.load(Ordering::Acquire).then(|| self.policy.load())
    }
}

pub struct Inbound {
    /// Routes to the local app's cluster.
    routes: Arc<ArcSwap<RouteTable>>,
    slashes: EscapedSlashes,
    policy: LivePolicy,
    metrics: Arc<TrafficMetrics>,
}

impl Inbound {
    pub fn new(
        routes: Arc<ArcSwap<RouteTable>>,
        slashes: EscapedSlashes,
        policy: LivePolicy,
        metrics: Arc<TrafficMetrics>,
    ) -> Inbound {
        Inbound { routes, slashes, policy, metrics }
    }

    /// Decides at once; the future returned only forwards. (Not an `async fn`: each async
    /// layer would keep its own copy of the request in the per-connection request future.)
    pub fn call<'a>(
        &self,
        mut req: Request<Incoming>,
        rec: &'a mut RequestRecord,
    ) -> Either<Ready<Reply>, impl Future<Output = Reply> + Send + 'a> {
        if let Err(e) = normalize_request(&mut req, self.slashes) {
            return Either::Left(ready(Err(e.into())));
        }
        if let Some(policy) = self.policy.for_http() {
            let (mut parts, body) = req.into_parts();
            if let Err(e) = self.check(&policy, &mut parts, rec) {
                return Either::Left(ready(Err(e)));
            }
            req = Request::from_parts(parts, body);
        }
        match decide(&self.routes, &req, rec) {
            Ok(route) => Either::Right(crate::http::forward(route, req, rec).map(without_sidecar_headers)),
            Err(e) => Either::Left(ready(Err(e))),
        }
    }

    fn check(
        &self,
        policy: &InboundPolicy,
        parts: &mut http::request::Parts,
        rec: &RequestRecord,
    ) -> Result<(), ProxyError> {
        let claims = match &policy.jwt {
            Some(jwt) => {
                let outcome = jwt.authenticate(parts);
                self.metrics.jwt(&outcome);
                outcome?
            }
            None => None,
        };
        if let Some(authz) = &policy.authz {
            let subject = Subject {
                identity: rec.conn.peer_identity.as_ref().map(|p| &*p.0),
                port: rec.conn.local.port(),
                http: Some(parts),
                claims: claims.as_ref(),
            };
            let decision = authz.check(&subject);
            self.metrics.authz(&decision);
            if let Err(Denied { policy }) = decision {
                return Err(ProxyError::Denied { policy });
            }
        }
        if let Some(limit) = &policy.rate_limit {
            limit.check(&rec.conn).map_err(ProxyError::RateLimited)?;
        }
        Ok(())
    }
}

fn without_sidecar_headers(reply: Reply) -> Reply {
    reply.map(|mut resp| {
        strip_sidecar_headers(resp.headers_mut());
        resp
    })
}

/// One pass over the names finds whether the app set either header (it almost never does),
/// comparing only names of their lengths; only then are they removed (each removal hashes).
fn strip_sidecar_headers(h: &mut http::HeaderMap) {
    let lengths = [ERROR_HEADER.as_str().len(), POLICY_HEADER.as_str().len()];
    if h.keys().any(|k| lengths.contains(&k.as_str().len()) && (k == ERROR_HEADER || k == POLICY_HEADER)) {
        h.remove(ERROR_HEADER);
        h.remove(POLICY_HEADER);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_apps_sidecar_headers_are_removed_and_the_rest_kept() {
        for set in [&["x-weft-error"][..], &["x-weft-policy"], &["x-weft-policy", "x-weft-error"], &[]] {
            let mut h = http::HeaderMap::new();
            h.insert("content-type", "text/plain".parse().unwrap());
            h.insert("x-weft-errors", "kept: not a sidecar header".parse().unwrap());
            for name in set {
                h.append(*name, "connect-failed".parse().unwrap());
            }
            super::strip_sidecar_headers(&mut h);
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["content-type", "x-weft-errors"], "app set {set:?}");
        }
    }
}
