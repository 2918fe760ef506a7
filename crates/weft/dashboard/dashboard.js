// The weft dashboard: everything comes from the control plane's read-only API, through the
// `weft dashboard` (or `weft up`) server, which adds the CLI's credential. Numbers refresh every
// two seconds; the rest every ten.
"use strict";

const FAST = 2000;
const SLOW = 10000;
const HISTORY = 60; // points of each service's series: two minutes
const POLICY_KINDS = ["authorizationpolicies", "requestauthentications", "trafficpolicies", "httproutes", "grpcroutes", "telemetries"];

const history = new Map(); // service → [{rps, success}]
let problems = new Map(); // what → message, shown in the header

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const ns = ["svg", "g", "line", "rect", "text", "polyline", "marker", "path", "defs", "title"].includes(tag) ? "http://www.w3.org/2000/svg" : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== undefined && c !== null) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function get(path) {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + msg);
  }
  return r.json();
}

/// Runs `f` now and every `ms`; a failure is shown in the header, not thrown.
function every(ms, what, f) {
  const tick = async () => {
    try {
      await f();
      problems.delete(what);
    } catch (e) {
      problems.set(what, e.message);
    }
    const p = $("problem");
    p.hidden = problems.size === 0;
    p.textContent = [...problems.values()].join("; ");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  };
  tick();
  setInterval(tick, ms);
}

function rows(tableId, list) {
  const body = $(tableId).tBodies[0];
  if (list.length === 0) {
    const columns = $(tableId).tHead.rows[0].cells.length;
    body.replaceChildren(el("tr", {}, el("td", { colspan: columns, class: "none" }, "none")));
    return;
  }
  body.replaceChildren(...list.map(cells => el("tr", {}, ...cells.map(c => c instanceof Node ? el("td", {}, c) : el("td", {}, c ?? "-")))));
}

const pct = v => (v === null || v === undefined) ? "-" : (v * 100).toFixed(2) + "%";
const ms = v => (v === null || v === undefined) ? "-" : v.toFixed(1) + " ms";
const rate = v => (v || 0).toFixed(1);

function spark(values, max) {
  const top = max ?? Math.max(1e-9, ...values);
  const pts = values.map((v, i) => `${(i / (HISTORY - 1)) * 120},${24 - (v / top) * 22 - 1}`).join(" ");
  return el("svg", { class: "spark", viewBox: "0 0 120 24" }, el("polyline", { points: pts }));
}

function drawGraph(services, edges) {
  const svg = $("graph");
  const names = new Set(services.map(s => s.name));
  for (const e of edges) { names.add(e.from); names.add(e.to); }
  // Columns by distance from the callers nobody calls (the gateway, usually).
  const called = new Set(edges.map(e => e.to));
  const depth = new Map();
  const queue = [...names].filter(n => !called.has(n)).map(n => [n, 0]);
  for (const [n, d] of queue) {
    if (depth.has(n)) continue;
    depth.set(n, d);
    for (const e of edges.filter(e => e.from === n)) queue.push([e.to, d + 1]);
  }
  for (const n of names) if (!depth.has(n)) depth.set(n, 0);
  const columns = new Map();
  for (const n of [...names].sort()) {
    const d = depth.get(n);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  // Wide enough between columns for an edge's label.
  const width = Math.max(900, columns.size * 360);
  svg.setAttribute("viewBox", `0 0 ${width} 320`);
  const pos = new Map();
  for (const [d, col] of columns) {
    col.forEach((n, i) => pos.set(n, { x: 110 + d * 360, y: (320 / (col.length + 1)) * (i + 1) }));
  }
  const defs = el("defs", {}, el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse" }, el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8b95a8" })));
  const parts = [defs];
  const labels = [];
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    const failing = e.success_rate !== null && e.success_rate < 0.99;
    const label = `${rate(e.rps)} rps · ${pct(e.success_rate)} · ${e.mtls ? "mTLS" : "plaintext"}`;
    // Lines under the nodes, labels over everything.
    parts.push(el("g", { class: "edge" + (failing ? " failing" : "") },
      el("line", { x1: a.x + 70, y1: a.y, x2: b.x - 72, y2: b.y, "marker-end": "url(#arrow)" })));
    labels.push(el("g", { class: "edge", id: `edge-${e.from}-${e.to}`, "data-from": e.from, "data-to": e.to, "data-rps": rate(e.rps), "data-success": e.success_rate ?? "", "data-mtls": e.mtls },
      el("text", { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 8 }, label)));
  }
  for (const [n, p] of pos) {
    parts.push(el("g", { class: "node", id: `node-${n}` },
      el("rect", { x: p.x - 70, y: p.y - 16, width: 140, height: 32 }),
      el("text", { x: p.x, y: p.y }, n)));
  }
  svg.replaceChildren(...parts, ...labels);
}

async function fast() {
  const [services, stat, edges] = await Promise.all([
    get("/api/v1/services"),
    get("/api/v1/stat/services?window=1m"),
    get("/api/v1/stat/edges?window=1m"),
  ]);
  const byName = new Map(stat.rows.map(r => [r.name, r]));
  for (const s of services) {
    const r = byName.get(s.name);
    const h = history.get(s.name) || [];
    h.push({ rps: r ? r.rps : 0, success: r && r.success_rate !== null ? r.success_rate : 1 });
    while (h.length > HISTORY) h.shift();
    history.set(s.name, h);
  }
  rows("services", services.map(s => {
    const r = byName.get(s.name) || {};
    const h = history.get(s.name);
    return [s.name, `${s.healthy}/${s.instances}`, pct(r.success_rate), rate(r.rps), ms(r.latency_ms_p50), ms(r.latency_ms_p99), spark(h.map(p => p.rps)), spark(h.map(p => p.success), 1)];
  }));
  drawGraph(services, edges.rows);
  const select = $("tap-service");
  const known = [...select.options].map(o => o.value).join();
  if (known !== services.map(s => s.name).join()) {
    const chosen = select.value;
    select.replaceChildren(...services.map(s => el("option", { value: s.name }, s.name)));
    if (chosen) select.value = chosen;
  }
}

