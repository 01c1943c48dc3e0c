"""Independent trainings side by side (training.parallel)."""

from __future__ import annotations

import os
import time

import pytest

from omnijet_lib.io import OmnijetError
from omnijet_lib.training import parallel
from omnijet_lib.training.parallel import side_by_side


def _pid_threads_and(x):
    import torch

    return os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), x * 2


def _fail(x):
    raise OmnijetError(f"bad input {x}")


def _log(log, name):
    log.append(name)
    return name


def _start_and_end(name):
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    time.sleep(0.3)
    return name, start, time.monotonic()


def test_results_come_back_in_order_from_processes_sharing_the_cores(monkeypatch):
    monkeypatch.setattr(parallel, "default_workers", lambda: 2)  # two cores: one thread per process
    out = side_by_side([(_pid_threads_and, (i,)) for i in range(4)], workers=2)
    assert [r[3] for r in out] == [0, 2, 4, 6]
    assert all(r[1:3] == (1, "1") for r in out) and os.getpid() not in {r[0] for r in out}
    monkeypatch.setattr(parallel, "default_workers", lambda: 5)  # five cores, two processes: two threads each
    assert {r[1:3] for r in side_by_side([(_pid_threads_and, (i,)) for i in range(2)], workers=2)} == {(2, "2")}


def test_one_worker_runs_here_and_errors_come_back_as_they_are():
    assert side_by_side([(_pid_threads_and, (3,), {})], workers=4)[0][0] == os.getpid()  # one call: no process
    with pytest.raises(OmnijetError, match="bad input 7"):
        side_by_side([(_pid_threads_and, (1,)), (_fail, (7,))], workers=2)


def test_the_most_costly_calls_start_first_and_results_keep_the_call_order():
    log = []
    calls = [(_log, (log, name)) for name in ("cheap", "costly", "middle")]
    assert side_by_side(calls, workers=1, costs=[1, 3, 2]) == ["cheap", "costly", "middle"]
    assert log == ["costly", "middle", "cheap"]
    log.clear()
    side_by_side(calls, workers=1)  # no costs: in the order given
    assert log == ["cheap", "costly", "middle"]
    # two processes: the cheap call waits for a free one, i.e. until a costly call has ended
    out = side_by_side([(_start_and_end, (n,)) for n in ("cheap", "costly", "middle")], workers=2, costs=[1, 3, 2])
    assert [r[0] for r in out] == ["cheap", "costly", "middle"]
    (_, cheap_start, _), *others = out
    assert cheap_start >= min(end for _, _, end in others)
