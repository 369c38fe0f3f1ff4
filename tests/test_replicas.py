"""Two `gpufleet collector` processes behind one address (--reuse-port) on one PostgreSQL database: agents
reach either through the same URL, every sample is stored once, one replica evaluates rules."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from gpufleet.core import remote_write as rw
from gpufleet.core.sender import Verdict
from tests.conftest import free_port, wait_until
from tests.wiring import CollectorProcess, remote_write

BATCHES = 40
GPUS_PER_BATCH = 4
SAMPLES_PER_SERIES = 5
T0_MS = int(time.time()) * 1000 - 60_000


class Replica:
    """What one process behind the shared address says about itself, read over one connection that the
    kernel gave to that process (a keep-alive connection stays with the process that accepted it)."""

    def __init__(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            self.healthz = json.loads(conn.getresponse().read())
            conn.request("GET", "/metrics")
            self.metrics_text = conn.getresponse().read().decode()
        finally:
            conn.close()
        self.name: str = self.healthz["replica"]

    def metric(self, line_start: str) -> float:
        values = [float(ln.split()[-1]) for ln in self.metrics_text.splitlines() if ln.startswith(line_start)]
        assert values, f"{line_start} is not on the /metrics of {self.name}"
        return values[0]


def every_replica(port: int, names: set[str], attempts: int = 200) -> dict[str, Replica]:
    """Connect anew until each named process has answered once; the kernel picks one per connection."""
    seen: dict[str, Replica] = {}
    for _ in range(attempts):
        r = Replica(port)
        seen[r.name] = r
        if names <= seen.keys():
            return seen
    raise AssertionError(f"only {sorted(seen)} of {sorted(names)} answered {attempts} connections on :{port}")


def batch(i: int) -> list[rw.Series]:
    """Batch ``i`` of the agent-like pusher: its own node, 4 GPUs, 5 samples a series."""
    return [
        rw.Series(
            {
                "__name__": "gpufleet_gpu_temperature_celsius",
                "node": f"replica-node-{i:02d}",
                "gpu": str(g),
                "uuid": f"GPU-{i:02d}-{g}",
            },
            [(T0_MS + k * 1000, 50.0 + g + k / 10) for k in range(SAMPLES_PER_SERIES)],
        )
        for g in range(GPUS_PER_BATCH)
    ]


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[int, list[CollectorProcess]]]:
    port = free_port()
    procs: list[CollectorProcess] = []
    try:
        for name in ("replica-a", "replica-b"):
            procs.append(
                CollectorProcess(
                    port,
                    ["--db", pg_url, "--reuse-port", "--name", name, "--eval-interval", "1"],
                    tmp_path / f"{name}.log",
                )
            )
        # The first process answers the shared address as soon as it is up: wait for both by name.
        every_replica(port, {"replica-a", "replica-b"})
        yield port, procs
    finally:
        for p in procs:
            p.stop()


def test_two_replicas_on_one_address_share_the_writes_store_each_sample_once_and_one_leads(
    replicas: tuple[int, list[CollectorProcess]], pg_url: str
):
    port, procs = replicas
    url = f"http://127.0.0.1:{port}"
    # Each batch on a connection of its own (a new pool per push), as many agents would arrive; every batch
    # is then sent again, the replay of an agent that lost the acknowledgement, again on new connections.
    for _ in range(2):
        for i in range(BATCHES):
            result = remote_write(url, batch(i))
            assert result.verdict is Verdict.OK, result.problem

    produced = BATCHES * GPUS_PER_BATCH * SAMPLES_PER_SERIES
    by_name = every_replica(port, {"replica-a", "replica-b"})
    requests = {
        n: r.metric('gpufleet_collector_write_requests_total{outcome="ok"}') for n, r in by_name.items()
    }
    received = {n: r.metric("gpufleet_collector_samples_received_total") for n, r in by_name.items()}
    assert sum(requests.values()) == 2 * BATCHES, requests
    assert all(n > 0 for n in requests.values()), f"one replica took every write: {requests}"
    # Each process counts what it acknowledged, replays included; the store below holds each sample once,
    # whichever replica the original and the replay went to.
    assert sum(received.values()) == 2 * produced, received

    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as c:
        stored, distinct = c.execute(
            "SELECT count(*), count(DISTINCT (uuid, time)) FROM metric_samples "
            "WHERE metric = 'gpufleet_gpu_temperature_celsius'"
        ).fetchone()
    assert (stored, distinct) == (produced, produced)

    # Either replica shows the whole fleet, whichever took a GPU's writes.
    want = {f"GPU-{i:02d}-{g}" for i in range(BATCHES) for g in range(GPUS_PER_BATCH)}
    for name in ("replica-a", "replica-b"):
        wait_until(lambda name=name: fleet_uuids(port, name) >= want, timeout=20, interval=0.2)

    # One leader among the two, and both keep evaluating their slots (the other one standing by).
    ticks_now = {n: r.healthz["ticks"] for n, r in by_name.items()}
    later = wait_until(
        lambda: (
            (s := every_replica(port, {"replica-a", "replica-b"}))
            and all(s[n].healthz["ticks"] >= ticks_now[n] + 2 for n in s)
            and s
        ),
        timeout=20,
        interval=0.5,
    )
    leaders = sorted(n for n, r in later.items() if r.healthz["leader"])
    assert len(leaders) == 1, {n: r.healthz for n, r in later.items()}
    assert sum(r.metric("gpufleet_collector_leader ") for r in later.values()) == 1
    assert all(p.proc.poll() is None for p in procs)


def fleet_uuids(port: int, replica: str) -> set[str]:
    """The GPUs in /api/v1/gpus as answered by ``replica`` (empty when another process took the connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        if json.loads(conn.getresponse().read())["replica"] != replica:
            return set()
        conn.request("GET", "/api/v1/gpus")
        gpus = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {g["uuid"] for g in gpus["gpus"]}


def test_reuse_port_on_an_address_held_without_it_says_which_flag_is_missing(pg_url: str, tmp_path: Path):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpufleet.cli",
                "collector",
                "--db",
                pg_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--reuse-port",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "--reuse-port" in done.stderr and f"127.0.0.1:{port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def ok_writes(port: int, names: set[str]) -> dict[str, float]:
    by_name = every_replica(port, names)
    return {n: r.metric('gpufleet_collector_write_requests_total{outcome="ok"}') for n, r in by_name.items()}


def test_one_command_with_two_workers_spreads_writes_over_both_and_stops_them_on_sigterm(
    pg_url: str, tmp_path: Path
):
    port = free_port()
    command = CollectorProcess(
        port, ["--db", pg_url, "--workers", "2", "--eval-interval", "1"], tmp_path / "workers.log"
    )
    try:
        names = {f"127.0.0.1:{port}#1", f"127.0.0.1:{port}#2"}
        every_replica(port, names)
        workers = psutil.Process(command.proc.pid).children()
        assert len(workers) == 2, workers
        for i in range(BATCHES):
            result = remote_write(f"http://127.0.0.1:{port}", batch(i))
            assert result.verdict is Verdict.OK, result.problem
        requests = ok_writes(port, names)
        assert sum(requests.values()) == BATCHES and all(n > 0 for n in requests.values()), requests
        leaders = wait_until(
            lambda: [n for n, r in every_replica(port, names).items() if r.healthz["leader"]], timeout=20
        )
        assert len(leaders) == 1, leaders

        assert command.terminate() == 0, command.output()
        psutil.wait_procs(workers, timeout=10)
        assert not [w for w in workers if w.is_running()], "a worker outlived the command"
        assert "Traceback" not in command.output()
    finally:
        command.stop()


def test_a_worker_that_dies_takes_the_command_down_so_the_service_manager_restarts_it(
    pg_url: str, tmp_path: Path
):
    port = free_port()
    command = CollectorProcess(port, ["--db", pg_url, "--workers", "2"], tmp_path / "workers.log")
    try:
        every_replica(port, {f"127.0.0.1:{port}#1", f"127.0.0.1:{port}#2"})
        first, second = psutil.Process(command.proc.pid).children()
        first.kill()
        assert command.proc.wait(timeout=30) == 1
        psutil.wait_procs([second], timeout=10)
        assert not second.is_running(), "the other worker outlived the command"
        assert "ended by itself" in command.output() and "restarts the collector" in command.output()
    finally:
        command.stop()
