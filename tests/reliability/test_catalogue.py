"""One catalogue of malformed inputs through every public entry point that reads them.

Each case is a way a real input goes wrong: ragged, mistyped, non-finite, out of range, empty,
truncated, renamed or swapped for another kind of file. Every entry point must answer with one
error line that names the file (or parameter) and the problem, and leave its output folder as it
was, or (where it does not read the damaged part) return the same result as for the intact input.

* ROOT files: ``read_jetclass``, ``iter_jetclass``, ``load_padded``, ``tokenize_files`` and
  ``omnijet tokenize`` (in process);
* jets in memory: ``write_jetclass``;
* tokenizer checkpoints: ``load_tokenizer`` and ``tokenize_files``; padded arrays: ``tokenize``;
* parameter profiles: ``resolve_parameters`` and ``omnijet figures --dry-run`` (in process).

The command-line arguments themselves are catalogued in ``test_cli_errors.py`` (subprocesses).
"""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
import vector
import yaml

from omnijet_lib.cli import main as cli
from omnijet_lib.data import iter_jetclass, load_padded, make_jets, read_jetclass, write_jetclass
from omnijet_lib.figures import load_profile, notebooks, resolve_parameters
from omnijet_lib.data.shards import read_manifest, read_shard
from omnijet_lib.io import LOCK_FILE, OmnijetError
from omnijet_lib.tokenizers import VQVAE, VQVAEConfig, load_tokenizer, save_tokenizer
from omnijet_lib.tokenizers.streaming import tokenize_files

from .conftest import one_line_error, random_jets, snapshot

N_JETS = 12


# ------------------------------------------------------------------------- ROOT file catalogue
def _branches(jets) -> dict:
    """The JetClass branches of ``jets`` as plain per-branch arrays (jagged ones as lists)."""
    p = jets.part
    out = {f"part_{k}": ak.values_astype(getattr(p, a), np.float32)
           for k, a in (("px", "px"), ("py", "py"), ("pz", "pz"), ("energy", "E"))}
    for b in ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_nparticles"):
        out[b] = ak.to_numpy(jets[b]).astype(np.float32)
    label = ak.to_numpy(jets.label)
    for i, name in enumerate(("QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl")):
        out[f"label_{name}"] = (label == i).astype(np.float32)
    return out


def _set(branch, jet, value, const=0):
    def edit(b):
        if branch.startswith("part_"):
            vals = ak.to_list(b[branch])
            vals[jet][const] = value
            b[branch] = ak.values_astype(ak.Array(vals), np.float32)
        else:
            v = np.asarray(b[branch], np.float32).copy()
            v[jet] = value
            b[branch] = v
    return edit


def _ragged(branch, jet, delta, other=None):
    """``branch`` gets ``delta`` constituents more in ``jet`` (and ``-delta`` in ``other``: same total)."""
    def edit(b):
        vals = ak.to_list(b[branch])
        for j, d in ((jet, delta), (other, -delta)):
            if j is not None:
                vals[j] = vals[j] + [1.0] * d if d > 0 else vals[j][:d]
        b[branch] = ak.values_astype(ak.Array(vals), np.float32)
    return edit


def _labels(jet, **values):
    def edit(b):
        for name, v in values.items():
            arr = np.asarray(b[f"label_{name}"], np.float32).copy()
            arr[jet] = v
            b[f"label_{name}"] = arr
    return edit


def _drop(*names):
    def edit(b):
        for n in names:
            del b[n]
    return edit


def _rename(old, new):
    def edit(b):
        b[new] = b.pop(old)
    return edit


def _empty_jet(jet):
    def edit(b):
        for k in [k for k in b if k.startswith("part_")]:
            vals = ak.to_list(b[k])
            vals[jet] = []
            b[k] = ak.values_astype(ak.Array(vals), np.float32)
    return edit


def _write_tree(path, branches, tree="tree"):
    """Each jagged branch with its own counter, as files from other writers may have them."""
    with uproot.recreate(path) as f:
        f.mktree(tree, branches, counter_name=lambda c: f"n_{c}")
    return path


