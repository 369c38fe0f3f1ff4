"""Locates the published API specifications the doubles check requests against."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def reference_dir() -> Path:
    candidates = [os.environ.get("GPUFLEET_REFERENCE"), REPO / "shared" / "reference", REPO.parent / "shared" / "reference"]
    for c in candidates:
        if c and (Path(c) / "slack-web-openapi-v2.json").exists():
            return Path(c)
    raise FileNotFoundError("API specifications not found: expected ../shared/reference/ beside the checkout "
                            "(or set GPUFLEET_REFERENCE)")


@cache
def load_spec(name: str) -> dict:
    return json.loads((reference_dir() / name).read_text())
