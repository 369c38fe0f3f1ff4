"""Reading the store: range queries (raw samples for short ranges, rollups for long ones), the newest
sample of each series, and every GPU with its newest values (the fleet view)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import isfinite
from operator import itemgetter
from typing import NamedTuple, TypedDict, TypeVar, cast

from psycopg.pq import Format
from sqlalchemy import select, text
from sqlalchemy.engine import Connection

from gpufleet.collector.store import chunks, schema
from gpufleet.collector.store.engine import Database, driver_cursor
from gpufleet.collector.store.ranges import (
    QueryCancel,
    QueryLimits,
    read_range,
    series_json,
)

# Labels that say which GPU a series belongs to (and what runs on it), not which of its series it is.
GPU_IDENTITY = ("node", "gpu", "uuid", "model", "cluster", "pod", "namespace", "container")
GPU_INFO = "gpufleet_gpu_info"
MAX_KNOWN_SERIES = 1_000_000  # series the fleet view keeps worked out; past that it starts over

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Point:
    labels: dict[str, str]  # __name__ included
    ts: int
    value: float


class RangeSeries(TypedDict):
    """One series of a range query, as ``/api/v1/query_range`` returns it."""

    metric: dict[str, str]  # __name__ included
    values: list[list[float]]  # [Unix seconds, value]


class GpuValue(NamedTuple):
    """The newest sample of one series of a GPU. ``labels``: the series' labels beyond the GPU's
    identity (``reason`` of a clock event, ``type`` and ``scope`` of ECC errors, …); empty for most."""

    labels: Mapping[str, str]
    value: float
    ts: int  # Unix ms


# A series of a GPU, named like a selector: its metric and its labels beyond the GPU's identity, sorted by
# name, values escaped as in PromQL: ``gpufleet_gpu_clock_event_active{reason="hw_thermal"}``, the metric
# alone for most. A string: it keeps its hash, so filling 1,000 GPUs' dicts with 30-odd keys each is cheap.
SeriesKey = str
_KEY_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_TO_ESCAPE = re.compile(r'[\\"\n]')
_ESCAPED = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n"}
_UNESCAPES = {"n": "\n"}


def series_key(metric: str, labels: Mapping[str, str]) -> SeriesKey:
    """The key of ``metric``'s series with these labels beyond identity."""
    if not labels:
        return metric
    pairs = (f'{k}="{_TO_ESCAPE.sub(_escape, labels[k])}"' for k in sorted(labels))
    return metric + "{" + ",".join(pairs) + "}"


def _escape(m: re.Match[str]) -> str:
    return _ESCAPES[m.group()]


def _unescape(m: re.Match[str]) -> str:
    return _UNESCAPES.get(m.group(1), m.group(1))


def key_parts(key: SeriesKey) -> tuple[str, dict[str, str]]:
    """The metric and the labels a series key names."""
    metric, brace, rest = key.partition("{")
    if not brace:
        return key, {}
    return metric, {k: _ESCAPED.sub(_unescape, v) for k, v in _KEY_LABEL.findall(rest)}


@dataclass(slots=True)
class GpuRecord:
    """One GPU as the store knows it: who it is, when it was last heard from, and its newest values.

    ``values`` and ``times`` hold plain numbers (no object per series), so reading 1,000 GPUs of 30-odd
    series each allocates next to nothing for the garbage collector to walk."""

    uuid: str
    identity: dict[str, str]  # GPU_IDENTITY labels, from the GPU's newest series; shared, read-only
    last_seen_ms: int
    stale: bool
    info: dict[str, str] | None = None  # the labels of gpufleet_gpu_info beyond identity; read-only
    values: dict[SeriesKey, float] = field(default_factory=dict)  # each series' newest value
    times: dict[SeriesKey, int] = field(default_factory=dict)  # and its time, Unix ms

    def label(self, name: str) -> str | None:
        return self.identity.get(name)

    def value(self, metric: str) -> float | None:
        """The newest value of the GPU's ``metric`` series that has no labels beyond identity."""
        return self.values.get(metric)

    def series(self, metric: str) -> list[GpuValue]:
        """Every series of ``metric`` the GPU has, first seen first."""
        out = []
        for key, v in self.values.items():
            name, labels = key_parts(key)
            if name == metric:
                out.append(GpuValue(labels, v, self.times[key]))
        return out

    @property
    def up(self) -> bool:
        return self.value("gpufleet_gpu_up") == 1.0

    @property
    def last_seen(self) -> float:
        return self.last_seen_ms / 1000.0

    def to_api(self) -> dict[str, object]:
        """The GPU as ``/api/v1/gpus`` shows it: ``values`` keyed like a series selector, ``metric{k="v"}``."""
        out: dict[str, object] = {"uuid": self.uuid, "last_seen": self.last_seen, "values": dict(self.values)}
        out.update(self.identity)
        if self.info is not None:
            out["info"] = self.info
        out.update(up=self.up, stale=self.stale)
        return out


