"""The official OmniJet-α models (the ``gabbro`` package, uhh-pd-ml/omnijet_alpha) as ours.

Our networks are the official ones parameter for parameter; only the names differ. Each
function here takes an official Lightning ``state_dict`` (tensors under the official names:
``model.*`` for the tokenizer, ``module.*`` + ``head.*`` for the backbones) and the official
model arguments, and returns our model with those weights:

* :func:`tokenizer_from_official` — ``VQVAENormFormer`` (conditional) or ``VQVAEMLP``
  (unconditional) with its vqtorch ``VectorQuant`` → :class:`~omnijet_lib.tokenizers.VQVAE`;
* :func:`gpt_from_official` — ``BackboneNextTokenPredictionLightning`` → :class:`~omnijet_lib.models.gpt.GPT`;
* :func:`classifier_from_official` — ``BackboneClassificationLightning`` (summation head) →
  :class:`~omnijet_lib.models.classifier.GPTClassifier`.

The published checkpoints are Lightning pickles that also hold ``functools.partial`` optimisers,
the official scheduler class and omegaconf objects. :func:`read_lightning_checkpoint` reads them
with a restricted unpickler: tensors and plain containers are built, every other global becomes
an inert stand-in (nothing in the file is ever called) and globals that could run code
(``os.system``, ``eval``, ...) are refused. On top of it:

* :func:`load_official_tokenizer` (``model_ckpt.ckpt`` + its ``config.yaml``, whose feature
  scaling must be ours), :func:`load_official_backbone`, :func:`load_official_classifier`;
* :func:`find_published` / :func:`convert_published` — the published archive's layout
  (``vqvae_8192_tokens/``, ``generative_8192_tokens/``) → our safetensors checkpoints, converted
  once into two runs of the model store (``published_tokenizer/``, ``published_gpt_combined/``);
* :func:`fetch_published` — download and unpack the published archive (resumable, atomic,
  safe extraction, sha256 of every file checked on reuse).

Every official tensor must land in exactly one of ours and every one of ours must be filled;
anything else is an :class:`OmnijetError` naming the tensors. The model the arguments declare is
first built on the meta device and compared with the stored tensors, so that no size in a file
allocates memory before it is known to fit what the file holds (:func:`~omnijet_lib.io.declared_model`). Buffers with no counterpart
(the GPT's causal-mask ``tril``) are dropped. The parity tests (tests/test_official_parity.py)
run the official modules' recorded outputs through these.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import re
import reprlib
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .data.download import download_file, extract_archive, path_inside
from .data.features import ANGLE_SCALE, FEATURE_NAMES, PT_SHIFT, REL_CUT
from .io import (LOCK_FILE, OmnijetError, check_finite_weights, check_tensor_views, declared_model, exclusive_lock,
                 file_sha256, save_model, shape_mismatch, write_json)
from .models.classifier import GPTClassifier
from .models.gpt import GPT, GPTConfig
from .tokenizers.base import load_tokenizer, save_tokenizer
from .tokenizers.vqvae import VQVAE, VQVAEConfig
from .training.gpt import GPT_FILE
from .training.store import ModelRequest, ModelStore, Run
from .training.vqvae import TOKENIZER_FILE

log = logging.getLogger(__name__)

__all__ = ["tokenizer_from_official", "gpt_from_official", "classifier_from_official", "rename_official",
           "read_lightning_checkpoint", "plain", "load_official_tokenizer", "load_official_backbone",
           "load_official_classifier", "find_published", "convert_published", "Published", "fetch_published",
           "PUBLISHED_URL"]

# (official name pattern, our name), tried in order. Inside a NormFormer block (gabbro's
# NormformerBlock -> ours): nn.MultiheadAttention's in_proj is our qkv, rows [q; k; v] alike.
_NORMFORMER = [
    (r"norm1\.(?P<p>weight|bias)", r"ln_attn_in.\g<p>"),
    (r"attn\.in_proj_weight", "attn.qkv.weight"),
    (r"attn\.in_proj_bias", "attn.qkv.bias"),
    (r"attn\.out_proj\.(?P<p>weight|bias)", r"attn.proj.\g<p>"),
    (r"norm2\.(?P<p>weight|bias)", r"ln_attn_out.\g<p>"),
    (r"mlp\.0\.(?P<p>weight|bias)", r"ffn.ln_in.\g<p>"),
    (r"mlp\.1\.(?P<p>weight|bias)", r"ffn.fc1.\g<p>"),
    (r"mlp\.4\.(?P<p>weight|bias)", r"ffn.fc2.\g<p>"),
]
_QUANTIZER = [
    (r"model\.vqlayer\.codebook\.weight", "vq.codebook.weight"),
    (r"model\.vqlayer\.affine_transform\.scale", "vq.affine_scale"),
    (r"model\.vqlayer\.affine_transform\.bias", "vq.affine_bias"),
    (r"model\.vqlayer\._counts", "vq.code_counter"),
]
RULES = {
    "conditional": [
        (r"model\.input_projection\.(weight|bias)", r"encoder.inp.\g<1>"),
        (r"model\.latent_projection_in\.(weight|bias)", r"encoder.out.\g<1>"),
        (r"model\.latent_projection_out\.(weight|bias)", r"decoder.inp.\g<1>"),
        (r"model\.output_projection\.(weight|bias)", r"decoder.out.\g<1>"),
        *[(rf"model\.{side}_normformer\.blocks\.(?P<i>\d+)\.{a}", rf"{side}.blocks.\g<i>.{b}")
          for side in ("encoder", "decoder") for a, b in _NORMFORMER],
        *_QUANTIZER,
    ],
    "unconditional": [
        (r"model\.(encoder|decoder)\.(\d+)\.(weight|bias)", r"\g<1>.\g<2>.\g<3>"),
        *_QUANTIZER,
    ],
    "gpt": [
        (r"module\.embedding_table\.weight", "embed.weight"),
        (r"module\.GPT_blocks\.(\d+)\.mha_block\.(query|key|value)\.weight", r"blocks.\g<1>.attn.\g<2>.weight"),
        (r"module\.GPT_blocks\.(\d+)\.mha_block\.proj\.(weight|bias)", r"blocks.\g<1>.attn.proj.\g<2>"),
        (r"module\.GPT_blocks\.(\d+)\.ff_block\.net\.(0|2)\.(weight|bias)", r"blocks.\g<1>.mlp.\g<2>.\g<3>"),
        (r"module\.GPT_blocks\.(\d+)\.layernorm_(1|2)\.(weight|bias)", r"blocks.\g<1>.ln\g<2>.\g<3>"),
        (r"head\.fc1\.(weight|bias)", r"head.\g<1>"),
    ],
}
RULES["classifier"] = [(a, "gpt." + b) for a, b in RULES["gpt"] if not a.startswith("head")] + [
    (r"head\.classification_head_linear_embed\.(weight|bias)", r"token_mlp.\g<1>"),
    (r"head\.classification_head_linear_class\.(weight|bias)", r"out.\g<1>"),
]
DROPPED = re.compile(r".*\.tril$|.*\.data_initialized$")  # official buffers without a counterpart


def rename_official(state_dict: dict, kind: str, source: str = "official state_dict") -> dict:
    """Official tensor names → ours for ``kind`` in :data:`RULES`; refuses unknown names."""
    out, unknown = {}, []
    for name, tensor in state_dict.items():
        if DROPPED.match(name):
            continue
        for pattern, repl in RULES[kind]:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise OmnijetError(f"{source}: tensors that an official {kind} model does not have: {sorted(unknown)[:8]}")
    return out


def _load(build, ours: dict, source: str, settings: dict, keep=()) -> torch.nn.Module:
    """The model ``build()`` makes, holding ``ours``. It is built on the meta device first, so that
    the sizes its arguments declare (``settings``: the official ``model_kwargs``) are compared with
    the stored tensors before anything is allocated (:func:`~omnijet_lib.io.declared_model`).
    Shapes must fit (up to the leading singleton dimensions of the official layout) and nothing
    may be missing, except the tensors named in ``keep``, which the official file need not carry
    and which keep the values our model starts with."""
    own = declared_model(source, build, ours, settings).state_dict()
    misfit = [n for n, t in ours.items() if n in own and t.numel() != own[n].numel()]
    if misfit:
        more = f" (and {len(misfit) - 1} more tensors)" if len(misfit) > 1 else ""
        raise OmnijetError(f"{source}: tensors do not fit the model built from its arguments: "
                           f"{shape_mismatch(settings, misfit[0], ours[misfit[0]].shape, own[misfit[0]].shape)}{more}")
    unknown = [f"{n} (no such tensor)" for n in ours if n not in own]
    if unknown:
        raise OmnijetError(f"{source}: tensors do not fit the model built from its arguments: {unknown[:5]}")
    missing = sorted(set(own) - set(ours) - set(keep))
    if missing:
        raise OmnijetError(f"{source}: tensors missing: {missing[:8]}")
    model = build()  # every tensor it allocates has the size of a stored one
    state = {n: t for n, t in model.state_dict().items() if n in keep}
    state.update({n: t.reshape(own[n].shape).to(own[n].dtype) for n, t in ours.items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


_REQUIRED = object()


def _brief(value) -> str:
    """A short one-line repr of a value read from a file (which may be huge or deeply nested)."""
    return " ".join(reprlib.repr(value).split())


def _number(kwargs: dict, key: str, source: str, kind=int, default=_REQUIRED):
    """``kwargs[key]`` (a dotted path such as ``vq_kwargs.num_codes``) as an int, or for
    ``kind=float`` a finite number: the official configs hold nothing else there."""
    value = kwargs
    for part in key.split("."):
        value = value.get(part, default) if isinstance(value, dict) else default
    if value is _REQUIRED:
        raise OmnijetError(f"{source}: model_kwargs lack {key}")
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(value, int) if kind is int else math.isfinite(value))
    except OverflowError:  # an integer beyond any float
        ok = False
    if not ok:
        raise OmnijetError(f"{source}: model_kwargs.{key} is {_brief(value)}, expected "
                           f"{'an integer' if kind is int else 'a finite number'}")
    return kind(value)


def tokenizer_from_official(state_dict: dict, model_kwargs: dict, model_type: str = "VQVAENormFormer",
                            source: str = "official tokenizer") -> VQVAE:
    """Our VQ-VAE from an official tokenizer's ``state_dict`` and its ``model_kwargs``
    (``config.yaml``: ``model.model_kwargs``) and ``model_type`` (``VQVAENormFormer`` or ``MLP``)."""
    if not isinstance(model_kwargs.get("vq_kwargs"), dict):
        raise OmnijetError(f"{source}: model_kwargs.vq_kwargs is {_brief(model_kwargs.get('vq_kwargs'))}, "
                           "expected a mapping")
    common = dict(input_dim=_number(model_kwargs, "input_dim", source, default=3),
                  latent_dim=_number(model_kwargs, "latent_dim", source),
                  num_codes=_number(model_kwargs, "vq_kwargs.num_codes", source),
                  beta=_number(model_kwargs, "vq_kwargs.beta", source, float, 0.95),
                  sync_nu=_number(model_kwargs, "vq_kwargs.sync_nu", source, float, 0.0),
                  affine_lr=_number(model_kwargs, "vq_kwargs.affine_lr", source, float, 0.0),
                  replace_freq=_number(model_kwargs, "vq_kwargs.replace_freq", source, default=0), kmeans_init=False)
    if model_type == "VQVAENormFormer":
        hidden = _number(model_kwargs, "hidden_dim", source)
        cfg = VQVAEConfig(conditional=True, hidden_dim=hidden, mlp_hidden=hidden,
                          num_blocks=_number(model_kwargs, "num_blocks", source, default=2),
                          num_heads=_number(model_kwargs, "num_heads", source, default=1), **common)
        kind = "conditional"
    elif model_type == "MLP":
        enc, dec = model_kwargs.get("encoder_layers"), model_kwargs.get("decoder_layers")
        if not (isinstance(enc, list) and enc and all(isinstance(w, int) and not isinstance(w, bool) for w in enc)) \
                or len(set(enc)) != 1 or enc != dec:
            raise OmnijetError(f"{source}: encoder_layers {_brief(enc)} / decoder_layers {_brief(dec)}: only "
                               f"equal, uniform widths (the paper's [128, 128, 128]) are supported")
        cfg = VQVAEConfig(conditional=False, hidden_dim=enc[0], mlp_layers=len(enc), **common)
        kind = "unconditional"
    else:
        raise OmnijetError(f"{source}: model_type {_brief(model_type)} is not supported (VQVAENormFormer or MLP)")
    ours = rename_official(state_dict, kind, source)
    keep = {"vq.initialised"}  # our codebook counts as initialised (kmeans_init=False)
    if cfg.affine_lr == 0:  # vqtorch has no affine parameters then; ours stay at the identity
        keep |= {"vq.affine_scale", "vq.affine_bias"}
    if "vq.code_counter" not in ours:  # every code fresh: replace_freq batches before it counts as dead
        keep.add("vq.code_counter")
    return _load(lambda: VQVAE(cfg), ours, source, model_kwargs, keep)


def _gpt_config(state_dict: dict, model_kwargs: dict, source: str) -> GPTConfig:
    ffn = state_dict.get("module.GPT_blocks.0.ff_block.net.0.weight")
    if not isinstance(ffn, torch.Tensor) or ffn.ndim != 2:
        raise OmnijetError(f"{source}: no 2-d tensor module.GPT_blocks.0.ff_block.net.0.weight: "
                           "not an official backbone")
    n_layer = len({k.split(".")[2] for k in state_dict if k.startswith("module.GPT_blocks.")})
    sizes = dict(vocab_size=_number(model_kwargs, "vocab_size", source),
                 n_embd=_number(model_kwargs, "embedding_dim", source), n_head=_number(model_kwargs, "n_heads", source),
                 max_len=_number(model_kwargs, "max_sequence_len", source, default=128) + 2)
    try:
        return GPTConfig(n_layer=n_layer, ffn=int(ffn.shape[0]), dropout=0.0, **sizes)
    except OmnijetError as err:  # sizes the config refuses (heads that do not divide the width)
        raise OmnijetError(f"{source}: {err}") from None


def gpt_from_official(state_dict: dict, model_kwargs: dict, source: str = "official backbone") -> GPT:
    """Our GPT from an official generative backbone (``module.*`` and the ``head.fc1`` next-token head)."""
    cfg = _gpt_config(state_dict, model_kwargs, source)
    return _load(lambda: GPT(cfg), rename_official(state_dict, "gpt", source), source, model_kwargs)


def classifier_from_official(state_dict: dict, model_kwargs: dict, source: str = "official classifier") -> GPTClassifier:
    """Our GPT classifier from an official ``BackboneClassificationLightning`` with the
    summation head (``class_head_type: summation``)."""
    cfg = _gpt_config(state_dict, model_kwargs, source)
    n_classes = _number(model_kwargs, "n_out_nodes", source, default=2)
    return _load(lambda: GPTClassifier(cfg, n_classes=n_classes, head_init="default"),
                 rename_official(state_dict, "classifier", source), source, model_kwargs)


# ------------------------------------------------------------------ reading Lightning checkpoints
class Opaque:
    """Inert stand-in for a global that a checkpoint references (an optimiser class, an omegaconf
    node, ...). It keeps what the pickle hands it -- constructor arguments, state, items -- and
    has no behaviour: nothing of the original class is imported or called."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # SETITEMS on dict subclasses (e.g. Lightning's AttributeDict)
        self.items[key] = value

    def append(self, value):  # APPENDS on list subclasses
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    def __repr__(self):
        return f"<{self.qualname}>"


