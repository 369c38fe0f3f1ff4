// The fleet page: /api/v1/fleet every few seconds, trends from /api/v1/query_range. No build step.
"use strict";

const REFRESH_MS = 5000;
const TREND_MS = 15000;
const TREND_WINDOW_S = 15 * 60;
const trends = {};  // uuid -> {sm: [[t, v]...], util: [...]}
let lastFleet = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const pct = (x) => (x === null || x === undefined ? "–" : Math.round(x * 100) + "%");
const num = (x, digits = 0) => (x === null || x === undefined ? "–" : x.toFixed(digits));
const gib = (b) => (b === null || b === undefined ? "–" : (b / 2 ** 30).toFixed(b >= 10 * 2 ** 30 ? 0 : 1));

function ago(t) {
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function bar(kind, ratio) {
  const w = ratio === null || ratio === undefined ? 0 : Math.max(0, Math.min(1, ratio)) * 100;
  return el("div", {class: "bar " + kind}, el("i", {style: `width:${w.toFixed(1)}%`}));
}

function row(label, kind, ratio, value) {
  return el("div", {class: "row"}, el("span", null, label), bar(kind, ratio), el("span", {class: "v"}, value));
}

function trendSvg(uuid) {
  const t = trends[uuid];
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "trend");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-label", "SM activity and utilization, last 15 minutes");
  if (!t) return svg;
  const now = Date.now() / 1000;
  // A young fleet has less than the full window: stretch what there is, but never below a minute.
  const first = Math.min(...["util", "sm"].map((k) => (t[k] && t[k].length ? t[k][0][0] : now)));
  const span = Math.max(60, Math.min(TREND_WINDOW_S, now - first));
  for (const kind of ["util", "sm"]) {
    const pts = (t[kind] || []).filter(([ts]) => ts >= now - span).map(([ts, v]) =>
      `${(100 * (1 - (now - ts) / span)).toFixed(2)},${(29 - 28 * Math.max(0, Math.min(1, v))).toFixed(2)}`);
    if (pts.length < 2) continue;
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("class", kind);
    line.setAttribute("points", pts.join(" "));
    svg.append(line);
  }
  return svg;
}

function gpuCard(g) {
  const firing = g.alerts.filter((a) => a.state === "firing");
  const cls = ["gpu", firing.length ? "alerting" : "", !g.up ? "down" : "", g.stale ? "stale" : ""].join(" ").trim();
  const model = (g.model || "").replace(/^NVIDIA /, "");
  const hot = g.temperature_celsius !== null && g.slowdown_temperature_celsius
    && g.temperature_celsius >= g.slowdown_temperature_celsius - 5;
  const state = !g.up ? "LOST" : g.stale ? `stale ${ago(g.last_seen)}` : null;
  return el("article", {class: cls, "data-uuid": g.uuid, "data-gpu": g.gpu},
    el("div", {class: "head"},
      el("span", {class: "name"}, `GPU ${g.gpu}`, state ? el("span", {class: "hot"}, ` ${state}`) : null),
      el("span", {class: "muted"}, model)),
    g.pod ? el("div", {class: "pod", title: `${g.namespace}/${g.pod}`}, `${g.namespace}/${g.pod}`) : null,
    row("SM active", "sm", g.sm_active, pct(g.sm_active)),
    row("utilization", "util", g.utilization, pct(g.utilization)),
    row("memory", "mem", g.memory_ratio, `${gib(g.memory_used_bytes)}/${gib(g.memory_total_bytes)}G`),
    el("div", {class: "facts"},
      el("span", {class: hot ? "hot" : null}, `${num(g.temperature_celsius)} °C`),
      el("span", null, `${num(g.power_watts)}${g.power_limit_watts ? " / " + num(g.power_limit_watts) : ""} W`),
      g.xid_errors ? el("span", {class: "hot"}, `XID ×${g.xid_errors}`) : null,
      g.ecc_errors && g.ecc_errors.uncorrected ? el("span", {class: "hot"}, `ECC ${g.ecc_errors.uncorrected}`) : null),
    g.throttle.length || g.alerts.length ? el("div", {class: "chips"},
      g.throttle.map((r) => el("span", {class: "chip", title: "clock throttle reason"}, `throttle: ${r}`)),
      g.alerts.map((a) => el(a.runbook_url ? "a" : "span",
        {class: "chip " + a.severity, href: a.runbook_url, target: "_blank", rel: "noopener"},
        a.state === "pending" ? `${a.rule} (pending)` : a.rule))) : null,
    trendSvg(g.uuid));
}

