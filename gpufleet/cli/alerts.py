"""`gpufleet alerts check / test / backtest / export`: the rule files, away from any running collector."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from gpufleet.cli.common import Group, runbook_base_url
from gpufleet.cli.params import Duration, check_rule_files
from gpufleet.cli.progress import StatusLine

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import RuleError, RulePack


def _fail_with_problems(exc: RuleError) -> NoReturn:
    for p in exc.problems:
        click.echo(p, err=True)
    sys.exit(1)


def _load_pack(paths: tuple[Path, ...]) -> RulePack:
    from gpufleet.collector.rules.model import RuleError, default_rules_path, load_pack

    try:
        return load_pack(list(paths) or [default_rules_path()])
    except RuleError as exc:
        _fail_with_problems(exc)


@click.group(cls=Group)
def alerts() -> None:
    """Validate, test, backtest and export alert rules."""


@alerts.command("check")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def alerts_check(paths: tuple[Path, ...]) -> None:
    """Validate rule files (default: the built-in rule pack) as the collector loads them; every problem with
    file, line, rule and the fix: unknown keys, an alert name used twice in any of the files, an annotation
    template that would not render (unclosed {{, unknown function or variable). Exit status 1 on a problem.

    Warns about each metric or label a rule reads that no gpufleet agent (either naming), inference reader,
    collector or rule writes: sites add exporters of their own."""
    from gpufleet.cli.catalogue import check_rules
    from gpufleet.collector.rules.model import RuleError, default_rules_path, load_rules

    try:
        rules = load_rules(list(paths) or [default_rules_path()])
    except RuleError as exc:
        _fail_with_problems(exc)
    # Sites add exporters of their own, so a series outside the catalogue is a warning, not an error.
    for warning in check_rules(rules):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{len(rules)} rules OK")


@alerts.command("test")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def alerts_test(paths: tuple[Path, ...]) -> None:
    """Run rule unit tests (default: the built-in pack's alerts/tests/), like `promtool test rules`."""
    from gpufleet.collector.rules.model import RuleError, default_rules_path
    from gpufleet.collector.rules.testing import run_tests

    try:
        total, failures = run_tests(list(paths) or [default_rules_path() / "tests"])
    except RuleError as exc:
        _fail_with_problems(exc)
    for f in failures:
        click.echo(f"FAILED {f}", err=True)
    click.echo(f"{total - len({(f.file, f.test) for f in failures})}/{total} rule tests passed")
    sys.exit(1 if failures else 0)


@alerts.command("backtest")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--rules",
    "rules",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    callback=check_rule_files,
    help="Rule files or folders [default: the built-in rule pack].",
)
@click.option(
    "--step",
    type=Duration(0.001),
    default=None,
    help="Time between evaluations, seconds or a duration [default: the trace's sampling interval].",
)
def alerts_backtest(trace: Path, rules: tuple[Path, ...], step: float | None) -> None:
    """Replay TRACE (OpenMetrics text with timestamps) through the rule engine; print each notification
    it would send as a JSON line: alert, state, at (Unix seconds), labels. On a terminal, a status line on
    standard error says how far through the trace the replay is."""
    from gpufleet.collector.rules.backtest import TraceError, backtest_file

    pack = _load_pack(rules)
    try:
        with StatusLine("backtest: ") as status:
            n = backtest_file(trace, pack, status.above(sys.stdout), step_s=step, progress=status)
    except TraceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{n} notifications", err=True)


@alerts.command("export")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["prometheus", "prometheusrule"]),
    default="prometheus",
    show_default=True,
    help="A Prometheus rule file, or a PrometheusRule object (Prometheus Operator).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write [default: standard output].",
)
@click.option("--name", default="gpufleet-gpu", show_default=True, help="PrometheusRule metadata.name.")
@click.option("--namespace", default=None, help="PrometheusRule metadata.namespace.")
@click.option(
    "--runbook-base-url",
    default=None,
    envvar="GPUFLEET_RUNBOOK_BASE_URL",
    callback=runbook_base_url,
    help="Where runbook links point (BASE/NAME): your collector's public URL + /runbooks, or a wiki "
    "[default: http://localhost:9446/runbooks].",
)
@click.option(
    "--metric-names",
    type=click.Choice(["gpufleet", "dcgm", "both"]),
    default="gpufleet",
    show_default=True,
    help="The naming mode of the agents Prometheus scrapes (their --metric-names): the rules query the "
    "names those agents serve (both: gpufleet's).",
)
@click.option(
    "--with-builtin",
    is_flag=True,
    help="Export PATHS together with the built-in rule pack, as a collector loads them from one folder "
    "(the Helm chart's rules.builtin with rules.files): a file named like a built-in one replaces it.",
)
def alerts_export(
    paths: tuple[Path, ...],
    fmt: str,
    output: Path | None,
    name: str,
    namespace: str | None,
    runbook_base_url: str | None,
    metric_names: str,
    with_builtin: bool,
) -> None:
    """Write the rules PromQL can express (default: the built-in pack) for Prometheus / Alertmanager."""
    from gpufleet.collector.rules.export import DEFAULT_RUNBOOK_BASE_URL, export

    naming = None
    if metric_names == "dcgm":
        from gpufleet.agent.dcgm_names import naming as dcgm_naming

        naming = dcgm_naming()
    if with_builtin:
        paths = _with_builtin(paths)
    if runbook_base_url is None:
        click.echo(
            f"runbook links point at {DEFAULT_RUNBOOK_BASE_URL}/NAME; pass --runbook-base-url with the URL "
            "people reach your collector by (+ /runbooks) or your wiki's",
            err=True,
        )
    text, skipped = export(
        _load_pack(paths),
        fmt,
        name=name,
        namespace=namespace,
        runbook_base_url=runbook_base_url or DEFAULT_RUNBOOK_BASE_URL,
        naming=naming,
    )
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)
    for s in skipped:
        click.echo(f"not exported: {s}", err=True)


def _with_builtin(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    """The files of one rule folder holding the built-in pack and ``paths`` (same names: ``paths`` win), in
    the order a collector reads that folder."""
    from gpufleet.collector.rules.model import default_rules_path

    def rule_files(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir() if f.suffix in (".yaml", ".yml"))

    files = {p.name: p for p in rule_files(default_rules_path())}
    for p in paths:
        for f in rule_files(p) if p.is_dir() else [p]:
            files[f.name] = f
    return tuple(files[n] for n in sorted(files))
