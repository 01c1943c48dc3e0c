"""Evaluating generated jets (notebook 02): backbones, decoding, the classifier test, W1 scores.

The GPT generates token sequences; :func:`decode_generated` turns them into padded constituent
features with the tokenizer's decoder, so they can be compared with the *reconstructed* real jets
(real jets -> tokens -> decoder), as in the paper: the comparison then measures the generative
model alone, not the tokenizer's resolution.

Classifier test (paper, sec. 4.2): a small DeepSets is trained to separate generated from
reconstructed real jets on a 60/20/20 split; the test AUC is 0.5 for a perfect generator.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..io import OmnijetError, array_digest, changed_settings, write_json

__all__ = ["decode_generated", "ensure_gpt", "classifier_test", "w1_scores", "time_generation", "data_scaling"]


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


def ensure_gpt(path, seq, seq_mask, config, epochs: int, batch_size: int = 256, train_config=None,
               seed: int = 0, progress=print):
    """The GPT at ``path`` (``.../gpt.safetensors``) when it exists and was trained with these
    settings, else one trained on ``(seq, seq_mask)`` and saved there. Returns ``(model, seconds
    spent training)``.

    The settings (``config``, epochs, batch size, seed, the training procedure and a fingerprint
    of the sequences, so a retrained tokenizer counts) are kept next to the model in
    ``<name>.run.json``. A model trained otherwise (or without that record) is replaced, together
    with its checkpoints, so that training does not resume from it."""
    from ..training.fit import TrainConfig
    from ..training.gpt import load_gpt, train_gpt

    path = Path(path)
    record = path.with_name(path.stem + ".run.json")
    settings = {"config": dataclasses.asdict(config), "epochs": int(epochs), "batch_size": int(batch_size),
                "seed": int(seed), "jets": len(seq),
                "sequences": array_digest(np.asarray(seq, np.int64), np.asarray(seq_mask, bool))[:16],
                **(train_config or TrainConfig()).procedure}
    if path.is_file():
        diff = changed_settings(record, settings)
        if not diff:
            progress(f"loaded {path}")
            return load_gpt(path), 0.0
        progress(f"{path}: trained with other settings ({', '.join(diff)}); retraining")
        for stale in [path, record, *path.parent.glob("*.ckpt")]:
            stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    model = train_gpt(seq, seq_mask, out_dir=path.parent, config=config, epochs=epochs, batch_size=batch_size,
                      train_config=train_config, seed=seed)
    if path.name != "gpt.safetensors":
        os.replace(path.parent / "gpt.safetensors", path)
    write_json(record, settings)
    seconds = time.perf_counter() - t0
    progress(f"trained {path} in {seconds:.0f} s")
    return model.eval(), seconds


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


def data_scaling(tok, seq, seq_mask, real_x, real_mask, fractions, config, models_dir, epochs: int,
                 batch_size: int, n_generate: int, generate_batch_size: int = 256, temperature: float = 1.0,
                 seeds=(0, 1, 2), classifier_epochs: int = 100, classifier_batch_size: int = 256,
                 train_config=None, seed: int = 0, progress=print) -> list[dict]:
    """Classifier-test AUC against the number of pre-training jets: for each fraction ``f`` of the
    sequences ``(seq, seq_mask)`` (a random subset), a GPT with ``config`` is trained with the
    same number of optimizer steps as ``epochs`` over all of them (``epochs / f`` epochs, so the
    points differ in data, not in compute), generates ``n_generate`` jets, and the classifier test
    compares them with ``(real_x, real_mask)``. Models are kept in ``models_dir/gpt_scaling_<f>/``.
    Returns one dict per fraction: ``fraction, train_jets, epochs, train_seconds, auc_mean, auc_std,
    mean_multiplicity_generated``."""
    rng = np.random.default_rng(seed)
    out = []
    for i, f in enumerate(fractions):
        if not 0 < f <= 1:
            raise OmnijetError(f"data_scaling: fraction {f} is not in (0, 1]")
        n = max(1, int(round(f * len(seq))))
        pick = np.sort(rng.choice(len(seq), n, replace=False))
        ep = max(1, int(round(epochs / f)))
        model, seconds = ensure_gpt(Path(models_dir) / f"gpt_scaling_{f:g}" / "gpt.safetensors", seq[pick],
                                    seq_mask[pick], config, epochs=ep, batch_size=batch_size,
                                    train_config=train_config, seed=seed, progress=progress)
        s, m, _ = time_generation(model, n_generate, generate_batch_size, temperature, seed=seed + 100 + i)
        gx, gm = decode_generated(tok, s, m)
        ct = classifier_test(real_x, real_mask, gx, gm, seeds=seeds, epochs=classifier_epochs,
                             batch_size=classifier_batch_size, train_config=train_config)
        out.append({"fraction": float(f), "train_jets": int(n), "epochs": ep, "train_seconds": round(seconds, 1),
                    "auc_mean": ct["auc_mean"], "auc_std": ct["auc_std"],
                    "mean_multiplicity_generated": float(gm.sum(1).mean())})
        progress(f"{n} pre-training jets ({ep} epochs): classifier AUC {ct['auc_mean']:.3f} ± {ct['auc_std']:.3f}")
    return out