function alertItem(a) {
  const where = [a.cluster, a.node, a.gpu !== null && a.gpu !== undefined ? `GPU ${a.gpu}` : null,
    a.pod ? `${a.namespace}/${a.pod}` : null].filter(Boolean).join(" · ");
  return el("div", {class: `alert ${a.severity}`, "data-rule": a.rule},
    el("span", {class: `sev ${a.state === "pending" ? "pending" : a.severity}`},
      a.state === "pending" ? "pending" : a.severity),
    el("span", {class: "rule"}, a.rule),
    el("span", {class: "summary"}, a.summary || ""),
    el("span", {class: "muted"}, where, a.active_since ? ` · for ${ago(a.active_since)}` : ""),
    a.runbook_url ? el("a", {href: a.runbook_url, target: "_blank", rel: "noopener", class: "runbook"}, "runbook")
      : null);
}

function render(f) {
  const t = f.totals;
  const meanSm = t.sm_active === null ? "–" : pct(t.sm_active);
  document.getElementById("totals").replaceChildren(...[
    el("span", null, el("b", null, `${t.up}/${t.gpus}`), " GPUs up"),
    el("span", null, el("b", null, t.nodes), t.nodes === 1 ? " node" : " nodes"),
    el("span", {class: t.alerts_firing ? "hot" : null}, el("b", null, t.alerts_firing), " firing"),
    el("span", null, "SM ", el("b", null, meanSm), " vs util ", el("b", null, pct(t.utilization))),
    el("span", null, el("b", null, (t.power_watts / 1000).toFixed(2)), " kW"),
    t.throttled ? el("span", {class: "hot"}, el("b", null, t.throttled), " throttled") : null,
  ].filter(Boolean));
  document.getElementById("alerts").replaceChildren(...f.alerts.map(alertItem));
  document.getElementById("nodes").replaceChildren(...f.nodes.map((n) =>
    el("section", {class: "node", "data-node": n.node},
      el("h2", null, n.node || "(no node)", n.cluster ? el("span", {class: "muted"}, n.cluster) : null,
        el("span", {class: "muted"}, `${n.gpus.length} GPU${n.gpus.length === 1 ? "" : "s"}`)),
      el("div", {class: "gpus"}, n.gpus.map(gpuCard)))));
}

async function getJson(url) {
  const resp = await fetch(url, {cache: "no-store"});
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  return resp.json();
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    lastFleet = await getJson("/api/v1/fleet");
    render(lastFleet);
    status.className = "muted";
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.className = "error";
    status.textContent = `cannot reach the collector (${err.message}); retrying`;
  }
}

async function refreshTrends() {
  const end = Date.now() / 1000;
  const start = end - TREND_WINDOW_S;
  const q = (m) => getJson(`/api/v1/query_range?metric=${m}&start=${start}&end=${end}&step=5`);
  try {
    const [sm, util] = await Promise.all([q("gpufleet_gpu_sm_active_ratio"), q("gpufleet_gpu_utilization_ratio")]);
    for (const [kind, body] of [["sm", sm], ["util", util]]) {
      for (const s of body.data.result) {
        const uuid = s.metric.uuid;
        if (!uuid) continue;
        (trends[uuid] = trends[uuid] || {})[kind] = s.values;
      }
    }
    if (lastFleet) render(lastFleet);
  } catch (err) {
    console.warn("trends", err);
  }
}

refresh().then(refreshTrends);
setInterval(refresh, REFRESH_MS);
setInterval(refreshTrends, TREND_MS);
