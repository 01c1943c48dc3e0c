"""``omnijet generate``: generated jets in a JetClass-schema ROOT file and their tokens beside it;
top-k and top-p sampling in GPT.generate."""

import json

import awkward as ak
import numpy as np
import pytest
import torch

from omnijet_lib.cli import main
from omnijet_lib.data.jetclass import read_jetclass, write_jetclass_chunks
from omnijet_lib.data.shards import TokenShardDataset, read_shard
from omnijet_lib.data.validate import check_jets
from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import sample_tokens
from omnijet_lib.studies.generation import decode_generated, generate_to_root, generated_label
from omnijet_lib.training.gpt import open_backbone
from test_gpt import SMALL, greedy_sequence, small_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

def _backbone(tiny_store):
    return f"{tiny_store}/gpt_combined"


def _generate(capsys, *args):
    """(exit status, stdout, stderr) of ``omnijet generate ARGS``."""
    status = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def _arrays(path):
    jets = read_jetclass(path)
    return {"px": ak.to_numpy(ak.flatten(jets.part.px)), "E": ak.to_numpy(ak.flatten(jets.part.E)),
            "n": ak.to_numpy(ak.num(jets.part, axis=1)), **{k: ak.to_numpy(jets[k]) for k in jets.fields if k != "part"}}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- the command
def test_generate_a_class_with_a_class_conditional_backbone(tiny_store, tmp_path, capsys):
    cond = f"{tiny_store}/gpt_all_conditional"
    jets = {}
    for name in ("Hbb", "Tbl"):
        out = tmp_path / f"{name}.root"
        status, _, stderr = _generate(capsys, "--backbone", cond, "--class", name, "-n", 200, "--out", out, "--seed", 1)
        assert status == 0, stderr
        jets[name] = read_jetclass(out)
        assert json.loads((tmp_path / f"{name}.tokens" / "manifest.json").read_text())["class"] == name
    assert np.all(ak.to_numpy(jets["Hbb"].label) == 1) and np.all(ak.to_numpy(jets["Tbl"].label) == 9)
    # the same uniforms, another class token: other jets
    assert not np.array_equal(ak.to_numpy(jets["Hbb"].jet_nparticles), ak.to_numpy(jets["Tbl"].jet_nparticles))
    for backbone, cls, msg in [(_backbone(tiny_store), "Hbb", "trained without classes"),
                               (cond, "Hbq", "unknown class; known: QCD, Hbb")]:
        status, _, stderr = _generate(capsys, "--backbone", backbone, "--class", cls, "-n", 5, "--out", tmp_path / "x.root")
        assert status == 1 and msg in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.root").exists()


def test_generate_writes_n_jets_that_read_back_with_their_tokens(tiny_store, tmp_path, capsys):
    out = tmp_path / "g.root"
    status, stdout, stderr = _generate(capsys, "--backbone", _backbone(tiny_store), "-n", 1000, "--out", out,
                                       "--seed", 3, "--batch-size", 128)
    assert status == 0, stderr
    assert stdout.split() == [str(out), str(tmp_path / "g.tokens")]
    assert "1000 jets" in stderr and "jets/s" in stderr and "generate: 1,000/1,000 jets" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.root", "g.tokens"]  # no temp files left
    jets = read_jetclass(out)
    check_jets(out, jets)  # what every reader requires
    n = ak.to_numpy(ak.num(jets.part, axis=1))
    assert len(jets) == 1000 and n.min() >= 1 and n.std() > 1
    assert np.all(ak.to_numpy(jets.label) == 0)  # gpt_combined: several classes, label QCD
    # the jet branches are the constituents' 4-vector sum and their N-subjettiness
    s = ak.sum(jets.part, axis=1)
    np.testing.assert_allclose(jets.jet_pt, s.pt, rtol=1e-4)
    np.testing.assert_allclose(jets.jet_energy, s.E, rtol=1e-4)
    np.testing.assert_array_equal(jets.jet_nparticles, n)
    assert np.all(ak.to_numpy(jets.jet_tau1)[n >= 2] > 0) and np.all(ak.to_numpy(jets.jet_tau2) <= jets.jet_tau1)
    # the tokens: one shard row per jet in tree order, readable by the shard readers, decoding to the jets
    man = json.loads((tmp_path / "g.tokens" / "manifest.json").read_text())
    assert man["complete"] and man["jets"] == 1000 and man["root"] == "g.root" and man["seed"] == 3
    assert len(man["shards"]) == 2  # 1000 jets drawn first, then more for the empty ones
    parts = [read_shard(tmp_path / "g.tokens" / s["name"]) for s in man["shards"]]
    shard = {k: np.concatenate([d[k] for d in parts]) for k in ("tokens", "counts", "labels", "entry")}
    np.testing.assert_array_equal(shard["counts"], n)
    np.testing.assert_array_equal(shard["entry"], np.arange(1000))
    np.testing.assert_array_equal(shard["labels"], 0)
    assert TokenShardDataset(tmp_path / "g.tokens", batch_size=100).num_jets == 1000
    bb = open_backbone(_backbone(tiny_store))
    codes = np.full((10, n[:10].max()), -1)
    codes[np.arange(codes.shape[1]) < n[:10, None]] = shard["tokens"][:n[:10].sum()]
    seq, seq_mask = bb.tokenizer.to_sequence(codes)
    x, m = decode_generated(bb.tokenizer, np.where(seq_mask, seq, 0))
    pt = np.exp(x[..., 0][m] + 1.8)
    np.testing.assert_allclose(pt, ak.to_numpy(ak.flatten(jets.part[:10].pt)), rtol=1e-4)


