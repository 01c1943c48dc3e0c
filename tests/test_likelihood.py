"""The backbone as a density: ``log_likelihood`` (exact, the sampler's own probabilities) and
``omnijet score``."""

import awkward as ak
import numpy as np
import pytest
import torch

from omnijet_lib.cli import main
from omnijet_lib.data import constituent_features
from omnijet_lib.io import OmnijetError
from omnijet_lib.models.gpt import GPT, GPTConfig, draw_uniforms, log_likelihood
from omnijet_lib.studies.finetune import jet_sequences
from omnijet_lib.training.gpt import open_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GPTConfig(vocab_size=12, n_embd=32, n_head=4, n_layer=2, ffn=64, max_len=42)  # 10 codes, stop 11


def small_gpt(seed=0, dropout=0.0):
    """A random GPT that likes the start token (never drawn: a likelihood counting it would be off)
    and stops after ~7 constituents."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL.__dict__, "dropout": dropout})).eval()
    with torch.no_grad():
        model.head.bias[0] += 2.0
        model.head.bias[-1] += 0.5
    return model


def generated(model, n=60, steps=12, seed=1):
    return model.generate(n, batch_size=16, generator=torch.Generator().manual_seed(seed), max_constituents=steps)


def test_log_likelihood_is_the_sum_of_the_samplers_step_log_probabilities():
    model, n, steps = small_gpt(), 60, 12
    seq, mask = generated(model, n, steps)
    u = draw_uniforms(n, steps, torch.Generator().manual_seed(1)).double()  # the draws generate used
    ll = log_likelihood(model, seq, mask)
    forced = 0
    for j in range(n):
        tokens = seq[j][mask[j]]
        drawn = min(len(tokens) - 1, steps)  # after max_constituents codes the stop is forced, not drawn
        sampler, forced_stop = 0.0, 0.0
        for t in range(1, len(tokens)):
            with torch.no_grad():  # the prefix recomputed without cache, softmax over the drawable ids 1..V-1
                p = torch.softmax(model(torch.tensor(tokens[None, :t]))[0, -1, 1:].double(), 0)
            k = tokens[t] - 1
            if t <= drawn:  # the sampler drew token k from p with u[j, t - 1]: p is its distribution
                cdf = torch.cumsum(p, 0)
                assert (cdf[k - 1] if k else 0.0) - 1e-6 <= u[j, t - 1] < cdf[k] + 1e-6
                sampler += float(torch.log(p[k]))
            else:
                forced_stop = float(torch.log(p[k]))
                forced += 1
        # the sampler's probability of the jet, and for a forced stop log p(stop | its constituents) on top
        assert ll["total"][j] == pytest.approx(sampler + forced_stop, abs=1e-5)
        assert ll["n_tokens"][j] == len(tokens) - 1
    assert 0 < forced < n  # both kinds of stop were checked
    assert ll["total"].dtype == np.float64 and ll["n_tokens"].dtype == np.int64
    np.testing.assert_array_equal(ll["per_token"], ll["total"] / ll["n_tokens"])
    assert np.all(ll["total"] < 0)


def test_log_likelihood_is_independent_of_order_batching_padding_and_training_mode():
    model = small_gpt(seed=2, dropout=0.5)
    seq, mask = generated(model, n=50, seed=4)
    ref = log_likelihood(model, seq, mask, batch_size=1000)
    assert not model.training
    # shuffled, padded to the model's longest sequence with junk, torch tensors, batches of 3
    order = np.random.default_rng(0).permutation(len(seq))
    wide = np.full((len(seq), SMALL.max_len), 7)
    wide_mask = np.zeros_like(wide, bool)
    wide[:, :seq.shape[1]] = np.where(mask, seq, 5)[order]
    wide_mask[:, :seq.shape[1]] = mask[order]
    model.train()
    got = log_likelihood(model, torch.from_numpy(wide), torch.from_numpy(wide_mask), batch_size=3)
    assert model.training  # the mode is restored; dropout was off while scoring
    np.testing.assert_allclose(got["total"], ref["total"][order], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got["n_tokens"], ref["n_tokens"][order])
    # one jet alone gives what it gives in a batch; another model gives other values
    one = log_likelihood(model, seq[:1], mask[:1])
    assert one["total"][0] == pytest.approx(ref["total"][0], abs=1e-5)
    assert not np.allclose(log_likelihood(small_gpt(seed=3), seq, mask)["total"], ref["total"], atol=1e-2)
    empty = log_likelihood(model, seq[:0], mask[:0])
    assert all(len(v) == 0 for v in empty.values())


def _bad(seq, mask, **kw):
    with pytest.raises(OmnijetError) as err:
        log_likelihood(small_gpt(), seq, mask, **kw)
    return str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda s, m: (s.astype(float), m), "token ids must be integers"),
    (lambda s, m: (s, m[:, :-1]), "expected \\(N, L\\) token ids and a mask of the same shape"),
    (lambda s, m: (np.pad(s, ((0, 0), (0, 40))), np.pad(m, ((0, 0), (0, 40)))), "the model allows 42"),
    (lambda s, m: (np.where(m & (s == SMALL.stop_token), 3, s), m), "must end with the stop token 11"),
    (lambda s, m: (np.where(np.arange(s.shape[1]) == 0, 4, s), m), "must begin with the start token 0"),
    (lambda s, m: (np.where(m & (s == 1), 12, s), m), "outside the vocabulary 0..11"),
    (lambda s, m: (s, m & (np.arange(s.shape[1]) < 1)), "fewer than 2 tokens"),
    (lambda s, m: (s, m & (np.arange(s.shape[1]) != 1)), "mask must be a prefix"),
])
def test_bad_sequences_are_one_line_errors(change, message):
    import re

    seq, mask = generated(small_gpt(), n=10, steps=6, seed=0)
    seq, mask = seq[mask.sum(1) >= 4], mask[mask.sum(1) >= 4]  # jets of 2 constituents or more
    seq[:, 1] = 1  # a code 0 in every jet, for the vocabulary case
    text = _bad(*change(seq, mask))
    assert text.startswith("log_likelihood: ") and "\n" not in text and re.search(message, text), text


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size_is_refused(batch_size):
    seq, mask = generated(small_gpt(), n=4)
    assert "batch_size must be an integer >= 1" in _bad(seq, mask, batch_size=batch_size)


# ---------------------------------------------------------------------------- omnijet score
def _score(capsys, *args):
    status = main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_score_writes_one_row_per_jet_in_file_order(tiny_store, real_path, real_jets, tmp_path, capsys):
    out = tmp_path / "s.npz"
    status, stdout, stderr = _score(capsys, "--backbone", tiny_store / "gpt_combined", "--in", real_path,
                                    "--out", out, "--batch-size", 64)
    assert status == 0, stderr
    assert stdout.strip() == str(out) and "500 jets scored" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    s = dict(np.load(out))
    assert sorted(s) == ["entry", "label", "log_likelihood", "n_tokens", "per_token", "source_file"]
    assert all(len(v) == 500 for v in s.values())
    np.testing.assert_array_equal(s["entry"], np.arange(500))
    assert set(s["source_file"]) == {str(real_path)}
    np.testing.assert_array_equal(s["label"], ak.to_numpy(real_jets.label))
    assert np.isfinite(s["log_likelihood"]).all() and np.all(s["log_likelihood"] < 0)
    # the constituents the tokenizer reads (the 128 hardest inside its angular window) and stop
    kept = ak.to_numpy(ak.num(constituent_features(real_jets), axis=1))
    np.testing.assert_array_equal(s["n_tokens"], np.minimum(kept, 128) + 1)
    np.testing.assert_allclose(s["per_token"], s["log_likelihood"] / s["n_tokens"])
    # each row is its jet: the same as log_likelihood on the file's sequences
    bb = open_backbone(tiny_store / "gpt_combined")
    ll = log_likelihood(bb.gpt, *jet_sequences(bb.tokenizer, real_jets))
    np.testing.assert_allclose(s["log_likelihood"], ll["total"], rtol=0, atol=1e-6)
    # parquet too, with the same rows
    status, _, stderr = _score(capsys, "--backbone", tiny_store / "gpt_combined", "--in", real_path,
                               "--out", tmp_path / "s.parquet")
    assert status == 0, stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s.parquet").to_pydict()
    np.testing.assert_allclose(table["log_likelihood"], s["log_likelihood"], rtol=0, atol=1e-6)
    assert table["entry"] == list(range(500))


@pytest.mark.parametrize("args, message", [
    (["--out", "s.csv"], "--out s.csv: write .npz or .parquet"),
    (["--out", "missing/s.npz"], "folder missing does not exist"),
    (["--batch-size", 0], "--batch-size must be positive, got 0"),
    (["--backbone", "no/such/run"], "--backbone no/such/run: no such run folder"),
    (["--backbone", "TOKENIZER"], "holds no gpt.safetensors"),
    (["--in", "nothing_*.root"], "nothing_\\*.root"),
    (["--device", "gpu7"], "--device 'gpu7': not a device"),
])
def test_score_bad_options_are_one_line_errors_and_write_nothing(tiny_store, real_path, tmp_path, capsys,
                                                                 monkeypatch, args, message):
    import re

    monkeypatch.chdir(tmp_path)
    opts = {"--backbone": tiny_store / "gpt_combined", "--in": real_path, "--out": "s.npz"}
    for flag, value in zip(args[::2], args[1::2]):
        opts[flag] = tiny_store / "tokenizer_conditional_16" if value == "TOKENIZER" else value
    status, stdout, stderr = _score(capsys, *[x for kv in opts.items() for x in kv])
    assert status == 1 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and re.search(message, stderr), stderr
    assert list(tmp_path.iterdir()) == []


def test_score_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as done:
        main(["score", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "likelihood" in text and "example:\n  omnijet score --backbone" in text
