"""NVLink counters read from the fields each GPU generation answers, learned once per GPU: scripted NVML
answers shaped like a real H200 on driver 580 (per-GPU totals and per-link field ids NOT_SUPPORTED, the
data-link counters answering per link through scopeId) and like an Ampere GPU (totals answering)."""

from __future__ import annotations

from types import SimpleNamespace

from gpufleet.agent import fields as F
from gpufleet.agent.dcgm_names import to_dcgm
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.sources.gpu import GpuSource
from tests.fake_nvml import FakeNVML, FakeNVMLError

NOT_SUPPORTED, INVALID_ARGUMENT, TIMEOUT = 3, 2, 10
LINKS = 18


class ScriptedGpus:
    """Per GPU index: field values by (field id, scope) (a plain id answers any scope), the NVML code of every
    other field, link states, nvmlDeviceGetNvLinkErrorCounter answers. Records what each read asked for."""

    def __init__(self) -> None:
        self.fields: dict[int, dict] = {}
        self.field_codes: dict[int, dict] = {}  # gpu -> {(field id, scope): code} for a failing field
        self.state: dict[int, dict[int, int]] = {}
        self.counters: dict[int, dict[tuple[int, int], int]] = {}
        self.asked: list[tuple[int, list[tuple[int, int]]]] = []  # (gpu, field ids) per batched read

    def answers(self) -> dict:
        out: dict = {}
        for gpu in self.fields:
            out[("nvmlDeviceGetFieldValues", gpu)] = lambda ids, g=gpu: self._field_values(g, ids)
            out[("nvmlDeviceGetNvLinkState", gpu)] = lambda link, g=gpu: self._state(g, link)
            out[("nvmlDeviceGetNvLinkErrorCounter", gpu)] = lambda link, c, g=gpu: self._counter(g, link, c)
        return out

    def _field_values(self, gpu: int, ids: list[tuple[int, int]]) -> list:
        self.asked.append((gpu, list(ids)))
        out = []
        for fid, scope in ids:
            entry = SimpleNamespace(fieldId=fid, scopeId=scope, valueType=3, value=SimpleNamespace())
            value = self.fields[gpu].get((fid, scope), self.fields[gpu].get(fid))
            entry.nvmlReturn = (
                self.field_codes.get(gpu, {}).get((fid, scope), NOT_SUPPORTED) if value is None else 0
            )
            entry.value.ullVal = value or 0
            out.append(entry)
        return out

    def _state(self, gpu: int, link: int) -> int:
        if link not in self.state.get(gpu, {}):
            raise FakeNVMLError(INVALID_ARGUMENT)
        return self.state[gpu][link]

    def _counter(self, gpu: int, link: int, counter: int) -> int:
        got = self.counters.get(gpu, {}).get((link, counter))
        if got is None:
            raise FakeNVMLError(NOT_SUPPORTED)
        return got

    def hopper(self, gpu: int, *, replay: dict[int, int] | None = None, down: tuple[int, ...] = ()) -> None:
        """An H200 on driver 580 as the issue saw it: only the link-scoped DL counters answer."""
        replay = replay or {}
        self.fields[gpu] = {
            **{(F.FI_NVLINK_ERROR_DL_CRC, link): 0 for link in range(LINKS)},
            **{(F.FI_NVLINK_ERROR_DL_REPLAY, link): replay.get(link, 0) for link in range(LINKS)},
            **{(F.FI_NVLINK_ERROR_DL_RECOVERY, link): 0 for link in range(LINKS)},
        }
        self.state[gpu] = {link: int(link not in down) for link in range(LINKS)}

    def ampere(self, gpu: int) -> None:
        """Twelve links, NVML's per-GPU totals and per-link field ids."""
        self.fields[gpu] = {
            F.FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: 7,
            F.FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL: 3,
        }
        self.fields[gpu] |= {ids[0]: 1 for ids in F.NVLINK_LEGACY_LINK_FIELDS.values()}
        self.state[gpu] = {link: 1 for link in range(12)}


