"""Store benchmark: ingest through the real HTTP endpoint, bytes on disk per sample, 24-hour fleet query.

    python bench/ingest.py [--pg postgresql://postgres@127.0.0.1:5432/test] [--seconds 20]

Prints, side by side in one run, the compressed-chunk layout (what the collector uses on PostgreSQL)
against the naive one-row-per-sample baseline:
  * GPU samples per second (one GPU, all 21 core fields, one timestamp) sustained into PostgreSQL
    through POST /api/v1/write of a `gpufleet collector` process (agents' batches of 8 GPUs x 5 s)
    for a fleet of 1,250 nodes whose series are known (each node's first batch, which registers its
    series, is pushed before the timed run and reported on its own as "first contact"),
  * bytes on disk per metric sample (pg_total_relation_size of tables + indexes + TOAST / samples),
    for one hour of 1-second data, after the collector's compaction,
  * latency of a 24-hour fleet query for 1,000 GPUs (fleet-average SM active per 1-minute step) through
    the SQL views Grafana reads, with the 1-minute rollups and from raw samples.
Needs PostgreSQL (creates and drops its own databases) and this repository installed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpufleet.collector.store import Store  # noqa: E402
from gpufleet.core import remote_write as rw  # noqa: E402

CORE = [  # (metric, generator(gpu, t) -> value): shaped like what NVML and GPM report
    ("gpufleet_gpu_up", lambda g, t, r: 1.0),
    ("gpufleet_gpu_utilization_ratio", lambda g, t, r: r.randint(85, 100) / 100),
    ("gpufleet_gpu_memory_bandwidth_utilization_ratio", lambda g, t, r: r.randint(30, 60) / 100),
    ("gpufleet_gpu_memory_used_bytes", lambda g, t, r: float((70_000 + g * 10) << 20)),
    ("gpufleet_gpu_memory_free_bytes", lambda g, t, r: float((11_559 - g * 10) << 20)),
    ("gpufleet_gpu_memory_total_bytes", lambda g, t, r: float(81_559 << 20)),
    ("gpufleet_gpu_temperature_celsius", lambda g, t, r: float(r.randint(60, 75))),
    ("gpufleet_gpu_slowdown_temperature_celsius", lambda g, t, r: 87.0),
    ("gpufleet_gpu_shutdown_temperature_celsius", lambda g, t, r: 92.0),
    ("gpufleet_gpu_power_watts", lambda g, t, r: r.randint(550_000, 700_000) / 1000),
    ("gpufleet_gpu_power_limit_watts", lambda g, t, r: 700.0),
    ("gpufleet_gpu_energy_joules_total", lambda g, t, r: 1e9 + g * 1e6 + t * 0.65),
    ("gpufleet_gpu_sm_clock_hertz", lambda g, t, r: 1_980e6),
    ("gpufleet_gpu_memory_clock_hertz", lambda g, t, r: 2_619e6),
    ("gpufleet_gpu_sm_active_ratio", lambda g, t, r: r.random() * 0.2 + 0.75),
    ("gpufleet_gpu_sm_occupancy_ratio", lambda g, t, r: r.random() * 0.2 + 0.4),
    ("gpufleet_gpu_tensor_active_ratio", lambda g, t, r: r.random() * 0.3 + 0.4),
    ("gpufleet_gpu_dram_active_ratio", lambda g, t, r: r.random() * 0.3 + 0.3),
    ("gpufleet_gpu_fp64_active_ratio", lambda g, t, r: 0.0),
    ("gpufleet_gpu_fp32_active_ratio", lambda g, t, r: r.random() * 0.1),
    ("gpufleet_gpu_fp16_active_ratio", lambda g, t, r: r.random() * 0.1),
]
GPUS_PER_NODE = 8
PUSH_SECONDS = 5
ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def labels(node: int, gpu: int, metric: str) -> dict[str, str]:
    return {
        "__name__": metric,
        "cluster": "bench",
        "node": f"node-{node:04d}",
        "gpu": str(gpu),
        "uuid": f"GPU-{node:04d}-{gpu}",
        "model": "NVIDIA H100 80GB HBM3",
    }


def node_series(node: int, t0_ms: int, seconds: int, rnd: random.Random) -> list[rw.Series]:
    out = []
    for gpu in range(GPUS_PER_NODE):
        g = node * GPUS_PER_NODE + gpu
        for metric, fn in CORE:
            out.append(
                rw.Series(
                    labels(node, gpu, metric),
                    [(t0_ms + i * 1000, fn(g, t0_ms / 1000 + i, rnd)) for i in range(seconds)],
                )
            )
    return out


class Db:
    def __init__(self, admin: str, tag: str) -> None:
        self.admin = admin
        self.name = f"gpufleet_bench_{tag}_{uuidlib.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        self.url = admin.rsplit("/", 1)[0] + "/" + self.name

    def drop(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def size(self, tables: list[str]) -> int:
        with psycopg.connect(self.url) as c:
            total = 0
            for t in tables:
                total += (
                    c.execute(
                        "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) "
                        "FROM pg_partition_tree(%s::regclass)",
                        (t,),
                    ).fetchone()[0]
                    or c.execute("SELECT pg_total_relation_size(%s::regclass)", (t,)).fetchone()[0]
                )
            return int(total)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def push(port: int, bodies: list[tuple[bytes, int]], seconds: float | None, workers: int) -> dict:
    """Push pre-encoded agent batches over ``workers`` keep-alive connections as fast as the collector
    takes them, until they run out or ``seconds`` pass; count GPU samples acknowledged with 204."""
    lock = threading.Lock()
    it = iter(bodies)
    done = {"gpu_samples": 0, "requests": 0, "errors": 0}
    stop_at = time.monotonic() + seconds if seconds is not None else float("inf")

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {
            "Content-Type": rw.CONTENT_TYPE,
            "Content-Encoding": rw.CONTENT_ENCODING,
            "X-Prometheus-Remote-Write-Version": rw.PROTOCOL_VERSION,
        }
        while time.monotonic() < stop_at:
            with lock:
                item = next(it, None)
            if item is None:
                return
            body, gpu_samples = item
            conn.request("POST", "/api/v1/write", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            with lock:
                if resp.status == 204:
                    done["gpu_samples"] += gpu_samples
                    done["requests"] += 1
                else:
                    done["errors"] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {**done, "seconds": round(elapsed, 2), "gpu_samples_per_s": round(done["gpu_samples"] / elapsed)}


def ingest_http(
    db: Db,
    layout: str,
    warm: list[tuple[bytes, int]],
    bodies: list[tuple[bytes, int]],
    seconds: float,
    workers: int,
) -> dict:
    """Start a real collector process; push ``warm`` (one batch per node: registers every series, the
    first contact of each GPU), then ``bodies`` for ``seconds``: the sustained rate of a known fleet."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "collector",
            "--db",
            db.url,
            "--listen",
            f"127.0.0.1:{port}",
            "--raw-layout",
            layout,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"collector did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        first = push(port, warm, None, workers)
        result = push(port, bodies, seconds, workers)
        return {**result, "first_contact": first}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def storage(db: Db, layout: str, gpus: int) -> dict:
    """One hour of 1-second data for ``gpus`` GPUs, written in agents' 5-second batches, then compacted."""
    store = Store.open(db.url, raw_layout=layout)
    t0 = 1_800_000_000_000 // 3_600_000 * 3_600_000
    rnd = random.Random(7)
    nodes = max(1, gpus // GPUS_PER_NODE)
    started = time.perf_counter()
    for w in range(3600 // PUSH_SECONDS):
        for node in range(nodes):
            store.write(
                node_series(node, t0 + w * PUSH_SECONDS * 1000, PUSH_SECONDS, rnd),
                now_ms=t0 + (w + 1) * PUSH_SECONDS * 1000,
            )
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    store.maintain(now_ms=t0 + 3 * 3_600_000)
    maintain_s = time.perf_counter() - started
    with psycopg.connect(db.url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")
    samples = store.counts()["samples"]
    store.close()
    tables = ["sample_chunks", "sample_head", "samples"] if layout == "chunks" else ["samples"]
    size = db.size(tables)
    return {
        "samples": samples,
        "bytes": size,
        "bytes_per_sample": round(size / samples, 2),
        "direct_write_s": round(write_s, 1),
        "compaction_and_rollup_s": round(maintain_s, 1),
    }


def fleet_query(db: Db, gpus: int, interval_s: int) -> dict:
    """24 hours of SM activity for ``gpus`` GPUs every ``interval_s`` seconds, generated in PostgreSQL as
    compacted hourly chunks, rolled up by the collector's own maintenance, then queried both ways."""
    store = Store.open(db.url)
    day0 = 1_800_000_000_000 // 86_400_000 * 86_400_000
    with psycopg.connect(db.url, autocommit=True) as c:
        c.execute(
            "INSERT INTO series (fingerprint, metric, labels, node, uuid, created_ms) "
            "SELECT g, 'gpufleet_gpu_sm_active_ratio', json_build_object('node', 'node-' || g / 8, "
            "'gpu', (g %% 8)::text, 'uuid', 'GPU-' || g, 'model', 'H100', 'cluster', 'bench')::text, "
            "'node-' || g / 8, 'GPU-' || g, 0 FROM generate_series(1, %s) g",
            (gpus,),
        )
        for d in (day0, day0 + 86_400_000):
            c.execute(
                f"CREATE TABLE sample_chunks_p{d // 86_400_000} PARTITION OF sample_chunks "
                f"FOR VALUES FROM ({d}) TO ({d + 86_400_000})"
            )
        per_hour = 3600 // interval_s
        c.execute(
            "INSERT INTO sample_chunks (series_id, start_ms, end_ms, dts, vals) "
            "SELECT s.id, %(d)s + h * 3600000, %(d)s + h * 3600000 + (%(n)s - 1) * %(i)s * 1000, "
            "array_prepend(0, array_fill(%(i)s * 1000, ARRAY[%(n)s - 1])), "
            "ARRAY(SELECT 0.75 + random() * 0.2 + s.id * 0 + h * 0 FROM generate_series(1, %(n)s)) "
            "FROM series s, generate_series(0, 23) h",
            {"d": day0, "n": per_hour, "i": interval_s},
        )
        c.execute("VACUUM ANALYZE")
    started = time.perf_counter()
    store.maintain(now_ms=day0 + 86_400_000 + 3 * 60_000)
    rollup_s = time.perf_counter() - started
    store.close()
    with psycopg.connect(db.url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")  # what autovacuum does after the rollup job's inserts
    samples = gpus * 24 * 3600 // interval_s
    sql = {
        "with_rollups": "SELECT time, sum(avg * count) / sum(count) FROM metric_samples_1m "
        "WHERE metric = 'gpufleet_gpu_sm_active_ratio' AND time >= to_timestamp(%(a)s) "
        "AND time < to_timestamp(%(b)s) GROUP BY 1 ORDER BY 1",
        "raw": "SELECT date_trunc('minute', time), avg(value) FROM metric_samples "
        "WHERE metric = 'gpufleet_gpu_sm_active_ratio' AND time >= to_timestamp(%(a)s) "
        "AND time < to_timestamp(%(b)s) GROUP BY 1 ORDER BY 1",
    }
    out: dict = {
        "gpus": gpus,
        "raw_interval_s": interval_s,
        "raw_samples": samples,
        "rollup_job_s": round(rollup_s, 1),
    }
    with psycopg.connect(db.url, autocommit=True) as c:
        for name, q in sql.items():
            times, rows = [], []
            for _ in range(3 if name == "with_rollups" else 1):
                t = time.perf_counter()
                rows = c.execute(q, {"a": day0 / 1000, "b": day0 / 1000 + 86400}).fetchall()
                times.append(time.perf_counter() - t)
            out[name] = {"ms": round(min(times) * 1000, 1), "points": len(rows)}
    out["speedup"] = round(out["raw"]["ms"] / out["with_rollups"]["ms"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default=os.environ.get("GPUFLEET_BENCH_PG", ADMIN), help="PostgreSQL admin URL.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Ingest seconds per layout.")
    ap.add_argument("--workers", type=int, default=8, help="Concurrent agent connections.")
    ap.add_argument("--storage-gpus", type=int, default=8, help="GPUs in the one-hour storage sample.")
    ap.add_argument("--fleet-gpus", type=int, default=1000)
    ap.add_argument("--fleet-interval", type=int, default=10, help="Raw sample interval of the fleet data.")
    ap.add_argument("--json", default=None, help="Also write the results to this file.")
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} CPUs; PostgreSQL {ADMIN if args.pg == ADMIN else args.pg}", flush=True)
    rnd = random.Random(1)
    # Enough agent batches for the fastest plausible run: 1,250 nodes (10,000 GPUs) x 5-second pushes.
    n_bodies = int(args.seconds * 12_000 / (GPUS_PER_NODE * PUSH_SECONDS)) + 1
    nodes = 1250
    t_start = int(time.time() * 1000) // 1000 * 1000 - 3_600_000
    bodies = []
    t = time.perf_counter()
    for i in range(n_bodies):
        node, window = i % nodes, i // nodes
        series = node_series(node, t_start + window * PUSH_SECONDS * 1000, PUSH_SECONDS, rnd)
        bodies.append((rw.encode(series), GPUS_PER_NODE * PUSH_SECONDS))
    # One earlier batch per node, pushed before the timed run: the first contact registers its series.
    warm = [
        (
            rw.encode(node_series(node, t_start - PUSH_SECONDS * 1000, PUSH_SECONDS, rnd)),
            GPUS_PER_NODE * PUSH_SECONDS,
        )
        for node in range(nodes)
    ]
    print(
        f"encoded {len(bodies)} agent batches ({GPUS_PER_NODE} GPUs x {len(CORE)} fields x {PUSH_SECONDS} s) "
        f"in {time.perf_counter() - t:.1f} s",
        flush=True,
    )

    results: dict = {"ingest": {}, "storage": {}}
    for layout in ("chunks", "rows"):
        db = Db(args.pg, layout)
        try:
            results["ingest"][layout] = ingest_http(db, layout, warm, bodies, args.seconds, args.workers)
            print(f"ingest   {layout:6s} {results['ingest'][layout]}", flush=True)
        finally:
            db.drop()
        db = Db(args.pg, layout)
        try:
            results["storage"][layout] = storage(db, layout, args.storage_gpus)
            print(f"storage  {layout:6s} {results['storage'][layout]}", flush=True)
        finally:
            db.drop()
    db = Db(args.pg, "fleet")
    try:
        results["fleet_query"] = fleet_query(db, args.fleet_gpus, args.fleet_interval)
        print(f"query    {results['fleet_query']}", flush=True)
    finally:
        db.drop()

    i, s, q = results["ingest"], results["storage"], results["fleet_query"]
    print()
    print(f"{'':34s}{'chunks (gpufleet)':>20s}{'rows (naive)':>16s}{'ratio':>8s}   goal")
    print(
        f"{'GPU samples/s via HTTP':34s}{i['chunks']['gpu_samples_per_s']:>20,}{i['rows']['gpu_samples_per_s']:>16,}"
        f"{i['chunks']['gpu_samples_per_s'] / max(1, i['rows']['gpu_samples_per_s']):>8.1f}   >= 10,000"
    )
    print(
        f"{'  first contact (new series)':34s}{i['chunks']['first_contact']['gpu_samples_per_s']:>20,}"
        f"{i['rows']['first_contact']['gpu_samples_per_s']:>16,}"
    )
    print(
        f"{'bytes on disk per metric sample':34s}{s['chunks']['bytes_per_sample']:>20}{s['rows']['bytes_per_sample']:>16}"
        f"{s['rows']['bytes_per_sample'] / s['chunks']['bytes_per_sample']:>8.1f}   <= 8"
    )
    print(
        f"{'24 h fleet query, 1,000 GPUs (ms)':34s}{q['with_rollups']['ms']:>20}{q['raw']['ms']:>16}"
        f"{q['speedup']:>8.1f}   < 300 (rollups vs raw at {q['raw_interval_s']} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
