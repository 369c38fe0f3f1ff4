"""Store benchmark: ingest against Prometheus, ingest per layout, bytes on disk per sample, fleet query.

    python bench/ingest.py [PART ...] [--pg postgresql://postgres@127.0.0.1:5432/test] [--seconds 20]

PART is any of compare, layouts (default: both). ``compare`` sends the same pre-encoded remote-write
load (2,000 GPUs x 21 gauge fields, 50 GPUs and 5 one-second samples a series per request, recent
timestamps, 4 concurrent senders) into Prometheus's own remote-write receiver (/usr/bin/prometheus
--web.enable-remote-write-receiver) and into a `gpufleet collector` process on PostgreSQL, one after the
other, and prints samples/s and samples per server CPU-second for both (the collector's processes and,
apart, the PostgreSQL processes that did its writes) and their ratio.

``layouts`` prints, side by side in one run, the compressed-chunk layout (what the collector uses on
PostgreSQL) against the naive one-row-per-sample baseline:
  * GPU samples per second (one GPU, all 21 core fields, one timestamp) sustained into PostgreSQL
    through POST /api/v1/write of a `gpufleet collector` process (agents' batches of 8 GPUs x 5 s)
    for a fleet of 1,250 nodes whose series are known (each node's first batch, which registers its
    series, is pushed before the timed run and reported on its own as "first contact"),
  * bytes on disk per metric sample (pg_total_relation_size of tables + indexes + TOAST / samples),
    for one hour of 1-second data, after the collector's compaction,
  * latency of a 24-hour fleet query for 1,000 GPUs (fleet-average SM active per 1-minute step) through
    the SQL views Grafana reads, with the 1-minute rollups and from raw samples.
Needs PostgreSQL (creates and drops its own databases), this repository installed and, for ``compare``,
Prometheus (Debian: apt-get install prometheus).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cramjam
import psutil
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


HEADERS = {
    "Content-Type": rw.CONTENT_TYPE,
    "Content-Encoding": rw.CONTENT_ENCODING,
    "X-Prometheus-Remote-Write-Version": rw.PROTOCOL_VERSION,
}


def push(
    port: int,
    bodies: list[tuple[bytes, int]],
    seconds: float | None,
    workers: int,
    connect: Callable[[int], tuple[http.client.HTTPConnection, str]] | None = None,
) -> dict:
    """Push pre-encoded requests over ``workers`` keep-alive connections as fast as the receiver takes
    them, until they run out or ``seconds`` pass; count what was acknowledged (the number that goes
    with each body) with 2xx. ``connect(i)``: worker i's connection and the name its acknowledged requests
    are counted under in ``by_connection`` (a replica's); default a connection to 127.0.0.1:``port``."""
    lock = threading.Lock()
    it = iter(bodies)
    done: dict = {
        "acked": 0,
        "requests": 0,
        "errors": 0,
        "ran_out": False,
        "first_error": None,
        "by_connection": {},
    }
    stop_at = time.monotonic() + seconds if seconds is not None else float("inf")

    def worker(conn: http.client.HTTPConnection, name: str) -> None:
        while time.monotonic() < stop_at:
            with lock:
                item = next(it, None)
            if item is None:
                done["ran_out"] = True
                return
            body, count = item
            conn.request("POST", "/api/v1/write", body=body, headers=HEADERS)
            resp = conn.getresponse()
            text = resp.read()
            with lock:
                if 200 <= resp.status < 300:
                    done["acked"] += count
                    done["requests"] += 1
                    done["by_connection"][name] = done["by_connection"].get(name, 0) + 1
                else:
                    done["errors"] += 1
                    done["first_error"] = done["first_error"] or f"{resp.status} {text[:300]!r}"

    conns = [
        connect(i) if connect is not None else (http.client.HTTPConnection("127.0.0.1", port, timeout=60), "")
        for i in range(workers)
    ]
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=c) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for c, _ in conns:
        c.close()
    return {
        **done,
        "connections": sorted(name for _, name in conns),
        "seconds": round(elapsed, 2),
        "per_s": round(done["acked"] / elapsed),
    }


def wait_ready(url: str, proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + 60
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    while True:
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=5)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} did not start: {tail}")
        time.sleep(0.2)


