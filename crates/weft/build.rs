fn main() {
    // A position-dependent executable needs no load-time relocations, so the loader does not
    // touch (and keep resident) the pages of relocated read-only data: several MB less RSS
    // per weft process. The code itself stays position-independent.
    println!("cargo:rustc-link-arg-bins=-no-pie");

    // Release builds place the functions a sidecar runs (link-order.txt, written by
    // scripts/gen-link-order) together at the start of the code, so a sidecar keeps a few MB
    // of code resident instead of most of the binary. Only the default linker of
    // x86_64-unknown-linux-gnu (rust-lld) takes the list; WEFT_NO_LINK_ORDER=1 leaves it out.
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=WEFT_NO_LINK_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let opted_out = std::env::var_os("WEFT_NO_LINK_ORDER").is_some_and(|v| v != "0");
    if release && target == "x86_64-unknown-linux-gnu" && !opted_out {
        let list =
            std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("link-order.txt");
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", list.display());
        // Functions renamed since the list was written are simply not placed.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
