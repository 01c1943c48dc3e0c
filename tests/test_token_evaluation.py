"""Token-quality evaluation helpers (studies/tokens.py) and the Transformer jet classifier."""

import json

import numpy as np
import pytest
import torch

from omnijet_lib.io import OmnijetError
from omnijet_lib.models.normformer import TransformerClassifier, TransformerClassifierConfig
from omnijet_lib.tokenizers import BinnedConfig, BinnedTokenizer, VQVAE, VQVAEConfig
from conftest import randomise_
from omnijet_lib.studies.tokens import (blob_spread, classifier_accuracy, codebook_usage, gaussian_fit,
                                               resolution_table, to_physical, token_blobs)
from omnijet_lib.tokenizers.base import TokenizerMixin


def tiny_vqvae(conditional=True, K=16):
    torch.manual_seed(0)
    return randomise_(VQVAE(VQVAEConfig(conditional=conditional, num_codes=K, hidden_dim=16, num_blocks=1,
                                        num_heads=2, mlp_hidden=16, dropout=0.0, attn_dropout=0.0))).eval()


class GroupProbe(torch.nn.Module, TokenizerMixin):
    """Fake conditional tokenizer: decodes to (own id, group size, group id sum) to see the groups."""
    kind = "conditional"
    num_codes = 100

    def encode(self, x, mask):
        raise NotImplementedError

    def decode(self, tokens, mask=None):
        mask = tokens >= 0 if mask is None else mask
        t = tokens.float()
        n = mask.sum(1, keepdim=True).float().expand_as(t)
        s = (t * mask).sum(1, keepdim=True).expand_as(t)
        return torch.stack([t, n, s], -1) * mask[..., None]


def test_blobs_assign_each_sample_to_its_token_with_full_context():
    ids, blobs = token_blobs(GroupProbe(), samples=7, context=9, tokens=np.arange(0, 100, 3), seed=1)
    assert blobs.shape == (len(ids), 7, 3)
    assert (blobs[..., 0] == ids[:, None]).all()           # every sample belongs to its token
    assert (blobs[..., 1] == 10).all()                     # decoded with context + 1 tokens
    assert blobs[..., 2].std(axis=1).min() > 0             # contexts differ from sample to sample


def test_blobs_of_few_tokens_are_topped_up_with_random_codebook_tokens():
    ids, blobs = token_blobs(GroupProbe(), samples=5, context=20, tokens=[4, 7], seed=0)
    assert (blobs[..., 1] == 21).all() and (blobs[..., 0] == np.array([[4], [7]])).all()


def test_conditional_blobs_spread_unconditional_and_binned_are_points():
    cond = tiny_vqvae(True)
    _, b = token_blobs(cond, samples=6, context=5, seed=0)
    assert b.shape == (16, 6, 3) and (blob_spread(b).max(1) > 0).all()
    unc = tiny_vqvae(False)
    ids, b = token_blobs(unc, samples=6, context=5)
    assert b.shape == (16, 1, 3) and (blob_spread(b) == 0).all()
    in_jet = unc.decode(torch.arange(16)[None]).numpy()[0]  # per-constituent decoder: context-free
    np.testing.assert_allclose(b[:, 0], in_jet, atol=1e-5)
    binned = BinnedTokenizer(BinnedConfig(bins=3))
    ids, b = token_blobs(binned)
    assert b.shape == (27, 1, 3)
    np.testing.assert_allclose(b[13, 0], [0.8, 0.0, 0.0], atol=1e-5)  # centre cell of the default grid
    with pytest.raises(OmnijetError, match="token ids"):
        token_blobs(binned, tokens=[27])


def test_to_physical_inverts_the_feature_scaling():
    x = np.array([[np.log(100.0) - 1.8, 0.3, -0.6]])
    np.testing.assert_allclose(to_physical(x), [[100.0, 0.1, -0.2]], rtol=1e-6)


def test_gaussian_fit_finds_the_core_despite_tails():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(2.0, 3.0, 20000), rng.uniform(-60, 60, 3000)])
    mu, sigma = gaussian_fit(v)
    assert abs(mu - 2.0) < 0.2 and abs(sigma - 3.0) < 0.2
    assert v.std() > 2 * sigma                               # a plain std would be far off
    mu, sigma = gaussian_fit([1.0, 2.0, 3.0])                # too few entries: robust estimate
    assert mu == 2.0 and sigma == pytest.approx(1.4826)


