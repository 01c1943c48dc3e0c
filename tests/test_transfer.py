"""Transfer learning (issue #8): the GPT classification head, loading a pre-trained backbone,
and the three training strategies (from scratch, frozen backbone, fine-tune everything)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnijet_lib.io import OmnijetError
from omnijet_lib.models.classifier import GPTClassifier
from omnijet_lib.models.gpt import GPT, GPTConfig
from omnijet_lib.io import save_model
from omnijet_lib.training.store import ModelStore
from omnijet_lib.studies.transfer import available_sizes, run_transfer_study, summarize, training_subset, transfer_split
from omnijet_lib.training.transfer import STRATEGIES, make_transfer_model, paper_patience, train_transfer

K = 8                    # toy codebook: vocabulary K + 2 = 10, start 0, stop 9
TINY = GPTConfig(vocab_size=K + 2, n_embd=16, n_head=2, n_layer=1, ffn=32)


def toy_sequences(n=120, seed=0, max_len=12):
    """Sequences whose codes come from 1..4 (class 1) or 5..8 (class 0); padded with junk."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    lengths = rng.integers(3, max_len - 1, n)                  # constituents per jet
    seq = rng.integers(0, K + 2, (n, max_len))                   # padding: arbitrary ids
    mask = np.zeros((n, max_len), bool)
    for i, (c, L) in enumerate(zip(y, lengths)):
        codes = rng.integers(1, 5, L) if c else rng.integers(5, 9, L)
        seq[i, 0], seq[i, 1:L + 1], seq[i, L + 1] = 0, codes, K + 1
        mask[i, :L + 2] = True
    return seq, mask, y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def backbone(tmp_path):
    """A (randomly initialised) GPT saved like train_gpt saves it."""
    torch.manual_seed(0)
    gpt = GPT(TINY)
    path = tmp_path / "gpt_combined" / "gpt.safetensors"
    save_model(path, gpt)
    return path, gpt


def _backbone_state(model: GPTClassifier):
    return {k: v.detach().clone() for k, v in model.gpt.state_dict().items()}


def _head_state(model: GPTClassifier):
    return [p.detach().clone() for p in model.head_parameters()]


