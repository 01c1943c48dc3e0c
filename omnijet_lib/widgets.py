"""Interactive token explorer (ipywidgets + matplotlib): where does a token live in
(pT, η_rel, φ_rel), how much does its reconstruction move with context, and what happens to a
given jet when it is tokenized.

Everything expensive is computed once: the tokens, reconstructions and observables (mass, pT,
τ21, τ32) of all jets when the explorer is built, the token "blobs" once per tokenizer (module
cache). An interaction only redraws the artists that changed over the cached pixels of the static
part of a persistent ``Figure`` and encodes it as PNG into an ``ipywidgets.Image`` (0.05–0.4 s on
a heavily loaded 2-core CPU). An ``Image`` rather than an
``Output`` widget: it updates in place without flicker, needs no display hook, and its PNG
``value`` can be inspected by tests.

Token blob (paper figure 3): a conditional VQ-VAE decodes a token differently in every jet, so
each token is decoded ``n_samples`` times, each time among ``n_context`` randomly drawn codebook
tokens (:func:`omnijet_lib.studies.tokens.token_blobs`). Unconditional and binned tokens
decode to a single point.
"""

from __future__ import annotations

import io
import re
import weakref
from html import escape

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .data.features import constituent_features, to_padded
from .data.jetclass import CLASS_NAMES
from .io import OmnijetError
from .tokenizers.base import reconstruct, tokenize
from .studies.tokens import observables_of, to_physical, token_blobs

__all__ = ["cached_blobs", "parse_token_ids", "TokenExplorer"]

PROJECTIONS = ((0, 1), (0, 2), (1, 2))            # (pT, η_rel), (pT, φ_rel), (η_rel, φ_rel)
AXIS_LABELS = (r"$p_T$ [GeV]", r"$\eta_{\rm rel}$", r"$\phi_{\rm rel}$")
COLORS = matplotlib.colormaps["tab10"].colors
_STYLE = {"font.size": 10, "axes.labelsize": 11, "axes.titlesize": 10, "xtick.labelsize": 9,
          "ytick.labelsize": 9, "legend.fontsize": 9, "figure.dpi": 80, "axes.grid": False}

_BLOB_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- computation
def cached_blobs(tokenizer, n_samples: int = 500, n_context: int = 50, seed: int = 0,
                 batch_size: int = 1024) -> np.ndarray:
    """:func:`~omnijet_lib.studies.tokens.token_blobs` of the whole codebook,
    ``(K, S, 3)`` scaled features, decoded once per tokenizer and settings (module cache)."""
    key = (n_samples, n_context, seed)
    cache = _BLOB_CACHE.setdefault(tokenizer, {})
    if key not in cache:
        cache[key] = token_blobs(tokenizer, samples=n_samples, context=n_context, seed=seed,
                                 batch_size=batch_size)[1]
    return cache[key]


def parse_token_ids(text: str, num_codes: int, max_ids: int = 10) -> list[int]:
    """``"12, 40 7"`` -> ``[12, 40, 7]``; raises :class:`OmnijetError` with a one-line message."""
    parts = [p for p in re.split(r"[,;\s]+", str(text).strip()) if p]
    if not parts:
        raise OmnijetError("no token id given: type ids such as 12, 40, 7")
    ids = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise OmnijetError(f"'{p}' is not a token id (an integer 0..{num_codes - 1})") from None
        if not 0 <= v < num_codes:
            raise OmnijetError(f"token id {v} is out of range: this tokenizer has ids 0..{num_codes - 1}")
        if v not in ids:
            ids.append(v)
    if len(ids) > max_ids:
        raise OmnijetError(f"{len(ids)} token ids given, at most {max_ids} at once")
    return ids


