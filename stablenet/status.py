"""The status page: one self-contained HTML document (no build step, no external assets) that
polls the admin API once a second and shows services, endpoints, health and recent events.
Readable on a phone. A token, when the admin API needs one, is taken from the page's
#token=... fragment and sent as a bearer token."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>stablenet</title>
<style>
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --dim: #6e7781; }
body { font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; padding: 12px; }
header { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: baseline; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 16px; margin: 18px 0 6px; }
.pill { border-radius: 10px; padding: 1px 8px; font-size: 13px; color: #fff; white-space: nowrap; }
.ready { background: var(--ok); } .starting, .draining { background: var(--warn); }
.unhealthy, .lost { background: var(--bad); } .synced { background: var(--ok); }
.dim { color: var(--dim); font-size: 13px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px 4px 0; border-bottom: 1px solid #8883; vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; color: var(--dim); }
code { font-size: 13px; }
#events li { margin: 2px 0; }
.problems { color: var(--bad); }
@media (max-width: 600px) {
  thead { display: none; }
  tr { display: block; border-bottom: 1px solid #8886; padding: 4px 0; }
  td { display: block; border: 0; padding: 1px 0; }
  td[data-k]::before { content: attr(data-k) ": "; color: var(--dim); font-size: 12px; }
}
</style>
</head>
<body>
<header>
  <h1>stablenet</h1>
  <span id="sync" class="pill lost">connecting</span>
  <span class="dim" id="meta"></span>
</header>
<main>
  <div id="services"><p class="dim">Loading...</p></div>
  <div id="problems" class="problems"></div>
  <h2>Recent events</h2>
  <ul id="events" class="dim"></ul>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
let lastSeq = 0;
const events = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}
function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d";
}
function health(ep) {
  const h = ep.health || {};
  const parts = [];
  if (h.check) parts.push(h.check.type + (h.check.path ? " " + h.check.path : "") + " every " + h.check.interval + "s");
  if (h.docker) parts.push("docker: " + h.docker);
  if (h.last) parts.push("last: " + h.last.reason + " at " + new Date(h.last.at * 1000).toLocaleTimeString());
  return parts.join("; ") || "no check (passive only)";
}
function managed(name, c) {
  const parts = [c.desired === null ? "heal only" : c.ready + " of " + c.desired + " replicas ready",
    "heal: " + c.heal];
  if (c.held.length) parts.push("stopped by the operator: " + c.held.join(", "));
  if (c.autoscale) parts.push("autoscaled " + c.autoscale.min + "-" + c.autoscale.max +
    (c.autoscale.panic ? " (panic)" : "") + ": " + c.autoscale.reason);
  if (c.last_action) parts.push("last: " + c.last_action.action + " " + c.last_action.target +
    " (" + c.last_action.reason + "): " + c.last_action.result);
  if (c.next_retry_at) parts.push("next retry in " + age(c.next_retry_at - Date.now() / 1000));
  const line = el("p", { class: "dim", "data-managed": name }, "managed: " + parts.join("; "));
  for (const key of ["degraded", "refused", "problem"]) {
    if (c[key]) line.append(el("br"), el("span", { class: "problems", ["data-" + key]: "" }, key + ": " + c[key]));
  }
  return line;
}
function renderServices(body) {
  const sync = document.getElementById("sync");
  sync.textContent = body.synced ? "synced with Docker" : "Docker unreachable: last known state";
  sync.className = "pill " + (body.synced ? "synced" : "lost");
  if (body.cluster) sync.textContent += "; cluster host " + body.cluster.host + ", etcd " + body.cluster.etcd;
  document.getElementById("meta").textContent =
    body.services.length + " services, registry version " + body.version;
  const root = document.getElementById("services");
  root.replaceChildren();
  if (!body.services.length) root.append(el("p", { class: "dim" }, "No services registered."));
  for (const svc of body.services) {
    const vip = svc.vip ? el("code", { "data-vip": svc.vip.address }, " " + svc.vip.address + " (" + svc.vip.path + ") ") : "";
    root.append(el("h2", { "data-service": svc.name }, svc.name + " ", vip,
      el("span", { class: "dim" }, svc.ready + " of " + svc.endpoints.length + " ready")));
    if (svc.controller) root.append(managed(svc.name, svc.controller));
    const tbody = el("tbody");
    for (const ep of svc.endpoints) {
      const where = ep.port ? ep.address + ":" + ep.port : ep.address;
      tbody.append(el("tr", { "data-endpoint": ep.name, "data-state": ep.state },
        el("td", { "data-k": "endpoint" }, ep.host ? ep.name + " @ " + ep.host : ep.name),
        el("td", { "data-k": "address" }, el("code", {}, where)),
        el("td", { "data-k": "state" }, el("span", { class: "pill " + ep.state }, ep.state)),
        el("td", { "data-k": "why" }, ep.reason),
        el("td", { "data-k": "health", class: "dim" }, health(ep)),
        el("td", { "data-k": "age" }, age(ep.age_seconds))));
    }
    const head = el("thead", {}, el("tr", {}, ...["endpoint", "address", "state", "why", "health", "age"].map(t => el("th", {}, t))));
    root.append(el("table", {}, head, tbody));
  }
  const problems = document.getElementById("problems");
  problems.replaceChildren(...(body.problems || []).map(p => el("p", {}, "skipped: " + p.message)));
}
function renderEvents() {
  const list = document.getElementById("events");
  list.replaceChildren(...events.slice(-50).reverse().map(e =>
    el("li", { "data-kind": e.kind }, new Date(e.at * 1000).toLocaleTimeString() + " ",
      (e.endpoint ? e.service + "/" + e.endpoint + ": " : e.service ? e.service + ": " : "") + e.message)));
}
async function tick() {
  try {
    const [services, news] = await Promise.all([
      fetch("v1/services", { headers }).then(r => { if (!r.ok) throw new Error(r.status); return r.json(); }),
      fetch("v1/events?since=" + lastSeq, { headers }).then(r => r.ok ? r.json() : { events: [] }),
    ]);
    renderServices(services);
    for (const e of news.events) { events.push(e); lastSeq = Math.max(lastSeq, e.seq); }
    if (events.length > 500) events.splice(0, events.length - 500);
    renderEvents();
  } catch (err) {
    const sync = document.getElementById("sync");
    sync.textContent = "admin API unreachable (" + err.message + ")";
    sync.className = "pill lost";
  }
}
tick();
setInterval(tick, 1000);
</script>
</body>
</html>
"""
