//! What HTTP versions a plaintext upstream speaks (a sidecar's app), learned by probing it
//! once: the HTTP/2 connection preface and an empty SETTINGS frame are sent; an app that
//! speaks h2c answers with a SETTINGS frame, an HTTP/1.1-only app with an HTTP/1.1 response
//! (usually 400) or by closing. A cluster whose protocol the control plane leaves to the
//! client ("use the downstream protocol") then translates requests its app cannot take:
//! HTTP/2 to an HTTP/1.1-only app, HTTP/1.1 to an h2c-only app.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// Not probed yet, or the upstream could not be reached (probed again later): the
    /// client's version is used.
    Unknown,
    /// Answers neither probe as HTTP (not an HTTP app): the client's version is used.
    Neither,
    /// Answers both (the client's version is used).
    Both,
    Http1Only,
    Http2Only,
}

#[derive(Default)]
pub struct LearnedProtocol(AtomicU8);

impl LearnedProtocol {
    pub fn get(&self) -> Speaks {
        match self.0.load(Ordering::Relaxed) {
            1 => Speaks::Both,
            2 => Speaks::Http1Only,
            3 => Speaks::Http2Only,
            4 => Speaks::Neither,
            _ => Speaks::Unknown,
        }
    }

    fn set(&self, s: Speaks) {
        let v = match s {
            Speaks::Unknown => 0,
            Speaks::Both => 1,
            Speaks::Http1Only => 2,
            Speaks::Http2Only => 3,
            Speaks::Neither => 4,
        };
        self.0.store(v, Ordering::Relaxed);
    }

    /// Whether to speak HTTP/2 to the upstream for a client speaking `h2`.
    pub fn h2_for(&self, h2: bool) -> bool {
        match self.get() {
            Speaks::Http1Only => false,
            Speaks::Http2Only => true,
            Speaks::Unknown | Speaks::Neither | Speaks::Both => h2,
        }
    }

    /// Probes `addr` (h2c with prior knowledge, then HTTP/1.1) and records the answer.
    pub async fn learn(&self, addr: SocketAddr) {
        let h2 = probe_h2c(addr).await;
        let h1 = probe_h1(addr).await;
        let speaks = match (h2, h1) {
            (Some(true), Some(true)) => Speaks::Both,
            (Some(true), Some(false)) => Speaks::Http2Only,
            (Some(false), Some(true)) => Speaks::Http1Only,
            (Some(false), Some(false)) => Speaks::Neither,
            _ => Speaks::Unknown,
        };
        tracing::debug!(%addr, ?speaks, "probed the upstream's HTTP versions");
        self.set(speaks);
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// `Some(true)` if the upstream answers the h2c preface with a SETTINGS frame, `Some(false)`
/// if it answers otherwise or closes, `None` if it cannot be reached.
async fn probe_h2c(addr: SocketAddr) -> Option<bool> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
        s.write_all(&hello).await.ok()?;
        let mut head = [0u8; 9];
        match s.read_exact(&mut head).await {
            Ok(_) => Some(head[3] == 4 && &head[..5] != b"HTTP/"),
            Err(_) => Some(false),
        }
    };
    tokio::time::timeout(TIMEOUT, work).await.unwrap_or(None)
}

/// `Some(true)` if the upstream answers an HTTP/1.1 request with an HTTP/1.x status line.
async fn probe_h1(addr: SocketAddr) -> Option<bool> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            b"OPTIONS * HTTP/1.1\r\nhost: localhost\r\nuser-agent: weft-protocol-probe\r\nconnection: close\r\n\r\n",
        )
        .await
        .ok()?;
        let mut head = [0u8; 7];
        match s.read_exact(&mut head).await {
            Ok(_) => Some(&head == b"HTTP/1."),
            Err(_) => Some(false),
        }
    };
    tokio::time::timeout(TIMEOUT, work).await.unwrap_or(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_upstream_gets_the_clients_version() {
        let p = LearnedProtocol::default();
        assert!(p.h2_for(true) && !p.h2_for(false));
        p.set(Speaks::Http1Only);
        assert!(!p.h2_for(true));
        p.set(Speaks::Http2Only);
        assert!(p.h2_for(false));
    }
}
