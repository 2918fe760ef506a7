//! Traffic policies over time, tested in-process with the clock paused: the control plane,
//! the sidecars, their apps and the clients share one tokio runtime (`weft_tests::inprocess`),
//! so an ejection of 3 s, a rate of 50 requests a second or a probe every 200 ms is exact and
//! takes milliseconds of real time.
use std::time::Duration;
use weft_tests::inprocess::{App, Mesh, Proxy, client};

const ROUND_ROBIN: &str =
    "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {loadBalancer: round-robin}\n";

/// Applies a TrafficPolicy for `backend` whose spec (besides its target) is `spec`, indented by
/// two spaces.
async fn policy(mesh: &Mesh, spec: &str) {
    mesh.apply(&format!(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: backend-policy}}\nspec:\n  targetRef: {{kind: Service, name: backend}}\n  {spec}\n"
    ))
    .await;
}

/// Sidecars `backend-0`, `backend-1`, … of service `backend` in front of `apps` (their own
/// health checked once at start, then hourly) and an edge that holds all of them.
async fn backends(mesh: &Mesh, apps: &[App]) -> (Vec<Proxy>, Proxy) {
    let mut sidecars = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        sidecars.push(mesh.sidecar("backend", &format!("backend-{i}"), app, &["--health-interval", "1h"]).await);
    }
    let edge = mesh.edge("edge", &["backend"]).await;
    edge.wait_endpoints("backend", apps.len()).await;
    (sidecars, edge)
}

async fn ejections(edge: &Proxy) -> u64 {
    edge.counter("weft_outlier_ejections_total", &["service=\"backend\""]).await
}

/// One of three instances fails half its requests (three in a row, then three good): with
/// retries and outlier detection on, clients see no error; the instance is ejected after three
/// failures in a row, asked nothing for exactly its ejection time, then let back in (and,
/// failing again, ejected again).
#[tokio::test(start_paused = true)]
async fn outlier_detection_ejects_a_failing_instance_for_its_ejection_time() {
    let mesh = Mesh::start().await;
    let apps = [App::ok().await, App::ok().await, App::failing(|n| (n - 1) % 6 < 3).await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    mesh.apply(ROUND_ROBIN).await;
    policy(
        &mesh,
        "retry: {attempts: 2, retryOn: [5xx], backoff: {baseInterval: 2ms}}\n  \
         outlierDetection: {consecutive5xx: 3, baseEjectionTime: 3s, maxEjectionPercent: 34}",
    )
    .await;
    edge.wait_config("/clusters/backend/outlier").await;
    // Round robin: the flaky instance's three failures in a row come within nine requests.
    let statuses = client.statuses(&url, 9, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "a retry did not hide a failure: {statuses:?}");
    assert_eq!(ejections(&edge).await, 1, "three failures in a row did not eject");
    let ejected_at = tokio::time::Instant::now();
    let asked = apps[2].answered();
    // While ejected (2.9 s of the 3 s), the instance is asked nothing.
    let during = client.paced(&url, Duration::from_millis(10), Duration::from_millis(2900)).await;
    assert!(during.iter().all(|s| *s == 200), "{during:?}");
    assert_eq!(apps[2].answered(), asked, "an ejected instance was sent requests");
    // After it, it is asked again and, still failing, ejected a second time.
    tokio::time::sleep_until(ejected_at + Duration::from_millis(3100)).await;
    let after = client.statuses(&url, 30, 1).await;
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
    assert!(apps[2].answered() > asked, "the instance was not let back in after its ejection time");
    assert_eq!(ejections(&edge).await, 2, "the instance, failing again, was not ejected again");
}
