"""Checkpoints in the format of the published OmniJet-α archive, without the official code.

The published files are Lightning checkpoints written by gabbro under hydra: ``torch.save`` of
a dict whose ``hyper_parameters`` hold ``functools.partial`` optimisers and schedulers and the
``model_kwargs`` as an omegaconf ``DictConfig``. This module writes the same structure -- the same
pickle globals (tests/fixtures/official/lightning_globals.json lists those of a checkpoint saved
by Lightning 2.6.6 + omegaconf 2.4.0 from gabbro's modules) -- with stand-in classes registered
under the official module names only while pickling, so neither gabbro nor omegaconf is needed.

* :func:`fixture_archive` -- the tiny parity fixtures (tests/fixtures/official) laid out as the
  published archive (``vqvae_8192_tokens/``, ``generative_8192_tokens/``): CI's published profile;
* :func:`paper_standin` -- random weights at the published sizes (K 8192, the paper's GPT): timing;

Run ``python tests/official_format.py {fixture|paper} DEST`` to write one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import re
import sys
import types
import typing
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures" / "official"
TOKENIZER_DIR, BACKBONE_DIR = "vqvae_8192_tokens", "generative_8192_tokens"
BACKBONE_NAME = "OmniJet_generative_model_StandInModel_59.ckpt"

FEATURE_DICT = {
    "part_pt": {"multiply_by": 1, "subtract_by": 1.8, "func": "np.log", "inv_func": "np.exp"},
    "part_etarel": {"multiply_by": 3, "larger_than": -0.8, "smaller_than": 0.8},
    "part_phirel": {"multiply_by": 3, "larger_than": -0.8, "smaller_than": 0.8},
}
ONE_CYCLE = {"warmup": 4, "cooldown": 20, "cooldown_final": 50, "max_lr": 1e-3, "initial_lr": 5e-4, "final_lr": 3e-4}


# ------------------------------------------------------------------ official classes, by name only
_FAKE = {"omegaconf.dictconfig": ["DictConfig"], "omegaconf.nodes": ["AnyNode"],
         "omegaconf.base": ["Metadata", "ContainerMetadata"],
         "gabbro.schedulers.lr_scheduler": ["OneCycleCooldown"]}
_CLASSES = {name: type(name, (), {"__module__": mod, "__qualname__": name}) for mod, names in _FAKE.items()
            for name in names}


@contextlib.contextmanager
def _official_modules():
    """The stand-in classes importable under their official module names (pickle checks that)."""
    saved = {}
    names = {m for mod in _FAKE for m in [".".join(mod.split(".")[:i + 1]) for i in range(mod.count(".") + 1)]}
    for name in names:
        saved[name] = sys.modules.get(name)
        sys.modules[name] = types.ModuleType(name)
    for mod, classes in _FAKE.items():
        for c in classes:
            setattr(sys.modules[mod], c, _CLASSES[c])
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _new(cls_name, **state):
    obj = _CLASSES[cls_name].__new__(_CLASSES[cls_name])
    obj.__dict__.update(state)
    return obj


def _metadata(key, container: bool):
    state = dict(ref_type=typing.Any, object_type=dict if container else None, optional=True, key=key, flags={},
                 flags_root=False, resolver_cache=collections.defaultdict(dict))
    if container:
        state.update(key_type=typing.Any, element_type=typing.Any)
    return _new("ContainerMetadata" if container else "Metadata", **state)


def dict_config(d: dict, key=None, parent=None):
    """An omegaconf ``DictConfig`` as omegaconf pickles it (state: _metadata, _parent, _content)."""
    cfg = _new("DictConfig", _metadata=_metadata(key, True), _parent=parent, _content={})
    for k, v in d.items():
        cfg._content[k] = dict_config(v, k, cfg) if isinstance(v, dict) else \
            _new("AnyNode", _metadata=_metadata(k, False), _parent=cfg, _val=v)
    return cfg


def lightning_checkpoint(state_dict: dict, hyper_parameters: dict, epoch: int = 59, adam: bool = True) -> dict:
    """The dict that Lightning 2.x saves (with AdamW moments when ``adam``)."""
    params = [k for k, v in state_dict.items() if v.is_floating_point() and not k.endswith(("tril", "_counts"))]
    opt_state = {"state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(state_dict[k]),
                               "exp_avg_sq": torch.zeros_like(state_dict[k])} for i, k in enumerate(params)} if adam else {},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                                   "amsgrad": False, "params": list(range(len(params)))}]}
    return {"epoch": epoch, "global_step": 1000 * epoch, "pytorch-lightning_version": "2.1.2",
            "state_dict": collections.OrderedDict(state_dict), "loops": {}, "callbacks": {},
            "optimizer_states": [opt_state], "lr_schedulers": [{"last_epoch": epoch}],
            "hparams_name": "kwargs", "hyper_parameters": hyper_parameters}


def write_checkpoint(path: Path, state_dict: dict, hyper_parameters: dict, adam: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _official_modules():
        hp = {k: dict_config(v) if isinstance(v, dict) else v for k, v in hyper_parameters.items()}
        torch.save(lightning_checkpoint(state_dict, hp, adam=adam), path)
    return path


def pickle_globals(path) -> set[str]:
    """The ``module.name`` globals a torch zip checkpoint's pickle references."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops, found = list(pickletools.genops(data)), set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(f"{ops[i - 2][1]}.{ops[i - 1][1]}")
    return found


