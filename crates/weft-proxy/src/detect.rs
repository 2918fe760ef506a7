//! Protocol detection: peeks at the first bytes a client sends, without consuming them, and
//! decides between HTTP/2 (prior knowledge), HTTP/1.x, TLS (a ClientHello, with the server
//! name and ALPN protocols it asks for) and opaque TCP. A client that sends nothing within
//! the detection timeout (server-speaks-first protocols) is treated as TCP.
use crate::context::ClientHello;
use crate::transport::Peek;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS handshake. Until the proxy terminates TLS itself it is forwarded as opaque TCP.
    Tls(Box<ClientHello>),
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest first line we wait for before deciding it is not HTTP/1 (a request line that
/// names an HTTP request target is recognised from its first bytes, whatever its length).
const MAX_REQUEST_LINE: usize = 8192;

enum Verdict {
    Known(Protocol),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf[0] == TLS_HANDSHAKE {
        return client_hello(buf);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Verdict::Known(Protocol::Http2) } else { Verdict::NeedMore };
    }
    http1(buf)
}

/// Whether the bytes begin like an HTTP/1 request: a method token, whitespace, and either a
/// request target that only HTTP uses (`/`, `*`, `http://`, `https://`) or a first line that
/// ends in an `HTTP/` version. Such a connection is HTTP even when its request is malformed:
/// the HTTP server answers it (400, 414, 431) rather than passing its bytes to the app
/// unchecked. Leading empty lines are skipped, as the HTTP parser does (RFC 9112 §2.2 asks
/// for at least one). Anything else is opaque TCP (e.g. `hello world`, `SET key value`,
/// `OPTIONS rtsp://host RTSP/1.0`).
fn http1(buf: &[u8]) -> Verdict {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let buf = &buf[start..];
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let method_len = buf.iter().take_while(|&&b| is_tchar(b)).count();
    if method_len == 0 || method_len > MAX_METHOD {
        return Verdict::Known(Protocol::Tcp);
    }
    let Some(&after) = buf.get(method_len) else { return Verdict::NeedMore };
    if after != b' ' && after != b'\t' {
        return Verdict::Known(Protocol::Tcp);
    }
    let target = &buf[method_len + 1..];
    const SCHEMES: [&[u8]; 2] = [b"http://", b"https://"];
    let starts = |p: &[u8]| target.len() >= p.len() && target[..p.len()].eq_ignore_ascii_case(p);
    if target.starts_with(b"/") || target.starts_with(b"*") || SCHEMES.iter().any(|s| starts(s)) {
        return Verdict::Known(Protocol::Http1);
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
            let version = line.rsplit(|&b| b == b' ' || b == b'\t').next().unwrap_or_default();
            match version.starts_with(b"HTTP/") {
                true => Verdict::Known(Protocol::Http1),
                false => Verdict::Known(Protocol::Tcp),
            }
        }
        // A target that may still become `http://…`.
        None if SCHEMES.iter().any(|s| s.len() > target.len() && s[..target.len()].eq_ignore_ascii_case(target)) => {
            Verdict::NeedMore
        }
        None if buf.len() >= MAX_REQUEST_LINE => Verdict::Known(Protocol::Tcp),
        None => Verdict::NeedMore,
    }
}

/// Longest method token taken for HTTP (the longest registered method is 17 bytes).
const MAX_METHOD: usize = 32;

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// TLS record content type of a handshake message (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

/// Parses a TLS ClientHello (nothing is consumed: `buf` holds peeked bytes). Only the
/// hello's first record is read; a hello split over records (rare, over 16 KiB) counts as TLS
/// without its server name and protocols.
fn client_hello(buf: &[u8]) -> Verdict {
    use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake};
    let record = match tls_parser::parse_tls_plaintext(buf) {
        Ok((_, record)) => record,
        Err(tls_parser::nom::Err::Incomplete(_)) if buf.len() < MAX_REQUEST_LINE => return Verdict::NeedMore,
        // Not TLS after all, or a hello too large to peek at: opaque bytes.
        Err(_) => return Verdict::Known(Protocol::Tcp),
    };
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch))) = record.msg.first() else {
        return Verdict::Known(Protocol::Tcp);
    };
    let mut hello = ClientHello::default();
    let extensions = ch.ext.and_then(|e| tls_parser::parse_tls_client_hello_extensions(e).ok());
    for ext in extensions.map(|(_, exts)| exts).unwrap_or_default() {
        match ext {
            TlsExtension::SNI(names) => {
                hello.server_name = names.first().map(|(_, name)| String::from_utf8_lossy(name).into_owned())
            }
            TlsExtension::ALPN(protocols) => {
                hello.alpn = protocols.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()
            }
            _ => {}
        }
    }
    Verdict::Known(Protocol::Tls(Box::new(hello)))
}

