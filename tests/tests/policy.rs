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

/// A rate limit of 50 requests a second (bursts of 10) for the service, under a steady 200
/// requests a second for 3 s: exactly the burst and 50 a second get through, the rest get 429
/// `rate-limited` with a Retry-After and never reach the app. Then a per-caller limit of 20 a
/// second (bursts of 5) gives each of two callers (two identities) its own share.
#[tokio::test(start_paused = true)]
async fn rate_limits_hold_for_the_service_and_per_caller() {
    let mesh = Mesh::start().await;
    let apps = [App::ok().await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    policy(&mesh, "rateLimit: {service: {requests: 50, interval: 1s, burst: 10}}").await;
    let callee = &_sidecars[0];
    callee.wait_dump("the rate limit in force", |d| d["listeners"].to_string().contains("\"rate_limit\":{")).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // a full bucket
    let a0 = apps[0].answered();
    let statuses = client.paced(&url, Duration::from_millis(5), Duration::from_secs(3)).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(statuses.len(), 600);
    assert!(ok.abs_diff(10 + 50 * 3) <= 1, "{ok} of 600 let through in 3 s, expected 160");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert_eq!(apps[0].answered() - a0, ok as u32, "refused requests reached the app");
    // The bucket is empty: of two requests at once, at least one is refused.
    let refused = client.load(&url, 2, 2).await.into_iter().find(|a| a.status == 429).expect("a refusal");
    assert_eq!(refused.headers["x-weft-error"], "rate-limited");
    let retry_after: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "{:?}", refused.headers);
    // One TrafficPolicy per service: a second is refused, naming the first.
    let second = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: another}\nspec:\n  targetRef: {name: backend}\n  retry: {attempts: 1}\n";
    let refusal = mesh.try_apply(second).await.expect_err("a second TrafficPolicy for one service was accepted");
    assert!(refusal.contains("already has TrafficPolicy \"backend-policy\""), "{refusal}");

    policy(&mesh, "rateLimit: {perCaller: {requests: 20, interval: 1s, burst: 5}}").await;
    callee
        .wait_dump("the per-caller limit in force", |d| d["listeners"].to_string().contains("\"per_caller\":{"))
        .await;
    let other = mesh.edge("edge-b", &["backend"]).await;
    other.wait_endpoints("backend", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let other_url = other.url("backend", "/");
    let (a, b) = tokio::join!(
        client.paced(&url, Duration::from_millis(10), Duration::from_secs(3)),
        client.paced(&other_url, Duration::from_millis(10), Duration::from_secs(3)),
    );
    for (who, statuses) in [("edge", a), ("edge-b", b)] {
        let ok = statuses.iter().filter(|s| **s == 200).count();
        assert!(ok.abs_diff(5 + 20 * 3) <= 1, "{who}: {ok} of {} let through in 3 s, expected 65", statuses.len());
    }
}

/// Active health checks from the callers' sidecars: an instance whose health path fails (while
/// the registry, checking only once an hour, still calls it healthy) gets no traffic once two
/// probes 200 ms apart failed, and gets traffic again after one probe passes.
#[tokio::test(start_paused = true)]
async fn active_health_checks_take_a_failing_instance_out_and_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mesh = Mesh::start().await;
    let flags: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
    let mut apps = Vec::new();
    for flag in &flags {
        let flag = flag.clone();
        apps.push(
            App::scripted(Duration::ZERO, move |path, count| match path {
                "/hc" if flag.load(Ordering::SeqCst) => 200,
                "/hc" => 503,
                _ => {
                    count.fetch_add(1, Ordering::SeqCst);
                    200
                }
            })
            .await,
        );
    }
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    policy(
        &mesh,
        "healthCheck: {interval: 200ms, timeout: 150ms, unhealthyThreshold: 2, healthyThreshold: 1, http: {path: /hc}}",
    )
    .await;
    edge.wait_config("/clusters/backend/health_check/http_path").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    flags[2].store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(401)).await; // two failed probes
    let before = apps[2].answered();
    let statuses = client.statuses(&url, 300, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(apps[2].answered(), before, "an instance failing its health checks got traffic");
    flags[2].store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(201)).await; // one passed probe
    let before = apps[2].answered();
    client.statuses(&url, 300, 4).await;
    assert!(apps[2].answered() > before + 30, "the instance did not get traffic back");
}

