"""Views made on the training device (``--augment device``) draw what the albumentations pipeline draws.

Both pipelines take the same ViewConfig: each transform fires at its configured rate, independently
of the others (within 4 standard errors over >= 2,000 views), crops cover the configured area and
aspect ranges alike, and views of real PCam and CMU/TCGA patches have the same per-channel colour
statistics (the means of per-view channel means and standard deviations agree within 4 standard
errors of their difference plus 0.01, i.e. 2.5 grey levels). Device views depend only on
(seed, step, rank), not on the loader's worker count.
"""

import itertools
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from cli_helpers import assert_error, one_json, run_cli
from test_data import RATES, firings, ours

from simclr_path import PatchStore, ViewConfig
from simclr_path.data.datasets import PatchDataset
from simclr_path.data.device_views import DeviceViews, batch_seed, draw_params, resolve_augment
from simclr_path.data.loader import RunSampler, build_loader, run_batches
from simclr_path.data.views import build_transform, draw_views, sample_seed

VIEWS = 4000
CFG = ViewConfig(image_size=24, hflip_p=0.3, vflip_p=0.6, rot90_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                 he_stain_p=0.4)
FIELDS = {"hflip": "hflip_p", "vflip": "vflip_p", "rot90_fired": "rot90_p", "stain": "he_stain_p",
          "jitter": "jitter_p", "gray": "grayscale_p", "blur": "blur_p"}


def params(cfg=CFG, n=VIEWS, side=32, seed=0):
    return draw_params(cfg, n, side, torch.Generator().manual_seed(seed))


def fired_matrix(p):
    return np.stack([getattr(p, name).numpy() for name in FIELDS], 1)


def within(rate, p, n, sigmas=4.0):
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_each_device_transform_fires_at_its_configured_rate():
    fired = fired_matrix(params())
    for i, (name, field) in enumerate(FIELDS.items()):
        assert within(fired[:, i].mean(), getattr(CFG, field), VIEWS), (name, fired[:, i].mean())


def test_each_albumentations_transform_fires_at_its_configured_rate_within_4_sigma():
    names, fired, _ = firings(ours)  # tests/test_data.py's draw: 2,000 patches, two views each
    from test_data import CFG as CPU_CFG

    for name, rate in zip(names, fired.mean(0)):
        assert within(rate, getattr(CPU_CFG, RATES[name]), len(fired)), (name, rate)


def test_every_pair_of_device_transforms_fires_independently():
    fired = fired_matrix(params())
    for a, b in itertools.combinations(range(len(FIELDS)), 2):
        expected = fired[:, a].mean() * fired[:, b].mean()
        joint = (fired[:, a] & fired[:, b]).mean()
        assert within(joint, expected, VIEWS), (list(FIELDS)[a], list(FIELDS)[b], joint, expected)


def test_light_views_skip_every_photometric_transform_together():
    cfg = ViewConfig(image_size=24, light_p=0.3, he_stain_p=0.5)
    p = params(cfg)
    assert within(p.light.float().mean().item(), 0.3, VIEWS)
    for name in ("stain", "jitter", "gray", "blur"):
        assert not (getattr(p, name) & p.light).any(), name
        strong = ~p.light
        rate = getattr(p, name)[strong].float().mean().item()
        assert within(rate, getattr(cfg, FIELDS[name]), int(strong.sum())), name
    assert within(p.hflip[p.light].float().mean().item(), 0.5, int(p.light.sum()))  # geometry still fires


def crop_stats(areas, ratios):
    return np.quantile(areas, [0.01, 0.25, 0.5, 0.75, 0.99]), np.quantile(np.log(ratios), [0.01, 0.5, 0.99])


