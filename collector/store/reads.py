"""Reading the store: range queries (raw samples for short ranges, rollups for long ones), the newest
sample of each series, and every GPU with its newest values (the fleet view)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from sqlalchemy import select, text
from sqlalchemy.engine import Connection

from gpufleet.collector.store import chunks, schema
from gpufleet.collector.store.engine import LOOKBACK_MS, Database

RAW_RANGE_MS = 6 * 3600 * 1000  # range queries up to 6 hours read raw samples; longer ones read rollups

# Labels that say which GPU a series belongs to (and what runs on it), not which of its series it is.
GPU_IDENTITY = ("node", "gpu", "uuid", "model", "cluster", "pod", "namespace", "container")
GPU_INFO = "gpufleet_gpu_info"

Bucket = tuple[int, float, float, float, int]  # (bucket_ms, min, max, sum, count)


@dataclass(frozen=True, slots=True)
class Point:
    labels: dict[str, str]  # __name__ included
    ts: int
    value: float


class RangeSeries(TypedDict):
    """One series of a range query, as ``/api/v1/query_range`` returns it."""

    metric: dict[str, str]  # __name__ included
    values: list[list[float]]  # [Unix seconds, value]


@dataclass(frozen=True, slots=True)
class GpuValue:
    """The newest sample of one series of a GPU. ``labels``: the series' labels beyond the GPU's
    identity (``reason`` of a clock event, ``type`` and ``scope`` of ECC errors, …); empty for most."""

    labels: Mapping[str, str]
    value: float
    ts: int  # Unix ms


@dataclass(slots=True)
class GpuRecord:
    """One GPU as the store knows it: who it is, when it was last heard from, and its newest values."""

    uuid: str
    identity: dict[str, str]  # GPU_IDENTITY labels, from the GPU's newest series
    last_seen_ms: int
    stale: bool
    info: dict[str, str] | None = None  # the labels of gpufleet_gpu_info beyond identity, when reported
    metrics: dict[str, list[GpuValue]] = field(
        default_factory=dict
    )  # metric name -> its series, first seen first

    def label(self, name: str) -> str | None:
        return self.identity.get(name)

    def value(self, metric: str) -> float | None:
        """The newest value of the GPU's ``metric`` series that has no labels beyond identity."""
        return next((v.value for v in self.metrics.get(metric, ()) if not v.labels), None)

    def series(self, metric: str) -> Sequence[GpuValue]:
        return self.metrics.get(metric, ())

    @property
    def up(self) -> bool:
        return self.value("gpufleet_gpu_up") == 1.0

    @property
    def last_seen(self) -> float:
        return self.last_seen_ms / 1000.0

    def to_api(self) -> dict[str, object]:
        """The GPU as ``/api/v1/gpus`` shows it: ``values`` keyed like a series selector, ``metric{k="v"}``."""
        values: dict[str, float] = {}
        for metric, series in self.metrics.items():
            for v in series:
                labels = ",".join(f'{k}="{x}"' for k, x in sorted(v.labels.items()))
                values[metric + ("{" + labels + "}" if labels else "")] = v.value
        out: dict[str, object] = {"uuid": self.uuid, "last_seen": self.last_seen, "values": values}
        out.update(self.identity)
        if self.info is not None:
            out["info"] = self.info
        out.update(up=self.up, stale=self.stale)
        return out


def step_latest(pts: list[tuple[int, float]], start_ms: int, end_ms: int, step_ms: int) -> list[list[float]]:
    values = []
    i, last = 0, None
    for t in range(start_ms, end_ms + 1, step_ms):
        while i < len(pts) and pts[i][0] <= t:
            last = pts[i]
            i += 1
        if last is not None and last[0] > t - LOOKBACK_MS:
            values.append([t / 1000.0, last[1]])
    return values


