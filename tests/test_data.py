import awkward as ak
import numpy as np
import pytest
import uproot
import vector

from omnijet_lib.data import (
    CLASS_NAMES, class_index, constituent_features, features_to_p4, iter_jetclass, load_padded, make_jets,
    padded_to_jagged, read_jetclass, to_padded, write_jetclass,
)
from omnijet_lib.data import jetclass
from omnijet_lib.data.loading import _entry_ranges
from omnijet_lib.io import OmnijetError
from omnijet_lib.observables import jet_mass


def random_jets(n=20, label=8, seed=0, max_n=30):
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, max_n, n)
    pt = ak.unflatten(np.sort(rng.exponential(30, counts.sum()))[::-1] + 1, counts)
    pt = ak.sort(pt, axis=1, ascending=False)
    eta = ak.unflatten(rng.normal(0.5, 0.2, counts.sum()), counts)
    phi = ak.unflatten(rng.normal(1.0, 0.2, counts.sum()), counts)
    v = vector.zip({"pt": pt, "eta": eta, "phi": phi, "mass": pt * 0})
    return make_jets(vector.zip({"px": v.px, "py": v.py, "pz": v.pz, "E": v.E}), label)


def test_real_sample_has_500_jets_in_10_classes(real_jets):
    assert len(real_jets) == 500
    assert set(np.unique(ak.to_numpy(real_jets.label))) == set(range(10))
    assert len(CLASS_NAMES) == 10
    assert real_jets.part.mass.ndim == 2  # vector behaviour


def test_read_filters_and_caps(real_path):
    tops = read_jetclass(real_path, classes=["Tbqq"])
    assert len(tops) > 0 and np.all(ak.to_numpy(tops.label) == 8)
    assert len(read_jetclass(real_path, max_jets=7)) == 7
    chunks = list(iter_jetclass(real_path, step_size=100))
    assert sum(len(c) for c in chunks) == 500 and len(chunks) == 5


def test_write_read_round_trip_and_glob(tmp_path, real_jets):
    write_jetclass(tmp_path / "a.root", real_jets[:100])
    write_jetclass(tmp_path / "b.root", real_jets[100:150])
    back = read_jetclass(str(tmp_path / "*.root"))
    assert len(back) == 150
    assert ak.all(back.part.px[:100] == real_jets.part.px[:100])
    assert np.array_equal(ak.to_numpy(back.label[:100]), ak.to_numpy(real_jets.label[:100]))
    assert not list(tmp_path.glob("*.part"))


def test_written_deta_follows_jetclass_convention(tmp_path, real_path, real_jets):
    write_jetclass(tmp_path / "x.root", real_jets)
    ours = uproot.open(tmp_path / "x.root")["tree"]["part_deta"].array()
    theirs = uproot.open(real_path)["tree"]["part_deta"].array()
    assert ak.max(abs(ours - theirs)) < 0.05


def test_features_padding_and_inverse(real_jets):
    feats = constituent_features(real_jets)
    x, mask = to_padded(feats)
    assert x.shape == (500, 128, 3) and x.dtype == np.float32 and mask.dtype == bool
    assert np.all(np.abs(x[mask][:, 1:]) < 2.4)          # |rel| < 0.8, times 3
    pt = x[..., 0]
    assert np.all(np.where(mask[:, 1:], np.diff(pt, axis=1) <= 1e-6, True))  # pT ordered
    assert np.all(x[~mask] == 0)
    back = padded_to_jagged(x, mask)
    assert ak.all(ak.num(back) == ak.num(feats))
    m_rec = jet_mass(features_to_p4((x, mask)))
    m_orig = jet_mass(real_jets)
    # only the |rel|>=0.8 cut changes anything: most jets keep their mass to < 1%
    assert np.median(np.abs(m_rec - m_orig) / m_orig) < 0.01


def test_clipping_keeps_hardest():
    feats = ak.Array([np.stack([np.linspace(5, 0, 200), np.zeros(200), np.zeros(200)], 1).astype(np.float32)])
    x, mask = to_padded(feats, max_len=128)
    assert mask.sum() == 128 and x[0, 0, 0] == 5.0


def test_unknown_class_and_errors(tmp_path):
    assert class_index("Tbqq") == 8 and class_index("TTBar") == 8 and class_index(3) == 3
    with pytest.raises(OmnijetError, match="unknown jet class"):
        class_index("Higgs")
    with pytest.raises(OmnijetError, match="file not found"):
        read_jetclass(tmp_path / "missing.root")
    (tmp_path / "junk.root").write_text("not root")
    with pytest.raises(OmnijetError, match="not a readable ROOT file"):
        read_jetclass(tmp_path / "junk.root")


