//! `weft up`: a whole mesh on one machine. The control plane runs in this process, the gateway
//! proxy as a sidecar process (`weft-proxy`); every service instance runs as `weft run` in a
//! child process of its own, so any of them can be killed or restarted like a real workload.
use crate::api_client::Api;
use crate::cli::UpArgs;
use crate::mesh_file::{self, MeshFile};
use crate::sidecar::Sidecar;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use weft_client::ControlEndpoint;
use weft_proxy::args::ProxyArgs;
use weft_proxy::supervise;

struct Planned {
    service: String,
    id: String,
    app: u16,
    /// The simulated host it runs on (`--hosts`).
    host: Option<String>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

/// A port for an app to listen on. Sidecars bind port 0 themselves; apps are told a port, so
/// one is picked here (and never the same one twice). It is free now and below the kernel's
/// ephemeral range, which the kernel hands out for `bind(0)` and outgoing connections: a port
/// from that range could be taken by any connection on the machine before the app, started
/// later, binds it (seen under load as "Address already in use" and the mesh not starting).
fn free_port(taken: &mut std::collections::HashSet<u16>) -> anyhow::Result<u16> {
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    // Meshes started side by side start their search at unrelated places.
    let start = fastrand::u16(..span);
    for i in 0..span {
        let port = LOWEST + (start + i) % span;
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free port for an app between {LOWEST} and {ephemeral}")
}

/// Where transparent instances run: this host, or simulated hosts (`--hosts`, all of them
/// transparent then).
struct Transparent {
    /// Where they reach the control plane (a relay on the bridge, or on the hosts' switch).
    control: SocketAddr,
    hosts: Vec<crate::netns::SimHost>,
}

fn plan(
    file: &MeshFile,
    exe: &str,
    ca_file: &std::path::Path,
    transparent: Option<&Transparent>,
) -> anyhow::Result<Vec<Planned>> {
    let mut out = Vec::new();
    let mut next_host = 0;
    let mut counters = std::collections::HashMap::<(String, Option<String>), usize>::new();
    let mut taken = std::collections::HashSet::new();
    for s in &file.services {
        for i in 0..s.instances {
            let n = counters.entry((s.name.clone(), s.labels.get("version").cloned())).or_default();
            let id = match s.labels.get("version") {
                Some(v) => format!("{}-{v}-{n}", s.name),
                None => format!("{}-{n}", s.name),
            };
            *n += 1;
            let app = free_port(&mut taken)?;
            // On a simulated host, in turn (`--hosts`): `weft run` there makes the namespace.
            let on = transparent.filter(|t| !t.hosts.is_empty()).map(|t| {
                next_host += 1;
                &t.hosts[(next_host - 1) % t.hosts.len()]
            });
            let mut argv = match on {
                Some(h) => vec!["nsenter".to_owned(), format!("--net=/run/netns/{}", h.netns), "--".into()],
                None => Vec::new(),
            };
            argv.extend([exe.to_owned(), "run".into(), "--service".into(), s.name.clone()]);
            argv.extend(["--port".into(), app.to_string(), "--id".into(), id.clone()]);
            match transparent.filter(|_| s.transparent || on.is_some()) {
                // Its own namespace: the sidecar's addresses are the namespace's.
                Some(t) => {
                    argv.extend(["--transparent".into(), "--control".into(), t.control.to_string()]);
                    if let Some(h) = on {
                        argv.extend(["--netns-range".into(), h.range.to_string()]);
                    }
                }
                None => {
                    argv.extend(["--inbound".into(), "127.0.0.1:0".into(), "--admin".into(), "127.0.0.1:0".into()]);
                    argv.extend(["--control".into(), file.control.listen.to_string()]);
                }
            }
            argv.extend(["--ca-file".into(), ca_file.display().to_string()]);
            for (k, v) in &s.labels {
                argv.extend(["--label".into(), format!("{k}={v}")]);
            }
            for (svc, port) in &s.upstreams {
                let port = port.checked_add(i).context("upstream port out of range")?;
                argv.extend(["--upstream".into(), format!("{svc}={port}")]);
            }
            if let Some(p) = &s.health_path {
                argv.extend(["--health-path".into(), p.clone()]);
            }
            argv.push("--".into());
            let command =
                if s.command.is_empty() { vec!["weft".to_owned(), "demo-app".to_owned()] } else { s.command.clone() };
            argv.extend(
                command.into_iter().enumerate().map(|(j, a)| if j == 0 && a == "weft" { exe.to_owned() } else { a }),
            );
            let mut env: Vec<(String, String)> = s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            env.extend(quiet_log());
            let host = on.map(|h| format!("{} ({})", h.netns, h.address));
            out.push(Planned { service: s.name.clone(), id, app, host, argv, env });
        }
    }
    Ok(out)
}

/// Where a mesh without `control.dataDir` keeps its data while `weft up` runs: `weft-up-PID`
/// (and `weft-up-PID-DATACENTER` for each of several datacenters) in the temp dir.
fn temp_data_dir(datacenter: Option<&str>) -> std::path::PathBuf {
    let name = match datacenter {
        Some(dc) => format!("{TEMP_PREFIX}{}-{dc}", std::process::id()),
        None => format!("{TEMP_PREFIX}{}", std::process::id()),
    };
    std::env::temp_dir().join(name)
}

const TEMP_PREFIX: &str = "weft-up-";

/// Removes what `weft up` meshes killed before they could clean up left behind: their
/// temporary data directories ([`temp_data_dir`]: a CA key and the credentials among it) and
/// their entries in the CLI's credentials file. Only those of this user whose process is gone.
fn remove_stale_meshes() {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    // This process's user: the owner of its /proc entry.
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)?.split('-').next()?.parse().ok()) else {
            continue;
        };
        let path = e.path();
        let ours = e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me) && path.join("ca").is_dir();
        if !ours || pid == std::process::id() || crate::netns::alive(pid) {
            continue;
        }
        weft_api::credentials::forget_under(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            eprintln!("weft up: removed {} (left by a weft up that was killed)", path.display());
        }
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    remove_stale_meshes();
    let (name, text) = match &args.file {
        Some(f) => (
            f.display().to_string(),
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        None => ("the bundled demo mesh".to_owned(), mesh_file::DEMO.to_owned()),
    };
    let file = mesh_file::parse(&name, &text)?;
    let exe = std::env::current_exe().context("cannot find the weft binary")?.display().to_string();
    if !file.datacenters.is_empty() {
        anyhow::ensure!(args.hosts.is_none(), "--hosts: a mesh file with datacenters runs them on this host");
        return run_datacenters(&file, &name, &exe).await;
    }
    let resources = resources_of(&file, &name)?;

    let temp = file.control.data_dir.is_none();
    let data_dir = file.control.data_dir.clone().unwrap_or_else(|| temp_data_dir(None));
    let result = run_mesh(&file, &resources, &exe, data_dir.clone(), args.hosts).await;
    if temp {
        // The mesh is gone with its data: so is its entry in the CLI credentials file.
        weft_api::credentials::forget(&file.control.listen.to_string());
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

/// The resources a mesh file applies at start, checked.
fn resources_of(file: &MeshFile, name: &str) -> anyhow::Result<Vec<weft_api::Resource>> {
    file.resources
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let kind = v.get("kind").and_then(|k| k.as_str()).map(str::to_owned);
            weft_api::Resource::from_value(i, v.clone(), kind.as_deref()).map_err(|mut e| {
                e.file = Some(format!("{name} (resources)"));
                anyhow::anyhow!("{e}")
            })
        })
        .collect()
}

