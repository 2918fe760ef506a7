//! The HTTP machinery both stacks share, one job per module: [`server`] serves a client
//! connection and runs each request through its stack; [`forward`] executes a routed request
//! on a backend (failover, replay; [`replay`] keeps what a replay needs); [`head`] validates
//! HTTP/1 request heads; [`upgrade`] splices `Upgrade` connections; [`body`] holds
//! the body types; [`headers`] strips hop-by-hop headers; [`respond`] renders the proxy's own
//! answers.
pub mod body;
pub mod forward;
pub mod head;
pub mod headers;
pub mod replay;
mod respond;
mod server;
pub mod upgrade;

pub use forward::forward;
pub use headers::strip_hop_by_hop;
pub use server::serve;
