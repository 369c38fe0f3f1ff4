"""Who may write: tokens kept hashed, compared in constant time, scoped to a cluster; open only on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import urllib3

from gpufleet.collector.auth import SampleRate, Token, TokenSet, hash_token, parse_token
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core import remote_write as rw
from tests.conftest import free_port

EAST = "east-secret-0123"
ANY = "fleet-wide-secret"


def post(url: str, body: bytes, token: str | None = None) -> urllib3.BaseHTTPResponse:
    headers = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return urllib3.request("POST", url + "/api/v1/write", body=body, headers=headers)


T0 = int(time.time() * 1000)


def gpu_series(cluster: str | None, gpu: int = 0, ts: int = T0) -> rw.Series:
    labels = {"__name__": "gpufleet_gpu_up", "node": "n1", "gpu": str(gpu), "uuid": f"GPU-{gpu}"}
    if cluster is not None:
        labels["cluster"] = cluster
    return rw.Series(labels, [(ts, 1.0)])


@pytest.fixture
def secured(tmp_path):
    """A collector that knows two tokens only by hash: one for cluster gpu-east, one for any cluster."""
    port = free_port()
    tokens = [f"sha256:{hash_token(EAST)}@gpu-east", f"sha256:{hash_token(ANY)}"]
    c = Collector(
        CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/t.db", tokens=tokens)
    ).start()
    yield c, f"http://127.0.0.1:{port}"
    c.close()


def test_unauthenticated_and_wrong_tokens_cannot_write_when_tokens_are_configured(secured):
    c, url = secured
    body = rw.encode([gpu_series("gpu-east")])
    for token in (None, "", "wrong", hash_token(EAST), f"sha256:{hash_token(EAST)}"):
        resp = post(url, body, token)
        assert resp.status == 401, token
        assert b"--token" in resp.data
    assert c.store.counts()["samples"] == 0
    assert post(url, body, EAST).status == 204


def test_a_token_scoped_to_one_cluster_cannot_write_another_and_nothing_of_the_request_is_stored(
    secured, caplog
):
    c, url = secured
    mixed = rw.encode([gpu_series("gpu-east", 0), gpu_series("gpu-east", 1), gpu_series("gpu-west", 2)])
    resp = post(url, mixed, EAST)
    assert resp.status == 403
    err = resp.json()["error"]
    assert (
        "may only write cluster 'gpu-east'" in err
        and "cluster='gpu-west'" in err
        and "--cluster gpu-east" in err
    )
    unlabelled = post(url, rw.encode([gpu_series(None)]), EAST)
    assert unlabelled.status == 403 and "no cluster label" in unlabelled.json()["error"]
    assert c.store.counts() == {"series": 0, "samples": 0}
    # the fleet-wide token may write both; the scoped one its own cluster
    assert post(url, mixed, ANY).status == 204
    assert post(url, rw.encode([gpu_series("gpu-east", 0, ts=T0 + 1000)]), EAST).status == 204
    assert c.store.counts()["samples"] == 4
    assert EAST not in caplog.text and ANY not in caplog.text  # tokens are never logged


def test_token_specs_and_token_files_read_as_documented(tmp_path):
    t = parse_token(f"sha256:{hash_token('x').upper()}@gpu-east")
    assert t.digest == hash_token("x") and t.cluster == "gpu-east"
    assert parse_token("se@cret@gpu-west") == Token(hash_token("se@cret"), "gpu-west")  # the last @ scopes
    assert parse_token("plain").digest == hash_token("plain") and parse_token("plain").cluster is None
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_token("sha256:abc")
    f = tmp_path / "tokens"
    f.write_text(f"# agents of the east cluster\nsha256:{hash_token(EAST)}@gpu-east\n\n{ANY}  # ops\n")
    ts = TokenSet(TokenSet.from_file(f))
    assert ts.check(f"Bearer {EAST}").cluster == "gpu-east" and ts.check(f"bearer {ANY}").cluster is None
    assert ts.check("Bearer nope") is None and ts.check(None) is None and ts.check(EAST) is None
    f.write_text("sha256:nothex\n")
    with pytest.raises(ValueError, match=f"{f}:1"):
        TokenSet.from_file(f)


def test_the_collector_refuses_to_run_open_on_a_reachable_address_and_hash_token_prints_the_hashed_form():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "collector",
            "--listen",
            f"0.0.0.0:{free_port()}",
            "--db",
            "sqlite:///:memory:",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no write tokens configured" in proc.stderr and "--allow-open-writes" in proc.stderr
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "hash-token"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == f"sha256:{hash_token('s3cret')}"


def test_a_write_token_bucket_refills_at_its_rate_and_lets_a_batch_over_its_burst_through_once_full():
    clock = SimpleNamespace(t=0.0)
    rate = SampleRate(100, 1000, clock=lambda: clock.t)
    assert rate.take("a", 800) == 0
    assert rate.take("a", 500) == pytest.approx(3.0)  # 200 left, 300 more at 100 a second
    assert rate.take("b", 1000) == 0  # a bucket per token
    clock.t += 3.0
    assert rate.take("a", 500) == 0
    # a batch larger than the burst waits for a full bucket, then goes through and leaves it in debt
    assert rate.take("a", 5000) == pytest.approx(10.0)
    clock.t += 10.0
    assert rate.take("a", 5000) == 0
    assert rate.take("a", 1) == pytest.approx(40.01)
