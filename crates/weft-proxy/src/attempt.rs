//! The attempt engine: the one loop that decides every re-send of a request (HTTP, an upgrade)
//! or connection (opaque TCP) to a backend. Each attempt picks an endpoint (balance), runs one
//! [`Exchange`] on it (connect, then send), is recorded in the request's [`Attempts`] and
//! counted for outlier detection and the balancer, and is then judged by [`Plan::next`], a
//! plain function of what happened:
//!
//! - **fail over** to another endpoint at once: the connect failed (nothing was sent, any
//!   method); the callee's sidecar could not reach its app (`x-weft-error: connect-failed` or
//!   `connect-timeout`: the app never saw it, any method) or its app reset the request
//!   (`upstream-reset`: idempotent methods only); the connection broke before the response
//!   (idempotent methods only). At most `max_endpoints` endpoints per try, never one already
//!   tried;
//! - **reconnect** to the same endpoint: a pooled connection had closed before the request
//!   was written (nothing was sent);
//! - **retry**, after a jittered backoff, as the route's retry policy says: an answer or
//!   failure it names, while retries remain, for idempotent requests (or any request nothing
//!   of which was sent), when the cluster's retry limit admits one more retry in flight;
//! - otherwise **return** the answer or the failure.
//!
//! A re-send needs the request again: the exchange gives it back if it was never sent, or a
//! replay of it if its body was kept whole (see [`crate::http::forward::Replay`]); without one
//! the failure stands. The route's request timeout ([`Deadline`]) bounds every attempt and
//! backoff up to the response head: each attempt has one timer, at its per-try timeout or the
//! route's deadline, whichever comes first. Time is tokio's (paused in tests) and the
//! backoff's jitter comes from the thread's `fastrand` generator (seeded in tests).
use crate::cluster::balance::ClusterView;
use crate::cluster::endpoint::{Admitted, Endpoint};
use crate::cluster::outlier::Observed;
use crate::config::Failover;
use crate::config::{RetryDef, RetryOn};
use crate::error::{ERROR_HEADER, ProxyError};
use crate::record::{Attempt, Attempts, Outcome};
use http::HeaderMap;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// One kind of exchange with an endpoint: what an attempt does once the engine picked where.
pub trait Exchange {
    /// What a successful attempt gives: a response, or a connection.
    type Output: Send;

    /// Connects to `ep` (within `connect_timeout`) and, for a request, sends it.
    fn attempt(
        &mut self,
        ep: &Arc<Endpoint>,
        connect_timeout: Duration,
    ) -> impl Future<Output = Attempted<Self::Output>> + Send;

    /// The status and headers of an answer, if it is an HTTP response.
    fn head(out: &Self::Output) -> Option<(u16, &HeaderMap)>;

    /// Makes the request ready to be sent again; false if it cannot be (its body was sent and
    /// not kept whole).
    fn rearm(&mut self) -> bool;

    /// Lets go of an answer that will not be returned.
    fn discard(out: Self::Output) {
        drop(out);
    }
}

/// What became of one attempt.
pub enum Attempted<O> {
    /// The endpoint answered (a response head, or an established connection).
    Answered(O),
    /// A pooled connection had closed before the request was written: nothing was sent.
    Unsent(ProxyError),
    /// The connect failed (nothing was sent, [`ProxyError::before_send`]) or the exchange did.
    Failed(ProxyError),
}

/// What the engine does after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Return,
    /// Another endpoint, at once.
    Failover,
    /// The same endpoint, on a new connection.
    Reconnect,
    /// After this backoff, on another endpoint while one is untried.
    Retry(Duration),
}

/// An attempt's result as [`Plan::next`] judges it: no bodies or connections, only facts.
#[derive(Debug, Clone, Copy)]
pub enum Seen<'a> {
    /// An answer with this status and headers (`None` for a TCP connection).
    Answered(Option<(u16, &'a HeaderMap)>),
    Unsent(&'a ProxyError),
    Failed(&'a ProxyError),
}

/// How far a request has got: what [`Plan::next`] counts against the limits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Retries already sent.
    pub retries: u32,
    /// Endpoints tried in this try (the first attempt or the current retry), the current one
    /// included.
    pub endpoints: usize,
    /// Attempts in a row that found their pooled connection closed.
    pub unsent: usize,
    /// Whether a ready endpoint is left that no attempt has tried.
    pub untried_left: bool,
}

/// A route's request timeout: when it is up, and how long it was (for the error).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    pub timeout: Duration,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline { at: tokio::time::Instant::now() + timeout, timeout }
    }
}

