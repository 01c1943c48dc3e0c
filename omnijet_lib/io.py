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
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

__all__ = [
    "REPO",
    "data_root",
    "default_device",
    "save_model",
    "load_model",
    "OmnijetError",
    "atomic_path",
    "exclusive_lock",
    "LOCK_FILE",
    "WAIT_HELP",
    "write_json",
    "file_sha256",
    "array_digest",
    "changed_settings",
    "as_json",
    "save_checkpoint",
    "load_checkpoint",
    "check_finite_weights",
    "check_tensor_views",
    "check_device",
    "declared_model",
    "shape_mismatch",
    "MAX_DECLARED_SIZE",
    "safe_torch_load",
]


REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Cache folder for simulated data, tokens and models: ``$OMNIJET_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("OMNIJET_DATA", REPO / "data"))


def first_process() -> bool:
    """Rank 0 of a launch by torchrun, Slurm or Lightning's DDP launcher (which sets the ranks of the
    processes it starts), or a single process: the one that keeps records and takes locks."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


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


LOCK_FILE = ".lock"
#: ``--wait`` of every command that writes into a folder under :func:`exclusive_lock`
WAIT_HELP = "if another run is writing into the same folder, wait for it to finish instead of stopping"


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, wait: bool = False, waiting: str = "") -> Iterator[None]:
    """Hold ``folder``'s lock (its ``.lock`` file; the folder is created) for the block, so that two
    processes never write into one folder at once. The holder's PID, host, command and start
    time go into the lock file. If another process holds it, ``wait=False`` raises one line naming
    that process; ``wait=True`` prints ``waiting`` (default: a line naming the holder) and blocks
    until it is free. The kernel releases the lock of a process that dies, so a crashed run never
    blocks the next one; its leftover record is taken over with a warning. A thread that holds the
    lock already takes it again at no cost. POSIX only; elsewhere the block runs unlocked."""
    import socket
    import sys
    import time

    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_FILE
    _check_parent(path)
    key = os.path.realpath(path)
    held = _HELD.__dict__.setdefault("paths", set())
    if key in held:  # this thread holds it already (the store's lock around a training that locks too)
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(f)
            if not wait:
                raise OmnijetError(f"{folder}: in use by {holder}; wait for it to finish, or rerun with "
                                   "--wait to queue behind it") from None
            print(waiting or f"{folder}: in use by {holder}; waiting for it to finish", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        stale = _lock_holder(f, default="")
        if stale:  # a holder that ends cleanly empties the file: this one died holding it
            log.warning("%s: taking over the stale lock of %s, which ended without releasing it", folder, stale)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


_HELD = threading.local()  # the locks each thread holds: taking one again is a no-op


def _lock_holder(f, default: str = "another process") -> str:
    """``process PID on HOST (COMMAND, since TIME)`` from a lock file's record."""
    f.seek(0)
    try:
        rec = json.loads(f.read() or "null")
        return (f"process {int(rec['pid'])} on {rec['host']} ({str(rec['command'])[:120]}, "
                f"since {rec['since']})")
    except (ValueError, TypeError, KeyError):  # empty, being written, or not ours
        return default


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


def as_json(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples become lists, numpy numbers plain, paths text): the form
    in which settings are written, hashed and compared."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


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
    device = check_device(device)
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
    except RecursionError:
        raise OmnijetError(f"{path}: checkpoint config metadata is nested too deeply") from None
    if not isinstance(config, dict):
        raise OmnijetError(f"{path}: checkpoint config metadata is a JSON {type(config).__name__}, not an object")
    check_finite_weights(path, tensors)
    return tensors, config


