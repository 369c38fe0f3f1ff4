"""`gpufleet top` in a real pseudo-terminal against a collector fed by simulated GPUs on two nodes."""

from __future__ import annotations

import io
import json
import re
import sys
import urllib.request

import pexpect
import pytest
from rich.console import Console
from rich.screen import Screen
from rich.table import Table

from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.cli.top_ui import Filters, TopState, decode_keys, render, run_top, visible_gpus
from gpufleet.collector.service import Collector, CollectorSettings
from tests.conftest import free_port, wait_until

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")
ROW = re.compile(r"^>?\s*(node-[ab])\s+(\d+)\s+H100\S*\s.*?\s(\d+)°C\s+(\d+)W")


@pytest.fixture
def two_nodes(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    c = Collector(
        CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/t.db", eval_interval=1.0)
    ).start()
    agents = [
        start_agent(
            AgentSettings(
                listen=f"127.0.0.1:{free_port()}",
                collector=url,
                simulate=3,
                node=node,
                cluster="lab",
                interval=0.3,
                push_interval=0.5,
                seed=seed,
            )
        )
        for node, seed in (("node-a", 1), ("node-b", 2))
    ]
    try:

        def fleet_ready():
            with urllib.request.urlopen(url + "/api/v1/fleet", timeout=5) as resp:
                f = json.loads(resp.read())
            gpus = [g for n in f["nodes"] for g in n["gpus"]]
            return len(gpus) == 6 and all(g["temperature_celsius"] is not None for g in gpus)

        wait_until(fleet_ready, timeout=20)
        yield url, agents
    finally:
        for a in agents:
            a.stop()
        c.close()


def frames(output: str) -> list[list[str]]:
    """The screens top drew, as plain text lines (each redraw starts at the cursor's home)."""
    return [ANSI.sub("", f).replace("\r", "").split("\n") for f in output.split("\x1b[H")[1:]]


def last_frame(output: str, marker: str) -> list[str]:
    return next(f for f in reversed(frames(output)) if any(marker in line for line in f))


def rows(frame: list[str]) -> list[tuple[str, int, int, int]]:
    return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in map(ROW.match, frame) if m]


def spawn_top(url: str, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "gpufleet.cli", "top", "--collector", url, "--interval", "0.5", *args],
        dimensions=(30, 180),
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin"},
        encoding="utf-8",
        timeout=15,
    )


def test_top_shows_every_gpu_sorts_on_a_key_press_and_quits_cleanly(two_nodes):
    url, _ = two_nodes
    p = spawn_top(url)
    seen = []

    def expect(pattern) -> str:
        p.expect(pattern)
        seen.append(p.before + (p.after if isinstance(p.after, str) else ""))
        return "".join(seen)

    try:
        expect("rows 1-6 of 6")
        out = expect("rows 1-6 of 6")  # a second, full frame
        first = rows(last_frame(out, "sort: node"))
        assert [(n, g) for n, g, _, _ in first] == [(f"node-{x}", i) for x in "ab" for i in range(3)]

        p.send("t")
        expect("sort: temperature")
        out = expect("rows 1-6 of 6")
        by_temp = rows(last_frame(out, "sort: temperature"))
        assert len(by_temp) == 6
        temps = [t for _, _, t, _ in by_temp]
        assert temps == sorted(temps, reverse=True)

        p.send("p")
        expect("sort: power")
        out = expect("rows 1-6 of 6")
        watts = [w for _, _, _, w in rows(last_frame(out, "sort: power"))]
        assert len(watts) == 6 and watts == sorted(watts, reverse=True)

        p.send("/node-b\r")
        out = expect("rows 1-3 of 3")
        assert {n for n, *_ in rows(last_frame(out, "filter: /node-b"))} == {"node-b"}

        p.send("q")
        out = expect(pexpect.EOF)
    finally:
        p.close(force=True)
    assert p.exitstatus == 0, out[-2000:]
    assert out.rstrip().endswith("\x1b[?1049l")  # left the alternate screen: the shell is back as it was