def start_collector(db_url: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpufleet.cli",
                "collector",
                "--db",
                db_url,
                "--listen",
                f"127.0.0.1:{port}",
                *extra,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    wait_ready(f"http://127.0.0.1:{port}/healthz", proc, "collector", log)
    return proc


def ingest_http(
    db: Db,
    layout: str,
    warm: list[tuple[bytes, int]],
    bodies: list[tuple[bytes, int]],
    seconds: float,
    workers: int,
    tmp: Path,
) -> dict:
    """Start a real collector process; push ``warm`` (one batch per node: registers every series, the
    first contact of each GPU), then ``bodies`` for ``seconds``: the sustained rate of a known fleet."""
    port = free_port()
    proc = start_collector(db.url, port, tmp / f"collector-{layout}.log", ["--raw-layout", layout])
    try:
        first = push(port, warm, None, workers)
        result = push(port, bodies, seconds, workers)
        return {
            "gpu_samples_per_s": result["per_s"],
            **result,
            "first_contact": {"gpu_samples_per_s": first["per_s"], **first},
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- the same remote-write load into Prometheus and into the collector --------------------------------
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
FLEET_GPUS = 2000
REQUEST_GPUS = 50
WINDOW_S = 5  # one-second samples a series per request
SENDERS = 4
# Timestamps the request templates are encoded with; each window's body swaps in its own. A 6-byte
# varint like every Unix-millisecond time from 2001 to 2109, so the swap keeps every length.
_TEMPLATE_MS = 1_000_000_000_000


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def remote_write_load(windows: int, start_ms: int, variants: int = 4) -> list[tuple[bytes, int]]:
    """``windows`` consecutive 5-second windows of a 2,000-GPU fleet, as remote-write requests of 50 GPUs
    (21 fields x 5 one-second samples a series) in send order: window by window, so each series only
    ever moves forward in time (Prometheus refuses out-of-order samples). Each request is encoded once
    per value variant; a window's body is that protobuf with the window's timestamps put in, compressed."""
    rnd = random.Random(3)
    groups = FLEET_GPUS // REQUEST_GPUS
    marks = [b"\x10" + _varint(_TEMPLATE_MS + i * 1000) for i in range(WINDOW_S)]
    templates: list[list[bytes]] = []
    for v in range(variants):
        row = []
        for g in range(groups):
            series = [
                rw.Series(
                    labels(gpu // GPUS_PER_NODE, gpu % GPUS_PER_NODE, metric),
                    [(_TEMPLATE_MS + i * 1000, fn(gpu, v * WINDOW_S + i, rnd)) for i in range(WINDOW_S)],
                )
                for gpu in range(g * REQUEST_GPUS, (g + 1) * REQUEST_GPUS)
                for metric, fn in CORE
            ]
            raw = bytes(cramjam.snappy.decompress_raw(rw.encode(series)))
            if any(raw.count(m) != len(series) for m in marks):  # a value's bytes that look like a time
                raise RuntimeError("request template: a timestamp's bytes also occur elsewhere; change seed")
            row.append(raw)
        templates.append(row)
    per_request = REQUEST_GPUS * len(CORE) * WINDOW_S
    out = []
    for w in range(windows):
        t = start_ms + w * WINDOW_S * 1000
        stamps = [b"\x10" + _varint(t + i * 1000) for i in range(WINDOW_S)]
        if any(len(a) != len(b) for a, b in zip(marks, stamps, strict=True)):
            raise RuntimeError("timestamps outside 2001..2109 do not fit the request templates")
        for g in range(groups):
            raw = templates[w % variants][g]
            for mark, stamp in zip(marks, stamps, strict=True):
                raw = raw.replace(mark, stamp)
            out.append((bytes(cramjam.snappy.compress_raw(raw)), per_request))
    return out


class CpuMeter:
    """CPU seconds (user + system) that a changing set of processes spend from ``start`` to ``stop``: a
    process that appears in between counts from its own start."""

    def __init__(self, processes: Callable[[], list[int]]) -> None:
        self._processes = processes
        self._before: dict[int, float] = {}

    @staticmethod
    def _cpu(pids: list[int]) -> dict[int, float]:
        out = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
        return out

    def start(self) -> None:
        self._before = self._cpu(self._processes())

    def stop(self) -> float:
        after = self._cpu(self._processes())
        return sum(v - self._before.get(pid, 0.0) for pid, v in after.items())


def process_tree(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    return []


def pg_processes(admin: str, dbname: str | None) -> list[int]:
    """The PostgreSQL backends connected to ``dbname`` (None: the WAL writer, checkpointer and background
    writer, which every database on the server shares)."""
    with psycopg.connect(admin, autocommit=True) as c:
        if dbname is None:
            rows = c.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer')"
            ).fetchall()
        else:
            rows = c.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchall()
    return [r[0] for r in rows]


@contextlib.contextmanager
def prometheus(tmp: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    port = free_port()
    (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 1m\n")
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-remote-write-receiver",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}/-/ready", proc, "prometheus", log)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def timed_load(
    port: int, warm: list[tuple[bytes, int]], bodies: list[tuple[bytes, int]], seconds: float, meters: dict
) -> dict:
    """The first window untimed (every series is new there), then the rest for ``seconds``, metered."""
    first = push(port, warm, None, SENDERS)
    if first["errors"]:
        raise RuntimeError(f"the first window was refused: {first['first_error']}")
    load0 = os.getloadavg()[0]
    for m in meters.values():
        m.start()
    result = push(port, bodies, seconds, SENDERS)
    cpu = {name: round(m.stop(), 2) for name, m in meters.items()}
    return {
        **result,
        "cpu_s": cpu,
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def compare(args: argparse.Namespace, tmp: Path) -> dict:
    """Prometheus's remote-write receiver, then the collector on PostgreSQL: the same requests, the same
    senders, samples acknowledged per second and per CPU-second of the server's processes."""
    if not Path(PROMETHEUS).exists():
        raise SystemExit("compare needs Prometheus: apt-get install prometheus (or leave out compare)")
    per_window = FLEET_GPUS * len(CORE) * WINDOW_S
    windows = int(args.seconds * args.max_rate / per_window) + 2
    start_ms = int(time.time()) * 1000 - 60_000
    t = time.perf_counter()
    load = remote_write_load(windows, start_ms)
    groups = FLEET_GPUS // REQUEST_GPUS
    warm, bodies = load[:groups], load[groups:]
    print(
        f"compare: encoded {len(load)} requests ({REQUEST_GPUS} GPUs x {len(CORE)} fields x {WINDOW_S} "
        f"samples, {sum(len(b) for b, _ in load) / len(load) / 1024:.0f} KiB each) for {windows} windows of "
        f"{FLEET_GPUS} GPUs in {time.perf_counter() - t:.1f} s; {SENDERS} senders, {args.seconds:g} s each",
        flush=True,
    )
    out: dict = {}
    with prometheus(tmp) as (proc, port):
        meters = {"prometheus": CpuMeter(lambda: process_tree(proc.pid))}
        out["prometheus"] = timed_load(port, warm, bodies, args.seconds, meters)
    print(f"compare  prometheus {out['prometheus']}", flush=True)
    db = Db(args.pg, "compare")
    try:
        port = free_port()
        proc = start_collector(db.url, port, tmp / "collector-compare.log", [])
        try:
            meters = {
                "collector": CpuMeter(lambda: process_tree(proc.pid)),
                "postgres_backends": CpuMeter(lambda: pg_processes(args.pg, db.name)),
                "postgres_background": CpuMeter(lambda: pg_processes(args.pg, None)),
            }
            if args.profile_collector:
                print(f"compare: collector pid {proc.pid} (profile it now)", flush=True)
            out["collector"] = timed_load(port, warm, bodies, args.seconds, meters)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # Every acknowledged sample stored, once: the load never repeats a sample.
        with psycopg.connect(db.url) as c:
            row = c.execute(
                "SELECT coalesce(sum(cardinality(vals)), 0) FROM "
                "(SELECT vals FROM sample_chunks UNION ALL SELECT vals FROM sample_head) c"
            ).fetchone()
        out["collector"]["stored"] = int(row[0]) if row else 0
        out["collector"]["acked_with_first_window"] = sum(n for _, n in warm) + out["collector"]["acked"]
    finally:
        db.drop()
    print(f"compare  collector  {out['collector']}", flush=True)
    for name, r in out.items():
        if r["ran_out"]:
            print(f"compare: {name} used up the load before {args.seconds:g} s: raise --max-rate", flush=True)
        r["server_cpu_s"] = round(sum(r["cpu_s"].values()), 2)
        r["per_cpu_s"] = round(r["acked"] / max(r["server_cpu_s"], 1e-9))
    return out


def print_compare(c: dict) -> None:
    p, g = c["prometheus"], c["collector"]
    cpu = g["cpu_s"]
    print()
    print(f"{'receiver':44s}{'samples/s':>12s}{'server CPU-s':>14s}{'samples/CPU-s':>15s}")
    print(
        f"{'Prometheus remote-write receiver':44s}{p['per_s']:>12,}{p['server_cpu_s']:>14}{p['per_cpu_s']:>15,}"
    )
    name = "gpufleet collector on PostgreSQL"
    print(f"{name:44s}{g['per_s']:>12,}{g['server_cpu_s']:>14}{g['per_cpu_s']:>15,}")
    print(
        f"{'  CPU-s: collector / PG backends / PG shared':44s}{'':>12s}"
        f"{cpu['collector']:>6} / {cpu['postgres_backends']} / {cpu['postgres_background']}"
    )
    print(
        f"{'collector / Prometheus':44s}{g['per_s'] / max(1, p['per_s']):>12.2f}{'':>14s}"
        f"{g['per_cpu_s'] / max(1, p['per_cpu_s']):>15.2f}   goal >= 210,000 samples/s, >= 0.5x"
    )
    verdict = "every one" if g["stored"] == g["acked_with_first_window"] else "MISMATCH"
    print(
        f"collector stored {g['stored']:,} samples for {g['acked_with_first_window']:,} acknowledged "
        f"(first window included): {verdict}"
    )
    print(
        f"load average before/after: prometheus {p['load_before']}/{p['load_after']}, "
        f"collector {g['load_before']}/{g['load_after']}"
    )


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


def layouts(args: argparse.Namespace, tmp: Path) -> dict:
    """Chunks against rows: ingest of a known fleet through HTTP, bytes on disk, the 24-hour fleet query."""
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
            results["ingest"][layout] = ingest_http(db, layout, warm, bodies, args.seconds, args.workers, tmp)
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
    return results


def print_layouts(results: dict) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", metavar="PART", help="compare, layouts [default: both].")
    ap.add_argument("--pg", default=os.environ.get("GPUFLEET_BENCH_PG", ADMIN), help="PostgreSQL admin URL.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Timed ingest seconds per receiver / layout.")
    ap.add_argument("--workers", type=int, default=8, help="Concurrent agent connections (layouts).")
    ap.add_argument(
        "--max-rate",
        type=float,
        default=2_000_000,
        help="Samples/s the pre-encoded compare load lasts --seconds at.",
    )
    ap.add_argument(
        "--profile-collector", action="store_true", help="Print the compared collector's pid for py-spy."
    )
    ap.add_argument("--storage-gpus", type=int, default=8, help="GPUs in the one-hour storage sample.")
    ap.add_argument("--fleet-gpus", type=int, default=1000)
    ap.add_argument("--fleet-interval", type=int, default=10, help="Raw sample interval of the fleet data.")
    ap.add_argument("--json", default=None, help="Also write the results to this file.")
    args = ap.parse_args()
    parts = args.parts or ["compare", "layouts"]
    unknown = set(parts) - {"compare", "layouts"}
    if unknown:
        ap.error(f"unknown part {', '.join(sorted(unknown))}: give compare, layouts or nothing (both)")

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; PostgreSQL "
        f"{ADMIN if args.pg == ADMIN else args.pg}",
        flush=True,
    )
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as tmp:
        if "compare" in parts:
            results["compare"] = compare(args, Path(tmp))
        if "layouts" in parts:
            results["layouts"] = layouts(args, Path(tmp))
    if "compare" in results:
        print_compare(results["compare"])
    if "layouts" in results:
        print_layouts(results["layouts"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
