"""Memory bounds and the last raw exceptions of the probe (issue #33).

* Tensor views: a pickle can describe a tensor far larger than the bytes it stores (a stride-0
  (10^8, 10^8) view of one float); every loader refuses it before anything computes with it.
* Declared sizes: the model a file's config declares is built on the meta device and compared
  with the tensors stored in it, and every declared size is bounded, before any memory is
  allocated for it (our safetensors and the official pickles alike).
* Odd contents of official pickles and their config.yaml, ``--device``/``--max-len``,
  ``generate`` counts, float token ids and a float32 overflow in the E >= |p| check: one line each.

The sizes are absurd on purpose (10^16 elements, widths of 60000): were a check missing, the
allocation would fail at once instead of filling the machine's memory.
"""

from __future__ import annotations

import json
import sys
import warnings

import awkward as ak
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import official_format as of
from omnijet_lib import official
from omnijet_lib.data import read_jetclass
from omnijet_lib.data.validate import check_constituents
from omnijet_lib.io import check_finite_weights, load_checkpoint, safe_torch_load, save_model
from omnijet_lib.models.gpt import GPT, GPTConfig
from omnijet_lib.tokenizers import BinnedConfig, BinnedTokenizer, VQVAE, VQVAEConfig, load_tokenizer, reconstruct, \
    save_tokenizer
from omnijet_lib.tokenizers.streaming import tokenize_files
from omnijet_lib.training.gpt import load_gpt

from .conftest import copy_as_ttree, one_line_error

HUGE = (10**8, 10**8)  # 10^16 elements: no machine can compute with it


def _stride0():
    return torch.ones(1).as_strided(HUGE, (0, 0))


# ------------------------------------------------------------------------------ tensor views
@pytest.mark.parametrize("view, problem", [
    (_stride0, "(100000000, 100000000) with strides (0, 0) repeats one stored value along a dimension of "
               "size 100000000 (stride 0)"),
    (lambda: torch.ones(3).as_strided((3, 10**8), (1, 0)), "(3, 100000000) with strides (1, 0) repeats one"),
    (lambda: torch.arange(1000.0).as_strided((500, 500), (1, 1)), "(500, 500) with strides (1, 1) has "
                                                                  "overlapping strides"),
], ids=["stride0", "broadcast_row", "overlapping"])
def test_safe_torch_load_refuses_views_larger_than_their_storage(tmp_path, view, problem):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": view()}, "epoch": 1}, path)
    assert path.stat().st_size < 10_000
    with one_line_error(f"{path}: tensor state_dict.w {problem}", "refused (a damaged or crafted file)",
                        unchanged=tmp_path):
        safe_torch_load(path)


def test_finite_weights_check_never_computes_with_a_lying_view(tmp_path):
    with one_line_error("model.safetensors: tensor w (100000000, 100000000) with strides (0, 0)", unchanged=tmp_path):
        check_finite_weights("model.safetensors", {"b": torch.zeros(3), "w": torch.ones(1).expand(HUGE)})


def test_official_reader_refuses_a_stride0_tensor(tmp_path):
    sd, kw = of._fixture("gpt")
    path = of.write_checkpoint(tmp_path / "b.ckpt", {**sd, "module.embedding_table.weight": _stride0()},
                               {"model_kwargs": kw}, adam=False)
    assert path.stat().st_size < 100_000
    with one_line_error(f"{path}: tensor state_dict.module.embedding_table.weight (100000000, 100000000) with "
                        "strides (0, 0) repeats one stored value", unchanged=tmp_path):
        official.load_official_backbone(path)