def test_same_seed_same_jets_another_seed_other_jets_top_k_1_every_seed_the_same(tiny_store, tmp_path, capsys):
    runs = {"a": (1, None), "b": (1, None), "c": (2, None), "greedy1": (1, 1), "greedy2": (2, 1)}
    arrays = {}
    for name, (seed, top_k) in runs.items():
        extra = ["--top-k", top_k] if top_k else []
        status, _, stderr = _generate(capsys, "--backbone", _backbone(tiny_store), "-n", 200,
                                      "--out", tmp_path / f"{name}.root", "--seed", seed, *extra)
        assert status == 0, stderr
        arrays[name] = _arrays(tmp_path / f"{name}.root")
    assert _same(arrays["a"], arrays["b"])
    assert not np.array_equal(arrays["a"]["n"], arrays["c"]["n"])
    assert _same(arrays["greedy1"], arrays["greedy2"])
    assert np.all(arrays["greedy1"]["jet_pt"] == arrays["greedy1"]["jet_pt"][0])  # greedy: one jet, 200 times
    assert (tmp_path / "a.tokens" / "generated_00000.npz").read_bytes() == \
        (tmp_path / "b.tokens" / "generated_00000.npz").read_bytes()


def test_chunks_do_not_change_the_sequences_and_empty_jets_are_replaced(tiny_store, tmp_path):
    bb = open_backbone(_backbone(tiny_store))
    kw = dict(seed=5, batch_size=16, progress=lambda m: None)
    one = generate_to_root(bb, 150, tmp_path / "one.root", chunk=10_000, **kw)
    many = generate_to_root(bb, 150, tmp_path / "many.root", chunk=40, **kw)  # 3 batches of 16 per chunk
    assert one["empty"] > 0 and one["generated"] >= 150 + one["empty"]  # stop drawn first: dropped, redrawn
    tokens = [next(iter(TokenShardDataset(tmp_path / f"{name}.tokens", batch_size=150, shuffle=False)))
              for name in ("one", "many")]
    assert torch.equal(tokens[0]["x"], tokens[1]["x"])  # the same sequences, exactly
    # the tokenizer decodes each chunk in its own length batches: the same jets up to float rounding
    a, b = _arrays(tmp_path / "one.root"), _arrays(tmp_path / "many.root")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert len(json.loads((tmp_path / "many.tokens" / "manifest.json").read_text())["shards"]) >= 4


