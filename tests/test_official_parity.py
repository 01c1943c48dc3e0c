"""Parity with the official OmniJet-α code (gabbro + vqtorch).

The fixtures in tests/fixtures/official/ were made once by running the official modules on
tiny models with random weights (README, "Parity with the official implementation"): each
file holds the official state_dict under its official names, fixed inputs and the official
outputs. Here the weights go through :mod:`omnijet_lib.official` into our models, which must
give the same tokens and the same outputs within 1e-5.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnijet_lib.io import OmnijetError
from omnijet_lib.official import classifier_from_official, gpt_from_official, tokenizer_from_official
from omnijet_lib.training.fit import TrainConfig, first_epoch_factor
from omnijet_lib.training.vqvae import VQVAEModule, one_cycle_cooldown

FIXTURES = Path(__file__).parent / "fixtures" / "official"
TOL = dict(atol=1e-5, rtol=1e-5)


def load_fixture(name):
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    state = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    inputs = {k[6:]: v for k, v in tensors.items() if k.startswith("input.")}
    outputs = {k[7:]: v for k, v in tensors.items() if k.startswith("output.")}
    return state, inputs, outputs, json.loads(meta["model_kwargs"]), meta


@pytest.mark.parametrize("name, model_type", [("vqvae_conditional", "VQVAENormFormer"),
                                              ("vqvae_unconditional", "MLP")])
def test_tokenizer_matches_official(name, model_type):
    state, inp, out, kwargs, _ = load_fixture(name)
    tok = tokenizer_from_official(state, kwargs, model_type)
    x, mask = inp["x"], inp["mask"].bool()
    real = mask
    assert torch.equal(tok.encode(x, mask)[real], out["q"][real])
    assert torch.allclose(tok.vq.effective_codebook(), out["codebook"], **TOL)
    with torch.no_grad():
        z = tok.encoder(x, mask)
        x_rec, q = tok(x, mask)
    assert torch.allclose(z[real], out["z"][real], **TOL)
    assert torch.allclose(q.z_q[real], out["z_q"][real], **TOL)
    assert torch.allclose(x_rec[real], out["x_reco"][real], **TOL)
    assert torch.allclose(tok.decode(tok.encode(x, mask), mask)[real], out["x_reco"][real], **TOL)
    if model_type == "VQVAENormFormer":
        # official padding: outputs 0 there; the latents at padding are 0 and are quantized too,
        # so with the official procedure our losses equal the official ones exactly
        assert torch.equal(x_rec[~real], out["x_reco"][~real])
        tok.config.quantize_padding = True
        module = VQVAEModule(tok, loss_over_padding=True, vq_weight=kwargs["alpha"])
        with torch.no_grad():
            total, mse, q = module.losses({"x": x, "mask": mask})
        assert torch.equal(q.indices, out["q"])
        assert q.loss.item() == pytest.approx(out["vq_loss"].item(), rel=1e-5)
        assert mse.item() == pytest.approx(out["loss_reco"].item(), rel=1e-5)
        assert total.item() == pytest.approx(out["loss_total"].item(), rel=1e-5)


def test_gpt_matches_official():
    state, inp, out, kwargs, _ = load_fixture("gpt")
    gpt = gpt_from_official(state, kwargs)
    ids, mask, tgt = inp["input_ids"], inp["mask"].bool(), inp["targets"]
    with torch.no_grad():
        logits = gpt(ids, mask)
        # with the official key-padding mask even the padded positions agree
        hidden_all = gpt.backbone(ids, mask, zero_padding=False)
    assert torch.allclose(logits[mask], out["logits"][mask], **TOL)
    assert torch.allclose(hidden_all, out["hidden"], **TOL)
    # the official loss: cross-entropy over every position, target 0 at padding. Our sequences
    # carry the stop token as the last real entry; rebuild them from input + last target
    n = mask.sum(1)
    seq = torch.cat([ids, torch.zeros(len(ids), 1, dtype=ids.dtype)], 1)
    seq[torch.arange(len(ids)), n] = tgt[torch.arange(len(ids)), n - 1]
    seq_mask = torch.arange(seq.shape[1])[None] <= n[:, None]
    with torch.no_grad():
        official = gpt.loss(seq, seq_mask, over_padding=True)
        ours = gpt.loss(seq, seq_mask)
    assert official.item() == pytest.approx(out["loss"].item(), rel=1e-5)
    assert ours.item() != pytest.approx(out["loss"].item(), rel=1e-3)  # real targets only: a different mean


def test_classifier_matches_official():
    state, inp, out, kwargs, _ = load_fixture("classifier")
    clf = classifier_from_official(state, kwargs)
    with torch.no_grad():
        logits = clf(inp["input_ids"], inp["mask"].bool())
    assert torch.allclose(logits, out["logits"], **TOL)
    loss = torch.nn.functional.cross_entropy(logits, inp["labels"])
    assert loss.item() == pytest.approx(out["loss"].item(), rel=1e-5)


def test_every_official_tensor_has_one_place():
    """The mapping is one-to-one: an extra or a missing official tensor is refused by name."""
    state, _, _, kwargs, _ = load_fixture("gpt")
    extra = dict(state, **{"module.GPT_blocks.0.mha_block.query.bias": torch.zeros(16)})
    with pytest.raises(OmnijetError, match="query.bias"):
        gpt_from_official(extra, kwargs)
    missing = {k: v for k, v in state.items() if k != "module.GPT_blocks.1.layernorm_2.weight"}
    with pytest.raises(OmnijetError, match="blocks.1.ln2.weight"):
        gpt_from_official(missing, kwargs)
    state, _, _, kwargs, _ = load_fixture("vqvae_conditional")
    wrong = dict(kwargs, hidden_dim=32)
    with pytest.raises(OmnijetError, match="do not fit"):
        tokenizer_from_official(state, wrong, "VQVAENormFormer")
    # and each of our parameters is filled from exactly one official tensor
    tok = tokenizer_from_official(state, kwargs, "VQVAENormFormer")
    n_official = sum(v.numel() for k, v in state.items() if not k.endswith("_counts"))
    assert sum(p.numel() for p in tok.parameters()) == n_official


def test_schedules_match_official():
    _, _, out, _, _ = load_fixture("lr_schedule")
    f = one_cycle_cooldown()
    ours = torch.tensor([1e-3 * f(e) for e in range(len(out["onecycle_lr"]))], dtype=torch.float64)
    assert torch.allclose(ours, out["onecycle_lr"], rtol=1e-9, atol=1e-12)
    g = first_epoch_factor(TrainConfig.from_params({"procedure": "official"}).first_epoch_lr_factor)
    ours = torch.tensor([1e-3 * g(e) for e in range(len(out["constant_lr"]))], dtype=torch.float64)
    assert torch.allclose(ours, out["constant_lr"], rtol=1e-6)


def test_official_procedure_preset():
    cfg = TrainConfig.from_params({"procedure": "official", "batching": "bucketed"})
    assert (cfg.gradient_clip_val, cfg.schedule, cfg.loss_over_padding, cfg.quantize_padding, cfg.head_init) == \
        (5.0, "official", True, True, "default")
    assert cfg.batching == "bucketed"  # an explicit key wins over the preset
    assert TrainConfig.from_params({}).procedure == {
        "gradient_clip_val": 5.0, "schedule": "one_cycle", "first_epoch_lr_factor": 1.0,
        "loss_over_padding": False, "quantize_padding": False, "batching": "bucketed", "head_init": "zero"}
    for bad in ({"procedure": "paper"}, {"schedule": "cosine"}, {"batching": "sorted"}, {"head_init": "ones"}):
        with pytest.raises(OmnijetError, match=next(iter(bad))):
            TrainConfig.from_params(bad)
