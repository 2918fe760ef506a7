//! Request path normalisation, before routing and authorization, as Envoy's `normalize_path`
//! and `merge_slashes` with Istio's default `BASE` normalisation: percent-encoded unreserved
//! characters are decoded (and other percent-encodings upper-cased), runs of slashes merged,
//! and `.`/`..` segments removed (RFC 3986 §5.2.4). Routes and policies then see one spelling
//! of each path (`//admin/x`, `/%61dmin/x`, `/public/../admin/x` are all `/admin/x`), and the
//! app is sent that same spelling.
//!
//! An encoded slash or backslash (`%2F`, `%5C`) is kept, decoded to `/` or refused, as the
//! service's `escapedSlashes` says. A `;` (path parameters, which servers such as Tomcat strip
//! from each segment, so that `/admin;x/y` would reach `/admin/y`) is refused: weft cannot tell
//! how the app reads it, and policies must not see a different path than the app.
use crate::config::EscapedSlashes;
use std::borrow::Cow;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("the path contains an encoded slash or backslash (%2F or %5C), which this service refuses")]
    EscapedSlash,
    #[error("the path contains ';' (path parameters), which weft refuses: apps read them differently")]
    PathParameters,
    #[error("the path contains '%' not followed by two hex digits")]
    BadPercent,
    #[error("the normalised path is not a valid request target")]
    Unparsable,
}

/// The normal form of `path` (without the query). Borrowed, without any work beyond one scan,
/// when the path is already normal, as nearly every path is. A path that does not start with
/// `/` (`*`) is left as it is.
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, Reject> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || is_normal(b) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(b, slashes)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Puts the request's path in normal form (the query is kept as sent), so that routing,
/// authorization and the app all see the same path.
pub fn normalize_request<B>(req: &mut http::Request<B>, slashes: EscapedSlashes) -> Result<(), Reject> {
    let Cow::Owned(path) = normalize(req.uri().path(), slashes)? else { return Ok(()) };
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| Reject::Unparsable)?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| Reject::Unparsable)?;
    Ok(())
}

/// No `%`, `;`, `\`, empty segment (but a trailing slash) or dot segment.
fn is_normal(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, c)| match c {
        b'%' | b';' | b'\\' => false,
        b'/' => !matches!(&b[i + 1..], [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]),
        _ => true,
    })
}

/// Percent-decodes unreserved characters, upper-cases other encodings, and deals with encoded
/// (and bare) slashes and backslashes; refuses `;`.
fn decode(b: &[u8], slashes: EscapedSlashes) -> Result<String, Reject> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // Bytes, not chars: everything pushed is ASCII, and the rest of the path (UTF-8 the
    // request line may carry) is copied whole.
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b';' => return Err(Reject::PathParameters),
            b'\\' => match slashes {
                EscapedSlashes::Keep => out.extend_from_slice(b"%5C"),
                EscapedSlashes::Decode => out.push(b'/'),
                EscapedSlashes::Reject => return Err(Reject::EscapedSlash),
            },
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(hi), Some(lo)) = (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c)))
                else {
                    return Err(Reject::BadPercent);
                };
                let c = (hi * 16 + lo) as u8;
                match c {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(c),
                    b'/' | b'\\' if slashes == EscapedSlashes::Decode => out.push(b'/'),
                    b'/' | b'\\' if slashes == EscapedSlashes::Reject => return Err(Reject::EscapedSlash),
                    _ => out.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]),
                }
                i += 3;
                continue;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// RFC 3986 §5.2.4 on an absolute path, with empty segments dropped (merged slashes). A path
