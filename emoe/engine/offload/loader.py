"""Asynchronous host-to-device expert copies: a copy stream and the fences it records.

On CUDA, copies are non-blocking and run on a side stream; a fence is a CUDA event, and the
compute stream waits on it on the device, so the host never blocks. On CPU the same code path
runs with a worker thread as the stream: copies execute in submission order off the main
thread (``Tensor.copy_`` releases the GIL), and a fence is set once every copy before it landed.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable, Protocol

import torch


class Fence(Protocol):
    """Marks a point in a copy stream: done once every copy submitted before it has landed."""

    def done(self) -> bool: ...

    def synchronize(self) -> None:
        """Block the host until done."""

    def wait_on_compute(self) -> None:
        """Order the compute that follows after this fence (on CUDA, without blocking the host)."""


class CopyStream(Protocol):
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence | None = None) -> None:
        """Copy src into dst once ``after`` (a compute fence of dst's last reader) is done."""

    def record(self) -> Fence:
        """A fence after every copy submitted so far."""

    def compute_fence(self) -> Fence:
        """A fence after the compute submitted so far (what a slot's next load must wait for)."""


class _DoneFence:
    def done(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait_on_compute(self) -> None:
        pass


DONE: Fence = _DoneFence()


class _ThreadFence:
    def __init__(self) -> None:
        self._event = threading.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def synchronize(self) -> None:
        self._event.wait()

    def wait_on_compute(self) -> None:
        self._event.wait()


class ThreadCopyStream:
    """An in-order copy stream on a worker thread, for CPU devices. The thread ends when the
    stream is garbage-collected."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._errors: list[BaseException] = []
        thread = threading.Thread(target=_worker, args=(self._work, self._errors),
                                  name="emoe-expert-loader", daemon=True)
        thread.start()
        weakref.finalize(self, self._work.put, None)

    def _check(self) -> None:
        if self._errors:
            raise RuntimeError("expert copy failed on the loader thread") from self._errors.pop()

    def enqueue(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the stream after everything submitted before it."""
        self._check()
        self._work.put(job)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence | None = None) -> None:
        self.enqueue(lambda: dst.copy_(src))

    def record(self) -> Fence:
        fence = _ThreadFence()
        self.enqueue(fence._event.set)
        return fence

    def compute_fence(self) -> Fence:
        return DONE  # CPU compute is synchronous on the calling thread


def _worker(work: queue.SimpleQueue, errors: list[BaseException]) -> None:
    while (job := work.get()) is not None:
        try:
            job()
        except BaseException as exc:  # surfaced on the next submit
            errors.append(exc)


class _CudaFence:
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def done(self) -> bool:
        return self.event.query()

    def synchronize(self) -> None:
        self.event.synchronize()

    def wait_on_compute(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


class CudaCopyStream:
    """Non-blocking pinned-host-to-device copies on a side CUDA stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence | None = None) -> None:
        with torch.cuda.stream(self.stream):
            if isinstance(after, _CudaFence):
                self.stream.wait_event(after.event)
            dst.copy_(src, non_blocking=True)

    def record(self) -> Fence:
        return _CudaFence(self.stream)

    def compute_fence(self) -> Fence:
        return _CudaFence(torch.cuda.current_stream(self.device))


def copy_stream_for(device: torch.device) -> CopyStream:
    return CudaCopyStream(device) if device.type == "cuda" else ThreadCopyStream()
