"""docs/install.md lists every chart value, generated from values.yaml and the schema, and the two agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gpufleet"


def _values_table():
    spec = importlib.util.spec_from_file_location("values_table", ROOT / "helm" / "values_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(values: Any, schema: dict, prefix: str = "") -> set[str]:
    """Keys of values.yaml down to where the schema stops naming properties (free-form maps are one value)."""
    if isinstance(values, dict) and schema.get("properties"):
        return set().union(
            *(_leaves(v, schema["properties"].get(k, {}), f"{prefix}{k}.") for k, v in values.items())
        )
    return {prefix.rstrip(".")}


def _values_and_schema() -> tuple[dict, dict]:
    return (
        yaml.safe_load((CHART / "values.yaml").read_text()),
        json.loads((CHART / "values.schema.json").read_text()),
    )


def _schema_paths(schema: dict, prefix: str = "") -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, sub in schema.get("properties", {}).items():
        out[f"{prefix}{name}"] = sub
        out.update(_schema_paths(sub, f"{prefix}{name}."))
    return out


def test_install_doc_lists_every_value_as_generated():
    vt = _values_table()
    doc = vt.DOC.read_text()
    assert vt.updated(doc) == doc, (
        "docs/install.md's table of values is stale: run python3 helm/values_table.py"
    )
    for key in _leaves(*_values_and_schema()):
        assert f"| `{key}` |" in doc, f"value {key} is missing from docs/install.md"


def test_every_value_has_a_schema_entry_with_a_description_and_back():
    values, schema = _values_and_schema()
    paths = _schema_paths(schema)
    for key in _leaves(values, schema):
        assert key in paths, f"values.yaml has {key} but values.schema.json does not describe it"
    for key, sub in paths.items():
        assert sub.get("description"), f"values.schema.json: {key} has no description"
        # Optional keys (a CPU limit) may be absent from values.yaml, but not the objects that hold them.
        parent = values
        parts = key.split(".")
        for part in parts[:-1]:
            assert isinstance(parent, dict) and part in parent, (
                f"values.schema.json describes {key}, values.yaml lacks it"
            )
            parent = parent[part]
        assert parts[-1] in parent or len(parts) > 2, (
            f"values.schema.json describes {key}, values.yaml lacks it"
        )


def test_install_doc_covers_install_upgrade_and_uninstall():
    doc = (ROOT / "docs" / "install.md").read_text()
    for heading in ("## Install, step by step", "## Upgrade", "## Uninstall", "## Every value"):
        assert heading in doc
    assert "helm install gpufleet helm/gpufleet" in doc and "helm uninstall gpufleet" in doc
