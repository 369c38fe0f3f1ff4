"""The guards `make lint` runs in CI catch what they are there for: the type checker rejects a notifier that
does not fit the engine's contract (a notifier reading per-alert fields from the group notification it gets
failed on every alert in production once, unseen), and import-linter rejects the agent importing the
collector. Each seeded violation is checked next to a control that passes, so neither check can pass by
checking nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARTS = ("agent", "collector", "alerts", "dashboards")


def _layout(into: Path, *, copy: tuple[str, ...] = ()) -> Path:
    """The installed layout as scripts/lint-layout.sh links it, with the parts in ``copy`` copied instead
    (so a test can seed a module into them)."""
    pkg = into / "gpufleet"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "gpufleet").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for part in PARTS:
        if part in copy:
            shutil.copytree(ROOT / part, pkg / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (pkg / part).symlink_to(ROOT / part)
    return into


def _mypy(layout: Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "mypy"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--no-incremental",
            "--follow-imports",
            "silent",
            str(layout / module),
        ],
        cwd=layout,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPYPATH": str(layout)},
    )


NOTIFIERS = """
from gpufleet.collector.rules.contract import Delivery, Notifier
from gpufleet.collector.rules.dispatch import GroupNotification, Notification


class GroupNotifier:
    name = "good"

    def send(self, group: GroupNotification, /) -> Delivery:
        return Delivery(("good", group.key))


class PerAlertNotifier:
    name = "bad"

    def send(self, n: Notification, /) -> Delivery:
        return Delivery(("bad", n.rule))


good: list[Notifier] = [GroupNotifier()]
bad: list[Notifier] = [PerAlertNotifier()]
"""


def test_the_type_checker_rejects_a_notifier_with_the_wrong_signature(tmp_path):
    layout = _layout(tmp_path)
    (layout / "seeded_notifiers.py").write_text(NOTIFIERS)
    result = _mypy(layout, "seeded_notifiers.py")
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 1, errors  # the control class passes
    bad_line = NOTIFIERS.splitlines().index("bad: list[Notifier] = [PerAlertNotifier()]") + 1
    assert f"seeded_notifiers.py:{bad_line}:" in errors[0]
    assert '"PerAlertNotifier"; expected "Notifier"' in errors[0]


def _lint_imports(layout: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache", str(ROOT / ".importlinter")],
        cwd=layout,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(layout)},
    )


def test_import_linter_rejects_the_agent_importing_the_collector(tmp_path):
    control = _lint_imports(_layout(tmp_path / "control", copy=("agent",)))
    assert control.returncode == 0, control.stdout + control.stderr
    assert "0 broken" in control.stdout

    layout = _layout(tmp_path / "seeded", copy=("agent",))
    (layout / "gpufleet" / "agent" / "seeded.py").write_text("from gpufleet.collector.store import Store\n")
    result = _lint_imports(layout)
    assert result.returncode != 0
    assert "the agent never imports the collector, the rule pack or the dashboards BROKEN" in result.stdout
    assert "gpufleet.agent.seeded -> gpufleet.collector.store" in result.stdout
