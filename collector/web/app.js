// The fleet page: /api/v1/fleet every few seconds, one row per node (its worst GPU; click for its GPUs), a
// heat-map of SM activity against utilization, filters by cluster, node and alert. Trends come from
// /api/v1/query_range for the nodes that are open only, so the page asks for as much as it shows. No build step.
"use strict";

const REFRESH_MS = 5000;
const TREND_MS = 15000;
const TREND_WINDOW_S = 15 * 60;
const TREND_STEP_S = 5;
const OPEN_ALL_UP_TO_GPUS = 16;  // a fleet this small shows every GPU; a larger one one row per node
const ALERTS_SHOWN = matchMedia("(max-width: 520px)").matches ? 2 : 6;  // alerts listed before "show all"
const BINS = 10;  // heat-map cells a side: 10 % each
const trends = {};  // uuid -> {sm: [[t, v]...], util: [...]}
const opened = new Map();  // node key -> true/false, as the user left it
const filters = {cluster: "", node: "", alert: "", cell: null};  // cell: {u, s} bin indices
let lastFleet = null;
let allAlerts = false;

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
const nodeKey = (n) => `${n.cluster || ""}/${n.node || ""}`;
const bin = (x) => Math.min(BINS - 1, Math.max(0, Math.floor(x * BINS)));

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

function gpuState(g) {
  return g.status === "lost" ? "LOST" : g.stale ? `stale ${ago(g.last_seen)}` : null;
}

function gpuCard(g) {
  const firing = g.alerts.filter((a) => a.state === "firing");
  const cls = ["gpu", firing.length ? "alerting" : "", !g.up ? "down" : "", g.stale ? "stale" : ""].join(" ").trim();
  const model = (g.model || "").replace(/^NVIDIA /, "");
  const hot = g.temperature_celsius !== null && g.slowdown_temperature_celsius
    && g.temperature_celsius >= g.slowdown_temperature_celsius - 5;
  const state = gpuState(g);
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

// ---- filters ---------------------------------------------------------------------------------------------

// Does a GPU pass the GPU filters (alert, heat-map cell)? The cluster and node filters pick whole nodes.
function gpuPasses(g, withCell = true) {
  const a = filters.alert;
  if (a === "@problem" && g.status === "ok") return false;
  if (a === "@alert" && !g.alerts.length) return false;
  if (a === "@firing" && !g.alerts.some((x) => x.state === "firing")) return false;
  if (a && !a.startsWith("@") && !g.alerts.some((x) => x.rule === a)) return false;
  if (withCell && filters.cell) {
    if (g.sm_active === null || g.utilization === null || !g.up) return false;
    if (bin(g.utilization) !== filters.cell.u || bin(g.sm_active) !== filters.cell.s) return false;
  }
  return true;
}

function nodePasses(n) {
  if (filters.cluster && (n.cluster || "") !== filters.cluster) return false;
  const q = filters.node.trim().toLowerCase();
  return !q || (n.node || "").toLowerCase().includes(q);
}

function gpuFiltered() {
  return Boolean(filters.alert || filters.cell);
}

function saveFilters() {
  const p = new URLSearchParams();
  for (const k of ["cluster", "node", "alert"]) if (filters[k]) p.set(k, filters[k]);
  if (filters.cell) p.set("cell", `${filters.cell.u},${filters.cell.s}`);
  const hash = p.toString();
  history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
}

function loadFilters() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of ["cluster", "node", "alert"]) filters[k] = p.get(k) || "";
  const cell = (p.get("cell") || "").split(",").map(Number);
  filters.cell = cell.length === 2 && cell.every((x) => Number.isInteger(x) && x >= 0 && x < BINS)
    ? {u: cell[0], s: cell[1]} : null;
}

function setOptions(select, options, current) {
  // [[value, label]...]; rebuilt only when they change, so an open dropdown is not reset every refresh
  const sig = JSON.stringify(options);
  if (select.dataset.sig !== sig) {
    select.replaceChildren(...options.map(([v, label]) => el("option", {value: v}, label)));
    select.dataset.sig = sig;
  }
  if (current && !options.some(([v]) => v === current)) select.append(el("option", {value: current}, current));
  select.value = current;
}