def test_wrong_branch_and_tree_names(tmp_path):
    jets = random_jets()
    write_jetclass(tmp_path / "ok.root", jets)
    arrays = uproot.open(tmp_path / "ok.root")["tree"].arrays()
    with uproot.recreate(tmp_path / "renamed.root") as f:
        f["tree"] = {("part_pX" if k == "part_px" else k): arrays[k] for k in arrays.fields
                     if k not in ("part_deta", "part_dphi")}
    with pytest.raises(OmnijetError, match=r"renamed.root: missing branch part_px"):
        read_jetclass(tmp_path / "renamed.root")
    with uproot.recreate(tmp_path / "tree.root") as f:
        f["Events"] = {"x": np.zeros(3)}
    with pytest.raises(OmnijetError, match="no TTree named 'tree'"):
        read_jetclass(tmp_path / "tree.root")


def test_nan_and_truncated_files(tmp_path):
    jets = random_jets()
    write_jetclass(tmp_path / "ok.root", jets)
    data = (tmp_path / "ok.root").read_bytes()
    (tmp_path / "trunc.root").write_bytes(data[: len(data) // 2])
    with pytest.raises(OmnijetError, match="trunc.root"):
        read_jetclass(tmp_path / "trunc.root")
    px = ak.to_list(jets.part.px)
    px[3][1] = float("nan")
    bad = make_jets(vector.zip({"px": px, "py": jets.part.py, "pz": jets.part.pz, "E": jets.part.E}), 8)
    with pytest.raises(OmnijetError, match="nan.root: refusing to write: branch part_px contains 1 NaN/inf"):
        write_jetclass(tmp_path / "nan.root", bad)
    assert not (tmp_path / "nan.root").exists()
    arrays = uproot.open(tmp_path / "ok.root")["tree"].arrays()  # the same file written behind its back
    branches = {k: arrays[k] for k in arrays.fields}
    branches["part_px"] = ak.values_astype(ak.Array(px), np.float32)
    with uproot.recreate(tmp_path / "nan.root") as f:
        f.mktree("tree", branches, counter_name=lambda c: "part_n" if c.startswith("part_") else f"n{c}")
    with pytest.raises(OmnijetError, match="nan.root: branch part_px contains 1 NaN/inf"):
        read_jetclass(tmp_path / "nan.root")


@pytest.fixture
def basketed_file(tmp_path, real_jets, monkeypatch):
    """The real sample rewritten in baskets of 64 jets (the official files have many baskets)."""
    monkeypatch.setattr(jetclass, "BASKET_JETS", 64)
    f = write_jetclass(tmp_path / "baskets.root", real_jets)
    assert uproot.open(f)["tree"]["part_px"].num_baskets == 8
    return f


@pytest.mark.parametrize("kwargs", [{}, {"workers": 2}, {"workers": 2, "chunk": 100}, {"chunk": 1}])
def test_load_padded_equals_read_features_pad(basketed_file, real_jets, kwargs):
    x, mask, labels = load_padded(basketed_file, **kwargs)
    ref_x, ref_mask = to_padded(constituent_features(real_jets))
    assert np.array_equal(x, ref_x) and np.array_equal(mask, ref_mask)
    assert np.array_equal(labels, ak.to_numpy(real_jets.label)) and labels.dtype == np.int32


def test_load_padded_selects_classes_and_caps_across_files(basketed_file, real_path):
    files = [basketed_file, real_path]
    for classes, max_jets, max_len in [(["Tbqq", "QCD"], 70, 128), (None, 530, 20), ([3], None, 128)]:
        jets = read_jetclass(files, classes=classes, max_jets=max_jets)
        ref_x, ref_mask = to_padded(constituent_features(jets), max_len=max_len)
        x, mask, labels = load_padded(files, classes=classes, max_jets=max_jets, max_len=max_len,
                                      workers=2, chunk=64)
        assert np.array_equal(x, ref_x) and np.array_equal(mask, ref_mask)
        assert np.array_equal(labels, ak.to_numpy(jets.label))


def test_load_chunks_follow_basket_edges(basketed_file):
    tree = uproot.open(basketed_file)["tree"]
    edges = set(tree["part_px"].entry_offsets)
    for chunk, expect in [(1, 8), (64, 8), (65, 4), (100, 4), (10_000, 1)]:
        ranges = _entry_ranges(tree, chunk)
        assert len(ranges) == expect
        assert ranges[0][0] == 0 and ranges[-1][1] == 500
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
        assert all(start in edges and stop in edges for start, stop in ranges)  # no basket read twice


def test_load_padded_names_the_global_entry_of_a_nan(tmp_path, real_jets, monkeypatch, write_unchecked):
    monkeypatch.setattr(jetclass, "BASKET_JETS", 64)
    px = ak.to_numpy(ak.flatten(real_jets.part.px)).copy()
    counts = ak.to_numpy(ak.num(real_jets.part, axis=1))
    px[counts[:300].sum()] = np.nan  # first constituent of jet 300, in the fifth basket
    p = real_jets.part
    bad = make_jets(vector.zip({"px": ak.unflatten(px, counts), "py": p.py, "pz": p.pz, "E": p.E}),
                    ak.to_numpy(real_jets.label))
    f = write_unchecked(tmp_path / "nan.root", bad)
    with pytest.raises(OmnijetError, match=r"branch part_px contains 1 NaN/inf values \(first in entry 300\)"):
        load_padded(f, workers=2, chunk=64)
