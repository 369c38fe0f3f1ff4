"""The agent's part of the metric catalogue: every series an agent can export, built from its producers.

GPU series come from the field table (``FIELDS``, ``GPM_FIELDS`` and their MIG twins) and the GPU source's
few other series; every other producer declares its series next to the code that emits them (``METRICS``
of the host and inference sources and of the components with their own metrics). Tests run each producer
and compare what it emits with its entries, so rules, dashboards and reports checked against this
catalogue read what agents really write. The collector's own metrics are in
``gpufleet.collector.own_metrics``; the CLI and the contract test join the two.
"""

from __future__ import annotations

from gpufleet.agent import attribution, core, nvml, sinks, spool
from gpufleet.agent.dcgm_names import CLOCK_REASONS_NAME, MAPPING, XID_NAME
from gpufleet.agent.fields import (
    FIELDS,
    GPM_FIELDS,
    INFO,
    MIG_FIELDS,
    MIG_INFO,
    MIG_LABELS,
    PROCESS_MEMORY,
    PROCESS_SM,
    UP,
    XID,
    mig_name,
)
from gpufleet.agent.sources import host, inference
from gpufleet.core.metricspec import MetricSpec

# Labels of every GPU series; the enrich stage adds who holds the GPU on Kubernetes, and the job it serves
# (from the pod's labels or owner, or on Slurm from the cgroup of the GPU's processes).
GPU_LABELS = ("cluster", "node", "gpu", "uuid", "model")
HOLDER_LABELS = ("pod", "namespace", "container", "job")
PROCESS_LABELS = ("pid", "command", "container_id", "pod_uid", "mig_uuid", "gpu_instance")
SIMULATOR = "gpu source"


def _twins(name: str) -> tuple[str, ...]:
    special = {"gpufleet_gpu_clock_event_active": CLOCK_REASONS_NAME, XID[0]: XID_NAME}
    if name in special:
        return (special[name],)
    twin = MAPPING.get(name)
    if twin is None:
        return ()
    return tuple(twin.dcgm.values()) if isinstance(twin.dcgm, dict) else (twin.dcgm,)


def _partial(name: str) -> bool:
    """True when dcgm-exporter has a field for some label values of the series only (see to_dcgm)."""
    twin = MAPPING.get(name)
    return twin is not None and isinstance(twin.dcgm, dict)


def _gpu() -> list[MetricSpec]:
    base = (*GPU_LABELS, *HOLDER_LABELS)
    mig = (*GPU_LABELS, *MIG_LABELS, *HOLDER_LABELS)
    out = [
        MetricSpec(
            f.name, f.kind, f.unit, f.help, (*base, *f.labels), f.when, _twins(f.name), _partial(f.name)
        )
        for f in FIELDS
    ]
    out += [
        MetricSpec(
            g.name, "gauge", g.unit, g.help, base, "on GPUs with GPM (Hopper and newer)", _twins(g.name)
        )
        for g in GPM_FIELDS
    ]
    out += [
        MetricSpec(UP[0], "gauge", "", UP[1], base),
        MetricSpec(INFO[0], "gauge", "", INFO[1], (*base, "driver", "serial", "pci_bus_id", "mig_mode")),
        MetricSpec(
            # dcgm-exporter keeps only the last XID as a gauge: the per-code counter stays beside it
            XID[0],
            "counter",
            "",
            XID[1],
            (*base, "xid"),
            "after an event: an XID",
            _twins(XID[0]),
            True,
        ),
        MetricSpec(MIG_INFO[0], "gauge", "", MIG_INFO[1], mig, "on GPUs in MIG mode"),
        MetricSpec(
            PROCESS_MEMORY[0],
            "gauge",
            "bytes",
            PROCESS_MEMORY[1],
            (*base, *PROCESS_LABELS),
            "opt-in: --process-metrics",
        ),
        MetricSpec(
            PROCESS_SM[0],
            "gauge",
            "ratio",
            PROCESS_SM[1],
            (*base, *PROCESS_LABELS),
            "opt-in: --process-metrics",
        ),
    ]
    out += [
        MetricSpec(
            mig_name(f.name),
            f.kind,
            f.unit,
            f.help,
            (*mig, *f.labels),
            "on GPUs in MIG mode",
            _twins(mig_name(f.name)),
            _partial(mig_name(f.name)),
        )
        for f in MIG_FIELDS
    ]
    out += [
        MetricSpec(
            mig_name(g.name),
            "gauge",
            g.unit,
            g.help,
            mig,
            "on GPUs in MIG mode with GPM",
            _twins(mig_name(g.name)),
        )
        for g in GPM_FIELDS
    ]
    return out


# Producer -> its series, in the order docs/metrics.md lists them.
SECTIONS: dict[str, tuple[MetricSpec, ...]] = {
    "GPU source": tuple(_gpu()),
    "host source": host.METRICS,
    "inference source (readers, probes, client receiver)": inference.METRICS,
    "agent: per-source success and duration": core.METRICS,
    "agent: pusher": sinks.METRICS,
    "agent: spool": spool.METRICS,
    "agent: pod attribution": attribution.METRICS,
    "agent: job attribution (kubelet /pods)": attribution.KUBELET_PODS_METRICS,
    "agent: NVML gateway": nvml.METRICS,
}

AGENT_METRICS: tuple[MetricSpec, ...] = tuple(m for specs in SECTIONS.values() for m in specs)


def by_name() -> dict[str, MetricSpec]:
    return {m.name: m for m in AGENT_METRICS}


def dcgm_names() -> dict[str, MetricSpec]:
    """dcgm-mode name -> the gpufleet entry it renames (series without a twin keep their gpufleet name)."""
    return {twin: m for m in AGENT_METRICS for twin in m.dcgm}
