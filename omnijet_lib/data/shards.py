"""Token shards on disk and a streaming dataset over them, for training sets that do not fit in memory.

A *token shard* is one ``.npz`` (an uncompressed zip of ``.npy`` arrays, no pickle) holding the
tokenized jets of one chunk of one ROOT file, jagged-packed:

* ``tokens``    (M,) int16 (int32 when K > 32767) -- codebook ids 0…K-1, jet after jet, pT order,
* ``counts``    (N,) int16 -- tokens per jet (sum = M; 0 when every constituent failed the cuts),
* ``labels``    (N,) int8  -- JetClass class index,
* ``entry``     (N,) int32 -- the jet's entry in its ROOT file's tree,
* ``num_codes`` ()   int64 -- K, so a shard can be checked without its manifest.

About 2 bytes per constituent (12 for float features). Shards are written atomically with fixed
zip timestamps, so the same input gives byte-identical files. ``manifest.json`` beside them
(written by :mod:`omnijet_lib.tokenizers.streaming`) lists inputs, shards, counts, classes and
the tokenizer's sha256.

:class:`TokenShardDataset` streams GPT-ready batches (start 0, codes + 1, stop K + 1; trimmed to
the longest jet of the batch) from shards, splitting the work across DDP ranks and DataLoader
workers without duplicates, shuffling within a buffer, deterministic for ``(seed, epoch)``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..io import OmnijetError, atomic_path
from .paths import input_files

log = logging.getLogger(__name__)

__all__ = ["SHARD_FIELDS", "MANIFEST", "write_shard", "read_shard", "read_manifest", "shard_paths",
           "TokenShardDataset", "ShardLoader"]

SHARD_FIELDS = ("tokens", "counts", "labels", "entry", "num_codes")
MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: np.savez stamps the current time, we want identical bytes


# --------------------------------------------------------------------------- shard files
def write_shard(path: str | os.PathLike, tokens, counts, labels, entry, num_codes: int) -> Path:
    """Write one shard atomically and deterministically (see the module docstring for the fields).

    ``tokens`` are the flat codebook ids of all jets, ``counts`` the number per jet."""
    counts = np.asarray(counts)
    tokens = np.asarray(tokens)
    if counts.sum() != len(tokens) or len(labels) != len(counts) or len(entry) != len(counts):
        raise OmnijetError(f"{path}: shard arrays disagree ({len(tokens)} tokens, sum of counts "
                           f"{int(counts.sum())}, {len(counts)} jets, {len(labels)} labels, {len(entry)} entries)")
    arrays = {
        "tokens": tokens.astype(np.int16 if num_codes <= np.iinfo(np.int16).max + 1 else np.int32),
        "counts": counts.astype(np.int16),
        "labels": np.asarray(labels).astype(np.int8),
        "entry": np.asarray(entry).astype(np.int32),
        "num_codes": np.asarray(num_codes, np.int64),
    }
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    return path


def read_shard(path: str | os.PathLike, num_codes: int | None = None, fields: Sequence[str] = SHARD_FIELDS) -> dict:
    """Load (some ``fields`` of) a shard as numpy arrays, checked: consistent lengths and every
    token id in ``0 … K-1`` (``K`` = ``num_codes`` if given, which must equal the shard's own).

    Any problem raises a one-line :class:`OmnijetError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise OmnijetError(f"{path}: token shard not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f for f in SHARD_FIELDS if f not in z.files]
            if missing:
                raise OmnijetError(f"{path}: not a token shard (missing {', '.join(missing)})")
            need = set(fields) | {"counts", "num_codes"}
            out = {k: z[k] for k in SHARD_FIELDS if k in need}
    except OmnijetError:
        raise
    except Exception as err:  # not a zip, truncated, a pickled object array, ...
        raise OmnijetError(f"{path}: not a readable token shard ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'empty'})") from None
    K = int(out["num_codes"])
    if num_codes is not None and K != num_codes:
        raise OmnijetError(f"{path}: shard was tokenized with {K} codes, expected {num_codes}")
    for k, v in out.items():
        if v.dtype.kind not in "iu":
            raise OmnijetError(f"{path}: field {k} has dtype {v.dtype}, expected integers")
    n = len(out["counts"])
    if (out["counts"] < 0).any():
        raise OmnijetError(f"{path}: negative token counts")
    for k in ("labels", "entry"):
        if k in out and len(out[k]) != n:
            raise OmnijetError(f"{path}: {len(out[k])} {k} for {n} jets")
    if "tokens" in out:
        t = out["tokens"]
        if len(t) != int(out["counts"].sum()):
            raise OmnijetError(f"{path}: {len(t)} tokens but the counts add up to {int(out['counts'].sum())}")
        if len(t) and (t.min() < 0 or t.max() >= K):
            bad = int(t.min()) if t.min() < 0 else int(t.max())
            raise OmnijetError(f"{path}: token id {bad} out of range 0..{K - 1}")
    return {k: v for k, v in out.items() if k in fields}


def read_manifest(directory: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a shard directory (one-line error when missing or broken)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise OmnijetError(f"{path}: no shard manifest (run `omnijet tokenize` into {directory} first)")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OmnijetError(f"{path}: manifest is not valid JSON ({err})") from None
    if not isinstance(man, dict) or "shards" not in man or "num_codes" not in man:
        raise OmnijetError(f"{path}: not a token-shard manifest (no 'shards'/'num_codes')")
    if not isinstance(man["shards"], list):
        raise OmnijetError(f"{path}: 'shards' must be a list")
    for i, shard in enumerate(man["shards"]):  # a shared manifest names files in its own folder, nowhere else
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not name.endswith(".npz") or Path(name).name != name or "\\" in name:
            raise OmnijetError(f"{path}: shard {i} is named {name!r}, not a .npz file name inside {Path(directory)}")
    return man


def shard_paths(shards) -> tuple[list[Path], int | None]:
    """``(shard files, K or None)`` from a shard directory (its manifest's finished shards, in
    order), a glob, or a list of ``.npz`` files."""
    if isinstance(shards, (str, os.PathLike)) and Path(shards).is_dir():
        man = read_manifest(shards)
        if not man.get("complete", False):
            log.warning("%s: tokenization is not finished; using the %d shards done so far", shards, len(man["shards"]))
        return [Path(shards) / s["name"] for s in man["shards"]], int(man["num_codes"])
    return input_files(shards, suffix=".npz"), None


# --------------------------------------------------------------------------- streaming dataset
class TokenShardDataset(IterableDataset):
    """GPT-ready batches streamed from token shards; memory ~ one shard + one shuffle buffer.

    Each item is a batch ``{"x": (B, T) long, "mask": (B, T) bool, "label": (B,) long,
    "index": (B,) long}``: ``x`` = [start 0, codes + 1 …, stop K + 1] padded with the stop id,
    ``mask`` True on start…stop, ``T`` = longest jet of the batch + 2 (trimmed), ``index`` the
    jet's position in the whole shard set (shard order, then row). This is what
    :class:`~omnijet_lib.training.gpt.GPTModule` and the transfer classifier consume.

    Work split. The shards are cut into *units* of at most ``unit_jets`` rows. Every epoch the
    units are permuted with ``(seed, epoch)`` (identically on every rank and worker) and dealt
    round-robin to the ``num_replicas × num_workers`` slots, so each jet goes to exactly one
    (rank, worker). A slot fills a buffer of ``pool_batches × batch_size`` jets, shuffles it,
    sorts it by length (so batches are length-bucketed and trimmed), cuts it into batches and
    shuffles their order. Under DDP (``num_replicas > 1``) every rank must take the same number
    of steps, so worker ``w`` of every rank stops after the smallest batch count among the
    ranks' ``w``-th slots; the jets this leaves out (at most about one unit per slot) change
    from epoch to epoch.

    ``num_replicas``/``rank`` default to ``torch.distributed`` when it is initialised;
    :func:`omnijet_lib.training.fit` sets them from the trainer. ``set_epoch`` (called by
    Lightning through :class:`ShardLoader`) changes the order. ``classes`` keeps those labels
    only (e.g. ``[0, 8]`` for q/g and t→bqq').
    """

    def __init__(self, shards, batch_size: int = 256, *, num_codes: int | None = None, shuffle: bool = True,
                 seed: int = 0, pool_batches: int = 50, unit_jets: int = 10_000, drop_last: bool = False,
                 classes: Sequence[int] | None = None, num_workers: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        if batch_size <= 0 or pool_batches <= 0 or unit_jets <= 0:
            raise OmnijetError(f"TokenShardDataset: batch_size, pool_batches and unit_jets must be positive "
                               f"(got {batch_size}, {pool_batches}, {unit_jets})")
        self.paths, manifest_k = shard_paths(shards)
        if num_codes is not None and manifest_k is not None and num_codes != manifest_k:
            raise OmnijetError(f"{shards}: shards hold {manifest_k} codes, expected {num_codes}")
        self.num_codes = num_codes if num_codes is not None else manifest_k
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pool = pool_batches * batch_size
        self.drop_last = drop_last
        self.classes = None if classes is None else np.asarray(sorted(set(int(c) for c in classes)))
        self.num_workers = num_workers
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        # units (shard, start, stop, selected jets) from the labels only: cheap, and it fixes every
        # slot's batch count before any token is read
        units, self.offsets, offset = [], [], 0
        for i, p in enumerate(self.paths):
            d = read_shard(p, self.num_codes, fields=("labels",))
            if self.num_codes is None:
                self.num_codes = int(read_shard(p, fields=("num_codes",))["num_codes"])
            keep = np.ones(len(d["labels"]), bool) if self.classes is None else np.isin(d["labels"], self.classes)
            for s in range(0, len(keep), unit_jets):
                units.append((i, s, min(s + unit_jets, len(keep)), int(keep[s:s + unit_jets].sum())))
            self.offsets.append(offset)
            offset += len(keep)
        self.units = np.array(units, np.int64).reshape(-1, 4)
        self.num_jets = int(self.units[:, 3].sum())

    # ---- bookkeeping shared by __len__ and __iter__ (pure functions of seed, epoch, slots)
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _world(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return int(self.num_replicas), int(self.rank or 0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _unit_order(self) -> np.ndarray:
        n = len(self.units)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _slot_units(self, n_slots: int) -> list[np.ndarray]:
        order = self._unit_order()
        return [order[s::n_slots] for s in range(n_slots)]

    def _n_batches(self, jets: int) -> int:
        return jets // self.batch_size if self.drop_last else math.ceil(jets / self.batch_size)

    def _caps(self, workers: int) -> tuple[int, int, list[int]]:
        """(world, rank, batches of each of this rank's workers)."""
        world, rank = self._world()
        slots = self._slot_units(world * workers)  # slot = worker * world + rank
        counts = [[self._n_batches(int(self.units[slots[w * world + r], 3].sum())) for r in range(world)]
                  for w in range(workers)]
        caps = [min(c) if world > 1 else c[rank] for c in counts]
        return world, rank, caps

    def rank_shards(self) -> list[str]:
        """Names of the shard files this rank reads in the current epoch (all its workers)."""
        world, rank = self._world()
        workers = max(self.num_workers, 1)
        slots = self._slot_units(world * workers)
        units = np.concatenate([slots[w * world + rank] for w in range(workers)])
        return sorted({self.paths[int(self.units[u, 0])].name for u in units})

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (with ``num_workers`` workers)."""
        return sum(self._caps(max(self.num_workers, 1))[2])

    # ---- streaming
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        world, rank, caps = self._caps(workers)
        units = self._slot_units(world * workers)[worker * world + rank]
        rng = np.random.default_rng([self.seed, self.epoch, worker * world + rank, 1])
        n = 0
        for batch in self._batches(units, rng):
            if n >= caps[worker]:
                return
            n += 1
            yield batch

    def _jets(self, units: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(tokens flat, counts, labels, global index) of each unit, in the given order."""
        cached = (None, None)
        for u in units:
            i, s, e, _ = (int(v) for v in self.units[u])
            if cached[0] != i:  # consecutive units of one shard are read once
                cached = (i, read_shard(self.paths[i], self.num_codes, fields=("tokens", "counts", "labels")))
            d = cached[1]
            starts = np.concatenate([[0], np.cumsum(d["counts"], dtype=np.int64)])
            counts, labels = d["counts"][s:e].astype(np.int64), d["labels"][s:e].astype(np.int64)
            tokens = d["tokens"][starts[s]:starts[e]]
            index = self.offsets[i] + np.arange(s, e)
            if self.classes is not None:
                keep = np.isin(labels, self.classes)
                tokens = tokens[np.repeat(keep, counts)]
                counts, labels, index = counts[keep], labels[keep], index[keep]
            yield tokens, counts, labels, index

    def _batches(self, units: np.ndarray, rng: np.random.Generator) -> Iterator[dict]:
        buf: list[tuple] = []
        held = 0
        for part in self._jets(units):
            buf.append(part)
            held += len(part[1])
            while held >= self.pool:
                pool, buf, held = _take(buf, self.pool)
                yield from self._pool_batches(pool, rng, last=False)
        if held:
            yield from self._pool_batches(_take(buf, held)[0], rng, last=True)

    def _pool_batches(self, pool, rng, last: bool) -> Iterator[dict]:
        tokens, counts, labels, index = pool
        n = len(counts)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[np.argsort(-counts[order], kind="stable")]  # bucket by length, random ties
        cuts = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and last:
            cuts = [c for c in cuts if len(c) == self.batch_size]
        if self.shuffle:
            cuts = [cuts[i] for i in rng.permutation(len(cuts))]
        starts = np.concatenate([[0], np.cumsum(counts)])
        for idx in cuts:
            yield self._sequences(tokens, starts, counts, idx, labels, index)

    def _sequences(self, tokens, starts, counts, idx, labels, index) -> dict:
        c = counts[idx]                                    # (B,)
        B, T = len(idx), int(c.max()) + 2
        stop = self.num_codes + 1
        x = np.full((B, T), stop, np.int64)                # (B, T): start, codes + 1, stop, stop…
        x[:, 0] = 0
        rows = np.repeat(np.arange(B), c)
        cols = 1 + np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        src = np.repeat(starts[idx], c) + cols - 1
        x[rows, cols] = tokens[src].astype(np.int64) + 1
        mask = np.arange(T)[None, :] <= (c + 1)[:, None]   # (B, T) start … stop
        return {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask),
                "label": torch.from_numpy(labels[idx]), "index": torch.from_numpy(index[idx])}


def _take(buf: list[tuple], n: int) -> tuple[tuple, list[tuple], int]:
    """Concatenate the first ``n`` jets of the buffered parts; return (pool, rest, jets left)."""
    tokens, counts, labels, index = (np.concatenate(a) for a in zip(*buf))
    split = int(counts[:n].sum())
    pool = (tokens[:split], counts[:n], labels[:n], index[:n])
    rest = [(tokens[split:], counts[n:], labels[n:], index[n:])] if len(counts) > n else []
    return pool, rest, len(counts) - n


class ShardLoader:
    """``DataLoader(dataset, batch_size=None, num_workers=…)`` for a :class:`TokenShardDataset`,
    with the hooks Lightning and :func:`~omnijet_lib.training.fit` use: ``sampler.set_epoch``
    (the dataset) and ``dataset.num_replicas/rank``; ``len`` is the per-rank batch count."""

    def __init__(self, dataset: TokenShardDataset, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        dataset.num_workers = num_workers
        self.num_workers, self.pin_memory = num_workers, pin_memory

    @property
    def sampler(self) -> TokenShardDataset:
        return self.dataset

    def __iter__(self):
        # a fresh DataLoader per epoch: its workers get the dataset with the current epoch/rank
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.pin_memory))

    def __len__(self) -> int:
        return len(self.dataset)
