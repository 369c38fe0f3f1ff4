"""An agent on a Kubernetes node as `gpufleet agent` builds it: the kubelet's pod-resources API (gRPC on a unix
socket) says which GPUs each pod holds, the kubelet's /pods which pods serve models, and each model server
is labelled with its own pod's GPUs, even when a pod of the same name runs in another namespace."""

from __future__ import annotations

import re
import urllib.request

from gpufleet.agent.inference.config import InferenceSettings, Kubernetes
from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.agent.simulator import SimulatedNVML
from tests.conftest import free_port, wait_until
from tests.inference_servers import MetricsServer, VllmMetrics
from tests.test_agent_k8s import Kubelet as PodResources
from tests.test_agent_k8s import api, socket_path  # noqa: F401 - fixtures
from tests.test_inference_discovery import Kubelet as KubeletPods

SEED = 21


def serving_pod(name: str, namespace: str, port: int) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {
                "gpufleet.io/scrape": "true",
                "gpufleet.io/port": str(port),
                "gpufleet.io/server": "vllm",
            },
        },
        "spec": {"containers": [{"name": "vllm", "ports": [{"containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }


def inference_gpus(agent_url: str) -> dict[str, str]:
    """{endpoint: gpus label} of gpufleet_inference_up on the agent's /metrics."""
    with urllib.request.urlopen(agent_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("gpufleet_inference_up{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            out[labels["endpoint"]] = labels.get("gpus", "")
    return out


def test_two_pods_of_one_name_in_two_namespaces_each_get_only_their_own_gpus(api, socket_path):  # noqa: F811
    uuids = [g["uuid"] for g in SimulatedNVML(3, seed=SEED).describe()]
    servers = [MetricsServer(VllmMetrics(model).render) for model in ("llama", "mistral")]
    pods = KubeletPods()
    try:
        with PodResources(api, socket_path) as kubelet:
            kubelet.pods = [
                kubelet.pod("llama-0", "serving", {"vllm": [("nvidia.com/gpu", [uuids[0]])]}),
                # GPU 2 is time-sliced between other-team's llama-0 and serving's batch job: it is not
                # serving/llama-0's.
                kubelet.pod(
                    "llama-0", "other-team", {"vllm": [("nvidia.com/gpu", [uuids[1], uuids[2] + "::1"])]}
                ),
                kubelet.pod("batch", "serving", {"worker": [("nvidia.com/gpu", [uuids[2] + "::2"])]}),
            ]
            pods.pods = [
                serving_pod("llama-0", "serving", servers[0].port),
                serving_pod("llama-0", "other-team", servers[1].port),
            ]
            port = free_port()
            agent = start_agent(
                AgentSettings(
                    listen=f"127.0.0.1:{port}",
                    simulate=3,
                    seed=SEED,
                    node="gpu-node-1",
                    interval=0.2,
                    pod_resources_socket=socket_path,
                    inference=InferenceSettings(kubernetes=Kubernetes(kubelet=pods.url), interval=0.2),
                )
            )
            try:
                found = wait_until(
                    lambda: (lambda g: g if len(g) == 2 else None)(inference_gpus(f"http://127.0.0.1:{port}"))
                )
            finally:
                agent.stop()
        assert found == {"serving/llama-0": "0", "other-team/llama-0": "1,2"}
    finally:
        pods.close()
        for s in servers:
            s.close()
