//! The control plane's command line (`weft control`), and how it becomes a [`ControlConfig`].
use crate::ControlConfig;
use crate::Defaults;
use crate::store::Backend;
use crate::store::etcd::StoreKey;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use weft_api::names::DEFAULT_CONTROL;
use weft_api::peering::MeshGatewayMode;
use weft_api::resource::{Egress, MtlsMode};

#[derive(Args)]
pub struct ControlArgs {
    /// Address for xDS (gRPC) and the admin API (HTTP/JSON).
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub listen: SocketAddr,
    /// Where the embedded store keeps its file.
    #[arg(long, default_value = ".weft/control")]
    pub data_dir: PathBuf,
    /// After a restart, how long restored instances keep their endpoints while proxies reconnect.
    #[arg(long, default_value = "15s", value_parser = weft_api::duration::parse)]
    pub reconnect_grace: Duration,
    /// Trust domain of every SPIFFE ID (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE).
    #[arg(long, default_value = weft_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// This datacenter's name: peers know this mesh by it, and its services' endpoints in a
    /// peer carry it as their locality. Give each datacenter its own --trust-domain too.
    #[arg(long, default_value = weft_api::peering::DEFAULT_DATACENTER)]
    pub datacenter: String,
    /// Namespace in every SPIFFE ID.
    #[arg(long, default_value = weft_api::identity::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Lifetime of proxy certificates (at least 1m); proxies renew at half of it.
    #[arg(long, default_value = "24h", value_parser = weft_api::duration::parse)]
    pub cert_ttl: Duration,
    /// Sign with this intermediate CA (PEM: the CA first, then its chain up to the root)
    /// instead of a root of the control plane's own. Needs --ca-key.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Mutual TLS mode of services whose Service resource sets none: strict or permissive.
    #[arg(long, default_value = "strict", value_parser = ["strict", "permissive"])]
    pub mtls: String,
    /// Where transparent instances of services whose Service resource sets no `egress` may
    /// connect outside the mesh: allow-any (passthrough, counted) or registry-only (refused).
    #[arg(long, default_value = "allow-any", value_parser = ["allow-any", "registry-only"])]
    pub egress: String,
    /// How sidecars reach services of peer datacenters: remote (straight to the peer's mesh
    /// gateways) or local (through this datacenter's own mesh gateway, at its
    /// `--mesh-gateway-local` address, which passes each connection on to the peer's: for
    /// sidecars that cannot reach the peer).
    #[arg(long, default_value = "remote", value_parser = ["remote", "local"])]
    pub mesh_gateway_mode: String,
    /// Another name (DNS or IP) clients use for the control plane; repeatable.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// Also serve xDS without TLS on this loopback address, for proxyless gRPC clients.
    #[arg(long)]
    pub plaintext_xds: Option<SocketAddr>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Where the mesh's state lives (`weft control`, `weft store restore`).
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Where the mesh's state lives: `embedded` (a file in --data-dir, one control plane) or
    /// etcd://HOST:PORT[,HOST:PORT...] (shared by every replica of the control plane).
    #[arg(long, default_value = "embedded")]
    pub store: crate::store::StoreUrl,
    /// With etcd: a file holding the key (64 hex digits, `openssl rand -hex 32`) the mesh's
    /// CA key and credentials are encrypted with in etcd; every replica is given the same.
    #[arg(long)]
    pub store_key_file: Option<PathBuf>,
    /// etcd's CA (PEM), when etcd serves TLS.
    #[arg(long)]
    pub etcd_ca_file: Option<PathBuf>,
    /// This control plane's client certificate for etcd (PEM); needs --etcd-key-file.
    #[arg(long, requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The key of --etcd-cert-file (PEM).
    #[arg(long, requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// An etcd user (etcd's authentication); needs --etcd-password-file.
    #[arg(long, requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// A file holding the password of --etcd-user.
    #[arg(long, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// At start, how long to wait for etcd to answer (its members may be starting too).
    #[arg(long, default_value = "30s", value_parser = weft_api::duration::parse)]
    pub etcd_wait: std::time::Duration,
}

impl StoreArgs {
    pub fn resolve(self) -> anyhow::Result<Backend> {
        Ok(match self.store {
            crate::store::StoreUrl::Embedded => Backend::Embedded,
            crate::store::StoreUrl::Etcd(mut etcd) => {
                etcd.ca_file = self.etcd_ca_file;
                etcd.cert_file = self.etcd_cert_file;
                etcd.key_file = self.etcd_key_file;
                etcd.user = self.etcd_user;
                etcd.password_file = self.etcd_password_file;
                etcd.wait = self.etcd_wait;
                let key = match (&self.store_key_file, std::env::var("WEFT_STORE_KEY")) {
                    (Some(path), _) => {
                        let text = std::fs::read_to_string(path)
                            .map_err(|e| anyhow::anyhow!("--store-key-file {}: {e}", path.display()))?;
                        StoreKey::parse(&text, &format!("--store-key-file {}", path.display()))?
                    }
                    (None, Ok(text)) => StoreKey::parse(&text, "WEFT_STORE_KEY")?,
                    (None, Err(_)) => anyhow::bail!(
                        "--store etcd://… needs --store-key-file (or WEFT_STORE_KEY): the key the mesh's CA key and credentials are encrypted with in etcd, the same for every replica; make one with `openssl rand -hex 32 > store.key && chmod 600 store.key`"
                    ),
                };
                Backend::Etcd(etcd, key)
            }
        })
    }
}

impl ControlArgs {
    /// Reads the flags of `weft control` from a list (as a user would type them).
    pub fn from_flags(flags: &[String]) -> Result<ControlArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            control: ControlArgs,
        }
        Ok(Flags::try_parse_from(std::iter::once("weft-control".to_owned()).chain(flags.iter().cloned()))?.control)
    }

    pub fn config(self) -> anyhow::Result<ControlConfig> {
        if self.cert_ttl < crate::ca::MIN_CERT_TTL {
            anyhow::bail!("--cert-ttl {:?} is too short: certificates live at least 1m", self.cert_ttl);
        }
        for (what, v) in [("--trust-domain", &self.trust_domain), ("--namespace", &self.namespace)] {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
                anyhow::bail!("{what} {v:?}: use lowercase letters, digits, '-', '.' and '_'");
            }
        }
        weft_api::resource::valid_name(&self.datacenter)
            .map_err(|why| anyhow::anyhow!("--datacenter {:?} {why}", self.datacenter))?;
        let store = self.store.resolve()?;
        Ok(ControlConfig {
            store,
            listen: self.listen,
            data_dir: self.data_dir,
            reconnect_grace: self.reconnect_grace,
            ca: crate::CaConfig {
                trust_domain: self.trust_domain,
                datacenter: self.datacenter,
                namespace: self.namespace,
                cert_ttl: self.cert_ttl,
                provided: self.ca_cert.zip(self.ca_key),
            },
            defaults: Defaults {
                mtls: if self.mtls == "permissive" { MtlsMode::Permissive } else { MtlsMode::Strict },
                egress: if self.egress == "registry-only" { Egress::RegistryOnly } else { Egress::AllowAny },
                mesh_gateway: if self.mesh_gateway_mode == "local" {
                    MeshGatewayMode::Local
                } else {
                    MeshGatewayMode::Remote
                },
            },
            server_names: self.server_names,
            plaintext_xds: self.plaintext_xds,
        })
    }
}
