//! The mesh file read by `weft up -f`: a control plane, a gateway, services with their
//! commands and instances, and resources to apply at start.
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The mesh `weft up` runs without a file. It is also the reference example of the format.
pub const DEMO: &str = r#"# The bundled demo: a frontend calling a backend with two versions.
control:
  listen: 127.0.0.1:15010
gateway:            # local ports where you reach services from outside the mesh
  frontend: 8080
  backend: 8081
services:
  - name: backend
    labels: {version: v1}
    instances: 2
    healthPath: /healthz
  - name: backend
    labels: {version: v2}
    instances: 1
    healthPath: /healthz
  - name: frontend
    labels: {version: v1}
    healthPath: /healthz
    upstreams: {backend: 9001}
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default)]
    pub control: ControlSection,
    /// Service → local port on which a gateway proxy exposes it.
    #[serde(default)]
    pub gateway: BTreeMap<String, u16>,
    #[serde(default)]
    pub services: Vec<ServiceSection>,
    /// Resources (as `weft apply` takes them) applied once the control plane is up.
    #[serde(default)]
    pub resources: Vec<serde_norway::Value>,
    #[serde(default)]
    pub dashboard: DashboardSection,
    /// This mesh's datacenter name (`weft control --datacenter`; default dc1); its trust
    /// domain is `NAME.weft` when it is one of several `datacenters`.
    pub datacenter: Option<String>,
    /// Run this datacenter's mesh gateway, listening here (`weft proxy --mesh-gateway`).
    pub mesh_gateway: Option<SocketAddr>,
    /// The mesh gateway's address for this datacenter's own sidecars (`weft proxy
    /// --mesh-gateway-local`), which `control.meshGatewayMode: local` sends them through.
    pub mesh_gateway_local: Option<SocketAddr>,
    /// Several datacenters, each a mesh of its own (with the fields above), all peered with
    /// each other, each naming the others by their datacenter names.
    #[serde(default)]
    pub datacenters: Vec<MeshFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DashboardSection {
    /// A loopback address; default 127.0.0.1:15080, or a free port if that one is taken.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlSection {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Store directory; default: a fresh temporary directory removed at exit.
    pub data_dir: Option<PathBuf>,
    /// Mutual TLS mode of services that set none: strict (default) or permissive.
    #[serde(default)]
    pub mtls: weft_api::resource::MtlsMode,
    /// Egress mode of services that set none: allow-any (default) or registry-only.
    #[serde(default)]
    pub egress: weft_api::resource::Egress,
    /// How sidecars reach peer datacenters: remote (default) or local, through this
    /// datacenter's mesh gateway (`meshGatewayLocal`).
    #[serde(default)]
    pub mesh_gateway_mode: weft_api::peering::MeshGatewayMode,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            listen: default_listen(),
            data_dir: None,
            mtls: Default::default(),
            egress: Default::default(),
            mesh_gateway_mode: Default::default(),
        }
    }
}

fn default_listen() -> SocketAddr {
    weft_api::names::DEFAULT_CONTROL.parse().expect("valid default")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSection {
    pub name: String,
    /// The app's command line; `weft` as the program means this binary. Default: `weft demo-app`.
    /// The app gets $PORT (where to listen), $WEFT_SERVICE, $WEFT_INSTANCE, $WEFT_VERSION and
    /// $WEFT_UPSTREAM_<SERVICE> (where to reach each upstream).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "one")]
    pub instances: u16,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// HTTP health check path; default a TCP connect check.
    pub health_path: Option<String>,
    /// Upstream service → local port. Instance i of this service gets port + i.
    #[serde(default)]
    pub upstreams: BTreeMap<String, u16>,
    /// Extra environment for the app.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run each instance in a network namespace of its own with its traffic captured
    /// (`weft run --transparent`; needs root): the app calls services by name.
    #[serde(default)]
    pub transparent: bool,
}

fn one() -> u16 {
    1
}

pub fn parse(name: &str, text: &str) -> anyhow::Result<MeshFile> {
    let de = serde_norway::Deserializer::from_str(text);
    let file: MeshFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_norway prefixes its own (shorter) path; ours is the full one.
        let reason = inner.split_once(": ").filter(|(p, _)| path.starts_with(p)).map_or(inner.as_str(), |(_, r)| r);
        anyhow::anyhow!("{name}: field {path}: {reason}")
    })?;
    check(name, "", &file)?;
    if file.datacenters.is_empty() {
        if file.services.is_empty() {
            anyhow::bail!("{name}: field services: lists no service; a mesh file needs services (or datacenters)");
        }
        return Ok(file);
    }
    if !file.services.is_empty() || !file.gateway.is_empty() || !file.resources.is_empty() {
        anyhow::bail!(
            "{name}: field datacenters: with datacenters, services, gateway and resources go in each datacenter, not at the top"
        );
    }
    let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
    for (i, dc) in file.datacenters.iter().enumerate() {
        let at = format!("datacenters[{i}].");
        check(name, &at, dc)?;
        let Some(dc_name) = dc.datacenter.as_deref() else {
            anyhow::bail!("{name}: field {at}datacenter: each datacenter needs a name");
        };
        weft_api::resource::valid_name(dc_name)
            .map_err(|why| anyhow::anyhow!("{name}: field {at}datacenter: {dc_name:?} {why}"))?;
        if !dc.datacenters.is_empty() {
            anyhow::bail!("{name}: field {at}datacenters: datacenters do not nest");
        }
        if dc.services.is_empty() {
            anyhow::bail!("{name}: field {at}services: lists no service");
        }
        if let Some(i) = dc.services.iter().position(|s| s.transparent) {
            anyhow::bail!(
                "{name}: field {at}services[{i}].transparent: not supported in a datacenter of several (yet)"
            );
        }
        if let Some((other, _)) = seen.iter().find(|(n, l)| *n == dc_name || *l == dc.control.listen) {
            anyhow::bail!("{name}: field {at}: datacenter {other:?} has this name or control.listen already");
        }
        seen.push((dc_name, dc.control.listen));
    }
    Ok(file)
}

