"""GPT backbone: cached sampling equals the reference, sampler exactness, loss, training I/O."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import GPT, GPTConfig, draw_uniforms, sample_tokens, sequences_to_codes

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = GPTConfig(vocab_size=12, n_embd=32, n_head=4, n_layer=2, ffn=64, max_len=42)  # 10 codes


def small_gpt(stop_bias=0.0, seed=0, dtype=torch.float32, **bias):
    torch.manual_seed(seed)
    model = GPT(SMALL).eval().to(dtype)
    with torch.no_grad():
        model.head.bias[-1] += stop_bias
        for token, b in bias.items():
            model.head.bias[int(token[1:])] += b
    return model


def greedy_sequence(model, max_constituents: int) -> list[int]:
    """The jet greedy decoding gives, step by step on the whole prefix: start, the most probable
    drawable token each step, stop (forced after ``max_constituents``)."""
    stop = model.config.stop_token
    greedy = [0]
    with torch.no_grad():
        while greedy[-1] != stop and len(greedy) < max_constituents + 1:
            greedy.append(int(model(torch.tensor([greedy]))[0, -1, 1:].argmax()) + 1)
    return greedy if greedy[-1] == stop else greedy + [stop]


def random_sequences(n, vocab, max_len, rng, min_codes=1):
    """Tokenizer-like sequences: start, codes+1, stop, zero padding."""
    codes = rng.integers(min_codes, max_len - 1, n)
    seq = np.zeros((n, max_len), np.int64)
    mask = np.arange(max_len)[None] <= codes[:, None] + 1
    for i, c in enumerate(codes):
        seq[i, 1:c + 1] = rng.integers(1, vocab - 1, c)
        seq[i, c + 1] = vocab - 1
    return seq, mask


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generate_equals_reference(dtype):
    model = small_gpt(stop_bias=-0.5, dtype=dtype)
    kw = dict(n_jets=150, batch_size=64, max_constituents=40)  # 3 batches, the last one partial
    seq, mask = model.generate(generator=torch.Generator().manual_seed(3), **kw)
    ref, ref_mask = model.generate_reference(generator=torch.Generator().manual_seed(3), **kw)
    n = mask.sum(1) - 2
    assert n.std() > 2 and n.min() < 10 and n.max() == 40  # varied lengths, some forced stops
    np.testing.assert_array_equal(seq, ref)
    np.testing.assert_array_equal(mask, ref_mask)
    # a different seed gives different jets
    other, _ = model.generate(generator=torch.Generator().manual_seed(4), **kw)
    assert not np.array_equal(seq, other)


def test_generate_equals_reference_blocked_head():
    """A vocabulary of several HEAD_BLOCKs and batches of >= 64 jets: the head runs in blocks."""
    from omnijet_lib.models.gpt import HEAD_BLOCK

    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=2 * HEAD_BLOCK + 100, n_embd=32, n_head=4, n_layer=2, ffn=64, max_len=32)).eval()
    with torch.no_grad():
        model.head.bias[-1] += 3.0
    kw = dict(n_jets=96, batch_size=96, max_constituents=30)
    seq, _ = model.generate(generator=torch.Generator().manual_seed(1), **kw)
    ref, _ = model.generate_reference(generator=torch.Generator().manual_seed(1), **kw)
    assert seq.max() > HEAD_BLOCK  # tokens from the later blocks are drawn
    np.testing.assert_array_equal(seq, ref)


def test_generate_output_format():
    model = small_gpt(stop_bias=1.0)
    seq, mask = model.generate(40, batch_size=16, generator=torch.Generator().manual_seed(0), max_constituents=20)
    assert seq.shape == mask.shape == (40, 22) and seq.dtype == np.int64 and mask.dtype == bool
    n = mask.sum(1)
    assert np.all(seq[:, 0] == 0)
    assert np.all(seq[np.arange(40), n - 1] == SMALL.stop_token)
    assert np.all(seq[~mask] == 0)
    body = np.where(np.arange(22)[None] < (n - 1)[:, None], seq, 1)[:, 1:]
    assert np.all((body >= 1) & (body <= SMALL.vocab_size - 2))  # only codes between start and stop
    empty, empty_mask = model.generate(0)
    assert empty.shape == empty_mask.shape == (0, SMALL.max_len)
    model.train()
    assert model.generate(3, batch_size=2)[0].shape == (3, SMALL.max_len)  # default: max_len - 2 constituents
    assert model.training  # the mode is restored
    codes, code_mask = sequences_to_codes(seq, mask, SMALL.vocab_size)
    assert codes.shape == (40, 20) and np.array_equal(code_mask.sum(1), n - 2)
    np.testing.assert_array_equal(codes[code_mask], seq[:, 1:-1][code_mask] - 1)
    assert np.all(codes[~code_mask] == -1)


def test_sampler_matches_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, -0.5, 2.0, 0.0, -3.0, 0.7, 1.5])
    n = 100_000
    for temperature in [1.0, 0.5, 2.0]:
        u = torch.rand(n, generator=g)
        idx = sample_tokens(logits.expand(n, -1), u, temperature)
        counts = np.bincount(idx.numpy(), minlength=len(logits))
        p = torch.softmax(logits / temperature, 0).double().numpy()
        assert stats.chisquare(counts, n * p / p.sum()).pvalue > 1e-3
        # the test has power: the softmax at another temperature is rejected
        q = torch.softmax(logits / (temperature * 1.1), 0).double().numpy()
        assert stats.chisquare(counts, n * q / q.sum()).pvalue < 1e-6


def test_sampler_never_draws_zero_probability():
    logits = torch.tensor([0.0, -1e4, 0.0, -float("inf")])
    u = torch.cat([torch.zeros(1), torch.rand(20_000), torch.full((1,), 1 - 2**-24)])
    idx = sample_tokens(logits.expand(len(u), -1), u)
    assert set(idx.tolist()) == {0, 2}


def test_generate_first_token_distribution():
    """The full generate() path draws the first constituent from the model's softmax."""
    model = small_gpt(stop_bias=-1.0, seed=1)
    n, temperature = 30_000, 0.7
    seq, _ = model.generate(n, batch_size=10_000, temperature=temperature,
                            generator=torch.Generator().manual_seed(1), max_constituents=1)
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, dtype=torch.long))[0, 0, 1:]  # start excluded
    p = torch.softmax(logits.double() / temperature, 0).numpy()
    counts = np.bincount(seq[:, 1] - 1, minlength=len(p))
    assert stats.chisquare(counts, n * p).pvalue > 1e-3


