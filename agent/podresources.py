"""The kubelet pod-resources API v1 messages (``k8s.io/kubelet/pkg/apis/podresources/v1/api.proto``).

The message classes are built at import time from a descriptor that mirrors the upstream proto (package
``v1``; field numbers are the wire contract), so no generated ``_pb2`` module has to track the protobuf
runtime, as gpufleet/core/remote_write.py does for remote-write. Only what the agent reads is spelled out;
fields added upstream later (``isolation`` = 6 on ContainerResources) are skipped by the parser as
unknown fields, which proto3 allows.

The service is ``v1.PodResourcesLister``; the agent calls ``List``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"
DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


def _build() -> dict[str, Any]:  # generated message classes: their fields exist only at run time
    fdp = descriptor_pb2.FileDescriptorProto(
        name="gpufleet/podresources_v1.proto", package="v1", syntax="proto3"
    )
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    S, I64, U64, M = F.TYPE_STRING, F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_MESSAGE

    def msg(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label, json_name=fname)
            if type_name:
                f.type_name = ".v1." + type_name

    msg("ListPodResourcesRequest")
    msg("ListPodResourcesResponse", ("pod_resources", 1, M, rep, "PodResources"))
    msg(
        "PodResources",
        ("name", 1, S, opt, ""),
        ("namespace", 2, S, opt, ""),
        ("containers", 3, M, rep, "ContainerResources"),
        ("cpu_ids", 4, I64, rep, ""),
        ("memory", 5, M, rep, "ContainerMemory"),
    )
    msg(
        "ContainerResources",
        ("name", 1, S, opt, ""),
        ("devices", 2, M, rep, "ContainerDevices"),
        ("cpu_ids", 3, I64, rep, ""),
        ("memory", 4, M, rep, "ContainerMemory"),
        ("dynamic_resources", 5, M, rep, "DynamicResource"),
    )
    msg(
        "ContainerMemory",
        ("memory_type", 1, S, opt, ""),
        ("size", 2, U64, opt, ""),
        ("topology", 3, M, opt, "TopologyInfo"),
    )
    msg(
        "ContainerDevices",
        ("resource_name", 1, S, opt, ""),
        ("device_ids", 2, S, rep, ""),
        ("topology", 3, M, opt, "TopologyInfo"),
    )
    msg("TopologyInfo", ("nodes", 1, M, rep, "NUMANode"))
    msg("NUMANode", ("ID", 1, I64, opt, ""))
    msg(
        "DynamicResource",
        ("claim_name", 2, S, opt, ""),
        ("claim_namespace", 3, S, opt, ""),
        ("claim_resources", 4, M, rep, "ClaimResource"),
    )
    msg(
        "ClaimResource",
        ("cdi_devices", 1, M, rep, "CDIDevice"),
        ("driver_name", 2, S, opt, ""),
        ("pool_name", 3, S, opt, ""),
        ("device_name", 4, S, opt, ""),
    )
    msg("CDIDevice", ("name", 1, S, opt, ""))
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(fd.message_types_by_name[name])
        for name in fd.message_types_by_name
    }


_MESSAGES: dict[str, Any] = _build()
ListPodResourcesRequest = _MESSAGES["ListPodResourcesRequest"]
ListPodResourcesResponse = _MESSAGES["ListPodResourcesResponse"]
PodResources = _MESSAGES["PodResources"]
ContainerResources = _MESSAGES["ContainerResources"]
ContainerDevices = _MESSAGES["ContainerDevices"]
