"""One store for trained models, with one rule: a model is reused only if it was trained with
exactly the requested settings on exactly the requested data; otherwise it is trained.

    store = ModelStore("data/models/quick")
    request = ModelRequest("tokenizer_conditional_8192", settings, data_identity(source, x, mask))
    tok, run = store.get(request, train=lambda run_dir: ..., load=lambda run_dir: ...)

Each model lives in a run folder ``<root>/<name>/<settings hash>/``: the model files, its
training checkpoints and ``run.json``, which records the complete settings (model config,
training config, seed), the identity of the data (where it came from, and a digest of the
arrays the model saw), the library version and the training time. The settings hash is the
sha256 of the settings and the data identity, so a changed setting, seed or data set is another
folder: the old model stays where it is, and a change back reuses it. An interrupted training
resumes in its folder. With ``reuse="strict"`` nothing is trained: a request that no finished
run matches is refused with one line naming the first setting that differs from the newest run
of that name, its old and its new value.

The folder is locked while a model is trained (:func:`~omnijet_lib.io.exclusive_lock`): a second
process asking for the same model waits, then loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..io import OmnijetError, array_digest, as_json, exclusive_lock, first_process, write_json

__all__ = ["ModelRequest", "ModelStore", "Run", "data_identity", "settings_hash", "REUSE_MODES", "find_run",
           "tokenizer_run_of"]

RUN_RECORD = "run.json"
#: ``auto``: reuse a matching run, train the others; ``strict``: reuse a matching run, refuse the others
REUSE_MODES = ("auto", "strict")


def settings_hash(settings: dict, data: dict) -> str:
    """The first 16 hex digits of the sha256 of the settings and the data identity."""
    text = json.dumps({"settings": as_json(settings), "data": as_json(data)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_identity(source: dict, *arrays) -> dict:
    """The identity of a model's training data: ``source`` says where it came from (simulation
    settings, or files with size and fingerprint, and the selection), the digest is of the arrays
    themselves, so any change of the jets a model sees counts."""
    return {"source": as_json(source), "jets": int(len(arrays[0])) if arrays else 0,
            "digest": array_digest(*arrays)[:16]}


@dataclass(frozen=True)
class ModelRequest:
    """A model by its ``name`` (e.g. ``tokenizer_conditional_8192``, ``gpt_combined``), its complete
    ``settings`` and its ``data`` (:func:`data_identity`)."""

    name: str
    settings: dict
    data: dict

    def __post_init__(self):
        if not self.name or os.sep in self.name or self.name.startswith("."):
            raise OmnijetError(f"model name {self.name!r} must be a plain folder name")

    @property
    def hash(self) -> str:
        return settings_hash(self.settings, self.data)


@dataclass(frozen=True)
class Run:
    """A run folder of the store: where a model lives and how it got there."""

    path: Path
    settings_hash: str
    trained: bool  # trained by this call (False: reused)
    seconds: float  # training time (of the original training, when reused)

    def summary(self, relative_to: Path | None = None) -> dict:
        """What a metrics file records of the model: its run folder and settings hash."""
        path = self.path
        if relative_to is not None:
            path = Path(os.path.relpath(path, relative_to))
        return {"run": str(path), "settings_hash": self.settings_hash, "trained_here": self.trained}

    def record(self) -> dict:
        """The run's ``run.json``: its settings, data identity, library version and training time."""
        return _record(self.path) or {}


