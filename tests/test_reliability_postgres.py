"""The collector's database stops under ingest and comes back: the collector answers 503 + Retry-After
meanwhile, reconnects by itself, and no batch it acknowledged is lost.

This test stops the shared PostgreSQL server for a few seconds (and always starts it again). Deselect it
with ``-m "not pg_restart"`` where other work shares the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from gpufleet.agent.push import Pusher
from gpufleet.agent.spool import Spool
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until
from tests.test_reliability_spool import RecordingHttp, start_collector, stored_samples


def pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]).returncode == 0


T0 = int(time.time() * 1000) - 600_000  # within the collector's window of sample times


def one_batch(i: int) -> rw.Series:
    return rw.Series(
        {"__name__": "gpufleet_gpu_power_watts", "node": "n1", "gpu": str(i % 8), "uuid": f"GPU-{i % 8}"},
        [(T0 + i * 1000, float(i))],
    )


@pytest.mark.postgres
@pytest.mark.pg_restart
@pytest.mark.skipif(
    not Path("/etc/postgresql").is_dir(), reason="needs a local PostgreSQL cluster to stop and start"
)
def test_postgres_stopped_and_restarted_under_ingest_loses_no_acknowledged_batch(tmp_path, pg_url):
    port = free_port()
    collector = start_collector(pg_url, port)
    http = RecordingHttp()
    pusher = Pusher(f"http://127.0.0.1:{port}", http=http, spool=Spool(tmp_path / "spool"), min_backoff=0.1)
    sent: list[tuple[str, int]] = []

    def push(i: int) -> bool:
        s = one_batch(i)
        sent.append((json.dumps(sorted(s.labels.items())), s.samples[0][0]))
        pusher._queue.append((rw.encode([s]), 1, False))
        return pusher.flush()

    try:
        for i in range(20):
            assert push(i)
        stopped_at = len(sent)
        try:
            pg_ctl("stop")
            for i in range(20, 40):  # ingest goes on for a few seconds against a stopped database
                push(i)
                time.sleep(0.1)
        finally:
            pg_ctl("start")
        wait_until(pg_ready, timeout=60, interval=0.2)
        # the same collector process, not restarted, takes writes again and replays what was refused
        for i in range(40, 60):
            wait_until(lambda i=i: push(i) or pusher.flush(), timeout=60, interval=0.3)
        assert collector.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert json.loads(r.read())["ok"] is True
    finally:
        collector.send_signal(signal.SIGTERM)
        out, _ = collector.communicate(timeout=20)

    assert 503 in http.statuses, (http.statuses, out)
    assert all(ra == "5" for st, ra in zip(http.statuses, http.retry_after, strict=True) if st == 503)
    acknowledged = {x for _, b in http.acknowledged for x in b}
    stored = set(stored_samples(pg_url))
    assert acknowledged <= stored  # nothing the collector acknowledged is missing
    assert stored == set(sent) and len(sent) == 60  # and what it refused was spooled and replayed
    assert len(acknowledged) >= stopped_at
    assert "store unavailable" in out or "refusing a write" in out
