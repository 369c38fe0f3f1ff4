"""The remote-write codec: what the agent sends is what the collector reads, and bad bodies are refused."""

from __future__ import annotations

import contextlib

import cramjam
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.core import remote_write as rw

label_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
label_value = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=True)


@st.composite
def series_lists(draw):
    out = []
    for _ in range(draw(st.integers(0, 5))):
        labels = draw(st.dictionaries(label_name.filter(lambda k: k != "__name__"), label_value, max_size=6))
        labels["__name__"] = draw(label_name)
        samples = draw(st.lists(st.tuples(st.integers(-(2**62), 2**62), finite), max_size=8))
        out.append(rw.Series(labels, samples))
    return out


@given(series_lists())
@settings(max_examples=200, deadline=None)
def test_round_trip_keeps_every_label_and_sample(series):
    decoded = rw.decode(rw.encode(series))
    assert [(s.labels, s.samples) for s in decoded.series] == [(s.labels, s.samples) for s in series]


def test_labels_are_sorted_on_the_wire_as_prometheus_requires():
    body = rw.encode([rw.Series({"z": "1", "__name__": "m", "a": "2"}, [(1, 1.0)])])
    msg = rw.WriteRequestMessage()
    msg.ParseFromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert [lab.name for lab in msg.timeseries[0].labels] == ["__name__", "a", "z"]


def test_metadata_round_trip():
    body = rw.encode([], [rw.Metadata("gpufleet_gpu_up", "gauge", "1 when up")])
    assert rw.decode(body).metadata == [rw.Metadata("gpufleet_gpu_up", "gauge", "1 when up")]


def test_a_snappy_bomb_is_refused_before_it_is_inflated():
    # 200 MiB of zeros compresses to about 9 MiB... but the preamble already says how big it would be.
    huge = bytes(cramjam.snappy.compress_raw(b"\0" * (8 << 20)))
    with pytest.raises(rw.TooLarge, match="over the 1048576-byte limit"):
        rw.decode(huge, max_uncompressed=1 << 20)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "not snappy block format"),
        (b"\xff\xff\xff\xff\xff\xff", "not snappy block format"),
        (b"\x10garbage-not-snappy", "not valid snappy"),
        (bytes(cramjam.snappy.compress_raw(b"\x0a\x05\xff\xff")), "not a remote-write WriteRequest"),
    ],
)
def test_bad_bodies_get_an_error_that_names_the_problem(body, message):
    with pytest.raises(rw.RemoteWriteError, match=message):
        rw.decode(body)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_crash_the_decoder(body):
    with contextlib.suppress(rw.RemoteWriteError):
        rw.decode(body, max_uncompressed=1 << 16)
