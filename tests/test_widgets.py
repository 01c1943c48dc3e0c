"""TokenExplorer behaviour: widget changes move the figure's artists and images; bad input is a
message in the widget, not an exception. A tiny untrained conditional VQ-VAE on toy jets."""

import numpy as np
import pytest
import torch

from omnijet_lib.io import OmnijetError
from conftest import randomise_
from omnijet_lib.training.vqvae import make_tokenizer
from omnijet_lib.widgets import TokenExplorer, cached_blobs, parse_token_ids

K = 16


def toy_padded(n=24, max_len=12, seed=0):
    """Padded scaled features (pT ordered), mask and labels of two classes (0 and 8)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, max_len, 3), np.float32)
    mask = np.zeros((n, max_len), bool)
    for i in range(n):
        m = rng.integers(3, max_len + 1)
        x[i, :m, 0] = np.sort(rng.normal(1.0, 1.0, m))[::-1]
        x[i, :m, 1:] = rng.normal(0, 0.4, (m, 2))
        mask[i, :m] = True
    labels = np.where(np.arange(n) % 2 == 0, 0, 8)
    return x, mask, labels


@pytest.fixture(scope="module")
def explorer():
    torch.manual_seed(0)
    tok = randomise_(make_tokenizer("conditional", K, hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16)).eval()
    return TokenExplorer(tok, toy_padded(), n_samples=20, n_context=5, seed=0)


def offsets(explorer, panel=2):
    return np.asarray(explorer.token_handles["scatter"][panel].get_offsets()).copy()


def test_blobs_are_cached_per_tokenizer(explorer):
    b = cached_blobs(explorer.tokenizer, 20, 5, 0)
    assert b is cached_blobs(explorer.tokenizer, 20, 5, 0)      # decoded once
    assert b.shape == (K, 20, 3) and explorer.blobs.shape == (K, 20, 3)
    assert (explorer.blob_std > 0).all()                         # conditional: context moves the decoding


def test_token_slider_moves_highlighted_blob(explorer):
    explorer.token_slider.value = 3
    before, img = offsets(explorer), explorer.token_image.value
    np.testing.assert_allclose(before, explorer.blobs_phys[3][:, [1, 2]])
    explorer.token_slider.value = 7
    assert explorer.selected_ids == [7] and explorer.token_text.value == "7"
    np.testing.assert_allclose(offsets(explorer), explorer.blobs_phys[7][:, [1, 2]])
    assert explorer.token_image.value != img                     # the rendered PNG changed
    assert "<b>7</b>" in explorer.token_message.value            # spread table of token 7


def test_text_box_selects_several_tokens(explorer):
    explorer.token_text.value = "2, 5 11"
    assert explorer.selected_ids == [2, 5, 11] and explorer.token_slider.value == 2
    assert len(offsets(explorer)) == 3 * 20
    assert len(explorer.token_handles["labels"]) == 3 * 3         # one id label per blob and panel
    assert all(f"<b>{t}</b>" in explorer.token_message.value for t in (2, 5, 11))
    assert explorer.spread_text().count("σ(pT)") == 3


@pytest.mark.parametrize("text, needle", [("99", "out of range"), ("abc", "not a token id"), ("", "no token id"),
                                          ("-1", "out of range")])
def test_invalid_token_id_is_a_message(explorer, text, needle):
    explorer.token_text.value = "4"
    img, ids = explorer.token_image.value, explorer.selected_ids
    explorer.token_text.value = text                             # no exception
    assert needle in explorer.token_message.value and "Invalid" in explorer.token_message.value
    assert needle in explorer.message
    assert explorer.selected_ids == ids and explorer.token_image.value == img
    explorer.token_text.value = "4, 6"                           # a valid entry clears the message
    assert explorer.message == "" and "Invalid" not in explorer.token_message.value


def test_parse_token_ids_limits():
    assert parse_token_ids(" 1;2, 2 ,3 ", 10) == [1, 2, 3]
    with pytest.raises(OmnijetError, match="at most 2"):
        parse_token_ids("1 2 3", 10, max_ids=2)


def test_jet_selection_updates_constituents_and_observables(explorer):
    explorer.select_jet(8, 0)
    first = explorer.jet_index
    pts0 = np.asarray(explorer.jet_handles["scatter"][0].get_offsets()).copy()
    img = explorer.jet_image.value
    explorer.jet_slider.value = 1
    second = explorer.jet_index
    assert second != first and explorer.labels[second] == 8
    n = int(explorer.mask[second].sum())
    pts1 = np.asarray(explorer.jet_handles["scatter"][0].get_offsets())
    assert len(pts1) == n and not (len(pts0) == n and np.allclose(pts0, pts1))
    np.testing.assert_allclose(pts1, explorer.x[second, :n, 1:] / 3, rtol=1e-5)   # η_rel, φ_rel
    rec = np.asarray(explorer.jet_handles["scatter"][1].get_offsets())
    np.testing.assert_allclose(rec, explorer.x_rec[second, :n, 1:] / 3, rtol=1e-5)
    assert explorer.jet_image.value != img
    assert len(explorer.constituent_dropdown.options) == n + 1   # "none" + constituents
    o, r = explorer.jet_observables(second)
    assert f"{o['mass']:.3g}" in explorer.jet_message.value and f"{r['mass']:.3g}" in explorer.jet_message.value
    explorer.class_dropdown.value = 0                            # class change: back to its first jet
    assert explorer.labels[explorer.jet_index] == 0 and explorer.jet_slider.value == 0


def test_constituent_highlights_its_token_blob(explorer):
    explorer.select_jet(0, 1)
    i = explorer.jet_index
    explorer.select_constituent(2)
    token = int(explorer.tokens[i, 2])
    assert explorer.selected_ids == [token] and explorer.token_slider.value == token
    np.testing.assert_allclose(offsets(explorer), explorer.blobs_phys[token][:, [1, 2]])
    star = explorer.token_handles["orig"][2].get_data()
    np.testing.assert_allclose([star[0][0], star[1][0]], explorer.x[i, 2, 1:] / 3, rtol=1e-5)
    ring = explorer.jet_handles["ring"][0].get_data()
    np.testing.assert_allclose([ring[0][0], ring[1][0]], explorer.x[i, 2, 1:] / 3, rtol=1e-5)
    explorer.select_constituent(None)
    assert len(explorer.token_handles["orig"][2].get_data()[0]) == 0


def test_snapshot_and_widget(explorer, tmp_path):
    import ipywidgets

    assert isinstance(explorer.widget, ipywidgets.VBox)
    explorer.select_tokens([1, 2])
    explorer.snapshot(tmp_path / "snap")
    assert (tmp_path / "snap.png").stat().st_size > 10_000 and (tmp_path / "snap.pdf").is_file()


def test_rejects_bad_input(explorer):
    with pytest.raises(OmnijetError, match="tuple"):
        TokenExplorer(explorer.tokenizer, (np.zeros((2, 3, 3)), np.ones((2, 3), bool)))
    with pytest.raises(OmnijetError, match="blobs"):
        TokenExplorer(explorer.tokenizer, toy_padded(4), blobs=np.zeros((K + 1, 2, 3)))
    with pytest.raises(OmnijetError, match="no index"):
        explorer.select_jet(8, 999)
