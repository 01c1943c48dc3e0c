"""The transfer-learning study of notebook 03 (paper figure 7): balanced splits, the grid of
training sizes x strategies x seeds over :func:`omnijet_lib.training.transfer.train_transfer`,
summaries, and the backbone it starts from.

:func:`run_transfer_study` keeps each run in the model store (:mod:`omnijet_lib.training.store`):
a rerun with the same settings reuses its ``result.json``, an interrupted study resumes where it
stopped (and an unfinished run from its ``last.ckpt``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..io import OmnijetError, file_sha256, write_json
from ..models.classifier import backbone_config_of
from ..training.gpt import check_sequences
from ..training.store import ModelRequest, ModelStore, data_identity
from ..training.transfer import STRATEGIES, evaluate, paper_patience, train_transfer

__all__ = ["binary_features", "transfer_split", "training_subset", "available_sizes", "run_transfer_study",
           "summarize", "ensure_backbone"]

#: Enters every run's settings: bump it when a change to the model or the training makes the
#: ``result.json`` files of earlier runs invalid.
STUDY_VERSION = 2


def binary_features(jets, signal="Tbqq", background="QCD"):
    """Padded features of the jets of two classes: ``(x (N,128,3), mask (N,128), y (N,), index)``
    with ``y = 1`` for ``signal``; ``index`` points into ``jets``."""
    from ..data import class_index, constituent_features, to_padded

    s, b = class_index(signal), class_index(background)
    if s == b:
        raise OmnijetError(f"signal and background are the same class ({signal!r})")
    labels = np.asarray(jets.label)
    index = np.flatnonzero((labels == s) | (labels == b))
    for c, name in ((s, signal), (b, background)):
        if not (labels == c).any():
            raise OmnijetError(f"no {name!r} jets in the data (classes present: {sorted(set(labels.tolist()))})")
    x, mask = to_padded(constituent_features(jets[index]))
    return x, mask, (labels[index] == s).astype(np.int64), index


def _take_balanced(idx: np.ndarray, y: np.ndarray, n: int, rng, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` indices out of ``idx`` with n/2 per class (random); returns (taken, rest)."""
    if n % 2:
        raise OmnijetError(f"{what}: {n} jets cannot be split evenly between the two classes (use an even number)")
    taken = []
    for c in (0, 1):
        cand = idx[y[idx] == c]
        if len(cand) < n // 2:
            raise OmnijetError(f"{what}: needs {n // 2} jets of class {c}, only {len(cand)} available "
                               f"(more data, or smaller sizes)")
        taken.append(rng.choice(cand, n // 2, replace=False))
    taken = np.sort(np.concatenate(taken))
    return taken, np.setdiff1d(idx, taken)


def transfer_split(y, n_test: int, n_val: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed balanced ``test`` and ``val`` sets and the ``pool`` of the remaining jets, from which
    every training set is drawn (:func:`training_subset`)."""
    y = np.asarray(y)
    if n_test < 2 or n_val < 2:
        raise OmnijetError(f"test and validation sets need at least 2 jets each, got {n_test} and {n_val}")
    rng = np.random.default_rng([seed, 8])
    test, rest = _take_balanced(np.arange(len(y)), y, n_test, rng, "test set")
    val, pool = _take_balanced(rest, y, n_val, rng, "validation set")
    return {"test": test, "val": val, "pool": pool}


def training_subset(y, pool, n: int, seed: int) -> np.ndarray:
    """A balanced training set of ``n`` jets from ``pool``; nested in ``n`` for a fixed seed
    (the first n/2 of a per-class permutation), so larger sets contain the smaller ones."""
    y, pool = np.asarray(y), np.asarray(pool)
    if n % 2:
        raise OmnijetError(f"training size {n}: must be even (balanced classes)")
    rng = np.random.default_rng([seed, 80])
    out = []
    for c in (0, 1):
        cand = rng.permutation(pool[y[pool] == c])
        if len(cand) < n // 2:
            raise OmnijetError(f"training size {n}: needs {n // 2} jets of class {c}, the pool has {len(cand)}")
        out.append(cand[: n // 2])
    return np.sort(np.concatenate(out))


def available_sizes(y, pool, sizes) -> tuple[list[int], list[int]]:
    """``(sizes that fit, sizes that do not)``: a balanced training set of n jets needs n/2 jets
    of each class in the ``pool``."""
    y, pool = np.asarray(y), np.asarray(pool)
    room = 2 * min(int((y[pool] == 0).sum()), int((y[pool] == 1).sum()))
    return [int(n) for n in sizes if n <= room], [int(n) for n in sizes if n > room]


# ---------------------------------------------------------------------------- one run
def run_transfer_study(seq, mask, y, split: dict, sizes, seeds, backbone_path, tokenizer_vocab: int | None = None,
                       store: ModelStore | None = None, strategies=STRATEGIES, max_epochs: int | dict = 100,
                       patience: int | None = None, lr: float = 1e-4, lr_scratch: float | None = None,
                       weight_decay: float = 1e-2, batch_size: int = 64, trainer: dict | None = None,
                       keep_checkpoints: bool = False, features=None, baselines: dict | None = None,
                       lr_baseline: float = 1e-3, strategies_per_size: dict | None = None,
                       progress=print) -> list[dict]:
    """Train every (size, strategy, seed) on a balanced training set drawn from ``split["pool"]``
    (the same set for the three strategies of a seed), early-stop on ``split["val"]`` and
    evaluate on ``split["test"]``.

    Returns one dict per run: size, strategy, seed, test ``accuracy``, ``auc`` and
    ``test_loss``, the best ``val_loss``, ``epochs`` trained, ``best_epoch``, ``train_seconds``,
    and the ``run`` folder and ``settings_hash`` of the model. Each run is the model
    ``transfer_n{size}_{strategy}_seed{seed}`` of ``store``: a run with the same settings on the
    same training, validation and test jets is reused (its ``result.json``), any other is trained
    into its own run folder, where checkpoints are deleted unless ``keep_checkpoints``. Without a
    ``store`` nothing is kept (``run`` is None). ``lr_scratch`` (default ``lr``) is the
    from-scratch learning rate. ``max_epochs`` caps every run, or is ``{size: cap}`` (e.g. fewer
    epochs for larger sets on a CPU).

    ``baselines`` (``{"deepsets": {config overrides}, "transformer": {...}}``) adds the taggers a
    physicist would train anyway: the classifiers of notebook 01 on the continuous constituents
    ``features = (x (N, L, 3), mask)`` of the same jets, from scratch, on the same training,
    validation and test jets with the same early stopping, at learning rate ``lr_baseline``; their
    runs are ``transfer_n{size}_{arch}_seed{seed}`` (strategy = the arch).

    ``strategies_per_size`` (``{size: [strategies and baseline archs]}``) runs only these at that
    size, everything at the sizes it does not name: e.g. only the cheap curves at the largest size.
    It selects runs without changing them (a run is the same with or without it).
    """
    backbone_path = Path(backbone_path)
    bcfg = backbone_config_of(backbone_path)
    tokenizer_vocab = tokenizer_vocab or bcfg.vocab_size
    seq, mask = check_sequences(seq, mask, tokenizer_vocab, bcfg.max_len)
    y = np.asarray(y).astype(np.int64)
    if len(y) != len(seq):
        raise OmnijetError(f"labels: {len(y)} entries for {len(seq)} sequences")
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise OmnijetError("no training sizes to run (none given, or none fits the training pool)")
    caps = {int(k): v for k, v in max_epochs.items()} if isinstance(max_epochs, dict) else dict.fromkeys(sizes, max_epochs)
    if set(sizes) - set(caps):
        raise OmnijetError(f"max_epochs: no cap for training size(s) {sorted(set(sizes) - set(caps))} (given for {sorted(caps)})")
    if not all(isinstance(c, int) and c >= 1 for c in caps.values()):
        raise OmnijetError(f"max_epochs: caps must be positive integers, got {max_epochs}")
    for s in strategies:
        if s not in STRATEGIES:
            raise OmnijetError(f"strategy {s!r} is unknown, expected one of {', '.join(STRATEGIES)}")
    baselines = dict(baselines or {})
    if baselines and (features is None or len(features[0]) != len(y)):
        raise OmnijetError("baselines: the continuous features (x, mask) of the same jets are needed (features=)")
    only = {int(n): set(names) for n, names in (strategies_per_size or {}).items()}
    for n, names in only.items():
        unknown = sorted(names - {*strategies, *baselines})
        if unknown:
            raise OmnijetError(f"strategies_per_size: {unknown[0]!r} at size {n} is not run by this study "
                               f"(it runs: {', '.join([*strategies, *baselines])})")
    va, te = split["val"], split["test"]
    common = {"version": STUDY_VERSION, "weight_decay": weight_decay, "batch_size": batch_size,
              "trainer": {k: v for k, v in (trainer or {}).items() if k != "progress_bar"}}
    tokens = {**common, "backbone": file_sha256(backbone_path), "vocab": tokenizer_vocab}
    results = []
    with tempfile.TemporaryDirectory(prefix="omnijet_transfer_") as tmp:
        runs = store if store is not None else ModelStore(tmp, progress=lambda m: None)  # None: nothing kept
        for size in sizes:
            for seed in map(int, seeds):
                tr = training_subset(y, split["pool"], size, seed)
                pat = paper_patience(size) if patience is None else patience
                inputs = {s: (seq, mask) for s in strategies} | {a: features for a in baselines}
                inputs = {s: v for s, v in inputs.items() if s in only.get(size, inputs)}
                for strategy, (xs, ms) in inputs.items():
                    baseline = strategy in baselines
                    rate = lr_baseline if baseline else lr_scratch if (strategy == "from_scratch" and lr_scratch) else lr
                    settings = {**({**common, "model_kw": baselines[strategy]} if baseline else tokens),
                                "strategy": strategy, "size": size, "seed": seed, "lr": rate,
                                "max_epochs": caps[size], "patience": pat}
                    data = data_identity({"train": len(tr), "val": len(va), "test": len(te)},
                                         *(a[i] for i in (tr, va, te) for a in (xs, ms, y)))

                    def train(run_dir: Path) -> dict:
                        t0 = time.perf_counter()
                        val = (xs[va], ms[va], y[va])
                        if baseline:
                            model = train_baseline(strategy, baselines[strategy], xs[tr], ms[tr], y[tr], val, run_dir,
                                                   caps[size], pat, rate, weight_decay, batch_size, trainer, seed)
                        else:
                            model = train_transfer(strategy, xs[tr], ms[tr], y[tr], val, backbone_path, tokenizer_vocab,
                                                   out_dir=run_dir, max_epochs=caps[size], patience=pat, lr=rate,
                                                   weight_decay=weight_decay, batch_size=batch_size, trainer=trainer,
                                                   seed=seed)
                        train_s = time.perf_counter() - t0
                        test = evaluate(model, xs[te], ms[te], y[te])
                        res = {"size": size, "strategy": strategy, "seed": seed, "accuracy": test["accuracy"],
                               "auc": test["auc"], "test_loss": test["loss"], **_run_info(run_dir),
                               "train_seconds": round(train_s, 2), "lr": rate, "patience": pat}
                        write_json(run_dir / "result.json", res)
                        if not keep_checkpoints:
                            for ckpt in run_dir.glob("*.ckpt"):
                                ckpt.unlink()
                        return res

                    request = ModelRequest(f"transfer_n{size}_{strategy}_seed{seed}", settings, data)
                    res, run = runs.get(request, train=train,
                                        load=lambda run_dir: json.loads((run_dir / "result.json").read_text()))
                    results.append({**res, "run": str(run.path) if store is not None else None,
                                    "settings_hash": run.settings_hash})
                    if progress:
                        how = (f"{res['epochs']} epochs, best {res['best_epoch']}, {res['train_seconds']:.0f} s"
                               if run.trained else "cached")
                        progress(f"n={size:>7} {strategy:12s} seed {seed}: acc {res['accuracy']:.3f} "
                                 f"auc {res['auc']:.3f} ({how})")
    return results


def train_baseline(arch: str, model_kw: dict, x, mask, y, val, out_dir, max_epochs: int, patience: int, lr: float,
                   weight_decay: float, batch_size: int, trainer: dict | None, seed: int):
    """A continuous-feature tagger from scratch (notebook 01's DeepSets or Transformer, binary),
    early-stopped like the transfer runs; the best-epoch model."""
    from ..training.classifier import train_classifier
    from ..training.fit import TrainConfig
    from ..training.transfer import _quiet_lightning
    from .tokens import _classifier_model

    model_cls, config = _classifier_model(arch, model_kw, n_classes=2)
    torch.manual_seed(seed)
    cfg = TrainConfig.from_params(trainer, max_epochs=max_epochs, seed=seed, patience=patience, progress_bar=False)
    with _quiet_lightning():
        model = train_classifier(model_cls(config), x, mask, y, val=val, out_dir=out_dir, epochs=None,
                                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, train_config=cfg, seed=seed)
    return model.cpu().eval()


def _run_info(run_dir: Path) -> dict:
    """Epochs trained, the best (restored) epoch and its validation loss, from the checkpoints
    (memory-mapped: only the few numbers needed are read)."""
    last = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    best = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=True, mmap=True)
    scores = [v["best_model_score"] for k, v in last.get("callbacks", {}).items()
              if k.startswith("ModelCheckpoint") and isinstance(v, dict) and v.get("monitor") == "val_loss"]
    # Lightning stores the index of the epoch being saved: completed epochs = index + 1
    return {"epochs": int(last["epoch"]) + 1, "best_epoch": int(best["epoch"]) + 1,
            "val_loss": float(scores[0]) if scores and scores[0] is not None else float("nan")}


def summarize(results: list[dict], metrics=("accuracy", "auc")) -> dict:
    """``{strategy: {size: {metric_mean, metric_std, n_seeds}}}`` (std over seeds, ddof 0)."""
    out: dict = {}
    for r in results:
        out.setdefault(r["strategy"], {}).setdefault(r["size"], []).append(r)
    table = {}
    for strategy, by_size in out.items():
        table[strategy] = {}
        for size in sorted(by_size):
            runs = by_size[size]
            row = {"n_seeds": len(runs)}
            for m in metrics:
                v = np.array([r[m] for r in runs], dtype=float)
                row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std())
            table[strategy][size] = row
    return table
