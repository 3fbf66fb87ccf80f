"""Segmentation inference: scores, patch and whole-image prediction, ``segment-eval`` and ``predict``.

Most tests use a hand-made "red" model whose answer is known: class 1 where a pixel is red (red
minus green above one half), class 0 elsewhere, so every number can be checked by hand.
"""

import json

import click
import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from simclr_path.errors import SimclrPathError
from simclr_path.segment.scores import ConfusionCounter

RED = (255, 0, 0)
TISSUE = (205, 120, 185)  # pink H&E: not red for the model


class RedModel(nn.Module):
    """Logits (N, 2, S, S): [-k (r - g - 0.5), k (r - g - 0.5)] from the input's red and green (0..1)."""

    def __init__(self, k: float = 20.0):
        super().__init__()
        self.k = k
        self.windows = 0  # inputs seen

    def forward(self, x):
        self.windows += len(x)
        score = self.k * (x[:, 0] - x[:, 1] - 0.5)
        return torch.stack([-score, score], dim=1)


class WindowMeanModel(nn.Module):
    """One probability per window: class 1 logit = 8 * (window's mean red - 0.5), the same at every pixel."""

    def forward(self, x):
        score = 8 * (x[:, 0].mean(dim=(1, 2), keepdim=True) - 0.5).expand(-1, x.shape[2], x.shape[3])
        return torch.stack([-score, score], dim=1)


def red_meta(image_size=64, patch_size=64, input_mpp=None, patch_mpp=None):
    """Normalisation that leaves x = pixel / 255, so the models above read colours directly."""
    return {"classes": ["background", "red"], "image_size": image_size, "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0], "input_mpp": input_mpp, "patch_size": patch_size, "patch_mpp": patch_mpp,
            "timm_model": "resnet18"}


def disk_image(height=150, width=200, centre=(90, 70), radius=40):
    image = np.full((height, width, 3), 238, np.uint8)
    cv2.ellipse(image, (30, 30), (25, 15), 0, 0, 360, TISSUE, -1)
    cv2.circle(image, centre, radius, RED, -1)
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    return image, mask


def dice_of(pred, truth, value=1):
    a, b = pred == value, truth == value
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture
def red_run(monkeypatch, tmp_path):
    """A run folder whose loading yields the red model (library code loads runs by path)."""
    import simclr_path.segment.evaluate
    import simclr_path.segment.infer
    import simclr_path.segment.predict

    run = tmp_path / "run"
    run.mkdir()
    meta = red_meta()
    for module in (simclr_path.segment.evaluate, simclr_path.segment.infer, simclr_path.segment.predict):
        monkeypatch.setattr(module, "load_segment_run", lambda path, device="cpu": (RedModel().to(device), dict(meta)))
    return run


def _cli():
    from simclr_path.cli.predict_commands import COMMANDS

    group = click.Group()
    for command in COMMANDS:
        group.add_command(command)
    return group


