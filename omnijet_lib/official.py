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

Every official tensor must land in exactly one of ours and every one of ours must be filled;
anything else is an :class:`OmnijetError` naming the tensors. Buffers with no counterpart
(the GPT's causal-mask ``tril``) are dropped. The parity tests (tests/test_official_parity.py)
run the official modules' recorded outputs through these.
"""

from __future__ import annotations

import re

import torch

from .io import OmnijetError
from .models.classifier import GPTClassifier
from .models.gpt import GPT, GPTConfig
from .tokenizers.vqvae import VQVAE, VQVAEConfig

__all__ = ["tokenizer_from_official", "gpt_from_official", "classifier_from_official", "rename_official"]

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


def _load(model: torch.nn.Module, ours: dict, source: str, fill: dict | None = None) -> torch.nn.Module:
    """Copy ``ours`` into ``model``: shapes must fit and nothing may be missing (``fill`` may
    supply tensors that the official file does not carry)."""
    own = model.state_dict()
    state = dict(fill or {})
    bad = []
    for name, tensor in ours.items():
        if name not in own:
            bad.append(f"{name} (no such tensor)")
            continue
        want = own[name]
        tensor = tensor.reshape(want.shape) if tensor.numel() == want.numel() else tensor
        if tensor.shape != want.shape:
            bad.append(f"{name} {tuple(tensor.shape)} vs {tuple(want.shape)}")
            continue
        state[name] = tensor.to(want.dtype)
    if bad:
        raise OmnijetError(f"{source}: tensors do not fit the model built from its arguments: {bad[:5]}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise OmnijetError(f"{source}: tensors missing: {missing[:8]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenizer_from_official(state_dict: dict, model_kwargs: dict, model_type: str = "VQVAENormFormer",
                            source: str = "official tokenizer") -> VQVAE:
    """Our VQ-VAE from an official tokenizer's ``state_dict`` and its ``model_kwargs``
    (``config.yaml``: ``model.model_kwargs``) and ``model_type`` (``VQVAENormFormer`` or ``MLP``)."""
    vq = dict(model_kwargs.get("vq_kwargs") or {})
    common = dict(input_dim=int(model_kwargs.get("input_dim", 3)), latent_dim=int(model_kwargs["latent_dim"]),
                  num_codes=int(vq["num_codes"]), beta=float(vq.get("beta", 0.95)),
                  sync_nu=float(vq.get("sync_nu", 0.0)), affine_lr=float(vq.get("affine_lr", 0.0)),
                  replace_freq=int(vq.get("replace_freq", 0)), kmeans_init=False)
    if model_type == "VQVAENormFormer":
        hidden = int(model_kwargs["hidden_dim"])
        cfg = VQVAEConfig(conditional=True, hidden_dim=hidden, mlp_hidden=hidden,
                          num_blocks=int(model_kwargs.get("num_blocks", 2)),
                          num_heads=int(model_kwargs.get("num_heads", 1)), **common)
        kind = "conditional"
    elif model_type == "MLP":
        enc, dec = list(model_kwargs.get("encoder_layers") or []), list(model_kwargs.get("decoder_layers") or [])
        if not enc or len(set(enc)) != 1 or enc != dec:
            raise OmnijetError(f"{source}: encoder_layers {enc} / decoder_layers {dec}: only equal, uniform "
                               f"widths (the paper's [128, 128, 128]) are supported")
        cfg = VQVAEConfig(conditional=False, hidden_dim=int(enc[0]), mlp_layers=len(enc), **common)
        kind = "unconditional"
    else:
        raise OmnijetError(f"{source}: model_type {model_type!r} is not supported (VQVAENormFormer or MLP)")
    model = VQVAE(cfg)
    ours = rename_official(state_dict, kind, source)
    fill = {"vq.initialised": torch.tensor(True)}
    if cfg.affine_lr == 0:  # vqtorch has no affine parameters then; ours stay at the identity
        fill.update({"vq.affine_scale": torch.zeros(cfg.latent_dim), "vq.affine_bias": torch.zeros(cfg.latent_dim)})
    if "vq.code_counter" not in ours:
        fill["vq.code_counter"] = torch.full((cfg.num_codes,), cfg.replace_freq, dtype=torch.long)
    return _load(model, ours, source, fill)


def _gpt_config(state_dict: dict, model_kwargs: dict, source: str) -> GPTConfig:
    ffn = state_dict.get("module.GPT_blocks.0.ff_block.net.0.weight")
    if ffn is None:
        raise OmnijetError(f"{source}: no tensor module.GPT_blocks.0.ff_block.net.0.weight: not an official backbone")
    n_layer = len({k.split(".")[2] for k in state_dict if k.startswith("module.GPT_blocks.")})
    return GPTConfig(vocab_size=int(model_kwargs["vocab_size"]), n_embd=int(model_kwargs["embedding_dim"]),
                     n_head=int(model_kwargs["n_heads"]), n_layer=n_layer, ffn=int(ffn.shape[0]),
                     dropout=0.0, max_len=int(model_kwargs.get("max_sequence_len", 128)) + 2)


def gpt_from_official(state_dict: dict, model_kwargs: dict, source: str = "official backbone") -> GPT:
    """Our GPT from an official generative backbone (``module.*`` and the ``head.fc1`` next-token head)."""
    model = GPT(_gpt_config(state_dict, model_kwargs, source))
    return _load(model, rename_official(state_dict, "gpt", source), source)


def classifier_from_official(state_dict: dict, model_kwargs: dict, source: str = "official classifier") -> GPTClassifier:
    """Our GPT classifier from an official ``BackboneClassificationLightning`` with the
    summation head (``class_head_type: summation``)."""
    n_classes = int(model_kwargs.get("n_out_nodes", 2))
    model = GPTClassifier(_gpt_config(state_dict, model_kwargs, source), n_classes=n_classes, head_init="default")
    return _load(model, rename_official(state_dict, "classifier", source), source)
