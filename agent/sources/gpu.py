"""GPU source: every row of the field table, GPM profiling metrics, MIG instances, XID events and (opt-in)
per-process usage, for every GPU.

The hot path (``collect``) reads the fast rows in as few NVML calls as the table allows: each NVML function
once per GPU however many rows use its answer, and every field id in one ``nvmlDeviceGetFieldValues``
call. Slow rows are read by a background reader every ``slow_interval`` seconds and served from its cache.

What each GPU answers is learned from its first reads (:class:`Learned`): a read it answers "not supported"
is not made again, and a row that names several places (``FirstOf``) keeps the one that answered. A GPU
learns again when it comes back after being lost, and when its MIG mode or its number of NVLinks up changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gpufleet.agent.families import Families, Family
from gpufleet.agent.fields import (
    COSTLY_EVERY,
    FAST_FIELDS,
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
    CountOf,
    Field,
    FieldValue,
    FirstOf,
    Read,
    Source,
    SumOf,
    mig_name,
    reads,
)
from gpufleet.agent.nvml import Gpu, GpuLost, Nvml

log = logging.getLogger(__name__)

EVENT_XID = 0x8  # nvmlEventTypeXidCriticalError
EVENT_DBE = 0x2  # nvmlEventTypeDoubleBitEccError
# How long one wait for an XID may last. An event ends a wait at once, so this bounds nothing a user sees;
# each wait that times out costs the driver about 0.12 ms of CPU (H100), and the thread's waking a cold CPU more,
# so 500 ms waits cost 0.025 % of a core, 5 s waits 0.0024 % and 30 s waits 0.0004 % in the driver
# (docs/benchmarks.md). NVML cannot cut a wait short: at shutdown the waiting thread is left to end with the
# process (see Nvml.shutdown).
EVENT_WAIT_MS = 30000
# The costly GPM metrics (GPM_FIELDS marked slow: GRAPHICS_UTIL, 1.7 ms a call on an H200) are
# computed over the costly rows' window (COSTLY_EVERY slow intervals: an average over it, not a snapshot) and
# served from a cache in between; the first window after start is this short, so they show from the first
# seconds on, not a whole window later.
GPM_FIRST_WINDOW_S = 1.0
NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId of a process outside MIG
_GPM_IDS = [g.metric_id for g in GPM_FIELDS if not g.slow]
_GPM_SLOW_IDS = [g.metric_id for g in GPM_FIELDS if g.slow]

Value = tuple[Field, tuple[str, ...], float]
Key = tuple[Any, ...]  # a read as NVML sees it: (field id, scope) or (function, args)
LINKS_UP = "gpufleet_gpu_nvlink_links_up"


def _key(r: Read) -> Key:
    return (r.id, r.scope) if isinstance(r, FieldValue) else (r.fn, r.args)


class Learned:
    """What one device answers, learned from its reads. A read whose first answer is "not supported" (see
    :meth:`Nvml.probe`) is not made again; one that answered once and later fails is a failed read and is
    asked again. A ``FirstOf`` keeps the option that answered; each part of a holding ``SumOf`` keeps its last
    value. :meth:`again` forgets the answers but keeps the parts' last values, so sums stay monotonic."""

    def __init__(self) -> None:
        self.unsupported: set[Key] = set()
        self.answered: set[Key] = set()
        self.chosen: dict[FirstOf, int] = {}
        self.last: dict[Source, float] = {}
        self._plans: dict[tuple[Field, ...], _Plan] = {}

    def again(self) -> Learned:
        fresh = Learned()
        fresh.last = dict(self.last)
        return fresh

    def plan(self, rows: tuple[Field, ...]) -> _Plan:
        """How to read ``rows`` now: the field ids to ask (none known unsupported, none of a ``FirstOf``
        option not chosen), and each series' source (a row whose only read is unsupported is left out)."""
        plan = self._plans.get(rows)
        if plan is None:
            ids: set[tuple[int, int]] = set()
            entries: list[_Entry] = []
            for f in rows:
                for label_values, src in f.read.items() if isinstance(f.read, dict) else (((), f.read),):
                    ids.update((r.id, r.scope) for r in self._live(src) if isinstance(r, FieldValue))
                    if isinstance(src, (Call, FieldValue)):
                        key = _key(src)
                        if key not in self.unsupported:
                            entries.append(
                                (f, label_values, _FIELD if isinstance(src, FieldValue) else _CALL, key, src)
                            )
                    else:
                        entries.append((f, label_values, _COMPOSITE, (), src))
            plan = self._plans[rows] = _Plan(sorted(ids - self.unsupported), entries)
        return plan

    def _live(self, src: Source) -> list[Read]:
        if isinstance(src, FirstOf):
            chosen = self.chosen.get(src)
            if chosen is not None:
                return self._live(src.options[chosen])
            return [r for o in src.options for r in self._live(o)]
        if isinstance(src, SumOf):
            return [r for p in src.parts for r in self._live(p)]
        return reads(src)

    def gone(self, src: Source) -> bool:
        """True when no read of ``src`` can answer on this device any more."""
        return all(_key(r) in self.unsupported for r in reads(src))

    def failed(self, key: Key, *, unsupported: bool) -> None:
        """A read got no value: "not supported" before it ever answered is kept, anything else forgotten."""
        if unsupported and key not in self.answered and key not in self.unsupported:
            self.unsupported.add(key)
            self._plans.clear()

    def choose(self, first: FirstOf, option: int) -> None:
        self.chosen[first] = option
        self._plans.clear()


