"""The container images install the wheel the tests install, through docker/install-wheel.sh; this runs that
same script: the agent's environment has no collector dependency and serves /metrics from simulated GPUs,
the collector's carries the rule pack where the chart's --rules points."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    shutil.rmtree(
        ROOT / "build", ignore_errors=True
    )  # setuptools would reuse a stale build/lib of an older layout
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)], check=True
    )
    return out


def _install(extra: str, wheel_dir: Path, prefix: Path, *more: str) -> Path:
    result = subprocess.run(
        ["sh", str(DOCKER / "install-wheel.sh"), extra, str(prefix), str(wheel_dir), *more],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix / "bin"


def test_dockerfiles_install_their_extra_through_the_shared_script():
    for extra in ("agent", "collector"):
        text = (DOCKER / f"{extra}.Dockerfile").read_text()
        runs = re.findall(r"install-wheel\.sh (\w+) ", text)
        assert runs == [extra], f"{extra}.Dockerfile must install gpufleet[{extra}] only, found {runs}"
        assert re.search(r"^USER 10001", text, re.M), f"{extra} image must default to a non-root user"
        assert "COPY dist/" in text, "the image installs the wheel built from this tree"


def test_agent_install_has_no_collector_dependencies_and_serves_metrics(wheel_dir, tmp_path):
    bin_dir = _install("agent", wheel_dir, tmp_path / "agent")
    for module in ("sqlalchemy", "fastapi", "alembic", "psycopg", "slack_sdk", "apscheduler", "uvicorn"):
        probe = subprocess.run([str(bin_dir / "python"), "-I", "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"the agent image would carry the collector dependency {module}"
    port = free_port()
    proc = subprocess.Popen(
        [str(bin_dir / "gpufleet"), "agent", "--simulate", "2", "--listen", f"127.0.0.1:{port}"],
        env={"NODE_NAME": "gpu-node-7", "PATH": str(bin_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def get(path: str) -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                    return resp.read().decode()
            except OSError:
                return None

        health = wait_until(lambda: get("/healthz"), timeout=30)
        assert '"node": "gpu-node-7"' in health  # NODE_NAME, as the chart's downward API sets it
        metrics = wait_until(lambda: get("/metrics"))
        assert "gpufleet_gpu_up{" in metrics and 'node="gpu-node-7"' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_collector_install_carries_the_rule_pack_where_the_chart_points(wheel_dir, tmp_path):
    rules = tmp_path / "share" / "rules"
    bin_dir = _install("collector", wheel_dir, tmp_path / "collector", str(rules))
    shipped = sorted(p.name for p in (ROOT / "alerts").glob("*.yaml"))
    assert sorted(p.name for p in rules.glob("*.yaml")) == shipped
    check = subprocess.run(
        [str(bin_dir / "gpufleet"), "alerts", "check", str(rules)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "rules OK" in check.stdout, check.stdout + check.stderr
    # and the runbooks its rules link to, which it serves from the package at /runbooks/NAME
    probe = subprocess.run(
        [
            str(bin_dir / "python"),
            "-I",
            "-c",
            "from gpufleet.collector.runbooks import Runbooks; "
            "b = Runbooks.shipped(); print(len(b.names()), 'GpuXidCritical' in b.page('xid-critical'))",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == [str(len(list((ROOT / "alerts" / "runbooks").glob("*.md")))), "True"], (
        probe.stdout + probe.stderr
    )


def test_install_script_names_the_fix_when_the_wheel_is_missing(tmp_path):
    result = subprocess.run(
        ["sh", str(DOCKER / "install-wheel.sh"), "agent", str(tmp_path / "v"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "pip wheel --no-deps -w dist ." in result.stderr
