"""Atomic file writes and safe checkpoints (safetensors + JSON config).

Every output of the suite goes through :func:`atomic_path`: the data is written to a temporary
file in the destination folder and renamed into place, so an interrupted run never leaves a
half-written file that looks complete, and an existing file survives a failed rewrite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "OmnijetError",
    "atomic_path",
    "write_json",
    "save_checkpoint",
    "load_checkpoint",
    "safe_torch_load",
]


class OmnijetError(Exception):
    """A user-facing error: its message names the file or parameter and the problem."""


def _check_parent(path: Path) -> None:
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists() and not p.is_dir():
            raise OmnijetError(f"{path}: cannot write, {p} is a file, not a directory")
    parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    _check_parent(path)
    if path.is_dir():
        raise OmnijetError(f"{path}: is a directory, expected a file path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(path: str | os.PathLike, tensors: dict, config: dict | None = None) -> Path:
    """Save a flat ``{name: tensor}`` dict as safetensors, with ``config`` as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"config": json.dumps(config or {}, default=_json_default)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict]:
    """Load ``(tensors, config)`` from a safetensors checkpoint written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OmnijetError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise OmnijetError(f"{path}: not a valid safetensors checkpoint ({err})") from None
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as err:
        raise OmnijetError(f"{path}: checkpoint config metadata is not valid JSON ({err})") from None
    return tensors, config


def safe_torch_load(path: str | os.PathLike, device: str = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle carrying code is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise OmnijetError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is several paragraphs; keep the name of the refused object
        text = str(err)
        glob, other = re.search(r"GLOBAL ([\w.]+)", text), re.search(r"(Unsupported [^\n.]+)", text)
        detail = f"it references {glob[1]}" if glob else other[1] if other else text.strip().splitlines()[0]
        raise OmnijetError(
            f"{path}: refused to load, the pickle holds Python objects beyond tensors and could run "
            f"code ({detail}); use a safetensors checkpoint"
        ) from None
    except Exception as err:  # truncated zip, empty file, not a pickle at all, ...
        first = str(err).split(". ")[0].strip() or "empty or truncated file"
        raise OmnijetError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {first})") from None