class ModelStore:
    """The models of ``root`` (a profile's ``models_dir``)."""

    def __init__(self, root: str | os.PathLike, reuse: str = "auto", progress: Callable[[str], None] = print):
        if reuse not in REUSE_MODES:
            raise OmnijetError(f"reuse must be one of {', '.join(REUSE_MODES)}, got {reuse!r}")
        self.root, self.reuse, self.progress = Path(root), reuse, progress

    def run_dir(self, request: ModelRequest) -> Path:
        return self.root / request.name / request.hash

    def finished(self, request: ModelRequest) -> Run | None:
        """The finished run of exactly this request, or None."""
        path = self.run_dir(request)
        rec = _record(path)
        if not (rec and rec.get("complete")):
            return None
        if as_json(rec.get("settings")) != as_json(request.settings) or as_json(rec.get("data")) != as_json(request.data):
            raise OmnijetError(f"{path / RUN_RECORD}: records other settings than its folder's hash says; "
                               "a damaged or hand-edited record (delete the folder)")
        return Run(path, request.hash, False, float(rec.get("seconds", 0.0)))

    def runs(self, name: str) -> list[dict]:
        """The records of the finished runs of ``name``, newest first (each with its ``path``)."""
        out = []
        for d in sorted((self.root / name).glob("*/")) if (self.root / name).is_dir() else []:
            rec = _record(d)
            if rec and rec.get("complete"):
                out.append({**rec, "path": str(d)})
        # trained_at has seconds: runs finished within one second are told apart by their record's time
        return sorted(out, key=lambda r: (r.get("trained_at", ""), (Path(r["path"]) / RUN_RECORD).stat().st_mtime_ns),
                      reverse=True)

    def with_settings(self, name: str, settings: dict) -> list[dict]:
        """The finished runs of ``name`` trained with exactly ``settings`` (on whichever jets), newest
        first: what a dry run can tell before the jets are loaded."""
        return [r for r in self.runs(name) if as_json(r.get("settings")) == as_json(settings)]

    def plan(self, request: ModelRequest) -> str:
        """``reuse``, ``resume`` (an interrupted training in its folder) or ``train``: what
        :meth:`get` would do."""
        if self.finished(request):
            return "reuse"
        return "resume" if (self.run_dir(request) / RUN_RECORD).is_file() else "train"

    def get(self, request: ModelRequest, train: Callable[[Path], Any], load: Callable[[Path], Any]):
        """``(model, Run)``: ``load(run_dir)`` of the finished run of ``request``, else ``train(run_dir)``
        (which writes the model into the run folder; resumable there) — or, with ``reuse="strict"``,
        an error naming the first setting that differs from the newest run of that name."""
        path = self.run_dir(request)
        run = self.finished(request)
        if run is None and self.reuse == "strict":
            raise OmnijetError(self._mismatch(request))
        if run is None and not first_process():  # a DDP rank > 0 trains beside rank 0, which keeps the record
            return train(path), Run(path, request.hash, True, 0.0)
        if run is None:
            with exclusive_lock(path, wait=True):  # another process may be training it: wait, then reuse
                run = self.finished(request)
                if run is None:
                    return self._train(request, path, train)
        self.progress(f"{request.name}: reusing {path}")
        return load(path), run

    def _train(self, request: ModelRequest, path: Path, train: Callable[[Path], Any]):
        what = "resuming" if (path / RUN_RECORD).is_file() else "training"
        self.progress(f"{request.name}: {what} in {path}")
        record = {"name": request.name, "settings_hash": request.hash, "settings": as_json(request.settings),
                  "data": as_json(request.data), "library_version": _library_version(), "complete": False}
        write_json(path / RUN_RECORD, record)
        t0 = time.perf_counter()
        model = train(path)
        seconds = time.perf_counter() - t0
        write_json(path / RUN_RECORD, {**record, "complete": True, "seconds": round(seconds, 1),
                                       "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.progress(f"{request.name}: trained in {seconds:.0f} s -> {path}")
        return model, Run(path, request.hash, True, seconds)

    def _mismatch(self, request: ModelRequest) -> str:
        where = f"{self.root / request.name}: reuse: strict"
        runs = self.runs(request.name)
        if not runs:
            return f"{where}, and no finished run of it exists (reuse: auto would train it)"
        newest = runs[0]
        old = _flat({"settings": newest["settings"], "data": newest["data"]})
        new = _flat({"settings": as_json(request.settings), "data": as_json(request.data)})
        key = next(k for k in sorted(set(old) | set(new), key=_order) if old.get(k, _NONE) != new.get(k, _NONE))
        return (f"{where}, and no run was trained with these settings: {key} is {_shown(old.get(key, _NONE))} "
                f"in {newest['path']}, {_shown(new.get(key, _NONE))} requested")


def find_run(spec: str | os.PathLike, option: str = "--backbone") -> Path:
    """The finished run folder ``spec`` names: a run folder (``<store>/gpt_top/<hash>``), or a model
    folder (``<store>/gpt_top``), which means its newest finished run. ``option`` names the
    command-line option or parameter in errors."""
    path = Path(spec)
    if not path.is_dir():
        raise OmnijetError(f"{option} {spec}: no such run folder (a model store's <name>/<settings hash>/)")
    rec = _record(path)
    if rec is None:
        runs = ModelStore(path.parent).runs(path.name)
        if not runs:
            raise OmnijetError(f"{option} {spec}: holds no {RUN_RECORD} and no finished run (<name>/<settings hash>/)")
        return Path(runs[0]["path"])
    if not rec.get("complete"):
        raise OmnijetError(f"{option} {spec}: its training did not finish (rerun it to resume)")
    return path


def tokenizer_run_of(backbone: Path) -> Path:
    """The tokenizer run a backbone run was trained on, in the same store: the one its record
    names by settings hash (a converted published backbone: the store's published tokenizer)."""
    rec = _record(backbone) or {}
    store = ModelStore(backbone.parent.parent)
    if rec.get("name") == "published_gpt_combined":
        runs = store.runs("published_tokenizer")
    else:
        want = ((rec.get("data") or {}).get("source") or {}).get("tokenizer")
        runs = [r for r in (_record(d) for d in store.root.glob(f"tokenizer_*/{want}")) if r and r.get("complete")] \
            if isinstance(want, str) and want.isalnum() else []
        runs = [{**r, "path": str(store.root / r["name"] / r["settings_hash"])} for r in runs]
    if not runs:
        raise OmnijetError(f"{backbone}: the tokenizer it was trained with is not in its store {store.root}; "
                           "name it with --tokenizer RUN")
    return Path(runs[0]["path"])


_NONE = object()


def _order(key: str):
    """Settings before data, then alphabetical: the difference a user made is named first."""
    return (not key.startswith("settings."), key)


def _shown(value) -> str:
    return "(absent)" if value is _NONE else json.dumps(value)[:80]


def _flat(obj, prefix: str = "") -> dict:
    """``{"settings.config.hidden_dim": 128, ...}`` of nested dicts (lists are values)."""
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _record(path: Path) -> dict | None:
    try:
        rec = json.loads((path / RUN_RECORD).read_text())
    except (OSError, ValueError):  # missing, or caught half-written by a killed run: not finished
        return None
    return rec if isinstance(rec, dict) else None


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnijet")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"