def test_top_filters_from_the_command_line_and_says_when_the_collector_is_gone(two_nodes, tmp_path):
    url, _ = two_nodes
    p = spawn_top(url, "--node", "node-a", "--sort", "alerts")
    try:
        p.expect("rows 1-3 of 3")
        p.expect("filter: node=node-a")
    finally:
        p.send("q")
        p.expect(pexpect.EOF, timeout=10)
        p.close()
    assert p.exitstatus == 0

    gone = spawn_top(f"http://127.0.0.1:{free_port()}")
    try:
        gone.expect("cannot reach the collector at http://127.0.0.1:")
        gone.sendintr()  # Ctrl+C quits as q does, the terminal given back
        out = gone.read()
    finally:
        gone.close(force=True)
    assert gone.exitstatus == 0 and "Traceback" not in out and "Aborted" not in out
    assert out.rstrip().endswith("\x1b[?1049l")


def _gpu(node, gpu, **kw):
    return {
        "node": node,
        "gpu": str(gpu),
        "cluster": kw.pop("cluster", "c"),
        "model": "NVIDIA H100",
        "uuid": f"GPU-{node}-{gpu}",
        "pod": kw.pop("pod", None),
        "namespace": kw.pop("namespace", None),
        "alerts": kw.pop("alerts", []),
        "up": True,
        "stale": False,
        **kw,
    }


def test_sorting_puts_missing_values_last_and_alerts_by_severity():
    warn = {"rule": "GpuTemperatureHigh", "state": "firing", "severity": "warning", "runbook_url": None}
    crit = {"rule": "GpuXidCritical", "state": "firing", "severity": "critical", "runbook_url": None}
    fleet = {
        "nodes": [
            {
                "gpus": [
                    _gpu("a", 0, sm_active=0.5, alerts=[warn]),
                    _gpu("a", 1, sm_active=None),
                    _gpu("b", 0, sm_active=0.9, alerts=[crit], pod="train", namespace="ml"),
                    _gpu("b", 1, sm_active=0.1),
                ]
            }
        ]
    }
    order = [(g["node"], g["gpu"]) for g in visible_gpus(fleet, TopState(sort="sm"))]
    assert order == [("b", "0"), ("a", "0"), ("b", "1"), ("a", "1")]
    order = [(g["node"], g["gpu"]) for g in visible_gpus(fleet, TopState(sort="alerts"))]
    assert order[:2] == [("b", "0"), ("a", "0")]
    state = TopState(filters=Filters(pod="ml/"))
    assert [g["uuid"] for g in visible_gpus(fleet, state)] == ["GPU-b-0"]
    state = TopState()
    for key in "/train\r":
        state.press(key)
    assert state.text_filter == "train" and len(visible_gpus(fleet, state)) == 1
    state.press("esc")
    assert state.text_filter == "" and len(visible_gpus(fleet, state)) == 4
    state.press("q")
    assert state.quit


def _fleet(nodes: int, per_node: int = 8) -> dict:
    return {
        "totals": {"gpus": nodes * per_node, "up": nodes * per_node, "nodes": nodes},
        "nodes": [
            {"gpus": [_gpu(f"node-{n:03d}", g, temperature_celsius=30.0 + g) for g in range(per_node)]}
            for n in range(1, nodes + 1)
        ],
    }


def screen(fleet, state: TopState, size: tuple[int, int], error: str | None = None) -> list[str]:
    """The lines a terminal of ``size`` (columns, lines) shows, as rich's Live draws on the alternate screen."""
    width, height = size
    console = Console(width=width, height=height, file=io.StringIO(), color_system=None, record=True)
    console.print(Screen(render(fleet, state, "http://collector:9446", size, error)))
    return console.export_text().rstrip("\n").split("\n")


