"""Independent trainings side by side: small models keep one core busy at best, so several of them
train faster as processes with one thread each than one after another with all threads.

    results = side_by_side([(train_one, (a, b), {"seed": 1}), ...], workers=2)

Each call runs in a fresh (spawned) process with one torch thread; the results come back in the
order of the calls, and the first error is raised (the calls not started yet are cancelled).
Trainings that write into the model store take their run folder's lock, so a model two calls
would both train is trained once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

__all__ = ["side_by_side", "default_workers"]


def default_workers() -> int:
    """One process per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _one_thread() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def side_by_side(calls: Sequence[tuple[Callable, tuple, dict] | tuple[Callable, tuple]], workers: int | None = None) -> list[Any]:
    """``[fn(*args, **kwargs) for fn, args, kwargs in calls]``, up to ``workers`` at a time in processes
    of one thread each (``fn`` and its arguments must pickle: library functions, arrays, dataclasses).
    One worker, or one call, runs in this process."""
    calls = [(c[0], c[1], c[2] if len(c) > 2 else {}) for c in calls]
    workers = min(workers or default_workers(), len(calls))
    if workers <= 1:
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
