"""Score jets by their likelihood under a pre-trained backbone: what ``omnijet score`` runs.

    backbone = open_backbone("data/models/quick/gpt_qcd")
    scores = score_files(backbone, "analysis/*.root")  # one row per jet: file, entry, log p(jet)
    write_scores(scores, "scores.npz")

The likelihood is :func:`~omnijet_lib.models.gpt.log_likelihood`: the jet's tokens (the
constituents the tokenizer reads: the 128 hardest within |eta_rel|, |phi_rel| < 0.8; then stop)
under the backbone, natural log. A backbone trained on
background jets gives anomalous jets a low likelihood; longer jets have more tokens and so a lower
total, which ``per_token`` divides out.
"""

from __future__ import annotations

from ..models.gpt import log_likelihood
from .finetune import score_rows

__all__ = ["score_files"]


def score_files(backbone, files, batch_size: int = 1024, progress=print) -> dict:
    """The likelihood of every jet of ``files`` (JetClass schema) under ``backbone``
    (:func:`~omnijet_lib.training.gpt.open_backbone`), on the backbone's device: ``{"source_file",
    "entry", "label" (the jet's class in its file), "log_likelihood" (total, float64), "per_token",
    "n_tokens" (the constituents read + 1)}``, one row per jet in file order."""

    def likelihood(seq, mask):
        ll = log_likelihood(backbone.gpt, seq, mask, batch_size=batch_size)
        return {"log_likelihood": ll["total"], "per_token": ll["per_token"], "n_tokens": ll["n_tokens"]}

    return score_rows(backbone.tokenizer, files, likelihood, progress)
