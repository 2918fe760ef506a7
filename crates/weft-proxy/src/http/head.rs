//! Validation of an HTTP/1 request head hyper has parsed, before anything routes or authorizes
//! it (RFC 9112 §3.2, RFC 9110 §7.2): a request whose target or `Host` could be read one way
//! here and another way by the app is refused, so routing, authorization and the app all see
//! the same request. hyper has already refused what it cannot parse (framing, header syntax).
//!
//! A pure function of the request head, so it can be fuzzed on its own.
use http::header::{CONNECTION, HOST};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Method, Request, Version};

/// Why a request head is refused (`400 bad-request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("more than one Host header")]
    MultipleHosts,
    #[error("an HTTP/1.1 request needs a Host header")]
    MissingHost,
    #[error("the Host header is not a valid host[:port]")]
    InvalidHost,
    #[error("the Connection header names Host, which the request cannot do without")]
    ConnectionNamesHost,
    #[error("the request target `*` is only for OPTIONS")]
    Asterisk,
    #[error("the request target is an absolute URI that is not http(s)://host[:port]/… without userinfo")]
    InvalidAbsoluteTarget,
    #[error("CONNECT is not proxied")]
    Connect,
}

/// Checks an HTTP/1.x request head, and rewrites an absolute-form target (`GET http://a/x`)
/// to the origin form with `Host` set to the target's authority: RFC 9112 §3.2.2 says the
/// target's authority wins over `Host`, as Envoy and nginx have it, and an app behind a
/// sidecar expects the origin form.
///
/// The common request (origin form, one valid `Host`) costs one pass over the header fields,
/// with no hashing and no allocation.
pub fn check<B>(req: &mut Request<B>) -> Result<(), BadRequest> {
    let mut host = None;
    for (name, value) in req.headers() {
        if name == HOST {
            if host.replace(value).is_some() {
                return Err(BadRequest::MultipleHosts);
            }
        } else if name == CONNECTION && names_host(value) {
            return Err(BadRequest::ConnectionNamesHost);
        }
    }
    if req.method() == Method::CONNECT {
        return Err(BadRequest::Connect);
    }
    let uri = req.uri();
    if uri.authority().is_none() {
        if uri.path() == "*" && req.method() != Method::OPTIONS {
            return Err(BadRequest::Asterisk);
        }
        return match host {
            Some(h) if valid_host(h.as_bytes()) => Ok(()),
            Some(_) => Err(BadRequest::InvalidHost),
            None if req.version() == Version::HTTP_11 => Err(BadRequest::MissingHost),
            None => Ok(()),
        };
    }
    let (authority, path) = absolute_target(uri).ok_or(BadRequest::InvalidAbsoluteTarget)?;
    *req.uri_mut() = Uri::from(path);
    req.headers_mut().insert(HOST, authority);
    Ok(())
}

/// The authority (as a `Host` value) and origin-form target of an absolute-form target, if it
/// is an `http` or `https` URI with a valid host and no userinfo.
fn absolute_target(uri: &Uri) -> Option<(HeaderValue, PathAndQuery)> {
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?.as_str();
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        || !valid_host(authority.as_bytes())
    {
        return None;
    }
    let path = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    Some((HeaderValue::from_str(authority).ok()?, path))
}

/// Whether a `Connection` value lists `host` among its tokens.
fn names_host(value: &HeaderValue) -> bool {
    value.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"host"))
}

