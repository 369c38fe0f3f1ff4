"""Several collector processes on one address from one command (`gpufleet collector --workers N`).

One Python process holds the GIL; past about one core of collector work, more processes are what uses more
cores. The command forks its workers before any of them opens the store or starts a thread, and each one is
a whole collector bound with SO_REUSEPORT to the same address (the kernel spreads connections over them):
every worker takes writes and serves reads, and the store's leader election picks the one that evaluates
rules, as it does for replicas on several hosts. The parent only waits: it passes SIGTERM and SIGINT on,
and when a worker ends by itself it stops the others and exits non-zero, so that the service manager
(systemd, Kubernetes) restarts the whole rather than leaving a collector with fewer workers than it was
given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def serve_workers(workers: int, worker: Callable[[int], int]) -> int:
    """Fork ``workers`` processes, each running ``worker(index)`` (1-based) to its exit status; wait for them.
    0 once they were stopped by SIGTERM or SIGINT, 1 when one of them ended by itself."""
    children: dict[int, int] = {}
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Set before forking so that no signal falls between two forks; each worker puts the defaults back.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(1, workers + 1):
            if stopping:
                break
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                _run_worker(index, worker)
            children[pid] = index
        status = 0
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, 0)
            if not index or stopping:
                continue
            log.error(
                "collector worker %d (pid %d) ended by itself (exit status %s); stopping the other workers so "
                "that the service manager restarts the collector",
                index,
                pid,
                os.waitstatus_to_exitcode(wait_status),
            )
            status = 1
            stop(signal.SIGTERM, None)
        return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_worker(index: int, worker: Callable[[int], int]) -> None:
    """The forked side: run the worker and leave the process with its status, never returning into the
    command that forked it."""
    status = 1
    try:
        status = worker(index)
    except KeyboardInterrupt:
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("collector worker %d failed", index)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)
