"""Soak: N simulated agents push remote-write at their normal interval to one collector on PostgreSQL.

Each simulated agent is a lightweight pusher (not a process) with its own node name and series (GPUS GPUs x
METRICS metrics), sampled every SAMPLE_INTERVAL seconds and pushed every PUSH_INTERVAL seconds, each agent at
its own phase. A push the collector refuses (503, connection error) stays with its agent and goes again with
the next push, as the real agent does. At the end every agent's backlog is drained and the store is counted.

    python bench/soak.py                      # 1,000 agents for 10 minutes
    python bench/soak.py --minutes 2          # a short run

Prints and writes to $OUT (default ./out) soak.json and soak.md: samples produced / acknowledged / stored
(lost = produced - stored), how late pushes went out (p50 / p99 / max), 503s, and the collector's RSS at
start, after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpufleet.core import remote_write as rw  # noqa: E402

METRICS = [
    "gpufleet_gpu_utilization_ratio",
    "gpufleet_gpu_temperature_celsius",
    "gpufleet_gpu_power_watts",
    "gpufleet_gpu_memory_used_bytes",
    "gpufleet_gpu_sm_active_ratio",
    "gpufleet_gpu_up",
]


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
        self.backlog: list[tuple[int, int]] = []  # (first ts, count) per unsent sampling tick, oldest first
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


def pg_admin(url: str, sql: str) -> None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(sql)


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
        "--pg",
        default=os.environ.get("GPUFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL admin URL; a fresh database is made and dropped",
    )
    ap.add_argument("--keep-db", action="store_true")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "./out"))
    out_dir.mkdir(parents=True, exist_ok=True)

    db_name = f"gpufleet_soak_{uuid.uuid4().hex[:8]}"
    pg_admin(args.pg, f'CREATE DATABASE "{db_name}"')
    db_url = args.pg.rsplit("/", 1)[0] + "/" + db_name
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
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}/api/v1/write"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            break
        except OSError:
            if coll.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"collector did not start: {coll.stdout.read() if coll.stdout else ''}")
            time.sleep(0.2)
    proc = psutil.Process(coll.pid)
    rss_start = proc.memory_info().rss

    http = urllib3.PoolManager(maxsize=args.workers, retries=False, timeout=urllib3.Timeout(total=30))
    headers = {
        "Content-Encoding": "snappy",
        "Content-Type": "application/x-protobuf",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
    }
    t0 = time.time()
    end = t0 + args.minutes * 60
    agents = [SimAgent(i, args.gpus, args.metrics, args.sample_interval, t0) for i in range(args.agents)]
    for a in agents:  # samples are taken up to the end of the run, however late their push goes out
        a.stop_at = end
    heap = [(t0 + random.uniform(0, args.push_interval), i) for i in range(args.agents)]
    heapq.heapify(heap)
    stats = {"pushes": 0, "ok": 0, "status_503": 0, "other_fail": 0, "acked_samples": 0}
    lags: list[float] = []
    slock = threading.Lock()

    def push(a: SimAgent, scheduled: float) -> None:
        with a.lock:
            a.sample_until(time.time())
            if not a.pending_ticks:
                return
            body, ticks = a.body()
            lag = time.time() - scheduled
            try:
                r = http.request("POST", url, body=body, headers=headers)
                status = r.status
            except Exception:
                status = 0
            if 200 <= status < 300:
                del a.pending_ticks[: len(ticks)]
            with slock:
                stats["pushes"] += 1
                lags.append(lag)
                if 200 <= status < 300:
                    stats["ok"] += 1
                    stats["acked_samples"] += len(ticks) * len(a.labels)
                elif status == 503:
                    stats["status_503"] += 1
                else:
                    stats["other_fail"] += 1

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
    rss_end = proc.memory_info().rss
    produced = sum(a.produced for a in agents)
    backlog = sum(len(a.pending_ticks) * len(a.labels) for a in agents)
    # what the store holds, whatever its layout (raw rows, compressed chunks, the current hour's head)
    from gpufleet.collector.store import Store

    count_store = Store.open(db_url, migrate_schema=False)
    stored = count_store.counts()["samples"]
    count_store.close()
    coll.send_signal(signal.SIGTERM)
    try:
        coll.wait(timeout=30)
    except subprocess.TimeoutExpired:
        coll.kill()
    if not args.keep_db:
        pg_admin(args.pg, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    lags_sorted = sorted(lags) or [0.0]
    result = {
        "agents": args.agents,
        "minutes": args.minutes,
        "gpus_per_agent": args.gpus,
        "metrics_per_gpu": args.metrics,
        "series": args.agents * args.gpus * args.metrics,
        "push_interval_s": args.push_interval,
        "sample_interval_s": args.sample_interval,
        "offered_samples_per_s": round(args.agents * args.gpus * args.metrics / args.sample_interval),
        "pushes": stats["pushes"],
        "pushes_ok": stats["ok"],
        "responses_503": stats["status_503"],
        "other_failures": stats["other_fail"],
        "samples_produced": produced,
        "samples_acknowledged": stats["acked_samples"],
        "samples_stored": stored,
        "samples_lost": produced - stored,
        "backlog_after_drain": backlog,
        "ingest_wall_s": round(t_done - t0, 1),
        "stored_per_s": round(stored / (t_done - t0)),
        # keeps up: pushes leave on time (p99 lag under one push interval) and nothing waits at the end
        "keeps_up": bool(lags_sorted[int(0.99 * (len(lags_sorted) - 1))] < args.push_interval),
        "push_lag_s": {
            "p50": round(statistics.median(lags_sorted), 3),
            "p99": round(lags_sorted[int(0.99 * (len(lags_sorted) - 1))], 3),
            "max": round(lags_sorted[-1], 3),
        },
        "collector_rss_mib": {
            "start": round(rss_start / 2**20, 1),
            "after_1_min": round((rss_warm or rss_start) / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
        },
        "machine": f"{platform.node()} {platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB, Python {platform.python_version()}",
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
    }
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2))
    md = ["| figure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in result.items()]
    (out_dir / "soak.md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))
    if result["samples_lost"] or backlog:
        sys.exit(1)


if __name__ == "__main__":
    main()
