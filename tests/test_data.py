"""The two-view sampler: what the views are, not only that runs repeat.

Each transform must fire at its configured rate and independently of every other transform and of
the other view; the views of a patch depend only on (seed, epoch, index), whatever the workers.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from simclr_path import TwoViewDataset, ViewConfig
from simclr_path.data.views import build_transform, draw_views

RATES = {"HorizontalFlip": "hflip_p", "VerticalFlip": "vflip_p", "RandomRotate90": "rot90_p",
         "ColorJitter": "jitter_p", "ToGray": "grayscale_p", "GaussianBlur": "blur_p", "HEStain": "he_stain_p"}
CFG = ViewConfig(image_size=24, he_stain_p=0.3)
SAMPLES = 2000  # patches; two views each


def image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def firings(draw, samples=SAMPLES):
    """(views, transforms) 0/1 matrix of which transform fired in each view, and the crop areas."""
    transform = build_transform(CFG, record=True)
    names = list(RATES)
    fired, areas = [], []
    for seed in range(samples):
        for result in draw(transform, seed):
            applied = dict(result["applied_transforms"])
            fired.append([name in applied for name in names])
            x0, y0, x1, y1 = applied["RandomResizedCrop"]["crop_coords"]
            areas.append((x1 - x0) * (y1 - y0) / 32**2)
    return names, np.array(fired), np.array(areas)


def ours(transform, seed):
    return draw_views(transform, image(), seed)


def seeded_like_before(transform, seed):
    """How the sampler used to seed: Compose.set_random_seed gives every transform the same seed."""
    transform.set_random_seed(seed)
    return [transform(image=image()) for _ in range(2)]


def dependent_pairs(names, fired, sigmas=5.0):
    """Pairs whose joint firing rate is far (in standard errors) from the product of their rates."""
    n = len(fired)
    rates = fired.mean(0)
    bad = []
    for a, b in itertools.combinations(range(len(names)), 2):
        expected = rates[a] * rates[b]
        joint = (fired[:, a] & fired[:, b]).mean()
        if abs(joint - expected) > sigmas * math.sqrt(expected * (1 - expected) / n):
            bad.append((names[a], names[b], round(joint, 3), round(expected, 3)))
    return bad


def test_each_transform_fires_at_its_configured_rate():
    names, fired, _ = firings(ours)
    for name, rate in zip(names, fired.mean(0)):
        p = getattr(CFG, RATES[name])
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / len(fired)), (name, rate, p)


def test_every_pair_of_transforms_fires_independently():
    names, fired, areas = firings(ours)
    assert dependent_pairs(names, fired) == []
    # the crop area is not tied to any other decision either
    for i, name in enumerate(names):
        gap = areas[fired[:, i]].mean() - areas[~fired[:, i]].mean()
        assert abs(gap) < 0.03, (name, gap)


def test_the_independence_check_catches_the_old_seeding():
    names, fired, _ = firings(seeded_like_before, samples=400)
    bad = {(a, b) for a, b, *_ in dependent_pairs(names, fired)}
    assert ("HorizontalFlip", "VerticalFlip") in bad  # both flips always fired together before


def test_two_views_of_one_patch_differ_and_decide_independently():
    names, fired, _ = firings(ours, samples=1000)
    view0, view1 = fired[0::2], fired[1::2]
    for i, name in enumerate(names):
        p = getattr(CFG, RATES[name])
        disagree = (view0[:, i] != view1[:, i]).mean()
        assert abs(disagree - 2 * p * (1 - p)) < 0.06, (name, disagree)
    dataset = TwoViewDataset([image(i) for i in range(20)], CFG, seed=3)
    for i in range(20):
        v0, v1 = dataset[i]
        assert v0.shape == (24, 24, 3) and v0.dtype == torch.uint8
        assert not torch.equal(v0, v1)


def test_views_depend_on_seed_epoch_and_index_only():
    dataset = TwoViewDataset([image(i) for i in range(8)], CFG, seed=5)
    again = TwoViewDataset([image(i) for i in range(8)], CFG, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(dataset[(2, 3)], again[(2, 3)]))
    dataset.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(dataset[3], again[(2, 3)]))
    assert not torch.equal(dataset[(2, 3)][0], dataset[(3, 3)][0])  # a new epoch, new views
    other_seed = TwoViewDataset([image(i) for i in range(8)], CFG, seed=6)
    assert not torch.equal(dataset[(2, 3)][0], other_seed[(2, 3)][0])


@pytest.mark.parametrize("name", ["ViewConfig", "TwoViewDataset", "PatchStore"])
def test_public_names(name):
    import simclr_path

    assert getattr(simclr_path, name).__name__ == name


class PidPatches:
    """A store whose every patch is filled with the id of the process that read it."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        import os

        image = np.zeros((16, 16, 3), np.uint8)
        image[0, 0] = list(os.getpid().to_bytes(3, "little"))  # pids < 2**24, as Linux's default limit
        return image


