"""The command line fails like a tool, not like a script: a bad flag, variable or file gives one line that names
the problem and the fix, exit status 2 for a usage error, and never a traceback. Run as users run it: the
`gpufleet` console script, in a folder of its own, with no GPUFLEET_ variables but the ones a case sets."""

from __future__ import annotations

import getpass
import io
import json
import logging
import os
import pty
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gpufleet.cli import main
from gpufleet.cli.logs import REDACTED, configure
from gpufleet.cli.progress import StatusLine
from gpufleet.cli.silence import os_user as _os_user
from tests.conftest import free_port

SCRIPT = Path(sys.executable).with_name("gpufleet")
GPUFLEET = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gpufleet.cli"]
AS_ROOT = os.geteuid() == 0  # root reads any file: "permission denied" cannot happen to it

BAD_YAML = "groups:\n  - name: g\n    rules: [\n"
TRACE = "\n".join(
    [
        "# TYPE gpufleet_gpu_up gauge",
        *(
            f'gpufleet_gpu_up{{node="n1",gpu="0",uuid="GPU-a"}} {int(t < 1_700_000_300)} {t}'
            for t in range(1_700_000_000, 1_700_000_600, 10)
        ),
        "# EOF",
        "",
    ]
)


def gpufleet(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    return subprocess.run(
        [*GPUFLEET, *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def files(tmp_path: Path) -> Iterator[dict[str, str]]:
    """What the cases' capital words stand for: bad files written into the case's folder, an address another
    program holds, a database that is down."""
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "rules.yaml").write_text("groups: []\n")
    secret = tmp_path / "secret.yaml"
    secret.write_text("groups: []\n")
    secret.chmod(0)
    (tmp_path / "trace.om").write_text(TRACE)
    (tmp_path / "garbage.om").write_text("this is not a trace\n")
    with socket.socket() as busy:  # another program holds this address
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield {
            "BAD": str(tmp_path / "bad.yaml"),
            "EMPTY": str(tmp_path / "empty"),
            "FOLDER": str(tmp_path / "folder"),
            "MISSING": str(tmp_path / "missing.yaml"),
            "SECRET": str(secret),
            "TRACE": str(tmp_path / "trace.om"),
            "GARBAGE": str(tmp_path / "garbage.om"),
            "BUSY": f"127.0.0.1:{busy.getsockname()[1]}",
            # nothing listens there: the database is down
            "DOWN": f"postgresql+psycopg://gpufleet@127.0.0.1:{free_port()}/gpufleet",
        }


LISTEN = [("abc", "no port"), ("host:notaport", "'notaport' is not a number"), (":99999", "out of range")]
DB = [
    ("postgres://gpufleet:pw@db/gpufleet", "write postgresql+psycopg://"),
    ("mysql://gpufleet@db/gpufleet", "SQLite or PostgreSQL only"),
    ("notaurl", "is not a database URL"),
]
RULES = [
    ("MISSING", "does not exist"),
    ("EMPTY", "no rule files"),
    ("BAD", "bad.yaml:4:1: not valid YAML"),
    ("SECRET", "is not readable"),
]
UNREADABLE = pytest.mark.skipif(AS_ROOT, reason="root reads any file")

# (arguments, environment, exit status, words the one line must hold); FILE names come from the fixture.
CASES = [
    *[
        pytest.param(
            ["agent", "--simulate", "1", "--listen", v], {}, 2, ["--listen", words], id=f"agent-listen-{v}"
        )
        for v, words in LISTEN
    ],
    *[
        pytest.param(["collector", "--listen", v], {}, 2, ["--listen", words], id=f"collector-listen-{v}")
        for v, words in LISTEN
    ],
    *[
        pytest.param(["up", "--listen", v], {}, 2, ["--listen", words], id=f"up-listen-{v}")
        for v, words in LISTEN
    ],
    pytest.param(
        ["up", "--agent-listen", "abc"], {}, 2, ["--agent-listen", "HOST:PORT"], id="up-agent-listen"
    ),
    pytest.param(
        ["agent", "--simulate", "1"],
        {"GPUFLEET_LISTEN": "abc"},
        2,
        ["GPUFLEET_LISTEN", "HOST:PORT"],
        id="agent-listen-from-the-environment",
    ),
    *[
        pytest.param(
            [cmd, "--db", v], {}, 2, ["--db", words], id=f"{cmd.replace(' ', '-')}-db-{v.split(':')[0]}"
        )
        for cmd in ("collector", "up", "report", "db upgrade")
        for v, words in DB
    ],
    pytest.param(
        ["collector"],
        {"GPUFLEET_DB": "postgres://gpufleet@db/gpufleet"},
        2,
        ["GPUFLEET_DB", "postgresql+psycopg://"],
        id="collector-db-from-the-environment",
    ),
    *[
        pytest.param(
            [cmd, "--rules", f],
            {},
            2,
            ["--rules", words],
            id=f"{cmd.split()[-1]}-rules-{f.lower()}",
            marks=[UNREADABLE] if f == "SECRET" else [],
        )
        for cmd in ("collector", "up", "alerts backtest TRACE")
        for f, words in RULES
    ],
    pytest.param(["alerts", "check", "MISSING"], {}, 2, ["does not exist"], id="check-missing"),
    # `alerts check` reads the files to judge them: a bad one is its verdict (1), as with promtool
    pytest.param(["alerts", "check", "BAD"], {}, 1, ["bad.yaml:4:1: not valid YAML"], id="check-bad-yaml"),
    pytest.param(["alerts", "check", "EMPTY"], {}, 1, ["no rule files"], id="check-empty-folder"),
    pytest.param(
        ["alerts", "check", "SECRET"], {}, 2, ["is not readable"], id="check-unreadable", marks=UNREADABLE
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--inference-config", "MISSING"],
        {},
        2,
        ["--inference-config", "does not exist"],
        id="agent-config-missing",
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--inference-config", "FOLDER"],
        {},
        2,
        ["--inference-config", "is a directory"],
        id="agent-config-folder",
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--inference-config", "BAD"],
        {},
        2,
        ["bad.yaml:4:1: not valid YAML", "--inference-config"],
        id="agent-config-bad-yaml",
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--inference-config", "SECRET"],
        {},
        2,
        ["--inference-config", "not readable"],
        id="agent-config-unreadable",
        marks=UNREADABLE,
    ),
    pytest.param(
        ["collector", "--retention-raw", "1.5h"], {}, 2, ["--retention-raw", "1h30m"], id="retention-1.5h"
    ),
    pytest.param(
        ["collector", "--retention-raw", "1h"],
        {},
        2,
        ["--retention-raw", "least", "6h"],
        id="retention-too-short",
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--spool-max-age", "5x"],
        {},
        2,
        ["--spool-max-age", "not a duration"],
        id="spool-age",
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--interval", "soon"],
        {},
        2,
        ["--interval", "not a duration"],
        id="agent-interval",
    ),
    pytest.param(["report", "--since", "soon"], {}, 2, ["--since", "neither a duration"], id="report-since"),
    pytest.param(
        ["alerts", "backtest", "TRACE", "--step", "5x"],
        {},
        2,
        ["--step", "not a duration"],
        id="backtest-step",
    ),
    pytest.param(
        ["collector", "--log-level", "loud"], {}, 2, ["--log-level", "'loud' is not one of"], id="log-level"
    ),
    pytest.param(
        ["up"],
        {"GPUFLEET_LOG_FORMAT": "xml"},
        2,
        ["GPUFLEET_LOG_FORMAT", "'xml' is not one of"],
        id="log-format-from-the-environment",
    ),
    # The user's fault, found while running: one line and status 1.
    pytest.param(
        ["collector", "--listen", "127.0.0.1:0", "--tokens", "token-of-the-test", "--db", "DOWN"],
        {},
        1,
        ["cannot reach the database", "Connection refused"],
        id="collector-database-down",
    ),
    pytest.param(
        ["up", "--simulate", "1", "--db", "DOWN"], {}, 1, ["cannot reach the database"], id="up-database-down"
    ),
    pytest.param(
        ["db", "upgrade", "--db", "DOWN"], {}, 1, ["cannot reach the database"], id="upgrade-database-down"
    ),
    pytest.param(
        ["report", "--db", "DOWN"],
        {},
        1,
        ["cannot open the store", "Connection refused"],
        id="report-database-down",
    ),
    pytest.param(
        ["agent", "--simulate", "1", "--listen", "BUSY"],
        {},
        1,
        ["cannot listen on", "in use"],
        id="agent-address-in-use",
    ),
    pytest.param(
        ["collector", "--listen", "BUSY", "--tokens", "token-of-the-test"],
        {},
        1,
        ["cannot listen on", "in use", "another --listen"],
        id="collector-address-in-use",
    ),
    pytest.param(
        ["up", "--simulate", "1", "--agent-listen", "BUSY"],
        {},
        1,
        ["cannot listen on", "in use", "another --agent-listen"],
        id="up-address-in-use",
    ),
    pytest.param(
        ["report", "--db", "sqlite:///missing.db"],
        {},
        1,
        ["no store at missing.db", "db upgrade"],
        id="report-missing-store",
    ),
    pytest.param(
        ["alerts", "backtest", "GARBAGE"],
        {},
        1,
        ["garbage.om is not valid OpenMetrics"],
        id="backtest-not-a-trace",
    ),
    pytest.param(
        ["collector", "--listen", "0.0.0.0:9446"],
        {},
        2,
        ["--allow-open-writes", "--tokens"],
        id="collector-open-writes",
    ),
]


@pytest.mark.parametrize("args, env, status, words", CASES)
def test_a_bad_input_is_one_line_naming_the_problem_and_no_traceback(
    args, env, status, words, files, tmp_path
):
    argv = [part for a in args for part in (a.split() if " " in a else [a])]
    argv = [files.get(a, a) for a in argv]
    r = gpufleet(*argv, cwd=tmp_path, env=env)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == status, out
    # click's usage errors add its two usual lines (Usage:, Try '… --help') above the error: allowed
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1, out
    if args[0] != "alerts" or args[1] != "check":
        assert lines[0].startswith("Error: "), out
    for w in words:
        assert w in lines[0], out
    assert "pw@" not in out  # a password in a refused URL is not echoed
    assert not (tmp_path / "gpufleet.db").exists() and not (tmp_path / "missing.db").exists(), (
        "a command that refused to start created a store"
    )


def test_a_report_on_a_missing_store_creates_no_file(tmp_path):
    r = gpufleet("report", "--db", f"sqlite:///{tmp_path}/never.db", cwd=tmp_path)
    assert r.returncode == 1 and "no store at" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_upgrading_a_store_is_quiet_when_piped(tmp_path):
    r = gpufleet("db", "upgrade", "--db", "sqlite:///fleet.db", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("schema at revision ") and len(r.stdout.splitlines()) == 1


# ---- --help: every option with its environment variable ----------------------------------------------------
def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


ALL = list(_commands(main))
# -v is --log-level debug, whose variable is GPUFLEET_LOG_LEVEL; --help and --version are not settings.
NOT_SETTINGS = {"help", "version", "verbose"}


@pytest.mark.parametrize("path, cmd", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_help_shows_every_options_environment_variable(path, cmd):
    r = CliRunner().invoke(main, [*path, "--help"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # help wraps long lines anywhere
    for p in cmd.params:
        if isinstance(p, click.Option) and p.envvar:
            names = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar)
            assert f"env var: {', '.join(names)}" in text, f"{' '.join(path)} {p.opts[-1]}: not in --help"


@pytest.mark.parametrize("path", [("agent",), ("collector",), ("up",), ("simulate", "inject")], ids=" ".join)
def test_every_setting_of_the_long_running_commands_and_simulate_has_a_variable(path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    missing = [
        p.opts[-1]
        for p in cmd.params
        if isinstance(p, click.Option) and p.name not in NOT_SETTINGS and not p.envvar
    ]
    assert not missing, f"gpufleet {' '.join(path)}: options without an environment variable: {missing}"
    names = [n for p in cmd.params for n in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or [])]
    assert all(n.startswith("GPUFLEET_") or n == "NODE_NAME" for n in names), names


def test_a_flag_the_commands_share_has_one_variable():
    """`up` is agent + collector on one machine: its --listen, --db, --interval … read the same variables."""
    seen: dict[str, dict[str, object]] = {}
    for name in ("agent", "collector", "up"):
        for p in main.commands[name].params:
            if isinstance(p, click.Option) and p.envvar:
                seen.setdefault(p.opts[-1], {})[name] = p.envvar
    differ = {flag: by for flag, by in seen.items() if len({str(v) for v in by.values()}) > 1}
    assert not differ, differ


# ---- silence add --author ----------------------------------------------------------------------------------
def test_the_author_is_user_else_the_login_name_else_unknown():
    def no_login() -> str:
        raise OSError("no passwd entry for uid 12345")

    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 12345")

    assert _os_user({"USER": "ana"}, getuser=lambda: "root") == "ana"
    assert _os_user({}, getuser=lambda: "ops") == "ops"
    assert _os_user({"USER": ""}, getuser=lambda: "ops") == "ops"
    assert _os_user({}, getuser=no_login) == "unknown"
    assert _os_user({}, getuser=no_user) == "unknown"


def test_a_silence_added_without_user_is_signed_with_the_login_name():
    bodies: list[dict] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            out = b'{"silenceID": "s-1"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = CliRunner(env={"USER": None}).invoke(
            main,
            [
                "silence",
                "add",
                "node=gpu-7",
                "--duration",
                "1h30m",
                "--comment",
                "fan swap",
                "--collector",
                f"http://127.0.0.1:{server.server_port}",
            ],
        )
    finally:
        server.shutdown()
    assert r.exit_code == 0 and r.output.strip() == "s-1", r.output
    assert bodies[0]["createdBy"] == getpass.getuser() and bodies[0]["duration"] == "1h30m"


# ---- logging -------------------------------------------------------------------------------------------------
def test_an_agent_with_json_logs_writes_one_json_object_a_line_and_never_its_token(tmp_path):
    token = "agent-token-" + "t" * 24
    port = free_port()
    env = {"GPUFLEET_LOG_FORMAT": "json", "GPUFLEET_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            *GPUFLEET,
            "agent",
            "--simulate",
            "1",
            "--listen",
            f"127.0.0.1:{port}",
            "--collector",
            f"http://127.0.0.1:{free_port()}",
            "--push-interval",
            "200ms",
            "--spool-dir",
            "",
            "--log-level",
            "debug",
        ],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)  # it starts, samples, and fails to push to the collector that is not there
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert out == "", "with JSON logs the start-up line is a log record too"
    records = [json.loads(line) for line in err.splitlines()]
    assert records and all(set(r) >= {"time", "level", "logger", "message"} for r in records), err
    assert any(r["message"].startswith("gpufleet agent on ") and r["level"] == "info" for r in records), err
    assert any(r["level"] == "debug" for r in records), "--log-level debug let no debug line through"
    assert token not in err


def test_secrets_are_blanked_from_every_log_line_whoever_logs_them():
    token = "xoxb-1234-5678-secret"
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("info", "json", secrets=[token, "short"], stream=stream)
        log = logging.getLogger("some.library")
        log.info("posting with headers %s", {"Authorization": f"Bearer {token}"})
        try:
            raise RuntimeError(f"refused {token}")
        except RuntimeError:
            log.exception("request failed")
        log.debug("not at info")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(records) == 2
    assert REDACTED in records[0]["message"] and "refused <redacted>" in records[1]["exception"]
    assert token not in stream.getvalue()
    assert records[1]["level"] == "error" and records[1]["logger"] == "some.library"


# ---- progress on a terminal, silence in a pipe ---------------------------------------------------------------
def test_a_status_line_shows_only_on_a_terminal_and_is_cleared():
    piped = io.StringIO()
    StatusLine("x: ", piped)("half way")
    assert piped.getvalue() == ""
    tty = io.StringIO()
    clock = iter([0.0, 0.05, 0.2])
    with StatusLine("x: ", tty, enabled=True, clock=lambda: next(clock)) as status:
        status("1%")
        status("2%")  # 50 ms later: not redrawn
        status("3%")
    assert tty.getvalue() == "\rx: 1%\x1b[K\rx: 3%\x1b[K\r\x1b[K"


def test_a_backtest_says_how_far_through_the_trace_it_is_on_a_terminal_and_nothing_when_piped(tmp_path):
    trace = tmp_path / "trace.om"
    trace.write_text(TRACE)
    piped = gpufleet("alerts", "backtest", str(trace), cwd=tmp_path)
    summary = piped.stderr.strip()
    assert piped.returncode == 0 and re.fullmatch(r"[1-9]\d* notifications", summary), piped.stderr
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*GPUFLEET, "alerts", "backtest", str(trace)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")},
    )
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        try:
            chunk = os.read(primary, 4096) if ready else b""
        except OSError:  # the terminal closed with the process
            chunk = b""
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b"backtest: " in seen and b"\r\x1b[K" in seen, seen
    assert seen.rstrip().endswith(summary.encode()), "the status line was not cleared before the summary"
    assert stdout.decode() == piped.stdout
