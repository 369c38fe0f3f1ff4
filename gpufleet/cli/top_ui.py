"""The screen of `gpufleet top`: every GPU of the fleet in one terminal, from the collector's /api/v1/fleet.

It talks HTTP to the collector only, through the CollectorClient. The screen is redrawn in place on the terminal's alternate
screen (rich's Live), so a refresh does not flicker and quitting gives the shell back as it was.
Keys: s SM activity, u utilization, m memory, t temperature, p power, a alerts, n node order,
r reverse, / filter (Enter applies, Esc clears), q quit.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpufleet.cli.client import ClientError, Fleet, FleetGPU

GIB = float(1 << 30)
SEVERITY_RANK = {"critical": 3, "warning": 2, "info": 1}


@dataclass(frozen=True)
class Filters:
    cluster: str | None = None
    node: str | None = None  # substring of the node name
    pod: str | None = None  # substring of namespace/pod

    def keep(self, g: FleetGPU) -> bool:
        if self.cluster and (g.get("cluster") or "") != self.cluster:
            return False
        if self.node and self.node not in (g.get("node") or ""):
            return False
        return not (self.pod and self.pod not in _pod(g))


SortKey = tuple[float | str | bool, ...]


def _pod(g: FleetGPU) -> str:
    pod = g.get("pod")
    return f"{g.get('namespace') or ''}/{pod}" if pod else ""


def _desc(value: Callable[[FleetGPU], float | None]) -> Callable[[FleetGPU], SortKey]:
    # Missing values sort last whichever way the order goes.
    def key(g: FleetGPU) -> SortKey:
        v = value(g)
        return (v is None, -(v or 0.0))

    return key


def _alert_rank(g: FleetGPU) -> SortKey:
    firing = [a for a in g.get("alerts", []) if a["state"] == "firing"]
    return (
        -max((SEVERITY_RANK.get(a["severity"], 0) for a in firing), default=0),
        -len(firing),
        -len(g.get("alerts", [])),
    )


def _node_order(g: FleetGPU) -> SortKey:
    gpu = str(g.get("gpu") or "0")
    return (g.get("cluster") or "", g.get("node") or "", int(gpu) if gpu.isdigit() else 0)


# sort name -> (key press, column title, key function)
SORTS: dict[str, tuple[str, str, Callable[[FleetGPU], SortKey]]] = {
    "node": ("n", "NODE", _node_order),
    "sm": ("s", "SM", _desc(lambda g: g.get("sm_active"))),
    "util": ("u", "UTIL", _desc(lambda g: g.get("utilization"))),
    "memory": ("m", "MEM", _desc(lambda g: g.get("memory_used_bytes"))),
    "temperature": ("t", "TEMP", _desc(lambda g: g.get("temperature_celsius"))),
    "power": ("p", "POWER", _desc(lambda g: g.get("power_watts"))),
    "alerts": ("a", "ALERTS", _alert_rank),
}
KEYS = {key: name for name, (key, _, _) in SORTS.items()}


@dataclass
class TopState:
    sort: str = "node"
    reverse: bool = False
    filters: Filters = field(default_factory=Filters)
    text_filter: str = ""  # typed with "/": matches node, pod, cluster or model
    typing: str | None = None  # the filter being typed, None when not typing
    quit: bool = False

    def press(self, key: str) -> None:
        """Apply one key press."""
        if self.typing is not None:
            if key in ("\r", "\n"):
                self.text_filter, self.typing = self.typing, None
            elif key == "\x1b":
                self.text_filter, self.typing = "", None
            elif key in ("\x7f", "\b"):
                self.typing = self.typing[:-1]
            elif key.isprintable():
                self.typing += key
            return
        if key in ("q", "Q", "\x03"):
            self.quit = True
        elif key == "/":
            self.typing = ""
        elif key == "\x1b":
            self.text_filter = ""
        elif key == "r":
            self.reverse = not self.reverse
        elif key in KEYS:
            self.sort, self.reverse = KEYS[key], False


def visible_gpus(fleet: Fleet, state: TopState) -> list[FleetGPU]:
    """The fleet's GPUs after filters, in the chosen order."""
    gpus = [g for n in fleet.get("nodes", []) for g in n.get("gpus", []) if state.filters.keep(g)]
    if state.text_filter:
        needle = state.text_filter.lower()
        gpus = [
            g
            for g in gpus
            if any(
                needle in str(v).lower()
                for v in (g.get("node"), _pod(g), g.get("cluster"), g.get("model"), g.get("uuid"))
            )
        ]
    key = SORTS[state.sort][2]
    gpus.sort(key=_node_order)
    gpus.sort(key=key, reverse=state.reverse)
    return gpus


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def render(
    fleet: Fleet | None, state: TopState, url: str, error: str | None = None, updated: float | None = None
) -> Group:
    """The whole screen: a header line, the GPU table, the key help."""
    t = fleet.get("totals", {}) if fleet else {}
    head = Text()
    head.append("gpufleet top ", style="bold")
    head.append(f"{url}  ")
    if fleet:
        head.append(f"{t.get('up', 0)}/{t.get('gpus', 0)} GPUs up, {t.get('nodes', 0)} nodes, ")
        head.append(f"{t.get('alerts_firing', 0)} firing", style="bold red" if t.get("alerts_firing") else "")
        head.append(f", {t.get('power_watts', 0) / 1000:.2f} kW")
    head.append(f"  sort: {state.sort} {'↑' if state.reverse else '↓'}")
    if state.text_filter or any(vars(state.filters).values()):
        parts = [f"{k}={v}" for k, v in vars(state.filters).items() if v] + (
            [f"/{state.text_filter}"] if state.text_filter else []
        )
        head.append("  filter: " + " ".join(parts), style="cyan")
    if updated:
        head.append(time.strftime("  %H:%M:%S", time.localtime(updated)), style="dim")
    table = Table(expand=True, box=None, pad_edge=False, header_style="bold", show_edge=False)
    sort_title = SORTS[state.sort][1]
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("NODE", "left"),
        ("GPU", "right"),
        ("MODEL", "left"),
        ("POD", "left"),
        ("SM", "right"),
        ("UTIL", "right"),
        ("MEM", "right"),
        ("TEMP", "right"),
        ("POWER", "right"),
        ("THROTTLE", "left"),
        ("ALERTS", "left"),
    )
    for title, justify in columns:
        table.add_column(
            Text(title, style="reverse bold" if title == sort_title else "bold"),
            justify=justify,
            no_wrap=True,
            overflow="ellipsis",
            ratio=2 if title in ("POD", "ALERTS") else None,
        )
    rows = visible_gpus(fleet, state) if fleet else []
    for g in rows:
        sm, util = g.get("sm_active"), g.get("utilization")
        low_sm = sm is not None and util is not None and util >= 0.05 and sm < 0.10
        used, total = g.get("memory_used_bytes"), g.get("memory_total_bytes")
        mem = "–" if used is None else f"{used / GIB:.1f}/{(total or 0) / GIB:.0f}G"
        temp = g.get("temperature_celsius")
        power = g.get("power_watts")
        alerts = g.get("alerts", [])
        status = "" if g.get("up") else "LOST "
        status += "stale " if g.get("stale") else ""
        table.add_row(
            g.get("node") or "",
            str(g.get("gpu")),
            (g.get("model") or "").replace("NVIDIA ", ""),
            _pod(g),
            Text(_pct(sm), style="yellow" if low_sm else ""),
            _pct(util),
            mem,
            "–" if temp is None else f"{temp:.0f}°C",
            "–" if power is None else f"{power:.0f}W",
            Text(",".join(g.get("throttle", [])), style="yellow"),
            Text(
                status + " ".join(a["rule"] + ("?" if a["state"] == "pending" else "") for a in alerts),
                style="bold red" if alerts or status else "",
            ),
            style="on grey15" if alerts else None,
        )
    foot = Text()
    if error:
        foot.append(f"{error}\n", style="bold red")
    if state.typing is not None:
        foot.append(f"filter: {state.typing}▏  (Enter applies, Esc clears)", style="cyan")
    else:
        foot.append(
            f"{len(rows)} GPUs shown.  sort: s SM  u util  m memory  t temp  p power  a alerts  n node  "
            "r reverse   / filter   q quit",
            style="dim",
        )
    return Group(head, Text(""), table, Text(""), foot)