_FIELD, _CALL, _COMPOSITE = 0, 1, 2
_Entry = tuple[Field, tuple[str, ...], int, Key, Source]  # row, label values, kind, read's key, source


class _Plan(NamedTuple):
    ids: list[tuple[int, int]]
    entries: list[_Entry]


def read_rows(nvml: Nvml, handle: Any, rows: Iterable[Field], learned: Learned | None = None) -> list[Value]:
    """Read table rows on one device: ``[(row, label values, value in base units)]``; unsupported rows are absent.
    ``learned`` is what the device answered before (updated here); without it every read is made.

    Raises :class:`GpuLost` when the device stopped answering.
    """
    known = learned if learned is not None else Learned()
    plan = known.plan(tuple(rows))
    batched, cannot = nvml.probe_fields(handle, plan.ids) if plan.ids else ({}, frozenset())
    calls: dict[Key, tuple[Any, bool]] = {}
    answered = known.answered

    def read(r: Read) -> float | None:
        key = _key(r)
        if key in known.unsupported:
            return None
        if isinstance(r, FieldValue):
            v, unsupported = batched.get(key), key in cannot
        else:
            if key not in calls:
                calls[key] = nvml.probe(r.fn, handle, *r.args)
            answer, unsupported = calls[key]
            v = _pick(answer, r)
        if v is None:
            known.failed(key, unsupported=unsupported)
        elif key not in answered:
            answered.add(key)
        return v

    def value(src: Source) -> float | None:
        if isinstance(src, (Call, FieldValue)):
            return read(src)
        if isinstance(src, FirstOf):
            chosen = known.chosen.get(src)
            if chosen is not None:
                return value(src.options[chosen])
            for i, option in enumerate(src.options):
                v = value(option)
                if v is not None:
                    known.choose(src, i)
                    return v
                if not known.gone(option):
                    return None  # a failed read, not a "no": try again next time before looking further
            return None
        if isinstance(src, SumOf):
            total = None
            for part in src.parts:
                v = value(part)
                if src.hold:
                    if v is None:
                        v = known.last.get(part)
                    else:
                        known.last[part] = v
                if v is not None:
                    total = v if total is None else total + v
            return total
        assert isinstance(src, CountOf)
        for r in src.parts:
            read(r)
        n = sum(1 for r in src.parts if _key(r) in answered)
        return float(n) if n else None

    out: list[Value] = []
    # Plain reads inline (the per-sample path), composite sources through value().
    for f, label_values, kind, key, src in plan.entries:
        if kind == _FIELD:
            v = batched.get(key)
            if v is None:
                known.failed(key, unsupported=key in cannot)
                continue
        elif kind == _CALL:
            assert isinstance(src, Call)
            got = calls.get(key)
            if got is None:
                got = calls[key] = nvml.probe(src.fn, handle, *src.args)
            v = _pick(got[0], src)
            if v is None:
                known.failed(key, unsupported=got[1])
                continue
        else:
            v = value(src)
            if v is None:
                continue
        if kind != _COMPOSITE and key not in answered:
            answered.add(key)
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


