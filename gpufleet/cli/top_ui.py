"""The screen of `gpufleet top`: every GPU of the fleet in one terminal, from the collector's /api/v1/fleet.

It talks HTTP to the collector only, through the CollectorClient, from a thread of its own, so keys are answered
while the fetch of a large fleet is in flight. The screen is redrawn in place on the terminal's alternate screen
(rich's Live), so a refresh does not flicker and quitting gives the shell back as it was. Only the rows that fit
are rendered; the header and the footer (position and keys) stay on screen at any size, and a resize (SIGWINCH)
redraws at once.
Keys: j/k or Down/Up move one row, PageDown/PageUp or space/b a screen, g/G or Home/End to the first/last row;
s SM activity, u utilization, m memory, t temperature, p power, a alerts, n node order, r reverse,
/ filter (Enter applies, Esc clears), q quit.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpufleet.cli.client import ClientError, Fleet, FleetGPU

GIB = float(1 << 30)
SEVERITY_RANK = {"critical": 3, "warning": 2, "info": 1}
# How long a lone Esc waits for the rest of an escape sequence before it counts as the Esc key (as in vim's
# ttimeoutlen); a terminal sends the bytes of one key together, so this only delays a real Esc.
ESC_WAIT_S = 0.05
# Widest NODE and MODEL columns, in cells: the columns are as wide as the widest name of the whole list, not
# of the rows on screen, so they do not jump while scrolling.
NAME_WIDTH_MAX = 32


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


# Escape sequences terminals send for the keys top reads, as key names: CSI (ESC [) in the xterm, VT220 and
# rxvt variants of Home and End (tmux sends ESC [1~ and ESC [4~), and SS3 (ESC O), sent in application
# cursor-key mode. Modifiers (ESC [1;5A) are ignored: Ctrl+Down is Down.
_CSI_LETTER = {"A": "up", "B": "down", "H": "home", "F": "end"}
_CSI_TILDE = {"1": "home", "7": "home", "4": "end", "8": "end", "5": "pgup", "6": "pgdn"}
_SS3 = {"A": "up", "B": "down", "H": "home", "F": "end"}


def decode_keys(data: str) -> tuple[list[str], str]:
    """The key presses in ``data``: a character each, and escape sequences as names (``up``, ``down``, ``pgup``,
    ``pgdn``, ``home``, ``end``; a lone Esc is ``esc``). Returns them and the unfinished escape sequence that
    ``data`` ends with ("" when none), for the caller to complete with the bytes that follow."""
    keys: list[str] = []
    i, n = 0, len(data)
    while i < n:
        if data[i] != "\x1b":
            keys.append(data[i])
            i += 1
        elif i + 1 == n:
            return keys, data[i:]
        elif data[i + 1] == "O":
            if i + 2 == n:
                return keys, data[i:]
            if data[i + 2] in _SS3:
                keys.append(_SS3[data[i + 2]])
            i += 3
        elif data[i + 1] == "[":
            j = i + 2
            while j < n and not "@" <= data[j] <= "~":  # parameter bytes up to the final byte
                j += 1
            if j == n:
                return keys, data[i:]
            params, final = data[i + 2 : j], data[j]
            name = _CSI_TILDE.get(params.split(";")[0]) if final == "~" else _CSI_LETTER.get(final)
            if name:
                keys.append(name)
            i = j + 1
        else:  # Esc and then another key (Alt+key): both
            keys.append("esc")
            i += 1
    return keys, ""


def _clamp(x: int, low: int, high: int) -> int:
    return max(low, min(x, high))


@dataclass
class TopState:
    """What the person at the keyboard chose: order, filters, and where in the list they are."""

    sort: str = "node"
    reverse: bool = False
    filters: Filters = field(default_factory=Filters)
    text_filter: str = ""  # typed with "/": matches node, pod, cluster or model
    typing: str | None = None  # the filter being typed, None when not typing
    quit: bool = False
    cursor: int = 0  # the selected row, an index into `order`
    top: int = 0  # the first row on screen
    page: int = 1  # rows on screen when last drawn
    selected: str | None = None  # the selected GPU's uuid: a refresh that moves the GPU moves the selection
    order: list[str] = field(default_factory=list)  # uuids of the filtered, sorted GPUs when last drawn

    def press(self, key: str) -> None:
        """Apply one key press: a character, or a key name from decode_keys."""
        if self.typing is not None:
            if key in ("\r", "\n"):
                self.text_filter, self.typing = self.typing, None
                self._to_first()
            elif key == "esc":
                self.text_filter, self.typing = "", None
                self._to_first()
            elif key in ("\x7f", "\b"):
                self.typing = self.typing[:-1]
            elif len(key) == 1 and key.isprintable():
                self.typing += key
            return
        if key in ("q", "Q", "\x03"):
            self.quit = True
        elif key == "/":
            self.typing = ""
        elif key == "esc":
            self.text_filter = ""
            self._to_first()
        elif key == "r":
            self.reverse = not self.reverse
            self._to_first()
        elif key in KEYS:
            self.sort, self.reverse = KEYS[key], False
            self._to_first()
        elif key in MOVES:
            self._move(MOVES[key])

    def place(self, order: list[str], page: int) -> None:
        """Fit the selection and the scroll position to the rows about to be drawn, ``page`` of them on screen.

        The selection stays on its GPU when a refresh or a new sort moves it, except on the first row: that
        stays selected, so an untouched screen keeps showing the top of the order."""
        self.order, self.page = order, max(1, page)
        # A GPU that is gone or filtered out leaves the selection on the row at the same place.
        if self.cursor > 0 and self.selected in order:
            self.cursor = order.index(self.selected)
        self.cursor = _clamp(self.cursor, 0, len(order) - 1) if order else 0
        self.selected = order[self.cursor] if order else None
        self._scroll()

    def _move(self, move: Move) -> None:
        if not self.order:
            return
        last = len(self.order) - 1
        if move == "down":
            self.cursor += 1
        elif move == "up":
            self.cursor -= 1
        elif move == "page_down":
            self.cursor, self.top = self.cursor + self.page, self.top + self.page
        elif move == "page_up":
            self.cursor, self.top = self.cursor - self.page, self.top - self.page
        elif move == "first":
            self.cursor = 0
        else:
            self.cursor = last
        self.cursor = _clamp(self.cursor, 0, last)
        self.selected = self.order[self.cursor]
        self._scroll()

    def _scroll(self) -> None:
        """Scroll so the selected row is on screen, and the screen is full where the list is long enough."""
        if self.cursor < self.top:
            self.top = self.cursor
        elif self.cursor >= self.top + self.page:
            self.top = self.cursor - self.page + 1
        self.top = _clamp(self.top, 0, max(0, len(self.order) - self.page))

    def _to_first(self) -> None:
        self.cursor = self.top = 0
        self.selected = None


Move = Literal["down", "up", "page_down", "page_up", "first", "last"]
MOVES: dict[str, Move] = {
    "j": "down",
    "down": "down",
    "k": "up",
    "up": "up",
    " ": "page_down",
    "pgdn": "page_down",
    "b": "page_up",
    "pgup": "page_up",
    "g": "first",
    "home": "first",
    "G": "last",
    "end": "last",
}


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


def _model(g: FleetGPU) -> str:
    return (g.get("model") or "").replace("NVIDIA ", "")


def _line(text: Text) -> Text:
    """One screen line: cut with an ellipsis, never wrapped, so the layout's line count holds at any width."""
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


