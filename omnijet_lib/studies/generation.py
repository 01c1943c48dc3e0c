"""The profile's generative backbones (notebooks 02-04) and evaluating generated jets: decoding,
the classifier test, W1 scores.

:func:`profile_backbone` asks the model store for a backbone from one profile value, ``backbone``
(:data:`BACKBONE_DEFAULTS`), and the tokenizer in use: notebooks 02, 03 and 04 build the same request
for the same model, and a changed setting, seed, tokenizer or jet sample is another model.

The GPT generates token sequences; :func:`decode_generated` turns them into padded constituent
features with the tokenizer's decoder, so they can be compared with the *reconstructed* real jets
(real jets -> tokens -> decoder), as in the paper: the comparison then measures the generative
model alone, not the tokenizer's resolution.

Classifier test (paper, sec. 4.2): a small DeepSets is trained to separate generated from
reconstructed real jets on a 60/20/20 split; the test AUC is 0.5 for a perfect generator.
"""

from __future__ import annotations

import numbers
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import CLASS_LABELS
from ..io import OmnijetError, value_per_key

__all__ = ["decode_generated", "BACKBONE_DEFAULTS", "BACKBONE_CLASSES", "backbone_classes", "BackboneData", "backbone_data",
           "class_backbone_settings", "class_backbone_data",
           "profile_backbone", "classifier_test", "w1_scores", "time_generation", "data_scaling", "generate_to_root",
           "generated_label", "profile_epic_fm",
           "jet_summary_features", "boosted_tree_test", "copy_fraction", "judge_generation"]


