"""Silences through the collector's HTTP API and `gpufleet silence add / list / expire`."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from gpufleet.cli import main
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until
from tests.doubles.slack_api import SlackDouble


def post(url, body, token=None, method="POST"):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(
        url, data=json.dumps(body).encode() if body is not None else None, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def firing_lost_gpus(url: str) -> list[dict]:
    req = urllib.request.Request(url + "/api/v1/alerts", headers={"Authorization": "Bearer t0ken"})
    alerts = json.loads(urllib.request.urlopen(req, timeout=5).read())["alerts"]
    return [a for a in alerts if a["rule"] == "GpuLost" and a["state"] == "firing"]


@pytest.fixture
def paging_collector(db_url: str) -> Iterator[tuple[Collector, SlackDouble, str]]:
    """A collector that pages #oncall on Slack (the Web API double), configured as `gpufleet collector
    --slack-token ... --slack-channel ...` configures it."""
    with SlackDouble() as slack:
        port = free_port()
        c = Collector(
            CollectorSettings(
                listen=f"127.0.0.1:{port}",
                db=db_url,
                eval_interval=0.2,
                tokens=["t0ken"],
                slack_token="xoxb-test-token",
                slack_base_url=slack.base_url,
                slack_channel="C0ONCALL",
            )
        ).start()
        try:
            yield c, slack, f"http://127.0.0.1:{port}"
        finally:
            c.close()


def test_a_silence_added_from_the_command_line_mutes_a_lost_gpu_until_expired(
    paging_collector: tuple[Collector, SlackDouble, str],
) -> None:
    c, slack, url = paging_collector
    cli = ["--collector", url, "--token", "t0ken"]
    r = CliRunner().invoke(
        main,
        [
            "silence",
            "add",
            "alertname=GpuLost",
            "uuid=~GPU-a.*",
            "--duration",
            "1h",
            "--author",
            "ana",
            "--comment",
            "RMA 42",
            *cli,
        ],
    )
    assert r.exit_code == 0, r.output
    sid = r.output.strip()
    listing = CliRunner().invoke(main, ["silence", "list", *cli]).output
    assert sid in listing and "active" in listing and "by ana" in listing and "uuid=~GPU-a.*" in listing

    def write_lost():
        body = rw.encode(
            [
                rw.Series(
                    {"__name__": "gpufleet_gpu_up", "node": "n1", "gpu": "0", "uuid": "GPU-a1"},
                    [(int(time.time() * 1000), 0.0)],
                )
            ]
        )
        req = urllib.request.Request(
            url + "/api/v1/write",
            data=body,
            headers={
                "Content-Encoding": "snappy",
                "Content-Type": "application/x-protobuf",
                "Authorization": "Bearer t0ken",
            },
        )
        urllib.request.urlopen(req, timeout=5)

    write_lost()
    alerts = wait_until(lambda: firing_lost_gpus(url))
    assert alerts[0]["muted_by"] == f"silence {sid}"
    # a few more evaluations of the firing alert, each of which would page were the silence ignored
    seen = c.engine.evaluations
    wait_until(lambda: c.engine.evaluations >= seen + 3)
    assert c.engine.queue.join()
    assert c.engine.sent == 0 and slack.channel_messages("C0ONCALL") == []

    r = CliRunner().invoke(main, ["silence", "expire", sid, *cli])
    assert r.exit_code == 0 and f"expired {sid}" in r.output
    write_lost()
    wait_until(lambda: [a for a in firing_lost_gpus(url) if a["muted_by"] is None])
    msgs = wait_until(lambda: slack.channel_messages("C0ONCALL"), timeout=15)
    assert len(msgs) == 1
    assert "GpuLost" in msgs[0].text and "uuid=GPU-a1" in msgs[0].text, msgs[0].text
    assert c.engine.queue.join()  # the notifier has returned and the send is counted
    assert c.engine.sent >= 1 and c.engine.send_failures == 0 and slack.problems == []
    assert "expired" in CliRunner().invoke(main, ["silence", "list", "--all", *cli]).output


def test_the_silences_api_says_what_is_wrong_with_a_bad_silence(tmp_path):
    port = free_port()
    c = Collector(
        CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/s.db", tokens=["t0ken"])
    ).start()
    url = f"http://127.0.0.1:{port}/api/v1/silences"
    try:
        ok = {
            "matchers": [{"name": "node", "value": "n1"}],
            "duration": "2h",
            "createdBy": "ana",
            "comment": "fans",
        }
        assert post(url, ok)[0] == 401  # writes need the token
        for body, words in (
            ({**ok, "matchers": []}, "at least one matcher"),
            ({**ok, "comment": ""}, "comment"),
            ({**ok, "matchers": [{"name": "x", "value": "(", "isRegex": True}]}, "regular expression"),
            ({k: v for k, v in ok.items() if k != "duration"}, "endsAt"),
        ):
            status, resp = post(url, body, "t0ken")
            assert status == 400 and words in resp["error"], resp
        status, resp = post(url, ok, "t0ken")
        assert status == 201 and resp["silence"]["status"]["state"] == "active"
        assert post(url + "/nope", None, "t0ken", method="DELETE")[0] == 404
    finally:
        c.close()
