"""Streaming tokenization of large JetClass sets: ROOT files → token shards, chunk by chunk.

``omnijet tokenize --tokenizer CKPT --in 'JetClass/train_100M/*.root' --out SHARDS/``

* One shard per (input file, chunk of ``--chunk`` tree entries), named ``<file stem>_<chunk>.npz``
  (format: :mod:`omnijet_lib.data.shards`); peak memory is set by the chunk, not the data set.
* ``SHARDS/manifest.json`` records the inputs, every finished shard (jets, tokens, class counts,
  sha256), the classes and the tokenizer's sha256; it is rewritten atomically after each shard.
* Resumable: a rerun skips the shards the manifest lists whose size and sha256 still match (a
  missing, truncated or altered shard is redone), so an interrupted run loses at most the chunk in
  flight; shards are renamed into place only when complete. A rerun with another tokenizer or other
  settings into the same folder is refused, and so is one whose input files changed since their
  shards were made (size or content fingerprint; a copy or ``touch`` that keeps the bytes is fine).
* Deterministic: the same inputs and tokenizer give byte-identical shards (tokenization runs in
  eval mode, the shard writer uses fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import numbers
import os
import time
from pathlib import Path
from typing import Sequence

import awkward as ak
import numpy as np

from ..data.shards import MANIFEST, read_manifest, write_shard
from ..io import WAIT_HELP, OmnijetError, exclusive_lock, file_sha256, write_json

log = logging.getLogger(__name__)

__all__ = ["input_fingerprint", "tokenize_files", "main"]

FORMAT = "omnijet-token-shards/1"
#: a chunk with at least this many constituents all given one code means a broken tokenizer
DEGENERATE_MIN_TOKENS = 100


def input_fingerprint(path: str | os.PathLike) -> dict:
    """``{"size", "fingerprint"}`` of an input file: its size and the sha256 of its first and last
    MiB (a ROOT file's header and directory), cheap enough for 100 files of GBs at every resume."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
        h.update(f.read(1 << 20))
    return {"size": size, "fingerprint": h.hexdigest()}


def _check_inputs(out_dir: Path, old: dict, paths: list[Path]) -> None:
    """Inputs of a resumed run must be those the existing shards were made from."""
    recorded = {Path(i["path"]).stem: i for i in old.get("inputs", [])}  # shards are named by stem
    for path in paths:
        have = recorded.get(path.stem)
        if have is None or "fingerprint" not in have:  # new input, or a manifest without fingerprints
            continue
        now = input_fingerprint(path)
        what = [k for k in ("size", "fingerprint") if have[k] != now[k]]
        if what:
            raise OmnijetError(f"{path}: changed since {out_dir} was tokenized from it ({' and '.join(what)} "
                               f"differ); to start over, delete {out_dir} or tokenize into another --out")


def _shard_intact(out_dir: Path, rec: dict) -> bool:
    """A listed shard counts as done only when its size and sha256 are those recorded."""
    path = out_dir / rec["name"]
    if not path.is_file() or ("size" in rec and path.stat().st_size != rec["size"]) \
            or file_sha256(path) != rec.get("sha256"):
        log.warning("%s: missing or damaged (size/sha256 differ from the manifest); redoing it", path)
        return False
    return True


def _read_chunk(path: Path, tree, start: int, stop: int):
    """Jets of tree entries ``[start, stop)`` with the checks of :func:`read_jetclass`."""
    from ..data.jetclass import JET_BRANCHES, LABEL_BRANCHES, _REQUIRED, _chunk_to_jets, _read_range

    names = [b for b in (*_REQUIRED, *JET_BRANCHES, *LABEL_BRANCHES) if b in tree.keys()]
    return _chunk_to_jets(path, _read_range(path, tree, names, start, stop), start)


def _tokenize_chunk(tok, jets, max_len: int, batch_size: int):
    """(flat tokens, counts, labels) of a chunk of jets."""
    from ..data.features import constituent_features, to_padded
    from .base import tokenize

    if len(jets) == 0:  # a chunk without the selected classes (to_padded needs >= 1 jet)
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
    feats = constituent_features(jets)
    longest = int(ak.max(ak.num(feats, axis=1)))  # padded to the longest jet: memory follows the data, not max_len
    x, mask = to_padded(feats, max_len=max(1, min(max_len, longest)))  # (N, L, 3), (N, L)
    tokens = tokenize(tok, x, mask, batch_size=batch_size)            # (N, L), -1 at padding
    real = tokens >= 0                                                # real entries come first
    return tokens[real], real.sum(1), ak.to_numpy(jets.label)


def tokenize_files(tokenizer: str | os.PathLike, inputs, out_dir: str | os.PathLike, chunk: int = 100_000,
                   classes: Sequence[str | int] | None = None, max_len: int = 128, batch_size: int = 1024,
                   device: str | None = None, wait: bool = False) -> dict:
    """Tokenize JetClass-schema ROOT files (path, glob or list) into token shards in ``out_dir``.

    ``chunk`` tree entries are read, tokenized and written at a time (peak memory grows with it);
    ``classes`` keeps only those classes. Resumes a previous run into ``out_dir``, and adds to the
    shards of other inputs tokenized into it before. Another process tokenizing into ``out_dir`` is
    an error, or with ``wait`` waited for. Returns the manifest (also in ``out_dir/manifest.json``).
    """
    from ..data.paths import input_files
    from ..data.schema import class_selection
    from ..io import MAX_DECLARED_SIZE, check_device, default_device
    from .base import load_tokenizer

    for option, value in (("--chunk", chunk), ("--max-len", max_len), ("--batch-size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise OmnijetError(f"{option} must be a positive integer, got {value!r}")
    if max_len > MAX_DECLARED_SIZE:
        raise OmnijetError(f"--max-len {max_len}: at most {MAX_DECLARED_SIZE} constituents per jet are supported")
    device = check_device(device or default_device(), "--device")
    wanted = class_selection(classes, "--classes")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OmnijetError(f"{out_dir}: exists and is not a directory")
    paths = input_files(inputs)
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise OmnijetError(f"input files share the name {dup[0]!r} (shards are named after the file); "
                           f"tokenize them into separate --out folders")
    tok_path = Path(tokenizer)
    if not tok_path.is_file():
        raise OmnijetError(f"{tok_path}: tokenizer checkpoint not found")
    tok = load_tokenizer(tok_path, device=device or default_device())
    settings = {"format": FORMAT, "tokenizer_sha256": file_sha256(tok_path), "kind": tok.kind,
                "num_codes": int(tok.num_codes), "chunk": int(chunk), "classes": wanted, "max_len": int(max_len)}

    with exclusive_lock(out_dir, wait=wait):  # two runs into one folder would each drop the other's shards
        return _tokenize_into(out_dir, tok, tok_path, settings, paths, batch_size)


def _tokenize_into(out_dir: Path, tok, tok_path: Path, settings: dict, paths: list[Path], batch_size: int) -> dict:
    """:func:`tokenize_files`' work, under ``out_dir``'s lock. Shards of earlier runs from other
    inputs stay listed: the manifest describes the whole folder."""
    from ..data.jetclass import _open_tree

    chunk, wanted, max_len = settings["chunk"], settings["classes"], settings["max_len"]
    manifest = {**settings, "tokenizer": str(tok_path), "inputs": [], "shards": [], "complete": False}
    done: dict[str, dict] = {}
    if (out_dir / MANIFEST).is_file():
        old = read_manifest(out_dir)
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        if diff:
            raise OmnijetError(f"{out_dir}: holds shards made with other settings ({', '.join(diff)} differ); "
                               f"use another --out or delete it")
        _check_inputs(out_dir, old, paths)
        ours = {p.stem for p in paths}
        intact = [s for s in old["shards"] if _shard_intact(out_dir, s)]
        kept = {s["name"] for s in intact}
        damaged = {Path(s["file"]).stem for s in old["shards"] if s["name"] not in kept}
        for rec in old.get("inputs", []):
            stem = Path(rec["path"]).stem
            if stem not in ours:  # an earlier run's input: its shards stay listed (a damaged one is redone with it)
                complete = rec.get("complete", old.get("complete", False)) and stem not in damaged
                manifest["inputs"].append({**rec, "complete": complete})
        manifest["shards"] = [s for s in intact if Path(s["file"]).stem not in ours]
        done = {s["name"]: s for s in intact if Path(s["file"]).stem in ours}
        if done:
            log.info("%s: resuming, %d shards already done", out_dir, len(done))
        if manifest["shards"]:
            log.info("%s: keeping the %d shards of %d other input files", out_dir, len(manifest["shards"]),
                     len(manifest["inputs"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.part"):  # temp files of a killed run (never renamed into place)
        stale.unlink(missing_ok=True)

    t0, n_new = time.time(), 0
    for path in paths:
        tree = _open_tree(path)
        n_entries = int(tree.num_entries)
        record = {"path": str(path), "entries": n_entries, **input_fingerprint(path), "complete": False}
        manifest["inputs"].append(record)
        for c, start in enumerate(range(0, n_entries, chunk)):
            name = f"{path.stem}_{c:05d}.npz"
            if name in done:
                manifest["shards"].append(done[name])
                continue
            jets = _read_chunk(path, tree, start, min(start + chunk, n_entries))
            entry = np.arange(start, start + len(jets))
            if wanted is not None:
                keep = np.isin(ak.to_numpy(jets.label), wanted)
                jets, entry = jets[keep], entry[keep]
            tokens, counts, labels = _tokenize_chunk(tok, jets, max_len, batch_size)
            if len(tokens) >= DEGENERATE_MIN_TOKENS and (tokens == tokens[0]).all():
                raise OmnijetError(f"{tok_path}: maps all {len(tokens)} constituents of {path} entries "
                                   f"{start}..{min(start + chunk, n_entries) - 1} to code {int(tokens[0])}; "
                                   f"a collapsed or broken tokenizer, nothing written")
            write_shard(out_dir / name, tokens, counts, labels, entry, tok.num_codes)
            manifest["shards"].append({
                "name": name, "file": str(path), "chunk": c, "entry_start": start,
                "entry_stop": min(start + chunk, n_entries), "jets": int(len(counts)),
                "tokens": int(len(tokens)), "class_counts": np.bincount(labels, minlength=10).tolist(),
                "size": (out_dir / name).stat().st_size, "sha256": file_sha256(out_dir / name),
            })
            write_json(out_dir / MANIFEST, _totals(manifest))  # the shard is done only once listed here
            n_new += len(counts)
            log.info("%s: %d jets, %d tokens (%.0f jets/s)", name, len(counts), len(tokens),
                     n_new / max(time.time() - t0, 1e-9))
            del jets, tokens, counts, labels
        record["complete"] = True
    manifest["complete"] = all(i["complete"] for i in manifest["inputs"])
    write_json(out_dir / MANIFEST, _totals(manifest))
    return _totals(manifest)


def _totals(manifest: dict) -> dict:
    shards = manifest["shards"]
    manifest["jets"] = sum(s["jets"] for s in shards)
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["class_counts"] = np.sum([s["class_counts"] for s in shards], axis=0).tolist() if shards else [0] * 10
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="omnijet tokenize", description="Tokenize JetClass-schema ROOT files "
                                 "chunk by chunk into token shards (resumable, memory bounded by --chunk).")
    ap.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (tokenizer.safetensors)")
    ap.add_argument("--in", dest="inputs", nargs="+", required=True, help="ROOT files or globs (quote globs)")
    ap.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    ap.add_argument("--chunk", type=int, default=100_000, help="tree entries per shard (default 100000)")
    ap.add_argument("--classes", nargs="*", help="keep only these classes, e.g. QCD Tbqq")
    ap.add_argument("--batch-size", type=int, default=1024, help="jets per tokenizer call")
    ap.add_argument("--max-len", type=int, default=128, help="constituents kept per jet (hardest first)")
    ap.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--wait", action="store_true", help=WAIT_HELP)
    a = ap.parse_args(argv)
    man = tokenize_files(a.tokenizer, a.inputs, a.out, chunk=a.chunk, classes=a.classes, max_len=a.max_len,
                         batch_size=a.batch_size, device=a.device, wait=a.wait)
    print(f"{a.out}: {man['jets']} jets, {man['tokens']} tokens in {len(man['shards'])} shards "
          f"({man['kind']} tokenizer, K={man['num_codes']})")
    return 0
