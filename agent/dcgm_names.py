"""dcgm-exporter compatible names: the same samples under ``DCGM_FI_*`` names and dcgm-exporter's labels.

Teams can swap gpufleet in under dashboards and alert rules written for dcgm-exporter.
The mapping is the ``dcgm`` column of the field table (see docs/metrics.md).
"""

from __future__ import annotations

from agent.families import Family
from agent.fields import FIELDS, GPM_FIELDS

# Our name -> (dcgm-exporter name, factor from our unit to dcgm's)
MAPPING: dict[str, tuple[str, float]] = {f.name: (f.dcgm, f.dcgm_scale) for f in FIELDS if f.dcgm}
MAPPING.update({name: (dcgm, 1.0) for name, _, _, dcgm in GPM_FIELDS})

# dcgm-exporter's label names for the identity of a GPU.
_LABELS = {"gpu": "gpu", "uuid": "UUID", "model": "modelName", "node": "Hostname",
           "pod": "pod", "namespace": "namespace", "container": "container", "cluster": "cluster"}


def _labels(labels: dict[str, str]) -> dict[str, str]:
    out = {_LABELS[k]: v for k, v in labels.items() if k in _LABELS}
    if "gpu" in labels:
        out["device"] = f"nvidia{labels['gpu']}"
    if "pci_bus_id" in labels:
        out["pci_bus_id"] = labels["pci_bus_id"]
    return out


def to_dcgm(families: list[Family]) -> list[Family]:
    """Rename the families dcgm-exporter also has; keep the rest (they have no dcgm twin) unchanged."""
    out = []
    for fam in families:
        mapped = MAPPING.get(fam.name)
        if mapped is None:
            if fam.name == "gpufleet_gpu_xid_errors_total":
                # dcgm-exporter exports only the last XID seen, as a gauge.
                last = Family("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.")
                per_gpu: dict[str, tuple[dict[str, str], float]] = {}
                for labels, _ in fam.samples:
                    per_gpu[labels.get("uuid", "")] = (labels, float(labels.get("xid", 0)))
                for labels, code in per_gpu.values():
                    last.add(_labels(labels), code)
                out.append(last)
            out.append(fam)
            continue
        name, scale = mapped
        # dcgm-exporter types its fields as gauges, even the energy counter.
        new = Family(name, "gauge", fam.help)
        for labels, value in fam.samples:
            new.add(_labels(labels), value * scale)
        out.append(new)
    return out
