"""What the agent costs a GPU node.

1. The running agent, as a node runs it: ``gpufleet agent`` in its own process (every default source on,
   1 Hz), pushing to a collector and scraped like Prometheus scrapes it (OpenMetrics accepted, gzip, every
   ``--scrape-interval`` seconds). After ``--warmup`` seconds its CPU time is read from ``/proc/<pid>/stat``
   over ``--seconds``: the node total as a share of one core, and per GPU; its resident memory (now and peak)
   from ``/proc/<pid>/status``. With ``--simulate N`` the simulated GPUs answer NVML in the agent's own
   process, so their cost is inside that figure: a second window profiles the agent with py-spy (``--gil``,
   non-blocking) and the time in ``agent/simulator.py`` is reported apart and taken off, so what is left
   is the agent's own cost.
2. One full sample of every GPU (every fast row, GPM, MIG, the cached slow rows), timed in this process,
   versus one ``nvidia-smi --query-gpu`` call asking for the same fields (what nvidia_gpu_exporter runs per
   scrape), as a ratio; the slow-row refresh is timed too.

Real GPUs:        python3 bench/agent_cost.py
More than at hand: python3 bench/agent_cost.py --replicate 8   (each real GPU read as 8; see replicated_gpus.py)
Without a GPU:    python3 bench/agent_cost.py --simulate 8
The collector: ``--collector local`` (default) is a remote-write receiver in this process that takes every
batch (it answers 204 and reads nothing), ``--collector unreachable`` a port nobody listens on (the agent
spools and retries), or the URL of a running collector.
Results go to $OUT (default ./out) as agent_cost.json and agent_cost.md. Goals: per GPU at most 0.125 % of
one core at 1 Hz (an 8-GPU node under 1 %), under 80 MiB RSS, >= 50x cheaper than nvidia-smi per sample.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from bench.nvml_profile import TimedLibrary  # noqa: E402
from bench.profiles import inclusive, own, read_stacks, share_lines, thread_cpu_ms  # noqa: E402
from gpufleet.agent.nvml import Nvml, NvmlUnavailable  # noqa: E402
from gpufleet.agent.settings import AgentSettings  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource  # noqa: E402

# The same fields the agent reads every sample, as nvidia-smi names them (filtered by --help-query-gpu).
SMI_FIELDS = [
    "index",
    "uuid",
    "name",
    "utilization.gpu",
    "utilization.memory",
    "utilization.encoder",
    "utilization.decoder",
    "memory.used",
    "memory.free",
    "memory.total",
    "memory.reserved",
    "temperature.gpu",
    "temperature.memory",
    "power.draw",
    "power.limit",
    "enforced.power.limit",
    "clocks.sm",
    "clocks.mem",
    "clocks_event_reasons.active",
    "clocks_throttle_reasons.active",
    "ecc.errors.corrected.volatile.total",
    "ecc.errors.uncorrected.volatile.total",
    "ecc.errors.corrected.aggregate.total",
    "ecc.errors.uncorrected.aggregate.total",
    "pcie.link.gen.gpucurrent",
    "pcie.link.gen.current",
    "pcie.link.width.current",
    "mig.mode.current",
]
# What Prometheus 2.x asks for when it scrapes (its default scrape protocols, in order).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
GOAL_PER_GPU_PERCENT = 0.125  # an 8-GPU node under 1 % of one core
GOAL_RSS_MIB = 80
CLK_TCK = os.sysconf("SC_CLK_TCK")


def smi_fields(smi: str) -> list[str]:
    helptext = subprocess.run([smi, "--help-query-gpu"], capture_output=True, text=True, timeout=60).stdout
    known = [f for f in SMI_FIELDS if f'"{f}"' in helptext]
    # one of the two names of the throttle reasons is enough
    if "clocks_event_reasons.active" in known and "clocks_throttle_reasons.active" in known:
        known.remove("clocks_throttle_reasons.active")
    if "pcie.link.gen.gpucurrent" in known and "pcie.link.gen.current" in known:
        known.remove("pcie.link.gen.current")
    return known


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the agent's process, seen from outside ---------------------------------------------------------------
def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of every thread of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident now, resident peak) in MiB, from ``/proc/<pid>/status``."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", status, re.M)}
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs (``/proc/stat``): the machine's load beside the agent."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class Receiver:
    """A remote-write receiver that takes every batch: answers 204 and counts requests and bytes."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests += 1
                receiver.bytes += len(body)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, name="receiver", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def agent_command() -> list[str]:
    """``gpufleet`` as installed beside this Python, else on PATH, else the module."""
    beside = Path(sys.executable).with_name("gpufleet")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("gpufleet")
    return [found] if found else [sys.executable, "-m", "gpufleet.cli"]


