"""Fine-tune a pre-trained backbone on your labelled JetClass-schema files and score jets with the
result: what ``omnijet finetune`` and ``omnijet classify`` run.

    backbone = open_backbone("data/models/quick/gpt_combined")
    result, run = finetune_files(backbone, ModelStore("data/models/mine"), "train/*.root",
                                 classes=["QCD", "Tbqq"], n_train=300)
    scores = classify_files(run.path, "analysis/*.root")  # one row per jet: file, entry, p(class)

Every class named is a label of its own (index in ``classes``): two classes make the paper's
binary tagger (label 1 the signal), more a multi-class one. Without validation or test files,
the training jets are split per class, 60% training pool, 20% validation (early stopping and
the best epoch), 20% test. The classifier is a run of the model store
(``classifier_{strategy}_{classes}``): the same settings on the same jets reuse it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..data import class_index, constituent_features, read_jetclass, to_padded
from ..data.jetclass import CLASS_LABELS, iter_jetclass
from ..data.paths import input_files
from ..io import OmnijetError, atomic_path, save_model, write_json
from ..models.classifier import load_classifier
from ..tokenizers.base import load_tokenizer, save_tokenizer, tokenize
from ..tokenizers.streaming import input_fingerprint
from ..training.classifier import predict_proba, split_indices
from ..training.gpt import GPT_FILE, Backbone
from ..training.store import ModelRequest, ModelStore, Run, data_identity, find_run
from ..training.transfer import STRATEGIES, evaluate, paper_patience, train_transfer
from ..training.vqvae import TOKENIZER_FILE

__all__ = ["CLASSIFIER_FILE", "jet_sequences", "finetune_files", "finetune_sequences", "score_rows", "classify_files", "scores_path",
           "write_scores"]

CLASSIFIER_FILE = "classifier.safetensors"  # the weights in a classifier's run folder
RESULT_FILE = "result.json"  # its validation and test metrics


def jet_sequences(tok, jets) -> tuple[np.ndarray, np.ndarray]:
    """The token sequences ``(seq (N, T), mask (N, T))`` the backbone reads, of a jet array."""
    x, mask = to_padded(constituent_features(jets))
    return tok.to_sequence(tokenize(tok, x, mask), mask)


def _labelled(files, classes: list[int], option: str):
    """Jets of ``classes`` in ``files`` with labels 0.. (their index in ``classes``)."""
    jets = read_jetclass(files, classes=classes)
    labels = np.asarray(jets.label)
    for c in classes:
        if not (labels == c).any():
            present = sorted(CLASS_LABELS[i] for i in set(labels.tolist()))
            raise OmnijetError(f"{option} {files}: no {CLASS_LABELS[c]} jets (of the classes asked for it has "
                               f"{', '.join(present) or 'none'})")
    label_of = np.full(len(CLASS_LABELS), -1, np.int64)
    label_of[classes] = np.arange(len(classes))
    return jets, label_of[labels]


def _files_source(files) -> list[dict]:
    return [{"path": str(p), **input_fingerprint(p)} for p in input_files(files)]


def _per_class_split(y, fractions, seed: int) -> list[np.ndarray]:
    """Disjoint index sets with ``fractions`` of every class (a test set holds each class)."""
    parts = [split_indices(int((y == c).sum()), fractions, seed=seed + c) for c in range(int(y.max()) + 1)]
    where = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
    return [np.sort(np.concatenate([w[p[i]] for w, p in zip(where, parts)])) for i in range(len(fractions))]


def _balanced(pool: np.ndarray, y, n: int, n_classes: int, seed: int) -> np.ndarray:
    if n % n_classes:
        raise OmnijetError(f"--n-train {n}: must be a multiple of the {n_classes} classes (the same number of each)")
    rng = np.random.default_rng([seed, 81])
    out = []
    for c in range(n_classes):
        have = pool[y[pool] == c]
        if len(have) < n // n_classes:
            raise OmnijetError(f"--n-train {n}: needs {n // n_classes} training jets of {c}, the training pool "
                               f"has {len(have)} (more files, or a smaller --n-train)")
        out.append(rng.permutation(have)[: n // n_classes])
    return np.sort(np.concatenate(out))


def finetune_files(backbone: Backbone, store: ModelStore, train_files, classes, *, strategy: str = "finetune",
                   n_train: int | None = None, val_files=None, test_files=None, max_epochs: int = 30,
                   patience: int | None = None, batch_size: int = 64, lr: float = 1e-4, seed: int = 0,
                   trainer: dict | None = None, progress=print) -> tuple[dict, Run]:
    """Train a classifier of ``classes`` (names or indices; 2 = binary, label 1 the second) on
    ``backbone`` with ``strategy`` (finetune, frozen, from_scratch) and the labelled jets of
    ``train_files`` (:func:`finetune_sequences`); returns its ``result`` (validation and test
    accuracy, AUC, loss, jet counts) and its run in ``store``."""
    idx = _classes(classes)
    tok = backbone.tokenizer
    jets, y = _labelled(train_files, idx, "--train")
    seq, mask = jet_sequences(tok, jets)
    sets = {"val": None, "test": None}
    fractions = [0.6] + [0.2 for f in (val_files, test_files) if f is None]
    split = _per_class_split(y, fractions, seed) if len(fractions) > 1 else [np.arange(len(y))]
    pool, own = split[0], iter(split[1:])
    for key, files in (("val", val_files), ("test", test_files)):
        if files is None:
            i = next(own)
            sets[key] = (seq[i], mask[i], y[i])
        else:
            j, yy = _labelled(files, idx, f"--{key}")
            sets[key] = (*jet_sequences(tok, j), yy)
    tr = pool if n_train is None else _balanced(pool, y, n_train, len(idx), seed)
    if n_train is None and len(np.unique(y[tr])) < len(idx):
        raise OmnijetError(f"--train {train_files}: too few jets to train on every class")
    source = {"train": _files_source(train_files), "val": _files_source(val_files) if val_files else "20% of train",
              "test": _files_source(test_files) if test_files else "20% of train"}
    _, result, run = finetune_sequences(backbone, store, (seq[tr], mask[tr], y[tr]), sets["val"], sets["test"], idx,
                                        source, strategy=strategy, max_epochs=max_epochs, patience=patience,
                                        batch_size=batch_size, lr=lr, seed=seed, trainer=trainer, progress=progress)
    return result, run


def _classes(classes) -> list[int]:
    idx = [class_index(c) for c in classes]
    if len(set(idx)) != len(idx) or len(idx) < 2:
        raise OmnijetError(f"classes {list(classes)}: need at least two different classes")
    return idx


def finetune_sequences(backbone: Backbone, store: ModelStore, train, val=None, test=None, classes=("QCD", "Tbqq"),
                       source: dict | None = None, *, strategy: str = "finetune", max_epochs: int = 30,
                       patience: int | None = None, batch_size: int = 64, lr: float = 1e-4, seed: int = 0,
                       trainer: dict | None = None, progress=print):
    """``(classifier, result, Run)``: the classifier of ``classes`` fine-tuned from ``backbone`` on
    token sequences ``train = (seq, mask, labels 0..)``, early-stopped on ``val`` (default: a
    per-class 20% of ``train``), evaluated on ``test`` (when given), as a run of ``store``
    (``source`` says where the jets come from; the arrays themselves are part of its identity)."""
    if strategy not in STRATEGIES:
        raise OmnijetError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    idx = _classes(classes)
    names = [CLASS_LABELS[i] for i in idx]
    tok = backbone.tokenizer
    if val is None:
        tr, va = _per_class_split(np.asarray(train[2]), (0.8, 0.2), seed)
        train, val = tuple(a[tr] for a in train), tuple(a[va] for a in train)
    sets = {"val": val, **({"test": test} if test is not None else {})}
    patience = paper_patience(len(train[2])) if patience is None else patience
    settings = {"backbone": backbone.run.name, "backbone_name": backbone.run.parent.name,
                "tokenizer": backbone.tokenizer_run.name, "classes": names, "strategy": strategy,
                "n_train": len(train[2]), "max_epochs": max_epochs, "patience": patience, "batch_size": batch_size,
                "lr": lr, "seed": seed, "trainer": trainer or {}}
    data = data_identity(source or {}, *train, *(a for part in sets.values() for a in part))
    name = f"classifier_{strategy}_{'_'.join(names)}" if len(names) <= 3 else f"classifier_{strategy}_{len(names)}class"
    y = np.asarray(train[2])
    progress(f"{len(y)} training jets ({', '.join(f'{n} {int((y == i).sum())}' for i, n in enumerate(names))}), "
             + ", ".join(f"{len(part[2])} {key}" for key, part in sets.items()) + f"; backbone {backbone.run}")

    def fit(run_dir: Path) -> dict:
        t0 = time.perf_counter()
        model = train_transfer(strategy, *train, val, backbone.run / GPT_FILE, tok.vocab_size, out_dir=run_dir,
                               max_epochs=max_epochs, patience=patience, lr=lr, batch_size=batch_size,
                               trainer=trainer, seed=seed, n_classes=len(idx))
        seconds = time.perf_counter() - t0
        save_model(run_dir / CLASSIFIER_FILE, model, classes=names, tokenizer=str(backbone.tokenizer_run.resolve()))
        save_tokenizer(run_dir / TOKENIZER_FILE, tok)  # the run holds what it needs: classify opens nothing else
        result = {"classes": names, "strategy": strategy, "n_train": len(y), "train_seconds": round(seconds, 1)}
        for key, (s, m, yy) in sets.items():
            result[key] = {"jets": len(yy), **evaluate(model, s, m, yy)}
        write_json(run_dir / RESULT_FILE, result)
        for ckpt in run_dir.glob("*.ckpt"):  # the weights are in CLASSIFIER_FILE
            ckpt.unlink()
        return result

    result, run = store.get(ModelRequest(name, settings, data), train=fit,
                            load=lambda run_dir: json.loads((run_dir / RESULT_FILE).read_text()))
    return load_classifier(run.path / CLASSIFIER_FILE)[0], result, run


def classify_files(model, files, batch_size: int = 1024, device: str = "cpu", progress=print) -> dict:
    """Scores of every jet of ``files`` by the classifier run ``model`` (a run folder of
    :func:`finetune_files`): ``{"source_file", "entry", "label" (the jet's class in the file, 0..9 in
    JetClass order), "p_<class>" per class}``, one row per jet in file order."""
    run = find_run(model, "--model")
    if not (run / CLASSIFIER_FILE).is_file():
        raise OmnijetError(f"--model {run}: holds no {CLASSIFIER_FILE}; is it a classifier run of omnijet finetune?")
    if not (run / TOKENIZER_FILE).is_file():
        raise OmnijetError(f"--model {run}: holds no {TOKENIZER_FILE} (a classifier of an older omnijet: fine-tune "
                           "it again)")
    clf, extra = load_classifier(run / CLASSIFIER_FILE, device=device)
    tok = load_tokenizer(run / TOKENIZER_FILE).to(device).eval()

    def probabilities(seq, mask):
        p = predict_proba(clf, seq, mask, batch_size)
        return {f"p_{c}": p[:, i] for i, c in enumerate(extra.get("classes", range(p.shape[1])))}

    return score_rows(tok, files, probabilities, progress)


def score_rows(tok, files, score, progress=print) -> dict:
    """One row per jet of ``files`` (JetClass schema, read chunk by chunk), in file order:
    ``{"source_file", "entry" (in its file), "label" (its class in the file, 0..9 in JetClass order),
    and the columns of score(seq, mask)}``; ``score`` maps the token sequences of a chunk of jets
    (tokenizer ``tok``) to a dict of per-jet arrays."""
    rows = {"source_file": [], "entry": [], "label": []}
    columns = {}
    for path in input_files(files):
        entry = 0
        for jets in iter_jetclass(path):
            for key, value in score(*jet_sequences(tok, jets)).items():
                columns.setdefault(key, []).append(np.asarray(value))
            rows["source_file"] += [str(path)] * len(jets)
            rows["entry"].append(np.arange(entry, entry + len(jets)))
            rows["label"].append(np.asarray(jets.label))
            entry += len(jets)
        progress(f"{path}: {entry} jets scored")
    if not rows["entry"]:
        raise OmnijetError(f"--in {files}: no jets")
    out = {"source_file": np.array(rows["source_file"]), "entry": np.concatenate(rows["entry"]),
           "label": np.concatenate(rows["label"]).astype(np.int64)}
    return {**out, **{key: np.concatenate(parts) for key, parts in columns.items()}}


def scores_path(out: str | os.PathLike) -> Path:
    """``out`` as a path :func:`write_scores` can write, or a one-line error about ``--out``."""
    out = Path(out)
    if out.suffix not in (".npz", ".parquet"):
        raise OmnijetError(f"--out {out}: write .npz or .parquet")
    if not out.parent.is_dir():
        raise OmnijetError(f"--out {out}: folder {out.parent} does not exist")
    return out


def write_scores(scores: dict, out: str | os.PathLike) -> Path:
    """Write score rows (:func:`score_rows`) atomically: ``.npz`` (numpy) or ``.parquet``."""
    out = scores_path(out)
    with atomic_path(out) as tmp:
        if out.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **scores)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(scores), tmp)
    return out
