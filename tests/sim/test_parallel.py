"""Local worker processes: they start clean whatever threads the caller holds."""

from __future__ import annotations

import threading

from emoe.sim.parallel import run_tasks

_LOCK = threading.Lock()


def _takes_the_lock(_: int) -> bool:
    taken = _LOCK.acquire(timeout=2)
    if taken:
        _LOCK.release()
    return taken


def test_workers_do_not_inherit_a_lock_another_thread_of_the_caller_holds():
    """A fork copies every lock as it is, held or not, but not the thread holding it: a worker
    forked while another thread of the caller holds a lock waits on it forever (how `emoe sim`
    hung in a process that earlier tests had left holding torch's and grpc's threads). Workers
    must start from a clean process, so each one takes the lock at once."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _LOCK:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        assert run_tasks(_takes_the_lock, [0, 1], jobs=2) == [True, True]
    finally:
        release.set()
        holder.join()