# (title, justification, least width in cells that shows the column's values)
COLUMNS: tuple[tuple[str, Literal["left", "right"], int], ...] = (
    ("NODE", "left", 8),
    ("GPU", "right", 3),
    ("MODEL", "left", 8),
    ("POD", "left", 10),
    ("SM", "right", 4),
    ("UTIL", "right", 4),
    ("MEM", "right", 9),
    ("TEMP", "right", 5),
    ("POWER", "right", 5),
    ("THROTTLE", "left", 8),
    ("ALERTS", "left", 10),
)
# Where the terminal is too narrow for every column, these give way, first to last; the sort column stays.
# Left to rich, the table would shrink every column alike until the marker and the alerts were gone.
NARROW_DROPS = ("MODEL", "THROTTLE", "UTIL", "POWER", "POD", "MEM", "TEMP")
# Key help, the longest that fits beside the position.
HELP = (
    "j/k ↓/↑ row  PgDn/PgUp space/b page  g/G Home/End first/last   sort: s SM  u util  m memory  t temp  "
    "p power  a alerts  n node  r reverse   / filter   q quit",
    "j/k ↓/↑ row  PgDn/PgUp page  g/G first/last  sort: s u m t p a n  r reverse  / filter  q quit",
    "j/k PgDn/PgUp g/G  / filter  q quit",
    "q quit",
)