def test_head_ignores_padding():
    torch.manual_seed(0)
    model = GPTClassifier(TINY).eval()
    assert torch.count_nonzero(model(*map(torch.as_tensor, toy_sequences(4)[:2]))) == 0  # starts at p = 1/2
    torch.nn.init.normal_(model.out.weight)                       # the zero-initialised last layer
    seq, mask, _ = toy_sequences(8)
    s, m = torch.as_tensor(seq), torch.as_tensor(mask)
    ref = model(s, m)
    assert ref.shape == (8, 2)
    junk = s.clone()
    junk[~m] = 7                                                  # other padding ids
    wider = torch.cat([junk, torch.full((8, 5), 3)], 1)           # and more padded columns
    wmask = torch.cat([m, torch.zeros(8, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(wider, wmask), ref)
    # but a real token does change the logits
    s2 = s.clone()
    s2[0, 1] = 1 if s2[0, 1] != 1 else 2
    assert not torch.allclose(model(s2, m)[0], ref[0])


def test_from_pretrained_copies_backbone_exactly(backbone):
    path, gpt = backbone
    model = GPTClassifier.from_pretrained(path, tokenizer_vocab=K + 2)
    own = model.gpt.state_dict()
    ref = {k: v for k, v in gpt.state_dict().items() if not k.startswith("head.")}
    assert set(own) == set(ref) and len(own) > 0
    for k in ref:
        assert torch.equal(own[k], ref[k]), k
    assert model.gpt.head is None                                  # next-token head dropped


def test_from_pretrained_refuses_mismatches(backbone, tmp_path):
    path, _ = backbone
    with pytest.raises(OmnijetError, match=r"vocabulary is 10 \(8 codes.*tokenizer gives 514 \(512 codes\)"):
        GPTClassifier.from_pretrained(path, tokenizer_vocab=514)
    with pytest.raises(OmnijetError, match=r"n_embd 16 \(checkpoint\) vs 256 \(expected\)"):
        GPTClassifier.from_pretrained(path, backbone_config=GPTConfig(vocab_size=K + 2, n_head=2, n_layer=1, ffn=32))
    # a checkpoint of another model, and tensors that do not fit the recorded config
    other = tmp_path / "not_gpt.safetensors"
    save_model(other, GPTClassifier(TINY).token_mlp)
    with pytest.raises(OmnijetError, match="expected a GPT backbone"):
        GPTClassifier.from_pretrained(other)
    bad = tmp_path / "bad" / "gpt.safetensors"
    wrong = GPT(TINY)
    wrong.config = GPTConfig(vocab_size=K + 2, n_embd=16, n_head=2, n_layer=1, ffn=64)  # lies about ffn
    save_model(bad, wrong)
    with pytest.raises(OmnijetError, match="shapes differ"):
        GPTClassifier.from_pretrained(bad)


def _train(strategy, path, seed=3, epochs=3):
    seq, mask, y = toy_sequences(64)
    val = toy_sequences(32, seed=1)
    return train_transfer(strategy, seq, mask, y, val, path, tokenizer_vocab=K + 2, max_epochs=epochs,
                          batch_size=16, lr=1e-2, seed=seed)


def test_frozen_backbone_stays_fixed_head_learns(backbone):
    path, _ = backbone
    init, params = make_transfer_model("frozen", path, K + 2, seed=3)
    assert {id(p) for p in params} == {id(p) for p in init.head_parameters()}
    trained = _train("frozen", path)
    for k, v in _backbone_state(init).items():
        assert torch.equal(trained.gpt.state_dict()[k], v), k
    assert any(not torch.equal(a, b) for a, b in zip(_head_state(init), _head_state(trained)))


def test_finetune_changes_backbone_and_head(backbone):
    path, _ = backbone
    init, _ = make_transfer_model("finetune", path, K + 2, seed=3)
    trained = _train("finetune", path)
    changed = [k for k, v in _backbone_state(init).items() if not torch.equal(trained.gpt.state_dict()[k], v)]
    assert "embed.weight" in changed and any(k.startswith("blocks.") for k in changed)
    assert any(not torch.equal(a, b) for a, b in zip(_head_state(init), _head_state(trained)))


def test_from_scratch_is_random_and_matches_architecture(backbone):
    path, gpt = backbone
    model, params = make_transfer_model("from_scratch", path, K + 2, seed=5)
    assert model.backbone_config == TINY and len(params) == len(list(model.parameters()))
    assert not torch.equal(model.gpt.embed.weight, gpt.embed.weight)
    with pytest.raises(OmnijetError, match="strategy 'bogus'"):
        make_transfer_model("bogus", path)


def test_study_end_to_end_and_resume(backbone, tmp_path):
    path, _ = backbone
    seq, mask, y = toy_sequences(160)
    split = transfer_split(y, n_test=40, n_val=20, seed=0)
    kw = dict(sizes=[20, 40], seeds=[0], backbone_path=path, tokenizer_vocab=K + 2,
              store=ModelStore(tmp_path / "runs", progress=lambda m: None), max_epochs=4, batch_size=16, lr=1e-2,
              progress=None)
    results = run_transfer_study(seq, mask, y, split, **kw)
    assert len(results) == 2 * len(STRATEGIES)
    for r in results:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["auc"] <= 1
        assert 1 <= r["best_epoch"] <= r["epochs"] <= 4 and r["patience"] == 20
    # the toy task is easy: the best strategy separates the classes
    assert max(r["auc"] for r in results) > 0.9
    runs = sorted((tmp_path / "runs").glob("*/*/"))                # <name>/<settings hash>/
    assert [str(d) for d in runs] == sorted(r["run"] for r in results)
    assert all((d / "result.json").is_file() and d.name == r["settings_hash"] for d, r in
               zip(runs, sorted(results, key=lambda r: r["run"])))
    assert not list((tmp_path / "runs").rglob("*.ckpt"))           # checkpoints removed
    assert json.loads((runs[0] / "run.json").read_text())["settings"]["backbone"]
    again = run_transfer_study(seq, mask, y, split, **kw)          # all cached: identical
    assert again == results
    # a cap per training size: the same runs for {20: 4, 40: 4}; another cap is another run
    assert run_transfer_study(seq, mask, y, split, **{**kw, "max_epochs": {20: 4, 40: 4}}) == results
    capped = run_transfer_study(seq, mask, y, split, **{**kw, "max_epochs": {20: 4, 40: 1}, "strategies": ["frozen"]})
    assert [r["epochs"] for r in capped if r["size"] == 40] == [1]
    with pytest.raises(OmnijetError, match=r"max_epochs: no cap for training size\(s\) \[40\]"):
        run_transfer_study(seq, mask, y, split, **{**kw, "max_epochs": {20: 4}})
    table = summarize(results)
    assert set(table) == set(STRATEGIES) and set(table["frozen"]) == {20, 40}
    assert table["finetune"][20]["n_seeds"] == 1 and table["finetune"][20]["accuracy_std"] == 0


def test_study_reuses_a_run_only_with_equal_settings(backbone, tmp_path, monkeypatch):
    """One rule (the model store's): a rerun with the same settings trains nothing; another lr or
    max_epochs trains new runs into new folders, the old ones stay; strict refuses naming the change."""
    from omnijet_lib.studies import transfer as study
    from reliability.conftest import one_line_error, snapshot

    trained = []
    real = study.train_transfer
    monkeypatch.setattr(study, "train_transfer", lambda *a, **k: trained.append(a[0]) or real(*a, **k))
    path, _ = backbone
    seq, mask, y = toy_sequences(100)
    split = transfer_split(y, n_test=20, n_val=20, seed=0)
    root = tmp_path / "models"
    kw = dict(sizes=[20], seeds=[0, 1], backbone_path=path, tokenizer_vocab=K + 2, strategies=["frozen", "finetune"],
              max_epochs=2, batch_size=16, lr=1e-2, progress=None)

    def study_in(store, **change):
        lines = []
        return run_transfer_study(seq, mask, y, split, store=store, **{**kw, "progress": lines.append, **change}), lines

    results, _ = study_in(ModelStore(root, progress=lambda m: None))
    first = {r["run"] for r in results}
    assert len(trained) == 4 and first == {str(d) for d in root.glob("transfer_n20_*_seed*/*/")}
    before = snapshot(root)
    again, lines = study_in(ModelStore(root, progress=lambda m: None))
    assert again == results and len(trained) == 4 and snapshot(root) == before
    assert len(lines) == 4 and all(line.endswith("(cached)") for line in lines)

    strict = ModelStore(root, reuse="strict", progress=lambda m: None)
    assert study_in(strict)[0] == results                          # a match is reused
    seed0 = next(r["run"] for r in results if r["seed"] == 0 and r["strategy"] == "frozen")
    with one_line_error(f"{root / 'transfer_n20_frozen_seed0'}: reuse: strict, and no run was trained with these "
                        f"settings: settings.lr is 0.01 in {seed0}, 0.02 requested", unchanged=root):
        study_in(strict, lr=2e-2)
    assert len(trained) == 4

    for change in ({"lr": 2e-2}, {"max_epochs": 1}):
        new, lines = study_in(ModelStore(root, progress=lambda m: None), **change)
        assert not {r["run"] for r in new} & first and not any(line.endswith("(cached)") for line in lines)
        assert {k: v for k, v in snapshot(root).items() if k in before} == before   # old runs untouched
    assert len(trained) == 12 and len(list(root.glob("*/*/"))) == 12
    assert all(r["epochs"] == 1 for r in new)

    alone = run_transfer_study(seq, mask, y, split, **kw)          # no store: nothing kept, same rule
    assert [r["run"] for r in alone] == [None] * 4 and len(trained) == 16
    assert [r["settings_hash"] for r in alone] == [r["settings_hash"] for r in results]


def test_splits_are_balanced_disjoint_and_nested():
    y = np.r_[np.zeros(70, int), np.ones(50, int)]
    split = transfer_split(y, n_test=40, n_val=20, seed=1)
    t, v, p = split["test"], split["val"], split["pool"]
    assert len(set(t) | set(v) | set(p)) == len(t) + len(v) + len(p) == 120
    assert y[t].sum() == 20 and y[v].sum() == 10
    small, large = training_subset(y, p, 10, seed=0), training_subset(y, p, 30, seed=0)
    assert y[small].sum() == 5 and set(small) <= set(large) and set(large) <= set(p)
    assert not np.array_equal(training_subset(y, p, 10, seed=1), small)
    with pytest.raises(OmnijetError, match="needs 21 jets of class 1, the pool has 20"):
        training_subset(y, p, 42, seed=0)
    assert available_sizes(y, p, [10, 40, 42, 100]) == ([10, 40], [42, 100])
    with pytest.raises(OmnijetError, match="even"):
        training_subset(y, p, 11, seed=0)
    with pytest.raises(OmnijetError, match="test set: needs 60 jets of class 1"):
        transfer_split(y, n_test=120, n_val=2)


def test_paper_patience():
    assert [paper_patience(n) for n in (100, 10_000, 100_000, 1_000_000, 2_000_000)] == [20, 20, 10, 10, 5]


def test_continuous_baselines_train_on_the_same_jets_beside_the_strategies(backbone, tmp_path):
    path, _ = backbone
    seq, mask, y = toy_sequences(160)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(160, 12, 3)).astype(np.float32)
    x[..., 0] += 2.0 * y[:, None]                                    # the constituents tell the classes apart
    x_mask = np.arange(12)[None, :] < 8
    split = transfer_split(y, n_test=40, n_val=20, seed=0)
    store = ModelStore(tmp_path / "runs", progress=lambda m: None)
    kw = dict(sizes=[40], seeds=[0], backbone_path=path, tokenizer_vocab=K + 2, store=store, max_epochs=3,
              batch_size=16, strategies=["frozen"], features=(x, np.broadcast_to(x_mask, (160, 12)).copy()),
              baselines={"deepsets": {"phi": [16, 16], "f": [16]}}, progress=None)
    results = run_transfer_study(seq, mask, y, split, **kw)
    by = {r["strategy"]: r for r in results}
    assert sorted(by) == ["deepsets", "frozen"] and by["deepsets"]["auc"] > 0.9 and by["deepsets"]["lr"] == 1e-3
    record = json.loads((Path(by["deepsets"]["run"]) / "run.json").read_text())
    assert record["name"] == "transfer_n40_deepsets_seed0" and "backbone" not in record["settings"]
    assert record["settings"]["model_kw"] == {"phi": [16, 16], "f": [16]}
    assert run_transfer_study(seq, mask, y, split, **kw) == results   # reused
    with pytest.raises(OmnijetError, match="continuous features"):
        run_transfer_study(seq, mask, y, split, **{**kw, "features": None})


def test_strategies_per_size_runs_only_the_named_curves_at_that_size(backbone, tmp_path):
    """At a size it names, only those strategies and baselines run; the runs are the ones of the
    full study (reused, not retrained), and a name the study does not run is an error."""
    path, _ = backbone
    seq, mask, y = toy_sequences(160)
    x = np.random.default_rng(1).normal(size=(160, 12, 3)).astype(np.float32)
    split = transfer_split(y, n_test=40, n_val=20, seed=0)
    kw = dict(sizes=[20, 40], seeds=[0], backbone_path=path, tokenizer_vocab=K + 2,
              store=ModelStore(tmp_path / "runs", progress=lambda m: None), max_epochs=2, batch_size=16,
              strategies=["frozen", "finetune"], features=(x, np.ones((160, 12), bool)),
              baselines={"deepsets": {"phi": [8], "f": [8]}}, progress=None)
    full = run_transfer_study(seq, mask, y, split, **kw)
    lines = []
    some = run_transfer_study(seq, mask, y, split, **{**kw, "strategies_per_size": {40: ["deepsets", "finetune"]},
                                                        "progress": lines.append})
    assert sorted((r["size"], r["strategy"]) for r in some) == [
        (20, "deepsets"), (20, "finetune"), (20, "frozen"), (40, "deepsets"), (40, "finetune")]
    assert some == [r for r in full if (r["size"], r["strategy"]) != (40, "frozen")]
    assert all(line.endswith("(cached)") for line in lines)
    with pytest.raises(OmnijetError, match=r"strategies_per_size: 'from_scratch' at size 40 is not run by this study"):
        run_transfer_study(seq, mask, y, split, **{**kw, "strategies_per_size": {40: ["from_scratch"]}})


def test_dry_run_costs_each_curve_only_at_the_sizes_it_runs():
    from omnijet_lib.figures import _cost_runs

    p = {"checkpoint_dir": "published", "train_sizes": [100, 1000], "n_seeds": 2, "max_epochs": {100: 4, 1000: 2},
         "baselines": {"deepsets": {}}}

    def jets(**change):
        return {label.split(" x")[0].split(",")[0]: n for label, _, n, *_ in _cost_runs("03_transfer_learning",
                                                                                      {**p, **change}, 1000)}
    assert jets() == {"fine-tuning": 3 * 2 * 2400, "deepsets on constituents": 2 * 2400}
    assert jets(strategies_per_size={1000: ["finetune"]}) == {"fine-tuning": 2 * (3 * 400 + 2000),
                                                               "deepsets on constituents": 2 * 400}
