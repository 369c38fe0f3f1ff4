"""The collector schedules its store's maintenance: on PostgreSQL, samples that are minutes old end up in the
1-minute rollups without anyone calling the store, and late samples that arrive afterwards are rolled up by a
later run."""

from __future__ import annotations

import time

import psycopg
import pytest

from gpufleet.cli.collector import collector_settings
from gpufleet.collector.service import Collector
from gpufleet.core import remote_write as rw
from gpufleet.core.retry import Verdict
from tests.conftest import free_port, wait_until
from tests.wiring import remote_write

MINUTE_MS = 60_000


def rollup(pg_url: str, uuid: str) -> list[tuple[int, float, int]]:
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute(
            "SELECT r.bucket_ms, r.vsum, r.n FROM rollup_1m r JOIN series s ON s.id = r.series_id "
            "WHERE CAST(s.labels AS jsonb) ->> 'uuid' = %s ORDER BY r.bucket_ms",
            (uuid,),
        ).fetchall()


def power(uuid: str, minute_ms: int, watts: list[float]) -> rw.Series:
    return rw.Series(
        {"__name__": "gpufleet_gpu_power_watts", "node": "n1", "gpu": "0", "uuid": uuid},
        [(minute_ms + i * 1000, w) for i, w in enumerate(watts)],
    )


@pytest.mark.postgres
def test_minutes_old_samples_are_rolled_up_by_the_scheduled_maintenance(pg_url):
    port = free_port()
    # Built as `gpufleet collector` builds it, with the maintenance interval shortened from a minute.
    settings = collector_settings({"listen": f"127.0.0.1:{port}", "db": pg_url}, maintenance_interval=0.5)
    c = Collector(settings).start()
    try:
        now = int(time.time() * 1000)
        ten_min_ago = (now - 10 * MINUTE_MS) // MINUTE_MS * MINUTE_MS
        url = f"http://127.0.0.1:{port}"
        assert remote_write(url, [power("GPU-a", ten_min_ago, [100.0, 200.0])]).verdict is Verdict.OK
        assert wait_until(lambda: rollup(pg_url, "GPU-a")) == [(ten_min_ago, 300.0, 2)]
        # An agent replays its spool: samples from behind the maintenance's watermark, rolled up next time.
        late = ten_min_ago + 3 * MINUTE_MS
        assert remote_write(url, [power("GPU-b", late, [50.0, 60.0, 70.0])]).verdict is Verdict.OK
        assert wait_until(lambda: rollup(pg_url, "GPU-b")) == [(late, 180.0, 3)]
    finally:
        c.close()
