// meshd dashboard: plain DOM, no framework, no external assets (works on a gateway offline).
// Views are redrawn from the API (GET /v1/status, /v1/members, /v1/rollout, /v1/releases,
// /v1/health?summary=site) on member, health and release events (debounced) and every 5 s;
// the charts are fed by the `stats` events of GET /v1/events (cumulative counters every 2 s).
"use strict";

const $ = (id) => document.getElementById(id);
const STATES = ["alive", "suspect", "dead", "left"];
const HEALTHS = ["passing", "warning", "critical", "unknown"];
const CHART_SPAN_S = 300;
const MAX_EVENTS = 300;

const view = {
  members: [],
  failing: {}, // node name -> [check names] from the health summary
  missing: new Set(), // alive nodes that did not answer the health summary
  open: null, // the member whose checks are shown
  openChecks: null,
  stats: [], // raw stats events, last CHART_SPAN_S seconds
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function fmtRate(n) { return `${fmtBytes(n)}/s`; }
function fmtMs(n) { return n === null || n === undefined ? "–" : `${n < 10 ? n.toFixed(2) : n.toFixed(0)} ms`; }

async function getJSON(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

// --- header, sites and members --------------------------------------------------------------

function renderStatus(status) {
  $("node").textContent = `${status.name} · ${status.addr} · cluster ${status.cluster} · ` +
    `site ${status.site} · v${status.version} · up ${fmtUptime(status.uptime_s)}`;
  $("counts").replaceChildren(...STATES.map((s) =>
    el("span", { class: s, text: `${status.members[s]} ${s}`, "data-count": s })));
}

function fmtUptime(s) {
  s = Math.round(s);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${Math.floor(s / 3600)}h${String(Math.round((s % 3600) / 60)).padStart(2, "0")}`;
}

function stackBar(counts, keys, total) {
  return el("div", { class: "stack" }, ...keys.filter((k) => counts[k] > 0).map((k) => {
    const i = el("i", { class: k, title: `${counts[k]} ${k}` });
    i.style.width = `${(100 * counts[k]) / total}%`;
    return i;
  }));
}

function renderSites() {
  const sites = new Map();
  for (const m of view.members) {
    if (!sites.has(m.site)) {
      sites.set(m.site, { state: Object.fromEntries(STATES.map((s) => [s, 0])),
        health: Object.fromEntries(HEALTHS.map((h) => [h, 0])), total: 0 });
    }
    const s = sites.get(m.site);
    s.total++;
    s.state[m.state]++;
    s.health[m.health]++;
  }
  const names = [...sites.keys()].sort();
  $("sites").replaceChildren(...names.map((name) => {
    const s = sites.get(name);
    return el("div", { class: "card", "data-site": name },
      el("h3", { text: name }),
      el("div", { class: "line" }, ...STATES.filter((k) => s.state[k] > 0)
        .map((k) => el("span", { class: k, text: `${s.state[k]} ${k}` }))),
      stackBar(s.state, STATES, s.total),
      el("div", { class: "line" }, ...HEALTHS.filter((k) => s.health[k] > 0)
        .map((k) => el("span", { class: k, text: `${s.health[k]} ${k}` }))),
      stackBar(s.health, HEALTHS, s.total));
  }));
}

function renderMembers() {
  const rows = [];
  for (const m of view.members) {
    const tags = Object.entries(m.tags).map(([k, v]) => `${k}=${v}`).join(", ");
    let failing = (view.failing[m.name] || []).join(", ");
    if (!failing && view.missing.has(m.name)) failing = "(no answer)";
    const tr = el("tr", { class: "member", "data-member": m.name, "data-state": m.state, title: "show checks" },
      el("td", { text: m.name }), el("td", { text: m.site }), el("td", { text: m.addr }),
      el("td", { class: m.state, text: m.state }), el("td", { class: m.health, text: m.health }),
      el("td", { class: failing ? "critical" : "muted", text: failing || "–" }),
      el("td", { text: tags }), el("td", { text: String(m.incarnation) }));
    tr.addEventListener("click", () => toggleChecks(m.name));
    rows.push(tr);
    if (view.open === m.name) rows.push(checksRow());
  }
  $("members").replaceChildren(...rows);
}

function checksRow() {
  const td = el("td", { colSpan: 8 });
  const doc = view.openChecks;
  if (doc === null) td.append(el("span", { class: "muted", text: "asking…" }));
  else if (doc.error) td.append(el("span", { class: "critical", text: doc.error }));
  else if (!doc.responses.length) td.append(el("span", { class: "muted", text: "no answer (not alive?)" }));
  for (const r of (doc && doc.responses) || []) {
    for (const c of r.checks || []) {
      td.append(el("div", { class: "check" },
        el("b", { class: c.status, text: c.status }), " ", el("span", { text: `${c.name} (${c.kind}) ` }),
        el("code", { text: (c.output || "").trim().slice(0, 300) })));
    }
  }
  return el("tr", { class: "details" }, td);
}

async function toggleChecks(name) {
  if (view.open === name) { view.open = null; renderMembers(); return; }
  view.open = name;
  view.openChecks = null;
  renderMembers();
  try {
    view.openChecks = await getJSON(`/v1/health?node=${encodeURIComponent(name)}&timeout=3s`);
  } catch (e) {
    view.openChecks = { error: String(e.message || e), responses: [] };
  }
  if (view.open === name) renderMembers();
}

// --- releases ----------------------------------------------------------------------------

function bar(percent) {
  const b = el("div", { class: percent >= 100 ? "bar done" : "bar" }, el("i"));
  b.firstChild.style.width = `${Math.min(100, percent)}%`;
  return b;
}

function renderReleases(rollout, local) {
  const box = $("releases");
  const rows = rollout.releases || [];
  if (!rows.length) {
    box.replaceChildren(el("p", { class: "muted", text: "no release announced in the mesh" }));
    return;
  }
  // Newest first: the API lists oldest first within a name.
  box.replaceChildren(...rows.slice().reverse().map((r) => {
    const mine = local.find((x) => x.id.startsWith(r.id));
    const title = el("div", { class: "title" },
      el("b", { text: `${r.name} ${r.version}` }),
      el("span", { class: "muted", text: `${r.id.slice(0, 12)} · seq ${r.seq} · ${r.chunks} chunks` +
        (mine ? ` · ${fmtBytes(mine.size)} · here: ${mine.state}` : "") }));
    const total = el("div", { class: "siterow total" },
      el("b", { text: "all sites" }), bar(r.percent),
      el("b", { class: "pct", text: `${r.percent.toFixed(1)}%` }),
      el("span", { text: `${r.complete}/${r.nodes} nodes complete` }));
    const sites = Object.entries(r.sites).map(([name, s]) => {
      const holders = s.complete + s.fetching;
      let who = holders ? `${s.complete}/${holders} complete` : "no alive holder";
      if (s.fetching) who += `, ${s.fetching} fetching`;
      if (s.down.length) who += `, down: ${s.down.join(", ")}`;
      return el("div", { class: "siterow", "data-site": name },
        el("span", { text: name }), bar(holders ? s.percent : 0),
        // No alive node of the site holds it (all down): no percentage to give.
        el("span", { class: "pct", text: holders ? `${s.percent.toFixed(1)}%` : "–" }),
        el("span", { class: s.down.length ? "dead" : "muted", text: who }));
    });
    const parts = [title, total, ...sites];
    if (mine && mine.bytes) {
      const b = mine.bytes;
      parts.push(el("div", { class: "bytes", "data-bytes": "" },
        el("span", { text: `bytes here by source: site ${fmtBytes(b.site)} · ` +
          `other sites ${fmtBytes(b.remote_site)} · origin ${fmtBytes(b.origin)}` })));
    }
    return el("div", { class: "release", "data-release": `${r.name} ${r.version}`,
      "data-percent": r.percent.toFixed(1) }, ...parts);
  }));
}

// --- charts --------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

// series: [{label, color, points: [[t, v], ...]}]; draws the last CHART_SPAN_S seconds.
function drawChart(id, series, fmt) {
  const fig = $(id);
  const plot = fig.querySelector(".plot");
  const cap = fig.querySelector("figcaption");
  const title = cap.dataset.title || cap.textContent;
  cap.dataset.title = title;
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    cap.replaceChildren(el("span", { text: title }));
    plot.replaceChildren(el("div", { class: "empty", text: "no data yet" }));
    return;
  }
  const W = 300, H = 90;
  const tMax = Math.max(...all.map((p) => p[0]));
  const tMin = tMax - CHART_SPAN_S;
  const vMax = Math.max(1e-9, ...all.map((p) => p[1])) * 1.1;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  for (const frac of [0.25, 0.5, 0.75]) {
    svg.append(svgEl("line", { x1: 0, x2: W, y1: H * frac, y2: H * frac, stroke: "currentColor",
      "stroke-opacity": 0.12, "stroke-width": 1, "vector-effect": "non-scaling-stroke" }));
  }
  for (const s of series) {
    if (!s.points.length) continue;
    const pts = s.points.map(([t, v]) =>
      `${(((t - tMin) / CHART_SPAN_S) * W).toFixed(1)},${(H - (v / vMax) * (H - 4)).toFixed(1)}`);
    svg.append(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: s.color,
      "stroke-width": 1.5, "vector-effect": "non-scaling-stroke", "stroke-linejoin": "round" }));
  }
  plot.replaceChildren(svg, el("span", { class: "ymax", text: fmt(vMax / 1.1) }));
  const key = series.map((s) => {
    const last = s.points.length ? s.points[s.points.length - 1][1] : null;
    const i = el("i");
    i.style.background = s.color;
    return el("span", { class: "key" }, i, `${s.label} `, el("b", { text: fmt(last) }));
  });
  cap.replaceChildren(el("span", { text: title }), ...key);
}

function rates(key) {
  const out = [];
  for (let i = 1; i < view.stats.length; i++) {
    const a = view.stats[i - 1], b = view.stats[i];
    const dt = b.t - a.t;
    if (dt <= 0 || typeof a[key] !== "number" || typeof b[key] !== "number") continue;
    out.push([b.t, Math.max(0, (b[key] - a[key]) / dt)]);
  }
  return out;
}

function renderCharts() {
  const css = getComputedStyle(document.documentElement);
  const c = (n) => css.getPropertyValue(n).trim() || "#888";
  drawChart("chart-gossip", [
    { label: "in", color: c("--c1"), points: rates("gossip_in_bytes") },
    { label: "out", color: c("--c2"), points: rates("gossip_out_bytes") },
  ], fmtRate);
  drawChart("chart-transfer", [
    { label: "sent", color: c("--c1"), points: rates("transfer_sent_bytes") },
    { label: "received", color: c("--c2"), points: rates("transfer_received_bytes") },
    { label: "origin", color: c("--c3"), points: rates("transfer_origin_bytes") },
  ], fmtRate);
  drawChart("chart-rtt", [
    { label: "rtt", color: c("--c1"), points: view.stats
      .filter((s) => typeof s.probe_rtt_ms === "number").map((s) => [s.t, s.probe_rtt_ms]) },
  ], fmtMs);
}

function onStats(doc) {
  if (typeof doc.t !== "number") return;
  const last = view.stats[view.stats.length - 1];
  if (last && doc.t < last.t) view.stats = []; // the node restarted: its clock began again
  view.stats.push(doc);
  while (view.stats.length && view.stats[0].t < doc.t - CHART_SPAN_S - 4) view.stats.shift();
  renderCharts();
}

// --- events --------------------------------------------------------------------------------

function eventText(name, d) {
  if (name === "member" || name === "keyring") {
    const m = d.member || {};
    return [d.kind, m.name ? `${m.name} ${m.addr || ""} ${m.state || ""}` : ""];
  }
  if (name === "health") return ["health", `${d.name} ${d.previous} → ${d.health}`];
  if (name === "release") {
    return ["release", `${d.name} ${d.version} ${d.state}${d.node ? ` on ${d.node}` : ""}` +
      `${d.detail ? ` (${d.detail})` : ""}`];
  }
  if (name === "reload") {
    if (!d.ok) return ["failed", `reload refused: ${d.error || ""}`];
    const restart = (d.restart_needed || []).length ? `; restart for ${d.restart_needed.join(", ")}` : "";
    return ["reload", `applied ${(d.applied || []).join(", ") || "nothing"}${restart}`];
  }
  if (name === "reset") return ["reset", "events were missed: views reloaded"];
  return [d.kind || name, d.name || ""];
}

function logEvent(name, d) {
  const [kind, text] = eventText(name, d);
  const li = el("li", { "data-kind": kind },
    el("time", { text: new Date().toLocaleTimeString([], { hour12: false }) }),
    el("span", { class: `kind ${kindClass(kind)}`, text: kind }), el("span", { text }));
  $("events").prepend(li);
  while ($("events").childElementCount > MAX_EVENTS) $("events").lastChild.remove();
}

function kindClass(kind) {
  if (["dead", "failed", "critical"].includes(kind)) return "dead";
  if (["suspect", "warning"].includes(kind)) return "suspect";
  if (["join", "alive"].includes(kind)) return "alive";
  return "";
}

// --- refresh ---------------------------------------------------------------------------------

let refreshing = false;
let healthInFlight = false;
let refreshTimer = null;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const [status, members, rollout, releases] = await Promise.all([
      getJSON("/v1/status"), getJSON("/v1/members"), getJSON("/v1/rollout"),
      getJSON("/v1/releases").catch(() => ({ releases: [] })),
    ]);
    renderStatus(status);
    view.members = members.members;
    renderSites();
    renderMembers();
    renderReleases(rollout, releases.releases || []);
  } catch (e) {
    setConn("API unreachable", "down");
  } finally {
    refreshing = false;
  }
}

// Failing checks come from a gossip query to the whole mesh: asked less often than the
// gossiped views, at most once per HEALTH_MIN_MS however many health events come, and not while
// the page is hidden (a tab left open in the background costs the fleet nothing).
const HEALTH_MIN_MS = 5000;
let healthAskedAt = -Infinity;

async function refreshHealth() {
  if (healthInFlight || document.hidden || performance.now() - healthAskedAt < HEALTH_MIN_MS) return;
  healthInFlight = true;
  healthAskedAt = performance.now();
  try {
    const doc = await getJSON("/v1/health?summary=site&timeout=3s");
    const failing = {};
    const missing = new Set();
    for (const s of Object.values(doc.sites || {})) {
      for (const f of s.failing || []) failing[f.name] = f.checks || [];
      for (const name of s.missing || []) missing.add(name);
    }
    view.failing = failing;
    view.missing = missing;
    renderMembers();
  } catch (e) {
    // keep what we had: the next round asks again
  } finally {
    healthInFlight = false;
  }
}

function soon() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 300);
}

function setConn(text, cls) {
  $("conn").textContent = text;
  $("conn").className = `pill ${cls || ""}`;
}

function connect() {
  const es = new EventSource("/v1/events");
  es.onopen = () => { setConn("live", "live"); refresh(); };
  es.onerror = () => setConn("reconnecting…", "down");
  const handle = (name, then) => es.addEventListener(name, (ev) => {
    let d;
    try { d = JSON.parse(ev.data); } catch (e) { return; }
    logEvent(name, d);
    if (then) then(d);
  });
  handle("member", soon);
  handle("keyring");
  handle("release", soon);
  handle("health", () => { soon(); refreshHealth(); });
  handle("reload");
  // Events were missed (the node restarted, or this page fell too far behind): reload the views.
  handle("reset", () => { soon(); refreshHealth(); });
  es.addEventListener("stats", (ev) => {
    try { onStats(JSON.parse(ev.data)); } catch (e) { /* a malformed frame: skip it */ }
  });
}

renderCharts();
refresh();
refreshHealth();
connect();
setInterval(refresh, 5000);
setInterval(refreshHealth, 15000);
document.addEventListener("visibilitychange", () => { if (!document.hidden) { refresh(); refreshHealth(); } });
