"""A GPT with classes: the class token after start, in training, sampling and the likelihood."""

import dataclasses

import numpy as np
import pytest
import torch

from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import GPT, GPTConfig, insert_class_token, log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = GPTConfig(vocab_size=12, n_embd=32, n_head=4, n_layer=2, ffn=64, max_len=42, n_classes=3)


def class_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(CLASSES).eval()
    with torch.no_grad():
        model.head.bias[-1] += 0.5  # stops after a handful of constituents
        model.class_embed.weight.mul_(5.0)  # classes that matter
    return model


def test_insert_class_token_layout():
    seq = torch.tensor([[0, 3, 4, 11, 0], [0, 5, 11, 0, 0]])
    mask = seq.new_tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool()
    s, m = insert_class_token(seq, mask, torch.tensor([2, -1]), 12)
    assert s.tolist() == [[0, 14, 3, 4, 11, 0], [0, 5, 11, 0, 0, 0]]
    assert m.tolist() == [[True] * 5 + [False], [True] * 3 + [False] * 3]


def test_plain_gpt_has_no_class_weights_and_refuses_labels():
    plain = GPT(dataclasses.replace(CLASSES, n_classes=0))
    assert not any(k.startswith("class_embed") for k in plain.state_dict())
    with pytest.raises(OmnijetError, match="trained without classes"):
        plain.generate(4, labels=1)
    seq, mask = plain.generate(4, generator=torch.Generator().manual_seed(0), max_constituents=5)
    with pytest.raises(OmnijetError, match="without classes"):
        log_likelihood(plain, seq, mask, labels=np.zeros(4, np.int64))
    with pytest.raises(OmnijetError, match="n_classes must be an integer"):
        GPTConfig(n_classes=-1)


@pytest.mark.parametrize("labels", [1, np.array([0, 1, 2, 2, 0, 1, 2, 1, 0, 0, 1, 2])])
def test_generate_with_classes_equals_reference_and_is_plain(labels):
    model = class_gpt()
    kw = dict(batch_size=5, max_constituents=9, labels=labels)
    fast = model.generate(12, generator=torch.Generator().manual_seed(3), **kw)
    ref = model.generate_reference(12, generator=torch.Generator().manual_seed(3), **kw)
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_array_equal(fast[1], ref[1])
    seq, mask = fast
    assert (seq[:, 0] == 0).all() and (seq[mask] < CLASSES.vocab_size).all()  # no class token in the output
    # the class changes what is drawn from the same uniforms
    other = model.generate(12, generator=torch.Generator().manual_seed(3), batch_size=5, max_constituents=9,
                           labels=(np.asarray(labels) + 1) % 3)
    assert not np.array_equal(other[0], seq)
    for bad, msg in [(3, r"0\.\.2"), (np.zeros(5, np.int64), "one class id or 12"), (1.5, "integers")]:
        with pytest.raises(OmnijetError, match=msg):
            model.generate(12, labels=bad)


def test_log_likelihood_given_the_class_is_the_samplers():
    model = class_gpt(seed=1)
    labels = np.array([0, 1, 2] * 6)
    seq, mask = model.generate(18, batch_size=7, generator=torch.Generator().manual_seed(2), max_constituents=30,
                               labels=labels)
    ll = log_likelihood(model, seq, mask, labels=labels, batch_size=4)
    for j in range(len(seq)):
        tokens = seq[j][mask[j]]
        prefix = [0, CLASSES.vocab_size + labels[j]]
        want = 0.0
        for t in tokens[1:]:
            with torch.no_grad():
                p = torch.softmax(model(torch.tensor([prefix]))[0, -1, 1:].double(), 0)
            want += float(torch.log(p[t - 1]))
            prefix.append(int(t))
        assert ll["total"][j] == pytest.approx(want, abs=1e-5)
        assert ll["n_tokens"][j] == len(tokens) - 1
    # -1: no class, the plain likelihood; another class: another value
    plain = log_likelihood(model, seq, mask)
    np.testing.assert_allclose(log_likelihood(model, seq, mask, labels=np.full(18, -1))["total"], plain["total"],
                               atol=1e-9)
    assert not np.allclose(log_likelihood(model, seq, mask, labels=(labels + 1) % 3)["total"], ll["total"], atol=1e-3)
    with pytest.raises(OmnijetError, match="class ids < 3"):
        log_likelihood(model, seq, mask, labels=np.full(18, 3))


def test_training_with_classes_learns_the_class(tmp_path):
    """Class 0 jets have 2 constituents, class 1 jets 7: the class token must carry it. The
    unconditional model (class dropout) sits between."""
    from omnijet_lib.training import TrainConfig
    from omnijet_lib.training.gpt import load_gpt, train_gpt

    rng = np.random.default_rng(0)
    n, L = 240, 10
    labels = np.arange(n) % 2
    lengths = np.where(labels == 0, 2, 7)
    seq = np.zeros((n, L), np.int64)
    mask = np.arange(L)[None] <= lengths[:, None] + 1
    for i, c in enumerate(lengths):
        seq[i, 1:c + 1] = rng.integers(1, 11, c)
        seq[i, c + 1] = 11
    cfg = dataclasses.replace(CLASSES, n_classes=2, max_len=L)
    tc = TrainConfig(progress_bar=False, accelerator="cpu", devices=1)
    with pytest.raises(OmnijetError, match="needs labels"):
        train_gpt(seq, mask, tmp_path / "x", config=cfg, epochs=1, train_config=tc)
    with pytest.raises(OmnijetError, match="labels given for a GPT without classes"):
        train_gpt(seq, mask, tmp_path / "x", config=CLASSES.__class__(vocab_size=12, max_len=L), labels=labels,
                  epochs=1, train_config=tc)
    model = train_gpt(seq, mask, tmp_path / "run", config=cfg, epochs=12, batch_size=16, train_config=tc,
                      labels=labels, class_dropout=0.3, lr=3e-3)
    assert load_gpt(tmp_path / "run" / "gpt.safetensors").config.n_classes == 2
    sizes = {}
    for c in (0, 1, None):
        s, m = model.generate(200, generator=torch.Generator().manual_seed(0), max_constituents=8, labels=c)
        sizes[c] = (m.sum(1) - 2).mean()
    assert sizes[0] < 3 and sizes[1] > 6 and sizes[0] < sizes[None] < sizes[1]
    # fine-tuning starts from the weights given
    start = train_gpt(seq, mask, tmp_path / "ft", config=cfg, epochs=1, batch_size=16, train_config=tc,
                      labels=labels, init=model, lr=1e-9)
    assert torch.allclose(start.head.weight, model.head.weight, atol=1e-6)
