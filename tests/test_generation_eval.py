"""Evaluation helpers of notebook 02: decoding generated sequences, the profile's backbones in the
model store, the classifier test and W1 scores."""

from pathlib import Path

import numpy as np
import pytest
import torch

from omnijet_lib.studies.generation import (BackboneData, backbone_data, classifier_test, decode_generated,
                                           profile_backbone, w1_scores)
from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import GPTConfig
from omnijet_lib.tokenizers import reconstruct, tokenize
from omnijet_lib.training.fit import TrainConfig
from omnijet_lib.training.gpt import ensure_gpt
from omnijet_lib.training.store import ModelStore, Run
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


def _store(tmp_path, reuse="auto"):
    return ModelStore(tmp_path / "models", reuse=reuse, progress=lambda m: None)


def _weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ensure_gpt_trains_once_and_a_new_run_for_each_change(tmp_path):
    """Before the store, notebook 04 used whatever gpt_top/ held and 02 replaced a model in place."""
    tok = _binned()
    x, mask = _jets(40, seed=2)
    seq, seq_mask = tok.to_sequence(tokenize(tok, x, mask), mask)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=seq.shape[1])
    kw = dict(source={"what": "toy"}, epochs=1, batch_size=16, train_config=QUIET)
    store = _store(tmp_path)
    m1, r1 = ensure_gpt(store, "gpt_x", seq, seq_mask, cfg, **kw)
    m2, r2 = ensure_gpt(store, "gpt_x", seq, seq_mask, cfg, **kw)
    assert r1.trained and not r2.trained and r2.path == r1.path and _weights_equal(m1, m2)
    official = TrainConfig(progress_bar=False, accelerator="cpu", devices=1, schedule="official")
    changes = {"network": dict(config=GPTConfig(vocab_size=tok.vocab_size, n_embd=8, n_head=2, n_layer=1, ffn=16,
                                                max_len=seq.shape[1])),
               "epochs": dict(epochs=2), "procedure": dict(train_config=official), "seed": dict(seed=3),
               "sequences": dict(seq=seq[::-1], seq_mask=seq_mask[::-1])}
    paths = {r1.path}
    for what, change in changes.items():
        call = {"seq": seq, "seq_mask": seq_mask, "config": cfg, **kw, **change}
        model, run = ensure_gpt(store, "gpt_x", **call)
        assert run.trained and run.path not in paths, what
        paths.add(run.path)
    assert all((p / "gpt.safetensors").is_file() for p in paths)  # the old models stay
    with pytest.raises(OmnijetError, match=r"gpt_x: reuse: strict, and no run was trained with these settings: "
                                           r"settings.trainer.max_epochs is 1 in .*, 5 requested$"):
        ensure_gpt(_store(tmp_path, "strict"), "gpt_x", seq, seq_mask, cfg, **{**kw, "epochs": 5})


