"""The vector quantizer: loss, gradients (β placement, synchronised straight-through, affine
codebook), dead-code replacement, masking, chunked search and k-means initialisation."""

import pytest
import torch

from omnijet_lib.tokenizers import VectorQuantizer, kmeans, nearest_code


def make_vq(**kw):
    torch.manual_seed(0)
    args = dict(dim=3, num_codes=16, beta=0.9, sync_nu=1.0, affine_lr=2.0, replace_freq=1000, kmeans_init=False)
    args.update(kw)
    return VectorQuantizer(**args)


def brute_nearest(z, codes):
    return torch.cdist(z.double(), codes.double()).argmin(1)


def test_api_and_shapes():
    vq = VectorQuantizer(dim=4, num_codes=8192, beta=0.9, sync_nu=1.0, affine_lr=2.0, replace_freq=10, kmeans_init=True)
    assert isinstance(vq.codebook, torch.nn.Embedding) and vq.codebook.weight.shape == (8192, 4)
    assert vq.effective_codebook().shape == (8192, 4)
    vq.eval()
    z = torch.randn(2, 5, 4)
    out = vq(z)
    assert out.z_q.shape == (2, 5, 4) and out.indices.shape == (2, 5) and out.loss.dim() == 0
    assert out.indices.dtype == torch.long


def test_loss_value_and_nearest_code():
    vq = make_vq()
    z = torch.randn(50, 3)
    out = vq(z)
    codes = vq.effective_codebook().detach()
    assert torch.equal(out.indices, brute_nearest(z, codes))
    assert torch.allclose(out.z_q, codes[out.indices])
    # both terms have the value mean((z - z_q)^2) over every scalar; (1-β) + β = 1
    assert out.loss.item() == pytest.approx(((z - codes[out.indices]) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.9, 0.25])