def _header(fleet: Fleet | None, state: TopState, url: str, updated: float | None) -> Text:
    t = fleet.get("totals", {}) if fleet else {}
    head = Text()
    head.append("gpufleet top ", style="bold")
    head.append(f"{url}  ")
    if fleet:
        head.append(f"{t.get('up', 0)}/{t.get('gpus', 0)} GPUs up, {t.get('nodes', 0)} nodes, ")
        head.append(f"{t.get('alerts_firing', 0)} firing", style="bold red" if t.get("alerts_firing") else "")
        head.append(f", {t.get('power_watts', 0) / 1000:.2f} kW")
        cut = fleet.get("truncated")
        if cut:  # past the collector's --fleet-max-gpus: the totals count GPUs the list leaves out
            head.append(f" ({cut['gpus_listed']} GPUs listed)", style="bold yellow")
    head.append(f"  sort: {state.sort} {'↑' if state.reverse else '↓'}")
    if state.text_filter or any(vars(state.filters).values()):
        parts = [f"{k}={v}" for k, v in vars(state.filters).items() if v] + (
            [f"/{state.text_filter}"] if state.text_filter else []
        )
        head.append("  filter: " + " ".join(parts), style="cyan")
    if updated:
        head.append(time.strftime("  %H:%M:%S", time.localtime(updated)), style="dim")
    return _line(head)


def _footer(state: TopState, loaded: bool, total: int, on_screen: int, width: int) -> Text:
    if state.typing is not None:
        return _line(Text(f"filter: {state.typing}▏  (Enter applies, Esc clears)", style="cyan"))
    if total and on_screen > 1:
        where = f"rows {state.top + 1}-{state.top + on_screen} of {total}"
    elif total:  # one row, or no room for the table
        where = f"row {state.cursor + 1} of {total}"
    elif not loaded:
        where = "waiting for the collector…"
    elif state.text_filter or any(vars(state.filters).values()):
        where = "no GPU matches the filter"
    else:
        where = "no GPUs"
    keys = next((h for h in HELP if len(where) + 2 + len(h) <= width), HELP[-1])
    foot = Text(where, style="bold")
    foot.append("  " + keys, style="dim")
    return _line(foot)


def _columns(
    rows: list[FleetGPU], state: TopState, width: int
) -> list[tuple[str, Literal["left", "right"], int]]:
    """The columns that fit ``width``, each with its least width; NODE, GPU and MODEL as wide as the widest value
    of the whole list, not only of the rows on screen, so they do not jump while scrolling."""
    least = {title: w for title, _, w in COLUMNS}
    least["NODE"] = max(
        least["NODE"], min(NAME_WIDTH_MAX, max((len(g.get("node") or "") for g in rows), default=0))
    )
    least["GPU"] = max(least["GPU"], max((len(str(g.get("gpu"))) for g in rows), default=0))
    least["MODEL"] = max(least["MODEL"], min(NAME_WIDTH_MAX, max((len(_model(g)) for g in rows), default=0)))
    sort_title = SORTS[state.sort][1]
    titles = [title for title, _, _ in COLUMNS]
    for drop in NARROW_DROPS:
        # The marker column, then each column with its padding of one cell either side.
        if 1 + sum(least[t] + 2 for t in titles) <= width:
            break
        if drop != sort_title:
            titles.remove(drop)
    return [(title, justify, least[title]) for title, justify, _ in COLUMNS if title in titles]


