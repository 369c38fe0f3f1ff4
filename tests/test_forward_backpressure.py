"""Forwarding with back-pressure: a collector whose --forward target stalls refuses new writes (503 +
Retry-After) before storing them, so agents keep those batches; everything it acknowledged reaches the
target once it recovers, each series in order, through several connections at once."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from gpufleet.collector.forward import METRICS, Forwarder, ForwardMetrics, RemoteWriteTarget, display_url
from gpufleet.core import remote_write as rw
from gpufleet.core.sender import RemoteWriteSender, SendResult, http_pool
from tests.conftest import free_port, wait_until
from tests.test_prometheus_remote_write import start_prometheus
from tests.wiring import CollectorProcess


class StallingReceiver:
    """A remote-write receiver on a real port. While stalled it answers 503 (an overloaded target); else it
    decodes each body and keeps every series' samples in arrival order. ``delay``: a random pause before
    each answer (up to that many seconds), so that concurrent requests finish out of their sending order."""

    def __init__(self, *, stalled: bool = False, delay: float = 0.0) -> None:
        self.stalled = stalled
        self.delay = delay
        self.samples: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
        self.requests = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        receiver = self
        rnd = random.Random(5)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real target

            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                    pause = rnd.uniform(0, receiver.delay)
                time.sleep(pause)
                with receiver.lock:
                    receiver.in_flight -= 1
                    status = 503 if receiver.stalled else 204
                    if status == 204:
                        for s in rw.decode(body).series:
                            receiver.samples.setdefault(tuple(sorted(s.labels.items())), []).extend(s.samples)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}/api/v1/write"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def received(self) -> int:
        with self.lock:
            return sum(map(len, self.samples.values()))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[StallingReceiver]:
    r = StallingReceiver(stalled=True)
    yield r
    r.close()


@pytest.fixture
def processes() -> Iterator[list[CollectorProcess]]:
    started: list[CollectorProcess] = []
    yield started
    for p in started:
        p.stop()


class Agent:
    """Pushes its node's GPU series batch after batch, in order, as an agent does: a batch that is not
    acknowledged is sent again before the next one."""

    def __init__(self, collector: str, node: str, gpus: int = 2, samples: int = 5) -> None:
        self.node, self.gpus, self.per_series = node, gpus, samples
        self.sender = RemoteWriteSender(collector + "/api/v1/write", http_pool(30), user_agent="test-agent")
        self.t0 = int(time.time() * 1000) - 600_000
        self.next = 0
        self.acknowledged: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}

    @property
    def batch_samples(self) -> int:
        return self.gpus * self.per_series

    def batch(self, i: int) -> list[rw.Series]:
        base = self.t0 + i * self.per_series * 1000
        return [
            rw.Series(
                {
                    "__name__": "gpufleet_gpu_power_watts",
                    "node": self.node,
                    "gpu": str(g),
                    "uuid": f"{self.node}-{g}",
                },
                [(base + k * 1000, float(i * 100 + k)) for k in range(self.per_series)],
            )
            for g in range(self.gpus)
        ]

    def push(self) -> SendResult:
        """Send the next batch once; on 2xx it is acknowledged and the agent moves on."""
        series = self.batch(self.next)
        result = self.sender.send(rw.encode(series))
        if 200 <= result.status < 300:
            for s in series:
                self.acknowledged.setdefault(tuple(sorted(s.labels.items())), []).extend(s.samples)
            self.next += 1
        return result


def metrics_text(c: CollectorProcess) -> str:
    with urllib.request.urlopen(c.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name{labels}`` (labels a subset of the series'), as Prometheus scrapes it."""
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"{name}{labels} is not on /metrics")