# Built for real: tensors (torch's own rebuild functions; storages are handled by torch.load)
# and plain containers. Refused: modules whose globals can run code when called.
_REAL = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    *((b, n) for b in ("builtins", "__builtin__") for n in ("set", "frozenset", "dict", "list", "tuple", "slice", "complex")),
}
_REFUSED = {"os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib", "runpy",
            "socket", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "signal",
            "multiprocessing", "threading", "types", "operator", "io", "codecs", "pdb", "timeit", "platform",
            "tempfile", "glob", "asyncio", "urllib", "http", "ftplib", "smtplib", "telnetlib", "inspect"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _REAL:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _REFUSED or name.startswith("__"):
            raise _Refused(f"{module}.{name}")
        return type(name, (Opaque,), {"qualname": f"{module}.{name}", "__module__": "omnijet_lib.official"})


class _Refused(pickle.UnpicklingError):
    pass


_RESTRICTED_PICKLE = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=None, __name__="omnijet_restricted")


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning (``torch.save``) checkpoint as a dict of tensors, plain containers and
    :class:`Opaque` stand-ins, read without executing anything from the file (see :class:`Opaque`).
    Refuses files that are not torch zip checkpoints and pickles that reference callables able to
    run code (``os.system``, ``builtins.eval``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise OmnijetError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise OmnijetError(f"{path}: not a checkpoint (not a torch zip archive; truncated download?)")
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except _Refused as err:
        raise OmnijetError(f"{path}: refused, the pickle references {err}, which could run code; "
                           "nothing from it was executed") from None
    except Exception as err:  # a damaged zip member, a pickle that is not a checkpoint, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else "empty or truncated"
        raise OmnijetError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise OmnijetError(f"{path}: not a Lightning checkpoint (no state_dict)")
    odd = [k for k in ckpt["state_dict"] if not isinstance(k, str)]
    if odd:
        raise OmnijetError(f"{path}: state_dict key {_brief(odd[0])} is not a tensor name: not a Lightning checkpoint")
    check_tensor_views(path, ckpt)
    return ckpt


#: the hyper_parameters of a real checkpoint nest a few levels deep and hold a few hundred values
MAX_NESTING, MAX_VALUES = 100, 100_000


def plain(obj, source: str = "checkpoint"):
    """Stand-ins of omegaconf containers, Lightning's AttributeDict and ``functools.partial``
    → plain dicts and lists (a partial becomes ``{"_target_": name, **kwargs}``, as in hydra);
    any other stand-in becomes its qualified name in angle brackets. A structure nested deeper
    than :data:`MAX_NESTING` levels, or of more than :data:`MAX_VALUES` values (a pickle can
    refer to one list many times over), is refused with one line naming ``source``."""
    count = 0

    def convert(obj, depth: int):
        nonlocal count
        count += 1
        if depth > MAX_NESTING:
            raise OmnijetError(f"{source}: hyper_parameters nest deeper than {MAX_NESTING} levels: "
                               "not an official checkpoint")
        if count > MAX_VALUES:
            raise OmnijetError(f"{source}: hyper_parameters hold more than {MAX_VALUES:,} values: "
                               "not an official checkpoint")
        inner = functools.partial(convert, depth=depth + 1)
        if isinstance(obj, Opaque):
            name, state = obj.qualname, obj.state if isinstance(obj.state, dict) else {}
            if name.startswith("omegaconf.") and "_content" in state:
                content = state["_content"]
                if isinstance(content, dict):
                    return {k: inner(v) for k, v in content.items()}
                return [inner(v) for v in content] if isinstance(content, list) else content
            if name.startswith("omegaconf.nodes."):
                return inner(state.get("_val"))
            if name == "functools.partial" and isinstance(obj.state, tuple) and len(obj.state) >= 3:
                func, _, kwargs = obj.state[:3]
                return {"_target_": getattr(func, "qualname", _brief(func)),
                        **(inner(kwargs) if isinstance(kwargs, dict) else {})}
            if obj.items or obj.list:
                return {k: inner(v) for k, v in obj.items.items()} if obj.items else [inner(v) for v in obj.list]
            return repr(obj)
        if isinstance(obj, dict):
            return {k: inner(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(inner(v) for v in obj)
        return obj

    return convert(obj, 0)


def _model_kwargs(ckpt: dict, path: Path) -> tuple[dict, dict]:
    hp = plain(ckpt.get("hyper_parameters"), str(path))
    kw = hp.get("model_kwargs") if isinstance(hp, dict) else None
    if not isinstance(kw, dict):
        raise OmnijetError(f"{path}: hyper_parameters.model_kwargs missing: not an official OmniJet-α checkpoint")
    return hp, kw


def _require(kwargs: dict, keys, path: Path, what: str) -> None:
    missing = [k for k in keys if k not in kwargs]
    if missing:
        raise OmnijetError(f"{path}: model_kwargs lack {missing} needed for the {what}")


def _state_dict(ckpt: dict, prefixes: tuple, path: Path, what: str) -> dict:
    sd = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith(prefixes) for k in sd):
        raise OmnijetError(f"{path}: no {'/'.join(p + '*' for p in prefixes)} tensors: not an official {what}")
    check_finite_weights(path, sd)
    return sd


# Our features (omnijet_lib.data.features) in the official feature_dict's terms, in order.
OFFICIAL_FEATURES = {
    "part_pt": {"multiply_by": 1.0, "subtract_by": PT_SHIFT, "func": "np.log", "inv_func": "np.exp"},
    "part_etarel": {"multiply_by": ANGLE_SCALE, "larger_than": -REL_CUT, "smaller_than": REL_CUT},
    "part_phirel": {"multiply_by": ANGLE_SCALE, "larger_than": -REL_CUT, "smaller_than": REL_CUT},
}


def check_feature_dict(feature_dict: dict, source: str) -> None:
    """The tokenizer's input scaling (``data.dataset_kwargs_common.feature_dict``) must be ours."""
    if list(feature_dict) != list(OFFICIAL_FEATURES):
        raise OmnijetError(f"{source}: features {_brief(list(feature_dict))} differ from ours "
                           f"{list(OFFICIAL_FEATURES)} ({', '.join(FEATURE_NAMES)})")
    for feat, want in OFFICIAL_FEATURES.items():
        have = {} if feature_dict[feat] is None else feature_dict[feat]
        if not isinstance(have, dict):
            raise OmnijetError(f"{source}: feature_dict.{feat} is {_brief(have)}, expected a mapping")
        for key in sorted(set(want) | set(have), key=str):
            a, b = have.get(key), want.get(key)
            if isinstance(b, str) or b is None:
                same = a == b
            else:  # a number: ints compare exactly (no float conversion of a huge int)
                same = isinstance(a, (int, float)) and not isinstance(a, bool) and (
                    a == b or isinstance(a, float) and abs(a - b) < 1e-9)
            if not same:
                raise OmnijetError(f"{source}: feature_dict.{feat}.{key} is {_brief(a)}, ours is {b!r}: "
                                   "tokens of this model would not mean what they mean here")


_CONFIG_NEEDED = "the official tokenizer needs the config.yaml of its training (it holds the feature scaling)"
#: the config.yaml of a training is a few kB; a larger file is not one
MAX_CONFIG_BYTES = 1 << 20


def _config_yaml(path: Path) -> dict:
    if not path.exists():
        raise OmnijetError(f"{path}: not found; {_CONFIG_NEEDED}")
    if not path.is_file():  # a folder, a FIFO (whose read would block), ...
        raise OmnijetError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise OmnijetError(f"{path}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise OmnijetError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; the config.yaml of a training "
                           "is a few kB")
    try:
        cfg = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise OmnijetError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise OmnijetError(f"{path}: not valid YAML ({(str(err).splitlines() or ['?'])[0]})") from None
    except RecursionError:
        raise OmnijetError(f"{path}: nested too deeply to be a training config") from None
    return cfg if isinstance(cfg, dict) else {}


def _get(obj, *keys):
    """``obj[k1][k2]...``, or None where a key is missing or a level is not a mapping."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def load_official_tokenizer(path: str | os.PathLike) -> VQVAE:
    """The official tokenizer: ``model_ckpt.ckpt`` (or the folder holding it) and the
    ``config.yaml`` next to it, whose feature scaling must be ours; → our :class:`VQVAE`."""
    path = Path(path)
    ckpt_path = path / "model_ckpt.ckpt" if path.is_dir() else path
    ckpt = read_lightning_checkpoint(ckpt_path)
    hp, kw = _model_kwargs(ckpt, ckpt_path)
    cfg = _config_yaml(ckpt_path.parent / "config.yaml")
    feature_dict = _get(cfg, "data", "dataset_kwargs_common", "feature_dict")
    if not isinstance(feature_dict, dict):
        raise OmnijetError(f"{ckpt_path.parent / 'config.yaml'}: no data.dataset_kwargs_common.feature_dict")
    check_feature_dict(feature_dict, str(ckpt_path.parent / "config.yaml"))
    model_type = hp.get("model_type")
    if model_type is None:
        model_type = _get(cfg, "model", "model_type")
    _require(kw, ["latent_dim", "vq_kwargs"], ckpt_path, "tokenizer")
    sd = _state_dict(ckpt, ("model.",), ckpt_path, "tokenizer (VQVAELightning)")
    return tokenizer_from_official(sd, kw, model_type, source=str(ckpt_path))


def load_official_backbone(path: str | os.PathLike) -> GPT:
    """The official generative backbone (``BackboneNextTokenPredictionLightning``) → our :class:`GPT`."""
    path = Path(path)
    ckpt = read_lightning_checkpoint(path)
    _, kw = _model_kwargs(ckpt, path)
    _require(kw, ["vocab_size", "embedding_dim", "n_heads"], path, "backbone")
    sd = _state_dict(ckpt, ("module.",), path, "backbone")
    if not any(k.startswith("head.fc1.") for k in sd):
        raise OmnijetError(f"{path}: no next-token head (head.fc1): not a generative backbone checkpoint")
    return gpt_from_official(sd, kw, source=str(path))


def load_official_classifier(path: str | os.PathLike) -> GPTClassifier:
    """An official classifier (``BackboneClassificationLightning``, summation head) → our :class:`GPTClassifier`."""
    path = Path(path)
    ckpt = read_lightning_checkpoint(path)
    hp, kw = _model_kwargs(ckpt, path)
    head = hp.get("class_head_type", "summation")
    if not (isinstance(head, str) and head == "summation"):
        raise OmnijetError(f"{path}: class_head_type {_brief(head)} is not supported (summation only)")
    _require(kw, ["vocab_size", "embedding_dim", "n_heads"], path, "classifier")
    return classifier_from_official(_state_dict(ckpt, ("module.",), path, "classifier"), kw, source=str(path))


# ------------------------------------------------------------------------ the published archive
#: The public DESY Sync&Share folder that the official ``checkpoints/download_checkpoints.sh`` fetches.
PUBLISHED_URL = "https://syncandshare.desy.de/public.php/dav/files/HX388YZbjSGPNcC/?accept=zip"
MANIFEST = "omnijet_checkpoints.sha256.json"
_ARCHIVE = "omnijet_checkpoints.download"
_OURS = (MANIFEST, _ARCHIVE, LOCK_FILE)  # names fetch writes into dest: no archive member may take them
_SHA256 = re.compile(r"[0-9a-f]{64}")


def find_published(checkpoint_dir: str | os.PathLike) -> dict[str, Path]:
    """The published files under ``checkpoint_dir`` (at any depth): ``tokenizer`` =
    ``vqvae_*_tokens/model_ckpt.ckpt`` (``config.yaml`` beside it) and ``backbone`` =
    ``generative_*_tokens/*.ckpt``."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise OmnijetError(f"{root}: checkpoint directory not found (omnijet checkpoints fetch --dest {root})")
    found = {"tokenizer": sorted(root.glob("**/vqvae_*_tokens/model_ckpt.ckpt")),
             "backbone": sorted(root.glob("**/generative_*_tokens/*.ckpt"))}
    for what, where in (("tokenizer", "vqvae_8192_tokens/model_ckpt.ckpt"),
                        ("backbone", "generative_8192_tokens/OmniJet_generative_model_*.ckpt")):
        if not found[what]:
            raise OmnijetError(f"{root}: no published {what} ({where}) in it")
        if len(found[what]) > 1:
            raise OmnijetError(f"{root}: {len(found[what])} candidate {what} checkpoints, expected one: "
                               f"{[str(p.relative_to(root)) for p in found[what]]}")
    return {k: v[0] for k, v in found.items()}


@dataclass(frozen=True)
class Published:
    """The published tokenizer and backbone: two runs of the model store."""

    tokenizer: Run
    backbone: Run

    @property
    def tokenizer_file(self) -> Path:
        return self.tokenizer.path / TOKENIZER_FILE

    @property
    def backbone_file(self) -> Path:
        return self.backbone.path / GPT_FILE


#: the settings of a converted run: what was done to the published file (bump ``converter`` when
#: a change of this module changes what a conversion writes)
CONVERSION = {"format": "official OmniJet-α checkpoint", "converter": 1}


def _source(path: Path, needed: str = "") -> dict:
    """A published file's identity: its name in the archive's layout (``folder/file``, never an
    absolute path, so that a moved archive is the same source) and its sha256."""
    if not path.is_file():  # missing, a folder, or a FIFO (whose hash would never end)
        raise OmnijetError(f"{path}: {'not a regular file' if path.exists() else 'not found'}{needed}")
    return {"file": f"{path.parent.name}/{path.name}", "sha256": file_sha256(path)}


def convert_published(checkpoint_dir: str | os.PathLike, store: ModelStore, progress=print) -> Published:
    """The published tokenizer and backbone (:func:`find_published`) as our safetensors
    checkpoints, converted once into two runs of ``store``: ``published_tokenizer``
    (``tokenizer.safetensors``) and ``published_gpt_combined`` (``gpt.safetensors``), whose data
    identity is the name and sha256 of their source files (the tokenizer's with its
    ``config.yaml``). A later call with the same files reuses both runs; other files are converted
    into other run folders; a store with ``reuse="strict"`` refuses files it has not converted. A
    backbone whose vocabulary does not fit the tokenizer is refused before anything is written for
    it. A second process converting the same files waits for the first (the store locks the run
    folder), then reuses."""
    src = find_published(checkpoint_dir)
    config = _source(src["tokenizer"].parent / "config.yaml", f"; {_CONFIG_NEEDED}")
    tok_request = ModelRequest("published_tokenizer", CONVERSION, {"checkpoint": _source(src["tokenizer"]),
                                                                   "config": config})

    def convert_tokenizer(run_dir: Path) -> None:
        tok = load_official_tokenizer(src["tokenizer"])
        progress(f"published tokenizer: {tok.kind}, K = {tok.num_codes}")
        save_tokenizer(run_dir / TOKENIZER_FILE, tok)

    _, tok_run = store.get(tok_request, train=convert_tokenizer, load=lambda run_dir: None)
    gpt_request = ModelRequest("published_gpt_combined", CONVERSION, {"checkpoint": _source(src["backbone"])})
    tok_file = tok_run.path / TOKENIZER_FILE
    # to be converted: the vocabulary is checked before the store writes anything for the backbone
    gpt = _fitting_backbone(src, tok_file) if store.plan(gpt_request) != "reuse" else None

    def convert_backbone(run_dir: Path) -> None:
        # gpt is None only if the run planned as reused has vanished since
        model = gpt if gpt is not None else _fitting_backbone(src, tok_file)
        progress(f"published backbone: {sum(p.numel() for p in model.parameters()):,} parameters, "
                 f"vocabulary {model.config.vocab_size}")
        save_model(run_dir / GPT_FILE, model, source=gpt_request.data["checkpoint"]["file"])

    _, gpt_run = store.get(gpt_request, train=convert_backbone, load=lambda run_dir: None)
    return Published(tok_run, gpt_run)


def _fitting_backbone(src: dict[str, Path], tok_file: Path) -> GPT:
    """The published backbone, whose vocabulary must be the converted tokenizer's K + 2."""
    gpt = load_official_backbone(src["backbone"])
    tok = load_tokenizer(tok_file)
    if gpt.config.vocab_size != tok.vocab_size:
        raise OmnijetError(f"{src['backbone']}: backbone vocabulary {gpt.config.vocab_size} does not fit the "
                           f"tokenizer {src['tokenizer']} ({tok.num_codes} codes + start/stop = {tok.vocab_size})")
    return gpt


def _manifest_problem(manifest, dest: Path) -> str | None:
    """Why ``manifest`` is not a record fetch could have written for ``dest``; None if it is one."""
    if not isinstance(manifest, dict) or not manifest:
        return "not a JSON mapping of file -> sha256"
    for rel, sha in manifest.items():
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            return f"the sha256 of {rel!r} is not 64 hex digits"
        if not path_inside(dest, rel):
            return f"{rel!r} is not a path inside {dest}"
    return None


def _verify_manifest(dest: Path) -> list[str] | None:
    """Files of ``dest``'s manifest that are missing or differ; None when there is no manifest,
    or it is corrupt (a warning says why: it decides what gets deleted, so any doubt discards it)."""
    path = dest / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        manifest = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    problem = _manifest_problem(manifest, dest)
    if problem:
        log.warning("%s: %s; discarding it as corrupt", path, problem)
        return None
    return [rel for rel, sha in manifest.items() if not (dest / rel).is_file() or file_sha256(dest / rel) != sha]


def fetch_published(dest: str | os.PathLike, url: str = PUBLISHED_URL, progress: bool = True,
                    wait: bool = False) -> dict[str, Path]:
    """Download the published checkpoints archive into ``dest`` and unpack it; returns
    :func:`find_published` of ``dest``.

    As the JetClass downloader: the download resumes, files get their names only when complete,
    archive members that would land outside ``dest`` (or are links) are refused, and so are
    members named as the files written here; the archive's size is bounded and a damaged archive
    leaves ``dest`` as it was. The sha256 of every unpacked file goes into
    ``dest/omnijet_checkpoints.sha256.json``; a later call checks them and fetches again only if a
    file is missing or differs. Nothing outside ``dest`` is ever written or deleted: a record
    listing a path outside it is discarded as corrupt. Another process fetching into ``dest`` is
    an error, or with ``wait`` waited for."""
    with exclusive_lock(dest, wait=wait):
        return _fetch_into(Path(dest), url, progress)


def _fetch_into(dest: Path, url: str, progress: bool) -> dict[str, Path]:
    """:func:`fetch_published`'s work, under ``dest``'s lock."""
    bad = _verify_manifest(dest)
    if bad == []:
        log.info("%s: published checkpoints present, sha256 verified", dest)
        return find_published(dest)
    if bad:
        log.warning("%s: %s missing or changed since the download; fetching again", dest, ", ".join(bad))
        for rel in bad:
            if (dest / rel).is_file() and not (dest / rel).is_symlink():  # regular files of ours only
                (dest / rel).unlink()
    archive = download_file(url, dest / _ARCHIVE, progress=progress, desc="OmniJet-α checkpoints")
    try:
        files = extract_archive(archive, dest, progress=progress, reserved=_OURS)
    finally:  # a damaged archive is downloaded afresh by the next run anyway
        archive.unlink()
    write_json(dest / MANIFEST, {str(p.relative_to(dest)): file_sha256(p) for p in files})
    log.info("%s: %d files unpacked, sha256 recorded in %s", dest, len(files), MANIFEST)
    return find_published(dest)
