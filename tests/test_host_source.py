"""The host source reads the node's CPU, memory and load from /proc through files it keeps open: the values
are those the kernel writes, every sample sees the kernel's latest text, and without /proc psutil answers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from gpufleet.agent.sources.host import HostSource, ProcFile, ProcStats

MEMINFO = """MemTotal:       16000000 kB
MemFree:         2000000 kB
MemAvailable:    9000000 kB
Buffers:          100000 kB
Cached:          5000000 kB
SwapTotal:             0 kB
"""


def stat(user: int, system: int, idle: int, iowait: int, guest: int = 0) -> str:
    # cpu user nice system idle iowait irq softirq steal guest guest_nice, then per-CPU lines and more
    return (
        f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 {guest} 0\n"
        f"cpu0 {user} 0 {system} {idle} {iowait} 0 0 0 {guest} 0\n"
        "intr 12345 " + " ".join("0" for _ in range(3000)) + "\nctxt 999\n"
    )


def rewrite(path: Path, text: str) -> None:
    """Change a file in place, as /proc's text changes under an open file."""
    with path.open("r+") as f:
        f.truncate(0)
        f.write(text)


def proc_tree(tmp_path: Path) -> Path:
    (tmp_path / "stat").write_text(stat(100, 50, 800, 50))
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "loadavg").write_text("1.25 0.80 0.50 2/345 6789\n")
    return tmp_path


def values(src: HostSource) -> dict[str, float]:
    return {f.name: f.samples[0][1] for f in src.collect()}


def test_host_values_are_read_from_proc_and_cpu_busy_is_the_share_since_the_last_sample(tmp_path):
    root = proc_tree(tmp_path)
    src = HostSource("node-a", cluster="c1", proc_root=root)
    rewrite(root / "stat", stat(100 + 30, 50 + 10, 800 + 50, 50 + 10))  # 100 ticks: 40 busy, 60 idle or I/O
    rewrite(root / "loadavg", "3.50 1.00 0.50 2/345 6789\n")
    got = values(src)
    assert got == {
        "gpufleet_host_cpu_utilization_ratio": 0.4,
        "gpufleet_host_memory_used_bytes": (16_000_000 - 9_000_000) * 1024,
        "gpufleet_host_memory_total_bytes": 16_000_000 * 1024,
        "gpufleet_host_load1": 3.5,
        "gpufleet_host_cpu_cores": float(psutil.cpu_count() or 0),
    }
    rewrite(
        root / "stat", stat(130 + 90, 60, 850, 60 + 10, guest=50)
    )  # guest time is inside user time, not added
    assert values(src)["gpufleet_host_cpu_utilization_ratio"] == 0.9
    assert all(f.samples[0][0] == {"node": "node-a", "cluster": "c1"} for f in src.collect())
    src.close()


def test_an_old_kernel_without_memavailable_counts_free_buffers_and_cache_as_available(tmp_path):
    root = proc_tree(tmp_path)
    rewrite(root / "meminfo", "\n".join(line for line in MEMINFO.splitlines() if "MemAvailable" not in line))
    got = values(HostSource("n", proc_root=root))
    assert got["gpufleet_host_memory_used_bytes"] == (16_000_000 - 2_000_000 - 100_000 - 5_000_000) * 1024


def test_a_proc_file_larger_than_its_first_read_is_read_whole(tmp_path):
    path = tmp_path / "meminfo"
    text = "".join(f"Key{i}: {i} kB\n" for i in range(2000))
    path.write_text(text)
    f = ProcFile(path, size=64)
    assert f.read().decode() == text
    rewrite(path, "MemTotal: 1 kB\n")
    assert f.read() == b"MemTotal: 1 kB\n"
    f.close()


def test_on_this_machine_the_values_agree_with_psutil():
    src = HostSource("n")
    got = values(src)
    assert got["gpufleet_host_memory_total_bytes"] == psutil.virtual_memory().total
    assert got["gpufleet_host_cpu_cores"] == psutil.cpu_count()
    assert 0.0 <= got["gpufleet_host_cpu_utilization_ratio"] <= 1.0
    assert 0 < got["gpufleet_host_memory_used_bytes"] < got["gpufleet_host_memory_total_bytes"]
    src.close()


def test_without_proc_psutil_answers(tmp_path):
    got = values(HostSource("n", proc_root=tmp_path / "no-proc-here"))
    assert got["gpufleet_host_memory_total_bytes"] == psutil.virtual_memory().total
    assert got["gpufleet_host_cpu_cores"] == psutil.cpu_count()


def test_a_proc_without_one_of_the_files_falls_back_to_psutil_and_leaves_no_file_open(tmp_path):
    root = proc_tree(tmp_path)
    (root / "loadavg").unlink()
    before = len(os.listdir("/proc/self/fd"))
    got = values(HostSource("n", proc_root=root))
    assert len(os.listdir("/proc/self/fd")) == before
    assert got["gpufleet_host_memory_total_bytes"] == psutil.virtual_memory().total


def test_cpu_busy_counts_a_counter_that_went_back_from_zero_and_keeps_the_share_within_a_tick(tmp_path):
    root = proc_tree(tmp_path)  # user 100, system 50, idle 800, iowait 50
    src = HostSource("n", proc_root=root)
    rewrite(root / "stat", stat(100 + 30, 50, 800 + 60, 50 - 20))  # iowait went back 20 ticks (proc(5))
    assert values(src)["gpufleet_host_cpu_utilization_ratio"] == pytest.approx(30 / 90)
    assert values(src)["gpufleet_host_cpu_utilization_ratio"] == pytest.approx(30 / 90)  # no tick since
    src.close()
    src.close()  # twice: nothing else is closed by it
    assert src.collect() == []  # a sample under way at shutdown finds nothing to read, and says nothing


def test_a_proc_whose_stat_is_not_the_kernels_falls_back_to_psutil_and_leaves_no_file_open(tmp_path):
    root = proc_tree(tmp_path)
    rewrite(root / "stat", "garbage\n")
    before = len(os.listdir("/proc/self/fd"))
    got = values(HostSource("n", proc_root=root))
    assert len(os.listdir("/proc/self/fd")) == before
    assert got["gpufleet_host_memory_total_bytes"] == psutil.virtual_memory().total


def test_the_files_kept_open_on_this_machines_proc_show_the_cpu_time_spent_meanwhile():
    stats = ProcStats(Path("/proc"))
    first = sum(int(x) for x in ProcFile(Path("/proc/stat")).first_line().split()[1:9])
    end = time.thread_time() + 0.3
    while time.thread_time() < end:  # a third of a second of one core's work
        pass
    busy = stats.cpu_busy_ratio()
    again = sum(int(x) for x in stats._stat.first_line().split()[1:9])
    assert again >= first + 30  # 10 ms ticks across all cores: at least this thread's 0.3 s
    assert busy >= 0.5 / (os.cpu_count() or 1)  # one core of the node busy, at least half the time
    stats.close()
