"""`gpufleet top` in a real terminal (tmux) against a collector process that knows 1,000 GPUs: an operator pages
through the whole fleet to its last GPU, moves a row at a time, resizes the window, and the header and the
footer stay on screen throughout."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.core import remote_write as rw
from gpufleet.core.sender import Verdict
from tests.conftest import free_port, produced, wait_until
from tests.wiring import CollectorProcess, remote_write

NODES, GPUS_PER_NODE = 125, 8
WIDTH, HEIGHT = 120, 30
ROWS_ON_SCREEN = HEIGHT - 3  # the header, the column titles and the footer take three lines
# A row as top draws it: the selection marker, node, GPU index, and further on the power draw.
ROW = re.compile(r"^(?P<marker>[> ]) +(?P<node>node-\d{3}) +(?P<gpu>\d+) .* (?P<watts>\d+)W\b")
SGR = re.compile(r"\x1b\[([0-9;]*)m")
SGR_SPLIT = re.compile(r"(\x1b\[[0-9;]*m)")


def power_watts(index: int) -> float:
    """Every GPU draws a different power, so a row on screen shows which GPU's data it carries."""
    return 100.0 + index


def fleet_series() -> tuple[list[rw.Series], list[tuple[str, str]]]:
    """The series the fleet view reads for NODES x GPUS_PER_NODE GPUs, and the GPUs in top's node order."""
    now = int(time.time() * 1000)
    series: list[rw.Series] = []
    order: list[tuple[str, str]] = []
    for n in range(NODES):
        for g in range(GPUS_PER_NODE):
            index = n * GPUS_PER_NODE + g
            node = f"node-{n + 1:03d}"
            identity = {
                "node": node,
                "gpu": str(g),
                "uuid": f"GPU-{index:04d}",
                "model": "NVIDIA H100 80GB HBM3",
                "cluster": "lab",
            }
            values = {
                "gpufleet_gpu_up": 1.0,
                "gpufleet_gpu_sm_active_ratio": 0.4 + g * 0.05,
                "gpufleet_gpu_utilization_ratio": 0.9,
                "gpufleet_gpu_memory_used_bytes": 30e9,
                "gpufleet_gpu_memory_total_bytes": 80e9,
                "gpufleet_gpu_temperature_celsius": 40.0 + g,
                "gpufleet_gpu_power_watts": power_watts(index),
            }
            series += [
                rw.Series({"__name__": produced(name), **identity}, [(now, v)]) for name, v in values.items()
            ]
            order.append((node, str(g)))
    return series, order


@dataclass(frozen=True)
class Fleet:
    url: str
    order: list[tuple[str, str]]  # (node, gpu) of every GPU, in top's default order (node, then GPU index)


@pytest.fixture(scope="module")
def thousand_gpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("top-1000")
    # Rule evaluation is not what this test is about: once an hour keeps 1,000 GPUs of it off a small CI box.
    collector = CollectorProcess(
        free_port(),
        ["--db", f"sqlite:///{workdir}/collector.db", "--eval-interval", "1h"],
        workdir / "collector.log",
    )
    try:
        series, order = fleet_series()
        result = remote_write(collector.url, series)
        assert result.verdict is Verdict.OK, (result, collector.output()[-2000:])

        def gpus_known() -> int:
            with urllib.request.urlopen(collector.url + "/api/v1/fleet", timeout=10) as r:
                return sum(len(n["gpus"]) for n in json.loads(r.read())["nodes"])

        wait_until(lambda: gpus_known() == len(order), timeout=30, interval=0.5)
        yield Fleet(collector.url, order)
    finally:
        collector.stop()