function renderControls(f) {
  const clusters = [...new Set(f.nodes.map((n) => n.cluster || ""))].filter(Boolean).sort();
  setOptions(document.getElementById("filter-cluster"),
    [["", clusters.length ? `all ${clusters.length} clusters` : "all clusters"], ...clusters.map((c) => [c, c])],
    filters.cluster);
  const rules = new Map();
  for (const n of f.nodes) for (const g of n.gpus) for (const a of g.alerts) rules.set(a.rule, (rules.get(a.rule) || 0) + 1);
  setOptions(document.getElementById("filter-alert"), [
    ["", "any GPU"], ["@problem", "GPUs with a problem"], ["@alert", "GPUs with an alert"], ["@firing", "alerts firing"],
    ...[...rules.keys()].sort().map((r) => [r, `${r} (${rules.get(r)})`]),
  ], filters.alert);
  const names = document.getElementById("node-names");
  const sig = f.nodes.map((n) => n.node).join("\n");
  if (names.dataset.sig !== sig) {
    names.replaceChildren(...f.nodes.map((n) => el("option", {value: n.node || ""})));
    names.dataset.sig = sig;
  }
  const input = document.getElementById("filter-node");
  if (document.activeElement !== input) input.value = filters.node;
}

// ---- the heat-map: GPUs by utilization (across) and SM activity (up) --------------------------------------

function renderHeatmap(gpus) {
  const counts = Array.from({length: BINS}, () => new Array(BINS).fill(0));
  let placed = 0;
  let without = 0;
  for (const g of gpus) {
    if (!g.up || g.sm_active === null || g.utilization === null) { without += 1; continue; }
    counts[bin(g.utilization)][bin(g.sm_active)] += 1;
    placed += 1;
  }
  const top = Math.max(1, ...counts.flat());
  const cells = [];
  for (let s = BINS - 1; s >= 0; s--) {
    for (let u = 0; u < BINS; u++) {
      const n = counts[u][s];
      const picked = filters.cell && filters.cell.u === u && filters.cell.s === s;
      const range = (i) => `${i * 10}–${(i + 1) * 10}%`;
      cells.push(el("button", {
        class: "cell" + (n ? "" : " empty") + (picked ? " picked" : "") + (u - s >= 5 ? " waste" : ""),
        "data-u": u, "data-s": s, "data-count": n,
        style: n ? `--heat:${(0.18 + 0.82 * Math.sqrt(n / top)).toFixed(3)}` : null,
        title: `${n} GPU${n === 1 ? "" : "s"}: utilization ${range(u)}, SM activity ${range(s)}`,
        "aria-pressed": picked ? "true" : "false",
      }, n ? String(n) : ""));
    }
  }
  document.getElementById("heatmap-grid").replaceChildren(...cells);
  document.getElementById("heatmap-note").textContent =
    `${placed} GPU${placed === 1 ? "" : "s"}` + (without ? ` · ${without} without SM activity (lost, or no GPM)` : "")
    + (filters.cell ? " · click the cell again to show all" : " · click a cell to show its GPUs");
}

// ---- one row per node ------------------------------------------------------------------------------------

function isOpen(n, total) {
  const k = nodeKey(n);
  return opened.has(k) ? opened.get(k) : total <= OPEN_ALL_UP_TO_GPUS;
}

function worstText(g) {
  if (!g) return "";
  const firing = g.alerts.filter((a) => a.state === "firing").map((a) => a.rule);
  const pending = g.alerts.filter((a) => a.state === "pending").map((a) => `${a.rule} (pending)`);
  const what = {
    lost: ["lost", ...firing],
    critical: firing, warning: firing,
    stale: [`stale ${ago(g.last_seen)}`],
    pending,
    throttled: g.throttle.map((r) => `throttle: ${r}`),
    ok: [],
  }[g.status] || [];
  const numbers = g.up ? [`SM ${pct(g.sm_active)}`, `util ${pct(g.utilization)}`, `${num(g.temperature_celsius)} °C`] : [];
  return [`GPU ${g.gpu}`, ...what, ...numbers].join(" · ");
}