class SeriesLabels:
    """The label dicts of one device's series: ``base`` (the device's own labels) and, for a row with labels of
    its own, the base with those, each made on first use and handed out every sample after. Sinks remember a
    series by its dict (see :class:`Family`), and a dict per series and sample was most of a sample's work."""

    __slots__ = ("_rows", "base")

    def __init__(self, base: dict[str, str]) -> None:
        self.base = base
        self._rows: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, str]] = {}

    def row(self, names: tuple[str, ...], values: tuple[str, ...]) -> dict[str, str]:
        if not names:
            return self.base
        labels = self._rows.get((names, values))
        if labels is None:
            labels = self._rows[(names, values)] = {**self.base, **dict(zip(names, values, strict=True))}
        return labels


_INFO_LABELS = ("driver", "serial", "pci_bus_id", "mig_mode")
_XID_LABELS = ("xid",)


@dataclass(frozen=True, slots=True)
class MigDevice:
    handle: Any
    uuid: str
    gpu_instance: int
    compute_instance: int
    profile: str


def _mig_key(m: MigDevice) -> tuple[str, int, int, str]:
    """What a MIG instance's labels are made of besides its GPU's: an instance re-created alike keeps them."""
    return (m.uuid, m.gpu_instance, m.compute_instance, m.profile)


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
        slow_interval: float = 30.0,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
        process_metrics: bool = False,
        proc_root: str | Path = "/proc",
        nvlink_per_link: bool = False,
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
        slow_rows = [f for f in SLOW_FIELDS if nvlink_per_link or not f.per_link]
        self._slow_rows = tuple(f for f in slow_rows if not f.costly)
        self._costly_rows = tuple(f for f in slow_rows if f.costly)  # every COSTLY_EVERY-th refresh
        # (GPU uuid, "fast" | "slow" | MIG instance uuid): what the device answers. Fast and slow rows learn
        # apart, as the background reader and the sampler read them from two threads.
        self._learned: dict[tuple[str, str], Learned] = {}
        self._shape: dict[str, tuple[str, float | None]] = {}  # uuid -> (MIG mode, NVLinks up) last seen
        self._gpus: list[Gpu] = []
        self._lost: set[str] = set()
        self._gpm_samples: dict[str, list[Any]] = {}  # uuid (or MIG uuid) -> [previous, spare]
        self._gpm_supported: dict[str, bool] = {}
        self._gpm_slow: dict[str, list[Any]] = {}  # uuid -> [window-start sample, its time, cached values]
        self._xid_counts: dict[tuple[str, int], int] = {}
        self._slow: dict[str, list[Value]] = {}  # uuid -> the slow rows' values, the costly ones' included
        self._costly: dict[str, list[Value]] = {}  # uuid -> the costly rows' values, as last read
        self._refreshes = 0
        self._slow_at: float | None = None
        self._mig: dict[str, list[MigDevice]] = {}
        self._mig_mode: dict[str, str] = {}
        self._proc_util_at: dict[str, int] = {}
        self._proc_owner: dict[int, tuple[str, str, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[tuple[threading.Thread, float]] = []  # (thread, seconds close() waits for it)
        # GPU uuid, or a MIG instance's identity -> its series' label dicts (the sampler's thread only)
        self._series_labels: dict[str | tuple[str, int, int, str], SeriesLabels] = {}
        self.driver: str | None = None

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._nvml.start()
        self.driver = self._nvml.driver_version()
        self._gpus = self._nvml.gpus()
        self.refresh_slow()
        if self._watch_events and self._gpus:
            # close() waits briefly for the XID waiter: it ends only when its wait does (up to EVENT_WAIT_MS)
            self._spawn(self._watch, "nvml-events", join_s=0.2)
        if self._background and self._gpus:
            self._spawn(self._slow_loop, "nvml-slow-fields")

    def _spawn(self, target: Callable[[], None], name: str, join_s: float = 2.0) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append((t, join_s))

    def close(self) -> None:
        self._stop.set()
        for t, join_s in self._threads:
            t.join(timeout=join_s)
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
        """Read the slow rows and the MIG layout of every GPU (background reader, or inline when due); the
        costly rows the first time and every COSTLY_EVERY-th time after."""
        costly_due = self._refreshes % COSTLY_EVERY == 0
        self._refreshes += 1
        for gpu in self._gpus:
            learned = self._learned_for(gpu.uuid, "slow")
            costly = None
            try:
                values = read_rows(self._nvml, gpu.handle, self._slow_rows, learned)
                if costly_due:
                    costly = read_rows(self._nvml, gpu.handle, self._costly_rows, learned)
                mode, migs = self._discover_mig(gpu)
            except GpuLost:
                values, costly, mode, migs = [], [], "", []
            else:
                links_up = next((v for f, _, v in values if f.name == LINKS_UP), None)
                shape, before = (mode, links_up), self._shape.get(gpu.uuid)
                self._shape[gpu.uuid] = shape
                if before is not None and before != shape:
                    # A MIG mode change or a link going down or up changes what the GPU answers.
                    self.relearn(gpu.uuid)
            with self._lock:
                if costly is not None:
                    self._costly[gpu.uuid] = costly
                self._slow[gpu.uuid] = values + self._costly.get(gpu.uuid, [])
                self._mig_mode[gpu.uuid] = mode
                self._mig[gpu.uuid] = migs
        self._slow_at = self._clock()

    def _learned_for(self, gpu_uuid: str, part: str) -> Learned:
        learned = self._learned.get((gpu_uuid, part))
        if learned is None:
            learned = self._learned[(gpu_uuid, part)] = Learned()
        return learned

    def relearn(self, gpu_uuid: str) -> None:
        """Forget what a GPU and its MIG instances answered: their next reads ask everything again."""
        for key in [k for k in list(self._learned) if k[0] == gpu_uuid]:
            self._learned[key] = self._learned[key].again()

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

        # families are made as their first series comes (a row no GPU here answers makes none)
        up = fam(UP[0], "gauge", UP[1])
        info = fam(INFO[0], "gauge", INFO[1])
        xid = fam(XID[0], "counter", XID[1])
        for gpu in self._gpus:
            labels = self._series_labels.get(gpu.uuid)
            if labels is None:
                labels = self._series_labels[gpu.uuid] = SeriesLabels(self.labels(gpu))
            ok = self._sample_gpu(gpu, labels, fam)
            up.add(labels.base, 1.0 if ok else 0.0)
            with self._lock:
                mode = self._mig_mode.get(gpu.uuid, "")
                counts = [(code, n) for (uuid, code), n in self._xid_counts.items() if uuid == gpu.uuid]
            info.add(
                labels.row(_INFO_LABELS, (self.driver or "", gpu.serial or "", gpu.pci_bus_id or "", mode)),
                1.0,
            )
            for code, n in sorted(counts):
                xid.add(labels.row(_XID_LABELS, (str(code),)), n)
        self._forget_gone_devices()
        return [f for f in families.values() if f.samples]  # no XID yet: no XID family

    def _forget_gone_devices(self) -> None:
        """Drop the label dicts of MIG instances no longer in any GPU's layout."""
        with self._lock:
            live = len(self._gpus) + sum(len(migs) for migs in self._mig.values())
            if len(self._series_labels) <= live:
                return
            keep = {g.uuid for g in self._gpus} | {_mig_key(m) for migs in self._mig.values() for m in migs}
        self._series_labels = {k: v for k, v in self._series_labels.items() if k in keep}

    def _sample_gpu(self, gpu: Gpu, labels: SeriesLabels, fam: Callable[..., Family]) -> bool:
        try:
            values = read_rows(self._nvml, gpu.handle, FAST_FIELDS, self._learned_for(gpu.uuid, "fast"))
            with self._lock:
                values += self._slow.get(gpu.uuid, [])
                migs = self._mig.get(gpu.uuid, [])
            self._emit(values, labels, fam, rename=None)
            self._sample_gpm(
                gpu.uuid,
                labels.base,
                fam,
                lambda s: self._nvml.call("nvmlGpmSampleGet", gpu.handle, s),
                support_handle=gpu.handle,
            )
            for m in migs:
                self._sample_mig(gpu, m, labels, fam)
            if self._process_metrics:
                self._sample_processes(gpu, labels.base, migs, fam)
        except GpuLost as exc:
            if gpu.uuid not in self._lost:
                log.warning("GPU %s (%s) on %s is lost: %s", gpu.index, gpu.uuid, self._node, exc)
                self._lost.add(gpu.uuid)
            return False
        if gpu.uuid in self._lost:
            log.info("GPU %s (%s) on %s answers again", gpu.index, gpu.uuid, self._node)
            self._lost.discard(gpu.uuid)
            self.relearn(gpu.uuid)  # after a reset it may answer what it did not before
        return True

    @staticmethod
    def _emit(
        values: list[Value],
        labels: SeriesLabels,
        fam: Callable[..., Family],
        rename: Callable[[str], str] | None,
    ) -> None:
        for f, label_values, v in values:
            name = rename(f.name) if rename else f.name
            fam(name, f.kind, f.help).add(labels.row(f.labels, label_values), v)

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
        """Costly GPM metrics, computed once per costly window (between a window-start sample and ``current``)
        and served from a cache in between; the first window is GPM_FIRST_WINDOW_S long."""
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
        if now - started_at >= (self._slow_interval * COSTLY_EVERY if cached else GPM_FIRST_WINDOW_S):
            cached = self._nvml.gpm_metrics(None, start, current, _GPM_SLOW_IDS)
            if take(start) is not None:  # the next window starts now
                window[:] = [start, now, cached]
        return cached

    def _sample_mig(
        self, gpu: Gpu, m: MigDevice, gpu_labels: SeriesLabels, fam: Callable[..., Family]
    ) -> None:
        key = _mig_key(m)
        labels = self._series_labels.get(key)
        if labels is None:
            labels = self._series_labels[key] = SeriesLabels(
                {
                    **gpu_labels.base,
                    "gpu_instance": str(m.gpu_instance),
                    "compute_instance": str(m.compute_instance),
                    "mig_profile": m.profile,
                    "mig_uuid": m.uuid,
                }
            )
        fam(MIG_INFO[0], "gauge", MIG_INFO[1]).add(labels.base, 1.0)
        self._emit(
            read_rows(self._nvml, m.handle, MIG_FIELDS, self._learned_for(gpu.uuid, m.uuid)),
            labels,
            fam,
            rename=mig_name,
        )
        self._sample_gpm(
            m.uuid,
            labels.base,
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
                event = nvml.wait_event(event_set, EVENT_WAIT_MS)
            except Exception:  # never let the event thread die
                log.exception("NVML event wait failed")
                self._stop.wait(1.0)
                continue
            if event is None:
                continue  # timeout (no event), a transient failure or NVML shut down; keep listening
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
