"""The bottom layer: atomic file writes, safe checkpoints (safetensors + JSON config), model
save/load, where data lives (:func:`data_root`) and which device runs (:func:`default_device`).

Every output of the suite goes through :func:`atomic_path`: the data is written to a temporary
file in the destination folder and renamed into place, so an interrupted run never leaves a
half-written file that looks complete, and an existing file survives a failed rewrite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "REPO",
    "data_root",
    "default_device",
    "save_model",
    "load_model",
    "OmnijetError",
    "atomic_path",
    "exclusive_lock",
    "write_json",
    "file_sha256",
    "array_digest",
    "changed_settings",
    "save_checkpoint",
    "load_checkpoint",
    "check_finite_weights",
    "safe_torch_load",
]


REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Cache folder for simulated data, tokens and models: ``$OMNIJET_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("OMNIJET_DATA", REPO / "data"))


def default_device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, waiting: str = "") -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if missing) for the block, so that two processes
    filling the same cache (e.g. two notebooks run side by side) take turns instead of doing the
    work twice. ``waiting`` is printed once if another process holds it. POSIX only; elsewhere
    the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, same behaviour as before
        yield
        return
    path = Path(path)
    _check_parent(path)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def array_digest(*arrays) -> str:
    """sha256 (hex) of arrays' dtypes, shapes and bytes: a fingerprint of the data a model saw."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def changed_settings(record: str | os.PathLike, settings: dict) -> list[str]:
    """Keys whose values differ between ``settings`` and the JSON ``record`` a run wrote (every
    key when there is no readable record): how a rerun tells whether it may reuse or resume that run."""
    try:
        old = json.loads(Path(record).read_text())
    except (OSError, ValueError):  # missing, unreadable or half-written: nothing is known to match
        old = {}
    old = old if isinstance(old, dict) else {}
    return sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))


def value_per_key(name: str, overrides: dict | None, keys, default) -> dict:
    """``{key: overrides.get(key, default)}`` for each of ``keys``: a parameter such as
    ``epochs_per_model`` that changes a default for some of them. Keys are matched as text
    (papermill passes ``{8192: 16}`` as ``{"8192": 16}``); one that is not among ``keys`` is an
    error naming ``name``."""
    given = {str(k): v for k, v in (overrides or {}).items()}
    unknown = sorted(set(given) - {str(k) for k in keys})
    if unknown:
        raise OmnijetError(f"{name}: {', '.join(unknown)} not among {', '.join(map(str, keys))}")
    return {k: given.get(str(k), default) for k in keys}


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
    check_finite_weights(path, tensors)
    return tensors, config


def check_finite_weights(source, tensors: dict) -> None:
    """A model whose weights hold NaN/inf (a diverged training, a damaged file) is refused: it would
    run and give garbage (e.g. every constituent the same token) without a word."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise OmnijetError(f"{source}: weight {name} holds {bad} NaN/inf values (a diverged training "
                               f"or a damaged file); refusing to use it")


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


def save_model(path: str | os.PathLike, model, **extra_config) -> Path:
    """Save ``model.state_dict()`` as safetensors; ``model.config`` (a dataclass) goes into the
    metadata together with ``extra_config`` (e.g. tokenizer settings)."""
    cfg = dataclasses.asdict(model.config) if dataclasses.is_dataclass(getattr(model, "config", None)) else {}
    cfg = {"class": type(model).__name__, "config": cfg, **extra_config}
    return save_checkpoint(path, dict(model.state_dict()), cfg)


_MISSING = object()


def load_model(path: str | os.PathLike, model_cls, config_cls=None, device: str = "cpu", **expect):
    """Rebuild ``model_cls(config_cls(**saved_config))`` and load its weights.

    ``expect`` lists config values that must match (e.g. ``vocab_size=8194``); a mismatch, a
    different model class or missing/unexpected weights raise an error naming the problem.
    """
    tensors, meta = load_checkpoint(path, device=device)
    saved_cls = meta.get("class")
    if saved_cls and saved_cls != model_cls.__name__:
        raise OmnijetError(f"{path}: holds a {saved_cls}, expected a {model_cls.__name__}")
    raw = meta.get("config", {})
    for k, v in expect.items():  # in the model config or in the extra config (save_model kwargs)
        have = raw[k] if k in raw else meta.get(k, _MISSING)
        if have is _MISSING:
            raise OmnijetError(f"{path}: {k} is not recorded in the checkpoint, cannot check it is {v}")
        if have != v:
            raise OmnijetError(f"{path}: {k} is {have} in the checkpoint but {v} is expected")
    try:
        config = config_cls(**raw) if config_cls is not None else None
    except TypeError as err:  # saved by another version of the model (renamed/removed fields)
        raise OmnijetError(f"{path}: saved config does not fit {config_cls.__name__} ({err})") from None
    model = model_cls(config) if config is not None else model_cls()
    own = model.state_dict()
    wrong = [k for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if wrong:
        raise OmnijetError(f"{path}: tensor shapes differ from the config for {wrong[:5]}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise OmnijetError(f"{path}: weights do not match {model_cls.__name__} "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.to(device), meta
