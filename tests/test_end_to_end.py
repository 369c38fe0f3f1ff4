"""The spine, end to end: simulated GPUs -> agent -> remote-write -> collector -> store -> rule -> Slack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from slack_sdk import WebClient

from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.collector.service import Collector, CollectorSettings
from tests.conftest import free_port, wait_until
from tests.doubles.slack_api import SlackDouble


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.fixture
def fleet(db_url):
    """A collector on a free port (store: SQLite or PostgreSQL) with Slack, and an agent of 3 simulated GPUs."""
    with SlackDouble() as slack:
        port, agent_port = free_port(), free_port()
        client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
        c = Collector(
            CollectorSettings(
                listen=f"127.0.0.1:{port}", db=db_url, eval_interval=1.0, slack_channel="C0ONCALL"
            ),
            slack_client=client,
        ).start()
        a = start_agent(
            AgentSettings(
                listen=f"127.0.0.1:{agent_port}",
                collector=f"http://127.0.0.1:{port}",
                simulate=3,
                node="gpu-node-7",
                interval=0.2,
                push_interval=0.5,
                seed=7,
            )
        )
        try:
            yield c, a, slack, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{agent_port}"
        finally:
            a.stop()
            c.close()


def test_an_injected_xid_sends_exactly_one_slack_message_naming_node_gpu_and_xid(fleet):
    c, a, slack, url, _ = fleet
    wait_until(lambda: len(get_json(url + "/api/v1/gpus")["gpus"]) == 3)
    a.simulator.inject(1, "xid", xid=48)
    wait_until(lambda: slack.channel_messages("C0ONCALL"), timeout=10)
    # several more evaluations and pushes happen; still exactly one message
    evals = c.engine.evaluations
    wait_until(lambda: c.engine.evaluations >= evals + 3, timeout=10)
    msgs = slack.channel_messages("C0ONCALL")
    assert len(msgs) == 1, [m.text for m in msgs]
    uuid = a.agent.sources[0].gpus[1].uuid
    m = msgs[0]
    assert "XID 48" in m.text and "gpu-node-7" in m.text and "gpu=1" in m.text and uuid in m.text
    fields = json.dumps(m.attachments)
    assert "gpu-node-7" in fields and uuid in fields and "*XID*\\n48" in fields
    assert slack.problems == [] and c.engine.send_failures == 0
    alerts = get_json(url + "/api/v1/alerts")["alerts"]
    assert [(x["rule"], x["labels"]["xid"]) for x in alerts] == [("GpuXidCritical", "48")]


def test_samples_flow_agent_to_store_and_back_out_through_the_api(fleet):
    c, a, slack, url, agent_url = fleet
    gpus = wait_until(
        lambda: (lambda g: g if len(g) == 3 and all(x["up"] for x in g) else None)(
            get_json(url + "/api/v1/gpus")["gpus"]
        )
    )
    metrics = get_text(agent_url + "/metrics")
    for g in gpus:
        assert g["node"] == "gpu-node-7" and g["model"] == "NVIDIA H100 80GB HBM3"
        assert f'uuid="{g["uuid"]}"' in metrics
        assert 0 <= g["values"]["gpufleet_gpu_utilization_ratio"] <= 1
    uuid = gpus[0]["uuid"]
    import time

    now = time.time()
    q = get_json(
        f"{url}/api/v1/query_range?metric=gpufleet_gpu_power_watts&uuid={uuid}"
        f"&start={now - 30}&end={now}&step=1"
    )
    (series,) = q["data"]["result"]
    assert series["metric"]["uuid"] == uuid and len(series["values"]) >= 1
    assert all(50 < v < 800 for _, v in series["values"])


def test_a_lost_gpu_pages_once_and_the_others_keep_reporting(fleet):
    c, a, slack, url, agent_url = fleet
    wait_until(lambda: len(get_json(url + "/api/v1/gpus")["gpus"]) == 3)
    a.simulator.inject(2, "lost")
    uuid = a.agent.sources[0].gpus[2].uuid
    msgs = wait_until(lambda: slack.channel_messages("C0ONCALL"), timeout=15)
    # both lost-GPU rules fire (XID 79 and NVML's "GPU is lost"), about one GPU: one alert group, one message
    firing = wait_until(
        lambda: (lambda x: x if {"GpuFellOffBus", "GpuLost"} <= {r["rule"] for r in x} else None)(
            get_json(url + "/api/v1/alerts")["alerts"]
        ),
        timeout=15,
    )
    assert {r["labels"]["uuid"] for r in firing} == {uuid}
    evals = c.engine.evaluations
    wait_until(lambda: c.engine.evaluations >= evals + 3, timeout=10)
    msgs = slack.channel_messages("C0ONCALL")
    assert len(msgs) == 1, [m.text for m in msgs]
    assert msgs[0].text.startswith("[CRITICAL]") and uuid in json.dumps(msgs[0].attachments)
    gpus = {g["gpu"]: g["up"] for g in get_json(url + "/api/v1/gpus")["gpus"]}
    assert gpus == {"0": True, "1": True, "2": False}
    assert slack.problems == [] and c.engine.send_failures == 0


def test_writes_need_the_token_when_tokens_are_configured(tmp_path):
    port = free_port()
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/t.db", tokens=["s3cret-token"]
        )
    ).start()
    try:
        import time

        from gpufleet.core import remote_write as rw

        now = int(time.time() * 1000)
        body = rw.encode([rw.Series({"__name__": "gpufleet_gpu_up", "uuid": "GPU-x"}, [(now, 1.0)])])
        for token, status in ((None, 401), ("wrong", 401), ("s3cret-token", 204)):
            headers = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/write", data=body, headers=headers)
            try:
                got = urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == status, token
        assert c.store.counts()["samples"] == 1
    finally:
        c.close()


def test_gpufleet_up_as_a_new_user_runs_it(tmp_path):
    """`gpufleet up --simulate 4`: within 15 s, /metrics shows 4 GPUs and the collector lists the same 4."""
    agent_port, port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "up",
            "--simulate",
            "4",
            "--agent-listen",
            f"127.0.0.1:{agent_port}",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ready():
            try:
                metrics = get_text(f"http://127.0.0.1:{agent_port}/metrics")
                gpus = get_json(f"http://127.0.0.1:{port}/api/v1/gpus")["gpus"]
            except OSError:
                return None
            return (metrics, gpus) if len(gpus) == 4 else None

        metrics, gpus = wait_until(ready, timeout=15)
        own_metrics = get_text(f"http://127.0.0.1:{port}/metrics")
        for name in (
            "gpufleet_gpu_up",
            "gpufleet_gpu_utilization_ratio",
            "gpufleet_gpu_memory_used_bytes",
            "gpufleet_gpu_temperature_celsius",
            "gpufleet_gpu_power_watts",
        ):
            lines = [ln for ln in metrics.splitlines() if ln.startswith(name + "{")]
            assert len(lines) == 4, name
            for ln in lines:
                assert all(f'{k}="' in ln for k in ("node", "gpu", "uuid", "model")), ln
        assert {g["uuid"] for g in gpus} == {
            ln.split('uuid="')[1].split('"')[0]
            for ln in metrics.splitlines()
            if ln.startswith("gpufleet_gpu_up{")
        }
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "gpufleet_collector_notifications_failed 0.0" in own_metrics.splitlines()
    assert "simulating 4 GPUs" in out and f"http://127.0.0.1:{agent_port}/metrics" in out
    assert (tmp_path / "gpufleet.db").exists()
