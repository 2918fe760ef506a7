//! What the store holds: its tables, the writes made to them, and the changes found in a
//! shared store.
use weft_api::resource::JwksSource;

/// A change to write atomically.
pub enum Write<'a> {
    PutResource(&'a str, &'a str),
    DeleteResource(&'a str),
    /// An instance whose proxy is connected to this control plane (in etcd: under its lease).
    PutInstance(&'a str, &'a str),
    /// An instance's record changed here (a health report) while its proxy's stream may be
    /// at another replica (in etcd: its lease stays whose it is; nothing if it is gone).
    UpdateInstance(&'a str, &'a str),
    /// An instance gone for good (its proxy deregistered).
    DeleteInstance(&'a str),
    /// An instance whose proxy's stream to this control plane ended (in etcd: deleted only
    /// while this replica holds it; its proxy may have moved to another).
    ReleaseInstance(&'a str),
    PutToken(&'a str, &'a str),
    DeleteToken(&'a str),
    PutVip(&'a str, &'a str),
    /// The keys last read from a JWKS source (key: [`jwks_key`]).
    PutJwks(&'a str, &'a str),
    DeleteJwks(&'a str),
    /// A peering with another datacenter (key: the peering's name; see `crate::peering`).
    PutPeer(&'a str, &'a str),
    DeletePeer(&'a str),
}

/// The store's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Resources,
    Instances,
    Tokens,
    Vips,
    /// Keys read from issuers' JWKS sources, so every replica (and a restart) serves the
    /// last good keys without reading them itself.
    Jwks,
    /// Peerings with other datacenters: how to reach each, its secrets' digests, and the
    /// state it last sent (what it exports, its roots and gateways).
    Peers,
}

impl Table {
    pub const ALL: [Table; 6] =
        [Table::Resources, Table::Instances, Table::Tokens, Table::Vips, Table::Jwks, Table::Peers];

    pub fn name(self) -> &'static str {
        match self {
            Table::Resources => "resources",
            Table::Instances => "instances",
            Table::Tokens => "tokens",
            Table::Vips => "vips",
            Table::Jwks => "jwks",
            Table::Peers => "peers",
        }
    }

    /// Whether the table's rows hold secrets (a peering's exchange secret): etcd keeps them
    /// sealed under the store key, as it keeps the CA's key.
    pub fn sealed(self) -> bool {
        self == Table::Peers
    }

    pub(super) fn of(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl<'a> Write<'a> {
    /// A row put into `table`.
    pub fn put(table: Table, key: &'a str, value: &'a str) -> Write<'a> {
        match table {
            Table::Resources => Write::PutResource(key, value),
            Table::Instances => Write::PutInstance(key, value),
            Table::Tokens => Write::PutToken(key, value),
            Table::Vips => Write::PutVip(key, value),
            Table::Jwks => Write::PutJwks(key, value),
            Table::Peers => Write::PutPeer(key, value),
        }
    }

    /// The table, key and new value (`None`: deleted).
    pub(super) fn parts(&self) -> (Table, &str, Option<&str>) {
        match *self {
            Write::PutResource(k, v) => (Table::Resources, k, Some(v)),
            Write::DeleteResource(k) => (Table::Resources, k, None),
            Write::PutInstance(k, v) | Write::UpdateInstance(k, v) => (Table::Instances, k, Some(v)),
            Write::DeleteInstance(k) | Write::ReleaseInstance(k) => (Table::Instances, k, None),
            Write::PutToken(k, v) => (Table::Tokens, k, Some(v)),
            Write::DeleteToken(k) => (Table::Tokens, k, None),
            Write::PutVip(k, v) => (Table::Vips, k, Some(v)),
            Write::PutJwks(k, v) => (Table::Jwks, k, Some(v)),
            Write::DeleteJwks(k) => (Table::Jwks, k, None),
            Write::PutPeer(k, v) => (Table::Peers, k, Some(v)),
            Write::DeletePeer(k) => (Table::Peers, k, None),
        }
    }
}

/// The store's key for a JWKS source read from outside (`None`: inline keys, kept in their
/// resource).
pub fn jwks_key(source: &JwksSource) -> Option<String> {
    match source {
        JwksSource::Uri(u) => Some(format!("uri:{u}")),
        JwksSource::File(f) => Some(format!("file:{f}")),
        JwksSource::Inline(_) => None,
    }
}

/// The source a [`jwks_key`] names.
pub fn jwks_source(key: &str) -> Option<JwksSource> {
    if let Some(u) = key.strip_prefix("uri:") {
        Some(JwksSource::Uri(u.to_owned()))
    } else {
        key.strip_prefix("file:").map(|f| JwksSource::File(f.to_owned()))
    }
}

/// A change found in the shared store (etcd), made by any replica, this one included.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: Table,
    pub key: String,
    /// The new value; `None`: deleted (or its holder's lease expired).
    pub value: Option<String>,
    /// For an instance: whether this replica holds it (wrote it under its own lease).
    pub ours: bool,
}
