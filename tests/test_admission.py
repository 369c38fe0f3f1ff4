"""What the store cannot hold is refused before anything is stored, naming the field and the fix: the checks
on their own, the codec's part (a label name sent twice), and the store's part when something slips past
them (the database refuses one batch's data: that batch fails alone, for good)."""

from __future__ import annotations

import logging

import pytest

from gpufleet.collector.admission import (
    Refusal,
    RefusalLog,
    Window,
    check_label_sets,
    check_times,
    time_refusal,
)
from gpufleet.collector.app import Limits, _validate
from gpufleet.collector.store import BatchRefused, Store
from gpufleet.core import remote_write as rw

NOW_MS = 1_796_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def label_field(name: str, value: str) -> bytes:
    return rw.LabelSet.of({name: value}).key


def series_of(labels: bytes, t: int = NOW_MS) -> bytes:
    sample = b"\x09" + bytes(8) + b"\x10" + rw._varint(t)  # value 0 written out, then the time
    return labels + b"\x12" + rw._varint(len(sample)) + sample


def request(*series: bytes) -> bytes:
    import cramjam

    return bytes(cramjam.snappy.compress_raw(b"".join(b"\x0a" + rw._varint(len(s)) + s for s in series)))


def refusal_of(*labels: dict[str, str], **limits: int) -> Refusal | None:
    return check_label_sets(
        [rw.LabelSet.of(x) for x in labels],
        max_labels=limits.get("max_labels", 40),
        max_label_length=limits.get("max_label_length", 2048),
    )


GPU = {"__name__": "gpufleet_gpu_up", "node": "n1", "gpu": "0", "uuid": "GPU-1"}


def test_a_label_name_sent_twice_is_seen_by_the_decoder_and_refused():
    twice = label_field("__name__", "gpufleet_gpu_up") + label_field("node", "n1") + label_field("node", "n2")
    once = label_field("__name__", "gpufleet_gpu_up") + label_field("node", "n1")
    known = rw.KnownLabelSets()
    batch = rw.decode_batch(request(series_of(twice), series_of(once)), known=known)
    bad, good = batch.label_sets
    assert bad.labels == {"__name__": "gpufleet_gpu_up", "node": "n2"} and bad.repeated == "node"
    assert good.repeated is None
    refusal = check_label_sets(batch.new.values(), max_labels=40, max_label_length=2048)
    assert refusal is not None and refusal.reason == "duplicate_label"
    assert 'the label "node" more than once' in refusal.message
    # a known label set is looked up, not decoded again: the fast path has nothing more to do
    known.admit({good.key: good})
    again = rw.decode_batch(request(series_of(once)), known=known)
    assert again.new == {} and again.label_sets == [good]


@pytest.mark.parametrize(
    "labels,reason,says",
    [
        ({"node": "n1"}, "metric_name", "has no __name__ label"),
        ({**GPU, "__name__": "gpu.up"}, "metric_name", '__name__ "gpu.up" is not a metric name'),
        ({**GPU, "__name__": "9lives"}, "metric_name", "is not a metric name"),
        ({**GPU, "__name__": "m" * 201}, "metric_name", "is 201 characters, over the store's limit of 200"),
        (
            {**GPU, "node": "n" * 254},
            "label_length",
            "label node is 254 characters, over the store's limit of 253",
        ),
        (
            {**GPU, "uuid": "G" * 65},
            "label_length",
            "label uuid is 65 characters, over the store's limit of 64",
        ),
        ({**GPU, "pod": "p" * 2049}, "label_length", "label pod is 2049 characters, over the limit of 2048"),
        ({**GPU, "node": "n\x001"}, "control_character", "label node holds the control character U+0000"),
        ({**GPU, "pod": "a\nb"}, "control_character", "label pod holds the control character U+000A"),
        ({**GPU, "pod": "a\x85b"}, "control_character", "U+0085"),
        ({**GPU, "bad-name": "x"}, "label_name", "'bad-name' is not a valid label name"),
        ({**GPU, "a,b": "x"}, "label_name", "'a,b' is not a valid label name"),
    ],
)
def test_each_thing_the_store_cannot_hold_is_refused_naming_the_field(labels, reason, says):
    refusal = refusal_of(GPU, labels)
    assert refusal is not None and (refusal.reason, refusal.status) == (reason, 400)
    assert says in refusal.message, refusal.message
    assert "\x00" not in refusal.message and "\n" not in refusal.message  # escaped in what is logged