def selected(lines: list[str]) -> tuple[str, str]:
    """(node, gpu) of the row marked as selected."""
    marked = [line.split() for line in lines if line.startswith(">")]
    assert len(marked) == 1, "\n".join(lines)
    return marked[0][1], marked[0][2]


def test_a_thousand_gpus_scroll_a_row_a_page_and_to_either_end_with_the_footer_on_the_last_line():
    fleet = _fleet(125)
    state = TopState()
    lines = screen(fleet, state, (120, 30))
    assert (
        len(lines) == 30 and lines[0].startswith("gpufleet top ") and lines[1].split()[:2] == ["NODE", "GPU"]
    )
    assert lines[-1].startswith("rows 1-27 of 1000") and lines[-1].rstrip().endswith("q quit")
    assert selected(lines) == ("node-001", "0")

    def after(*keys: str) -> list[str]:
        for key in keys:
            state.press(key)
        return screen(fleet, state, (120, 30))

    assert selected(after("j")) == ("node-001", "1")
    assert selected(after("down", "down")) == ("node-001", "3")
    assert selected(after("k")) == ("node-001", "2")
    lines = after("pgdn")
    assert lines[-1].startswith("rows 28-54 of 1000") and selected(lines) == ("node-004", "5")  # row 30
    lines = after(" ")
    assert lines[-1].startswith("rows 55-81 of 1000") and selected(lines) == ("node-008", "0")  # row 57
    assert after("b")[-1].startswith("rows 28-54 of 1000")
    assert after("pgup", "pgup")[-1].startswith("rows 1-27 of 1000") and selected(after()) == (
        "node-001",
        "0",
    )

    for end in ("G", "end"):
        lines = after(end)
        assert lines[-1].startswith("rows 974-1000 of 1000"), "\n".join(lines)
        assert lines[-2].split()[:3] == [">", "node-125", "7"]
        assert after("pgdn", "j", "down")[-2].split()[:3] == [">", "node-125", "7"]  # the end stays the end
        assert after("up")[-3].split()[:3] == [">", "node-125", "6"]
        lines = after("home" if end == "end" else "g")
        assert lines[-1].startswith("rows 1-27 of 1000") and selected(lines) == ("node-001", "0")

    # Page by page from the top: 37 pages of 27 rows reach the last of 1,000.
    positions = [after("pgdn")[-1].split(" ", 2)[1] for _ in range(37)]
    assert positions[0] == "28-54" and positions[-1] == "974-1000" and positions[-2] == "973-999"


def test_only_the_rows_on_screen_are_rendered():
    fleet = _fleet(125)
    group = render(fleet, TopState(), "http://collector:9446", (120, 30))
    tables = [r for r in group.renderables if isinstance(r, Table)]
    assert len(tables) == 1 and tables[0].row_count == 27


def test_header_and_footer_stay_on_screen_at_any_size_and_a_resize_keeps_the_selection_in_view():
    fleet = _fleet(125)
    state = TopState()
    screen(fleet, state, (120, 30))
    for key in ("G", "k", "k"):
        state.press(key)
    for size in ((120, 30), (80, 12), (60, 8), (40, 5), (200, 60), (120, 30)):
        width, height = size
        lines = screen(fleet, state, size, error="cannot reach the collector; retrying every 2 s")
        assert len(lines) == height and all(len(line) <= width for line in lines)
        assert lines[0].startswith("gpufleet top ")
        assert re.match(r"rows? \d+(-\d+)? of 1000  ", lines[-1]), "\n".join(lines)
        assert lines[-2].startswith("cannot reach the collector")
        assert selected(lines) == ("node-125", "5")
        titles = lines[1].split()
        assert titles[:2] == ["NODE", "GPU"] and "ALERTS" in titles and "SM" in titles
    assert screen(fleet, state, (60, 8))[1].split() == ["NODE", "GPU", "SM", "MEM", "TEMP", "ALERTS"]
    # Too short for a table: the header and where the selection is.
    lines = screen(fleet, state, (120, 3))
    assert lines[0].startswith("gpufleet top ") and lines[1].startswith("row 998 of 1000")
    assert screen(fleet, state, (120, 1)) == [lines[1]]