/// What may happen to one request or connection: decided before the first attempt.
pub struct Plan<'a> {
    pub failover: Failover,
    /// The route's retry policy, for requests whose route has one.
    pub retry: Option<&'a RetryDef>,
    /// The route, for the per-try timeout's error.
    pub route: &'a Arc<str>,
    /// Whether the method is idempotent: such a request may be sent again once it may have
    /// reached an app.
    pub idempotent: bool,
    /// Whether the endpoints are mesh sidecars, whose own answers tell how their app failed.
    pub mesh: bool,
    /// Whether each attempt counts against the cluster's `max_requests` (HTTP requests do).
    pub admit: bool,
    /// The route's request timeout, over every attempt and backoff up to the response head.
    pub deadline: Option<Deadline>,
}

impl Plan<'_> {
    /// What to do after an attempt that saw `seen`, at `progress`.
    pub fn next(&self, seen: Seen<'_>, progress: Progress) -> Next {
        let can_fail_over = progress.endpoints < self.failover.max_endpoints && progress.untried_left;
        match seen {
            Seen::Unsent(_) if progress.unsent < self.failover.max_endpoints => Next::Reconnect,
            Seen::Unsent(_) => Next::Return,
            // The client's body failed: nothing to hold against the endpoint, nothing to retry.
            Seen::Failed(ProxyError::BadRequestBody { .. }) => Next::Return,
            Seen::Failed(e) if e.before_send() => {
                if can_fail_over {
                    Next::Failover
                } else {
                    self.retry_if(|on| on.connect_failure || on.server_error, true, progress)
                }
            }
            Seen::Failed(e) => {
                let reset = matches!(e, ProxyError::UpstreamReset { .. });
                if reset && self.idempotent && can_fail_over {
                    Next::Failover
                } else {
                    self.retry_if(|on| error_is_retried(on, e), self.idempotent, progress)
                }
            }
            Seen::Answered(Some((status, headers))) => {
                if self.mesh
                    && can_fail_over
                    && let Some(app_seen_it) = app_failed(headers)
                    && (!app_seen_it || self.idempotent)
                {
                    return Next::Failover;
                }
                self.retry_if(|on| answer_is_retried(on, status, headers), self.idempotent, progress)
            }
            Seen::Answered(None) => Next::Return,
        }
    }

    /// A retry after a backoff, if the policy names what happened, the request may be sent
    /// again (`safe`) and retries remain.
    fn retry_if(&self, named: impl Fn(&RetryOn) -> bool, safe: bool, progress: Progress) -> Next {
        match self.retry {
            Some(retry) if safe && progress.retries < retry.retries && named(&retry.on) => {
                Next::Retry(backoff(retry, progress.retries))
            }
            _ => Next::Return,
        }
    }
}

/// Sends with `exchange` to the cluster of `view` until an attempt's result is returned, as
/// the module says. `hash` is the request's consistent-hash key, if its route has one.
pub async fn run<X: Exchange>(
    exchange: &mut X,
    view: &ClusterView<'_>,
    hash: Option<u64>,
    plan: &Plan<'_>,
    attempts: &mut Attempts,
) -> Result<X::Output, ProxyError> {
    let cluster = view.cluster;
    // Counted until the answer (or the failure) is returned; let go during a retry's backoff.
    let admitted = if plan.admit { cluster.admit(&view.settings, true)? } else { None };
    let ep = view.pick(&[], hash).ok_or_else(|| no_endpoints(view))?;
    let mut progress = Progress { endpoints: 1, ..Progress::default() };
    let (result, next) = attempt(exchange, view, &ep, &[ep.addr], plan, &mut progress, attempts).await;
    if next == Next::Return || !exchange.rearm() {
        return result;
    }
    // Boxed: re-sends are rare, and their state would take room in every request's future.
    let sent_again = Resend { tried: smallvec::smallvec![ep.addr], ep, progress, admitted, retry_slot: None };
    Box::pin(sent_again.run(exchange, view, hash, plan, attempts, result, next)).await
}

/// The state of a request being sent again.
struct Resend<'c> {
    /// The endpoint of the last attempt.
    ep: Arc<Endpoint>,
    /// Every endpoint attempted, by address.
    tried: SmallVec<[SocketAddr; 4]>,
    progress: Progress,
    admitted: Option<Admitted<'c>>,
    retry_slot: Option<Admitted<'c>>,
}