def source(gpus: ScriptedGpus, n: int, **kw) -> tuple[GpuSource, FakeNVML, SimpleNamespace]:
    clock = SimpleNamespace(t=0.0)
    fake = FakeNVML([f"GPU-{i}" for i in range(n)], gpus.answers())
    src = GpuSource(
        Nvml(fake), "n", watch_events=False, background=False, clock=lambda: clock.t, slow_interval=10, **kw
    )
    src.start()
    return src, fake, clock


def nvlink(fams, name: str, **match: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(labels[k] for k in ("gpu", "type", "link") if k in labels): v
        for f in fams
        if f.name == name
        for labels, v in f.samples
        if all(labels.get(k) == val for k, val in match.items())
    }


def test_an_h200_reads_its_link_scoped_counters_summed_per_gpu_and_an_ampere_its_totals():
    gpus = ScriptedGpus()
    gpus.hopper(0, replay={2: 5, 9: 1})
    gpus.ampere(1)
    src, _, _ = source(gpus, 2, nvlink_per_link=True)
    fams = src.collect()

    totals = nvlink(fams, "gpufleet_gpu_nvlink_errors_total")
    assert totals == {
        ("0", "crc_flit"): 0,
        ("0", "replay"): 6,  # links 2 and 9
        ("0", "recovery"): 0,
        ("1", "crc_flit"): 7,  # NVML's own totals where it has them ...
        ("1", "replay"): 3,
        ("1", "crc_data"): 1,  # ... else the sum of the per-link field ids (link 0 counted one each)
        ("1", "recovery"): 1,
        ("1", "ecc_data"): 1,
    }
    per_link = nvlink(fams, "gpufleet_gpu_nvlink_link_errors_total", gpu="0", type="replay")
    assert len(per_link) == LINKS and per_link[("0", "replay", "2")] == 5
    assert nvlink(fams, "gpufleet_gpu_nvlink_links") == {("0",): 18, ("1",): 12}
    assert nvlink(fams, "gpufleet_gpu_nvlink_links_up") == {("0",): 18, ("1",): 12}


def test_what_a_gpu_does_not_answer_is_asked_once_and_never_again():
    gpus = ScriptedGpus()
    gpus.hopper(0)
    src, fake, clock = source(gpus, 1)
    # the slow rows' batch (the NVLink counters are slow rows; the costly ones come in a batch of their own)
    first = next(
        set(ids) for _, ids in reversed(gpus.asked) if (F.FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL, 0) in ids
    )
    assert (F.FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL, 0) in first  # the first read asks every place
    assert (F.NVLINK_LEGACY_LINK_FIELDS["replay"][0], 0) in first
    counter_calls = fake.calls.count("nvmlDeviceGetNvLinkErrorCounter")
    assert counter_calls == LINKS * 2  # CRC-data and ECC: the only counters without a field that answers

    gpus.asked.clear()
    fake.calls.clear()
    clock.t += 10  # the next slow read
    src.collect()
    slow = [ids for _, ids in gpus.asked if (F.FI_NVLINK_ERROR_DL_CRC, 0) in ids]
    assert len(slow) == 1
    nvlink_ids = {i for i in slow[0] if i[0] in {38, 45, 52, 59, 160, 161, 162, 163} or 32 <= i[0] <= 159}
    assert nvlink_ids == {(fid, link) for fid in F.NVLINK_DL_FIELDS.values() for link in range(LINKS)}
    assert "nvmlDeviceGetNvLinkErrorCounter" not in fake.calls
    assert fake.calls.count("nvmlDeviceGetNvLinkState") == LINKS


def test_a_gpu_without_nvlink_exports_no_nvlink_health_and_stops_asking():
    gpus = ScriptedGpus()
    gpus.fields[0] = {}
    gpus.state[0] = {}
    src, fake, clock = source(gpus, 1, nvlink_per_link=True)
    fams = src.collect()
    assert not [s for f in fams if f.name.startswith("gpufleet_gpu_nvlink") for s in f.samples]
    fake.calls.clear()
    clock.t += 10
    src.collect()
    assert "nvmlDeviceGetNvLinkState" not in fake.calls
    assert "nvmlDeviceGetNvLinkErrorCounter" not in fake.calls