def invoke(*args):
    return CliRunner().invoke(_cli(), [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code != 0
    assert isinstance(result.exception, SimclrPathError), result.exception
    message = str(result.exception)
    assert "\n" not in message
    return message


# --- scores -----------------------------------------------------------------------------------------

def test_dice_and_iou_match_hand_counts():
    truth = np.array([0, 0, 0, 1, 1, 255, 1, 1])
    pred = np.array([0, 1, 0, 1, 0, 2, 1, 1])  # the class-2 pixel is unlabelled: not counted
    counter = ConfusionCounter(3)
    counter.update(pred, truth)
    # truth 0: pred 0 twice, 1 once; truth 1: pred 0 once, 1 three times
    assert counter.matrix.tolist() == [[2, 1, 0], [1, 3, 0], [0, 0, 0]]
    np.testing.assert_allclose(counter.dice()[:2], [4 / 6, 6 / 8])  # 2TP / (2TP + FP + FN)
    np.testing.assert_allclose(counter.iou()[:2], [2 / 4, 3 / 5])
    assert np.isnan(counter.dice()[2]) and np.isnan(counter.iou()[2])  # in neither truth nor prediction
    scores = counter.as_dict(["bg", "tumour", "stroma"])
    assert scores["dice"]["stroma"] is None and scores["pixels"] == 7
    # the headline means are over the foreground classes present (tumour; stroma is absent), background beside
    assert scores["mean_dice"] == pytest.approx(6 / 8) and scores["mean_iou"] == pytest.approx(0.6)
    assert scores["background_dice"] == pytest.approx(4 / 6) and scores["background_iou"] == pytest.approx(0.5)
    json.dumps(scores, allow_nan=False)


def test_a_class_only_predicted_scores_zero_and_counters_pool_exactly():
    a, b = ConfusionCounter(2), ConfusionCounter(2)
    a.update(np.array([[1, 1]]), np.array([[0, 0]]))  # class 1 predicted, never true: Dice 0, not NaN
    assert a.dice()[1] == 0 and a.iou()[1] == 0
    b.update(np.array([1, 0]), np.array([1, 0]))
    a.merge(b)
    assert a.matrix.tolist() == [[1, 2], [0, 1]]
    assert a.dice()[1] == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        a.update(np.array([0]), np.array([3]))


# --- patches ----------------------------------------------------------------------------------------

def test_predict_patches_streams_batches_at_the_patch_size():
    from simclr_path.segment.infer import predict_patches

    image, mask = disk_image(96, 96, centre=(48, 48), radius=30)
    images = [image, np.full((96, 96, 3), 238, np.uint8), image]
    batches = list(predict_patches(RedModel(), red_meta(image_size=64, patch_size=96), images, device="cpu",
                                   batch_size=2, workers=0))
    assert [b[0].tolist() for b in batches] == [[0, 1], [2]]
    probs = np.concatenate([b[1] for b in batches])
    assert probs.shape == (3, 2, 96, 96) and probs.dtype == np.float32  # back at 96 px, not the 64 px input
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert dice_of(probs[0].argmax(0), mask) > 0.95 and probs[1].argmax(0).max() == 0


def _zero_head_run(tmp_path, bias):
    """A real Unet run folder whose head outputs the constant logits ``bias`` everywhere."""
    from simclr_path.engine.checkpoint import save_checkpoint
    from simclr_path.segment.model import build_unet

    unet = build_unet("resnet18", 2)
    head = unet.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    run = tmp_path / f"run{bias[0]}"
    run.mkdir()
    meta = {**red_meta(image_size=64, patch_size=64), "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint({"kind": "simclr-path segment", "model": unet.state_dict(), "config": {}, "meta": meta, "step": 0},
                    str(run / "checkpoint.pt"))
    return run


def test_patch_entropy_is_one_for_flat_logits_and_near_zero_for_confident_ones(tmp_path):
    from simclr_path.segment.infer import patch_entropy

    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    flat = patch_entropy(str(_zero_head_run(tmp_path, [0.0, 0.0])), patches, np.array([2, 0]), device="cpu",
                         workers=0)
    sure = patch_entropy(str(_zero_head_run(tmp_path, [6.0, -6.0])), patches, np.array([1, 2, 0]), device="cpu",
                         workers=0)
    assert flat.dtype == np.float32 and flat.shape == (2,) and sure.shape == (3,)
    np.testing.assert_allclose(flat, 1.0, atol=1e-4)  # uniform over the classes: log(C) / log(C)
    p = 1 / (1 + np.exp(-12.0))  # softmax of (6, -6)
    expected = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)
    np.testing.assert_allclose(sure, expected, rtol=1e-2)
    assert ((sure >= 0) & (sure <= 1)).all() and sure.max() < flat.min()
    none = patch_entropy(str(_zero_head_run(tmp_path, [1.0, 0.0])), patches, np.array([], int), device="cpu")
    assert none.shape == (0,) and none.dtype == np.float32


# --- whole images -----------------------------------------------------------------------------------

def test_predict_image_finds_the_disk_in_an_image_not_a_multiple_of_the_window():
    from simclr_path.segment.infer import predict_image

    image, mask = disk_image(150, 200)
    probs = predict_image(RedModel(), red_meta(), image, None, device="cpu", batch_size=3)
    assert probs.shape == (2, 150, 200) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-5)
    assert dice_of(probs.argmax(0), mask) > 0.95


def test_predict_image_rescales_to_the_models_input_resolution():
    from simclr_path.segment.infer import input_scale, predict_image

    image, mask = disk_image(150, 200)
    meta = red_meta(input_mpp=1.0)
    assert input_scale(meta, 0.5) == 0.5 and input_scale(red_meta(image_size=64, patch_size=128), None) == 0.5
    native, halved = RedModel(), RedModel()
    same = predict_image(native, red_meta(), image, None, device="cpu")
    small = predict_image(halved, meta, image, 0.5, device="cpu")  # 0.5 um/px image, 1 um/px network input
    assert small.shape == (2, 150, 200)  # back at the image's own pixels
    assert dice_of(small.argmax(0), mask) > 0.95
    assert halved.windows < native.windows / 2  # it ran on a 100 x 75 image, not 200 x 150
    assert dice_of(same.argmax(0), small.argmax(0)) > 0.95


