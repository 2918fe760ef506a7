//! Join tokens (crates/weft-control/src/token.rs), as the control plane reads them from a
//! proxy (an input is the presented token). Properties: a presented token never verifies
//! (the fuzzer cannot sign, so one that did would be forged); a token this control plane
//! issues, for any service name (here the input), verifies to exactly its claims until it
//! expires, and `id_of` reads its id.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use weft_control::fuzzing::{TokenKey, id_of};

static KEY: LazyLock<TokenKey> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("weft-fuzz-token-{}", std::process::id()));
    let key = TokenKey::open(&dir).expect("token key");
    let _ = std::fs::remove_dir_all(&dir);
    key
});

fuzz_target!(|text: &str| {
    if let Ok(claims) = KEY.verify(Some(text), 0) {
        panic!("a token the fuzzer wrote verified: {text:?} → {claims:?}");
    }
    let _ = id_of(text);
    let exp = 1_000_000 + text.len() as u64;
    let (claims, token) = KEY.issue(text, exp);
    assert_eq!(KEY.verify(Some(&token), exp - 1).as_ref(), Ok(&claims));
    assert!(KEY.verify(Some(&token), exp).is_err(), "a token verified at its expiry");
    assert_eq!(id_of(&token).as_ref(), Some(&claims.id));
    assert_eq!(claims.service, text);
});
