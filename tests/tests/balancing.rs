//! Load balancing choices of the `Service` resource, end to end: consistent hashing keeps a
//! key on one instance, and moves only the keys of an instance that leaves.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;
use weft_tests::*;

/// The instance (`x-served-by`) that answers a GET through 127.0.0.1:`port` with `header`.
fn served_by(port: u16, header: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nhost: backend\r\n{header}\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-served-by: ").map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no x-served-by in {answer:?}"))
}

/// The load balancer the edge applies to `backend`.
fn lb_in_force(edge: &Edge) -> String {
    let dump = get_json(&edge.admin(), "/config_dump").unwrap_or_default();
    dump["clusters"]["backend"]["load_balancer"].as_str().unwrap_or_default().to_owned()
}

/// Where each of `keys` goes (`x-user: <key>`), each asked twice: both answers must agree.
fn placement(port: u16, keys: &[String]) -> BTreeMap<String, String> {
    keys.iter()
        .map(|k| {
            let first = served_by(port, &format!("x-user: {k}"));
            assert_eq!(served_by(port, &format!("x-user: {k}")), first, "key {k} moved between two requests");
            (k.clone(), first)
        })
        .collect()
}

#[test]
fn ring_hash_and_maglev_keep_keys_on_one_instance_and_move_few_when_one_leaves() {
    let dir = TestDir::new("hashing");
    let control = Control::start(&dir);
    let mut instances: Vec<Instance> =
        (0..4).map(|i| Instance::start(&dir, &control.addr, "backend", "v1", &format!("b{i}"), &[])).collect();
    wait_until(Duration::from_secs(15), "4 healthy", || control.healthy_ids("backend").len() == 4);
    let edge = Edge::start(&dir, &control, &["backend"]);
    let port = edge.ports["backend"];
    let keys: Vec<String> = (0..200).map(|k| format!("user-{k}")).collect();

    // Without a key, ring hash picks at random; invalid combinations are refused at apply.
    let bad = dir.path.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {loadBalancer: ring-hash}\n",
    )
    .unwrap();
    let out = weft(&["apply", "-f", bad.to_str().unwrap(), "--control", &control.addr]);
    assert!(!out.status.success() && stderr(&out).contains("spec.consistentHash"), "{}", stderr(&out));

    apply_ok(
        &dir,
        &control.addr,
        "service.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {loadBalancer: maglev, consistentHash: {header: x-user}}\n",
    );
    wait_until(Duration::from_secs(5), "maglev in force", || lb_in_force(&edge) == "maglev");
    let maglev = placement(port, &keys);
    let used: std::collections::BTreeSet<&String> = maglev.values().collect();
    assert_eq!(used.len(), 4, "200 keys should reach all 4 instances: {used:?}");

    apply_ok(
        &dir,
        &control.addr,
        "service.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {loadBalancer: ring-hash, consistentHash: {header: x-user}}\n",
    );
    wait_until(Duration::from_secs(5), "ring hash in force", || lb_in_force(&edge) == "ring-hash");
    let before = placement(port, &keys);
    let mut load: BTreeMap<&String, usize> = BTreeMap::new();
    for v in before.values() {
        *load.entry(v).or_default() += 1;
    }
    assert!(load.len() == 4 && load.values().all(|n| (20..=90).contains(n)), "uneven spread over 4: {load:?}");

    // One of four leaves: its keys move to the others, the rest stay where they were.
    let mut leaving = instances.remove(3);
    let gone = leaving.id.clone();
    leaving.proc.stop();
    wait_until(Duration::from_secs(10), "3 endpoints at the edge", || edge.endpoint_addrs("backend").len() == 3);
    let after = placement(port, &keys);
    let moved_staying = keys.iter().filter(|k| before[*k] != gone && after[*k] != before[*k]).count();
    let moved = keys.iter().filter(|k| after[*k] != before[*k]).count();
    assert!(after.values().all(|v| *v != gone));
    let detail: Vec<String> = keys
        .iter()
        .filter(|k| before[*k] != gone && after[*k] != before[*k])
        .map(|k| format!("{k}: {} -> {}", before[k], after[k]))
        .collect();
    assert_eq!(moved_staying, 0, "keys of instances that stayed moved: {detail:?}");
    assert_eq!(moved, load[&gone], "exactly the leaving instance's keys moved (about 1/4)");
    eprintln!("ring hash: {moved} of {} keys moved when 1 of 4 instances left", keys.len());
}

/// With `locality: {preferSameZone: true}`, a caller in zone b sends to the instance in zone b
/// only; when that instance goes, to zone a's, without a failed request; a caller without a
/// zone uses every instance.
#[test]
fn locality_prefers_the_callers_zone_and_fails_over() {
    let dir = TestDir::new("locality");
    let control = Control::start(&dir);
    let _a1 = Instance::start(&dir, &control.addr, "backend", "v1", "a1", &["--label", "zone=a"]);
    let _a2 = Instance::start(&dir, &control.addr, "backend", "v1", "a2", &["--label", "zone=a"]);
    let mut b1 = Instance::start(&dir, &control.addr, "backend", "v1", "b1", &["--label", "zone=b"]);
    wait_until(Duration::from_secs(15), "3 healthy", || control.healthy_ids("backend").len() == 3);
    apply_ok(
        &dir,
        &control.addr,
        "service.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: backend}\nspec: {locality: {preferSameZone: true}}\n",
    );
    let in_b =
        Edge::start_with(&dir, &control.addr, &control.addr, "edge-b", "edge", &["backend"], &["--label", "zone=b"]);
    let anywhere = Edge::start(&dir, &control, &["backend"]);
    let spread = |edge: &Edge, n: usize| {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(served_by(edge.ports["backend"], "x-n: 1")).or_default() += 1;
        }
        seen
    };
    wait_until(Duration::from_secs(5), "zone b preferred", || spread(&in_b, 10).keys().eq(["b1"].iter()));
    let near = spread(&in_b, 60);
    assert_eq!(near.keys().collect::<Vec<_>>(), ["b1"], "a zone-b caller left its zone: {near:?}");
    let all = spread(&anywhere, 60);
    assert_eq!(all.len(), 3, "a caller without a zone should use every instance: {all:?}");
    // Zone b empties: its callers fail over to zone a.
    b1.proc.stop();
    wait_until(Duration::from_secs(10), "b1 gone at the edge", || in_b.endpoint_addrs("backend").len() == 2);
    let after = spread(&in_b, 40);
    assert!(after.keys().all(|k| k.starts_with('a')) && after.len() == 2, "{after:?}");
}
