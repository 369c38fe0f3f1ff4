"""The on-call's story at 3 a.m.: two XIDs page one GPU in one Slack message; the silence command in that
message, pasted into a shell as printed (the write token in GPUFLEET_TOKEN, not in the message), mutes both on
the real collector, and the next XID on that GPU pages nobody while the other GPU still pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gpufleet.collector.rules.model import default_rules_path
from gpufleet.core import remote_write as rw
from gpufleet.core.retry import Verdict
from gpufleet.core.sender import RemoteWriteSender, http_pool
from tests.conftest import free_port, produced, wait_until
from tests.doubles.slack_api import Message, SlackDouble
from tests.test_slack_notifier import shown, silence_args
from tests.wiring import CollectorProcess

TOKEN = "w-secret-for-writes"
# Later rule files override the pack's route: changes to a group go out within a second, not a minute.
FAST_ROUTE = """
route:
  group_by: [cluster, node, uuid]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 4h
"""
GPUFLEET_SCRIPT = Path(sys.executable).parent / "gpufleet"


def xid(uuid: str, gpu: str, code: int) -> rw.Series:
    labels = {
        "__name__": produced("gpufleet_gpu_xid_errors_total"),
        "cluster": "prod",
        "node": "gpu-17",
        "gpu": gpu,
        "uuid": uuid,
        "model": "NVIDIA H100 80GB HBM3",
        "xid": str(code),
        "pod": f"train-{gpu}",
        "namespace": "ml",
        "container": "trainer",
    }
    return rw.Series(labels, [(int(time.time() * 1000), 1.0)])


def push(url: str, series: list[rw.Series]) -> None:
    sender = RemoteWriteSender(url + "/api/v1/write", http_pool(30), user_agent="gpufleet-agent", token=TOKEN)
    assert sender.send(rw.encode(series), urgent=True).verdict is Verdict.OK


def alerts(url: str) -> list[dict]:
    req = urllib.request.Request(url + "/api/v1/alerts", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["alerts"]


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The `gpufleet` console script with the arguments as printed, in an on-call's shell: no collector
    address or token of its own beyond what ``env`` gives."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    return subprocess.run(
        [str(GPUFLEET_SCRIPT), *args],
        env={**base, "USER": "oncall", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def message_about(slack: SlackDouble, uuid: str) -> Message:
    (m,) = [x for x in slack.channel_messages("C0ONCALL") if f"uuid={uuid}" in shown(x.text)]
    return m


def test_the_silence_command_in_a_two_alert_message_run_as_printed_mutes_both_alerts(tmp_path, monkeypatch):
    route = tmp_path / "route.yaml"
    route.write_text(FAST_ROUTE)
    port = free_port()
    # people reach the collector by another name than the address it listens on: the command must use theirs
    monkeypatch.setenv("GPUFLEET_PUBLIC_URL", f"http://localhost:{port}/")
    with SlackDouble() as slack:
        c = CollectorProcess(
            port,
            [
                "--db",
                f"sqlite:///{tmp_path / 'c.db'}",
                "--rules",
                str(default_rules_path()),
                "--rules",
                str(route),
                "--eval-interval",
                "1",
                "--tokens",
                TOKEN,
                *slack.collector_flags(),
            ],
            tmp_path / "collector.log",
        )
        try:
            push(c.url, [xid("GPU-aaaa", "3", 94), xid("GPU-aaaa", "3", 48), xid("GPU-bbbb", "4", 94)])
            wait_until(lambda: len(slack.channel_messages("C0ONCALL")) == 2, timeout=20)
            m = message_about(slack, "GPU-aaaa")
            assert m.text.startswith("[CRITICAL] 2 alerts: GpuXidCritical")
            assert "GPUFLEET_TOKEN" in json.dumps(m.attachments) and TOKEN not in json.dumps(m.attachments)
            args = silence_args(m)
            assert args[:3] == ["gpufleet", "silence", "add"]
            assert args[-2:] == ["--collector", f"http://localhost:{port}"]
            assert "model=NVIDIA H100 80GB HBM3" in args  # one argument: the shell quoting survived the paste
            assert not any(a.startswith(("xid=", "severity=", "pod=")) for a in args)

            # without the token the collector refuses, in one line that says where the token goes
            refused = cli(args[1:], {})
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
            assert "GPUFLEET_TOKEN" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

            done = cli(args[1:], {"GPUFLEET_TOKEN": TOKEN})
            assert done.returncode == 0, done.stderr
            silence_id = done.stdout.strip()

            def muted() -> dict[tuple[str, str], str | None]:
                return {(a["labels"]["uuid"], a["labels"]["xid"]): a["muted_by"] for a in alerts(c.url)}

            wait_until(lambda: muted()[("GPU-aaaa", "48")] is not None, timeout=20)
            assert muted() == {
                ("GPU-aaaa", "94"): f"silence {silence_id}",
                ("GPU-aaaa", "48"): f"silence {silence_id}",
                ("GPU-bbbb", "94"): None,
            }

            # the next XID on each GPU: the silenced one stays quiet, the other pages (edit + thread reply)
            other = message_about(slack, "GPU-bbbb")
            push(c.url, [xid("GPU-aaaa", "3", 61), xid("GPU-bbbb", "4", 61)])
            wait_until(lambda: [x for x in slack.messages if x.thread_ts == other.ts], timeout=20)
            assert muted()[("GPU-aaaa", "61")] == f"silence {silence_id}"
            assert m.edits == [] and [x for x in slack.messages if x.thread_ts == m.ts] == []
            assert len(slack.channel_messages("C0ONCALL")) == 2
            assert slack.problems == []
        finally:
            c.stop()