def test_resolution_table_per_class_and_method():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 8], 3000)
    orig = {"mass": rng.uniform(50, 200, 6000)}
    rec = {"good": {"mass": orig["mass"] + rng.normal(0, 1.0, 6000)},
           "shifted": {"mass": orig["mass"] + np.where(labels == 8, rng.normal(15, 5.0, 6000), rng.normal(0, 2.0, 6000))}}
    t = resolution_table(orig, rec, labels, observables=("mass",))
    assert set(t["good"]["mass"]) == {"QCD", "Tbqq", "all"}
    assert t["good"]["mass"]["Tbqq"]["sigma"] == pytest.approx(1.0, rel=0.1)
    assert t["shifted"]["mass"]["Tbqq"]["mu"] == pytest.approx(15.0, abs=0.5)
    assert t["shifted"]["mass"]["Tbqq"]["sigma"] == pytest.approx(5.0, rel=0.1)
    assert t["shifted"]["mass"]["QCD"]["sigma"] == pytest.approx(2.0, rel=0.1)
    assert t["shifted"]["mass"]["Tbqq"]["n"] == 3000


def test_codebook_usage_counts_only_real_tokens():
    tokens = np.array([[0, 1, 2, 3, 5], [0, 1, 2, 3, -1]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], bool)
    u = codebook_usage(tokens, mask, 8)
    assert u["usage"] == 0.5 and u["used"] == 4 and u["perplexity"] == pytest.approx(4.0)
    with pytest.raises(OmnijetError):
        codebook_usage(tokens, np.ones_like(mask), 8)        # -1 at a position marked real


def test_transformer_classifier_shapes_masking_and_permutation():
    torch.manual_seed(0)
    cfg = TransformerClassifierConfig(dim=16, num_heads=2, mlp_hidden=16, num_blocks=2, num_class_blocks=2,
                                      head=[8, 8], dropout=0.0)
    model = TransformerClassifier(cfg).eval()
    paper = TransformerClassifier()
    assert len(paper.blocks) == 5 and len(paper.class_blocks) == 2 and paper.head[-1].out_features == 10
    x, mask = torch.randn(3, 6, 3), torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    out = model(x, mask)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    x2 = x.clone()
    x2[~mask] = 100.0                                         # padding must not matter
    torch.testing.assert_close(model(x2, mask), out)
    perm = torch.randperm(6)                                  # a set of constituents: order must not matter
    torch.testing.assert_close(model(x[:, perm], mask[:, perm]), out, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert model.cls_token.grad is not None and model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,kw", [("deepsets", {"phi": [16, 16], "f": [16]}),
                                     ("transformer", {"dim": 16, "num_heads": 2, "mlp_hidden": 16, "num_blocks": 1,
                                                      "num_class_blocks": 1, "head": [16]})])
def test_classifier_accuracy_learns_a_separable_task(arch, kw):
    from omnijet_lib.training.classifier import split_indices
    from omnijet_lib.training.fit import TrainConfig

    rng = np.random.default_rng(0)
    n, L = 600, 8
    labels = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, L, 3)).astype(np.float32)
    x[..., 0] += labels[:, None] * 1.5                       # class shifts the first feature
    mask = np.arange(L)[None] < rng.integers(2, L + 1, n)[:, None]
    split = split_indices(n, seed=0)
    cfg = TrainConfig(progress_bar=False, accelerator="cpu", devices=1)
    extra = [("again", x[split[2]], mask[split[2]], labels[split[2]])]
    model, acc = classifier_accuracy(arch, x, mask, labels, split, epochs=6, batch_size=32, lr=3e-3, train_config=cfg,
                                     model_kw=kw, extra_test=extra, seed=0)
    assert acc["test"] > 0.9 and acc["again"] == acc["test"]
    with pytest.raises(OmnijetError, match="unknown"):
        classifier_accuracy("bdt", x, mask, labels, split, epochs=1)


def _tokenizer_data(x, mask, **settings):
    from omnijet_lib.studies.tokens import TOKENIZER_DEFAULTS, TokenizerData

    tiny = {"hidden_dim": 8, "num_blocks": 1, "num_heads": 2, "mlp_hidden": 8}
    return TokenizerData(x, mask, np.zeros(len(x), int), [np.arange(len(x)), np.arange(0), np.arange(0)],
                         {"data_files": None, "per_class": 2, "seed": 1},
                         {**TOKENIZER_DEFAULTS, "epochs": 1, "model_kw": tiny, **settings}, {})


