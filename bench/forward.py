"""Forwarding benchmark: does `gpufleet collector --forward` keep up with the collector's full ingest rate
into a real Prometheus, with back-pressure instead of loss?

    python bench/forward.py [--seconds 20] [--stop-seconds 20] [--shards 4] [--pg postgresql://…/test]

The load is `bench/ingest.py compare`'s (2,000 GPUs x 21 gauge fields, requests of 50 GPUs x 5 one-second
samples, 4 keep-alive senders), sent as agents send: each request's GPUs always go through the same
sender, in time order, and a request answered 503 is sent again after its Retry-After before the next.
Each phase starts a fresh Prometheus (/usr/bin/prometheus --web.enable-remote-write-receiver, from
bench/ingest.py) and a fresh `gpufleet collector` on PostgreSQL with --forward to it:

* ``baseline`` (with ``--baseline``): the collector without --forward, for the ingest rate forwarding costs;
* ``steady``: full rate for --seconds;
* ``stall``: full rate for --seconds + --stop-seconds, Prometheus stopped (SIGSTOP) for --stop-seconds
  from the 5th second (a quarter of a shorter phase), then resumed (SIGCONT): the queue fills (the bench's
  --max-queue-samples, 2,000,000, is less than a stall queues), writes are refused with 503 and retried,
  then the forwarder catches up;
* ``drain``: Prometheus stopped from the start, full rate for --seconds / 2 (the queue fills, 503s), then
  the load stops and Prometheus resumes: how fast the forwarder alone empties its queue (what
  --forward-shards buys).

For each it prints samples/s acknowledged by the collector, samples/s the forwarder sent (its
``sent_samples`` counter over the timed part), the backlog every second, the 503s the senders got, how many
samples Prometheus holds at the end (``sum(count_over_time(...))`` of each field, and its
``prometheus_tsdb_head_samples_appended_total``), and lost = acknowledged - held. Goal: forwarded >=
acknowledged rate in ``steady`` with no 503, and lost 0 in both phases.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (  # noqa: E402
    ADMIN,
    CORE,
    FLEET_GPUS,
    PROMETHEUS,
    REQUEST_GPUS,
    SENDERS,
    WINDOW_S,
    CpuMeter,
    Db,
    free_port,
    pg_processes,
    process_tree,
    prometheus,
    remote_write_load,
    start_collector,
)
from gpufleet.core import remote_write as rw  # noqa: E402

GROUPS = FLEET_GPUS // REQUEST_GPUS  # requests per window; request i holds group i % GROUPS
STALL_AT_S = 5.0
DRAIN_TIMEOUT_S = 300.0


def push_as_agents(
    port: int,
    bodies: list[tuple[bytes, int]],
    seconds: float | None,
    senders: int,
    on_tick: Callable[[], None] | None = None,
) -> dict:
    """Send ``bodies`` (window after window, GROUPS requests each) over ``senders`` keep-alive connections:
    sender k owns the groups g with g % senders == k and sends their requests in order; a 503 is retried
    after its Retry-After, as an agent retries its batch, before the sender goes on. Runs until the bodies
    run out or ``seconds`` pass; a request still being retried then is not acknowledged."""
    lock = threading.Lock()
    done: dict = {"acked": 0, "requests": 0, "refused_503": 0, "errors": 0, "reconnects": 0, "ran_out": False}
    done["first_503"] = done["first_error"] = None
    stop_at = time.monotonic() + seconds if seconds is not None else float("inf")
    headers = {
        "Content-Type": rw.CONTENT_TYPE,
        "Content-Encoding": rw.CONTENT_ENCODING,
        "X-Prometheus-Remote-Write-Version": rw.PROTOCOL_VERSION,
    }

    def sender(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = [b for i, b in enumerate(bodies) if (i % GROUPS) % senders == k]
        for body, count in mine:
            while True:
                if time.monotonic() >= stop_at:
                    return
                try:
                    conn.request("POST", "/api/v1/write", body=body, headers=headers)
                    resp = conn.getresponse()
                    text = resp.read()
                except (OSError, http.client.HTTPException):
                    # The server closed the idle keep-alive connection as this request went out (uvicorn
                    # closes one after 5 s, a Retry-After's length): it never read it. Reconnect, resend.
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    with lock:
                        done["reconnects"] += 1
                    continue
                if 200 <= resp.status < 300:
                    with lock:
                        done["acked"] += count
                        done["requests"] += 1
                    break
                with lock:
                    if resp.status == 503:
                        done["refused_503"] += 1
                        done["first_503"] = done["first_503"] or text[:400].decode(errors="replace")
                    else:
                        done["errors"] += 1
                        done["first_error"] = done["first_error"] or f"{resp.status} {text[:300]!r}"
                if resp.status != 503:
                    break  # refused for good: an agent drops it too
                wait = float(resp.getheader("Retry-After") or 1)
                time.sleep(min(wait, max(stop_at - time.monotonic(), 0)))
                if wait >= 2:  # as long as the server keeps an idle connection: start a new one
                    conn.close()
        with lock:
            done["ran_out"] = True

    t0 = time.monotonic()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.1)
        if on_tick is not None:
            on_tick()
    elapsed = time.monotonic() - t0
    return {**done, "seconds": round(elapsed, 2), "per_s": round(done["acked"] / elapsed)}


def scrape(port: int) -> dict[str, float]:
    """The collector's /metrics: series -> value (a series' labels are kept in its key as written)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def forward_state(metrics: dict[str, float]) -> dict[str, float]:
    def total(prefix: str) -> float:
        return sum(v for k, v in metrics.items() if k.startswith(prefix + "{") or k == prefix)

    return {
        "queued": total("gpufleet_collector_forward_queued_samples"),
        "sent": total("gpufleet_collector_forward_sent_samples_total"),
        "dropped": total("gpufleet_collector_forward_dropped_samples_total"),
        "failed_sends": total("gpufleet_collector_forward_failed_sends_total"),
        "backpressure": total("gpufleet_collector_forward_backpressure_writes_total"),
        "stored": total("gpufleet_collector_samples_received_total"),
    }


