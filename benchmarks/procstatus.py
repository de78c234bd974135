"""Memory figures of this process from /proc/self/status (Linux), shared by the benchmarks."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmHWM: peak RSS, VmRSS, RssAnon, ...); 0 where there is none."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