def _backbone_data(n=60, **settings):
    x, mask = _jets(n, seed=7)
    labels = np.where(np.arange(n) % 3 == 0, 8, 0)  # a third t→bqq' (8), the rest q/g (0)
    tiny = {"gpt_config": {"n_embd": 16, "n_head": 2, "n_layer": 1, "ffn": 32, "max_len": 10}, "epochs": 1,
            "batch_size": 16, "per_model": {}}
    return BackboneData({"per_class": n // 2, "seed": 2}, {**tiny, **settings}, {"accelerator": "cpu", "devices": 1},
                        seed=1, x=x, mask=mask, labels=labels)


def test_profile_backbones_train_on_their_classes_with_their_own_settings(tmp_path):
    tok, store = _binned(), _store(tmp_path)
    tok_run = Run(tmp_path / "tok", "0123456789abcdef", False, 0.0)
    data = _backbone_data(per_model={"top": {"epochs": 2, "dropout": 0.25}})
    top, run = profile_backbone(store, "top", tok, tok_run, data)
    rec = run.record()
    assert run.path.parent.name == "gpt_top" and rec["data"]["jets"] == 20 and rec["settings"]["trainer"]["max_epochs"] == 2
    assert top.config.dropout == 0.25 and rec["data"]["source"]["tokenizer"] == "0123456789abcdef"
    qcd, qrun = profile_backbone(store, "qcd", tok, tok_run, data)
    assert qrun.record()["data"]["jets"] == 40 and qcd.config.dropout == 0.0
    again = profile_backbone(store, "top", tok, tok_run, _backbone_data(per_model={"top": {"epochs": 2, "dropout": 0.25}}))
    assert not again[1].trained and again[1].path == run.path  # 04 asks for 02's top model: the same run
    half, hrun = profile_backbone(store, "combined", tok, tok_run, data, fraction=0.5)
    rec = hrun.record()
    assert hrun.path.parent.name == "gpt_combined_scaling_0.5" and rec["data"]["jets"] == 30
    assert rec["settings"]["trainer"]["max_epochs"] == 2  # the same optimiser steps as 1 epoch over all 60
    other_tok = make_tokenizer("binned", bins=3).fit(*_jets(50))
    assert profile_backbone(store, "top", other_tok, tok_run, data)[1].path != run.path  # another tokenizer: its own
    with pytest.raises(OmnijetError, match=r"^backbone.per_model: tops not among qcd, top, combined, all, QCD, "):
        profile_backbone(store, "top", tok, tok_run, _backbone_data(per_model={"tops": {"epochs": 2}}))
    with pytest.raises(OmnijetError, match=r"^backbone.per_model.top: unknown key epoch; known: epochs, dropout$"):
        profile_backbone(store, "top", tok, tok_run, _backbone_data(per_model={"top": {"epoch": 2}}))
    with pytest.raises(OmnijetError, match=r"^backbone.gpt_config: .*n_emb"):
        profile_backbone(store, "top", tok, tok_run, _backbone_data(gpt_config={"n_emb": 8}))


def test_class_conditional_and_single_class_backbones(tmp_path):
    tok, store = _binned(), _store(tmp_path)
    tok_run = Run(tmp_path / "tok", "0123456789abcdef", False, 0.0)
    data = _backbone_data(class_dropout=0.2)
    gpt, run = profile_backbone(store, "all", tok, tok_run, data, conditional=True)
    rec = run.record()
    assert run.path.parent.name == "gpt_all_conditional" and gpt.config.n_classes == 10
    assert rec["data"]["jets"] == 60 and rec["settings"]["class_dropout"] == 0.2
    seq, mask = gpt.generate(6, labels=8, generator=torch.Generator().manual_seed(0))
    assert seq.shape[0] == 6 and (seq[mask] < tok.vocab_size).all()
    # the same jets with other labels are another model; a plain all-class backbone is another one too
    relabelled = _backbone_data(class_dropout=0.2)
    relabelled.labels = relabelled.labels[::-1].copy()
    assert profile_backbone(store, "all", tok, tok_run, relabelled, conditional=True)[1].path != run.path
    plain, prun = profile_backbone(store, "all", tok, tok_run, data)
    assert prun.path.parent.name == "gpt_all" and plain.config.n_classes == 0
    # a single class, with the optimiser steps of the all-class backbone given as epochs
    one, orun = profile_backbone(store, "Tbqq", tok, tok_run, data, epochs=3)
    assert orun.path.parent.name == "gpt_class_Tbqq" and orun.record()["data"]["jets"] == 20
    assert orun.record()["settings"]["trainer"]["max_epochs"] == 3
    with pytest.raises(OmnijetError, match=r"^backbone 'Tbbq' is unknown; known: qcd, top, combined, all or a class"):
        profile_backbone(store, "Tbbq", tok, tok_run, data)


def test_judge_generation_compares_observables_and_tests():
    from omnijet_lib.studies.generation import JUDGED_OBSERVABLES, judge_generation

    x, mask = _jets(120, L=12, seed=3)
    far, far_mask = _jets(120, L=12, shift=0.8, seed=4)
    same = judge_generation(*_jets(120, L=12, seed=5), x, mask)
    other = judge_generation(far, far_mask, x, mask, deepsets_seeds=(0,), classifier_epochs=3)
    assert set(JUDGED_OBSERVABLES) == {k[3:] for k in same if k.startswith("w1_")}
    assert same["tree_auc"] < 0.65 < other["tree_auc"] and "deepsets_auc" in other and "deepsets_auc" not in same
    assert other["w1_mass"] > 2 * same["w1_mass"] and same["n_generated"] == 120
    assert other["median_multiplicity"]["reference"] == same["median_multiplicity"]["reference"]


def test_backbone_data_refuses_unknown_keys():
    with pytest.raises(OmnijetError, match=r"^backbone: unknown key epoch; known: gpt_config, epochs, batch_size"):
        backbone_data({"epoch": 3})


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

    tok, store = _binned(), _store(tmp_path)
    tok_run = Run(tmp_path / "tok", "0123456789abcdef", False, 0.0)
    data = _backbone_data(60, epochs=2)
    x128, m128 = np.zeros((60, 128, 3), np.float32), np.zeros((60, 128), bool)  # as decode_generated gives
    x128[:, :8], m128[:, :8] = data.x, data.mask
    kw = dict(n_generate=20, seeds=[0], classifier_epochs=1, train_config=QUIET, progress=lambda msg: None)

    def backbone(f):
        return profile_backbone(store, "combined", tok, tok_run, data, fraction=f)

    points = data_scaling(tok, backbone, x128, m128, [0.25, 0.5], **kw)
    assert [(p["train_jets"], p["epochs"], p["trained_here"]) for p in points] == [(15, 8, True), (30, 4, True)]
    assert all(0 <= p["auc_mean"] <= 1 for p in points)
    assert (Path(points[0]["run"]) / "gpt.safetensors").is_file()
    again = data_scaling(tok, backbone, x128, m128, [0.25], **kw)
    assert not again[0]["trained_here"] and again[0]["run"] == points[0]["run"]  # reused, not retrained
    with pytest.raises(OmnijetError, match="fraction 1.5 is not in"):
        data_scaling(tok, backbone, x128, m128, [1.5], **kw)


def test_changed_settings_reads_missing_or_broken_records_as_empty(tmp_path):
    from omnijet_lib.io import changed_settings, write_json

    rec = tmp_path / "run.json"
    assert changed_settings(rec, {"a": 1, "b": 2}) == ["a", "b"]
    write_json(rec, {"a": 1, "b": 3})
    assert changed_settings(rec, {"a": 1, "b": 2}) == ["b"]
    rec.write_text("{not json")
    assert changed_settings(rec, {"a": 1}) == ["a"]


def test_the_dry_run_asks_the_store_for_the_backbones(tmp_path):
    """--dry-run builds each backbone's settings as the notebooks do and says whether the store has it."""
    from omnijet_lib.figures import _backbone_runs

    tok, store = _binned(), _store(tmp_path)
    bb = {"gpt_config": {"n_embd": 16, "n_head": 2, "n_layer": 1, "ffn": 32, "max_len": 10}, "epochs": 1,
          "batch_size": 16, "per_class": 30}
    p = {"models_dir": str(tmp_path / "models"), "num_codes": tok.num_codes, "backbone": bb,
         "trainer": {"accelerator": "cpu", "devices": 1}}
    [(label, _, jets, epochs, batch, _, status)] = _backbone_runs(p, 0, "top")
    assert label.startswith("GPT top") and (jets, epochs, batch) == (27, 1, 16) and status == "store: trains it"
    data = backbone_data(bb, None, 30, 1, p["trainer"], load=False)
    toy = _backbone_data(60)
    data.x, data.mask, data.labels = toy.x, toy.mask, toy.labels
    _, run = profile_backbone(store, "top", tok, Run(tmp_path / "tok", "0" * 16, False, 0.0), data)
    assert _backbone_runs(p, 0, "top")[0][-1] == f"store: reuses gpt_top/{run.path.name} if its jets match"
    assert _backbone_runs({**p, "backbone": {**bb, "epochs": 2}}, 0, "top")[0][-1] == \
        "store: trains it; 1 run(s) of gpt_top with other settings"


def _physical_jets(n, seed, shift=0.0):
    """Padded features as the tokenizers see them: log pT - 1.8 around 0, angles × 3 within ±0.8 × 3."""
    rng = np.random.default_rng(seed)
    L = 20
    mask = np.arange(L)[None, :] < rng.integers(5, L + 1, n)[:, None]
    x = np.stack([rng.normal(2 + shift, 1, (n, L)), rng.uniform(-1, 1, (n, L)), rng.uniform(-1, 1, (n, L))], -1)
    return np.where(mask[..., None], x, 0).astype(np.float32), mask


def test_boosted_tree_test_separates_only_different_samples_and_names_the_observable():
    from omnijet_lib.studies.generation import N_LEADING, boosted_tree_test, jet_summary_features

    a, b = _physical_jets(400, 0), _physical_jets(400, 1)
    feats, names = jet_summary_features(*a)
    assert feats.shape == (400, 6 + N_LEADING) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats[:, names.index("multiplicity")], a[1].sum(1))
    same = boosted_tree_test(*a, *b, seed=0)
    assert 0.4 < same["auc_mean"] < 0.6 and len(same["aucs"]) == 5 and same["n_per_sample"] == 400
    harder = _physical_jets(400, 2, shift=0.7)  # harder constituents: pT and mass move
    diff = boosted_tree_test(*a, *harder, seed=0)
    assert diff["auc_mean"] > 0.9 and next(iter(diff["separating"])) in ("pt", "mass")
    with pytest.raises(OmnijetError, match="at least 10 jets"):
        boosted_tree_test(a[0][:4], a[1][:4], *b)


def test_copy_fraction_counts_whole_sequences_up_to_the_stop():
    from omnijet_lib.studies.generation import copy_fraction

    training = np.array([[0, 3, 4, 9, 9, 9], [0, 5, 9, 9, 9, 9]])  # padded after stop
    generated = np.array([[0, 3, 4, 9, 0, 0], [0, 3, 9, 0, 0, 0], [0, 5, 9, 0, 0, 0], [0, 3, 4, 5, 9, 0]])
    assert copy_fraction(generated, training, stop_token=9) == 0.5
    assert copy_fraction(generated[:0], training, stop_token=9) == 0.0
