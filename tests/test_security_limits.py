"""Hostile input: oversized bodies, snappy bombs, too many series, labels or characters get a clear 4xx,
and nothing of a refused request is stored."""

from __future__ import annotations

import cramjam
import pytest
import urllib3

from gpufleet.collector.app import Limits
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core import remote_write as rw
from tests.conftest import free_port

LIMITS = Limits(
    max_body_bytes=64 << 10,
    max_uncompressed_bytes=256 << 10,
    max_series=50,
    max_samples=200,
    max_labels=8,
    max_label_length=64,
)


@pytest.fixture
def collector(db_url):
    port = free_port()
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{port}", db=db_url, limits=LIMITS)).start()
    yield c, f"http://127.0.0.1:{port}/api/v1/write"
    c.close()


def post(url: str, body: bytes, **headers: str) -> urllib3.BaseHTTPResponse:
    return urllib3.request(
        "POST",
        url,
        body=body,
        headers={"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf", **headers},
    )


def good(n: int = 10) -> list[rw.Series]:
    return [rw.Series({"__name__": "gpufleet_gpu_up", "uuid": f"GPU-{i}"}, [(1000, 1.0)]) for i in range(n)]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


CASES = [
    (
        "a snappy bomb (1 GiB announced)",
        lambda: varint(1 << 30) + b"\x00" * 32,
        413,
        "inflates to 1073741824 bytes",
    ),
    ("a body over the byte cap", lambda: rw.encode(good()) + b"\x00" * (65 << 10), 413, "byte limit"),
    ("not snappy at all", lambda: b"\xff" * 12, 400, "not snappy"),
    (
        "snappy that lies about its size",
        lambda: varint(100) + bytes(cramjam.snappy.compress_raw(b"x" * 50))[1:],
        400,
        "snappy",
    ),
    (
        "snappy of something that is not protobuf",
        lambda: bytes(cramjam.snappy.compress_raw(b"\xff" * 40)),
        400,
        "WriteRequest",
    ),
    ("too many series", lambda: rw.encode(good(51)), 413, "over the limit of 50"),
    (
        "too many samples",
        lambda: rw.encode([rw.Series({"__name__": "x"}, [(i, 1.0) for i in range(201)])]),
        413,
        "over the limit of 200",
    ),
    (
        "too many labels",
        lambda: rw.encode(
            good() + [rw.Series({"__name__": "x", **{f"l{i}": "v" for i in range(9)}}, [(1, 1.0)])]
        ),
        400,
        "has 10 labels, over the limit of 8",
    ),
    (
        "a label too long",
        lambda: rw.encode(good() + [rw.Series({"__name__": "x", "pod": "p" * 65}, [(1, 1.0)])]),
        400,
        "label pod is 65 characters",
    ),
    (
        "a bad label name",
        lambda: rw.encode(good() + [rw.Series({"__name__": "x", "bad-name": "v"}, [(1, 1.0)])]),
        400,
        "not a valid label name",
    ),
    (
        "a series without a name",
        lambda: rw.encode(good() + [rw.Series({"uuid": "GPU-9"}, [(1, 1.0)])]),
        400,
        "no __name__",
    ),
]


@pytest.mark.parametrize("what,make,status,says", CASES, ids=[c[0] for c in CASES])
def test_hostile_requests_get_a_clear_4xx_and_nothing_of_them_is_stored(collector, what, make, status, says):
    c, url = collector
    resp = post(url, make())
    assert resp.status == status, resp.data
    assert says in resp.json()["error"]
    assert c.store.counts() == {"series": 0, "samples": 0}
    assert post(url, rw.encode(good())).status == 204  # and the collector goes on taking good writes
    assert c.store.counts()["samples"] == 10


def test_limits_are_flags_of_the_collector_command():
    from click.testing import CliRunner

    from gpufleet.cli import main

    out = CliRunner().invoke(main, ["collector", "--help"]).output
    for flag in (
        "--max-body-bytes",
        "--max-uncompressed-bytes",
        "--max-series",
        "--max-samples",
        "--max-labels",
        "--max-label-length",
        "--max-inflight-writes",
    ):
        assert flag in out
