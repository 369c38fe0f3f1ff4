"""A fresh `pip install gpufleet[collector]` from the wheel is the whole collector: its urllib3 is the real
urllib3 (nothing installs urllib3-future, whose .pth file replaces urllib3 at every interpreter start), it
carries neither grafana-client nor the dashboards SDK, and it pushes the shipped dashboards to Grafana."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet import dashboards
from tests.doubles.grafana_api import GrafanaDouble

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel

# Run by the fresh environment's interpreter: what is installed, and where urllib3 comes from.
PROBE = """
import importlib.metadata as md, json, sysconfig, urllib3
dist = md.distribution("urllib3")
print(json.dumps({
    "installed": sorted(d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()),
    "urllib3_version": urllib3.__version__,
    "urllib3_dist_version": dist.version,
    "urllib3_file": urllib3.__file__,
    "urllib3_dist_files": [str(dist.locate_file(f)) for f in dist.files or []],
    "site_packages": sysconfig.get_paths()["purelib"],
}))
"""


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    }
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def collector_env(tmp_path_factory) -> Path:
    """A new virtual environment with gpufleet[collector] installed from a wheel of this tree; its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Without isolation pip builds with this environment's setuptools instead of downloading one.
    shutil.rmtree(
        ROOT / "build", ignore_errors=True
    )  # setuptools would reuse a stale build/lib of an older layout
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        *isolation,
        "-w",
        str(tmp / "dist"),
        str(ROOT),
    )
    [wheel] = (tmp / "dist").glob("gpufleet-*.whl")
    _run(sys.executable, "-m", "venv", str(tmp / "venv"))
    bin_dir = tmp / "venv" / "bin"
    _run(
        str(bin_dir / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        f"gpufleet[collector] @ {wheel.as_uri()}",
    )
    return bin_dir


def test_the_collector_install_has_the_real_urllib3_and_no_grafana_client_or_sdk(collector_env):
    probe = json.loads(_run(str(collector_env / "python"), "-I", "-c", PROBE).stdout)
    installed = set(probe["installed"])
    assert "gpufleet" in installed and "urllib3" in installed
    assert not installed & {"urllib3-future", "niquests", "grafana-client", "grafana-foundation-sdk"}
    assert probe["urllib3_version"] == probe["urllib3_dist_version"]
    urllib3_file = Path(probe["urllib3_file"]).resolve()
    assert urllib3_file.is_relative_to(Path(probe["site_packages"]).resolve())
    assert urllib3_file in {Path(f).resolve() for f in probe["urllib3_dist_files"]}


def test_the_collector_install_pushes_the_shipped_dashboards_without_the_sdk(collector_env):
    with GrafanaDouble() as grafana:
        out = _run(
            str(collector_env / "gpufleet"),
            "dashboards",
            "push",
            "--grafana-url",
            grafana.url,
            "--grafana-token",
            grafana.token,
            "--db",
            "postgresql+psycopg://reader@db:5432/gpufleet",
        ).stdout
        created = 2 + len(dashboards.DASHBOARDS)  # the folder, the data source, each PostgreSQL dashboard
        assert f"{created} created, 0 updated, 0 unchanged" in out
        assert grafana.problems == []


def test_the_wheel_adds_exactly_one_top_level_import_name(collector_env):
    site = Path(json.loads(_run(str(collector_env / "python"), "-I", "-c", PROBE).stdout)["site_packages"])
    [dist_info] = site.glob("gpufleet-*.dist-info")
    record = (dist_info / "RECORD").read_text().splitlines()
    paths = [line.split(",", 1)[0] for line in record]
    tops = {p.split("/", 1)[0] for p in paths if "/" in p and not p.startswith("..")} - {dist_info.name}
    assert tops == {"gpufleet"}
    for part in ("agent", "collector", "alerts", "dashboards"):
        assert (site / "gpufleet" / part / "__init__.py").exists()
        assert not (site / part).exists()


def test_every_package_of_the_source_tree_is_in_the_wheel(collector_env):
    site = Path(json.loads(_run(str(collector_env / "python"), "-I", "-c", PROBE).stdout)["site_packages"])
    roots = {
        "gpufleet": ROOT / "gpufleet",
        "gpufleet/agent": ROOT / "agent",
        "gpufleet/collector": ROOT / "collector",
        "gpufleet/alerts": ROOT / "alerts",
        "gpufleet/dashboards": ROOT / "dashboards",
    }
    for installed, source in roots.items():
        for init in source.rglob("__init__.py"):
            package = init.parent.relative_to(source)
            assert (site / installed / package / "__init__.py").exists(), (
                f"{installed}/{package} is not in the wheel"
            )