@pytest.mark.parametrize("args, message", [
    (["--top-k", 0], "top_k must be in 1..17"),
    (["--top-k", 18], "top_k must be in 1..17"),
    (["--top-p", 0], "top_p must be a number in \\(0, 1\\], got 0.0"),
    (["--top-p", 1.5], "top_p must be a number in \\(0, 1\\]"),
    (["-n", -1], "n_jets must be an integer >= 1, got -1"),
    (["-n", 0], "n_jets must be an integer >= 1"),
    (["--temperature", 0], "temperature must be a number > 0"),
    (["--batch-size", 0], "batch_size must be an integer >= 1"),
    (["--backbone", "no/such/run"], "--backbone no/such/run: no such run folder"),
    (["--out", "missing/g.root"], "folder .*missing does not exist"),
    (["--out", "g.txt"], "must be a .root file"),
    (["--device", "gpu7"], "--device 'gpu7': not a device"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(tiny_store, tmp_path, capsys, monkeypatch, args, message):
    import re

    monkeypatch.chdir(tmp_path)
    opts = {"--backbone": _backbone(tiny_store), "-n": 20, "--out": "g.root"}
    for flag, value in zip(args[::2], args[1::2]):
        opts[flag] = value
    status, stdout, stderr = _generate(capsys, *[x for kv in opts.items() for x in kv])
    assert status == 1 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and re.search(message, stderr), stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite_and_an_interrupted_run_leaves_it(tiny_store, tmp_path, capsys):
    out = tmp_path / "g.root"
    base = ["--backbone", _backbone(tiny_store), "-n", 30, "--out", out]
    assert _generate(capsys, *base)[0] == 0
    before = out.read_bytes(), (tmp_path / "g.tokens" / "generated_00000.npz").read_bytes()
    status, _, stderr = _generate(capsys, *base, "--seed", 1)
    assert status == 1 and "g.root exists; pass --overwrite" in stderr
    assert out.read_bytes() == before[0]
    # interrupted after its first chunk: the old files stay, no temp folder is left
    bb = open_backbone(_backbone(tiny_store))

    def interrupt(msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_to_root(bb, 30, out, seed=1, batch_size=10, chunk=10, overwrite=True, progress=interrupt)
    assert out.read_bytes() == before[0]
    assert (tmp_path / "g.tokens" / "generated_00000.npz").read_bytes() == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.root", "g.tokens"]
    # --overwrite replaces both
    assert _generate(capsys, *base, "--seed", 1, "--overwrite")[0] == 0
    assert out.read_bytes() != before[0]
    assert (tmp_path / "g.tokens" / "generated_00000.npz").read_bytes() != before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.root", "g.tokens"]


def test_generated_label_is_the_single_training_class(tmp_path):
    for classes, label in ((["Tbqq"], 8), (["QCD", "Tbqq"], 0), (None, 0)):
        (tmp_path / "run.json").write_text(json.dumps({"data": {"source": {"classes": classes}}}))
        assert generated_label(tmp_path) == label


def test_chunked_writer_equals_one_write_and_a_failing_chunk_leaves_no_file(tiny_store, tmp_path):
    jets = read_jetclass(generate_to_root(open_backbone(_backbone(tiny_store)), 40, tmp_path / "g.root",
                                          progress=lambda m: None)["out"])
    write_jetclass_chunks(tmp_path / "chunks.root", (jets[i:i + 15] for i in range(0, 40, 15)))
    assert _same(_arrays(tmp_path / "g.root"), _arrays(tmp_path / "chunks.root"))

    def broken():
        yield jets[:10]
        yield ak.with_field(jets[10:20], np.full(10, np.nan, np.float32), "jet_pt")  # the check refuses it

    with pytest.raises(OmnijetError, match="broken.root: refusing to write: branch jet_pt contains 10 NaN"):
        write_jetclass_chunks(tmp_path / "broken.root", broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks.root", "g.root", "g.tokens"]


# ---------------------------------------------------------------------------- top-k sampling
def test_top_k_1_is_greedy_decoding_whatever_the_generator():
    model = small_gpt(seed=3)
    seq, mask = model.generate(6, top_k=1, generator=torch.Generator().manual_seed(0), max_constituents=12)
    other, _ = model.generate(6, top_k=1, generator=torch.Generator().manual_seed(9), max_constituents=12)
    assert np.array_equal(seq, other) and np.all(seq == seq[0])
    greedy = greedy_sequence(model, 12)
    assert len(greedy) > 3 and seq[0][mask[0]].tolist() == greedy


def test_top_k_draws_among_the_k_most_probable_tokens_renormalised():
    from scipy import stats

    model = small_gpt(stop_bias=0.5, seed=1)
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, dtype=torch.long))[0, 0, 1:]  # first step, start excluded
    k, n = 4, 20_000
    best = torch.topk(logits, k).indices.numpy()
    seq, _ = model.generate(n, batch_size=n, top_k=k, generator=torch.Generator().manual_seed(1), max_constituents=1)
    counts = np.bincount(seq[:, 1] - 1, minlength=len(logits))
    assert set(np.flatnonzero(counts)) == set(best)  # every one of the k, nothing else
    p = torch.softmax(logits[best].double(), 0).numpy()
    assert stats.chisquare(counts[best], n * p).pvalue > 1e-3


def test_top_k_of_every_token_is_no_filter_and_reference_agrees():
    model = small_gpt(stop_bias=-0.5)
    kw = dict(n_jets=40, batch_size=16, max_constituents=20)
    free, _ = model.generate(generator=torch.Generator().manual_seed(3), **kw)
    every, _ = model.generate(generator=torch.Generator().manual_seed(3), top_k=SMALL.vocab_size - 1, **kw)
    assert np.array_equal(free, every)
    top3, _ = model.generate(generator=torch.Generator().manual_seed(3), top_k=3, **kw)
    ref, _ = model.generate_reference(generator=torch.Generator().manual_seed(3), top_k=3, **kw)
    assert np.array_equal(top3, ref) and not np.array_equal(top3, free)


@pytest.mark.parametrize("top_k", [0, -1, SMALL.vocab_size, 2.5, True, "3"])
def test_bad_top_k_is_refused(top_k):
    with pytest.raises(OmnijetError, match="generate: top_k must be"):
        small_gpt().generate(2, top_k=top_k)


# ---------------------------------------------------------------------------- top-p (nucleus) sampling
P4 = np.array([0.1, 0.4, 0.2, 0.3])  # a next-token distribution, not in probability order


def _drawn(n=1000, temperature=1.0, **kw) -> np.ndarray:
    """How often each token of P4 is drawn with evenly spaced uniforms: the counts are the
    renormalised probabilities of the candidates, times n (up to rounding)."""
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    logits = torch.log(torch.tensor(P4, dtype=torch.float32)).expand(n, -1)
    return np.bincount(sample_tokens(logits, u, temperature, **kw).numpy(), minlength=len(P4))


@pytest.mark.parametrize("top_p, nucleus", [(0.35, [1]), (0.65, [1, 3]), (0.85, [1, 3, 2]), (0.95, [1, 3, 2, 0])])
def test_top_p_draws_from_the_smallest_set_of_most_probable_tokens_reaching_p(top_p, nucleus):
    counts = _drawn(top_p=top_p)
    assert set(np.flatnonzero(counts)) == set(nucleus)
    np.testing.assert_allclose(counts[nucleus], 1000 * P4[nucleus] / P4[nucleus].sum(), atol=1)


def test_top_p_applies_after_temperature_and_top_k():
    # temperature 2 flattens P4 to ∝ sqrt(P4) = .33, .28, .23, .16: 0.65 then needs three tokens
    assert set(np.flatnonzero(_drawn(top_p=0.65))) == {1, 3}
    assert set(np.flatnonzero(_drawn(top_p=0.65, temperature=2.0))) == {1, 3, 2}
    # top_k 2 first: .4 and .3 renormalised to .57, .43; 0.95 keeps both, 0.5 the first only
    assert set(np.flatnonzero(_drawn(top_k=2, top_p=0.95))) == {1, 3}
    assert set(np.flatnonzero(_drawn(top_k=2, top_p=0.5))) == {1}


def test_tiny_top_p_is_greedy_and_top_p_1_is_no_filter_and_reference_agrees():
    model = small_gpt(seed=3)
    kw = dict(n_jets=20, batch_size=8, max_constituents=12)
    greedy, _ = model.generate(top_k=1, generator=torch.Generator().manual_seed(0), **kw)
    tiny, _ = model.generate(top_p=1e-6, generator=torch.Generator().manual_seed(5), **kw)
    assert np.array_equal(tiny, greedy)
    free, _ = model.generate(generator=torch.Generator().manual_seed(3), **kw)
    whole, _ = model.generate(top_p=1.0, generator=torch.Generator().manual_seed(3), **kw)
    assert np.array_equal(free, whole)
    half, _ = model.generate(top_p=0.5, generator=torch.Generator().manual_seed(3), **kw)
    ref, _ = model.generate_reference(top_p=0.5, generator=torch.Generator().manual_seed(3), **kw)
    assert np.array_equal(half, ref) and not np.array_equal(half, free)


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_top_p_is_refused(top_p):
    with pytest.raises(OmnijetError, match="generate: top_p must be a number in"):
        small_gpt().generate(2, top_p=top_p)


def test_generate_top_p_option_is_recorded_and_a_tiny_one_is_greedy(tiny_store, tmp_path, capsys):
    for seed in (1, 2):
        status, _, stderr = _generate(capsys, "--backbone", _backbone(tiny_store), "-n", 50, "--seed", seed,
                                      "--out", tmp_path / f"p{seed}.root", "--top-p", 1e-6)
        assert status == 0, stderr
    assert _same(_arrays(tmp_path / "p1.root"), _arrays(tmp_path / "p2.root"))
    man = json.loads((tmp_path / "p1.tokens" / "manifest.json").read_text())
    assert man["top_p"] == 1e-6 and man["top_k"] is None