/// The checks of one mesh (the file's, or one datacenter's; `at` prefixes field paths).
fn check(name: &str, at: &str, file: &MeshFile) -> anyhow::Result<()> {
    for (i, s) in file.services.iter().enumerate() {
        if s.instances == 0 {
            anyhow::bail!("{name}: field {at}services[{i}].instances: must be at least 1");
        }
    }
    if let Some(addr) = file.mesh_gateway
        && addr.ip().is_unspecified()
    {
        anyhow::bail!("{name}: field {at}meshGateway: {addr}: give the address peers reach, not an unspecified one");
    }
    match (file.mesh_gateway, file.mesh_gateway_local) {
        (None, Some(_)) => anyhow::bail!(
            "{name}: field {at}meshGatewayLocal: needs meshGateway (the gateway it is a second address of)"
        ),
        (Some(wan), Some(local)) if local == wan || local.ip().is_unspecified() => anyhow::bail!(
            "{name}: field {at}meshGatewayLocal: {local}: give the address this datacenter's sidecars reach, not an unspecified one nor meshGateway's"
        ),
        (_, None) if file.control.mesh_gateway_mode == weft_api::peering::MeshGatewayMode::Local => anyhow::bail!(
            "{name}: field {at}control.meshGatewayMode: local sends sidecars through this datacenter's mesh gateway: give it meshGateway and meshGatewayLocal"
        ),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_parses_and_errors_name_the_field() {
        let demo = super::parse("demo", super::DEMO).unwrap();
        assert_eq!(demo.services.len(), 3);
        let e = super::parse("m.yaml", "services:\n  - name: a\n    instances: many\n").unwrap_err().to_string();
        assert!(e.starts_with("m.yaml: field services[0].instances: invalid type"), "{e}");
    }

    #[test]
    fn datacenters_are_checked_each_and_together() {
        let dc = |name: &str, port: u16| {
            format!("  - datacenter: {name}\n    control: {{listen: 127.0.0.1:{port}}}\n    services: [{{name: a}}]\n")
        };
        let two = format!("datacenters:\n{}{}", dc("dc1", 1), dc("dc2", 2));
        assert_eq!(super::parse("m", &two).unwrap().datacenters.len(), 2);
        let err = |text: &str| super::parse("m", text).unwrap_err().to_string();
        assert!(err(&format!("datacenters:\n{}{}", dc("dc1", 1), dc("dc1", 2))).contains("datacenters[1]."));
        assert!(err(&format!("datacenters:\n{}{}", dc("dc1", 1), dc("dc2", 1))).contains("control.listen"));
        assert!(
            err(&format!("services: [{{name: a}}]\ndatacenters:\n{}", dc("dc1", 1))).contains("go in each datacenter")
        );
        assert!(err("datacenters:\n  - services: [{name: a}]\n").contains("needs a name"));
        assert!(err("control: {listen: 127.0.0.1:1}\n").contains("lists no service"));
    }

    #[test]
    fn local_mode_needs_a_mesh_gateway_with_a_local_address() {
        let err = |text: &str| super::parse("m", text).unwrap_err().to_string();
        let svc = "services: [{name: a}]\n";
        let local = "control: {meshGatewayMode: local}\n";
        assert!(err(&format!("{svc}{local}")).contains("field control.meshGatewayMode: local"));
        let no_wan = format!("{svc}meshGatewayLocal: 127.0.0.1:2\n");
        assert!(err(&no_wan).contains("field meshGatewayLocal: needs meshGateway"));
        let same = format!("{svc}meshGateway: 127.0.0.1:2\nmeshGatewayLocal: 127.0.0.1:2\n");
        assert!(err(&same).contains("field meshGatewayLocal: 127.0.0.1:2"));
        let bad_mode = format!("{svc}control: {{meshGatewayMode: sideways}}\n");
        assert!(err(&bad_mode).contains("control.meshGatewayMode"), "{}", err(&bad_mode));
        let ok = format!("{svc}{local}meshGateway: 127.0.0.1:2\nmeshGatewayLocal: 127.0.0.1:3\n");
        let file = super::parse("m", &ok).unwrap();
        assert_eq!(file.control.mesh_gateway_mode, weft_api::peering::MeshGatewayMode::Local);
    }
}
