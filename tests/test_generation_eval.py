"""Evaluation helpers of notebook 02: decoding generated sequences, backbones on disk, the
classifier test and W1 scores."""

import json

import numpy as np
import pytest
import torch

from omnijet_lib.studies.generation import classifier_test, decode_generated, ensure_gpt, w1_scores
from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import GPTConfig
from omnijet_lib.tokenizers import reconstruct, tokenize
from omnijet_lib.training.fit import TrainConfig
from omnijet_lib.training.vqvae import make_tokenizer

QUIET = TrainConfig(progress_bar=False, accelerator="cpu", devices=1)


def _jets(n, L=8, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, L, 3)).astype(np.float32) + shift
    mask = np.arange(L)[None, :] < rng.integers(2, L + 1, n)[:, None]
    return np.where(mask[..., None], x, 0).astype(np.float32), mask


def _binned():
    x, mask = _jets(50)
    return make_tokenizer("binned", bins=4).fit(x, mask)


def test_decode_generated_matches_reconstruct():
    tok = _binned()
    x, mask = _jets(20, seed=1)
    tokens = tokenize(tok, x, mask)
    seq, seq_mask = tok.to_sequence(tokens, mask)
    seq = np.where(seq_mask, seq, 0)  # GPT.generate pads with 0 after stop
    seq[0, 1] = tok.stop_token         # an empty jet: stop drawn first
    seq_mask[0, 2:] = False
    gx, gm = decode_generated(tok, seq, seq_mask, max_len=16)
    assert gx.shape == (20, 16, 3) and gm.shape == (20, 16)
    assert not gm[0].any() and np.all(gx[0] == 0)
    np.testing.assert_array_equal(gm[1:, :8], mask[1:])
    np.testing.assert_allclose(gx[1:, :8], reconstruct(tok, tokens[1:], mask[1:]))
    with pytest.raises(OmnijetError):
        decode_generated(tok, seq, seq_mask[:, :3])
    with pytest.raises(OmnijetError):
        decode_generated(tok, seq, seq_mask, max_len=4)


def test_ensure_gpt_trains_loads_and_replaces(tmp_path):
    tok = _binned()
    x, mask = _jets(40, seed=2)
    seq, seq_mask = tok.to_sequence(tokenize(tok, x, mask), mask)
    path = tmp_path / "gpt_x" / "gpt.safetensors"
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=seq.shape[1])
    m1, s1 = ensure_gpt(path, seq, seq_mask, cfg, epochs=1, batch_size=16, train_config=QUIET, progress=lambda *_: None)
    assert path.is_file() and s1 > 0
    m2, s2 = ensure_gpt(path, seq, seq_mask, cfg, epochs=1, batch_size=16, train_config=QUIET, progress=lambda *_: None)
    assert s2 == 0 and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    cfg2 = GPTConfig(vocab_size=tok.vocab_size, n_embd=8, n_head=2, n_layer=1, ffn=16, max_len=seq.shape[1])
    m3, s3 = ensure_gpt(path, seq, seq_mask, cfg2, epochs=1, batch_size=16, train_config=QUIET, progress=lambda *_: None)
    assert s3 > 0 and m3.config == cfg2
    # same network, other training settings or other sequences: retrained, not resumed
    quiet = dict(batch_size=16, train_config=QUIET, progress=lambda *_: None)
    assert ensure_gpt(path, seq, seq_mask, cfg2, epochs=1, **quiet)[1] == 0
    assert ensure_gpt(path, seq, seq_mask, cfg2, epochs=2, **quiet)[1] > 0
    official = TrainConfig(progress_bar=False, accelerator="cpu", devices=1, schedule="official")
    assert ensure_gpt(path, seq, seq_mask, cfg2, epochs=2, **{**quiet, "train_config": official})[1] > 0
    assert ensure_gpt(path, seq[::-1], seq_mask[::-1], cfg2, epochs=2, **{**quiet, "train_config": official})[1] > 0
    assert json.loads((path.parent / "gpt.run.json").read_text())["schedule"] == "official"


