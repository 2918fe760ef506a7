//! Retries, as the route's retry policy (`RouteAction.retry_policy`) says: an attempt that
//! failed in a way the policy names is sent again after a jittered exponential backoff, while
//! attempts remain and the cluster's retry limit (Envoy's `max_retries`, or a retry budget)
//! allows another retry in flight. Only idempotent requests are retried once they may have
//! reached an app; one that never left (a connect failure) is retried whatever its method. The
//! body comes from the copy kept while it was first sent (at most 64 KiB); a request whose
//! body was not kept whole is not retried.
use crate::config::{RetryDef, RetryOn};
use crate::error::{ERROR_HEADER, ProxyError};
use crate::http::body::UpstreamBody;
use crate::http::forward::{Replay, RequestHead, forward_body};
use crate::http::replay::UpBody;
use crate::record::RequestRecord;
use crate::route::MatchedRoute;
use crate::stack::Reply;
use http::{Request, Response};
use std::time::Duration;

pub async fn with_retries(
    route: MatchedRoute,
    req: Request<UpBody>,
    retry: &RetryDef,
    rec: &mut RequestRecord,
) -> Reply {
    let idempotent = req.method().is_idempotent();
    let (parts, body) = req.into_parts();
    let (kept, body) = Replay::keep(body, route.rule.policy.replay_limit);
    let mut next = Request::from_parts(parts, body);
    let head = RequestHead::of(&next);
    let mut retry_slot = None;
    let mut attempt = 0;
    // Endpoints earlier attempts failed on: a retry goes elsewhere while it can.
    let mut failed_on: smallvec::SmallVec<[std::net::SocketAddr; 4]> = smallvec::SmallVec::new();
    loop {
        let this_try = MatchedRoute { rule: route.rule.clone(), backend: route.backend.clone(), hash: route.hash };
        let sent = forward_body(this_try, next, &failed_on, rec);
        let result = match retry.per_try_timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or_else(|_| Err(ProxyError::RouteTimeout { route: route.rule.id.clone(), timeout: t })),
            None => sent.await,
        };
        drop(retry_slot.take());
        let worth = match &result {
            Ok(resp) => answer_is_retried(&retry.on, resp),
            Err(e) => error_is_retried(&retry.on, e),
        };
        let safe = idempotent || matches!(&result, Err(e) if e.before_send());
        if !worth || !safe || attempt == retry.retries {
            return result;
        }
        let Some(body) = kept.as_ref().and_then(Replay::body) else { return result };
        if let Some(last) = rec.attempts.last() {
            failed_on.push(last.endpoint);
        }
        // A retry counts against the limit while it is in flight, not while it waits out its
        // backoff: a limit of a few retries in flight would otherwise turn retries down under
        // modest concurrency. Over the limit, the failure stands (a retry storm would make it
        // worse).
        tokio::time::sleep(backoff(retry, attempt)).await;
        let Some(slot) = route.backend.admit_retry() else { return result };
        retry_slot = Some(slot);
        drop(result);
        attempt += 1;
        next = head.request(body);
    }
}

fn answer_is_retried(on: &RetryOn, resp: &Response<UpstreamBody>) -> bool {
    let status = resp.status().as_u16();
    // A callee sidecar's refusal for lack of capacity is not an app's failure to retry elsewhere.
    if resp.headers().get(ERROR_HEADER).is_some_and(|v| v == "overflow") {
        return false;
    }
    (on.server_error && status >= 500)
        || (on.gateway_error && matches!(status, 502..=504))
        || (!on.grpc.is_empty()
            && resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
                .is_some_and(|code| on.grpc.contains(&code)))
}

fn error_is_retried(on: &RetryOn, e: &ProxyError) -> bool {
    match e {
        ProxyError::UpstreamReset { .. } => on.reset || on.server_error,
        ProxyError::RouteTimeout { .. } => on.server_error || on.gateway_error,
        e if e.before_send() => on.connect_failure || on.server_error,
        _ => false,
    }
}

/// Full jitter: a random wait up to `base × 2^attempt`, capped at the maximum.
fn backoff(retry: &RetryDef, attempt: u32) -> Duration {
    let ceiling = retry.base_interval.saturating_mul(1 << attempt.min(16)).min(retry.max_interval);
    ceiling.mul_f64(fastrand::f64())
}