# name -> (how the file is made, fragments of the error; "{f}" is the file; None: readers that do
# not read the damaged branch must return the intact file's result)
FILES = {
    # ragged
    "ragged_total_differs": (_ragged("part_py", 4, 1), ["{f}: branch part_py has", "in entry 4 but part_px has"]),
    "ragged_same_total": (_ragged("part_pz", 2, 1, other=7), ["{f}: branch part_pz has", "in entry 2 but part_px has"]),
    "ragged_energy": (_ragged("part_energy", 9, -1), ["{f}: branch part_energy has", "in entry 9"]),
    "empty_jet": (_empty_jet(6), ["{f}: 1 jets have no constituents (first: entry 6)"]),
    # non-finite
    "nan_px": (_set("part_px", 3, np.nan), ["{f}: branch part_px contains 1 NaN/inf values (first in entry 3)"]),
    "inf_py": (_set("part_py", 0, np.inf), ["{f}: branch part_py contains 1 NaN/inf values (first in entry 0)"]),
    "neg_inf_pz": (_set("part_pz", 11, -np.inf), ["{f}: branch part_pz contains 1 NaN/inf values (first in entry 11)"]),
    "nan_energy": (_set("part_energy", 5, np.nan), ["{f}: branch part_energy contains 1 NaN/inf values (first in entry 5)"]),
    "nan_jet_pt": (_set("jet_pt", 8, np.nan), None),
    # out of range
    "negative_energy": (_set("part_energy", 2, -5.0), ["{f}: branch part_energy is below the momentum |p|",
                                                        "first in entry 2: E = -5 GeV"]),
    "energy_below_momentum": (_set("part_energy", 10, 0.01, const=1), ["{f}: branch part_energy is below",
                                                                        "first in entry 10"]),
    "label_half_half": (_labels(3, QCD=0.5, Tbqq=0.5), ["{f}: branch label_QCD is 0.5 in entry 3"]),
    "label_two": (_labels(1, Tbqq=2.0), ["{f}: branch label_Tbqq is 2 in entry 1"]),
    "label_negative": (_labels(7, Hbb=-1.0), ["{f}: branch label_Hbb is -1 in entry 7"]),
    "label_nan": (_labels(0, Wqq=np.nan), ["{f}: branch label_Wqq is nan in entry 0"]),
    "label_none_set": (_labels(4, Tbqq=0.0), ["{f}: 1 jets do not have exactly one label_* set (first: entry 4 has none)"]),
    "label_two_set": (_labels(5, QCD=1.0), ["{f}: 1 jets do not have exactly one label_* set",
                                            "entry 5 has label_QCD, label_Tbqq"]),
    # renamed / missing
    "no_labels": (_drop(*[f"label_{n}" for n in ("QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl")]),
                  ["{f}: no label_* branches"]),
    "renamed_px": (_rename("part_px", "part_PX"), ["{f}: missing branch part_px in tree 'tree'"]),
    "renamed_energy": (_rename("part_energy", "part_e"), ["{f}: missing branch part_energy in tree 'tree'"]),
    "missing_pz": (_drop("part_pz"), ["{f}: missing branch part_pz in tree 'tree'"]),
    "other_tree": ("tree:Events", ["{f}: no TTree named 'tree' (found: Events)"]),
    # empty / truncated / swapped for another kind of file
    "zero_bytes": (b"", ["{f}: not a readable ROOT file"]),
    "text_file": (b"px,py,pz,E\n1,2,3,4\n" * 40, ["{f}: not a readable ROOT file"]),
    "truncated_half": ("truncate:0.5", ["{f}: ", "corrupt"]),
    "truncated_tail": ("truncate:0.97", ["{f}: ", "corrupt"]),
    "token_shard": ("shard", ["{f}: not a readable ROOT file"]),
    "checkpoint": ("checkpoint", ["{f}: not a readable ROOT file"]),
}


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    d = tmp_path_factory.mktemp("intact")
    jets = random_jets(N_JETS, label=8)
    return _write_tree(d / "TTBar_000.root", _branches(jets))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16, num_codes=64))
    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.safetensors", tok)


