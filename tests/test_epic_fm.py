"""EPiC-FM: network masking/equivariance, flow-matching training, EMA, sampling, checkpoints."""

import numpy as np
import pytest
import torch

from omnijet_lib.io import OmnijetError
from omnijet_lib.models.epic_fm import EPiCConfig, EPiCNet, cosine_time_embedding
from omnijet_lib.training.epic_fm import (
    CHECKPOINT_NAME, EPiCFlowMatching, flow_matching_loss, load_epic_fm, sample, train_epic_fm,
)

TINY = EPiCConfig(hidden=16, latent=4, n_layers=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_jets(n=200, max_len=24, seed=0):
    """Class 0: 3-6 constituents around pT feature 2; class 3: 10-20 around 0 (scaled features)."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < 0.5, 0, 3)
    mult = np.where(labels == 0, rng.integers(3, 7, n), rng.integers(10, 21, n))
    x = np.zeros((n, max_len, 3), np.float32)
    mask = np.arange(max_len)[None] < mult[:, None]
    centre = np.where(labels == 0, 2.0, 0.0)[:, None, None]
    x[mask] = (rng.normal(size=(n, max_len, 3)) * 0.3 + centre)[mask]
    jet_pt = np.where(labels == 0, 550.0, 900.0) + rng.normal(0, 10, n)
    jet_eta = rng.uniform(-2, 2, n)
    return x, mask, labels, jet_pt.astype(np.float32), jet_eta.astype(np.float32)


def net_inputs(b=4, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g)
    mask = torch.arange(n)[None] < torch.tensor([12, 5, 1, 8])[:b, None]
    t = torch.rand(b, generator=g)
    cond = torch.cat([torch.nn.functional.one_hot(torch.tensor([0, 3, 9, 1])[:b], 10).float(),
                      torch.randn(b, 2, generator=g)], 1)
    return x, t, cond, mask


def test_configs():
    assert (EPiCConfig.jetclass().n_layers, EPiCConfig.jetclass().hidden, EPiCConfig.jetclass().latent) == (20, 300, 16)
    assert (EPiCConfig.light().n_layers, EPiCConfig.light().hidden, EPiCConfig.light().latent) == (6, 128, 10)
    emb = cosine_time_embedding(torch.tensor([0.0, 0.5, 1.0]), 32)
    assert emb.shape == (3, 32) and torch.allclose(emb[0], torch.ones(32))


def test_weight_norm_used():
    net = EPiCNet(TINY)
    names = [n for n, _ in net.named_parameters()]
    assert any("parametrizations.weight.original0" in n for n in names)  # magnitude g
    assert not any(n.endswith(".weight") for n in names)


def test_shapes_and_padding_does_not_leak():
    torch.manual_seed(0)
    net = EPiCNet(TINY)
    x, t, cond, mask = net_inputs()
    v = net(x, t, cond, mask)
    assert v.shape == x.shape
    assert torch.all(v[~mask] == 0)
    # garbage (even NaN) in padded slots changes nothing for real points
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 3) * 1e3
    x2[1, -1] = float("nan")
    v2 = net(x2, t, cond, mask)
    assert torch.allclose(v[mask], v2[mask], atol=1e-6)
    assert torch.isfinite(v2).all()
    # more padding (a longer batch) gives the same result for the real points
    x3 = torch.cat([x, torch.randn(4, 7, 3)], 1)
    mask3 = torch.cat([mask, torch.zeros(4, 7, dtype=torch.bool)], 1)
    assert torch.allclose(net(x3, t, cond, mask3)[:, :12][mask], v[mask], atol=1e-5)


def test_output_depends_on_other_points_and_condition():
    torch.manual_seed(0)
    net = EPiCNet(TINY)
    x, t, cond, mask = net_inputs()
    v = net(x, t, cond, mask)
    x2 = x.clone()
    x2[0, 3] += 1.0  # move one real point of jet 0: the others must feel it through the global vector
    assert not torch.allclose(net(x2, t, cond, mask)[0, :3], v[0, :3])
    assert not torch.allclose(net(x, t + 0.3, cond, mask)[mask], v[mask])
    cond2 = cond.clone()
    cond2[:, 10] += 1.0
    assert not torch.allclose(net(x, t, cond2, mask)[mask], v[mask])


def test_permutation_equivariance():
    torch.manual_seed(0)
    net = EPiCNet(TINY)
    x, t, cond, mask = net_inputs()
    perm = torch.randperm(x.shape[1])
    v = net(x, t, cond, mask)
    vp = net(x[:, perm], t, cond, mask[:, perm])
    assert torch.allclose(vp, v[:, perm], atol=1e-5)


def test_flow_matching_loss_decreases():
    x, mask, labels, jet_pt, jet_eta = toy_jets(256)
    torch.manual_seed(0)
    module = EPiCFlowMatching(EPiCConfig(hidden=32, latent=4, n_layers=2), max_len=x.shape[1])
    module.fit_statistics(x, mask, labels, jet_pt, jet_eta)
    batch = {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask), "label": torch.from_numpy(labels),
             "jet_pt": torch.from_numpy(jet_pt), "jet_eta": torch.from_numpy(jet_eta)}

    def eval_loss():
        with torch.no_grad():
            x1 = module.standardise(batch["x"], batch["mask"])
            cond = module.condition(batch["label"], batch["jet_pt"], batch["jet_eta"])
            g = torch.Generator().manual_seed(123)
            return float(np.mean([flow_matching_loss(module.net, x1, batch["mask"], cond, generator=g)
                                  for _ in range(8)]))

    before = eval_loss()
    opt = module.configure_optimizers()
    for _ in range(150):
        opt.zero_grad()
        module._loss(batch).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_standardisation_ignores_padding():
    x, mask, labels, jet_pt, jet_eta = toy_jets(100)
    x[~mask] = 99.0
    module = EPiCFlowMatching(TINY, max_len=x.shape[1])
    module.fit_statistics(x, mask, labels, jet_pt, jet_eta)
    assert np.allclose(module.feat_mean.numpy(), x[mask].mean(0), atol=1e-5)
    assert np.allclose(module.feat_std.numpy(), x[mask].std(0), atol=1e-5)
    z = module.standardise(torch.from_numpy(x), torch.from_numpy(mask))
    assert torch.all(z[~torch.from_numpy(mask)] == 0)
    assert torch.allclose(z[torch.from_numpy(mask)].mean(0), torch.zeros(3), atol=1e-4)
    # the official EPiC-FM's width: data std 5 against unit noise
    assert module.data_std == 5.0
    assert torch.allclose(z[torch.from_numpy(mask)].std(0, unbiased=False), torch.full((3,), 5.0), atol=1e-3)
    back = module.unstandardise(z, torch.from_numpy(mask))
    assert torch.allclose(back[torch.from_numpy(mask)], torch.from_numpy(x)[torch.from_numpy(mask)], atol=1e-5)
    with pytest.raises(OmnijetError, match="data_std must be positive"):
        EPiCFlowMatching(TINY, data_std=0.0)


def test_checkpoint_keeps_data_std_and_older_ones_load_at_unit_width(tmp_path):
    from omnijet_lib.io import load_checkpoint, save_checkpoint
    from omnijet_lib.training.epic_fm import save_epic_fm

    module = EPiCFlowMatching(TINY, data_std=3.0)
    save_epic_fm(tmp_path / "new.safetensors", module)
    assert load_epic_fm(tmp_path / "new.safetensors").data_std == 3.0
    tensors, meta = load_checkpoint(tmp_path / "new.safetensors")
    meta.pop("data_std")  # written before data_std existed: trained on unit-width features
    save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    assert load_epic_fm(tmp_path / "old.safetensors").data_std == 1.0


def test_ema_update():
    torch.manual_seed(0)
    module = EPiCFlowMatching(TINY)
    ema0 = [p.clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.update_ema()  # first update: d = min(0.999, 1/10) = 0.1
    for pe, p0, p in zip(module.ema.parameters(), ema0, module.net.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p, atol=1e-6)
    assert int(module.ema_updates) == 1
    module.ema_updates.fill_(10_000)  # late in training: d = 0.999
    ema1 = [p.clone() for p in module.ema.parameters()]
    module.update_ema()
    for pe, p1, p in zip(module.ema.parameters(), ema1, module.net.parameters()):
        assert torch.allclose(pe, 0.999 * p1 + 0.001 * p, atol=1e-6)
    # the optimiser only sees the live network
    opt_params = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.ema.parameters()}


def fitted_module(seed=0):
    x, mask, labels, jet_pt, jet_eta = toy_jets(300, seed=seed)
    torch.manual_seed(seed)
    module = EPiCFlowMatching(TINY, max_len=x.shape[1])
    module.fit_statistics(x, mask, labels, jet_pt, jet_eta)
    return module, (x, mask, labels, jet_pt, jet_eta)


def test_sampler_deterministic_with_seeded_generator():
    module, _ = fitted_module()
    a = sample(module, 20, labels=3, steps=4, batch_size=8, generator=torch.Generator().manual_seed(1))
    b = sample(module, 20, labels=3, steps=4, batch_size=8, generator=torch.Generator().manual_seed(1))
    c = sample(module, 20, labels=3, steps=4, batch_size=8, generator=torch.Generator().manual_seed(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    x, mask = a
    assert x.shape == (20, 24, 3) and x.dtype == np.float32 and mask.dtype == bool
    assert np.all(x[~mask] == 0) and np.isfinite(x).all()
    # constituents pT-ordered, padding at the end
    n = mask.sum(1)
    assert np.array_equal(mask, np.arange(24)[None] < n[:, None])
    for xi, ni in zip(x, n):
        assert np.all(np.diff(xi[:ni, 0]) <= 0)


def test_solver_and_batching_do_not_change_jets_beyond_noise_order():
    module, _ = fitted_module()
    kw = dict(labels=0, n_constituents=5, jet_pt=600.0, jet_eta=0.1, steps=3)
    # same draws, same batch composition: euler differs from midpoint
    e = sample(module, 6, solver="euler", generator=torch.Generator().manual_seed(0), **kw)
    m = sample(module, 6, solver="midpoint", generator=torch.Generator().manual_seed(0), **kw)
    assert e[1].sum() == m[1].sum() == 30 and not np.allclose(e[0], m[0])
    with pytest.raises(OmnijetError, match="solver"):
        sample(module, 2, solver="rk45", **kw)
    with pytest.raises(OmnijetError, match="steps"):
        sample(module, 2, labels=0, steps=0)


def test_multiplicity_drawn_per_class():
    module, (x, mask, labels, _, _) = fitted_module()
    g = torch.Generator().manual_seed(0)
    xs, ms = sample(module, 400, labels=np.r_[np.zeros(200, int), np.full(200, 3)], steps=1, batch_size=128,
                    generator=g)
    n = ms.sum(1)
    assert set(n[:200]) <= set(range(3, 7)) and set(n[200:]) <= set(range(10, 21))
    # frequencies follow the training histogram of the class
    train = np.bincount(mask[labels == 3].sum(1), minlength=25) / (labels == 3).sum()
    gen = np.bincount(n[200:], minlength=25) / 200
    assert np.abs(train - gen).max() < 0.1
    # conditions default to training (pT, η) pairs of the same class: class 0 has pT ≈ 550
    stats = {}
    module.cond_pool[:, 1] = torch.where(module.cond_pool[:, 0] == 0, 550.0, 900.0)
    sample(module, 5, labels=0, steps=1, generator=g, stats=stats)
    assert stats["jets_per_s"] > 0
    with pytest.raises(OmnijetError, match="class 5"):
        sample(module, 3, labels=5, steps=1)
    with pytest.raises(OmnijetError, match="labels"):
        sample(module, 3, labels=10, steps=1)
    # unlabelled: classes drawn with the training frequencies (only 0 and 3 exist)
    _, m2 = sample(module, 50, steps=1, generator=g)
    assert m2.sum(1).min() >= 3


def test_condition_pool_same_class():
    module, _ = fitted_module()
    pool = module.cond_pool.numpy()
    assert set(np.unique(pool[:, 0])) == {0.0, 3.0}
    assert np.all(np.abs(pool[pool[:, 0] == 0, 1] - 550) < 60)


def test_train_checkpoint_round_trip_and_resume(tmp_path):
    x, mask, labels, jet_pt, jet_eta = toy_jets(96)
    from omnijet_lib.training import TrainConfig

    tc = TrainConfig(progress_bar=False, accelerator="cpu", devices=1)
    module = train_epic_fm(x, mask, labels, jet_pt, jet_eta, tmp_path, config=TINY, epochs=1, batch_size=32,
                           train_config=tc)
    assert (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "last.ckpt").is_file()
    steps1 = int(module.ema_updates)
    assert steps1 == 3
    loaded = load_epic_fm(tmp_path / CHECKPOINT_NAME)
    for a, b in zip(module.ema.state_dict().values(), loaded.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(module.mult_hist, loaded.mult_hist)
    kw = dict(labels=3, steps=2, generator=None)
    s1 = sample(module, 10, **{**kw, "generator": torch.Generator().manual_seed(0)})
    s2 = sample(loaded, 10, **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert np.array_equal(s1[0], s2[0]) and np.array_equal(s1[1], s2[1])
    # a rerun with more epochs resumes from last.ckpt: the EMA counter continues
    module2 = train_epic_fm(x, mask, labels, jet_pt, jet_eta, tmp_path, config=TINY, epochs=2, batch_size=32,
                            train_config=tc)
    assert int(module2.ema_updates) == 2 * steps1
    assert int(load_epic_fm(tmp_path / CHECKPOINT_NAME).ema_updates) == 2 * steps1


def test_the_store_trains_once_and_again_only_for_a_changed_setting(tmp_path):
    """Notebook 04's EPiC-FM: before the store, one found on disk was used whatever its settings."""
    from omnijet_lib.training import TrainConfig
    from omnijet_lib.training.epic_fm import ensure_epic_fm
    from omnijet_lib.training.store import ModelStore

    x, mask, labels, jet_pt, jet_eta = toy_jets(64)
    store, tc = ModelStore(tmp_path, progress=lambda m: None), TrainConfig(progress_bar=False, accelerator="cpu")
    kw = dict(config=TINY, epochs=1, batch_size=32, train_config=tc)
    args = ("epic_fm_top", {"toy": 64}, x, mask, labels, jet_pt, jet_eta)
    a, run_a = ensure_epic_fm(store, *args, **kw)
    b, run_b = ensure_epic_fm(store, *args, **kw)
    assert run_a.trained and not run_b.trained and run_a.path == run_b.path
    assert all(torch.equal(p, q) for p, q in zip(a.ema.state_dict().values(), b.ema.state_dict().values()))
    c, run_c = ensure_epic_fm(store, *args, **{**kw, "epochs": 2})  # changed setting: a new run, the old stays
    assert run_c.trained and run_c.path != run_a.path and (run_a.path / CHECKPOINT_NAME).is_file()
    assert int(c.ema_updates) == 2 * int(a.ema_updates)
    x2 = x.copy()
    x2[0, 0, 0] += 0.5  # other jets: another run
    assert ensure_epic_fm(store, "epic_fm_top", {"toy": 64}, x2, mask, labels, jet_pt, jet_eta, **kw)[1].trained


def test_bad_inputs(tmp_path):
    x, mask, labels, jet_pt, jet_eta = toy_jets(10)
    with pytest.raises(OmnijetError, match="labels"):
        train_epic_fm(x, mask, labels + 10, jet_pt, jet_eta, tmp_path, config=TINY, epochs=1)
    with pytest.raises(OmnijetError, match="jet_pt"):
        train_epic_fm(x, mask, labels, jet_pt[:5], jet_eta, tmp_path, config=TINY, epochs=1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OmnijetError, match="bad.safetensors"):
        load_epic_fm(bad)


def test_inference_net_matches_ema():
    from omnijet_lib.training.epic_fm import _inference_net

    module, _ = fitted_module()
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t, cond, mask = net_inputs()
    with torch.no_grad():
        assert torch.allclose(_inference_net(module)(x, t, cond, mask), module.ema(x, t, cond, mask), atol=1e-5)
    assert any("parametrizations" in n for n, _ in module.ema.named_parameters())  # original untouched


def test_resume_with_other_config_is_refused(tmp_path):
    from omnijet_lib.training import TrainConfig

    x, mask, labels, jet_pt, jet_eta = toy_jets(64)
    tc = TrainConfig(progress_bar=False, accelerator="cpu", devices=1)
    train_epic_fm(x, mask, labels, jet_pt, jet_eta, tmp_path, config=TINY, epochs=1, batch_size=32, train_config=tc)
    other = EPiCConfig(hidden=8, latent=4, n_layers=1)
    with pytest.raises(OmnijetError, match="last.ckpt"):
        train_epic_fm(x, mask, labels, jet_pt, jet_eta, tmp_path, config=other, epochs=2, batch_size=32,
                      train_config=tc)
