"""Collector replicas: one `gpufleet collector` process against two behind one address, on one PostgreSQL.

    python bench/replicas.py [--seconds 20] [--rounds 1] [--senders 8] [--rollup-gpus 8] [--json FILE]
                             [--pg postgresql://postgres@127.0.0.1:5432/test]

The load is `bench/ingest.py compare`'s, encoded once: 2,000 GPUs x 21 gauge fields, 50 GPUs and 5
one-second samples a series per request (one request is what an agent pushes every 5 s, for 50 GPUs).
Each configuration gets a fresh database and the same requests, sent by the same SENDERS keep-alive
connections as fast as the collectors acknowledge them, after an untimed first window (it creates every
series):
  * ``1``: one collector process;
  * ``2``: two collector processes started with --reuse-port on the same port. The kernel spreads
    connections over them by a hash of the connection's addresses; a handful of connections can land
    unevenly where a fleet of agents would not, so each sender keeps reconnecting (at most 50 times)
    until its connection is with the replica it is meant for (sender i: replica i mod 2), asking
    /healthz on that connection which process took it.
Per configuration it prints samples/s acknowledged (HTTP 2xx), the requests each replica took, and where
the machine's CPU went over the timed part: the collector processes (sum), the PostgreSQL backends of
the database, PostgreSQL's background processes (WAL writer, checkpointer, background writer: shared
with the server's other databases), this load generator, everything else on the machine, and idle; as
cores and as CPU-microseconds per sample. After each run: the samples in the database against those
acknowledged (the first window included), the WAL written per sample over the timed part (the records
touching the benchmark's database, read with pg_walinspect, and the whole server's pg_current_wal_lsn
difference, where others' writes count too), and the rows written per series per
request (pg_stat_user_tables: chunk rows inserted into sample_head, `latest` rows updated). Then the
ratio 2-vs-1.

``--rollup-gpus N`` (default 8; 0: skip) also measures the rollups' bytes on disk per series and
minute / hour: one hour of 1-second data for N GPUs through the store and the collector's maintenance
(`bench/ingest.py`'s storage sample), then pg_total_relation_size of rollup_1m and rollup_1h.
Needs PostgreSQL (creates and drops its own databases) and this repository installed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (  # noqa: E402
    ADMIN,
    CORE,
    FLEET_GPUS,
    REQUEST_GPUS,
    WINDOW_S,
    CpuMeter,
    Db,
    free_port,
    pg_processes,
    process_tree,
    remote_write_load,
    start_collector,
    storage,
)
from bench.ingest import (
    push as send,
)

SERIES = FLEET_GPUS * len(CORE)


def healthz(conn: http.client.HTTPConnection) -> dict:
    conn.request("GET", "/healthz")
    return json.loads(conn.getresponse().read())


def replica_of(conn: http.client.HTTPConnection) -> str:
    """The collector process holding this connection (its /healthz names it)."""
    return str(healthz(conn)["replica"])


def leaders(port: int, names: list[str]) -> list[str]:
    """The replicas that say they evaluate the rules."""
    out = []
    for name in names:
        conn, got = connect_to(port, name)
        try:
            if got == name and healthz(conn)["leader"]:
                out.append(name)
        finally:
            conn.close()
    return out


def connect_to(port: int, replica: str, attempts: int = 50) -> tuple[http.client.HTTPConnection, str]:
    """A keep-alive connection with ``replica`` if one of ``attempts`` new connections lands there."""
    got = ""
    for _ in range(attempts):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        got = replica_of(conn)
        if got == replica:
            return conn, got
        conn.close()
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60), got


def push(
    port: int, bodies: list[tuple[bytes, int]], seconds: float | None, replicas: list[str], senders: int
) -> dict:
    """`bench/ingest.py`'s sender, each connection placed with a replica (sender i: replicas[i % n])."""
    out = send(
        port, bodies, seconds, senders, connect=lambda i: connect_to(port, replicas[i % len(replicas)])
    )
    out["by_replica"] = out.pop("by_connection")
    return out