def test_a_stalled_target_turns_into_503s_before_storing_and_every_acknowledged_sample_arrives_in_order(
    receiver, processes, pg_url, tmp_path
):
    # The forward URL carries credentials: they must not show in metric labels, answers or logs.
    target = receiver.url.replace("127.0.0.1", "forwarder:s3cret-pass@127.0.0.1")
    c = CollectorProcess(
        free_port(),
        [
            "--db", pg_url, "--eval-interval", "1h",
            "--forward", target,
            "--forward-max-queue-samples", "30",
            "--forward-shards", "2",
        ],
        tmp_path / "collector.log",
    )  # fmt: skip
    processes.append(c)
    agents = [Agent(c.url, "node-a"), Agent(c.url, "node-b")]

    # The target stalls: the queue takes 30 samples (three 10-sample batches), then writes are refused.
    results = [agents[i % 2].push() for i in range(3)]
    assert [r.status for r in results] == [204, 204, 204]
    refused = agents[1].push()
    assert refused.status == 503, refused
    assert refused.retry_after_s is not None and refused.retry_after_s >= 1
    assert display_url(target) in refused.detail and "--forward-max-queue-samples" in refused.detail
    assert "s3cret" not in refused.detail

    text = metrics_text(c)
    url = display_url(target)
    assert url == receiver.url
    # Stored: only what was acknowledged. Queued for the target: the same, and nothing dropped.
    assert sample(text, "gpufleet_collector_samples_received_total") == 30
    assert sample(text, "gpufleet_collector_write_requests_total", outcome="forward_backlog") == 1
    assert sample(text, "gpufleet_collector_forward_queued_samples", url=url) == 30
    assert sample(text, "gpufleet_collector_forward_backpressure_writes_total", url=url) == 1
    assert sample(text, "gpufleet_collector_forward_dropped_samples_total", url=url, reason="queue_full") == 0
    assert "s3cret" not in text
    # The target's 503s are failed sends, retried.
    wait_until(lambda: sample(metrics_text(c), "gpufleet_collector_forward_failed_sends_total", url=url) >= 1)

    # The target recovers; the agents resend what was refused and go on.
    receiver.stalled = False
    deadline = time.monotonic() + 60
    while min(a.next for a in agents) < 8 and time.monotonic() < deadline:
        for a in agents:
            if a.next < 8 and a.push().status != 204:
                time.sleep(0.2)
    assert min(a.next for a in agents) == 8, "the collector kept refusing after its target recovered"
    acknowledged = {k: v for a in agents for k, v in a.acknowledged.items()}
    total = sum(map(len, acknowledged.values()))
    assert total == 16 * 10
    wait_until(lambda: receiver.received() >= total, timeout=60, interval=0.2)
    # Every acknowledged sample arrived once, each series in the order it was written.
    assert receiver.samples == acknowledged
    text = metrics_text(c)
    assert sample(text, "gpufleet_collector_forward_sent_samples_total", url=url) == total
    assert sample(text, "gpufleet_collector_forward_queued_samples", url=url) == 0
    assert sample(text, "gpufleet_collector_samples_received_total") == total
    log = c.output()
    assert "writes are refused (503)" in log and "has room again" in log
    assert "s3cret" not in log


def test_with_drop_a_full_queue_keeps_storing_and_counts_what_the_target_misses(
    receiver, processes, pg_url, tmp_path
):
    c = CollectorProcess(
        free_port(),
        [
            "--db", pg_url, "--eval-interval", "1h",
            "--forward", receiver.url,
            "--forward-max-queue-samples", "30",
            "--forward-when-full", "drop",
        ],
        tmp_path / "collector.log",
    )  # fmt: skip
    processes.append(c)
    agent = Agent(c.url, "node-a")
    assert [agent.push().status for _ in range(5)] == [204] * 5  # stored, every one
    text = metrics_text(c)
    assert sample(text, "gpufleet_collector_samples_received_total") == 50
    assert sample(text, "gpufleet_collector_forward_queued_samples", url=receiver.url) == 30
    assert (
        sample(
            text, "gpufleet_collector_forward_dropped_samples_total", url=receiver.url, reason="queue_full"
        )
        == 20
    )
    assert sample(text, "gpufleet_collector_write_requests_total", outcome="ok") == 5
    assert "dropping batches for it (--forward-when-full drop)" in c.output()
    receiver.stalled = False
    wait_until(lambda: receiver.received() == 30, timeout=60, interval=0.2)


def series_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_several_connections_keep_each_series_in_order_even_when_batches_mix_series():
    """Agents' batches (one node each) and batches that mix series of several nodes (as a Prometheus
    remote-writing into the collector sends them) go out over four connections that finish out of order;
    the target sees every series' samples in time order, and the connections did work concurrently."""
    receiver = StallingReceiver(delay=0.01)
    # Tracking few series makes the target forget those already sent many times over meanwhile.
    target = RemoteWriteTarget(receiver.url, shards=4, max_queue_samples=10**9, max_tracked_series=20).start()
    try:
        rnd = random.Random(11)
        nodes = [f"node-{n}" for n in range(12)]
        labels = {
            (n, g): {"__name__": "gpufleet_gpu_utilization_ratio", "node": n, "gpu": str(g)}
            for n in nodes
            for g in range(4)
        }
        sets = {k: rw.LabelSet.of(v) for k, v in labels.items()}
        clock = dict.fromkeys(labels, 1_000_000)
        sent: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
        for i in range(400):
            if i % 5 == 4:  # a mixed batch: a few GPUs of random nodes
                keys = rnd.sample(sorted(labels), 6)
            else:  # an agent's batch: every GPU of one node
                node = rnd.choice(nodes)
                keys = [(node, g) for g in range(4)]
            series = []
            for k in keys:
                clock[k] += 1000
                series.append(rw.Series(labels[k], [(clock[k], float(i))]))
                sent.setdefault(series_key(labels[k]), []).append((clock[k], float(i)))
            target.submit(rw.encode(series), len(series), [sets[k] for k in keys])
        total = sum(map(len, sent.values()))
        wait_until(lambda: target.sent_samples == total, timeout=60, interval=0.1)
        assert receiver.samples == sent
        assert receiver.most_in_flight > 1, "the shards never sent at the same time"
        assert target.dropped_samples == 0 and target.queued_samples == 0
    finally:
        target.stop(timeout=1)
        receiver.close()


