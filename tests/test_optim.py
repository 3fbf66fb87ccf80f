"""LARS parameter groups and adaptation, the SGD alternative, and the warm-up + cosine schedule."""

import pytest
import torch

from simclr_path.models import SimCLRModel
from simclr_path.optim import build_optimizer, build_scheduler, param_groups


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


@pytest.mark.parametrize("weight_decay", [1e-6, 1e-4, 0.0])
def test_lars_adapts_weights_but_not_biases_or_norms(weight_decay):
    """Adaptation follows the group, whatever the decay: with weight_decay 0 timm's Lars would
    otherwise skip adaptation and take plain SGD steps of lr * grad on the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, lr=0.5, momentum=0.9, weight_decay=weight_decay, trust_coeff=0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 4)).pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("0.bias", "1.weight", "1.bias"):  # plain SGD step: lr * grad
        torch.testing.assert_close(model.get_parameter(name), before[name] - 0.5 * grads[name])
    w, g = before["0.weight"], grads["0.weight"] + weight_decay * before["0.weight"]
    trust = 0.001 * w.norm() / (grads["0.weight"].norm() + weight_decay * w.norm())
    torch.testing.assert_close(model.get_parameter("0.weight"), w - 0.5 * trust * g)


def test_sgd_decays_weights_only_and_never_adapts():
    """--optimizer sgd: momentum SGD on the same groups: a weight's step is lr * (grad + wd * w) with
    no trust ratio, a bias or norm parameter's lr * grad, and the second step carries momentum."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    opt = build_optimizer(model, lr=0.5, momentum=0.9, weight_decay=0.01, name="sgd")
    assert isinstance(opt, torch.optim.SGD) and [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    x = torch.randn(8, 4)
    buffers = {}
    for step in range(2):
        opt.zero_grad()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x).pow(2).sum().backward()
        for name, p in model.named_parameters():
            grad = p.grad + (0.01 * before[name] if name == "1.weight" else 0)
            assert grad.abs().max() > 1e-3  # every parameter moves, so each check below has teeth
            buffers[name] = grad if step == 0 else 0.9 * buffers[name] + grad
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name] - 0.5 * buffers[name])
    with pytest.raises(ValueError, match="adam"):
        build_optimizer(model, lr=0.5, name="adam")
    from simclr_path.cli.train_commands import pretrain
    from simclr_path.optim import OPTIMIZERS

    assert tuple(next(p for p in pretrain.params if p.name == "optimizer").type.choices) == OPTIMIZERS


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