class MachineCpu:
    """Busy and idle CPU-seconds of the whole machine (every core) between start and stop."""

    def start(self) -> None:
        self._t0 = psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        t1 = psutil.cpu_times()
        total = sum(t1) - sum(self._t0)
        idle = (t1.idle - self._t0.idle) + (t1.iowait - self._t0.iowait)
        return {"total": total, "idle": idle, "busy": total - idle}


def wal_lsn(admin: str) -> str:
    with psycopg.connect(admin, autocommit=True) as c:
        return str(c.execute("SELECT pg_current_wal_lsn()").fetchone()[0])


def wal_written(db: Db, start: str, end: str) -> dict[str, int | None]:
    """WAL bytes from ``start`` to ``end``: the whole server's, and those of records touching the benchmark's
    database (pg_walinspect; commit records carry no database and are left out). None where the WAL between
    the two is gone already (a checkpoint recycled it)."""
    with psycopg.connect(db.url, autocommit=True) as c:
        server = int(c.execute("SELECT pg_wal_lsn_diff(%s, %s)", (end, start)).fetchone()[0])
        oid = int(c.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0])
        try:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            row = c.execute(
                "SELECT coalesce(sum(record_length), 0) FROM pg_get_wal_records_info(%s, %s) "
                "WHERE block_ref LIKE %s",
                (start, end, f"%/{oid}/%"),
            ).fetchone()
            own: int | None = int(row[0])
        except psycopg.Error as exc:
            print(
                f"WAL of the benchmark's database not read ({str(exc).strip()}): server-wide only", flush=True
            )
            own = None
    return {"server": server, "database": own}


def write_stats(db: Db) -> dict[str, int]:
    """Rows written and samples stored in the benchmark's database, once its collectors have exited (their statistics are
    flushed by then)."""
    time.sleep(1.0)
    with psycopg.connect(db.url, autocommit=True) as c:
        rows = c.execute(
            "SELECT coalesce(sum(n_tup_ins) FILTER (WHERE relname LIKE 'sample_head%'), 0), "
            "coalesce(sum(n_tup_upd) FILTER (WHERE relname = 'latest'), 0), "
            "coalesce(sum(n_tup_hot_upd) FILTER (WHERE relname = 'latest'), 0), "
            "coalesce(sum(n_tup_ins) FILTER (WHERE relname = 'series'), 0) FROM pg_stat_user_tables"
        ).fetchone()
        stored = c.execute(
            "SELECT coalesce(sum(cardinality(vals)), 0) FROM "
            "(SELECT vals FROM sample_chunks UNION ALL SELECT vals FROM sample_head) c"
        ).fetchone()[0]
    return {
        "head_rows_inserted": int(rows[0]),
        "latest_rows_updated": int(rows[1]),
        "latest_hot_updates": int(rows[2]),
        "series_inserted": int(rows[3]),
        "stored": int(stored),
    }


def wait_for_replicas(port: int, names: set[str], procs: list, deadline_s: float = 60) -> None:
    """The first replica answers the shared port as soon as it is up: wait until every one has."""
    seen: set[str] = set()
    deadline = time.monotonic() + deadline_s
    while not names <= seen:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"replicas {sorted(names - seen)} did not answer on port {port}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            seen.add(replica_of(conn))
        except OSError:
            time.sleep(0.2)
        finally:
            conn.close()


