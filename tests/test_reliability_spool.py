"""An agent whose collector is down keeps every sample on disk and delivers it, in order, once, afterwards."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import urllib3

from gpufleet.agent.core import Agent, Snapshot
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.push import Pusher
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.agent.spool import Spool, parse_age, parse_size
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until


class SimClock:
    """Simulated seconds: the test moves time, nothing sleeps."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


class RecordingHttp:
    """The real urllib3 transport, noting which batches the collector acknowledged (2xx)."""

    def __init__(self) -> None:
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=30))
        self.acknowledged: list[tuple[bool, list[tuple[str, int]]]] = []  # (urgent, [(series key, ts)])
        self.statuses: list[int] = []
        self.retry_after: list[str | None] = []

    def request(self, method: str, url: str, body: bytes, headers: dict) -> urllib3.BaseHTTPResponse:
        resp = self._http.request(method, url, body=body, headers=headers)
        self.statuses.append(resp.status)
        self.retry_after.append(resp.headers.get("Retry-After"))
        if 200 <= resp.status < 300:
            req = rw.decode(body)
            self.acknowledged.append(
                (
                    headers.get("X-Gpufleet-Urgent") == "1",
                    [(json.dumps(sorted(s.labels.items())), t) for s in req.series for t, _ in s.samples],
                )
            )
        return resp


def batch(i: int, n: int = 3) -> bytes:
    """A small batch, numbered by its timestamp; all the same size."""
    return rw.encode(
        [rw.Series({"__name__": "t", "i": str(k)}, [((10**6 + i) * 1000, 1.0)]) for k in range(n)]
    )


def number(entry) -> int:
    return rw.decode(entry.read()).series[0].samples[0][0] // 1000 - 10**6


# ---- the spool on its own -----------------------------------------------------------------------------
def test_spooled_batches_survive_a_restart_and_replay_urgent_first_then_oldest_first(tmp_path):
    clock = SimClock()
    s = Spool(tmp_path, clock=clock)
    for i in range(5):
        s.put(batch(i), 3, urgent=(i == 3))
    (tmp_path / "1-00000000000000000099-0-3.batch.tmp").write_bytes(b"half a batch, cut by a crash")
    reopened = Spool(tmp_path, clock=clock)
    assert [number(e) for e in reopened.entries()] == [3, 0, 1, 2, 4]
    assert not list(tmp_path.glob("*.tmp"))
    assert reopened.samples == 15
    reopened.put(batch(5), 3)  # numbering goes on after the restart
    assert reopened.entries()[-1].seq == 6


def test_the_spool_keeps_to_its_size_and_age_limits_and_counts_what_it_drops(tmp_path, caplog):
    clock = SimClock()
    size = len(batch(0))
    s = Spool(tmp_path, max_bytes=size * 3, max_age_s=60, clock=clock)
    s.put(batch(0), 3, urgent=True)
    for i in range(1, 5):
        s.put(batch(i), 3)
    kept = [number(e) for e in s.entries()]
    assert kept == [0, 3, 4]  # the oldest normal batches went; the urgent one stayed
    assert s.dropped_samples["size"] == 6 and s.dropped_batches["size"] == 2
    assert "over its" in caplog.text and "--spool-max-bytes" in caplog.text
    clock.t += 61
    s.put(batch(9), 3)  # over the size limit again: #3 goes
    assert s.expire() == 6  # #0 and #4 are older than a minute
    assert [number(e) for e in s.entries()] == [9]
    assert s.dropped_samples == {"size": 9, "age": 6, "refused": 0}
    assert "--spool-max-age" in caplog.text


def test_sizes_and_ages_read_as_operators_write_them():
    assert (
        parse_size("512MiB") == 512 << 20 and parse_size("2GiB") == 2 << 30 and parse_size("100MB") == 10**8
    )
    assert parse_size("4096") == 4096 and parse_age("24h") == 86400 and parse_age("90m") == 5400
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_retries_back_off_exponentially_with_jitter_and_respect_retry_after(tmp_path):
    port = free_port()  # nothing listens there
    p = Pusher(f"http://127.0.0.1:{port}", interval=5.0, rng=random.Random(1), spool=Spool(tmp_path))
    assert p.next_delay() == 5.0
    p._queue.append((batch(0), 3, False))
    delays = []
    for _ in range(8):
        assert p.flush() is False
        delays.append(p.next_delay())
    caps = [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True)), delays
    assert len(set(delays)) == len(delays)  # jittered: agents that failed together do not retry together
    assert len(p.spool) == 1 and "spooled to" in p.last_error


