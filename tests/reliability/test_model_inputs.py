"""Tokenizer / GPT mismatches and token ids out of range: one clear error, nothing written.

These modules are young; the cases skip when a module is missing instead of failing collection.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnijet_lib.io import load_model, save_model

from .conftest import one_line_error

tokenizers = pytest.importorskip("omnijet_lib.tokenizers")
gpt_models = pytest.importorskip("omnijet_lib.models.gpt")
gpt_training = pytest.importorskip("omnijet_lib.training.gpt")


@pytest.fixture
def tok_ckpt(tmp_path):
    """A binned tokenizer with 5^3 = 125 codes (GPT vocabulary 127)."""
    tok = tokenizers.BinnedTokenizer(tokenizers.BinnedConfig(bins=5))
    return tok, tokenizers.save_tokenizer(tmp_path / "tokenizer.safetensors", tok)


@pytest.fixture
def gpt_ckpt(tmp_path):
    """A tiny GPT built for 8 codes (vocabulary 10)."""
    cfg = gpt_models.GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32)
    return save_model(tmp_path / "gpt.safetensors", gpt_models.GPT(cfg))


def test_gpt_checkpoint_with_another_vocabulary(tmp_path, tok_ckpt, gpt_ckpt):
    tok = tokenizers.load_tokenizer(tok_ckpt[1])
    with one_line_error(f"{gpt_ckpt}: GPT vocabulary is 10 (8 codes + start/stop) but the tokenizer needs 127",
                        unchanged=tmp_path):
        gpt_training.load_gpt(gpt_ckpt, vocab_size=tok.vocab_size)


def test_tokenizer_checkpoint_with_another_codebook_size(tmp_path, tok_ckpt, gpt_ckpt):
    gpt = gpt_training.load_gpt(gpt_ckpt)
    with one_line_error(f"{tok_ckpt[1]}: num_codes is 125 in the checkpoint but {gpt.config.vocab_size - 2} is expected",
                        unchanged=tmp_path):
        load_model(tok_ckpt[1], tokenizers.BinnedTokenizer, tokenizers.BinnedConfig, num_codes=gpt.config.vocab_size - 2)


def test_checkpoints_of_the_wrong_kind(tmp_path, tok_ckpt, gpt_ckpt):
    with one_line_error(f"{gpt_ckpt}: not a tokenizer checkpoint (kind None", unchanged=tmp_path):
        tokenizers.load_tokenizer(gpt_ckpt)
    with one_line_error(f"{tok_ckpt[1]}: holds a BinnedTokenizer, expected a GPT", unchanged=tmp_path):
        gpt_training.load_gpt(tok_ckpt[1])


def test_token_ids_out_of_range(tmp_path, tok_ckpt):
    tok = tok_ckpt[0]
    with one_line_error("tokens: id 125 out of range 0..124"):
        tokenizers.reconstruct(tok, np.array([[3, 125]]), np.ones((1, 2), bool))
    with one_line_error("to_sequence: token id 130 out of range 0..124"):
        tok.to_sequence(torch.tensor([[3, 130]]))
    with one_line_error("from_sequence: id 127 at row 0, position 2 is not a code (1..125)"):
        tok.from_sequence(torch.tensor([[0, 3, 127, 126]]))


def test_training_on_sequences_outside_the_vocabulary_writes_nothing(tmp_path):
    seq = np.array([[0, 3, 9], [0, 12, 9]])  # 12 is beyond a vocabulary of 10
    cfg = gpt_models.GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32)
    with one_line_error("seq: token ids span 0..12, outside the vocabulary 0..9", unchanged=tmp_path):
        gpt_training.train_gpt(seq, np.ones_like(seq, bool), tmp_path / "run", config=cfg, epochs=1)
    assert not (tmp_path / "run").exists()