def test_the_profile_tokenizer_is_trained_once_and_again_for_changed_settings(tmp_path):
    """Before the store, a tokenizer found at tokenizer_{kind}_{K}/ was used whatever its settings."""
    from omnijet_lib.studies.tokens import profile_tokenizer
    from omnijet_lib.training.store import ModelStore

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20, 5, 3)).astype(np.float32)
    mask = np.ones((20, 5), bool)
    store = ModelStore(tmp_path, progress=lambda m: None)
    tok, run = profile_tokenizer(store, "binned", 27, _tokenizer_data(x, mask))
    again, run2 = profile_tokenizer(store, "binned", 27, _tokenizer_data(x, mask))
    assert run.trained and not run2.trained and tok.num_codes == 27
    torch.testing.assert_close(again.lo, tok.lo)
    assert profile_tokenizer(store, "binned", 27, _tokenizer_data(x * 2, mask))[1].trained  # other jets
    vq, vq_run = profile_tokenizer(store, "conditional", 16, _tokenizer_data(x, mask))
    assert vq_run.trained and vq.config.hidden_dim == 8
    assert not profile_tokenizer(store, "conditional", 16, _tokenizer_data(x, mask))[1].trained
    wider = _tokenizer_data(x, mask, per_size={16: {"model_kw": {"hidden_dim": 12}}})
    vq12, run12 = profile_tokenizer(store, "conditional", 16, wider)  # a changed setting: a new run, the old stays
    assert run12.trained and run12.path != vq_run.path and vq12.config.hidden_dim == 12
    assert (vq_run.path / "tokenizer.safetensors").is_file()
    strict = ModelStore(tmp_path, reuse="strict", progress=lambda m: None)
    with pytest.raises(OmnijetError, match=r"reuse: strict, and no run was trained with these settings: "
                                           r"settings.config.hidden_dim is 12 in .*, 4 requested"):
        profile_tokenizer(strict, "conditional", 16, _tokenizer_data(x, mask, per_size={16: {"model_kw": {"hidden_dim": 4}}}))


TINY_CLASSIFIERS = {"deepsets": {"phi": [8], "f": [8]},
                    "transformer": {"dim": 8, "num_heads": 2, "mlp_hidden": 8, "num_blocks": 1, "num_class_blocks": 1,
                                    "head": [8]}}


def _labelled_data(n=40, L=5, **settings):
    """Tokenizer data with three classes and a 60/20/20 split, for the fig-5 classifiers."""
    from omnijet_lib.studies.tokens import TOKENIZER_DEFAULTS, TokenizerData
    from omnijet_lib.training.classifier import split_indices

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, L, 3)).astype(np.float32)
    x[..., 0] += labels[:, None]
    mask = np.arange(L)[None] < rng.integers(2, L + 1, n)[:, None]
    tiny = {"hidden_dim": 8, "num_blocks": 1, "num_heads": 2, "mlp_hidden": 8}
    return TokenizerData(x, mask, labels, split_indices(n, seed=1), {"data_files": None, "per_class": 4, "seed": 1},
                         {**TOKENIZER_DEFAULTS, "epochs": 1, "model_kw": tiny, **settings}, {})


def test_a_classifier_is_trained_once_and_again_for_a_changed_setting_or_data(tmp_path):
    """Before the store, the 14 classifiers of notebook 01 were trained anew on every run."""
    from omnijet_lib.studies.tokens import classifier_run
    from omnijet_lib.training.fit import TrainConfig
    from omnijet_lib.training.store import ModelStore
    from reliability.conftest import one_line_error, snapshot

    d = _labelled_data()
    store = ModelStore(tmp_path, progress=lambda m: None)
    kw = dict(batch_size=16, train_config=TrainConfig(progress_bar=False), model_kw=TINY_CLASSIFIERS["deepsets"],
              extra_test=[("again", d.x[:6], d.mask[:6], d.labels[:6])])

    def run(x=d.x, epochs=1, store=store, **changed):
        return classifier_run(store, "original", "deepsets", x, d.mask, d.labels, d.split, epochs, **{**kw, **changed})

    acc, first = run()
    assert first.trained and first.path.parent.name == "classifier01_deepsets_original"
    assert set(acc) == {"test", "again"}
    assert json.loads((first.path / "result.json").read_text()) == acc and not list(first.path.glob("*.ckpt"))
    before = snapshot(tmp_path)
    again, second = run()
    assert not second.trained and second.path == first.path and again == acc and snapshot(tmp_path) == before
    longer = run(epochs=2)[1]  # a changed setting: a new run folder, the old one stays
    assert longer.trained and longer.path.parent == first.path.parent and longer.path != first.path
    assert (first.path / "result.json").is_file()
    other_jets = run(x=d.x * 1.5)[1]  # e.g. another tokenizer's reconstruction
    assert other_jets.trained and len({first.path, longer.path, other_jets.path}) == 3
    strict = ModelStore(tmp_path, reuse="strict", progress=lambda m: None)
    assert not run(store=strict)[1].trained  # a match is reused
    with one_line_error(f"{tmp_path / 'classifier01_deepsets_original'}: reuse: strict, and no run was trained with "
                        "these settings: settings.seed is 0 in ", ", 3 requested", unchanged=tmp_path):
        run(store=strict, seed=3)


