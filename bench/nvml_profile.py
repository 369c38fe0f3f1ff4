"""Where one agent sample spends its time: every NVML call the GPU source makes, timed, and every field id
of the batched field-value read timed on its own.

Real GPUs (repository root):  OUT=out python3 bench/nvml_profile.py [--samples 50]
Writes $OUT/nvml_profile.md: per NVML function, calls per sample and mean microseconds per call, sorted by
time per sample; and the field ids whose single read costs most.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from gpufleet.agent.fields import FIELDS, GPM_FIELDS, FieldValue  # noqa: E402
from gpufleet.agent.nvml import Nvml, load_library  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource  # noqa: E402


class TimedLibrary:
    """The NVML bindings (or the simulator) with every ``nvml*`` function timed: ``stats[name]`` holds its
    calls, wall seconds and the calling thread's CPU seconds (user and system: the driver's work in the kernel
    counts). ``bench/agent_cost.py`` times the agent's reads through it too."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.stats: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> object:
        value = getattr(self._lib, name)
        if not (name.startswith("nvml") and callable(value)):
            return value

        def timed(*a: object, **k: object) -> object:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return value(*a, **k)
            finally:
                wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                with self._lock:
                    st = self.stats.setdefault(name, [0, 0.0, 0.0])
                    st[0] += 1
                    st[1] += wall
                    st[2] += cpu

        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=50)
    args = ap.parse_args()
    lib = TimedLibrary(load_library())
    nvml = Nvml(lib)
    src = GpuSource(nvml, "profile", watch_events=False, background=False, slow_interval=1e9)
    src.start()
    src.collect()
    lib.stats.clear()
    t0 = time.perf_counter()
    for _ in range(args.samples):
        src.collect()
    total = (time.perf_counter() - t0) / args.samples
    nvml_total = sum(wall for _, wall, _ in lib.stats.values()) / args.samples
    rows = sorted(lib.stats.items(), key=lambda kv: -kv[1][1])
    out = [
        f"One sample of {len(src.gpus)} GPU(s): {total * 1e3:.3f} ms, of which NVML calls {nvml_total * 1e3:.3f} ms",
        "",
        "| NVML function | calls per sample | mean µs per call | µs per sample |",
        "| --- | --- | --- | --- |",
    ]
    for name, (n, wall, _) in rows:
        out.append(
            f"| {name} | {n / args.samples:g} | {wall / n * 1e6:.1f} | {wall / args.samples * 1e6:.1f} |"
        )
    # each field id of the batched read, on its own
    h = src.gpus[0].handle
    ids = sorted(
        {(s.id, s.scope) for f in FIELDS if not f.slow for s in f.sources() if isinstance(s, FieldValue)}
    )
    per_id = []
    for fid, scope in ids:
        t0 = time.perf_counter()
        for _ in range(10):
            with contextlib.suppress(Exception):
                lib._lib.nvmlDeviceGetFieldValues(h, [(fid, scope)] if scope else [fid])
        per_id.append(((time.perf_counter() - t0) / 10, fid, scope))
    per_id.sort(reverse=True)
    out += ["", "| field id (scope) | µs for a read of it alone |", "| --- | --- |"]
    out += [f"| {fid} ({scope}) | {t * 1e6:.1f} |" for t, fid, scope in per_id[:15]]
    # each GPM metric computed on its own, and the whole set, between the same two samples
    raw = lib._lib
    s1, s2 = raw.nvmlGpmSampleAlloc(), raw.nvmlGpmSampleAlloc()
    raw.nvmlGpmSampleGet(h, s1)
    time.sleep(0.2)
    raw.nvmlGpmSampleGet(h, s2)

    def gpm_time(ids: list[int]) -> float:
        t0 = time.perf_counter()
        for _ in range(5):
            nvml.gpm_metrics(h, s1, s2, ids)
        return (time.perf_counter() - t0) / 5

    out += ["", "| GPM metrics computed | µs per nvmlGpmMetricsGet |", "| --- | --- |"]
    out.append(f"| all {len(GPM_FIELDS)} | {gpm_time([g.metric_id for g in GPM_FIELDS]) * 1e6:.1f} |")
    for g in GPM_FIELDS:
        out.append(f"| {g.name} ({g.metric_id}) alone | {gpm_time([g.metric_id]) * 1e6:.1f} |")
    text = "\n".join(out)
    print(text)
    d = Path(os.environ.get("OUT", "out"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "nvml_profile.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