def scrape(port: int) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return len(body)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the agent exited with status {proc.returncode} before it answered /healthz")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the agent did not answer http://127.0.0.1:{port}/healthz within {timeout:.0f} s")


def run_scraped(port: int, seconds: float, every: float) -> int:
    """Scrape every ``every`` seconds for ``seconds``; the number of scrapes."""
    n = 0
    start = time.monotonic()
    next_at = start + every
    while True:
        now = time.monotonic()
        if next_at > start + seconds:
            time.sleep(max(0.0, start + seconds - now))
            return n
        time.sleep(max(0.0, next_at - now))
        scrape(port)
        n += 1
        next_at += every


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile(pid: int, port: int, seconds: float, every: float, rate: int, out: Path, simulated: bool) -> dict:
    """py-spy over a window of the running agent, and the functions with the most samples of their own.
    Simulated GPUs: samples taken while a thread held the GIL, and those in the simulator. Real GPUs: samples
    of threads on a CPU, GIL or not, since an NVML call lets go of the GIL while the driver works (its
    innermost frame is then the binding's function)."""
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy): the simulator's share is not measured"}
    raw = out / "agent_cost_profile.raw"
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate)]
    cmd += [
        "--format",
        "raw",
        *(["--gil"] if simulated else []),
        "--nonblocking",
        "--threads",
        "-o",
        str(raw),
    ]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_scraped(port, seconds, every)
    log = spy_proc.communicate(timeout=seconds + 60)[0]
    if spy_proc.returncode != 0 or not raw.exists():
        return {
            "error": f"py-spy failed: {log.strip().splitlines()[-1] if log.strip() else spy_proc.returncode}"
        }
    stacks = read_stacks(raw)
    total = sum(n for _, n in stacks)
    anywhere = inclusive(stacks)
    in_simulator = sum(n for frames, n in stacks if any("simulator.py" in f for f in frames))
    how = "--gil" if simulated else "(threads on a CPU)"
    (out / "agent_cost_profile.txt").write_text(
        "\n".join(
            [
                f"py-spy {how} --nonblocking at {rate} Hz over {seconds:.0f} s: {total} samples, "
                f"{in_simulator} in the simulator",
                "samples / each thread",
                *share_lines(anywhere, total, 20, lambda name: name.startswith("thread: ")),
                "samples / own function (the innermost frame)",
                *share_lines(own(stacks), total, 30),
                "samples / inclusive, each function in the stack (threading frames left out)",
                *share_lines(anywhere, total, 60, lambda name: "threading.py" not in name),
            ]
        )
        + "\n"
    )
    if not simulated:
        return {
            "seconds": seconds,
            "rate_hz": rate,
            "on_cpu_samples": total,
            "on_cpu_percent": round(100 * total / rate / seconds, 3),
        }
    return {
        "seconds": seconds,
        "rate_hz": rate,
        "gil_samples": total,
        "simulator_samples": in_simulator,
        "gil_held_percent": round(100 * total / rate / seconds, 3),
    }