def _make(case, folder, intact, tokenizer):
    how = FILES[case][0]
    path = folder / f"{case}.root"
    if callable(how):  # an edit of the intact file's branches
        arrays = uproot.open(intact)["tree"].arrays()
        branches = {k: arrays[k] for k in arrays.fields if not k.startswith("n_")}
        how(branches)
        _write_tree(path, branches)
    elif isinstance(how, bytes):
        path.write_bytes(how)
    elif how == "shard":
        from omnijet_lib.data.shards import write_shard
        write_shard(path, [1, 2, 3], [3], [8], [0], 64)
    elif how == "checkpoint":
        path.write_bytes(tokenizer.read_bytes())
    elif how.startswith("truncate:"):
        data = intact.read_bytes()
        path.write_bytes(data[: int(len(data) * float(how.split(":")[1]))])
    elif how.startswith("tree:"):
        arrays = uproot.open(intact)["tree"].arrays()
        _write_tree(path, {k: arrays[k] for k in arrays.fields if not k.startswith("n_")}, tree=how[5:])
    return path


def _read_jetclass(path, out):
    return ak.to_list(read_jetclass(path).part.px)


def _iter_jetclass(path, out):
    return [ak.to_list(c.part.px) for c in iter_jetclass(path, step_size=5)]


def _load_padded(path, out):
    return [a.tolist() for a in load_padded(path, chunk=4)]


def _tokenize_files(path, out, tokenizer):
    return tokenize_files(tokenizer, path, out, chunk=5, device="cpu")["class_counts"]


def _cli_tokenize(path, out, tokenizer, capsys):
    code = cli(["tokenize", "--tokenizer", str(tokenizer), "--in", str(path), "--out", str(out), "--chunk", "5",
                "--device", "cpu"])
    captured = capsys.readouterr()
    if code == 0:
        return captured.out.split(": ", 1)[1]
    err = captured.err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: "), captured.err
    raise OmnijetError(err[len("error: "):])


READERS = ["read_jetclass", "iter_jetclass", "load_padded", "tokenize_files", "cli_tokenize"]
_JET_BRANCH_READERS = {"read_jetclass", "iter_jetclass", "tokenize_files", "cli_tokenize"}  # not load_padded


def _call(reader, path, out, tokenizer, capsys):
    if reader == "tokenize_files":
        return _tokenize_files(path, out, tokenizer)
    if reader == "cli_tokenize":
        return _cli_tokenize(path, out, tokenizer, capsys)
    return {"read_jetclass": _read_jetclass, "iter_jetclass": _iter_jetclass, "load_padded": _load_padded}[reader](path, out)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(FILES))