def _cells(g: FleetGPU) -> dict[str, str | Text]:
    sm, util = g.get("sm_active"), g.get("utilization")
    low_sm = sm is not None and util is not None and util >= 0.05 and sm < 0.10
    used, total = g.get("memory_used_bytes"), g.get("memory_total_bytes")
    temp = g.get("temperature_celsius")
    power = g.get("power_watts")
    alerts = g.get("alerts", [])
    status = "" if g.get("up") else "LOST "
    status += "stale " if g.get("stale") else ""
    return {
        "NODE": g.get("node") or "",
        "GPU": str(g.get("gpu")),
        "MODEL": _model(g),
        "POD": _pod(g),
        "SM": Text(_pct(sm), style="yellow" if low_sm else ""),
        "UTIL": _pct(util),
        "MEM": "–" if used is None else f"{used / GIB:.1f}/{(total or 0) / GIB:.0f}G",
        "TEMP": "–" if temp is None else f"{temp:.0f}°C",
        "POWER": "–" if power is None else f"{power:.0f}W",
        "THROTTLE": Text(",".join(g.get("throttle", [])), style="yellow"),
        "ALERTS": Text(
            status + " ".join(a["rule"] + ("?" if a["state"] == "pending" else "") for a in alerts),
            style="bold red" if alerts or status else "",
        ),
    }


def _table(rows: list[FleetGPU], shown: list[FleetGPU], state: TopState, width: int) -> Table:
    table = Table(expand=True, box=None, pad_edge=False, header_style="bold", show_edge=False)
    sort_title = SORTS[state.sort][1]
    table.add_column(
        "", width=1, no_wrap=True
    )  # ">" on the selected row, for terminals without reverse video
    columns = _columns(rows, state, width)
    for title, justify, least in columns:
        table.add_column(
            Text(title, style="reverse bold" if title == sort_title else "bold"),
            justify=justify,
            no_wrap=True,
            overflow="ellipsis",
            min_width=least,
            ratio=2 if title in ("POD", "ALERTS") else None,
        )
    for i, g in enumerate(shown, start=state.top):
        cells = _cells(g)
        selected = i == state.cursor
        table.add_row(
            ">" if selected else "",
            *(cells[title] for title, _, _ in columns),
            style="reverse" if selected else "on grey15" if g.get("alerts") else None,
        )
    return table


def render(
    fleet: Fleet | None,
    state: TopState,
    url: str,
    size: tuple[int, int],
    error: str | None = None,
    updated: float | None = None,
) -> Group:
    """The whole screen for a terminal of ``size`` (columns, lines): a header line, the GPU table, an error line
    when the last fetch failed, and the footer with the position and the keys. Only the rows that fit are
    rendered; the state's scroll position is fitted to them."""
    width, height = size
    rows = visible_gpus(fleet, state) if fleet else []
    # Lines go to the footer first, then the header, the error, and the table (its column titles and rows).
    free = max(1, height) - 1
    show_head = free >= 1
    free -= show_head
    show_error = error is not None and free >= 1
    free -= show_error
    page = free - 1 if free >= 2 else 0
    state.place([g.get("uuid") or "" for g in rows], page)
    shown = rows[state.top : state.top + page]
    lines: list[Text | Table] = []
    if show_head:
        lines.append(_header(fleet, state, url, updated))
    if page:
        lines.append(_table(rows, shown, state, width))
        if len(shown) < page:  # a short list: the footer stays on the last line
            lines.append(Text("\n" * (page - len(shown) - 1)))
    if show_error and error is not None:
        lines.append(_line(Text(error, style="bold red")))
    lines.append(_footer(state, fleet is not None, len(rows), len(shown), width))
    return Group(*lines)


