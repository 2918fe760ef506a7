//! Control-plane scale benchmark.
//!
//! Starts one `weft control`, connects N simulated proxies (each a distinct xDS node with its
//! own ADS stream, subscribed to all clusters and to the endpoints of one service), then
//! makes an endpoint change (a new instance of that service registers) and measures, per
//! client, the time from the change until the client holds the new endpoint set and has
//! ACKed it. Reports p50 / p99 / max and the control plane's RSS per connected client.
#![forbid(unsafe_code)]

use clap::Parser;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prost::{Message, Name};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Barrier, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// Simulated clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// ADS streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Use delta xDS instead of state of the world.
    #[arg(long)]
    delta: bool,
    /// The weft binary.
    #[arg(long, default_value = "target/release/weft")]
    weft: String,
    /// Endpoint changes to measure.
    #[arg(long, default_value_t = 5)]
    changes: usize,
}

fn healthy_endpoints(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).filter(|e| e.health_status == 1).count()
}

/// One simulated proxy. Reports, for each change `i`, when it saw `i + 1` healthy endpoints.
async fn client(
    channel: Channel,
    id: usize,
    delta: bool,
    ready: Arc<Barrier>,
    seen: mpsc::UnboundedSender<(usize, Instant)>,
) -> anyhow::Result<()> {
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let node = Node { id: format!("sim-{id}"), cluster: "bench".into(), ..Default::default() };
    let eds = ClusterLoadAssignment::type_url();
    let mut last = 0usize;
    let mut first = true;
    if delta {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: eds.clone(),
            resource_names_subscribe: vec!["bench".into()],
            ..Default::default()
        })
        .await?;
        let mut s = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        while let Some(r) = s.message().await? {
            let at = Instant::now();
            tx.send(DeltaDiscoveryRequest {
                type_url: eds.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await?;
            for res in &r.resources {
                let cla = ClusterLoadAssignment::decode(
                    res.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default(),
                )?;
                last = report(healthy_endpoints(&cla), last, at, &seen);
            }
            if std::mem::take(&mut first) {
                ready.wait().await;
            }
        }
    } else {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest { node: Some(node), type_url: Cluster::type_url(), ..Default::default() }).await?;
        tx.send(DiscoveryRequest { type_url: eds.clone(), resource_names: vec!["bench".into()], ..Default::default() })
            .await?;
        let mut s = ads.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        while let Some(r) = s.message().await? {
            let at = Instant::now();
            tx.send(DiscoveryRequest {
                type_url: r.type_url.clone(),
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                resource_names: if r.type_url == eds { vec!["bench".into()] } else { vec![] },
                ..Default::default()
            })
            .await?;
            if r.type_url == eds {
                for a in &r.resources {
                    last =
                        report(healthy_endpoints(&ClusterLoadAssignment::decode(a.value.as_slice())?), last, at, &seen);
                }
                if std::mem::take(&mut first) {
                    ready.wait().await;
                }
            }
        }
    }
    Ok(())
}

fn report(healthy: usize, last: usize, at: Instant, seen: &mpsc::UnboundedSender<(usize, Instant)>) -> usize {
    if healthy > last && last > 0 {
        let _ = seen.send((healthy - 1, at));
    }
    healthy.max(last)
}

/// A fake instance of service `bench`: an ADS stream carrying a weft registration.
async fn instance(channel: Channel, n: usize, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let reg = serde_json::json!({
        "service": "bench", "inbound": format!("127.0.0.{}:{}", 1 + n / 60000, 1000 + n % 60000),
        "app": "127.0.0.1:1", "labels": {}, "upstreams": [], "healthy": true,
    });
    let node = Node {
        id: format!("bench-instance-{n}"),
        metadata: Some(Struct {
            fields: [(
                weft_api::names::NODE_METADATA_KEY.to_owned(),
                Value { kind: Some(value::Kind::StringValue(reg.to_string())) },
            )]
            .into(),
        }),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest { node: Some(node), type_url: Cluster::type_url(), ..Default::default() }).await?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let mut s = ads.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut stop = stop;
    tokio::select! {
        _ = async { while let Ok(Some(_)) = s.message().await {} } => {}
        _ = stop.wait_for(|s| *s) => {}
    }
    drop(tx);
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let data = std::env::temp_dir().join(format!("weft-xds-scale-{}", std::process::id()));
    let mut control = tokio::process::Command::new(&args.weft)
        .args(["control", "--listen", &addr, "--data-dir"])
        .arg(&data)
        .env("WEFT_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = control.id().unwrap_or(0);
    let endpoint = format!("http://{addr}");
    let connect = || async {
        for _ in 0..100 {
            if let Ok(c) = Channel::from_shared(endpoint.clone())?.connect().await {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("control plane did not start")
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // One instance exists before the clients connect, so every client starts with 1 endpoint.
    let base = connect().await?;
    tokio::spawn(instance(base.clone(), 0, stop_rx.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_kib(pid);

    let ready = Arc::new(Barrier::new(args.clients + 1));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut channel = connect().await?;
    for i in 0..args.clients {
        if i > 0 && i % args.streams_per_connection == 0 {
            channel = connect().await?;
        }
        let (c, r, s, done) = (channel.clone(), ready.clone(), seen_tx.clone(), stop_rx.clone());
        let delta = args.delta;
        tokio::spawn(async move {
            // Streams break when the control plane is stopped at the end; only earlier errors count.
            if let Err(e) = client(c, i, delta, r, s).await
                && !*done.borrow()
            {
                eprintln!("client {i}: {e}");
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(120), ready.wait())
        .await
        .map_err(|_| anyhow::anyhow!("clients did not all get their first config within 120 s"))?;
    let connected_in = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_kib(pid);

    let mut rows = Vec::new();
    for change in 1..=args.changes {
        let t0 = Instant::now();
        tokio::spawn(instance(base.clone(), change, stop_rx.clone()));
        let mut times = Vec::with_capacity(args.clients);
        let deadline = t0 + Duration::from_secs(60);
        while times.len() < args.clients {
            match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
                Ok(Some((n, at))) if n == change => times.push(at.duration_since(t0)),
                Ok(Some(_)) => {}
                _ => anyhow::bail!(
                    "change {change}: only {} of {} clients updated within 60 s",
                    times.len(),
                    args.clients
                ),
            }
        }
        times.sort();
        rows.push((percentile(&times, 0.5), percentile(&times, 0.99), *times.last().unwrap_or(&Duration::ZERO)));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = stop_tx.send(true);
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let mut p50: Vec<Duration> = rows.iter().map(|r| r.0).collect();
    let mut p99: Vec<Duration> = rows.iter().map(|r| r.1).collect();
    let mut max: Vec<Duration> = rows.iter().map(|r| r.2).collect();
    p50.sort();
    p99.sort();
    max.sort();
    let per_client = rss_connected.saturating_sub(rss_before) as f64 / args.clients as f64;
    println!(
        "| clients | xDS | connect+first config | change→ACK p50 (ms) | p99 (ms) | max (ms) | CP RSS idle | CP RSS connected | RSS per client |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.2} s | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
        args.clients,
        if args.delta { "delta" } else { "sotw" },
        connected_in.as_secs_f64(),
        ms(p50[p50.len() / 2]),
        ms(p99[p99.len() / 2]),
        ms(max[max.len() - 1]),
        rss_before as f64 / 1024.0,
        rss_connected as f64 / 1024.0,
        per_client
    );
    eprintln!("(medians over {} changes; max is the worst single client over all changes)", args.changes);
    let _ = control.start_kill();
    let _ = control.wait().await;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