def test_window_weights_cross_fade_to_one():
    from simclr_path.segment.infer import window_weights

    size, stride = 64, 48
    line = window_weights(size, stride)[size // 2]
    total = np.zeros(size + 3 * stride)
    for k in range(4):
        total[k * stride:k * stride + size] += line
    np.testing.assert_allclose(total[size - stride:3 * stride + stride], 1.0, atol=1e-6)  # covered twice or once
    assert line.min() > 0 and np.array_equal(window_weights(32, 32), np.ones((32, 32), np.float32))


def test_overlapping_windows_average_into_a_smooth_map():
    """Each window predicts one value (its mean redness); with overlap the map fades between windows
    instead of stepping, and it still follows the image."""
    from simclr_path.segment.infer import predict_image

    ramp = np.linspace(0, 255, 256).astype(np.uint8)
    image = np.zeros((64, 256, 3), np.uint8)
    image[..., 0] = ramp[None, :]
    meta = red_meta(image_size=64)
    steps = predict_image(WindowMeanModel(), meta, image, None, device="cpu", overlap=0.0)[1]
    blended = predict_image(WindowMeanModel(), meta, image, None, device="cpu", overlap=0.5)[1]
    step_jump = np.abs(np.diff(steps[32])).max()
    blend_jump = np.abs(np.diff(blended[32])).max()
    assert len(np.unique(steps[32].round(5))) == 4  # four windows side by side, each one flat
    assert blend_jump < step_jump / 4
    assert (np.diff(blended[32]) > -1e-6).all()  # still increasing left to right, like the image


# --- segment-eval, images mode ----------------------------------------------------------------------

def _write_pairs(tmp_path, n=2):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(n):
        image, mask = disk_image(120 + 10 * i, 170, centre=(80 + 10 * i, 60), radius=30)
        mask[:5] = 255  # a strip that is not scored
        cv2.imwrite(str(images / f"img{i}.{'png' if i == 0 else 'tif'}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(masks / f"img{i}.png"), mask)
    return images, masks


def test_segment_eval_on_images_scores_the_red_model_near_one_and_draws_overlays(red_run, tmp_path):
    images, masks = _write_pairs(tmp_path)
    overlays = tmp_path / "overlays"
    result = invoke("segment-eval", red_run, "--images", images, "--masks", masks, "--overlay", overlays,
                    "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["classes"] == ["background", "red"] and out["mode"] == "images"
    assert [e["name"] for e in out["images"]] == ["img0", "img1"]
    for entry in out["images"]:
        assert set(entry) >= {"name", "dice", "iou"} and entry["dice"]["red"] > 0.95
        assert entry["pixels"] == (120 if entry["name"] == "img0" else 130) * 170 - 5 * 170
    assert out["overall"]["dice"]["red"] > 0.95 and out["overall"]["mean_iou"] > 0.9
    assert out["mean_per_image"]["dice"]["red"] == pytest.approx(
        np.mean([e["dice"]["red"] for e in out["images"]]))
    drawn = cv2.cvtColor(cv2.imread(str(overlays / "img1.png")), cv2.COLOR_BGR2RGB)
    assert drawn.shape == (130, 170, 3)
    colours = {tuple(c) for c in drawn.reshape(-1, 3)}
    assert (0, 255, 0) in colours and (255, 0, 255) in colours  # truth and prediction outlines


@pytest.mark.parametrize("problem, needle", [
    ("size", "img1.png: mask is 170x100 px but its image is 170x130"),
    ("value", "img1.png: mask value(s) 7 are not class indices 0..1"),
    ("no mask", "img1.tif: no mask img1.png"),
])
def test_segment_eval_refuses_bad_masks_in_one_line_before_writing_anything(red_run, tmp_path, problem, needle):
    images, masks = _write_pairs(tmp_path)
    if problem == "size":
        cv2.imwrite(str(masks / "img1.png"), np.zeros((100, 170), np.uint8))
    elif problem == "value":
        mask = cv2.imread(str(masks / "img1.png"), cv2.IMREAD_UNCHANGED)
        mask[50, 50] = 7
        cv2.imwrite(str(masks / "img1.png"), mask)
    else:
        (masks / "img1.png").unlink()
    overlays = tmp_path / "overlays"
    result = invoke("segment-eval", red_run, "--images", images, "--masks", masks, "--overlay", overlays,
                    "--device", "cpu", "-q")
    assert needle in one_line_error(result)
    assert not overlays.exists() and result.stdout == ""


def test_segment_eval_needs_images_with_masks_or_stores_with_labels(red_run, tmp_path):
    images, masks = _write_pairs(tmp_path, n=1)
    assert "--masks" in one_line_error(invoke("segment-eval", red_run, "--images", images))
    assert "--labels" in one_line_error(invoke("segment-eval", red_run))
    assert "not both" in one_line_error(invoke("segment-eval", red_run, "x.h5", "--images", images, "--masks", masks))


# --- predict and segment-eval on a tiled store ------------------------------------------------------

#: The red square of the synthetic slide, level-0 px: x in [400, 656), y in [300, 556).
SQUARE = (400, 300, 656, 556)


@pytest.fixture(scope="module")
def red_store(tmp_path_factory):
    """A 1024 x 768 px slide at 0.25 um/px with tissue and a red square, tiled at 0.5 um/px in 64 px patches."""
    from synthetic import tissue_image, write_slide

    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.tiler import tile_slides

    folder = tmp_path_factory.mktemp("red_slide")
    image = tissue_image(1024, 768, seed=3)
    image[image[..., 0].astype(int) - image[..., 1] > 100] = TISSUE  # no accidental red in the tissue
    x0, y0, x1, y1 = SQUARE
    image[y0:y1, x0:x1] = RED
    write_slide(folder / "redslide.tif", image, mpp=0.25, levels=2, compression="zlib")
    out = folder / "red.h5"
    result = tile_slides([str(folder / "redslide.tif")], str(out),
                         TileSpec(target_mpp=0.5, patch_size=64, min_tissue=0, codec="raw"), workers=0)
    assert result.ok
    return out


def test_predict_writes_the_red_square_as_class_1_in_png_and_geojson(red_run, red_store, tmp_path):
    from simclr_path.store import PatchStore

    out = tmp_path / "pred"
    result = invoke("predict", red_run, red_store, "--out", out, "--device", "cpu", "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["slides"] == 1 and sorted(summary["files"]) == sorted(
        [str(out / "redslide.png"), str(out / "redslide.geojson")])
    mask = cv2.imread(str(out / "redslide.png"), cv2.IMREAD_UNCHANGED)
    store = PatchStore(red_store)
    assert store.slide_group("redslide").attrs["scale"] == 2
    assert mask.shape == (384, 512) and mask.dtype == np.uint8  # the store's resolution: 2 level-0 px per pixel
    x0, y0, x1, y1 = (v // 2 for v in SQUARE)
    assert mask[(y0 + y1) // 2, (x0 + x1) // 2] == 1 and mask[y0 + 3, x1 - 4] == 1  # inside
    assert mask[y0 - 3, x0] == 0 and mask[50, 50] == 0 and mask[y1 + 3, x1 + 3] == 0  # outside
    assert (mask == 1).sum() == pytest.approx((x1 - x0) * (y1 - y0), rel=0.03)
    features = json.loads((out / "redslide.geojson").read_text())["features"]
    assert len(features) == 1
    props = features[0]["properties"]
    assert props["objectType"] == "annotation" and props["classification"]["name"] == "red"
    ring = np.array(features[0]["geometry"]["coordinates"][0])
    bbox = (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max())
    np.testing.assert_allclose(bbox, SQUARE, atol=3)  # level-0 px, within one output pixel and a half
    assert props["measurements"]["area_um2"] == pytest.approx(256 * 256 * 0.25 ** 2, rel=0.05)


def test_predict_at_a_coarser_downsample_and_refuses_nonsense(red_run, red_store, tmp_path):
    from simclr_path.segment.predict import predict_slides

    out = tmp_path / "coarse"
    summary = predict_slides(str(red_run), [str(red_store)], str(out), downsample=8, device="cpu", workers=0,
                             batch_size=5)
    assert summary["slides"] == 1
    mask = cv2.imread(str(out / "redslide.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 128)
    x0, y0, x1, y1 = (v / 8 for v in SQUARE)  # 50, 37.5, 82, 69.5
    assert (mask[40:68, 51:81] == 1).all() and (mask[:35] == 0).all() and (mask[:, 84:] == 0).all()
    ring = np.array(json.loads((out / "redslide.geojson").read_text())["features"][0]["geometry"]["coordinates"][0])
    np.testing.assert_allclose((ring[:, 0].min(), ring[:, 0].max()), (SQUARE[0], SQUARE[2]), atol=8)
    assert "--downsample" in one_line_error(invoke("predict", red_run, red_store, "--out", out, "--downsample", "0"))


def test_band_canvas_averages_overlaps_and_marks_uncovered_pixels():
    from simclr_path.segment.predict import _BandCanvas

    canvas = _BandCanvas(2, height=10, width=12, band=3)  # holds 6 rows at a time
    sure_1 = np.stack([np.zeros((4, 4)), np.ones((4, 4))]).astype(np.float32)
    leaning_0 = np.stack([np.full((4, 4), 0.7), np.full((4, 4), 0.3)]).astype(np.float32)
    canvas.add(sure_1, 0, 0, 4, 4)
    canvas.add(leaning_0, 2, 0, 6, 4)  # overlap at x 2..3: mean (0.35, 0.65) -> class 1
    canvas.add(leaning_0, 0, 3, 4, 7)  # settles rows 0..2 and moves the band down by 3
    canvas.add(leaning_0, 8, 6, 12, 10)  # settles rows 3..5
    mask = canvas.finish()
    u = 255
    expected = np.full((10, 12), u, np.uint8)
    expected[0:3, 0:6] = [1, 1, 1, 1, 0, 0]
    expected[3, 0:6] = [1, 1, 1, 1, 0, 0]  # three patches over x 2..3: (1.4, 1.6) / 3 -> 1
    expected[4:7, 0:4] = 0
    expected[6:10, 8:12] = 0
    assert mask.tolist() == expected.tolist()
    with pytest.raises(ValueError):
        canvas.add(leaning_0, 0, 0, 4, 4)  # rows already settled


def test_segment_eval_on_labelled_stores_scores_per_slide(red_run, red_store, tmp_path):
    from simclr_path.segment.evaluate import evaluate_segmentation

    labels = tmp_path / "labels"
    labels.mkdir()
    truth = np.full((768 // 4, 1024 // 4), 255, np.uint8)  # a mask at downsample 4, mostly unlabelled
    x0, y0, x1, y1 = (v // 4 for v in SQUARE)
    truth[y0 - 10:y1 + 10, x0 - 10:x1 + 10] = 0
    truth[y0:y1, x0:x1] = 1
    cv2.imwrite(str(labels / "redslide.png"), truth)
    overlays = tmp_path / "overlays"
    out = evaluate_segmentation(str(red_run), stores=[str(red_store)], labels_dir=str(labels), device="cpu",
                                workers=0, overlay_dir=str(overlays))
    assert out["mode"] == "stores" and [e["name"] for e in out["images"]] == ["redslide"]
    assert out["overall"]["dice"]["red"] > 0.95 and out["overall"]["dice"]["background"] > 0.9
    assert out["overall"]["pixels"] == pytest.approx((x1 - x0 + 20) * (y1 - y0 + 20) * 4, rel=0.05)  # 4 px / label px
    assert len(list(overlays.glob("redslide_*.png"))) == 12  # the 4 x 3 patches of 128 level-0 px touching labels


def test_geojson_outlines_each_foreground_class_with_its_holes_in_level0_pixels():
    from simclr_path.segment.predict import mask_features

    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = 1
    mask[15:25, 15:25] = 0  # a hole of background
    mask[37:40, 0:10] = 2
    mask[0, 39] = 2  # a single pixel: no polygon
    features = mask_features(mask, ["background", "tumour", "stroma"], downsample=4, mpp=0.5)
    assert [f["properties"]["classification"]["name"] for f in features] == ["tumour", "stroma"]
    assert features[0]["properties"]["classification"]["color"] != features[1]["properties"]["classification"]["color"]
    exterior, *holes = (np.array(ring) for ring in features[0]["geometry"]["coordinates"])
    assert len(holes) == 1
    # pixel centres times the downsample: pixels 5..34 -> 22..138, the hole's rim 14..25 -> 58..102
    assert (exterior.min(0).tolist(), exterior.max(0).tolist()) == ([22, 22], [138, 138])
    assert (holes[0].min(0).tolist(), holes[0].max(0).tolist()) == ([58, 58], [102, 102])
    # the hole's rim is traced 8-connected, so its four corners are cut by 4 x 4 / 2 level-0 px triangles
    assert features[0]["properties"]["measurements"]["area_um2"] == pytest.approx((116 ** 2 - (44 ** 2 - 4 * 8)) * 0.25)
    assert mask_features(mask, ["background", "tumour", "stroma"], 4, None)[0]["properties"]["measurements"] == {}