impl<'c> Resend<'c> {
    /// The re-send loop: does what `next` says after an attempt whose result is `result`, and
    /// attempts again, until the engine returns a result.
    #[allow(clippy::too_many_arguments)]
    async fn run<X: Exchange>(
        mut self,
        exchange: &mut X,
        view: &ClusterView<'c>,
        hash: Option<u64>,
        plan: &Plan<'_>,
        attempts: &mut Attempts,
        mut result: Result<X::Output, ProxyError>,
        mut next: Next,
    ) -> Result<X::Output, ProxyError> {
        let cluster = view.cluster;
        loop {
            tracing::debug!(cluster = %cluster.name, endpoint = %self.ep.addr, ?next, "sending again");
            match next {
                Next::Return => return result,
                // Nothing was sent: the endpoint's idle connections are as stale as the one that
                // failed.
                Next::Reconnect => self.ep.drop_idle_h1(),
                Next::Failover => {
                    result.map(X::discard).ok();
                    self.progress.endpoints += 1;
                    self.ep = view.pick(&self.tried, hash).ok_or_else(|| no_endpoints(view))?;
                }
                Next::Retry(backoff) => {
                    // A retry counts against the cluster's retry limit while it is in flight,
                    // not while it waits out its backoff: a limit of a few retries in flight
                    // would otherwise turn retries down under modest concurrency. Over the
                    // limit, the failure stands (a retry storm would make it worse).
                    drop((self.admitted.take(), self.retry_slot.take()));
                    let wake = tokio::time::Instant::now() + backoff;
                    if let Some(d) = plan.deadline.filter(|d| d.at <= wake) {
                        tokio::time::sleep_until(d.at).await;
                        result.map(X::discard).ok();
                        return Err(ProxyError::RouteTimeout { route: plan.route.clone(), timeout: d.timeout });
                    }
                    tokio::time::sleep_until(wake).await;
                    let Some(slot) = cluster.admit_retry() else { return result };
                    self.retry_slot = Some(slot);
                    result.map(X::discard).ok();
                    if plan.admit {
                        self.admitted = cluster.admit(&view.settings, false)?;
                    }
                    self.progress.retries += 1;
                    self.progress.endpoints = 1;
                    // Elsewhere while an endpoint is untried; else wherever the balancer says.
                    self.ep = view
                        .pick(&self.tried, hash)
                        .or_else(|| view.pick(&[], hash))
                        .ok_or_else(|| no_endpoints(view))?;
                }
            }
            if !self.tried.contains(&self.ep.addr) {
                self.tried.push(self.ep.addr);
            }
            (result, next) = attempt(exchange, view, &self.ep, &self.tried, plan, &mut self.progress, attempts).await;
            if next != Next::Return && !exchange.rearm() {
                next = Next::Return;
            }
        }
    }
}

/// One attempt on `ep` (one of `tried`): run, recorded, and judged.
async fn attempt<X: Exchange>(
    exchange: &mut X,
    view: &ClusterView<'_>,
    ep: &Arc<Endpoint>,
    tried: &[SocketAddr],
    plan: &Plan<'_>,
    progress: &mut Progress,
    attempts: &mut Attempts,
) -> (Result<X::Output, ProxyError>, Next) {
    let per_try = plan.retry.and_then(|r| r.per_try_timeout).map(Deadline::after);
    let limit = match (per_try, plan.deadline) {
        (Some(t), Some(d)) => Some(if t.at < d.at { t } else { d }),
        (t, d) => t.or(d),
    };
    // Whether the route's deadline (not a per-try timeout) ended the attempt: then it is final.
    let mut expired = false;
    let attempted = {
        let attempt = std::pin::pin!(exchange.attempt(ep, view.settings.connect_timeout));
        match limit {
            // Boxed: only routes with a timeout pay for its timer's room.
            Some(limit) => Box::pin(tokio::time::timeout_at(limit.at, attempt)).await.unwrap_or_else(|_| {
                expired = plan.deadline.is_some_and(|d| d.at == limit.at);
                Attempted::Failed(ProxyError::RouteTimeout { route: plan.route.clone(), timeout: limit.timeout })
            }),
            None => attempt.await,
        }
    };
    let seen = match &attempted {
        Attempted::Answered(out) => Seen::Answered(X::head(out)),
        Attempted::Unsent(e) => Seen::Unsent(e),
        Attempted::Failed(e) => Seen::Failed(e),
    };
    record(view, ep, seen, plan.mesh, attempts);
    progress.unsent = if matches!(seen, Seen::Unsent(_)) { progress.unsent + 1 } else { 0 };
    progress.untried_left = view.set.ready.iter().any(|e| !tried.contains(&e.addr));
    let next = if expired { Next::Return } else { plan.next(seen, *progress) };
    let result = match attempted {
        Attempted::Answered(out) => Ok(out),
        Attempted::Unsent(e) | Attempted::Failed(e) => Err(e),
    };
    (result, next)
}

