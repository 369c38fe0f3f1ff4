"""Soak: N simulated agents push remote-write at their normal interval to one collector on PostgreSQL.

Each simulated agent is a lightweight pusher (not a process) with its own node name and series (GPUS GPUs x
METRICS metrics), sampled every SAMPLE_INTERVAL seconds and pushed every PUSH_INTERVAL seconds, each agent at
its own phase. A push the collector refuses (503, connection error) stays with its agent and goes again with
the next push, as the real agent does. At the end every agent's backlog is drained and the store is counted.

    python bench/soak.py                           # 1,000 agents for 10 minutes
    python bench/soak.py --minutes 2               # a short run
    python bench/soak.py --agents 500 --minutes 10 --cross-hour 4 --prefill
                                                   # crosses an hour boundary 4 minutes in, after a full hour
    python bench/soak.py --agents 500 --minutes 60 --cross-hour 45 --prefill
                                                   # an hour; a full hour compacted 47 minutes in

Every 10 s it records a time line: push lag (p50 / p99 / max of the pushes sent in those 10 s), samples the
collector stored per second (its own counter), the CPU of the collector, of the PostgreSQL backends serving
the soak's database, of the rest of PostgreSQL and of the whole machine, and the collector's RSS; the
store's maintenance steps (partitions, rollups, compaction, retention) are marked on it from the
collector's own log lines ("store maintenance: STEP took N s"), which it logs at their end.

``--hostile`` runs two hostile clients beside the agents, each with a token of its own (the agents get one
scoped to their cluster, so the collector runs with tokens as in production): a cardinality bomb that sends
--bomb-series new series every --bomb-interval seconds in a cluster of its own (the collector's
--max-active-series-per-cluster is set to --series-limit), and a heavy range query (every agent's
utilization over the last hour at a 1-second step) every --query-interval seconds. Their answers (status
counts, the query's latency) are recorded next to every figure of the clean soak, so the two runs compare.

    python bench/soak.py --agents 500 --minutes 2 --hostile

``--cross-hour M`` starts the run M minutes before the next full hour (UTC), so that a short run sees the
hour boundary: the new hour's partition, and a few minutes later the compaction of the hour that closed.
``--prefill`` first fills the current hour, from its start up to the run's start, with the fleet's samples
(written in PostgreSQL, as the collector's own writes would have left them) and brings the rollups up to
date, so the compaction at the boundary merges a full hour, as in a run that had been going all hour.

``--profile S`` records the collector with py-spy (200 Hz, non-blocking) for S seconds from the agents'
start and writes collector_profile.raw and collector_profile.txt: each function's inclusive share of the
samples, the figures that compare a hostile run with a clean one.

Prints and writes to $OUT (default ./out) soak.json (figures, the 10-s time line, maintenance steps) and
soak.md (the figures, a table per minute and the maintenance steps): samples produced / acknowledged /
stored (lost = produced - stored), how late pushes went out, 503s, the collector's RSS at start, after
warm-up, at the end and over the last 15 minutes, and whether the run crossed an hour boundary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import psutil
import psycopg
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.profiles import inclusive, read_stacks, share_lines  # noqa: E402
from gpufleet.core import remote_write as rw  # noqa: E402

METRICS = [
    "gpufleet_gpu_utilization_ratio",
    "gpufleet_gpu_temperature_celsius",
    "gpufleet_gpu_power_watts",
    "gpufleet_gpu_memory_used_bytes",
    "gpufleet_gpu_sm_active_ratio",
    "gpufleet_gpu_up",
]
HOUR_S = 3600
WINDOW_S = 10.0  # the time line's resolution
# The collector's line at the end of each maintenance step (collector/store/maintenance.py).
STEP_LINE = re.compile(
    r"^store maintenance: (?P<step>[a-z][a-z ]*?) took (?P<s>[0-9.]+) s(?:: (?P<detail>.*))?$"
)
SAMPLES_COUNTER = re.compile(r"^gpufleet_collector_samples_received_total (\S+)$", re.M)
ACTIVE_SERIES = re.compile(r"^gpufleet_collector_active_series (\S+)$", re.M)
# --hostile: the secrets of the agents', the bomb's and the querier's tokens
AGENTS_TOKEN, BOMB_TOKEN, READER_TOKEN = "soak-agents-token", "soak-bomb-token", "soak-reader-token"


class SimAgent:
    def __init__(self, i: int, gpus: int, metrics: int, sample_interval: float, start: float) -> None:
        self.node = f"soak-node-{i:05d}"
        self.labels = [
            {
                "__name__": m,
                "node": self.node,
                "gpu": str(g),
                "uuid": f"GPU-soak-{i:05d}-{g}",
                "model": "NVIDIA H100 80GB HBM3",
                "cluster": "soak",
            }
            for g in range(gpus)
            for m in METRICS[:metrics]
        ]
        self.sample_interval = sample_interval
        self.next_sample = start
        self.pending_ticks: list[int] = []
        self.lock = threading.Lock()
        self.produced = 0
        self.stop_at = float("inf")  # the end of the run: no samples after it

    def sample_until(self, now: float) -> None:
        while self.next_sample <= min(now, self.stop_at):
            self.pending_ticks.append(int(self.next_sample * 1000))
            self.produced += len(self.labels)
            self.next_sample += self.sample_interval

    def body(self) -> tuple[bytes, list[int]]:
        ticks = list(self.pending_ticks)
        series = [rw.Series(dict(lab), [(t, float(t % 97)) for t in ticks]) for lab in self.labels]
        return rw.encode(series), ticks


class Hostile:
    """--hostile: a cardinality bomb and a heavy range query, each in a thread of its own until ``stop``."""

    def __init__(self, base: str, args: argparse.Namespace) -> None:
        self.base = base
        self.args = args
        self.stop = threading.Event()
        self.bomb_statuses: dict[str, int] = {}
        self.bomb_offered = 0
        self.bomb_stored = 0
        self.query_statuses: dict[str, int] = {}
        self.query_s: list[float] = []
        self._http = urllib3.PoolManager(maxsize=2, retries=False, timeout=urllib3.Timeout(total=60))
        self._threads = [
            threading.Thread(target=self._bomb, daemon=True),
            threading.Thread(target=self._query, daemon=True),
        ]

    def start(self) -> Hostile:
        for t in self._threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(90)

    def _bomb(self) -> None:
        n = self.args.bomb_series
        k = 0
        while not self.stop.wait(self.args.bomb_interval):
            now = int(time.time() * 1000)
            series = [
                rw.Series(
                    {
                        "__name__": "gpufleet_gpu_temperature_celsius",
                        "cluster": "bomb",
                        "node": f"bomb-{(k + i) // 8}",
                        "gpu": str((k + i) % 8),
                        "uuid": f"GPU-bomb-{k + i}",
                    },
                    [(now, 40.0)],
                )
                for i in range(n)
            ]
            k += n
            status = self._post(rw.encode(series))
            self.bomb_offered += n
            self.bomb_stored += n if 200 <= status < 300 else 0
            self.bomb_statuses[str(status)] = self.bomb_statuses.get(str(status), 0) + 1

    def _post(self, body: bytes) -> int:
        try:
            return self._http.request(
                "POST",
                self.base + "/api/v1/write",
                body=body,
                headers={
                    "Content-Encoding": "snappy",
                    "Content-Type": "application/x-protobuf",
                    "Authorization": f"Bearer {BOMB_TOKEN}",
                },
            ).status
        except Exception:
            return 0

    def _query(self) -> None:
        while not self.stop.wait(self.args.query_interval):
            end = time.time()
            q = f"metric={METRICS[0]}&start={end - HOUR_S}&end={end}&step=1"
            t = time.perf_counter()
            try:
                status = self._http.request(
                    "GET",
                    f"{self.base}/api/v1/query_range?{q}",
                    headers={"Authorization": f"Bearer {READER_TOKEN}"},
                ).status
            except Exception:
                status = 0
            self.query_s.append(time.perf_counter() - t)
            self.query_statuses[str(status)] = self.query_statuses.get(str(status), 0) + 1

    def result(self, active_series: float | None) -> dict[str, Any]:
        qs = sorted(self.query_s) or [0.0]
        return {
            "bomb": {
                "every_s": self.args.bomb_interval,
                "series_per_request": self.args.bomb_series,
                "series_limit_per_cluster": self.args.series_limit,
                "statuses": self.bomb_statuses,
                "series_offered": self.bomb_offered,
                "series_stored": self.bomb_stored,
            },
            "query_range": {
                "every_s": self.args.query_interval,
                "statuses": self.query_statuses,
                "latency_s": {
                    "p50": round(statistics.median(qs), 3),
                    "p99": round(percentile(qs, 0.99), 3),
                    "max": round(qs[-1], 3),
                },
            },
            "collector_active_series_at_end": active_series,
        }


def profile_collector(pid: int, seconds: float, out_dir: Path) -> subprocess.Popen:
    """py-spy on the collector for ``seconds`` (200 Hz, non-blocking, raw stacks) into collector_profile.raw."""
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [
        str(spy) if spy.exists() else "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
    ]
    cmd += ["--rate", "200", "--nonblocking", "--format", "raw", "-o", str(out_dir / "collector_profile.raw")]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write_profile_shares(out_dir: Path, top: int = 150) -> None:
    """collector_profile.txt: each function's share of the samples whose stacks it is in (once a stack)."""
    raw = out_dir / "collector_profile.raw"
    if not raw.exists():
        (out_dir / "collector_profile.txt").write_text(
            "py-spy wrote nothing (is it installed? pip install py-spy)\n"
        )
        return
    stacks = read_stacks(raw)
    total = sum(n for _, n in stacks)
    lines = [f"{total} samples; inclusive share of each function (threading and runpy frames left out)"]
    lines += share_lines(
        inclusive(stacks), total, top, lambda name: "threading.py" not in name and "runpy" not in name
    )
    (out_dir / "collector_profile.txt").write_text("\n".join(lines) + "\n")