class _BlitFigure:
    """A figure rendered to PNG whose static part is drawn once: every update restores the
    cached pixels and draws only the given (animated) artists on top."""

    def __init__(self, fig: Figure):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.fig, self.canvas, self._background = fig, FigureCanvasAgg(fig), None

    def png(self, artists) -> bytes:
        from PIL import Image

        if self._background is None:
            self.canvas.draw()                                   # skips the animated artists
            self._background = self.canvas.copy_from_bbox(self.fig.bbox)
        else:
            self.canvas.restore_region(self._background)
        for a in artists:
            self.fig.draw_artist(a)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(self.canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        return buf.getvalue()


# --------------------------------------------------------------------------- the explorer
class TokenExplorer:
    """Interactive view of a tokenizer on a set of jets.

    ``jets``: the jet array of :func:`omnijet_lib.data.load_dataset` / ``read_jetclass`` (labels
    from ``jets.label``), or a tuple ``(x, mask, labels)`` of padded scaled features (N, L, 3),
    mask (N, L) and class labels (N,). ``n_samples``/``n_context``: blob size (paper: 500
    decodings among 50 random tokens). ``blobs`` may be given precomputed, ``(K, S, 3)`` features.

    ``explorer.widget`` is the top-level widget; ``select_tokens``, ``select_jet`` and
    ``select_constituent`` drive it from code; ``snapshot(path)`` writes a static PNG + PDF.
    """

    def __init__(self, tokenizer, jets, *, n_samples: int = 500, n_context: int = 50, seed: int = 0,
                 blobs: np.ndarray | None = None, max_ids: int = 10, max_labels: int = 20,
                 batch_size: int = 1024):
        if isinstance(jets, tuple):
            if len(jets) != 3:
                raise OmnijetError("TokenExplorer: jets must be a jet array or a tuple (x, mask, labels)")
            x, mask, labels = (np.asarray(a) for a in jets)
        else:
            x, mask = to_padded(constituent_features(jets))
            labels = np.asarray(jets.label)
        if x.ndim != 3 or mask.shape != x.shape[:2] or labels.shape != (len(x),):
            raise OmnijetError(f"TokenExplorer: x {x.shape}, mask {mask.shape}, labels {labels.shape} must be "
                               f"(N, L, 3), (N, L), (N,)")
        keep = mask.any(1)                                   # a jet without constituents shows nothing
        if not keep.any():
            raise OmnijetError("TokenExplorer: no jet has constituents")
        self.tokenizer, self.num_codes = tokenizer, tokenizer.num_codes
        self.max_ids, self.max_labels = max_ids, max_labels
        self.x, self.mask, self.labels = x[keep].astype(np.float32), mask[keep].astype(bool), labels[keep].astype(int)
        self.tokens = tokenize(tokenizer, self.x, self.mask, batch_size=batch_size)        # (N, L)
        self.x_rec = reconstruct(tokenizer, self.tokens, self.mask, batch_size=batch_size)  # (N, L, 3)
        self.blobs = cached_blobs(tokenizer, n_samples, n_context, seed, batch_size) if blobs is None \
            else np.asarray(blobs, np.float32)
        if self.blobs.ndim != 3 or self.blobs.shape[0] != self.num_codes or self.blobs.shape[2] != 3:
            raise OmnijetError(f"TokenExplorer: blobs {self.blobs.shape} must be (K={self.num_codes}, S, 3)")
        self.blobs_phys = to_physical(self.blobs)                      # (K, S, 3)
        self.blob_mean = self.blobs_phys.mean(1)                                # (K, 3)
        self.blob_std = self.blobs_phys.std(1)                                  # (K, 3)
        self.token_counts = np.bincount(self.tokens[self.mask], minlength=self.num_codes)
        self._class_jets = {c: np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}
        keys = ("mass", "pt", "tau21", "tau32")
        self.obs_original = {k: v for k, v in observables_of(self.x, self.mask).items() if k in keys}    # (N,) each
        self.obs_reconstructed = {k: v for k, v in observables_of(self.x_rec, self.mask).items() if k in keys}
        self._ranges = self._axis_ranges()
        self._background = self._background_hists()
        # state (the widgets below keep it)
        self.selected_ids: list[int] = [int(np.argmax(self.token_counts))]
        self.jet_index = int(next(iter(self._class_jets.values()))[0])
        self.constituent: int | None = None
        self.message = ""
        self._build_widgets()

    # ---------------------------------------------------------------- cached helpers
    def _axis_ranges(self) -> list[tuple[float, float]]:
        """Fixed plot ranges covering the blobs and the data (so highlighting never rescales)."""
        pts = np.concatenate([self.blobs_phys.reshape(-1, 3), to_physical(self.x[self.mask])])
        lo, hi = np.percentile(pts, 0.2, axis=0), np.percentile(pts, 99.8, axis=0)
        pt_lo, pt_hi = max(lo[0] / 1.5, 1e-2), hi[0] * 1.5
        pad = 0.05 * (hi[1:] - lo[1:]) + 1e-3
        return [(pt_lo, pt_hi), (lo[1] - pad[0], hi[1] + pad[0]), (lo[2] - pad[1], hi[2] + pad[1])]

    def _edges(self, dim: int, n: int = 80) -> np.ndarray:
        lo, hi = self._ranges[dim]
        return np.geomspace(lo, hi, n + 1) if dim == 0 else np.linspace(lo, hi, n + 1)

    def _background_hists(self) -> list[tuple]:
        """Per projection: (x edges, y edges, log10 counts) of all tokens' blob points."""
        pts = self.blobs_phys.reshape(-1, 3)
        out = []
        for i, j in PROJECTIONS:
            ex, ey = self._edges(i), self._edges(j)
            h, _, _ = np.histogram2d(pts[:, i], pts[:, j], bins=(ex, ey))
            out.append((ex, ey, np.ma.masked_equal(np.log10(h.T + 1), 0)))
        return out

    def jet_observables(self, index: int) -> tuple[dict, dict]:
        """(original, reconstructed) mass, pT [GeV], τ21, τ32 of jet ``index``."""
        return ({k: float(v[index]) for k, v in self.obs_original.items()},
                {k: float(v[index]) for k, v in self.obs_reconstructed.items()})

    def jets_of_class(self, label: int) -> np.ndarray:
        return self._class_jets.get(int(label), np.zeros(0, int))

    # ---------------------------------------------------------------- widgets
    def _build_widgets(self) -> None:
        import ipywidgets as w

        K = self.num_codes
        first = self.selected_ids[0]
        self.token_slider = w.IntSlider(value=first, min=0, max=K - 1, description="token",
                                        continuous_update=False, layout=w.Layout(width="420px"))
        self.token_text = w.Text(value=str(first), description="token ids", placeholder="e.g. 12, 40, 7",
                                 continuous_update=False, layout=w.Layout(width="300px"))
        self.token_message = w.HTML()
        classes = [(CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else f"class {c}", int(c)) for c in self._class_jets]
        self.class_dropdown = w.Dropdown(options=classes, value=int(self.labels[self.jet_index]),
                                         description="class")
        n_first = len(self.jets_of_class(self.class_dropdown.value))
        self.jet_slider = w.IntSlider(value=0, min=0, max=max(n_first - 1, 0),
                                      description="jet", continuous_update=False)
        self.constituent_dropdown = w.Dropdown(description="constituent", layout=w.Layout(width="420px"))
        self.jet_message = w.HTML()
        self.token_image = w.Image(format="png")
        self.jet_image = w.Image(format="png")
        self._syncing = False
        self.token_fig, self.token_handles = self._new_token_figure()
        self.jet_fig, self.jet_handles = self._new_jet_figure()
        self._fill_constituents()
        self._update_tokens(self.selected_ids)
        self._update_jet()

        self.token_slider.observe(self._on_slider, "value")
        self.token_text.observe(self._on_text, "value")
        self.class_dropdown.observe(self._on_class, "value")
        self.jet_slider.observe(self._on_jet, "value")
        self.constituent_dropdown.observe(self._on_constituent, "value")
        self.widget = w.VBox([
            w.HTML(f"<b>Token explorer</b> — {escape(getattr(self.tokenizer, 'kind', 'tokenizer'))} tokenizer, "
                   f"{K} codes, {len(self.x)} jets, blobs of {self.blobs.shape[1]} decodings"),
            w.HBox([self.token_slider, self.token_text]), self.token_message, self.token_image,
            w.HBox([self.class_dropdown, self.jet_slider, self.constituent_dropdown]), self.jet_message,
            self.jet_image,
        ])

    # programmatic control (the same paths the widgets take)
    def select_tokens(self, ids) -> None:
        """Highlight token ids (int, list, or text such as "12, 40")."""
        self.token_text.value = ids if isinstance(ids, str) else ", ".join(str(i) for i in np.atleast_1d(ids))

    def select_jet(self, label: int, index: int = 0) -> None:
        """Show the ``index``-th jet of class ``label``."""
        n = len(self.jets_of_class(label))
        if not 0 <= index < n:
            raise OmnijetError(f"select_jet: class {label} has {n} jets in the explorer, no index {index}")
        self.class_dropdown.value = int(label)
        self.jet_slider.value = int(index)

    def select_constituent(self, i: int | None) -> None:
        """Highlight constituent ``i`` of the current jet (None: none) and its token's blob."""
        self.constituent_dropdown.value = -1 if i is None else int(i)

    # observers
    def _on_slider(self, change) -> None:
        if not self._syncing:
            self.token_text.value = str(change["new"])

    def _on_text(self, change) -> None:
        try:
            ids = parse_token_ids(change["new"], self.num_codes, self.max_ids)
        except OmnijetError as err:
            self.message = str(err)
            self.token_message.value = (f"<span style='color:#b00020'><b>Invalid token ids:</b> "
                                        f"{escape(str(err))}</span>")
            return
        self._syncing = True
        try:
            self.token_slider.value = ids[0]
        finally:
            self._syncing = False
        self._update_tokens(ids)

    def _on_class(self, change) -> None:
        n = len(self.jets_of_class(change["new"]))
        self._syncing = True
        try:
            self.jet_slider.value = 0
            self.jet_slider.max = max(n - 1, 0)
        finally:
            self._syncing = False
        self._set_jet()

    def _on_jet(self, change) -> None:
        if not self._syncing:
            self._set_jet()

    def _set_jet(self) -> None:
        self.jet_index = int(self.jets_of_class(self.class_dropdown.value)[self.jet_slider.value])
        self._syncing = True
        try:
            self._fill_constituents()
        finally:
            self._syncing = False
        self.constituent = None
        self._update_jet()
        self._update_tokens(self.selected_ids)

    def _on_constituent(self, change) -> None:
        if self._syncing:
            return
        self.constituent = None if change["new"] in (None, -1) else int(change["new"])
        self._update_jet()
        if self.constituent is None:
            self._update_tokens(self.selected_ids)
        else:  # its token's blob; the text update re-renders the token figure
            token = str(int(self.tokens[self.jet_index, self.constituent]))
            if self.token_text.value == token:
                self._update_tokens(self.selected_ids)
            self.token_text.value = token

    def _fill_constituents(self) -> None:
        i = self.jet_index
        n = int(self.mask[i].sum())
        pt = to_physical(self.x[i, :n])[:, 0]
        opts = [("— none —", -1)] + [(f"#{c}: token {int(self.tokens[i, c])}, pT {pt[c]:.1f} GeV", c)
                                     for c in range(n)]
        self.constituent_dropdown.options = opts
        self.constituent_dropdown.value = -1

    # ---------------------------------------------------------------- figures
    # Each builder draws the static part (background, axes, labels) and returns the handles of
    # the artists an interaction changes; in the widget those are ``animated`` so that only
    # they are redrawn over the cached static image (see :class:`_BlitFigure`).
    def _new_token_figure(self):
        with matplotlib.rc_context(_STYLE):
            fig = Figure(figsize=(13, 4.0))
            axes = fig.subplots(1, 3)
            fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.9, wspace=0.28)
            return _BlitFigure(fig), self._draw_token_axes(axes, animated=True)

    def _draw_token_axes(self, axes, animated: bool = False) -> dict:
        h = {"axes": axes, "scatter": [], "orig": [], "rec": [], "labels": [], "animated": animated}
        for ax, (i, j), (ex, ey, hist) in zip(axes, PROJECTIONS, self._background):
            ax.pcolormesh(ex, ey, hist, cmap="Greys", vmin=0, vmax=float(hist.max() or 1) * 1.3, rasterized=True)
            size = 4 if self.blobs.shape[1] > 1 else 60                      # single points: unconditional, binned
            h["scatter"].append(ax.scatter(np.zeros(0), np.zeros(0), s=size, alpha=0.5, linewidths=0,
                                           animated=animated))
            h["orig"].append(ax.plot([], [], "*", ms=14, mfc="none", mec="k", mew=1.5, animated=animated)[0])
            h["rec"].append(ax.plot([], [], "x", ms=10, color="k", mew=2, animated=animated)[0])
            if i == 0:
                ax.set_xscale("log")
            ax.set_xlim(*self._ranges[i])
            ax.set_ylim(*self._ranges[j])
            ax.set_xlabel(AXIS_LABELS[i])
            ax.set_ylabel(AXIS_LABELS[j])
        h["title"] = axes[1].text(0.5, 1.03, "", transform=axes[1].transAxes, ha="center", va="bottom",
                                  fontsize=11, animated=animated)
        return h

    def _update_token_axes(self, h: dict, ids: list[int]) -> list:
        """Point the token artists at blobs ``ids``; returns the artists to draw."""
        pts = self.blobs_phys[ids]                                          # (n, S, 3)
        colors = np.repeat(np.array([COLORS[k % len(COLORS)] for k in range(len(ids))]), pts.shape[1], axis=0)
        for t in h["labels"]:
            t.remove()
        h["labels"] = []
        c = self.constituent
        for ax, sc, o, r, (i, j) in zip(h["axes"], h["scatter"], h["orig"], h["rec"], PROJECTIONS):
            sc.set_offsets(pts[..., [i, j]].reshape(-1, 2))
            sc.set_facecolors(colors)
            for k, tid in enumerate(ids):
                m = self.blob_mean[tid]
                h["labels"].append(ax.annotate(str(tid), (m[i], m[j]), xytext=(4, 4), textcoords="offset points",
                                               fontsize=10, fontweight="bold", color=COLORS[k % len(COLORS)],
                                               animated=h["animated"]))
            if c is None:
                o.set_data([], [])
                r.set_data([], [])
            else:
                po = to_physical(self.x[self.jet_index, c])
                pr = to_physical(self.x_rec[self.jet_index, c])
                o.set_data([po[i]], [po[j]])
                r.set_data([pr[i]], [pr[j]])
        marks = "" if c is None else f"; star: constituent #{c} of jet {self.jet_index}, x: its reconstruction"
        h["title"].set_text("token " + ", ".join(str(t) for t in ids) + " over all tokens (grey)" + marks)
        return h["scatter"] + h["orig"] + h["rec"] + h["labels"] + [h["title"]]

    def _new_jet_figure(self):
        with matplotlib.rc_context(_STYLE):
            fig = Figure(figsize=(11, 5.4))
            axes = fig.subplots(1, 2, sharex=True, sharey=True)
            fig.subplots_adjust(left=0.07, right=0.99, bottom=0.1, top=0.86, wspace=0.08)
            return _BlitFigure(fig), self._draw_jet_axes(axes, animated=True)

    def _draw_jet_axes(self, axes, animated: bool = False) -> dict:
        h = {"axes": axes, "labels": [], "titles": [], "animated": animated}
        lim = 0.8
        h["ghost"] = axes[1].scatter(np.zeros(0), np.zeros(0), s=1, facecolors="none", edgecolors="0.7",
                                     linewidths=0.8, animated=animated)
        h["scatter"] = [ax.scatter(np.zeros(0), np.zeros(0), s=1, alpha=0.8, edgecolors="k", linewidths=0.4,
                                   animated=animated) for ax in axes]
        h["ring"] = [ax.plot([], [], "o", ms=18, mfc="none", mec="red", mew=2, animated=animated)[0] for ax in axes]
        for ax in axes:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xlabel(AXIS_LABELS[1])
            h["titles"].append(ax.text(0.5, 1.02, "", transform=ax.transAxes, ha="center", va="bottom",
                                       fontsize=10, animated=animated))
        axes[0].set_ylabel(AXIS_LABELS[2])
        h["header"] = axes[0].text(1.04, 1.11, "", transform=axes[0].transAxes, ha="center", va="bottom",
                                   fontsize=11, animated=animated)
        return h

    def _update_jet_axes(self, h: dict) -> list:
        """Point the jet artists at the current jet and constituent; returns the artists to draw."""
        i = self.jet_index
        n = int(self.mask[i].sum())
        orig, rec = to_physical(self.x[i, :n]), to_physical(self.x_rec[i, :n])
        scale = 600.0 / max(orig[:, 0].max(), 1e-6)                        # hardest constituent: 600 pt²
        tokens = self.tokens[i, :n]
        # colour = the original constituent's pT (log, 3 decades), so a constituent keeps its colour in both panels
        cols = matplotlib.colormaps["viridis"](np.clip(1 + np.log10(orig[:, 0] / orig[:, 0].max()) / 3, 0, 1))
        for t in h["labels"]:
            t.remove()
        h["labels"] = []
        h["ghost"].set_offsets(orig[:, 1:])
        h["ghost"].set_sizes(np.clip(orig[:, 0] * scale, 4, 900))
        obs = self.jet_observables(i)
        for ax, sc, ring, p, title, o, name in zip(h["axes"], h["scatter"], h["ring"], (orig, rec), h["titles"], obs,
                                                   ("original", "reconstructed")):
            sc.set_offsets(p[:, 1:])
            sc.set_sizes(np.clip(p[:, 0] * scale, 4, 900))
            sc.set_facecolors(cols)
            for c in np.argsort(-orig[:, 0])[: self.max_labels]:           # the hardest ones
                h["labels"].append(ax.annotate(str(int(tokens[c])), p[c, 1:], xytext=(3, 3), textcoords="offset points",
                                               fontsize=7, color="0.2", annotation_clip=True,
                                               animated=h["animated"]))
            if self.constituent is None:
                ring.set_data([], [])
            else:
                ring.set_data([p[self.constituent, 1]], [p[self.constituent, 2]])
            title.set_text(f"{name}: m {o['mass']:.1f} GeV, pT {o['pt']:.0f} GeV, "
                           f"τ21 {o['tau21']:.2f}, τ32 {o['tau32']:.2f}")
        label = int(self.labels[i])
        h["header"].set_text(f"jet {i} ({CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else label}), "
                             f"{n} constituents; marker area ~ pT, labels: token ids of the {self.max_labels} hardest")
        return [h["ghost"]] + h["scatter"] + h["ring"] + h["labels"] + h["titles"] + [h["header"]]

    def _update_tokens(self, ids: list[int]) -> None:
        self.selected_ids = list(ids)
        self.token_image.value = self.token_fig.png(self._update_token_axes(self.token_handles, self.selected_ids))
        self.message = ""
        self.token_message.value = self._spread_table(self.selected_ids)

    def _update_jet(self) -> None:
        self.jet_image.value = self.jet_fig.png(self._update_jet_axes(self.jet_handles))
        self.jet_message.value = self._observables_table(self.jet_index)

    # ---------------------------------------------------------------- text
    def _spread_table(self, ids: list[int]) -> str:
        rows = "".join(
            f"<tr><td style='color:{matplotlib.colors.to_hex(COLORS[k % len(COLORS)])}'><b>{t}</b></td>"
            f"<td>{self.token_counts[t]}</td>"
            + "".join(f"<td>{self.blob_mean[t, d]:.3g}</td><td>{self.blob_std[t, d]:.3g}</td>" for d in range(3))
            + "</tr>" for k, t in enumerate(ids))
        return ("<table style='font-family:monospace'><tr><th>token</th><th>count in jets</th><th>pT [GeV]</th>"
                "<th>σ pT</th><th>η_rel</th><th>σ η_rel</th><th>φ_rel</th><th>σ φ_rel</th></tr>"
                + rows + "</table>")

    def _observables_table(self, index: int) -> str:
        o, r = self.jet_observables(index)
        rows = "".join(f"<tr><td>{name}</td><td>{o[k]:.3g}</td><td>{r[k]:.3g}</td><td>{r[k] - o[k]:+.3g}</td></tr>"
                       for k, name in (("mass", "mass [GeV]"), ("pt", "pT [GeV]"), ("tau21", "τ21"),
                                       ("tau32", "τ32")))
        return ("<table style='font-family:monospace'><tr><th></th><th>original</th><th>reconstructed</th>"
                "<th>Δ</th></tr>" + rows + "</table>")

    def spread_text(self) -> str:
        """Plain-text spread (std) of the selected blobs, one line per token."""
        return "\n".join(f"token {t}: σ(pT) {self.blob_std[t, 0]:.3g} GeV, σ(η_rel) {self.blob_std[t, 1]:.3g}, "
                         f"σ(φ_rel) {self.blob_std[t, 2]:.3g}" for t in self.selected_ids)

    # ---------------------------------------------------------------- static figure
    def snapshot(self, path):
        """The current view as one static figure (token projections over the jet), saved as
        ``path.png`` and ``path.pdf``; returns the figure."""
        from .plotting import save_figure

        with matplotlib.rc_context(_STYLE):
            fig = Figure(figsize=(13, 9.5))
            grid = fig.add_gridspec(2, 6, height_ratios=[1, 1.25], hspace=0.45, wspace=0.8,
                                    left=0.06, right=0.98, bottom=0.06, top=0.93)
            taxes = [fig.add_subplot(grid[0, 2 * k:2 * k + 2]) for k in range(3)]
            jaxes = [fig.add_subplot(grid[1, 0:3])]
            jaxes.append(fig.add_subplot(grid[1, 3:6], sharex=jaxes[0], sharey=jaxes[0]))
            self._update_token_axes(self._draw_token_axes(taxes), self.selected_ids)
            self._update_jet_axes(self._draw_jet_axes(jaxes))
            save_figure(fig, path)
        return fig