class _GpuSeries(NamedTuple):
    """What the fleet view needs of one GPU series, worked out once from its labels."""

    uuid: str
    identity: dict[str, str]  # shared by every series with these identity labels: read-only
    key: SeriesKey
    info: dict[str, str] | None  # of gpufleet_gpu_info, its labels beyond identity: they describe the GPU


@dataclass(frozen=True, slots=True)
class _GpuLayout:
    """One GPU's series, as the fleet read fills it: worked out when series are learnt, used every poll."""

    uuid: str
    sids: tuple[int, ...]  # its series, gpufleet_gpu_info's left out
    keys: tuple[SeriesKey, ...]  # their keys, in the same order
    info_sids: tuple[int, ...]  # its gpufleet_gpu_info series (one, unless the driver changed)
    infos: tuple[dict[str, str] | None, ...]  # their labels beyond identity, in the same order
    series: tuple[tuple[int, _GpuSeries], ...]  # every series, for the general path
    simple: bool  # one identity for all its series, no two series under one key: the bulk path applies

    @classmethod
    def of(cls, uuid: str, series: list[tuple[int, _GpuSeries]]) -> _GpuLayout:
        data = [(sid, m) for sid, m in series if m.info is None]
        keys = tuple(m.key for _, m in data)
        identity = series[0][1].identity
        return cls(
            uuid,
            tuple(sid for sid, _ in data),
            keys,
            tuple(sid for sid, m in series if m.info is not None),
            tuple(m.info for _, m in series if m.info is not None),
            tuple(series),
            all(m.identity is identity for _, m in series) and len(set(keys)) == len(keys),
        )

    def fill(self, ts_of: dict[int, int], value_of: dict[int, float]) -> GpuRecord | None:
        """The GPU from the newest samples (series id -> time, value); None if none of its series has one."""
        maybe_times = list(map(ts_of.get, self.sids))
        maybe_values = list(map(value_of.get, self.sids))
        if not self.simple or None in maybe_times or None in maybe_values:
            return self._fill_each(ts_of, value_of)
        times, values = cast("list[int]", maybe_times), cast("list[float]", maybe_values)
        if not all(map(isfinite, values)):
            return self._fill_each(ts_of, value_of)
        g = GpuRecord(self.uuid, self.series[0][1].identity, max(times, default=0), False)
        g.values = dict(zip(self.keys, values, strict=True))
        g.times = dict(zip(self.keys, times, strict=True))
        if self.info_sids:
            for sid in self.info_sids:
                g.last_seen_ms = max(g.last_seen_ms, ts_of.get(sid, 0))
            g.info = self._newest_info(ts_of)
        return g

    def _newest_info(self, ts_of: dict[int, int]) -> dict[str, str] | None:
        if len(self.info_sids) == 1:
            return self.infos[0] if self.info_sids[0] in ts_of else None
        at = [ts_of.get(sid, -1) for sid in self.info_sids]
        newest = max(range(len(at)), key=at.__getitem__)
        return self.infos[newest] if at[newest] >= 0 else None

    def _fill_each(self, ts_of: dict[int, int], value_of: dict[int, float]) -> GpuRecord | None:
        """Series by series: identity from the newest series (merged among equally new ones); of series that
        differ only in identity labels (a pod that changed) the newest shows; NaN and missing rows skipped."""
        g: GpuRecord | None = None
        for sid, meta in self.series:
            ts, value = ts_of.get(sid), value_of.get(sid)
            if ts is None or value is None or not isfinite(value):
                continue
            if g is None:
                g = GpuRecord(self.uuid, meta.identity, ts, False)
            elif ts > g.last_seen_ms:
                g.last_seen_ms = ts
                g.identity = meta.identity
            elif ts == g.last_seen_ms and meta.identity is not g.identity and meta.identity != g.identity:
                g.identity = {**g.identity, **meta.identity}
            if meta.info is not None:
                continue
            held = g.times.get(meta.key)
            if held is None or ts >= held:
                g.values[meta.key] = value
                g.times[meta.key] = ts
        if g is not None and self.info_sids:
            g.info = self._newest_info(ts_of)
        return g