def step_average(buckets: list[Bucket], start_ms: int, end_ms: int, step_ms: int) -> list[list[float]]:
    """Average over the buckets in [t - step, t) for each step t (sum of sums over sum of counts)."""
    values = []
    lo = hi = 0
    total, count = 0.0, 0
    for t in range(start_ms, end_ms + 1, step_ms):
        while hi < len(buckets) and buckets[hi][0] < t:
            total += buckets[hi][3]
            count += buckets[hi][4]
            hi += 1
        while lo < hi and buckets[lo][0] < t - step_ms:
            total -= buckets[lo][3]
            count -= buckets[lo][4]
            lo += 1
        if count:
            values.append([t / 1000.0, total / count])
    return values


def resolution(start: float, end: float, step: float) -> str:
    """Which data answers a range query: ``raw`` for ranges up to 6 hours (and for steps under a
    minute), else the coarsest rollup the step allows: ``1h`` for steps of an hour or more, ``1m``
    for a minute or more. Keep raw retention longer than 6 hours so short ranges find raw data."""
    if (end - start) * 1000 <= RAW_RANGE_MS or step < 60:
        return "raw"
    return "1h" if step >= 3600 else "1m"


class Reads:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._point_labels: dict[int, dict[str, str]] = {}  # series id -> its labels, __name__ included
        self._labels_lock = threading.Lock()

    def query_range(
        self, metric: str, matchers: Mapping[str, str], start: float, end: float, step: float
    ) -> list[RangeSeries]:
        """Each matching series every ``step`` seconds from ``start`` to ``end``.

        Raw resolution: the newest value at or before each step, no older than 5 minutes (Prometheus's
        instant-vector semantics). Rollup resolution (long ranges, see ``resolution``): the average of
        the samples in the ``step`` seconds before each step."""
        start_ms, end_ms, step_ms = int(start * 1000), int(end * 1000), max(1, int(step * 1000))
        res = resolution(start, end, step)
        with self._db.engine.connect() as conn:
            series = self._matching_series(conn, metric, matchers)
            if not series:
                return []
            if res == "raw":
                by_sid = self._raw_points(conn, list(series), start_ms - LOOKBACK_MS, end_ms)
                result = [
                    RangeSeries(
                        metric=series[sid], values=step_latest(by_sid.get(sid, []), start_ms, end_ms, step_ms)
                    )
                    for sid in series
                ]
            else:
                buckets = self._rollup_buckets(conn, res, list(series), start_ms - step_ms, end_ms)
                result = [
                    RangeSeries(
                        metric=series[sid],
                        values=step_average(buckets.get(sid, []), start_ms, end_ms, step_ms),
                    )
                    for sid in series
                ]
        return sorted((r for r in result if r["values"]), key=lambda r: sorted(r["metric"].items()))

    def _matching_series(
        self, conn: Connection, metric: str, matchers: Mapping[str, str]
    ) -> dict[int, dict[str, str]]:
        out = {}
        for sid, labels_json in conn.execute(
            select(schema.series.c.id, schema.series.c.labels).where(schema.series.c.metric == metric)
        ):
            labels = json.loads(labels_json)
            if all(labels.get(k, "") == v for k, v in matchers.items()):
                out[sid] = {"__name__": metric, **labels}
        return out

    def _raw_points(
        self, conn: Connection, sids: list[int], lo: int, hi: int
    ) -> dict[int, list[tuple[int, float]]]:
        """Samples of these series with lo < ts <= hi, time-sorted, from every raw layout present."""
        out: dict[int, list[tuple[int, float]]] = {}
        rows: list[tuple[int, int, float]] = []
        if self._db.dialect == "postgresql":
            rows += conn.execute(
                text(
                    f"SELECT c.series_id, p.ts, p.value FROM {chunks.ALL_CHUNKS} c {chunks.POINTS} "
                    "WHERE c.series_id = ANY(:sids) AND c.start_ms <= :hi AND c.start_ms > :lo - :hour "
                    "AND c.end_ms > :lo AND p.ts > :lo AND p.ts <= :hi"
                ),
                {"sids": sids, "lo": lo, "hi": hi, "hour": chunks.HOUR_MS},
            ).all()
        s = schema.samples.c
        for i in range(0, len(sids), 500):
            rows += conn.execute(
                select(s.series_id, s.ts, s.value).where(
                    s.series_id.in_(sids[i : i + 500]), s.ts > lo, s.ts <= hi
                )
            ).all()
        for sid, t, v in rows:
            out.setdefault(sid, []).append((t, v))
        for pl in out.values():
            pl.sort()
        return out

    def _rollup_buckets(
        self, conn: Connection, res: str, sids: list[int], lo: int, hi: int
    ) -> dict[int, list[Bucket]]:
        """(bucket_ms, min, max, sum, count) per series for buckets in [lo, hi): rollup rows up to the
        rollup watermark, the newest stretch (not rolled up yet) computed from raw samples."""
        table = schema.rollup_1h if res == "1h" else schema.rollup_1m
        width = 3_600_000 if res == "1h" else 60_000
        until = conn.execute(
            select(schema.store_state.c.value).where(schema.store_state.c.key == "rollup_until")
        ).scalar()
        done: int = until if until is not None else lo
        if res == "1h":
            done = done // width * width
        out: dict[int, list[Bucket]] = {}
        r = table.c
        for i in range(0, len(sids), 500):
            for sid, b, mn, mx, sm, n in conn.execute(
                select(r.series_id, r.bucket_ms, r.vmin, r.vmax, r.vsum, r.n).where(
                    r.series_id.in_(sids[i : i + 500]), r.bucket_ms >= lo, r.bucket_ms < min(hi, done)
                )
            ):
                out.setdefault(sid, []).append((b, mn, mx, sm, n))
        if done < hi:
            for sid, pl in self._raw_points(conn, sids, max(lo, done) - 1, hi - 1).items():
                agg: dict[int, tuple[float, float, float, int]] = {}
                for t, v in pl:
                    mn, mx, sm, n = agg.get(t // width * width, (v, v, 0.0, 0))
                    agg[t // width * width] = (min(mn, v), max(mx, v), sm + v, n + 1)
                out.setdefault(sid, []).extend((b, *a) for b, a in sorted(agg.items()))
        for bl in out.values():
            bl.sort()
        return out

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
        """Every GPU known: identity, last-seen time, and the newest value of each of its series."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        q = (
            select(
                schema.series.c.id,
                schema.series.c.metric,
                schema.series.c.labels,
                schema.series.c.uuid,
                schema.latest.c.ts,
                schema.latest.c.value,
            )
            .join(schema.latest, schema.latest.c.series_id == schema.series.c.id)
            .where(schema.series.c.uuid.is_not(None))
        )
        gpus: dict[str, GpuRecord] = {}
        # Per GPU, (metric, labels beyond identity) -> index in its metric's list: series that differ only
        # in identity labels (a pod that changed) show as one, the newest.
        slots: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], int]] = {}
        with self._db.engine.connect() as conn:
            for sid, metric, labels_json, uuid, ts, value in conn.execute(q):
                labels = self._series_labels(sid, metric, labels_json)
                g = gpus.get(uuid)
                if g is None:
                    g = gpus[uuid] = GpuRecord(uuid=uuid, identity={}, last_seen_ms=0, stale=False)
                if ts >= g.last_seen_ms:
                    g.last_seen_ms = ts
                    g.identity.update((k, labels[k]) for k in GPU_IDENTITY if k in labels)
                extra = {k: v for k, v in labels.items() if k not in GPU_IDENTITY and k != "__name__"}
                if metric == GPU_INFO:
                    g.info = extra
                    continue
                series = g.metrics.setdefault(metric, [])
                key = (metric, tuple(sorted(extra.items())))
                at = slots.setdefault(uuid, {}).get(key)
                if at is None:
                    slots[uuid][key] = len(series)
                    series.append(GpuValue(extra, value, ts))
                elif ts >= series[at].ts:
                    series[at] = GpuValue(extra, value, ts)
        for g in gpus.values():
            g.stale = now_ms - g.last_seen_ms > stale_after_ms
        return sorted(
            gpus.values(),
            key=lambda g: (
                g.identity.get("cluster", ""),
                g.identity.get("node", ""),
                int(g.identity.get("gpu", 0) or 0),
            ),
        )

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