def pg_admin(url: str, sql: str) -> None:
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute(sql)


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def percentile(xs: list[float], q: float) -> float:
    return xs[int(q * (len(xs) - 1))] if xs else 0.0


def utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M:%S")


class CollectorLog:
    """Reads the collector's JSON log lines as they come (an unread pipe would fill and stall its logging):
    maintenance steps with their start and end, warnings and errors, and the last lines for a failed start."""

    def __init__(self, stream: IO[str]) -> None:
        self.steps: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.tail: deque[str] = deque(maxlen=200)
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.tail.append(line.rstrip())
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            msg = str(rec.get("message", ""))
            m = STEP_LINE.match(msg)
            if m:
                end = dt.datetime.fromisoformat(rec["time"]).timestamp()
                took = float(m.group("s"))
                self.steps.append(
                    {
                        "step": m.group("step"),
                        "start": end - took,
                        "end": end,
                        "detail": m.group("detail") or "",
                    }
                )
            elif rec.get("level") in ("warning", "error"):
                self.problems.append(f"{rec.get('time')} {rec.get('level')} {rec.get('logger')}: {msg}")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Sampler:
    """Every WINDOW_S: the collector's stored-samples counter, CPU of the collector, of the soak database's
    PostgreSQL backends, of the rest of PostgreSQL, of this load generator and of the machine, and RSS."""

    def __init__(self, coll: psutil.Process, metrics_url: str, db_url: str, db_name: str) -> None:
        self.coll = coll
        self.metrics_url = metrics_url
        self.db_name = db_name
        self.rows: list[dict[str, Any]] = []
        self._db_url = libpq(db_url)
        self._conn: psycopg.Connection[Any] | None = None
        self._own = psutil.Process()
        self._pg_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._last = self._read()
        psutil.cpu_percent()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._conn is not None:
            self._conn.close()

    def _stored(self) -> float | None:
        try:
            body = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        except OSError:
            return None
        m = SAMPLES_COUNTER.search(body)
        return float(m.group(1)) if m else None

    def _pg(self) -> tuple[float, float]:
        """CPU seconds since the last call of (this database's backends, every other PostgreSQL process),
        per process: a backend that started in between counts from its start, one that ended is left out."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._db_url, autocommit=True, connect_timeout=5)
        mine = {
            pid
            for (pid,) in self._conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.db_name,),
            )
        }
        own = other = 0.0
        seen: dict[int, float] = {}
        for p in psutil.process_iter(["name"]):
            if p.info["name"] != "postgres":
                continue
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            seen[p.pid] = cpu = t.user + t.system
            delta = cpu - self._pg_cpu.get(p.pid, 0.0)
            if p.pid in mine:
                own += delta
            else:
                other += delta
        self._pg_cpu = seen
        return own, other

    def _read(self) -> dict[str, float]:
        ct = self.coll.cpu_times()
        gt = self._own.cpu_times()
        pg_own, pg_other = self._pg()
        return {
            "t": time.time(),
            "stored": self._stored() or math.nan,  # nan: the scrape failed
            "coll_cpu": ct.user + ct.system,
            "gen_cpu": gt.user + gt.system,
            "pg_own": pg_own,
            "pg_other": pg_other,
        }

    def _run(self) -> None:
        next_at = self._last["t"] + WINDOW_S
        while not self._stop.wait(max(0.0, next_at - time.time())):
            next_at += WINDOW_S
            try:
                now = self._read()
                rss = self.coll.memory_info().rss
            except psutil.Error:  # the collector is gone
                break
            except psycopg.Error:  # PostgreSQL restarting: no reading for this window
                if self._conn is not None:
                    self._conn.close()
                continue
            self.rows.append(self._row(self._last, now, rss))
            self._last = now

    @staticmethod
    def _row(last: dict[str, float], now: dict[str, float], rss: int) -> dict[str, Any]:
        span = now["t"] - last["t"]
        stored = (now["stored"] - last["stored"]) / span
        return {
            "start": last["t"],
            "end": now["t"],
            "stored_per_s": None if stored != stored else round(stored),
            "collector_cpu_pct": round((now["coll_cpu"] - last["coll_cpu"]) / span * 100, 1),
            "pg_backends_cpu_pct": round(now["pg_own"] / span * 100, 1),
            "pg_other_cpu_pct": round(now["pg_other"] / span * 100, 1),
            "load_generator_cpu_pct": round((now["gen_cpu"] - last["gen_cpu"]) / span * 100, 1),
            "machine_cpu_pct": round(psutil.cpu_percent() * psutil.cpu_count(), 1),
            "load_1m": round(os.getloadavg()[0], 2),
            "collector_rss_mib": round(rss / 2**20, 1),
        }


def prefill(db_url: str, agents: list[SimAgent], start_ms: int, end_ms: int, args: argparse.Namespace) -> int:
    """Fill [start_ms, end_ms) with every agent's samples, as the collector's writes leave them in the hour's
    head partition (one chunk row per series and push), then bring the rollups up to date with the store's
    own maintenance pass. The series are registered through the store's write path (one sample each at
    ``start_ms``). Returns the samples written."""
    from gpufleet.collector.store import Store

    store = Store.open(db_url)
    try:
        store.write(
            [rw.Series(dict(lab), [(start_ms, float(start_ms % 97))]) for a in agents for lab in a.labels]
        )
        series = sum(len(a.labels) for a in agents)
        step = int(args.sample_interval * 1000)
        per_push = max(1, round(args.push_interval / args.sample_interval))
        width = step * per_push
        first = start_ms + step
        last = end_ms - width  # the last chunk ends before end_ms
        if last < first:
            return series
        dts = "{" + ",".join(["0"] + [str(step)] * (per_push - 1)) + "}"
        with psycopg.connect(libpq(db_url), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO sample_head (series_id, start_ms, end_ms, dts, vals) "
                "SELECT s.id, t, t + %(span)s, %(dts)s::int4[], "
                "ARRAY(SELECT ((t + j * %(step)s) %% 97)::float8 FROM generate_series(0, %(n)s - 1) j) "
                "FROM series s, generate_series(%(first)s::int8, %(last)s::int8, %(width)s::int8) t",
                {
                    "span": width - step,
                    "dts": dts,
                    "step": step,
                    "n": per_push,
                    "first": first,
                    "last": last,
                    "width": width,
                },
            )
            conn.execute("VACUUM ANALYZE sample_head")
        store.maintain(end_ms)
        return series + series * per_push * ((last - first) // width + 1)
    finally:
        store.close()


def window_rows(
    t0: float,
    t_end: float,
    pushes: list[tuple[float, float, int]],
    sampler: Sampler,
    steps: list[dict[str, Any]],
    width: float,
) -> list[dict[str, Any]]:
    """One row per ``width`` seconds from t0: push lag of the pushes sent then, and the sampler's readings
    (averaged over the windows that fall in it) and the maintenance steps that ran in it (seconds each)."""
    n = max(1, int((t_end - t0) // width) + (1 if (t_end - t0) % width else 0))
    lag_by: list[list[float]] = [[] for _ in range(n)]
    refused = [0] * n
    for start, lag, status in pushes:
        k = int((start - t0) // width)
        if 0 <= k < n:
            lag_by[k].append(lag)
            refused[k] += not 200 <= status < 300
    out = []
    for k in range(n):
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        lags = sorted(lag_by[k])
        samp = [r for r in sampler.rows if lo <= (r["start"] + r["end"]) / 2 < hi]
        row: dict[str, Any] = {
            "t_s": round(k * width),
            "utc": utc(lo),
            "pushes": len(lags),
            "refused": refused[k],
            "lag_p50_s": round(percentile(lags, 0.5), 2),
            "lag_p99_s": round(percentile(lags, 0.99), 2),
            "lag_max_s": round(lags[-1] if lags else 0.0, 2),
        }
        for key in (
            "stored_per_s",
            "collector_cpu_pct",
            "pg_backends_cpu_pct",
            "pg_other_cpu_pct",
            "load_generator_cpu_pct",
            "machine_cpu_pct",
            "load_1m",
            "collector_rss_mib",
        ):
            vals = [r[key] for r in samp if r[key] is not None]
            mean = statistics.fmean(vals) if vals else None
            row[key] = None if mean is None else round(mean) if key == "stored_per_s" else round(mean, 1)
        busy: dict[str, float] = {}
        for s in steps:
            overlap = min(hi, s["end"]) - max(lo, s["start"])
            if overlap > 0 or (s["end"] == s["start"] and lo <= s["end"] < hi):
                busy[s["step"]] = round(busy.get(s["step"], 0.0) + max(overlap, 0.0), 1)
        row["maintenance"] = busy
        out.append(row)
    return out


def minute_table(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        "| minute (UTC) | pushes | refused | lag p50 s | lag p99 s | lag max s | stored/s | collector CPU % | "
        "PG backends CPU % | PG other CPU % | machine CPU % | load | RSS MiB | maintenance (s in the minute) |"
    )
    md = [head, "|" + " --- |" * 14]
    for r in rows:
        jobs = ", ".join(f"{k} {v:g}" for k, v in r["maintenance"].items()) or ""

        def f(v: Any) -> str:
            return "" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:g}"

        md.append(
            f"| {r['t_s'] // 60} ({r['utc'][:5]}) | {r['pushes']} | {r['refused']} | {f(r['lag_p50_s'])} | "
            f"{f(r['lag_p99_s'])} | {f(r['lag_max_s'])} | {f(r['stored_per_s'])} | {f(r['collector_cpu_pct'])} | "
            f"{f(r['pg_backends_cpu_pct'])} | {f(r['pg_other_cpu_pct'])} | {f(r['machine_cpu_pct'])} | "
            f"{f(r['load_1m'])} | {f(r['collector_rss_mib'])} | {jobs} |"
        )
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per agent")
    ap.add_argument(
        "--metrics", type=int, default=4, choices=range(1, len(METRICS) + 1), help="metrics per GPU"
    )
    ap.add_argument("--push-interval", type=float, default=5.0, help="the agent's default")
    ap.add_argument("--sample-interval", type=float, default=1.0, help="the agent's default")
    ap.add_argument("--workers", type=int, default=32, help="concurrent pushes")
    ap.add_argument(
        "--resend-share",
        type=float,
        default=0.0,
        metavar="F",
        help="share of stored pushes whose answer the agent never gets (a timeout, a proxy): it sends "
        "the same samples again with its next push, which the collector finds already stored",
    )
    ap.add_argument(
        "--cross-hour",
        type=float,
        metavar="MIN",
        help="start the run MIN minutes before the next full hour (UTC), waiting for that moment",
    )
    ap.add_argument(
        "--prefill",
        action="store_true",
        help="fill the current hour up to the run's start first, so the boundary compacts a full hour",
    )
    ap.add_argument(
        "--pg",
        default=os.environ.get("GPUFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL admin URL; a fresh database is made and dropped",
    )
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument(
        "--profile", type=float, default=0.0, help="seconds of py-spy on the collector from the agents' start"
    )
    ap.add_argument(
        "--hostile",
        action="store_true",
        help="beside the agents, a cardinality bomb and a heavy range query (see above); off by default",
    )
    ap.add_argument("--bomb-series", type=int, default=2000, help="--hostile: new series per bomb request")
    ap.add_argument(
        "--bomb-interval", type=float, default=3.0, help="--hostile: seconds between bomb requests"
    )
    ap.add_argument(
        "--query-interval", type=float, default=5.0, help="--hostile: seconds between heavy queries"
    )
    ap.add_argument(
        "--series-limit",
        type=int,
        default=50_000,
        help="--hostile: the collector's --max-active-series-per-cluster (the agents' cluster stays under it)",
    )
    args = ap.parse_args()
    if not 0 <= args.resend_share < 1:
        sys.exit(f"--resend-share {args.resend_share}: give a share between 0 and 1 (e.g. 0.01)")
    if args.cross_hour is not None and not 0 < args.cross_hour < 60:
        sys.exit(
            f"--cross-hour {args.cross_hour}: give the minutes before the hour, between 0 and 60 (e.g. 4)"
        )
    out_dir = Path(os.environ.get("OUT", "./out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start_at = None
    if args.cross_hour is not None:
        start_at = (time.time() // HOUR_S + 1) * HOUR_S - args.cross_hour * 60
        # Setup: the collector's start, and the prefill (here about 3 minutes an hour of 16,000 series).
        series = args.agents * args.gpus * args.metrics
        setup_s = 15 + (60 + 12 * series / 1000 * (60 - args.cross_hour) / 60 if args.prefill else 0)
        if start_at < time.time() + setup_s:  # too close: the hour after
            start_at += HOUR_S
        print(f"the run starts at {utc(start_at)} UTC, {args.cross_hour:g} min before the hour", flush=True)
        time.sleep(max(0.0, start_at - setup_s - time.time()))

    db_name = f"gpufleet_soak_{uuid.uuid4().hex[:8]}"
    pg_admin(args.pg, f'CREATE DATABASE "{db_name}"')
    db_url = args.pg.rsplit("/", 1)[0] + "/" + db_name
    agents_t0 = start_at if start_at is not None else time.time()
    agents = [
        SimAgent(i, args.gpus, args.metrics, args.sample_interval, agents_t0) for i in range(args.agents)
    ]
    prefilled = 0
    if args.prefill:
        t = time.time()
        hour_start_ms = int(agents_t0 // HOUR_S * HOUR_S * 1000)
        prefilled = prefill(db_url, agents, hour_start_ms, int(min(time.time(), agents_t0) * 1000), args)
        print(
            f"prefilled {prefilled:,} samples from {utc(hour_start_ms / 1000)} in {time.time() - t:.0f} s",
            flush=True,
        )
    port = 20000 + random.randrange(20000)
    coll = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "collector",
            "--db",
            db_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--eval-interval",
            "5",
            "--log-format",
            "json",
            *(
                [
                    "--tokens",
                    f"{AGENTS_TOKEN}@soak,{BOMB_TOKEN}@bomb",
                    "--read-tokens",
                    READER_TOKEN,
                    "--max-active-series-per-cluster",
                    str(args.series_limit),
                ]
                if args.hostile
                else []
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert coll.stdout is not None
    log = CollectorLog(coll.stdout)
    url = f"http://127.0.0.1:{port}/api/v1/write"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            break
        except OSError:
            if coll.poll() is not None or time.monotonic() > deadline:
                log.join(5)
                sys.exit("collector did not start:\n" + "\n".join(log.tail))
            time.sleep(0.2)
    proc = psutil.Process(coll.pid)
    rss_start = proc.memory_info().rss
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    sampler = Sampler(proc, f"http://127.0.0.1:{port}/metrics", db_url, db_name).start()
    spy = profile_collector(coll.pid, args.profile, out_dir) if args.profile > 0 else None

    http = urllib3.PoolManager(maxsize=args.workers, retries=False, timeout=urllib3.Timeout(total=30))
    headers = {
        "Content-Encoding": "snappy",
        "Content-Type": "application/x-protobuf",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
        **({"Authorization": f"Bearer {AGENTS_TOKEN}"} if args.hostile else {}),
    }
    t0 = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    end = t0 + args.minutes * 60
    for a in agents:  # samples are taken up to the end of the run, however late their push goes out
        a.next_sample = max(a.next_sample, t0)
        a.stop_at = end
    heap = [(t0 + random.uniform(0, args.push_interval), i) for i in range(args.agents)]
    heapq.heapify(heap)
    stats = {"pushes": 0, "ok": 0, "status_503": 0, "other_fail": 0, "acked_samples": 0, "resent": 0}
    failed_statuses: dict[str, int] = {}
    pushes: list[tuple[float, float, int]] = []  # (sent at, lag, HTTP status; 0: no answer)
    slock = threading.Lock()

    def push(a: SimAgent, scheduled: float) -> None:
        with a.lock:
            a.sample_until(time.time())
            if not a.pending_ticks:
                return
            body, ticks = a.body()
            sent = time.time()
            error = ""
            try:
                r = http.request("POST", url, body=body, headers=headers)
                status = r.status
            except Exception as e:
                status, error = 0, type(e).__name__
            answer_lost = 200 <= status < 300 and random.random() < args.resend_share
            if 200 <= status < 300 and not answer_lost:
                del a.pending_ticks[: len(ticks)]
            with slock:
                stats["pushes"] += 1
                pushes.append((sent, sent - scheduled, status))
                if answer_lost:
                    stats["resent"] += 1
                elif 200 <= status < 300:
                    stats["ok"] += 1
                    stats["acked_samples"] += len(ticks) * len(a.labels)
                elif status == 503:
                    stats["status_503"] += 1
                else:
                    stats["other_fail"] += 1
                    key = str(status) if status else f"no answer ({error})"
                    failed_statuses[key] = failed_statuses.get(key, 0) + 1

    hostile = Hostile(f"http://127.0.0.1:{port}", args).start() if args.hostile else None
    rss_warm = None
    inflight: list = []
    with ThreadPoolExecutor(args.workers) as pool:
        while heap and heap[0][0] < end:
            when, i = heapq.heappop(heap)
            delay = when - time.time()
            if delay > 0:
                time.sleep(delay)
            inflight.append(pool.submit(push, agents[i], when))
            heapq.heappush(heap, (when + args.push_interval, i))
            if rss_warm is None and time.time() - t0 > 60:
                rss_warm = proc.memory_info().rss
            if len(inflight) > 4 * args.workers:
                inflight = [f for f in inflight if not f.done()]
        for f in inflight:
            f.result()
        for a in agents:
            with a.lock:
                a.sample_until(end)
        # drain every backlog (what a 503 left behind), as agents would on their next pushes
        drain_deadline = time.monotonic() + 300
        while any(a.pending_ticks for a in agents) and time.monotonic() < drain_deadline:
            list(pool.map(lambda a: push(a, time.time()) if a.pending_ticks else None, agents))
    t_done = time.time()
    active_series = None
    if hostile is not None:
        hostile.join()
        try:
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            m = ACTIVE_SERIES.search(scraped)
            active_series = float(m.group(1)) if m else None
        except OSError:
            pass
    time.sleep(WINDOW_S)  # the last window's readings
    sampler.stop()
    if spy is not None:
        spy.wait()
        write_profile_shares(out_dir)
    rss_end = proc.memory_info().rss
    produced = sum(a.produced for a in agents)
    backlog = sum(len(a.pending_ticks) * len(a.labels) for a in agents)
    # what the store holds, whatever its layout (raw rows, compressed chunks, the current hour's head)
    from gpufleet.collector.store import Store

    count_store = Store.open(db_url, migrate_schema=False)
    stored = count_store.counts()["samples"] - prefilled
    if hostile is not None:  # the agents' samples only: the bomb's series hold one sample each
        stored -= hostile.bomb_stored
    count_store.close()
    coll.send_signal(signal.SIGTERM)
    try:
        coll.wait(timeout=30)
    except subprocess.TimeoutExpired:
        coll.kill()
    log.join(5)
    if not args.keep_db:
        pg_admin(args.pg, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    lags_sorted = sorted(lag for _, lag, _ in pushes) or [0.0]
    steps = [s for s in log.steps if s["end"] >= t0 - 5]
    timeline = window_rows(t0, t_done, pushes, sampler, steps, WINDOW_S)
    minutes = window_rows(t0, t_done, pushes, sampler, steps, 60.0)
    boundaries = [utc(h) for h in range(int(t0 // HOUR_S + 1) * HOUR_S, int(t_done) + 1, HOUR_S)]
    last15 = [r["collector_rss_mib"] for r in sampler.rows if r["end"] >= t_done - 15 * 60]
    result = {
        "agents": args.agents,
        "minutes": args.minutes,
        "gpus_per_agent": args.gpus,
        "metrics_per_gpu": args.metrics,
        "series": args.agents * args.gpus * args.metrics,
        "push_interval_s": args.push_interval,
        "sample_interval_s": args.sample_interval,
        "offered_samples_per_s": round(args.agents * args.gpus * args.metrics / args.sample_interval),
        "started_utc": dt.datetime.fromtimestamp(t0, dt.timezone.utc).isoformat(timespec="seconds"),
        "hour_boundaries_crossed_utc": boundaries,
        "prefilled_samples": prefilled,
        "pushes": stats["pushes"],
        "pushes_ok": stats["ok"],
        "responses_503": stats["status_503"],
        "pushes_sent_again_answer_lost": stats["resent"],
        "other_failures": stats["other_fail"],
        "other_failures_by_status": failed_statuses,
        "samples_produced": produced,
        "samples_acknowledged": stats["acked_samples"],
        "samples_stored": stored,
        "samples_lost": produced - stored,
        "backlog_after_drain": backlog,
        "ingest_wall_s": round(t_done - t0, 1),
        "stored_per_s": round(stored / (t_done - t0)),
        # keeps up: pushes leave on time (p99 lag under one push interval) and nothing waits at the end
        "keeps_up": bool(percentile(lags_sorted, 0.99) < args.push_interval),
        "push_lag_s": {
            "p50": round(statistics.median(lags_sorted), 3),
            "p99": round(percentile(lags_sorted, 0.99), 3),
            "max": round(lags_sorted[-1], 3),
        },
        "collector_rss_mib": {
            "start": round(rss_start / 2**20, 1),
            "after_1_min": round((rss_warm or rss_start) / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
            "last_15_min_min": min(last15) if last15 else None,
            "last_15_min_max": max(last15) if last15 else None,
        },
        "collector_warnings": log.problems[:20],
        "machine": f"{platform.node()} {platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB, Python {platform.python_version()}",
        "load_average_at_start": load_at_start,
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
    }
    if hostile is not None:
        result["hostile"] = hostile.result(active_series)
    summary = dict(result)
    result["maintenance"] = [
        {
            "step": s["step"],
            "start_utc": utc(s["start"]),
            "start_s": round(s["start"] - t0, 1),
            "took_s": round(s["end"] - s["start"], 2),
            "detail": s["detail"],
        }
        for s in steps
    ]
    result["timeline"] = timeline
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2))
    md = ["| figure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in summary.items()]
    md += ["", "Per minute (push lag of the pushes sent in that minute; CPU in % of one core):", ""]
    md += minute_table(minutes)
    md += [
        "",
        "Maintenance steps that took 1 s or more:",
        "",
        "| start (UTC) | s into run | step | took s | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    md += [
        f"| {m['start_utc']} | {m['start_s']} | {m['step']} | {m['took_s']} | {m['detail']} |"
        for m in result["maintenance"]
        if m["took_s"] >= 1
    ]
    (out_dir / "soak.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if result["samples_lost"] or backlog:
        sys.exit(1)


if __name__ == "__main__":
    main()