def test_the_forwarder_exports_its_declared_metrics_per_target():
    f = Forwarder(["http://u:p@127.0.0.1:9/api/v1/write?token=x", "http://127.0.0.1:9/other"])  # not started
    families = {m.name: m for m in ForwardMetrics(f).collect()}
    declared = {m.name.removesuffix("_total"): m for m in METRICS}
    assert families.keys() == declared.keys()
    for name, fam in families.items():
        spec = declared[name]
        assert fam.type == spec.kind
        urls = {s.labels["url"] for s in fam.samples}
        assert urls == {"http://127.0.0.1:9/api/v1/write", "http://127.0.0.1:9/other"}
        assert all(set(s.labels) == set(spec.labels) for s in fam.samples)


@pytest.fixture
def receiving_prometheus(tmp_path) -> Iterator[tuple[str, int]]:
    """A real Prometheus receiving remote-write, and its process id (to stop it for a while)."""
    with start_prometheus(
        tmp_path, "global:\n  scrape_interval: 1m\n", "--web.enable-remote-write-receiver"
    ) as url:
        flag = f"--web.listen-address={url.removeprefix('http://')}".encode()
        (pid,) = [p for p in _children() if flag in _cmdline(p)]
        yield url, pid


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(entry))
    return out


def _cmdline(pid: int) -> list[bytes]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return []


def test_a_prometheus_stopped_for_a_while_gets_every_acknowledged_sample(
    receiving_prometheus, processes, pg_url, tmp_path
):
    prometheus, pid = receiving_prometheus
    c = CollectorProcess(
        free_port(),
        [
            "--db", pg_url, "--eval-interval", "1h",
            "--forward", prometheus + "/api/v1/write",
            "--forward-max-queue-samples", "100",
        ],
        tmp_path / "collector.log",
    )  # fmt: skip
    processes.append(c)
    agents = [Agent(c.url, f"node-{n}") for n in range(3)]
    for a in agents:
        assert a.push().status == 204
    os.kill(pid, signal.SIGSTOP)
    try:
        refused = 0
        for i in range(40):  # 10-sample batches: the 100-sample queue fills, then writes are refused
            if agents[i % 3].push().status == 503:
                refused += 1
        assert refused > 0, "writes kept being acknowledged while the target was stopped"
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while min(a.next for a in agents) < 12 and time.monotonic() < deadline:
        for a in agents:
            if a.next < 12 and a.push().status != 204:
                time.sleep(0.2)
    assert min(a.next for a in agents) == 12
    total = sum(len(v) for a in agents for v in a.acknowledged.values())

    def held() -> float:
        q = requests.get(
            prometheus + "/api/v1/query",
            params={"query": 'sum(count_over_time(gpufleet_gpu_power_watts{node=~"node-.*"}[1h]))'},
            timeout=10,
        ).json()["data"]["result"]
        return float(q[0]["value"][1]) if q else 0.0

    wait_until(lambda: held() == total, timeout=60, interval=0.5)
    text = metrics_text(c)
    url = prometheus + "/api/v1/write"
    assert sample(text, "gpufleet_collector_forward_dropped_samples_total", url=url, reason="refused") == 0
    assert sample(text, "gpufleet_collector_forward_sent_samples_total", url=url) == total


class LateThenOutOfOrder:
    """Answers the first request after ``late`` seconds (its sender has given up by then, but the samples
    are stored), and every later one as Prometheus answers samples older than their series' newest."""

    def __init__(self, late: float) -> None:
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                first = receiver.requests == 1
                if first:
                    time.sleep(late)
                status, text = (204, b"") if first else (400, b"out of order sample\n")
                with contextlib.suppress(OSError):  # the sender may have gone
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api/v1/write"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_batch_whose_timed_out_try_was_stored_counts_as_sent_and_a_plain_out_of_order_refusal_as_dropped():
    receiver = LateThenOutOfOrder(late=1.5)
    target = RemoteWriteTarget(receiver.url, shards=1, timeout=0.3).start()
    try:
        body = rw.encode(
            [rw.Series({"__name__": "gpufleet_gpu_up", "uuid": "GPU-1"}, [(1000, 1.0), (2000, 1.0)])]
        )
        target.submit(body, 2)
        wait_until(lambda: target.sent_samples == 2, timeout=20)
        assert target.dropped_samples == 0 and receiver.requests >= 2
        target.submit(body, 2)  # answered 400 at once: refused for good, dropped and counted
        wait_until(lambda: target.dropped["refused"] == 2, timeout=20)
        assert target.sent_samples == 2
    finally:
        target.stop(timeout=1)
        receiver.close()
