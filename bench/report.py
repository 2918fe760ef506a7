#!/usr/bin/env python3
"""Turns bench/run's raw figures into the markdown report.

Usage: report.py RAW.tsv META.md WARNINGS "CONFIG CONFIG ..."

RAW.tsv has one figure per line: round, configuration, metric, value. For every metric the
report gives each configuration's median over the rounds, the min–max, the ratio of the median
to direct's median, and the ratio to the best peer (the better of HAProxy and nginx with the
same number of hops and the same transport between the hops).
"""
import statistics
import sys
from collections import defaultdict

# The figures a comparison of two configurations shows, with their labels.
COMPARED = [("cpu_0", "proxy CPU per request, 0 B"), ("cpu_1k", "proxy CPU per request, 1 KB"),
            ("cpu_64k", "proxy CPU per request, 64 KB"), ("lat_fixed_p50", "latency p50 at the fixed rate"),
            ("lat_fixed_p99", "latency p99 at the fixed rate"), ("lat_half_p50", "latency p50 at 50%"),
            ("lat_half_p99", "latency p99 at 50%")]

# Peer groups: which HAProxy/nginx configurations a row is compared with.
PEERS = {
    "weft-1hop": ["haproxy-1hop", "nginx-1hop"],
    "haproxy-1hop": ["haproxy-1hop", "nginx-1hop"],
    "nginx-1hop": ["haproxy-1hop", "nginx-1hop"],
    "weft-2hop": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-1hop-base": ["haproxy-1hop", "nginx-1hop"],
    "weft-2hop-base": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-capture": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-netns": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-capture-nat": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-dc": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-dc-local": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-policy": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-logs": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-trace0": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-trace1": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "weft-2hop-trace100": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "haproxy-2hop-plain": ["haproxy-2hop-plain", "nginx-2hop-plain"],
    "nginx-2hop-plain": ["haproxy-2hop-plain", "nginx-2hop-plain"],
    "haproxy-2hop-tls": ["haproxy-2hop-tls", "nginx-2hop-tls"],
    "nginx-2hop-tls": ["haproxy-2hop-tls", "nginx-2hop-tls"],
}