def test_crops_cover_the_configured_area_and_aspect_ranges_as_albumentations_does():
    side, cfg = 64, ViewConfig(image_size=24, crop_scale=(0.2, 0.9))
    crop = params(cfg, side=side).crop.numpy()
    width, height = crop[:, 2] - crop[:, 0], crop[:, 3] - crop[:, 1]
    area, ratio = width * height / side**2, width / height
    assert (crop[:, :2] >= 0).all() and (crop[:, 2:] <= side).all()
    assert area.min() >= 0.2 - 0.03 and area.max() <= 0.9 + 0.03  # pixel rounding
    assert area.min() < 0.22 and area.max() > 0.85  # the whole range is used
    assert ratio.min() > 0.7 and ratio.max() < 1.43 and ratio.min() < 0.78 and ratio.max() > 1.28

    transform = build_transform(cfg, record=True)
    image = np.zeros((side, side, 3), np.uint8)
    boxes = [dict(r["applied_transforms"])["RandomResizedCrop"]["crop_coords"]
             for seed in range(VIEWS // 2) for r in draw_views(transform, image, seed)]
    boxes = np.array(boxes, float)
    cpu_w, cpu_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ours_q, theirs_q = crop_stats(area, ratio), crop_stats(cpu_w * cpu_h / side**2, cpu_w / cpu_h)
    assert np.abs(ours_q[0] - theirs_q[0]).max() < 0.04, (ours_q[0], theirs_q[0])
    assert np.abs(ours_q[1] - theirs_q[1]).max() < 0.04, (ours_q[1], theirs_q[1])


def colour_statistics(patches, cfg, repeats):
    """Per-view channel means and standard deviations, (views, 6), of both pipelines."""
    transform = build_transform(cfg)
    cpu = [torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255
           for seed in range(repeats) for i, p in enumerate(patches)
           for r in draw_views(transform, p, sample_seed(seed, 0, i))]
    cpu = torch.stack(cpu)
    batch = torch.from_numpy(np.stack(patches))
    device = torch.cat([DeviceViews(cfg, seed=seed).draw(batch, step=0)[0] for seed in range(repeats)])

    def per_view(v):
        return torch.cat([v.mean((2, 3)), v.std((2, 3))], 1)

    return per_view(cpu), per_view(device)


def assert_same_colours(cpu, device):
    gap = (device.mean(0) - cpu.mean(0)).abs()
    se = (cpu.var(0) / len(cpu) + device.var(0) / len(device)).sqrt()
    assert (gap <= 4 * se + 0.01).all(), (gap, se)


@pytest.mark.parametrize("he_stain_p", [0.0, 0.5])
def test_views_of_pcam_patches_have_the_colours_of_albumentations_views(pcam, he_stain_p):
    files = sorted((pcam / "valid").glob("*/*.jpg"))[::6][:500]
    patches = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    cpu, device = colour_statistics(patches, ViewConfig(image_size=64, he_stain_p=he_stain_p), repeats=2)
    assert len(cpu) == len(device) >= 2000
    assert_same_colours(cpu, device)


def test_views_of_cmu_and_tcga_patches_have_the_colours_of_albumentations_views(real_store):
    store = PatchStore(str(real_store))
    patches = [store[i] for i in np.linspace(0, len(store) - 1, 200).astype(int)]
    cpu, device = colour_statistics(patches, ViewConfig(image_size=64, he_stain_p=0.5), repeats=5)
    assert len(cpu) >= 2000
    assert_same_colours(cpu, device)


def test_device_views_depend_on_seed_step_and_rank_only():
    patches = torch.randint(0, 256, (6, 40, 40, 3), dtype=torch.uint8)
    views = DeviceViews(ViewConfig(image_size=24, he_stain_p=0.5), seed=3)
    first = views(patches, step=7)
    assert first.shape == (12, 3, 24, 24) and first.dtype == torch.float32
    assert torch.equal(first, DeviceViews(ViewConfig(image_size=24, he_stain_p=0.5), seed=3)(patches, step=7))
    assert torch.equal(first, views(patches.permute(0, 3, 1, 2), step=7))  # NCHW in: the same views
    assert not torch.equal(first, views(patches, step=8))
    assert not torch.equal(first, DeviceViews(views.cfg, seed=4)(patches, step=7))
    assert not torch.equal(first, DeviceViews(views.cfg, seed=3, rank=1)(patches, step=7))
    assert not torch.equal(first[:6], first[6:])  # the two views of a patch differ
    assert len({batch_seed(0, s, r) for s in range(50) for r in range(4)}) == 200


def loader_views(store, workers):
    dataset = PatchDataset(store, seed=1)
    sampler = RunSampler(len(dataset), 1, 0, seed=1, per_rank_batch=8, epochs=1)
    views = DeviceViews(ViewConfig(image_size=48), seed=1)
    with run_batches(build_loader(dataset, sampler, workers, pin_memory=False)) as batches:
        return [views(batch, step) for step, batch in zip(range(3), batches)]


def test_device_views_do_not_depend_on_the_worker_count(real_store):
    store = PatchStore(str(real_store))
    alone, pooled = loader_views(store, 0), loader_views(store, 2)
    assert all(torch.equal(a, b) for a, b in zip(alone, pooled))
    assert alone[0].shape == (16, 3, 48, 48)


def test_augment_auto_is_device_on_cuda_and_the_measured_choice_elsewhere():
    assert resolve_augment("auto", "cuda") == "device"
    assert resolve_augment("auto", "cpu") in ("cpu", "device")
    assert resolve_augment("cpu", "cuda") == "cpu" and resolve_augment("device", "cpu") == "device"


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_the_views_command_draws_either_pipeline(real_store, tmp_path, augment):
    out = tmp_path / f"{augment}.png"
    summary = one_json(run_cli("views", real_store, "-o", out, "--n", 4, "--image-size", 64, "--augment", augment))
    assert summary["augment"] == augment and out.exists()
    sheet = cv2.imread(str(out))
    assert sheet is not None and sheet.shape[0] > 64


def test_pretrain_with_device_views_runs_records_its_choice_and_refuses_a_change_on_resume(real_store, tmp_path):
    run = tmp_path / "run"
    args = ("pretrain", real_store, "--out", run, "--config", "small", "--backbone", "resnet10t", "--batch", 8,
            "--image-size", 48, "--workers", 1, "--device", "cpu", "-q")
    summary = one_json(run_cli(*args, "--max-steps", 2, "--augment", "device"))
    assert summary["augment"] == "device" and summary["step"] == 2
    assert summary["precision"] == "fp32" and summary["startup_s"] > 0 and summary["img_per_s"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["augment"] == "device"
    assert_error(run_cli(*args, "--max-steps", 3, "--augment", "cpu"), "run.augment='device'")
    assert one_json(run_cli(*args, "--max-steps", 3, "--augment", "device"))["step"] == 3


def test_a_run_from_before_augment_existed_resumes_as_cpu():
    from simclr_path.engine.config import PretrainConfig, changed_settings

    old = PretrainConfig().to_dict()
    del old["run"]["augment"]
    now = PretrainConfig()
    now.run.augment = "cpu"
    assert changed_settings(old, now.to_dict()) == []
    now.run.augment = "device"
    assert [name for name, *_ in changed_settings(old, now.to_dict())] == ["run.augment"]


@pytest.mark.parametrize("capability, mixed, dtype", [((9, 0), True, torch.bfloat16), ((8, 0), True, torch.bfloat16),
                                                      ((7, 0), True, torch.float16), ((7, 5), False, None)])
def test_cuda_precision_follows_the_compute_capability(monkeypatch, capability, mixed, dtype):
    import simclr_path.engine.pretrain as pretrain_module
    from simclr_path.runtime.device import native_bf16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(pretrain_module, "native_bf16", native_bf16)  # undo the fp32 fixture
    run = SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(bf16=mixed)), device=torch.device("cuda", 0))
    assert pretrain_module.Run.amp_dtype.fget(run) == dtype
    run.amp_dtype = dtype
    text = pretrain_module._precision_text(run)
    assert text == {torch.bfloat16: "bf16 autocast", None: "fp32"}.get(dtype, text)
    if dtype == torch.float16:
        assert "fp16 autocast with a gradient scaler" in text and "7.0" in text and "V100" in text


def test_fp16_training_scales_the_loss_and_steps_through_the_scaler():
    from simclr_path.engine.gradients import loss_and_backward
    from simclr_path.losses import NTXentLoss

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    views = torch.randn(8, 3, 2, 2)
    loss_and_backward(model, views, NTXentLoss(0.5), None)
    plain = model[1].weight.grad.clone()
    model.zero_grad()
    scaler = SimpleNamespace(scale=lambda loss: loss * 1024.0)
    loss_and_backward(model, views, NTXentLoss(0.5), None, scaler=scaler)
    assert torch.allclose(model[1].weight.grad, plain * 1024.0, rtol=1e-4)


def test_steady_rate_leaves_out_the_first_interval_and_start_up_is_reported_apart(tmp_path):
    from simclr_path.engine.metrics import TrainingLog

    log = TrainingLog(str(tmp_path), 0, 30, 10, write=False, progress=False, tensorboard=False)
    log.steps_done(1, 0, [1.0], 0.1, images=100, seconds=20.0)  # step 1: start-up, compile, autotune
    log.steps_done(10, 0, [1.0] * 9, 0.1, images=900, seconds=1.0)
    log.steps_done(20, 0, [1.0] * 10, 0.1, images=1000, seconds=1.0)
    log.steps_done(20, 0, [1.0], 0.1, images=0, seconds=1.0)  # losses settled at the end: no images
    assert log.steady_rate(22.0) == pytest.approx(950.0)
    assert log.startup_seconds > 0


def test_importing_the_package_turns_albumentations_update_check_off():
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    code = ("import os, simclr_path.data.views, albumentations.check_version as c; "
            "print(os.environ['NO_ALBUMENTATIONS_UPDATE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert "update" not in out.stderr.lower()


def test_run_sampler_order_is_distributed_samplers_in_one_array():
    from torch.utils.data import DistributedSampler

    for n, world, batch in ((40, 2, 4), (1001, 3, 7)):
        for rank in range(world):
            sampler = RunSampler(n, world, rank, seed=3, per_rank_batch=batch, epochs=2)
            reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3,
                                           drop_last=True)
            reference.set_epoch(1)
            order = sampler.order(1)
            assert isinstance(order, np.ndarray) and order.dtype == np.int32
            assert order.tolist() == list(reference)[: sampler.steps_per_epoch * batch]
