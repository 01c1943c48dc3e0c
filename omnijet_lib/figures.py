"""Run the numbered notebooks with papermill for a parameter profile (``params/<profile>.yaml``).

Profile layout::

    common:            # passed to every notebook that declares the key
      per_class: 300
    01_token_quality:  # passed to that notebook only
      epochs: 2

A key that the target notebook(s) do not declare in their ``parameters`` cell is an error, and so
is a section that names no notebook: a typo never silently falls back to a default.

Profiles are files people share, and papermill writes their values into the notebook as Python
source: so a profile holds plain YAML only (:func:`load_profile`), the contents of every dict
parameter are checked against a schema (:func:`check_parameter`), and the parameters cell papermill
injects must be literal assignments (:func:`check_injected`) before any kernel starts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import WAIT_HELP, OmnijetError, atomic_path, exclusive_lock, value_per_key

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PARAMS = REPO / "params"

__all__ = ["notebooks", "load_profile", "resolve_parameters", "section_parameters", "run_figures", "run_parallel",
           "estimate_cost", "main"]


def notebooks(directory: Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order (default: :data:`NOTEBOOKS`)."""
    return sorted(p for p in Path(directory or NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))


#: A profile is a few kB of YAML. These bounds refuse a hostile one before it costs memory: megabytes
#: of text, or aliases that expand exponentially ("billion laughs"; every value reached counts).
MAX_PROFILE_BYTES = 1 << 20
MAX_PROFILE_VALUES = 10_000
_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null")}
_NOT_PLAIN = "is not allowed (only strings, numbers, booleans, null, lists and mappings)"


def load_profile(profile: str | Path) -> dict:
    """Load a profile by name (``ci``) or path. Only plain YAML is taken, at every depth: text,
    numbers, booleans, null, lists and mappings with text or integer keys (:func:`_plain_yaml`);
    anything else names the file, line and key path."""
    path = Path(profile)
    if not path.suffix:
        path = PARAMS / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(PARAMS.glob("*.yaml")))
        raise OmnijetError(f"{path}: parameter profile not found (known profiles: {known})")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as err:
        raise OmnijetError(f"{path}: cannot read the parameter profile "
                           f"({err.strerror or type(err).__name__})") from None
    if len(text) > MAX_PROFILE_BYTES:
        raise OmnijetError(f"{path}: more than {MAX_PROFILE_BYTES >> 10} kB; a parameter profile is a few kB of YAML")
    data = _plain_yaml(path, text)
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise OmnijetError(f"{path}: a profile maps 'common' and notebook names to dicts of parameters")
    names = [k for section, params in data.items() for k in (section, *params) if not isinstance(k, str)]
    if names:
        raise OmnijetError(f"{path}: section and parameter names are text, got {names[0]!r}")
    data["_path"] = str(path)
    return data