class Timeline:
    """The forwarder's backlog and sent counter once a second while the load runs and drains."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self._next = 0.0

    def tick(self) -> dict | None:
        """A row when a second has passed since the last, else None."""
        if time.monotonic() - self.t0 < self._next:
            return None
        return self.now()

    def now(self) -> dict:
        t = time.monotonic() - self.t0
        self._next = t + 1.0
        row = {"t": round(t, 1), **forward_state(scrape(self.port))}
        self.rows.append(row)
        return row


def prometheus_held(port: int, start_ms: int, end_ms: int) -> dict:
    """What Prometheus holds of the load: counted samples of every bench series, and the TSDB's counter."""
    span_s = (end_ms - start_ms) // 1000 + 120
    # One term per metric: count_over_time drops the name, and the fields share their other labels.
    expr = " + ".join(f'sum(count_over_time({m}{{cluster="bench"}}[{span_s}s]))' for m, _ in CORE)
    query = urllib.parse.urlencode({"query": expr, "time": end_ms / 1000 + 60})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=300) as r:
            result = json.loads(r.read())["data"]["result"]
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"Prometheus refused the count query: {exc.read()[:500]!r}") from None
    held = int(float(result[0]["value"][1])) if result else 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    appended = sum(
        float(m.group(1))
        for m in re.finditer(r"^prometheus_tsdb_head_samples_appended_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    )
    return {"held": held, "head_samples_appended": int(appended)}


def run_phase(
    name: str, args: argparse.Namespace, tmp: Path, load: list[tuple[bytes, int]], start_ms: int, end_ms: int
) -> dict:
    warm, bodies = load[:GROUPS], load[GROUPS:]
    seconds = {"stall": args.seconds + args.stop_seconds, "drain": args.seconds / 2}.get(name, args.seconds)
    out: dict = {"phase": name}
    with prometheus(tmp / name) as (prom, prom_port):
        db = Db(args.pg, "forward")
        try:
            port = free_port()
            extra = []
            if name != "baseline":
                extra = [
                    "--forward",
                    f"http://127.0.0.1:{prom_port}/api/v1/write",
                    "--forward-shards",
                    str(args.shards),
                    "--forward-max-queue-samples",
                    str(args.max_queue_samples),
                ]
            proc = start_collector(db.url, port, tmp / f"collector-{name}.log", extra)
            try:
                first = push_as_agents(port, warm, None, SENDERS)
                if first["errors"] or first["refused_503"]:
                    raise RuntimeError(f"{name}: the first window was refused: {first}")
                timeline = Timeline(port)
                meters = {
                    "collector": CpuMeter(lambda: process_tree(proc.pid)),
                    "prometheus": CpuMeter(lambda: process_tree(prom.pid)),
                    "postgres_backends": CpuMeter(lambda: pg_processes(args.pg, db.name)),
                }
                load0 = os.getloadavg()[0]
                for m in meters.values():
                    m.start()
                before = timeline.now()
                stall: dict[str, float | None] = {"stopped_at": None, "resumed_at": None}

                def on_tick() -> None:
                    row = timeline.tick()
                    if row is not None:
                        print(f"  {name:8s} {_row_text(row, before)}", flush=True)
                    t = time.monotonic() - timeline.t0
                    stop_at = 0.0 if name == "drain" else min(STALL_AT_S, seconds / 4)
                    if name in ("stall", "drain") and stall["stopped_at"] is None and t >= stop_at:
                        os.kill(prom.pid, signal.SIGSTOP)
                        stall["stopped_at"] = round(t, 1)
                        print(f"  {name:8s} Prometheus stopped (SIGSTOP) at {t:.1f} s", flush=True)
                    stopped = stall["stopped_at"]
                    if (
                        name == "stall"
                        and stopped is not None
                        and stall["resumed_at"] is None
                        and t >= stopped + args.stop_seconds
                    ):
                        os.kill(prom.pid, signal.SIGCONT)
                        stall["resumed_at"] = round(t, 1)
                        print(f"  {name:8s} Prometheus resumed (SIGCONT) at {t:.1f} s", flush=True)

                result = push_as_agents(port, bodies, seconds, SENDERS, on_tick)
                after = timeline.now()
                if stall["stopped_at"] is not None and stall["resumed_at"] is None:
                    os.kill(prom.pid, signal.SIGCONT)
                    stall["resumed_at"] = round(time.monotonic() - timeline.t0, 1)
                    print(f"  {name:8s} Prometheus resumed (SIGCONT) after the load", flush=True)
                cpu = {k: round(m.stop(), 2) for k, m in meters.items()}
                load1 = os.getloadavg()[0]
                out.update(result)
                out.update(stall)
                acked_all = result["acked"] + first["acked"]
                out["acked_with_first_window"] = acked_all
                out["cpu_s"] = cpu
                out["load_before"], out["load_after"] = round(load0, 2), round(load1, 2)
                if name == "baseline":
                    return out
                out["forwarded_per_s"] = round((after["sent"] - before["sent"]) / result["seconds"])
                out["backlog_at_end"] = int(after["queued"])
                # Catch up: wait for the queue to empty, then for Prometheus's answer.
                t_end = time.monotonic()
                while time.monotonic() - t_end < DRAIN_TIMEOUT_S:
                    row = timeline.tick()
                    if row is not None:
                        print(f"  {name:8s} {_row_text(row, before)} (draining)", flush=True)
                    if forward_state(scrape(port))["queued"] == 0:
                        break
                    time.sleep(0.1)
                drain_s = time.monotonic() - t_end
                final = timeline.now()
                out["drain_s"] = round(drain_s, 1)
                if name == "drain":  # the forwarder alone: nothing else is written meanwhile
                    out["drain_per_s"] = round(out["backlog_at_end"] / max(drain_s, 1e-3))
                out["forward"] = {k: int(v) for k, v in final.items() if k != "t"}
                out["timeline"] = timeline.rows
                if stall["resumed_at"] is not None:
                    resumed = stall["resumed_at"]
                    peak = max((r["queued"] for r in timeline.rows), default=0)
                    caught_up = next(
                        (r["t"] for r in timeline.rows if r["t"] > resumed and r["queued"] <= peak / 10),
                        None,
                    )
                    out["peak_backlog"] = int(peak)
                    out["caught_up_s_after_resume"] = round(caught_up - resumed, 1) if caught_up else None
            finally:
                proc.terminate()
                proc.wait(timeout=60)
                # What the collector said about its forwarding (drops, refusals, retries), for the record.
                said = (tmp / f"collector-{name}.log").read_text().splitlines()
                out["collector_log"] = [ln for ln in said if "remote-write" in ln][:20]
        finally:
            db.drop()
        if name != "baseline":
            out.update(prometheus_held(prom_port, start_ms, end_ms))
            out["lost"] = out["acked_with_first_window"] - out["held"]
    if out["ran_out"]:
        print(f"{name}: the load ran out before {seconds:g} s: raise --max-rate", flush=True)
    return out


def _row_text(row: dict, before: dict) -> str:
    return (
        f"t={row['t']:6.1f} s  backlog {int(row['queued']):>10,} samples  forwarded "
        f"{int(row['sent'] - before['sent']):>12,}  503s {int(row['backpressure'] - before['backpressure']):>5}"
        f"  failed sends {int(row['failed_sends'] - before['failed_sends'])}"
    )


def print_summary(results: dict, args: argparse.Namespace) -> None:
    print()
    print(
        f"{'phase':10s}{'acked/s':>11s}{'forwarded/s':>13s}{'503s':>7s}{'acked':>13s}{'in Prometheus':>15s}"
        f"{'lost':>7s}{'drain s':>9s}   load avg   CPU-s collector/prometheus/PG"
    )
    for name, r in results.items():
        cpu = r["cpu_s"]
        print(
            f"{name:10s}{r['per_s']:>11,}{r.get('forwarded_per_s', 0):>13,}{r['refused_503']:>7,}"
            f"{r['acked_with_first_window']:>13,}{r.get('held', 0):>15,}{r.get('lost', 0):>7,}"
            f"{r.get('drain_s', 0):>9}   {r['load_before']}/{r['load_after']}"
            f"   {cpu['collector']}/{cpu['prometheus']}/{cpu['postgres_backends']}"
        )
    steady = results.get("steady")
    if steady:
        ok = steady["forwarded_per_s"] >= steady["per_s"] * 0.98 and steady["refused_503"] == 0
        print(
            f"steady: forwarded {steady['forwarded_per_s']:,}/s against {steady['per_s']:,}/s acknowledged "
            f"with {steady['refused_503']} back-pressure 503s: {'keeps up' if ok else 'BEHIND'}; "
            f"lost {steady['lost']} (head samples appended {steady['head_samples_appended']:,})"
        )
    stall = results.get("stall")
    if stall:
        print(
            f"stall: Prometheus stopped {args.stop_seconds:g} s; peak backlog {stall.get('peak_backlog', 0):,} "
            f"samples, {stall['refused_503']} writes answered 503 and retried, caught up "
            f"{stall.get('caught_up_s_after_resume')} s after SIGCONT; lost {stall['lost']} "
            f"(head samples appended {stall['head_samples_appended']:,})"
        )
    drain = results.get("drain")
    if drain:
        print(
            f"drain: {drain['backlog_at_end']:,} samples queued behind a stopped Prometheus went out in "
            f"{drain['drain_s']} s once it resumed, with no ingest: {drain['drain_per_s']:,} samples/s over "
            f"{args.shards} connection(s); lost {drain['lost']}"
        )
    base = results.get("baseline")
    if base and steady:
        print(f"ingest with forwarding / without: {steady['per_s'] / max(1, base['per_s']):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default=os.environ.get("GPUFLEET_BENCH_PG", ADMIN), help="PostgreSQL admin URL.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Full-rate seconds of the steady phase.")
    ap.add_argument("--stop-seconds", type=float, default=20.0, help="Seconds Prometheus is stopped.")
    ap.add_argument("--shards", type=int, default=4, help="--forward-shards of the collector.")
    ap.add_argument(
        "--max-queue-samples",
        type=int,
        default=2_000_000,
        help="--forward-max-queue-samples: below what a stall of --stop-seconds queues at full rate.",
    )
    ap.add_argument("--baseline", action="store_true", help="First run the collector without --forward.")
    ap.add_argument("--phases", default="steady,stall,drain", help="Comma-separated: steady, stall, drain.")
    ap.add_argument(
        "--max-rate", type=float, default=800_000, help="Samples/s the pre-encoded load lasts a phase at."
    )
    ap.add_argument("--json", default=None, help="Also write the results to this file.")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"steady", "stall", "drain"}
    if unknown:
        ap.error(f"unknown phase {', '.join(sorted(unknown))}: give steady, stall, drain")
    if args.baseline:
        phases.insert(0, "baseline")
    if not Path(PROMETHEUS).exists():
        raise SystemExit("bench/forward.py needs Prometheus: apt-get install prometheus")

    longest = args.seconds + (args.stop_seconds if "stall" in phases else 0)
    per_window = FLEET_GPUS * len(CORE) * WINDOW_S
    windows = int(longest * args.max_rate / per_window) + 2
    start_ms = int(time.time()) * 1000 - 60_000
    t = time.perf_counter()
    load = remote_write_load(windows, start_ms)
    end_ms = start_ms + windows * WINDOW_S * 1000
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; encoded {len(load)} requests "
        f"({windows} windows of {FLEET_GPUS} GPUs) in {time.perf_counter() - t:.1f} s; {SENDERS} senders; "
        f"phases {', '.join(phases)}; --forward-shards {args.shards}",
        flush=True,
    )
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-forward-") as tmp:
        for name in phases:
            (Path(tmp) / name).mkdir()
            results[name] = run_phase(name, args, Path(tmp), load, start_ms, end_ms)
            summary = {k: v for k, v in results[name].items() if k != "timeline"}
            print(f"{name}: {summary}", flush=True)
    print_summary(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
