"""Hostile input: oversized bodies, snappy bombs, too many series, labels or characters get a clear 4xx,
and nothing of a refused request is stored."""

from __future__ import annotations

import itertools
import os
import random
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import cramjam
import pytest
import urllib3

from gpufleet.collector.app import Limits
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until

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
    now = int(time.time() * 1000)
    return [rw.Series({"__name__": "gpufleet_gpu_up", "uuid": f"GPU-{i}"}, [(now, 1.0)]) for i in range(n)]


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


# ---- the limits as an operator sets them: `gpufleet collector --max-...` -----------------------------
SMALL = {
    "--max-body-bytes": 1024,
    "--max-series": 5,
    "--max-samples": 20,
    "--max-labels": 4,  # __name__ counts
    "--max-label-length": 24,
}


@pytest.fixture(scope="module")
def small_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gpufleet collector` started from the command line with small limits; yields its base URL."""
    port = free_port()
    db = tmp_path_factory.mktemp("limits") / "limits.db"
    flags = [str(x) for kv in SMALL.items() for x in kv]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.cli", "collector", "--db", f"sqlite:///{db}"]
        + ["--listen", f"127.0.0.1:{port}", "--eval-interval", "60", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "collector exited")
        try:
            return urllib3.request("GET", url + "/healthz", retries=False).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    wait_until(up, timeout=60, interval=0.2)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def received(url: str) -> float:
    text = urllib3.request("GET", url + "/metrics").data.decode()
    return next(
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith("gpufleet_collector_samples_received_total")
    )


_ts = itertools.count(int(time.time() * 1000))


def gpus(n: int, **labels: str) -> list[rw.Series]:
    return [
        rw.Series({"__name__": "gpufleet_gpu_up", "uuid": f"GPU-{i}", **labels}, [(next(_ts), 1.0)])
        for i in range(n)
    ]


def samples(n: int) -> list[rw.Series]:
    return [rw.Series({"__name__": "gpufleet_gpu_up", "uuid": "GPU-0"}, [(next(_ts), 1.0) for _ in range(n)])]


def labelled(n: int) -> list[rw.Series]:
    """One series with ``n`` labels, __name__ included."""
    return gpus(1, **{f"l{i}": "v" for i in range(n - 2)})


def body_of(size: int) -> bytes:
    """A valid write of exactly ``size`` bytes on the wire (within every other limit), padded with help text."""
    rng = random.Random(size)
    series = gpus(2)
    for length in range(2 * size):
        help_text = "".join(rng.choice(string.ascii_letters) for _ in range(length))
        body = rw.encode(series, [rw.Metadata("gpufleet_gpu_up", "gauge", help_text)])
        if len(body) == size:
            return body
    raise AssertionError(f"no write of exactly {size} bytes")


LIMIT_CASES = [
    (
        "--max-body-bytes",
        lambda: body_of(1024),
        lambda: body_of(1025),
        413,
        "is over the 1024-byte limit; send smaller batches",
    ),
    (
        "--max-series",
        lambda: rw.encode(gpus(5)),
        lambda: rw.encode(gpus(6)),
        413,
        "too many series: 6 in one request, over the limit of 5",
    ),
    (
        "--max-samples",
        lambda: rw.encode(samples(20)),
        lambda: rw.encode(samples(21)),
        413,
        "too many samples: 21 in one request, over the limit of 20",
    ),
    (
        "--max-labels",
        lambda: rw.encode(labelled(4)),
        lambda: rw.encode(labelled(5)),
        400,
        "has 5 labels, over the limit of 4",
    ),
    (
        "--max-label-length",
        lambda: rw.encode(gpus(1, pod="p" * 24)),
        lambda: rw.encode(gpus(1, pod="p" * 25)),
        400,
        "label pod is 25 characters, over the limit of 24",
    ),
]


@pytest.mark.parametrize("flag,at_limit,over,status,says", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_each_limit_flag_refuses_a_write_just_over_it_and_takes_one_at_it(
    small_collector: str,
    flag: str,
    at_limit: Callable[[], bytes],
    over: Callable[[], bytes],
    status: int,
    says: str,
) -> None:
    url = small_collector + "/api/v1/write"
    before = received(small_collector)
    resp = post(url, over())
    assert resp.status == status, resp.data
    assert says in resp.json()["error"]
    assert received(small_collector) == before  # nothing of the refused write was stored
    body = at_limit()
    resp = post(url, body)
    assert resp.status == 204, resp.data
    assert received(small_collector) == before + rw.decode(body).sample_count