def run_agent(args: argparse.Namespace, out: Path) -> dict:
    receiver = None
    if args.collector == "local":
        receiver = Receiver()
        collector = receiver.url
    elif args.collector == "unreachable":
        collector = f"http://127.0.0.1:{free_port()}"  # bound, released: nobody listens there
    else:
        collector = args.collector
    port = free_port()
    spool = tempfile.mkdtemp(prefix="agent-cost-spool-")
    launcher = agent_command()
    if args.replicate > 1:  # each real GPU shown to the agent --replicate times (bench/replicated_gpus.py)
        launcher = [sys.executable, str(Path(__file__).with_name("replicated_gpus.py")), str(args.replicate)]
    cmd = launcher + ["agent", "--listen", f"127.0.0.1:{port}", "--node", "bench"]
    cmd += ["--interval", "1", "--collector", collector, "--spool-dir", spool, "--log-level", "warning"]
    if args.simulate:
        cmd += ["--simulate", str(args.simulate)]
    with (out / "agent_cost_agent.log").open("w") as agent_log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=agent_log)
        shown = ["gpufleet", *cmd[len(launcher) :]]
        result: dict = {"command": " ".join(shown), "collector": args.collector}
        try:
            health = wait_healthy(port, proc)
            result["gpus"] = health.get("gpus", 0)
            run_scraped(port, args.warmup, args.scrape_interval)
            busy0, all0 = machine_busy()
            cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
            pushes0 = receiver.requests if receiver else 0
            scrapes = run_scraped(port, args.seconds, args.scrape_interval)
            cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
            busy1, all1 = machine_busy()
            rss, peak = memory_mib(proc.pid)
            gpus = max(1, result["gpus"])
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            node = 100 * (user + system) / (wall1 - wall0)
            result.update(
                {
                    "window_seconds": round(wall1 - wall0, 1),
                    "scrapes": scrapes,
                    "pushes": (receiver.requests - pushes0) if receiver else None,
                    "cpu_seconds": round(user + system, 3),
                    "cpu_user_seconds": round(user, 3),
                    "cpu_system_seconds": round(system, 3),
                    "node_cpu_percent": round(node, 3),
                    "per_gpu_cpu_percent": round(node / gpus, 4),
                    "rss_mib": round(rss, 1),
                    "rss_peak_mib": round(peak, 1),
                    "machine_busy_percent": round(100 * (busy1 - busy0) / max(1, all1 - all0), 1),
                    "machine_cpus": psutil.cpu_count(),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                result["push_error"] = json.loads(resp.read()).get("push_error")
            if args.profile_seconds > 0 and (args.simulate or py_spy()):
                prof = profile(
                    proc.pid,
                    port,
                    args.profile_seconds,
                    args.scrape_interval,
                    args.profile_rate,
                    out,
                    simulated=bool(args.simulate),
                )
                result["profile"] = prof
                if args.simulate and "simulator_samples" in prof:
                    # The simulator's share of the samples, of the CPU time /proc counted: a thread that holds
                    # the GIL while the OS has it waiting for a core is sampled as busy, on a loaded machine
                    # more so, and that inflates every function alike, not one more than another.
                    simulated = node * prof["simulator_samples"] / max(1, prof["gil_samples"])
                    prof["simulator_cpu_percent"] = round(simulated, 3)
                    agent_only = node - simulated
                    result["agent_only_cpu_percent"] = round(agent_only, 3)
                    result["agent_only_per_gpu_cpu_percent"] = round(agent_only / gpus, 4)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            if receiver is not None:
                receiver.close()
            shutil.rmtree(spool, ignore_errors=True)
    return result


# ---- one sample, in this process --------------------------------------------------------------------------
def nvml_library(args: argparse.Namespace) -> Any:
    """What the bench's in-process GPU reads go through: ``--simulate N`` GPUs, else the real NVML bindings."""
    if args.simulate:
        from gpufleet.agent.simulator import SimulatedNVML

        return SimulatedNVML(args.simulate, seed=1, workload="busy")
    from gpufleet.agent.nvml import load_library

    return load_library()


def nvml_breakdown(args: argparse.Namespace) -> dict:
    """Each NVML function's share of the agent's GPU reads, at the agent's own pace: a sample a second, the
    slow rows every --slow-interval (the costly ones every COSTLY_EVERY-th time) and the XID event thread
    waiting EVENT_WAIT_MS at a time, for ``--breakdown-seconds``."""
    timed = TimedLibrary(nvml_library(args))
    slow = AgentSettings().slow_interval
    src = GpuSource(Nvml(timed), "bench", watch_events=True, background=True, slow_interval=slow)
    src.start()
    time.sleep(1.0)
    timed.stats.clear()
    c0, t0 = time.process_time(), time.monotonic()
    next_at = t0
    while time.monotonic() - t0 < args.breakdown_seconds:
        src.collect()
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    seconds, cpu = time.monotonic() - t0, time.process_time() - c0
    src.close()
    rows = sorted(
        (
            {
                "function": name,
                "calls_per_s": round(n / seconds, 2),
                "wall_ms_per_call": round(1000 * wall / n, 4),
                "cpu_ms_per_call": round(1000 * cpu_s / n, 4),
                "cpu_percent_of_core": round(100 * cpu_s / seconds, 4),
            }
            for name, (n, wall, cpu_s) in timed.stats.items()
        ),
        key=lambda r: -r["cpu_percent_of_core"],
    )
    return {
        "seconds": round(seconds, 1),
        "slow_interval_s": slow,
        "gpus": len(src.gpus),
        "process_cpu_percent": round(100 * cpu / seconds, 3),
        "nvml_cpu_percent": round(sum(r["cpu_percent_of_core"] for r in rows), 3),
        "functions": rows,
    }


def read_costs(args: argparse.Namespace, repeat: int = 50) -> list[dict]:
    """What each NVML read of the GPU rows costs alone on the first GPU: every field id as a batch of one,
    every other call once per function and arguments, and the fast rows' field ids as the one batch the
    agent makes; the calling thread's CPU ms a read (median of ``repeat``)."""
    from gpufleet.agent.fields import FAST_FIELDS, SLOW_FIELDS, FieldValue

    lib = nvml_library(args)
    lib.nvmlInit()
    handle = lib.nvmlDeviceGetHandleByIndex(0)

    def cost(fn: Callable[[], object]) -> tuple[float, bool]:
        times = []
        for _ in range(repeat):
            c0 = time.thread_time()
            try:
                fn()
                ok = True
            except lib.NVMLError:
                ok = False
            times.append(time.thread_time() - c0)
        return 1000 * statistics.median(times), ok

    rows: list[dict] = []
    fast_ids: list[tuple[int, int]] = []
    seen: set[object] = set()
    for part, fields in (("fast", FAST_FIELDS), ("slow", SLOW_FIELDS)):
        for f in fields:
            if f.per_link:
                continue
            for r in f.sources():
                key = (r.id, r.scope) if isinstance(r, FieldValue) else (r.fn, r.args)
                if key in seen:
                    continue
                seen.add(key)
                if isinstance(r, FieldValue):
                    if part == "fast":
                        fast_ids.append((r.id, r.scope))
                    if len(rows) > 200:
                        continue
                    ms, ok = cost(lambda r=r: lib.nvmlDeviceGetFieldValues(handle, [(r.id, r.scope)]))
                    what = f"field {r.id}" + (f" scope {r.scope}" if r.scope else "")
                else:
                    fn = getattr(lib, r.fn, None)
                    if fn is None:
                        continue
                    ms, ok = cost(lambda fn=fn, r=r: fn(handle, *r.args))
                    what = f"{r.fn}{r.args if r.args else ''}"
                rows.append(
                    {"read": what, "row": f.name, "part": part, "cpu_ms": round(ms, 4), "answers": ok}
                )
    ms, ok = cost(lambda: lib.nvmlDeviceGetFieldValues(handle, fast_ids))
    rows.append(
        {
            "read": f"the fast rows' {len(fast_ids)} field ids in one batch",
            "row": "",
            "part": "fast",
            "cpu_ms": round(ms, 4),
            "answers": ok,
        }
    )
    lib.nvmlShutdown()
    return sorted(rows, key=lambda r: -r["cpu_ms"])


def sample_cost(args: argparse.Namespace) -> dict:
    src = GpuSource(
        Nvml(nvml_library(args)), "bench", watch_events=False, background=False, slow_interval=1e9
    )
    src.start()
    for _ in range(3):
        src.collect()
    sample_ms = median_ms(src.collect, args.samples)
    asleep_ms = thread_cpu_ms(src.collect, times=min(args.samples, 10), asleep_s=1.0)
    slow_ms = median_ms(src.refresh_slow, 5)
    src.close()
    result: dict = {
        "model": src.gpus[0].model if src.gpus else "",
        "agent_sample_ms": round(sample_ms, 4),
        "agent_sample_cpu_ms_after_sleep": round(asleep_ms, 4),
        "agent_sample_ms_per_gpu": round(sample_ms / max(1, len(src.gpus)), 4),
        "slow_refresh_ms": round(slow_ms, 3),
    }
    smi = shutil.which("nvidia-smi")
    if smi and not args.simulate:
        fields = smi_fields(smi)
        cmd = [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        subprocess.run(cmd, capture_output=True, check=True, timeout=60)
        smi_ms = median_ms(lambda: subprocess.run(cmd, capture_output=True, check=True, timeout=60), 15)
        result["baseline"] = "nvidia-smi --query-gpu (same fields)"
        result["baseline_fields"] = fields
    else:
        # No nvidia-smi here: the floor any per-scrape nvidia-smi exporter pays is one process spawn.
        true = shutil.which("true") or "/bin/true"
        smi_ms = median_ms(lambda: subprocess.run([true], check=True), 30)
        result["baseline"] = (
            "process spawn of /bin/true (lower bound of any nvidia-smi call; no nvidia-smi here)"
        )
    result["baseline_ms"] = round(smi_ms, 3)
    result["ratio_baseline_over_agent_sample"] = round(smi_ms / sample_ms, 1)
    return result


def report(result: dict, args: argparse.Namespace) -> list[str]:
    run = result["run"]
    gpus = run["gpus"]
    pushes = f", {run['pushes']} pushes taken" if run.get("pushes") is not None else ""
    md = [
        f"Agent cost — {result['mode']}, {gpus} GPU(s) {result.get('model', '')}, on {result['machine']}",
        "",
        f"Agent: `{run['command']}` (collector: {run['collector']}); scraped every {args.scrape_interval:g} s "
        f"as Prometheus scrapes (asking for OpenMetrics, with gzip).",
        f"Machine during the window: {run['machine_busy_percent']} % of its {run['machine_cpus']} CPUs busy in "
        f"all, load average {run['load_average'][0]}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| agent process CPU at 1 Hz over {run['window_seconds']} s ({run['scrapes']} scrapes{pushes}), "
        f"node total | {run['node_cpu_percent']} % of one core ({run['cpu_user_seconds']} s user, "
        f"{run['cpu_system_seconds']} s system) |",
        f"| per GPU | {run['per_gpu_cpu_percent']} % of one core |",
    ]
    prof = run.get("profile")
    if prof and "on_cpu_percent" in prof:
        md.append(
            f"| threads on a CPU (py-spy, {prof['seconds']:.0f} s at {prof['rate_hz']} Hz; "
            f"agent_cost_profile.txt) | {prof['on_cpu_percent']} % of one core |"
        )
    elif prof and "simulator_cpu_percent" in prof:
        md += [
            f"| of the node total, the simulated GPUs (py-spy, {prof['seconds']:.0f} s at {prof['rate_hz']} Hz) | "
            f"{prof['simulator_cpu_percent']} % |",
            f"| the agent without the simulator, node total | {run['agent_only_cpu_percent']} % of one core |",
            f"| the agent without the simulator, per GPU | {run['agent_only_per_gpu_cpu_percent']} % of one core |",
        ]
    elif prof:
        md.append(f"| the simulated GPUs' share | not measured: {prof['error']} |")
    md.append(f"| process RSS at the end (peak) | {run['rss_mib']} MiB ({run['rss_peak_mib']} MiB) |")
    # the in-process timings read the GPUs at hand, each once, whatever --replicate showed the agent
    once = ", each real GPU once" if args.replicate > 1 else ""
    if "no_sample_cost" in result:
        md.append(f"| one full agent sample | not measured: {result['no_sample_cost']} |")
    else:
        md += [
            f"| one full agent sample (all GPUs{once}, median of {args.samples}, in this process) | "
            f"{result['agent_sample_ms']} ms ({result['agent_sample_ms_per_gpu']} ms per GPU) |",
            f"| the same sample after 1 s asleep, as the running agent takes it (thread CPU, median of "
            f"{min(args.samples, 10)}) | {result['agent_sample_cpu_ms_after_sleep']} ms |",
            f"| baseline: {result['baseline']} (median) | {result['baseline_ms']} ms |",
            f"| ratio baseline / agent sample | {result['ratio_baseline_over_agent_sample']}x |",
            f"| slow-row refresh (every {AgentSettings().slow_interval:.0f} s, off the sampling path) | "
            f"{result['slow_refresh_ms']} ms |",
        ]
    b = result.get("nvml_breakdown")
    if b:
        md += [
            "",
            f"The GPU reads alone, at the agent's pace ({b['gpus']} GPU(s), 1 Hz, slow rows every "
            f"{b['slow_interval_s']:.0f} s, "
            f"the XID event thread), {b['seconds']} s in this process: {b['process_cpu_percent']} % of one core, "
            f"of it {b['nvml_cpu_percent']} % inside NVML calls (thread CPU time, user and system).",
            "",
            "| NVML function | calls/s | wall ms a call | CPU ms a call | % of one core |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        md += [
            f"| {r['function']} | {r['calls_per_s']} | {r['wall_ms_per_call']} | {r['cpu_ms_per_call']} | "
            f"{r['cpu_percent_of_core']} |"
            for r in b["functions"][:15]
        ]
    costs = result.get("read_costs")
    if costs:
        md += [
            "",
            "Each read of the GPU rows alone (first GPU, thread CPU ms, median of 50); the costliest:",
            "",
            "| read | row | fast/slow | CPU ms | answers |",
            "| --- | --- | --- | ---: | --- |",
        ]
        md += [
            f"| {r['read']} | {r['row']} | {r['part']} | {r['cpu_ms']} | {'yes' if r['answers'] else 'no'} |"
            for r in costs[:25]
        ]
    md += [
        "",
        "Goals: "
        + ", ".join(
            f"{k}: {'n/a' if v is None else 'met' if v else 'NOT met'}" for k, v in result["goals"].items()
        ),
    ]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", type=int, default=0, help="simulate N GPUs instead of real NVML")
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the 1 Hz CPU window")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds the agent runs before the window")
    ap.add_argument("--scrape-interval", type=float, default=15.0, help="seconds between scrapes of /metrics")
    ap.add_argument(
        "--collector",
        default="local",
        help="'local' (a receiver in this process), 'unreachable', or a collector URL",
    )
    ap.add_argument(
        "--profile-seconds",
        type=float,
        default=60.0,
        help="py-spy window after the CPU window: where the agent's time goes (with --simulate, the simulator's share is taken off); 0: none",
    )
    ap.add_argument("--profile-rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--samples", type=int, default=200, help="samples timed for the per-sample cost")
    ap.add_argument(
        "--breakdown-seconds",
        type=float,
        default=60.0,
        help="window of the per-NVML-function breakdown at the agent's pace; 0: none",
    )
    ap.add_argument(
        "--replicate",
        type=int,
        default=1,
        help="real GPUs only: show the agent each GPU N times (bench/replicated_gpus.py), every read a real "
        "NVML call: a node of N times the GPUs at hand",
    )
    args = ap.parse_args()
    if args.replicate < 1 or (args.replicate > 1 and args.simulate):
        ap.error("--replicate takes a count of 1 or more, and real GPUs (not with --simulate)")
    if args.seconds <= 0 or args.scrape_interval <= 0 or args.warmup < 0:
        ap.error("--seconds and --scrape-interval must be positive and --warmup not negative")
    if args.collector not in ("local", "unreachable") and not args.collector.startswith(
        ("http://", "https://")
    ):
        ap.error(
            f"--collector {args.collector!r}: give 'local', 'unreachable' or a URL such as http://collector:9446"
        )
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} CPUs)",
        "python": platform.python_version(),
        "mode": f"simulated x{args.simulate}"
        if args.simulate
        else (f"real NVML, each GPU shown {args.replicate} times" if args.replicate > 1 else "real NVML"),
    }
    # the agent first, alone: the timing loops below would load the machine it is measured on
    result["run"] = run_agent(args, out)
    try:
        result.update(sample_cost(args))
    except NvmlUnavailable as exc:  # the agent ran without GPUs (GPUFLEET_SOURCES=host on a CPU machine)
        result["no_sample_cost"] = str(exc)
    if args.breakdown_seconds > 0:
        result["nvml_breakdown"] = nvml_breakdown(args)
        result["read_costs"] = read_costs(args)
    run = result["run"]
    per_gpu = run.get("agent_only_per_gpu_cpu_percent", run["per_gpu_cpu_percent"])
    result["goals"] = {
        f"per GPU <= {GOAL_PER_GPU_PERCENT} % of a core": per_gpu <= GOAL_PER_GPU_PERCENT,
        f"rss < {GOAL_RSS_MIB} MiB": run["rss_peak_mib"] < GOAL_RSS_MIB,
        "ratio >= 50 (vs nvidia-smi)": (result["ratio_baseline_over_agent_sample"] >= 50)
        if result.get("baseline", "").startswith("nvidia-smi")
        else None,
    }
    (out / "agent_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result, args)
    (out / "agent_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
