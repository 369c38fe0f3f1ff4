"""The agent as a user runs it: flags and config file, /metrics with inference series, the rule pack."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from gpufleet.agent.inference.config import ConfigError, load_config, settings_from_flags
from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.collector.rules.model import load_rules
from tests.conftest import free_port, wait_until
from tests.inference_servers import MetricsServer, VllmMetrics

ROOT = Path(__file__).resolve().parent.parent


def test_an_agent_with_an_inference_endpoint_serves_its_latency_next_to_the_gpus():
    vllm = VllmMetrics("llama")
    server = MetricsServer(vllm.render)
    port = free_port()
    settings = AgentSettings(
        listen=f"127.0.0.1:{port}",
        simulate=2,
        node="a7",
        interval=0.1,
        seed=1,
        inference=settings_from_flags(endpoints=(f"llama={server.url}",), interval=0.3),
    )
    settings.inference.endpoints[0] = settings.inference.endpoints[0].__class__(
        "llama", server.url, gpus=("1",)
    )
    agent = start_agent(settings)
    try:

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()

        def has_quantile() -> bool:
            vllm.request(2.0, ttft=0.1, itl=[0.02], queue=0.0, prompt_tokens=3)
            return "gpufleet_inference_request_duration_seconds{" in metrics()

        wait_until(has_quantile, timeout=20, interval=0.2)
        text = metrics()
        assert "gpufleet_gpu_up{" in text
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("gpufleet_inference_request_duration_seconds{") and 'quantile="0.5"' in x
        )
        assert (
            'model="llama"' in line and 'server="vllm"' in line and 'gpus="1"' in line and 'node="a7"' in line
        )
        uuid = agent.agent.sources[0].gpus[1].uuid
        assert (
            f'gpufleet_inference_gpu_info{{endpoint="llama",gpu="1",gpus="1",model="llama",node="a7",'
            f'server="vllm",uuid="{uuid}"}} 1.0' in text
        )
        assert 'gpufleet_agent_source_success{node="a7",source="inference"} 1.0' in text
    finally:
        agent.stop()
        server.close()


def test_an_agent_without_inference_settings_runs_no_inference_source():
    agent = start_agent(AgentSettings(listen=f"127.0.0.1:{free_port()}", simulate=1, node="a7"))
    try:
        assert "inference" not in [s.name for s in agent.agent.sources]
    finally:
        agent.stop()


def test_a_config_file_adds_to_the_flags(tmp_path):
    cfg = tmp_path / "inference.yaml"
    cfg.write_text("""
interval: 15s
slo: {latency_seconds: 2.5, target: 0.99}
endpoints:
  - name: custom
    url: http://127.0.0.1:9100/metrics
    server: generic
    histogram: app_latency_ms
    scale: 0.001
    gpus: [0, GPU-abc]
    slo: {latency_seconds: 1, target: 0.995}
probes:
  - name: chat
    url: http://127.0.0.1:8000/v1/chat/completions
    interval: 1m
receiver: udp://127.0.0.1:9447
kubernetes: {kubelet: "http://10.0.0.5:10255", refresh: 1m}
""")
    s = settings_from_flags(endpoints=("llama=http://127.0.0.1:8000/metrics",), config=str(cfg))
    assert [e.name for e in s.endpoints] == ["llama", "custom"]
    assert s.interval == 15 and s.slo.latency_seconds == 2.5 and s.endpoints[1].slo.target == 0.995
    assert s.endpoints[1].gpus == ("0", "GPU-abc") and s.endpoints[1].scale == 0.001
    assert s.probes[0].kind == "openai-chat" and s.probes[0].interval == 60
    assert s.kubernetes.refresh == 60 and s.receiver == "udp://127.0.0.1:9447"


@pytest.mark.parametrize(
    "text, message",
    [
        ("endpoints: [{name: a, url: 'localhost:8000'}]", "is not a URL"),
        ("endpoints: [{name: a, url: 'http://h/m', server: ollama}]", "server 'ollama' is not one of"),
        ("endpoints: [{name: a, url: 'http://h/m', server: generic}]", "needs 'histogram'"),
        ("endpoints: [{name: a, url: 'http://h/m', timeout: 3}]", "unknown key(s) ['timeout']"),
        ("slo: {latency_seconds: 2, target: 99}", "target between 0 and 1"),
        ("probes: [{name: p, url: 'http://h/x', interval: soon}]", "is not a duration"),
        ("receiver: tcp://1.2.3.4:5", "udp://HOST:PORT or unix:///PATH"),
        ("endpoints: [{name: a, url: 'http://h/m'}, {name: a, url: 'http://h/n'}]", "used twice"),
    ],
)
def test_config_mistakes_name_the_key_and_the_fix(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert message in str(err.value) and str(cfg) in str(err.value)


def test_the_cli_refuses_a_malformed_endpoint_flag():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "agent",
            "--simulate",
            "1",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--inference-endpoint",
            "http://h:8000/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "write NAME=URL" in proc.stderr


def test_the_inference_rule_pack_loads_with_the_engines_threshold_rules():
    rules = load_rules([ROOT / "alerts" / "inference.yaml"])
    names = {r.name: r for r in rules}
    assert {
        "InferenceLatencySloFastBurn",
        "InferenceLatencySloSlowBurn",
        "InferenceLatencyP99Doubled",
        "InferenceEndpointDown",
    } <= set(names)
    fast = names["InferenceLatencySloFastBurn"]
    assert fast.metric == "gpufleet_inference_latency_slo_multiwindow_burn_rate"
    assert fast.matchers == {"windows": "1h,5m"} and fast.spec.value == 14.4