def test_start_token_never_emitted():
    model = small_gpt(stop_bias=0.5, t0=30.0)  # start would win almost every draw
    for fn in (model.generate, model.generate_reference):
        seq, mask = fn(50, batch_size=32, generator=torch.Generator().manual_seed(0), max_constituents=10)
        assert np.all(seq[:, 1:][mask[:, 1:]] > 0)


def test_forced_stop_at_max_constituents():
    model = small_gpt(stop_bias=-60.0)  # stop is never drawn
    for max_c in (5, 40):
        seq, mask = model.generate(20, batch_size=8, generator=torch.Generator().manual_seed(0),
                                   max_constituents=max_c)
        assert seq.shape[1] == max_c + 2
        assert np.all(mask.sum(1) == max_c + 2) and np.all(seq[:, -1] == SMALL.stop_token)
    with pytest.raises(OmnijetError, match="max_constituents"):
        model.generate(2, max_constituents=SMALL.max_len - 1)


def test_temperature():
    model = small_gpt(stop_bias=1.0, seed=2)
    with pytest.raises(OmnijetError, match="temperature"):
        model.generate(2, temperature=0.0)
    # temperature -> 0 is greedy decoding
    seq, mask = model.generate(4, temperature=1e-3, generator=torch.Generator().manual_seed(0), max_constituents=12)
    assert np.all(seq == seq[0])
    assert seq[0][mask[0]].tolist() == greedy_sequence(model, 12)
    # a high temperature flattens the distribution: more distinct tokens
    hot, hm = model.generate(200, temperature=5.0, generator=torch.Generator().manual_seed(0), max_constituents=12)
    cold, cm = model.generate(200, temperature=0.3, generator=torch.Generator().manual_seed(0), max_constituents=12)
    entropy = [stats.entropy(np.bincount(x[:, 1], minlength=SMALL.vocab_size)) for x in (cold, hot)]
    assert entropy[1] > entropy[0] + 0.1


def test_uniforms_are_drawn_up_front():
    u1 = draw_uniforms(5, 7, torch.Generator().manual_seed(9))
    u2 = draw_uniforms(5, 7, torch.Generator().manual_seed(9))
    assert u1.shape == (5, 7) and torch.equal(u1, u2) and float(u1.min()) >= 0 and float(u1.max()) < 1


