"""Durations as flags, rule files, inference configs and reports write them: one parser for all, Prometheus'
grammar (model.ParseDuration), so a `for:` copied from a Prometheus rule means the same here."""

import pytest

from gpufleet.core.durations import format_duration, parse_duration

DAY = 86400


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("90s", 90),
        ("5m", 300),
        ("24h", DAY),
        ("1d", DAY),
        ("7d", 7 * DAY),
        ("2w", 14 * DAY),
        ("1w", 7 * DAY),
        ("1y", 365 * DAY),
        ("1h30m", 5400),
        ("1d12h", 1.5 * DAY),
        ("2h45m30s", 9930),
        ("1m500ms", 60.5),
        ("1y2w3d4h5m6s7ms", 33_019_506.007),
        (" 7d ", 7 * DAY),
        ("0", 0),
        ("90", 90),
        ("0.25", 0.25),
        (45, 45.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parses_what_prometheus_parses(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["soon", "5 minutes", "5x", "", "ms", "1.5h", "30m1h", "1m1m", "1h 30m", "1H", "h1", "1d-1h", None, True],
)
def test_refuses_what_prometheus_refuses_and_says_how_to_write_one(text):
    with pytest.raises(
        ValueError, match=r"is not a duration: write a whole number per unit .*largest unit first"
    ):
        parse_duration(text)


@pytest.mark.parametrize("value", ["-5m", -1, float("nan"), float("inf")])
def test_negative_and_non_finite_durations_are_refused(value):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)


def test_a_bare_number_as_text_can_be_required_to_carry_a_unit():
    with pytest.raises(ValueError, match="give it a unit"):
        parse_duration("30", unit_required=True)
    assert parse_duration(30, unit_required=True) == 30.0  # a YAML number is a number of seconds
    assert parse_duration("0", unit_required=True) == 0.0  # as in Prometheus


def test_a_bare_number_counts_in_the_settings_unit_and_a_duration_does_not():
    """Retention flags took days before they took durations: 15 stays 15 days, 36h is 36 hours."""
    assert parse_duration("15", bare_number_s=DAY) == 15 * DAY
    assert parse_duration(0.5, bare_number_s=DAY) == DAY / 2
    assert parse_duration("36h", bare_number_s=DAY) == 36 * 3600


@pytest.mark.parametrize(
    "seconds, text",
    [
        (5400, "1h30m"),
        (0.05, "50ms"),
        (21600, "6h"),
        (7 * DAY, "1w"),
        (366 * DAY, "1y1d"),
        (0, "0"),
        (1.5, "1s500ms"),
    ],
)
def test_formats_as_prometheus_writes_and_reads_back(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)
