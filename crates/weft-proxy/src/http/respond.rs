//! Responses the proxy makes itself. Each says why in the `x-weft-error` header (and, for
//! gRPC clients, in `grpc-status`/`grpc-message`), so a client can tell them from the app's.
use super::body::UpstreamBody;
use crate::error::{ERROR_HEADER, POLICY_HEADER, ProxyError};
use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{Either, Full};

pub fn error_response(e: &ProxyError, grpc: bool) -> Response<Either<UpstreamBody, Full<Bytes>>> {
    if let ProxyError::Redirect { location, .. } = e {
        let mut r = Response::new(Either::Right(Full::default()));
        *r.status_mut() = e.status();
        if let Ok(v) = HeaderValue::from_str(location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    }
    let mut resp = if grpc {
        // gRPC clients read the status from grpc-status; UNAVAILABLE (14) lets them retry.
        let mut r = Response::new(Either::Right(Full::default()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from_static(e.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&e.to_string()) {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!("weft: {e}\n")))));
        *r.status_mut() = e.status();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    resp.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static(e.reason()));
    if let ProxyError::Denied { policy } = e
        && let Ok(v) = HeaderValue::from_str(policy)
    {
        resp.headers_mut().insert(POLICY_HEADER, v);
    }
    // RFC 9110: when to try again, in whole seconds (at least one).
    if let ProxyError::RateLimited(l) = e {
        let secs = l.retry_after.as_secs() + u64::from(l.retry_after.subsec_nanos() > 0);
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    // RFC 6750: a refused bearer token says so, and why.
    if let ProxyError::Unauthenticated(j) = e {
        let challenge = match j {
            crate::jwt::JwtError::Missing => "Bearer".to_owned(),
            _ => format!("Bearer error=\"invalid_token\", error_description=\"{j}\""),
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}