# ------------------------------------------------------------------------------ archive layouts
def write_archive(dest, tok_sd: dict, tok_kwargs: dict, gpt_sd: dict, gpt_kwargs: dict, adam: bool = True) -> Path:
    """``dest`` laid out as the published archive: the tokenizer with its config.yaml and the
    generative backbone, under the official names."""
    dest = Path(dest)
    tok_dir = dest / TOKENIZER_DIR
    write_checkpoint(tok_dir / "model_ckpt.ckpt", tok_sd, {
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-2),
        "scheduler": functools.partial(_CLASSES["OneCycleCooldown"], **ONE_CYCLE),
        "model_kwargs": tok_kwargs, "model_type": "VQVAENormFormer", "model_kwargs_loaded": None}, adam=adam)
    config = {"seed": 1603, "project_name": "tokenization",
              "data": {"batch_size": 512, "dataset_kwargs_common": {"pad_length": 128, "feature_dict": FEATURE_DICT}},
              "model": {"_target_": "gabbro.models.vqvae.VQVAELightning", "model_type": "VQVAENormFormer",
                        "model_kwargs": tok_kwargs,
                        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-2},
                        "scheduler": {"_target_": "gabbro.schedulers.lr_scheduler.OneCycleCooldown", "_partial_": True, **ONE_CYCLE}},
              "trainer": {"max_epochs": 100, "gradient_clip_val": 5, "limit_train_batches": 5850}}
    (tok_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_checkpoint(dest / BACKBONE_DIR / BACKBONE_NAME, gpt_sd, {
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0),
        "scheduler": functools.partial(torch.optim.lr_scheduler.ConstantLR),
        "model_kwargs": gpt_kwargs, "token_dir": "/data/jetclass_tokenized/TTBar_ZJetsToNuNu", "verbose": False},
        adam=adam)
    return dest


def _fixture(name: str) -> tuple[dict, dict]:
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in json.loads(meta["state_dict_keys"])}
    return sd, json.loads(meta["model_kwargs"])


def _tril(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n))


def fixture_archive(dest, max_sequence_len: int = 128) -> Path:
    """The parity fixtures (K = 32 tokenizer, 16-wide GPT) as a published archive; the backbone
    takes sequences of ``max_sequence_len`` (its causal mask is resized, nothing else depends on it)."""
    tok_sd, tok_kw = _fixture("vqvae_conditional")
    gpt_sd, gpt_kw = _fixture("gpt")
    gpt_sd = {k: _tril(max_sequence_len) if k.endswith(".tril") else v for k, v in gpt_sd.items()}
    return write_archive(dest, tok_sd, tok_kw, gpt_sd, {**gpt_kw, "max_sequence_len": max_sequence_len})


