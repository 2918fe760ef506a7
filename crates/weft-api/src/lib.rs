//! The model shared by every part of weft: the user-facing configuration resources and their
//! validation, the registry's view of service instances, and the naming conventions that the
//! control plane and the proxy agree on for xDS resources.
#![forbid(unsafe_code)]

pub mod credentials;
pub mod duration;
pub mod identity;
pub mod jwks;
pub mod names;
pub mod peering;
pub mod registry;
pub mod report;
pub mod resource;

pub use registry::{Instance, InstanceRegistration, ServiceSummary};
pub use resource::{ApplyError, Kind, Resource};