class Tmux:
    """One tmux server of the test's own (its socket in the test's folder, no user configuration) running one
    command in a detached WIDTH x HEIGHT window without a status line, so the command owns every line."""

    def __init__(self, workdir: Path, command: list[str]) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            pytest.fail(
                "tmux is not installed: scripts/test-system-deps.sh installs it (apt-get install tmux)"
            )
        conf = workdir / "tmux.conf"
        # remain-on-exit keeps the pane after the command ends, and so what it printed last (a traceback).
        conf.write_text("set -g status off\nset -g remain-on-exit on\n")
        self._base = [tmux, "-S", str(workdir / "tmux.sock"), "-f", str(conf)]
        # The terminal's size must come from the terminal: LINES and COLUMNS in the environment would pin it.
        self._env = {k: v for k, v in os.environ.items() if k not in ("LINES", "COLUMNS", "TMUX")}
        # The command's exit status comes through a file its shell writes: tmux 3.3 can report a pane dead before
        # it has read the status (tmux/tmux#4841).
        self._status = workdir / "exit-status"
        wrapped = ["sh", "-c", f'"$@"; echo $? > {shlex.quote(str(self._status))}', "sh", *command]
        self._tmux("new-session", "-d", "-s", "top", "-x", str(WIDTH), "-y", str(HEIGHT), *wrapped)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            [*self._base, *args], env=self._env, capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def send(self, *keys: str) -> None:
        """Key presses as tmux names them (j, Down, PageDown, End, …), one at a time as a person types."""
        for key in keys:
            self._tmux("send-keys", "-t", "top", key)

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height))

    def pane(self, fmt: str) -> str:
        return self._tmux("display-message", "-p", "-t", "top", fmt).strip()

    def screen(self, *, attributes: bool = False) -> list[str]:
        """The lines on screen; with ``attributes``, with the escape sequences of their colours and video modes."""
        out = self._tmux("capture-pane", "-p", "-t", "top", *(["-e"] if attributes else []))
        return out.rstrip("\n").split("\n")

    def wait_for(self, what: str, ready: Callable[[list[str]], bool], timeout: float = 20.0) -> list[str]:
        """The screen once ``ready`` holds for it; fails with the screen as it last was."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if ready(lines):
                return lines
            if time.monotonic() > deadline or self.pane("#{pane_dead}") == "1":
                raise AssertionError(
                    f"{what}: not on screen within {timeout:g} s; the screen:\n" + "\n".join(lines)
                )
            time.sleep(0.1)

    def exit_status(self, timeout: float = 10.0) -> int:
        """The command's exit status, once it has ended."""
        wait_until(lambda: self._status.exists() and self._status.read_text().strip(), timeout=timeout)
        return int(self._status.read_text())

    def kill(self) -> None:
        subprocess.run(
            [*self._base, "kill-server"], env=self._env, capture_output=True, timeout=30, check=False
        )


def rows(lines: list[str]) -> list[re.Match[str]]:
    return [m for m in map(ROW.match, lines) if m]


def selected(lines: list[str]) -> tuple[str, str] | None:
    marked = [(m["node"], m["gpu"]) for m in rows(lines) if m["marker"] == ">"]
    return marked[0] if len(marked) == 1 else None


def footer(lines: list[str]) -> str:
    return lines[-1] if lines else ""


def at(lines: list[str], first: int, last: int, of: int) -> bool:
    """The footer says rows FIRST-LAST of OF and still shows its keys, and those rows fill the screen."""
    return footer(lines).startswith(f"rows {first}-{last} of {of}  ") and "q quit" in footer(lines)


def _reverse_after(params: str, reverse: bool) -> bool:
    """Reverse video after one SGR sequence with ``params`` ("0;7", "48;5;235", …)."""
    codes = [int(p) if p else 0 for p in params.split(";")]
    k = 0
    while k < len(codes):
        if codes[k] in (38, 48, 58):  # an extended colour: its arguments are not attributes
            k += 3 if codes[k + 1 : k + 2] == [5] else 5
            continue
        if codes[k] in (0, 27):
            reverse = False
        elif codes[k] == 7:
            reverse = True
        k += 1
    return reverse


def reverse_lines(ansi_lines: list[str]) -> list[int]:
    """Indexes of the lines whose first visible character is in reverse video, from `capture-pane -e` output
    (which writes attribute changes only, so the state is followed from the top of the screen)."""
    reverse = False
    out: list[int] = []
    for i, line in enumerate(ansi_lines):
        decided = False
        for chunk in SGR_SPLIT.split(line):
            sgr = SGR.fullmatch(chunk)
            if sgr:
                reverse = _reverse_after(sgr[1], reverse)
            elif not decided and chunk.strip():
                decided = True
                if reverse:
                    out.append(i)
    return out