def test_beta_weights_the_codebook_term(beta):
    vq = make_vq(beta=beta)
    z = torch.randn(40, 3, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    zq = vq.effective_codebook().detach()[out.indices]
    nd = z.numel()
    # encoder (commitment) gradient carries 1-β, codebook gradient carries β
    assert torch.allclose(z.grad, (1 - beta) * 2 * (z.detach() - zq) / nd, atol=1e-6)
    swapped = beta * 2 * (z.detach() - zq) / nd
    assert not torch.allclose(z.grad, swapped, atol=1e-6)
    g_codes = torch.zeros(16, 3).index_add_(0, out.indices, beta * 2 * (zq - z.detach()) / nd)
    assert torch.allclose(vq.codebook.weight.grad, g_codes, atol=1e-6)  # (1 + lr·s) = 1 at start


@pytest.mark.parametrize("nu", [1.0, 0.5])
def test_synchronised_straight_through_gradients(nu):
    vq = make_vq(sync_nu=nu)
    z = torch.randn(30, 3, requires_grad=True)
    w = torch.randn(30, 3)
    out = vq(z)
    assert torch.allclose(out.z_q, vq.effective_codebook()[out.indices], atol=1e-6)  # value is z_q
    (out.z_q * w).sum().backward()
    assert torch.allclose(z.grad, w)                                     # straight through to z
    expect = torch.zeros(16, 3).index_add_(0, out.indices, nu * w)       # ν·grad to the codebook
    assert torch.allclose(vq.codebook.weight.grad, expect, atol=1e-6)


def test_affine_codebook():
    vq = make_vq(affine_lr=2.0)
    assert torch.count_nonzero(vq.affine_scale) == 0 and torch.count_nonzero(vq.affine_bias) == 0
    C = vq.codebook.weight.detach().clone()
    assert torch.allclose(vq.effective_codebook(), C)
    with torch.no_grad():
        vq.affine_scale.copy_(torch.tensor([0.1, -0.2, 0.3]))
        vq.affine_bias.copy_(torch.tensor([1.0, 2.0, -3.0]))
    s, b = vq.affine_scale.detach(), vq.affine_bias.detach()
    Cp = (1 + 2.0 * s) * C + 2.0 * b
    assert torch.allclose(vq.effective_codebook(), Cp)
    # the search and z_q use C', not C
    z = Cp[[3, 7, 11]] + 1e-3
    out = vq(z)
    assert out.indices.tolist() == [3, 7, 11]
    assert torch.allclose(out.z_q, Cp[[3, 7, 11]], atol=1e-5)

    # lr multiplies inside: one SGD step of size η on (s, b) moves C' by η·lr²·grad
    vq = make_vq(affine_lr=2.0)
    vq.codebook.weight.requires_grad_(False)
    C = vq.codebook.weight.detach().clone()
    G = torch.randn(16, 3)
    before = vq.effective_codebook().detach()
    (vq.effective_codebook() * G).sum().backward()
    assert torch.allclose(vq.affine_scale.grad, 2.0 * (G * C).sum(0), atol=1e-5)
    assert torch.allclose(vq.affine_bias.grad, 2.0 * G.sum(0), atol=1e-5)
    eta = 0.01
    torch.optim.SGD([vq.affine_scale, vq.affine_bias], lr=eta).step()
    moved = vq.effective_codebook().detach() - before
    assert torch.allclose(moved, -eta * 4.0 * ((G * C).sum(0) * C + G.sum(0)), atol=1e-5)


def test_dead_code_replacement():
    vq = make_vq(dim=2, num_codes=8, replace_freq=3)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0]] + [[10.0 + k, 10.0 + k] for k in range(1, 8)]))
    original = vq.codebook.weight.detach().clone()
    # 20 real latents near code 0; padded slots sit exactly on code 5 and at 1e4
    z = torch.zeros(2, 15, 2)
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[:, :10] = True
    z[mask] = 0.05 * torch.randn(20, 2)
    z[:, 10:12] = original[5]
    z[:, 12:] = 1e4

    vq.eval()  # eval mode: no counting, no replacement
    for _ in range(5):
        vq(z, mask)
    assert torch.equal(vq.code_counter, torch.full((8,), 3))
    assert torch.equal(vq.codebook.weight, original)

    vq.train()
    vq(z, mask)  # one batch of 20 latents counts once
    assert vq.code_counter.tolist() == [3] + [2] * 7
    vq(z, mask)
    assert vq.code_counter.tolist() == [3] + [1] * 7   # code 5 is not "used" by padding
    assert torch.equal(vq.codebook.weight, original)
    vq(z, mask)  # third unused batch: codes 1..7 are replaced by real batch latents + noise
    new = vq.codebook.weight.detach()
    assert torch.equal(new[0], original[0])
    assert (new[1:].norm(dim=1) < 1.0).all()            # near the real latents, never padding
    assert torch.equal(vq.code_counter, torch.full((8,), 3))
    real = z[mask]
    d = torch.cdist(new[1:], real).min(1).values
    assert (d < 0.05).all()                              # a batch latent + 0.01·‖z‖ noise


def test_replace_freq_zero_disables_replacement():
    """vqtorch's convention: replace_freq=0 means no dead-code replacement, ever."""
    vq = make_vq(dim=2, num_codes=8, replace_freq=0).train()
    original = vq.codebook.weight.detach().clone()
    z = 0.05 * torch.randn(4, 6, 2)  # all near one code: 7 codes unused on every batch
    for _ in range(30):
        vq(z)
    assert torch.equal(vq.codebook.weight, original)
    with pytest.raises(ValueError, match="replace_freq"):
        make_vq(replace_freq=-1)


def test_padding_in_statistics_when_unmasked():
    """mask=None (the official behaviour): padding latents at 0 are quantized, counted as use
    and enter the loss, which is then a mean over every slot."""
    vq = make_vq(dim=2, num_codes=4, replace_freq=2).train()
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [9.0, 9.0]]))
    z = torch.zeros(1, 4, 2)
    z[0, :2] = torch.tensor([1.1, 0.9])
    mask = torch.tensor([[True, True, False, False]])
    out_all, out_real = vq(z), make_vq(dim=2, num_codes=4, replace_freq=2)(z, mask)
    assert out_all.indices.tolist() == [[1, 1, 0, 0]]
    assert vq.code_counter.tolist() == [2, 2, 1, 1]          # code 0 used by the padding
    per_slot = ((z - vq.effective_codebook()[out_all.indices]) ** 2).mean()
    assert out_all.loss.item() == pytest.approx(per_slot.item(), rel=1e-5)
    assert out_real.indices.tolist()[0][2:] == [-1, -1]


