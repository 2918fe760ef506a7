//! What the decoders of every resource share: the error of a rejected resource, decoding an
//! `Any`, Envoy's common field types (addresses, durations, percentages), and how the `*Def`s
//! serialize durations (for the admin config dump).
use envoy_types::pb::envoy::config::core::v3::{Address, address, socket_address};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use std::net::SocketAddr;
use std::time::Duration;

/// Why a resource was rejected; the text goes back to the control plane in the NACK.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct InvalidResource {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

pub(super) fn invalid(kind: &'static str, name: &str, reason: impl Into<String>) -> InvalidResource {
    InvalidResource { kind, name: name.to_owned(), reason: reason.into() }
}

pub(super) fn decode<M: Message + Name + Default>(any: &Any, kind: &'static str) -> Result<M, InvalidResource> {
    if any.type_url != M::type_url() {
        return Err(invalid(kind, "", format!("expected {}, got {}", M::type_url(), any.type_url)));
    }
    M::decode(any.value.as_slice()).map_err(|e| invalid(kind, "", format!("cannot decode: {e}")))
}

pub(super) fn socket_addr(kind: &'static str, name: &str, a: Option<&Address>) -> Result<SocketAddr, InvalidResource> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(invalid(kind, name, "needs a socket address"));
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(invalid(kind, name, "needs a numeric port"));
    };
    let ip = sa
        .address
        .parse()
        .map_err(|_| invalid(kind, name, format!("address {:?} is not an IP address", sa.address)))?;
    let port = u16::try_from(port).map_err(|_| invalid(kind, name, format!("port {port} is out of range")))?;
    Ok(SocketAddr::new(ip, port))
}

pub(super) fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A `FractionalPercent` in parts per million.
pub(super) fn per_million(f: &FractionalPercent) -> u32 {
    let scale = match fractional_percent::DenominatorType::try_from(f.denominator) {
        Ok(fractional_percent::DenominatorType::Hundred) => 10_000,
        Ok(fractional_percent::DenominatorType::TenThousand) => 100,
        _ => 1,
    };
    f.numerator.saturating_mul(scale).min(1_000_000)
}

pub(super) fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

pub(super) fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}
