"""Independent trainings side by side (training.parallel)."""

from __future__ import annotations

import os

import pytest

from omnijet_lib.io import OmnijetError
from omnijet_lib.training.parallel import side_by_side


def _pid_threads_and(x):
    import torch

    return os.getpid(), torch.get_num_threads(), x * 2


def _fail(x):
    raise OmnijetError(f"bad input {x}")


def test_results_come_back_in_order_from_processes_of_one_thread():
    out = side_by_side([(_pid_threads_and, (i,)) for i in range(4)], workers=2)
    assert [r[2] for r in out] == [0, 2, 4, 6]
    assert all(r[1] == 1 for r in out) and os.getpid() not in {r[0] for r in out}


def test_one_worker_runs_here_and_errors_come_back_as_they_are():
    assert side_by_side([(_pid_threads_and, (3,), {})], workers=4)[0][0] == os.getpid()  # one call: no process
    with pytest.raises(OmnijetError, match="bad input 7"):
        side_by_side([(_pid_threads_and, (1,)), (_fail, (7,))], workers=2)
