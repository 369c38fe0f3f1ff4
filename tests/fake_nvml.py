"""A scripted fake of the pynvml surface: each function answers from a script, errors by NVML code."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


NOT_SUPPORTED, GPU_IS_LOST, LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, NO_PERMISSION = 3, 15, 12, 9, 4


class FakeNVML:
    """``answers[(function, gpu_index)]`` or ``answers[function]`` is a value, an error code (FakeNVMLError) or a
    callable; anything not scripted raises NOT_SUPPORTED, as an old GPU would."""

    NVMLError = FakeNVMLError

    def __init__(self, uuids: list[str], answers: dict | None = None, init_error: int | None = None) -> None:
        self.uuids = uuids
        self.answers = answers or {}
        self.init_error = init_error
        self.calls: list[str] = []

    def handle_key(self, h: Any) -> int:
        return h.index

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        return SimpleNamespace(index=i)

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return self._answer("nvmlDeviceGetUUID", h, default=self.uuids[h.index])

    def nvmlDeviceGetName(self, h: Any) -> bytes:
        return b"NVIDIA H100 80GB HBM3"  # old pynvml versions return bytes

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("nvml"):
            raise AttributeError(name)

        def fn(*args: Any) -> Any:
            h = args[0] if args and hasattr(args[0], "index") else None
            return self._answer(name, h, *args[1:])

        return fn

    def _answer(self, name: str, h: Any, *args: Any, default: Any = None) -> Any:
        self.calls.append(name)
        key = (name, h.index) if h is not None else None
        ans = self.answers.get(key, self.answers.get(name, default))
        if ans is None:
            raise FakeNVMLError(NOT_SUPPORTED)
        if isinstance(ans, FakeNVMLError):
            raise ans
        if callable(ans):
            return ans(*args)
        return ans
