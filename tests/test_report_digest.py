"""The weekly Slack digest: off unless configured, on a cron schedule, Block Kit checked by the Slack double."""

from __future__ import annotations

import json

import pytest
from slack_sdk import WebClient

from gpufleet.collector.service import Collector, CollectorSettings
from tests.doubles.slack_api import SlackDouble
from tests.test_report import SIX_HOURS, T0, known_fleet


def _collector(tmp_path, slack, **kw) -> Collector:
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    return Collector(
        CollectorSettings(
            listen="127.0.0.1:0", db=f"sqlite:///{tmp_path}/d.db", slack_channel="C0ONCALL", **kw
        ),
        slack_client=client,
    )


def test_the_digest_posts_the_report_to_slack_on_its_schedule(tmp_path):
    with SlackDouble() as slack:
        c = _collector(
            tmp_path,
            slack,
            report_cron="0 9 * * mon",
            report_channel="C0PERF",
            report_since="6h",
            public_url="http://gpufleet.example:9446",
        )
        try:
            fields = {f.name: str(f) for f in c.digest_job.trigger.fields}
            assert (fields["day_of_week"], fields["hour"], fields["minute"]) == ("mon", "9", "0")
            c.store.write(known_fleet())
            ts = c.send_digest(now=T0 + SIX_HOURS)
        finally:
            c.close()
        assert slack.problems == []
        (msg,) = slack.channel_messages("C0PERF")
        assert msg.ts == ts
        assert msg.text.startswith("GPU fleet report 2023-11-15 to 2023-11-15: busy 8 h")
        blocks = json.loads(msg.blocks) if isinstance(msg.blocks, str) else msg.blocks
        body = json.dumps(blocks)
        assert blocks[0]["type"] == "header"
        assert "busy, low SM activity* 1 h" in body and "idle with memory held* 1 h" in body
        assert "ns-a/train-1 held GPUs for 4 h and wasted 2 h (50%)" in body
        assert "2 GPU-hours throttled by hw_thermal" in body and "llama-3-8b: 2 tokens per joule" in body
        assert f"since={T0}&until={T0 + SIX_HOURS}" in body  # the link to the full report with its SQL


def test_no_digest_unless_configured_and_a_bad_schedule_is_named(tmp_path):
    with SlackDouble() as slack:
        c = _collector(tmp_path, slack)
        try:
            assert c.digest_job is None and "digest" not in [j.id for j in c.scheduler.get_jobs()]
        finally:
            c.close()
        with pytest.raises(ValueError, match="'every monday' is not a crontab line"):
            _collector(tmp_path, slack, report_cron="every monday")
    with pytest.raises(ValueError, match="set --slack-token"):
        Collector(
            CollectorSettings(
                listen="127.0.0.1:0", db=f"sqlite:///{tmp_path}/e.db", report_cron="0 9 * * mon"
            )
        )