def check_device(device, option: str = "device") -> str:
    """``device`` as torch spells it. A name torch does not know, or a device this machine lacks,
    is one line naming ``option`` (e.g. ``--device``), not the checkpoint being loaded."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OmnijetError(f"{option} {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise OmnijetError(f"{option} {device}: no such CUDA device here ({torch.cuda.device_count()} "
                           "available); use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OmnijetError(f"{option} {device}: Apple MPS is not available here; use cpu")
    return str(dev)


def _view_problem(t) -> str | None:
    """Why tensor ``t`` is a view its storage does not hold, or None. A dimension of stride 0 or
    strides that overlap make a tensor larger than the bytes stored (4 stored bytes can pose as a
    (100000, 100000) tensor, 40 GB once computed with); an extent past the storage reads what
    is not there."""
    import torch

    if t.layout != torch.strided:
        return f"has layout {t.layout}; only dense tensors are loaded"
    if t.numel() == 0:
        return None
    span = 0  # largest element offset reached by the dimensions checked so far
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride == 0:
            return f"repeats one stored value along a dimension of size {size} (stride 0)"
        if stride <= span:
            return "has overlapping strides (several elements share stored values)"
        span += stride * (size - 1)
    need, have = (t.storage_offset() + span + 1) * t.element_size(), t.untyped_storage().nbytes()
    return f"needs {need} bytes but its storage holds {have}" if need > have else None


def check_tensor_views(source, obj) -> None:
    """Every tensor in ``obj`` (a state dict, or whatever nesting of dicts, lists and tuples
    ``torch.load`` returned) must be a plain view of its storage, checked before anything
    computes with it: a pickle can describe a tensor far larger than the bytes it stores.
    One line naming the file and the tensor."""
    import torch

    stack, seen = [("", obj)], set()
    while stack:  # iterative: a pickle may nest containers deeper than Python's recursion limit
        name, o = stack.pop()
        if isinstance(o, torch.Tensor):
            problem = _view_problem(o)
            if problem:
                strides = tuple(o.stride()) if o.layout == torch.strided else "-"
                raise OmnijetError(f"{source}: tensor {name or '(top level)'} {tuple(o.shape)} with strides "
                                   f"{strides} {problem}; refused (a damaged or crafted file)")
        elif isinstance(o, (dict, list, tuple, set, frozenset)) and id(o) not in seen:
            seen.add(id(o))
            items = o.items() if isinstance(o, dict) else enumerate(o)
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in items)


def check_finite_weights(source, tensors: dict) -> None:
    """A model whose weights hold NaN/inf (a diverged training, a damaged file) is refused: it would
    run and give garbage (e.g. every constituent the same token) without a word. The views are
    checked first, so the check never computes with more elements than are stored."""
    import torch

    check_tensor_views(source, tensors)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise OmnijetError(f"{source}: weight {name} holds {bad} NaN/inf values (a diverged training "
                               f"or a damaged file); refusing to use it")


def safe_torch_load(path: str | os.PathLike, device: str = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle carrying code is refused,
    and so is a tensor posing as larger than its storage (:func:`check_tensor_views`)."""
    import pickle

    import torch

    path = Path(path)
    device = check_device(device)
    if not path.is_file():
        raise OmnijetError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
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
    check_tensor_views(path, obj)
    return obj


def save_model(path: str | os.PathLike, model, **extra_config) -> Path:
    """Save ``model.state_dict()`` as safetensors; ``model.config`` (a dataclass) goes into the
    metadata together with ``extra_config`` (e.g. tokenizer settings)."""
    cfg = dataclasses.asdict(model.config) if dataclasses.is_dataclass(getattr(model, "config", None)) else {}
    cfg = {"class": type(model).__name__, "config": cfg, **extra_config}
    return save_checkpoint(path, dict(model.state_dict()), cfg)


_MISSING = object()

#: No size a model of this package declares (a width, a vocabulary, a sequence length, a layer
#: count) is larger, unless a tensor stored in the same file has that dimension.
MAX_DECLARED_SIZE = 2**16


class _TooManyTensors(Exception):
    pass


def _config_ints(settings) -> list[tuple[str, int]]:
    """``(dotted name, value)`` of every integer in a config of nested dicts and lists, in order."""
    out, stack = [], [("", settings)]
    while stack:  # iterative: a config read from a file may nest deeper than the recursion limit
        name, v = stack.pop()
        if isinstance(v, dict):
            stack.extend(reversed([(f"{name}.{k}" if name else str(k), x) for k, x in v.items()]))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed([(f"{name}[{i}]", x) for i, x in enumerate(v)]))
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append((name, v))
    return out


def declared_model(source, build, stored: dict, settings: dict):
    """``build()`` on the meta device: the model a file declares, with shapes but no memory, to
    compare with the tensors the file ``stored`` before building it for real. Every integer of
    the file's config ``settings`` must be at most :data:`MAX_DECLARED_SIZE` (or a dimension of
    a stored tensor), and the model may register at most about twice as many tensors as are
    stored: a layer count of millions would take minutes and gigabytes even on the meta device."""
    import torch
    from torch.nn.modules import module as nn_module

    ints = _config_ints(settings)
    largest = max((d for t in stored.values() for d in t.shape), default=0)
    for name, v in ints:
        if v > max(MAX_DECLARED_SIZE, largest):
            raise OmnijetError(f"{source}: {name}: {v} in the config, more than {MAX_DECLARED_SIZE} and than any "
                               f"dimension of the stored weights (largest {largest})")
    # registrations per stored tensor: 1, or 4/3 with weight norm (the original weight moves)
    limit, count, builder = 2 * len(stored) + 64, 0, threading.get_ident()

    def budget(module, name, tensor):
        nonlocal count
        if threading.get_ident() != builder:  # the hooks are global: leave other threads' modules alone
            return
        count += 1
        if count > limit:
            raise _TooManyTensors

    hooks = [nn_module.register_module_parameter_registration_hook(budget),
             nn_module.register_module_buffer_registration_hook(budget)]
    try:
        with torch.device("meta"):
            return build()
    except _TooManyTensors:  # a count of layers or blocks, most likely the largest setting that is no tensor size
        dims = {d for t in stored.values() for d in t.shape}
        counts = [(n, v) for n, v in ints if v not in dims]
        hint = " (its largest setting that is no tensor size: {}: {})".format(*max(counts, key=lambda nv: nv[1])) \
            if counts else ""
        raise OmnijetError(f"{source}: the config declares more than {limit} tensors but the file stores "
                           f"{len(stored)}{hint}") from None
    except OmnijetError as err:
        raise OmnijetError(f"{source}: {err}") from None
    except Exception as err:  # sizes no model can have: negative, heads not dividing the width, ...
        first = (str(err).strip().splitlines() or [""])[0]
        raise OmnijetError(f"{source}: its config does not make a model ({type(err).__name__}"
                           f"{': ' + first if first else ''})") from None
    finally:
        for h in hooks:
            h.remove()


