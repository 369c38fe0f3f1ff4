"""Fuzzing the rule loader: any file, however wrong, gets RuleError naming file and problem, or loads."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.collector.rules.model import RuleError, load_rules

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "alert",
    "kind",
    "metric",
    "severity",
    "op",
    "value",
    "for",
    "keep_firing_for",
    "match",
    "labels",
    "annotations",
    "send_resolved",
]
GOOD = {
    "alert": "A",
    "kind": "threshold",
    "metric": "m",
    "severity": "warning",
    "op": ">",
    "value": 1,
    "for": "1m",
}
rule = st.fixed_dictionaries(
    {}, optional={k: st.one_of(values, st.just(GOOD[k]) if k in GOOD else values) for k in FIELDS}
)
document = st.one_of(
    values,
    st.fixed_dictionaries(
        {
            "groups": st.one_of(
                values,
                st.lists(
                    st.one_of(
                        values,
                        st.fixed_dictionaries(
                            {"name": values, "rules": st.one_of(values, st.lists(rule, max_size=3))}
                        ),
                    ),
                    max_size=3,
                ),
            )
        }
    ),
)


def load_text(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "rules.yaml"
        f.write_bytes(text)
        try:
            rules = load_rules([f])
        except RuleError as exc:
            assert exc.problems and all(p.startswith(str(f)) for p in exc.problems), exc.problems
        else:
            assert all(r.name and r.metric for r in rules)


@given(document)
@settings(max_examples=400, deadline=None)
def test_any_yaml_document_loads_or_gets_rule_errors_naming_the_file(doc):
    load_text(yaml.safe_dump(doc, allow_unicode=True).encode())


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_any_bytes_load_or_get_rule_errors_naming_the_file(raw):
    load_text(raw)


# Pieces of label regexes as people, and hostile clients, write them: literals, classes, nested quantifiers
# that make a backtracking engine take exponential time, and what RE2 refuses (lookaround, backreferences).
_REGEX_PIECES = st.sampled_from(
    ["a", "b", "-", ".", ".*", "a+", "(a+)+", "(a|aa)*", "[ab]", "[^a]", r"\d", "x{2,3}", "|", "(", ")"]
    + ["(?=a)", "(?!b)", r"(a)\1", "^", "$", "?", "*", "(?i)", "\\"]
)


@given(st.lists(_REGEX_PIECES, max_size=8).map("".join), st.lists(st.text("ab-x1!", max_size=12), max_size=5))
@settings(max_examples=300, deadline=None)
def test_a_rule_match_regex_loads_and_matches_as_prometheus_would_or_is_refused_naming_it(pattern, values):
    import re

    doc = {
        "groups": [
            {"name": "g", "rules": [{**GOOD, "match": {"node": pattern}, "annotations": {"summary": "s"}}]}
        ]
    }
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "rules.yaml"
        f.write_text(yaml.safe_dump(doc))
        try:
            (rule,) = load_rules([f])
        except RuleError as exc:
            assert any("match node" in p for p in exc.problems), exc.problems
            return
    try:
        python = re.compile(pattern)
    except re.error:
        return  # RE2 syntax Python lacks (a flag group mid-pattern): nothing to compare with
    for v in values:  # short ASCII values without newlines: where Python's re and RE2 agree
        assert rule.matches({"node": v}) == (python.fullmatch(v) is not None), (pattern, v)
