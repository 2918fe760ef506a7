//! A real Prometheus (Debian's package) on the demo mesh, configured only with the file the
//! control plane writes from deploy/prometheus.yml, and the PromQL of
//! deploy/grafana-dashboard.json run against it.
use std::process::Command;
use std::time::Duration;
use weft_tests::*;

/// Runs an instant query; the result vector, or the error Prometheus gave.
fn query(prometheus: &str, promql: &str) -> Result<Vec<serde_json::Value>, String> {
    let out = run(
        "curl",
        &[
            "-s",
            "--max-time",
            "5",
            "-G",
            &format!("http://{prometheus}/api/v1/query"),
            "--data-urlencode",
            &format!("query={promql}"),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", stdout(&out)))?;
    if v["status"] != "success" {
        return Err(format!("{promql}: {v}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The single value of an instant query's result.
fn value(prometheus: &str, promql: &str) -> f64 {
    let r = query(prometheus, promql).unwrap();
    assert_eq!(r.len(), 1, "{promql}: {r:?}");
    r[0]["value"][1].as_str().unwrap().parse().unwrap()
}

/// Requests `n` times `url` on one connection; the status codes.
fn statuses(url: &str, n: usize) -> Vec<u16> {
    let mut args = vec!["-s", "-w", "%{http_code}\n", "--max-time", "60"];
    for _ in 0..n {
        args.extend(["-o", "/dev/null", url]);
    }
    let out = run("curl", &args);
    stdout(&out).lines().map(|l| l.parse().unwrap()).collect()
}

#[test]
fn prometheus_scrapes_every_proxy_of_the_demo_mesh_and_the_dashboard_agrees() {
    let dir = TestDir::new("prometheus");
    let (control, front, back, up_port) = (free_port(), free_port(), free_port(), free_port());
    // The bundled demo (README: `weft up`) on free ports, with backend v2 failing 20% of its
    // requests.
    let file = dir.path.join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            "control: {{listen: 127.0.0.1:{control}}}
gateway: {{frontend: {front}, backend: {back}}}
services:
  - name: backend
    labels: {{version: v1}}
    instances: 2
    healthPath: /healthz
  - name: backend
    labels: {{version: v2}}
    instances: 1
    healthPath: /healthz
    env: {{WEFT_DEMO_FAIL_PERCENT: \"20\"}}
  - name: frontend
    labels: {{version: v1}}
    healthPath: /healthz
    upstreams: {{backend: {up_port}}}
"
        ),
    )
    .unwrap();
    let mut up = Proc::spawn(&dir, "up", Command::new(weft_bin()).args(["up", "-f", file.to_str().unwrap()]));
    let banner = wait_up(&dir, &mut up);
    let config = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("prometheus --config.file="))
        .unwrap_or_else(|| panic!("weft up prints how to start Prometheus:\n{banner}"))
        .to_owned();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus.yml")).unwrap();
    let written = std::fs::read_to_string(&config).unwrap();
    let data_dir = config.strip_suffix("/prometheus.yml").unwrap();
    assert_eq!(
        written,
        shipped.replace("127.0.0.1:15010", &format!("127.0.0.1:{control}")).replace("/var/lib/weft/control", data_dir),
        "the control plane writes the shipped example with its address and data directory"
    );

    let prometheus = format!("127.0.0.1:{}", free_port());
    let _prom = Proc::spawn(
        &dir,
        "prometheus",
        Command::new("prometheus").args([
            &format!("--config.file={config}"),
            &format!("--storage.tsdb.path={}", dir.path.join("tsdb").display()),
            &format!("--web.listen-address={prometheus}"),
        ]),
    );
    // Every proxy: four sidecars and the gateway, found and scraped.
    wait_until(Duration::from_secs(30), "Prometheus to scrape five proxies", || {
        query(&prometheus, r#"up{job="weft-proxies"} == 1"#).is_ok_and(|r| r.len() == 5)
    });
    let targets = query(&prometheus, r#"up{job="weft-proxies"}"#).unwrap();
    let apps: Vec<&str> = targets.iter().map(|t| t["metric"]["app"].as_str().unwrap()).collect();
    for app in ["backend", "frontend", "gateway"] {
        assert!(apps.contains(&app), "{apps:?}");
    }
    assert!(targets.iter().all(|t| t["metric"]["instance"].as_str().is_some_and(|i| !i.contains(':'))), "{targets:?}");
    assert_eq!(
        targets.iter().filter(|t| t["metric"]["version"] == "v2").count(),
        1,
        "the version label comes from the instance: {targets:?}"
    );
    wait_until(Duration::from_secs(10), "Prometheus to scrape the control plane", || {
        query(&prometheus, r#"up{job="weft-control"} == 1"#).is_ok_and(|r| r.len() == 1)
    });

    // Traffic to backend through the gateway: what the clients saw is the truth.
    let url = format!("http://127.0.0.1:{back}/info");
    let mut seen = statuses(&url, 50);
    // Each series has a sample before the measured traffic (rates need two).
    std::thread::sleep(Duration::from_secs(6));
    seen.extend(statuses(&url, 600));
    // The balancer makes a failing instance pay for its failures, so on a busy machine v2 may
    // get few requests: more, up to 1,800, until it has failed some.
    while !seen.contains(&500) && seen.len() < 1850 {
        seen.extend(statuses(&url, 200));
    }
    let failed = seen.iter().filter(|s| **s == 500).count();
    assert_eq!(seen.iter().filter(|s| **s == 200).count() + failed, seen.len(), "{seen:?}");
    assert!(failed > 0, "v2 failed none of its requests");
    let expected = 1.0 - failed as f64 / seen.len() as f64;
    let backend = r#"direction="inbound",dst_service="backend""#;
    let counted = format!(r#"sum(weft_requests_total{{{backend}}})"#);
    wait_until(Duration::from_secs(20), "Prometheus to scrape the traffic", || {
        query(&prometheus, &counted).is_ok_and(|r| r.len() == 1 && r[0]["value"][1] == seen.len().to_string().as_str())
    });
    let success = value(
        &prometheus,
        &format!(r#"sum(weft_requests_total{{{backend},class="success"}}) / sum(weft_requests_total{{{backend}}})"#),
    );
    assert!((success - expected).abs() < 0.02, "PromQL success rate {success}, clients saw {expected}");

    // `weft stat`, from what the proxies report to the control plane, agrees within 5%.
    let control_addr = format!("127.0.0.1:{control}");
    let stat = || -> serde_json::Value {
        let out = weft(&["stat", "services", "backend", "-o", "json", "--window", "15m", "--control", &control_addr]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["rows"][0].clone()
    };
    wait_until(Duration::from_secs(20), "weft stat to count the traffic", || {
        stat()["requests"].as_u64() == Some(seen.len() as u64)
    });
    let stat_success = stat()["success_rate"].as_f64().unwrap();
    assert!(
        (stat_success - success).abs() <= 0.05 * success,
        "weft stat's success rate {stat_success}, Prometheus's {success}"
    );

    // Every query of the dashboard runs and finds data; its success rate agrees.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let services = variables.iter().find(|v| v["name"] == "service").unwrap()["definition"].as_str().unwrap();
    let names = services.strip_prefix("label_values(").unwrap().strip_suffix(")").unwrap();
    let (metric, label) = names.split_once(", ").unwrap();
    let found = query(&prometheus, &format!("group by ({label}) ({metric})")).unwrap();
    assert!(found.iter().any(|s| s["metric"][label] == "backend"), "the service variable lists backend: {found:?}");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let promql = expr.replace("$service", "backend").replace("$__rate_interval", "1m");
            queries += 1;
            if panel["title"] == "Retries and proxy errors" {
                query(&prometheus, &promql).unwrap();
                continue; // none happened
            }
            // A rate needs two scrapes of a series; on a busy machine a proxy's latest may be
            // its first.
            let mut r = Vec::new();
            wait_until(Duration::from_secs(20), &format!("data for {promql}"), || {
                r = query(&prometheus, &promql).unwrap();
                !r.is_empty()
            });
            if panel["title"] == "Success rate" {
                let rate: f64 = r[0]["value"][1].as_str().unwrap().parse().unwrap();
                assert!((rate - expected).abs() < 0.02, "dashboard success rate {rate}, clients saw {expected}");
            }
        }
    }
    assert!(queries >= 10, "{queries} queries in the dashboard");
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(up.wait(Duration::from_secs(20)), Some(0));
}
