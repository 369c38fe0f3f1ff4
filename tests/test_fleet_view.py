"""The fleet view of a large fleet: nodes collapsed to their worst GPU, the heat-map of SM activity against
utilization, and filters by cluster, node and alert, through a real collector process and the page in
headless Chromium; the store's fleet read (one scan, series learnt once) on both back ends."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.collector.fleet import PerPoll
from gpufleet.collector.store import Store
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, produced, wait_until
from tests.wiring import HOT_GPU_RULES, CollectorProcess, remote_write


@dataclass(frozen=True)
class Gpu:
    """A simulated GPU: what it reports each second (None: a lost GPU, which only says so)."""

    cluster: str
    node: str
    index: int
    sm: float = 0.8
    util: float = 0.97
    temperature: float = 65.0
    lost: bool = False

    @property
    def uuid(self) -> str:
        return f"GPU-{self.node}-{self.index}"

    def series(self, seconds: list[int]) -> list[rw.Series]:
        ident = {"cluster": self.cluster, "node": self.node, "gpu": str(self.index), "uuid": self.uuid}
        ident["model"] = "NVIDIA H100 80GB HBM3"

        def s(metric: str, value: float, **extra: str) -> rw.Series:
            labels = {"__name__": produced(metric), **ident, **extra}
            return rw.Series(labels, [(t * 1000, value) for t in seconds])

        if self.lost:
            return [s("gpufleet_gpu_up", 0.0)]
        return [
            s("gpufleet_gpu_up", 1.0),
            s("gpufleet_gpu_sm_active_ratio", self.sm),
            s("gpufleet_gpu_utilization_ratio", self.util),
            s("gpufleet_gpu_temperature_celsius", self.temperature),
            s("gpufleet_gpu_memory_used_bytes", 60e9),
            s("gpufleet_gpu_memory_total_bytes", 80e9),
            s("gpufleet_gpu_power_watts", 500.0),
            s("gpufleet_gpu_clock_event_active", 0.0, reason="hw_thermal"),
        ]


def fleet_of_three_nodes() -> list[Gpu]:
    """24 GPUs (over the 16 a page shows open) on two clusters: gpu-e01 has lost GPU 5; on gpu-e02 GPU 2 is
    too hot (GpuTooHot fires) and GPUs 0 and 1 are busy with idle SMs; on gpu-w01 all is well and GPU 3
    does the least work."""
    gpus = []
    for cluster, node in (("east", "gpu-e01"), ("east", "gpu-e02"), ("west", "gpu-w01")):
        for i in range(8):
            gpu = Gpu(cluster, node, i)
            if node == "gpu-e01" and i == 5:
                gpu = Gpu(cluster, node, i, lost=True)
            elif node == "gpu-e02" and i == 2:
                gpu = Gpu(cluster, node, i, temperature=95.0)
            elif node == "gpu-e02" and i in (0, 1):
                gpu = Gpu(cluster, node, i, sm=0.15, util=0.95)
            elif node == "gpu-w01" and i == 3:
                gpu = Gpu(cluster, node, i, sm=0.5)
            gpus.append(gpu)
    return gpus


class Agents:
    """Pushes every GPU's samples through remote-write, as the nodes' agents would: the last 30 seconds
    at once, then each new second every second, so no GPU goes stale however long the test takes."""

    def __init__(self, url: str, gpus: list[Gpu]) -> None:
        self.url, self.gpus = url, gpus
        self.until = int(time.time()) - 30
        self._stop = threading.Event()
        self.push()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def push(self) -> None:
        now = int(time.time())
        if now > self.until:
            seconds = list(range(self.until, now))
            result = remote_write(self.url, [s for g in self.gpus for s in g.series(seconds)])
            assert result.status == 204, result.problem
            self.until = now

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.push()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOT_GPU_RULES)
    args = ["--db", f"sqlite:///{tmp_path / 'c.db'}", "--rules", str(rules), "--eval-interval", "1"]
    collector = CollectorProcess(free_port(), args, tmp_path / "collector.log")
    agents = Agents(collector.url, fleet_of_three_nodes())
    try:
        wait_until(
            lambda: any(
                a["rule"] == "GpuTooHot" for a in get_json(collector.url + "/api/v1/alerts")["alerts"]
            ),
            timeout=30,
        )
        yield collector.url
    finally:
        agents.stop()
        collector.stop()


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        if resp.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return json.loads(body)


def test_the_fleet_api_names_each_nodes_worst_gpu(three_nodes: str) -> None:
    fleet = wait_until(
        lambda: (lambda f: f if {n["status"] for n in f["nodes"]} == {"lost", "critical", "ok"} else None)(
            get_json(three_nodes + "/api/v1/fleet")
        ),
        timeout=20,
    )
    by_node = {n["node"]: n for n in fleet["nodes"]}
    assert [n["node"] for n in fleet["nodes"]] == ["gpu-e01", "gpu-e02", "gpu-w01"]
    assert (by_node["gpu-e01"]["status"], by_node["gpu-e01"]["worst"]) == ("lost", "GPU-gpu-e01-5")
    assert (by_node["gpu-e02"]["status"], by_node["gpu-e02"]["worst"]) == ("critical", "GPU-gpu-e02-2")
    assert by_node["gpu-e02"]["alerts_firing"] == 1
    # a healthy node's worst GPU is the one doing the least work
    assert (by_node["gpu-w01"]["status"], by_node["gpu-w01"]["worst"]) == ("ok", "GPU-gpu-w01-3")
    # a browser asks for gzip and gets the same document
    zipped = get_json(three_nodes + "/api/v1/fleet", {"Accept-Encoding": "gzip, deflate"})
    assert [n["worst"] for n in zipped["nodes"]] == [n["worst"] for n in fleet["nodes"]]
    assert zipped["totals"]["gpus"] == fleet["totals"]["gpus"] == 24


def test_many_pages_polling_at_once_read_the_store_once_a_poll() -> None:
    now = [100.0]
    reads: list[float] = []
    reading = threading.Event()
    release = threading.Event()

    def read_the_store() -> int:
        reads.append(now[0])
        reading.set()
        release.wait(10)
        return len(reads)

    fleet = PerPoll(read_the_store, ttl_s=1.0, clock=lambda: now[0])
    answers: list[int] = []
    pages = [threading.Thread(target=lambda: answers.append(fleet.get())) for _ in range(5)]
    pages[0].start()
    assert reading.wait(10)
    for p in pages[1:]:  # they come while the first page's read is under way, and wait for it
        p.start()
    release.set()
    for p in pages:
        p.join(10)
    assert answers == [1] * 5 and reads == [100.0]
    now[0] += 0.75
    assert fleet.get() == 1
    now[0] += 0.5  # a poll interval after the read: the next page reads again
    assert fleet.get() == 2 and reads == [100.0, 101.25]


def test_a_polled_fleet_view_is_worked_out_ahead_so_a_poll_does_not_wait_for_the_store() -> None:
    now = [0.0]
    reads = [0]
    release = threading.Event()

    def read_the_store() -> int:
        reads[0] += 1
        if reads[0] == 2:  # the read the page would wait for, if it waited
            release.wait(10)
        return reads[0]

    fleet = PerPoll(read_the_store, ttl_s=1.0, ahead=True, watch_s=15.0, clock=lambda: now[0])
    assert fleet.get() == 1  # the first call after a quiet spell waits for its read
    now[0] = 1.5  # a poll interval later: the refresher reads again, and that read hangs
    wait_until(lambda: reads[0] == 2, timeout=10)
    assert fleet.get() == 1  # the page's poll answers at once, with the answer of a poll ago
    release.set()
    wait_until(lambda: fleet.get() == 2, timeout=10)
    now[0] = 20.0  # nobody asked for 15 s: the refresher stops, having read no more
    wait_until(lambda: not fleet.refreshing, timeout=10)
    assert reads[0] == 2
    assert fleet.get() == 3  # the first call after the quiet spell waits for its read again


def test_a_fleet_view_kept_warm_answers_the_first_call_after_a_quiet_spell_at_once() -> None:
    now = [0.0]
    reads: list[float] = []

    def read_the_store() -> int:
        reads.append(now[0])
        return len(reads)

    fleet = PerPoll(
        read_the_store,
        ttl_s=1.0,
        ahead=True,
        watch_s=15.0,
        keep_warm=0.01,
        warm_min_s=10.0,
        clock=lambda: now[0],
    )
    assert fleet.get() == 1  # the very first call waits for its read
    assert fleet.warm_period() == 10.0  # a read that takes no time: every warm_min_s
    now[0] = 30.0  # nobody asked for 15 s: the thread goes on, every 10 s
    wait_until(lambda: reads[-1] == 30.0, timeout=10)
    assert fleet.refreshing
    n = len(reads)
    now[0] = 36.0  # six seconds after that read: no read yet
    time.sleep(0.3)
    assert len(reads) == n
    assert fleet.get() == n  # the page opened after the quiet spell answers at once, 6 s old
    wait_until(lambda: len(reads) == n + 1, timeout=10)  # and the thread is back to once a poll interval
    assert reads[-1] == 36.0
    now[0] = 37.5
    wait_until(lambda: len(reads) == n + 2, timeout=10)
    assert fleet.get() == n + 2
    fleet.close()  # the collector closes: nothing is worked out ahead any more
    assert not fleet.refreshing
    now[0] = 100.0
    time.sleep(0.3)
    assert len(reads) == n + 2


def test_a_slow_fleet_view_is_kept_warm_less_often() -> None:
    def read_the_store() -> int:
        time.sleep(0.2)
        return 1

    fleet = PerPoll(read_the_store, ttl_s=1.0, ahead=True, keep_warm=0.01, warm_min_s=10.0)
    fleet.get()
    # 0.2 s a build, 1 % of a core at most: once every 20 s, not every 10
    assert 19.0 < fleet.warm_period() < 30.0


# One object with what the page shows: each node's row, its GPU cells and cards, and the heat-map.
PAGE_STATE = """(() => ({
  nodes: [...document.querySelectorAll('section.node')].map((s) => ({
    node: s.dataset.node, cluster: s.dataset.cluster, status: s.dataset.status,
    row: s.querySelector('.noderow').innerText, open: s.querySelector('.noderow').getAttribute('aria-expanded'),
    cells: [...s.querySelectorAll('.cells .c')].map((c) => c.className),
    cards: s.querySelectorAll('article.gpu').length, trends: s.querySelectorAll('svg.trend polyline').length,
  })),
  heat: Object.fromEntries([...document.querySelectorAll('#heatmap .cell')].filter((c) => c.dataset.count > 0)
    .map((c) => [`${c.dataset.u},${c.dataset.s}`, Number(c.dataset.count)])),
  note: document.getElementById('heatmap-note')?.innerText,
  shown: document.getElementById('shown')?.innerText,
  hash: location.hash,
}))()"""


def test_a_large_fleet_page_shows_one_row_per_node_with_its_worst_gpu_a_heat_map_and_filters(
    three_nodes: str,
) -> None:
    from tests.cdp import Chromium

    url = three_nodes
    browser = Chromium()
    try:
        browser.viewport(1280, 900)
        browser.navigate(url + "/")
        seen: list = []

        def page(ready=lambda p: True):
            def check():
                seen[:] = [browser.evaluate(PAGE_STATE)]
                return seen[0] if seen[0]["nodes"] and ready(seen[0]) else None

            try:
                return wait_until(check, timeout=20)
            except AssertionError:
                raise AssertionError(f"the page never got there: {seen}") from None

        def act(js: str) -> None:
            browser.evaluate(f"(() => {{ {js} }})()")

        # 24 GPUs: one row per node, collapsed, each naming its worst GPU
        p = page(lambda p: {n["status"] for n in p["nodes"]} == {"lost", "critical", "ok"})
        rows = {n["node"]: n for n in p["nodes"]}
        assert list(rows) == ["gpu-e01", "gpu-e02", "gpu-w01"]
        assert all(n["open"] == "false" and n["cards"] == 0 and len(n["cells"]) == 8 for n in p["nodes"])
        assert "GPU 5 · lost" in rows["gpu-e01"]["row"]
        assert sum("st-lost" in c for c in rows["gpu-e01"]["cells"]) == 1
        assert "GPU 2 · GpuTooHot" in rows["gpu-e02"]["row"] and "95 °C" in rows["gpu-e02"]["row"]
        assert "least busy: GPU 3" in rows["gpu-w01"]["row"] and "SM 50%" in rows["gpu-w01"]["row"]
        text = browser.evaluate("document.body.innerText")
        assert "null" not in text and "undefined" not in text and "NaN" not in text

        # the heat-map places every GPU that reports both numbers (the lost one does not)
        assert sum(p["heat"].values()) == 23 and "1 without SM activity" in p["note"]
        assert p["heat"] == {"9,8": 20, "9,1": 2, "9,5": 1}  # utilization bin, SM activity bin

        # a click opens a node: its 8 GPU cards, with their 15-minute trends; another click closes it
        act("document.querySelector('section.node[data-node=\"gpu-e02\"] .noderow').click()")
        p = page(lambda p: p["nodes"][1]["cards"] == 8 and p["nodes"][1]["trends"] >= 2 * 8)
        assert [n["cards"] for n in p["nodes"]] == [0, 8, 0] and p["nodes"][1]["open"] == "true"
        act("document.querySelector('section.node[data-node=\"gpu-e02\"] .noderow').click()")
        page(lambda p: p["nodes"][1]["cards"] == 0)

        # a heat-map cell filters to the nodes with GPUs in it: busy, SMs mostly idle
        act('document.querySelector(\'#heatmap .cell[data-u="9"][data-s="1"]\').click()')
        p = page(lambda p: len(p["nodes"]) == 1)
        assert p["nodes"][0]["node"] == "gpu-e02" and "2/8 match" in p["nodes"][0]["row"]
        assert sum("match" in c.split() for c in p["nodes"][0]["cells"]) == 2
        assert p["shown"] == "1 of 3 nodes"
        act('document.querySelector(\'#heatmap .cell[data-u="9"][data-s="1"]\').click()')
        page(lambda p: len(p["nodes"]) == 3)

        # by cluster: the heat-map follows
        act(
            "const s = document.getElementById('filter-cluster'); s.value = 'west'; s.dispatchEvent(new Event('change'));"
        )
        p = page(lambda p: [n["node"] for n in p["nodes"]] == ["gpu-w01"])
        assert p["heat"] == {"9,8": 7, "9,5": 1} and "cluster=west" in p["hash"]
        # the filter is in the address: a reload (or a shared link) keeps it
        browser.navigate(url + "/" + p["hash"])
        p = page(lambda p: [n["node"] for n in p["nodes"]] == ["gpu-w01"])
        assert browser.evaluate("document.getElementById('filter-cluster').value") == "west"
        act("document.getElementById('clear-filters').click()")
        page(lambda p: len(p["nodes"]) == 3)

        # by node name, as typed
        act(
            "const i = document.getElementById('filter-node'); i.value = 'e02'; i.dispatchEvent(new Event('input'));"
        )
        page(lambda p: [n["node"] for n in p["nodes"]] == ["gpu-e02"])
        act(
            "const i = document.getElementById('filter-node'); i.value = ''; i.dispatchEvent(new Event('input'));"
        )
        page(lambda p: len(p["nodes"]) == 3)

        # by alert: one rule, then every GPU with a problem (lost counts, an alert counts)
        options = browser.evaluate("[...document.getElementById('filter-alert').options].map((o) => o.value)")
        assert "GpuTooHot" in options and "@problem" in options
        act(
            "const s = document.getElementById('filter-alert'); s.value = 'GpuTooHot'; s.dispatchEvent(new Event('change'));"
        )
        p = page(lambda p: [n["node"] for n in p["nodes"]] == ["gpu-e02"])
        assert "1/8 match" in p["nodes"][0]["row"] and p["heat"] == {"9,8": 1}
        act(
            "const s = document.getElementById('filter-alert'); s.value = '@problem'; s.dispatchEvent(new Event('change'));"
        )
        p = page(lambda p: [n["node"] for n in p["nodes"]] == ["gpu-e01", "gpu-e02"])
        assert "1/8 match" in p["nodes"][0]["row"] and "1/8 match" in p["nodes"][1]["row"]
    finally:
        browser.close()


def test_a_small_fleet_page_shows_every_gpu_open(tmp_path: Path) -> None:
    from tests.cdp import Chromium

    collector = CollectorProcess(free_port(), ["--db", f"sqlite:///{tmp_path / 'c.db'}"], tmp_path / "c.log")
    agents = Agents(collector.url, [g for g in fleet_of_three_nodes() if g.node == "gpu-w01"])
    browser = Chromium()
    try:
        browser.viewport(1280, 900)
        browser.navigate(collector.url + "/")
        wait_until(
            lambda: browser.evaluate("document.querySelectorAll('article.gpu').length") == 8, timeout=20
        )
        assert browser.evaluate("document.querySelector('.noderow').getAttribute('aria-expanded')") == "true"
    finally:
        browser.close()
        agents.stop()
        collector.stop()


# ---- the store's fleet read ---------------------------------------------------------------------------------


def series(metric: str, value: float, ts: int, uuid: str = "GPU-1", **labels: str) -> rw.Series:
    base = {"__name__": produced(metric), "node": "n1", "gpu": "0", "uuid": uuid, "model": "H100"}
    return rw.Series({**base, **labels}, [(ts, value)])


def test_a_gpu_whose_pod_changed_shows_once_with_the_new_pod_and_the_newest_value(store: Store) -> None:
    store.write([series("gpufleet_gpu_temperature_celsius", 40.0, 1000, pod="train-a", namespace="ml")])
    store.write([series("gpufleet_gpu_temperature_celsius", 55.0, 2000, pod="train-b", namespace="ml")])
    (g,) = store.gpus(now_ms=3000)
    assert (g.label("pod"), g.value("gpufleet_gpu_temperature_celsius"), g.last_seen_ms) == (
        "train-b",
        55.0,
        2000,
    )
    assert g.to_api()["values"] == {"gpufleet_gpu_temperature_celsius": 55.0}


def test_the_fleet_read_learns_series_and_gpus_that_appear_between_polls(store: Store) -> None:
    store.write([series("gpufleet_gpu_temperature_celsius", 40.0, 1000)])
    assert [g.uuid for g in store.gpus(now_ms=1000)] == ["GPU-1"]
    store.write(
        [
            series("gpufleet_gpu_temperature_celsius", 41.0, 2000),
            series("gpufleet_gpu_clock_event_active", 1.0, 2000, reason="hw_thermal"),
            series("gpufleet_gpu_temperature_celsius", 70.0, 2000, uuid="GPU-2", gpu="1"),
            rw.Series(
                {"__name__": produced("gpufleet_host_cpu_utilization_ratio"), "node": "n1"}, [(2000, 0.5)]
            ),
        ]
    )
    g1, g2 = store.gpus(now_ms=2000)
    assert g1.to_api()["values"] == {
        "gpufleet_gpu_temperature_celsius": 41.0,
        'gpufleet_gpu_clock_event_active{reason="hw_thermal"}': 1.0,
    }
    assert [(v.labels, v.value) for v in g1.series("gpufleet_gpu_clock_event_active")] == [
        ({"reason": "hw_thermal"}, 1.0)
    ]
    assert (g2.uuid, g2.label("gpu"), g2.value("gpufleet_gpu_temperature_celsius")) == ("GPU-2", "1", 70.0)


def test_a_trend_query_for_one_node_returns_that_nodes_gpus_only(store: Store) -> None:
    store.write(
        [
            series("gpufleet_gpu_sm_active_ratio", 0.5, 10_000, uuid=f"GPU-{node}-{i}", node=node, gpu=str(i))
            for node in ("n1", "n2")
            for i in range(2)
        ]
        + [
            rw.Series(
                {"__name__": produced("gpufleet_gpu_sm_active_ratio"), "uuid": "GPU-x"}, [(10_000, 0.1)]
            )
        ]
    )
    res = store.query_range("gpufleet_gpu_sm_active_ratio", {"node": "n2"}, 10, 10, 1)
    assert sorted(r["metric"]["uuid"] for r in res) == ["GPU-n2-0", "GPU-n2-1"]
    # an empty matcher is "the label is absent", as before
    (nodeless,) = store.query_range("gpufleet_gpu_sm_active_ratio", {"node": ""}, 10, 10, 1)
    assert nodeless["metric"]["uuid"] == "GPU-x"


def test_keeping_a_value_warm_without_working_it_out_ahead_is_refused():
    with pytest.raises(ValueError, match="keep_warm needs ahead=True"):
        PerPoll(lambda: 1, ttl_s=1.0, keep_warm=0.01)
