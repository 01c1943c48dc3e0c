"""Bad inputs through the public API: one clear error line naming the file/parameter and the
problem, and nothing written (the folder is byte-for-byte unchanged, old outputs survive).

Complements tests/test_data.py (junk file, renamed part_px, wrong tree, NaN in part_px, half a
file) with the official TTree format, other branches, entry numbers and the no-write guarantee.

Decisions documented here:
* a jet with no constituents cannot come from JetClass: reading one is an error naming the entry,
  writing one is refused (nothing is written);
* a jet with more than 128 constituents is read as is; ``to_padded`` keeps the 128 hardest and
  logs how many jets were clipped.
"""

from __future__ import annotations

import hashlib
import json
import logging

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
import vector
from dataclasses import dataclass

from omnijet_lib.data import (
    class_index, constituent_features, features_to_p4, iter_jetclass, load_padded, make_jets,
    read_jetclass, to_padded, write_jetclass,
)
from omnijet_lib.data import download as dl
from omnijet_lib.io import OmnijetError, atomic_path, load_checkpoint, save_checkpoint, write_json
from omnijet_lib.io import load_model, save_model

from .conftest import copy_as_ttree, one_line_error, random_jets

# every reader gives the same errors (load_padded reads only part_px/py/pz/energy and the labels,
# so a NaN in a jet branch, which cannot change its output, is not its error)
READERS = [pytest.param(read_jetclass, id="read_jetclass"), pytest.param(load_padded, id="load_padded")]


# ------------------------------------------------------------------------------ ROOT inputs
@pytest.mark.parametrize("read", READERS)
def test_missing_file_in_a_list_is_named_before_anything_is_read(read, tmp_path, jets_file):
    with one_line_error(f"{tmp_path / 'nope.root'}: file not found", unchanged=tmp_path):
        read([jets_file, tmp_path / "nope.root"])


@pytest.mark.parametrize("read", READERS)
def test_glob_without_match_and_directory(read, tmp_path):
    with one_line_error(f"{tmp_path}/*.root: no files match this pattern", unchanged=tmp_path):
        read(str(tmp_path / "*.root"))
    with one_line_error(f"{tmp_path}: is a directory", unchanged=tmp_path):
        read(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(600), b"HDF5" * 10])
@pytest.mark.parametrize("read", READERS)
def test_non_root_files(read, tmp_path, content):
    p = tmp_path / "fake.root"
    p.write_bytes(content)
    with one_line_error(f"{p}: not a readable ROOT file", unchanged=tmp_path):
        read(p)


