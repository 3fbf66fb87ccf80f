"""NT-Xent against the paper's formula, and LARS parameter groups."""

import math

import pytest
import torch
import torch.nn.functional as F

from simclr_path import NTXentLoss
from simclr_path.models import SimCLRModel
from simclr_path.optim import build_optimizer, build_scheduler, param_groups


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


def test_lars_groups_hold_exactly_biases_and_norm_parameters():
    model = SimCLRModel("resnet18", head_hidden=64, head_out=16)
    groups = param_groups(model, weight_decay=1e-6)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    expected_no_decay = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)) or param_name == "bias":
                expected_no_decay.add(f"{module_name}.{param_name}")
    assert no_decay == expected_no_decay
    assert decay == set(names.values()) - expected_no_decay
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[0]["weight_decay"] == 1e-6 and groups[1]["weight_decay"] == 0.0


def test_lars_adapts_weights_but_not_biases_or_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, lr=0.5, momentum=0.9, weight_decay=1e-6, trust_coeff=0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 4)).pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("0.bias", "1.weight", "1.bias"):  # plain SGD step: lr * grad
        torch.testing.assert_close(model.get_parameter(name), before[name] - 0.5 * grads[name])
    w, g = before["0.weight"], grads["0.weight"] + 1e-6 * before["0.weight"]
    trust = 0.001 * w.norm() / g.norm()
    torch.testing.assert_close(model.get_parameter("0.weight"), w - 0.5 * trust * g)


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=1.0)
    sched = build_scheduler(opt, total_steps=110, warmup_steps=10)
    lrs = []
    for step in range(111):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5, abs=1e-6)
    assert lrs[110] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