IDENTITY = ViewConfig(image_size=16, crop_scale=(1.0, 1.0), hflip_p=0, vflip_p=0, rot90_p=0, jitter_p=0,
                      grayscale_p=0, blur_p=0)


def all_batches(dataset, workers, epochs=3, start_epoch=0, start_batch=0, batch=4):
    from simclr_path.data.loader import RunSampler, build_loader, run_batches

    sampler = RunSampler(len(dataset), 1, 0, seed=7, per_rank_batch=batch, epochs=epochs, start_epoch=start_epoch,
                         start_batch=start_batch)
    with run_batches(build_loader(dataset, sampler, workers, pin_memory=False)) as batches:
        return list(batches)


def test_loader_batches_are_the_same_whatever_the_worker_count():
    dataset = TwoViewDataset([image(i) for i in range(10)], CFG, seed=4)
    none, two = all_batches(dataset, 0), all_batches(dataset, 2)
    assert len(none) == len(two) == 3 * (10 // 4)  # whole batches per epoch, epochs chained
    assert all(torch.equal(a, b) for a, b in zip(none, two))
    batch = none[0]
    assert batch.shape == (8, 24, 24, 3) and batch.dtype == torch.uint8  # (2B, S, S, 3): first views, then second


def test_a_resumed_loader_continues_exactly_where_the_run_was():
    dataset = TwoViewDataset([image(i) for i in range(10)], CFG, seed=4)
    whole = all_batches(dataset, 0)
    resumed = all_batches(dataset, 2, start_epoch=1, start_batch=1)
    assert len(resumed) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[3:]))


def test_loader_workers_live_for_the_whole_run():
    batches = all_batches(TwoViewDataset(PidPatches(12), IDENTITY), 2, epochs=4)
    pids = {int.from_bytes(bytes(batch[i, 0, 0].tolist()), "little") for batch in batches for i in range(len(batch))}
    assert len(pids) == 2  # the same two worker processes served all four epochs


def test_light_views_skip_the_photometric_block_and_nothing_else():
    """views.light_p makes the mix of light and strong views an explicit setting: a light view gets
    no stain, colour, grayscale or blur; geometry is untouched and still independent of it."""
    cfg = ViewConfig(image_size=24, light_p=0.5, he_stain_p=0.3)
    transform = build_transform(cfg, record=True)
    photometric = {"HEStain", "ColorJitter", "ToGray", "GaussianBlur"}
    light, flips_when_light, flips_when_strong = 0, [], []
    for seed in range(1500):
        for result in draw_views(transform, image(), seed):
            names = {name for name, _ in result["applied_transforms"]}
            is_light = not names & photometric
            light += is_light
            (flips_when_light if is_light else flips_when_strong).append("HorizontalFlip" in names)
    strong_but_plain = (1 - 0.3) * (1 - 0.8) * (1 - 0.2) * (1 - 0.5)  # a strong view where nothing fired
    assert abs(light / 3000 - (0.5 + 0.5 * strong_but_plain)) < 0.04
    assert abs(np.mean(flips_when_light) - np.mean(flips_when_strong)) < 0.05