def _expand_blocks(keys: list[str], pattern: str, n: int) -> list[str]:
    """The fixture's block-0 names repeated for blocks 0 .. n-1 (other blocks dropped)."""
    out = []
    for k in keys:
        m = re.search(pattern, k)
        if m is None:
            out.append(k)
        elif m[1] == "0":
            out += [k[:m.start(1)] + str(i) + k[m.end(1):] for i in range(n)]
    return out


def _random_official(keys: list[str], template: dict, kind: str, ours: dict, gen) -> dict:
    """Random tensors under the official ``keys`` with our model's sizes (official layout: leading
    singleton dimensions as in the fixture)."""
    from omnijet_lib.official import DROPPED, rename_official

    out = {}
    for k in keys:
        if DROPPED.match(k):
            continue
        ref = template[re.sub(r"\.(blocks|GPT_blocks)\.\d+\.", r".\1.0.", k)]
        want = ours[next(iter(rename_official({k: ref}, kind)))].shape
        shape = (1,) * (ref.ndim - len(want)) + tuple(want)
        if ref.dtype.is_floating_point:
            out[k] = 0.05 * torch.randn(shape, generator=gen) + (1.0 if k.endswith(("norm1.weight", "norm2.weight",
                     "mlp.0.weight", "layernorm_1.weight", "layernorm_2.weight")) else 0.0)
        else:
            out[k] = torch.full(shape, 10, dtype=ref.dtype)
    return out


def paper_standin(dest, seed: int = 0, mean_length: int = 50) -> Path:
    """Random weights at the published sizes in the published layout: the conditional VQ-VAE
    (hidden 128, latent 4, 4 blocks, 8 heads, K = 8192; experiment_tokenization_transformer) and
    the paper's GPT (256 wide, 8 heads, 3 blocks, FFN 1024, vocabulary 8194). The stop token's
    logit is raised so that generated jets have about ``mean_length`` constituents, as trained
    models do (a uniform GPT would always run to 128)."""
    from omnijet_lib.models.gpt import GPT, GPTConfig
    from omnijet_lib.tokenizers.vqvae import VQVAE, VQVAEConfig

    gen = torch.Generator().manual_seed(seed)
    tok_kw = {"input_dim": 3, "hidden_dim": 128, "latent_dim": 4, "num_blocks": 4, "num_heads": 8, "alpha": 10,
              "vq_kwargs": {"num_codes": 8192, "beta": 0.9, "kmeans_init": True, "norm": None, "cb_norm": None,
                            "affine_lr": 2, "sync_nu": 1, "replace_freq": 10}}
    gpt_kw = {"return_embeddings": True, "backbone_weights_path": None, "embedding_dim": 256,
              "attention_dropout": 0.0, "vocab_size": 8194, "max_sequence_len": 128, "n_GPT_blocks": 3, "n_heads": 8}
    tok_tpl, _ = _fixture("vqvae_conditional")
    gpt_tpl, _ = _fixture("gpt")
    ours_tok = VQVAE(VQVAEConfig(conditional=True, hidden_dim=128, mlp_hidden=128, latent_dim=4, num_blocks=4,
                                 num_heads=8, num_codes=8192)).state_dict()
    ours_gpt = GPT(GPTConfig()).state_dict()
    tok_sd = _random_official(_expand_blocks(list(tok_tpl), r"normformer\.blocks\.(\d+)\.", 4), tok_tpl,
                              "conditional", ours_tok, gen)
    tok_sd["model.vqlayer.codebook.weight"] = torch.randn(8192, 4, generator=gen)
    gpt_sd = _random_official(_expand_blocks(list(gpt_tpl), r"GPT_blocks\.(\d+)\.", 3), gpt_tpl, "gpt", ours_gpt, gen)
    for i in range(3):
        gpt_sd[f"module.GPT_blocks.{i}.mha_block.tril"] = _tril(128)
    gpt_sd["head.fc1.bias"] = torch.zeros(8194)
    gpt_sd["head.fc1.bias"][-1] = float(torch.log(torch.tensor((8194 - 1) / (mean_length - 1))))
    gpt_sd["head.fc1.bias"][0] = -30.0  # the start token never follows
    return write_archive(dest, tok_sd, tok_kw, gpt_sd, gpt_kw)


if __name__ == "__main__":
    what, out = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print((fixture_archive if what == "fixture" else paper_standin)(out))
