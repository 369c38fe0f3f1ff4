"""A collector killed mid-ingest and started again loses no acknowledged batch, and an agent that retries
batches it is unsure about stores nothing twice. Real processes: `gpufleet collector` on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import requests
from sqlalchemy import create_engine, text

from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until

HEADERS = {"Content-Type": rw.CONTENT_TYPE, "Content-Encoding": rw.CONTENT_ENCODING}
T0 = (int(time.time() * 1000) // 3_600_000 - 1) * 3_600_000  # the last hour: the batches span 20 minutes


def start_collector(db: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.cli", "collector", "--db", db, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return proc.poll() is not None

    wait_until(healthy, timeout=60, interval=0.1)
    assert proc.poll() is None, "collector exited at start"
    return proc


def batch(i: int) -> bytes:
    # 16 GPUs x 3 metrics x 10 samples, each batch 10 seconds after the previous one.
    series = [
        rw.Series(
            {"__name__": m, "node": f"n{g // 8}", "gpu": str(g % 8), "uuid": f"GPU-{g}"},
            [(T0 + (i * 10 + k) * 1000, float(i * 10 + k)) for k in range(10)],
        )
        for g in range(16)
        for m in (
            "gpufleet_gpu_power_watts",
            "gpufleet_gpu_sm_active_ratio",
            "gpufleet_gpu_temperature_celsius",
        )
    ]
    return rw.encode(series)


SAMPLES_PER_BATCH = 16 * 3 * 10


def test_a_killed_collector_loses_no_acknowledged_batch_and_retries_store_nothing_twice(pg_url):
    port = free_port()
    proc = start_collector(pg_url, port)
    acked: list[int] = []
    unsure = 0
    n_batches = 120
    done = threading.Event()

    def agent() -> None:
        nonlocal unsure
        session = requests.Session()
        for i in range(n_batches):
            while True:  # like the agent: keep the batch until the collector says it is stored
                try:
                    r = session.post(
                        f"http://127.0.0.1:{port}/api/v1/write", data=batch(i), headers=HEADERS, timeout=10
                    )
                    if r.status_code == 204:
                        acked.append(i)
                        break
                except requests.RequestException:
                    unsure += 1  # no answer: maybe stored, maybe not; send it again
                time.sleep(0.05)
        done.set()

    sender = threading.Thread(target=agent)
    sender.start()
    try:
        wait_until(lambda: len(acked) >= 30, timeout=120, interval=0.01)
        proc.send_signal(signal.SIGKILL)  # mid-ingest: the agent is sending as fast as it can
        proc.wait()
        killed_after = len(acked)
        proc = start_collector(pg_url, port)
        assert done.wait(180), "the agent could not deliver every batch after the restart"
        # An agent restarted from its spool re-sends batches it had already delivered.
        for i in acked[-5:]:
            assert (
                requests.post(
                    f"http://127.0.0.1:{port}/api/v1/write", data=batch(i), headers=HEADERS, timeout=10
                ).status_code
                == 204
            )
    finally:
        sender.join(timeout=5)
        proc.terminate()
        proc.wait(timeout=30)
    assert killed_after < n_batches
    assert sorted(acked) == list(range(n_batches))
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        total, distinct = conn.execute(
            text("SELECT count(*), count(DISTINCT (metric, uuid, time)) FROM metric_samples")
        ).one()
        values = conn.execute(
            text("SELECT min(value), max(value), count(DISTINCT value) FROM metric_samples")
        ).one()
    engine.dispose()
    assert total == distinct == n_batches * SAMPLES_PER_BATCH
    assert tuple(values) == (0.0, float(n_batches * 10 - 1), n_batches * 10)
