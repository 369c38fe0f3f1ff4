"""dcgm-exporter compatible names: the same samples under ``DCGM_FI_*`` names, units, types and labels.

Teams can swap gpufleet in under dashboards and alert rules written for dcgm-exporter. The mapping is the
``dcgm`` column of the field table (docs/metrics.md prints it): a name per row, or per label value where
dcgm-exporter has one field per value (ECC, violations, NVLink errors). Labels become dcgm-exporter's
(``gpu``, ``UUID``, ``device``, ``modelName``, ``Hostname``, ``pci_bus_id``, ``DCGM_FI_DRIVER_VERSION``,
``GPU_I_ID``/``GPU_I_PROFILE`` on MIG instances, ``pod``/``namespace``/``container``). Series without a
dcgm twin keep their gpufleet name and labels, so nothing is lost in this mode.

In ``both`` naming mode (:func:`to_both`) an agent serves each series under both names, for a migration:
dashboards and rules of either naming work against the same agents. :func:`naming` describes the renaming for
PromQL (``gpufleet.core.naming``), so the rules and dashboards that ship follow an agent's naming mode.

dcgm-exporter exposes counters without ``_total``; the agent's text writer (agent/exposition.py) writes names as
given.
"""

from __future__ import annotations

from typing import NamedTuple

from gpufleet.agent.families import Families, Family
from gpufleet.agent.fields import CLOCK_EVENT_REASONS, FIELDS, GPM_FIELDS, INFO, XID, mig_name
from gpufleet.core.naming import Naming
from gpufleet.core.naming import Twin as PromqlTwin

# What an agent's /metrics names its series: gpufleet's names, dcgm-exporter's, or both (for a migration).
NAMING_MODES = ("gpufleet", "dcgm", "both")


class Twin(NamedTuple):
    dcgm: str | dict[tuple[str, ...], str]
    kind: str
    scale: float
    labels: tuple[
        str, ...
    ]  # our label names that the dcgm name spells out (consumed when ``dcgm`` is a dict)


# Our family name -> its dcgm-exporter twin. MIG families share their GPU family's twin.
MAPPING: dict[str, Twin] = {}
for _f in FIELDS:
    if _f.dcgm and _f.name != "gpufleet_gpu_clock_event_active":
        MAPPING[_f.name] = Twin(_f.dcgm, _f.dcgm_kind, _f.dcgm_scale, _f.labels)
        if _f.mig:
            MAPPING[mig_name(_f.name)] = MAPPING[_f.name]
for _g in GPM_FIELDS:
    if _g.dcgm:
        MAPPING[_g.name] = MAPPING[mig_name(_g.name)] = Twin(_g.dcgm, "gauge", 1.0, ())

CLOCK_REASONS_NAME = "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"
XID_NAME = "DCGM_FI_DEV_XID_ERRORS"

# dcgm-exporter's label names for the identity of a GPU (and of a MIG instance).
LABELS = {
    "gpu": "gpu",
    "uuid": "UUID",
    "model": "modelName",
    "node": "Hostname",
    "gpu_instance": "GPU_I_ID",
    "mig_profile": "GPU_I_PROFILE",
}


def dcgm_names() -> dict[str, str]:
    """Every dcgm-exporter name this mode writes -> its Prometheus type (for docs and tests)."""
    out = {CLOCK_REASONS_NAME: "gauge", XID_NAME: "gauge"}
    for twin in MAPPING.values():
        for name in twin.dcgm.values() if isinstance(twin.dcgm, dict) else [twin.dcgm]:
            out[name] = twin.kind
    return out


def _gpu_facts(families: list[Family]) -> dict[str, dict[str, str]]:
    facts: dict[str, dict[str, str]] = {}
    for fam in families:
        if fam.name == INFO[0]:
            for labels, _ in fam.samples:
                facts[labels.get("uuid", "")] = {
                    "pci_bus_id": labels.get("pci_bus_id", ""),
                    "DCGM_FI_DRIVER_VERSION": labels.get("driver", ""),
                }
    return facts


def _labels(
    labels: dict[str, str], facts: dict[str, dict[str, str]], drop: tuple[str, ...] = ()
) -> dict[str, str]:
    out = {LABELS.get(k, k): v for k, v in labels.items() if k not in drop}
    if "gpu" in labels:
        out["device"] = f"nvidia{labels['gpu']}"
    out.update(facts.get(labels.get("uuid", ""), {}))
    return out