def test_classifier_test_separates_only_different_samples():
    rx, rm = _jets(150, seed=3)
    same = classifier_test(rx, rm, *_jets(150, seed=4), seeds=[0], epochs=3, batch_size=64, train_config=QUIET,
                           phi=(16, 16), f=(16,))
    diff = classifier_test(rx, rm, *_jets(150, shift=3.0, seed=5), seeds=[0, 1], epochs=3, batch_size=64,
                           train_config=QUIET, phi=(16, 16), f=(16,))
    assert same["n_per_sample"] == 150 and len(diff["aucs"]) == 2
    assert abs(same["auc_mean"] - 0.5) < 0.15
    assert diff["auc_mean"] > 0.9 and diff["auc_std"] >= 0
    # an ordered mixture (A then B) against a shuffled one: no separation when subsampled at random
    bx, bm = _jets(150, shift=3.0, seed=7)
    mix = (np.concatenate([rx, bx]), np.concatenate([rm, bm]))
    perm = np.random.default_rng(8).permutation(300)
    shuffled = classifier_test(*mix, mix[0][perm][:150], mix[1][perm][:150], seeds=[0], epochs=3, batch_size=64,
                               train_config=QUIET, phi=(16, 16), f=(16,))
    assert abs(shuffled["auc_mean"] - 0.5) < 0.15
    with pytest.raises(OmnijetError):
        classifier_test(rx[:2], rm[:2], rx, rm, seeds=[0], epochs=1)


def test_w1_scores():
    x, mask = _jets(100, seed=6)
    same = w1_scores(x, mask, x, mask, real_obs={"mass": np.ones(100), "pt": np.arange(100.0)},
                     gen_obs={"mass": np.ones(100), "pt": np.arange(100.0) + 2})
    assert same["w1m"] == 0 and same["w1p_eta_rel_scaled"] < 0.25  # batches are resampled with replacement
    assert same["w1_pt"] == pytest.approx(2.0)
    xs = np.where(mask[..., None], x + np.array([0, 3.0, 0], np.float32), 0)
    shifted = w1_scores(x, mask, xs, mask)
    assert shifted["w1p_eta_rel_scaled"] == pytest.approx(3.0, abs=0.3)
    assert shifted["w1p_log_pt_scaled"] < 0.25


def test_data_scaling_trains_each_fraction_with_the_same_steps(tmp_path):
    from omnijet_lib.studies.generation import data_scaling

    tok = _binned()
    x, mask = _jets(60, seed=2)
    seq, seq_mask = tok.to_sequence(tokenize(tok, x, mask), mask)
    config = GPTConfig(vocab_size=tok.vocab_size, n_embd=8, n_head=2, n_layer=1, ffn=16)
    kw = dict(epochs=2, batch_size=16, n_generate=20, seeds=[0], classifier_epochs=1, train_config=QUIET,
              progress=lambda msg: None)
    x128, m128 = np.zeros((60, 128, 3), np.float32), np.zeros((60, 128), bool)  # as decode_generated gives
    x128[:, :8], m128[:, :8] = x, mask
    x, mask = x128, m128
    points = data_scaling(tok, seq, seq_mask, x, mask, [0.25, 0.5], config, tmp_path, **kw)
    assert [(p["train_jets"], p["epochs"]) for p in points] == [(15, 8), (30, 4)]
    assert all(0 <= p["auc_mean"] <= 1 for p in points)
    assert (tmp_path / "gpt_scaling_0.25" / "gpt.safetensors").is_file()
    again = data_scaling(tok, seq, seq_mask, x, mask, [0.25], config, tmp_path, **kw)
    assert again[0]["train_seconds"] == 0.0  # reused, not retrained
    with pytest.raises(OmnijetError, match="fraction 1.5 is not in"):
        data_scaling(tok, seq, seq_mask, x, mask, [1.5], config, tmp_path, **kw)


def test_changed_settings_reads_missing_or_broken_records_as_empty(tmp_path):
    from omnijet_lib.io import changed_settings, write_json

    rec = tmp_path / "run.json"
    assert changed_settings(rec, {"a": 1, "b": 2}) == ["a", "b"]
    write_json(rec, {"a": 1, "b": 3})
    assert changed_settings(rec, {"a": 1, "b": 2}) == ["b"]
    rec.write_text("{not json")
    assert changed_settings(rec, {"a": 1}) == ["a"]
