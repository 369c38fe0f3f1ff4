"""Run ``gpufleet`` with each real GPU shown to it ``N`` times: what an agent costs on a node of more GPUs than
the machine at hand has, with every read a real NVML call.

    python3 bench/replicated_gpus.py N agent --listen ... (any ``gpufleet`` arguments)

NVML answers every read of a copy from the GPU it copies, so each copy costs the driver what a GPU of its own
would: the field-value batches, GPM samples and metrics, memory and clock reads, the slow rows. Each copy gets
a UUID of its own (the real one with its last four hex digits replaced by the copy's number), so the agent
keeps a series set, label dicts and GPM sample buffers per copy, as it would per GPU. What differs from a node
of N GPUs: the XID event set watches the one real GPU (registering it again fails, and the agent logs that),
and the driver's own per-device state is shared.

``bench/agent_cost.py --replicate N`` starts the agent through this.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any


class ReplicatedNVML:
    """The pynvml module, with each GPU listed ``copies`` times; everything else passes through."""

    def __init__(self, lib: Any, copies: int) -> None:
        self._lib = lib
        self._copies = copies
        self._real = 0  # the GPUs NVML sees, asked once NVML has started
        self._which: dict[int, int] = {}  # id(copy handle) -> copy number
        self._handles: list[Any] = []  # the copies' handles, kept alive so their ids stay theirs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def nvmlDeviceGetCount(self) -> int:
        self._real = self._lib.nvmlDeviceGetCount()
        return self._real * self._copies

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not self._real:
            self._real = self._lib.nvmlDeviceGetCount()
        real = self._lib.nvmlDeviceGetHandleByIndex(index % self._real)
        copy = ctypes.cast(real, type(real))  # the same device, a handle object of its own
        self._handles.append(copy)
        self._which[id(copy)] = index // self._real
        return copy

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        uuid = self._lib.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        n = self._which.get(id(handle), 0)
        return uuid if n == 0 else f"{uuid[:-4]}{n:04x}"


def main() -> None:
    copies = int(sys.argv[1])
    import pynvml

    import gpufleet.agent.nvml as gateway
    from gpufleet.cli import main as cli

    gateway.load_library = lambda: ReplicatedNVML(pynvml, copies)
    sys.argv = ["gpufleet", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()
