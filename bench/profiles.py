"""py-spy's raw output (``record --format raw``), read once for the benches that profile a process
(``bench/agent_cost.py``, ``bench/soak.py``): each stack's frames without line numbers, and the shares of
the samples each function, or each thread, is in."""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

Stack = tuple[list[str], int]  # frames outermost first, samples


def read_stacks(raw: Path) -> list[Stack]:
    """The stacks of a raw file. Line numbers are left out (``f (file.py:12)`` is ``f (file.py)``), and a
    ``--threads`` frame names its thread without its id (``thread (4711): sampler`` is ``thread: sampler``),
    so samples of one function, or one thread, add up."""
    out: list[Stack] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # a line without a stack
            continue
        frames = [
            re.sub(r":\d+\)$", ")", re.sub(r"^thread \(\d+\)", "thread", f.strip())) for f in stack.split(";")
        ]
        out.append((frames, int(count)))
    return out


def inclusive(stacks: list[Stack]) -> Counter[str]:
    """Samples each function (or thread) is in, once a stack however deep it recurses."""
    counts: Counter[str] = Counter()
    for frames, n in stacks:
        counts.update(dict.fromkeys(set(frames), n))
    return counts


def own(stacks: list[Stack]) -> Counter[str]:
    """Samples each function is the innermost frame of."""
    counts: Counter[str] = Counter()
    for frames, n in stacks:
        counts[frames[-1]] += n
    return counts


def share_lines(counts: Counter[str], total: int, top: int, keep=lambda name: True) -> list[str]:
    """``samples  share %  name`` for the ``top`` names ``keep`` lets through, most samples first."""
    rows = [(name, n) for name, n in counts.most_common() if keep(name)][:top]
    return [f"{n:6d} {100 * n / max(1, total):5.1f}%  {name}" for name, n in rows]


def thread_cpu_ms(fn: Callable[[], object], *, times: int, asleep_s: float = 0.0) -> float:
    """Median thread CPU milliseconds of ``fn``, each call after ``asleep_s`` seconds asleep: with a second
    asleep, as the agent runs a sample or answers a scrape, the CPU's caches and the kernel's paths as other
    work or idling left them."""
    took = []
    for _ in range(times):
        if asleep_s:
            time.sleep(asleep_s)
        t0 = time.thread_time()
        fn()
        took.append(time.thread_time() - t0)
    return 1000 * statistics.median(took)