# ---------------------------------------------------------------------------- model
def test_paper_size():
    model = GPT(GPTConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 6.0e6 < n < 7.5e6  # ~6.7M in the paper


def test_dropout_is_active_in_training_only_and_must_be_a_probability():
    with pytest.raises(OmnijetError, match=r"GPT dropout must be in \[0, 1\), got 1.0"):
        GPTConfig(dropout=1.0)
    model = GPT(GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32, dropout=0.5))
    seq = torch.randint(0, 9, (4, 12))
    model.train()
    assert not torch.equal(model(seq), model(seq))
    model.eval()
    assert torch.equal(model(seq), model(seq))


def test_causal_and_padding_invariant():
    model = small_gpt()
    seq, mask = random_sequences(6, SMALL.vocab_size, 30, np.random.default_rng(0), min_codes=5)
    seq, mask = torch.from_numpy(seq), torch.from_numpy(mask)
    with torch.no_grad():
        h = model.backbone(seq, mask)
        changed = seq.clone()
        changed[:, 4] = (changed[:, 4] % 9) + 1
        h2 = model.backbone(changed, mask)
        assert torch.allclose(h[:, :4], h2[:, :4], atol=1e-6)  # the past ignores the future
        assert not torch.allclose(h[:, 4], h2[:, 4])
        assert torch.all(h[~mask] == 0)
        # any padding value gives the same result
        assert torch.allclose(model.backbone(seq.masked_fill(~mask, 7), mask), h, atol=1e-6)


def test_loss_equals_full_head_cross_entropy_and_trimming():
    model = small_gpt(seed=3)
    seq, mask = random_sequences(8, SMALL.vocab_size, SMALL.max_len, np.random.default_rng(1))
    seq, mask = torch.from_numpy(seq), torch.from_numpy(mask)
    with torch.no_grad():
        loss = model.loss(seq, mask)
        logits = model(seq[:, :-1])  # (B, T-1, V): head on every position
        tgt = seq[:, 1:].masked_fill(~mask[:, 1:], -100)
        naive = F.cross_entropy(logits.reshape(-1, SMALL.vocab_size), tgt.reshape(-1), ignore_index=-100)
        assert torch.allclose(loss, naive, atol=1e-6)
        L = int(mask.sum(1).max())
        assert torch.allclose(model.loss(seq[:, :L], mask[:, :L]), loss, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_fused_head_cross_entropy_matches_autograd(chunk):
    from omnijet_lib.models.gpt import head_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,), generator=g)
    ref = F.cross_entropy(h @ w.T + b, t)
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w, b))
    fused = head_cross_entropy(h, w, b, t, chunk=chunk)
    assert fused.dtype == torch.float64 and torch.allclose(fused, ref, atol=1e-6)
    for a, r in zip(torch.autograd.grad(2.5 * fused, (h, w, b)), ref_grads):
        assert a.dtype == r.dtype and torch.allclose(a, r, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradients formed
        assert torch.allclose(head_cross_entropy(h, w, b, t, chunk=chunk), ref, atol=1e-6)


def test_model_loss_gradients_match_unfused():
    model = small_gpt(seed=4).train()
    seq, mask = map(torch.from_numpy, random_sequences(6, SMALL.vocab_size, SMALL.max_len, np.random.default_rng(2)))
    model.loss(seq, mask).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    valid = mask[:, 1:]
    F.cross_entropy(model(seq[:, :-1], mask[:, :-1])[valid], seq[:, 1:][valid]).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-5), n