/// Several datacenters on this machine: each a mesh of its own (control plane, trust domain
/// `NAME.weft`, gateway, mesh gateway, instances), then every pair peered as `weft peer
/// create` / `weft peer accept` would (each names the other by its datacenter name).
async fn run_datacenters(file: &MeshFile, name: &str, exe: &str) -> anyhow::Result<()> {
    let mut meshes: Vec<(Mesh, PathBuf, bool)> = Vec::new();
    let started = async {
        for dc in &file.datacenters {
            let dc_name = dc.datacenter.clone().unwrap_or_default();
            let resources = resources_of(dc, &format!("{name} ({dc_name})"))?;
            let temp = dc.control.data_dir.is_none();
            let data_dir = dc.control.data_dir.clone().unwrap_or_else(|| temp_data_dir(Some(&dc_name)));
            let cfg = control_config(dc, &data_dir, &format!("{dc_name}.weft"), Vec::new());
            let mut mesh = Mesh::start(cfg);
            let stop = mesh.stop();
            let result = start_all(&mut mesh, dc, &resources, exe, &data_dir, stop, None).await;
            meshes.push((mesh, data_dir, temp));
            result.with_context(|| format!("datacenter {dc_name}"))?;
        }
        let dirs: Vec<&std::path::Path> = meshes.iter().map(|(_, d, _)| d.as_path()).collect();
        peer_all(&file.datacenters, &dirs).await
    }
    .await;
    if started.is_ok() {
        supervise::stop_signal().await;
        eprintln!("\nweft up: stopping...");
    }
    for (mesh, data_dir, temp) in meshes.into_iter().rev() {
        mesh.shutdown().await;
        if temp {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
    }
    for dc in &file.datacenters {
        if dc.control.data_dir.is_none() {
            weft_api::credentials::forget(&dc.control.listen.to_string());
        }
    }
    started
}

/// Peers every pair of datacenters (`dirs[i]` is the data directory of `dcs[i]`), then waits
/// until each datacenter's gateway answers for what it exposes.
async fn peer_all(dcs: &[MeshFile], dirs: &[&std::path::Path]) -> anyhow::Result<()> {
    let api = |i: usize| -> anyhow::Result<Api> {
        let admin = std::fs::read_to_string(dirs[i].join("admin.token")).context("cannot read the admin credential")?;
        Api::with(ControlEndpoint {
            address: dcs[i].control.listen.to_string(),
            ca_file: dirs[i].join("ca").join("trust-bundle.pem"),
            credential: Some(admin.trim().to_owned()),
        })
    };
    let name = |i: usize| dcs[i].datacenter.clone().unwrap_or_default();
    for i in 0..dcs.len() {
        for j in i + 1..dcs.len() {
            let (status, v) = api(j)?
                .call(hyper::Method::POST, "/api/v1/peers", Some(serde_json::json!({ "name": name(i) })))
                .await?;
            anyhow::ensure!(status.is_success(), "datacenter {}: cannot make a peering token: {}", name(j), v["error"]);
            let body = serde_json::json!({ "name": name(j), "token": v["token"] });
            let (status, v) = api(i)?.call(hyper::Method::POST, "/api/v1/peers/accept", Some(body)).await?;
            anyhow::ensure!(
                status.is_success(),
                "datacenter {}: cannot peer with {}: {}",
                name(i),
                name(j),
                v["error"]
            );
            eprintln!("weft up: datacenters {} and {} peered", name(i), name(j));
        }
    }
    // Each gateway answers for every service it exposes (a service only a peer runs, once its
    // endpoints have arrived).
    let deadline = Instant::now() + Duration::from_secs(15);
    for dc in dcs {
        for (svc, port) in &dc.gateway {
            loop {
                let answered = get(SocketAddr::from(([127, 0, 0, 1], *port)), "/").await.is_ok_and(|(s, _)| s == 200);
                if answered {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "datacenter {}: its gateway did not answer for {svc} within 15s of the peering",
                    dc.datacenter.as_deref().unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!(
        "weft datacenters are up and peered: {}",
        dcs.iter().map(|d| d.datacenter.clone().unwrap_or_default()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// What `up` starts logs warnings only (unless `WEFT_LOG` says otherwise): the banner is the
/// output.
fn quiet_log() -> Vec<(String, String)> {
    match std::env::var_os("WEFT_LOG") {
        Some(_) => vec![],
        None => vec![("WEFT_LOG".into(), "warn".into())],
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Everything `weft up` started, torn down in reverse order whatever happened.
struct Mesh {
    instances_stop: watch::Sender<bool>,
    instances: tokio::task::JoinSet<()>,
    gateway: Option<Sidecar>,
    mesh_gateway: Option<Sidecar>,
    control_stop: watch::Sender<bool>,
    control: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Mesh {
    /// Starts the control plane (in this process); the rest is started by [`start_all`].
    fn start(cfg: weft_control::ControlConfig) -> Mesh {
        let (control_stop, control_rx) = watch::channel(false);
        let (instances_stop, _) = watch::channel(false);
        Mesh {
            instances_stop,
            instances: tokio::task::JoinSet::new(),
            gateway: None,
            mesh_gateway: None,
            control_stop,
            control: tokio::spawn(weft_control::run(cfg, stopped(control_rx))),
        }
    }

    /// What the instances watch to stop.
    fn stop(&self) -> watch::Receiver<bool> {
        self.instances_stop.subscribe()
    }

    async fn shutdown(mut self) {
        // Instances first (their sidecars deregister), then the gateways, then the control plane.
        let _ = self.instances_stop.send(true);
        while self.instances.join_next().await.is_some() {}
        for g in [self.gateway.take(), self.mesh_gateway.take()].into_iter().flatten() {
            g.stop().await;
        }
        let _ = self.control_stop.send(true);
        let _ = self.control.await;
    }
}

async fn run_mesh(
    file: &MeshFile,
    resources: &[weft_api::Resource],
    exe: &str,
    data_dir: PathBuf,
    hosts: Option<u8>,
) -> anyhow::Result<()> {
    let listen = file.control.listen;
    // Transparent instances live in namespaces of their own: on this host's bridge, or on
    // simulated hosts. They reach the control plane through a relay, there, that passes
    // connections on to it (it listens on loopback).
    let (hosts, bridge) = match hosts {
        Some(n) => {
            crate::netns::preflight().context("--hosts")?;
            (Some(crate::netns::Hosts::create(n)?), None)
        }
        None if file.services.iter().any(|s| s.transparent) => {
            crate::netns::preflight()?;
            let range = crate::netns::DEFAULT_RANGE.parse().map_err(anyhow::Error::msg)?;
            (None, Some(crate::netns::Bridge::ensure(range)?))
        }
        None => (None, None),
    };
    let relay_at = hosts.as_ref().map(|h| h.here).or(bridge.as_ref().map(|b| b.gateway));
    let relay = match relay_at {
        Some(ip) => {
            let l = tokio::net::TcpListener::bind((ip, listen.port()))
                .await
                .with_context(|| format!("cannot listen on {ip}:{} for transparent instances", listen.port()))?;
            let at = l.local_addr()?;
            Some((at, tokio::spawn(relay(l, listen))))
        }
        None => None,
    };
    let server_names = relay.iter().map(|(at, _)| at.ip().to_string()).collect();
    let cfg = control_config(file, &data_dir, weft_api::identity::DEFAULT_TRUST_DOMAIN, server_names);
    let mut mesh = Mesh::start(cfg);
    let stop = mesh.stop();
    let transparent = relay
        .as_ref()
        .map(|(at, _)| Transparent { control: *at, hosts: hosts.as_ref().map(|h| h.hosts()).unwrap_or_default() });
    let result = start_all(&mut mesh, file, resources, exe, &data_dir, stop, transparent.as_ref()).await;
    if result.is_ok() {
        supervise::stop_signal().await;
        eprintln!("\nweft up: stopping...");
    }
    mesh.shutdown().await;
    if let Some((_, task)) = relay {
        task.abort();
    }
    // After the instances: each removed its namespace, and the bridge goes with the last.
    drop(bridge);
    drop(hosts);
    result
}

/// The control plane of a mesh file (or of one of its datacenters).
fn control_config(
    file: &MeshFile,
    data_dir: &std::path::Path,
    trust_domain: &str,
    server_names: Vec<String>,
) -> weft_control::ControlConfig {
    weft_control::ControlConfig {
        store: weft_control::Backend::Embedded,
        listen: file.control.listen,
        data_dir: data_dir.to_owned(),
        reconnect_grace: Duration::from_secs(15),
        ca: weft_control::CaConfig {
            trust_domain: trust_domain.into(),
            datacenter: file.datacenter.clone().unwrap_or_else(|| weft_api::peering::DEFAULT_DATACENTER.into()),
            namespace: weft_api::identity::DEFAULT_NAMESPACE.into(),
            cert_ttl: Duration::from_secs(24 * 3600),
            provided: None,
        },
        defaults: weft_control::Defaults {
            mtls: file.control.mtls,
            egress: file.control.egress,
            mesh_gateway: file.control.mesh_gateway_mode,
        },
        server_names,
        plaintext_xds: None,
    }
}

/// Passes each connection accepted on `listener` on to `to`.
async fn relay(listener: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            if let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}

async fn start_all(
    mesh: &mut Mesh,
    file: &MeshFile,
    resources: &[weft_api::Resource],
    exe: &str,
    data_dir: &std::path::Path,
    stop: watch::Receiver<bool>,
    transparent: Option<&Transparent>,
) -> anyhow::Result<()> {
    let listen = file.control.listen;
    let ca_file = data_dir.join("ca").join("trust-bundle.pem");
    wait_for_control(&listen, data_dir, &mut mesh.control).await?;
    eprintln!("weft up: control plane ready on {listen}");
    let admin = std::fs::read_to_string(data_dir.join("admin.token")).context("cannot read the admin credential")?;
    let api = Api::with(ControlEndpoint {
        address: listen.to_string(),
        ca_file: ca_file.clone(),
        credential: Some(admin.trim().to_owned()),
    })?;
    if !resources.is_empty() {
        api.apply(resources).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let dashboard = match file.dashboard.listen {
        Some(listen) => crate::dashboard::bind(listen).await?,
        None => match crate::dashboard::bind(crate::cli::DASHBOARD_LISTEN.parse()?).await {
            Ok(l) => l,
            // Another mesh (or dashboard) has the default port: any free one will do.
            Err(_) => crate::dashboard::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?,
        },
    };
    let dashboard_addr = dashboard.local_addr()?;
    let dashboard_api = Api::with(ControlEndpoint {
        address: listen.to_string(),
        ca_file: ca_file.clone(),
        credential: Some(admin.trim().to_owned()),
    })?;
    tokio::spawn(async move {
        if let Err(e) = crate::dashboard::serve(dashboard, dashboard_api).await {
            eprintln!("weft up: the dashboard stopped: {e:#}");
        }
    });
    if !file.gateway.is_empty() {
        let mut flags =
            vec!["--id".to_owned(), weft_api::names::GATEWAY.into(), "--control".into(), listen.to_string()];
        flags.extend(["--ca-file".into(), ca_file.display().to_string()]);
        for (svc, port) in &file.gateway {
            flags.extend(["--upstream".into(), format!("{svc}={port}")]);
        }
        let mut args = ProxyArgs::from_flags(&flags)?;
        args.token = Some(join_token(&api, weft_api::names::GATEWAY).await?);
        let gateway = Sidecar::start(&args, &quiet_log()).await.context("cannot start the gateway")?;
        mesh.gateway = Some(gateway);
    }
    if let Some(addr) = file.mesh_gateway {
        let local = file.mesh_gateway_local.map(|a| ["--mesh-gateway-local".to_owned(), a.to_string()]);
        let flags = ["--mesh-gateway", &addr.to_string(), "--id", weft_api::peering::MESH_GATEWAY, "--control"]
            .map(str::to_owned)
            .into_iter()
            .chain([listen.to_string(), "--ca-file".into(), ca_file.display().to_string()])
            .chain(local.into_iter().flatten())
            .collect::<Vec<_>>();
        let mut args = ProxyArgs::from_flags(&flags)?;
        args.token = Some(join_token(&api, weft_api::peering::MESH_GATEWAY).await?);
        let gateway = Sidecar::start(&args, &quiet_log()).await.context("cannot start the mesh gateway")?;
        mesh.mesh_gateway = Some(gateway);
    }
    let mut planned = plan(file, exe, &ca_file, transparent)?;
    let mut tokens = std::collections::HashMap::new();
    for p in &mut planned {
        if !tokens.contains_key(&p.service) {
            tokens.insert(p.service.clone(), join_token(&api, &p.service).await?);
        }
        // In the environment, not on the command line, where `ps` would show it.
        p.env.push(("WEFT_TOKEN".into(), tokens[&p.service].clone()));
    }
    let exited = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for p in &planned {
        let mut child = supervise::spawn(&p.argv, &p.env, &[], false, None)?;
        let (id, stop, exited) = (p.id.clone(), stop.clone(), exited.clone());
        mesh.instances.spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    eprintln!("weft up: instance {id} exited ({status})");
                    exited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                _ = stopped(stop) => drop(supervise::stop(&mut child, Duration::from_secs(5)).await),
            }
        });
    }
    eprintln!("weft up: started {} instances, each with its sidecar", planned.len());
    let instances = wait_healthy(&api, &planned, &exited).await?;
    // Every proxy this mesh runs, with the services it calls.
    let mut proxies: Vec<(SocketAddr, Vec<&str>)> = instances
        .iter()
        .filter_map(|i| {
            let admin = i.registration.admin.as_deref()?.parse().ok()?;
            Some((admin, i.registration.upstreams.iter().map(|u| u.service.as_str()).collect()))
        })
        .collect();
    if let Some(g) = &mesh.gateway {
        proxies.push((g.admin, file.gateway.keys().map(String::as_str).collect()));
    }
    eprintln!("weft up: waiting for every proxy to hold the endpoints it calls");
    wait_in_sync(&proxies, &instances).await?;
    banner(file, &planned, &instances, mesh.gateway.as_ref().map(|g| g.admin), data_dir, dashboard_addr);
    Ok(())
}

/// A join token for what `weft up` starts (valid for a year: the mesh lives as long as `up`).
async fn join_token(api: &Api, service: &str) -> anyhow::Result<String> {
    let body = serde_json::json!({ "service": service, "ttlSeconds": 365 * 24 * 3600 });
    let (status, v) = api.call(hyper::Method::POST, "/api/v1/tokens", Some(body)).await?;
    anyhow::ensure!(status.is_success(), "cannot create a join token for {service}: {}", v["error"]);
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

/// Waits until the control plane answers over TLS (its root and credential exist by then).
async fn wait_for_control(
    listen: &SocketAddr,
    data_dir: &std::path::Path,
    control: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if control.is_finished() {
            return match control.await {
                Ok(Err(e)) => Err(e.context("the control plane could not start")),
                _ => Err(anyhow::anyhow!("the control plane stopped at startup")),
            };
        }
        let ca_file = data_dir.join("ca").join("trust-bundle.pem");
        if ca_file.exists()
            && let Ok(api) = Api::with(ControlEndpoint { address: listen.to_string(), ca_file, credential: None })
            && api.call(hyper::Method::GET, "/healthz", None).await.is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the control plane did not start within 10s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every planned instance is registered and healthy; returns them.
async fn wait_healthy(
    api: &Api,
    planned: &[Planned],
    exited: &std::sync::atomic::AtomicUsize,
) -> anyhow::Result<Vec<weft_api::Instance>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut services: Vec<&str> = planned.iter().map(|p| p.service.as_str()).collect();
    services.sort();
    services.dedup();
    let mut shown = usize::MAX;
    loop {
        let mut healthy = Vec::new();
        for s in &services {
            if let Ok(v) = api.get_json(&format!("/api/v1/services/{s}/endpoints")).await {
                let instances: Vec<weft_api::Instance> = serde_json::from_value(v).unwrap_or_default();
                healthy.extend(instances.into_iter().filter(|i| i.healthy && planned.iter().any(|p| p.id == i.id)));
            }
        }
        if healthy.len() != shown {
            // Progress, on stderr: the banner on stdout stays what a script reads.
            eprintln!("weft up: {} of {} instances healthy", healthy.len(), planned.len());
            shown = healthy.len();
        }
        if healthy.len() == planned.len() {
            return Ok(healthy);
        }
        if exited.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            anyhow::bail!("an instance exited during startup; see its error above");
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {} instances became healthy within 30s; see the messages above",
                healthy.len(),
                planned.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every proxy (admin address, services it calls) holds every healthy instance of
/// the services it calls: the control plane learns of an instance's health a moment before the
/// proxies do, and the banner invites a request through all of them at once.
async fn wait_in_sync(proxies: &[(SocketAddr, Vec<&str>)], instances: &[weft_api::Instance]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (admin, calls) in proxies {
        loop {
            if let Ok(dump) = config_dump(*admin).await
                && calls.iter().all(|svc| holds_all(&dump, svc, instances))
            {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the proxy with admin {admin} did not get the endpoints of {calls:?} within 10s; see the messages above"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Whether a proxy's config dump has every instance of `service` as a healthy endpoint.
fn holds_all(dump: &serde_json::Value, service: &str, instances: &[weft_api::Instance]) -> bool {
    let endpoints = dump["endpoints"][service].as_array().map(Vec::as_slice).unwrap_or_default();
    instances.iter().filter(|i| i.registration.service.as_deref() == Some(service)).all(|i| {
        let inbound = i.registration.inbound.as_deref();
        endpoints.iter().any(|e| e["address"].as_str() == inbound && e["healthy"] == true)
    })
}

/// A proxy's `/config_dump` (its admin endpoint, plain HTTP on loopback).
async fn config_dump(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (_, body) = get(admin, "/config_dump").await?;
    Ok(serde_json::from_slice(&body)?)
}

/// A plain HTTP/1.0 GET of `path` on `addr` (a proxy's admin endpoint or a gateway port on
/// loopback): the status and the body, within 2 s.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(2), exchange).await.context("no answer within 2s")??;
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let status = std::str::from_utf8(&raw[..at])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1)?.parse().ok())
        .context("no status line")?;
    Ok((status, raw[at + 4..].to_vec()))
}

fn banner(
    file: &MeshFile,
    planned: &[Planned],
    instances: &[weft_api::Instance],
    gateway_admin: Option<SocketAddr>,
    data_dir: &std::path::Path,
    dashboard: SocketAddr,
) {
    println!("weft mesh is up\n");
    println!("  control plane  {}   (xDS + API; data in {})", file.control.listen, data_dir.display());
    println!("  dashboard      http://{dashboard}/");
    if let Some(dc) = &file.datacenter {
        println!("  datacenter     {dc}");
    }
    if let Some(addr) = file.mesh_gateway {
        println!("  mesh gateway   {addr}   (peers' sidecars reach this datacenter's exported services here)");
    }
    if let Some(addr) = file.mesh_gateway_local {
        println!("                 {addr}   (this datacenter's sidecars reach its peers through here)");
    }
    if let Some(admin) = gateway_admin {
        for (svc, port) in &file.gateway {
            println!("  gateway        {svc:<10} http://127.0.0.1:{port}/");
        }
        println!("                 admin http://{admin}/metrics");
    }
    println!();
    println!("  {:<14} {:<20} {:<18} {:<18} ADMIN", "SERVICE", "INSTANCE", "APP", "INBOUND");
    for p in planned {
        let reg = instances.iter().find(|i| i.id == p.id).map(|i| &i.registration);
        let inbound = reg.and_then(|r| r.inbound.clone()).unwrap_or_default();
        let admin = reg.and_then(|r| r.admin.clone()).unwrap_or_default();
        // A transparent instance's app listens on its namespace's address.
        let transparent = !inbound.starts_with("127.");
        let ip = if transparent { inbound.split(':').next().unwrap_or_default() } else { "127.0.0.1" };
        let app = format!("{ip}:{}", p.app);
        let on = p.host.as_deref().map(|h| format!("   on {h}")).unwrap_or_default();
        println!("  {:<14} {:<20} {app:<18} {inbound:<18} http://{admin}/config_dump{on}", p.service, p.id);
    }
    let control = file.control.listen;
    if let Some((svc, port)) = file.gateway.iter().min_by_key(|(_, port)| **port) {
        println!("\nTry:");
        println!("  curl http://127.0.0.1:{port}/                               # {svc}, HTTP/1.1");
        println!("  curl --http2-prior-knowledge http://127.0.0.1:{port}/       # HTTP/2");
        println!("  weft demo-client --target 127.0.0.1:{port}                  # gRPC");
        println!("  weft get services --control {control}");
        println!("  weft get endpoints {svc} --control {control}");
    }
    println!("\nPrometheus (scrapes every proxy, found through the control plane):");
    println!("  prometheus --config.file={}", weft_control::prometheus_config_file(data_dir).display());
    println!("\nCtrl-C stops the whole mesh.");
}