def test_the_selection_follows_its_gpu_across_refreshes_and_a_new_order_starts_at_the_top():
    fleet = _fleet(4)
    state = TopState()
    screen(fleet, state, (120, 30))
    state.press("j")
    state.press("j")
    assert selected(screen(fleet, state, (120, 30))) == ("node-001", "2")
    # The next fetch has a new GPU ahead of it: the selection stays on node-001 GPU 2.
    fleet["nodes"].insert(0, {"gpus": [_gpu("node-000", 0)]})
    assert selected(screen(fleet, state, (120, 30))) == ("node-001", "2")
    # On the first row the first row stays selected: an untouched screen shows the top of the order.
    state.press("g")
    fleet["nodes"].insert(0, {"gpus": [_gpu("node-", 0)]})
    assert selected(screen(fleet, state, (120, 30))) == ("node-", "0")
    state.press("G")
    screen(fleet, state, (120, 30))
    state.press("t")
    lines = screen(fleet, state, (120, 30))
    assert lines[-1].startswith("rows 1-27 of 34") and selected(lines) == ("node-001", "7")  # hottest first
    # A GPU that leaves the fleet leaves the selection at its place in the list.
    for key in "jjj":
        state.press(key)
    assert selected(screen(fleet, state, (120, 30))) == ("node-004", "7")
    fleet["nodes"] = [n for n in fleet["nodes"] if n["gpus"][0]["node"] != "node-004"]
    assert selected(screen(fleet, state, (120, 30))) == ("node-001", "6")
    # A filter starts at the top of what it shows; the footer stays on the last line below a short list.
    for key in "/node-002\r":
        state.press(key)
    lines = screen(fleet, state, (120, 30))
    assert lines[-1].startswith("rows 1-8 of 8") and selected(lines) == ("node-002", "7")
    assert len(lines) == 30 and lines[0].startswith("gpufleet top ") and not lines[-2].strip()


def test_keys_arrive_as_terminals_send_them():
    assert decode_keys("jk G") == (["j", "k", " ", "G"], "")
    # xterm, VT220 / tmux, rxvt, and application cursor-key mode (SS3); modifiers do not matter.
    xterm = "\x1b[A\x1b[B\x1b[5~\x1b[6~\x1b[H\x1b[F"
    assert decode_keys(xterm) == (["up", "down", "pgup", "pgdn", "home", "end"], "")
    assert decode_keys("\x1b[1~\x1b[4~\x1b[7~\x1b[8~") == (["home", "end", "home", "end"], "")
    assert decode_keys("\x1bOA\x1bOB\x1bOH\x1bOF\x1b[1;5B") == (["up", "down", "home", "end", "down"], "")
    # Unknown sequences (F5) are no key; a sequence cut off by the read is handed back to be completed.
    assert decode_keys("\x1b[15~q") == (["q"], "")
    assert decode_keys("j\x1b[6") == (["j"], "\x1b[6")
    assert decode_keys("j\x1b") == (["j"], "\x1b")
    assert decode_keys("\x1bq") == (["esc", "q"], "")
    # While typing a filter, named keys are not text.
    state = TopState()
    for key in ["/", "a", "down", "pgdn", "b", "\x7f", "c", "\r"]:
        state.press(key)
    assert state.text_filter == "ac"


def test_a_failure_other_than_an_unreachable_collector_ends_top_with_it_instead_of_freezing_the_screen():
    class Broken:
        base_url = "http://collector:9446"

        def fleet(self):
            raise RuntimeError("the collector's answer broke the client")

    console = Console(width=120, height=30, file=io.StringIO())
    with pytest.raises(RuntimeError, match="answer broke the client"):
        run_top(Broken(), interval=0.2, console=console, stdin=io.StringIO())
