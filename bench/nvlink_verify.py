"""Verify the agent's NVLink series on a real NVLink pair (e.g. two H200s joined NV18), in one run:

1. which NVML reads of the NVLink rows each GPU answers: the per-GPU totals, the link-scoped data-link
   counters (NVML_FI_DEV_NVLINK_ERROR_DL_*, scopeId = link), the per-link field ids of older GPUs,
   nvmlDeviceGetNvLinkErrorCounter, nvmlDeviceGetNvLinkState, the throughput counters; and which one the
   agent's field table settled on for each counter;
2. every NVLink series of the agent (with --nvlink-per-link) present for every GPU;
3. the error counters against `nvidia-smi nvlink -e` summed per GPU and type, and the ECC counter against the
   per-lane corrections of `nvidia-smi nvlink -ec`, read back to back with the agent;
4. links up and links against the links `nvidia-smi nvlink -s` lists;
5. transmit and receive rates while GPU A copies to GPU B peer to peer (PyTorch), against the deltas of
   `nvidia-smi nvlink -gt d` over the same window: the agent's byte counters and its GPM rates, each within 5 %;
6. what one read of the slow rows costs with the NVLink rows in it, the first (learning) and later ones.

Run (about a minute):  OUT=out python3 bench/nvlink_verify.py [--gpus 0,1] [--seconds 14]
Needs nvidia-ml-py and, for step 5, torch. Writes $OUT/nvlink_verify.md and .json, and nvidia-smi's raw
answers to $OUT/nvlink_smi/. Reads only: nothing on the GPUs is changed (no counter is reset).
`--simulate` runs the same script on two simulated GPUs (no nvidia-smi, no workload): a dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpufleet.agent import fields as F  # noqa: E402
from gpufleet.agent.fields import FIELDS, GPM_FIELDS, Call, FieldValue  # noqa: E402
from gpufleet.agent.nvml import Gpu, Nvml  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource, Learned, read_rows  # noqa: E402

NVLINK_ROWS = tuple(f for f in FIELDS if "nvlink" in f.name)
NVLINK_GPM = tuple(g for g in GPM_FIELDS if "nvlink" in g.name)
COUNTED = ("crc_flit", "crc_data", "replay", "recovery")  # what `nvidia-smi nvlink -e` may print
TOLERANCE = 0.05

# ---- the peer-copy workload (a child process, so the sampling process stays undisturbed) ----------------------
WORKER = r"""
import os, sys, time
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
import torch
src, dst, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
print("peer access", src, "->", dst, torch.cuda.can_device_access_peer(src, dst), flush=True)
a = torch.empty(1 << 30, dtype=torch.uint8, device=f"cuda:{src}")
b = torch.empty(1 << 30, dtype=torch.uint8, device=f"cuda:{dst}")
end = time.time() + seconds
while time.time() < end:
    for _ in range(8):
        b.copy_(a, non_blocking=True)
    torch.cuda.synchronize(src)
    torch.cuda.synchronize(dst)