async function slow() {
  const [services, proxies, certs, checks, ...policies] = await Promise.all([
    get("/api/v1/services"),
    get("/api/v1/proxies"),
    get("/api/v1/certificates"),
    get("/api/v1/check"),
    ...POLICY_KINDS.map(k => get("/api/v1/resources/" + k)),
  ]);
  const endpoints = await Promise.all(services.map(s => get(`/api/v1/services/${encodeURIComponent(s.name)}/endpoints`)));
  const proxyOf = new Map(proxies.map(p => [p.node, p]));
  rows("instances", endpoints.flat().map(i => {
    const p = proxyOf.get(i.id);
    const sidecar = !i.connected ? el("span", { class: "bad" }, "disconnected")
      : p && Object.keys(p.rejecting || {}).length ? el("span", { class: "bad" }, "rejecting config")
      : el("span", { class: "ok" }, "in sync");
    const health = el("span", { class: i.healthy ? "ok" : "bad" }, i.healthy ? "healthy" : "unhealthy");
    return [i.id, i.registration.service, (i.registration.labels || {}).version, health, sidecar];
  }));
  rows("proxies", proxies.map(p => {
    const nacks = Object.entries(p.rejecting || {});
    const config = nacks.length ? el("span", { class: "bad", title: nacks.map(([, m]) => m).join("\n") }, "NACK: " + nacks.map(([t]) => t.split(".").pop()).join(", "))
      : el("span", { class: "ok" }, `${Object.keys(p.acked || {}).length} types acked`);
    const bundle = p.weft ? (p.trustBundle ? "received" : el("span", { class: "warn" }, "pending")) : "-";
    return [p.node, p.service, config, bundle];
  }));
  const now = Date.now() / 1000;
  rows("certs", certs.sort((a, b) => a.notAfter - b.notAfter).map(c => {
    const left = c.notAfter - now;
    const life = Math.max(1, c.notAfter - c.notBefore);
    const cls = left <= 0 ? "bad" : left < life / 4 ? "warn" : "ok";
    const text = left <= 0 ? "expired" : left > 7200 ? (left / 3600).toFixed(1) + " h" : Math.round(left / 60) + " min";
    return [c.instance, c.identity, el("span", { class: cls }, text)];
  }));
  rows("policies", policies.flat().map(r => {
    const s = r.spec || {};
    const target = s.service || (s.targetRef && s.targetRef.name) || (s.parentRefs && s.parentRefs.map(p => p.name).join(", ")) || "the whole mesh";
    return [r.kind, r.metadata.name, target];
  }));
  const list = checks.checks || [];
  const worst = list.some(c => c.status === "fail") ? "fail" : list.some(c => c.status === "warn") ? "warn" : "ok";
  const badge = $("health");
  badge.className = "badge " + worst;
  badge.textContent = { ok: "all checks pass", warn: "warnings", fail: "checks failing" }[worst];
  rows("checks", list.map(c => [el("span", { class: c.status }, c.status), c.name, c.detail + (c.fix ? " — " + c.fix : "")]));
}

// The live tap: one request per row, newest first.
let tapping = null;

async function startTap(ev) {
  ev.preventDefault();
  stopTap();
  const service = $("tap-service").value;
  if (!service) return;
  const q = new URLSearchParams({ service });
  const path = $("tap-path").value.trim();
  if (path) q.set("path", path);
  const ctrl = new AbortController();
  tapping = ctrl;
  $("tap-start").disabled = true;
  $("tap-stop").disabled = false;
  $("tap-status").textContent = "tapping " + service + "…";
  const body = $("tap").tBodies[0];
  body.replaceChildren();
  try {
    const r = await fetch("/api/v1/tap?" + q, { signal: ctrl.signal });
    if (!r.ok) throw new Error((await r.json()).error || r.statusText);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        const e = JSON.parse(line);
        if (e.dropped !== undefined) {
          if (e.dropped) $("tap-status").textContent = `tapping ${service}… (${e.dropped} not shown: over the rate)`;
          continue;
        }
        const status = el("span", { class: e.status >= 500 || e.status === 0 ? "bad" : "ok" }, e.status + (e.grpc_status !== null ? " grpc " + e.grpc_status : "") + (e.error ? " " + e.error : ""));
        body.prepend(el("tr", {},
          el("td", {}, new Date(e.time_ms).toLocaleTimeString()),
          el("td", {}, `${e.proxy} (${e.direction})`),
          el("td", {}, `${e.method} ${e.authority || ""}${e.path}`),
          el("td", {}, status),
          el("td", {}, ms(e.latency_ms)),
          el("td", {}, `${e.src_service || "?"} → ${e.dst_service}${e.mtls ? " (mTLS)" : ""}`)));
        while (body.rows.length > 100) body.deleteRow(-1);
      }
    }
    $("tap-status").textContent = "tap ended";
  } catch (e) {
    if (e.name !== "AbortError") $("tap-status").textContent = "tap failed: " + e.message;
  } finally {
    if (tapping === ctrl) {
      tapping = null;
      $("tap-start").disabled = false;
      $("tap-stop").disabled = true;
    }
  }
}

function stopTap() {
  if (tapping) {
    tapping.abort();
    $("tap-status").textContent = "stopped";
  }
}

$("tap-form").addEventListener("submit", startTap);
$("tap-stop").addEventListener("click", stopTap);
every(FAST, "traffic", fast);
every(SLOW, "mesh state", slow);
