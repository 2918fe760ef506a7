//! One upstream service as the proxy holds it: its endpoints with their connection pools and
//! admission (`endpoint`), how a request or connection picks one (`balance`, with the
//! [`balance::Cluster`] itself and the set of clusters), outlier ejection (`outlier`), active
//! health checks (`active_health`) and the retry budget shared by its callers (`retry_budget`).
pub mod active_health;
pub mod balance;
pub mod endpoint;
pub mod outlier;
pub mod retry_budget;