"""


# ---- nvidia-smi nvlink ---------------------------------------------------------------------------------------
class Smi:
    """`nvidia-smi nvlink` per GPU, every answer kept under ``raw_dir``."""

    def __init__(self, path: str, raw_dir: Path) -> None:
        self.path, self.raw_dir = path, raw_dir
        raw_dir.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def text(self, flag: list[str], index: int) -> str:
        r = subprocess.run(
            [self.path, "nvlink", *flag, "-i", str(index)], capture_output=True, text=True, timeout=60
        )
        self.n += 1
        name = f"{self.n:02d}-gpu{index}-{'_'.join(f.strip('-') for f in flag)}.txt"
        (self.raw_dir / name).write_text(r.stdout + r.stderr)
        return r.stdout

    def errors(self, index: int) -> dict[str, dict[int, float]]:
        """-e: {our type: {link: count}}; counter names mapped by their words (CRC, data, replay, recovery)."""
        out: dict[str, dict[int, float]] = {}
        for link, name, value in _link_lines(self.text(["-e"], index)):
            kind = _kind(name)
            if kind is not None:
                out.setdefault(kind, {})[link] = out.get(kind, {}).get(link, 0.0) + value
        return out

    def ecc_lanes(self, index: int) -> dict[int, float]:
        """-ec: {link: per-lane ECC corrections summed over its lanes}."""
        out: dict[int, float] = {}
        for line in self.text(["-ec"], index).splitlines():
            m = re.search(r"Link\s+(\d+)\b.*?Lane\s+\d+\D*?(\d+)\s*$", line)
            if m:
                out[int(m.group(1))] = out.get(int(m.group(1)), 0.0) + float(m.group(2))
        return out

    def status(self, index: int) -> tuple[int, int]:
        """-s: (links listed, links active)."""
        listed = active = 0
        for line in self.text(["-s"], index).splitlines():
            if re.search(r"Link\s+\d+\s*:", line):
                listed += 1
                active += "inactive" not in line.lower() and bool(re.search(r"\d", line.split(":", 1)[1]))
        return listed, active

    def throughput(self, index: int) -> dict[str, float]:
        """-gt d: bytes over all links, {"tx": …, "rx": …}."""
        out = {"tx": 0.0, "rx": 0.0}
        units = {"kib": 1024.0, "mib": 1024.0**2, "gib": 1024.0**3, "b": 1.0}
        for line in self.text(["-gt", "d"], index).splitlines():
            m = re.search(r"Link\s+\d+\s*:.*?\b(Tx|Rx)\b\s*:?\s*([\d.]+)\s*([KMG]?i?B)?", line, re.IGNORECASE)
            if m:
                unit = units.get((m.group(3) or "KiB").lower(), 1024.0)
                out[m.group(1).lower()] += float(m.group(2)) * unit
        return out


def _link_lines(text: str) -> list[tuple[int, str, float]]:
    out = []
    for line in text.splitlines():
        m = re.search(r"Link\s+(\d+)\s*:\s*(.+?)\s*:\s*(\d+)\s*$", line)
        if m:
            out.append((int(m.group(1)), m.group(2), float(m.group(3))))
    return out


def _kind(name: str) -> str | None:
    n = name.lower()
    if "replay" in n:
        return "replay"
    if "recovery" in n:
        return "recovery"
    if "crc" in n:
        return "crc_data" if "data" in n else "crc_flit"
    if "ecc" in n:
        return "ecc_data"
    return None


# ---- what NVML answers ---------------------------------------------------------------------------------------
def answers(nvml: Nvml, handle: Any) -> list[dict]:
    """Every read of the NVLink rows, grouped by what it is: which links (or ids) answer, and which not."""
    reads = {r for f in NVLINK_ROWS for r in f.sources()}
    fvs = sorted((r.id, r.scope) for r in reads if isinstance(r, FieldValue))
    values, cannot = nvml.probe_fields(handle, fvs)
    groups: dict[str, dict[str, list]] = {}

    def put(group: str, item: Any, value: float | None, unsupported: bool) -> None:
        g = groups.setdefault(group, {"answer": [], "not supported": [], "failed": [], "values": []})
        state = "answer" if value is not None else "not supported" if unsupported else "failed"
        g[state].append(item)
        if value is not None:
            g["values"].append(value)

    for fid, scope in fvs:
        v = values.get((fid, scope))
        if fid in F.NVLINK_DL_FIELDS.values():
            put(f"field {fid} (DL {_dl_name(fid)}), scopeId = link", scope, v, (fid, scope) in cannot)
        elif any(fid in ids for ids in F.NVLINK_LEGACY_LINK_FIELDS.values()):
            kind = next(k for k, ids in F.NVLINK_LEGACY_LINK_FIELDS.items() if fid in ids)
            put(f"per-link field ids, {kind}", fid, v, (fid, scope) in cannot)
        else:
            put(
                f"field {fid}{' (all links)' if scope == F.SCOPE_ALL_LINKS else ''}",
                fid,
                v,
                (fid, scope) in cannot,
            )
    for r in sorted((r for r in reads if isinstance(r, Call)), key=lambda c: (c.fn, c.args)):
        answer, unsupported = nvml.probe(r.fn, handle, *r.args)
        if r.fn == "nvmlDeviceGetNvLinkErrorCounter":
            counter = {v: k for k, v in F.NVLINK_ERROR_COUNTERS.items()}[r.args[1]]
            put(f"{r.fn}(link, {counter})", r.args[0], answer, unsupported)
        else:
            put(f"{r.fn}(link)", r.args[0], answer, unsupported)
    return [
        {
            "read": name,
            "answers": g["answer"],
            "not_supported": g["not supported"],
            "failed": g["failed"],
            "sum": sum(g["values"]) if g["values"] else None,
        }
        for name, g in groups.items()
    ]


def _where(src: F.Source) -> str:
    if isinstance(src, FieldValue):
        dl = src.id in F.NVLINK_DL_FIELDS.values()
        return f"field {src.id} (DL {_dl_name(src.id)}, scopeId = link)" if dl else "per-link field ids"
    if isinstance(src, Call):
        return f"{src.fn}(link, …)"
    return src.describe()


def _dl_name(fid: int) -> str:
    return {F.FI_NVLINK_ERROR_DL_CRC: "CRC", F.FI_NVLINK_ERROR_DL_REPLAY: "replay"}.get(fid, "recovery")


def chosen(learned: Learned) -> dict[str, str]:
    """Per error type, where the table's per-GPU counter reads it on this GPU (after a read)."""
    row = next(f for f in NVLINK_ROWS if f.name == "gpufleet_gpu_nvlink_errors_total")
    out = {}
    for (kind,), src in row.read.items():
        assert isinstance(src, F.FirstOf)
        i = learned.chosen.get(src)
        if i is None:
            out[kind] = "nothing answers"
        elif i == 0:
            out[kind] = f"per-GPU total, {src.options[0].describe()}"
        else:
            links = src.options[1]
            assert isinstance(links, F.SumOf)
            picks = {
                _where(part.options[learned.chosen[part]])
                for part in links.parts
                if isinstance(part, F.FirstOf) and part in learned.chosen
            }
            n = sum(1 for part in links.parts if isinstance(part, F.FirstOf) and part in learned.chosen)
            out[kind] = f"sum over {n} links of {' / '.join(sorted(picks))}"
    return out


