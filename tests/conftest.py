"""Shared fixtures: free ports, a fresh PostgreSQL database per test, stores on both back ends."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN = os.environ.get("GPUFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def produced(name: str) -> str:
    """``name``, checked against the agent's metric catalogue: fixtures write only series a producer declares.

    Raises KeyError when no producer (field table, GPU source, host or inference source, agent components)
    declares the series, so a renamed series fails the fixture instead of being written under a stale name.
    """
    from gpufleet.agent.catalogue import by_name

    if name not in by_name():
        raise KeyError(f"{name!r} is not declared by any agent producer (gpufleet.agent.catalogue)")
    return name


def gpu_field(dcgm: str) -> str:
    """The name of the GPU field-table row (``FIELDS``, ``GPM_FIELDS``) read as dcgm-exporter's ``dcgm``.

    The dcgm-exporter field is the stable key of a row: the row's own name may change, this may not. For a
    row with one dcgm field per label value, any of them names the row.
    """
    from gpufleet.agent.fields import FIELDS, GPM_FIELDS

    for row in (*FIELDS, *GPM_FIELDS):
        twins = row.dcgm.values() if isinstance(row.dcgm, dict) else (row.dcgm,)
        if dcgm in twins:
            return produced(row.name)
    raise KeyError(f"no GPU field-table row (gpufleet.agent.fields) is read as {dcgm!r}")


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; return it, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def _admin_exec(sql: str) -> None:
    import psycopg

    url = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"gpufleet_test_{uuid.uuid4().hex[:12]}"
    try:
        _admin_exec(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # the suite's contract is that PostgreSQL runs here (CI starts it)
        pytest.fail(f"PostgreSQL at {PG_ADMIN} is needed for this test and did not answer: {exc}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """Every store test runs on both back ends: the SQLite default and the production PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gpufleet.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    from gpufleet.collector.store import Store

    s = Store.open(db_url)
    yield s
    s.close()
