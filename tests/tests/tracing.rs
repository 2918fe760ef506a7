//! Distributed tracing end to end, as a new user switches it on (README: "Tracing"): the demo
//! mesh from a mesh file, a Telemetry applied with `weft apply`, and a real OTLP/gRPC receiver
//! (grpcio, from the opentelemetry-proto definitions: tests/py/otlp_receiver.py).
use std::process::Command;
use std::time::Duration;
use weft_tests::*;

/// The spans the receiver has printed so far.
fn spans(dir: &TestDir, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.path.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|s| s.get("span_id").is_some())
        .collect()
}

fn receiver(dir: &TestDir, name: &str, port: u16) -> Proc {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/otlp_receiver.py");
    let p = Proc::spawn(dir, name, Command::new(python()).args([script, &port.to_string()]));
    let log = dir.path.join(format!("{name}.log"));
    wait_until(Duration::from_secs(20), "the OTLP receiver to listen", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("listening")
    });
    p
}

/// The four spans of one request through gateway → frontend → backend, parent first.
fn whole_trace(all: &[serde_json::Value], trace: &str) -> Option<Vec<serde_json::Value>> {
    let of_trace: Vec<&serde_json::Value> = all.iter().filter(|s| s["trace_id"] == trace).collect();
    let root = of_trace.iter().find(|s| s["service"] == "gateway")?;
    let mut chain = vec![(*root).clone()];
    while let Some(child) = of_trace.iter().find(|s| s["parent_span_id"] == chain.last().unwrap()["span_id"]) {
        chain.push((*child).clone());
    }
    (chain.len() == 4).then_some(chain)
}

fn proxies_dropped(control: &str) -> f64 {
    let out = weft(&["get", "proxies", "-o", "json", "--control", control]);
    let proxies: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    let admins: Vec<String> = proxies
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["admin"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    admins
        .iter()
        .filter_map(|a| curl(&[&format!("http://{a}/metrics")]))
        .map(|r| metric_sum(&r.body, "weft_trace_spans_total", &[r#"result="dropped""#]))
        .sum()
}

#[test]
fn a_request_through_the_demo_mesh_is_one_trace_and_a_lost_collector_costs_nothing() {
    let dir = TestDir::new("tracing");
    let (control, front, up_port, otlp) = (free_port(), free_port(), free_port(), free_port());
    let file = dir.path.join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            "control: {{listen: 127.0.0.1:{control}}}
gateway: {{frontend: {front}}}
services:
  - name: backend
    healthPath: /healthz
  - name: frontend
    healthPath: /healthz
    upstreams: {{backend: {up_port}}}
"
        ),
    )
    .unwrap();
    let mut up = Proc::spawn(&dir, "up", Command::new(weft_bin()).args(["up", "-f", file.to_str().unwrap()]));
    wait_up(&dir, &mut up);
    let control = format!("127.0.0.1:{control}");
    let url = format!("http://127.0.0.1:{front}/");
    assert_eq!(curl(&[&url]).unwrap().status, 200);

    let mut collector = receiver(&dir, "otlp", otlp);
    let doc = dir.path.join("telemetry.yaml");
    std::fs::write(
        &doc,
        format!(
            "apiVersion: weft.dev/v1alpha1
kind: Telemetry
metadata: {{name: mesh}}
spec:
  tracing: {{collector: 127.0.0.1:{otlp}, samplingPercentage: 100}}
"
        ),
    )
    .unwrap();
    let out = weft(&["apply", "-f", doc.to_str().unwrap(), "--control", &control]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A request with no context: the gateway starts the trace, every hop adds its span.
    let mut trace = None;
    wait_until(Duration::from_secs(15), "one whole trace at the receiver", || {
        assert_eq!(curl(&[&url]).unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(300));
        let all = spans(&dir, "otlp");
        trace =
            all.iter().filter(|s| s["service"] == "gateway").find_map(|g| whole_trace(&all, g["trace_id"].as_str()?));
        trace.is_some()
    });
    let chain = trace.unwrap();
    let who: Vec<(&str, i64)> =
        chain.iter().map(|s| (s["service"].as_str().unwrap(), s["kind"].as_i64().unwrap())).collect();
    // SpanKind: 2 server, 3 client.
    assert_eq!(who, [("gateway", 3), ("frontend", 2), ("frontend", 3), ("backend", 2)], "{chain:#?}");
    assert_eq!(chain[0]["parent_span_id"], "", "the gateway's span is the root: {chain:#?}");
    for s in &chain {
        assert_eq!(s["name"], "GET", "{s}");
        assert_eq!(s["attributes"]["http.request.method"], "GET", "{s}");
        assert_eq!(s["attributes"]["http.response.status_code"], 200, "{s}");
        assert_eq!(s["attributes"]["url.path"], "/", "{s}");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
    }
    assert_eq!(chain[1]["attributes"]["weft.peer.identity"], "spiffe://weft.local/ns/default/sa/gateway");
    assert_eq!(chain[2]["attributes"]["weft.destination.service"], "backend");
    // Each hop's span lies within its parent's.
    for pair in chain.windows(2) {
        assert!(pair[1]["start"].as_u64() >= pair[0]["start"].as_u64(), "{pair:#?}");
        assert!(pair[1]["end"].as_u64() <= pair[0]["end"].as_u64(), "{pair:#?}");
    }

    // A caller's context is continued, with its decision: sampled, and not.
    let sampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let h = |t: &str, f: &str| format!("traceparent: 00-{t}-00f067aa0ba902b7-{f}");
    assert_eq!(curl(&["-H", &h(sampled, "01"), &url]).unwrap().status, 200);
    assert_eq!(curl(&["-H", &h(unsampled, "00"), &url]).unwrap().status, 200);
    let waited = std::time::Instant::now();
    while whole_trace(&spans(&dir, "otlp"), sampled).is_none() {
        let of_trace: Vec<serde_json::Value> =
            spans(&dir, "otlp").into_iter().filter(|s| s["trace_id"] == sampled).collect();
        assert!(waited.elapsed() < Duration::from_secs(5), "the caller's trace is not whole: {of_trace:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let chain = whole_trace(&spans(&dir, "otlp"), sampled).unwrap();
    assert_eq!(chain[0]["parent_span_id"], "00f067aa0ba902b7", "{chain:#?}");
    assert!(!spans(&dir, "otlp").iter().any(|s| s["trace_id"] == unsampled), "an unsampled trace has no spans");

    // The collector gone: traffic is untouched, and the spans it misses are counted.
    let before = proxies_dropped(&control);
    collector.kill();
    let statuses: Vec<u16> = (0..50).map(|_| curl(&[&url]).unwrap().status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    wait_until(Duration::from_secs(15), "the proxies to count the spans they could not export", || {
        proxies_dropped(&control) >= before + 50.0
    });
}
