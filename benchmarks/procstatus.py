"""Memory figures of this process from /proc/self/status (Linux), shared by the benchmarks."""

from __future__ import annotations

import threading


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmHWM: peak RSS, VmRSS, RssAnon, ...); 0 where there is none."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """The highest value of a /proc/self/status field (default RssAnon), read every `interval` seconds on a
    daemon thread from construction until `stop()`; `reset()` starts a new peak from the current value.

    RssAnon is what the process itself holds: VmHWM (peak RSS) also counts the file pages of a mmap'd
    checkpoint, which the kernel can drop at will, and the kernel keeps only that one peak.
    """

    def __init__(self, field: str = "RssAnon", interval: float = 0.005) -> None:
        self.field, self.interval = field, interval
        self._peak = status_kb(field)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._sample()

    def _sample(self) -> int:
        value = status_kb(self.field)
        with self._lock:
            self._peak = max(self._peak, value)
            return self._peak

    def reset(self) -> None:
        with self._lock:
            self._peak = status_kb(self.field)

    def peak_bytes(self) -> int:
        """The peak so far (one more reading taken now), in bytes."""
        return self._sample() * 1024

    def stop(self) -> int:
        """Stop sampling; returns the peak in bytes."""
        self._stopped.set()
        self._thread.join()
        return self.peak_bytes()
