//! The mesh's own view, from the CLI: `weft stat` (the control plane's aggregates of what the
//! proxies report), `weft tap` (a live stream of requests) and `weft top` (a tap, tallied by
//! path). All go through the control plane, which hears from every proxy over the connection
//! the proxy holds: nothing here connects to a proxy.
use crate::api_client::{Api, render_table, table};
use crate::cli::{ControlAddr, TapFilter};
use http_body_util::BodyExt;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

pub async fn stat(
    control: &ControlAddr,
    kind: &str,
    name: Option<&str>,
    window: Duration,
    output: &str,
) -> anyhow::Result<()> {
    let api = Api::new(control)?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("window", &format!("{}s", window.as_secs()));
    if let Some(n) = name {
        query.append_pair("name", n);
    }
    let v = api.get_json(&format!("/api/v1/stat/{kind}?{}", query.finish())).await?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        eprintln!(
            "no requests reported in the last {}s{} (proxies report every {}s; a window needs two reports)",
            window.as_secs(),
            name.map(|n| format!(" about {n}")).unwrap_or_default(),
            weft_api::report::INTERVAL.as_secs()
        );
        return Ok(());
    }
    let pct = |v: &Value| v.as_f64().map_or("-".to_owned(), |r| format!("{:.2}%", r * 100.0));
    let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |m| format!("{m:.1}ms"));
    let numbers = |r: &Value| {
        vec![
            pct(&r["success_rate"]),
            format!("{:.1}", r["rps"].as_f64().unwrap_or_default()),
            ms(&r["latency_ms_p50"]),
            ms(&r["latency_ms_p95"]),
            ms(&r["latency_ms_p99"]),
        ]
    };
    let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    match kind {
        "edges" => {
            let rows = rows
                .iter()
                .map(|r| {
                    let mtls = if r["mtls"] == true { "yes" } else { "no" }.to_owned();
                    [vec![text(&r["from"]), text(&r["to"]), mtls], numbers(r)].concat()
                })
                .collect();
            table(&["FROM", "TO", "MTLS", "SUCCESS", "RPS", "P50", "P95", "P99"], rows);
        }
        "routes" | "instances" => {
            let first = if kind == "routes" { "ROUTE" } else { "INSTANCE" };
            let rows =
                rows.iter().map(|r| [vec![text(&r["name"]), text(&r["service"])], numbers(r)].concat()).collect();
            table(&[first, "SERVICE", "SUCCESS", "RPS", "P50", "P95", "P99"], rows);
        }
        _ => {
            let rows = rows.iter().map(|r| [vec![text(&r["name"])], numbers(r)].concat()).collect();
            table(&["SERVICE", "SUCCESS", "RPS", "P50", "P95", "P99"], rows);
        }
    }
    Ok(())
}

/// Opens a tap and calls `each` with every line (a request, or a `dropped` count) until it
/// returns false, the stream ends or Ctrl-C.
async fn tap_lines(
    control: &ControlAddr,
    service: &str,
    filter: &TapFilter,
    headers: bool,
    mut each: impl FnMut(Value) -> bool,
) -> anyhow::Result<()> {
    let api = Api::new(control)?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("service", service);
    for (k, v) in [("path", &filter.path), ("method", &filter.method), ("to", &filter.to)] {
        if let Some(v) = v {
            query.append_pair(k, v);
        }
    }
    query.append_pair("rate", &filter.max_rps.clamp(1, 1000).to_string());
    if headers {
        query.append_pair("headers", "true");
    }
    let mut body = api.stream(&format!("/api/v1/tap?{}", query.finish())).await?.into_body();
    let mut pending = Vec::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut ctrl_c => return Ok(()),
        };
        let Some(frame) = frame else { anyhow::bail!("the control plane ended the tap") };
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
            if !each(v) {
                return Ok(());
            }
        }
    }
}

pub async fn tap(
    control: &ControlAddr,
    service: &str,
    filter: &TapFilter,
    headers: bool,
    count: Option<usize>,
    output: &str,
) -> anyhow::Result<()> {
    let mut seen = 0;
    let mut dropped = 0;
    tap_lines(control, service, filter, headers, |v| {
        if let Some(d) = v["dropped"].as_u64() {
            if d > dropped && output != "json" {
                eprintln!("({} requests not shown: over --max-rps, or more than this terminal read)", d - dropped);
            }
            dropped = d;
            return true;
        }
        if output == "json" {
            println!("{v}");
        } else {
            println!("{}", tap_line(&v));
        }
        let _ = std::io::stdout().flush();
        seen += 1;
        count.is_none_or(|n| seen < n)
    })
    .await
}

