"""Plotting helpers: mplhep style, histograms with ratio panels, atomic figure saving."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import mplhep
import numpy as np

from .io import atomic_path

__all__ = ["use_style", "ratio_figure", "hist_with_ratio", "save_figure", "CLASS_COLORS"]

CLASS_COLORS = plt.get_cmap("tab10").colors


def use_style() -> None:
    """The CMS-like mplhep style with a slightly smaller font for multi-panel figures."""
    plt.style.use(mplhep.style.CMS)
    plt.rcParams.update({"font.size": 14, "axes.labelsize": 14, "legend.fontsize": 11,
                         "figure.dpi": 80, "savefig.dpi": 110})


def ratio_figure(ncols: int = 1, width: float = 5.0, height: float = 5.0):
    """A figure with ``ncols`` main panels over ratio panels; returns ``fig, axes (2, ncols)``."""
    fig, axes = plt.subplots(2, ncols, figsize=(width * ncols, height), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
    return fig, axes


def hist_with_ratio(ax, rax, samples: Mapping[str, np.ndarray], bins, reference: str | None = None,
                    xlabel: str = "", density: bool = True, logy: bool = False,
                    styles: Mapping[str, dict] | None = None, ratio_range=(0.5, 1.5)):
    """Step histograms of ``samples`` on ``ax`` and their ratio to ``reference`` on ``rax``.

    Returns ``{label: counts}`` (normalised when ``density``).
    """
    reference = reference or next(iter(samples))
    bins = np.asarray(bins)
    counts = {}
    for i, (label, values) in enumerate(samples.items()):
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        h, _ = np.histogram(values, bins=bins)
        err = np.sqrt(h)
        if density and h.sum() > 0:
            norm = h.sum() * np.diff(bins)
            h, err = h / norm, err / norm
        counts[label] = h
        style = {"color": f"C{i}", **(styles or {}).get(label, {})}
        mplhep.histplot(h, bins, ax=ax, label=label, yerr=err if label == reference else None, **style)
    ref = counts[reference]
    for i, (label, h) in enumerate(counts.items()):
        style = {"color": f"C{i}", **(styles or {}).get(label, {})}
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(ref > 0, h / np.where(ref > 0, ref, 1), np.nan)
        mplhep.histplot(r, bins, ax=rax, **{k: v for k, v in style.items() if k in ("color", "ls", "linestyle")})
    rax.axhline(1.0, color="grey", lw=0.8)
    rax.set_ylim(*ratio_range)
    rax.set_ylabel(f"/ {reference}" if len(reference) < 12 else "ratio", fontsize=11)
    rax.set_xlabel(xlabel)
    ax.set_xlabel("")
    ax.tick_params(labelbottom=False)
    ax.set_ylabel("a.u." if density else "jets")
    if logy:
        ax.set_yscale("log")
    ax.legend(frameon=False)
    ax.set_xlim(bins[0], bins[-1])
    rax.set_xlim(bins[0], bins[-1])
    return counts


def save_figure(fig, path: str | os.PathLike, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path.png`` and ``path.pdf`` (atomically); returns the written paths."""
    path = Path(path)
    out = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight")
        out.append(target)
    return out
