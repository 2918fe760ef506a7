//! Hop-by-hop headers: they describe one connection and must not be forwarded (RFC 9110 §7.6.1).
use http::header;

/// The first three apply to responses too. A request also loses `upgrade` and
/// `http2-settings`: a request that really upgrades (a WebSocket's) takes another path
/// ([`super::upgrade`]), so on this one they could only ask the app to switch protocols behind
/// the proxy's back (h2c upgrade smuggling).
const HOP_BY_HOP_NAMES: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "http2-settings"];

/// Pre-parsed, so stripping them does not parse names per request. A `static`, not a `const`:
/// a const array would be built and dropped at every use.
static HOP_BY_HOP: [http::HeaderName; 7] = [
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[0]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[1]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[2]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[3]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[4]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[5]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[6]),
];

/// Bit n is set if a hop-by-hop name is n bytes long: a header whose name length is not in
/// the set is passed over without comparing names (most are, e.g. `host`, `content-type`).
const HOP_BY_HOP_LENGTHS: u32 = {
    let (mut mask, mut i) = (0u32, 0);
    while i < HOP_BY_HOP_NAMES.len() {
        mask |= 1 << HOP_BY_HOP_NAMES[i].len();
        i += 1;
    }
    mask
};

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed set above, and any header the
/// message's `Connection` names. `request` also drops `te` and `transfer-encoding`, which hyper
/// re-derives for the upstream hop, and `upgrade` and `http2-settings` (see above). Most messages carry none or one of them, so the names
/// present are found in one pass over the map and only those are removed (each removal hashes);
/// `Connection` is parsed only when it holds more than a lone `keep-alive` or `close`.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap, request: bool) {
    let names = if request { &HOP_BY_HOP[..] } else { &HOP_BY_HOP[..3] };
    // `close` and `keep-alive` are connection options; any other token in `Connection` names a
    // header meant for this hop only. Almost every `Connection` is just one option, recognised
    // without parsing.
    let option = |t: &[u8]| t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close");
    let mut present = 0u8;
    for key in headers.keys() {
        let len = key.as_str().len();
        if len < 32
            && HOP_BY_HOP_LENGTHS & (1 << len) != 0
            && let Some(i) = names.iter().position(|n| n == key)
        {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 && headers.get_all(header::CONNECTION).iter().any(|v| !option(v.as_bytes())) {
        let named: Vec<http::HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty() && !option(t))
            .filter_map(|t| http::HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in names.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Hop"),
            ("connection", "x-other"),
            ("x-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("x-end-to-end", "3"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        let mut response = h.clone();
        super::strip_hop_by_hop(&mut response, false);
        let mut left: Vec<&str> = response.keys().map(|k| k.as_str()).collect();
        left.sort();
        // transfer-encoding stays on a response: hyper frames the body from it.
        assert_eq!(left, ["http2-settings", "transfer-encoding", "upgrade", "x-end-to-end"]);
        super::strip_hop_by_hop(&mut h, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-end-to-end"]);
    }
}
