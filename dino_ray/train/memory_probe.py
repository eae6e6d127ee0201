"""How much memory a training worker holds: before its models exist, and at its peak while stepping.

On a GPU this is the CUDA allocator's own high-water mark, reset once the engines are built. A CPU has no
such counter (``ru_maxrss`` also holds the one-off peak of building full models before ZeRO-3 partitions
them), so a daemon thread samples the resident set every few milliseconds while the steps run. These
figures are what ``dino-ray plan`` is checked against (``benchmarks/memory_plan.py``).
"""

from __future__ import annotations

import os
import threading

import torch


def process_memory_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StepMemory:
    """``before_models()`` at worker start, ``start()`` once the engines exist, ``peak()`` after the steps."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.before = 0
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def before_models(self) -> None:
        self.before = (torch.cuda.memory_allocated(self.device) if self.device.type == "cuda"
                       else process_memory_bytes())

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._max = process_memory_bytes()
        self._thread = threading.Thread(target=self._sample, name="dino-ray-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, process_memory_bytes())

    def peak(self) -> int:
        """The high-water mark since ``start()`` (stops the sampler)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._max, process_memory_bytes())
