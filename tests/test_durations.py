"""Durations as flags, rule files, inference configs and reports write them: one parser for all."""

import pytest

from gpufleet.durations import parse_duration


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("30s", 30), ("5m", 300), ("24h", 86400),
                                           ("7d", 604800), ("2w", 1209600), (" 1.5h ", 5400), ("90", 90),
                                           (45, 45.0), (0.25, 0.25)])
def test_parses_what_people_write(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5 minutes", "-5m", "5x", "", "1h30m", True])
def test_refuses_what_is_not_a_duration_and_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_a_bare_number_as_text_can_be_required_to_carry_a_unit():
    with pytest.raises(ValueError, match="write 30s, 5m"):
        parse_duration("30", unit_required=True)
    assert parse_duration(30, unit_required=True) == 30.0
