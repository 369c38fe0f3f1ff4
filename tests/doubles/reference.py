"""Loads the API specifications the doubles check requests against. They live in the repository, beside the
doubles (``tests/doubles/specs/``), each with its source and licence noted next to it."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SPECS = Path(__file__).resolve().parent / "specs"


@cache
def load_spec(relative: str) -> dict:
    """The specification at ``specs/RELATIVE`` (e.g. ``slack/slack-web-openapi-v2.json``)."""
    return json.loads((SPECS / relative).read_text())
