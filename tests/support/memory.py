"""A process's memory from /proc: what it holds now and the most it ever held."""

from __future__ import annotations

from pathlib import Path


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (now) and ``VmHWM`` (the peak since start) in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def peak_growth_mib(pid: int, rss_before_kib: int) -> float:
    """How far the peak RSS rose above an earlier RSS, in MiB."""
    return (memory_kib(pid)["VmHWM"] - rss_before_kib) / 1024
