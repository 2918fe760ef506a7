//! What the checks of every kind share: the error a rejected document gets, and the checks of
//! names, service references, header names and regular expressions.
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a document was rejected, and where. `path` is the field path inside the document
/// (`spec.rules[0].backendRefs[1].weight`); `file` and `document` are filled in by whoever knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct ApplyError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Index of the document in a multi-document file, from 0.
    pub document: usize,
    pub path: String,
    pub reason: String,
}

impl ApplyError {
    pub fn new(document: usize, path: impl Into<String>, reason: impl Into<String>) -> Self {
        ApplyError { file: None, document, path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        write!(f, "document {}", self.document + 1)?;
        if !self.path.is_empty() {
            write!(f, ", field {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Whether `name` is a DNS-1123 label, as Kubernetes requires for names; `Err` says why not.
pub fn valid_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(
            "is not a valid name: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        )
    }
}

pub(super) fn check_name(doc: usize, path: &str, name: &str) -> Result<(), ApplyError> {
    valid_name(name).map_err(|why| ApplyError::new(doc, path, format!("{name:?} {why}")))
}

/// A regular expression as routes use it: the whole value must match (RE2 syntax, which the
/// `regex` crate implements with the same linear-time guarantee).
pub fn full_match_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
}

pub(super) fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub(super) fn check_service_ref(
    doc: usize,
    path: &str,
    kind: Option<&str>,
    group: Option<&str>,
) -> Result<(), ApplyError> {
    if kind.is_some_and(|k| k != "Service") {
        return Err(ApplyError::new(doc, format!("{path}.kind"), "only kind Service is supported"));
    }
    if group.is_some_and(|g| !g.is_empty() && g != "core") {
        return Err(ApplyError::new(doc, format!("{path}.group"), "only the core group (\"\") is supported"));
    }
    Ok(())
}