/// Waits for enough of the client's first bytes to tell the protocol.
pub async fn detect<T: Peek>(stream: &mut T, timeout: Duration) -> std::io::Result<Protocol> {
    let mut buf = vec![0u8; MAX_REQUEST_LINE];
    let work = async {
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Ok(Protocol::Tcp); // closed before sending anything
            }
            match classify(&buf[..n]) {
                Verdict::Known(p) => return Ok(p),
                // The bytes stay in the socket, so readable() would return at once: pause briefly.
                Verdict::NeedMore => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(Ok(Protocol::Tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(buf: &[u8]) -> Option<Protocol> {
        match classify(buf) {
            Verdict::Known(p) => Some(p),
            Verdict::NeedMore => None,
        }
    }

    #[test]
    fn classifies() {
        assert_eq!(known(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Protocol::Http1));
        assert_eq!(known(b"POST /a?b HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(known(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(known(b"PRI * HT"), None);
        assert_eq!(known(b"GE"), None);
        assert_eq!(known(b"hello world\r\n"), Some(Protocol::Tcp));
        assert_eq!(known(b"SET key value\r\n"), Some(Protocol::Tcp));
        assert_eq!(known(b"OPTIONS rtsp://h/ RTSP/1.0\r\n"), Some(Protocol::Tcp));
        assert_eq!(known(b"GET ht"), None, "may still be an absolute-form target");
        assert_eq!(known(b"\x16\x03\x01\x02\x00"), None, "a TLS record, still incomplete");
        assert_eq!(known(b"\x16\x00garbage"), Some(Protocol::Tcp));
        assert_eq!(known(b"PING\r\n"), Some(Protocol::Tcp));
    }

    /// Whatever begins like an HTTP request is HTTP, so the HTTP server answers a malformed
    /// one (400, 414, 431) instead of its bytes reaching the app as opaque TCP: a target only
    /// HTTP uses is recognised from its first byte (a long URL needs no line end within the
    /// peek buffer), another one from its `HTTP/` version.
    #[test]
    fn malformed_http_is_http() {
        let long = [&b"GET /"[..], &[b'a'; 70_000]].concat();
        for probe in [
            &b"GET /long-path-not-finished"[..],
            &long,
            b"\r\nGET / HTTP/1.1\r\n",
            b"\r\n\r\nGET / HTTP/1.1\r\n",
            b"\nGET / HTTP/1.1\n",
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET\t/ HTTP/1.1\r\n",
            b"GET /\tHTTP/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTP/1.2\r\n",
            b"GET /\r\n",
            b"GET http://evil.example/ HTTP/1.1\r\n",
            b"GET * HTTP/1.1\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"get / HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        ] {
            assert_eq!(
                known(probe),
                Some(Protocol::Http1),
                "{:?}",
                String::from_utf8_lossy(&probe[..probe.len().min(40)])
            );
        }
    }

    /// A ClientHello as rustls writes it: recognised whole, with its server name and ALPN,
    /// and asked for more while it is cut short.
    #[test]
    fn recognises_a_tls_client_hello() {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = "backend.weft.local".try_into().unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let expected =
            ClientHello { server_name: Some("backend.weft.local".into()), alpn: vec!["h2".into(), "http/1.1".into()] };
        assert_eq!(known(&hello), Some(Protocol::Tls(Box::new(expected))));
        assert_eq!(known(&hello[..hello.len() / 2]), None);
    }
}