/// Connections the callee's sidecar has accepted (from callers' sidecars).
async fn accepted(callee: &Proxy) -> u64 {
    callee.counter("weft_tcp_connections_opened_total", &["direction=\"inbound\""]).await
}

/// Connection limits of a TrafficPolicy, seen at the callee's sidecar: requests per
/// connection, a maximum connection age and an idle timeout each make the caller's sidecar
/// open new connections, exactly when they say.
#[tokio::test(start_paused = true)]
async fn connection_pool_limits_recycle_upstream_connections() {
    let mesh = Mesh::start().await;
    let apps = [App::ok().await];
    let (sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    let get = async || assert_eq!(client.get(&url).await.0, 200);

    policy(&mesh, "connectionPool: {maxRequestsPerConnection: 2}").await;
    edge.wait_config("/clusters/backend/pool/max_requests_per_connection").await;
    get().await;
    get().await; // the connection's second request: it is done
    let before = accepted(&sidecars[0]).await;
    for _ in 0..10 {
        get().await;
    }
    assert_eq!(accepted(&sidecars[0]).await - before, 5, "10 requests at 2 per connection");

    policy(&mesh, "connectionPool: {maxConnectionDuration: 400ms}").await;
    edge.wait_config("/clusters/backend/pool/max_connection_duration").await;
    tokio::time::sleep(Duration::from_millis(500)).await; // connections of before aged out
    let before = accepted(&sidecars[0]).await;
    for _ in 0..12 {
        get().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At 0, 400 and 800 ms.
    assert_eq!(accepted(&sidecars[0]).await - before, 3, "1.2 s of requests with connections aged out at 400 ms");

    policy(&mesh, "connectionPool: {idleTimeout: 200ms}").await;
    edge.wait_config("/clusters/backend/pool/idle_timeout").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    get().await;
    let before = accepted(&sidecars[0]).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    get().await;
    assert_eq!(accepted(&sidecars[0]).await - before, 0, "a connection idle for less than its timeout was not reused");
    tokio::time::sleep(Duration::from_millis(250)).await;
    get().await;
    assert_eq!(accepted(&sidecars[0]).await - before, 1, "an idle connection was reused after its idle timeout");
}

/// Fault injection from a TrafficPolicy: 30% of 2,000 requests aborted with 503
/// `fault-injected` (none of them reaching an app), then 50% of 400 delayed by exactly 200 ms
/// (the others not at all).
#[tokio::test(start_paused = true)]
async fn fault_injection_aborts_and_delays_a_share_of_requests() {
    let mesh = Mesh::start().await;
    let apps = [App::ok().await, App::ok().await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    let asked = || apps.iter().map(App::answered).sum::<u32>();
    policy(&mesh, "fault: {abort: {httpStatus: 503, percentage: 30}}").await;
    edge.wait_config("/routes/backend/virtual_hosts/0/rules/0/fault/abort").await;
    let a0 = asked();
    let answers = client.load(&url, 2000, 8).await;
    let aborted: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    // Binomial(2000, 0.3): mean 600, standard deviation 20.5.
    assert!((498..=702).contains(&aborted.len()), "{} of 2000 aborted, expected 600 ± 102", aborted.len());
    assert!(aborted.iter().all(|a| a.headers["x-weft-error"] == "fault-injected"));
    assert_eq!(asked() - a0, (2000 - aborted.len()) as u32, "an aborted request reached an app");

    policy(&mesh, "fault: {delay: {fixedDelay: 200ms, percentage: 50}}").await;
    edge.wait_config("/routes/backend/virtual_hosts/0/rules/0/fault/delay").await;
    let answers = client.load(&url, 400, 40).await;
    assert!(answers.iter().all(|a| a.status == 200));
    let delayed = answers.iter().filter(|a| a.took >= Duration::from_millis(200)).count();
    // Binomial(400, 0.5): mean 200, standard deviation 10.
    assert!((150..=250).contains(&delayed), "{delayed} of 400 delayed, expected 200 ± 50");
    // The delay is made once: on the paused clock a delayed request takes 200 ms and nothing more.
    let longest = answers.iter().map(|a| a.took).max().unwrap();
    assert!(longest < Duration::from_millis(210), "a request took {longest:?}");
}

/// Every instance fails every request. Without a budget of its own (the default: 20% of the
/// requests in flight, at least 10) three clients get all their retries: 4 attempts each.
/// With 20% of ~3 requests in flight (at least 1) one retry runs at a time. With Linkerd's
/// kind of budget (20% of the requests over 10 s, plus 1 a second) retries stay within it.
#[tokio::test(start_paused = true)]
async fn a_retry_budget_bounds_retries_when_everything_fails() {
    let mesh = Mesh::start().await;
    let apps = [App::failing(|_| true).await, App::failing(|_| true).await, App::failing(|_| true).await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    let attempts = || apps.iter().map(App::answered).sum::<u32>();
    let n = 300;
    policy(&mesh, "retry: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 1ms}}").await;
    edge.wait_dump("retries in force", |d| d["routes"].to_string().contains("\"retries\":3")).await;
    let a0 = attempts();
    let statuses = client.statuses(&url, n, 3).await;
    assert!(statuses.iter().all(|s| *s == 503), "everything fails");
    assert_eq!(attempts() - a0, 4 * n as u32, "without a budget of its own every request is tried 4 times");

    policy(
        &mesh,
        "retry: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 1ms}, budget: {percent: 20, minRetryConcurrency: 1}}",
    )
    .await;
    edge.wait_dump("the budget in force", |d| d["clusters"]["backend"]["retry_limit"]["budget"]["min"] == 1).await;
    let a1 = attempts();
    client.statuses(&url, n, 3).await;
    let budgeted = f64::from(attempts() - a1) / n as f64;
    assert!(budgeted < 2.5, "{budgeted:.2} attempts per request with a 20% budget");

    policy(
        &mesh,
        "retry: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 1ms}, budget: {ratio: 0.2, minRetriesPerSecond: 1, ttl: 10s}}",
    )
    .await;
    edge.wait_config("/clusters/backend/retry_limit/ratio").await;
    let a2 = attempts();
    let started = tokio::time::Instant::now();
    client.statuses(&url, n, 3).await;
    let ratio = f64::from(attempts() - a2) / n as f64;
    // 20% of the requests, plus a reserve of 1 a second over the budget's 10 s.
    let allowed = 1.2 + started.elapsed().as_secs_f64().max(10.0) / n as f64;
    assert!(ratio <= allowed + 0.01, "{ratio:.3} attempts per request, the budget allows {allowed:.3}");
    assert!(ratio > 1.15, "{ratio:.3}: the budget's retries were not made");
}

/// `maxConnectionsPerInstance: 2` with `maxPendingRequests: 5`: of 20 requests of 300 ms
/// sent at once, two are served at a time over two connections, five wait their turn (the
/// last of them served at 1.2 s), and the other 13 are refused at once with `overflow`.
#[tokio::test(start_paused = true)]
async fn connections_per_instance_and_pending_requests_are_limited() {
    let mesh = Mesh::start().await;
    let apps = [App::scripted(Duration::from_millis(300), |_, count| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        200
    })
    .await];
    let (sidecars, edge) = backends(&mesh, &apps).await;
    policy(&mesh, "connectionPool: {maxConnectionsPerInstance: 2, maxPendingRequests: 5}").await;
    edge.wait_dump("limits in force", |d| d["clusters"]["backend"]["pool"]["max_connections_per_endpoint"] == 2).await;
    let before = accepted(&sidecars[0]).await;
    let answers = client().load(&edge.url("backend", "/"), 20, 20).await;
    let served: Vec<Duration> = answers.iter().filter(|a| a.status == 200).map(|a| a.took).collect();
    let refused: Vec<_> =
        answers.iter().filter(|a| a.status == 503 && a.headers["x-weft-error"] == "overflow").collect();
    assert_eq!(served.len(), 7, "{answers:?}");
    assert_eq!(refused.len(), 13, "{answers:?}");
    assert!(refused.iter().all(|a| a.took < Duration::from_millis(10)), "refusals waited: {refused:?}");
    assert!(served.iter().all(|t| *t < Duration::from_millis(1250)), "{served:?}");
    assert_eq!(accepted(&sidecars[0]).await - before, 2, "connections to the instance");
}

/// An instance that fails every request at once looks fastest to a latency-only balancer; with
/// the default balancer (P2C peak-EWMA), no outlier detection and no retries, it gets no more
/// than its fair share (a third) of 600 requests, the others answering in 5 ms.
#[tokio::test(start_paused = true)]
async fn a_fast_failing_instance_gets_no_more_than_its_share() {
    let mesh = Mesh::start().await;
    let ok_in_5ms = async || {
        App::scripted(Duration::from_millis(5), |_, count| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            200
        })
        .await
    };
    let apps = [ok_in_5ms().await, ok_in_5ms().await, App::failing(|_| true).await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    client().statuses(&edge.url("backend", "/"), 600, 4).await;
    let asked = apps[2].answered();
    assert!(asked <= 200, "the failing instance got {asked} of 600 requests, more than its third");
}

/// The README's retry example as written (`retry: {attempts: 2, retryOn: [5xx]}`, default
/// backoff and budget) with one of three instances failing every other request: eight
/// concurrent clients see no failure, with the default balancer and with round robin (which
/// sends the flaky instance its third).
#[tokio::test(start_paused = true)]
async fn the_readme_retry_example_hides_a_flaky_instance_under_concurrency() {
    let mesh = Mesh::start().await;
    let apps = [App::ok().await, App::ok().await, App::failing(|n| n.is_multiple_of(2)).await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    let url = edge.url("backend", "/");
    let client = client();
    policy(&mesh, "retry: {attempts: 2, retryOn: [5xx]}").await;
    edge.wait_dump("retries in force", |d| d["routes"].to_string().contains("\"retries\":2")).await;
    for balancer in ["default", "round-robin"] {
        if balancer == "round-robin" {
            mesh.apply(ROUND_ROBIN).await;
            edge.wait_dump("round robin", |d| d["clusters"]["backend"]["load_balancer"] == "round-robin").await;
        }
        let asked_before = apps[2].answered();
        let statuses = client.statuses(&url, 3000, 8).await;
        let failed = statuses.iter().filter(|s| **s != 200).count();
        let asked = apps[2].answered() - asked_before;
        assert_eq!(failed, 0, "{balancer}: {failed} of 3000 requests failed with the README's retry policy");
        assert!(asked > 0, "{balancer}: the flaky instance was never asked");
        if balancer == "round-robin" {
            assert!(asked > 600, "the flaky instance was asked {asked} times: the retries were not exercised");
        }
    }
}

/// A sidecar whose app is down answers `connect-failed`; the caller's sidecar sends the request
/// to another instance and, having read that short answer to its end, keeps its HTTP/1.1
/// connection to that sidecar: every refused request comes on the one connection (and its
/// mutual TLS session) instead of a new one each. Every client request succeeds.
#[tokio::test(start_paused = true)]
async fn a_sidecar_whose_app_is_down_is_asked_again_on_the_same_connection() {
    let mesh = Mesh::start().await;
    // Listening, so its sidecar starts healthy (one TCP health check, then none for an hour);
    // closed below, so the app refuses connections.
    let doomed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = App { addr: doomed.local_addr().unwrap(), count: Default::default() };
    let apps = [App::ok().await, down];
    let (sidecars, edge) = backends(&mesh, &apps).await;
    drop(doomed);
    let url = edge.url("backend", "/");
    let client = client();
    let refused = async || {
        sidecars[1].counter("weft_proxy_errors_total", &["direction=\"inbound\"", "reason=\"connect-failed\""]).await
    };
    // The caller avoids an instance for 2 s after each refusal: three take over 4 s.
    let mut statuses = Vec::new();
    while refused().await < 3 {
        assert!(statuses.len() < 2000, "the sidecar of the app that is down was asked {} times", refused().await);
        statuses.extend(client.statuses(&url, 10, 1).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(accepted(&sidecars[1]).await, 1, "the refused requests came on more than one connection");
}

/// With the control plane gone for an hour (on the paused clock), every proxy keeps serving
/// with the config it last accepted (endpoints, the retry policy, mutual TLS) and says it is
/// disconnected; the edge's retries still hide an instance that fails every other request.
#[tokio::test(start_paused = true)]
async fn proxies_keep_their_last_config_while_the_control_plane_is_away() {
    let mut mesh = Mesh::start().await;
    let apps = [App::ok().await, App::failing(|n| n.is_multiple_of(2)).await];
    let (_sidecars, edge) = backends(&mesh, &apps).await;
    policy(&mesh, "retry: {attempts: 2, retryOn: [5xx]}").await;
    edge.wait_dump("retries in force", |d| d["routes"].to_string().contains("\"retries\":2")).await;
    mesh.stop_control().await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let dump = edge.config_dump().await;
    assert_eq!(dump["control_plane_connected"], false, "{dump}");
    let asked = apps[1].answered();
    let statuses = client().statuses(&edge.url("backend", "/"), 200, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(apps[1].answered() > asked, "the flaky instance was dropped while the control plane was away");
}
