//! JWT validation at the inbound sidecar, end to end: a RequestAuthentication with one issuer
//! whose keys are served over HTTP and one whose keys are in a file; tokens signed here with
//! real ECDSA keys and sent with curl through a calling sidecar. Each refusal is a 401 with its
//! own reason; claims feed authorization; a changed JWKS file is picked up without a restart.
use std::time::Duration;
use weft_tests::jwt::{JwksServer, SigningKey, jwks, unix_now as now};
use weft_tests::*;

const ISSUER: &str = "https://issuer.test";
const FILE_ISSUER: &str = "file-issuer";

#[test]
fn tokens_are_validated_with_a_reason_for_each_refusal_and_claims_feed_authorization() {
    let m = SmallMesh::start("jwt", 1);
    let (key_a, key_b, key_c) = (SigningKey::new("a"), SigningKey::new("b"), SigningKey::new("c"));
    let jwks_server = JwksServer::start(jwks(&[&key_a]));
    let port = jwks_server.port;
    let jwks_file = m.dir.path.join("file-issuer.jwks");
    std::fs::write(&jwks_file, jwks(&[&key_b])).unwrap();

    // A source that cannot be read fails the apply, and nothing is stored.
    let closed = free_port();
    let out = apply_yaml(
        &m.dir,
        &m.control.addr,
        "unreachable.yaml",
        &format!(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: bad}}\nspec:\n  service: backend\n  issuers:\n  - {{issuer: x, jwksUri: \"http://127.0.0.1:{closed}/jwks\"}}\n"
        ),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("spec.issuers[0].jwksUri"), "{}", stderr(&out));
    assert_eq!(m.control.api("/api/v1/resources/requestauthentications").unwrap(), serde_json::json!([]));

    let out = apply_yaml(
        &m.dir,
        &m.control.addr,
        "jwt.yaml",
        &format!(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: backend-jwt}}\nspec:\n  service: backend\n  required: true\n  issuers:\n  - issuer: {ISSUER}\n    audiences: [backend]\n    jwksUri: http://127.0.0.1:{port}/jwks\n    clockSkew: 5s\n  - issuer: {FILE_ISSUER}\n    jwksFile: {}\n    refreshInterval: 1s\n",
            jwks_file.display()
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let claims = |aud: &str, exp: u64, groups: &[&str]| serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": aud, "exp": exp, "groups": groups});
    let valid = key_a.sign("a", claims("backend", now() + 300, &["admin"]));
    let call = |token: Option<&str>| {
        let auth = token.map(|t| format!("authorization: Bearer {t}"));
        let mut args = vec![];
        if let Some(a) = &auth {
            args.extend(["-H", a.as_str()]);
        }
        let url = m.edge.url("backend", "/info");
        args.push(&url);
        curl(&args).unwrap()
    };
    wait_until(Duration::from_secs(5), "the sidecar requires tokens", || call(None).status == 401);
    assert_eq!(call(Some(&valid)).status, 200);

    let cases = [
        (None, "jwt-missing"),
        (Some(key_a.sign("a", claims("backend", now() - 60, &[]))), "jwt-expired"),
        (Some(key_a.sign("a", claims("frontend", now() + 300, &[]))), "jwt-wrong-audience"),
        // Signed by another key under key a's id.
        (Some(key_b.sign("a", claims("backend", now() + 300, &[]))), "jwt-bad-signature"),
        (Some(key_a.sign("z", claims("backend", now() + 300, &[]))), "jwt-unknown-key"),
        (Some("not-a-jwt".to_owned()), "jwt-malformed"),
    ];
    for (token, reason) in &cases {
        let r = call(token.as_deref());
        assert_eq!(r.status, 401, "{reason}: {r:?}");
        assert_eq!(r.headers.get("x-weft-error").map(String::as_str), Some(*reason), "{r:?}");
        assert!(r.headers.get("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{r:?}");
    }
    // Within the 5 s clock skew an expired token still passes.
    assert_eq!(call(Some(&key_a.sign("a", claims("backend", now() - 2, &[])))).status, 200);
    // A gRPC call without a token gets UNAUTHENTICATED.
    let out = weft(&["demo-client", "--target", &format!("127.0.0.1:{}", m.edge.ports["backend"])]);
    assert!(!out.status.success());
    assert!(stderr(&out).to_ascii_lowercase().contains("unauthenticated"), "{}", stderr(&out));

    // Claims in authorization: only the issuer's tokens with group admin.
    let out = apply_yaml(
        &m.dir,
        &m.control.addr,
        "admins.yaml",
        &format!(
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: admins-only}}\nspec:\n  service: backend\n  rules:\n  - from: [{{requestPrincipals: [\"{ISSUER}/*\"]}}]\n    when: [{{claim: groups, values: [admin]}}]\n"
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let developer = key_a.sign("a", claims("backend", now() + 300, &["dev"]));
    wait_until(Duration::from_secs(5), "a developer's token is denied", || call(Some(&developer)).status == 403);
    assert_eq!(call(Some(&developer)).headers.get("x-weft-error").map(String::as_str), Some("denied"));
    assert_eq!(call(Some(&valid)).status, 200);

    // The file issuer: key c is unknown until the file names it; then, within the refresh
    // interval, it is accepted (the policy allows only the first issuer, so drop it first).
    assert!(weft(&["delete", "authorizationpolicy", "admins-only", "--control", &m.control.addr]).status.success());
    let from_file = key_c.sign("c", serde_json::json!({"iss": FILE_ISSUER, "sub": "svc", "exp": now() + 300}));
    wait_until(Duration::from_secs(5), "policy gone", || call(Some(&valid)).status == 200);
    assert_eq!(call(Some(&from_file)).headers.get("x-weft-error").map(String::as_str), Some("jwt-unknown-key"));
    std::fs::write(&jwks_file, jwks(&[&key_b, &key_c])).unwrap();
    wait_until(Duration::from_secs(10), "the refreshed JWKS accepts key c", || call(Some(&from_file)).status == 200);

    // Every check is counted by result.
    let metrics = curl(&[&format!("http://{}/metrics", m.backends[0].admin())]).unwrap().body;
    for result in ["valid", "jwt-missing", "jwt-expired", "jwt-bad-signature", "jwt-unknown-key"] {
        let line = format!("weft_jwt_authentications_total{{service=\"backend\",result=\"{result}\"}}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
}