def decode_generated(tok, seq, mask=None, max_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Generated sequences ``seq`` (N, S) (start, code+1 ..., stop, padding) -> padded features
    ``(x (N, max_len, 3) float32, mask (N, max_len) bool)`` decoded by the tokenizer.

    Each row is read up to its first stop token (``mask`` is accepted for symmetry with
    :meth:`GPT.generate` and only checked for shape); a jet whose stop came first is empty."""
    from ..tokenizers import reconstruct

    seq = np.asarray(seq)
    if mask is not None and np.shape(mask) != seq.shape:
        raise OmnijetError(f"decode_generated: seq {seq.shape} and mask {np.shape(mask)} differ in shape")
    tokens, tmask = tok.from_sequence(seq)  # (N, W), W = longest jet
    if tokens.shape[1] > max_len:
        raise OmnijetError(f"decode_generated: a jet has {tokens.shape[1]} constituents, more than max_len {max_len}")
    x = np.zeros((len(seq), max_len, 3), np.float32)
    m = np.zeros((len(seq), max_len), bool)
    if tokens.shape[1]:
        x[:, :tokens.shape[1]] = reconstruct(tok, tokens, tmask)
        m[:, :tokens.shape[1]] = tmask
    return x, m


#: profile ``backbone`` dict (overrides of these): the GPT backbones of notebooks 02 (q/g, t→bqq',
#: combined, and the combined one's data-scaling variants), 03 (combined, with its tokenizer) and
#: 04 (t→bqq'); 06 asks for one on all ten classes and single-class ones (:func:`backbone_classes`).
#: ``class_dropout``: the share of jets a class-conditional backbone sees without their class token
#: (its unconditional mode). ``per_model: {name: {epochs, dropout}}`` overrides for one backbone. The data keys
#: ``data_files``, ``per_class`` and ``trainer`` are the notebook's own unless set; ``data_seed``
#: (simulation; default the notebook's seed + 1, jets no notebook measures on) and ``seed`` (the
#: training's split, initialisation and batch order; default the notebook's seed). ``shards``: a
#: folder of token shards (``omnijet tokenize``, with the profile's tokenizer) the backbones stream
#: instead (the full JetClass); the notebooks still compare with the jets of ``data_files``.
BACKBONE_DEFAULTS = {
    "gpt_config": {"n_embd": 64, "n_head": 4, "n_layer": 2, "ffn": 256},  # paper: 256, 8, 3, 1024
    "epochs": 3,
    "batch_size": 64,                                                   # paper: 256
    "per_model": {},
    "class_dropout": 0.1,
}
BACKBONE_DATA_KEYS = ("data_files", "per_class", "data_seed", "seed", "trainer", "shards")
BACKBONE_MODEL_KEYS = ("epochs", "dropout")
#: the backbones and the jet classes each one is pre-trained on
BACKBONE_CLASSES = {"qcd": ("QCD",), "top": ("Tbqq",), "combined": ("QCD", "Tbqq")}


def backbone_classes(name: str) -> tuple[str, ...]:
    """The jet classes backbone ``name`` is pre-trained on: those of :data:`BACKBONE_CLASSES`,
    ``"all"`` the ten JetClass classes, or a class label (``"Hbb"``) that one class alone."""
    if name in BACKBONE_CLASSES:
        return BACKBONE_CLASSES[name]
    if name == "all":
        return tuple(CLASS_LABELS)
    if name in CLASS_LABELS:
        return (name,)
    raise OmnijetError(f"backbone {name!r} is unknown; known: {', '.join(BACKBONE_CLASSES)}, all or a class label "
                       f"({', '.join(CLASS_LABELS)})")


def _store_name(name: str, fraction: float, conditional: bool, tag: str = "") -> str:
    base = f"gpt_{name}" if name in BACKBONE_CLASSES or name == "all" else f"gpt_class_{name}"
    return (base + ("_conditional" if conditional else "") + ("" if fraction == 1 else f"_scaling_{fraction:g}")
            + (f"_{tag}" if tag else ""))


@dataclass
class BackboneData:
    """The profile's backbones (:func:`backbone_data`): the resolved ``backbone`` dict, where their
    jets come from, and the q/g and t→bqq' jets themselves (None when not loaded, for a dry run)."""

    source: dict
    settings: dict
    trainer: dict             # TrainConfig overrides
    seed: int                 # of the training
    x: np.ndarray | None = None       # (N, L, 3)
    mask: np.ndarray | None = None    # (N, L)
    labels: np.ndarray | None = None  # (N,)
    _tokens: tuple = field(default=(None, None), repr=False)

    def selection(self, name: str) -> np.ndarray:
        """(N,) bool: the jets backbone ``name`` is pre-trained on."""
        return np.isin(self.labels, [CLASS_LABELS.index(c) for c in backbone_classes(name)])

    def tokens(self, tok) -> np.ndarray:
        """(N, L) the jets' tokens under ``tok`` (kept for the last tokenizer asked)."""
        from ..tokenizers import tokenize

        if self._tokens[0] is not tok:
            self._tokens = (tok, tokenize(tok, self.x, self.mask))
        return self._tokens[1]

    def gpt_args(self, name: str, vocab_size: int, fraction: float = 1.0, conditional: bool = False,
                 epochs: int | None = None, tag: str = "") -> tuple[str, dict]:
        """``(store name, arguments)`` of backbone ``name`` on ``fraction`` of its jets:
        ``config``, ``epochs``, ``batch_size``, ``train_config`` and ``seed`` of
        :func:`~omnijet_lib.training.gpt.ensure_gpt` (and :func:`~omnijet_lib.training.gpt.gpt_settings`),
        and ``class_dropout`` for a ``conditional`` one (a GPT with the ten classes).
        A fraction trains ``epochs / fraction`` epochs: the same optimiser steps. ``epochs``
        overrides the profile's (e.g. a single-class backbone with the steps of an all-class one).
        ``tag`` names a variant (another GPT size) in the store: ``gpt_qcd_<tag>``."""
        from ..models.gpt import GPTConfig
        from ..training.fit import TrainConfig

        backbone_classes(name)
        if not 0 < fraction <= 1:
            raise OmnijetError(f"backbone {name}: fraction {fraction} is not in (0, 1]")
        own = value_per_key("backbone.per_model", self.settings["per_model"],
                            list(dict.fromkeys([*BACKBONE_CLASSES, "all", *CLASS_LABELS])), {})[name]
        unknown = sorted(set(own) - set(BACKBONE_MODEL_KEYS))
        if unknown:
            raise OmnijetError(f"backbone.per_model.{name}: unknown key {unknown[0]}; known: {', '.join(BACKBONE_MODEL_KEYS)}")
        gpt = {**self.settings["gpt_config"], **({"dropout": own["dropout"]} if "dropout" in own else {}),
               **({"n_classes": len(CLASS_LABELS)} if conditional else {})}
        try:
            config = GPTConfig(vocab_size=vocab_size, **gpt)
        except TypeError as err:
            raise OmnijetError(f"backbone.gpt_config: {err}") from None
        epochs = int(epochs if epochs is not None else own.get("epochs", self.settings["epochs"]))
        return _store_name(name, fraction, conditional, tag), {
            "config": config, "epochs": max(1, round(epochs / fraction)), "batch_size": int(self.settings["batch_size"]),
            "train_config": TrainConfig.from_params(self.trainer, progress_bar=False), "seed": self.seed,
            **({"class_dropout": float(self.settings["class_dropout"])} if conditional else {})}


def backbone_data(backbone: dict | None, data_files=None, per_class: int = 300, seed: int = 1,
                  trainer: dict | None = None, load: bool = True,
                  classes=BACKBONE_CLASSES["combined"]) -> BackboneData:
    """The jets of the profile's backbones, from a notebook's parameters: its ``backbone`` dict
    (:data:`BACKBONE_DEFAULTS`) and, where that does not set them, its own data settings. Without
    ``load`` only the settings (for a dry run). ``classes``: the jet classes loaded (q/g and t→bqq',
    what notebooks 02-04 pre-train on; all ten for notebook 06's class-conditional backbone)."""
    from ..data.features import constituent_features, to_padded
    from ..datasets import load_dataset

    backbone = dict(backbone or {})
    unknown = sorted(set(backbone) - set(BACKBONE_DEFAULTS) - set(BACKBONE_DATA_KEYS))
    if unknown:
        raise OmnijetError(f"backbone: unknown key {unknown[0]}; known: {', '.join([*BACKBONE_DEFAULTS, *BACKBONE_DATA_KEYS])}")
    files, n = backbone.get("data_files", data_files), backbone.get("per_class", per_class)
    data_seed = backbone.get("data_seed", seed + 1)
    source = {"data_files": files} if files is not None else {"per_class": n, "seed": data_seed}
    if tuple(classes) != BACKBONE_CLASSES["combined"]:  # (the jets of notebooks 02-04 keep their identity)
        source["classes"] = list(classes)
    if backbone.get("shards") is not None:
        source = {"shards": backbone["shards"]}
    data = BackboneData(source, {k: backbone.get(k, v) for k, v in BACKBONE_DEFAULTS.items()},
                        dict(backbone.get("trainer", trainer) or {}), int(backbone.get("seed", seed)))
    if load:
        jets = load_dataset(files, per_class=n, seed=data_seed, classes=list(classes))
        data.x, data.mask = to_padded(constituent_features(jets))
        data.labels = np.asarray(jets.label)
    return data


def class_backbone_settings(backbone: dict | None, class_backbone: dict | None) -> dict:
    """The ``backbone`` dict of the class-conditional all-class backbone (notebooks 06 and 07 ask for
    the same one): the profile's ``backbone`` with the ``class_backbone`` overrides, its jets held in
    memory (a class-conditional backbone does not stream from shards)."""
    return {**(backbone or {}), "shards": None, **(class_backbone or {})}


def class_backbone_data(backbone: dict | None, class_backbone: dict | None, data_files=None, per_class: int = 300,
                        seed: int = 1, trainer: dict | None = None, load: bool = True) -> BackboneData:
    """:func:`backbone_data` of the class-conditional all-class backbone: all ten classes, the
    settings of :func:`class_backbone_settings`."""
    return backbone_data(class_backbone_settings(backbone, class_backbone), data_files, per_class, seed, trainer,
                         load=load, classes=CLASS_LABELS)


def profile_backbone(store, name: str, tok, tok_run, data: BackboneData, fraction: float = 1.0,
                     conditional: bool = False, epochs: int | None = None, tag: str = ""):
    """``(GPT, Run)``: the profile's backbone ``name`` (:func:`backbone_classes`) for the tokenizer
    ``tok`` (its store run ``tok_run``) from the model store, pre-trained there on ``data`` when the
    store has none with exactly these settings. ``fraction`` < 1: on that share of its jets (a
    random subset) with the same optimiser steps, for data scaling. ``conditional``: a GPT that
    also learns each jet's class (a class token, :func:`~omnijet_lib.models.gpt.insert_class_token`).
    ``epochs`` overrides the profile's; ``tag`` names a variant (e.g. another GPT size) in the store."""
    from ..training.gpt import ensure_gpt, ensure_gpt_on_shards

    store_name, args = data.gpt_args(name, tok.vocab_size, fraction, conditional, epochs, tag)
    if "shards" in data.source:
        if conditional:
            raise OmnijetError(f"backbone {name}: a class-conditional backbone cannot stream from shards yet; "
                               "give it data_files or per_class")
        classes = [CLASS_LABELS.index(c) for c in backbone_classes(name)]
        return ensure_gpt_on_shards(store, store_name, data.source["shards"], classes=classes, fraction=fraction,
                                    tokenizer=tok_run, **args)
    pick = np.flatnonzero(data.selection(name))
    if fraction < 1:
        rng = np.random.default_rng([data.seed, round(fraction * 1e6)])
        pick = np.sort(rng.choice(pick, max(1, round(fraction * len(pick))), replace=False))
    seq, seq_mask = tok.to_sequence(data.tokens(tok)[pick], data.mask[pick])
    source = {"jets": data.source, "classes": list(backbone_classes(name)), "fraction": fraction,
              "tokenizer": tok_run.settings_hash}
    labels = data.labels[pick] if conditional else None
    return ensure_gpt(store, store_name, seq, seq_mask, source=source, labels=labels, **args)


def profile_epic_fm(store, jets, data_files, per_class: int, seed: int, epic_config: str = "light",
                    epochs: int | None = None, batch_size: int = 256, trainer: dict | None = None,
                    combined: bool = False):
    """``(EPiC-FM, Run)``: notebook 04's continuous baseline from the model store, trained there on
    ``jets`` (those :func:`~omnijet_lib.datasets.load_dataset` gives for ``data_files``,
    ``per_class`` and ``seed``: t→bqq', or q/g and t→bqq' when ``combined``, as the published
    backbone generates both) when the store has none with exactly these settings."""
    from ..data.features import constituent_features, to_padded
    from ..models.epic_fm import EPiCConfig
    from ..training.epic_fm import ensure_epic_fm
    from ..training.fit import TrainConfig

    if epic_config not in ("light", "jetclass"):
        raise OmnijetError(f"epic_config must be 'light' or 'jetclass', got {epic_config!r}")
    classes = ["QCD", "Tbqq"] if combined else ["Tbqq"]
    x, mask = to_padded(constituent_features(jets))
    source = {"data_files": data_files, "per_class": per_class, "seed": seed, "classes": classes}
    return ensure_epic_fm(store, f"epic_fm_{'combined' if combined else 'top'}", source, x, mask,
                          np.asarray(jets.label), np.asarray(jets.jet_pt), np.asarray(jets.jet_eta),
                          config=getattr(EPiCConfig, epic_config)(), epochs=epochs, batch_size=batch_size,
                          train_config=TrainConfig.from_params({"progress_bar": False, **(trainer or {})}), seed=seed)


def time_generation(model, n_jets: int, batch_size: int = 256, temperature: float = 1.0, seed: int = 0):
    """Generate ``n_jets`` with :meth:`GPT.generate`: ``(seq, mask, jets per second)``."""
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    seq, mask = model.generate(n_jets, batch_size=batch_size, temperature=temperature, generator=gen)
    return seq, mask, n_jets / max(time.perf_counter() - t0, 1e-9)


def classifier_test(real_x, real_mask, gen_x, gen_mask, seeds=(0, 1, 2), epochs: int = 100,
                    batch_size: int = 256, train_config=None, phi=(64, 64, 64), f=(64, 64),
                    lr: float = 1e-3) -> dict:
    """AUC of a DeepSets separating generated (label 1) from real (label 0) jets.

    The larger sample is subsampled at random to the size of the smaller; per seed a 60/20/20 train/validation/test split is
    drawn, a fresh DeepSets (``phi``, ``f`` layer widths) is trained for ``epochs`` (the weights
    with the lowest validation loss are kept) and evaluated on the test set. Returns
    ``{"auc_mean", "auc_std", "aucs", "n_per_sample"}``; an AUC near 0.5 means the classifier
    cannot tell the samples apart."""
    from ..metrics import roc_auc
    from ..models.deepsets import DeepSets, DeepSetsConfig
    from ..training.classifier import predict_proba, split_indices, train_classifier

    n = min(len(real_x), len(gen_x))
    if n < 5:
        raise OmnijetError(f"classifier_test: needs at least 5 jets per sample, got {len(real_x)} real and "
                           f"{len(gen_x)} generated")
    # equal sizes, drawn at random: samples may be ordered (e.g. by class in a q/g + top mixture)
    rng = np.random.default_rng(0)
    ri, gi = (np.sort(rng.choice(len(a), n, replace=False)) for a in (real_x, gen_x))
    x = np.concatenate([np.asarray(real_x, np.float32)[ri], np.asarray(gen_x, np.float32)[gi]])
    mask = np.concatenate([np.asarray(real_mask, bool)[ri], np.asarray(gen_mask, bool)[gi]])
    y = np.repeat(np.array([0, 1]), n)
    aucs = []
    for s in seeds:
        tr, va, te = split_indices(len(y), (0.6, 0.2, 0.2), seed=s)
        torch.manual_seed(s)
        model = DeepSets(DeepSetsConfig(n_features=3, n_classes=2, phi=list(phi), f=list(f)))
        model = train_classifier(model, x[tr], mask[tr], y[tr], val=(x[va], mask[va], y[va]), epochs=epochs,
                                 batch_size=batch_size, lr=lr, train_config=train_config, seed=s)
        aucs.append(roc_auc(y[te], predict_proba(model.cpu(), x[te], mask[te])[:, 1]))
    return {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "aucs": [float(a) for a in aucs],
            "n_per_sample": int(n)}


#: leading constituents whose pT fractions enter :func:`jet_summary_features`
N_LEADING = 8


def jet_summary_features(x, mask) -> tuple[np.ndarray, list[str]]:
    """``(features (N, F), names)`` of padded constituent features (N, L, 3) for the boosted-tree
    test: jet mass and pT [GeV], τ21, τ32, multiplicity, the pT fractions of the
    :data:`N_LEADING` hardest constituents (0 where a jet has fewer) and the pT-weighted width
    ``Σ pT_i ΔR_i / Σ pT_i`` (ΔR from the constituents' η_rel, φ_rel)."""
    from ..data.features import ANGLE_SCALE, PT_SHIFT, features_to_p4
    from ..observables import jet_observables

    x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
    obs = jet_observables(features_to_p4((x.astype(np.float32), mask)))
    pt = np.where(mask, np.exp(x[..., 0] + PT_SHIFT), 0.0)  # (N, L) GeV
    total = np.maximum(pt.sum(1), 1e-12)
    leading = -np.sort(-pt, axis=1)[:, :N_LEADING] / total[:, None]
    leading = np.pad(leading, ((0, 0), (0, N_LEADING - leading.shape[1])))
    dr = np.hypot(x[..., 1], x[..., 2]) / ANGLE_SCALE
    width = (pt * dr).sum(1) / total
    columns = [obs["mass"], obs["pt"], obs["tau21"], obs["tau32"], obs["multiplicity"], *leading.T, width]
    names = ["mass", "pt", "tau21", "tau32", "multiplicity", *[f"pt_fraction_{i + 1}" for i in range(N_LEADING)],
             "width"]
    return np.nan_to_num(np.stack(columns, 1).astype(np.float64)), names


def boosted_tree_test(real_x, real_mask, gen_x, gen_mask, folds: int = 5, seed: int = 0) -> dict:
    """AUC of gradient-boosted trees (scikit-learn's histogram GBDT) separating generated from
    real jets on :func:`jet_summary_features`, ``folds``-fold cross-validated on equal-size samples:
    a stronger test than the small DeepSets of :func:`classifier_test` on few jets. Also each
    observable's own AUC (as |AUC − 0.5| + 0.5: how much it separates, either way), largest first:
    what the trees see. ``{"auc_mean", "auc_std", "aucs", "n_per_sample", "separating"}``."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold

    from ..metrics import roc_auc

    n = min(len(real_x), len(gen_x))
    if n < 2 * folds:
        raise OmnijetError(f"boosted_tree_test: needs at least {2 * folds} jets per sample, got {len(real_x)} real "
                           f"and {len(gen_x)} generated")
    rng = np.random.default_rng(seed)
    ri, gi = (np.sort(rng.choice(len(a), n, replace=False)) for a in (real_x, gen_x))
    fr, names = jet_summary_features(np.asarray(real_x)[ri], np.asarray(real_mask)[ri])
    fg, _ = jet_summary_features(np.asarray(gen_x)[gi], np.asarray(gen_mask)[gi])
    X, y = np.concatenate([fr, fg]), np.repeat([0, 1], n)
    aucs = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        trees = HistGradientBoostingClassifier(random_state=seed).fit(X[tr], y[tr])
        aucs.append(roc_auc(y[te], trees.predict_proba(X[te])[:, 1]))
    single = {k: 0.5 + abs(roc_auc(y, X[:, i]) - 0.5) for i, k in enumerate(names)}
    return {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "aucs": [float(a) for a in aucs],
            "n_per_sample": int(n), "separating": dict(sorted(single.items(), key=lambda kv: -kv[1]))}


#: the jet observables :func:`judge_generation` compares
JUDGED_OBSERVABLES = ("mass", "tau21", "tau32", "multiplicity")


def judge_generation(gen_x, gen_mask, ref_x, ref_mask, deepsets_seeds=(), classifier_epochs: int = 20,
                     classifier_batch_size: int = 256, train_config=None) -> dict:
    """Generated jets against reference jets (held out, reconstructed by the same tokenizer), both
    padded constituent features (N, L, 3): the boosted-tree test (:func:`boosted_tree_test`; its
    three most separating observables), the paper's DeepSets test (:func:`classifier_test`) when
    ``deepsets_seeds`` are given, and per observable of :data:`JUDGED_OBSERVABLES` the W1 distance
    (GeV for the mass) and both medians. JSON-ready."""
    from ..data.features import features_to_p4
    from ..metrics import w1
    from ..observables import jet_observables

    trees = boosted_tree_test(ref_x, ref_mask, gen_x, gen_mask)
    out = {"n_generated": len(gen_x), "n_reference": len(ref_x), "tree_auc": trees["auc_mean"],
           "tree_auc_std": trees["auc_std"], "tree_separating": dict(list(trees["separating"].items())[:3])}
    if len(deepsets_seeds):
        ds = classifier_test(ref_x, ref_mask, gen_x, gen_mask, seeds=deepsets_seeds, epochs=classifier_epochs,
                             batch_size=classifier_batch_size, train_config=train_config)
        out |= {"deepsets_auc": ds["auc_mean"], "deepsets_auc_std": ds["auc_std"]}
    gen, ref = (jet_observables(features_to_p4((np.asarray(x, np.float32), np.asarray(m, bool))))
                for x, m in ((gen_x, gen_mask), (ref_x, ref_mask)))
    for k in JUDGED_OBSERVABLES:
        g, r = gen[k][np.isfinite(gen[k])], ref[k][np.isfinite(ref[k])]
        out[f"w1_{k}"] = w1(g, r)
        out[f"median_{k}"] = {"generated": float(np.median(g)), "reference": float(np.median(r))}
    return out


def copy_fraction(generated, training, stop_token: int) -> float:
    """The share of generated token sequences (N, S) that are exact copies of a training sequence
    (M, T): each read up to and including its first ``stop_token``, compared whole."""
    def jets(seq):
        for row in np.asarray(seq, np.int64):
            end = np.flatnonzero(row == stop_token)
            yield row[: end[0] + 1 if len(end) else len(row)].tobytes()

    seen = set(jets(training))
    generated = list(jets(generated))
    return sum(g in seen for g in generated) / len(generated) if generated else 0.0


def w1_scores(real_x, real_mask, gen_x, gen_mask, real_obs: dict | None = None, gen_obs: dict | None = None,
              n_batches: int = 5, seed: int = 0) -> dict:
    """Wasserstein-1 distances generated vs real: jet mass (GeV, JetNet-style mean ± std over
    resampled batches), each constituent feature (scaled units), and, when observables dicts
    are given, every jet observable they share (plain W1 on the full samples)."""
    from ..data.features import FEATURE_NAMES
    from ..metrics import jet_mass, w1, w1m, w1p

    mass_r = real_obs["mass"] if real_obs is not None else jet_mass(real_x, real_mask)
    mass_g = gen_obs["mass"] if gen_obs is not None else jet_mass(gen_x, gen_mask)
    out = {}
    out["w1m"], out["w1m_std"] = w1m(mass_r, mass_g, n_batches=n_batches, seed=seed)
    means, stds = w1p(real_x, real_mask, gen_x, gen_mask, n_batches=n_batches, seed=seed)
    for name, m, s in zip(FEATURE_NAMES, means, stds):
        out[f"w1p_{name}"], out[f"w1p_{name}_std"] = float(m), float(s)
    if real_obs is not None and gen_obs is not None:
        for k in sorted(set(real_obs) & set(gen_obs)):
            out[f"w1_{k}"] = w1(real_obs[k], gen_obs[k])
    return out


def data_scaling(tok, backbone, real_x, real_mask, fractions, n_generate: int, generate_batch_size: int = 256,
                 temperature: float = 1.0, seeds=(0, 1, 2), classifier_epochs: int = 100,
                 classifier_batch_size: int = 256, train_config=None, seed: int = 0, progress=print) -> list[dict]:
    """Classifier-test AUC against the number of pre-training jets: for each fraction ``f``,
    ``backbone(f)`` gives ``(GPT, Run)`` pre-trained on that share of the jets with the same
    optimiser steps (:func:`profile_backbone`, so the points differ in data, not in compute); it
    generates ``n_generate`` jets, and the classifier test compares them with ``(real_x,
    real_mask)``. Returns one dict per fraction: ``fraction, train_jets, epochs, train_seconds,
    auc_mean, auc_std, mean_multiplicity_generated`` and the model's ``run`` and ``settings_hash``."""
    out = []
    for i, f in enumerate(fractions):
        model, run = backbone(f)
        rec = run.record()
        s, m, _ = time_generation(model, n_generate, generate_batch_size, temperature, seed=seed + 100 + i)
        gx, gm = decode_generated(tok, s, m)
        ct = classifier_test(real_x, real_mask, gx, gm, seeds=seeds, epochs=classifier_epochs,
                             batch_size=classifier_batch_size, train_config=train_config)
        n, ep = rec["data"]["jets"], rec["settings"]["trainer"]["max_epochs"]
        out.append({"fraction": float(f), "train_jets": int(n), "epochs": int(ep), "train_seconds": round(run.seconds, 1),
                    "auc_mean": ct["auc_mean"], "auc_std": ct["auc_std"],
                    "mean_multiplicity_generated": float(gm.sum(1).mean()), **run.summary()})
        progress(f"{n} pre-training jets ({ep} epochs): classifier AUC {ct['auc_mean']:.3f} ± {ct['auc_std']:.3f}")
    return out


def generated_label(backbone_run) -> int:
    """The class index written for jets generated by ``backbone_run``: its training class when it
    was pre-trained on a single class (``gpt_top`` → 8, t→bqq'), else 0 (QCD): generated jets have no
    truth, and the JetClass schema wants exactly one ``label_*`` set per jet."""
    import json

    from ..data.schema import class_index
    from ..training.store import RUN_RECORD

    rec = json.loads((Path(backbone_run) / RUN_RECORD).read_text())
    classes = ((rec.get("data") or {}).get("source") or {}).get("classes") or []
    return class_index(classes[0]) if len(classes) == 1 else 0


def generate_to_root(backbone, n_jets: int, out, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int = 0, batch_size: int = 256, chunk: int = 10_000,
                     overwrite: bool = False, progress=print, jet_class: str | None = None) -> dict:
    """Generate ``n_jets`` jets with ``backbone`` (:func:`~omnijet_lib.training.gpt.open_backbone`)
    into one JetClass-schema ROOT file ``out`` and their token sequences into the shard folder
    beside it (``g.root`` → ``g.tokens/``: shards in the format of ``omnijet tokenize``, with a
    ``manifest.json``, so :class:`~omnijet_lib.data.shards.TokenShardDataset` reads them).

    Jets: the tokenizer decodes each sequence into constituents (massless, in the order generated)
    around the axis eta = phi = 0; ``jet_pt, eta, phi, energy, nparticles`` are their 4-vector sum,
    ``jet_tau1..4`` their N-subjettiness, ``jet_sdmass`` 0 (as in simulated files without soft
    drop); the label is :func:`generated_label`, or ``jet_class``: the class a class-conditional backbone
    (``n_classes``) is asked for (its class token). A shard's ``entry`` is the jet's entry in ``out``.

    Memory is bounded by ``chunk`` jets: they are generated, decoded, appended to the ROOT tree and
    written as one token shard at a time. Nothing appears before the end: the ROOT file and the
    tokens are written into a hidden folder beside ``out`` and renamed into place when complete
    (the tokens first), so an error or Ctrl-C leaves the old files, or none. An existing ``out`` or
    token folder is refused unless ``overwrite``; the folder of ``out`` must exist.

    A jet whose stop token is drawn first has no constituent and cannot be written: it is dropped
    and counted, and generation continues until ``n_jets`` jets have constituents. The uniforms come
    from one stream seeded by ``seed`` and jets are batched in whole batches of ``batch_size``
    (at most ``n_jets``) from its start, so the token sequences depend on the backbone, ``seed``,
    ``temperature``, ``top_k``, ``top_p``, ``batch_size`` and ``n_jets`` only, not on ``chunk`` (the
    tokenizer decodes each chunk in its own length batches: another ``chunk`` changes the 4-vectors
    by float rounding, ~1e-6 relative). The same arguments give the same arrays; ``top_k=1`` (greedy) gives
    the same jets for every seed.

    Returns ``{out, tokens, jets, generated, empty, label, seconds, jets_per_second}``."""
    from ..data.features import features_to_p4
    from ..data.jetclass import make_jets, write_jetclass_chunks
    from ..data.schema import CLASS_LABELS
    from ..data.shards import MANIFEST, write_shard
    from ..io import write_json
    from ..models.gpt import sequences_to_codes
    from ..observables import nsubjettiness
    from ..training.vqvae import TOKENIZER_FILE

    for name, value in (("n_jets", n_jets), ("batch_size", batch_size), ("chunk", chunk)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise OmnijetError(f"generate: {name} must be an integer >= 1, got {value!r}")
    out = Path(out)
    tokens_dir = out.with_suffix(".tokens")
    if out.suffix != ".root":
        raise OmnijetError(f"--out {out}: must be a .root file")
    if not out.parent.is_dir():
        raise OmnijetError(f"--out {out}: folder {out.parent} does not exist (create it first)")
    if out.is_dir():
        raise OmnijetError(f"--out {out}: is a directory, expected a .root file")
    for path in (out, tokens_dir):
        if not overwrite and (path.exists() or path.is_symlink()):
            raise OmnijetError(f"--out {out}: {path} exists; pass --overwrite to replace it")

    gpt, tok = backbone.gpt, backbone.tokenizer
    label = generated_label(backbone.run)
    if jet_class is not None:
        if not gpt.config.n_classes:
            raise OmnijetError(f"--class {jet_class}: backbone {backbone.run} was trained without classes; use a "
                               "class-conditional one (gpt_all_conditional)")
        if jet_class not in CLASS_LABELS:
            raise OmnijetError(f"--class {jet_class}: unknown class; known: {', '.join(CLASS_LABELS)}")
        label = CLASS_LABELS.index(jet_class)
    batch = min(batch_size, n_jets)
    chunk = max(batch, chunk // batch * batch)  # whole batches: the chunking never moves a batch boundary
    generator = torch.Generator().manual_seed(seed)
    stats = {"generated": 0, "empty": 0, "jets": 0}
    shards = []
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))

    def chunks():
        while stats["jets"] < n_jets:
            done = stats["jets"]
            want = min(chunk, -(-(n_jets - done) // batch) * batch)
            seq, mask = gpt.generate(want, batch_size=batch, temperature=temperature, generator=generator,
                                     top_k=top_k, top_p=top_p, labels=None if jet_class is None else label)
            filled = np.flatnonzero(mask.sum(1) > 2)  # start and stop only: an empty jet
            stats["generated"] += want
            stats["empty"] += want - len(filled)
            if stats["generated"] >= 1000 and stats["empty"] > 0.99 * stats["generated"]:
                raise OmnijetError(f"--backbone {backbone.run}: {stats['empty']} of the {stats['generated']} jets "
                                   "drawn are empty (stop drawn first); is it trained?")
            keep = filled[:n_jets - done]
            if not len(keep):
                continue
            seq, mask = seq[keep], mask[keep]
            x, m = decode_generated(tok, seq, mask, max_len=gpt.config.max_len - 2)
            part = features_to_p4((x, m))
            taus = nsubjettiness(part, n_max=4)
            jets = make_jets(part, label, {f"jet_tau{i + 1}": taus[:, i] for i in range(4)})
            codes, code_mask = sequences_to_codes(seq, mask, gpt.config.vocab_size)
            labels, name = np.full(len(keep), label), f"generated_{len(shards):05d}.npz"
            write_shard(work / "tokens" / name, codes[code_mask], code_mask.sum(1), labels,
                        np.arange(done, done + len(keep)), tok.num_codes)
            shards.append({"name": name, "entry_start": done, "entry_stop": done + len(keep), "jets": len(keep),
                           "tokens": int(code_mask.sum()),
                           "class_counts": np.bincount(labels, minlength=len(CLASS_LABELS)).tolist()})
            stats["jets"] += len(keep)
            seconds = time.perf_counter() - t0
            progress(f"generate: {stats['jets']:,}/{n_jets:,} jets ({stats['jets'] / seconds:.0f} jets/s, "
                     f"{stats['empty']} empty dropped)")
            yield jets

    try:
        write_jetclass_chunks(work / out.name, chunks())
        write_json(work / "tokens" / MANIFEST, {
            "kind": "generated", "root": out.name, "backbone": str(backbone.run),
            "tokenizer": str(backbone.tokenizer_run / TOKENIZER_FILE), "num_codes": tok.num_codes, "seed": seed,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "batch_size": batch, "class": jet_class,
            "label": CLASS_LABELS[label], "shards": shards, "jets": n_jets, "tokens": sum(s["tokens"] for s in shards),
            "class_counts": np.sum([s["class_counts"] for s in shards], axis=0).tolist(), "complete": True})
        if tokens_dir.exists() or tokens_dir.is_symlink():  # --overwrite: the old folder goes with the work folder
            os.replace(tokens_dir, work / "replaced")
        os.replace(work / "tokens", tokens_dir)
        os.replace(work / out.name, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"out": str(out), "tokens": str(tokens_dir), "jets": n_jets, "generated": stats["generated"],
            "empty": stats["empty"], "label": CLASS_LABELS[label], "seconds": round(seconds, 2),
            "jets_per_second": n_jets / max(seconds, 1e-9)}