def test_dead_code_counter_resets_on_use():
    vq = make_vq(dim=2, num_codes=4, replace_freq=2)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]]))
    vq.train()
    vq(torch.tensor([[0.1, 0.0], [5.1, 5.0]]))
    assert vq.code_counter.tolist() == [2, 2, 1, 1]
    vq(torch.tensor([[0.1, 0.0], [-5.0, 5.1]]))
    assert vq.code_counter.tolist()[:3] == [2, 1, 2] and vq.code_counter[3] == 2  # 3 replaced and reset


def test_padding_does_not_change_outputs_or_loss():
    vq = make_vq()
    vq.eval()
    z = torch.randn(4, 9, 3)
    mask = torch.rand(4, 9) > 0.4
    z2 = z.clone()
    z2[~mask] = 100 * torch.randn(int((~mask).sum()), 3)
    a, b = vq(z, mask), vq(z2, mask)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.z_q, b.z_q)
    assert a.loss.item() == b.loss.item()
    assert (a.indices[~mask] == -1).all() and (a.z_q[~mask] == 0).all()
    # the loss is the mean over real entries only
    real = z[mask]
    codes = vq.effective_codebook().detach()
    assert a.loss.item() == pytest.approx(((real - codes[brute_nearest(real, codes)]) ** 2).mean().item(), rel=1e-5)
    # no gradient reaches padded latents
    zg = z.clone().requires_grad_(True)
    out = vq(zg, mask)
    (out.loss + out.z_q.sum()).backward()
    assert (zg.grad[~mask] == 0).all() and (zg.grad[mask] != 0).any()


def test_chunked_search_equals_full_search():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3000, 4, generator=g)
    codes = torch.randn(257, 4, generator=g)
    full = nearest_code(z, codes, chunk_elements=None)
    for chunk in (1, 1000, 257 * 7, 10**9):
        assert torch.equal(nearest_code(z, codes, chunk_elements=chunk), full)
    assert torch.equal(full, brute_nearest(z, codes))
    a, b = make_vq(dim=4, num_codes=257), make_vq(dim=4, num_codes=257, chunk_elements=500)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(z).indices, b(z).indices)


def test_kmeans_init_from_first_training_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z = (centres[torch.arange(400) % 4] + 0.1 * torch.randn(400, 2))
    vq = VectorQuantizer(dim=2, num_codes=4, kmeans_init=True, replace_freq=10)
    before = vq.codebook.weight.detach().clone()
    vq.eval()
    vq(z)  # eval mode: no initialisation
    assert torch.equal(vq.codebook.weight, before) and not bool(vq.initialised)
    found = False
    for seed in range(5):  # Lloyd's algorithm can land in a local minimum for some starts
        torch.manual_seed(seed)
        vq = VectorQuantizer(dim=2, num_codes=4, kmeans_init=True, replace_freq=10).train()
        vq(z)
        C = vq.effective_codebook().detach()
        d = torch.cdist(centres, C).min(1).values
        if (d < 0.1).all():
            found = True
            break
    assert found and bool(vq.initialised)
    C0 = vq.codebook.weight.detach().clone()
    vq(z + 5.0)  # only the first batch initialises
    assert torch.allclose(vq.codebook.weight, C0)


def test_kmeans_more_codes_than_latents_and_padding_excluded():
    torch.manual_seed(0)
    z = torch.randn(2, 10, 4)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :3] = True
    z[~mask] = 1e4
    vq = VectorQuantizer(dim=4, num_codes=64, kmeans_init=True).train()
    vq(z, mask)
    C = vq.codebook.weight.detach()
    assert torch.isfinite(C).all() and C.abs().max() < 100  # padding never becomes a code
    assert len(torch.unique(C, dim=0)) == 64
    c = kmeans(z[mask], 2, iters=5)
    assert c.shape == (2, 4)