function cellClass(g) {
  return `c st-${g.status}` + (gpuFiltered() && gpuPasses(g) ? " match" : "");
}

function nodeSection(n, total) {
  const open = isOpen(n, total);
  const worst = n.gpus.find((g) => g.uuid === n.worst) || n.gpus[0];
  const live = n.gpus.filter((g) => g.up && !g.stale);
  const mean = (k) => {
    const xs = live.map((g) => g[k]).filter((x) => x !== null);
    return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
  };
  const matches = gpuFiltered() ? n.gpus.filter((g) => gpuPasses(g)).length : null;
  const head = el("button", {class: "noderow", type: "button", "aria-expanded": open ? "true" : "false"},
    el("span", {class: "caret", "aria-hidden": "true"}, open ? "▾" : "▸"),
    el("span", {class: "nodename"}, n.node || "(no node)"),
    el("span", {class: "muted cluster"}, n.cluster || ""),
    el("span", {class: "cells", "aria-hidden": "true"}, n.gpus.map((g) => el("i", {
      class: cellClass(g), style: `--sm:${g.sm_active === null ? 0 : g.sm_active.toFixed(2)}`,
      title: `GPU ${g.gpu}: ${g.status}, SM ${pct(g.sm_active)}, util ${pct(g.utilization)}`,
    }))),
    el("span", {class: "count muted"},
      matches === null ? `${n.gpus.length} GPU${n.gpus.length === 1 ? "" : "s"}` : `${matches}/${n.gpus.length} match`),
    el("span", {class: "avg muted"}, `SM ${pct(mean("sm_active"))} · util ${pct(mean("utilization"))}`),
    el("span", {class: `worst st-${n.status}`}, n.status === "ok" && n.gpus.length > 1 ? `least busy: ${worstText(worst)}`
      : worstText(worst)));
  return el("section", {class: `node st-${n.status}` + (open ? " open" : ""), "data-node": n.node || "",
    "data-cluster": n.cluster || "", "data-status": n.status},
  head, open ? el("div", {class: "gpus"}, n.gpus.map(gpuCard)) : null);
}

function renderNodes(f) {
  const total = f.totals.gpus;
  const shownNodes = f.nodes.filter(nodePasses);
  const byGpu = gpuFiltered() ? shownNodes.filter((n) => n.gpus.some((g) => gpuPasses(g))) : shownNodes;
  renderHeatmap(shownNodes.flatMap((n) => n.gpus.filter((g) => gpuPasses(g, false))));
  document.getElementById("nodes").replaceChildren(...byGpu.map((n) => nodeSection(n, total)));
  const any = filters.cluster || filters.node || filters.alert || filters.cell;
  document.getElementById("shown").textContent = any
    ? `${byGpu.length} of ${f.nodes.length} nodes` : `${f.nodes.length} node${f.nodes.length === 1 ? "" : "s"}`;
  document.getElementById("clear-filters").hidden = !any;
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
  const rank = (a) => (a.state === "firing" ? 0 : 2) + (a.severity === "critical" ? 0 : 1);
  const alerts = [...f.alerts].sort((a, b) => rank(a) - rank(b));
  const more = alerts.length - ALERTS_SHOWN;
  const items = (allAlerts || more <= 0 ? alerts : alerts.slice(0, ALERTS_SHOWN)).map(alertItem);
  if (more > 0) {
    items.push(el("button", {class: "more", type: "button", id: "more-alerts"},
      allAlerts ? "show fewer alerts" : `show all ${alerts.length} alerts`));
  }
  document.getElementById("alerts").replaceChildren(...items);
  renderControls(f);
  renderNodes(f);
}

function rerender() {
  saveFilters();
  if (lastFleet) renderNodes(lastFleet);
}

// ---- data ------------------------------------------------------------------------------------------------

