"""GPU source: every field in the field table, GPM profiling metrics and XID events, for every GPU."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.families import Family
from agent.fields import FIELDS, GPM_FIELDS
from agent.nvml import Gpu, GpuLost, Nvml

log = logging.getLogger(__name__)

EVENT_XID = 0x8  # nvmlEventTypeXidCriticalError
EVENT_DBE = 0x2  # nvmlEventTypeDoubleBitEccError
_GPM_IDS = [mid for _, mid, _, _ in GPM_FIELDS]


class GpuSource:
    """Samples GPUs through :class:`Nvml`. One lost GPU reads ``gpufleet_gpu_up 0``; the rest go on."""

    name = "gpu"

    def __init__(self, nvml: Nvml, node: str, *, cluster: str | None = None,
                 on_event: Callable[[], None] | None = None, watch_events: bool = True,
                 attribution: Callable[[str], dict[str, str]] | None = None) -> None:
        self._nvml = nvml
        self._node = node
        self._cluster = cluster
        self._on_event = on_event or (lambda: None)
        self._watch_events = watch_events
        self._attribution = attribution
        self._gpus: list[Gpu] = []
        self._lost: set[str] = set()
        self._gpm_prev: dict[str, Any] = {}
        self._gpm_supported: dict[str, bool] = {}
        self._xid_counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.driver: str | None = None

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._nvml.start()
        self.driver = self._nvml.driver_version()
        self._gpus = self._nvml.gpus()
        if self._watch_events and self._gpus:
            self._thread = threading.Thread(target=self._watch, name="nvml-events", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    @property
    def gpus(self) -> list[Gpu]:
        return list(self._gpus)

    def labels(self, gpu: Gpu) -> dict[str, str]:
        labels = {"node": self._node, "gpu": str(gpu.index), "uuid": gpu.uuid, "model": gpu.model}
        if self._cluster:
            labels["cluster"] = self._cluster
        if self._attribution:
            labels.update(self._attribution(gpu.uuid))
        return labels

    # ---- sampling --------------------------------------------------------------------------------
    def collect(self) -> list[Family]:
        families = {f.name: Family(f.name, f.kind, f.help) for f in FIELDS}
        for name, _, help_text, _ in GPM_FIELDS:
            families[name] = Family(name, "gauge", help_text)
        up = Family("gpufleet_gpu_up", "gauge", "1 when the GPU answers NVML, 0 when it is lost.")
        info = Family("gpufleet_gpu_info", "gauge", "Static facts about the GPU; the value is always 1.")
        xid = Family("gpufleet_gpu_xid_errors_total", "counter", "XID errors reported by the driver, per XID code.")
        for gpu in self._gpus:
            labels = self.labels(gpu)
            ok = self._sample_gpu(gpu, labels, families)
            up.add(labels, 1.0 if ok else 0.0)
            info.add({**labels, "driver": self.driver or "", "serial": gpu.serial or "",
                      "pci_bus_id": gpu.pci_bus_id or ""}, 1.0)
            with self._lock:
                counts = [(code, n) for (uuid, code), n in self._xid_counts.items() if uuid == gpu.uuid]
            for code, n in sorted(counts):
                xid.add({**labels, "xid": str(code)}, n)
        return [up, info, *families.values(), xid]

    def _sample_gpu(self, gpu: Gpu, labels: dict[str, str], families: dict[str, Family]) -> bool:
        def q(function: str, *args: Any) -> Any:
            return self._nvml.call(function, gpu.handle, *args)

        try:
            for f in FIELDS:
                value = f.read(q)
                if value is None:
                    continue
                fam = families[f.name]
                if isinstance(value, dict):
                    for label_values, v in value.items():
                        fam.add({**labels, **dict(zip(f.labels, label_values, strict=False))}, v)
                else:
                    fam.add(labels, value)
            self._sample_gpm(gpu, labels, families)
        except GpuLost as exc:
            if gpu.uuid not in self._lost:
                log.warning("GPU %s (%s) on %s is lost: %s", gpu.index, gpu.uuid, self._node, exc)
                self._lost.add(gpu.uuid)
            return False
        if gpu.uuid in self._lost:
            log.info("GPU %s (%s) on %s answers again", gpu.index, gpu.uuid, self._node)
            self._lost.discard(gpu.uuid)
        return True

    def _sample_gpm(self, gpu: Gpu, labels: dict[str, str], families: dict[str, Family]) -> None:
        supported = self._gpm_supported.get(gpu.uuid)
        if supported is None:
            support = self._nvml.call("nvmlGpmQueryDeviceSupport", gpu.handle)
            supported = bool(support is not None and getattr(support, "isSupportedDevice", 0))
            self._gpm_supported[gpu.uuid] = supported
        if not supported:
            return
        sample = self._nvml.call("nvmlGpmSampleAlloc")
        if sample is None or self._nvml.call("nvmlGpmSampleGet", gpu.handle, sample) is None:
            return
        prev = self._gpm_prev.get(gpu.uuid)
        self._gpm_prev[gpu.uuid] = sample
        if prev is None:
            return
        values = self._nvml.gpm_metrics(gpu.handle, prev, sample, _GPM_IDS)
        self._nvml.call("nvmlGpmSampleFree", prev)
        for name, mid, _, _ in GPM_FIELDS:
            v = values.get(mid)
            if v is not None:
                families[name].add(labels, min(max(v / 100.0, 0.0), 1.0))

    # ---- events ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        nvml = self._nvml
        event_set = nvml.call("nvmlEventSetCreate")
        if event_set is None:
            log.warning("NVML event sets are not available; XIDs will not be counted")
            return
        by_key = {}
        for gpu in self._gpus:
            try:
                # Registering a mask the GPU cannot report fails whole, so XID first, then ECC on its own.
                if not nvml.call_ok("nvmlDeviceRegisterEvents", gpu.handle, EVENT_XID, event_set):
                    log.warning("GPU %s cannot report XID events; XIDs on it will not be counted", gpu.index)
                nvml.call_ok("nvmlDeviceRegisterEvents", gpu.handle, EVENT_DBE, event_set)
            except GpuLost:
                continue
            by_key[nvml.handle_key(gpu.handle)] = gpu
        while not self._stop.is_set():
            try:
                data = nvml.lib.nvmlEventSetWait_v2(event_set, 500)
            except nvml.lib.NVMLError:
                continue  # timeout (no event) or a transient failure; keep listening
            except Exception:  # never let the event thread die
                log.exception("NVML event wait failed")
                self._stop.wait(1.0)
                continue
            gpu = by_key.get(nvml.handle_key(data.device))
            if gpu is None:
                continue
            if data.eventType & EVENT_XID:
                with self._lock:
                    key = (gpu.uuid, int(data.eventData))
                    self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
                log.warning("XID %d on GPU %s (%s), node %s", data.eventData, gpu.index, gpu.uuid, self._node)
            self._on_event()
        nvml.call("nvmlEventSetFree", event_set)