def _plain_yaml(path: Path, text: bytes):
    """The YAML document in ``text`` when it is plain at every depth: a tag other than text,
    number, boolean or null (``!!binary``, a date, ``!!set``, ``!!python/...``, ``!custom``), a
    merge key, a key that is not text or an integer, a duplicate key, NaN or infinity, and more
    than :data:`MAX_PROFILE_VALUES` values are each one line naming file, line and key path.
    Built from the composed nodes: no constructor ever sees a tag we did not allow."""
    loader, visited = None, 0

    def fail(node, where: str, problem: str):
        raise OmnijetError(f"{path}: line {node.start_mark.line + 1}: {where + ': ' if where else ''}{problem}")

    def value(node, where: str):
        nonlocal visited
        visited += 1
        if visited > MAX_PROFILE_VALUES:
            fail(node, where, f"more than {MAX_PROFILE_VALUES} values (aliases count each time they are used)")
        if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
            try:
                out = loader.construct_object(node)
            except (ValueError, KeyError, yaml.YAMLError):  # !!int abc, !!bool maybe, an int of 5000 digits
                fail(node, where, f"{_shown(node.value)} is not a valid {_shown_tag(node.tag)}")
            if isinstance(out, float) and not math.isfinite(out):
                fail(node, where, f"{node.value} is not a finite number")
            return out
        if isinstance(node, yaml.SequenceNode) and node.tag == _YAML + "seq":
            return [value(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode) and node.tag == _YAML + "map":
            out, seen = {}, set()
            for key_node, value_node in node.value:
                key = mapping_key(key_node, where)
                if str(key) in seen:  # papermill passes keys as text: 1 and "1" would collide
                    fail(key_node, where, f"duplicate key {_shown(key)}")
                seen.add(str(key))
                out[key] = value(value_node, f"{where}.{_shown(key)}" if where else _shown(key))
            return out
        if node.tag == _YAML + "timestamp":
            fail(node, where, f"{_shown(node.value)} is a date (!!timestamp) and {_NOT_PLAIN}: "
                              f"quote it to keep it as text")
        fail(node, where, f"{_shown_tag(node.tag)} {_NOT_PLAIN}")

    def mapping_key(node, where: str):
        if isinstance(node, yaml.ScalarNode) and node.tag in (_YAML + "str", _YAML + "int"):
            return value(node, where)
        if node.tag == _YAML + "merge":
            fail(node, where, "merge keys (<<) are not allowed")
        if isinstance(node, yaml.ScalarNode):
            fail(node, where, f"key {_shown(node.value)} is a {_shown_tag(node.tag)}: keys are text or integers "
                              f"(quote it to make it text)")
        fail(node, where, f"a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'} as a key is not "
                          f"allowed: keys are text or integers")

    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        return None if node is None else value(node, "")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or getattr(err, "context", None) or _first_line(err)
        raise OmnijetError(f"{path}:{where} invalid YAML ({problem})") from None
    except RecursionError:
        raise OmnijetError(f"{path}: nested too deeply for a parameter profile") from None
    finally:
        if loader is not None:
            loader.dispose()


def _shown(text, limit: int = 60) -> str:
    """A key, value or tag of a profile as one short line (quoted when it holds line breaks or controls)."""
    text = str(text)
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _shown_tag(tag: str) -> str:
    return _shown("!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag)


def declared_parameters(nb: Path) -> dict:
    """Parameters declared in the notebook's ``parameters`` cell: ``{name: default}``."""
    import papermill as pm

    try:
        return {k: v["default"] for k, v in pm.inspect_notebook(str(nb)).items()}
    except Exception as err:  # not JSON, not a notebook, unreadable
        raise OmnijetError(f"{nb}: not a readable notebook ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _source_cell(nb: Path, cell_index: int, injected: bool) -> int:
    """1-based number of the failing cell in the user's notebook: papermill's index counts the
    cell it injects after the ``parameters`` cell (or first, when there is none)."""
    import nbformat

    try:
        tags = [c.metadata.get("tags", []) for c in nbformat.read(str(nb), as_version=4).cells]
    except Exception:
        return cell_index + 1
    if not injected or any("injected-parameters" in t for t in tags):  # nothing inserted
        return cell_index + 1
    at = next((i + 1 for i, t in enumerate(tags) if "parameters" in t), 0)  # the injected cell's index
    return cell_index + (1 if cell_index < at else 0)


#: Parameters whose type the default does not show (a ``None`` default, or a second form):
#: name -> accepted kinds ("int", "float", "str", "list[str]", "dict", ...). ``None`` is always
#: accepted where the default is ``None``.
PARAMETER_TYPES = {
    "data_files": ("str", "list[str]"),
    "finetune_files": ("str", "list[str]"),
    "score_files": ("str", "list[str]"),
    "real_files": ("str", "list[str]"),
    "checkpoint_dir": ("str",),
    "blob_tokens": ("int",),
    "patience": ("int",),
    "lr_scratch": ("float",),
    "max_epochs": ("int", "dict[int, int]"),
    "strategies_per_size": ("dict[int, list[str]]",),
    "n_generate_per_model": ("dict[str, int]",),
    "reference_files": ("str", "list[str]"),
    "generation_lr": ("dict[str, float]",),
}


#: Sizes and counts that must be positive (each item or value, for lists and dicts): 0 would train or
#: sample nothing.
POSITIVE = {"per_class", "explore_per_class", "n_generate",
            "n_test", "n_val", "n_seeds", "num_codes", "codebook_sizes", "binned_bins", "train_sizes", "batch_size",
            "generate_batch_size", "classifier_batch_size", "ode_steps",
            "blob_samples", "n_generate_per_model", "reference_per_class", "finetune_sizes", "steps", "tag_sizes",
            "scratch_factor", "tag_batch_size"}


def _choices() -> dict[str, tuple[str, ...]]:
    """Parameters that take one of a few words (every item, for a list)."""
    from .studies.few_jets import GENERATION_METHODS
    from .training.store import REUSE_MODES
    from .training.transfer import STRATEGIES

    return {"reuse": REUSE_MODES, "epic_config": ("light", "jetclass"),
            "kind": ("conditional", "unconditional", "binned"), "kinds": ("conditional", "unconditional", "binned"),
            "generation_methods": tuple(GENERATION_METHODS), "tag_strategies": STRATEGIES}


def _kind(value) -> str:
    """``int``, ``float``, ``str``, ``bool``, ``None``, ``list[int]``, ``dict[int, int]``, ... of a YAML value."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return type(value).__name__
    if isinstance(value, list):
        inner = sorted({_kind(v) for v in value})
        return f"list[{' | '.join(inner)}]" if inner else "list"
    if isinstance(value, dict):
        keys, vals = sorted({_kind(k) for k in value}), sorted({_kind(v) for v in value.values()})
        return f"dict[{' | '.join(keys)}, {' | '.join(vals)}]" if value else "dict"
    return type(value).__name__


def _fits(value, kind: str) -> bool:
    """Whether ``value`` is of ``kind`` (an empty list or dict fits any list or dict kind; an int
    fits float; anything fits a bare ``list``/``dict``)."""
    have = _kind(value)
    if have == kind or (kind == "float" and have == "int"):
        return True
    for container in ("list", "dict"):
        if kind.startswith(container) and have.startswith(container):
            if kind == container or have == container:
                return True
            inner = kind[len(container) + 1:-1].split(", ")
            if container == "list":
                return all(_fits(v, inner[0]) for v in value)
            return all(_fits(k, inner[0]) and _fits(v, inner[1]) for k, v in value.items())
    return False


def _expected_kinds(name: str, default) -> tuple[str, ...]:
    if name in PARAMETER_TYPES:
        return PARAMETER_TYPES[name] + (("None",) if default is None else ())
    if isinstance(default, dict):  # its keys and their values: _dict_schemas
        return ("dict",)
    kind = _kind(default)  # a list keeps the element type of its default when that has one
    return (kind if " | " not in kind else "list",)


def check_parameter(where: str, name: str, value, default) -> None:
    """One line naming ``where`` (profile file and section) and ``name`` when ``value`` does not
    have the type of the notebook's default (or one of :data:`PARAMETER_TYPES`), or when a dict
    holds a key or a value its schema (:func:`_dict_schemas`) does not take."""
    _check_kinds(where, name, value, _expected_kinds(name, default), f" (default: {default!r})")
    if isinstance(value, dict) and value:
        _check_dict(where, name, value)
    elif isinstance(value, list):  # a list of dicts: every item against the parameter's schema
        for i, item in enumerate(value):
            if isinstance(item, dict) and item:
                _check_dict(where, name, item, f"{name}[{i}]")


def _check_kinds(where: str, name: str, value, kinds: tuple[str, ...], note: str = "") -> None:
    if any(_fits(value, k) for k in kinds):
        return
    hint = ""
    if isinstance(value, str) and any(k in ("int", "float") for k in kinds):
        try:
            float(value)
            hint = " (text in YAML: write it without quotes" + (", with a dot: 1.0e-4, not 1e-4)" if "e" in value.lower() else ")")
        except ValueError:
            pass
    raise OmnijetError(f"{where}: {name} must be {' or '.join(kinds)}{note}, got {_kind(value)} {value!r}{hint}")


@dataclass(frozen=True)
class _PerKey:
    """A schema node for ``{key: dict}`` (e.g. per codebook size): every value takes ``schema``."""

    schema: dict


def _check_dict(where: str, name: str, value: dict, path: str | None = None) -> None:
    """The keys and values of dict parameter ``name`` (or of the item ``path`` of a list of dicts)
    against its schema; one that has none must be fully typed by :data:`PARAMETER_TYPES`
    (``dict[str, int]``): no dict passes unchecked."""
    schemas, path = _dict_schemas(), path or name
    if isinstance(schemas.get(name), _PerKey):  # {any key: dict of the schema}
        _check_per_key(where, path, value, schemas[name])
    elif name in schemas:
        _check_fields(where, path, value, schemas[name])
    elif name not in PARAMETER_TYPES:
        raise OmnijetError(f"{where}: {path}: no schema declares the keys of this dict parameter "
                           f"(omnijet_lib.figures._dict_schemas)")


def _check_per_key(where: str, path: str, value: dict, schema: _PerKey) -> None:
    for k, inner in value.items():
        _check_kinds(where, f"{path}.{_shown(k)}", inner, ("dict",))
        _check_fields(where, f"{path}.{_shown(k)}", inner, schema.schema)


def _check_fields(where: str, name: str, value: dict, schema: dict) -> None:
    for key, item in value.items():
        path = f"{name}.{_shown(key)}"
        if key not in schema:
            raise OmnijetError(f"{where}: {path}: unknown key; known: {', '.join(schema)}")
        if isinstance(schema[key], dict):
            _check_kinds(where, path, item, ("dict",))
            _check_fields(where, path, item, schema[key])
        elif isinstance(schema[key], _PerKey):
            _check_kinds(where, path, item, ("dict",))
            _check_per_key(where, path, item, schema[key])
        else:
            _check_kinds(where, path, item, schema[key])


@functools.cache
def _dict_schemas() -> dict[str, dict]:
    """``{parameter: {key: kinds, or the schema of a nested dict}}`` for the notebooks' dict parameters:
    the fields of the config class each one is passed to, without those the notebook sets itself."""
    from .models.deepsets import DeepSetsConfig
    from .models.gpt import GPTConfig
    from .models.normformer import TransformerClassifierConfig
    from .tokenizers.vqvae import VQVAEConfig
    from .training.fit import TrainConfig

    trainer = {"procedure": ("str",), **_config_kinds(TrainConfig)}  # TrainConfig.from_params(trainer)
    model_kw = _config_kinds(VQVAEConfig, "conditional", "num_codes")  # set from the kind and K
    size = {"epochs": ("int",), "model_kw": model_kw, "extra_per_class": ("int",)}
    gpt_config = _config_kinds(GPTConfig, "vocab_size", "n_classes")  # GPTConfig(vocab_size=tokenizer's, **gpt_config)
    data = {"data_files": ("str", "list[str]", "None"), "per_class": ("int",), "seed": ("int",), "trainer": trainer}
    classifiers = {"deepsets": _config_kinds(DeepSetsConfig, "n_classes"),
                   "transformer": _config_kinds(TransformerClassifierConfig, "n_classes")}
    backbone = {"gpt_config": gpt_config, "epochs": ("int",), "batch_size": ("int",),
                "per_model": _PerKey({"epochs": ("int",), "dropout": ("float",)}), "class_dropout": ("float",),
                "data_seed": ("int",), "shards": ("str", "None"), **data}
    return {
        "trainer": trainer,
        "classifier_kw": classifiers,
        "baselines": classifiers,  # notebook 03's continuous-feature taggers
        # studies.tokens.TOKENIZER_DEFAULTS and its data keys (a test holds the two together)
        "tokenizer": {**size, "batch_size": ("int",), "extra_seed": ("int",), "per_size": _PerKey(size), **data},
        # studies.generation.BACKBONE_DEFAULTS and its data keys (a test holds the two together)
        "backbone": backbone,
        "class_backbone": backbone,  # notebook 06: overrides of the backbone for its class-conditional one
        "density_sizes": _PerKey(gpt_config),  # notebook 06: other sizes of the q/g backbone
        "sampler_settings": {"top_k": ("int",), "top_p": ("float",), "temperature": ("float",)},  # GPT.generate's
    }


#: What Lightning takes for the fields annotated ``Any`` (devices, precision): a name, a number or device indices.
_ANY_KINDS = ("str", "int", "list[int]")


def _config_kinds(cls, *left_out: str) -> dict[str, tuple[str, ...]]:
    """``{field: kinds}`` of a config dataclass from its annotations (``int | None``: int or None);
    a bare ``list`` takes the element kind of its default."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in left_out:
            continue
        hint, kinds = hints[f.name], []
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        for t in typing.get_args(hint) if union else (hint,):
            if t is typing.Any:
                kinds += _ANY_KINDS
            elif typing.get_origin(t) is list:  # list[int]
                kinds.append(f"list[{typing.get_args(t)[0].__name__}]")
            elif t is list:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                kinds.append(_kind(default) if isinstance(default, list) and " | " not in _kind(default) else "list")
            else:
                kinds.append("None" if t is type(None) else t.__name__)
        out[f.name] = tuple(kinds)
    return out


def resolve_parameters(profile: dict, nbs: list[Path]) -> dict[Path, dict]:
    """Per-notebook parameters from a profile; unknown keys and sections, values whose type is not
    that of the notebook's default, and dict contents outside their schema (:func:`check_parameter`)
    raise OmnijetError naming the file, section and key."""
    path = profile.get("_path", "profile")
    declared = {nb: declared_parameters(nb) for nb in nbs}
    stems = {nb.stem for nb in nbs}
    common = profile.get("common", {})
    unknown = sorted(set(common) - set().union(*declared.values()))
    if unknown:
        raise OmnijetError(f"{path}: common parameter(s) {', '.join(map(_shown, unknown))} "
                           f"not declared by any notebook")
    for section in profile:
        if section not in ("common", "_path") and section not in stems:
            raise OmnijetError(f"{path}: section '{_shown(section)}' names no notebook "
                               f"(notebooks: {', '.join(sorted(stems))})")
    out = {}
    for nb in nbs:
        own = profile.get(nb.stem, {})
        bad = sorted(set(own) - set(declared[nb]))
        if bad:
            raise OmnijetError(f"{path}: {nb.stem} has no parameter(s) {', '.join(map(_shown, bad))} "
                               f"(it declares: {', '.join(declared[nb])})")
        params = {k: v for k, v in common.items() if k in declared[nb]}
        params.update(own)
        defaults = _defaults(nb)
        for k, v in params.items():
            where = f"{path}: section {nb.stem if k in own else 'common'}"
            check_parameter(where, k, v, defaults.get(k))
            items = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
            numbers = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if k in POSITIVE and any(x <= 0 for x in numbers):
                raise OmnijetError(f"{where}: {k} must be positive, got {v}")
            if any(x < 0 for x in numbers):
                raise OmnijetError(f"{where}: {k} must not be negative, got {v}")
            words = _choices().get(k)
            if words and any(x not in words for x in items):
                raise OmnijetError(f"{where}: {k} must be {' or '.join(words)}, got {v!r}")
        out[nb] = params
    return out


def section_parameters(profile: str | Path, section: str) -> dict:
    """Every parameter notebook ``section`` (e.g. ``02_generation``) runs with under ``profile``:
    its defaults with the profile's values, checked like a run of the figures. Paths in it are
    relative to the notebooks' folder (:data:`NOTEBOOKS`), where the notebooks run."""
    loaded = load_profile(profile)
    nbs = {nb.stem: nb for nb in notebooks()}
    if section not in nbs:
        raise OmnijetError(f"--section {section}: no such notebook (notebooks: {', '.join(nbs)})")
    params = resolve_parameters(loaded, list(nbs.values()))[nbs[section]]
    return {**_defaults(nbs[section]), **params}


#: The notebooks each one reads from (models, tokenizers, simulated data): ``--jobs`` starts a
#: notebook only when those in the run have finished. Only for speed: a model two notebooks ask
#: for at once is trained by one while the other waits for it (the model store's lock).
NEEDS = {"01": ("00",), "02": ("01",), "03": ("01",), "04": ("02",), "05": ("01",), "06": ("02",), "07": ("06",)}


def run_figures(profile: str = "ci", only: list[str] | None = None, out_dir: Path | None = None,
                dry_run: bool = False, progress_every: float = 30.0, jobs: int = 1, wait: bool = False,
                locked: bool = False) -> list[Path]:
    """Execute the notebooks in order; stop at the first failure naming notebook and cell.
    While a notebook runs, a line every ``progress_every`` seconds says which cell (n of N) and
    for how long; the total comes at the end. ``jobs`` > 1 runs up to that many notebooks side
    by side (:func:`run_parallel`). The figures folders and ``out_dir`` are locked for the run:
    another run writing into one of them is an error, or with ``wait`` waited for (``locked``:
    the caller holds the locks already, as :func:`run_parallel` does for its children)."""
    if jobs < 1:
        raise OmnijetError(f"--jobs must be at least 1, got {jobs}")
    loaded = load_profile(profile)
    plan_path = loaded["_path"]
    plan = resolve_parameters(loaded, notebooks())  # validate the whole profile
    if only is not None and not [o for o in only if o.strip()]:
        raise OmnijetError("--only names no notebook; give prefixes such as 00 02_generation, or leave it out")
    if only:
        plan = {nb: p for nb, p in plan.items() if any(nb.stem.startswith(o) for o in only)}
        if not plan:
            raise OmnijetError(f"no notebook matches {only}")
    plan = {nb: gallery(plan_path, nb, params) for nb, params in plan.items()}
    prepared = {nb: _prepared(nb, params) for nb, params in plan.items()}  # before anything runs
    out_dir = Path(out_dir or NOTEBOOKS / "executed")
    with contextlib.ExitStack() as locks:
        if not (dry_run or locked):
            for folder in sorted(_written_folders(plan, out_dir)):  # one order: two runs cannot deadlock
                locks.enter_context(exclusive_lock(folder, wait=wait))
        if jobs > 1 and not dry_run and len(plan) > 1:  # each child checks its notebook again
            return run_parallel(plan_path, plan, out_dir, jobs, progress_every)
        return _run_serial(plan_path, plan, prepared, out_dir, dry_run, progress_every)


#: Where the galleries go: ``figures/<profile>/`` (the committed one is ``figures/quick/``).
FIGURES = REPO / "figures"


def gallery(profile_path, nb: Path, params: dict) -> dict:
    """``params`` with ``figures_dir`` = ``figures/<profile name>/`` (relative to the notebooks, where
    they run) unless the profile sets one: each profile has its own gallery, so ``make figures``
    (ci) never writes over the committed quick one."""
    if "figures_dir" in params or "figures_dir" not in declared_parameters(nb):
        return params
    return {**params, "figures_dir": os.path.relpath(FIGURES / Path(profile_path).stem, NOTEBOOKS)}


def _written_folders(plan: dict[Path, dict], out_dir: Path) -> set[Path]:
    """The folders a run writes into: each notebook's ``figures_dir`` (relative to the notebooks;
    :func:`gallery` has set it in every plan that declares it) and the executed copies' ``out_dir``."""
    figures = {p["figures_dir"] for p in plan.values() if isinstance(p.get("figures_dir"), str)}
    return {(NOTEBOOKS / f).resolve() for f in figures} | {out_dir.resolve()}


def _run_serial(plan_path, plan: dict[Path, dict], prepared: dict, out_dir: Path, dry_run: bool,
                progress_every: float) -> list[Path]:
    """:func:`run_figures` one notebook after another (or their dry-run cost)."""
    import nbformat
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    done, gpu_hours, t_all, missing = [], 0.0, time.time(), []
    for nb, params in plan.items():
        print(f"[{nb.stem}] {', '.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}", flush=True)
        if dry_run:  # what the run would need: data present?, sizes, steps, GPU hours
            cost = estimate_cost(nb.stem, {**_defaults(nb), **params})
            print("\n".join(f"    {line}" for line in cost["lines"]), flush=True)
            gpu_hours += cost["gpu_hours"]
            missing += [nb.stem] if any("MISSING" in line for line in cost["lines"]) else []
            continue
        target = out_dir / nb.name
        t0 = time.time()
        try:
            with _Progress(nb.stem, target, every=progress_every), _kernel_config() as config:
                nbformat.write(prepared[nb], str(target))  # the checked notebook runs as it is: no parameters now
                pm.execute_notebook(str(target), str(target), cwd=str(NOTEBOOKS), kernel_name="python3",
                                    progress_bar=False, log_output=False, config=config)
        except pm.PapermillExecutionError as err:
            src = err.source.strip().splitlines()[0][:60] if err.source and err.source.strip() else ""
            raise OmnijetError(f"{nb.name}: cell {_source_cell(nb, err.cell_index, bool(params))} failed "
                               f"({err.ename}: {_first_line(err.evalue)}) at `{src}`; "
                               f"executed copy: {target}") from None
        except Exception as err:  # kernel died, timeout, missing kernel, ...
            raise OmnijetError(f"{nb.name}: execution aborted ({type(err).__name__}: {_first_line(err)}); "
                               f"executed copy: {target}") from None
        print(f"[{nb.stem}] done in {_clock(time.time() - t0)}", flush=True)
        done.append(target)
    if done:
        print(f"{len(done)} notebook(s) done in {_clock(time.time() - t_all)}", flush=True)
    if dry_run:
        print(f"total: ~{gpu_hours:.3g} GPU-hours of training and sampling (estimate; see GPU_JETS_PER_S "
              f"in omnijet_lib/figures.py for the assumed throughputs)")
        if missing:  # the profile is valid, but a real run would fail on its inputs
            raise OmnijetError(f"{plan_path}: inputs missing for {', '.join(missing)} (the MISSING lines "
                               f"above); download them or change the profile")
    return done


def _prepared(nb: Path, params: dict):
    """``nb`` with papermill's parameters cell injected (in memory), checked by :func:`check_injected`."""
    import papermill as pm  # slow to import: only once the profile is known to be valid

    try:
        node = pm.execute_notebook(str(nb), None, parameters=params, prepare_only=True, kernel_name="python3",
                                   progress_bar=False)
    except Exception as err:  # a value papermill cannot translate
        raise OmnijetError(f"{nb.name}: the parameters could not be injected ({type(err).__name__}: "
                           f"{_shown(_first_line(err), 200)}); nothing was run") from None
    check_injected(nb, node, params)
    return node


def check_injected(nb: Path, node, params: dict) -> None:
    """Defence in depth against a value whose text would run as code in the kernel: the parameters
    cell papermill injected into ``node`` must be ``name = literal`` lines (``ast.literal_eval``)
    that give back exactly ``params`` (dict keys as text, as papermill writes them); anything else
    is one line naming the notebook and the parameter."""
    import ast

    if not params:  # nothing injected
        return
    cells = [c for c in node.cells if "injected-parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise OmnijetError(f"{nb.name}: {len(cells)} injected parameters cells, expected one; nothing was run")
    lines = cells[0].source.splitlines()

    def refuse(lineno: int, problem: str):
        """One line naming the parameter whose assignment starts at or before ``lineno``: its value broke out."""
        names = [ln.split(" = ", 1)[0] for ln in lines[:lineno]]
        name = next((n for n in reversed(names) if n in params), None)
        raise OmnijetError(f"{nb.name}: injected parameter{f' {name}' if name else 's'}: {problem}; nothing was run")

    try:
        body = ast.parse(cells[0].source).body
    except SyntaxError as err:
        refuse(err.lineno or len(lines), "the cell is not valid Python (SyntaxError)")
    except (ValueError, RecursionError, MemoryError) as err:
        refuse(len(lines), f"the cell cannot be parsed ({type(err).__name__})")
    given = {}
    for stmt in body:
        target = stmt.targets[0].id if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 \
            and isinstance(stmt.targets[0], ast.Name) else None
        if target not in params or target in given:  # code smuggled in by a value
            refuse(stmt.lineno, f"`{_shown(ast.unparse(stmt))}` is not an assignment of a parameter")
        try:
            given[target] = ast.literal_eval(stmt.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            refuse(stmt.lineno, f"`{_shown(ast.unparse(stmt.value))}` is not a literal")
    for name, value in params.items():
        try:
            expected = _as_injected(value)
        except TypeError as err:
            raise OmnijetError(f"{nb.name}: injected parameter {_shown(name)} holds a {err}, not plain data; "
                               f"nothing was run") from None
        if name not in given or given[name] != expected:
            raise OmnijetError(f"{nb.name}: injected parameter {_shown(name)} does not give back the profile's "
                               f"value; nothing was run")


def _as_injected(value):
    """``value`` as the injected cell gives it back (dict keys as text); TypeError naming the
    first type that is not plain data (exact types: a subclass could change its own text)."""
    if type(value) in (str, int, float, bool, type(None)):
        return value
    if type(value) is list:
        return [_as_injected(v) for v in value]
    if type(value) is dict:
        bad = [k for k in value if type(k) not in (str, int)]
        if bad:
            raise TypeError(f"{type(bad[0]).__name__} key")
        return {str(k): _as_injected(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def run_parallel(profile: Path, plan: dict[Path, dict], out_dir: Path, jobs: int, progress_every: float = 30.0,
                 command=None) -> list[Path]:
    """Run the notebooks of ``plan`` (notebook: parameters, in profile order) as up to ``jobs``
    child processes (``omnijet figures --only``, or ``command(nb)``'s argv) that respect
    :func:`needs`; their lines go to stdout as they come.
    The CPU cores are shared out when a notebook starts (``OMP_NUM_THREADS``: cores / notebooks
    running or ready then). After a failure nothing new starts; the running ones finish and the
    first error (a child's ``error:`` line) is raised."""
    import subprocess
    import threading

    cores = os.cpu_count() or 1
    in_run = {nb.stem[:2] for nb in plan}
    pending, running, finished, errors, done = list(plan), {}, set(), [], []
    t_all = time.time()

    def ready(nb: Path) -> bool:
        return all(d in finished or d not in in_run for d in NEEDS.get(nb.stem[:2], ()))

    def relay(proc, failure: list) -> None:
        for line in proc.stdout:  # stdout and stderr, one pipe: nothing can fill up unread
            if line.startswith("error: "):
                failure.append(line.removeprefix("error: ").strip())
            elif "notebook(s) done in" not in line:  # the child's total; the run's comes at the end
                print(line, end="", flush=True)

    while pending or running:
        startable = [nb for nb in pending if ready(nb)] if not errors else []
        for nb in startable[:max(0, jobs - len(running))]:
            threads = max(1, cores // min(jobs, len(running) + len(startable)))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
            cmd = command(nb) if command else [
                sys.executable, "-m", "omnijet_lib.figures", "--profile", str(profile), "--only", nb.stem,
                "--executed-dir", str(out_dir), "--progress-every", str(progress_every), "--locked"]
            print(f"[{nb.stem}] starting ({threads} thread{'s' if threads > 1 else ''})", flush=True)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            failure: list[str] = []
            relay_thread = threading.Thread(target=relay, args=(proc, failure), daemon=True)
            relay_thread.start()
            running[nb] = (proc, relay_thread, failure)
            pending.remove(nb)
        if not running:  # only after a failure: what is left cannot start
            break
        time.sleep(0.5)
        for nb, (proc, relay_thread, failure) in list(running.items()):
            if proc.poll() is None:
                continue
            relay_thread.join()
            del running[nb]
            if proc.returncode == 0:
                finished.add(nb.stem[:2])
                done.append(out_dir / nb.name)
            else:
                errors.append(failure[-1] if failure else f"{nb.name}: exit status {proc.returncode}")
    if errors:
        skipped = ", ".join(nb.stem for nb in pending)
        raise OmnijetError(errors[0] + (f" (not started: {skipped})" if skipped else ""))
    print(f"{len(done)} notebook(s) done in {_clock(time.time() - t_all)}", flush=True)
    return done


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d} min" if m else f"{s} s"


def progress_line(stem: str, executing: Path, elapsed: float) -> str:
    """``[stem] cell n/N running, m:ss min elapsed`` from papermill's copy of the running notebook
    (papermill saves it when a cell starts, marking it ``running``)."""
    import json

    try:
        cells = [c for c in json.loads(executing.read_text())["cells"] if c["cell_type"] == "code"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return f"[{stem}] starting, {_clock(elapsed)} elapsed"
    status = [c.get("metadata", {}).get("papermill", {}).get("status") for c in cells]
    n = status.index("running") + 1 if "running" in status else status.count("completed")
    return f"[{stem}] cell {n}/{len(cells)} running, {_clock(elapsed)} elapsed"


class _Progress:
    """Context manager: a thread printing :func:`progress_line` every ``every`` seconds."""

    def __init__(self, stem: str, executing: Path, every: float = 30.0):
        import threading

        self.stem, self.executing, self.every = stem, executing, every
        self.stop, self.t0 = threading.Event(), time.time()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            print(progress_line(self.stem, self.executing, time.time() - self.t0), flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def _kernel_config():
    """The kernel talks over local IPC sockets in a private temporary folder (no TCP, hence no
    "running over TCP without encryption" warning); TCP remains on Windows."""
    from traitlets.config import Config

    if os.name == "nt":
        yield Config()
        return
    with tempfile.TemporaryDirectory(prefix="omnijet-kernel-") as tmp:
        yield Config({"KernelManager": {"transport": "ipc", "ip": str(Path(tmp) / "k")}})


# --------------------------------------------------------------------------- dry-run cost estimate
#: Assumed throughput on ONE A100-class GPU with bf16-mixed, paper-size models, ~40 constituents
#: per jet (jets/s; training = forward + backward). The paper gives no timings: these are
#: documented guesses from FLOPs per jet (VQ-VAE ~0.2 GFLOP, GPT ~0.9, EPiC-FM JetClass ~1,
#: fwd+bwd) at the 5-15 TFLOP/s such small models reach (kernel-launch bound), and should be
#: replaced by measured numbers once the quick profile has run on a GPU.
GPU_JETS_PER_S = {
    "vqvae": 20_000,               # conditional VQ-VAE, 4+4 NormFormer blocks, hidden 128
    "gpt": 15_000,                 # 3 blocks, 256 wide, vocabulary 8194
    "gpt_classifier": 15_000,      # the same backbone with the classification head
    "deepsets": 100_000,           # token-quality DeepSets classifier
    "transformer": 20_000,         # token-quality Transformer (5 NormFormer + 2 class-attention blocks)
    "epic_jetclass": 10_000,       # EPiC-FM 20 layers, hidden 300
    "epic_light": 60_000,          # EPiC-FM 6 layers, hidden 128
    "gpt_generate": 5_000,         # sampling with the key/value cache
}
_PADDED_BYTES_PER_JET = 128 * 3 * 4 + 128  # float32 features + bool mask, as the notebooks hold them


def _defaults(nb: Path) -> dict:
    """The notebook's declared defaults as Python values (papermill gives their source text)."""
    import ast

    out = {}
    for k, v in declared_parameters(nb).items():
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _data(params: dict, key: str = "data_files", classes=None) -> tuple[int, str]:
    """(jets the notebook would load, one line on where they come from and whether they exist)."""
    import glob

    from .data.jetclass import CLASS_FILE_PREFIXES, class_index

    files = params.get(key)
    want = None if classes is None else [class_index(c) for c in classes]
    if files is None:
        from .io import data_root
        from .simulation import SimulationConfig

        n = params.get("per_class", 300) * (10 if want is None else len(want))
        cache = data_root() / "simulated" / SimulationConfig(per_class=params.get("per_class", 300),
                                                             seed=params.get("seed", 1)).cache_key()
        state = "cached" if any(cache.glob("*.root")) else "not simulated yet: `omnijet simulate` runs first (CPU)"
        return n, f"{key}: embedded simulation, {n} jets ({state})"
    patterns = [files] if isinstance(files, str) else list(files)
    paths, missing = [], []
    for p in patterns:
        p = p if Path(p).is_absolute() else str(NOTEBOOKS / p)  # notebooks run in notebooks/
        hits = [p] if os.path.lexists(p) else sorted(glob.glob(p))  # a file is itself, as for the readers
        (paths.extend(hits) if hits else missing.append(p))
    if want is not None:  # official file names tell the class
        paths = [p for p in paths if any(Path(p).name.startswith(CLASS_FILE_PREFIXES[c] + "_") for c in want)] \
            or paths
    n = 0
    if paths:
        import uproot

        for p in paths:
            try:
                with uproot.open(p) as f:
                    n += int(f["tree"].num_entries)
            except Exception:
                missing.append(f"{p} (unreadable)")
    state = f"{len(paths)} files, {n} jets" + (f"; MISSING: {', '.join(missing[:3])}" if missing else "")
    expected = _expected_jetclass(missing, want)
    if expected:  # official JetClass names: size the run as it will be once downloaded
        n += expected[1]
        state += f" (official JetClass names: {expected[0]} files, {expected[1]} jets once downloaded)"
    return n, f"{key}: {state}"


#: file numbers of the official JetClass splits (100k jets per file)
JETCLASS_SPLITS = {"train_100M": range(0, 100), "test_20M": range(100, 120), "val_5M": range(120, 125)}
JETCLASS_JETS_PER_FILE = 100_000


def _expected_jetclass(patterns, want=None) -> tuple[int, int] | None:
    """(files, jets) that missing ``patterns`` would match among the official JetClass files."""
    import fnmatch

    from .data.jetclass import CLASS_FILE_PREFIXES

    names = set()
    for p in patterns:
        split = Path(p).parent.name
        if split not in JETCLASS_SPLITS:
            continue
        classes = range(len(CLASS_FILE_PREFIXES)) if want is None else want
        names |= {f"{split}/{CLASS_FILE_PREFIXES[c]}_{i:03d}.root" for c in classes for i in JETCLASS_SPLITS[split]
                  if fnmatch.fnmatch(f"{CLASS_FILE_PREFIXES[c]}_{i:03d}.root", Path(p).name)}
    return (len(names), len(names) * JETCLASS_JETS_PER_FILE) if names else None


def _published_line(checkpoint_dir) -> str:
    """Whether the published checkpoints are where the profile says."""
    from .official import find_published

    path = Path(checkpoint_dir) if Path(checkpoint_dir).is_absolute() else NOTEBOOKS / checkpoint_dir
    try:
        found = find_published(path)
    except OmnijetError as err:
        return f"checkpoint_dir: MISSING ({err}; omnijet checkpoints fetch --dest {path.resolve()})"
    return f"checkpoint_dir: published tokenizer and backbone found ({found['backbone'].name}); nothing is pre-trained"


def _cost_runs(stem: str, p: dict, n: int) -> list[tuple[str, str, float, int, int]]:
    """The trainings (and samplings) of a fresh run: (label, model, jets per epoch, epochs, batch);
    batch None marks a sampling, whose "jets" are training-jet equivalents of its forward passes."""
    runs = []
    vq_kinds = [k for k in p.get("kinds", []) if k != "binned"]
    if stem.startswith("01"):
        train = 0.6 * n  # 60/20/20 split
        value_per_key("tokenizer.per_size", (p.get("tokenizer") or {}).get("per_size"), p.get("codebook_sizes", []),
                      {})  # an unknown codebook size fails here, before anything runs
        runs += [r for kind in vq_kinds for K in p.get("codebook_sizes", []) for r in _tokenizer_runs(p, n, kind, K)]
        n_inputs = 1 + len(vq_kinds) * len(p.get("codebook_sizes", [])) + \
            (len(p.get("binned_bins", [])) if "binned" in p.get("kinds", []) else 0)
        for arch in p.get("classifier_kw", {}) or {}:
            runs.append((f"{arch} classifier x{n_inputs} inputs", arch, n_inputs * train,
                         p.get("classifier_epochs", 1), p.get("classifier_batch_size", 256)))
    elif stem.startswith("02"):
        runs += _tokenizer_runs(p, n, "conditional", p.get("num_codes"))
        fractions = [f for f in p.get("scaling_fractions", []) if f < 1]
        if not p.get("checkpoint_dir"):
            runs += [r for name in ("combined", "qcd", "top") for r in _backbone_runs(p, n, name)]
            runs += [r for f in fractions for r in _backbone_runs(p, n, "combined", f)]
        model_generate = value_per_key("n_generate_per_model", p.get("n_generate_per_model"),
                                       ("combined", "qcd", "top"), p.get("n_generate", 0))
        gen = sum(model_generate.values()) + len(fractions) * model_generate["combined"]
        runs.append((f"generation of {gen} jets", "gpt_generate", gen, 1, None))
        runs.append((f"classifier test x{len(p.get('classifier_seeds', []))} seeds", "deepsets",
                     0.6 * 2 * gen * len(p.get("classifier_seeds", [])),
                     p.get("classifier_epochs", 1), p.get("classifier_batch_size", 256)))
    elif stem.startswith("03"):
        if not p.get("checkpoint_dir"):
            runs += _tokenizer_runs(p, n, "conditional", p.get("num_codes")) + _backbone_runs(p, n, "combined")
        from .training.transfer import STRATEGIES

        cap, only = p.get("max_epochs", 1), p.get("strategies_per_size") or {}  # one cap, or {size: cap}

        def passes(curves):  # jet passes up to max_epochs, at the sizes where each curve runs
            return sum(s * (cap.get(s, 1) if isinstance(cap, dict) else cap) for c in curves
                       for s in p.get("train_sizes", []) if s not in only or c in only[s])
        runs.append(("fine-tuning, 3 strategies x seeds (jet passes up to max_epochs, before early stopping)",
                     "gpt_classifier", p.get("n_seeds", 1) * passes(STRATEGIES), 1, p.get("batch_size", 64)))
        for K in [] if p.get("checkpoint_dir") else p.get("compare_num_codes") or []:
            runs += _tokenizer_runs(p, n, "conditional", K) + _backbone_runs({**p, "num_codes": K}, n, "combined")
            runs.append((f"fine-tuning at K {K}, 3 strategies x seeds", "gpt_classifier",
                         p.get("n_seeds", 1) * passes([f"{s}_k{K}" for s in STRATEGIES]), 1, p.get("batch_size", 64)))
        for arch in p.get("baselines") or {}:
            runs.append((f"{arch} on constituents x seeds (from scratch)", arch, p.get("n_seeds", 1) * passes([arch]), 1,
                         p.get("batch_size", 64)))
    elif stem.startswith("04"):
        if not p.get("checkpoint_dir"):
            runs += _tokenizer_runs(p, n, "conditional", p.get("num_codes")) + _backbone_runs(p, n, "top")
        epic = "epic_" + str(p.get("epic_config", "light"))
        runs.append((f"EPiC-FM {p.get('epic_config')}", epic, n, p.get("epochs", 1), p.get("batch_size", 256)))
        steps = p.get("ode_steps", 100)  # midpoint: 2 forward passes per step, a forward ~1/3 of training
        gen = p.get("n_generate", 0)
        runs.append((f"EPiC-FM sampling of {gen} jets, {steps} midpoint steps", epic, gen * 2 * steps / 3, 1, None))
        runs.append((f"OmniJet-α sampling of {gen} jets", "gpt_generate", gen, 1, None))
    elif stem.startswith("05"):
        runs += _tokenizer_runs(p, n, p.get("kind", "conditional"), p.get("num_codes"))
    elif stem.startswith("06"):
        runs += _tokenizer_runs(p, n, "conditional", p.get("num_codes"))
        runs += [r for name in ("qcd", "top", "combined") for r in _backbone_runs(p, n, name)]
        if p.get("score_files") is not None:
            scored = _data(p, "score_files")[0]
        else:
            scored = 10 * p.get("score_per_class", 0) + p.get("sculpting_jets", 0)
        # a likelihood is one forward pass, ~1/3 of a training step
        runs.append((f"likelihoods of {scored} jets under 2 backbones", "gpt", 2 * scored / 3, 1, None))
        from .studies.generation import backbone_data, class_backbone_settings

        source = backbone_data(p.get("backbone"), p.get("data_files"), p.get("per_class", 300), p.get("seed", 1),
                               load=False).source  # the classifier learns from the jets the notebook holds of them
        pretrained = 2 * source["per_class"] if "per_class" in source else n
        runs.append(("the supervised classifier (combined backbone fine-tuned on the backbones' jets)", "gpt_classifier",
                     pretrained, p.get("classifier_epochs", 1), p.get("classifier_batch_size", 64)))
        # what it takes: the q/g backbone on fewer jets and in other sizes
        from .data.jetclass import CLASS_LABELS

        runs += [r for f in p.get("density_fractions") or [] for r in _backbone_runs(p, n, "qcd", f)]
        profile_gpt = backbone_data(p.get("backbone"), load=False).settings["gpt_config"]
        for tag, size in (p.get("density_sizes") or {}).items():
            sized = {**(p.get("backbone") or {}), "gpt_config": {**profile_gpt, **size}}
            runs += _backbone_runs(p, n, "qcd", backbone=sized, tag=tag)
        # class-conditional generation: the all-class backbone, single-class ones with its optimiser steps
        own = class_backbone_settings(p.get("backbone"), p.get("class_backbone"))
        conditional = _backbone_runs(p, n, "all", conditional=True, backbone=own, classes=CLASS_LABELS)
        runs += conditional
        singles = p.get("single_class") or []
        runs += [r for c in singles for r in _backbone_runs(p, n, c, epochs=conditional[0][3] * len(CLASS_LABELS),
                                                             backbone=own, classes=CLASS_LABELS)]
        gen = len(CLASS_LABELS) * p.get("generate_per_class", 0) + len(singles) * p.get("generate_per_class", 0)
        runs.append((f"generation of {gen} jets (conditional and single-class)", "gpt_generate", gen, 1, None))
        runs.append((f"classifier tests of the {gen} generated jets", "deepsets", 0.6 * 2 * gen, 20, 256))
        sampled = len(p.get("sampler_settings") or []) * p.get("sampler_jets", 0)
        runs.append((f"sampler controls: {sampled} jets", "gpt_generate", sampled, 1, None))
    elif stem.startswith("07"):
        from .data.jetclass import CLASS_LABELS
        from .studies.generation import backbone_data, class_backbone_settings
        from .training.gpt import gpt_settings

        runs += _tokenizer_runs(p, n, "conditional", p.get("num_codes"))
        qcd = _backbone_runs(p, n, "qcd")[0]
        share = p.get("mixed_share", 0.01)  # the mixed backbone: the q/g one's jets (some t→bqq'), GPT and steps
        data = backbone_data(p.get("backbone"), p.get("data_files"), p.get("per_class", 300), p.get("seed", 1),
                             p.get("trainer"), load=False)
        args = data.gpt_args("qcd", int(p.get("num_codes", 0)) + 2)[1]
        runs += [qcd, (f"GPT qcd with {share:g} of its jets t→bqq' (same steps)", *qcd[1:6],
                       _in_store(p, f"gpt_qcd_tbqq_{share:g}", gpt_settings(**args)[0]))]
        generators = len(p.get("finetune_sizes", [])) * len(p.get("generation_seeds", [])) * \
            len(p.get("generation_methods", []))
        runs.append((f"{generators} generators x {p.get('steps', 0)} steps (methods x sizes x seeds)", "gpt",
                     generators * p.get("steps", 0) * args["batch_size"], 1, args["batch_size"]))
        gen = generators * p.get("n_generate", 0)
        runs.append((f"generation of {gen} jets", "gpt_generate", gen, 1, None))
        runs.append((f"DeepSets tests of the {gen} generated jets", "deepsets",
                     0.6 * 2 * gen * len(p.get("deepsets_seeds", [])), p.get("classifier_epochs", 1), 256))
        # ten-class tagging: notebook 06's all-class backbone, classifiers at N (and scratch_factor x N) per class
        own = class_backbone_settings(p.get("backbone"), p.get("class_backbone"))
        runs += _backbone_runs(p, n, "all", conditional=True, backbone=own, classes=CLASS_LABELS)
        pool = backbone_data(own, p.get("data_files"), p.get("per_class", 300), p.get("seed", 1), load=False).source
        room = pool.get("per_class", math.inf)
        strategies, sizes = p.get("tag_strategies", []), p.get("tag_sizes", [])
        tag = {(s, k) for k in sizes for s in strategies if k <= room} | \
            {("from_scratch", p.get("scratch_factor", 10) * k) for k in sizes
             if "from_scratch" in strategies and p.get("scratch_factor", 10) * k <= room}
        cap = p.get("max_epochs", 1)
        passes = sum(0.8 * len(CLASS_LABELS) * k * (cap.get(k, 1) if isinstance(cap, dict) else cap) for _, k in tag)
        runs.append((f"{len(tag)} ten-class classifiers (jet passes up to max_epochs, before early stopping)",
                     "gpt_classifier", passes, 1, p.get("tag_batch_size", 64)))
    return runs


def _tokenizer_runs(p: dict, n: int, kind: str, num_codes) -> list[tuple]:
    """The training of the profile's ``kind`` tokenizer of size ``num_codes`` (the same model for
    every notebook: whichever needs it first trains it) as
    :func:`omnijet_lib.studies.tokens.profile_tokenizer` asks the store for it (90% of the training
    split, 60% of the jets, trains), and whether the store has it; none for a binned one."""
    from .data.jetclass import CLASS_LABELS
    from .studies.tokens import TOKENIZER_SPLIT, tokenizer_data

    if kind == "binned" or num_codes is None:
        return []
    data = tokenizer_data(p.get("tokenizer"), p.get("data_files"), p.get("per_class", 300), p.get("seed", 1),
                          p.get("trainer"), load=False)
    name, settings, _, epochs = data.request(kind, num_codes)
    if "per_class" in data.source:
        jets = len(CLASS_LABELS) * data.source["per_class"]
    elif data.source["data_files"] != p.get("data_files"):  # files of its own, the same in every notebook
        jets = _data({"data_files": data.source["data_files"]})[0]
    else:
        jets = n
    extra = len(CLASS_LABELS) * data.size_settings(num_codes)["extra_per_class"]
    return [(f"VQ-VAE {kind} K={num_codes} (the profile's; trained once, by the first notebook that needs it)",
             "vqvae", 0.9 * (TOKENIZER_SPLIT[0] * jets + extra), epochs, settings["batch_size"], data.trainer,
             _in_store(p, name, settings))]


def _backbone_runs(p: dict, n: int, name: str, fraction: float = 1.0, conditional: bool = False,
                   epochs: int | None = None, backbone: dict | None = None, classes=None, tag: str = "") -> list[tuple]:
    """The pre-training of the profile's backbone ``name`` (on ``fraction`` of its jets, with the same
    optimiser steps) as :func:`omnijet_lib.studies.generation.profile_backbone` asks the store for it
    (90% of the jets train, 10% validate; streamed from token shards, all train), and whether the
    store has it. ``backbone`` (default the profile's) and ``classes`` as :func:`backbone_data` takes them."""
    from .studies.generation import BACKBONE_CLASSES, backbone_classes, backbone_data
    from .training.gpt import gpt_settings

    loaded = tuple(classes or BACKBONE_CLASSES["combined"])
    data = backbone_data(p.get("backbone") if backbone is None else backbone, p.get("data_files"),
                         p.get("per_class", 300), p.get("seed", 1), p.get("trainer"), load=False, classes=loaded)
    store_name, args = data.gpt_args(name, int(p.get("num_codes", 0)) + 2, fraction, conditional, epochs, tag)
    own = backbone_classes(name)
    streamed = ""
    if "shards" in data.source:
        n, streamed = _shards(data.source["shards"], own)
        n *= len(loaded) / len(own)  # jets below count per loaded class
    elif "per_class" in data.source:
        n = len(loaded) * data.source["per_class"]
    elif data.source["data_files"] != p.get("data_files"):  # files of its own
        n = _data({"data_files": data.source["data_files"]}, classes=list(loaded))[0]
    jets = len(own) / len(loaded) * n * fraction
    what = f"GPT {name}" + (f" {tag}" if tag else "") + (" class-conditional" if conditional else "") + \
        (f" on {fraction:g} of its jets (data scaling)" if fraction < 1 else "") + streamed
    settings = {**gpt_settings(**args)[0], **({"streamed": True} if streamed else {})}
    return [(f"{what} (the profile's backbone; trained once, by the first notebook that needs it)", "gpt",
             (1.0 if streamed else 0.9) * jets, args["epochs"], args["batch_size"], data.trainer,
             _in_store(p, store_name, settings))]


def _shards(folder: str, classes) -> tuple[int, str]:
    """(jets of ``classes`` in the token shards of ``folder``, or those official JetClass train
    files would give; the words saying so): what a backbone streamed from them trains on."""
    from .data.jetclass import CLASS_LABELS
    from .data.shards import read_manifest

    path = Path(folder) if Path(folder).is_absolute() else NOTEBOOKS / folder
    idx = [CLASS_LABELS.index(c) for c in classes]
    if (path / "manifest.json").is_file():
        man = read_manifest(path)
        jets = int(sum(man.get("class_counts", [0] * 10)[i] for i in idx))
        state = "" if man.get("complete") else "; tokenization unfinished"
        return jets, f", streamed from {folder}: {len(man['shards'])} shards, {jets} jets{state}"
    jets = len(idx) * len(JETCLASS_SPLITS["train_100M"]) * JETCLASS_JETS_PER_FILE
    return jets, (f", streamed from {folder}: MISSING (omnijet tokenize the JetClass train_100M files with the "
                  f"profile's tokenizer into it; {jets} jets of {'+'.join(classes)} once tokenized)")


def _in_store(p: dict, name: str, settings: dict) -> str:
    """Whether the model store of ``p``'s ``models_dir`` has model ``name`` trained with ``settings``
    (its jets are compared when the notebook runs: they are not loaded for a dry run)."""
    from .training.store import ModelStore

    root = Path(p.get("models_dir") or ".")
    store = ModelStore(root if root.is_absolute() else NOTEBOOKS / root)
    same = store.with_settings(name, settings)
    if same:
        return f"store: reuses {name}/{Path(same[0]['path']).name} if its jets match"
    others = len(store.runs(name))
    return "store: trains it" + (f"; {others} run(s) of {name} with other settings" if others else "")


def estimate_cost(stem: str, params: dict) -> dict:
    """Sizes and GPU cost of running notebook ``stem`` with ``params`` (its defaults merged with
    the profile), for ``--dry-run``: ``{"jets", "steps", "gpu_hours", "lines"}``. Upper bounds for
    a fresh run: models found in ``models_dir`` are reused by the notebooks, early stopping cuts
    fine-tuning short, and models smaller than the paper's (``model_kw``) train faster."""
    pair = [params.get("background", "QCD"), params.get("signal", "Tbqq")]
    published = params.get("checkpoint_dir")
    classes = {"02": pair, "03": pair, "04": pair if published else ["Tbqq"]}.get(stem[:2])
    n, where = _data(params, classes=classes)
    lines = [where]
    if published:
        lines.append(_published_line(published))
    if params.get("finetune_files") is not None:
        lines.append(_data(params, "finetune_files", classes)[1])
    if n:
        lines.append(f"memory: {n * _PADDED_BYTES_PER_JET / 1e9:.2g} GB of padded features held by the notebook")
    trainer = params.get("trainer") or {}
    limit = trainer.get("limit_train_batches")  # the official step counts cap each epoch
    gpus = 1
    for k in ("devices", "num_nodes"):
        gpus *= trainer.get(k) if isinstance(trainer.get(k), int) else 1
    steps, hours = 0, 0.0
    runs = _cost_runs(stem, params, n)
    for label, model, jets, epochs, batch, *own in runs:
        # the profile's tokenizers and backbones train with their own trainer, and the store may have them
        cap = (own[0] or {}).get("limit_train_batches", limit) if own else limit
        if len(own) > 1:
            label = f"{label} [{own[1]}]"
        h = jets * epochs / GPU_JETS_PER_S[model] / 3600
        hours += h
        if batch is None:  # sampling
            lines.append(f"{label}: {h:.3g} GPU-h")
            continue
        per_epoch = math.ceil(jets / max(batch, 1))
        if isinstance(cap, int) and not isinstance(cap, bool):
            per_epoch = min(per_epoch, cap)
            h = per_epoch * batch * epochs / GPU_JETS_PER_S[model] / 3600
        s = per_epoch * epochs
        steps += s
        lines.append(f"{label}: {jets:.0f} jets x {epochs} epochs, batch {batch}: {s} steps, {h:.3g} GPU-h")
    if runs:
        lines.append(f"total: {steps} steps, ~{hours:.3g} GPU-hours ({hours / gpus:.3g} h on {gpus} GPU(s))")
    elif not stem.startswith("00"):
        lines.append("no cost model for this notebook (add one in omnijet_lib.figures._cost_runs)")
    return {"jets": n, "steps": steps, "gpu_hours": hours, "lines": lines}


def store_checked_outputs(executed: Path, source: Path) -> int:
    """Copy the outputs of ``# NBVAL_CHECK_OUTPUT`` cells from an executed notebook into its source
    (the reference nbval compares against); every other cell of the source stays output-free."""
    import nbformat

    run, src = nbformat.read(executed, 4), nbformat.read(source, 4)
    ran = [c for c in run.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    if len(ran) != len(src.cells):
        raise OmnijetError(f"{executed}: does not match {source} cell for cell")
    n = 0
    for a, b in zip(ran, src.cells):
        if b.cell_type != "code":
            continue
        b.outputs, b.execution_count = [], None
        if b.source.startswith("# NBVAL_CHECK_OUTPUT"):
            b.outputs = [o for o in a.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"]
            b.execution_count = n = n + 1  # nbval ignores outputs of cells without a count
    with atomic_path(source) as tmp:
        nbformat.write(src, tmp)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="omnijet figures", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="ci", help="ci | quick | paper | path to a YAML file")
    ap.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 02_generation")
    ap.add_argument("--dry-run", action="store_true", help="validate the profile and check its inputs, run "
                    "nothing (exit status 1 when inputs are missing)")
    ap.add_argument("--store-checks", action="store_true",
                    help="afterwards, store the check-cell outputs in the source notebooks (maintainers, ci profile)")
    ap.add_argument("--jobs", type=int, default=1, help="notebooks run side by side, in the order their "
                    "inputs allow, sharing the CPU cores (default 1; 2 on a 2-core machine is ~1.5x faster)")
    ap.add_argument("--executed-dir", type=Path, default=None,
                    help="where the executed copies go (default notebooks/executed)")
    ap.add_argument("--progress-every", type=float, default=30.0, help=argparse.SUPPRESS)
    ap.add_argument("--wait", action="store_true", help=WAIT_HELP)
    ap.add_argument("--locked", action="store_true", help=argparse.SUPPRESS)  # run_parallel's children
    args = ap.parse_args(argv)
    try:
        done = run_figures(args.profile, args.only, out_dir=args.executed_dir, dry_run=args.dry_run,
                           progress_every=args.progress_every, jobs=args.jobs, wait=args.wait, locked=args.locked)
        if args.store_checks:
            for executed in done:
                store_checked_outputs(executed, NOTEBOOKS / executed.name)
    except OmnijetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
