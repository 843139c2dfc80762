"""Peak memory of a code region: resident set size on CPU (sampled), allocated bytes on GPU."""

from __future__ import annotations

import os
import threading

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the lifetime peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``.

    On CUDA this is ``torch.cuda.max_memory_allocated`` over the region; elsewhere the largest RSS seen by
    a sampling thread (every ``interval`` seconds, plus at entry and exit).
    """

    def __init__(self, device_type: str = "cpu", interval: float = 0.02) -> None:
        self.device_type = device_type
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, current_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.bytes = max(self.bytes, current_rss_bytes())
