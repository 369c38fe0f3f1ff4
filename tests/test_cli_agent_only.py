"""An agent-only install (pip install 'gpufleet[agent]') runs `gpufleet agent`: the command line loads no part
of the collector and none of its dependencies until a collector command runs. Checked in this environment by
making those modules unimportable in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from tests.conftest import free_port, wait_until

BLOCKED = (
    "gpufleet.collector",
    "sqlalchemy",
    "fastapi",
    "uvicorn",
    "alembic",
    "psycopg",
    "slack_sdk",
    "apscheduler",
    "starlette",
)

# Runs the command line with a meta-path finder that refuses the collector and its dependencies, as a missing
# package would.
PRELUDE = f"""
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: an agent-only install)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from gpufleet.cli import main
"""


def run_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + f"main({list(args)!r}, prog_name='gpufleet')"]


def test_the_blocker_blocks():
    r = subprocess.run(
        [sys.executable, "-c", PRELUDE + "import sqlalchemy"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "agent-only install" in r.stderr, r.stderr


def test_agent_help_needs_no_collector_dependency():
    r = subprocess.run(run_cli("agent", "--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--collector" in r.stdout and "GPUFLEET_COLLECTOR" in r.stdout


def test_an_agent_without_the_collector_dependencies_serves_metrics(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        run_cli("agent", "--simulate", "2", "--listen", f"127.0.0.1:{port}", "--spool-dir", ""),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def metrics() -> str | None:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    return resp.read().decode()
            except OSError:
                return None

        body = wait_until(metrics, timeout=30)
        assert "gpufleet_gpu_up{" in body
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "Traceback" not in out, out