fn no_endpoints(view: &ClusterView<'_>) -> ProxyError {
    ProxyError::NoEndpoints(view.cluster.name.to_string())
}

/// Records an attempt in the request's attempts and counts it for outlier detection and the
/// balancer's view of the endpoint.
fn record(view: &ClusterView<'_>, ep: &Endpoint, seen: Seen<'_>, mesh: bool, attempts: &mut Attempts) {
    let (cluster, outlier) = (view.cluster, view.settings.outlier.as_ref());
    let outcome = match seen {
        Seen::Answered(None) => Outcome::Answered,
        Seen::Answered(Some((status, headers))) => match mesh.then(|| app_failed(headers)).flatten() {
            // The callee's sidecar answered for an app that failed: the instance failed.
            Some(sent) => {
                cluster.observe(outlier, ep, Observed::LocalFailure);
                ep.attempt_failed();
                ep.mark_failing();
                let reason = if sent { "app-reset" } else { "app-not-reached" };
                Outcome::Failed { reason, sent }
            }
            None => {
                cluster.observe(outlier, ep, Observed::Status(status));
                if status >= 500 {
                    ep.attempt_failed();
                }
                Outcome::Answered
            }
        },
        Seen::Unsent(e) => Outcome::Failed { reason: e.reason(), sent: false },
        Seen::Failed(e) => {
            if !matches!(e, ProxyError::BadRequestBody { .. }) {
                cluster.observe(outlier, ep, Observed::LocalFailure);
                ep.attempt_failed();
            }
            e.into()
        }
    };
    attempts.push(Attempt { endpoint: ep.addr, outcome });
}

/// Whether a mesh sidecar's answer says its app failed the request before answering, and if
/// so whether the app may have seen it: `connect-failed`/`connect-timeout` (it never did) or
/// `upstream-reset` (it reset the connection holding the request). Only sidecars set
/// `x-weft-error` (the inbound stack removes it from apps' responses).
fn app_failed(headers: &HeaderMap) -> Option<bool> {
    let why = headers.get(ERROR_HEADER)?;
    if why == "connect-failed" || why == "connect-timeout" {
        Some(false)
    } else if why == "upstream-reset" {
        Some(true)
    } else {
        None
    }
}

fn answer_is_retried(on: &RetryOn, status: u16, headers: &HeaderMap) -> bool {
    // A callee sidecar's refusal for lack of capacity is not an app's failure to retry elsewhere.
    if headers.get(ERROR_HEADER).is_some_and(|v| v == "overflow") {
        return false;
    }
    (on.server_error && status >= 500)
        || (on.gateway_error && matches!(status, 502..=504))
        || (!on.grpc.is_empty()
            && headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
                .is_some_and(|code| on.grpc.contains(&code)))
}

fn error_is_retried(on: &RetryOn, e: &ProxyError) -> bool {
    match e {
        ProxyError::UpstreamReset { .. } => on.reset || on.server_error,
        ProxyError::RouteTimeout { .. } => on.server_error || on.gateway_error,
        _ => false,
    }
}