def test_what_the_store_holds_passes():
    assert refusal_of(GPU, {**GPU, "node": "n" * 253, "uuid": "G" * 64, "pod": "p" * 2048}) is None
    assert refusal_of({**GPU, "__name__": "m" * 200, "model": "NVIDIA H100 80GB HBM3 — ünïcode"}) is None
    assert refusal_of({**GPU, "__name__": "job:gpu_busy:ratio5m"}) is None


def test_the_window_runs_from_the_raw_retention_back_to_an_hour_ahead():
    window = Window(3600.0, 15 * 86400.0)
    assert window.bounds(NOW_MS) == (NOW_MS - 15 * DAY_MS, NOW_MS + HOUR_MS)
    assert Window(3600.0, None).bounds(NOW_MS)[0] == 0  # kept forever: back to 1970, never before
    assert Window(60.0, 100 * 365 * 86400.0).bounds(NOW_MS)[0] == 0
    assert window.flags() == "--max-past 2w1d, --max-future 1h"


def test_times_are_checked_once_per_run_of_timestamps_and_the_first_series_outside_is_named():
    shared = [NOW_MS, NOW_MS + 1000]
    lo, hi = NOW_MS - DAY_MS, NOW_MS + HOUR_MS
    assert check_times([shared, shared, [], [lo, hi]], lo, hi) is None
    assert check_times([shared, shared, [NOW_MS, hi + 1], shared], lo, hi) == 2
    assert check_times([shared, [lo - 1, NOW_MS]], lo, hi) == 1
    year_3000 = 32_503_680_000_000
    ls = rw.LabelSet.of(GPU)
    refusal = time_refusal(ls, [NOW_MS, year_3000], lo, hi, Window(3600.0, 86400.0))
    assert refusal.reason == "timestamp"
    assert "has a sample at 3000-01-01T00:00:00Z, after the window" in refusal.message
    assert "--max-past 1d, --max-future 1h" in refusal.message and "clock" in refusal.message
    assert "-9223372036854775808 ms since 1970" in time_refusal(ls, [-(2**63)], lo, hi, Window(1, 1)).message


@pytest.mark.parametrize(
    "samples,says",
    [
        ([(1000, 1.0)], "1970-01-01T00:00:01Z, before the window"),
        ([(-5000, 1.0)], "before the window"),
        ([(2**63 - 1, 1.0)], "after the window"),
        ([(NOW_MS - 16 * DAY_MS, 1.0), (NOW_MS, 1.0)], "before the window"),
        ([(NOW_MS + 2 * HOUR_MS, 1.0)], "after the window"),
    ],
)
def test_a_request_with_a_sample_outside_the_window_is_refused_whole(samples, says):
    good = rw.Series(GPU, [(NOW_MS, 1.0)])
    bad = rw.Series({**GPU, "gpu": "1", "uuid": "GPU-2"}, samples)
    batch = rw.decode_batch(rw.encode([good, bad]))
    refusal = _validate(batch, Limits(max_past=15 * 86400.0), now_ms=NOW_MS)
    assert refusal is not None and refusal.reason == "timestamp" and says in refusal.message
    assert 'uuid="GPU-2"' in refusal.message  # the series at fault, not the first one
    assert _validate(rw.decode_batch(rw.encode([good])), Limits(max_past=15 * 86400.0), now_ms=NOW_MS) is None


def test_refusals_are_logged_once_a_minute_per_reason_counting_those_held_back(caplog):
    now = [0.0]
    log = RefusalLog(clock=lambda: now[0])
    too_old = Refusal("timestamp", "too old")
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.admission"):
        for _ in range(5):
            log.note(too_old, 10)
        log.note(Refusal("control_character", "a NUL"), 3)
        now[0] = 61.0
        log.note(too_old, 10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused a write of 10 samples (timestamp): too old",
        "refused a write of 3 samples (control_character): a NUL",
        "refused a write of 10 samples (timestamp): too old (4 more refused for this reason since the last line)",
    ]


# ---- the store: what slips past the checks fails its own batch only, for good ------------------------------
@pytest.mark.postgres
def test_a_nul_the_database_cannot_hold_fails_its_own_batch_only_and_for_good(pg_url):
    store = Store.open(pg_url)
    try:
        good = [rw.Series({**GPU, "uuid": f"GPU-{i}"}, [(NOW_MS, 1.0)]) for i in range(3)]
        nul = [rw.Series({**GPU, "uuid": "GPU-9", "node": "n\x009"}, [(NOW_MS, 1.0)])]
        results = store.write_many([good[:1], nul, good[1:]])
        assert results[0] == 1 and results[2] == 2
        assert isinstance(results[1], BatchRefused) and str(results[1]) == "a label holds a NUL character"
        assert store.counts() == {"series": 3, "samples": 3}
        with pytest.raises(BatchRefused):
            store.write(nul)
    finally:
        store.close()
