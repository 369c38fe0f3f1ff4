"""Prometheus remote-write 1.0 codec: snappy-compressed protobuf ``WriteRequest``.

The message classes are built at import time from a descriptor that mirrors
``prometheus/prompb/{types,remote}.proto`` (field numbers are the wire
contract), so no generated ``_pb2`` module has to track the protobuf runtime.

A receiver decodes with ``decode_batch``: column by column, and each series'
labels only the first time they are seen. The request is read through a second
descriptor in which ``WriteRequest.timeseries`` is ``repeated bytes`` (a
length-delimited message and a bytes field are the same on the wire), so each
series arrives as its encoded ``TimeSeries``. Its leading ``labels`` fields are
its key (``LabelKey``), looked up rather than decoded again. Behind them, the
samples every encoder writes for a non-zero value at a time from 2001 to 2109
(value, then the time as a 6-byte varint: 18 bytes a sample with its tag and
length) are read with one ``struct`` call for the values, and the times are
decoded once per request for all the series sampled at the same instants. A
series laid out any other way (a zero value, which encoders leave out, an old
timestamp, exemplars, labels after samples) is parsed as a message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cramjam
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CONTENT_TYPE = "application/x-protobuf"
CONTENT_ENCODING = "snappy"
PROTOCOL_VERSION = "0.1.0"

METRIC_TYPES = {
    "unknown": 0,
    "counter": 1,
    "gauge": 2,
    "histogram": 3,
    "gaugehistogram": 4,
    "summary": 5,
    "info": 6,
    "stateset": 7,
}
_METRIC_TYPE_NAMES = {v: k for k, v in METRIC_TYPES.items()}


class RemoteWriteError(ValueError):
    """A request body that is not a valid remote-write 1.0 message."""


class TooLarge(RemoteWriteError):
    """The body would inflate past the configured cap."""


def _build_messages() -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="gpufleet/prompb.proto", package="prometheus", syntax="proto3"
    )
    F = descriptor_pb2.FieldDescriptorProto

    def msg(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg_, bytes_ = F.TYPE_MESSAGE, F.TYPE_BYTES
    msg("Label", ("name", 1, F.TYPE_STRING, opt, ""), ("value", 2, F.TYPE_STRING, opt, ""))
    msg("Sample", ("value", 1, F.TYPE_DOUBLE, opt, ""), ("timestamp", 2, F.TYPE_INT64, opt, ""))
    msg(
        "Exemplar",
        ("labels", 1, F.TYPE_MESSAGE, rep, ".prometheus.Label"),
        ("value", 2, F.TYPE_DOUBLE, opt, ""),
        ("timestamp", 3, F.TYPE_INT64, opt, ""),
    )
    # Native histograms are recognised (field 4) so they can be counted and refused, not silently lost.
    msg("Histogram", ("timestamp", 15, F.TYPE_INT64, opt, ""))
    msg(
        "TimeSeries",
        ("labels", 1, F.TYPE_MESSAGE, rep, ".prometheus.Label"),
        ("samples", 2, F.TYPE_MESSAGE, rep, ".prometheus.Sample"),
        ("exemplars", 3, F.TYPE_MESSAGE, rep, ".prometheus.Exemplar"),
        ("histograms", 4, F.TYPE_MESSAGE, rep, ".prometheus.Histogram"),
    )
    msg(
        "MetricMetadata",
        ("type", 1, F.TYPE_INT32, opt, ""),
        ("metric_family_name", 2, F.TYPE_STRING, opt, ""),
        ("help", 4, F.TYPE_STRING, opt, ""),
        ("unit", 5, F.TYPE_STRING, opt, ""),
    )
    msg(
        "WriteRequest",
        ("timeseries", 1, F.TYPE_MESSAGE, rep, ".prometheus.TimeSeries"),
        ("metadata", 3, F.TYPE_MESSAGE, rep, ".prometheus.MetricMetadata"),
    )
    # The receiver's view of the same bytes (see the module's docstring).
    msg(
        "WriteRequestRaw",
        ("timeseries", 1, bytes_, rep, ""),
        ("metadata", 3, msg_, rep, ".prometheus.MetricMetadata"),
    )
    msg(
        "TimeSeriesRaw",
        ("labels", 1, bytes_, rep, ""),
        ("samples", 2, msg_, rep, ".prometheus.Sample"),
        ("exemplars", 3, bytes_, rep, ""),
        ("histograms", 4, bytes_, rep, ""),
    )
    msg("LabelList", ("labels", 1, msg_, rep, ".prometheus.Label"))
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(fd.message_types_by_name[name])
        for name in ("WriteRequest", "TimeSeries", "WriteRequestRaw", "TimeSeriesRaw", "LabelList")
    }


_MESSAGES = _build_messages()
WriteRequestMessage = _MESSAGES["WriteRequest"]
_RawRequest = _MESSAGES["WriteRequestRaw"]
_RawSeries = _MESSAGES["TimeSeriesRaw"]
_LabelList = _MESSAGES["LabelList"]

# A series' labels as they are on the wire: its ``labels`` fields (tag, length, ``Label`` message), in the
# order sent. The same labels sent the same way have the same key.
LabelKey = bytes


@dataclass(slots=True)
class Series:
    """One time series: its labels (``__name__`` included) and (timestamp_ms, value) samples."""

    labels: dict[str, str]
    samples: list[tuple[int, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.labels.get("__name__", "")


@dataclass(frozen=True, slots=True)
class Metadata:
    name: str
    type: str = "unknown"
    help: str = ""
    unit: str = ""


@dataclass(slots=True)
class WriteRequest:
    series: list[Series]
    metadata: list[Metadata] = field(default_factory=list)
    # Parts of the request this codec cannot represent (native histograms); the receiver reports them.
    histograms_ignored: int = 0
    exemplars_ignored: int = 0

    @property
    def sample_count(self) -> int:
        return sum(len(s.samples) for s in self.series)


class LabelSet:
    """A series' labels, decoded once: ``key`` (see ``LabelKey``), ``labels`` (``__name__`` included)
    and ``name``. Two series with the same labels sent in the same order share one key. ``repeated``: a
    label name the series sends more than once (``labels`` keeps its last value), else None; a receiver
    refuses such a series, as Prometheus does, rather than store one of its values."""

    __slots__ = ("key", "labels", "name", "repeated")

    def __init__(self, key: LabelKey, labels: dict[str, str], repeated: str | None = None) -> None:
        self.key = key
        self.labels = labels
        self.name = labels.get("__name__", "")
        self.repeated = repeated

    @classmethod
    def of(cls, labels: Mapping[str, str]) -> LabelSet:
        """The label set of labels given as a mapping, keyed as an encoder sends them in that order."""
        return cls(b"".join(_label_field(k, v) for k, v in labels.items()), dict(labels))

    @classmethod
    def parse(cls, key: LabelKey) -> LabelSet:
        try:
            parsed = _LabelList()
            parsed.ParseFromString(key)
            labels = {lab.name: lab.value for lab in parsed.labels}
        except Exception as exc:
            raise RemoteWriteError(f"a series' labels are not remote-write Labels: {exc}") from None
        repeated = None
        if len(labels) != len(parsed.labels):  # parsed once per new label set: the fast path never comes here
            seen: set[str] = set()
            for lab in parsed.labels:
                if lab.name in seen:
                    repeated = lab.name
                    break
                seen.add(lab.name)
        return cls(key, labels, repeated)

    def __repr__(self) -> str:
        return f"LabelSet({self.labels!r})"


def _label_field(name: str, value: str) -> bytes:
    """A ``labels`` field of a TimeSeries. A proto3 encoder leaves out empty strings; so does this."""
    out = bytearray()
    for tag, text in ((0x0A, name), (0x12, value)):
        if text:
            raw = text.encode()
            out.append(tag)
            out += _varint(len(raw))
            out += raw
    return b"\x0a" + _varint(len(out)) + bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class KnownLabelSets:
    """The label sets a receiver has accepted, by key, so each is decoded and checked once. Holds at
    most ``max_size``; past that it starts over (a fleet's series churn: pods and jobs come and go)."""

    def __init__(self, max_size: int = 1_000_000) -> None:
        self.max_size = max_size
        self._sets: dict[LabelKey, LabelSet] = {}

    def admit(self, new: Mapping[LabelKey, LabelSet]) -> None:
        """Keep ``new`` (a batch's label sets that were not known, once the batch is stored)."""
        if len(self._sets) + len(new) > self.max_size:
            self._sets = {}
        self._sets.update(new)

    def __len__(self) -> int:
        return len(self._sets)


@dataclass(slots=True)
class SeriesBatch:
    """A decoded request, column by column: series i has ``label_sets[i]``, ``timestamps[i]`` (Unix ms)
    and ``values[i]``, in the order sent. ``new``: the label sets not among the known ones. Series
    sampled at the same instants may share one list of timestamps: the lists are read-only."""

    label_sets: list[LabelSet]
    timestamps: list[list[int]]
    values: list[Sequence[float]]
    new: dict[LabelKey, LabelSet] = field(default_factory=dict)
    metadata: list[Metadata] = field(default_factory=list)
    histograms_ignored: int = 0
    exemplars_ignored: int = 0

    @property
    def sample_count(self) -> int:
        return sum(map(len, self.timestamps))

    @classmethod
    def of(cls, series: Iterable[Series]) -> SeriesBatch:
        out = cls([], [], [])
        for s in series:
            out.label_sets.append(LabelSet.of(s.labels))
            out.timestamps.append([int(t) for t, _ in s.samples])
            out.values.append([v for _, v in s.samples])
        return out

    def series(self) -> list[Series]:
        return [
            Series(dict(ls.labels), list(zip(ts, vs, strict=True)))
            for ls, ts, vs in zip(self.label_sets, self.timestamps, self.values, strict=True)
        ]


def encode(series: Iterable[Series], metadata: Sequence[Metadata] = ()) -> bytes:
    """Serialise and snappy-compress (block format, as remote-write requires)."""
    req = WriteRequestMessage()
    for s in series:
        ts = req.timeseries.add()
        # Labels must be sorted by name on the wire; receivers such as Prometheus reject unsorted ones.
        for k in sorted(s.labels):
            lab = ts.labels.add()
            lab.name = k
            lab.value = s.labels[k]
        for t, v in s.samples:
            smp = ts.samples.add()
            smp.timestamp = int(t)
            smp.value = float(v)
    for m in metadata:
        md = req.metadata.add()
        md.type = METRIC_TYPES.get(m.type, 0)
        md.metric_family_name = m.name
        md.help = m.help
        md.unit = m.unit
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


def uncompressed_length(body: bytes) -> int:
    """Length announced in a snappy block's varint preamble, read without inflating anything."""
    result = shift = 0
    for i, byte in enumerate(body[:10]):
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
        if i == 4:
            break
    raise RemoteWriteError(
        "body is not snappy block format (bad length preamble); "
        "remote-write 1.0 needs Content-Encoding: snappy, block format, not framed"
    )


def _inflate(body: bytes, max_uncompressed: int) -> bytes:
    size = uncompressed_length(body)
    if size > max_uncompressed:
        raise TooLarge(
            f"body inflates to {size} bytes, over the {max_uncompressed}-byte limit; "
            "send smaller batches (Prometheus: queue_config.max_samples_per_send)"
        )
    try:
        return bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam raises its own DecompressionError
        raise RemoteWriteError(f"body is not valid snappy block data: {exc}") from None


# Samples as encoders write them for a time from 2001 to 2109 (a 6-byte varint): 0x12 and the sample's
# length, then a non-zero value (0x09 and 8 bytes) and the time (0x10 and the varint): 18 bytes; or, for
# the value 0, which proto3 encoders leave out, only the time: 9 bytes.
_VALUE_SAMPLE, _ZERO_SAMPLE = 18, 9
_REGULAR_MAX = 64  # samples of one series read by one cached struct; more (a backfill) are parsed
_VALUE_TAGS, _ZERO_TAGS = b"\x12\x10\x09", b"\x12\x07\x10"
_LAYOUTS: dict[tuple[int, int], tuple[struct.Struct, struct.Struct]] = {}


def _layout(size: int, n: int) -> tuple[struct.Struct, struct.Struct]:
    """For ``n`` samples of ``size`` bytes: their values, and everything else (tags and times)."""
    layout = _LAYOUTS.get((size, n))
    if layout is None:
        if size == _VALUE_SAMPLE:
            layout = (struct.Struct("<" + "3xd7x" * n), struct.Struct("<" + "3s8xc6s" * n))
        else:
            layout = (struct.Struct(""), struct.Struct("<" + "3s6s" * n))
        _LAYOUTS[size, n] = layout
    return layout


def _regular_times(skeleton: tuple[bytes, ...]) -> list[int] | None:
    """The times of a run of regular samples (all with a value, or all 0) from everything but their
    values; None if any sample is not laid out that way."""
    if skeleton[:1] == (_VALUE_TAGS,):
        n = len(skeleton) // 3
        if skeleton[0::3] != (_VALUE_TAGS,) * n or skeleton[1::3] != (b"\x10",) * n:
            return None
        varints = skeleton[2::3]
    else:
        n = len(skeleton) // 2
        if skeleton[0::2] != (_ZERO_TAGS,) * n:
            return None
        varints = skeleton[1::2]
    out = []
    for t in varints:
        if t[5] & 0x80 or not t[0] & t[1] & t[2] & t[3] & t[4] & 0x80:
            return None
        out.append(
            (t[0] & 0x7F)
            | (t[1] & 0x7F) << 7
            | (t[2] & 0x7F) << 14
            | (t[3] & 0x7F) << 21
            | (t[4] & 0x7F) << 28
            | t[5] << 35
        )
    return out


def _labels_end(raw: bytes) -> int:
    """Where the leading ``labels`` fields of an encoded TimeSeries end."""
    i, n = 0, len(raw)
    while i + 1 < n and raw[i] == 0x0A:
        length = raw[i + 1]
        i += 2
        if length & 0x80:  # a label of 128 bytes or more: a longer varint
            length &= 0x7F
            shift = 7
            while i < n and shift < 35:
                length |= (raw[i] & 0x7F) << shift
                i += 1
                if not raw[i - 1] & 0x80:
                    break
                shift += 7
        i += length
    return i if i < n else n


def decode_batch(
    body: bytes, max_uncompressed: int = 64 << 20, known: KnownLabelSets | None = None
) -> SeriesBatch:
    """Inflate and parse a remote-write body into columns. Labels whose key is in ``known`` are not decoded
    again; the others are, and are listed in ``new`` (the caller admits them once it accepts them).
    Series sampled at the same instants may share one list of timestamps: treat the lists as read-only.
    Refuses a body announcing more than ``max_uncompressed``."""
    raw = _inflate(body, max_uncompressed)
    msg = _RawRequest()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:
        raise RemoteWriteError(f"body is not a remote-write WriteRequest protobuf: {exc}") from None
    sets: list[LabelSet] = []
    times: list[list[int]] = []
    values: list[Sequence[float]] = []
    new: dict[LabelKey, LabelSet] = {}
    histograms = exemplars = 0
    lookup = known._sets.get if known is not None else new.get
    layouts = _LAYOUTS.get
    # The last run of each layout and its times: series sampled at the same instants share them.
    last: dict[int, tuple[tuple[bytes, ...], list[int] | None]] = {}
    for encoded in msg.timeseries:
        end = _labels_end(encoded)
        size = len(encoded) - end
        if size:  # which regular layout the first sample would have
            size = _VALUE_SAMPLE if encoded[end + 1] == 0x10 else _ZERO_SAMPLE
        n, rest = divmod(len(encoded) - end, size or _VALUE_SAMPLE)
        if not rest and n <= _REGULAR_MAX:
            vals, others = layouts((size, n)) or _layout(size, n)
            skeleton = others.unpack_from(encoded, end)
            seen = last.get(size)
            if seen is not None and seen[0] == skeleton:
                last_times = seen[1]
            else:
                last_times = _regular_times(skeleton) if n else []
                last[size] = (skeleton, last_times)
            if last_times is not None:
                key = encoded[:end]
                ls = lookup(key) or new.get(key)
                if ls is None:
                    ls = new[key] = LabelSet.parse(key)
                sets.append(ls)
                times.append(last_times)
                values.append(vals.unpack_from(encoded, end) if size == _VALUE_SAMPLE else (0.0,) * n)
                continue
        try:
            series = _RawSeries()
            series.ParseFromString(encoded)
        except Exception as exc:
            raise RemoteWriteError(f"a series is not a remote-write TimeSeries: {exc}") from None
        key = b"".join(b"\x0a" + _varint(len(lab)) + lab for lab in series.labels)
        ls = lookup(key) or new.get(key)
        if ls is None:
            ls = new[key] = LabelSet.parse(key)
        sets.append(ls)
        times.append([x.timestamp for x in series.samples])
        values.append([x.value for x in series.samples])
        histograms += len(series.histograms)
        exemplars += len(series.exemplars)
    return SeriesBatch(
        sets,
        times,
        values,
        new,
        [
            Metadata(m.metric_family_name, _METRIC_TYPE_NAMES.get(m.type, "unknown"), m.help, m.unit)
            for m in msg.metadata
        ],
        histograms,
        exemplars,
    )


def decode(body: bytes, max_uncompressed: int = 64 << 20) -> WriteRequest:
    """Inflate and parse a remote-write body. Refuses a body announcing more than ``max_uncompressed``."""
    batch = decode_batch(body, max_uncompressed)
    return WriteRequest(batch.series(), batch.metadata, batch.histograms_ignored, batch.exemplars_ignored)
