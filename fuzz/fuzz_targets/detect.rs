//! Protocol detection and TLS ClientHello parsing (crates/weft-proxy/src/detect.rs) on a
//! connection's first bytes. Besides not panicking:
//! - it never waits for more than 8 KiB (what it peeks at): an undecided prefix is short;
//! - the verdict does not depend on how the bytes arrive: once a prefix decides, the whole
//!   input decides the same (a client's segments must not change what the proxy does).
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_proxy::fuzzing::detect;

fuzz_target!(|data: &[u8]| {
    let whole = detect(data);
    if whole.is_none() {
        assert!(data.len() < 8192, "undecided after {} bytes", data.len());
    }
    // A few prefixes, spread over the input (every one would make each run quadratic).
    let step = (data.len() / 8).max(1);
    for cut in (1..data.len()).step_by(step) {
        if let Some(early) = detect(&data[..cut]) {
            assert_eq!(Some(&early), whole.as_ref(), "the first {cut} bytes decided otherwise");
        }
    }
});