/// `uri-host [":" port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a bracketed IP literal or a
/// reg-name (which covers IPv4 addresses), not empty; a port of digits. No userinfo, spaces,
/// slashes or other characters an app might split the value at.
fn valid_host(v: &[u8]) -> bool {
    let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b);
    let ip_literal = |l: &[u8]| !l.is_empty() && l.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    let (host_ok, port) = match v.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(end) => (ip_literal(&rest[..end]), &rest[end + 1..]),
            None => return false,
        },
        None => {
            let (host, port) = v.split_at(v.iter().rposition(|&b| b == b':').unwrap_or(v.len()));
            (!host.is_empty() && host.iter().all(reg_name), port)
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::{BadRequest, check};

    fn head(method: &str, target: &str, version: http::Version, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(target).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn heads_are_checked() {
        const HTTP_10: http::Version = http::Version::HTTP_10;
        const HTTP_11: http::Version = http::Version::HTTP_11;
        type Case<'a> = (&'a str, &'a str, http::Version, &'a [(&'a str, &'a str)], Result<(), BadRequest>);
        let cases: &[Case] = &[
            ("GET", "/x", HTTP_11, &[("host", "app")], Ok(())),
            ("GET", "/x", HTTP_11, &[("host", "app:8080")], Ok(())),
            ("GET", "/x", HTTP_11, &[("host", "10.0.0.1:80")], Ok(())),
            ("GET", "/x", HTTP_11, &[("host", "[::1]:80")], Ok(())),
            ("GET", "/x", HTTP_10, &[], Ok(())),
            ("OPTIONS", "*", HTTP_11, &[("host", "app")], Ok(())),
            ("GET", "/x", HTTP_11, &[("host", "app"), ("connection", "keep-alive, x-hop")], Ok(())),
            ("GET", "/x", HTTP_11, &[], Err(BadRequest::MissingHost)),
            ("GET", "/x", HTTP_11, &[("host", "app"), ("host", "evil")], Err(BadRequest::MultipleHosts)),
            ("GET", "/x", HTTP_11, &[("host", "app"), ("host", "app")], Err(BadRequest::MultipleHosts)),
            ("GET", "/x", HTTP_11, &[("host", "app evil")], Err(BadRequest::InvalidHost)),
            ("GET", "/x", HTTP_11, &[("host", "")], Err(BadRequest::InvalidHost)),
            ("GET", "/x", HTTP_11, &[("host", "user@app")], Err(BadRequest::InvalidHost)),
            ("GET", "/x", HTTP_11, &[("host", "app/x")], Err(BadRequest::InvalidHost)),
            ("GET", "/x", HTTP_11, &[("host", "app:80x")], Err(BadRequest::InvalidHost)),
            ("GET", "/x", HTTP_11, &[("host", "[::1")], Err(BadRequest::InvalidHost)),
            ("GET", "/x", HTTP_10, &[("host", "a b")], Err(BadRequest::InvalidHost)),
            (
                "GET",
                "/x",
                HTTP_11,
                &[("host", "app"), ("connection", "close, Host")],
                Err(BadRequest::ConnectionNamesHost),
            ),
            ("GET", "*", HTTP_11, &[("host", "app")], Err(BadRequest::Asterisk)),
            ("CONNECT", "app:443", HTTP_11, &[("host", "app:443")], Err(BadRequest::Connect)),
            ("GET", "ftp://app/x", HTTP_11, &[("host", "app")], Err(BadRequest::InvalidAbsoluteTarget)),
            ("GET", "http://u@app/x", HTTP_11, &[("host", "app")], Err(BadRequest::InvalidAbsoluteTarget)),
        ];
        for (method, target, version, headers, expected) in cases {
            let mut req = head(method, target, *version, headers);
            assert_eq!(&check(&mut req), expected, "{method} {target} {version:?} {headers:?}");
        }
    }

    /// RFC 9112 §3.2.2: the target's authority replaces `Host`; the app gets the origin form.
    #[test]
    fn absolute_form_becomes_origin_form_with_the_targets_host() {
        for (target, host, path) in [
            ("http://evil.example/x?y=1", Some("app"), "/x?y=1"),
            ("HTTP://evil.example", None, "/"),
            ("https://evil.example:8443/x", Some("app evil"), "/x"),
        ] {
            let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
            let mut req = head("GET", target, http::Version::HTTP_11, &headers);
            assert_eq!(check(&mut req), Ok(()), "{target}");
            assert_eq!(req.uri(), path, "{target}");
            let authority = target.split_once("://").unwrap().1.split('/').next().unwrap();
            assert_eq!(req.headers().get_all("host").iter().collect::<Vec<_>>(), [authority], "{target}");
        }
    }
}
