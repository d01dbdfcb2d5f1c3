"""GPU memory through NVML (pynvml), when there is a GPU; a quiet no-op when there is not."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class GpuMonitor:
    """Reads VRAM use per process. Every method is safe to call without a GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            self._nvml = pynvml
        except Exception as exc:  # no driver, no library, no device: all mean "no GPU"
            log.debug("no GPU found", extra={"reason": str(exc)})

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def vram_bytes_by_pid(self) -> dict[int, int]:
        usage: dict[int, int] = {}
        if not self._handles:
            return usage
        try:
            for handle in self._handles:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    usage[proc.pid] = usage.get(proc.pid, 0) + int(proc.usedGpuMemory or 0)
        except Exception as exc:
            log.warning("could not read GPU memory", extra={"reason": str(exc)})
        return usage

    def free_bytes(self) -> int | None:
        if not self._handles:
            return None
        try:
            return sum(int(self._nvml.nvmlDeviceGetMemoryInfo(h).free) for h in self._handles)
        except Exception:
            return None
