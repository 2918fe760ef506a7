//! `kind: ExportedServices`: which services this datacenter offers to which peers (Consul's
//! `exported-services`), and its checks. A service not exported is invisible to every peer,
//! and its mesh gateway refuses connections for it.
use super::common::{ApplyError, check_name};
use serde::{Deserialize, Serialize};

/// `kind: ExportedServices` — services offered to peers. Several may exist; a service is
/// exported to the union of the peers they name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExportedServicesSpec {
    pub services: Vec<ExportedService>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExportedService {
    /// A service of this datacenter.
    pub name: String,
    /// The peers that may call it, by the name this datacenter gave each peering.
    pub consumers: Vec<Consumer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Consumer {
    pub peer: String,
}

impl ExportedServicesSpec {
    /// The services exported to `peer`.
    pub fn to_peer<'a>(&'a self, peer: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.services.iter().filter(move |s| s.consumers.iter().any(|c| c.peer == peer)).map(|s| s.name.as_str())
    }
}

pub(super) fn validate_exported(doc: usize, spec: &ExportedServicesSpec) -> Result<(), ApplyError> {
    if spec.services.is_empty() {
        return Err(ApplyError::new(
            doc,
            "spec.services",
            "lists no service; name at least one, or delete the resource",
        ));
    }
    for (i, s) in spec.services.iter().enumerate() {
        check_name(doc, &format!("spec.services[{i}].name"), &s.name)?;
        if spec.services[..i].iter().any(|o| o.name == s.name) {
            return Err(ApplyError::new(
                doc,
                format!("spec.services[{i}].name"),
                format!("{:?} is listed twice; list its consumers once", s.name),
            ));
        }
        if s.consumers.is_empty() {
            return Err(ApplyError::new(
                doc,
                format!("spec.services[{i}].consumers"),
                "names no peer; a service is exported to the peers listed here",
            ));
        }
        for (j, c) in s.consumers.iter().enumerate() {
            check_name(doc, &format!("spec.services[{i}].consumers[{j}].peer"), &c.peer)?;
        }
    }
    Ok(())
}
