//! YAML resource parsing and validation (crates/weft-api/src/resource.rs and a module per kind
//! in resource/) as `weft apply` does it: the file's documents are parsed and validated by the
//! CLI, sent as JSON, and parsed and validated again by the control plane. Property: whatever
//! the CLI accepts, the control plane accepts as the same resources (nothing validated in YAML
//! is lost or changed on its way as JSON).
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_api::resource::{Resource, parse_documents};

fuzz_target!(|text: &str| {
    let Ok(docs) = parse_documents(text) else { return };
    for (i, doc) in docs.iter().enumerate() {
        let json = serde_json::to_value(doc).expect("a resource serializes");
        let again = Resource::from_json(i, json.clone());
        assert_eq!(again.as_ref().ok(), Some(doc), "document {i} as JSON {json} → {again:?}");
    }
});
