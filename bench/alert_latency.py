"""Alert latency: fault -> Slack message, with `gpufleet up --simulate` and the Slack Web API double.

Runs ``python -m gpufleet.cli up --simulate 8`` (1 s sampling, the defaults of `up`) with Slack pointed at
the local double (which checks every request against Slack's OpenAPI specification), then injects faults
through the agent's ``/simulate/faults`` endpoint (the request ``gpufleet simulate inject`` sends):

* an XID (48, 62, 74, 94, 95, 119 on GPUs 0..5): time from the inject command to the Slack message;
* a thermal slowdown (GPUs 6, 7): the simulated card heats towards its slowdown point first, so the time
  counts from the first sample with ``hw_thermal`` active (read back from the collector's store).

Baseline, by arithmetic (Prometheus + Alertmanager defaults, nothing measured here): a sample waits for the
next scrape (``scrape_interval`` 1m: 30 s on average), then for the next rule evaluation
(``evaluation_interval`` 1m: 30 s on average), then Alertmanager's ``group_wait`` (30 s) before the Slack
call: 30 + 30 + 30 = 90 s on average, up to 150 s.

    python bench/alert_latency.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.doubles.slack_api import SlackDouble  # noqa: E402

BASELINE_MEAN_S = 30 + 30 + 30  # scrape_interval/2 + evaluation_interval/2 + group_wait
BASELINE_MAX_S = 60 + 60 + 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def wait(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    return None


def arrived(slack: SlackDouble, rule: str, uuid: str) -> float | None:
    """Unix time the first Slack post or edit naming ``rule`` for GPU ``uuid`` reached the double."""
    times = []
    for m in list(slack.messages):
        if uuid not in json.dumps(m.attachments):
            continue
        if rule in m.text and not m.edits:
            times.append(m.received_at)
        times += [t for e, t in zip(m.edits, m.edited_at, strict=False) if rule in e.get("text", "")]
        if rule in m.text and m.edits and not any(rule in e.get("text", "") for e in m.edits):
            times.append(m.received_at)
    return min(times) if times else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port, agent_port = free_port(), free_port()
    agent = f"http://127.0.0.1:{agent_port}"
    collector = f"http://127.0.0.1:{port}"
    results: list[dict] = []
    with SlackDouble() as slack, tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpufleet.cli",
                "up",
                "--simulate",
                "8",
                "--listen",
                f"127.0.0.1:{port}",
                "--agent-listen",
                f"127.0.0.1:{agent_port}",
                "--db",
                f"sqlite:///{tmp}/bench.db",
                "--slack-token",
                "xoxb-bench-token",
                "--slack-channel",
                "CBENCH",
                "--slack-base-url",
                slack.base_url,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:

            def ready():
                try:
                    gpus = json.loads(get(collector + "/api/v1/gpus"))["gpus"]
                except OSError:
                    return None
                return gpus if len(gpus) == 8 and all(g["up"] for g in gpus) else None

            gpus = wait(ready, 60, 0.2)
            if not gpus:
                raise SystemExit("gpufleet up did not come up with 8 GPUs within 60 s")
            uuid = {int(g["gpu"]): g["uuid"] for g in gpus}
            time.sleep(3)

            def inject(gpu: int, kind: str, **kw: float) -> float:
                # the request `gpufleet simulate inject` sends, timed from just before it leaves
                body = json.dumps({"gpu": gpu, "kind": kind, **kw}).encode()
                req = urllib.request.Request(
                    agent + "/simulate/faults", data=body, headers={"Content-Type": "application/json"}
                )
                t = time.time()
                urllib.request.urlopen(req, timeout=10).read()
                return t

            for gpu, xid in zip(range(6), (48, 62, 74, 94, 95, 119), strict=True):
                t0 = inject(gpu, "xid", xid=xid)
                at = wait(lambda g=gpu: arrived(slack, "GpuXidCritical", uuid[g]), 30)
                results.append(
                    {"fault": f"XID {xid}", "gpu": gpu, "fault_to_slack_s": round(at - t0, 3) if at else None}
                )
                time.sleep(1.5)
            for gpu in (6, 7):
                t0 = inject(gpu, "thermal", duration=300)

                def onset(g=gpu, t0=t0):
                    # the first sample with hw_thermal active, from the collector's store on a 0.1 s grid
                    q = (
                        f"{collector}/api/v1/query_range?metric=gpufleet_gpu_clock_event_active&uuid={uuid[g]}"
                        f"&reason=hw_thermal&start={t0:.1f}&end={time.time():.1f}&step=0.1"
                    )
                    try:
                        series = json.loads(get(q))["data"]["result"]
                    except OSError:
                        return None
                    ones = [t for s in series for t, v in s["values"] if v == 1]
                    return min(ones) - 0.1 if ones else None  # the sample lies within 0.1 s before

                t_on = wait(onset, 180, 0.5)
                at = wait(lambda g=gpu: arrived(slack, "GpuHardwareThermalSlowdown", uuid[g]), 60)
                results.append(
                    {
                        "fault": "thermal slowdown",
                        "gpu": gpu,
                        "heating_s": round(t_on - t0, 1) if t_on else None,
                        "fault_to_slack_s": round(at - t_on, 3) if at and t_on else None,
                        "inject_to_slack_s": round(at - t0, 3) if at else None,
                    }
                )
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        problems = list(slack.problems)
    xid = [r["fault_to_slack_s"] for r in results if r["fault"].startswith("XID") and r["fault_to_slack_s"]]
    thermal = [
        r["fault_to_slack_s"] for r in results if r["fault"] == "thermal slowdown" and r["fault_to_slack_s"]
    ]
    summary = {
        "results": results,
        "slack_problems": problems,
        "xid_median_s": round(statistics.median(xid), 3) if xid else None,
        "xid_max_s": max(xid) if xid else None,
        "thermal_median_s": round(statistics.median(thermal), 3) if thermal else None,
        "baseline_mean_s": BASELINE_MEAN_S,
        "baseline_max_s": BASELINE_MAX_S,
        "speedup_vs_baseline_mean": round(BASELINE_MEAN_S / statistics.median(xid), 1) if xid else None,
        "setup": "gpufleet up --simulate 8: sample 1 s, push 2 s (urgent changes at once), eval 2 s (at once on "
        "urgent writes), group_wait 0 s",
    }
    (args.out / "alert_latency.json").write_text(json.dumps(summary, indent=2))
    lines = ["| fault | GPU | fault -> Slack (s) | note |", "| --- | ---: | ---: | --- |"]
    for r in results:
        note = f"heating {r['heating_s']} s before hw_thermal" if "heating_s" in r else ""
        lines.append(f"| {r['fault']} | {r['gpu']} | {r['fault_to_slack_s']} | {note} |")
    lines += [
        "",
        f"XID median {summary['xid_median_s']} s, max {summary['xid_max_s']} s; thermal slowdown (from "
        f"onset) median {summary['thermal_median_s']} s; baseline Prometheus + Alertmanager defaults "
        f"{BASELINE_MEAN_S} s mean (30 + 30 + 30), {BASELINE_MAX_S} s worst: "
        f"{summary['speedup_vs_baseline_mean']}x faster. Slack double problems: {len(problems)}",
    ]
    text = "\n".join(lines)
    (args.out / "alert_latency.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