def run(args: argparse.Namespace, n: int, warm: list, bodies: list, tmp: Path) -> dict:
    """``n`` collector processes on one port and one fresh database: the timed load, CPU and writes."""
    db = Db(args.pg, f"replicas{n}")
    try:
        port = free_port()
        names = [f"replica-{i}" for i in range(n)]
        extra = ["--reuse-port"] if n > 1 else []
        procs = []
        try:
            for name in names:
                procs.append(
                    start_collector(db.url, port, tmp / f"collector-{n}-{name}.log", [*extra, "--name", name])
                )
            wait_for_replicas(port, set(names), procs)
            first = push(port, warm, None, names, args.senders)
            if first["errors"]:
                raise RuntimeError(f"the first window was refused: {first['first_error']}")
            me = os.getpid()
            meters = {
                "collectors": CpuMeter(lambda: [pid for p in procs for pid in process_tree(p.pid)]),
                "postgres_backends": CpuMeter(lambda: pg_processes(args.pg, db.name)),
                "postgres_background": CpuMeter(lambda: pg_processes(args.pg, None)),
                "load_generator": CpuMeter(lambda: [me]),
            }
            machine = MachineCpu()
            load0 = os.getloadavg()[0]
            wal0 = wal_lsn(args.pg)
            machine.start()
            for m in meters.values():
                m.start()
            result = push(port, bodies, args.seconds, names, args.senders)
            cpu = {name: m.stop() for name, m in meters.items()}
            whole = machine.stop()
            wal1 = wal_lsn(args.pg)
            load1 = os.getloadavg()[0]
            leading = leaders(port, names)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
        wal = wal_written(db, wal0, wal1)
        writes = write_stats(db)
    finally:
        db.drop()
    wall = result["seconds"]
    cpu["other"] = max(0.0, whole["busy"] - sum(cpu.values()))
    cpu["idle"] = whole["idle"]
    acked_all = first["acked"] + result["acked"]
    requests_all = first["requests"] + result["requests"]
    return {
        "collectors": n,
        **result,
        "leader": leading,
        "cores": {k: round(v / wall, 2) for k, v in cpu.items()},
        "machine_cores": round(whole["total"] / wall, 2),
        "cpu_us_per_sample": {
            k: round(v / max(result["acked"], 1) * 1e6, 3)
            for k, v in cpu.items()
            if k not in ("idle", "other")
        },
        "load_before": round(load0, 2),
        "load_after": round(load1, 2),
        "acked_with_first_window": acked_all,
        "requests_with_first_window": requests_all,
        **writes,
        "wal_bytes_server": wal["server"],
        "wal_bytes_database": wal["database"],
        "wal_bytes_per_sample_server": round(wal["server"] / max(result["acked"], 1), 1),
        "wal_bytes_per_sample": None
        if wal["database"] is None
        else round(wal["database"] / max(result["acked"], 1), 1),
        "head_rows_per_series_request": round(
            writes["head_rows_inserted"] / (requests_all * REQUEST_GPUS * len(CORE)), 3
        ),
        "latest_updates_per_series_request": round(
            writes["latest_rows_updated"] / (requests_all * REQUEST_GPUS * len(CORE)), 3
        ),
    }


def rollup_bytes(args: argparse.Namespace) -> dict:
    """Rollup rows on disk: one hour of 1-second data for --rollup-gpus GPUs, stored and maintained."""
    db = Db(args.pg, "rollups")
    try:
        raw = storage(db, "chunks", args.rollup_gpus)
        series = args.rollup_gpus * len(CORE)
        with psycopg.connect(db.url, autocommit=True) as c:
            c.execute("VACUUM ANALYZE")
            counts = {
                t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("rollup_1m", "rollup_1h")
            }
        sizes = {t: db.size([t]) for t in ("rollup_1m", "rollup_1h")}
    finally:
        db.drop()
    return {
        "gpus": args.rollup_gpus,
        "series": series,
        "raw_bytes_per_sample": raw["bytes_per_sample"],
        "rollup_1m_rows": counts["rollup_1m"],
        "rollup_1m_bytes_per_row": round(sizes["rollup_1m"] / max(counts["rollup_1m"], 1), 1),
        "rollup_1h_rows": counts["rollup_1h"],
        "rollup_1h_bytes_per_row": round(sizes["rollup_1h"] / max(counts["rollup_1h"], 1), 1),
    }


