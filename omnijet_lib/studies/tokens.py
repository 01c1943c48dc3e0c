"""Token-quality evaluation (OmniJet-α figs 3, 4, 5, 8–11): plain functions over numpy arrays.

* :func:`token_blobs` — where each token lives in physical space. A conditional token's decoded
  value depends on the other tokens of the jet, so it is decoded ``samples`` times, each time in a
  "jet" of ``context`` randomly drawn codebook tokens (fig 3 blobs); an unconditional or binned
  token decodes to a single point.
* :func:`gaussian_fit` — σ of the core of a resolution (Δm, ΔpT, Δτ) by a Gaussian fit to
  its histogram, as the paper quotes σ(Δm).
* :func:`resolution_table` — per method, observable and class: the fitted μ, σ of
  reconstructed − original.
* :func:`codebook_usage` — fraction of codes used and perplexity of a token set.
* :func:`classifier_accuracy` — train a 10-class classifier (DeepSets or Transformer) on one
  representation of the jets and return its test accuracy (fig 5); :func:`classifier_run` gets it
  from the model store.
* :func:`representation_study` — notebook 01's work for one representation (tokenizer, tokens,
  reconstruction, classifiers) as one job; :func:`representation_cost` orders those jobs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch

from ..data.features import ANGLE_SCALE, PT_SHIFT, features_to_p4
from ..data.jetclass import CLASS_LABELS
from ..io import OmnijetError, write_json
from ..tokenizers.base import reconstruct

__all__ = ["token_blobs", "to_physical", "blob_spread", "gaussian_fit", "resolution_table", "observables_of",
           "codebook_usage", "classifier_accuracy", "classifier_run", "classifier_cost", "representation_study",
           "representation_cost", "tokenizer_cost", "RESOLUTION_OBSERVABLES", "TOKENIZER_DEFAULTS", "TokenizerData",
           "tokenizer_data", "profile_tokenizer"]

#: observables whose resolutions figs 4, 8–11 show (keys of ``jet_observables``)
RESOLUTION_OBSERVABLES = ("mass", "pt", "tau32", "tau21")


# --------------------------------------------------------------------------- fig 3
def token_blobs(tokenizer, samples: int = 500, context: int = 50, tokens=None, seed: int = 0,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Decoded positions of codebook tokens: ``(token ids (T,), features (T, S, 3))``, scaled features.

    Conditional VQ-VAE: S = ``samples``; each sample of a token is decoded together with
    ``context`` other tokens drawn at random from the codebook. Each round shuffles the studied
    tokens and packs them into groups of ``context + 1`` (topped up with random codebook tokens),
    so one decoded group yields a sample for every studied token in it; if ``tokens`` is a random
    subset of the codebook, the context stays a uniform draw from the codebook.
    Unconditional / binned: S = 1, each token decoded alone.
    ``tokens`` (ids to study) defaults to the whole codebook.
    """
    K = tokenizer.num_codes
    ids = np.arange(K) if tokens is None else np.asarray(tokens, np.int64).ravel()
    if len(ids) == 0 or ids.min() < 0 or ids.max() >= K:
        raise OmnijetError(f"token_blobs: token ids must be a non-empty subset of 0..{K - 1}")
    if tokenizer.kind != "conditional":
        return ids, reconstruct(tokenizer, ids[:, None], batch_size=batch_size)  # (T, 1, 3)
    if samples < 1 or context < 0:
        raise OmnijetError(f"token_blobs: samples must be >= 1 and context >= 0 (got {samples}, {context})")
    rng = np.random.default_rng(seed)
    G = context + 1
    n_groups = -(-len(ids) // G)
    out = np.zeros((len(ids), samples, 3), np.float32)
    for s in range(samples):
        order = rng.permutation(len(ids))                               # studied positions, shuffled
        slots = np.full(n_groups * G, -1, np.int64)
        slots[:len(ids)] = order
        slots = slots.reshape(n_groups, G)                              # (groups, G) index into ids or -1
        group = np.where(slots >= 0, ids[np.maximum(slots, 0)], rng.integers(0, K, slots.shape))
        rec = reconstruct(tokenizer, group, batch_size=batch_size)      # (groups, G, 3)
        real = slots >= 0
        out[slots[real], s] = rec[real]
    return ids, out


def to_physical(x: np.ndarray) -> np.ndarray:
    """Scaled features (..., 3) -> (pT [GeV], η_rel, φ_rel)."""
    x = np.asarray(x, np.float64)
    return np.stack([np.exp(x[..., 0] + PT_SHIFT), x[..., 1] / ANGLE_SCALE, x[..., 2] / ANGLE_SCALE], -1)


def blob_spread(blobs: np.ndarray) -> np.ndarray:
    """Per-token standard deviation (T, 3) of the samples (T, S, 3) (zero for S = 1)."""
    return np.asarray(blobs).std(axis=1)


# --------------------------------------------------------------------------- resolutions
def _gauss(x, a, mu, sigma):
    return a * np.exp(-0.5 * ((x - mu) / sigma) ** 2)


def gaussian_fit(values, n_bins: int = 40, width: float = 3.0, min_entries: int = 20) -> tuple[float, float]:
    """(μ, σ) of a Gaussian fitted to the histogram of ``values`` within ±``width`` robust σ of the median.

    The start values are the median and 1.4826·MAD (robust against the tails that
    mis-reconstructed jets put into Δm). With fewer than ``min_entries`` finite values, a
    degenerate spread or a failed fit, the robust estimates are returned instead.
    """
    from scipy.optimize import curve_fit

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    mu0 = float(np.median(v))
    s0 = float(1.4826 * np.median(np.abs(v - mu0)))
    if s0 <= 0:
        s0 = float(v.std())
    if len(v) < min_entries or s0 <= 0:
        return mu0, s0
    h, edges = np.histogram(v, bins=n_bins, range=(mu0 - width * s0, mu0 + width * s0))
    c = 0.5 * (edges[1:] + edges[:-1])
    try:
        (a, mu, sigma), _ = curve_fit(_gauss, c, h, p0=(h.max(), mu0, s0), sigma=np.sqrt(np.maximum(h, 1)),
                                      maxfev=2000)
    except (RuntimeError, ValueError):
        return mu0, s0
    sigma = abs(float(sigma))
    if not np.isfinite(sigma) or sigma == 0 or sigma > 10 * s0 or abs(mu - mu0) > width * s0:
        return mu0, s0
    return float(mu), sigma


def observables_of(x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Jet observables (mass and pT in GeV, τ21, τ32, …) of padded scaled features, massless constituents."""
    from ..observables import jet_observables

    return jet_observables(features_to_p4((np.asarray(x), np.asarray(mask, bool))))


def resolution_table(original: dict, reconstructed: dict, labels, observables=RESOLUTION_OBSERVABLES,
                     class_names=CLASS_LABELS) -> dict:
    """Gaussian-fit μ, σ of reconstructed − original, per method, observable and class.

    ``original``: observables dict (arrays (N,)); ``reconstructed``: {method: observables dict of
    the same jets}. Returns ``{method: {observable: {class label (e.g. "Tbqq") or "all": {"mu", "sigma", "n"}}}}``
    (classes without jets are left out).
    """
    labels = np.asarray(labels)
    table = {}
    for method, rec in reconstructed.items():
        table[method] = {}
        for obs in observables:
            delta = np.asarray(rec[obs], np.float64) - np.asarray(original[obs], np.float64)
            if delta.shape != labels.shape:
                raise OmnijetError(f"resolution_table: {method} {obs} has {delta.shape} entries, labels {labels.shape}")
            rows = {}
            for c, name in enumerate(class_names):
                sel = labels == c
                if sel.any():
                    mu, sigma = gaussian_fit(delta[sel])
                    rows[name] = {"mu": mu, "sigma": sigma, "n": int(sel.sum())}
            mu, sigma = gaussian_fit(delta)
            rows["all"] = {"mu": mu, "sigma": sigma, "n": len(delta)}
            table[method][obs] = rows
    return table


# --------------------------------------------------------------------------- codebook
def codebook_usage(tokens, mask, num_codes: int) -> dict:
    """``{"usage": fraction of codes used, "perplexity": exp(entropy), "used": count}`` of real tokens."""
    t = np.asarray(tokens)[np.asarray(mask, bool)].astype(np.int64)
    if len(t) and (t.min() < 0 or t.max() >= num_codes):
        raise OmnijetError(f"codebook_usage: token ids outside 0..{num_codes - 1}")
    counts = np.bincount(t, minlength=num_codes).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "used": int((counts > 0).sum())}


# --------------------------------------------------------------------------- fig 5
#: Enters every fig-5 classifier's settings: bump it when a change to the model or the training makes
#: the ``result.json`` of earlier runs invalid.
CLASSIFIER_VERSION = 1


def _classifier_model(arch: str, model_kw: dict | None, n_classes: int):
    """``(model class, resolved config)`` of a fig-5 classifier."""
    from ..models.deepsets import DeepSets, DeepSetsConfig
    from ..models.normformer import TransformerClassifier, TransformerClassifierConfig

    archs = {"deepsets": (DeepSets, DeepSetsConfig), "transformer": (TransformerClassifier, TransformerClassifierConfig)}
    if arch not in archs:
        raise OmnijetError(f"classifier arch {arch!r} is unknown, expected one of {sorted(archs)}")
    model_cls, cfg_cls = archs[arch]
    try:
        return model_cls, cfg_cls(n_classes=n_classes, **(model_kw or {}))
    except TypeError as err:
        raise OmnijetError(f"{arch} classifier parameters: {err}") from None


def _n_classes(labels) -> int:
    return max(int(np.max(labels)) + 1, len(CLASS_LABELS))


def classifier_accuracy(arch: str, x, mask, labels, split, epochs: int, batch_size: int = 256, lr: float = 1e-3,
                        train_config=None, seed: int = 0, model_kw: dict | None = None, extra_test=(),
                        out_dir=None):
    """Train a 10-class classifier on one representation of the jets; ``(model, accuracies)``.

    ``arch``: "deepsets" (paper sizes by default) or "transformer" (5 NormFormer + 2
    class-attention blocks); ``model_kw`` overrides their config fields. ``split`` =
    (train, val, test) index arrays (:func:`~omnijet_lib.training.classifier.split_indices`); the
    epoch with the lowest validation loss is kept (checkpoints in ``out_dir``, a temporary folder
    when None). ``accuracies`` has ``"test"`` and one entry per
    ``extra_test`` item ``(name, x, mask, labels)`` (e.g. a real-data sample).
    """
    import tempfile

    from ..training.classifier import predict_proba, train_classifier

    model_cls, cfg = _classifier_model(arch, model_kw, _n_classes(labels))
    torch.manual_seed(seed)
    model = model_cls(cfg)
    x, mask, labels = np.asarray(x, np.float32), np.asarray(mask, bool), np.asarray(labels, np.int64)
    tr, va, te = split
    with tempfile.TemporaryDirectory() as tmp:
        model = train_classifier(model, x[tr], mask[tr], labels[tr], val=(x[va], mask[va], labels[va]),
                                 out_dir=out_dir or tmp, epochs=epochs, batch_size=batch_size, lr=lr,
                                 train_config=train_config, seed=seed)
    acc = {}
    for name, xt, mt, yt in [("test", x[te], mask[te], labels[te]), *extra_test]:
        p = predict_proba(model, np.asarray(xt, np.float32), np.asarray(mt, bool))
        acc[name] = float((p.argmax(1) == np.asarray(yt)).mean())
    return model, acc


def classifier_run(store, representation: str, arch: str, x, mask, labels, split, epochs: int,
                   batch_size: int = 256, lr: float = 1e-3, train_config=None, seed: int = 0,
                   model_kw: dict | None = None, extra_test=()):
    """``(accuracies, Run)`` of the fig-5 classifier ``classifier01_{arch}_{representation}`` from the
    model store: :func:`classifier_accuracy` trains it (resumably, in its run folder) unless the store
    has one trained with exactly these settings on exactly these jets (the train, validation and
    test parts of ``x`` — the original or a tokenizer's reconstructed constituents — and the
    ``extra_test`` samples). The accuracies are the run's ``result.json``."""
    from ..training.fit import TrainConfig
    from ..training.store import ModelRequest, data_identity

    x, mask, labels = np.asarray(x, np.float32), np.asarray(mask, bool), np.asarray(labels, np.int64)
    _, cfg = _classifier_model(arch, model_kw, _n_classes(labels))
    trainer = dataclasses.replace(train_config or TrainConfig(), seed=int(seed), max_epochs=int(epochs))
    settings = {"version": CLASSIFIER_VERSION, "arch": arch, "config": dataclasses.asdict(cfg), "epochs": int(epochs),
                "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed), "trainer": trainer.settings}
    parts = [a[i] for i in split for a in (x, mask, labels)] + [np.asarray(a) for _, *test in extra_test for a in test]
    source = {"representation": representation, "split": [len(i) for i in split],
              "extra_test": [name for name, *_ in extra_test]}
    request = ModelRequest(f"classifier01_{arch}_{representation}", settings, data_identity(source, *parts))

    def train(run_dir):
        _, acc = classifier_accuracy(arch, x, mask, labels, split, epochs, batch_size, lr, train_config, seed,
                                     model_kw, extra_test, out_dir=run_dir)
        write_json(run_dir / "result.json", acc)
        for ckpt in run_dir.glob("*.ckpt"):  # resume state only: the result is what is kept
            ckpt.unlink()
        return acc

    return store.get(request, train=train, load=lambda run_dir: json.loads((run_dir / "result.json").read_text()))


def _jet_passes_cost(model, jet_passes: float) -> float:
    """What training ``model`` on ``jet_passes`` jets (jets x epochs) costs, in parameter x jet passes:
    on one CPU core the VQ-VAEs and classifiers here take 3-9 ns per parameter and jet pass."""
    return float(sum(p.numel() for p in model.parameters())) * jet_passes


def classifier_cost(arch: str, train_jets: int, epochs: int, model_kw: dict | None = None) -> float:
    """The cost of training a fig-5 classifier (:func:`_jet_passes_cost`), to start costly trainings first."""
    model_cls, cfg = _classifier_model(arch, model_kw, len(CLASS_LABELS))
    return _jet_passes_cost(model_cls(cfg), train_jets * epochs)


def representation_study(store, source, data: TokenizerData, classifier_kw: dict, epochs: int,
                         batch_size: int = 256, train_config=None, seed: int = 0, real=None) -> dict:
    """Everything notebook 01 trains and computes for one representation of its jets, as one job that
    can run side by side with the others (:func:`~omnijet_lib.training.parallel.side_by_side`): the
    tokenizer, the tokens and reconstruction of all jets (and of the ``real`` sample ``(x, mask,
    labels)``), then the fig-5 classifiers on that reconstruction (so they start as soon as their
    tokenizer exists). ``source``: None for the original constituents, ``(kind, num_codes)`` for the
    profile's tokenizer (:func:`profile_tokenizer`), or a tokenizer (the published one);
    ``classifier_kw``: ``{arch: model_kw}`` (:func:`classifier_run`, named by the representation).

    Returns ``{"tokenizer", "run" (the tokenizer's, None when not from the store), "tokens", "x",
    "real" ((tokens, x) of the real sample, or None), "accuracy": {arch: accuracies},
    "classifier_runs": {arch: Run}, "seconds"}``."""
    import time

    from ..tokenizers.base import tokenize

    t0 = time.perf_counter()
    if source is None:
        tok, run = None, None
    elif isinstance(source, tuple):
        tok, run = profile_tokenizer(store, *source, data)
    else:
        tok, run = source, None

    def represent(x, mask):
        if tok is None:
            return None, np.asarray(x, np.float32)
        tokens = tokenize(tok, x, mask)
        return tokens, reconstruct(tok, tokens, mask)

    tokens, x = represent(data.x, data.mask)
    real_rep = represent(real[0], real[1]) if real is not None else None
    name = "original" if tok is None else f"{tok.kind}_{tok.num_codes}"
    extra = [("real", real_rep[1], real[1], real[2])] if real is not None else []
    accuracy, runs = {}, {}
    for arch, kw in classifier_kw.items():
        accuracy[arch], runs[arch] = classifier_run(store, name, arch, x, data.mask, data.labels, data.split, epochs,
                                                    batch_size, train_config=train_config, seed=seed, model_kw=kw,
                                                    extra_test=extra)
    return {"tokenizer": tok, "run": run, "tokens": tokens, "x": x, "real": real_rep, "accuracy": accuracy,
            "classifier_runs": runs, "seconds": round(time.perf_counter() - t0, 1)}


def representation_cost(source, data: TokenizerData, classifier_kw: dict, epochs: int) -> float:
    """The cost of :func:`representation_study` in a fresh store (:func:`_jet_passes_cost`): the
    tokenizer's training and the classifiers'."""
    train_jets = len(data.split[0])
    cost = sum(classifier_cost(arch, train_jets, epochs, kw) for arch, kw in classifier_kw.items())
    return cost + (tokenizer_cost(*source, data) if isinstance(source, tuple) else 0.0)


# --------------------------------------------------------------------------- the profile's tokenizers
#: The settings of a profile's tokenizers: notebook 01 trains them, notebooks 02-05 use them, and all
#: of them ask the model store for the same model because they build its request from the same
#: profile ``tokenizer`` dict (overrides of these). ``per_size: {K: {...}}`` overrides ``epochs``,
#: ``model_kw`` (on top of the shared one) and ``extra_per_class`` for codebook size K. The data keys
#: ``data_files``, ``per_class``, ``seed`` and ``trainer`` are the notebook's own unless set.
TOKENIZER_DEFAULTS = {
    "epochs": 2,
    "batch_size": 512,
    "model_kw": {"hidden_dim": 32, "num_blocks": 1, "num_heads": 4, "mlp_hidden": 32, "attn_dropout": 0.0},
    "extra_per_class": 0,  # simulated jets per class added to the training split (embedded simulation only)
    "extra_seed": 5,       # their simulation seed: jets no notebook measures on
    "per_size": {},
}
TOKENIZER_DATA_KEYS = ("data_files", "per_class", "seed", "trainer")
TOKENIZER_SIZE_KEYS = ("epochs", "model_kw", "extra_per_class")
#: The tokenizers train on this share of the jets (60/20/20 split by the data seed); notebook 01
#: measures on the other 40%.
TOKENIZER_SPLIT = (0.6, 0.2, 0.2)


@dataclass
class TokenizerData:
    """The jets of a profile's tokenizers (:func:`tokenizer_data`): padded features, labels, the
    60/20/20 split and where they come from."""

    x: np.ndarray | None      # (N, L, 3); None: not loaded (a dry run)
    mask: np.ndarray | None   # (N, L)
    labels: np.ndarray | None  # (N,)
    split: list | None        # train, val, test indices
    source: dict          # data_files / per_class / seed
    settings: dict        # the resolved profile tokenizer dict
    trainer: dict         # TrainConfig overrides for the tokenizer trainings
    _extra: dict = dataclasses.field(default_factory=dict)

    def size_settings(self, num_codes: int) -> dict:
        """``epochs``, ``model_kw`` and ``extra_per_class`` for codebook size ``num_codes``."""
        own = {str(k): v for k, v in self.settings["per_size"].items()}.get(str(num_codes), {})
        return {"epochs": own.get("epochs", self.settings["epochs"]),
                "model_kw": {**self.settings["model_kw"], **own.get("model_kw", {})},
                "extra_per_class": own.get("extra_per_class", self.settings["extra_per_class"])}

    def request(self, kind: str, num_codes: int) -> tuple[str, dict, dict, int]:
        """``(store name, settings, model_kw, epochs)`` of the profile's ``kind`` tokenizer of size
        ``num_codes``: what :func:`profile_tokenizer` asks the store for, the jets aside."""
        import dataclasses as dc

        from ..training.fit import TrainConfig
        from ..training.vqvae import tokenizer_config

        name = f"tokenizer_{kind}_{int(num_codes)}"
        if kind == "binned":
            return name, {"kind": kind, "bins": round(num_codes ** (1 / 3))}, {}, 0
        train_config = TrainConfig.from_params(self.trainer, progress_bar=False)
        size = self.size_settings(num_codes)
        model_kw = {"quantize_padding": train_config.quantize_padding, **size["model_kw"]}
        settings = {"kind": kind, "config": dc.asdict(tokenizer_config(kind, num_codes, **model_kw)),
                    "epochs": int(size["epochs"]), "batch_size": int(self.settings["batch_size"]),
                    "seed": int(self.source["seed"]), "val_fraction": 0.1, "trainer": train_config.settings}
        return name, settings, model_kw, size["epochs"]

    def training_jets(self, kind: str, num_codes: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(x, mask, source)`` a tokenizer trains on: the training split, plus for a VQ-VAE the
        extra simulated jets of its codebook size."""
        from ..data.features import constituent_features, to_padded
        from ..datasets import load_dataset

        tr = self.split[0]
        n = 0 if kind == "binned" else self.size_settings(num_codes)["extra_per_class"]
        source = {**self.source, "split": list(TOKENIZER_SPLIT), "part": "train"}
        if not n:
            return self.x[tr], self.mask[tr], source
        if self.source["data_files"] is not None:
            raise OmnijetError("tokenizer.extra_per_class: extra jets are simulated; set it to 0 with data_files")
        if n not in self._extra:
            self._extra[n] = to_padded(constituent_features(load_dataset(None, per_class=n,
                                                                         seed=self.settings["extra_seed"])))
        ex, em = self._extra[n]
        return (np.concatenate([self.x[tr], ex]), np.concatenate([self.mask[tr], em]),
                {**source, "extra": {"per_class": n, "seed": self.settings["extra_seed"]}})


def tokenizer_data(tokenizer: dict | None, data_files=None, per_class: int = 300, seed: int = 1,
                   trainer: dict | None = None, load: bool = True) -> TokenizerData:
    """The jets of the profile's tokenizers, from a notebook's parameters: its ``tokenizer`` dict
    (:data:`TOKENIZER_DEFAULTS`) and, where that does not set them, its own data settings. Without
    ``load`` only the settings (for a dry run)."""
    from ..data.features import constituent_features, to_padded
    from ..datasets import load_dataset
    from ..training.classifier import split_indices

    tokenizer = dict(tokenizer or {})
    unknown = sorted(set(tokenizer) - set(TOKENIZER_DEFAULTS) - set(TOKENIZER_DATA_KEYS))
    if unknown:
        raise OmnijetError(f"tokenizer: unknown key {unknown[0]}; known: "
                           f"{', '.join([*TOKENIZER_DEFAULTS, *TOKENIZER_DATA_KEYS])}")
    files, n, seed = tokenizer.get("data_files", data_files), tokenizer.get("per_class", per_class), tokenizer.get("seed", seed)
    source = {"data_files": files, "seed": seed, **({"per_class": n} if files is None else {})}  # seed: the split too
    settings = {k: tokenizer.get(k, v) for k, v in TOKENIZER_DEFAULTS.items()}
    data = TokenizerData(None, None, None, None, source, settings, dict(tokenizer.get("trainer", trainer) or {}))
    if load:
        jets = load_dataset(files, per_class=n, seed=seed)
        data.x, data.mask = to_padded(constituent_features(jets))
        data.labels, data.split = np.asarray(jets.label), split_indices(len(data.x), TOKENIZER_SPLIT, seed=seed)
    return data


def profile_tokenizer(store, kind: str, num_codes: int, data: TokenizerData, progress=print):
    """``(tokenizer, Run)``: the profile's ``kind`` tokenizer of codebook size ``num_codes`` from the
    model store, trained there on ``data`` when the store has none with exactly these settings.
    Binned tokenizers (``num_codes`` = bins³) fit their ranges instead of training."""
    from ..tokenizers.base import load_tokenizer
    from ..training.fit import TrainConfig
    from ..training.store import ModelRequest, data_identity
    from ..training.vqvae import TOKENIZER_FILE, train_tokenizer

    x, mask, source = data.training_jets(kind, num_codes)
    name, settings, model_kw, epochs = data.request(kind, num_codes)
    train_config = TrainConfig.from_params(data.trainer, progress_bar=False)
    seed = int(data.source["seed"])
    request = ModelRequest(name, settings, data_identity(source, x, mask))
    tok, run = store.get(
        request,
        train=lambda run_dir: train_tokenizer(kind, x, mask, num_codes, epochs=epochs,
                                              batch_size=data.settings["batch_size"], out_dir=run_dir,
                                              train_config=train_config, seed=seed, **model_kw),
        load=lambda run_dir: load_tokenizer(run_dir / TOKENIZER_FILE))
    if tok.num_codes != num_codes:
        raise OmnijetError(f"{run.path}: holds {tok.num_codes} codes, the profile asks for {num_codes}")
    return tok.cpu().eval(), run


def tokenizer_cost(kind: str, num_codes: int, data: TokenizerData) -> float:
    """The cost of training the profile's ``kind`` tokenizer of size ``num_codes`` on ``data``
    (:func:`profile_tokenizer`; parameters x jet passes, see :func:`_jet_passes_cost`); 0 for a binned one."""
    from ..training.vqvae import make_tokenizer

    if kind == "binned":
        return 0.0
    size = data.size_settings(num_codes)
    jets = len(data.split[0]) + len(CLASS_LABELS) * size["extra_per_class"]  # the training split and extra jets
    return _jet_passes_cost(make_tokenizer(kind, num_codes, **size["model_kw"]), jets * size["epochs"])
