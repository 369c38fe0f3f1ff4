"""The one gateway to NVML.

Every NVML call in the agent goes through :class:`Nvml`. It is the only module
that imports ``pynvml`` (package ``nvidia-ml-py``). It takes the NVML library as
a constructor argument: the real ``pynvml`` module in production, or any object
with the same functions (the GPU simulator, a scripted fake in tests), so the
code above it runs the same path either way.

It turns "this GPU or driver cannot do that" into ``None`` and a GPU that stopped
answering into :class:`GpuLost`, so one bad field never fails a sample and one
lost GPU never fails the others.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from gpufleet.agent.families import Family
from gpufleet.core.metricspec import MetricSpec

# NVML return codes (nvml.h); stable ABI numbers, the same in every driver.
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_DRIVER_NOT_LOADED = 9
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_TIMEOUT = 10
ERROR_NO_DATA = 26
ERROR_UNKNOWN = 999

# nvmlValueType_t -> the member of the nvmlValue_t union that holds the value.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

# Answers that mean "no value here", not "something is wrong".
_NO_VALUE = {
    ERROR_NOT_SUPPORTED,
    ERROR_NO_PERMISSION,
    ERROR_FUNCTION_NOT_FOUND,
    ERROR_NOT_FOUND,
    ERROR_NO_DATA,
}
# Answers that mean the GPU itself has gone (fell off the bus, needs a reset).
_LOST = {ERROR_GPU_IS_LOST, ERROR_RESET_REQUIRED}
# Answers that say this GPU or driver cannot answer the question at all, so asking again is pointless: not
# supported, a function this driver lacks, an argument it does not have (a link past the GPU's last one), no
# permission. Timeouts, NO_DATA and the rest are a failed read of this once.
_UNSUPPORTED = {ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND, ERROR_INVALID_ARGUMENT, ERROR_NO_PERMISSION}


class NvmlUnavailable(RuntimeError):
    """NVML cannot start on this machine (no driver, no library, no GPU)."""


class GpuLost(RuntimeError):
    """A GPU stopped answering NVML."""


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    uuid: str
    model: str
    handle: Any
    serial: str | None = None
    pci_bus_id: str | None = None


@dataclass(frozen=True, slots=True)
class NvmlEvent:
    """One event from an NVML event set: the device it came from (as :meth:`Nvml.handle_key` names it),
    its ``nvmlEventType*`` bit and its data (the XID code for an XID event)."""

    device: Hashable
    event_type: int
    data: int


def load_library() -> Any:
    """The real NVML bindings."""
    import pynvml

    return pynvml


def _code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """NVML, started once, with "not supported" as ``None`` and lost GPUs as :class:`GpuLost`."""

    def __init__(self, lib: Any | None = None) -> None:
        self._lib: Any = lib  # the pynvml module or a stand-in; loaded on start() when not given
        self._started = False
        self._lock = threading.Lock()
        self._waiting = 0  # threads inside an event wait
        self.simulated = bool(getattr(lib, "SIMULATED", False))

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            if self._lib is None:
                try:
                    self._lib = load_library()
                except ImportError as exc:
                    raise NvmlUnavailable(
                        "the nvidia-ml-py package is not installed (pip install 'gpufleet[agent]'); "
                        "to try gpufleet without a GPU, run with --simulate 2"
                    ) from exc
            try:
                self._lib.nvmlInit()
            except Exception as exc:  # pynvml.NVMLError and subclasses
                raise NvmlUnavailable(self._explain_init_failure(exc)) from None
            self._started = True

    @staticmethod
    def _explain_init_failure(exc: BaseException) -> str:
        code = _code(exc)
        if code == ERROR_LIBRARY_NOT_FOUND:
            why = "libnvidia-ml.so.1 was not found (no NVIDIA driver on this machine or not mounted into the container)"
        elif code == ERROR_DRIVER_NOT_LOADED:
            why = "the NVIDIA kernel driver is not loaded"
        elif code == ERROR_NO_PERMISSION:
            why = "no permission to open /dev/nvidia* devices"
        else:
            why = f"nvmlInit failed: {exc}"
        return f"cannot start NVML: {why}; to try gpufleet without a GPU, run with --simulate 2"

    def shutdown(self) -> None:
        """Shut NVML down. Not under a thread still inside an event wait: NVML cannot cut a wait short, and
        its state must outlive the wait (the process is ending, or the wait ends within its timeout and the
        waiting thread frees its event set). A library that ends its waits on shutdown says so with
        ``SHUTDOWN_ENDS_WAITS`` (the simulator)."""
        with self._lock:
            if self._started:
                if self._waiting and not getattr(self._lib, "SHUTDOWN_ENDS_WAITS", False):
                    return
                with contextlib.suppress(Exception):
                    self._lib.nvmlShutdown()
                self._started = False

    def call(self, function: str, *args: Any) -> Any:
        """Call an NVML function. ``None`` when unsupported; :class:`GpuLost` when the GPU is gone."""
        fn = getattr(self._lib, function, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except self._lib.NVMLError as exc:
            code = _code(exc)
            if code in _NO_VALUE:
                return None
            if code in _LOST:
                raise GpuLost(f"{function}: {exc}") from None
            # Anything else (timeout, insufficient size, ...) is a failed read of this one field.
            return None

    def collect(self) -> list[Family]:
        """The gateway's own metric: whether the GPUs behind it are simulated (the agent adds ``node``)."""
        simulated = Family("gpufleet_agent_simulated", "gauge", "1 when the GPUs are simulated, not real.")
        simulated.add({}, 1.0 if self.simulated else 0.0)
        return [simulated]

    # ---- events ----------------------------------------------------------------------------------
    def event_set(self) -> Any | None:
        """A new event set; ``None`` when this driver has none."""
        return self.call("nvmlEventSetCreate")

    def register_events(self, handle: Any, mask: int, event_set: Any) -> bool:
        """Ask for ``mask`` events of one GPU in ``event_set``; False when the GPU cannot report them (a mask
        with one unsupported bit fails whole). Raises :class:`GpuLost`."""
        return self.call_ok("nvmlDeviceRegisterEvents", handle, mask, event_set)

    def wait_event(self, event_set: Any, timeout_ms: int) -> NvmlEvent | None:
        """The next event within ``timeout_ms``; ``None`` on timeout or a transient NVML failure. Anything
        other than an NVML error is raised."""
        with self._lock:
            self._waiting += 1
        try:
            data = self._lib.nvmlEventSetWait_v2(event_set, timeout_ms)
        except self._lib.NVMLError:
            return None
        finally:
            with self._lock:
                self._waiting -= 1
        return NvmlEvent(self.handle_key(data.device), int(data.eventType), int(data.eventData))

    def free_event_set(self, event_set: Any) -> None:
        self.call("nvmlEventSetFree", event_set)

    def handle_key(self, handle: Any) -> Any:
        """A hashable identity for a device handle (event data carries a handle, not an index)."""
        own = getattr(self._lib, "handle_key", None)
        if own is not None:
            return own(handle)
        import ctypes

        return ctypes.cast(handle, ctypes.c_void_p).value

    def gpm_metrics(
        self, handle: Any, sample1: Any, sample2: Any, metric_ids: list[int]
    ) -> dict[int, float | None]:
        """GPM metrics (percent) between two samples of one GPU; ``None`` for each the GPU cannot compute."""
        lib = self._lib
        mg = lib.c_nvmlGpmMetricsGet_t()
        mg.version = getattr(lib, "NVML_GPM_METRICS_GET_VERSION", 1)
        mg.numMetrics = len(metric_ids)
        mg.sample1, mg.sample2 = sample1, sample2
        for i, mid in enumerate(metric_ids):
            mg.metrics[i].metricId = mid
        if self.call("nvmlGpmMetricsGet", mg) is None:
            return dict.fromkeys(metric_ids)
        return {
            mid: (mg.metrics[i].value if mg.metrics[i].nvmlReturn == 0 else None)
            for i, mid in enumerate(metric_ids)
        }

    def field_values(self, handle: Any, ids: list[tuple[int, int]]) -> dict[tuple[int, int], float | None]:
        """One batched ``nvmlDeviceGetFieldValues`` read: ``{(field id, scope): value}``, ``None`` per missing value."""
        return self.probe_fields(handle, ids)[0]

    def probe(self, function: str, *args: Any) -> tuple[Any, bool]:
        """Like :meth:`call`, and whether a ``None`` answer means "this GPU or driver cannot answer that" (so
        the caller may stop asking) rather than a failed read. Raises :class:`GpuLost`."""
        answer, code = self._answer(function, *args)
        return answer, code in _UNSUPPORTED

    def probe_fields(
        self, handle: Any, ids: list[tuple[int, int]]
    ) -> tuple[dict[tuple[int, int], float | None], frozenset[tuple[int, int]]]:
        """One batched ``nvmlDeviceGetFieldValues`` read, and the ``(field id, scope)`` pairs this GPU or driver
        cannot answer at all (as :meth:`probe` tells them apart from a failed read). Raises :class:`GpuLost`."""
        answer, code = self._answer("nvmlDeviceGetFieldValues", handle, ids)
        if answer is None:
            # The whole call failed: only a driver without field values at all says that of every id.
            return dict.fromkeys(ids), frozenset(ids) if code == ERROR_FUNCTION_NOT_FOUND else frozenset()
        out: dict[tuple[int, int], float | None] = {}
        cannot: set[tuple[int, int]] = set()
        for want, fv in zip(ids, answer, strict=False):
            ret = int(getattr(fv, "nvmlReturn", ERROR_UNKNOWN))
            if ret in _LOST:
                raise GpuLost(f"nvmlDeviceGetFieldValues field {want[0]}: NVML error {ret}")
            if ret != 0:
                out[want] = None
                if ret in _UNSUPPORTED:
                    cannot.add(want)
                continue
            member = _VALUE_MEMBERS.get(int(fv.valueType))
            out[want] = None if member is None else float(getattr(fv.value, member))
        return out, frozenset(cannot)

    def _answer(self, function: str, *args: Any) -> tuple[Any, int | None]:
        """The answer of an NVML function, or ``None`` and the NVML error code (FUNCTION_NOT_FOUND when this
        library lacks the function). Raises :class:`GpuLost`."""
        fn = getattr(self._lib, function, None)
        if fn is None:
            return None, ERROR_FUNCTION_NOT_FOUND
        try:
            return fn(*args), None
        except self._lib.NVMLError as exc:
            code = _code(exc)
            if code in _LOST:
                raise GpuLost(f"{function}: {exc}") from None
            return None, code if code is not None else ERROR_UNKNOWN

    def call_ok(self, function: str, *args: Any) -> bool:
        """Call an NVML function for its effect; True when it succeeded (``call`` cannot tell, as it answers None)."""
        fn = getattr(self._lib, function, None)
        if fn is None:
            return False
        try:
            fn(*args)
        except self._lib.NVMLError as exc:
            if _code(exc) in _LOST:
                raise GpuLost(f"{function}: {exc}") from None
            return False
        return True

    def driver_version(self) -> str | None:
        v = self.call("nvmlSystemGetDriverVersion")
        return _text(v) if v is not None else None

    def gpus(self) -> list[Gpu]:
        """Every GPU NVML can see. A GPU that fails to enumerate is left out (its loss is seen by uuid)."""
        count = self.call("nvmlDeviceGetCount") or 0
        out = []
        for index in range(count):
            try:
                handle = self.call("nvmlDeviceGetHandleByIndex", index)
                if handle is None:
                    continue
                uuid = self.call("nvmlDeviceGetUUID", handle)
                if uuid is None:
                    continue
                name = self.call("nvmlDeviceGetName", handle)
                serial = self.call("nvmlDeviceGetSerial", handle)
                pci = self.call("nvmlDeviceGetPciInfo", handle)
            except GpuLost:
                continue
            bus_id = _text(getattr(pci, "busId", "")) if pci is not None else None
            out.append(
                Gpu(
                    index,
                    _text(uuid),
                    _text(name) if name else "unknown",
                    handle,
                    _text(serial) if serial else None,
                    bus_id or None,
                )
            )
        return out


# Nvml.collect()'s series (the agent adds ``node``).
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_agent_simulated", "gauge", "", "1 when the GPUs are simulated, not real.", ("node",)
    ),
)