def test_a_representation_job_trains_tokenizer_and_classifiers_once(tmp_path):
    """One job per representation: a rerun trains nothing; a new tokenizer means new classifiers."""
    from omnijet_lib.studies.tokens import representation_cost, representation_study
    from omnijet_lib.training.fit import TrainConfig
    from omnijet_lib.training.store import ModelStore

    d = _labelled_data()
    store = ModelStore(tmp_path, progress=lambda m: None)
    kw = dict(epochs=1, batch_size=16, train_config=TrainConfig(progress_bar=False), seed=0,
              real=(d.x[:6], d.mask[:6], d.labels[:6]))
    first = representation_study(store, ("conditional", 16), d, TINY_CLASSIFIERS, **kw)
    assert first["run"].trained and first["x"].shape == d.x.shape and first["tokens"].shape == d.mask.shape
    assert first["real"][1].shape == (6, 5, 3) and set(first["accuracy"]["transformer"]) == {"test", "real"}
    assert {r.path.parent.name for r in first["classifier_runs"].values()} == \
        {"classifier01_deepsets_conditional_16", "classifier01_transformer_conditional_16"}
    again = representation_study(store, ("conditional", 16), d, TINY_CLASSIFIERS, **kw)
    assert not again["run"].trained and not any(r.trained for r in again["classifier_runs"].values())
    assert again["accuracy"] == first["accuracy"]
    np.testing.assert_array_equal(again["x"], first["x"])
    given = representation_study(store, first["tokenizer"], d, TINY_CLASSIFIERS, **kw)  # e.g. the published one
    assert given["run"] is None and not any(r.trained for r in given["classifier_runs"].values())
    wider = _labelled_data(per_size={16: {"model_kw": {"hidden_dim": 12}}})  # another tokenizer of the same size
    new = representation_study(store, ("conditional", 16), wider, TINY_CLASSIFIERS, **kw)
    assert new["run"].trained and all(r.trained for r in new["classifier_runs"].values())
    original = representation_study(store, None, d, TINY_CLASSIFIERS, **kw)
    assert original["tokenizer"] is None and original["run"] is None and original["tokens"] is None
    np.testing.assert_array_equal(original["x"], d.x)
    cost = {src: representation_cost(src, d, TINY_CLASSIFIERS, 1) for src in (("conditional", 16), None, ("binned", 27))}
    assert cost["conditional", 16] > cost[None] == cost["binned", 27] > 0  # a binned tokenizer is fitted, not trained


def test_the_dry_run_asks_the_store_for_the_tokenizers(tmp_path):
    """--dry-run builds each tokenizer's settings as profile_tokenizer does and says whether the store has it."""
    from omnijet_lib.figures import _tokenizer_runs
    from omnijet_lib.studies.tokens import profile_tokenizer, tokenizer_data
    from omnijet_lib.training.store import ModelStore

    tiny = {"hidden_dim": 8, "num_blocks": 1, "num_heads": 2, "mlp_hidden": 8}
    p = {"models_dir": str(tmp_path), "per_class": 2, "seed": 1, "tokenizer": {"epochs": 1, "model_kw": tiny}}
    [(label, _, jets, epochs, batch, _, status)] = _tokenizer_runs(p, 0, "conditional", 16)
    assert label.startswith("VQ-VAE conditional K=16") and (epochs, batch) == (1, 512) and status == "store: trains it"
    assert jets == pytest.approx(0.9 * 0.6 * 20)
    data = tokenizer_data(p["tokenizer"], None, 2, 1, None, load=False)
    data.x = np.random.default_rng(0).normal(0, 1, (20, 5, 3)).astype(np.float32)
    data.mask, data.labels = np.ones((20, 5), bool), np.zeros(20, int)
    data.split = [np.arange(20), np.arange(0), np.arange(0)]
    _, run = profile_tokenizer(ModelStore(tmp_path, progress=lambda m: None), "conditional", 16, data)
    assert _tokenizer_runs(p, 0, "conditional", 16)[0][-1] == \
        f"store: reuses tokenizer_conditional_16/{run.path.name} if its jets match"
    other = {**p, "tokenizer": {**p["tokenizer"], "epochs": 2}}
    assert _tokenizer_runs(other, 0, "conditional", 16)[0][-1] == \
        "store: trains it; 1 run(s) of tokenizer_conditional_16 with other settings"
