"""A fresh clone is the product: cloned into an empty folder with nothing beside it, the README's test command
sets everything up by itself (virtual environment, test tools, the system packages the suite uses) and a
subset of the suite that goes through both API doubles (Slack and Grafana) passes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests that run the real Slack client and the real Grafana client against their doubles.
SUBSET = "test_slack_notifier or test_dashboards_push"


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="runs from a git checkout")
def test_make_test_passes_in_a_fresh_clone_with_nothing_beside_it(tmp_path):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.fail("git and make are needed: apt-get install git make")
    empty = tmp_path / "empty"
    empty.mkdir()
    clone = empty / "gpufleet"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    assert sorted(p.name for p in empty.iterdir()) == ["gpufleet"]  # no shared/ or anything else beside it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PYTEST"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/"
    )
    result = subprocess.run(
        ["make", "test", f"PYTEST_ARGS=-q -p no:cacheprovider -k '{SUBSET}'"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    summary = [line for line in result.stdout.splitlines() if " passed" in line]
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], tail
    assert (clone / ".venv" / "bin" / "gpufleet").exists()