async function getJson(url) {
  const resp = await gpufleetAuth.fetch(url, {cache: "no-store"});  // with the read token (auth.js)
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  return resp.json();
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    lastFleet = await getJson("/api/v1/fleet");
    render(lastFleet);
    // Past the collector's --fleet-max-gpus the lists are cut (the totals count every GPU): say so.
    const cut = lastFleet.truncated;
    status.className = cut ? "error" : "muted";
    status.textContent = "updated " + new Date().toLocaleTimeString() + (cut ? ` · ${cut.message}` : "");
  } catch (err) {
    status.className = "error";
    status.textContent = `cannot reach the collector (${err.message}); retrying`;
  }
}

async function nodeTrends(n) {
  const end = Date.now() / 1000;
  const match = new URLSearchParams({cluster: n.cluster || "", node: n.node || ""});
  const q = (m) => getJson(`/api/v1/query_range?metric=${m}&${match}&start=${end - TREND_WINDOW_S}&end=${end}`
    + `&step=${TREND_STEP_S}`);
  const [sm, util] = await Promise.all([q("gpufleet_gpu_sm_active_ratio"), q("gpufleet_gpu_utilization_ratio")]);
  for (const [kind, body] of [["sm", sm], ["util", util]]) {
    for (const s of body.data.result) {
      const uuid = s.metric.uuid;
      if (!uuid) continue;
      (trends[uuid] = trends[uuid] || {})[kind] = s.values;
    }
  }
}

// Trends of the nodes that are open and shown, one node at a time.
async function refreshTrends(only) {
  if (!lastFleet) return;
  const total = lastFleet.totals.gpus;
  const nodes = only ? [only] : lastFleet.nodes.filter((n) => isOpen(n, total) && nodePasses(n));
  for (const n of nodes) {
    try {
      await nodeTrends(n);
    } catch (err) {
      console.warn("trends", n.node, err);
    }
  }
  if (nodes.length) renderNodes(lastFleet);
}

// ---- events ----------------------------------------------------------------------------------------------

document.getElementById("nodes").addEventListener("click", (ev) => {
  const head = ev.target.closest(".noderow");
  if (!head || !lastFleet) return;
  const section = head.parentElement;
  const n = lastFleet.nodes.find((x) => (x.node || "") === section.dataset.node
    && (x.cluster || "") === section.dataset.cluster);
  if (!n) return;
  const open = !isOpen(n, lastFleet.totals.gpus);
  opened.set(nodeKey(n), open);
  renderNodes(lastFleet);
  if (open) refreshTrends(n);
});

document.getElementById("heatmap-grid").addEventListener("click", (ev) => {
  const cell = ev.target.closest(".cell");
  if (!cell) return;
  const u = Number(cell.dataset.u);
  const s = Number(cell.dataset.s);
  filters.cell = filters.cell && filters.cell.u === u && filters.cell.s === s ? null : {u, s};
  rerender();
});

document.getElementById("filters").addEventListener("submit", (ev) => ev.preventDefault());
document.getElementById("filter-cluster").addEventListener("change", (ev) => {
  filters.cluster = ev.target.value;
  rerender();
});
document.getElementById("filter-alert").addEventListener("change", (ev) => {
  filters.alert = ev.target.value;
  rerender();
});
document.getElementById("filter-node").addEventListener("input", (ev) => {
  filters.node = ev.target.value;
  rerender();
});
document.getElementById("clear-filters").addEventListener("click", () => {
  Object.assign(filters, {cluster: "", node: "", alert: "", cell: null});
  document.getElementById("filter-node").value = "";
  if (lastFleet) renderControls(lastFleet);
  rerender();
});
document.getElementById("alerts").addEventListener("click", (ev) => {
  if (!ev.target.closest("#more-alerts") || !lastFleet) return;
  allAlerts = !allAlerts;
  render(lastFleet);
});
window.addEventListener("hashchange", () => {
  loadFilters();
  if (lastFleet) {
    renderControls(lastFleet);
    renderNodes(lastFleet);
  }
});

loadFilters();
refresh().then(() => refreshTrends());
setInterval(refresh, REFRESH_MS);
document.addEventListener("gpufleet:token", () => refresh().then(() => refreshTrends()));
setInterval(() => refreshTrends(), TREND_MS);