# key, title, unit, higher is better, is a latency (show added µs), scale, decimals, why n/a for direct
METRICS = [
    ("rps_h1_0", "HTTP/1.1 throughput at saturation, 0 B body (wrk)", "req/s", True, False, 1, 0, None),
    ("rps_h1_1k", "HTTP/1.1 throughput at saturation, 1 KB body (wrk)", "req/s", True, False, 1, 0, None),
    ("rps_h1_64k", "HTTP/1.1 throughput at saturation, 64 KB body (wrk)", "req/s", True, False, 1, 0, None),
    ("rps_h2_1k", "HTTP/2 (h2c) throughput at saturation, 1 KB body (h2load)", "req/s", True, False, 1, 0, None),
    ("lat_fixed_p50", "Latency p50 at the first fixed rate, 1 KB (oha)", "µs", False, True, 1, 0, None),
    ("lat_fixed_p99", "Latency p99 at the first fixed rate, 1 KB (oha)", "µs", False, True, 1, 0, None),
    ("lat_fixed_p999", "Latency p99.9 at the first fixed rate, 1 KB (oha)", "µs", False, True, 1, 0, None),
    ("lat_half_p50", "Latency p50 at 50% of the slowest saturation rate, 1 KB (oha)", "µs", False, True, 1, 0, None),
    ("lat_half_p99", "Latency p99 at 50% of the slowest saturation rate, 1 KB (oha)", "µs", False, True, 1, 0, None),
    ("lat_half_p999", "Latency p99.9 at 50% of the slowest saturation rate, 1 KB (oha)", "µs", False, True, 1, 0, None),
    ("cpu_0", "Proxy CPU time per request, 0 B (utime+stime of all proxy processes / requests)", "µs/req", False, False, 1, 1, "— (no proxy)"),
    ("cpu_1k", "Proxy CPU time per request, 1 KB", "µs/req", False, False, 1, 1, "— (no proxy)"),
    ("cpu_64k", "Proxy CPU time per request, 64 KB", "µs/req", False, False, 1, 1, "— (no proxy)"),
    ("cpu1_1k", "Whole proxy CPU (app + proxies + kernel softirq) busy time per request, 1 KB", "µs/req", False, False, 1, 1, None),
    ("rss_idle", "Proxy RSS, idle after startup (sum over the configuration's proxy processes)", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
    ("rss_conns", "Proxy RSS with idle keep-alive client connections held open", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
    ("rss_load", "Proxy RSS under load (peak of 0.5 s samples during the wrk runs)", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
    ("rss_idle_max", "Largest single proxy process RSS, idle after startup (per sidecar)", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
    ("rss_conns_max", "Largest single proxy process RSS with idle keep-alive client connections held open (per sidecar)", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
    ("rss_idle_anon", "Proxy anonymous RSS (heap, stacks; RssAnon), idle after startup", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
    ("rss_conns_anon", "Proxy anonymous RSS with idle keep-alive client connections held open", "MB", False, False, 1 / 1024, 1, "— (no proxy)"),
]

SUMMARY = [
    ("rps_h1_0", "h1 0 B req/s"),
    ("rps_h1_1k", "h1 1 KB req/s"),
    ("rps_h1_64k", "h1 64 KB req/s"),
    ("rps_h2_1k", "h2 1 KB req/s"),
    ("lat_fixed_p99", "p99 µs @fixed"),
    ("lat_half_p99", "p99 µs @50%"),
    ("cpu_1k", "proxy CPU µs/req 1 KB"),
    ("rss_idle", "RSS idle MB"),
    ("rss_conns", "RSS 1k conns MB"),
    ("rss_load", "RSS load MB"),
]


GROUP_NAMES = {
    "h1_0": "wrk 0 B",
    "h1_1k": "wrk 1 KB",
    "h1_64k": "wrk 64 KB",
    "h2_1k": "h2load",
    "lat_fixed": "oha at the fixed rate",
    "lat_half": "oha at 50%",
}


def run_group(metric):
    """The load run a figure comes from, as bench/run names it when it flags a disturbed run."""
    for prefix in ("rps_", "cpu1_", "cpu_"):
        if metric.startswith(prefix):
            rest = metric[len(prefix):]
            return rest if rest.startswith("h") else "h1_" + rest
    if metric.startswith("lat_"):
        return metric.rsplit("_", 1)[0]
    return None


def fmt(v, decimals):
    if v is None:
        return "n/a"
    return f"{v:,.{decimals}f}"


def main():
    raw, meta, warnings, configs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
    rounds = defaultdict(list)  # (config, metric) -> [(round, value)]
    disturbed = set()  # (round, config, group): runs during which others used the proxy CPU
    for line in open(raw):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 4:
            continue
        rnd, cfg, metric, value = parts
        if metric == "disturbed":
            disturbed.add((rnd, cfg, value))
            continue
        try:
            rounds[(cfg, metric)].append((rnd, float(value)))
        except ValueError:
            pass
    # A disturbed run's figures are left out when another round of the same figure is clean.
    data, dropped, tainted = {}, [], set()
    for (cfg, metric), vals in rounds.items():
        group = run_group(metric)
        clean = [v for r, v in vals if (r, cfg, group) not in disturbed]
        if clean and len(clean) < len(vals):
            dropped += [(cfg, r, group) for r, _ in vals if (r, cfg, group) in disturbed]
        if not clean and group:
            tainted.add((cfg, metric))  # every round disturbed: shown, marked with *
        data[(cfg, metric)] = clean or [v for _, v in vals]
    steal = [v for (c, m), vals in rounds.items() if m == "steal_pct" for _, v in vals]
    rows = list(configs)

    def med(cfg, key, scale=1):
        v = data.get((cfg, key))
        return statistics.median(v) * scale if v else None

    out = []
    out.append("# weft data-plane benchmark: weft vs HAProxy vs nginx (loopback)\n")
    out.append(open(meta).read().rstrip())
    if steal:
        out.append(f"- hypervisor steal during the load runs: median {statistics.median(steal):.0f}%, "
                   f"max {max(steal):.0f}% of CPU time (runs above the threshold are flagged below)")
    out.append("")
    out.append(
        "\nEach cell: median over the rounds; min–max across rounds; ratios are of medians. "
        "`× direct` = this ÷ direct (client → app, no proxy). `× best peer` = this ÷ the better of "
        "HAProxy and nginx with the same hop count and the same transport between hops "
        "(weft-2hop runs mutual TLS 1.3 between its sidecars, as the `-tls` peers do between their two "
        "proxies; the `-plain` peers are plaintext between the hops). For throughput higher is better; for latency, CPU and RSS lower is better.\n"
    )

    # Summary
    out.append("\n## Summary (medians)\n")
    out.append("| configuration | " + " | ".join(t for _, t in SUMMARY) + " |")
    out.append("|---|" + "---:|" * len(SUMMARY))
    spec = {m[0]: m for m in METRICS}
    for cfg in rows:
        cells = []
        for key, _ in SUMMARY:
            _, _, _, _, _, scale, dec, na_direct = spec[key]
            v = med(cfg, key, scale)
            mark = "*" if (cfg, key) in tainted else ""
            cells.append(fmt(v, dec) + mark if v is not None else ("—" if (cfg == "direct" and na_direct) else "n/a"))
        out.append(f"| {cfg} | " + " | ".join(cells) + " |")

    for key, title, unit, higher, latency, scale, dec, na_direct in METRICS:
        if not any(data.get((c, key)) for c in configs):
            continue
        out.append(f"\n## {title}\n")
        head = f"| configuration | median ({unit}) | min–max | × direct |"
        if latency:
            head += " added vs direct (µs) |"
        head += " × best peer |"
        out.append(head)
        out.append("|---|---:|---:|---:|" + ("---:|" if latency else "") + "---|")
        direct = med("direct", key, scale)
        for cfg in rows:
            ncols = 5 if latency else 4
            vals = data.get((cfg, key))
            if not vals:
                why = na_direct if (cfg == "direct" and na_direct) else "n/a"
                out.append(f"| {cfg} | {why} |" + " |" * (ncols - 1))
                continue
            m = statistics.median(vals) * scale
            lo, hi = min(vals) * scale, max(vals) * scale
            mark = "*" if (cfg, key) in tainted else ""
            cells = [fmt(m, dec) + mark, f"{fmt(lo, dec)}–{fmt(hi, dec)}"]
            cells.append(f"{m / direct:.2f}" if direct else "—")
            if latency:
                cells.append(f"{m - direct:+,.0f}" if direct is not None else "—")
            peers = [(p, med(p, key, scale)) for p in PEERS.get(cfg, [])]
            peers = [(p, v) for p, v in peers if v]
            if peers:
                best = max(peers, key=lambda x: x[1]) if higher else min(peers, key=lambda x: x[1])
                cells.append(f"{m / best[1]:.2f} (vs {best[0]})")
            else:
                cells.append("—")
            out.append(f"| {cfg} | " + " | ".join(cells) + " |")
        if key.startswith("lat_"):
            # Achieved rate and success rate, so a generator that could not keep up is visible.
            prefix = key.rsplit("_", 1)[0]
            notes = []
            for cfg in configs:
                r, s = med(cfg, prefix + "_rps"), med(cfg, prefix + "_success")
                if r is not None:
                    notes.append(f"{cfg} {r:,.0f} req/s" + ("" if s is None or s >= 0.9999 else f" ({s:.2%} ok)"))
            if notes and key.endswith("p50"):
                out.append("\nAchieved rate (median): " + "; ".join(notes) + ".")

    # This build against the baseline build (BENCH_BASELINE), measured in the same rounds.
    pairs = [(c, c + "-base") for c in ("weft-1hop", "weft-2hop") if c in configs and c + "-base" in configs]
    # What a route with retries and a timeout costs, against the same set-up without policy.
    for extra in ("weft-2hop-policy", "weft-2hop-logs", "weft-2hop-trace0", "weft-2hop-trace1", "weft-2hop-trace100"):
        if extra in configs and "weft-2hop" in configs:
            pairs.append((extra, "weft-2hop"))
    if pairs:
        out.append("\n## This build vs the baseline build, and policy vs none (same run)\n")
        out.append("Ratio of medians, first ÷ second: below 1.00 is better for CPU and RSS, "
                   "above 1.00 is better for throughput.\n")
        keys = ["cpu_0", "cpu_1k", "cpu_64k", "rps_h1_1k", "rps_h2_1k", "rss_idle", "rss_conns", "rss_load",
                "rss_idle_anon", "rss_conns_anon"]
        out.append("| figure | " + " | ".join(f"{c} ÷ {b}" for c, b in pairs) + " |")
        out.append("|---|" + "---:|" * len(pairs))
        for key in keys:
            cells = []
            for c, b in pairs:
                x, y = med(c, key), med(b, key)
                cells.append(f"{x / y:.3f} ({fmt(x * spec[key][5], spec[key][6])} vs {fmt(y * spec[key][5], spec[key][6])})"
                             if x and y else "n/a")
            out.append(f"| {spec[key][1].split(' (')[0]} | " + " | ".join(cells) + " |")

    # Issue 21: what transparent capture adds to a call (same rounds, same inbound side), and
    # what the instance's namespace adds apart from capture (weft-2hop-netns: the same
    # namespace and sidecar, explicit ports on its loopback).
    if "weft-2hop-capture" in configs and "weft-2hop" in configs:
        netns = "weft-2hop-netns" in configs
        out.append("\n## Transparent capture vs explicit ports (weft-2hop-capture vs weft-2hop"
                   + (" and weft-2hop-netns" if netns else "") + ")\n")
        out.append("explicit: weft-2hop (the caller on this host's loopback); "
                   + ("explicit in netns: weft-2hop-netns (the caller's sidecar in the instance's namespace, "
                      "called on its explicit ports there: the namespace and veth hop without capture); " if netns else "")
                   + "capture: weft-2hop-capture (the same namespace, called by name from the app's cgroup, redirected "
                   "at connect()). "
                   "Target: capture's proxy CPU within 5% of the explicit path's.\n")
        head = "| figure | explicit | " + ("explicit in netns | " if netns else "") + "capture | capture ÷ explicit | " \
            + ("capture ÷ explicit in netns | " if netns else "") + "added by capture |"
        out.append(head)
        out.append("|---" + "|---:" * (head.count("|") - 2) + "|")
        for key, label in COMPARED:
            x, y = med("weft-2hop-capture", key), med("weft-2hop", key)
            z = med("weft-2hop-netns", key) if netns else None
            if not (x and y):
                continue
            unit, d = spec[key][2], spec[key][6]
            base = z if netns and z else y
            cells = [f"{fmt(y, d)} {unit}"] + ([f"{fmt(z, d)} {unit}" if z else "n/a"] if netns else []) \
                + [f"{fmt(x, d)} {unit}", f"{x / y:.3f}"] + ([f"{x / z:.3f}" if z else "n/a"] if netns else []) \
                + [f"{x - base:+.1f} {unit}"]
            out.append(f"| {label} | " + " | ".join(cells) + " |")

    def side_by_side(title, intro, names, x_cfg, y_cfg, added):
        """One weft configuration (x) against another (y), figure by figure."""
        if x_cfg not in configs or y_cfg not in configs:
            return
        out.append(f"\n## {title}\n")
        out.append(intro + "\n")
        out.append(f"| figure | {names[1]} | {names[0]} | {names[0]} ÷ {names[1]} | {added} |")
        out.append("|---|---:|---:|---:|---:|")
        for key, label in COMPARED:
            x, y = med(x_cfg, key), med(y_cfg, key)
            if not (x and y):
                continue
            unit, d = spec[key][2], spec[key][6]
            out.append(f"| {label} | {fmt(y, d)} {unit} | {fmt(x, d)} {unit} | {x / y:.3f} | {x - y:+.1f} {unit} |")

    # Issue 21: what is not the app's (outside its cgroup) is captured by the nat rule instead.
    side_by_side("Captured by the nat rule vs at connect() (weft-2hop-capture-nat vs weft-2hop-capture)",
                 "at connect(): weft-2hop-capture (the generators in the app's cgroup); nat: weft-2hop-capture-nat "
                 "(the same namespace, outside the app's cgroup: iptables' nat REDIRECT, translated per packet).",
                 ("nat", "at connect()"), "weft-2hop-capture-nat", "weft-2hop-capture", "added by the nat rule")
    # Issue 23: a call to another datacenter through its mesh gateway against a local call.
    side_by_side("Another datacenter through its mesh gateway vs the local call (weft-2hop-dc vs weft-2hop)",
                 "local: weft-2hop (caller's sidecar → app's sidecar); across: weft-2hop-dc (caller's sidecar in DC1 "
                 "→ DC2's mesh gateway, passing the mutual TLS through → app's sidecar in DC2). Proxy CPU counts "
                 "the gateway too.", ("across", "local"), "weft-2hop-dc", "weft-2hop", "added by the gateway")
    # Issue 23, local mode: through the caller's own datacenter's mesh gateway as well.
    side_by_side("Local mode: through DC1's own mesh gateway too (weft-2hop-dc-local vs weft-2hop-dc)",
                 "remote: weft-2hop-dc (DC1's caller straight to DC2's mesh gateway); local: weft-2hop-dc-local "
                 "(DC1's caller → DC1's mesh gateway → DC2's → app's sidecar). Proxy CPU counts both gateways.",
                 ("local", "remote"), "weft-2hop-dc-local", "weft-2hop-dc", "added by DC1's gateway")

    warns = [w for w in open(warnings).read().splitlines() if w.strip()]
    out.append("\n## Warnings during the run\n")
    out.append("\n".join(f"- {w}" for w in warns) if warns else "none")
    if tainted:
        out.append("\n\\* every round of this figure was disturbed (see the warnings): do not rely on it.")
    if dropped:
        runs = defaultdict(set)
        for cfg, rnd, group in dropped:
            runs[(cfg, rnd)].add(group)
        order = list(GROUP_NAMES)
        items = [f"{cfg} round {rnd} ({', '.join(GROUP_NAMES[g] for g in sorted(gs, key=order.index))})"
                 for (cfg, rnd), gs in sorted(runs.items())]
        out.append("\nLeft out of the medians as disturbed, because a clean round of the same figure exists: "
                   + "; ".join(items) + ".")
    print("\n".join(out))


if __name__ == "__main__":
    main()
