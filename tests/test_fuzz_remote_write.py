"""Fuzzing the remote-write decoder: whatever bytes arrive, it answers with RemoteWriteError or a request,
never another exception, and never inflates more than its cap."""

from __future__ import annotations

import contextlib
import math

import cramjam
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.core import remote_write as rw

label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
label_values = st.text(
    max_size=40
)  # any Unicode, control characters and surrogate-free astral planes included
series = st.builds(
    lambda name, labels, samples: rw.Series({"__name__": name, **labels}, samples),
    label_names,
    st.dictionaries(label_names.filter(lambda k: k != "__name__"), label_values, max_size=6),
    st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True)),
        max_size=5,
    ),
)


@given(st.lists(series, max_size=8))
@settings(max_examples=300, deadline=None)
def test_whatever_is_encoded_decodes_to_the_same_labels_and_samples(items):
    out = rw.decode(rw.encode(items))
    assert [s.labels for s in out.series] == [s.labels for s in items]
    for got, sent in zip(out.series, items, strict=True):
        assert [t for t, _ in got.samples] == [t for t, _ in sent.samples]
        for (_, a), (_, b) in zip(got.samples, sent.samples, strict=True):
            assert a == b or (math.isnan(a) and math.isnan(b))


@given(st.lists(series, min_size=1, max_size=4), st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_valid_body_with_bytes_flipped_never_crashes_the_decoder(items, data):
    body = bytearray(rw.encode(items))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(rw.RemoteWriteError):
        rw.decode(bytes(body), max_uncompressed=1 << 16)


@given(st.binary(min_size=1, max_size=2000))
@settings(max_examples=300, deadline=None)
def test_any_snappy_payload_is_either_a_write_request_or_a_clear_error(payload):
    try:
        rw.decode(bytes(cramjam.snappy.compress_raw(payload)))
    except rw.RemoteWriteError as exc:
        assert "WriteRequest" in str(exc) or "snappy" in str(exc)


@given(st.integers(1 << 16, (1 << 32) - 1), st.binary(max_size=64))  # snappy lengths are uint32
@settings(max_examples=200, deadline=None)
def test_a_body_announcing_more_than_the_cap_is_refused_before_inflating(announced, tail):
    pre = bytearray()
    n = announced
    while True:
        b, n = n & 0x7F, n >> 7
        pre.append(b | (0x80 if n else 0))
        if not n:
            break
    try:
        rw.decode(bytes(pre) + tail, max_uncompressed=(1 << 16) - 1)
    except rw.TooLarge:
        pass
    else:
        raise AssertionError("accepted a body announcing more than the cap")