# ---------------------------------------------------------------------------- training
def test_train_save_load_resume(tmp_path):
    from omnijet_lib.training import TrainConfig
    from omnijet_lib.training.gpt import load_gpt, train_gpt

    rng = np.random.default_rng(0)
    # learnable sequences: code i is followed by i+1, length random
    n, L = 96, 12
    lengths = rng.integers(2, 9, n)
    seq = np.zeros((n, L), np.int64)
    mask = np.arange(L)[None] <= lengths[:, None] + 1
    for i, c in enumerate(lengths):
        first = rng.integers(1, SMALL.vocab_size - 1 - c)
        seq[i, 1:c + 1] = np.arange(first, first + c)
        seq[i, c + 1] = SMALL.stop_token
    tc = TrainConfig(progress_bar=False, accelerator="cpu", devices=1)
    cfg = GPTConfig(**{**SMALL.__dict__, "max_len": L})
    with torch.no_grad():
        before = GPT(cfg).loss(torch.from_numpy(seq), torch.from_numpy(mask)).item()
    model = train_gpt(seq, mask, tmp_path, config=cfg, epochs=3, batch_size=16, train_config=tc)
    assert (tmp_path / "gpt.safetensors").is_file() and (tmp_path / "last.ckpt").is_file()
    with torch.no_grad():
        after = model.loss(torch.from_numpy(seq), torch.from_numpy(mask)).item()
    assert after < 0.8 * before

    loaded = load_gpt(tmp_path / "gpt.safetensors", vocab_size=SMALL.vocab_size)
    assert loaded.config == cfg
    x = torch.from_numpy(seq[:4])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(OmnijetError, match=r"vocabulary is 12 .* needs 8194"):
        load_gpt(tmp_path / "gpt.safetensors", vocab_size=8194)

    # resuming: a second call with more epochs continues from last.ckpt at epoch 3
    train_gpt(seq, mask, tmp_path, config=cfg, epochs=4, batch_size=16, train_config=tc)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["epoch"] == 3 and state["global_step"] == 4 * int(np.ceil(86 / 16))


def test_train_rejects_bad_sequences(tmp_path):
    from omnijet_lib.training.gpt import train_gpt

    seq, mask = random_sequences(10, SMALL.vocab_size, 20, np.random.default_rng(0))
    cfg = GPTConfig(**{**SMALL.__dict__, "max_len": 20})
    bad = seq.copy()
    bad[0, 1] = 99
    with pytest.raises(OmnijetError, match="outside the vocabulary"):
        train_gpt(bad, mask, tmp_path, config=cfg, epochs=1)
    with pytest.raises(OmnijetError, match="stop token 13"):
        train_gpt(seq, mask, tmp_path, config=GPTConfig(**{**cfg.__dict__, "vocab_size": 14}), epochs=1)
    with pytest.raises(OmnijetError, match="start token"):
        train_gpt(np.where(np.arange(20) == 0, 1, seq), mask, tmp_path, config=cfg, epochs=1)
    with pytest.raises(OmnijetError, match="positions"):
        train_gpt(seq, mask, tmp_path, config=SMALL.__class__(**{**cfg.__dict__, "max_len": 10}), epochs=1)
    assert not any(tmp_path.iterdir())  # nothing written


def test_training_loss_weights_every_target_alike_across_bucketed_batches():
    """Sum over a batch's targets / (batch size x the training set's targets per jet): a stop
    target in a batch of short jets weighs what one in a batch of long jets weighs (a per-batch
    mean would weight it by 1 / the batch's own target count and bias the learnt stop rate)."""
    import torch.nn.functional as F

    from omnijet_lib.training.gpt import GPTModule

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=12)
    module = GPTModule(cfg, targets_per_jet=6.0)
    for n in (2, 9):  # a short-jet and a long-jet batch
        seq = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(1, 9, (3, n)),
                         torch.full((3, 1), 9)], 1)
        mask = torch.ones_like(seq, dtype=torch.bool)
        module.log = lambda *a, **k: None
        loss = module.training_step({"x": seq, "mask": mask}, 0)
        logits = module.model(seq[:, :-1], mask[:, :-1])
        total = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="sum")
        assert torch.allclose(loss, total / (3 * 6.0), rtol=1e-5)


@pytest.mark.parametrize("schedule", ["one_cycle", "official"])
def test_lr_schedule(schedule):
    """Default: one-cycle over the optimiser steps (peak at 30%, ends near 0); official: lr / 3
    in the first epoch, then constant."""
    from types import SimpleNamespace

    from omnijet_lib.training.gpt import GPTModule

    module = GPTModule(GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=12), lr=1e-3,
                       first_epoch_lr_factor=1 / 3, schedule=schedule)
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    entry = module.configure_optimizers()
    opt, sched = entry["optimizer"], entry["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if schedule == "one_cycle":
        assert entry["lr_scheduler"]["interval"] == "step"
        assert lrs[0] == pytest.approx(1e-3 / 25) and int(np.argmax(lrs)) == 30 and lrs[-1] < 1e-7
    else:
        assert entry["lr_scheduler"]["interval"] == "epoch"
        assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[1:] == pytest.approx([1e-3] * 99)
