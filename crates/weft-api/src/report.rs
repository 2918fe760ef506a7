//! The proxies' report stream (proto/report.proto): request counts every few seconds and tap
//! events, over the connection a proxy already holds to the control plane; tap orders back.
//! The proxy encodes what the control plane decodes with these same types.
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("weft.report.v1");

/// How often a proxy sends its counts.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The upper bounds (seconds) of [`EdgeStats::latency_buckets`], the same as the proxies'
/// `weft_request_duration_seconds` buckets: 0.1 ms doubling to 3.3 s, then everything.
pub fn latency_bounds() -> impl Iterator<Item = f64> {
    (0..16).map(|i| 0.0001 * f64::from(1u32 << i)).chain(std::iter::once(f64::INFINITY))
}
