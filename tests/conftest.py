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


def randomise_(model, seed: int = 0, scale: float = 0.3):
    """Every parameter random, also those that start at zero so that the fresh NormFormer
    blocks are the identity (the official initialisation): an untrained tokenizer whose decoding
    depends on the context, for tests that need every path exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def write_unchecked(monkeypatch):
    """``write_jetclass`` without its content checks: writes the broken files readers must refuse."""
    from omnijet_lib.data import jetclass

    monkeypatch.setattr(jetclass, "check_jets", lambda *args: None)
    return jetclass.write_jetclass