def test_a_failed_read_is_not_a_no_and_a_link_that_stops_answering_keeps_its_count_in_the_sum():
    gpus = ScriptedGpus()
    gpus.hopper(0, replay={4: 10})
    # the first read of the per-GPU replay total times out: not taken for "not supported"
    gpus.fields[0][F.FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL] = None
    gpus.field_codes[0] = {(F.FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL, 0): TIMEOUT}
    src, _, clock = source(gpus, 1)
    assert nvlink(src.collect(), "gpufleet_gpu_nvlink_errors_total", type="replay") == {}
    gpus.field_codes[0] = {}  # now NOT_SUPPORTED, as on a real H200: the per-link sum takes over
    clock.t += 10
    assert nvlink(src.collect(), "gpufleet_gpu_nvlink_errors_total", type="replay") == {("0", "replay"): 10}

    del gpus.fields[0][(F.FI_NVLINK_ERROR_DL_REPLAY, 4)]
    gpus.field_codes[0] = {(F.FI_NVLINK_ERROR_DL_REPLAY, 4): TIMEOUT}
    gpus.fields[0][(F.FI_NVLINK_ERROR_DL_REPLAY, 5)] = 2
    clock.t += 10
    # link 4 failed this read: its 10 stay in the sum, so a rate sees no counter reset
    assert nvlink(src.collect(), "gpufleet_gpu_nvlink_errors_total", type="replay") == {("0", "replay"): 12}


def test_a_link_that_was_down_at_start_is_read_once_it_comes_up():
    gpus = ScriptedGpus()
    gpus.hopper(0, down=(7,))
    for fid in F.NVLINK_DL_FIELDS.values():  # a down link's counters do not answer
        del gpus.fields[0][(fid, 7)]
    src, _, clock = source(gpus, 1, nvlink_per_link=True)
    fams = src.collect()
    assert nvlink(fams, "gpufleet_gpu_nvlink_links_up") == {("0",): 17}
    assert ("0", "replay", "7") not in nvlink(fams, "gpufleet_gpu_nvlink_link_errors_total")

    gpus.hopper(0, replay={7: 3})  # it trains, with 3 replays
    clock.t += 10
    src.collect()  # this read sees one more link up: the GPU learns its answers again
    clock.t += 10
    fams = src.collect()
    assert nvlink(fams, "gpufleet_gpu_nvlink_links_up") == {("0",): 18}
    assert nvlink(fams, "gpufleet_gpu_nvlink_link_errors_total")[("0", "replay", "7")] == 3
    assert nvlink(fams, "gpufleet_gpu_nvlink_errors_total", type="replay") == {("0", "replay"): 3}


def test_dcgm_naming_writes_dcgm_exporters_per_link_and_total_fields():
    gpus = ScriptedGpus()
    gpus.hopper(0, replay={2: 5})
    gpus.counters[0] = {(link, F.NVLINK_ERROR_COUNTERS["ecc_data"]): 4 for link in range(LINKS)}
    src, _, _ = source(gpus, 1, nvlink_per_link=True)
    fams = {f.name: f for f in to_dcgm(src.collect())}
    assert fams["DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_L2"].samples[0][1] == 5
    assert fams["DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL"].samples[0][1] == 5
    assert fams["DCGM_FI_DEV_NVLINK_ECC_DATA_ERROR_COUNT_TOTAL"].samples[0][1] == 4 * LINKS
    # dcgm-exporter has no per-link ECC field: those keep gpufleet's name
    kept = fams["gpufleet_gpu_nvlink_link_errors_total"].samples
    assert {labels["type"] for labels, _ in kept} == {"ecc_data"} and len(kept) == LINKS
