//! What HTTP versions a plaintext upstream speaks (a sidecar's app), learned by probing it:
//! the HTTP/2 connection preface and an empty SETTINGS frame are sent; an app that speaks h2c
//! answers with a SETTINGS frame, an HTTP/1.1-only app with an HTTP/1.1 response (usually
//! 400) or by closing. A cluster whose protocol the control plane leaves to the client ("use
//! the downstream protocol") then translates requests its app cannot take: HTTP/2 to an
//! HTTP/1.1-only app, HTTP/1.1 to an h2c-only app.
//!
//! The probe runs when the app's address becomes known and, until it has an answer (the app
//! may still be starting), again before the next request that needs it: no request is sent
//! in a version the app was not found to speak while it could have been asked.
use crate::transport::Connect;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// Nothing to probe (not a sidecar's app): the client's version is used.
    NotProbed,
    /// Not probed yet, or the upstream could not be reached: probed before the next request.
    Unknown,
    /// Answers neither probe as HTTP (not an HTTP app): the client's version is used.
    Neither,
    /// Answers both (the client's version is used).
    Both,
    Http1Only,
    Http2Only,
}

#[derive(Default)]
pub struct LearnedProtocol {
    speaks: AtomicU8,
    /// The address probed, once one is set.
    target: Mutex<Option<SocketAddr>>,
    /// Held while a probe runs: requests that need its answer wait for the one probe.
    probing: tokio::sync::Mutex<()>,
}

impl LearnedProtocol {
    pub fn get(&self) -> Speaks {
        match self.speaks.load(Ordering::Relaxed) {
            1 => Speaks::Both,
            2 => Speaks::Http1Only,
            3 => Speaks::Http2Only,
            4 => Speaks::Neither,
            5 => Speaks::Unknown,
            _ => Speaks::NotProbed,
        }
    }

    fn set(&self, s: Speaks) {
        let v = match s {
            Speaks::NotProbed => 0,
            Speaks::Both => 1,
            Speaks::Http1Only => 2,
            Speaks::Http2Only => 3,
            Speaks::Neither => 4,
            Speaks::Unknown => 5,
        };
        self.speaks.store(v, Ordering::Relaxed);
    }

    /// Whether to speak HTTP/2 to the upstream for a client speaking `h2`.
    pub fn h2_for(&self, h2: bool) -> bool {
        match self.get() {
            Speaks::Http1Only => false,
            Speaks::Http2Only => true,
            Speaks::NotProbed | Speaks::Unknown | Speaks::Neither | Speaks::Both => h2,
        }
    }

    /// Sets the address to probe; returns whether it changed (what was learned is then
    /// forgotten until the new address is probed).
    pub fn set_target(&self, addr: SocketAddr) -> bool {
        let mut target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if *target == Some(addr) {
            return false;
        }
        *target = Some(addr);
        self.set(Speaks::Unknown);
        true
    }

    /// Probes the target through `connector` unless its answer is known (waiting for a probe
    /// already running), and returns what it speaks.
    pub async fn learn(&self, connector: &dyn Connect) -> Speaks {
        if self.get() != Speaks::Unknown {
            return self.get();
        }
        let _probing = self.probing.lock().await;
        let target = *self.target.lock().unwrap_or_else(|p| p.into_inner());
        match (self.get(), target) {
            (Speaks::Unknown, Some(addr)) => {
                let speaks = probe(connector, addr).await;
                tracing::debug!(%addr, ?speaks, "probed the upstream's HTTP versions");
                // Unless the target changed meanwhile (then the next request probes anew).
                if *self.target.lock().unwrap_or_else(|p| p.into_inner()) == Some(addr) {
                    self.set(speaks);
                }
                speaks
            }
            (known, _) => known,
        }
    }
}

/// Probes `addr` (h2c with prior knowledge, then HTTP/1.1).
async fn probe(connector: &dyn Connect, addr: SocketAddr) -> Speaks {
    match (probe_h2c(connector, addr).await, probe_h1(connector, addr).await) {
        (Some(true), Some(true)) => Speaks::Both,
        (Some(true), Some(false)) => Speaks::Http2Only,
        (Some(false), Some(true)) => Speaks::Http1Only,
        (Some(false), Some(false)) => Speaks::Neither,
        _ => Speaks::Unknown,
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// `Some(true)` if the upstream answers the h2c preface with a SETTINGS frame, `Some(false)`
/// if it answers otherwise or closes, `None` if it cannot be reached.
async fn probe_h2c(connector: &dyn Connect, addr: SocketAddr) -> Option<bool> {
    let work = async {
        let mut s = connector.connect(addr).await.ok()?;
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
async fn probe_h1(connector: &dyn Connect, addr: SocketAddr) -> Option<bool> {
    let work = async {
        let mut s = connector.connect(addr).await.ok()?;
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
        assert!(p.set_target("127.0.0.1:1".parse().unwrap()));
        assert_eq!(p.get(), Speaks::Unknown);
        assert!(p.h2_for(true) && !p.h2_for(false));
        p.set(Speaks::Http1Only);
        assert!(!p.h2_for(true));
        p.set(Speaks::Http2Only);
        assert!(p.h2_for(false));
    }
}
