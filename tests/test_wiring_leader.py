"""Two `gpufleet collector` replicas on one PostgreSQL: the lead passes over when the leader's database session
dies or the leader is stopped, and the weekly digest reaches the channel once, not once per replica."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from gpufleet.core.retry import Verdict
from tests.conftest import free_port, wait_until
from tests.doubles.slack_api import SlackDouble
from tests.wiring import HOT_GPU_RULES, CollectorProcess, remote_write, temperatures

pytestmark = pytest.mark.postgres


def admin(pg_url: str) -> psycopg.Connection:
    return psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


@pytest.fixture
def replicas(tmp_path, pg_url, request) -> Iterator[tuple[CollectorProcess, CollectorProcess, SlackDouble]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOT_GPU_RULES)
    extra: list[str] = getattr(request, "param", [])
    with SlackDouble() as slack:
        started: list[CollectorProcess] = []
        try:
            for name in ("a", "b"):
                started.append(
                    CollectorProcess(
                        free_port(),
                        [
                            "--db",
                            pg_url,
                            "--rules",
                            str(rules),
                            "--eval-interval",
                            "1",
                            "--name",
                            name,
                            *slack.collector_flags(),
                            *extra,
                        ],
                        tmp_path / f"{name}.log",
                    )
                )
            yield started[0], started[1], slack
        finally:
            for c in started:
                c.stop()


def leader_and_follower(
    a: CollectorProcess, b: CollectorProcess
) -> tuple[CollectorProcess, CollectorProcess]:
    return wait_until(
        lambda: (
            (a, b)
            if a.is_leader() and not b.is_leader()
            else (b, a)
            if b.is_leader() and not a.is_leader()
            else None
        )
    )


def test_a_leader_whose_database_session_dies_steps_down_and_the_other_replica_takes_over(replicas, pg_url):
    a, b, slack = replicas
    leader, follower = leader_and_follower(a, b)
    with admin(pg_url) as conn:
        (pid,) = conn.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
        ).fetchone()
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_until(lambda: follower.is_leader() and not leader.is_leader())
    assert "lost the rule-evaluation lock" in leader.output()
    # the new leader evaluates and notifies
    assert remote_write(leader.url, temperatures({0: 97.0})).verdict is Verdict.OK
    wait_until(lambda: slack.channel_messages("C0ONCALL"))
    wait_until(lambda: follower.metric("gpufleet_collector_notifications_sent") >= 1)
    assert len(slack.channel_messages("C0ONCALL")) == 1 and slack.problems == []
    assert leader.metric("gpufleet_collector_notifications_sent") == 0
    assert [c.metric("gpufleet_collector_notifications_failed") for c in (a, b)] == [0, 0]


def test_a_stopped_leader_releases_the_lead_and_the_other_takes_over_at_its_next_tick(replicas):
    a, b, slack = replicas
    leader, follower = leader_and_follower(a, b)
    assert leader.terminate() == 0
    ticks_when_gone = follower.healthz()["ticks"]
    h = wait_until(lambda: (lambda h: h if h["leader"] else None)(follower.healthz()))
    assert h["leader_since_tick"] <= ticks_when_gone + 1
    assert follower.metric("gpufleet_collector_notifications_failed") == 0


@pytest.mark.parametrize(
    "replicas", [["--report-cron", "* * * * *", "--report-channel", "C0PERF"]], indirect=True
)
def test_the_weekly_digest_is_posted_once_however_many_replicas_run(replicas):
    a, b, slack = replicas
    leader, follower = leader_and_follower(a, b)

    def decisions(c: CollectorProcess) -> tuple[int, int]:
        out = c.output()
        return out.count("weekly digest posted to"), out.count("weekly digest: another replica leads")

    # Count from a moment well away from a minute boundary, with both replicas up and the lead settled.
    wait_until(lambda: 5 <= time.time() % 60 <= 50, timeout=20, interval=0.5)
    before = len(slack.channel_messages("C0PERF"))
    leader_before, follower_before = sum(decisions(leader)), decisions(follower)[1]
    # The cron fires every minute on both replicas; wait for one posting and for the other replica's turn.
    wait_until(lambda: len(slack.channel_messages("C0PERF")) > before, timeout=75, interval=0.5)
    wait_until(
        lambda: decisions(follower)[1] - follower_before >= sum(decisions(leader)) - leader_before,
        timeout=30,
    )
    assert len(slack.channel_messages("C0PERF")) == before + 1 and slack.problems == []
    assert decisions(follower)[0] == 0
    assert [c.metric("gpufleet_collector_notifications_failed") for c in (a, b)] == [0, 0]
