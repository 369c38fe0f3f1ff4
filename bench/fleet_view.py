"""Fleet view benchmark: `/api/v1/gpus`, `/api/v1/fleet` and the fleet page at 1,000 GPUs on 125 nodes.

    python bench/fleet_view.py [--pg postgresql://postgres@127.0.0.1:5432/test] [--nodes 125]
                               [--history 900] [--calls 40] [--no-page] [--profile FILE]

Starts a real `gpufleet collector` (the built-in rule pack evaluating) on a fresh PostgreSQL database and
fills it through POST /api/v1/write with NODES x 8 simulated GPUs in two clusters: every field the fleet
page reads (the 21 core fields of bench/ingest.py, the clock-event reasons, ECC counters, gpu_info, XID
counters on a few GPUs, pods on the working ones), HISTORY seconds of 1-second samples, in the mix of a
real fleet (training, input-bound, idle, idle holding memory, hot, power-braked, lost). Then:
  * times GET /api/v1/gpus, /api/v1/fleet and the trend queries the page makes for one expanded node:
    p50 / p95 / max of CALLS sequential calls on one keep-alive connection, and the size of the answer
    (the fleet answers are kept for FLEET_POLL_S: their calls are spaced further apart, so each reads
    the store, as one page polling every 5 s does);
    and the first call of each after a quiet spell (answered from the answers the collector keeps warm;
    how old they were is printed beside);
  * opens the fleet page in headless Chromium (tests/cdp.py) and times the first render (navigation start
    to the first frame after the page says "updated"), expanding a node, a cluster filter, and the main
    thread's long tasks (> 50 ms) over 15 s of refreshes.
While the endpoints and the page are timed, a sender keeps pushing the fleet's samples every 5 s, as its
agents would: no GPU goes stale, and the collector ingests 1,000 GPUs' worth of samples meanwhile.
--profile FILE records the collector with py-spy (speedscope JSON) while the endpoints are timed.
Needs PostgreSQL (creates and drops its own database), Chromium for the page, py-spy for --profile.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cramjam

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import ADMIN, CORE, Db, free_port, push, start_collector  # noqa: E402
from gpufleet.collector.fleet import FLEET_POLL_S, FLEET_WATCH_S  # noqa: E402
from gpufleet.core import remote_write as rw  # noqa: E402

GPUS_PER_NODE = 8
CLUSTERS = ("us-east", "eu-west")
MODEL = "NVIDIA H100 80GB HBM3"
MEMORY_TOTAL = float(81_559 << 20)
REASONS = (
    "gpu_idle",
    "applications_clocks",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal",
    "hw_thermal",
    "hw_power_brake",
)
HISTORY_WINDOW_S = 60  # seconds of samples a series per request while filling the history
LIVE_WINDOW_S = 5  # as agents push: a batch every 5 s
SENDERS = 4
RETRIES = 3  # a window the collector refused (503 while its database restarts) is sent again
TREND_WINDOW_S = 15 * 60
TREND_STEP_S = 5


@dataclass(frozen=True)
class Profile:
    """What a GPU is doing: ranges its numbers move in, and the clock-event reasons it holds."""

    name: str
    share: float
    utilization: tuple[float, float]
    sm_active: tuple[float, float]
    temperature: tuple[float, float]
    memory_ratio: float
    pod: bool
    events: tuple[str, ...] = ()
    up: bool = True


PROFILES = (
    Profile("training", 0.695, (0.92, 1.0), (0.70, 0.92), (62, 76), 0.88, True),
    Profile("input-bound", 0.12, (0.85, 1.0), (0.10, 0.35), (48, 58), 0.60, True),
    Profile("idle", 0.10, (0.0, 0.0), (0.0, 0.005), (30, 36), 0.006, False, ("gpu_idle",)),
    Profile("idle-holding-memory", 0.04, (0.0, 0.02), (0.0, 0.01), (32, 38), 0.55, True, ("gpu_idle",)),
    Profile("hot", 0.025, (0.95, 1.0), (0.55, 0.75), (86, 91), 0.90, True, ("sw_thermal", "hw_thermal")),
    Profile("power-brake", 0.01, (0.90, 1.0), (0.40, 0.60), (70, 80), 0.85, True, ("hw_power_brake",)),
    Profile("lost", 0.005, (0.0, 0.0), (0.0, 0.0), (0, 0), 0.0, False, up=False),
)


@dataclass
class SimGpu:
    cluster: str
    node: str
    index: int
    number: int  # across the fleet: seeds its values
    profile: Profile
    phase: float
    xid: bool  # its XID counter steps up once the history is in
    labels: dict[str, str] = field(default_factory=dict)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


_DOUBLE = struct.Struct("<d")


class Fleet:
    """NODES x 8 simulated GPUs as remote-write requests, one node a request, encoded straight to protobuf
    (the series' label fields once, samples per window): the bench itself shares the machine's cores."""

    def __init__(self, nodes: int, seed: int = 17) -> None:
        rnd = random.Random(seed)
        weights = [p.share for p in PROFILES]
        self.nodes: list[list[SimGpu]] = []
        for n in range(nodes):
            cluster = CLUSTERS[n % len(CLUSTERS)]
            name = f"{cluster}-gpu-{n // len(CLUSTERS):03d}"
            gpus = []
            for i in range(GPUS_PER_NODE):
                number = n * GPUS_PER_NODE + i
                profile = rnd.choices(PROFILES, weights)[0]
                g = SimGpu(cluster, name, i, number, profile, rnd.random() * 6.3, xid=number % 331 == 7)
                g.labels = {
                    "cluster": cluster,
                    "node": name,
                    "gpu": str(i),
                    "uuid": f"GPU-{number:08x}-5e1f-4c1a-9b7e-{cluster[:2]}{n:04d}{i:04d}",
                    "model": MODEL,
                }
                if profile.pod:
                    team = ("llm", "vision", "speech", "recsys")[number // 24 % 4]
                    g.labels.update(
                        pod=f"{team}-train-{number // 8:04d}-worker-{i}", namespace=team, container="trainer"
                    )
                gpus.append(g)
            self.nodes.append(gpus)
        self._keys: dict[tuple[int, str, str], bytes] = {}
        self.node_until = [0] * nodes  # per node: every second before this one has been pushed
        self.xid_from_s: int | None = None

    @property
    def gpus(self) -> list[SimGpu]:
        return [g for node in self.nodes for g in node]

    def series(self, g: SimGpu) -> list[tuple[str, dict[str, str]]]:
        """(metric, labels beyond identity) of each series the GPU reports, as its agent would."""
        info = {
            "driver": "550.90.07",
            "serial": f"165{g.number:010d}",
            "pci_bus_id": f"00000000:{0x18 + g.index * 0x10:02X}:00.0",
            "mig_mode": "disabled",
        }
        if not g.profile.up:  # a lost GPU answers nothing but "lost"
            return [("gpufleet_gpu_up", {}), ("gpufleet_gpu_info", info)]
        out: list[tuple[str, dict[str, str]]] = [(metric, {}) for metric, _ in CORE]
        out += [("gpufleet_gpu_clock_event_active", {"reason": r}) for r in REASONS]
        out += [
            ("gpufleet_gpu_ecc_errors_total", {"type": t, "scope": s})
            for t in ("corrected", "uncorrected")
            for s in ("volatile", "aggregate")
        ]
        out.append(("gpufleet_gpu_info", info))
        if g.xid:
            out.append(("gpufleet_gpu_xid_errors_total", {"xid": "79"}))
        return out

    def value(self, g: SimGpu, metric: str, extra: dict[str, str], t: int, rnd: random.Random) -> float:
        p = g.profile
        wave = 0.5 + 0.5 * math.sin(t / 97.0 + g.phase)  # a slow swing, so trends have a shape

        def span(lo_hi: tuple[float, float]) -> float:
            lo, hi = lo_hi
            return min(1.0, max(0.0, lo + (hi - lo) * (0.7 * wave + 0.3 * rnd.random())))

        if metric == "gpufleet_gpu_up":
            return 1.0 if p.up else 0.0
        if metric == "gpufleet_gpu_utilization_ratio":
            return round(span(p.utilization), 2)
        if metric == "gpufleet_gpu_sm_active_ratio":
            return span(p.sm_active)
        if metric == "gpufleet_gpu_tensor_active_ratio":
            return span(p.sm_active) * 0.6
        if metric == "gpufleet_gpu_dram_active_ratio":
            return span(p.sm_active) * 0.5
        if metric == "gpufleet_gpu_memory_used_bytes":
            return float(int(MEMORY_TOTAL * p.memory_ratio) >> 20 << 20)
        if metric == "gpufleet_gpu_memory_free_bytes":
            return MEMORY_TOTAL - float(int(MEMORY_TOTAL * p.memory_ratio) >> 20 << 20)
        if metric == "gpufleet_gpu_temperature_celsius":
            lo, hi = p.temperature
            return float(round(lo + (hi - lo) * wave))
        if metric == "gpufleet_gpu_power_watts":
            return round(70 + 620 * span(p.utilization) * (0.5 + 0.5 * span(p.sm_active)), 1)
        if metric == "gpufleet_gpu_sm_clock_hertz":
            return 1_410e6 if p.events and p.events != ("gpu_idle",) else 1_980e6
        if metric == "gpufleet_gpu_clock_event_active":
            return 1.0 if extra["reason"] in p.events else 0.0
        if metric == "gpufleet_gpu_ecc_errors_total":
            bad = extra["type"] == "uncorrected" and g.number % 157 == 3
            return (2.0 if bad else 0.0) + (float(g.number % 5) if extra["type"] == "corrected" else 0.0)
        if metric == "gpufleet_gpu_xid_errors_total":
            return 1.0 if self.xid_from_s is not None and t >= self.xid_from_s else 0.0
        if metric == "gpufleet_gpu_info":
            return 1.0
        return CORE_FN[metric](g.number, t, rnd)

    def _key(self, g: SimGpu, metric: str, extra: dict[str, str]) -> bytes:
        k = (g.number, metric, ",".join(f"{a}={b}" for a, b in extra.items()))
        key = self._keys.get(k)
        if key is None:
            labels = {"__name__": metric, **g.labels, **extra}
            key = self._keys[k] = rw.LabelSet.of(dict(sorted(labels.items()))).key
        return key

    def request(self, node: list[SimGpu], start_s: int, end_s: int, rnd: random.Random) -> tuple[bytes, int]:
        """One node's samples for the seconds [start_s, end_s), as a compressed remote-write body."""
        stamps = [b"\x10" + _varint(t * 1000) for t in range(start_s, end_s)]
        parts = []
        n = 0
        for g in node:
            for metric, extra in self.series(g):
                samples = b"".join(
                    _field(0x12, b"\x09" + _DOUBLE.pack(self.value(g, metric, extra, t, rnd)) + stamp)
                    for t, stamp in zip(range(start_s, end_s), stamps, strict=True)
                )
                parts.append(_field(0x0A, self._key(g, metric, extra) + samples))
                n += end_s - start_s
        return bytes(cramjam.snappy.compress_raw(b"".join(parts))), n

    def bodies(self, start_s: int, end_s: int, window_s: int, seed: int) -> list[tuple[bytes, int]]:
        """Every node's samples from start_s to end_s in windows of window_s, window by window."""
        rnd = random.Random(seed)
        out = []
        for w in range(start_s, end_s, window_s):
            for node in self.nodes:
                out.append(self.request(node, w, min(w + window_s, end_s), rnd))
        return out

    def catch_up(self, port: int, phase: int | None = None) -> dict:
        """Push every second from the last one pushed up to now: of every node, or (``phase``) of the nodes
        whose turn it is, one in LIVE_WINDOW_S, so that the nodes' pushes spread over the window as
        independent agents' do instead of arriving all at once."""
        now_s = int(time.time())
        nodes = range(len(self.nodes)) if phase is None else range(phase, len(self.nodes), LIVE_WINDOW_S)
        rnd = random.Random(now_s)
        bodies = []
        for n in nodes:
            for w in range(self.node_until[n], now_s, LIVE_WINDOW_S):
                bodies.append(self.request(self.nodes[n], w, min(w + LIVE_WINDOW_S, now_s), rnd))
        if not bodies:
            return {"acked": 0, "errors": 0}
        for attempt in range(RETRIES + 1):
            result = push(port, bodies, None, SENDERS)
            if not result["errors"]:
                break
            if attempt == RETRIES:
                raise RuntimeError(f"the collector refused a write: {result['first_error']}")
            # as an agent does on a 503 (the database restarting): send the window again, which stores once
            time.sleep(5)
        for n in nodes:
            self.node_until[n] = now_s
        return result

    @property
    def until_s(self) -> int:
        """Every node's seconds before this one have been pushed."""
        return min(self.node_until)

    @until_s.setter
    def until_s(self, t: int) -> None:
        self.node_until = [t] * len(self.nodes)


CORE_FN: dict[str, Callable[[int, float, random.Random], float]] = dict(CORE)


def fill(fleet: Fleet, port: int, history_s: int) -> dict:
    """HISTORY seconds of 1-second samples up to now, then the seconds that passed while they were sent."""
    t0 = time.monotonic()
    fleet.until_s = start_s = int(time.time()) - history_s
    acked = 0
    # Each pass sends the seconds the one before took; a fleet faster than the collector would never end.
    for _ in range(4):
        if int(time.time()) - fleet.until_s <= 2 * LIVE_WINDOW_S:
            break
        end_s = int(time.time())
        bodies = fleet.bodies(fleet.until_s, end_s, HISTORY_WINDOW_S, end_s)
        result = push(port, bodies, None, SENDERS)
        if result["errors"]:
            raise RuntimeError(f"the collector refused a write: {result['first_error']}")
        acked += result["acked"]
        fleet.until_s = end_s
        print(
            f"fill: {end_s - start_s} s of history, {acked:,} samples, {result['per_s']:,} samples/s",
            flush=True,
        )
    fleet.xid_from_s = fleet.until_s  # the few XID GPUs report their error from now on
    acked += fleet.catch_up(port)["acked"]
    return {"samples": acked, "seconds": round(time.monotonic() - t0, 1)}


class Live:
    """Keeps pushing the fleet's newest samples, each node every 5 s at its own phase, as its agents would,
    until stopped."""

    def __init__(self, fleet: Fleet, port: int) -> None:
        self._fleet, self._port = fleet, port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples = 0
        self.failure: Exception | None = None

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(1.0):
            tick += 1
            try:
                self.samples += self._fleet.catch_up(self._port, tick % LIVE_WINDOW_S)["acked"]
            except Exception as exc:
                self.failure = exc
                return

    def __enter__(self) -> Live:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.failure is not None:
            raise RuntimeError(f"the fleet stopped pushing while timed: {self.failure}")


def vacuum(db: Db) -> dict:
    """Compact the newest-sample table after the fill, then VACUUM ANALYZE. The fill rewrote each series'
    newest-sample row once a request, 30-odd times within two minutes and with autovacuum off on a CI
    server; a collector that has run for a while under autovacuum holds that table at a few times its live
    rows, not at every version the fill left. Returns its size and dead rows before and after."""
    import psycopg

    def state(c: psycopg.Connection) -> dict:
        row = c.execute(
            "SELECT pg_relation_size('latest'), n_live_tup, n_dead_tup, current_setting('autovacuum') "
            "FROM pg_stat_user_tables WHERE relname = 'latest'"
        ).fetchone()
        return (
            {"bytes": row[0], "live_rows": row[1], "dead_rows": row[2], "autovacuum": row[3]} if row else {}
        )

    with psycopg.connect(db.url, autocommit=True) as c:
        before = state(c)
        c.execute("VACUUM FULL latest")
        c.execute("VACUUM ANALYZE")
        time.sleep(1)  # the statistics collector's counts lag
        return {"before": before, "after": state(c)}


def latest_size(db: Db) -> int:
    import psycopg

    with psycopg.connect(db.url, autocommit=True) as c:
        row = c.execute("SELECT pg_relation_size('latest')").fetchone()
        return int(row[0]) if row else 0


def fleet_totals(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/v1/fleet")
    return json.loads(conn.getresponse().read())["totals"]


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def time_calls(port: int, path: str, calls: int, spacing_s: float = 0.0, encoding: str = "identity") -> dict:
    """``calls`` sequential GETs on one keep-alive connection, each ``spacing_s`` after the one before:
    milliseconds to the last byte of each (not decompressed: the client's work)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ms: list[float] = []
    failed: list[str] = []  # a shared database restarted under the collector: counted, not timed
    size = 0
    last = -math.inf
    for _ in range(calls):
        t = time.perf_counter()
        if t - last < spacing_s:
            time.sleep(spacing_s - (t - last))
            t = time.perf_counter()
        last = t
        conn.request("GET", path, headers={"Accept-Encoding": encoding})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            failed.append(f"HTTP {resp.status} {body[:200]!r}")
            continue
        ms.append((time.perf_counter() - t) * 1000)
        size = len(body)
    conn.close()
    if not ms:
        raise RuntimeError(f"GET {path}: every call failed, the first with {failed[0]}")
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(percentile(ms, 0.95), 1),
        "max_ms": round(max(ms), 1),
        "bytes": size,
        "calls": len(ms),
        **({"failed": failed} if failed else {}),
    }


def trend_path(metric: str, matchers: dict[str, str]) -> str:
    """A trend query as the page makes it: ``metric`` over the last 15 minutes every 5 s."""
    end = time.time()
    query = {"metric": metric, **matchers, "start": f"{end - TREND_WINDOW_S:.3f}", "end": f"{end:.3f}"}
    return "/api/v1/query_range?" + urllib.parse.urlencode({**query, "step": TREND_STEP_S})


def endpoints(fleet: Fleet, port: int, calls: int, cold: int, spy: Callable[[], None] | None = None) -> dict:
    """The fleet endpoints polled (as `curl` or `gpufleet top` ask, and /api/v1/fleet gzipped, as a browser
    asks), ``cold`` first calls after a quiet spell, then the trend queries; ``spy`` is called before the
    trend queries (it ends the profile of the fleet calls)."""
    node = fleet.nodes[len(fleet.nodes) // 2][0]
    # (path, Accept-Encoding, calls, seconds between calls): the fleet answers are kept for a poll interval
    # (FLEET_POLL_S), so calls further apart than that each read the store, as one page polling every 5 s.
    spaced = FLEET_POLL_S + 0.1
    paths = {
        "/api/v1/gpus": ("/api/v1/gpus", "identity", calls, spaced),
        "/api/v1/fleet": ("/api/v1/fleet", "identity", calls, spaced),
        "/api/v1/fleet (gzip, as the page gets it)": ("/api/v1/fleet", "gzip", calls, spaced),
        "first calls after a quiet spell": ("", "", 0, 0.0),
    }
    for metric in ("gpufleet_gpu_sm_active_ratio", "gpufleet_gpu_utilization_ratio"):
        paths[f"query_range {metric} (one node)"] = (
            trend_path(metric, {"cluster": node.cluster, "node": node.node}),
            "gzip",
            calls,
            0.0,
        )
    # The same 15 minutes for every GPU at once: what a page drawing every GPU's trend would ask for.
    paths["query_range gpufleet_gpu_sm_active_ratio (all GPUs)"] = (
        trend_path("gpufleet_gpu_sm_active_ratio", {}),
        "gzip",
        min(calls, 5),
        0.0,
    )
    out: dict[str, dict] = {}
    for name, (path, encoding, n, spacing) in paths.items():
        if not path:
            out.update(cold_calls(port, cold))
            if spy is not None:
                spy()
            continue
        time_calls(port, path, 2, encoding=encoding)  # warm: first-call costs are not the steady state
        out[name] = time_calls(port, path, n, spacing, encoding)
        print(f"endpoint {name}: {out[name]}", flush=True)
    return out


def cold_calls(port: int, calls: int) -> dict:
    """The fleet answers asked for after a quiet spell: no call to either for longer than the page's polls
    keep them worked out ahead (FLEET_WATCH_S, and the last answers too old to hand out as a poll's). The
    collector keeps them warm meanwhile, less often (FLEET_WARM_MIN_S at the most, for FLEET_KEEP_WARM of a
    core), so such a call answers with one of those; how old it was (``generated_at`` of /api/v1/fleet) is
    reported beside the time. The two endpoints take turns."""
    quiet = FLEET_WATCH_S + 3 * FLEET_POLL_S + 1
    ms: dict[str, list[float]] = {"/api/v1/fleet": [], "/api/v1/gpus": []}
    ages: list[float] = []
    sizes = {}
    for _ in range(calls):
        for path in ms:
            time.sleep(quiet)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            took = (time.perf_counter() - t) * 1000
            conn.close()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status} {body[:200]!r}")
            ms[path].append(took)
            sizes[path] = len(body)
            if path == "/api/v1/fleet":
                ages.append(time.time() - json.loads(body)["generated_at"])
    out: dict = {}
    for path, xs in ms.items():
        out[f"{path} (first call after {quiet:g} s unasked)"] = {
            "p50_ms": round(statistics.median(xs), 1),
            "p95_ms": round(percentile(xs, 0.95), 1),
            "max_ms": round(max(xs), 1),
            "bytes": sizes[path],
            "calls": len(xs),
        }
    fleet = out[f"/api/v1/fleet (first call after {quiet:g} s unasked)"]
    fleet["answer_age_p50_s"] = round(statistics.median(ages), 1)
    fleet["answer_age_max_s"] = round(max(ages), 1)
    print(f"cold: {out}", flush=True)
    return out


# Runs in the page before its own script: when the status line first says "updated", wait for the frame
# after the one that draws it (two animation frames), and keep every long task (> 50 ms) of the main thread.
PAGE_PROBE = """
window.__bench = {rendered: null, longtasks: [], updates: []};
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__bench.longtasks.push([e.startTime, e.duration]);
}).observe({type: "longtask", buffered: true});
let lastStatus = "";
new MutationObserver(function () {
  const s = document.getElementById("status");
  const text = s ? s.textContent : "";
  if (text === lastStatus || !text.startsWith("updated")) return;
  lastStatus = text;
  window.__bench.updates.push(performance.now());
  if (window.__bench.rendered === null) {
    window.__bench.rendered = -1;
    requestAnimationFrame(() => requestAnimationFrame(() => { window.__bench.rendered = performance.now(); }));
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""

# Milliseconds from an action to the frame after the one that shows its result.
TIMED_ACTION = """(async () => {
  const t0 = performance.now();
  try { (%s)(); } catch (e) { return null; }
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  if (!(%s)()) return null;
  return performance.now() - t0;
})()"""


def page(url: str, fleet: Fleet, loads: int) -> dict:
    """The fleet page in headless Chromium at 1280x900: first render ``loads`` times, then one node
    expanded, a cluster filter, and the long tasks over 15 s of refreshes."""
    from tests.cdp import Chromium

    browser = Chromium()
    try:
        browser.viewport(1280, 900)
        browser.send("Page.enable")
        browser.send("Page.addScriptToEvaluateOnNewDocument", source=PAGE_PROBE)
        firsts = []
        for _ in range(loads):
            browser.send("Page.navigate", url=url + "/")
            deadline = time.monotonic() + 60
            rendered = None
            while rendered is None or rendered < 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the page did not render within 60 s at {url}/")
                time.sleep(0.05)
                rendered = browser.evaluate("window.__bench ? window.__bench.rendered : null")
            firsts.append(rendered)
        shown = browser.evaluate(
            "({rows: document.querySelectorAll('.noderow').length,"
            " cards: document.querySelectorAll('article.gpu').length,"
            " cells: document.querySelectorAll('#heatmap .cell').length})"
        )
        node = fleet.nodes[len(fleet.nodes) // 2][0]
        sel = f'section.node[data-node="{node.node}"]'
        expand = browser.evaluate(
            TIMED_ACTION
            % (
                f"() => document.querySelector('{sel} .noderow').click()",
                f"() => document.querySelectorAll('{sel} article.gpu').length === {GPUS_PER_NODE}",
            )
        )
        trends_t0 = time.monotonic()
        while browser.evaluate(f"document.querySelectorAll('{sel} svg.trend polyline').length") < 2:
            if time.monotonic() - trends_t0 > 30:
                break
            time.sleep(0.05)
        trends_s = time.monotonic() - trends_t0
        cluster = CLUSTERS[1]
        filt = browser.evaluate(
            TIMED_ACTION
            % (
                "() => { const s = document.getElementById('filter-cluster');"
                f" s.value = '{cluster}'; s.dispatchEvent(new Event('change')); }}",
                f"() => [...document.querySelectorAll('section.node')].every((e) => e.dataset.cluster === '{cluster}')",
            )
        )
        browser.evaluate(
            "(() => { const s = document.getElementById('filter-cluster');"
            " if (s) { s.value = ''; s.dispatchEvent(new Event('change')); } })()"
        )
        t_quiet = browser.evaluate("performance.now()")
        time.sleep(15)
        tasks = browser.evaluate(f"window.__bench.longtasks.filter(([t]) => t >= {t_quiet})")
        refreshes = browser.evaluate(f"window.__bench.updates.filter((t) => t >= {t_quiet}).length")
    finally:
        browser.close()
    return {
        "first_render_ms": [round(x) for x in firsts],
        "first_render_median_ms": round(statistics.median(firsts)),
        "shown": shown,
        "expand_ms": None if expand is None else round(expand, 1),
        "expanded_trends_s": round(trends_s, 2),
        "cluster_filter_ms": None if filt is None else round(filt, 1),
        "long_tasks_15s": {
            "refreshes": refreshes,
            "count": len(tasks),
            "total_ms": round(sum(d for _, d in tasks)),
            "max_ms": round(max((d for _, d in tasks), default=0.0)),
        },
    }


def profile(pid: int, out: Path, seconds: int) -> subprocess.Popen:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--format", "speedscope"]
        + ["--rate", "200", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default=os.environ.get("GPUFLEET_BENCH_PG", ADMIN), help="PostgreSQL admin URL.")
    ap.add_argument("--nodes", type=int, default=125, help="Nodes of 8 GPUs [125: 1,000 GPUs].")
    ap.add_argument("--history", type=int, default=TREND_WINDOW_S, help="Seconds of 1-s history to fill.")
    ap.add_argument("--calls", type=int, default=40, help="Timed calls per endpoint.")
    ap.add_argument(
        "--cold-calls", type=int, default=3, help="First calls after a quiet spell, per endpoint."
    )
    ap.add_argument(
        "--page-loads", type=int, default=3, help="Times the page is loaded for its first render."
    )
    ap.add_argument("--no-page", action="store_true", help="Leave out the page in Chromium.")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy speedscope file of the timed calls.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results to this file.")
    args = ap.parse_args()
    if args.nodes < 2 or args.history < LIVE_WINDOW_S * 3:
        ap.error("give at least 2 --nodes and 15 s of --history")

    fleet = Fleet(args.nodes)
    gpus = fleet.gpus
    counts = {p.name: sum(g.profile is p for g in gpus) for p in PROFILES}
    per_gpu = statistics.mean(len(fleet.series(g)) for g in gpus)
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; fleet: {len(gpus)} GPUs on "
        f"{args.nodes} nodes, {per_gpu:.1f} series a GPU, {args.history} s of 1-s history; {counts}",
        flush=True,
    )
    results: dict = {"gpus": len(gpus), "nodes": args.nodes, "history_s": args.history, "profiles": counts}
    results["load_average_before"] = round(os.getloadavg()[0], 2)
    db = Db(args.pg, "fleetview")
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as tmp:
        port = free_port()
        log = Path(tmp) / "collector.log"
        proc = start_collector(db.url, port, log, [])
        try:
            results["fill"] = fill(fleet, port, args.history)
            print(f"fill: {results['fill']}", flush=True)
            results["latest_table"] = vacuum(db)
            fleet.catch_up(port)
            spy = profile(proc.pid, args.profile, 600) if args.profile else None

            def stop_profile() -> None:
                if spy is not None and spy.poll() is None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)

            with Live(fleet, port) as live:  # a fleet view of a fleet that stopped reporting is not the case
                results["endpoints"] = endpoints(fleet, port, args.calls, args.cold_calls, stop_profile)
            results["live_samples"] = live.samples
            stop_profile()
            results["latest_table_bytes_after_endpoints"] = latest_size(db)
            results["fleet_totals"] = fleet_totals(port)
            if not args.no_page:
                fleet.catch_up(port)
                with Live(fleet, port):
                    results["page"] = page(f"http://127.0.0.1:{port}", fleet, args.page_loads)
                print(f"page: {results['page']}", flush=True)
        except BaseException:
            print(f"collector output (last lines):\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            db.drop()
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(r: dict) -> None:
    print(f"\nfleet view at {r['gpus']:,} GPUs on {r['nodes']} nodes ({r['history_s']} s of 1-s history)")
    print(f"filled: {r['fill']}; table latest: {r['latest_table']}")
    print(
        f"table latest after the endpoints: {r['latest_table_bytes_after_endpoints']:,} bytes; {r['fleet_totals']}"
    )
    print(
        f"load average {r['load_average_before']} before, {r['load_average_after']} after"
        + f"; {r['live_samples']:,} samples pushed while the endpoints were timed"
    )
    print(f"{'endpoint':<52} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'KiB':>8}")
    for name, e in r["endpoints"].items():
        failed = f"  ({len(e['failed'])} failed)" if "failed" in e else ""
        if "answer_age_p50_s" in e:
            failed += f"  (answers {e['answer_age_p50_s']} s old p50, {e['answer_age_max_s']} s max)"
        print(
            f"{name:<52} {e['p50_ms']:>8} {e['p95_ms']:>8} {e['max_ms']:>8} {e['bytes'] / 1024:>8.0f}{failed}"
        )
    p = r.get("page")
    if p:
        lt = p["long_tasks_15s"]
        print(
            f"page: first render {p['first_render_median_ms']} ms (median of {p['first_render_ms']}), "
            f"{p['shown']}; expand a node {p['expand_ms']} ms (its trends in {p['expanded_trends_s']} s), "
            f"cluster filter {p['cluster_filter_ms']} ms"
        )
        print(
            f"page: long tasks over 15 s ({lt['refreshes']} refreshes): {lt['count']}, {lt['total_ms']} ms "
            f"in all, longest {lt['max_ms']} ms"
        )


if __name__ == "__main__":
    main()