class FleetSource(Protocol):
    """Where the screen's data comes from: the CollectorClient, or a test's stand-in."""

    @property
    def base_url(self) -> str: ...

    def fleet(self) -> Fleet: ...


class _Keys:
    """Single key presses from a terminal, without echo; a no-op reader when stdin is not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO and other streams without a descriptor
            self.fd = None
        self._saved: list[int | list[bytes | int]] | None = None
        if self.fd is not None and os.isatty(self.fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def read(self, timeout: float) -> str:
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # stdin closed: nothing more will come
            time.sleep(timeout)
        return data.decode(errors="ignore")

    def close(self) -> None:
        if self._saved is not None and self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def run_top(
    source: FleetSource,
    *,
    interval: float = 2.0,
    sort_key: str = "node",
    filters: Filters | None = None,
    console: Console | None = None,
    stdin: TextIO | None = None,
) -> None:
    """Show the fleet until q. The source and the streams are passed in so a test can drive it."""
    state = TopState(sort=sort_key, filters=filters or Filters())
    console = console or Console()
    keys = _Keys(stdin or sys.stdin)
    url = source.base_url
    fleet: Fleet | None = None
    error: str | None = None
    updated: float | None = None
    next_fetch = 0.0
    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            while not state.quit:
                now = time.monotonic()
                if now >= next_fetch:
                    try:
                        fleet, error, updated = source.fleet(), None, time.time()
                    except ClientError as exc:
                        error = f"{exc}; retrying every {interval:g} s"
                    next_fetch = now + interval
                live.update(render(fleet, state, url, error, updated), refresh=True)
                pressed = keys.read(next_fetch - time.monotonic())
                for ch in _split_keys(pressed):
                    state.press(ch)
    finally:
        keys.close()


def _split_keys(data: str) -> list[str]:
    """Key presses in a read; an escape sequence (arrow keys) counts as one Esc-less no-op."""
    out: list[str] = []
    i = 0
    while i < len(data):
        if data[i] == "\x1b" and i + 1 < len(data) and data[i + 1] == "[":
            i += 2
            while i < len(data) and not data[i].isalpha():
                i += 1
            i += 1
            continue
        out.append(data[i])
        i += 1
    return out
