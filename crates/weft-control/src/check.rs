//! What `weft check` asks the control plane (`GET /api/v1/check`): the health of its store,
//! and what it knows of every proxy and resource, one result each with the fix. The CLI adds
//! what only it can see (reaching the control plane, its certificate, the clock).
use crate::state::Mesh;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::SystemTime;
use weft_api::Resource;
use weft_api::resource::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not broken, but likely not what was meant.
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check { name: name.into(), status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn bad(name: &str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), status, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// A certificate is near expiry when less than this share of its lifetime is left: proxies
/// renew at half, so one this old has failed to renew for a quarter of its lifetime.
const NEAR_EXPIRY: f64 = 0.25;

pub fn run(mesh: &Mesh) -> Vec<Check> {
    let mut out = vec![store(mesh)];
    out.extend(proxies(mesh));
    out.extend(certificates(mesh));
    out.extend(references(mesh));
    out.push(tracing(mesh));
    out.extend(peerings(mesh));
    out.extend(local_gateway(mesh));
    out
}

/// In local mode (the mesh's, or a service's own), sidecars reach peers only through a mesh
/// gateway of their own datacenter with a local address: without one, the imported services
/// in local mode have no way there.
fn local_gateway(mesh: &Mesh) -> Option<Check> {
    use weft_api::peering::MeshGatewayMode;
    let specs: std::collections::BTreeMap<String, weft_api::resource::ServiceSpec> = mesh
        .resources(Kind::Service)
        .into_iter()
        .filter_map(|r| match r {
            Resource::Service(o) => Some((o.metadata.name, o.spec)),
            _ => None,
        })
        .collect();
    let defaults = mesh.defaults();
    let local =
        |spec: Option<&weft_api::resource::ServiceSpec>| defaults.mesh_gateway_of(spec) == MeshGatewayMode::Local;
    if !local(None) && !specs.values().any(|s| local(Some(s))) {
        return None;
    }
    let name = "peers are reachable through a mesh gateway of this datacenter";
    let imported: Vec<String> = mesh
        .services()
        .into_iter()
        .filter(|s| !s.imported.is_empty() && local(specs.get(&s.name)))
        .map(|s| s.name)
        .collect();
    let gateways = mesh.instances().iter().filter(|i| crate::translate::local_gateway(i).is_some()).count();
    Some(match (gateways, imported.is_empty()) {
        (0, false) => Check::bad(
            name,
            Status::Fail,
            format!(
                "local mesh gateway mode, and no mesh gateway serves a --mesh-gateway-local address: imported services ({}) cannot be reached",
                imported.join(", ")
            ),
            "run a mesh gateway with both addresses: weft proxy --mesh-gateway WAN_ADDR --mesh-gateway-local LAN_ADDR",
        ),
        (n, _) => Check::ok(name, format!("{n} mesh gateways serve this datacenter's sidecars (local mode)")),
    })
}

/// Each peering: exchanging with its peer, or why not.
fn peerings(mesh: &Mesh) -> Vec<Check> {
    crate::peering::summaries(mesh)
        .into_iter()
        .map(|p| {
            let name = format!("peering {} is active", p.name);
            let peer = p.datacenter.clone().unwrap_or_else(|| "?".into());
            match (p.state.as_str(), p.error) {
                ("active", None) => Check::ok(
                    &name,
                    format!("datacenter {peer}: {} services imported, {} exported", p.imported.len(), p.exported.len()),
                ),
                ("pending", _) => Check::bad(
                    &name,
                    Status::Warn,
                    "its token has not been accepted yet",
                    format!("in the other datacenter: weft peer accept --name NAME TOKEN (the token `weft peer create {}` printed)", p.name),
                ),
                ("expired", _) => Check::bad(
                    &name,
                    Status::Fail,
                    "its token expired before the other datacenter accepted it",
                    format!("weft peer delete {0}, then weft peer create {0} again", p.name),
                ),
                ("terminated", _) => Check::bad(
                    &name,
                    Status::Fail,
                    format!("datacenter {peer} deleted this peering; nothing of it is imported"),
                    format!("weft peer delete {}; peer again with a new token if it is still wanted", p.name),
                ),
                (_, error) => Check::bad(
                    &name,
                    Status::Fail,
                    format!(
                        "datacenter {peer}: {} (its last state stays in force)",
                        error.unwrap_or_else(|| "no exchange with it lately".into())
                    ),
                    "check that the peer's control plane runs and is reachable from this one, and its mesh gateway serves",
                ),
            }
        })
        .collect()
}

/// Telemetry that switches tracing on with no collector to send spans to: the mesh's names
/// none, and the service's neither.
fn tracing(mesh: &Mesh) -> Check {
    let telemetry: Vec<_> = mesh
        .resources(Kind::Telemetry)
        .into_iter()
        .filter_map(|r| match r {
            Resource::Telemetry(o) => Some(o),
            _ => None,
        })
        .collect();
    let mesh_collector = telemetry
        .iter()
        .find(|t| t.spec.target_ref.is_none() && t.spec.tracing.is_some())
        .and_then(|t| t.spec.tracing.as_ref()?.collector.as_ref());
    let lost: Vec<String> = telemetry
        .iter()
        .filter(|t| t.spec.tracing.as_ref().is_some_and(|tr| tr.enabled && tr.collector.is_none()))
        .filter(|_| mesh_collector.is_none())
        .map(|t| format!("Telemetry/{}", t.metadata.name))
        .collect();
    if lost.is_empty() {
        return Check::ok("tracing has a collector", "every Telemetry that traces has a collector to export to");
    }
    Check::bad(
        "tracing has a collector",
        Status::Warn,
        format!("tracing is on with no collector, so nothing is traced: {}", lost.join(", ")),
        "set spec.tracing.collector (host:port of an OTLP/gRPC collector) on the mesh's Telemetry (no targetRef)",
    )
}

fn store(mesh: &Mesh) -> Check {
    match mesh.store_readable() {
        Ok(()) => Check::ok("store", "the embedded store answers"),
        Err(e) => Check::bad(
            "store",
            Status::Fail,
            format!("the store cannot be read: {e}"),
            "check the control plane's data directory (disk, permissions) and its log",
        ),
    }
}

fn proxies(mesh: &Mesh) -> Vec<Check> {
    let proxies: Vec<_> = mesh.proxies().into_iter().filter(|p| p.weft).collect();
    let mut out = Vec::new();
    let rejecting: Vec<String> = proxies
        .iter()
        .flat_map(|p| p.rejecting.iter().map(move |(t, e)| format!("{} rejects {}: {e}", p.node, short_type(t))))
        .collect();
    out.push(if rejecting.is_empty() {
        Check::ok("config accepted", format!("{} connected proxies, none rejects its config", proxies.len()))
    } else {
        Check::bad(
            "config accepted",
            Status::Fail,
            rejecting.join("; "),
            "a proxy keeps its last good config while it rejects a new one: fix or delete the resource the reason names (weft get proxies shows LAST-NACK)",
        )
    });
    let lagging = mesh.proxies_without_bundle();
    out.push(if lagging.is_empty() {
        Check::ok("trust bundle in sync", "every connected proxy holds the current trust bundle")
    } else {
        Check::bad(
            "trust bundle in sync",
            Status::Fail,
            format!("{} hold an older trust bundle: {}", lagging.len(), lagging.join(", ")),
            "look at those proxies' logs; a proxy that cannot take the bundle cannot verify certificates of the new root",
        )
    });
    let connected: BTreeSet<&str> = proxies.iter().map(|p| p.node.as_str()).collect();
    let gone: Vec<String> =
        mesh.instances().into_iter().filter(|i| !connected.contains(i.id.as_str())).map(|i| i.id).collect();
    out.push(if gone.is_empty() {
        Check::ok("proxies connected", "every registered instance's proxy is connected")
    } else {
        Check::bad(
            "proxies connected",
            Status::Warn,
            format!("registered, proxy not connected: {}", gone.join(", ")),
            "they are kept for the reconnect grace after a control plane restart; if they stay, their proxies are down",
        )
    });
    out
}

fn short_type(url: &str) -> &str {
    url.rsplit('.').next().unwrap_or(url)
}

fn certificates(mesh: &Mesh) -> Vec<Check> {
    let now = crate::ca::unix(SystemTime::now());
    let connected: BTreeSet<String> = mesh.proxies().into_iter().map(|p| p.node).collect();
    let mut near = Vec::new();
    for c in mesh.security.certificates().into_iter().filter(|c| connected.contains(&c.instance)) {
        let life = c.not_after.saturating_sub(c.not_before).max(1);
        let left = c.not_after.saturating_sub(now);
        if (left as f64) < life as f64 * NEAR_EXPIRY {
            let when = if left == 0 { "has expired".to_owned() } else { format!("expires in {left}s") };
            near.push(format!("{} ({}) {when}", c.instance, c.identity));
        }
    }
    vec![if near.is_empty() {
        Check::ok("certificates", "no connected proxy's certificate is near expiry")
    } else {
        Check::bad(
            "certificates",
            Status::Fail,
            format!("not renewed in time: {}", near.join("; ")),
            "the proxy's /ready shows its renewal error: its join token may be revoked or expired (weft token create), or the control plane unreachable from it",
        )
    }]
}

/// Resources that select or route to services without a serving instance.
fn references(mesh: &Mesh) -> Vec<Check> {
    let serving = |service: &str| mesh.endpoints(service).is_some_and(|is| is.iter().any(|i| i.serving()));
    let (mut idle_policies, mut idle_routes) = (Vec::new(), Vec::new());
    for r in Kind::ALL.into_iter().flat_map(|k| mesh.resources(k)) {
        let target = match &r {
            Resource::AuthorizationPolicy(o) => o.spec.service.as_deref(),
            Resource::RequestAuthentication(o) => o.spec.service.as_deref(),
            Resource::TrafficPolicy(o) if !o.spec.target_ref.targets_route() => Some(o.spec.target_ref.name.as_str()),
            Resource::Telemetry(o) => o.spec.service(),
            _ => None,
        };
        if let Some(s) = target.filter(|s| !serving(s)) {
            idle_policies.push(format!("{} (service {s})", r.key()));
        }
        if matches!(r, Resource::HttpRoute(_) | Resource::GrpcRoute(_)) {
            for (field, service) in r.service_refs() {
                if field.contains("backendRefs") && !serving(service) {
                    idle_routes.push(format!("{} → {service}", r.key()));
                }
            }
        }
    }
    let line = |name: &str, what: &str, found: Vec<String>, fix: &str| {
        if found.is_empty() {
            Check::ok(name, format!("every {what} has a serving instance"))
        } else {
            Check::bad(name, Status::Warn, format!("no serving instance: {}", found.join(", ")), fix)
        }
    };
    vec![
        line(
            "policies select instances",
            "service a policy selects",
            idle_policies,
            "start an instance of the service, or fix the policy's service name",
        ),
        line(
            "routes reach instances",
            "backend of a route",
            idle_routes,
            "requests routed there fail with 503 no-endpoints: start an instance, or fix the route",
        ),
    ]
}