def test_root_catalogue(case, reader, tmp_path, intact, tokenizer, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    path = _make(case, folder, intact, tokenizer)
    out = tmp_path / "shards"
    fragments = FILES[case][1]
    if fragments is None:  # a jet-level branch: an error for readers that read it
        if reader not in _JET_BRANCH_READERS:
            assert _call(reader, path, out, tokenizer, capsys) == _call(reader, intact, tmp_path / "ref", tokenizer, capsys)
            return
        fragments = ["{f}: branch jet_pt contains 1 NaN/inf values (first in entry 8)"]
    with one_line_error(*(f.format(f=path) for f in fragments), unchanged=folder):
        _call(reader, path, out, tokenizer, capsys)
    _nothing_half_done(out)


def _nothing_half_done(out):
    """Tokenization stops at the first bad chunk: the shards before it are complete, listed and
    resumable, the manifest is not marked complete, and no temporary file is left."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    if LOCK_FILE in names:  # the folder's lock, released: no holder recorded
        assert (out / LOCK_FILE).read_text() == ""
        names.remove(LOCK_FILE)
    assert not [n for n in names if n.endswith(".part")], names
    if "manifest.json" not in names:
        assert not names, names
        return
    man = read_manifest(out)
    assert not man["complete"]
    assert names == {"manifest.json"} | {s["name"] for s in man["shards"]}
    for s in man["shards"]:
        assert len(read_shard(out / s["name"])["counts"]) == s["jets"]


def test_the_intact_file_reads_the_same_everywhere(tmp_path, intact, tokenizer, capsys):
    jets = read_jetclass(intact)
    assert len(jets) == N_JETS and ak.all(jets.label == 8)
    x, mask, labels = load_padded(intact)
    assert mask.sum() == ak.sum(ak.num(jets.part, axis=1)) and (labels == 8).all()
    assert _tokenize_files(intact, tmp_path / "a", tokenizer)[8] == N_JETS
    assert f"{N_JETS} jets" in _cli_tokenize(intact, tmp_path / "b", tokenizer, capsys)


# ------------------------------------------------------------------------- write_jetclass
def _jets_with(field, jet, value, const=0):
    jets = random_jets(N_JETS, label=8)
    if field == "label":
        label = ak.to_numpy(jets.label).copy().astype(np.float64 if isinstance(value, float) else np.int64)
        label[jet] = value
        return ak.with_field(jets, label, "label")
    if field.startswith("jet_"):
        v = ak.to_numpy(jets[field]).copy()
        v[jet] = value
        return ak.with_field(jets, v, field)
    p = {k: ak.to_list(getattr(jets.part, k)) for k in ("px", "py", "pz", "E")}
    if field == "empty":
        for k in p:
            p[k][jet] = []
    else:
        p[field][jet][const] = value
    return make_jets(vector.zip(p), 8)


WRITES = {
    "nan_px": (("px", 3, np.nan), "branch part_px contains 1 NaN/inf values (first in entry 3)"),
    "inf_pz": (("pz", 0, np.inf), "branch part_pz contains 1 NaN/inf values (first in entry 0)"),
    "nan_energy": (("E", 9, np.nan), "branch part_energy contains 1 NaN/inf values (first in entry 9)"),
    "negative_energy": (("E", 4, -1.0), "branch part_energy is below the momentum |p| in 1 constituents (first in entry 4"),
    "energy_below_momentum": (("E", 2, 1e-3, 1), "branch part_energy is below the momentum"),
    "empty_jet": (("empty", 7, None), "1 jets have no constituents (first: entry 7)"),
    "label_out_of_range": (("label", 5, 10), "label 10 of jet 5 is not a class index 0..9"),
    "label_negative": (("label", 0, -1), "label -1 of jet 0 is not a class index 0..9"),
    "label_float": (("label", 0, 0.5), "label has dtype float64, expected integer class indices"),
    "nan_jet_pt": (("jet_pt", 6, np.nan), "branch jet_pt contains 1 NaN/inf values (first in entry 6)"),
}


@pytest.mark.parametrize("case", sorted(WRITES))
def test_write_jetclass_refuses_what_readers_refuse(case, tmp_path):
    out = write_jetclass(tmp_path / "jets.root", random_jets(N_JETS, label=3))
    args, fragment = WRITES[case]
    jets = _jets_with(*args)
    with one_line_error(f"{out}: refusing to write: {fragment}", unchanged=tmp_path):
        write_jetclass(out, jets)
    assert ak.all(read_jetclass(out).label == 3)  # the old file is intact


# ------------------------------------------------------------------------- tokenizer checkpoints
def _bad_tokenizer(case, folder, tokenizer):
    path = folder / "tokenizer.safetensors"
    data = tokenizer.read_bytes()
    if case == "missing":
        return path
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "junk_header":
        path.write_bytes(b"\xff" * 8 + data[8:])
    elif case == "root_file":
        write_jetclass(path, random_jets(3))
    elif case == "pickle":
        torch.save({"w": torch.zeros(2)}, path)
    elif case == "directory":
        path.mkdir()
    elif case in ("nan_weight", "inf_weight", "nan_codebook"):
        tok = load_tokenizer(tokenizer)
        with torch.no_grad():
            if case == "nan_codebook":
                tok.vq.codebook.weight[3, 0] = float("nan")
            else:
                tok.encoder.inp.weight[0, 1] = float("nan") if case == "nan_weight" else float("inf")
        save_tokenizer(path, tok)
    elif case == "gpt_checkpoint":
        from omnijet_lib.io import save_model
        from omnijet_lib.models.gpt import GPT, GPTConfig
        save_model(path, GPT(GPTConfig(vocab_size=66, n_embd=8, n_head=2, n_layer=1, ffn=8)))
    return path


TOKENIZERS = {
    "missing": "checkpoint not found",
    "zero_bytes": "not a valid safetensors checkpoint",
    "truncated": "not a valid safetensors checkpoint",
    "junk_header": "not a valid safetensors checkpoint",
    "root_file": "not a valid safetensors checkpoint",
    "pickle": "not a valid safetensors checkpoint",
    "directory": "",
    "nan_weight": "weight encoder.inp.weight holds 1 NaN/inf values",
    "inf_weight": "weight encoder.inp.weight holds 1 NaN/inf values",
    "nan_codebook": "weight vq.codebook.weight holds 1 NaN/inf values",
    "gpt_checkpoint": "not a tokenizer checkpoint",
}


@pytest.mark.parametrize("entry", ["load_tokenizer", "tokenize_files"])
@pytest.mark.parametrize("case", sorted(TOKENIZERS))
def test_tokenizer_catalogue(case, entry, tmp_path, intact, tokenizer):
    folder = tmp_path / "tok"
    folder.mkdir()
    path = _bad_tokenizer(case, folder, tokenizer)
    with one_line_error(f"{path}", TOKENIZERS[case], unchanged=tmp_path):
        if entry == "load_tokenizer":
            load_tokenizer(path)
        else:
            tokenize_files(path, intact, tmp_path / "shards", chunk=5, device="cpu")
    assert not (tmp_path / "shards").exists()


# ------------------------------------------------------------------------- tokenize (arrays)
def _padded(case):
    from omnijet_lib.data import constituent_features, to_padded

    x, mask = to_padded(constituent_features(random_jets(6)), max_len=32)
    if case == "nan_real":
        x[2, 0, 1] = np.nan
    elif case == "inf_real":
        x[4, 1, 0] = np.inf
    elif case == "nan_padding":   # not a constituent: ignored
        x[0, -1, 0] = np.nan
    elif case == "four_features":
        x = np.concatenate([x, x[..., :1]], -1)
    elif case == "flat":
        x = x.reshape(len(x), -1)
    elif case == "mask_shape":
        mask = mask[:, :-1]
    elif case == "mask_hole":
        mask[3, 0] = False
    elif case == "mask_values":
        mask = mask.astype(np.float32) * 2
    elif case == "text":
        x = x.astype(str)
    elif case == "empty":
        x, mask = x[:0], mask[:0]
    return x, mask


TOKENIZE = {
    "nan_real": "x holds NaN/inf at 1 real constituents (first: jet 2)",
    "inf_real": "x holds NaN/inf at 1 real constituents (first: jet 4)",
    "nan_padding": None,
    "four_features": "x (6, 32, 4) and mask (6, 32) must be (N, L, 3) and (N, L)",
    "flat": "x (6, 96) and mask (6, 32) must be (N, L, 3) and (N, L)",
    "mask_shape": "x (6, 32, 3) and mask (6, 31) must be (N, L, 3) and (N, L)",
    "mask_hole": "mask: jet 3 has padding before a real entry",
    "mask_values": "mask holds values other than 0 and 1 (e.g. 2.0)",
    "text": "must hold numbers and booleans",
    "empty": None,
}


@pytest.mark.parametrize("case", sorted(TOKENIZE))
def test_tokenize_catalogue(case, tokenizer):
    from omnijet_lib.tokenizers import tokenize

    tok = load_tokenizer(tokenizer)
    x, mask = _padded(case)
    if TOKENIZE[case] is None:  # the same tokens as for the intact arrays (or none)
        ref_x, ref_mask = _padded("intact")
        out = tokenize(tok, x, mask)
        assert out.shape == mask.shape
        if len(out):
            np.testing.assert_array_equal(out, tokenize(tok, ref_x, ref_mask))
        return
    with one_line_error(TOKENIZE[case]):
        tokenize(tok, x, mask)


# ------------------------------------------------------------------------- parameter profiles
PROFILES = {
    "int_for_list": ({"01_token_quality": {"codebook_sizes": 512}},
                     "section 01_token_quality: codebook_sizes must be list[int] (default: [64, 256]), got int 512"),
    "str_for_int": ({"02_generation": {"classifier_epochs": "3"}},
                    "section 02_generation: classifier_epochs must be int (default: 3), got str '3' (text in YAML"),
    "list_for_dict": ({"common": {"trainer": ["gpu"]}},
                      "section common: trainer must be dict (default: {}), got list[str] ['gpu']"),
    "dict_for_list": ({"01_token_quality": {"kinds": {"conditional": 1}}},
                      "kinds must be list[str]"),
    "bool_for_int": ({"common": {"per_class": True}}, "section common: per_class must be int (default: 300), got bool"),
    "float_for_int": ({"03_transfer_learning": {"n_seeds": 2.5}}, "n_seeds must be int (default: 2), got float 2.5"),
    "null_for_int": ({"02_generation": {"n_generate": None}}, "n_generate must be int (default: 300), got None"),
    "yaml_text_exponent": ({"03_transfer_learning": {"lr": "1e-4"}},
                           "lr must be float (default: 0.0001), got str '1e-4' (text in YAML: write it without "
                           "quotes, with a dot: 1.0e-4, not 1e-4)"),
    "str_in_int_list": ({"03_transfer_learning": {"train_sizes": [100, "1k"]}},
                        "train_sizes must be list[int] (default: [50, 200]), got list[int | str]"),
    "str_for_list": ({"01_token_quality": {"kinds": "conditional"}}, "kinds must be list[str]"),
    "int_for_str": ({"03_transfer_learning": {"signal": 8}}, "signal must be str (default: 'Tbqq'), got int 8"),
    "int_for_files": ({"02_generation": {"data_files": 3}}, "data_files must be str or list[str] or None"),
    "bad_max_epochs_map": ({"03_transfer_learning": {"max_epochs": {100: "ten"}}},
                           "max_epochs must be int or dict[int, int]"),
    "float_for_path": ({"common": {"checkpoint_dir": 1.5}}, "checkpoint_dir must be str or None"),
    "negative": ({"common": {"per_class": -3}}, "section common: per_class must be positive, got -3"),
    "zero_size": ({"common": {"per_class": 0}}, "section common: per_class must be positive, got 0"),
    "zero_in_list": ({"03_transfer_learning": {"train_sizes": [100, 0]}},
                     "section 03_transfer_learning: train_sizes must be positive, got [100, 0]"),
    "negative_other": ({"02_generation": {"temperature": -1.0}}, "section 02_generation: temperature must not be negative, got -1.0"),
    "unknown_key": ({"02_generation": {"epoch": 3}}, "02_generation has no parameter(s) epoch"),
    "unknown_section": ({"07_nothing": {}}, "section '07_nothing' names no notebook"),
    "section_not_mapping": ({"02_generation": [1, 2]}, "a profile maps 'common' and notebook names to dicts"),
}


@pytest.mark.parametrize("entry", ["resolve_parameters", "cli_dry_run"])
@pytest.mark.parametrize("case", sorted(PROFILES))
def test_profile_catalogue(case, entry, tmp_path, capsys):
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(PROFILES[case][0]))
    if entry == "resolve_parameters":
        with one_line_error(str(path), PROFILES[case][1], unchanged=tmp_path):
            resolve_parameters(load_profile(path), notebooks())
        return
    assert cli(["figures", "--profile", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err and PROFILES[case][1] in err, err


def test_every_shipped_profile_passes_the_type_check():
    for name in ("ci", "quick", "paper", "published"):
        resolve_parameters(load_profile(name), notebooks())

