"""NT-Xent against the paper's formula and its gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from simclr_path import NTXentLoss


def naive_nt_xent(z0, z1, temperature):
    """SimCLR eq. 1 written out: 2N anchors, each against the 2N - 1 others."""
    z = torch.cat([z0, z1]).double()
    n = z0.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sim = lambda a, b: float(torch.dot(z[a], z[b]) / (z[a].norm() * z[b].norm()))  # noqa: E731
        numerator = math.exp(sim(i, j) / temperature)
        denominator = sum(math.exp(sim(i, k) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_the_paper_formula(temperature):
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    got = NTXentLoss(temperature)(z0, z1).item()
    assert got == pytest.approx(naive_nt_xent(z0, z1, temperature), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_fp32_under_autocast():
    z = torch.randn(16, 32)
    loss_fn = NTXentLoss(0.1)
    assert loss_fn(z, z + 1e-3 * torch.randn_like(z)).item() < 0.5 < loss_fn(z, torch.randn(16, 32)).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(z.bfloat16(), z.bfloat16())
    assert out.dtype == torch.float32


def test_nt_xent_gradient_matches_autograd_of_naive_formula():
    z0 = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    z1 = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    NTXentLoss(0.2)(z0, z1).backward()
    g0 = z0.grad.clone()
    z0.grad = None
    # the same loss via log-softmax over the explicit similarity matrix
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    sim = z @ z.T / 0.2
    sim = sim.masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
    target = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    F.cross_entropy(sim, target).backward()
    torch.testing.assert_close(g0.float(), z0.grad.float(), rtol=1e-4, atol=1e-6)
