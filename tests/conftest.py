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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A model store with a tiny randomised conditional tokenizer (K 16) and a GPT backbone
    ``gpt_combined`` whose record names that tokenizer, as the store's trainings leave them:
    what the commands that use a pre-trained backbone open. Returns the store's root."""
    from omnijet_lib.io import save_model
    from omnijet_lib.models.gpt import GPT, GPTConfig
    from omnijet_lib.tokenizers import save_tokenizer
    from omnijet_lib.training.gpt import GPT_FILE, load_gpt
    from omnijet_lib.training.store import ModelRequest, ModelStore
    from omnijet_lib.training.vqvae import TOKENIZER_FILE, make_tokenizer

    import torch

    root = tmp_path_factory.mktemp("store")
    store = ModelStore(root, progress=lambda m: None)
    torch.manual_seed(0)
    tok = randomise_(make_tokenizer("conditional", 16, hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16))
    _, tok_run = store.get(ModelRequest("tokenizer_conditional_16", {"tiny": 1}, {"source": {}}),
                           train=lambda d: save_tokenizer(d / TOKENIZER_FILE, tok), load=lambda d: None)
    gpt = GPT(GPTConfig(vocab_size=18, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=130))
    store.get(ModelRequest("gpt_combined", {"tiny": 1}, {"source": {"tokenizer": tok_run.settings_hash}}),
              train=lambda d: save_model(d / GPT_FILE, gpt), load=lambda d: load_gpt(d / GPT_FILE))
    # and a class-conditional one (all ten classes) whose classes matter
    cond = GPT(GPTConfig(vocab_size=18, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=130, n_classes=10))
    with torch.no_grad():
        cond.class_embed.weight.mul_(5.0)
    store.get(ModelRequest("gpt_all_conditional", {"tiny": 1}, {"source": {"tokenizer": tok_run.settings_hash}}),
              train=lambda d: save_model(d / GPT_FILE, cond), load=lambda d: load_gpt(d / GPT_FILE))
    return root