class FleetSource(Protocol):
    """Where the screen's data comes from: the CollectorClient, or a test's stand-in."""

    @property
    def base_url(self) -> str: ...

    def fleet(self) -> Fleet: ...


class _Wakeup:
    """A pipe that the fetch thread and the resize handler write a byte to, so the screen loop's select()
    returns and redraws."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def set(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # a full pipe: a wake-up is pending anyway
                os.write(self._w, b".")

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)
            os.close(self._w)


@dataclass(frozen=True)
class _Snapshot:
    fleet: Fleet | None = None
    error: str | None = None
    updated: float | None = None


class _Fetcher:
    """Fetches the fleet every ``interval`` seconds on a thread of its own; a failed fetch keeps the last fleet
    on screen and says why."""

    def __init__(self, source: FleetSource, interval: float, wake: _Wakeup) -> None:
        self._source, self._interval, self._wake = source, interval, wake
        self._latest = _Snapshot()
        self.failure: Exception | None = None  # what ended the thread other than a ClientError: a bug
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpufleet-top-fetch", daemon=True)

    def start(self) -> _Fetcher:
        self._thread.start()
        return self

    def latest(self) -> _Snapshot:
        with self._lock:
            return self._latest

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                snapshot = _Snapshot(self._source.fleet(), None, time.time())
            except ClientError as exc:
                snapshot = replace(self.latest(), error=f"{exc}; retrying every {self._interval:g} s")
            except Exception as exc:  # raised again on the screen's thread, not lost with this one
                self.failure = exc
                self._wake.set()
                return
            with self._lock:
                self._latest = snapshot
            self._wake.set()
            self._stop.wait(self._interval)


class _Keys:
    """Key presses from a terminal, without echo; reads nothing when stdin is not a terminal or has ended."""

    def __init__(self, stream: TextIO) -> None:
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO and other streams without a descriptor
            self.fd = None
        self.open = self.fd is not None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._saved: list[int | list[bytes | int]] | None = None
        if self.fd is not None and os.isatty(self.fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def read(self) -> list[str]:
        """The keys that are waiting (call when select() says the descriptor is readable)."""
        keys, rest = decode_keys(self._read_some())
        while rest and self.open and self.fd is not None:
            ready, _, _ = select.select([self.fd], [], [], ESC_WAIT_S)
            more = self._read_some() if ready else ""
            if not more:
                break
            tail, rest = decode_keys(rest + more)
            keys += tail
        if rest == "\x1b":
            keys.append("esc")
        return keys

    def _read_some(self) -> str:
        assert self.fd is not None
        data = os.read(self.fd, 1024)
        if not data:  # stdin ended: nothing more will come
            self.open = False
        return self._decoder.decode(data)

    def close(self) -> None:
        if self._saved is not None and self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def _on_resize(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` when the terminal is resized; returns what undoes that. Signal handlers belong to the
    main thread: elsewhere (a test driving the screen) the next refresh picks the new size up."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGWINCH, lambda signum, frame: callback())

    def undo() -> None:
        signal.signal(signal.SIGWINCH, previous)

    return undo


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
    wake = _Wakeup()
    fetcher = _Fetcher(source, interval, wake).start()
    undo_resize = _on_resize(wake.set)
    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            while not state.quit:
                if fetcher.failure is not None:
                    raise fetcher.failure
                snap = fetcher.latest()
                size = console.size
                live.update(
                    render(snap.fleet, state, url, (size.width, size.height), snap.error, snap.updated),
                    refresh=True,
                )
                watched = [wake.fd] + ([keys.fd] if keys.open and keys.fd is not None else [])
                ready, _, _ = select.select(watched, [], [])
                if wake.fd in ready:
                    wake.drain()
                if keys.fd is not None and keys.fd in ready:
                    for key in keys.read():
                        state.press(key)
    except KeyboardInterrupt:  # Ctrl+C quits, as q does
        pass
    finally:
        undo_resize()
        fetcher.stop(timeout=0.5)
        keys.close()
        wake.close()