def _fleet_order(g: GpuRecord) -> tuple[str, str, int, str]:
    gpu = g.identity.get("gpu", "")
    return (
        g.identity.get("cluster", ""),
        g.identity.get("node", ""),
        int(gpu) if gpu.isdigit() else -1,
        gpu,
    )


class Reads:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._point_labels: dict[int, dict[str, str]] = {}  # series id -> its labels, __name__ included
        self._labels_lock = threading.Lock()
        self._gpu_series: dict[int, _GpuSeries | None] = {}  # series id -> its place in the fleet view
        self._layouts: dict[str, _GpuLayout] = {}  # uuid -> where its series are
        self._identities: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}  # one dict per identity

    def query_range(
        self,
        metric: str,
        matchers: Mapping[str, str],
        start: float,
        end: float,
        step: float,
        limits: QueryLimits | None = None,
        cancel: QueryCancel | None = None,
    ) -> list[RangeSeries]:
        """Each matching series every ``step`` seconds from ``start`` to ``end``, within ``limits`` (see
        ``QueryLimits``; QueryRefused, QueryTimedOut, QueryCancelled past them).

        Raw resolution: the newest value at or before each step, no older than 5 minutes (Prometheus's
        instant-vector semantics). Rollup resolution (long ranges, see ``resolution``): the average of
        the samples in the ``step`` seconds before each step."""
        return self._read_sorted(
            lambda labels, values: RangeSeries(metric=labels, values=values),
            metric,
            matchers,
            start,
            end,
            step,
            limits,
            cancel,
        )

    def query_range_json(
        self,
        metric: str,
        matchers: Mapping[str, str],
        start: float,
        end: float,
        step: float,
        limits: QueryLimits | None = None,
        cancel: QueryCancel | None = None,
    ) -> list[bytes]:
        """``query_range``'s series, each already encoded as JSON, in the same order: the answer is held as
        text only, never as a Python list per point (a float and a list per point weigh five times as much)."""
        return self._read_sorted(series_json, metric, matchers, start, end, step, limits, cancel)

    def _read_sorted(
        self,
        make: Callable[[dict[str, str], list[list[float]]], T],
        metric: str,
        matchers: Mapping[str, str],
        start: float,
        end: float,
        step: float,
        limits: QueryLimits | None,
        cancel: QueryCancel | None,
    ) -> list[T]:
        """Each series ``read_range`` emits, made into ``make(labels, values)``, in the order of their labels."""
        out: list[tuple[list[tuple[str, str]], T]] = []
        read_range(
            self._db,
            metric,
            matchers,
            start,
            end,
            step,
            limits or QueryLimits(),
            cancel or QueryCancel(),
            lambda labels, values: out.append((sorted(labels.items()), make(labels, values))),
        )
        out.sort(key=itemgetter(0))
        return [made for _, made in out]

    def latest(
        self,
        metric: str | None = None,
        matchers: Mapping[str, str] | None = None,
        since_ms: int | None = None,
    ) -> list[Point]:
        """The newest sample of each series (of ``metric``, if given), newer than ``since_ms`` if given."""
        q = select(
            schema.series.c.id,
            schema.series.c.metric,
            schema.series.c.labels,
            schema.latest.c.ts,
            schema.latest.c.value,
        ).join(schema.latest, schema.latest.c.series_id == schema.series.c.id)
        if metric is not None:
            q = q.where(schema.series.c.metric == metric)
        if since_ms is not None:
            q = q.where(schema.latest.c.ts > since_ms)
        out = []
        with self._db.engine.connect() as conn:
            for sid, name, labels_json, ts, value in conn.execute(q):
                labels = self._series_labels(sid, name, labels_json)
                if matchers and not all(labels.get(k, "") == v for k, v in matchers.items()):
                    continue
                out.append(Point(labels, ts, value))
        return out

    def _series_labels(self, sid: int, metric: str, labels_json: str) -> dict[str, str]:
        """A series' labels, ``__name__`` included, parsed once and then shared (read-only): the rule engine and
        the fleet page read every series every few seconds, and the engine keys its caches on the dict."""
        labels = self._point_labels.get(sid)
        if labels is None:
            labels = {"__name__": metric, **json.loads(labels_json)}
            with self._labels_lock:
                labels = self._point_labels.setdefault(sid, labels)
        return labels

    def gpus(self, now_ms: int | None = None, stale_after_ms: int = 60_000) -> list[GpuRecord]:
        """Every GPU known: identity, last-seen time, and the newest value of each of its series.

        One scan of the newest samples (``latest``: series id, time, value). Which GPU a series id belongs
        to, and under which key, is worked out from its labels the first time it is seen and kept as each
        GPU's layout; a poll then fills each GPU from its layout in bulk, with no work per row in Python
        for the usual GPU (one identity, one series a key, every value a number)."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        with self._db.engine.connect() as conn:
            cur = driver_cursor(conn)
            if self._db.dialect == "postgresql":
                cur.format = Format.BINARY  # numbers as stored: half the client's work of parsing text
            cur.execute("SELECT series_id, ts, value FROM latest")
            rows: list[tuple[int, int, float]] = cur.fetchall()
            sids = list(map(itemgetter(0), rows))
            unknown = set(sids).difference(self._gpu_series)
            if unknown:
                self._learn_series(conn, sorted(unknown))
        ts_of = dict(zip(sids, map(itemgetter(1), rows), strict=True))
        value_of = dict(zip(sids, map(itemgetter(2), rows), strict=True))
        gpus = []
        for layout in self._layouts.values():
            g = layout.fill(ts_of, value_of)
            if g is not None:
                g.stale = now_ms - g.last_seen_ms > stale_after_ms
                gpus.append(g)
        return sorted(gpus, key=_fleet_order)

    def _learn_series(self, conn: Connection, sids: list[int]) -> None:
        """Read the labels of series not seen before, keep what the fleet view needs of each, and lay out
        again the GPUs they belong to."""
        known = dict(self._gpu_series)
        if len(known) + len(sids) > MAX_KNOWN_SERIES:  # series churn (pods, jobs, processes): start over
            known, self._identities = {}, {}
        identities = self._identities
        s = schema.series.c
        for i in range(0, len(sids), 5000):
            for sid, metric, labels_json, uuid in conn.execute(
                select(s.id, s.metric, s.labels, s.uuid).where(s.id.in_(sids[i : i + 5000]))
            ):
                if uuid is None:
                    known[sid] = None
                    continue
                labels: dict[str, str] = json.loads(labels_json)
                ident = tuple((k, labels[k]) for k in GPU_IDENTITY if k in labels)
                identity = identities.get(ident)
                if identity is None:
                    identity = identities[ident] = dict(ident)
                extra = {k: v for k, v in labels.items() if k not in GPU_IDENTITY}
                key = series_key(metric, extra)
                known[sid] = _GpuSeries(uuid, identity, key, extra if metric == GPU_INFO else None)
        # A series gone between the two reads is not kept: the next poll that meets it asks again.
        by_gpu: dict[str, list[tuple[int, _GpuSeries]]] = {}
        for sid, meta in known.items():
            if meta is not None:
                by_gpu.setdefault(meta.uuid, []).append((sid, meta))
        # Replaced whole: a concurrent poll reads the old ones or the new ones.
        self._layouts = {uuid: _GpuLayout.of(uuid, series) for uuid, series in by_gpu.items()}
        self._gpu_series = known

    def counts(self) -> dict[str, int]:
        with self._db.engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM samples")).scalar_one()
            if self._db.dialect == "postgresql":
                n += conn.execute(
                    text(f"SELECT coalesce(sum(cardinality(vals)), 0) FROM {chunks.ALL_CHUNKS} c")
                ).scalar_one()
            return {
                "series": conn.execute(text("SELECT count(*) FROM series")).scalar_one(),
                "samples": int(n),
            }
