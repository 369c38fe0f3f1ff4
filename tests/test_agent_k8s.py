"""Pod attribution against a real gRPC server speaking the kubelet pod-resources v1 API on a unix socket.

The server's messages come from protoc (grpc_tools) compiling tests/kubelet/api.proto, not from the
agent's own descriptors, so a wrong field number on either side shows up as missing labels.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_tools import protoc

from gpufleet.agent.attribution import DeviceLabels, PodAttribution
from gpufleet.agent.core import Agent
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource

PROTO_DIR = Path(__file__).parent / "kubelet"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    out = tmp_path_factory.mktemp("podresources_pb2")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", str(PROTO_DIR / "api.proto")])
    assert rc == 0
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("api_pb2")
    finally:
        sys.path.remove(str(out))


class Kubelet:
    """A pod-resources server on a unix socket; ``pods`` is what List answers."""

    def __init__(self, api, socket_path: str) -> None:
        self.api = api
        self.pods: list = []
        self.requests = 0
        self.socket_path = socket_path
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "v1.PodResourcesLister",
            {
                "List": grpc.unary_unary_rpc_method_handler(
                    self._list,
                    request_deserializer=api.ListPodResourcesRequest.FromString,
                    response_serializer=api.ListPodResourcesResponse.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        assert self.server.add_insecure_port(f"unix://{socket_path}") == 1

    def _list(self, request, context):
        self.requests += 1
        return self.api.ListPodResourcesResponse(pod_resources=self.pods)

    def pod(self, name, namespace, containers):
        api = self.api
        return api.PodResources(
            name=name,
            namespace=namespace,
            containers=[
                api.ContainerResources(
                    name=c,
                    cpu_ids=[2, 3],
                    devices=[
                        api.ContainerDevices(
                            resource_name=res,
                            device_ids=ids,
                            topology=api.TopologyInfo(nodes=[api.NUMANode(ID=0)]),
                        )
                        for res, ids in devices
                    ],
                    isolation={"cpu": api.ISOLATION_CONTAINER},
                )
                for c, devices in containers.items()
            ],
        )

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(None)


@pytest.fixture
def socket_path():
    # unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="kl") as d:
        yield str(Path(d) / "kubelet.sock")


def attributed(src, attribution):
    """The GPU source in the agent's pipeline, with the kubelet's labels added by the enrich stage."""
    return Agent([src], node="n", enrichers=[DeviceLabels(attribution)])


def labels_by_gpu(agent):
    up = next(f for f in agent.sample().families if f.name == "gpufleet_gpu_up")
    return {
        lab["gpu"]: {k: lab.get(k) for k in ("pod", "namespace", "container") if k in lab}
        for lab, _ in up.samples
    }


def test_each_gpu_is_labelled_with_the_pod_and_container_the_kubelet_gave_it(api, socket_path):
    sim = SimulatedNVML(4, seed=11)
    uuids = [g["uuid"] for g in sim.describe()]
    with Kubelet(api, socket_path) as kubelet:
        kubelet.pods = [
            kubelet.pod(
                "trainer-0",
                "ml",
                {"main": [("nvidia.com/gpu", [uuids[0], uuids[1]]), ("example.com/nic", ["eth9"])]},
            ),
            # time-sliced GPU 2, shared by two pods: both are named
            kubelet.pod("infer-b", "serving", {"server": [("nvidia.com/gpu", [uuids[2] + "::1"])]}),
            kubelet.pod("infer-a", "serving", {"server": [("nvidia.com/gpu", [uuids[2] + "::0"])]}),
            kubelet.pod("web", "default", {"nginx": [("example.com/nic", [uuids[3]])]}),  # not a GPU resource
        ]
        attribution = PodAttribution(socket_path)
        src = GpuSource(Nvml(sim), "n", watch_events=False, background=False)
        src.start()
        got = labels_by_gpu(attributed(src, attribution))
        attribution.close()
    assert got["0"] == got["1"] == {"pod": "trainer-0", "namespace": "ml", "container": "main"}
    assert got["2"] == {"pod": "infer-a,infer-b", "namespace": "serving", "container": "server,server"}
    assert got["3"] == {}
    assert kubelet.requests == 1  # one List for all GPUs of the sample, not one per GPU


def test_mig_instances_are_labelled_with_the_pod_holding_them(api, socket_path):
    sim = SimulatedNVML(1, seed=2, mig={0: ["3g.40gb", "3g.40gb"]})
    migs = sim.describe()[0]["mig"]
    with Kubelet(api, socket_path) as kubelet:
        kubelet.pods = [
            kubelet.pod("small-job", "research", {"c": [("nvidia.com/mig-3g.40gb", [migs[1]["uuid"]])]})
        ]
        attribution = PodAttribution(socket_path)
        src = GpuSource(Nvml(sim), "n", watch_events=False, background=False)
        src.start()
        info = [
            lab
            for f in attributed(src, attribution).sample().families
            if f.name == "gpufleet_mig_info"
            for lab, _ in f.samples
        ]
        attribution.close()
    by_mig = {lab["mig_uuid"]: lab.get("pod") for lab in info}
    assert by_mig == {migs[0]["uuid"]: None, migs[1]["uuid"]: "small-job"}


def test_a_kubelet_that_is_down_costs_the_labels_not_the_sample_and_they_return_with_it(
    api, socket_path, caplog
):
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(1, seed=3)
    uuid = sim.describe()[0]["uuid"]
    attribution = PodAttribution(socket_path, refresh=10.0, timeout=0.5, clock=lambda: clock.t)
    src = GpuSource(Nvml(sim), "n", watch_events=False, background=False)
    src.start()
    agent = attributed(src, attribution)
    assert labels_by_gpu(agent) == {"0": {}}
    assert attribution.failures == 1 and "pod-resources" in caplog.text and socket_path in caplog.text
    with Kubelet(api, socket_path) as kubelet:
        kubelet.pods = [kubelet.pod("p", "ns", {"c": [("nvidia.com/gpu", [uuid])]})]
        clock.t += 1
        assert labels_by_gpu(agent) == {"0": {}}  # not asked again before the refresh interval
        clock.t += 10
        assert labels_by_gpu(agent) == {"0": {"pod": "p", "namespace": "ns", "container": "c"}}
        kubelet.pods = []
        clock.t += 10
        assert labels_by_gpu(agent) == {"0": {}}  # the pod ended
    attribution.close()


def test_an_inference_pod_is_mapped_to_the_gpus_the_kubelet_gave_it(api, socket_path):
    """Discovered inference servers carry the GPUs of their pod, so latency and GPU series can be joined."""
    sim = SimulatedNVML(3, seed=12)
    uuids = [g["uuid"] for g in sim.describe()]
    with Kubelet(api, socket_path) as kubelet:
        kubelet.pods = [
            kubelet.pod("llama-0", "serving", {"vllm": [("nvidia.com/gpu", [uuids[2], uuids[0]])]}),
            kubelet.pod("llama-0", "other-team", {"vllm": [("nvidia.com/gpu", [uuids[1]])]}),
        ]
        attribution = PodAttribution(socket_path)
        try:
            assert attribution.gpus_of("serving", "llama-0") == sorted([uuids[0], uuids[2]])
            assert attribution.gpus_of("other-team", "llama-0") == [uuids[1]]
            assert attribution.gpus_of("serving", "absent") == []
        finally:
            attribution.close()
