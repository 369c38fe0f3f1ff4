"""A model server that appears on the node as an annotated pod is scraped without touching the agent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpufleet.agent.inference.config import InferenceSettings, Kubernetes
from gpufleet.agent.inference.discovery import KubeletPodLister, endpoints_from_pods
from gpufleet.agent.sources.inference import InferenceSource
from tests.inference_servers import MetricsServer, VllmMetrics


def pod(
    name: str, port: int | str | None, *, ip: str = "127.0.0.1", phase: str = "Running", **ann: str
) -> dict:
    annotations = {"gpufleet.io/scrape": "true", **{f"gpufleet.io/{k}": v for k, v in ann.items()}}
    if port is not None:
        annotations["gpufleet.io/port"] = str(port)
    return {
        "metadata": {"name": name, "namespace": "serving", "annotations": annotations},
        "spec": {"containers": [{"name": "vllm", "ports": [{"containerPort": 8000}]}]},
        "status": {"phase": phase, "podIP": ip},
    }


class Kubelet:
    """The kubelet's /pods on a local port: a PodList, and the Authorization header of each request."""

    def __init__(self) -> None:
        self.pods: list[dict] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.auth.append(self.headers.get("Authorization"))
                if self.path != "/pods":
                    self.send_error(404)
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "items": outer.pods}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def kubelet():
    k = Kubelet()
    yield k
    k.close()


def test_an_annotated_pod_is_scraped_and_labelled_with_its_pod_and_gpus(kubelet, tmp_path):
    vllm = VllmMetrics("llama")
    server = MetricsServer(vllm.render)
    token = tmp_path / "token"
    token.write_text("service-account-token\n")
    now = [0.0]
    kube = Kubernetes(kubelet=kubelet.url, token_file=str(token), refresh=30.0)
    src = InferenceSource(
        InferenceSettings(kubernetes=kube, interval=10.0),
        "node-a7",
        clock=lambda: now[0],
        gpus_for_pod=lambda ns, name: ["GPU-1111"] if name == "llama-0" else [],
        gpu_lookup=lambda: [("0", "GPU-0000"), ("3", "GPU-1111")],
    )
    try:
        fams = src.collect()
        assert not any(f.name == "gpufleet_inference_up" for f in fams)  # nothing annotated yet
        kubelet.pods = [
            pod("llama-0", server.port, path="/metrics", server="vllm"),
            pod("not-annotated", 1, ip="127.0.0.1") | {"metadata": {"name": "x", "namespace": "y"}},
        ]
        now[0] += 30
        src.collect()
        vllm.request(1.0, ttft=0.1, itl=[0.02], queue=0.0, prompt_tokens=5)
        now[0] += 10
        fams = src.collect()
        up = {
            lab["endpoint"]: (lab, v)
            for f in fams
            if f.name == "gpufleet_inference_up"
            for lab, v in f.samples
        }
        assert list(up) == ["serving/llama-0"]
        labels, value = up["serving/llama-0"]
        assert value == 1.0
        assert (
            labels["pod"] == "llama-0" and labels["namespace"] == "serving" and labels["container"] == "vllm"
        )
        assert labels["gpus"] == "3"
        info = [lab for f in fams if f.name == "gpufleet_inference_gpu_info" for lab, _ in f.samples]
        assert [(i["gpu"], i["uuid"], i["model"]) for i in info] == [("3", "GPU-1111", "llama")]
        rps = [v for f in fams if f.name == "gpufleet_inference_requests_per_second" for _, v in f.samples]
        assert rps == [pytest.approx(0.1)]
        assert kubelet.auth[-1] == "Bearer service-account-token"
        # the pod goes away: so do its series
        kubelet.pods = []
        now[0] += 30
        fams = src.collect()
        assert not any(f.name == "gpufleet_inference_up" for f in fams)
    finally:
        server.close()
        src.close()


def test_pods_that_cannot_be_scraped_are_named_with_the_fix():
    found = endpoints_from_pods(
        [
            pod("bad-port", "http"),
            pod("pending", 8000, phase="Pending"),
            pod("bad-server", 8000, server="ollama"),
            {
                "metadata": {
                    "name": "no-port",
                    "namespace": "serving",
                    "annotations": {"gpufleet.io/scrape": "true"},
                },
                "spec": {"containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "10.0.0.9"},
            },
            pod("default-port", None, ip="10.0.0.7"),
        ]
    )
    assert [e.url for e in found.endpoints] == ["http://10.0.0.7:8000/metrics"]
    assert len(found.skipped) == 3
    assert any("bad-port" in s and "not a port number" in s for s in found.skipped)
    assert any("no-port" in s and 'gpufleet.io/port: "8000"' in s for s in found.skipped)
    assert any("ollama" in s for s in found.skipped)


def test_an_unreachable_kubelet_keeps_the_endpoints_already_known(kubelet):
    kubelet.pods = [pod("a", 9)]
    lister = KubeletPodLister(Kubernetes(kubelet=kubelet.url))
    assert len(lister()) == 1
    now = [0.0]
    src = InferenceSource(
        InferenceSettings(kubernetes=Kubernetes(kubelet=kubelet.url, refresh=1), interval=1),
        "n",
        pod_lister=lister,
        clock=lambda: now[0],
    )
    src.collect()
    assert [e.name for e in src.endpoints] == ["serving/a"]
    kubelet.close()
    now[0] += 5
    src.collect()
    assert [e.name for e in src.endpoints] == ["serving/a"]
    src.close()
