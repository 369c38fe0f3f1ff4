"""What active series cost a collector in memory: RSS per 100,000 series, for sizing its pod.

Starts `gpufleet collector` on a fresh PostgreSQL database and, in steps of STEP series (GPUs of 40 series
each, labelled as an agent labels them), writes new series, writes them again (the steady state: every series
known), reads the fleet view and the GPU list, and waits for two rule evaluations; after each step it reads
the collector's RSS. The cost per 100,000 series is taken between the first step and the last, so the
collector's own start-up memory is left out.

    python bench/series_memory.py                   # 3 steps of 100,000 series
    python bench/series_memory.py --steps 2 --step 50000

Prints one line per step and writes $OUT/series_memory.json (default ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.ingest import start_collector  # noqa: E402
from gpufleet.core import remote_write as rw  # noqa: E402

SERIES_PER_GPU = 40
GPUS_PER_REQUEST = 125  # 5,000 series a request


def gpu_series(first_gpu: int, gpus: int, now_ms: int) -> list[rw.Series]:
    return [
        rw.Series(
            {
                "__name__": f"gpufleet_gpu_field_{k:02d}",
                "cluster": "bench",
                "node": f"node-{g // 8:05d}",
                "gpu": str(g % 8),
                "uuid": f"GPU-{uuid.UUID(int=g)}",
                "model": "NVIDIA H100 80GB HBM3",
            },
            [(now_ms, random.random())],
        )
        for g in range(first_gpu, first_gpu + gpus)
        for k in range(SERIES_PER_GPU)
    ]


def post(url: str, series: list[rw.Series]) -> None:
    req = urllib.request.Request(
        url + "/api/v1/write",
        data=rw.encode(series),
        headers={"Content-Type": rw.CONTENT_TYPE, "Content-Encoding": rw.CONTENT_ENCODING},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 204, r.status


def get(url: str) -> int:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return len(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step", type=int, default=100_000, help="new series per step")
    ap.add_argument(
        "--pg",
        default=os.environ.get("GPUFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL admin URL; a fresh database is made and dropped",
    )
    args = ap.parse_args()
    gpus_per_step = args.step // SERIES_PER_GPU
    db_name = f"gpufleet_bench_{uuid.uuid4().hex[:8]}"
    admin = args.pg.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    db_url = args.pg.rsplit("/", 1)[0] + "/" + db_name
    port = 20000 + random.randrange(20000)
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="series-memory-")) / "collector.log"
    limit = str(args.steps * args.step + 1000)
    coll = start_collector(
        db_url,
        port,
        log,
        ["--eval-interval", "5", "--max-active-series", limit, "--max-active-series-per-cluster", limit],
    )
    rows = []
    try:
        proc = psutil.Process(coll.pid)
        post(url, gpu_series(10**6, 1, int(time.time() * 1000)))  # warm: every code path once
        get(url + "/api/v1/fleet")
        rows.append({"series": 0, "rss_mib": round(proc.memory_info().rss / 2**20, 1)})
        print(f"{0:>9,} series: RSS {rows[-1]['rss_mib']} MiB", flush=True)
        for step in range(args.steps):
            first = step * gpus_per_step
            for again in (False, True):  # new series, then the same series known
                now_ms = int(time.time() * 1000)
                for lo in range(first, first + gpus_per_step, GPUS_PER_REQUEST):
                    post(url, gpu_series(lo, min(GPUS_PER_REQUEST, first + gpus_per_step - lo), now_ms))
                if not again:
                    time.sleep(1)
            fleet_bytes = get(url + "/api/v1/fleet")
            get(url + "/api/v1/gpus")
            time.sleep(11)  # two rule evaluations
            get(url + "/api/v1/fleet")
            series = (step + 1) * gpus_per_step * SERIES_PER_GPU
            rows.append(
                {
                    "series": series,
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "fleet_gzipped_bytes": fleet_bytes,
                }
            )
            print(f"{series:>9,} series: RSS {rows[-1]['rss_mib']} MiB", flush=True)
        # What the count of active series costs the database, at start and at each maintenance pass.
        from gpufleet.collector.store import Store
        from gpufleet.collector.store.series_limit import SeriesLimits

        store = Store.open(db_url, migrate_schema=False, series_limits=SeriesLimits())
        t = time.perf_counter()
        store.ingest.count_active_series()
        count_s = time.perf_counter() - t
        store.close()
    finally:
        coll.terminate()
        coll.wait(30)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    first, last = rows[1], rows[-1]
    per_100k = (last["rss_mib"] - first["rss_mib"]) / max(1, last["series"] - first["series"]) * 100_000
    result = {
        "steps": rows,
        "rss_mib_per_100k_series": round(per_100k, 1) if len(rows) > 2 else None,
        "series_per_gpu": SERIES_PER_GPU,
        "count_active_series_s": round(count_s, 2),
        "command": "python bench/series_memory.py " + " ".join(sys.argv[1:]),
    }
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "series_memory.json").write_text(json.dumps(result, indent=2))
    print(f"RSS per 100,000 series: {result['rss_mib_per_100k_series']} MiB")
    print(f"counting {last['series']:,} active series from the database: {count_s:.2f} s")


if __name__ == "__main__":
    main()
