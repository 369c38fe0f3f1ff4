"""Prometheus remote-write 1.0 codec: snappy-compressed protobuf ``WriteRequest``.

The message classes are built at import time from a descriptor that mirrors
``prometheus/prompb/{types,remote}.proto`` (field numbers are the wire
contract), so no generated ``_pb2`` module has to track the protobuf runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(fd.message_types_by_name[name])
        for name in ("WriteRequest", "TimeSeries")
    }


_MESSAGES = _build_messages()
WriteRequestMessage = _MESSAGES["WriteRequest"]


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


def decode(body: bytes, max_uncompressed: int = 64 << 20) -> WriteRequest:
    """Inflate and parse a remote-write body. Refuses a body announcing more than ``max_uncompressed``."""
    size = uncompressed_length(body)
    if size > max_uncompressed:
        raise TooLarge(
            f"body inflates to {size} bytes, over the {max_uncompressed}-byte limit; "
            "send smaller batches (Prometheus: queue_config.max_samples_per_send)"
        )
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam raises its own DecompressionError
        raise RemoteWriteError(f"body is not valid snappy block data: {exc}") from None
    msg = WriteRequestMessage()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:
        raise RemoteWriteError(f"body is not a remote-write WriteRequest protobuf: {exc}") from None
    out = WriteRequest(series=[])
    for ts in msg.timeseries:
        labels = {lab.name: lab.value for lab in ts.labels}
        samples = [(smp.timestamp, smp.value) for smp in ts.samples]
        out.series.append(Series(labels, samples))
        out.histograms_ignored += len(ts.histograms)
        out.exemplars_ignored += len(ts.exemplars)
    out.metadata = [
        Metadata(m.metric_family_name, _METRIC_TYPE_NAMES.get(m.type, "unknown"), m.help, m.unit)
        for m in msg.metadata
    ]
    return out
