//! Local rate limiting on the inbound stack: token buckets (GCRA, from `governor`) for the
//! whole service and for each caller, as the listener's `local_ratelimit` HTTP filter says.
//! A caller is its verified SPIFFE identity, or its source address on a plaintext connection.
//!
//! Invariant: buckets outlive config updates that leave the limits as they were (the listener
//! keeps its [`RateLimit`] when the new one's [`RateLimitDef`] is equal), so re-sending a
//! listener does not hand every caller a fresh burst.
use crate::config::{BucketDef, RateLimitDef};
use crate::context::ConnCtx;
use crate::error::Limited;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Serialize;
use std::net::IpAddr;
use std::sync::Arc;

/// Who a per-caller bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Caller {
    Identity(Arc<str>),
    Addr(IpAddr),
}

/// The buckets' clock: the runtime's (tokio's), as every timed policy in the proxy reads it:
/// the system's monotonic clock in the proxy, paused and moved by the test in in-process tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuntimeClock;

impl Clock for RuntimeClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type ServiceBucket = RateLimiter<NotKeyed, InMemoryState, RuntimeClock, NoOpMiddleware<std::time::Instant>>;
type CallerBuckets =
    RateLimiter<Caller, DefaultKeyedStateStore<Caller>, RuntimeClock, NoOpMiddleware<std::time::Instant>>;

/// Per-caller buckets kept before idle ones are let go.
const MAX_CALLERS: usize = 10_000;

pub struct RateLimit {
    pub def: RateLimitDef,
    service: Option<ServiceBucket>,
    callers: Option<CallerBuckets>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.def.fmt(f)
    }
}

impl PartialEq for RateLimit {
    fn eq(&self, other: &Self) -> bool {
        self.def == other.def
    }
}

impl Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.def.serialize(s)
    }
}

/// A bucket's limit as governor's: one token every period, up to the burst.
fn quota(b: &BucketDef) -> Result<Quota, String> {
    let period = Quota::with_period(b.period()?).ok_or("token_bucket: a zero refill period")?;
    Ok(period.allow_burst(b.burst()?))
}

impl RateLimit {
    pub fn new(def: RateLimitDef) -> Result<RateLimit, String> {
        let service = (def.always_consume_service || def.per_caller.is_none())
            .then(|| quota(&def.service).map(|q| RateLimiter::direct_with_clock(q, RuntimeClock)))
            .transpose()?;
        let callers =
            def.per_caller.map(|b| quota(&b).map(|q| RateLimiter::dashmap_with_clock(q, RuntimeClock))).transpose()?;
        Ok(RateLimit { def, service, callers })
    }

    /// Takes a token for the request from its caller's bucket, then from the service's.
    pub fn check(&self, conn: &ConnCtx) -> Result<(), Limited> {
        let limited = |not_until: governor::NotUntil<_>| Limited {
            retry_after: not_until.wait_time_from(RuntimeClock.now()),
            grpc_resource_exhausted: self.def.grpc_resource_exhausted,
        };
        if let Some(callers) = &self.callers {
            let caller = match &conn.peer_identity {
                Some(id) => Caller::Identity(id.0.clone()),
                None => Caller::Addr(conn.peer.ip()),
            };
            if callers.len() > MAX_CALLERS {
                callers.retain_recent();
            }
            callers.check_key(&caller).map_err(limited)?;
        }
        if let Some(service) = &self.service {
            service.check().map_err(limited)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;
    use crate::context::{ListenerInfo, PeerIdentity};
    use std::time::Duration;

    fn conn(peer: &str, identity: Option<&str>) -> ConnCtx {
        ConnCtx {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
            listener: ListenerInfo::new("l", Direction::inbound, "s"),
            peer_identity: identity.map(|i| PeerIdentity(i.into())),
        }
    }

    fn bucket(n: u32) -> BucketDef {
        BucketDef { max_tokens: n, tokens_per_fill: n, fill_interval: Duration::from_secs(60) }
    }

    #[test]
    fn the_service_bucket_holds_for_everyone() {
        let rl = RateLimit::new(RateLimitDef {
            service: bucket(3),
            always_consume_service: true,
            per_caller: None,
            grpc_resource_exhausted: true,
        })
        .unwrap();
        let (a, b) = (conn("10.0.0.1:1", None), conn("10.0.0.2:1", None));
        assert!(rl.check(&a).is_ok() && rl.check(&b).is_ok() && rl.check(&a).is_ok());
        let refused = rl.check(&b).unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(10), "{refused:?}");
    }

    /// Buckets refill on the runtime's clock: with time paused, a refused caller gets its next
    /// token at exactly the refill interval, and not a moment before.
    #[tokio::test(start_paused = true)]
    async fn buckets_refill_on_the_runtime_clock() {
        let rl = RateLimit::new(RateLimitDef {
            service: BucketDef { max_tokens: 2, tokens_per_fill: 1, fill_interval: Duration::from_secs(1) },
            always_consume_service: true,
            per_caller: None,
            grpc_resource_exhausted: false,
        })
        .unwrap();
        let a = conn("10.0.0.1:1", None);
        assert!(rl.check(&a).is_ok() && rl.check(&a).is_ok());
        let refused = rl.check(&a).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(rl.check(&a).unwrap_err().retry_after, Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(rl.check(&a).is_ok(), "one token after exactly one interval");
        assert!(rl.check(&a).is_err());
    }

    #[test]
    fn each_caller_has_a_bucket_by_identity_or_address() {
        let rl = RateLimit::new(RateLimitDef {
            service: bucket(2),
            always_consume_service: false,
            per_caller: Some(bucket(2)),
            grpc_resource_exhausted: true,
        })
        .unwrap();
        let a1 = conn("10.0.0.1:1", Some("spiffe://t/ns/d/sa/a"));
        let a2 = conn("10.0.0.9:7", Some("spiffe://t/ns/d/sa/a"));
        let plain = conn("10.0.0.1:2", None);
        assert!(rl.check(&a1).is_ok() && rl.check(&a2).is_ok());
        assert!(rl.check(&a1).is_err(), "one identity, one bucket, whatever the address");
        assert!(rl.check(&plain).is_ok() && rl.check(&plain).is_ok(), "the service bucket is not consumed");
        assert!(rl.check(&plain).is_err());
    }
}
