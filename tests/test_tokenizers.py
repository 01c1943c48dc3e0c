"""Tokenizers: one interface for the conditional/unconditional VQ-VAE and the binned grid;
GPT sequences, dataset-level helpers, save/load, and a tiny training run."""

import json

import numpy as np
import pytest
import torch

from conftest import randomise_
from omnijet_lib.io import OmnijetError
from omnijet_lib.tokenizers import (
    VQVAE,
    BinnedConfig,
    BinnedTokenizer,
    VQVAEConfig,
    load_tokenizer,
    reconstruct,
    save_tokenizer,
    tokenize,
)
from omnijet_lib.training.fit import one_cycle
from omnijet_lib.training.vqvae import codebook_stats, make_tokenizer, train_tokenizer

SMALL = dict(hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16, num_codes=32)


def toy_jets(n=64, max_len=20, seed=0):
    """Padded (n, max_len, 3) features shaped like the real ones, with a (n, max_len) mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len + 1, n)
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    x = np.zeros((n, max_len, 3), np.float32)
    pt = np.sort(rng.normal(0.0, 1.2, (n, max_len)), axis=1)[:, ::-1]
    x[..., 0] = pt
    x[..., 1:] = rng.normal(0, 0.6, (n, max_len, 2)) * np.exp(-0.3 * (pt[..., None] - pt.min()))
    x[~mask] = 0
    return x.astype(np.float32), mask


def make(kind):
    torch.manual_seed(0)
    if kind == "binned":
        return BinnedTokenizer(BinnedConfig(bins=5))
    return VQVAE(VQVAEConfig(conditional=kind == "conditional", **SMALL)).eval()


KINDS = ["conditional", "unconditional", "binned"]


def test_paper_defaults():
    cfg = VQVAEConfig()
    assert (cfg.hidden_dim, cfg.num_blocks, cfg.num_heads, cfg.mlp_hidden, cfg.dropout, cfg.latent_dim) == \
        (128, 4, 8, 128, 0.1, 4)
    m = VQVAE(cfg)
    assert m.encoder.inp.in_features == 3 and m.encoder.out.out_features == 4
    assert m.decoder.inp.in_features == 4 and m.decoder.out.out_features == 3
    assert len(m.encoder.blocks) == 4 and m.vocab_size == 8194 and m.kind == "conditional"
    assert BinnedTokenizer().num_codes == 21 ** 3 and BinnedTokenizer(BinnedConfig(bins=40)).num_codes == 64000


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_and_sequence_round_trip(kind):
    tok = make(kind)
    x, mask = toy_jets(16)
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    t = tok.encode(xt, mt)
    assert t.dtype == torch.long and t.shape == mt.shape
    assert (t[~mt] == -1).all() and (t[mt] >= 0).all() and (t[mt] < tok.num_codes).all()
    rec = tok.decode(t, mt)
    assert rec.shape == xt.shape and (rec[~mt] == 0).all()

    seq, seq_mask = tok.to_sequence(t, mt)
    n = mt.sum(1)
    assert seq.shape == (16, mt.shape[1] + 2)
    assert (seq[:, 0] == 0).all()
    assert (seq.gather(1, (n + 1)[:, None]).squeeze(1) == tok.num_codes + 1).all()  # stop after the codes
    assert torch.equal(seq[:, 1:-1][mt], t[mt] + 1)
    assert torch.equal(seq_mask.sum(1), n + 2)
    assert tok.vocab_size == tok.num_codes + 2 and int(seq.max()) <= tok.num_codes + 1
    t2, m2 = tok.from_sequence(seq)
    W = int(n.max())
    assert torch.equal(m2, mt[:, :W]) and torch.equal(t2, t[:, :W])
    # numpy in, numpy out
    s_np, sm_np = tok.to_sequence(t.numpy(), mt.numpy())
    assert isinstance(s_np, np.ndarray) and np.array_equal(s_np, seq.numpy())
    t3, m3 = tok.from_sequence(s_np)
    assert isinstance(t3, np.ndarray) and np.array_equal(t3, t2.numpy())


def test_from_sequence_validation():
    tok = make("binned")  # K = 125, stop = 126
    K = tok.num_codes
    ok = np.array([[0, 5, 7, K + 1, K + 1], [0, 1, K, 3, 4]])  # second row has no stop
    t, m = tok.from_sequence(ok)
    assert t.tolist() == [[4, 6, -1, -1], [0, K - 1, 2, 3]] and m.sum(1).tolist() == [2, 4]
    # anything after the stop is ignored (e.g. padding with -1 or start ids)
    t, _ = tok.from_sequence(np.array([[0, 5, K + 1, 0, -1]]))
    assert t.tolist() == [[4]]
    for bad in ([[0, 5, K + 2, K + 1]], [[0, -3, K + 1]], [[0, 5, 0, K + 1]], [[3, 5, K + 1]],
                [[0, 5, K + 1, 10**6]]):
        with pytest.raises(OmnijetError):
            tok.from_sequence(np.array(bad))
    with pytest.raises(OmnijetError):
        tok.from_sequence(np.array([[0.0, 1.0]]))
    with pytest.raises(OmnijetError):
        tok.to_sequence(np.array([[K, 1]]), np.array([[True, True]]))


def test_blocks_start_as_identity():
    """Official initialisation: a fresh NormFormer block returns its input unchanged."""
    from omnijet_lib.models.normformer import NormFormerBlock
    blk = NormFormerBlock(16, 2, 16).eval()
    x, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    assert torch.allclose(blk(x, mask), x)
    assert not torch.allclose(randomise_(blk)(x, mask), x)


def test_conditional_padding_never_matters():
    tok = randomise_(make("conditional"))
    x, mask = toy_jets(8)
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    x2 = xt.clone()
    x2[~mt] = torch.randn(int((~mt).sum()), 3) * 50
    x2[0, -1] = float("nan") if not mt[0, -1] else x2[0, -1]
    t1, t2 = tok.encode(xt, mt), tok.encode(x2, mt)
    assert torch.equal(t1, t2)
    # extra padding columns change nothing either
    xp = torch.cat([xt, torch.randn(8, 7, 3)], 1)
    mp = torch.cat([mt, torch.zeros(8, 7, dtype=torch.bool)], 1)
    assert torch.equal(tok.encode(xp, mp)[:, :mt.shape[1]], t1)
    d1 = tok.decode(t1, mt)
    d2 = tok.decode(torch.cat([t1, torch.full((8, 7), -1)], 1), mp)[:, :mt.shape[1]]
    assert torch.allclose(d1, d2, atol=1e-5)
    # and the conditional encoder does use the other constituents of the jet
    z_a = tok.encoder(xt[:1], mt[:1])[0, 0]
    xb = xt[:1].clone()
    xb[0, 1] += 1.0
    assert not torch.allclose(z_a, tok.encoder(xb, mt[:1])[0, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_dataset_helpers_match_direct_calls(kind):
    tok = make(kind)
    x, mask = toy_jets(50, max_len=24, seed=3)
    tokens = tokenize(tok, x, mask, batch_size=7)
    assert tokens.shape == mask.shape and tokens.dtype == np.int32
    direct = tok.encode(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    assert np.array_equal(tokens, direct)
    rec = reconstruct(tok, tokens, mask, batch_size=9)
    assert rec.shape == x.shape and rec.dtype == np.float32 and (rec[~mask] == 0).all()
    ref = tok.decode(torch.from_numpy(direct), torch.from_numpy(mask)).numpy()
    assert np.allclose(rec, ref, atol=1e-5)
    assert np.allclose(reconstruct(tok, tokens), rec, atol=1e-5)  # mask defaults to tokens >= 0
    with pytest.raises(OmnijetError):
        reconstruct(tok, np.full((2, 3), tok.num_codes), None)
    with pytest.raises(OmnijetError):
        tokenize(tok, x[:, :, :2].reshape(50, -1), mask)


def test_binned_grid():
    tok = BinnedTokenizer(BinnedConfig(bins=21))
    x, mask = toy_jets(30)
    tok.fit(x, mask)
    lo, hi = x[mask].min(0), x[mask].max(0)
    assert np.allclose(tok.lo.numpy(), lo) and np.allclose(tok.hi.numpy(), hi)
    t = tokenize(tok, x, mask)
    rec = reconstruct(tok, t, mask)
    half_cell = (hi - lo) / 21 / 2
    assert (np.abs(rec - x)[mask] <= half_cell + 1e-5).all()
    # cell index layout: (i_pt * n + i_eta) * n + i_phi, decode = centre
    one = torch.tensor([[[lo[0], hi[1], lo[2]]]])
    tok_id = int(tok.encode(one, torch.ones(1, 1, dtype=torch.bool)))
    assert tok_id == (0 * 21 + 20) * 21 + 0
    # fixed documented default ranges cover the constituent cut |rel| < 0.8 (× 3)
    d = BinnedTokenizer()
    assert d.lo.tolist()[1:] == pytest.approx([-2.4, -2.4]) and d.hi.tolist()[1:] == pytest.approx([2.4, 2.4])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    tok = make(kind)
    x, mask = toy_jets(20)
    if kind == "binned":
        tok.fit(x, mask)
    path = save_tokenizer(tmp_path / "tok.safetensors", tok)
    back = load_tokenizer(path)
    assert type(back) is type(tok) and back.kind == kind and back.num_codes == tok.num_codes
    t1, t2 = tokenize(tok, x, mask), tokenize(back, x, mask)
    assert np.array_equal(t1, t2)
    assert np.allclose(reconstruct(tok, t1, mask), reconstruct(back, t2, mask), atol=1e-6)


def test_load_errors(tmp_path):
    with pytest.raises(OmnijetError, match="not found"):
        load_tokenizer(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(OmnijetError):
        load_tokenizer(bad)
    from omnijet_lib.io import save_checkpoint
    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"class": "GPT"})
    with pytest.raises(OmnijetError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "other.safetensors")


def test_make_tokenizer_errors():
    with pytest.raises(OmnijetError, match="kind"):
        make_tokenizer("magic", 16)
    with pytest.raises(OmnijetError):
        make_tokenizer("binned", 100)  # not a cube
    assert make_tokenizer("binned", 9261).bins == 21
    with pytest.raises(OmnijetError):
        make_tokenizer("conditional", 16, no_such_option=3)


def test_one_cycle_and_stats():
    f = one_cycle(100)
    lrs = [f(i) for i in range(120)]
    assert lrs[0] == pytest.approx(1 / 25) and max(lrs) == pytest.approx(1.0, abs=1e-3)
    assert int(np.argmax(lrs)) == 30 and lrs[99] < 1e-4 and lrs[119] == lrs[100]
    usage, ppl = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert usage.item() == 0.5 and ppl.item() == pytest.approx(2.0)


def test_tiny_training_lowers_loss_and_resumes(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    x, mask = toy_jets(240, max_len=16, seed=5)
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)

    def recon_mse(tok):
        rec = reconstruct(tok.cpu(), tokenize(tok.cpu(), x, mask), mask)
        return float(((rec - x) ** 2)[mask].mean())

    torch.manual_seed(0)
    untrained = make_tokenizer("conditional", 32, **{k: v for k, v in SMALL.items() if k != "num_codes"})
    with torch.no_grad():  # k-means initialised, untrained networks
        untrained.train()
        untrained(xt, mt)
    base = recon_mse(untrained)
    from omnijet_lib.training import TrainConfig
    cfg = TrainConfig(progress_bar=False)
    kw = {k: v for k, v in SMALL.items() if k != "num_codes"}
    tok = train_tokenizer("conditional", x, mask, num_codes=32, epochs=4, batch_size=32, out_dir=tmp_path,
                          train_config=cfg, **kw)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist) == 4 and hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert 0 < hist[-1]["val_usage"] <= 1 and hist[-1]["val_perplexity"] > 1
    trained = recon_mse(tok)
    assert trained < 0.85 * base, (trained, base)  # the untrained blocks are the identity: a fair start
    assert (tmp_path / "tokenizer.safetensors").is_file() and (tmp_path / "last.ckpt").is_file()
    back = load_tokenizer(tmp_path / "tokenizer.safetensors")
    assert np.array_equal(tokenize(back, x, mask), tokenize(tok.cpu(), x, mask))
    # a rerun with more epochs continues from last.ckpt (2 more epochs, not 6)
    from omnijet_lib.training.vqvae import VQVAEModule
    calls = []
    step = VQVAEModule.training_step
    monkeypatch.setattr(VQVAEModule, "training_step", lambda self, b, i: calls.append(i) or step(self, b, i))
    train_tokenizer("conditional", x, mask, num_codes=32, epochs=6, batch_size=32, out_dir=tmp_path,
                    train_config=cfg, **kw)
    n_batches = -(-(len(x) - round(0.1 * len(x))) // 32)
    assert len(calls) == 2 * n_batches
    hist2 = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in hist2] == [0, 1, 2, 3, 4, 5]
    assert hist2[:4] == hist and hist2[4]["step"] > hist[3]["step"]


def test_binned_training_is_a_fit(tmp_path):
    x, mask = toy_jets(20)
    tok = train_tokenizer("binned", x, mask, num_codes=None, epochs=0, out_dir=tmp_path, bins=7)
    assert tok.num_codes == 343
    assert np.allclose(load_tokenizer(tmp_path / "tokenizer.safetensors").hi.numpy(), x[mask].max(0))


def test_resume_with_other_settings_is_refused(tmp_path):
    x, mask = toy_jets(40, max_len=10)
    kw = {k: v for k, v in SMALL.items() if k != "num_codes"}
    from omnijet_lib.training import TrainConfig
    cfg = TrainConfig(progress_bar=False)
    train_tokenizer("unconditional", x, mask, num_codes=16, epochs=1, batch_size=16, out_dir=tmp_path,
                    train_config=cfg, **kw)
    with pytest.raises(OmnijetError, match="num_codes"):
        train_tokenizer("unconditional", x, mask, num_codes=32, epochs=2, batch_size=16, out_dir=tmp_path,
                        train_config=cfg, **kw)
