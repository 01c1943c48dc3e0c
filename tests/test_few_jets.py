"""Notebook 07's studies: generative fine-tuning (exact steps, from a store run, head only), the
mixed pre-training jets, power-law fits and the ten-class tagging metrics."""

import numpy as np
import pytest
import torch

from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import GPTConfig
from omnijet_lib.studies.few_jets import (class_rejections, confusion_matrix, finetune_generation, mixed_jets,
                                         per_class_subset, power_law_fit, rejection_at_efficiency, tagging_metrics)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = GPTConfig(vocab_size=12, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=12)


def sequences(n, seed=0):
    """Learnable tokenizer-like sequences: code i is followed by i + 1."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, n)
    seq = np.zeros((n, 12), np.int64)
    mask = np.arange(12)[None] <= lengths[:, None] + 1
    for i, c in enumerate(lengths):
        first = rng.integers(1, TINY.vocab_size - 1 - c)
        seq[i, 1:c + 1] = np.arange(first, first + c)
        seq[i, c + 1] = TINY.stop_token
    return seq, mask


def test_mixed_jets_replace_a_share_of_the_background_with_the_last_signal_jets():
    labels = np.array([0] * 200 + [8] * 50 + [3] * 10)
    pick = mixed_jets(labels, 0.05)
    assert len(pick) == 200 and (labels[pick] == 8).sum() == 10
    assert set(pick[labels[pick] == 8]) == set(range(240, 250))  # the last ones: the first stay for fine-tuning
    assert (labels[pick] != 3).all() and np.all(np.diff(pick) > 0)
    assert (labels[mixed_jets(labels, 0.0)] == 0).all()
    with pytest.raises(OmnijetError, match="60 Tbqq jets asked for, 50 available"):
        mixed_jets(labels, 0.3)


def test_per_class_subset_is_balanced_nested_and_says_when_the_pool_is_short():
    labels = np.repeat(np.arange(10), 30)
    pool = np.arange(len(labels))
    small, large = per_class_subset(labels, pool, 5, seed=1), per_class_subset(labels, pool, 20, seed=1)
    assert np.bincount(labels[small]).tolist() == [5] * 10 and set(small) <= set(large)
    assert not np.array_equal(small, per_class_subset(labels, pool, 5, seed=2))
    assert set(per_class_subset(labels, pool[:100], 3, seed=0, classes=[1])) <= set(range(30, 60))
    with pytest.raises(OmnijetError, match="31 jets of QCD asked for, the pool has 30"):
        per_class_subset(labels, pool, 31, seed=0)


def test_power_law_fit_recovers_the_exponent_and_refuses_what_it_cannot_fit():
    n = np.array([100, 1000, 10000])
    fit = power_law_fit(n, 3.0 * n ** -0.3)
    assert fit["exponent"] == pytest.approx(0.3) and fit["amplitude"] == pytest.approx(3.0)
    assert power_law_fit([10, 100], [1.0, 2.0])["exponent"] == pytest.approx(-np.log10(2))  # a rising curve
    with pytest.raises(OmnijetError, match="two or more sizes"):
        power_law_fit([100, 100], [1.0, 0.5])
    with pytest.raises(OmnijetError, match="positive"):
        power_law_fit([10, 100], [0.0, 1.0])


def test_rejection_at_efficiency():
    signal = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    score = np.r_[[0.9, 0.8, 0.7, 0.6], np.linspace(0, 0.95, 10)]
    # half the signal above the cut (0.75): of the background, 0.844 and 0.95 pass
    assert rejection_at_efficiency(signal, score, 0.5) == pytest.approx(10 / 2)
    # no background above the cut: the number of background jets, a lower bound
    assert rejection_at_efficiency(signal, np.r_[[0.9, 0.8, 0.7, 0.6], np.zeros(10)], 0.5) == 10
    with pytest.raises(OmnijetError, match="signal and background"):
        rejection_at_efficiency(np.ones(3, bool), np.ones(3))


def test_tagging_metrics_confusion_and_rejections_against_qcd_and_one_vs_rest():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    logits = rng.normal(size=(500, 10))
    logits[np.arange(500), labels] += 2.0   # a decent tagger
    logits[labels == 2, 0] += 3.0           # that takes class 2 for q/g
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = tagging_metrics(proba, labels)
    conf = np.array(m["confusion"])
    assert conf.shape == (10, 10) and np.allclose(conf.sum(1), 1)
    assert m["accuracy"] == pytest.approx(np.trace(conf) / 10)
    assert conf[2, 0] > 0.5 and conf[2, 0] == pytest.approx((proba[labels == 2].argmax(1) == 0).mean())
    assert set(m["rejection_vs_qcd"]) == set(m["rejection_one_vs_rest"]) - {"QCD"}
    # against q/g, class 2 looks like the background: its rejection is the worst; one-vs-rest it is not alone
    vs_qcd = m["rejection_vs_qcd"]
    assert vs_qcd["Hcc"] == min(vs_qcd.values())
    assert class_rejections(proba, labels, 0.5, background=None)[3] == m["rejection_one_vs_rest"]["Hgg"]
    assert confusion_matrix([0, 0, 1], [0, 1, 1], 3).tolist() == [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 0]]


def test_finetune_generation_takes_exactly_the_steps_from_the_run_given(tmp_path):
    from omnijet_lib.training.gpt import ensure_gpt
    from omnijet_lib.training.store import ModelStore

    store = ModelStore(tmp_path, progress=lambda m: None)
    seq, mask = sequences(60)
    base, base_run = ensure_gpt(store, "gpt_base", seq, mask, TINY, {"toy": 1}, epochs=2, batch_size=16, lr=3e-3)
    top, top_mask = sequences(30, seed=1)
    kw = dict(steps=7, batch_size=8, seed=0)
    tuned, run = finetune_generation(store, "gpt_tuned", top, top_mask, TINY, {"toy": 2}, lr=1e-9, init=base_run, **kw)
    settings = run.record()["settings"]
    assert settings["init"] == base_run.settings_hash and "train_only" not in settings
    assert settings["trainer"]["max_steps"] == 7
    assert torch.load(run.path / "last.ckpt", weights_only=True)["global_step"] == 7  # 27 jets at batch 8: 2 epochs
    for (name, p), q in zip(tuned.named_parameters(), base.parameters()):  # lr ~0: the weights it started from
        assert torch.allclose(p, q, atol=1e-6), name

    head, head_run = finetune_generation(store, "gpt_tuned", top, top_mask, TINY, {"toy": 2}, lr=1e-2, init=base_run,
                                         train_only="head", **kw)
    assert head_run.path != run.path and head_run.record()["settings"]["train_only"] == "head"
    changed = {name for (name, p), q in zip(head.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert changed == {"head.weight", "head.bias"}

    scratch, scratch_run = finetune_generation(store, "gpt_tuned", top, top_mask, TINY, {"toy": 2}, lr=1e-9, **kw)
    assert "init" not in scratch_run.record()["settings"]
    assert not torch.allclose(scratch.head.weight, base.head.weight)
    with pytest.raises(OmnijetError, match="train_only must be None or 'head'"):
        finetune_generation(store, "gpt_tuned", top, top_mask, TINY, {"toy": 2}, lr=1e-3, train_only="blocks", **kw)
    with pytest.raises(OmnijetError, match="steps must be an integer"):
        finetune_generation(store, "gpt_tuned", top, top_mask, TINY, {"toy": 2}, lr=1e-3, steps=0, batch_size=8, seed=0)
