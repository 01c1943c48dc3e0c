"""Independent trainings side by side: a small model trains only 1.3-1.4x faster with a second thread,
so several of them can finish sooner as processes sharing the cores than one after another with all
threads. How much sooner depends on the machine: on the 2-core VM of the quick runs, where two
single-thread trainings slow each other by 15-20%, notebook 01's jobs gain 10-15%.

    results = side_by_side([(train_one, (a, b), {"seed": 1}), ...], workers=2, costs=[3.0, ...])

Each call runs in a fresh (spawned) process; the results come back in the order of the calls, and
the first error is raised (the calls not started yet are cancelled). The most costly calls start
first (``costs``: e.g. parameters x jet passes), so the cheap ones fill the cores at the end
instead of one long training running alone. Each process gets an equal share of the cores' threads
(one each when there are as many processes as cores). Trainings that write into the model store
take their run folder's lock, so a model two calls would both train is trained once.
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


def _set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def side_by_side(calls: Sequence[tuple[Callable, tuple, dict] | tuple[Callable, tuple]], workers: int | None = None,
                 costs: Sequence[float] | None = None) -> list[Any]:
    """``[fn(*args, **kwargs) for fn, args, kwargs in calls]``, up to ``workers`` at a time in processes
    that share the cores (``fn`` and its arguments must pickle: library functions, arrays,
    dataclasses), started in the order of decreasing ``costs`` (default: the order of the calls).
    One worker, or one call, runs in this process (in the same order)."""
    calls = [(c[0], c[1], c[2] if len(c) > 2 else {}) for c in calls]
    order = list(range(len(calls))) if costs is None else sorted(range(len(calls)), key=lambda i: -costs[i])
    workers = min(workers or default_workers(), len(calls))
    results: list[Any] = [None] * len(calls)
    if workers <= 1:
        for i in order:
            fn, args, kwargs = calls[i]
            results[i] = fn(*args, **kwargs)
        return results
    threads = max(1, default_workers() // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_set_threads,
                             initargs=(threads,)) as pool:
        futures = {i: pool.submit(calls[i][0], *calls[i][1], **calls[i][2]) for i in order}  # queued in this order
        try:
            for i, f in futures.items():
                results[i] = f.result()
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
    return results