/// One request as a line: when, where it was seen, what it was, how it ended, who called whom.
fn tap_line(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    let time = v["time_ms"].as_u64().map_or("-".to_owned(), |ms| {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000);
        t.map_or("-".to_owned(), |t| {
            format!("{:02}:{:02}:{:02}.{:03}", t.hour(), t.minute(), t.second(), t.millisecond())
        })
    });
    let grpc = v["grpc_status"].as_i64().map(|g| format!(" grpc={g}")).unwrap_or_default();
    let error = v["error"].as_str().map(|e| format!(" error={e}")).unwrap_or_default();
    let tls = if v["mtls"] == true { "mtls" } else { "plaintext" };
    let mut line = format!(
        "{time} {:<8} {} {} {}{} {}{grpc}{error} {:.1}ms {} → {} ({tls}) via {}",
        s("direction"),
        s("proxy"),
        s("method"),
        v["authority"].as_str().unwrap_or(""),
        s("path"),
        v["status"],
        v["latency_ms"].as_f64().unwrap_or_default(),
        s("src_service"),
        s("dst_service"),
        s("upstream"),
    );
    if let Some(headers) = v["headers"].as_array() {
        for h in headers {
            line.push_str(&format!("\n    {}: {}", h[0].as_str().unwrap_or(""), h[1].as_str().unwrap_or("")));
        }
    }
    line
}

/// A path's tally in `weft top`.
#[derive(Default, serde::Serialize)]
struct PathStats {
    method: String,
    path: String,
    count: u64,
    successes: u64,
    best_ms: f64,
    worst_ms: f64,
    last_ms: f64,
}

pub async fn top(
    control: &ControlAddr,
    service: &str,
    filter: &TapFilter,
    interval: Duration,
    output: &str,
) -> anyhow::Result<()> {
    let mut paths: HashMap<(String, String), PathStats> = HashMap::new();
    let mut next = tokio::time::Instant::now() + interval;
    let interactive = output == "table" && std::io::stdout().is_terminal();
    tap_lines(control, service, filter, false, |v| {
        if v.get("dropped").is_none() {
            let (method, path) = (v["method"].as_str().unwrap_or("-"), v["path"].as_str().unwrap_or("-"));
            let latency = v["latency_ms"].as_f64().unwrap_or_default();
            let ok =
                v["status"].as_u64().is_some_and(|s| s > 0 && s < 500) && v["grpc_status"].as_i64().unwrap_or(0) == 0;
            let p = paths.entry((method.to_owned(), path.to_owned())).or_insert_with(|| PathStats {
                method: method.to_owned(),
                path: path.to_owned(),
                best_ms: latency,
                ..Default::default()
            });
            p.count += 1;
            p.successes += u64::from(ok);
            p.best_ms = p.best_ms.min(latency);
            p.worst_ms = p.worst_ms.max(latency);
            p.last_ms = latency;
        }
        // Redrawn on the tap's own lines (a request, or the control plane's count every 2 s).
        if tokio::time::Instant::now() >= next {
            next = tokio::time::Instant::now() + interval;
            draw(&paths, service, output, interactive);
        }
        true
    })
    .await
}

fn draw(paths: &HashMap<(String, String), PathStats>, service: &str, output: &str, interactive: bool) {
    let mut busiest: Vec<&PathStats> = paths.values().collect();
    busiest.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.path.cmp(&b.path)));
    busiest.truncate(20);
    if output == "json" {
        println!("{}", serde_json::to_string(&busiest).unwrap_or_default());
    } else {
        let rows = busiest
            .iter()
            .map(|p| {
                vec![
                    p.count.to_string(),
                    p.method.clone(),
                    p.path.clone(),
                    format!("{:.2}%", p.successes as f64 * 100.0 / p.count.max(1) as f64),
                    format!("{:.1}ms", p.best_ms),
                    format!("{:.1}ms", p.worst_ms),
                    format!("{:.1}ms", p.last_ms),
                ]
            })
            .collect();
        let text = render_table(&["COUNT", "METHOD", "PATH", "SUCCESS", "BEST", "WORST", "LAST"], rows);
        if interactive {
            // Clear the screen and draw from the top.
            print!("\x1b[2J\x1b[H{service}: busiest paths since the start (Ctrl-C stops)\n\n{text}");
        } else {
            println!("{text}");
        }
    }
    let _ = std::io::stdout().flush();
}