# ---- the agent's series ----------------------------------------------------------------------------------------
def by_gpu(fams, name: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in fams:
        if f.name == name:
            for labels, v in f.samples:
                if all(labels.get(k) == val for k, val in match.items()):
                    out[labels["gpu"]] = out.get(labels["gpu"], 0.0) + v
    return out


def series_of(fams, name: str, gpu: str) -> int:
    return sum(1 for f in fams if f.name == name for labels, _ in f.samples if labels["gpu"] == gpu)


def per_link(fams, name: str, gpu: str, kind: str) -> dict[int, float]:
    return {
        int(labels["link"]): v
        for f in fams
        if f.name == name
        for labels, v in f.samples
        if labels["gpu"] == gpu and labels.get("type") == kind
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="0,1", help="NVML indices: the copy goes from the first to the second")
    ap.add_argument("--seconds", type=float, default=14.0, help="length of the peer-copy window")
    ap.add_argument("--simulate", action="store_true", help="dry run on two simulated GPUs (no nvidia-smi)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    a, b = (int(x) for x in args.gpus.split(","))
    lib = None
    smi = None
    if args.simulate:
        from gpufleet.agent.simulator import SimulatedNVML

        lib = SimulatedNVML(max(a, b) + 1, seed=1, workload="busy")
    else:
        path = shutil.which("nvidia-smi")
        if path is None:
            sys.exit("nvidia-smi is not on PATH; run on the GPU machine, or pass --simulate for a dry run")
        smi = Smi(path, out / "nvlink_smi")
    nvml = Nvml(lib)
    src = GpuSource(
        nvml, "verify", watch_events=False, background=False, slow_interval=0.0, nvlink_per_link=True
    )
    src.start()
    gpus: list[Gpu] = [g for g in src.gpus if g.index in (a, b)]
    result: dict[str, Any] = {
        "driver": src.driver,
        "gpus": [{"index": g.index, "uuid": g.uuid, "model": g.model} for g in gpus],
        "simulated": args.simulate,
    }

    # 1. what NVML answers, and what the table settled on
    result["answers"] = {str(g.index): answers(nvml, g.handle) for g in gpus}
    timing: dict[str, list[float]] = {"first": [], "later": []}
    result["chosen"] = {}
    for g in gpus:
        learned = Learned()
        for i in range(6):
            t0 = time.perf_counter()
            read_rows(nvml, g.handle, NVLINK_ROWS, learned)
            timing["first" if i == 0 else "later"].append(time.perf_counter() - t0)
        result["chosen"][str(g.index)] = chosen(learned)
    slow = []
    for _ in range(5):
        t0 = time.perf_counter()
        src.refresh_slow()
        slow.append(time.perf_counter() - t0)
    result["cost_ms"] = {
        "nvlink_rows_first_read_per_gpu": round(statistics.mean(timing["first"]) * 1e3, 3),
        "nvlink_rows_later_read_per_gpu": round(statistics.median(timing["later"]) * 1e3, 3),
        "slow_rows_all_gpus": round(statistics.median(slow) * 1e3, 3),
    }

    # 2-4. the agent's series and nvidia-smi, back to back (GPM rates need a sample before)
    src.collect()
    time.sleep(1.0)
    fams = src.collect()
    smi_e = {g.index: smi.errors(g.index) for g in gpus} if smi else {}
    smi_ec = {g.index: smi.ecc_lanes(g.index) for g in gpus} if smi else {}
    smi_s = {g.index: smi.status(g.index) for g in gpus} if smi else {}
    result["present"] = {
        name: {str(g.index): series_of(fams, name, str(g.index)) for g in gpus}
        for name in [f.name for f in NVLINK_ROWS] + [g.name for g in NVLINK_GPM]
    }
    errors = []
    for g in gpus:
        gi = str(g.index)
        for kind in F.NVLINK_TYPES:
            ours = by_gpu(fams, "gpufleet_gpu_nvlink_errors_total", type=kind).get(gi)
            ours_links = per_link(fams, "gpufleet_gpu_nvlink_link_errors_total", gi, kind)
            if kind == "ecc_data":
                theirs_links = smi_ec.get(g.index)
                source = "nvidia-smi nvlink -ec (lanes summed)"
            else:
                theirs_links = smi_e.get(g.index, {}).get(kind)
                source = "nvidia-smi nvlink -e"
            theirs = sum(theirs_links.values()) if theirs_links else None
            if smi is None:
                verdict = "no nvidia-smi (simulated)"
            elif ours is None and theirs is None:
                verdict = "neither reads it"
            elif ours is None:
                verdict = "nvidia-smi reads it, the agent does not"
            elif theirs is None:
                verdict = "agent only"
            else:
                verdict = "equal" if ours == theirs else "DIFFERS"
            same_links = (
                sum(1 for link, v in theirs_links.items() if ours_links.get(link) == v)
                if theirs_links
                else None
            )
            errors.append(
                {
                    "gpu": gi,
                    "type": kind,
                    "agent": ours,
                    "nvidia_smi": theirs,
                    "compared_with": source,
                    "links_equal": same_links,
                    "links_nvidia_smi": len(theirs_links) if theirs_links else None,
                    "verdict": verdict,
                }
            )
    result["errors"] = errors
    links = []
    for g in gpus:
        gi = str(g.index)
        has = by_gpu(fams, "gpufleet_gpu_nvlink_links").get(gi)
        up = by_gpu(fams, "gpufleet_gpu_nvlink_links_up").get(gi)
        listed, active = smi_s.get(g.index, (None, None))
        ok = smi is not None and has == listed and up == active
        links.append(
            {
                "gpu": gi,
                "links": has,
                "links_up": up,
                "smi_listed": listed,
                "smi_active": active,
                "verdict": ("equal" if ok else "DIFFERS") if smi else "no nvidia-smi (simulated)",
            }
        )
    result["links"] = links

    # 5. peer copies: the agent's rates against nvidia-smi's counter deltas over the same window
    if smi is not None:
        result["copy"] = peer_copy(src, smi, gpus, a, b, args.seconds)
    src.close()

    (out / "nvlink_verify.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result, args)
    (out / "nvlink_verify.md").write_text(md + "\n")
    print(md)


def peer_copy(src: GpuSource, smi: Smi, gpus: list[Gpu], a: int, b: int, seconds: float) -> dict:
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    warmup = 5.0
    child = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(a), str(b), str(seconds + warmup + 10)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(warmup)
        smi_t0 = time.monotonic()
        smi0 = {g.index: smi.throughput(g.index) for g in gpus}
        smi_t0 = (smi_t0 + time.monotonic()) / 2
        fams0, t0 = src.collect(), time.monotonic()
        gpm: dict[str, dict[str, list[float]]] = {str(g.index): {"tx": [], "rx": []} for g in gpus}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            fams = src.collect()
            for g in gpus:
                for d, name in (
                    ("tx", "gpufleet_gpu_nvlink_transmit_bytes_per_second"),
                    ("rx", "gpufleet_gpu_nvlink_receive_bytes_per_second"),
                ):
                    v = by_gpu(fams, name).get(str(g.index))
                    if v is not None:
                        gpm[str(g.index)][d].append(v)
        fams1, t1 = src.collect(), time.monotonic()
        smi_t1 = time.monotonic()
        smi1 = {g.index: smi.throughput(g.index) for g in gpus}
        smi_t1 = (smi_t1 + time.monotonic()) / 2
    finally:
        child.terminate()
        peer_line = child.stdout.readline().strip() if child.stdout else ""
        child.wait(timeout=60)
    rows = []
    for g in gpus:
        gi = str(g.index)
        for d, counter in (
            ("tx", "gpufleet_gpu_nvlink_transmit_bytes_total"),
            ("rx", "gpufleet_gpu_nvlink_receive_bytes_total"),
        ):
            theirs = (smi1[g.index][d] - smi0[g.index][d]) / (smi_t1 - smi_t0)
            before, after = by_gpu(fams0, counter).get(gi), by_gpu(fams1, counter).get(gi)
            ours = None if before is None or after is None else (after - before) / (t1 - t0)
            rate = statistics.mean(gpm[gi][d]) if gpm[gi][d] else None
            rows.append(
                {
                    "gpu": gi,
                    "direction": d,
                    "nvidia_smi_GBps": round(theirs / 1e9, 2),
                    "agent_counter_GBps": None if ours is None else round(ours / 1e9, 2),
                    "agent_gpm_GBps": None if rate is None else round(rate / 1e9, 2),
                    "counter_within_5pct": _within(ours, theirs),
                    "gpm_within_5pct": _within(rate, theirs),
                }
            )
    return {"window_s": round(t1 - t0, 2), "peer_access": peer_line, "rates": rows}


def _within(ours: float | None, theirs: float) -> bool | None:
    if ours is None:
        return None
    if theirs < 1e9:  # an idle direction: compare in absolute terms (below 50 MB/s either way)
        return abs(ours - theirs) < 5e7
    return abs(ours - theirs) <= TOLERANCE * theirs


def render(r: dict, args: argparse.Namespace) -> str:
    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    gpus = ", ".join(f"GPU {g['index']}: {g['model']} ({g['uuid']})" for g in r["gpus"])
    md = [
        f"{gpus}; driver {r['driver']}" + (" (simulated: a dry run)" if r["simulated"] else ""),
        "",
        f"Command: `OUT=out python3 bench/nvlink_verify.py --gpus {args.gpus} --seconds {args.seconds:g}`",
        "",
        "What NVML answers (links or field ids that answer; those it says are not supported; failed reads):",
        "",
        "| GPU | read | answers | not supported | failed | sum of answers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for gi, rows in r["answers"].items():
        for x in rows:
            md.append(
                f"| {gi} | {x['read']} | {_ranges(x['answers'])} | {_ranges(x['not_supported'])} | "
                f"{_ranges(x['failed'])} | {cell(x['sum'])} |"
            )
    md += [
        "",
        "Where the agent reads each per-GPU error counter:",
        "",
        "| GPU | type | read from |",
        "| --- | --- | --- |",
    ]
    for gi, kinds in r["chosen"].items():
        md += [f"| {gi} | {k} | {v} |" for k, v in kinds.items()]
    md += ["", "| series | " + " | ".join(f"GPU {g['index']}" for g in r["gpus"]) + " |"]
    md.append("| --- |" + " --- |" * len(r["gpus"]))
    for name, counts in r["present"].items():
        md.append(f"| {name} | " + " | ".join(f"{counts[str(g['index'])]} series" for g in r["gpus"]) + " |")
    md += [
        "",
        "| GPU | type | agent | nvidia-smi | compared with | links equal | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["errors"]:
        eq = "—" if x["links_equal"] is None else f"{x['links_equal']}/{x['links_nvidia_smi']}"
        md.append(
            f"| {x['gpu']} | {x['type']} | {cell(x['agent'])} | {cell(x['nvidia_smi'])} | {x['compared_with']} | "
            f"{eq} | {x['verdict']} |"
        )
    md += [
        "",
        "| GPU | links (agent) | links up (agent) | `nvidia-smi nvlink -s` links | active | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["links"]:
        md.append(
            f"| {x['gpu']} | {cell(x['links'])} | {cell(x['links_up'])} | {cell(x['smi_listed'])} | "
            f"{cell(x['smi_active'])} | {x['verdict']} |"
        )
    if "copy" in r:
        c = r["copy"]
        md += [
            "",
            f"Peer copies GPU {args.gpus.split(',')[0]} → GPU {args.gpus.split(',')[1]} over {c['window_s']} s "
            f"({c['peer_access']}):",
            "",
            "| GPU | direction | nvidia-smi -gt d GB/s | agent counter GB/s | agent GPM GB/s | counter within 5 % | "
            "GPM within 5 % |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for x in c["rates"]:
            md.append(
                f"| {x['gpu']} | {x['direction']} | {x['nvidia_smi_GBps']} | {cell(x['agent_counter_GBps'])} | "
                f"{cell(x['agent_gpm_GBps'])} | {_yes(x['counter_within_5pct'])} | {_yes(x['gpm_within_5pct'])} |"
            )
    cost = r["cost_ms"]
    md += [
        "",
        f"Cost: the NVLink rows of one GPU read in {cost['nvlink_rows_first_read_per_gpu']} ms the first time "
        f"(every place asked), {cost['nvlink_rows_later_read_per_gpu']} ms once learned; all slow rows of "
        f"{len(r['gpus'])} GPUs: {cost['slow_rows_all_gpus']} ms (background, every 10 s).",
    ]
    return "\n".join(md)


def _yes(v: bool | None) -> str:
    return "—" if v is None else "yes" if v else "NO"


def _ranges(items: list) -> str:
    """0-17 for a run of integers."""
    if not items:
        return "—"
    items = sorted(items)
    out, start, prev = [], items[0], items[0]
    for x in items[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


if __name__ == "__main__":
    main()
