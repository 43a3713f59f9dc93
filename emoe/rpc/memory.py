"""Giving freed heap memory back to the OS.

The torch engine raises glibc's trim and mmap thresholds so that a step's activations are
reused, not mapped afresh (``emoe.engine.cpu_kernels.keep_freed_host_memory``). The process
then also keeps whatever a burst of large request messages took (gRPC's buffers, the bytes,
the parsed message: measured ~3.6x a refused 16 MiB message, in every thread's arena) until
it exits. ``MemoryKeeper`` watches the resident size and asks glibc to release free memory
(``malloc_trim``) whenever it is more than ``slack_bytes`` above its size when the engine was
warm, at most once per ``interval_s``; while trimming frees little (the memory is in use) it
looks less and less often, down to once a minute. The engine's own reused blocks are well
inside the slack.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from pathlib import Path

MAX_INTERVAL_S = 60.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class MemoryKeeper:
    def __init__(self, slack_bytes: int = 64 << 20, interval_s: float = 1.0):
        self._trim = _malloc_trim()
        self._slack = slack_bytes
        self._interval_s = interval_s

    async def run(self) -> None:
        """Until cancelled; returns at once where there is no glibc or no /proc."""
        baseline = resident_bytes()
        if self._trim is None or baseline is None:
            return
        loop = asyncio.get_running_loop()
        interval = self._interval_s
        while True:
            await asyncio.sleep(interval)
            before = resident_bytes()
            if before <= baseline + self._slack:
                interval = self._interval_s
                continue
            await loop.run_in_executor(None, self._trim, 0)
            released = before - resident_bytes()
            interval = (self._interval_s if released >= self._slack // 4
                        else min(2 * interval, MAX_INTERVAL_S))
