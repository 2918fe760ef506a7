//! How the sidecar tells its supervisor what it is doing: systemd's notify protocol
//! (sd_notify(3)). When `NOTIFY_SOCKET` names a datagram socket (a path, or `@name` for an
//! abstract one), the sidecar sends `READY=1` once every listener is bound and it holds its
//! first certificate (with `WEFT_ADMIN` and `WEFT_INBOUND`, the addresses it bound), and
//! `STOPPING=1` when a stop begins. `weft up` listens on such a socket ([`Listener`]) for its
//! gateway; so does systemd for a `Type=notify` unit, which ignores the `WEFT_` variables.
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

pub const SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// Where the sidecar's notices go, if its supervisor asked for them.
pub struct Notifier {
    socket: UnixDatagram,
    to: UnixAddr,
}

impl Notifier {
    /// The socket `NOTIFY_SOCKET` names; `None` when it is unset or unusable (nobody listens).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var(SOCKET_VAR).ok()?;
        let to = match name.strip_prefix('@') {
            Some(abstract_name) => UnixAddr::from_abstract_name(abstract_name),
            None => UnixAddr::from_pathname(&name),
        };
        let to = to.inspect_err(|e| tracing::warn!("{SOCKET_VAR}={name:?} is not a socket address: {e}")).ok()?;
        Some(Notifier { socket: UnixDatagram::unbound().ok()?, to })
    }

    fn send(&self, notice: &str) {
        if let Err(e) = self.socket.send_to_addr(notice.as_bytes(), &self.to) {
            tracing::warn!("cannot notify the supervisor ({notice:?}): {e}");
        }
    }

    /// Serving: the admin endpoint (and the inbound listener, if any) are bound at these.
    pub fn ready(&self, admin: SocketAddr, inbound: Option<SocketAddr>) {
        let mut notice = format!("READY=1\nMAINPID={}\nWEFT_ADMIN={admin}", std::process::id());
        if let Some(inbound) = inbound {
            notice.push_str(&format!("\nWEFT_INBOUND={inbound}"));
        }
        self.send(&notice);
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

/// What a supervisor learns from a sidecar's `READY=1`: where it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    pub admin: SocketAddr,
    pub inbound: Option<SocketAddr>,
}

impl Ready {
    fn parse(datagram: &[u8]) -> Option<Ready> {
        let text = std::str::from_utf8(datagram).ok()?;
        let var = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='));
        if var("READY") != Some("1") {
            return None;
        }
        let admin = var("WEFT_ADMIN")?.parse().ok()?;
        let inbound = var("WEFT_INBOUND").and_then(|a| a.parse().ok());
        Some(Ready { admin, inbound })
    }
}

/// A supervisor's end: an abstract socket with an unguessable name, for one sidecar.
pub struct Listener {
    socket: tokio::net::UnixDatagram,
    name: String,
}

impl Listener {
    pub fn bind() -> std::io::Result<Listener> {
        let name = format!("weft-sidecar-{}-{}", std::process::id(), crate::crypto::random_hex(8));
        let socket = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&name)?)?;
        socket.set_nonblocking(true)?;
        Ok(Listener { socket: tokio::net::UnixDatagram::from_std(socket)?, name: format!("@{name}") })
    }

    /// The value of `NOTIFY_SOCKET` for the sidecar.
    pub fn address(&self) -> &str {
        &self.name
    }

    /// Resolves when the sidecar says it is ready (other notices are skipped).
    pub async fn ready(&self) -> std::io::Result<Ready> {
        let mut buf = [0u8; 1024];
        loop {
            let n = self.socket.recv(&mut buf).await?;
            if let Some(ready) = Ready::parse(&buf[..n]) {
                return Ok(ready);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_supervisor_learns_where_its_sidecar_serves() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = Listener::bind().unwrap();
            let to = UnixAddr::from_abstract_name(listener.address().strip_prefix('@').unwrap()).unwrap();
            let notifier = Notifier { socket: UnixDatagram::unbound().unwrap(), to };
            let admin: SocketAddr = "127.0.0.1:9001".parse().unwrap();
            let inbound: SocketAddr = "127.0.0.1:9002".parse().unwrap();
            notifier.send("STATUS=something systemd shows");
            notifier.ready(admin, Some(inbound));
            assert_eq!(listener.ready().await.unwrap(), Ready { admin, inbound: Some(inbound) });
            notifier.stopping();
            notifier.ready(admin, None);
            assert_eq!(listener.ready().await.unwrap(), Ready { admin, inbound: None });
        });
    }
}