/// that ended in `/`, `/.` or `/..` keeps a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path[1..].split('/') {
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => drop(kept.pop()),
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Reject> {
        normalize(p, EscapedSlashes::Keep).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b/", "/admin/x", "/a.b/c..d/.e", "/a-b_c~d", "*", "/api/v1/items/42"] {
            assert!(matches!(normalize(p, EscapedSlashes::Keep), Ok(Cow::Borrowed(s)) if s == p), "{p}");
        }
    }

    #[test]
    fn bypasses_of_a_prefix_are_normalised() {
        for (raw, want) in [
            ("//admin/x", "/admin/x"),
            ("/admin//x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/%41DMIN/x", "/ADMIN/x"),
            ("/public/../admin/x", "/admin/x"),
            ("/./admin/x", "/admin/x"),
            ("/public/%2e%2e/admin/x", "/admin/x"),
            ("/public/.%2E/admin/x", "/admin/x"),
            ("/../../admin/x", "/admin/x"),
            ("/admin/x/.", "/admin/x/"),
            ("/admin/x/..", "/admin/"),
            ("/admin/..", "/"),
            ("//", "/"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%5cb", "/a%5Cb"),
            ("/a%3cb%3E", "/a%3Cb%3E"),
            ("/a%20b", "/a%20b"),
            ("/a%7e", "/a~"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn escaped_slashes_are_kept_decoded_or_refused() {
        let with = |p, s| normalize(p, s).map(Cow::into_owned);
        assert_eq!(with("/admin%2Fx", EscapedSlashes::Keep).as_deref(), Ok("/admin%2Fx"));
        assert_eq!(with("/admin%2Fx", EscapedSlashes::Decode).as_deref(), Ok("/admin/x"));
        assert_eq!(with("/admin%5cx", EscapedSlashes::Decode).as_deref(), Ok("/admin/x"));
        assert_eq!(with("/public%2F..%2Fadmin/x", EscapedSlashes::Decode).as_deref(), Ok("/admin/x"));
        assert_eq!(with("/public%2F..%2Fadmin/x", EscapedSlashes::Keep).as_deref(), Ok("/public%2F..%2Fadmin/x"));
        assert_eq!(with("/admin%2fx", EscapedSlashes::Reject), Err(Reject::EscapedSlash));
        assert_eq!(with("/admin%5Cx", EscapedSlashes::Reject), Err(Reject::EscapedSlash));
        assert_eq!(with("/admin\\x", EscapedSlashes::Decode).as_deref(), Ok("/admin/x"));
        assert_eq!(with("/admin\\x", EscapedSlashes::Reject), Err(Reject::EscapedSlash));
    }

    #[test]
    fn path_parameters_and_bad_percent_are_refused() {
        for p in ["/admin;x", "/admin;x/y", "/public/..;/admin", "/a;"] {
            assert_eq!(norm(p), Err(Reject::PathParameters), "{p}");
        }
        for p in ["/a%", "/a%2", "/a%zz", "/a%2g/b"] {
            assert_eq!(norm(p), Err(Reject::BadPercent), "{p}");
        }
        // An encoded `;` is data, not a delimiter.
        assert_eq!(norm("/a%3bx").as_deref(), Ok("/a%3Bx"));
    }

    /// RFC 3986 §5.4: each reference merged with the base path `/b/c/d;p` (§5.2.3: the base's
    /// last segment replaced), then normalised, gives the RFC's target path.
    #[test]
    fn rfc3986_reference_resolution_examples() {
        for (reference, target) in [
            // §5.4.1
            ("g", "/b/c/g"),
            ("./g", "/b/c/g"),
            ("g/", "/b/c/g/"),
            ("", "/b/c/"),
            (".", "/b/c/"),
            ("./", "/b/c/"),
            ("..", "/b/"),
            ("../", "/b/"),
            ("../g", "/b/g"),
            ("../..", "/"),
            ("../../", "/"),
            ("../../g", "/g"),
            // §5.4.2
            ("../../../g", "/g"),
            ("../../../../g", "/g"),
            ("g.", "/b/c/g."),
            (".g", "/b/c/.g"),
            ("g..", "/b/c/g.."),
            ("..g", "/b/c/..g"),
            ("./../g", "/b/g"),
            ("./g/.", "/b/c/g/"),
            ("g/./h", "/b/c/g/h"),
            ("g/../h", "/b/c/h"),
        ] {
            let merged = format!("/b/c/{reference}");
            assert_eq!(norm(&merged).as_deref(), Ok(target), "{reference:?}");
        }
        // Absolute-path references (§5.4.1 "/g", §5.4.2 "/./g", "/../g") and §5.2.4's example.
        for (p, want) in [("/g", "/g"), ("/./g", "/g"), ("/../g", "/g"), ("/a/b/c/./../../g", "/a/g")] {
            assert_eq!(norm(p).as_deref(), Ok(want), "{p}");
        }
    }
}
