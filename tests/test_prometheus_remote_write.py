"""Remote-write with the real Prometheus (Debian's /usr/bin/prometheus): Prometheus scrapes a simulated
agent and remote-writes into the collector; the collector forwards what it stores into a Prometheus that
receives remote-write, read back through Prometheus's own query API."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture(autouse=True)
def _prometheus_installed():
    if not Path(PROMETHEUS).exists():  # the suite fails rather than skips what it cannot run
        pytest.fail(
            "Prometheus is needed: apt-get install prometheus (make test installs it when run as root)"
        )


@contextlib.contextmanager
def start_prometheus(tmp: Path, config: str, *flags: str) -> Iterator[str]:
    port = free_port()
    (tmp / "prometheus.yml").write_text(config)
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def collector(pg_url) -> Iterator[Collector]:
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{free_port()}", db=pg_url, eval_interval=60)).start()
    yield c
    c.close()


def test_samples_prometheus_scrapes_and_remote_writes_appear_in_query_range(collector, tmp_path):
    agent = start_agent(
        AgentSettings(listen=f"127.0.0.1:{free_port()}", simulate=2, interval=0.5, node="sim-1")
    )
    try:
        config = f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: gpufleet-agent
    static_configs:
      - targets: ["{agent.settings.listen}"]
remote_write:
  - url: http://{collector.settings.listen}/api/v1/write
    queue_config:
      batch_send_deadline: 1s
      min_backoff: 100ms
"""
        with start_prometheus(tmp_path, config):
            base = f"http://{collector.settings.listen}"

            def series():
                now = time.time()
                r = requests.get(
                    base + "/api/v1/query_range",
                    timeout=5,
                    params={
                        "metric": "gpufleet_gpu_temperature_celsius",
                        "job": "gpufleet-agent",
                        "start": now - 60,
                        "end": now,
                        "step": 1,
                    },
                )
                r.raise_for_status()
                res = r.json()["data"]["result"]
                return res if len(res) == 2 and all(len(s["values"]) >= 3 for s in res) else None

            result = wait_until(series, timeout=60, interval=0.5)
            labels = [s["metric"] for s in result]
            assert sorted(lab["gpu"] for lab in labels) == ["0", "1"]
            assert all(lab["instance"] == agent.settings.listen and lab["node"] == "sim-1" for lab in labels)
            assert all(20 <= v <= 110 for s in result for _, v in s["values"])
            # Prometheus's own series (up, scrape_duration_seconds) came along and are stored too.
            gpus = requests.get(base + "/api/v1/gpus", timeout=5).json()["gpus"]
            assert len(gpus) == 2
            samples = collector.metrics.samples._value.get()
            assert samples > 0
    finally:
        agent.stop()


@pytest.fixture
def receiving_prometheus(tmp_path) -> Iterator[str]:
    with start_prometheus(
        tmp_path, "global:\n  scrape_interval: 1m\n", "--web.enable-remote-write-receiver"
    ) as url:
        yield url


def test_the_collector_forwards_what_it_stores_to_a_remote_write_receiver(receiving_prometheus, pg_url):
    target = receiving_prometheus + "/api/v1/write"
    c = Collector(
        CollectorSettings(listen=f"127.0.0.1:{free_port()}", db=pg_url, forward=[target], eval_interval=60)
    ).start()
    try:
        now_ms = int(time.time() * 1000)
        series = [
            rw.Series(
                {
                    "__name__": "gpufleet_gpu_power_watts",
                    "node": "n1",
                    "gpu": str(g),
                    "uuid": f"GPU-{g}",
                    "model": "H100",
                },
                [(now_ms - 2000, 300.0 + g), (now_ms - 1000, 310.0 + g)],
            )
            for g in range(3)
        ]
        r = requests.post(
            f"http://{c.settings.listen}/api/v1/write",
            data=rw.encode(series),
            timeout=10,
            headers={"Content-Type": rw.CONTENT_TYPE, "Content-Encoding": rw.CONTENT_ENCODING},
        )
        assert r.status_code == 204

        def forwarded():
            q = requests.get(
                receiving_prometheus + "/api/v1/query",
                timeout=5,
                params={"query": "gpufleet_gpu_power_watts", "time": now_ms / 1000},
            ).json()
            res = q["data"]["result"]
            return res if len(res) == 3 else None

        res = wait_until(forwarded, timeout=30, interval=0.3)
        assert sorted((s["metric"]["uuid"], float(s["value"][1])) for s in res) == [
            ("GPU-0", 310.0),
            ("GPU-1", 311.0),
            ("GPU-2", 312.0),
        ]
        (t,) = c.forwarder.targets
        wait_until(lambda: t.sent_samples == 6)
        assert t.dropped_samples == 0
    finally:
        c.close()


def test_a_target_that_refuses_a_batch_counts_the_drop_and_keeps_forwarding(receiving_prometheus, pg_url):
    from gpufleet.collector.forward import RemoteWriteTarget

    t = RemoteWriteTarget(receiving_prometheus + "/api/v1/write").start()
    try:
        t.submit(b"not snappy at all", 4)  # Prometheus answers 400: not retried, counted
        now_ms = int(time.time() * 1000)
        t.submit(rw.encode([rw.Series({"__name__": "gpufleet_gpu_up", "uuid": "GPU-9"}, [(now_ms, 1.0)])]), 1)
        wait_until(lambda: t.sent_samples == 1, timeout=20)
        assert (t.dropped_samples, t.failed_sends) == (4, 1)
    finally:
        t.stop()


def test_with_drop_a_full_queue_drops_and_counts_instead_of_growing_without_bound():
    from gpufleet.collector.forward import RemoteWriteTarget

    url = f"http://127.0.0.1:{free_port()}/api/v1/write"
    t = RemoteWriteTarget(url, max_queue_samples=10, when_full="drop")  # not started
    t.submit(b"a", 6)
    t.submit(b"b", 6)
    assert (t.queued_samples, t.dropped["queue_full"]) == (6, 6)
    assert t.backlog(6, 1) is None  # drop never refuses a write


def test_with_block_a_full_queue_refuses_the_next_write_by_samples_or_bytes_and_drops_nothing():
    from gpufleet.collector.forward import RemoteWriteTarget

    url = f"http://127.0.0.1:{free_port()}/api/v1/write"
    t = RemoteWriteTarget(url, max_queue_samples=10, max_queue_bytes=100)  # not started
    assert t.backlog(50, 10_000) is None  # an empty queue takes a batch however large
    t.submit(b"a" * 40, 6)
    assert t.backlog(4, 60) is None
    full = t.backlog(5, 10)
    assert full is not None and "--forward-max-queue-samples" in full.message
    assert t.backlog(1, 61) is not None  # 40 + 61 bytes is over 100
    t.submit(b"b" * 40, 6)  # a write already being stored still joins the queue
    assert (t.queued_samples, t.queued_bytes, t.dropped_samples, t.backpressure_writes) == (12, 80, 0, 2)