@pytest.mark.parametrize("fmt", ["rntuple", "ttree"])
@pytest.mark.parametrize("frac", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("read", READERS)
def test_truncated_root_file(read, tmp_path, jets_file, fmt, frac):
    src = jets_file if fmt == "rntuple" else copy_as_ttree(jets_file, tmp_path / "tt.root")
    data = src.read_bytes()
    p = tmp_path / "cut.root"
    p.write_bytes(data[: int(len(data) * frac)])
    with one_line_error(f"{p}: ", "corrupt", unchanged=tmp_path) as info:
        read(p)
    assert len(str(info.value)) < 400  # uproot's object dumps are cut short


@pytest.mark.parametrize("read", READERS)
def test_corrupt_ttree_metadata_gives_a_short_line(read, tmp_path, jets_file):
    data = bytearray(copy_as_ttree(jets_file, tmp_path / "tt.root").read_bytes())
    data[2000:3500] = bytes(1500)  # zero the TTree's streamed metadata
    p = tmp_path / "zeroed.root"
    p.write_bytes(bytes(data))
    with one_line_error(f"{p}: truncated or corrupt ROOT file", unchanged=tmp_path) as info:
        read(p)
    assert len(str(info.value)) < 400


def test_official_ttree_format_reads_back(tmp_path, jets_file):
    tt = copy_as_ttree(jets_file, tmp_path / "tt.root")
    assert isinstance(uproot.open(tt)["tree"], uproot.TTree)
    assert ak.all(read_jetclass(tt).part.px == read_jetclass(jets_file).part.px)


@pytest.mark.parametrize("read", READERS)
def test_wrong_tree_name_lists_what_is_there(read, tmp_path, jets_file):
    p = copy_as_ttree(jets_file, tmp_path / "events.root", tree="Events")
    with one_line_error(f"{p}: no TTree named 'tree' (found: Events)", unchanged=tmp_path):
        read(p)


@pytest.mark.parametrize("branch", ["part_energy", "part_pz"])
@pytest.mark.parametrize("read", READERS)
def test_missing_part_branch_in_ttree(read, tmp_path, jets_file, branch):
    p = copy_as_ttree(jets_file, tmp_path / "nobranch.root", drop=(branch,))
    with one_line_error(f"{p}: missing branch {branch} in tree 'tree'", unchanged=tmp_path):
        read(p)


@pytest.mark.parametrize("read", READERS)
def test_missing_or_inconsistent_labels(read, tmp_path, jets_file):
    p = copy_as_ttree(jets_file, tmp_path / "nolabel.root",
                      drop=tuple(b for b in uproot.open(jets_file)["tree"].keys() if b.startswith("label_")))
    with one_line_error(f"{p}: no label_* branches", unchanged=tmp_path):
        read(p)

    def two_labels(b):
        b["label_QCD"] = np.ones(len(b["label_QCD"]), np.float32)  # t→bqq' and QCD at once
    q = copy_as_ttree(jets_file, tmp_path / "twolabels.root", edit=two_labels)
    with one_line_error(f"{q}: 12 jets do not have exactly one label_* set", unchanged=tmp_path):
        read(q)


def _edit_constituent(branch, jet, value):
    def edit(b):
        vals = ak.to_list(b[branch])
        vals[jet][0] = value
        b[branch] = ak.values_astype(ak.Array(vals), np.float32)
    return edit


@pytest.mark.parametrize("branch,value", [("part_energy", np.inf), ("part_py", np.nan), ("part_pz", -np.inf)])
@pytest.mark.parametrize("read", READERS)
def test_non_finite_constituents_name_branch_and_entry(read, tmp_path, jets_file, branch, value):
    p = copy_as_ttree(jets_file, tmp_path / "bad.root", edit=_edit_constituent(branch, 5, value))
    with one_line_error(f"{p}: branch {branch} contains 1 NaN/inf values (first in entry 5)",
                        unchanged=tmp_path):
        read(p)


def test_non_finite_jet_field_in_a_later_chunk_names_the_global_entry(tmp_path, jets_file):
    def edit(b):
        pt = np.asarray(b["jet_pt"]).copy()
        pt[9] = np.nan
        b["jet_pt"] = pt
    p = copy_as_ttree(jets_file, tmp_path / "nanpt.root", edit=edit)
    with one_line_error(f"{p}: branch jet_pt contains 1 NaN/inf values (first in entry 9)", unchanged=tmp_path):
        list(iter_jetclass(p, step_size=4))  # entry 9 sits in the third chunk


@pytest.mark.parametrize("read", READERS)
def test_empty_jet_in_a_file_is_an_error_naming_the_entry(read, tmp_path, jets_file):
    def edit(b):
        keep = np.arange(len(b["part_px"])) != 7
        for k in [k for k in b if k.startswith("part_")]:
            b[k] = ak.where(keep, b[k], b[k][:, :0])  # entry 7 keeps no constituents
    p = copy_as_ttree(jets_file, tmp_path / "empty.root", edit=edit)
    assert ak.num(uproot.open(p)["tree"]["part_px"].array())[7] == 0
    with one_line_error(f"{p}: 1 jets have no constituents (first: entry 7)", unchanged=tmp_path):
        read(p)


def test_writing_an_empty_jet_is_refused_and_the_old_file_survives(tmp_path):
    good = random_jets()
    out = write_jetclass(tmp_path / "jets.root", good)
    part = good.part
    empty = ak.concatenate([part[:3], part[3:4][:, :0], part[4:]])  # jet 3 without constituents
    bad = make_jets(empty, 8)
    with one_line_error(f"{out}: refusing to write: 1 jets have no constituents (first: entry 3)", unchanged=tmp_path):
        write_jetclass(out, bad)
    assert len(read_jetclass(out)) == len(good)


def test_more_than_128_constituents_are_clipped_by_pt_with_a_log(tmp_path, caplog):
    jets = random_jets(6, min_n=20, max_n=40)
    rng = np.random.default_rng(3)
    pt = np.sort(rng.exponential(10, 150) + 1)[::-1]
    v = vector.zip({"pt": pt, "eta": rng.normal(0.5, 0.1, 150), "phi": rng.normal(1.0, 0.1, 150), "mass": 0 * pt})
    one = {k: ak.unflatten(np.asarray(getattr(v, k)), [150]) for k in ("px", "py", "pz", "E")}
    big = make_jets(vector.zip(one), 8)
    jets = ak.concatenate([jets[:2], big, jets[2:]])
    read = read_jetclass(write_jetclass(tmp_path / "big.root", jets))
    assert ak.num(read.part)[2] == 150  # reading keeps every constituent
    feats = constituent_features(read)
    with caplog.at_level(logging.INFO, logger="omnijet_lib.data.features"):
        x, mask = to_padded(feats)
    assert [r.getMessage() for r in caplog.records] == [
        "clipped 1 jets with more than 128 constituents to the 128 hardest"]
    assert mask[2].sum() == 128 and x.shape == (7, 128, 3)
    hardest = np.sort(ak.to_numpy(feats[2][:, 0]))[::-1][:128]
    assert np.allclose(x[2, :, 0], hardest)  # the 128 hardest, pT-ordered


# ------------------------------------------------------------------------ names and sizes
@pytest.mark.parametrize("read", READERS)
def test_unknown_class_names(read, tmp_path, jets_file):
    with one_line_error("unknown jet class 'Higgs'; known: QCD, Hbb", unchanged=tmp_path):
        read(jets_file, classes=["Tbqq", "Higgs"])
    with one_line_error("class index 10 out of range 0..9"):
        class_index(10)
    assert class_index("tbqq") == 8  # case-insensitive short labels still work


@pytest.mark.parametrize("call,fragment", [
    (lambda f: read_jetclass(f, max_jets=-1), "max_jets must be >= 0, got -1"),
    (lambda f: load_padded(f, max_jets=-1), "max_jets must be >= 0, got -1"),
    (lambda f: load_padded(f, max_len=0), "max_len must be positive, got 0"),
    (lambda f: load_padded(f, chunk=0), "chunk must be positive, got 0"),
    (lambda f: list(iter_jetclass(f, step_size=0)), "step_size must be positive, got 0"),
    (lambda f: to_padded(constituent_features(read_jetclass(f)), max_len=-5), "max_len must be positive, got -5"),
])
def test_negative_sizes(tmp_path, jets_file, call, fragment):
    with one_line_error(fragment, unchanged=tmp_path):
        call(jets_file)


def test_non_finite_features_cannot_become_four_vectors():
    x = np.zeros((2, 4, 3), np.float32)
    x[1, 0, 0] = np.nan
    with one_line_error("features contain NaN/inf values"):
        features_to_p4((x, np.ones((2, 4), bool)))


# ------------------------------------------------------------------------------ checkpoints
@dataclass
class TinyConfig:
    width: int = 8
    n_out: int = 2


class TinyNet(torch.nn.Module):
    def __init__(self, config: TinyConfig | None = None):
        super().__init__()
        self.config = config or TinyConfig()
        self.lin = torch.nn.Linear(3, self.config.width)
        self.out = torch.nn.Linear(self.config.width, self.config.n_out)


class OtherNet(TinyNet):
    pass


@dataclass
class RenamedConfig:  # a later version of TinyConfig: `width` became `hidden`
    hidden: int = 8
    n_out: int = 2


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    return save_model(tmp_path / "tiny.safetensors", TinyNet(), num_codes=512)


def test_corrupt_safetensors(tmp_path, tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    cases = {
        "random.safetensors": np.random.default_rng(0).bytes(300),
        "cut.safetensors": data[: len(data) // 2],                     # header promises more bytes
        "header.safetensors": (10**9).to_bytes(8, "little") + data[8:],  # absurd header length
        "empty.safetensors": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for name in cases:
        with one_line_error(f"{tmp_path / name}: not a valid safetensors checkpoint", unchanged=tmp_path):
            load_checkpoint(tmp_path / name)
        with one_line_error(f"{tmp_path / name}: not a valid safetensors checkpoint", unchanged=tmp_path):
            load_model(tmp_path / name, TinyNet, TinyConfig)


def test_bad_checkpoint_metadata_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"config": "{not json"})
    with one_line_error(f"{p}: checkpoint config metadata is not valid JSON", unchanged=tmp_path):
        load_checkpoint(p)
    with one_line_error(f"{tmp_path / 'gone.safetensors'}: checkpoint not found", unchanged=tmp_path):
        load_model(tmp_path / "gone.safetensors", TinyNet, TinyConfig)


def test_config_mismatches_are_named(tmp_path, tiny_ckpt):
    with one_line_error(f"{tiny_ckpt}: width is 8 in the checkpoint but 16 is expected", unchanged=tmp_path):
        load_model(tiny_ckpt, TinyNet, TinyConfig, width=16)
    # values saved next to the config (save_model kwargs), e.g. a tokenizer's codebook size
    with one_line_error(f"{tiny_ckpt}: num_codes is 512 in the checkpoint but 8192 is expected", unchanged=tmp_path):
        load_model(tiny_ckpt, TinyNet, TinyConfig, num_codes=8192)
    with one_line_error(f"{tiny_ckpt}: vocab_size is not recorded in the checkpoint", unchanged=tmp_path):
        load_model(tiny_ckpt, TinyNet, TinyConfig, vocab_size=8194)
    with one_line_error(f"{tiny_ckpt}: holds a TinyNet, expected a OtherNet", unchanged=tmp_path):
        load_model(tiny_ckpt, OtherNet, TinyConfig)
    with one_line_error(f"{tiny_ckpt}: saved config does not fit RenamedConfig", "width", unchanged=tmp_path):
        load_model(tiny_ckpt, TinyNet, RenamedConfig)
    model, _ = load_model(tiny_ckpt, TinyNet, TinyConfig, width=8, num_codes=512)  # the right one loads
    assert model.config == TinyConfig()


def test_weights_that_do_not_fit_the_saved_config(tmp_path):
    wide = TinyNet(TinyConfig(width=16))
    p = save_checkpoint(tmp_path / "edited.safetensors", dict(wide.state_dict()),
                        {"class": "TinyNet", "config": {"width": 8, "n_out": 2}})
    with one_line_error(f"{p}: tensor shapes differ from the config", "lin.weight", unchanged=tmp_path):
        load_model(p, TinyNet, TinyConfig)


# ------------------------------------------------------------------------------- download
def test_download_md5_mismatch_removes_bad_file_and_keeps_good_one(tmp_path, http_dir, monkeypatch):
    served, base = http_dir
    good, bad = b"good archive " * 1000, b"tampered archive " * 1000
    (served / "good.tar").write_bytes(good)
    (served / "bad.tar").write_bytes(bad)
    monkeypatch.setitem(dl.ARCHIVE_MD5, "good.tar", hashlib.md5(good).hexdigest())
    monkeypatch.setitem(dl.ARCHIVE_MD5, "bad.tar", hashlib.md5(b"what Zenodo published").hexdigest())
    dest = tmp_path / "dest"
    kept = dl.download_archive("good.tar", dest, base_url=base, progress=False)
    with one_line_error(f"{dest / 'bad.tar'}: md5 {hashlib.md5(bad).hexdigest()} does not match the published",
                        "the file was removed"):
        dl.download_archive("bad.tar", dest, base_url=base, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["good.tar"]  # no bad file, no partial, no temp
    assert kept.read_bytes() == good


def test_download_into_a_file(tmp_path, http_dir):
    served, base = http_dir
    (served / "x.tar").write_bytes(b"x")
    (tmp_path / "dest").write_text("a file, not a folder")
    with one_line_error(f"{tmp_path / 'dest'}: cannot create the download folder, a file is in the way",
                        unchanged=tmp_path):
        dl.download_archive("x.tar", tmp_path / "dest", md5="0" * 32, base_url=base, progress=False)


# --------------------------------------------------------------------------------- outputs
def test_output_whose_parent_is_a_file(tmp_path):
    (tmp_path / "results").write_text("I am a file")
    target = tmp_path / "results" / "sub" / "jets.root"
    msg = f"{target}: cannot write, {tmp_path / 'results'} is a file, not a directory"
    with one_line_error(msg, unchanged=tmp_path):
        write_jetclass(target, random_jets())
    with one_line_error(msg.replace("jets.root", "m.json"), unchanged=tmp_path):
        write_json(target.with_name("m.json"), {"a": 1})
    with one_line_error(msg.replace("jets.root", "w.safetensors"), unchanged=tmp_path):
        save_checkpoint(target.with_name("w.safetensors"), {"w": torch.zeros(3)})


def test_write_into_a_directory_path(tmp_path):
    d = tmp_path / "figures"
    d.mkdir()
    (d / "keep.png").write_bytes(b"png")
    with one_line_error(f"{d}: is a directory, expected a file path", unchanged=tmp_path):
        write_json(d, {"a": 1})
    with one_line_error(f"{d}: is a directory, expected a file path", unchanged=tmp_path):
        with atomic_path(d) as tmp:
            tmp.write_text("never")
    with one_line_error(f"{d}: is a directory, expected a file path", unchanged=tmp_path):
        write_jetclass(d, random_jets())


def test_unserialisable_metrics_leave_old_json(tmp_path):
    p = write_json(tmp_path / "metrics.json", {"auc": 0.5})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(p, {"auc": object()})
    assert json.loads(p.read_text()) == {"auc": 0.5}
    assert [q.name for q in tmp_path.iterdir()] == ["metrics.json"]
