"""Inference latency as the agent sees it, against the load generator's own measurement, with GPU activity.

A small PyTorch decoder (a few transformer layers) generates tokens on the GPU behind a stdlib HTTP server
with an OpenAI-style streaming ``/v1/completions`` and a Prometheus ``/metrics`` page (an end-to-end and a
time-to-first-token histogram). A load generator drives it at a few concurrency levels; for each level the
agent's inference source scrapes the page at the level's start and end (one interval = one level), its
probe streams a completion, and the GPU source samples SM activity every second.

Writes ``$OUT/inference_gpu.md`` and ``$OUT/inference_gpu.json``. Runs on CPU (no GPU source) when CUDA
is absent, for a quick check:

    OUT=out python3 bench/inference_gpu.py                 # GPU if present, about 3 minutes
    OUT=out python3 bench/inference_gpu.py --quick         # a short run (CPU check)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402

from gpufleet.agent.inference.config import Endpoint, InferenceSettings, Probe  # noqa: E402
from gpufleet.agent.inference.histogram import log_buckets  # noqa: E402
from gpufleet.agent.sources.inference import InferenceSource  # noqa: E402

BUCKETS = list(log_buckets(0.001, 1.15, 80))  # 1 ms .. ~70 s, 15% apart: the agent's error bound


class TinyDecoder(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, nhead=8, dim_feedforward=4 * dim, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        x = self.embed(tokens)
        return self.head(self.body(x, mask=mask.to(x.dtype))[:, -1])


class ModelServer:
    """Batches waiting requests (up to ``max_batch``) and decodes them together, one token per step."""

    def __init__(
        self, device: str, dim: int, layers: int, max_batch: int = 32, prompt_tokens: int = 16
    ) -> None:
        self.device = device
        self.model = TinyDecoder(4096, dim, layers).to(device).eval()
        if device == "cuda":
            self.model = self.model.half()
        self.max_batch = max_batch
        # Each decode step re-reads the whole sequence (no KV cache), so GPU work grows with batch and prompt.
        self.prompt_tokens = prompt_tokens
        self.pending: queue.Queue = queue.Queue()
        reg = self.registry = CollectorRegistry()
        self.e2e = Histogram(
            "bench_request_duration_seconds", "Request latency.", ["model"], buckets=BUCKETS, registry=reg
        )
        self.ttft = Histogram(
            "bench_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.errors = Counter("bench_request_errors", "Failed requests.", ["model"], registry=reg)
        self.errors.labels("tiny-decoder")
        threading.Thread(target=self._work, daemon=True).start()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body = generate_latest(outer.registry)
                elif self.path == "/v1/models":
                    body = json.dumps({"data": [{"id": "tiny-decoder"}]}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                t0 = time.perf_counter()
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tokens: queue.Queue = queue.Queue()
                outer.pending.put((int(req.get("max_tokens", 16)), tokens))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                first = True
                while (tok := tokens.get()) is not None:
                    if first:
                        outer.ttft.labels("tiny-decoder").observe(time.perf_counter() - t0)
                        first = False
                    chunk = {"choices": [{"index": 0, "text": f" t{tok}"}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                outer.e2e.labels("tiny-decoder").observe(time.perf_counter() - t0)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @torch.inference_mode()
    def _work(self) -> None:
        while True:
            batch = [self.pending.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            steps = max(n for n, _ in batch)
            seq = torch.randint(0, 4096, (len(batch), self.prompt_tokens), device=self.device)
            for step in range(steps):
                nxt = self.model(seq).argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
                values = nxt.squeeze(1).tolist()  # synchronizes: the token exists when it is sent
                for (n, out), v in zip(batch, values, strict=True):
                    if step < n:
                        out.put(v)
                    if step == n - 1:
                        out.put(None)


def client(base: str, max_tokens: int, stop: threading.Event, results: list, lock: threading.Lock) -> None:
    body = json.dumps(
        {"model": "tiny-decoder", "prompt": "hi", "max_tokens": max_tokens, "stream": True}
    ).encode()
    while not stop.is_set():
        t0 = time.perf_counter()
        ttft = None
        try:
            req = urllib.request.Request(
                base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                for line in resp:
                    if line.startswith(b"data:") and ttft is None and b"[DONE]" not in line:
                        ttft = time.perf_counter() - t0
        except OSError:
            continue
        with lock:
            results.append((time.perf_counter() - t0, ttft))


def q(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(math.ceil(p * len(s)) - 1, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,4,16,64", help="concurrent clients per level")
    ap.add_argument("--seconds", type=float, default=30.0, help="duration of each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="small model, short levels (a CPU check)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On a GPU the model is big enough (about 1.6 B parameters) that GPU work, not Python, bounds each step.
    dim, layers, prompt = (4096, 8, 128) if device == "cuda" else (128, 2, 16)
    if args.quick:
        args.seconds, args.levels, args.max_tokens, dim, layers = 6.0, "1,4", 8, 64, 1
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)

    server = ModelServer(device, dim, layers, prompt_tokens=prompt)
    gpu_source, gpu_label = None, "none (CPU run)"
    if device == "cuda":
        from gpufleet.agent.nvml import Nvml
        from gpufleet.agent.sources.gpu import GpuSource

        nvml = Nvml()
        gpu_source = GpuSource(nvml, "bench", watch_events=False)
        gpu_source.start()
        index = torch.cuda.current_device()
        gpu = gpu_source.gpus[index]
        gpu_label = f"{gpu.model} (GPU {gpu.index}, {gpu.uuid})"
    clock_now = [time.time()]
    settings = InferenceSettings(
        endpoints=[
            Endpoint(
                "tiny",
                server.base + "/metrics",
                server="generic",
                histogram="bench_request_duration_seconds",
                ttft_histogram="bench_time_to_first_token_seconds",
                model_label="model",
                errors_counter="bench_request_errors_total",
                gpus=(str(torch.cuda.current_device()),) if device == "cuda" else (),
            )
        ],
        probes=[
            Probe(
                "tiny-probe",
                server.base + "/v1/completions",
                kind="openai-completions",
                max_tokens=4,
                timeout=30,
            )
        ],
        interval=0.0,
    )
    source = InferenceSource(
        settings,
        "bench",
        clock=lambda: clock_now[0],
        gpu_lookup=(lambda: [(str(g.index), g.uuid) for g in gpu_source.gpus]) if gpu_source else None,
    )

    # warm up (CUDA kernels, allocator) before anything is measured
    warm_stop, warm = threading.Event(), []
    threading.Timer(3.0, warm_stop.set).start()
    client(server.base, args.max_tokens, warm_stop, warm, threading.Lock())

    rows = []
    for level in [int(x) for x in args.levels.split(",")]:
        clock_now[0] = time.time()
        source.collect()
        results: list = []
        lock, stop = threading.Lock(), threading.Event()
        threads = [
            threading.Thread(target=client, args=(server.base, args.max_tokens, stop, results, lock))
            for _ in range(level)
        ]
        for t in threads:
            t.start()
        sm, util = [], []
        t_end = time.monotonic() + args.seconds
        while time.monotonic() < t_end:
            time.sleep(1.0)
            if gpu_source is not None:
                for fam in gpu_source.collect():
                    for labels, v in fam.samples:
                        if labels.get("gpu") == str(torch.cuda.current_device()):
                            if fam.name == "gpufleet_gpu_sm_active_ratio":
                                sm.append(v)
                            elif fam.name == "gpufleet_gpu_utilization_ratio":
                                util.append(v)
        stop.set()
        for t in threads:
            t.join()
        clock_now[0] = time.time()
        fams = {f.name: f for f in source.collect()}
        probe = source.probes.run_once(settings.probes[0])

        def agent(name: str, quant: str, fams: dict = fams) -> float | None:
            f = fams.get(name)
            return next((v for lab, v in f.samples if lab.get("quantile") == quant), None) if f else None

        rps = fams.get("gpufleet_inference_requests_per_second")
        e2e = [r[0] for r in results]
        ttft = [r[1] for r in results if r[1] is not None]
        rows.append(
            {
                "clients": level,
                "requests": len(results),
                "loadgen_rps": len(results) / args.seconds,
                "agent_rps": rps.samples[0][1] if rps else None,
                "loadgen_p50": q(e2e, 0.5),
                "agent_p50": agent("gpufleet_inference_request_duration_seconds", "0.5"),
                "loadgen_p99": q(e2e, 0.99),
                "agent_p99": agent("gpufleet_inference_request_duration_seconds", "0.99"),
                "loadgen_ttft_p50": q(ttft, 0.5),
                "agent_ttft_p50": agent("gpufleet_inference_time_to_first_token_seconds", "0.5"),
                "probe_ok": probe.ok,
                "probe_ttft": probe.ttft,
                "probe_duration": probe.duration,
                "sm_active": statistics.mean(sm) if sm else None,
                "gpu_util": statistics.mean(util) if util else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v * 1000:.1f}"

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v * 100:.0f}%"

    lines = [
        f"Device: {device}, {gpu_label}; model: {layers}-layer decoder, width {dim}, {args.max_tokens} tokens a "
        f"request, batches up to {server.max_batch}; {args.seconds:.0f} s a level. Agent quantiles come from "
        "histogram deltas over the level (buckets 15% apart), load generator's from its own timings.",
        "",
        "| clients | requests/s (loadgen / agent) | p50 ms (loadgen / agent) | p99 ms (loadgen / agent) "
        "| TTFT p50 ms (loadgen / agent) | probe TTFT / total ms | SM active | GPU util |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['loadgen_rps']:.1f} / {r['agent_rps'] or 0:.1f} "
            f"| {ms(r['loadgen_p50'])} / {ms(r['agent_p50'])} | {ms(r['loadgen_p99'])} / {ms(r['agent_p99'])} "
            f"| {ms(r['loadgen_ttft_p50'])} / {ms(r['agent_ttft_p50'])} "
            f"| {ms(r['probe_ttft'])} / {ms(r['probe_duration'])} | {pct(r['sm_active'])} | {pct(r['gpu_util'])} |"
        )
    (out_dir / "inference_gpu.md").write_text("\n".join(lines) + "\n")
    (out_dir / "inference_gpu.json").write_text(
        json.dumps({"device": device, "gpu": gpu_label, "rows": rows}, indent=2)
    )
    print("\n".join(lines))
    source.close()
    if gpu_source is not None:
        gpu_source.close()


if __name__ == "__main__":
    main()
