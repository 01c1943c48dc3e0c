"""Shared fixtures. Tests that use the real 500-jet JetClass sample skip when ../shared is absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_500 = REPO.parent / "shared" / "data" / "jetclass_real_500.root"


@pytest.fixture(scope="session")
def real_path() -> Path:
    if not REAL_500.is_file():
        pytest.skip(f"real JetClass sample not available ({REAL_500})")
    return REAL_500


@pytest.fixture(scope="session")
def real_jets(real_path):
    from omnijet_lib.data import read_jetclass

    return read_jetclass(real_path)


@pytest.fixture
def one_thread():
    """Small models run faster on one torch thread, far faster on a shared, oversubscribed CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