def test_top_pages_through_1000_gpus_to_the_last_one_with_the_footer_on_screen(thousand_gpus, tmp_path):
    fleet = thousand_gpus
    last_node, last_gpu = fleet.order[-1]
    total = len(fleet.order)
    gpufleet = Path(sys.executable).with_name("gpufleet")  # the console script, as a user runs it
    assert gpufleet.exists(), f"the gpufleet console script is not installed next to {sys.executable}"
    # One fetch at the start and none after: every later change on screen is the answer to a key or a resize.
    tmux = Tmux(tmp_path, [str(gpufleet), "top", "--collector", fleet.url, "--interval", "1h"])
    try:
        assert tmux.pane("#{pane_width}x#{pane_height}") == f"{WIDTH}x{HEIGHT}"
        lines = tmux.wait_for("the first page", lambda s: at(s, 1, ROWS_ON_SCREEN, total))
        assert lines[0].startswith("gpufleet top ") and f"/{total} GPUs up, {NODES} nodes" in lines[0]
        assert lines[1].split()[:2] == ["NODE", "GPU"]
        shown = [(m["node"], m["gpu"]) for m in rows(lines)]
        assert shown == fleet.order[:ROWS_ON_SCREEN] and selected(lines) == fleet.order[0]

        # j and Down move the selection one row, k and Up back; the highlight is on the selected row.
        tmux.send("j")
        lines = tmux.wait_for("j: the second GPU selected", lambda s: selected(s) == fleet.order[1])
        assert at(lines, 1, ROWS_ON_SCREEN, total)
        tmux.send("Down")
        tmux.wait_for("Down: the third GPU selected", lambda s: selected(s) == fleet.order[2])
        ansi, plain = tmux.screen(attributes=True), tmux.screen()
        highlighted = [i for i in reverse_lines(ansi) if ROW.match(plain[i])]
        assert highlighted == [2 + 2]  # the third row, below the header and the column titles
        assert plain[2 + 2].startswith(">")
        tmux.send("Up", "k")
        tmux.wait_for("Up, k: the first GPU selected", lambda s: selected(s) == fleet.order[0])

        # PageDown, again and again, to the end of the fleet: 37 pages of 27 rows hold 1,000.
        tmux.send("PageDown")
        lines = tmux.wait_for(
            "the second page", lambda s: at(s, ROWS_ON_SCREEN + 1, 2 * ROWS_ON_SCREEN, total)
        )
        assert [(m["node"], m["gpu"]) for m in rows(lines)] == fleet.order[
            ROWS_ON_SCREEN : 2 * ROWS_ON_SCREEN
        ]
        pages = -(-total // ROWS_ON_SCREEN)
        tmux.send(*["PageDown"] * pages)
        lines = tmux.wait_for("the last page", lambda s: at(s, total - ROWS_ON_SCREEN + 1, total, total))
        last_row = rows(lines)[-1]
        assert (last_row["node"], last_row["gpu"]) == (last_node, last_gpu) == selected(lines)
        assert int(last_row["watts"]) == power_watts(total - 1)  # the last GPU's own numbers
        assert lines.index(last_row.string) == HEIGHT - 2  # right above the footer

        # Home and End, g and G: either end at once.
        tmux.send("Home")
        tmux.wait_for("Home: the first page", lambda s: at(s, 1, ROWS_ON_SCREEN, total))
        tmux.send("End")
        lines = tmux.wait_for("End: the last page", lambda s: at(s, total - ROWS_ON_SCREEN + 1, total, total))
        assert selected(lines) == (last_node, last_gpu)
        tmux.send("g")
        tmux.wait_for("g: the first page", lambda s: at(s, 1, ROWS_ON_SCREEN, total))
        tmux.send("G")
        tmux.wait_for("G: the last page", lambda s: selected(s) == (last_node, last_gpu))

        # A smaller window: the last GPU, the header and the footer are still on screen.
        tmux.resize(80, 12)
        lines = tmux.wait_for(
            "the last GPU in an 80x12 window", lambda s: len(s) == 12 and at(s, total - 8, total, total)
        )
        assert lines[0].startswith("gpufleet top ") and all(len(line) <= 80 for line in lines)
        assert rows(lines)[-1]["node"] == last_node and selected(lines) == (last_node, last_gpu)

        tmux.send("q")
        assert tmux.exit_status() == 0, "\n".join(tmux.screen())
    finally:
        tmux.kill()