def summary(results: dict) -> None:
    one, two = results["runs"]["1"], results["runs"]["2"]
    print()
    print(f"{'':46s}{'1 collector':>28s}{'2 collectors':>28s}")

    def row(label: str, f: Callable[[dict], object]) -> None:
        print(f"{label:46s}" + "".join(f"{' / '.join(str(f(x)) for x in r):>28s}" for r in (one, two)))

    row("samples/s (per round)", lambda x: f"{x['per_s']:,}")
    row(
        "requests per replica (* leads)",
        lambda x: "+".join(
            f"{v}{'*' if k in x['leader'] else ''}" for k, v in sorted(x["by_replica"].items())
        ),
    )
    for k in ("collectors", "postgres_backends", "postgres_background", "load_generator", "other", "idle"):
        row(f"cores: {k}", lambda x, k=k: x["cores"][k])
    row("PostgreSQL share of server CPU (%)", lambda x: pg_share(x))
    row("CPU-us/sample: collectors", lambda x: x["cpu_us_per_sample"]["collectors"])
    row("CPU-us/sample: PostgreSQL (backends+bg)", lambda x: pg_us(x))
    row(
        "PostgreSQL CPU-s per collector CPU-s",
        lambda x: round(pg_us(x) / x["cpu_us_per_sample"]["collectors"], 2),
    )
    row(
        "WAL bytes per sample: database / server",
        lambda x: f"{x['wal_bytes_per_sample']}/{x['wal_bytes_per_sample_server']}",
    )
    row(
        "head rows / latest updates per series-request",
        lambda x: f"{x['head_rows_per_series_request']}/{x['latest_updates_per_series_request']}",
    )
    row("load average before/after", lambda x: f"{x['load_before']}/{x['load_after']}")
    for r in (*one, *two):
        verdict = "every one" if r["stored"] == r["acked_with_first_window"] else "MISMATCH"
        print(
            f"{r['collectors']} collector(s): stored {r['stored']:,} of {r['acked_with_first_window']:,} "
            f"acknowledged: {verdict}"
        )
    ratios = [b["per_s"] / max(a["per_s"], 1) for a, b in zip(one, two, strict=True)]
    print(f"2 vs 1 collector(s), samples/s: {' / '.join(f'{x:.2f}' for x in ratios)}")
    if "rollups" in results:
        print(f"rollups: {results['rollups']}")


def pg_share(x: dict) -> float:
    c = x["cores"]
    pg = c["postgres_backends"] + c["postgres_background"]
    return round(100 * pg / max(pg + c["collectors"], 1e-9), 1)


def pg_us(x: dict) -> float:
    u = x["cpu_us_per_sample"]
    return round(u["postgres_backends"] + u["postgres_background"], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default=os.environ.get("GPUFLEET_BENCH_PG", ADMIN), help="PostgreSQL admin URL.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Timed seconds per configuration and round.")
    ap.add_argument("--rounds", type=int, default=1, help="Rounds of 1 then 2 collectors.")
    ap.add_argument(
        "--senders", type=int, default=8, help="Keep-alive sender connections (both configurations)."
    )
    ap.add_argument(
        "--max-rate", type=float, default=1_200_000, help="Samples/s the load lasts --seconds at."
    )
    ap.add_argument("--rollup-gpus", type=int, default=8, help="GPUs in the rollup size sample (0: skip).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results to this file.")
    args = ap.parse_args()

    per_window = FLEET_GPUS * len(CORE) * WINDOW_S
    windows = int(args.seconds * args.max_rate / per_window) + 2
    t = time.perf_counter()
    load = remote_write_load(windows, int(time.time()) * 1000 - 60_000)
    groups = FLEET_GPUS // REQUEST_GPUS
    warm, bodies = load[:groups], load[groups:]
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; PostgreSQL {args.pg}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    print(
        f"encoded {len(load)} requests ({REQUEST_GPUS} GPUs x {len(CORE)} fields x {WINDOW_S} samples) for "
        f"{windows} windows of {FLEET_GPUS} GPUs in {time.perf_counter() - t:.1f} s; {args.senders} senders, "
        f"{args.seconds:g} s each",
        flush=True,
    )
    results: dict = {"runs": {"1": [], "2": []}}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as tmp:
        for rnd in range(args.rounds):
            for n in (1, 2):
                r = run(args, n, warm, bodies, Path(tmp))
                results["runs"][str(n)].append(r)
                print(f"round {rnd + 1}, {n} collector(s): {r}", flush=True)
                if r["ran_out"]:
                    print(f"{n} collector(s) used up the load before {args.seconds:g} s: raise --max-rate")
        if args.rollup_gpus:
            results["rollups"] = rollup_bytes(args)
    summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