/// Full jitter: a random wait up to `base × 2^attempt`, capped at the maximum.
fn backoff(retry: &RetryDef, attempt: u32) -> Duration {
    let ceiling = retry.base_interval.saturating_mul(1 << attempt.min(16)).min(retry.max_interval);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryOn;

    fn plan<'a>(retry: Option<&'a RetryDef>, route: &'a Arc<str>, idempotent: bool) -> Plan<'a> {
        Plan { failover: Failover::default(), retry, route, idempotent, mesh: true, admit: true, deadline: None }
    }

    fn reset() -> ProxyError {
        ProxyError::UpstreamReset { addr: crate::testing::addr(1), source: hyper_error() }
    }

    /// A real `hyper::Error` (they cannot be built otherwise): a client's response to garbage.
    fn hyper_error() -> hyper::Error {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1024);
            let (mut send, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(
                hyper_util::rt::TokioIo::new(client),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let answer = tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 1024];
                let _ = server.read(&mut buf).await;
                drop(server);
            });
            let e = send.send_request(http::Request::new(http_body_util::Empty::new())).await.unwrap_err();
            answer.await.unwrap();
            e
        })
    }

    /// Every way an attempt can end, and what the engine does next: the decisions of the
    /// module's documentation, as a table.
    #[test]
    fn each_outcome_is_judged_as_documented() {
        let route: Arc<str> = "r/0".into();
        let retry = RetryDef {
            retries: 1,
            per_try_timeout: None,
            on: RetryOn::parse("5xx").unwrap(),
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
        };
        let fresh = Progress { endpoints: 1, untried_left: true, ..Default::default() };
        let last = Progress { endpoints: 1, untried_left: false, ..Default::default() };
        let spent = Progress { retries: 1, ..last };
        let refused =
            ProxyError::Connect { addr: crate::testing::addr(1), source: std::io::ErrorKind::ConnectionRefused.into() };
        let reset = reset();
        let with_error = |reason: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(ERROR_HEADER, http::HeaderValue::from_static(reason));
            h
        };
        let (plain, not_reached, reset_by_app) =
            (HeaderMap::new(), with_error("connect-failed"), with_error("upstream-reset"));
        let ok = Seen::Answered(Some((200, &plain)));
        let unavailable = Seen::Answered(Some((503, &plain)));
        let app_not_reached = Seen::Answered(Some((502, &not_reached)));
        let app_reset = Seen::Answered(Some((502, &reset_by_app)));
        let is_retry = |n: Next| matches!(n, Next::Retry(d) if d <= Duration::from_millis(25));

        let (get, post) = (plan(Some(&retry), &route, true), plan(Some(&retry), &route, false));
        let no_policy = plan(None, &route, true);
        // Answers.
        assert_eq!(get.next(ok, fresh), Next::Return);
        assert!(is_retry(get.next(unavailable, fresh)));
        assert_eq!(post.next(unavailable, fresh), Next::Return, "a POST an app may have seen");
        assert_eq!(get.next(unavailable, spent), Next::Return, "no retries left");
        assert_eq!(no_policy.next(unavailable, fresh), Next::Return);
        // The callee's sidecar on its app.
        assert_eq!(post.next(app_not_reached, fresh), Next::Failover, "the app never saw it");
        assert_eq!(get.next(app_reset, fresh), Next::Failover);
        assert_eq!(post.next(app_reset, fresh), Next::Return, "a POST its app may have seen");
        assert!(is_retry(get.next(app_reset, last)), "no endpoint left to move to: the policy");
        let outside = Plan { mesh: false, ..plan(None, &route, true) };
        assert_eq!(outside.next(app_not_reached, fresh), Next::Return, "not a sidecar's answer");
        // Connect failures: nothing was sent, any method.
        assert_eq!(post.next(Seen::Failed(&refused), fresh), Next::Failover);
        assert!(is_retry(post.next(Seen::Failed(&refused), last)));
        let tried_enough = Progress { endpoints: 3, ..fresh };
        assert!(is_retry(post.next(Seen::Failed(&refused), tried_enough)), "max_endpoints reached");
        assert_eq!(no_policy.next(Seen::Failed(&refused), last), Next::Return);
        // A reset before the response.
        assert_eq!(get.next(Seen::Failed(&reset), fresh), Next::Failover);
        assert_eq!(post.next(Seen::Failed(&reset), fresh), Next::Return);
        assert!(is_retry(get.next(Seen::Failed(&reset), last)));
        // A pooled connection that had closed: the same endpoint again, a few times.
        assert_eq!(post.next(Seen::Unsent(&reset), Progress { unsent: 1, ..fresh }), Next::Reconnect);
        assert_eq!(post.next(Seen::Unsent(&reset), Progress { unsent: 3, ..fresh }), Next::Return);
        // A per-try timeout is a 5xx to the policy, for idempotent requests.
        let timeout = ProxyError::RouteTimeout { route: route.clone(), timeout: Duration::from_secs(1) };
        assert!(is_retry(get.next(Seen::Failed(&timeout), fresh)));
        assert_eq!(post.next(Seen::Failed(&timeout), fresh), Next::Return);
        // A TCP connection that was made.
        assert_eq!(get.next(Seen::Answered(None), fresh), Next::Return);
    }
}
