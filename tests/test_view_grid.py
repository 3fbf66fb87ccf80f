"""``simclr-path views``: the contact sheet of patches and their two training views.

The sheet must show the very pixels pretraining sees for (seed, epoch, index), laid out where the
layout says, labelled with what fired, with the config in its legend; options must override the
preset and bad input must give one line of error.
"""

import os

import cv2
import numpy as np
import pytest

from cli_helpers import assert_error, one_json, run_cli
from synthetic import tissue_image
from simclr_path import PatchStore, TwoViewDataset, ViewConfig
from simclr_path.cli.options import apply_view_options
from simclr_path.data import view_grid as vg
from simclr_path.engine.config import load_config

PATCHES, SIDE = 20, 64  # synthetic store: 20 patches of 64 px
CFG = dict(image_size=48, crop_scale=(0.2, 1.0), he_stain_p=0.5)  # 48 px views: shown 3x, 144 px tiles


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A store ingested (through the CLI) from 20 synthetic H&E-like PNG patches of 64 px."""
    root = tmp_path_factory.mktemp("views")
    folder = root / "tiles"
    folder.mkdir()
    for k in range(PATCHES):
        rgb = cv2.resize(tissue_image(256, 256, seed=k), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"p{k:02d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = root / "s.h5"
    summary = one_json(run_cli("ingest", folder, "--out", out, "--no-labels", "--mpp", 0.5))
    assert summary["patches"] == PATCHES
    return out


@pytest.fixture(scope="module")
def store(store_path):
    return PatchStore(store_path)


def read_png(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def tiles(image, layout, slot):
    """The patch, view 1 and view 2 tiles of patch ``slot`` cut out of a sheet."""
    side = layout.tile
    return [image[y:y + side, x:x + side] for y, x in (layout.tile_origin(slot, c) for c in range(3))]


def enlarged(view, scale):
    """What the sheet shows for a view: each pixel a scale x scale block."""
    return np.repeat(np.repeat(view, scale, axis=0), scale, axis=1)


def test_view_tiles_are_the_training_views(store):
    cfg, seed, epoch, n = ViewConfig(**CFG), 3, 2, 5
    image = vg.view_grid(store, cfg, n=n, seed=seed, epoch=epoch)
    layout = vg.grid_layout(n, cfg.image_size)
    assert layout.scale == 3 and layout.tile == 144
    dataset = TwoViewDataset(store, ViewConfig(**CFG), seed=seed)
    indices = vg.pick_indices(len(store), n, seed)
    for slot, index in enumerate(indices):
        patch_tile, *view_tiles = tiles(image, layout, slot)
        training = [v.numpy() for v in dataset[(epoch, index)]]
        for tile, view in zip(view_tiles, training):
            np.testing.assert_array_equal(tile, enlarged(view, 3))
        # the patch is shown whole, resized to the view size, enlarged like the views
        whole = cv2.resize(store[index], (48, 48), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(patch_tile, enlarged(whole, 3))
        # another epoch draws other views: the sheet is tied to (seed, epoch, index), not to the patch
        other = dataset[(epoch + 1, index)][0].numpy()
        assert not np.array_equal(view_tiles[0], enlarged(other, 3))


def test_display_scale_is_a_whole_factor_to_at_least_128_px(store):
    assert [vg.display_scale(side) for side in (16, 48, 64, 96, 127, 128, 224)] == [8, 3, 2, 2, 2, 1, 1]
    cfg = ViewConfig(image_size=SIDE)  # views as large as the patches, epoch 0
    image = vg.view_grid(store, cfg, n=2, seed=1)
    layout = vg.grid_layout(2, SIDE)
    view = TwoViewDataset(store, cfg, seed=1)[(0, vg.pick_indices(len(store), 2, 1)[1])][1].numpy()
    np.testing.assert_array_equal(tiles(image, layout, 1)[2], enlarged(view, 2))


def test_pick_indices_spread_seeded_distinct():
    picks = vg.pick_indices(100, 10, seed=0)
    assert picks == vg.pick_indices(100, 10, seed=0)
    assert picks != vg.pick_indices(100, 10, seed=1)
    assert [p // 10 for p in picks] == list(range(10))  # one in each tenth of the store
    assert vg.pick_indices(7, 7, seed=5) == list(range(7))
    assert len(set(vg.pick_indices(17, 16, seed=2))) == 16


def test_png_size_for_n_and_image_size(store_path, tmp_path):
    out = tmp_path / "v.png"
    summary = one_json(run_cli("views", store_path, "--out", out, "--n", 16, "--image-size", 48, "--seed", 1))
    assert summary["out"] == os.path.abspath(out) and summary["patches"] == 16 and summary["image_size"] == 48
    assert summary["indices"] == vg.pick_indices(PATCHES, 16, 1)
    height, width = read_png(out).shape[:2]
    layout = vg.grid_layout(16, 48)
    # 48 px views shown 3x = 144 px tiles; 3 triplets of 3 tiles (4 px gaps) per row, 20 px between
    # triplets, 8 px margins: 16 + 3 * (3 * 144 + 8) + 2 * 20
    assert (layout.columns, layout.rows) == (3, 6)
    assert width == layout.width == 1376
    # 6 rows of tile + 3 label lines of 16 px (+4) + 8 px gap, then the legend: 4 to 8 lines of 22 px
    assert layout.grid_height == 8 + 6 * (144 + 52 + 8)
    assert (height - layout.grid_height - 16) // 22 in range(4, 9) and (height - layout.grid_height - 16) % 22 == 0
    assert 0.5 < width / height < 2  # about square
    fewer = tmp_path / "v4.png"
    one_json(run_cli("views", store_path, "--out", fewer, "--n", 4, "--image-size", 48))
    assert read_png(fewer).shape[0] < height


def test_view_label_names_what_fired():
    result = {"applied_transforms": [
        ("RandomResizedCrop", {"shape": (100, 100, 3), "crop_coords": (10, 0, 60, 86)}),
        ("HorizontalFlip", {}), ("RandomRotate90", {"factor": 1}), ("ColorJitter", {"brightness": 1.2}),
        ("ToGray", {}),
    ]}
    assert vg.view_label(result) == "crop 43% hflip rot90 jitter gray"
    result = {"applied_transforms": [
        ("RandomResizedCrop", {"shape": (64, 64, 3), "crop_coords": (0, 0, 64, 64)}),
        ("VerticalFlip", {}), ("RandomRotate90", {"factor": 0}), ("HEStain", {}), ("GaussianBlur", {}),
    ]}
    assert vg.view_label(result) == "crop 100% vflip stain blur"  # a rotation by 0 changes nothing


def test_labels_and_pixels_follow_the_options(store):
    seed = 4
    plain = ViewConfig(**CFG)
    forced = apply_view_options(load_config(None), image_size=48, crop_scale=(0.2, 1.0), he_stain_p=0.5,
                                grayscale_p=1.0, flip_p=0.0, rot90_p=0.0, blur_p=1.0).views
    plain_samples = vg.draw_samples(store, plain, n=6, seed=seed)
    forced_samples = vg.draw_samples(store, forced, n=6, seed=seed)
    plain_labels = [label for s in plain_samples for label in s.view_labels]
    forced_labels = [label for s in forced_samples for label in s.view_labels]
    assert any("flip" in label or "rot" in label for label in plain_labels)
    assert not all("gray" in label for label in plain_labels)
    for label in forced_labels:
        words = label.split()
        assert words[0] == "crop" and "gray" in words and "blur" in words
        assert not {"hflip", "vflip"} & set(words) and not any(w.startswith("rot") for w in words)
    for sample in forced_samples:
        for view in sample.views:
            assert (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()
    # the same patches, with other views: the sheet changes
    assert [s.index for s in plain_samples] == [s.index for s in forced_samples]
    assert not np.array_equal(vg.view_grid(store, plain, n=6, seed=seed), vg.view_grid(store, forced, n=6, seed=seed))


def test_legend_shows_the_config():
    cfg = apply_view_options(load_config("small"), crop_scale=(0.5, 0.9), flip_p=0.25, rot90_p=0.0,
                             color_jitter=(0.4, 0.3, 0.2, 0.02), jitter_p=0.6, grayscale_p=1.0, blur_p=0.1,
                             he_stain_p=0.0, image_size=48).views
    text = vg.legend_text(vg.legend_items(cfg, seed=7, epoch=2, patch_side=64, n=5, total=20))
    for phrase in ["views: 48 px crops of 64 px patches", "shown 3x enlarged (nearest-neighbour, display only)",
                   "crop scale 0.50-0.90", "hflip p 0.25", "vflip p 0.25", "rot90 p 0.00",
                   "colour jitter p 0.60: brightness 0.4, contrast 0.3, saturation 0.2, hue 0.02",
                   "grayscale p 1.00", "blur p 0.10", "HE stain p 0.00", "seed 7, epoch 2", "5 of 20 patches"]:
        assert phrase in text, phrase
    small = vg.legend_text(vg.legend_items(load_config("small").views, 0, 0, 256, 16, 35))
    assert "views: 64 px crops of 256 px patches, shown 2x" in small and "crop scale 0.25-0.80" in small
    assert "HE stain p 0.20" in small and "grayscale p 0.10" in small and "light views p 0.50" in small
    assert "shown at their own size" in vg.legend_text(vg.legend_items(ViewConfig(), 0, 0, 256, 1, 1))


def test_options_override_the_preset(store_path, tmp_path):
    small = load_config("small")
    cfg = apply_view_options(load_config("small"), image_size=64, crop_scale=(0.5, 0.9), flip_p=0.1,
                             color_jitter=(0.1, 0.2, 0.3, 0.04), rot90_p=None, grayscale_p=None)
    views = cfg.views
    assert (views.image_size, views.crop_scale, views.hflip_p, views.vflip_p) == (64, (0.5, 0.9), 0.1, 0.1)
    assert (views.brightness, views.contrast, views.saturation, views.hue) == (0.1, 0.2, 0.3, 0.04)
    # not given: the preset's values stay
    assert (views.rot90_p, views.grayscale_p, views.he_stain_p) == (small.views.rot90_p, small.views.grayscale_p, 0.2)
    # views larger than the patches are refused, with the fix
    assert_error(run_cli("views", store_path, "--out", tmp_path / "a.png", "--config", "small", "--image-size", 96),
                 "--image-size 96", "64 px")
    out = tmp_path / "gray.png"
    summary = one_json(run_cli("views", store_path, "--out", out, "--config", "small", "--image-size", 48,
                               "--grayscale-p", 1, "--light-p", 0, "--n", 3))
    assert summary["image_size"] == 48 and summary["patches"] == 3
    image, layout = read_png(out), vg.grid_layout(3, 48)
    for slot in range(3):
        patch_tile, *view_tiles = tiles(image, layout, slot)
        assert patch_tile.std(axis=2).mean() > 5  # the patch keeps its colour
        for tile in view_tiles:
            assert np.abs(tile.astype(int) - tile[..., :1]).max() <= 1  # the views are gray (PNG round trip)


def test_seed_defaults_to_the_configs(store_path, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("views: {image_size: 32}\nrun: {seed: 5}\n")
    by_config = one_json(run_cli("views", store_path, "-o", tmp_path / "a.png", "--config", config, "-n", 4))
    given = one_json(run_cli("views", store_path, "-o", tmp_path / "b.png", "--config", config, "-n", 4, "--seed", 5))
    assert given["seed"] == 5
    other = one_json(run_cli("views", store_path, "-o", tmp_path / "c.png", "--config", config, "-n", 4, "--seed", 6))
    assert by_config["seed"] == given["seed"] == 5 and by_config["indices"] == given["indices"]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    assert other["seed"] == 6


@pytest.mark.parametrize("args, needles", [
    (["--n", 0], ["--n must be in 1..20"]),
    (["--n", 21], ["--n must be in 1..20", "got 21"]),
    (["--image-size", 65], ["--image-size 65", "64 px"]),
    (["--image-size", 8], ["--image-size must be in 16..4096"]),
    (["--flip-p", 1.5], ["--flip-p must be a probability", "1.5"]),
    (["--blur-p", -0.1], ["--blur-p"]),
    (["--grayscale-p", "nan"], ["--grayscale-p"]),
    (["--crop-scale", 0.5, 0.2], ["--crop-scale must be MIN MAX", "0.5 0.2"]),
    (["--crop-scale", 0, 1], ["--crop-scale"]),
    (["--color-jitter", 0.4, 0.4, 0.4, 0.7], ["--color-jitter hue must be in [0, 0.5]"]),
    (["--color-jitter", -1, 0.4, 0.4, 0.1], ["--color-jitter brightness"]),
    (["--epoch", -1], ["--epoch must be >= 0"]),
    (["--config", "nope"], ["nope: no such config file or preset"]),
])
def test_bad_options_give_one_line_errors(store_path, tmp_path, args, needles):
    out = tmp_path / "v.png"
    assert_error(run_cli("views", store_path, "--out", out, "--image-size", 48, *args), *needles)
    assert not out.exists()


def test_bad_stores_and_outputs_give_one_line_errors(store_path, tmp_path):
    out = tmp_path / "v.png"
    assert_error(run_cli("views", tmp_path / "missing.h5", "--out", out), "missing.h5", "no such store")
    foreign = tmp_path / "foreign.h5"
    foreign.write_text("not a store")
    assert_error(run_cli("views", foreign, "--out", out, "--image-size", 48), "foreign.h5", "not an HDF5 patch store")
    config = tmp_path / "bad.yaml"
    config.write_text("views: {image_size: 48, blur_p: 2}\n")
    assert_error(run_cli("views", store_path, "--out", out, "--config", config), "views.blur_p in the config")
    assert_error(run_cli("views", store_path, "--out", tmp_path / "v.jpg", "--image-size", 48), "--out must name a .png")
    assert_error(run_cli("views", store_path, "--out", tmp_path / "no" / "v.png", "--image-size", 48),
                 "cannot write the PNG")
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert_error(run_cli("views", store_path, "--out", folder, "--image-size", 48), "cannot write the PNG")
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["bad.yaml", "dir.png", "foreign.h5"]


def test_existing_png_is_replaced_whole(store_path, tmp_path):
    out = tmp_path / "v.png"
    out.write_bytes(b"old")
    summary = one_json(run_cli("views", store_path, "--out", out, "--image-size", 48, "-n", 2))
    assert read_png(out).shape[1] == vg.grid_layout(2, 48).width
    assert summary["out"] == str(out.resolve())
    assert [p.name for p in tmp_path.iterdir()] == ["v.png"]  # no temporary file left behind