def shape_mismatch(settings: dict, name: str, stored, declared) -> str:
    """What differs between tensor ``name`` as stored and as the config declares it, naming the
    setting of ``settings`` behind the first differing dimension when one holds that value
    (e.g. ``hidden_dim: 8000 in the config, the stored weights say 128``). Shapes are compared
    from the right (stored tensors may carry leading singleton dimensions)."""
    a, b = tuple(stored), tuple(declared)
    n = min(len(a), len(b))
    where = f"{name} {a} vs {b} from the config"
    for s, d in zip(a[len(a) - n:], b[len(b) - n:]):
        if s != d:
            key = next((k for k, v in _config_ints(settings) if v == d), None)
            if key is not None:
                return f"{key}: {d} in the config, the stored weights say {s} ({where})"
            break
    return where


def _check_field_types(source, config_cls, raw: dict) -> None:
    """Values of ``raw`` for fields of ``config_cls`` annotated int, float or bool are such values
    (a file may say ``hidden_dim: 2.5`` or ``n_head: "8"``)."""
    for f in dataclasses.fields(config_cls):
        if f.name not in raw:
            continue
        v, kind = raw[f.name], f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"int": number and isinstance(v, int), "float": number, "bool": isinstance(v, bool)}.get(kind, True)
        if not ok:
            raise OmnijetError(f"{source}: {f.name}: {v!r} in the config, expected {'a' if kind != 'int' else 'an'} "
                               f"{kind}")


def load_model(path: str | os.PathLike, model_cls, config_cls=None, device: str = "cpu", **expect):
    """Rebuild ``model_cls(config_cls(**saved_config))`` and load its weights.

    ``expect`` lists config values that must match (e.g. ``vocab_size=8194``); a mismatch, a
    different model class or missing/unexpected weights raise an error naming the problem.
    The model is built on the meta device first (:func:`declared_model`), so a config that
    does not fit the stored tensors is refused before any memory is allocated for it.
    """
    tensors, meta = load_checkpoint(path, device=device)
    saved_cls = meta.get("class")
    if saved_cls and saved_cls != model_cls.__name__:
        raise OmnijetError(f"{path}: holds a {saved_cls}, expected a {model_cls.__name__}")
    raw = meta.get("config", {})
    if not isinstance(raw, dict):
        raise OmnijetError(f"{path}: saved config is a {type(raw).__name__}, not a mapping")
    for k, v in expect.items():  # in the model config or in the extra config (save_model kwargs)
        have = raw[k] if k in raw else meta.get(k, _MISSING)
        if have is _MISSING:
            raise OmnijetError(f"{path}: {k} is not recorded in the checkpoint, cannot check it is {v}")
        if have != v:
            raise OmnijetError(f"{path}: {k} is {have} in the checkpoint but {v} is expected")
    if config_cls is not None:
        _check_field_types(path, config_cls, raw)
    try:
        config = config_cls(**raw) if config_cls is not None else None
    except TypeError as err:  # saved by another version of the model (renamed/removed fields)
        raise OmnijetError(f"{path}: saved config does not fit {config_cls.__name__} ({err})") from None
    except OmnijetError as err:  # a value the config refuses (e.g. a dropout of 2)
        raise OmnijetError(f"{path}: {err}") from None

    def build():
        return model_cls(config) if config is not None else model_cls()

    own = declared_model(path, build, tensors, raw).state_dict()
    wrong = [k for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if wrong:
        raise OmnijetError(f"{path}: tensor shapes differ from the config: "
                           f"{shape_mismatch(raw, wrong[0], tensors[wrong[0]].shape, own[wrong[0]].shape)}"
                           + (f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""))
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise OmnijetError(f"{path}: weights do not match {model_cls.__name__} "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model = build()  # every tensor it allocates has the shape of a stored one
    model.load_state_dict(tensors, strict=True)
    return model.to(device), meta
