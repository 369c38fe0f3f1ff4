"""GPU source: every row of the field table, GPM profiling metrics, MIG instances, XID events and (opt-in)
per-process usage, for every GPU.

The hot path (``collect``) reads the fast rows in as few NVML calls as the table allows: each NVML function
once per GPU however many rows use its answer, and every field id in one ``nvmlDeviceGetFieldValues``
call. Slow rows are read by a background reader every ``slow_interval`` seconds and served from its cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.agent.families import Families, Family
from gpufleet.agent.fields import (
    FAST_FIELDS,
    FIELDS,
    GPM_FIELDS,
    INFO,
    MIG_FIELDS,
    MIG_INFO,
    PROCESS_MEMORY,
    PROCESS_SM,
    SLOW_FIELDS,
    UP,
    XID,
    Call,
    Field,
    FieldValue,
    mig_name,
)
from gpufleet.agent.nvml import Gpu, GpuLost, Nvml

log = logging.getLogger(__name__)

EVENT_XID = 0x8  # nvmlEventTypeXidCriticalError
EVENT_DBE = 0x2  # nvmlEventTypeDoubleBitEccError
NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId of a process outside MIG
_GPM_IDS = [g.metric_id for g in GPM_FIELDS if not g.slow]
_GPM_SLOW_IDS = [g.metric_id for g in GPM_FIELDS if g.slow]

Value = tuple[Field, tuple[str, ...], float]
_IDS: dict[tuple[Field, ...], list[tuple[int, int]]] = {}  # row set -> its field ids, worked out once


def read_rows(nvml: Nvml, handle: Any, rows: Iterable[Field]) -> list[Value]:
    """Read table rows on one device: ``[(row, label values, value in base units)]``; unsupported rows are absent.

    Raises :class:`GpuLost` when the device stopped answering.
    """
    rows = tuple(rows)
    ids = _IDS.get(rows)
    if ids is None:
        ids = _IDS[rows] = sorted(
            {(s.id, s.scope) for f in rows for s in f.sources() if isinstance(s, FieldValue)}
        )
    batched = nvml.field_values(handle, ids) if ids else {}
    answers: dict[tuple[str, tuple[Any, ...]], Any] = {}
    out: list[Value] = []
    for f in rows:
        items = f.read.items() if isinstance(f.read, dict) else (((), f.read),)
        for label_values, src in items:
            if isinstance(src, FieldValue):
                v = batched.get((src.id, src.scope))
            else:
                key = (src.fn, src.args)
                if key not in answers:
                    answers[key] = nvml.call(src.fn, handle, *src.args)
                v = _pick(answers[key], src)
            if v is not None:
                out.append((f, label_values, float(v) * f.scale))
    return out


def _pick(answer: Any, src: Call) -> float | None:
    if answer is None:
        return None
    if src.attr is not None:
        answer = getattr(answer, src.attr, None)
    elif src.item is not None:
        answer = answer[src.item]
    elif src.mask is not None:
        return float(bool(int(answer) & src.mask))
    return None if answer is None else float(answer)


@dataclass(frozen=True, slots=True)
class MigDevice:
    handle: Any
    uuid: str
    gpu_instance: int
    compute_instance: int
    profile: str


class GpuSource:
    """Samples GPUs through :class:`Nvml`. One lost GPU reads ``gpufleet_gpu_up 0``; the rest go on.

    Who holds a GPU or MIG instance (pod, job) is not known here: the pipeline's enrich stage adds it.
    """

    name = "gpu"
    names_devices = True

    def __init__(
        self,
        nvml: Nvml,
        node: str,
        *,
        cluster: str | None = None,
        on_event: Callable[[], None] | None = None,
        watch_events: bool = True,
        slow_interval: float = 10.0,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
        process_metrics: bool = False,
        proc_root: str | Path = "/proc",
    ) -> None:
        self._nvml = nvml
        self._node = node
        self._cluster = cluster
        self._on_event = on_event or (lambda: None)
        self._watch_events = watch_events
        self._slow_interval = slow_interval
        self._background = background
        self._clock = clock
        self._process_metrics = process_metrics
        self._proc_root = Path(proc_root)
        self._gpus: list[Gpu] = []
        self._lost: set[str] = set()
        self._gpm_samples: dict[str, list[Any]] = {}  # uuid (or MIG uuid) -> [previous, spare]
        self._gpm_supported: dict[str, bool] = {}
        self._gpm_slow: dict[str, list[Any]] = {}  # uuid -> [window-start sample, its time, cached values]
        self._xid_counts: dict[tuple[str, int], int] = {}
        self._slow: dict[str, list[Value]] = {}
        self._slow_at: float | None = None
        self._mig: dict[str, list[MigDevice]] = {}
        self._mig_mode: dict[str, str] = {}
        self._proc_util_at: dict[str, int] = {}
        self._proc_owner: dict[int, tuple[str, str, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.driver: str | None = None

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._nvml.start()
        self.driver = self._nvml.driver_version()
        self._gpus = self._nvml.gpus()
        self.refresh_slow()
        if self._watch_events and self._gpus:
            self._spawn(self._watch, "nvml-events")
        if self._background and self._gpus:
            self._spawn(self._slow_loop, "nvml-slow-fields")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for pair in self._gpm_samples.values():
            for sample in pair[:2]:
                self._nvml.call("nvmlGpmSampleFree", sample)
        self._gpm_samples.clear()
        for window in self._gpm_slow.values():
            self._nvml.call("nvmlGpmSampleFree", window[0])
        self._gpm_slow.clear()

    @property
    def gpus(self) -> list[Gpu]:
        return list(self._gpus)

    def labels(self, gpu: Gpu) -> dict[str, str]:
        labels = {"node": self._node, "gpu": str(gpu.index), "uuid": gpu.uuid, "model": gpu.model}
        if self._cluster:
            labels["cluster"] = self._cluster
        return labels

    # ---- slow rows, MIG layout -------------------------------------------------------------------
    def refresh_slow(self) -> None:
        """Read the slow rows and the MIG layout of every GPU (background reader, or inline when due)."""
        for gpu in self._gpus:
            try:
                values = read_rows(self._nvml, gpu.handle, SLOW_FIELDS)
                mode, migs = self._discover_mig(gpu)
            except GpuLost:
                values, mode, migs = [], "", []
            with self._lock:
                self._slow[gpu.uuid] = values
                self._mig_mode[gpu.uuid] = mode
                self._mig[gpu.uuid] = migs
        self._slow_at = self._clock()

    def _slow_loop(self) -> None:
        while not self._stop.wait(self._slow_interval):
            try:
                self.refresh_slow()
            except Exception:  # never let the reader die; the next round tries again
                log.exception("reading the slow GPU fields failed")

    def _discover_mig(self, gpu: Gpu) -> tuple[str, list[MigDevice]]:
        """The MIG instances NVML shows on a GPU. Read only: MIG settings are never changed."""
        mode = self._nvml.call("nvmlDeviceGetMigMode", gpu.handle)
        if mode is None:
            return "", []
        if not mode[0]:
            return "disabled", []
        out = []
        for i in range(self._nvml.call("nvmlDeviceGetMaxMigDeviceCount", gpu.handle) or 0):
            h = self._nvml.call("nvmlDeviceGetMigDeviceHandleByIndex", gpu.handle, i)
            if h is None:
                continue
            uuid = self._nvml.call("nvmlDeviceGetUUID", h)
            gi = self._nvml.call("nvmlDeviceGetGpuInstanceId", h)
            ci = self._nvml.call("nvmlDeviceGetComputeInstanceId", h)
            attrs = self._nvml.call("nvmlDeviceGetAttributes", h)
            if uuid is None or gi is None:
                continue
            profile = ""
            if attrs is not None:
                # the profile name NVIDIA tools show: <GPU slices>g.<memory, GB rounded>gb
                profile = f"{attrs.gpuInstanceSliceCount}g.{round(attrs.memorySizeMB / 1000)}gb"
            out.append(
                MigDevice(
                    h, uuid.decode() if isinstance(uuid, bytes) else str(uuid), int(gi), int(ci or 0), profile
                )
            )
        return "enabled", out

    # ---- sampling --------------------------------------------------------------------------------
    def collect(self) -> list[Family]:
        if not self._background and (
            self._slow_at is None or self._clock() - self._slow_at >= self._slow_interval
        ):
            self.refresh_slow()
        families = fam = Families()

        up = fam(UP[0], "gauge", UP[1])
        info = fam(INFO[0], "gauge", INFO[1])
        for f in FIELDS:
            fam(f.name, f.kind, f.help)
        for g in GPM_FIELDS:
            fam(g.name, "gauge", g.help)
        xid = fam(XID[0], "counter", XID[1])
        for gpu in self._gpus:
            labels = self.labels(gpu)
            ok = self._sample_gpu(gpu, labels, fam)
            up.add(labels, 1.0 if ok else 0.0)
            with self._lock:
                mode = self._mig_mode.get(gpu.uuid, "")
                counts = [(code, n) for (uuid, code), n in self._xid_counts.items() if uuid == gpu.uuid]
            info.add(
                {
                    **labels,
                    "driver": self.driver or "",
                    "serial": gpu.serial or "",
                    "pci_bus_id": gpu.pci_bus_id or "",
                    "mig_mode": mode,
                },
                1.0,
            )
            for code, n in sorted(counts):
                xid.add({**labels, "xid": str(code)}, n)
        return list(families.values())

    def _sample_gpu(self, gpu: Gpu, labels: dict[str, str], fam: Callable[..., Family]) -> bool:
        try:
            values = read_rows(self._nvml, gpu.handle, FAST_FIELDS)
            with self._lock:
                values += self._slow.get(gpu.uuid, [])
                migs = self._mig.get(gpu.uuid, [])
            self._emit(values, labels, fam, rename=None)
            self._sample_gpm(
                gpu.uuid,
                labels,
                fam,
                lambda s: self._nvml.call("nvmlGpmSampleGet", gpu.handle, s),
                support_handle=gpu.handle,
            )
            for m in migs:
                self._sample_mig(gpu, m, labels, fam)
            if self._process_metrics:
                self._sample_processes(gpu, labels, migs, fam)
        except GpuLost as exc:
            if gpu.uuid not in self._lost:
                log.warning("GPU %s (%s) on %s is lost: %s", gpu.index, gpu.uuid, self._node, exc)
                self._lost.add(gpu.uuid)
            return False
        if gpu.uuid in self._lost:
            log.info("GPU %s (%s) on %s answers again", gpu.index, gpu.uuid, self._node)
            self._lost.discard(gpu.uuid)
        return True

    @staticmethod
    def _emit(
        values: list[Value],
        labels: dict[str, str],
        fam: Callable[..., Family],
        rename: Callable[[str], str] | None,
    ) -> None:
        for f, label_values, v in values:
            name = rename(f.name) if rename else f.name
            fam(name, f.kind, f.help).add({**labels, **dict(zip(f.labels, label_values, strict=True))}, v)

    def _sample_gpm(
        self,
        key: str,
        labels: dict[str, str],
        fam: Callable[..., Family],
        take: Callable[[Any], Any],
        *,
        support_handle: Any,
        rename: Callable[[str], str] | None = None,
    ) -> None:
        supported = self._gpm_supported.get(key)
        if supported is None:
            support = self._nvml.call("nvmlGpmQueryDeviceSupport", support_handle)
            supported = bool(support is not None and getattr(support, "isSupportedDevice", 0))
            self._gpm_supported[key] = supported
        if not supported:
            return
        pair = self._gpm_samples.get(key)
        if pair is None:
            pair = [self._nvml.call("nvmlGpmSampleAlloc"), self._nvml.call("nvmlGpmSampleAlloc")]
            if None in pair:
                self._gpm_supported[key] = False
                return
            self._gpm_samples[key] = pair
            pair.append(False)  # whether pair[0] holds a sample
        prev, spare, have_prev = pair
        if take(spare) is None:
            return
        # the new sample becomes "previous"; the old previous is reused next time
        self._gpm_samples[key] = [spare, prev, True]
        slow_values = self._slow_gpm(key, spare, take)
        if not have_prev:
            return
        values = self._nvml.gpm_metrics(None, prev, spare, _GPM_IDS)
        values.update(slow_values)
        for g in GPM_FIELDS:
            v = values.get(g.metric_id)
            if v is None:
                continue
            v *= g.scale
            if g.unit == "ratio":
                v = min(max(v, 0.0), 1.0)
            name = rename(g.name) if rename else g.name
            fam(name, "gauge", g.help).add(labels, v)

    def _slow_gpm(self, key: str, current: Any, take: Callable[[Any], Any]) -> dict[int, float | None]:
        """Costly GPM metrics, computed once per slow window (between a window-start sample and ``current``)
        and served from a cache in between."""
        if not _GPM_SLOW_IDS:
            return {}
        window = self._gpm_slow.get(key)
        now = self._clock()
        if window is None:
            start = self._nvml.call("nvmlGpmSampleAlloc")
            if start is None or take(start) is None:
                return {}
            window = self._gpm_slow[key] = [start, now, {}]
        start, started_at, cached = window
        if now - started_at >= self._slow_interval:
            cached = self._nvml.gpm_metrics(None, start, current, _GPM_SLOW_IDS)
            if take(start) is not None:  # the next window starts now
                window[:] = [start, now, cached]
        return cached

    def _sample_mig(
        self, gpu: Gpu, m: MigDevice, gpu_labels: dict[str, str], fam: Callable[..., Family]
    ) -> None:
        labels = {
            **gpu_labels,
            "gpu_instance": str(m.gpu_instance),
            "compute_instance": str(m.compute_instance),
            "mig_profile": m.profile,
            "mig_uuid": m.uuid,
        }
        fam(MIG_INFO[0], "gauge", MIG_INFO[1]).add(labels, 1.0)
        self._emit(read_rows(self._nvml, m.handle, MIG_FIELDS), labels, fam, rename=mig_name)
        self._sample_gpm(
            m.uuid,
            labels,
            fam,
            lambda s: self._nvml.call("nvmlGpmMigSampleGet", gpu.handle, m.gpu_instance, s),
            rename=mig_name,
            support_handle=gpu.handle,
        )

    # ---- per-process usage (opt-in) --------------------------------------------------------------
    def pids_by_device(self) -> dict[str, list[int]]:
        """The PIDs of the compute processes on each GPU and MIG instance, by UUID (a GPU's list holds its
        MIG instances' processes too): what a Slurm node's job attribution reads the cgroups of."""
        out: dict[str, list[int]] = {}
        for gpu in self._gpus:
            try:
                procs = self._nvml.call("nvmlDeviceGetComputeRunningProcesses", gpu.handle) or []
            except GpuLost:
                continue
            with self._lock:
                by_gi = {m.gpu_instance: m.uuid for m in self._mig.get(gpu.uuid, [])}
            out[gpu.uuid] = [int(p.pid) for p in procs]
            for p in procs:
                mig = by_gi.get(getattr(p, "gpuInstanceId", NO_INSTANCE))
                if mig is not None:
                    out.setdefault(mig, []).append(int(p.pid))
        return out

    def _sample_processes(
        self, gpu: Gpu, labels: dict[str, str], migs: list[MigDevice], fam: Callable[..., Family]
    ) -> None:
        from gpufleet.agent.attribution import container_of

        procs = self._nvml.call("nvmlDeviceGetComputeRunningProcesses", gpu.handle) or []
        last = self._proc_util_at.get(gpu.uuid, 0)
        samples = self._nvml.call("nvmlDeviceGetProcessUtilization", gpu.handle, last) or []
        sm: dict[int, tuple[int, float]] = {}
        for s in samples:
            if s.timeStamp >= sm.get(s.pid, (-1, 0.0))[0]:
                sm[s.pid] = (s.timeStamp, s.smUtil / 100.0)
        if samples:
            self._proc_util_at[gpu.uuid] = max(s.timeStamp for s in samples)
        by_gi = {m.gpu_instance: m for m in migs}
        mem_fam = fam(PROCESS_MEMORY[0], "gauge", PROCESS_MEMORY[1])
        sm_fam = fam(PROCESS_SM[0], "gauge", PROCESS_SM[1])
        seen = set()
        for p in procs:
            pid = int(p.pid)
            seen.add(pid)
            owner = self._proc_owner.get(pid)
            if owner is None:
                owner = self._proc_owner[pid] = container_of(pid, self._proc_root)
            command, container_id, pod_uid = owner
            plabels = {
                **labels,
                "pid": str(pid),
                "command": command,
                "container_id": container_id,
                "pod_uid": pod_uid,
            }
            mig = by_gi.get(getattr(p, "gpuInstanceId", NO_INSTANCE))
            if mig is not None:
                plabels["mig_uuid"] = mig.uuid
                plabels["gpu_instance"] = str(mig.gpu_instance)
            if getattr(p, "usedGpuMemory", None) is not None:
                mem_fam.add(plabels, float(p.usedGpuMemory))
            sm_fam.add(plabels, sm.get(pid, (0, 0.0))[1])
        for pid in [pid for pid in self._proc_owner if pid not in seen]:
            del self._proc_owner[pid]

    # ---- events ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        nvml = self._nvml
        event_set = nvml.event_set()
        if event_set is None:
            log.warning("NVML event sets are not available; XIDs will not be counted")
            return
        by_key = {}
        for gpu in self._gpus:
            try:
                # Registering a mask the GPU cannot report fails whole, so XID first, then ECC on its own.
                if not nvml.register_events(gpu.handle, EVENT_XID, event_set):
                    log.warning("GPU %s cannot report XID events; XIDs on it will not be counted", gpu.index)
                nvml.register_events(gpu.handle, EVENT_DBE, event_set)
            except GpuLost:
                continue
            by_key[nvml.handle_key(gpu.handle)] = gpu
        while not self._stop.is_set():
            try:
                event = nvml.wait_event(event_set, 500)
            except Exception:  # never let the event thread die
                log.exception("NVML event wait failed")
                self._stop.wait(1.0)
                continue
            if event is None:
                continue  # timeout (no event) or a transient failure; keep listening
            holder = by_key.get(event.device)
            if holder is None:
                continue
            if event.event_type & EVENT_XID:
                with self._lock:
                    key = (holder.uuid, event.data)
                    self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
                log.warning(
                    "XID %d on GPU %s (%s), node %s", event.data, holder.index, holder.uuid, self._node
                )
            self._on_event()
        nvml.free_event_set(event_set)