def test_ordinary_views_are_accepted(tmp_path):
    """Shared storages, transposes, slices and the tensors of a model state dict are plain views."""
    base = torch.arange(60.0).reshape(6, 10)
    state = {**GPT(GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32)).state_dict(),
             "t": base.t(), "rows": base[2:4], "cols": base[:, 3:7], "step": base[::2, ::3], "scalar": base[1, 1]}
    torch.save(state, tmp_path / "ok.pt")
    loaded = safe_torch_load(tmp_path / "ok.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    check_finite_weights("ok.pt", loaded)


# ------------------------------------------------------------------ declared sizes: our checkpoints
def _edit_config(path, **changes):
    """Rewrite the model config recorded in a safetensors checkpoint (the tensors stay)."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["config"].update(changes)
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    return path


@pytest.fixture
def vq_ckpt(tmp_path):
    tok = VQVAE(VQVAEConfig(hidden_dim=16, mlp_hidden=16, num_blocks=1, num_heads=2, num_codes=8))
    return save_tokenizer(tmp_path / "tokenizer.safetensors", tok)


@pytest.fixture
def gpt_ckpt(tmp_path):
    return save_model(tmp_path / "gpt.safetensors", GPT(GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1,
                                                                  ffn=32)))


def test_tokenizer_whose_config_declares_another_width(tmp_path, vq_ckpt):
    """The issue's case: the metadata says hidden_dim 8000 (here 60000), the weights are 16 wide."""
    _edit_config(vq_ckpt, hidden_dim=60000)
    with one_line_error(f"{vq_ckpt}: tensor shapes differ from the config: hidden_dim: 60000 in the config, the "
                        "stored weights say 16 (encoder.inp.weight (16, 3) vs (60000, 3) from the config)",
                        unchanged=vq_ckpt.parent):
        load_tokenizer(vq_ckpt)


@pytest.mark.parametrize("field, value", [("n_embd", 10**9), ("vocab_size", 2**40), ("max_len", 10**12)])
def test_declared_sizes_beyond_any_model(tmp_path, gpt_ckpt, field, value):
    _edit_config(gpt_ckpt, **{field: value})
    with one_line_error(f"{gpt_ckpt}: {field}: {value} in the config, more than 65536 and than any dimension of "
                        "the stored weights (largest 32)", unchanged=tmp_path):
        load_gpt(gpt_ckpt)


def test_declared_layer_count_far_beyond_the_stored_tensors(tmp_path, gpt_ckpt):
    _edit_config(gpt_ckpt, n_layer=60000)
    with one_line_error(f"{gpt_ckpt}: the config declares more than 96 tensors but the file stores 16 "
                        "(its largest setting that is no tensor size: n_layer: 60000)", unchanged=tmp_path):
        load_gpt(gpt_ckpt)


@pytest.mark.parametrize("field, value, message", [
    ("max_len", 2.5, "max_len: 2.5 in the config, expected an int"),
    ("n_head", "2", "n_head: '2' in the config, expected an int"),
    ("dropout", "0.1", "dropout: '0.1' in the config, expected a float"),
    ("n_head", 3, "GPT n_embd 16 must be a multiple of n_head 3"),
    ("n_embd", -16, "its config does not make a model (RuntimeError: "),
])
def test_declared_config_of_the_wrong_kind(tmp_path, gpt_ckpt, field, value, message):
    _edit_config(gpt_ckpt, **{field: value})
    with one_line_error(f"{gpt_ckpt}: {message}", unchanged=tmp_path):
        load_gpt(gpt_ckpt)


def test_epic_fm_checkpoint_declaring_another_width(tmp_path):
    from omnijet_lib.models.epic_fm import EPiCConfig
    from omnijet_lib.training.epic_fm import EPiCFlowMatching, load_epic_fm, save_epic_fm

    path = save_epic_fm(tmp_path / "epic.safetensors", EPiCFlowMatching(EPiCConfig(hidden=8, latent=2, n_layers=1)))
    _edit_config(path, hidden=12)
    with one_line_error(f"{path}: tensor shapes differ from the config: hidden: 12 in the config, the stored "
                        "weights say 8", unchanged=tmp_path):
        load_epic_fm(path)


def test_config_metadata_that_is_not_an_object(tmp_path, gpt_ckpt):
    with safe_open(str(gpt_ckpt), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(gpt_ckpt), metadata={"config": "[1, 2]"})
    with one_line_error(f"{gpt_ckpt}: checkpoint config metadata is a JSON list, not an object", unchanged=tmp_path):
        load_checkpoint(gpt_ckpt)


# ------------------------------------------------------------- declared sizes: official checkpoints
def _tokenizer_dir(tmp_path, kw=None, config=None, model_type="VQVAENormFormer"):
    sd, kw0 = of._fixture("vqvae_conditional")
    d = tmp_path / of.TOKENIZER_DIR
    of.write_checkpoint(d / "model_ckpt.ckpt", sd, {"model_kwargs": kw0 if kw is None else kw,
                                                     "model_type": model_type}, adam=False)
    config = {"data": {"dataset_kwargs_common": {"feature_dict": of.FEATURE_DICT}}} if config is None else config
    (d / "config.yaml").write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return d


def _backbone(tmp_path, kw=None, name="gpt", **hp):
    sd, kw0 = of._fixture(name)
    return of.write_checkpoint(tmp_path / "b.ckpt", sd, {"model_kwargs": kw0 if kw is None else kw, **hp}, adam=False)


def test_official_tokenizer_declaring_another_width(tmp_path):
    _, kw = of._fixture("vqvae_conditional")
    d = _tokenizer_dir(tmp_path, kw={**kw, "hidden_dim": 60000})
    with one_line_error(f"{d / 'model_ckpt.ckpt'}: tensors do not fit the model built from its arguments: "
                        "hidden_dim: 60000 in the config, the stored weights say 16", unchanged=tmp_path):
        official.load_official_tokenizer(d)


@pytest.mark.parametrize("key, value, message", [
    ("embedding_dim", 10**6, "embedding_dim: 1000000 in the config, more than 65536"),
    ("max_sequence_len", 10**9, "max_sequence_len: 1000000000 in the config, more than 65536"),
    ("vocab_size", "34", "model_kwargs.vocab_size is '34', expected an integer"),
    ("n_heads", None, "model_kwargs.n_heads is None, expected an integer"),
    ("n_heads", [2], "model_kwargs.n_heads is [2], expected an integer"),
    ("n_heads", 3, "GPT n_embd 16 must be a multiple of n_head 3"),
])
def test_official_backbone_with_odd_model_kwargs(tmp_path, key, value, message):
    _, kw = of._fixture("gpt")
    path = _backbone(tmp_path, kw={**kw, key: value})
    with one_line_error(f"{path}: ", message, unchanged=tmp_path):
        official.load_official_backbone(path)


def test_official_classifier_declaring_many_classes(tmp_path):
    _, kw = of._fixture("classifier")
    path = _backbone(tmp_path, kw={**kw, "n_out_nodes": 60000}, name="classifier", class_head_type="summation")
    with one_line_error(f"{path}: tensors do not fit the model built from its arguments: n_out_nodes: 60000 in "
                        "the config, the stored weights say 2", unchanged=tmp_path):
        official.load_official_classifier(path)


@pytest.mark.parametrize("change, message", [
    ({"vq_kwargs": [1, 2]}, "model_kwargs.vq_kwargs is [1, 2], expected a mapping"),
    ({"vq_kwargs": {"beta": 0.9}}, "model_kwargs lack vq_kwargs.num_codes"),
    ({"vq_kwargs": {"num_codes": 32, "beta": float("nan")}}, "model_kwargs.vq_kwargs.beta is nan, expected a "
                                                             "finite number"),
    ({"latent_dim": 10**400}, "latent_dim: 1000"),
])
def test_official_tokenizer_with_odd_model_kwargs(tmp_path, change, message):
    _, kw = of._fixture("vqvae_conditional")
    d = _tokenizer_dir(tmp_path, kw={**kw, **change})
    with one_line_error(f"{d / 'model_ckpt.ckpt'}: ", message, unchanged=tmp_path):
        official.load_official_tokenizer(d)


# ---------------------------------------------------------------- odd contents of official pickles
def test_hyper_parameters_nested_beyond_recursion(tmp_path):
    deep = []
    for _ in range(1500):  # deeper than Python's recursion limit once converted
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # only to write it
    try:
        path = _backbone(tmp_path, deep=deep)
    finally:
        sys.setrecursionlimit(limit)
    with one_line_error(f"{path}: hyper_parameters nest deeper than 100 levels", unchanged=tmp_path):
        official.load_official_backbone(path)


def test_hyper_parameters_sharing_one_list_exponentially(tmp_path):
    shared = []
    for _ in range(40):  # 2^40 paths through a 40 kB pickle
        shared = [shared, shared]
    path = _backbone(tmp_path, shared=shared)
    with one_line_error(f"{path}: hyper_parameters hold more than 100,000 values", unchanged=tmp_path):
        official.load_official_backbone(path)


def test_hyper_parameters_and_state_dict_of_odd_types(tmp_path):
    sd, kw = of._fixture("gpt")
    path = tmp_path / "b.ckpt"
    torch.save(of.lightning_checkpoint(sd, torch.ones(3), adam=False), path)  # hyper_parameters: a tensor
    with one_line_error(f"{path}: hyper_parameters.model_kwargs missing", unchanged=tmp_path):
        official.load_official_backbone(path)
    ckpt = of.lightning_checkpoint(sd, {"model_kwargs": kw}, adam=False)
    ckpt["state_dict"][5] = torch.ones(1)
    torch.save(ckpt, path)
    with one_line_error(f"{path}: state_dict key 5 is not a tensor name", unchanged=tmp_path):
        official.load_official_backbone(path)


def test_model_type_and_head_type_of_odd_types(tmp_path):
    d = _tokenizer_dir(tmp_path, model_type=[1, 2])
    with one_line_error(f"{d / 'model_ckpt.ckpt'}: model_type [1, 2] is not supported", unchanged=tmp_path):
        official.load_official_tokenizer(d)
    path = _backbone(tmp_path, name="classifier", class_head_type=torch.ones(2))
    with one_line_error(f"{path}: class_head_type tensor([1., 1.]) is not supported", unchanged=tmp_path):
        official.load_official_classifier(path)


@pytest.mark.parametrize("config, message", [
    ("x: " + "a" * (2 << 20) + "\n", "larger than 1 MiB; the config.yaml of a training is a few kB"),
    ("[" * 5000 + "]" * 5000, "nested too deeply to be a training config"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    ({"data": [1, 2]}, "no data.dataset_kwargs_common.feature_dict"),
    ({"data": {"dataset_kwargs_common": {"feature_dict": {**of.FEATURE_DICT, "part_pt": [1, 2]}}}},
     "feature_dict.part_pt is [1, 2], expected a mapping"),
    ({"data": {"dataset_kwargs_common": {"feature_dict": {
        **of.FEATURE_DICT, "part_pt": {**of.FEATURE_DICT["part_pt"], "multiply_by": 10**400}}}}},
     "feature_dict.part_pt.multiply_by is 1000"),
], ids=["megabytes", "nested", "binary", "data_list", "feature_list", "huge_int"])
def test_odd_config_yaml_beside_an_official_tokenizer(tmp_path, config, message):
    d = _tokenizer_dir(tmp_path)
    cfg = d / "config.yaml"
    if isinstance(config, bytes):
        cfg.write_bytes(config)
    else:
        cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    with one_line_error(f"{cfg}: {message}" if isinstance(config, (str, bytes)) else message,
                        unchanged=tmp_path):
        official.load_official_tokenizer(d)


# ----------------------------------------------------------------------- arguments and calls
@pytest.mark.parametrize("kwargs, message", [
    ({"device": "foo"}, "--device 'foo': not a device (cpu, cuda, cuda:1, mps)"),
    ({"device": "cuda:999"}, "--device cuda:999: no such CUDA device here"),
    ({"max_len": 10**9}, "--max-len 1000000000: at most 65536 constituents per jet are supported"),
    ({"max_len": 12.5}, "--max-len must be a positive integer, got 12.5"),
    ({"chunk": 0}, "--chunk must be a positive integer, got 0"),
], ids=["device", "no_gpu", "max_len", "max_len_float", "chunk"])
def test_tokenize_files_arguments(tmp_path, kwargs, message):
    with one_line_error(message, unchanged=tmp_path):
        tokenize_files(tmp_path / "tok.safetensors", str(tmp_path / "x.root"), tmp_path / "out", **kwargs)


def test_device_is_named_not_the_checkpoint(tmp_path, vq_ckpt):
    with one_line_error("device 'foo': not a device", unchanged=tmp_path) as info:
        load_tokenizer(vq_ckpt, device="foo")
    assert "safetensors" not in str(info.value)


@pytest.mark.parametrize("args, kwargs, message", [
    ((2.5,), {}, "generate: n_jets must be an integer, got 2.5"),
    ((True,), {}, "generate: n_jets must be an integer, got True"),
    ((3,), {"batch_size": 2.5}, "generate: batch_size must be an integer, got 2.5"),
    ((3,), {"temperature": "hot"}, "generate: temperature must be a number > 0, got 'hot'"),
    ((10**12,), {}, "generate: 1,000,000,000,000 jets of up to 8 constituents (batch_size 256) need about"),
], ids=["float", "bool", "batch_float", "temperature", "huge"])
def test_generate_counts(tmp_path, args, kwargs, message):
    gpt = GPT(GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=10))
    with one_line_error(message, unchanged=tmp_path):
        gpt.generate(*args, **kwargs)
    with one_line_error(message, unchanged=tmp_path):
        gpt.generate_reference(*args, **kwargs)


def test_generate_still_takes_numpy_integers():
    gpt = GPT(GPTConfig(vocab_size=10, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=10))
    seq, mask = gpt.generate(np.int64(3), batch_size=np.int32(2))
    assert seq.shape == (3, 10) and mask[:, 0].all()


@pytest.mark.parametrize("tokens, message", [
    (np.array([[3.0, 2.7]]), "tokens: ids must be integers, got float64"),
    (np.array([["3", "4"]]), "tokens: ids must be integers, got <U1"),
], ids=["float", "str"])
def test_reconstruct_takes_integer_ids_only(tmp_path, tokens, message):
    tok = BinnedTokenizer(BinnedConfig(bins=5))
    with one_line_error(message, unchanged=tmp_path):
        reconstruct(tok, tokens)
    with one_line_error("to_sequence: ", unchanged=tmp_path):
        tok.to_sequence(tokens)


# ----------------------------------------------------------------------------- E >= |p| check
def _extreme(src, dst, px, energy):
    """``src`` with the first constituent's momentum (px, px, px) or (px, 0, 0) and energy set."""
    def edit(b):
        counts = ak.num(b["part_px"])
        for name, value in (("part_px", px[0]), ("part_py", px[1]), ("part_pz", px[2]), ("part_energy", energy)):
            flat = ak.to_numpy(ak.flatten(b[name])).copy()
            flat[0] = value
            b[name] = ak.unflatten(flat, counts)
    return copy_as_ttree(src, dst, edit=edit)


def test_energy_check_near_the_float32_maximum(tmp_path, jets_file):
    """|p|² of px = 3e38 overflows float32: a valid constituent (E 3.4e38 >= |p| 3e38) was refused
    with an overflow warning; one whose |p| is beyond float32 gets the usual line."""
    ok = _extreme(jets_file, tmp_path / "ok.root", (3e38, 0.0, 0.0), 3.4e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jets = read_jetclass(ok)
    assert float(jets.part.E[0, 0]) == pytest.approx(3.4e38, rel=1e-6)
    bad = _extreme(jets_file, tmp_path / "bad.root", (3e38, 3e38, 3e38), 3.4e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with one_line_error(f"{bad}: branch part_energy is below the momentum |p| in 1 constituents (first in "
                            "entry 0: E = 3.4e+38 GeV, |p| = 5.196e+38 GeV)", unchanged=tmp_path):
            read_jetclass(bad)


def test_energy_check_in_memory_compares_without_overflow():
    px = ak.Array([[3e38, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_constituents("jets", {"part_px": px, "part_py": px * 0, "part_pz": px * 0,
                                    "part_energy": ak.Array([[3.4e38, 1.0]])})
