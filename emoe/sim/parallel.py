"""Run independent simulation tasks: in this process, in local worker processes, or on Ray.

Every task is a whole configuration (a run, or a capacity search) and is deterministic, so the
results are the same whatever runs them; they come back in the order the tasks were given.
Ray is an optional extra (``pip install 'emoe[ray]'``), imported only when asked for.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import TypeVar

from emoe.core.errors import ConfigError, EmoeError

T = TypeVar("T")
R = TypeVar("R")

LOCAL_RAY = "local"
"""``--ray`` without an address: start a Ray instance on this machine for the run."""


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], *, jobs: int | None = None,
              ray_address: str | None = None,
              on_done: Callable[[int], None] | None = None) -> list[R]:
    """``[fn(t) for t in tasks]``: on Ray when ``ray_address`` is given (``LOCAL_RAY``: a
    local instance started here), else in ``jobs`` worker processes (default: all cores; 1:
    in this process). ``on_done(n)`` is called as tasks finish with the number finished."""
    if ray_address is not None:
        return _on_ray(fn, tasks, ray_address, on_done)
    jobs = min(jobs or default_jobs(), len(tasks))
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    if jobs == 1:
        results = []
        for task in tasks:
            results.append(fn(task))
            if on_done:
                on_done(len(results))
        return results
    with ProcessPoolExecutor(jobs, mp_context=_worker_context(fn)) as pool:
        futures = [pool.submit(fn, task) for task in tasks]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # an error ends the run at once
                if on_done:
                    on_done(len(futures) - len(pending))
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        return [future.result() for future in futures]


def _worker_context(fn: Callable) -> multiprocessing.context.BaseContext:
    """Workers forked from a fresh server process (``forkserver``) that has imported ``fn``'s
    module once, else spawned. Never a fork of the caller: a process holding other threads
    (torch's, grpc's, a test runner's) may be forked while one of them holds a lock, and the
    child then waits on it forever."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    if fn.__module__ != "__main__":
        context.set_forkserver_preload([fn.__module__])  # only before the server starts
    return context


def _on_ray(fn: Callable[[T], R], tasks: Sequence[T], address: str,
            on_done: Callable[[int], None] | None) -> list[R]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray: Ray is not installed; pip install 'emoe[ray]' "
                          "(or 'ray>=2.9')") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == LOCAL_RAY else address, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(task) for task in tasks]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # an error ends the run at once
                if on_done:
                    on_done(len(refs) - len(pending))
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, EmoeError):  # the worker's own error, as it was raised
                raise exc.cause from None
            raise
    finally:
        if started:
            ray.shutdown()
        sys.stderr.flush()