def to_dcgm(families: list[Family]) -> list[Family]:
    """Rename the families dcgm-exporter also has; keep the rest (they have no dcgm twin) unchanged."""
    facts = _gpu_facts(families)
    out = fam = Families()

    for f in families:
        if f.name == XID[0]:
            # dcgm-exporter keeps only the last XID seen, as a gauge; our per-code counter stays beside it.
            last = fam(XID_NAME, "gauge", "Value of the last XID error encountered.")
            per_gpu: dict[str, tuple[dict[str, str], float]] = {}
            for labels, _ in f.samples:
                per_gpu[labels.get("uuid", "")] = (labels, float(labels.get("xid", 0)))
            for labels, code in per_gpu.values():
                last.add(_labels(labels, facts, drop=("xid",)), code)
            keep = fam(f.name, f.kind, f.help)
            keep.samples.extend(f.samples)
            continue
        if f.name == "gpufleet_gpu_clock_event_active":
            # dcgm-exporter exports the NVML reason bitmask; rebuild it from the per-reason series.
            masks: dict[tuple, tuple[dict[str, str], int]] = {}
            for labels, v in f.samples:
                rest = {k: val for k, val in labels.items() if k != "reason"}
                key = tuple(sorted(rest.items()))
                prev = masks.get(key, (rest, 0))[1]
                masks[key] = (rest, prev | (CLOCK_EVENT_REASONS.get(labels.get("reason", ""), 0) if v else 0))
            reasons = fam(CLOCK_REASONS_NAME, "gauge", "Current clock throttle reasons (NVML bitmask).")
            for rest, bits in masks.values():
                reasons.add(_labels(rest, facts), float(bits))
            continue
        twin = MAPPING.get(f.name)
        if twin is None:
            keep = fam(f.name, f.kind, f.help)
            keep.samples.extend(f.samples)
            continue
        for labels, value in f.samples:
            if isinstance(twin.dcgm, dict):
                name = twin.dcgm.get(tuple(labels.get(k, "") for k in twin.labels))
                if name is None:  # a label value dcgm-exporter has no field for: keep our series
                    fam(f.name, f.kind, f.help).add(labels, value)
                    continue
                new_labels = _labels(labels, facts, drop=twin.labels)
            else:
                name, new_labels = twin.dcgm, _labels(labels, facts)
            help_text = f.help if twin.scale == 1 else f"{f.help} (gpufleet {f.name} x {twin.scale:g})"
            fam(name, twin.kind, help_text).add(new_labels, value * twin.scale)
    return list(out.values())


def to_both(families: list[Family]) -> list[Family]:
    """Every family under its gpufleet name, and beside it the dcgm-exporter twins :func:`to_dcgm` adds (a
    series without a twin appears once)."""
    ours = {f.name for f in families}
    return families + [f for f in to_dcgm(families) if f.name not in ours]


_IDENTITY = ("node", "uuid", "model")
_MIG_IDENTITY = (*_IDENTITY, "gpu_instance", "mig_profile")
# A GPU family and its MIG instances' family share a dcgm name; the instance id tells them apart.
_GPU_ONLY = (("GPU_I_ID", "=", '""'),)
_MIG_ONLY = (("GPU_I_ID", "!=", '""'),)


def naming() -> Naming:
    """The dcgm renaming as PromQL sees it: each twin with its scale, the labels its name spells and the
    identity labels it carries under dcgm-exporter's label names."""
    twins: dict[str, PromqlTwin] = {}
    for f in FIELDS:
        names = (
            [(f.name, _IDENTITY, _GPU_ONLY), (mig_name(f.name), _MIG_IDENTITY, _MIG_ONLY)]
            if f.mig
            else [(f.name, _IDENTITY, ())]
        )
        for name, identity, matchers in names:
            if f.name == "gpufleet_gpu_clock_event_active":
                twins[name] = PromqlTwin(
                    name=CLOCK_REASONS_NAME,
                    bits={reason: bit for reason, bit in CLOCK_EVENT_REASONS.items()},
                    labels=f.labels,
                    values=tuple((reason,) for reason in CLOCK_EVENT_REASONS),
                    identity=identity,
                    matchers=matchers,
                )
                continue
            twin = MAPPING.get(name)
            if twin is None:
                continue
            if isinstance(twin.dcgm, dict):
                assert isinstance(f.read, dict)  # a name per label value: the row reads one source per value
                twins[name] = PromqlTwin(
                    by_value=dict(twin.dcgm),
                    labels=twin.labels,
                    values=tuple(f.read),
                    scale=twin.scale,
                    identity=identity,
                    matchers=matchers,
                )
            else:
                twins[name] = PromqlTwin(
                    name=twin.dcgm, scale=twin.scale, identity=identity, matchers=matchers
                )
    for g in GPM_FIELDS:
        for name, identity, matchers in (
            (g.name, _IDENTITY, _GPU_ONLY),
            (mig_name(g.name), _MIG_IDENTITY, _MIG_ONLY),
        ):
            twin = MAPPING.get(name)
            if twin is not None and isinstance(twin.dcgm, str):
                twins[name] = PromqlTwin(
                    name=twin.dcgm, scale=twin.scale, identity=identity, matchers=matchers
                )
    return Naming("dcgm", twins, dict(LABELS))
