//! Authorization (crates/weft-proxy/src/authz.rs): RBAC decoding and the decision.
//! An input is either an RBAC filter's protobuf bytes (what the control plane sends), decoded
//! as the proxy decodes it and checked against a request; or a policy built from the input
//! and a request, where the decision must keep two invariants:
//! - TCP fails closed: a connection allowed without HTTP attributes (opaque TCP) means every
//!   HTTP request of the same caller is allowed too (a policy's answer may only become known,
//!   never change, once the request is seen);
//! - negation: of a DENY policy on `X` and one on `NOT X`, exactly one refuses a request.
//!
//! A third kind of input is a path for normalisation (crates/weft-proxy/src/path.rs), whose
//! result must be in normal form: normalising it again changes nothing, and it has no `.` or
//! `..` segment, no empty segment, and (when escaped slashes are decoded) no `%2F` or `%5C`.
#![no_main]
use arbitrary::Arbitrary;
use envoy_types::pb::envoy::config::rbac::v3::Rbac;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_proxy::authz::{Authz, ClaimMatch, Match, PolicyDef, Subject, ValueMatch, What, Who};
use weft_proxy::config::EscapedSlashes;
use weft_proxy::path::normalize;

#[derive(Arbitrary, Debug)]
enum M {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl M {
    fn get(&self) -> Match {
        match self {
            M::Exact(s) => Match::Exact(s.clone()),
            M::Prefix(s) => Match::Prefix(s.clone()),
            M::Suffix(s) => Match::Suffix(s.clone()),
            M::Contains(s) => Match::Contains(s.clone()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Claim {
    String(Vec<String>, M),
    OneOf(Vec<String>, M),
    Present(Vec<String>),
}

impl Claim {
    fn get(&self) -> ClaimMatch {
        let (path, value) = match self {
            Claim::String(p, m) => (p, ValueMatch::String(m.get())),
            Claim::OneOf(p, m) => (p, ValueMatch::OneOf(m.get())),
            Claim::Present(p) => (p, ValueMatch::Present),
        };
        ClaimMatch { path: path.clone(), value }
    }
}

#[derive(Arbitrary, Debug)]
enum Wh {
    Any,
    And(Vec<Wh>),
    Or(Vec<Wh>),
    Not(Box<Wh>),
    Identity(M),
    Claim(Claim),
}

impl Wh {
    fn get(&self) -> Who {
        match self {
            Wh::Any => Who::Any,
            Wh::And(v) => Who::And(v.iter().map(Wh::get).collect()),
            Wh::Or(v) => Who::Or(v.iter().map(Wh::get).collect()),
            Wh::Not(w) => Who::Not(Box::new(w.get())),
            Wh::Identity(m) => Who::Identity(m.get()),
            Wh::Claim(c) => Who::Claim(c.get()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Wt {
    Any,
    And(Vec<Wt>),
    Or(Vec<Wt>),
    Not(Box<Wt>),
    Method(M),
    Header(String, M),
    Path(M),
    Port(u16),
    Claim(Claim),
}

impl Wt {
    fn get(&self) -> What {
        match self {
            Wt::Any => What::Any,
            Wt::And(v) => What::And(v.iter().map(Wt::get).collect()),
            Wt::Or(v) => What::Or(v.iter().map(Wt::get).collect()),
            Wt::Not(w) => What::Not(Box::new(w.get())),
            Wt::Method(m) => What::Header(":method".into(), m.get()),
            Wt::Header(n, m) => What::Header(n.to_ascii_lowercase(), m.get()),
            Wt::Path(m) => What::Path(m.get()),
            Wt::Port(p) => What::Port(*p),
            Wt::Claim(c) => What::Claim(c.get()),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Policy {
    who: Vec<Wh>,
    what: Vec<Wt>,
}

impl Policy {
    fn get(&self, name: &str) -> PolicyDef {
        PolicyDef {
            name: name.into(),
            who: self.who.iter().map(Wh::get).collect(),
            what: self.what.iter().map(Wt::get).collect(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Request {
    identity: Option<String>,
    port: u16,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    claims: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Rbac(Vec<u8>, Request),
    Policies { deny: Vec<Policy>, allow: Option<Vec<Policy>>, request: Request },
    Negation { what: Wt, request: Request },
    Normalize { path: String, slashes: u8 },
}

fn parts(r: &Request) -> Option<http::request::Parts> {
    let mut b = http::Request::builder().method(r.method.as_str()).uri(r.target.as_str());
    for (n, v) in &r.headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(()).ok().map(|r| r.into_parts().0)
}

fuzz_target!(|input: Input| {
    match input {
        Input::Rbac(bytes, request) => {
            let Ok(rbac) = Rbac::decode(bytes.as_slice()) else { return };
            let mut authz = Authz::default();
            if weft_proxy::authz::add_rbac(&mut authz, &rbac, "fuzz").is_err() {
                return;
            }
            let Some(http) = parts(&request) else { return };
            let claims = request.claims.as_deref().and_then(|c| serde_json::from_str(c).ok());
            let s = Subject {
                identity: request.identity.as_deref(),
                port: request.port,
                http: Some(&http),
                claims: claims.as_ref(),
            };
            let _ = authz.check(&s);
        }
        Input::Policies { deny, allow, request } => {
            let authz = Authz {
                deny: deny.iter().enumerate().map(|(i, p)| p.get(&format!("deny-{i}"))).collect(),
                allow: allow.map(|a| a.iter().enumerate().map(|(i, p)| p.get(&format!("allow-{i}"))).collect()),
            };
            let Some(http) = parts(&request) else { return };
            let claims = request.claims.as_deref().and_then(|c| serde_json::from_str(c).ok());
            let identity = request.identity.as_deref();
            let tcp = Subject { identity, port: request.port, http: None, claims: None };
            let req = Subject { identity, port: request.port, http: Some(&http), claims: claims.as_ref() };
            if authz.check(&tcp).is_ok() {
                assert!(authz.check(&req).is_ok(), "TCP allowed but HTTP denied: {authz:?}");
            }
        }
        Input::Negation { what, request } => {
            let Some(http) = parts(&request) else { return };
            let what = what.get();
            let deny = |w: What| Authz {
                deny: vec![PolicyDef { name: "p".into(), who: vec![Who::Any], what: vec![w] }],
                allow: None,
            };
            // Every attribute known (claims included: a request without a token leaves claim
            // matches undecided, as TCP does, so a DENY on either side refuses it).
            let claims = request.claims.as_deref().and_then(|c| serde_json::from_str(c).ok()).unwrap_or_default();
            let s = Subject {
                identity: request.identity.as_deref(),
                port: request.port,
                http: Some(&http),
                claims: Some(&claims),
            };
            let (yes, no) =
                (deny(what.clone()).check(&s).is_err(), deny(What::Not(Box::new(what.clone()))).check(&s).is_err());
            assert_ne!(yes, no, "{what:?} and its negation decide alike");
        }
        Input::Normalize { path, slashes } => {
            let slashes =
                [EscapedSlashes::Keep, EscapedSlashes::Decode, EscapedSlashes::Reject][usize::from(slashes) % 3];
            let Ok(once) = normalize(&path, slashes) else { return };
            assert_eq!(normalize(&once, slashes).as_deref(), Ok(&*once), "normalising {path:?} twice");
            if once.starts_with('/') {
                let segments: Vec<&str> = once[1..].split('/').collect();
                let last = segments.len() - 1;
                for (i, seg) in segments.iter().enumerate() {
                    assert!(*seg != "." && *seg != "..", "{path:?} → {once:?} keeps a dot segment");
                    assert!(!seg.is_empty() || i == last, "{path:?} → {once:?} has an empty segment");
                }
                if slashes == EscapedSlashes::Decode {
                    let upper = once.to_ascii_uppercase();
                    assert!(!upper.contains("%2F") && !upper.contains("%5C"), "{path:?} → {once:?}");
                }
            }
        }
    }
});