# ---- the user story ------------------------------------------------------------------------------------
def start_collector(db: str, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "collector",
            "--db",
            db,
            "--listen",
            f"127.0.0.1:{port}",
            "--eval-interval",
            "60",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def up():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(up, timeout=60, interval=0.2)
    return proc


def stored_samples(pg_url: str) -> list[tuple[str, int]]:
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        # through metric_samples, the store's SQL read contract, whatever the layout under it
        rows = conn.execute(
            "SELECT metric, labels::text, round(extract(epoch FROM time) * 1000)::bigint FROM metric_samples"
        )
        return [(json.dumps(sorted({"__name__": m, **json.loads(lab)}.items())), ts) for m, lab, ts in rows]


@pytest.mark.postgres
def test_an_agent_whose_collector_is_down_for_ten_minutes_loses_no_sample(
    tmp_path: Path, pg_url: str
) -> None:
    """8 simulated GPUs sampled every (simulated) second for 10 minutes while nothing listens at the collector's
    address; the agent's pusher runs as in production (its own thread, retrying with backoff) and the agent
    restarts half way: the running pusher is stopped and a new one starts on the same spool folder.
    Afterwards the collector holds every sample, the urgent batch (a GPU lost) arrived first, the rest in
    order, and nothing was acknowledged twice."""
    start = float(int(time.time()) - 3600)  # the ten minutes end well within the collector's window
    clock = SimClock(start)
    port = free_port()
    spool_dir = tmp_path / "spool"
    sim = SimulatedNVML(8, clock=clock, seed=3)
    gpu = GpuSource(Nvml(sim), "gpu-node-1", watch_events=False)
    gpu.start()
    produced: list[tuple[str, int]] = []
    http = RecordingHttp()

    def new_pusher() -> Pusher:
        # pushes every 50 ms and retries within 100 ms, so the test does in seconds what takes minutes live
        pusher = Pusher(
            f"http://127.0.0.1:{port}",
            interval=0.05,
            http=http,
            clock=clock,
            spool=Spool(spool_dir, clock=clock),
            min_backoff=0.01,
            max_backoff=0.1,
        )
        pusher.start()
        return pusher

    def record(snap: Snapshot) -> None:
        for fam in snap.families:
            for labels, _ in fam.samples:
                produced.append(
                    (json.dumps(sorted({"__name__": fam.name, **labels}.items())), snap.timestamp_ms)
                )

    pushers = [new_pusher()]
    agent = Agent([gpu], node="gpu-node-1", clock=clock, sinks=[record, lambda snap: pushers[-1](snap)])
    try:
        for tick in range(1, 601):
            clock.t += 1
            if tick == 200:
                sim.inject(5, "lost")
            spooled = pushers[-1].spool.samples
            agent.sample()
            if tick in (100, 300, 600):  # the running pusher tries, fails, and writes this sample to disk
                wait_until(lambda spooled=spooled: pushers[-1].spool.samples > spooled, timeout=20)
            if tick == 300:  # the agent restarts: the new process finds only the spool folder
                pushers[-1].stop()
                pushers.append(new_pusher())
        first, second = pushers
        assert (
            first.sent_samples == 0
            and first.failed_pushes > 0
            and first.pending_samples() == first.spool.samples
        )
        assert http.acknowledged == [] and second.last_error and "spooled to" in second.last_error

        collector = start_collector(pg_url, port)
        try:
            # the running pusher notices the collector on its next retry and replays the spool by itself
            wait_until(lambda: second.sent_samples == len(produced), timeout=120, interval=0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
        finally:
            collector.send_signal(signal.SIGTERM)
            collector.wait(timeout=20)
    finally:
        for p in pushers:
            p.stop()
    received = next(
        float(ln.split()[-1])
        for ln in metrics.splitlines()
        if ln.startswith("gpufleet_collector_samples_received_total")
    )

    assert second.pending_samples() == 0 and len(second.spool) == 0
    assert second.spool.dropped_samples == {"size": 0, "age": 0, "refused": 0}
    # every sample arrived, and none was accepted twice
    assert sorted(stored_samples(pg_url)) == sorted(produced)
    assert received == len(produced) == sum(len(b) for _, b in http.acknowledged)
    # urgent batches (GPU 5 lost at t=200 among them) first, then the rest, each in sampling order
    flags = [u for u, _ in http.acknowledged]
    n_urgent = flags.count(True)
    assert n_urgent >= 1 and flags == [True] * n_urgent + [False] * (len(flags) - n_urgent)
    lost_ts = int(start + 200) * 1000
    assert any(
        '"gpufleet_gpu_up"' in k and ts == lost_ts for _, b in http.acknowledged[:n_urgent] for k, ts in b
    )
    for group in (http.acknowledged[:n_urgent], http.acknowledged[n_urgent:]):
        newest = [max(ts for _, ts in b) for _, b in group]
        assert newest == sorted(newest) and len(set(newest)) == len(newest)
