"""What the wiring tests share: a real `gpufleet collector` process, remote-writes through the one sender, and
the collector's own /metrics and /healthz as an operator reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gpufleet.core import remote_write as rw
from gpufleet.core.sender import RemoteWriteSender, SendResult, http_pool
from tests.conftest import wait_until

# One group per GPU, told at once: these tests are about wiring, not about grouping delays.
HOT_GPU_RULES = """
route:
  group_by: [alertname, uuid]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 4h
groups:
  - name: wiring
    rules:
      - alert: GpuTooHot
        kind: threshold
        metric: gpufleet_gpu_temperature_celsius
        op: ">"
        value: 90
        for: 0s
        severity: critical
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} is too hot"
"""


class CollectorProcess:
    """`python -m gpufleet.cli collector ARGS` on 127.0.0.1:PORT, its output in a file the test can read while
    it runs."""

    def __init__(self, port: int, args: list[str], log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet.cli", "collector", "--listen", f"127.0.0.1:{port}", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_until(lambda: self.proc.poll() is not None or self.healthz(), timeout=60, interval=0.2)
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.log_path.read_text()

    def healthz(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def metric(self, name: str) -> float:
        """A sample of the collector's own /metrics, as Prometheus would scrape it."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        values = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ")]
        assert values, f"{name} is not on {self.url}/metrics"
        return values[0]

    def is_leader(self) -> bool:
        h = self.healthz()
        return bool(h and h["leader"])

    def terminate(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def temperatures(temps: dict[int, float], node: str = "n1") -> list[rw.Series]:
    now = int(time.time() * 1000)
    return [
        rw.Series(
            {"__name__": "gpufleet_gpu_temperature_celsius", "node": node, "gpu": str(g), "uuid": f"GPU-{g}"},
            [(now, t)],
        )
        for g, t in temps.items()
    ]


def remote_write(url: str, series: list[rw.Series], *, urgent: bool = False) -> SendResult:
    """Push through the sender the agent uses (same headers, same urgency flag)."""
    sender = RemoteWriteSender(url + "/api/v1/write", http_pool(30), user_agent="gpufleet-agent-test")
    return sender.send(rw.encode(series), urgent=urgent)


def start_up(
    workdir: Path, gpus: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, str, Path]:
    """`gpufleet up --simulate GPUS` in ``workdir`` on free ports, sampling, pushing and evaluating fast; returns
    the process, the collector's and the agent's URLs and the file its output goes to."""
    from tests.conftest import free_port

    agent_port, port = free_port(), free_port()
    log = workdir / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpufleet.cli",
                "up",
                "--simulate",
                str(gpus),
                "--agent-listen",
                f"127.0.0.1:{agent_port}",
                "--listen",
                f"127.0.0.1:{port}",
                "--interval",
                "0.5",
                "--push-interval",
                "1",
                "--eval-interval",
                "1",
            ],
            cwd=workdir,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{agent_port}", log
