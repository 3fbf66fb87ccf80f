"""``segment``: plain images as slides, labels on patches, views, FixMatch, run conventions."""

import os
import signal

import cv2
import numpy as np
import pytest
import torch

from cli_helpers import assert_error, one_json, run_cli
from segment_helpers import export_random_encoder, gland_image, gland_set, tile_images
from simclr_path.data.input_spec import InputSpec
from simclr_path.errors import SimclrPathError, StoppedBySignal
from simclr_path.segment.config import SegmentConfig
from simclr_path.segment.data import (CUTMIX_AREA, LABELLED, UNLABELLED, SegmentationSamples, StepBatches, cutmix_boxes,
                                      paste_neighbours)
from simclr_path.segment.labels import IGNORE, load_labels
from simclr_path.store import PatchStore


@pytest.fixture(scope="module")
def glands(tmp_path_factory):
    """Six 192x160 PNG images at 0.5 um/px tiled at 1.0 um/px into 32 px patches (raw codec)."""
    return gland_set(tmp_path_factory.mktemp("glands"), 6)


def labels_folder(tmp_path, masks, names, keep=None):
    """Copy the masks of ``names``; ``keep(mask) -> bool array``: pixels left labelled (others 255)."""
    out = tmp_path / "labels"
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        mask = cv2.imread(str(masks / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        if keep is not None:
            mask = np.where(keep(mask), mask, IGNORE).astype(np.uint8)
        cv2.imwrite(str(out / f"{name}.png"), mask)
    return out


def test_plain_images_are_one_level_slides_with_their_resolution_given(glands, tmp_path):
    root, images, _, store = glands
    summary = PatchStore(str(store))
    assert len(summary) == 6 * (192 // 2 // 32) * (160 // 2 // 32)  # every 32 px cell of the half-size image
    patch = summary[0]
    expected = cv2.resize(gland_image(192, 160, 0)[0][:64, :64], (32, 32), interpolation=cv2.INTER_AREA)
    assert np.abs(patch.astype(int) - expected.astype(int)).mean() < 2  # pixels of img0's top-left corner
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    result = run_cli("tile", images / "img0.png", tmp_path / "broken.png", "--out", tmp_path / "a.h5",
                     "--slide-mpp", "0.5", "--min-tissue", "0", "--patch-size", "32", "--workers", "0", "-q")
    assert result.exit_code == 1 and "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert len(PatchStore(str(tmp_path / "a.h5"))) > 0  # the good image still finished
    result = run_cli("tile", images / "img0.png", "--out", tmp_path / "b.h5", "--workers", "0", "-q")
    assert result.exit_code == 1 and "--slide-mpp" in result.stderr


@pytest.mark.parametrize("downsample", [1, 4])
def test_mask_labels_land_on_their_patches(glands, tmp_path, downsample):
    _, _, masks, store_path = glands
    store = PatchStore(str(store_path))
    full = cv2.imread(str(masks / "img0.png"), cv2.IMREAD_UNCHANGED)
    labels = tmp_path / "labels"
    labels.mkdir()
    cv2.imwrite(str(labels / "img0.png"), full[::downsample, ::downsample])
    label_set = load_labels(str(labels), store)
    assert label_set.classes == ["background", "class1"]
    start, end = next((s, e) for name, s, e in store.slide_ranges() if name == "img0")
    assert sorted(label_set.labelled_indices(store)) == list(range(start, end))
    for index in range(start, end):
        _, x, y = store.coords(index)
        expected = full[y:y + 64:2, x:x + 64:2]  # 64 level-0 px per 32 px patch
        assert np.array_equal(label_set.patch_mask(store, index), expected)
    other = next(s for name, s, e in store.slide_ranges() if name == "img1")
    assert (label_set.patch_mask(store, other) == IGNORE).all()


def test_label_problems_are_one_line_errors(glands, tmp_path):
    _, _, masks, store = glands
    encoder = export_random_encoder(tmp_path / "enc.pt")

    def segment(labels, *extra):
        return run_cli("segment", encoder, store, "--labels", labels, "--out", tmp_path / "run", "--workers", "0",
                       "-q", *extra)

    mask = cv2.imread(str(masks / "img0.png"), cv2.IMREAD_UNCHANGED)
    cases = {
        "wrong_size": ("img0.png", mask[:100, :150], [], "slide img0 is 192x160"),
        "unknown_value": ("img0.png", np.where(mask == 1, 3, mask).astype(np.uint8), ["--classes", "bg,gland"],
                          "class value(s) 3"),
        "unknown_slide": ("nope.png", mask, [], "names a slide of the stores"),
        "nothing_labelled": ("img0.png", np.full_like(mask, IGNORE), [], "no labelled pixel"),
    }
    for name, (file, array, extra, needle) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        cv2.imwrite(str(folder / file), array)
        assert_error(segment(folder, *extra), needle, str(folder))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert_error(segment(tmp_path / "missing"), "no such labels folder")
    assert_error(run_cli("segment", "timm:not_a_model", store, "--labels", labels_folder(tmp_path, masks, ["img0"]),
                         "--out", tmp_path / "r2", "-q"), "not_a_model")


def test_weak_views_move_image_and_mask_together_and_strong_views_keep_the_geometry(glands):
    _, _, masks, store_path = glands
    store = PatchStore(str(store_path))
    labels = load_labels(str(masks.parent / "masks"), store)  # every image labelled
    dataset = SegmentationSamples(store, labels, InputSpec(32, (0.5,) * 3, (0.25,) * 3))
    index = next(i for i in range(len(store)) if 0.2 < (labels.patch_mask(store, i) == 1).mean() < 0.8)
    marker = np.zeros((32, 32, 3), np.uint8)
    marker[2:5, 2:20] = marker[2:12, 2:5] = 255  # an L: each of the 8 flips/rotations looks different
    outcomes = set()
    for seed in range(40):
        image, mask = (t.numpy() for t in dataset[(LABELLED, index, seed)])
        gland = image[..., 1] < 105  # green channel separates glands (40) from stroma (170)
        assert (gland == (mask == 1)).mean() > 0.97
        dataset._seed(seed)
        outcomes.add(dataset.weak(image=marker)["image"].tobytes())
        weak, strong = (t.numpy() for t in dataset[(UNLABELLED, index, seed)])
        assert np.array_equal(weak, dataset[(UNLABELLED, index, seed)][0].numpy())  # a function of the seed
        gray_w, gray_s = weak.astype(float).mean(2), strong.astype(float).mean(2)
        correlation = np.corrcoef(gray_w.ravel(), gray_s.ravel())[0, 1]
        assert abs(correlation) > 0.8  # same geometry: photometric changes only
    assert len(outcomes) >= 6  # flips and rotations really vary (8 dihedral outcomes)


def test_batches_are_a_function_of_seed_and_step():
    labelled, unlabelled = np.arange(10), np.arange(10, 40)
    full = list(StepBatches(labelled, unlabelled, 4, 8, 0, 0, 9))
    assert list(StepBatches(labelled, unlabelled, 4, 8, 0, 5, 9)) == full[5:]
    first_epoch = [k[1] for step in full[:5] for k in step[:4]][:10]
    assert sorted(first_epoch) == list(range(10))  # each labelled patch once per pass
    assert all(k[0] == UNLABELLED and k[1] >= 10 for step in full for k in step[4:])
    assert list(StepBatches(labelled, unlabelled, 4, 8, 1, 0, 9)) != full


def test_cutmix_pastes_a_rectangle_of_the_neighbour_and_its_pseudo_labels_move_with_it():
    boxes = [cutmix_boxes(8, 32, 0.5, seed=3, step=step) for step in range(200)]
    assert all(torch.equal(b, cutmix_boxes(8, 32, 0.5, seed=3, step=i)) for i, b in enumerate(boxes[:5]))
    assert not torch.equal(boxes[0], cutmix_boxes(8, 32, 0.5, seed=4, step=0))
    areas = torch.stack(boxes).float().mean((2, 3)).flatten()
    mixed = areas[areas > 0]
    assert abs(len(mixed) / len(areas) - 0.5) < 0.05  # each patch mixed at the configured rate
    assert mixed.min() >= CUTMIX_AREA[0] * 0.7 and mixed.max() <= CUTMIX_AREA[1] * 1.3  # rounding at 32 px
    for box in torch.stack(boxes).flatten(0, 1)[areas > 0][:50]:  # one axis-aligned rectangle
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and box.sum() == len(rows) * len(cols)
    assert not cutmix_boxes(8, 32, 0.0, 0, 0).any() and not cutmix_boxes(1, 32, 1.0, 0, 0).any()

    # images carry their patch number in every pixel; pseudo-labels and confidence too
    n = 6
    pasted = cutmix_boxes(n, 16, 1.0, seed=0, step=0)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 16, 16)
    labels = torch.arange(n).view(n, 1, 1).expand(n, 16, 16)
    confident = (torch.arange(n) % 2 == 0).view(n, 1, 1).expand(n, 16, 16)
    images, labels, confident = paste_neighbours(pasted, images, labels, confident)
    source = torch.where(pasted, (torch.arange(n).view(n, 1, 1) - 1) % n, torch.arange(n).view(n, 1, 1))
    assert torch.equal(labels, source) and all(torch.equal(images[:, c].long(), source) for c in range(3))
    assert torch.equal(confident, source % 2 == 0)


def _train(glands, tmp_path, out, names=("img0", "img1"), **overrides):
    """A short run on the left 96 px of images ``names`` (labels in ``tmp_path / 'labels-<names>'``)."""
    from simclr_path.segment.train import train_segmentation

    _, _, masks, store = glands
    labels = labels_folder(tmp_path / f"labels-{'-'.join(names)}", masks, names,
                           keep=lambda m: np.arange(m.shape[1])[None, :] < 96)
    cfg = dict(encoder=str(export_random_encoder(tmp_path / "enc.pt", input_mpp=1.0)), batch=4, epochs=3,
               workers=0, log_every=1, checkpoint_every=100, ssl="fixmatch", threshold=0.6, image_size=32)
    cfg.update(overrides)
    return train_segmentation([str(store)], str(labels), str(out), SegmentConfig(**cfg), progress=False)


def test_resume_is_exact_for_student_teacher_and_optimizer(glands, tmp_path):
    straight = _train(glands, tmp_path, tmp_path / "straight", max_steps=4)
    _train(glands, tmp_path, tmp_path / "resumed", max_steps=2)
    resumed = _train(glands, tmp_path, tmp_path / "resumed", max_steps=4, workers=2)
    assert straight["step"] == resumed["step"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for part in ("model", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    records = [line for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4  # steps 1..4 once each
    for name in ("config.yaml", "curves.png", "metrics.jsonl"):
        assert (tmp_path / "resumed" / name).exists()


def test_pseudo_labels_only_where_the_teacher_is_confident(glands, tmp_path):
    import simclr_path.segment.train as train_module

    seen = []
    original = train_module.train_step

    def recording(run, batch):
        weight = train_module.unsup_weight(run)
        losses = original(run, batch)
        seen.append({"weight": weight, **{k: float(v) for k, v in losses.items()}})
        return losses

    train_module.train_step = recording
    try:
        _train(glands, tmp_path, tmp_path / "sure", max_steps=1, threshold=0.5)  # 2 classes: always confident
        _train(glands, tmp_path, tmp_path / "never", max_steps=1, threshold=0.9999)
    finally:
        train_module.train_step = original
    sure, never = seen
    assert sure["confident"] == 1.0 and sure["unsup_loss"] > 0.1
    assert never["confident"] < 0.01 and never["unsup_loss"] < 1e-3
    for record in (sure, never):
        assert 0 < record["weight"] < 1  # the first step of the ramp-up
        assert record["loss"] == pytest.approx(record["sup_loss"] + record["weight"] * record["unsup_loss"], abs=1e-5)


def test_a_run_saved_before_cutmix_reads_as_trained_without_it():
    old = SegmentConfig(encoder="e.pt", ssl="fixmatch").as_dict()
    del old["cutmix"]
    assert SegmentConfig.from_dict(old).cutmix == 0.0  # so resuming it with --cutmix 0.5 is refused as a change


def test_strong_views_leave_the_running_statistics_to_the_labelled_images(glands, tmp_path):
    """After a step, the student's batch-norm running statistics are the ones a supervised-only run
    has: strong views (stain, colour, CutMix) normalise themselves but never shift what the teacher
    and inference normalise with."""
    _train(glands, tmp_path, tmp_path / "sup", max_steps=1, ssl="none")
    _train(glands, tmp_path, tmp_path / "fix", max_steps=1, ssl="fixmatch")
    sup = torch.load(tmp_path / "sup" / "checkpoint.pt", weights_only=True)["model"]
    fix = torch.load(tmp_path / "fix" / "checkpoint.pt", weights_only=True)["model"]
    keys = [k for k in sup if k.endswith(("running_mean", "running_var"))]
    assert len(keys) > 10
    for key in keys:
        assert torch.allclose(sup[key], fix[key], atol=1e-6), key
    assert any(not torch.equal(sup[k], fix[k]) for k in sup if k.endswith("weight"))  # the strong views did train


def test_sigterm_checkpoints_and_the_same_command_resumes(glands, tmp_path, monkeypatch):
    import simclr_path.segment.train as train_module

    original = train_module.train_step

    def then_sigterm(run, batch):
        losses = original(run, batch)
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    monkeypatch.setattr(train_module, "train_step", then_sigterm)
    with pytest.raises(StoppedBySignal, match="after step 2"):
        _train(glands, tmp_path, tmp_path / "run", max_steps=5)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train_module, "train_step", original)
    assert _train(glands, tmp_path, tmp_path / "run", max_steps=5)["step"] == 5
    with pytest.raises(SimclrPathError, match="other settings"):
        _train(glands, tmp_path, tmp_path / "run", max_steps=6, ssl="none")
    with pytest.raises(SimclrPathError, match="the labels or the stores"):  # same settings, other labels
        _train(glands, tmp_path, tmp_path / "run", max_steps=6, names=("img0",))


def test_unet_encoder_is_the_export_with_every_key(tmp_path):
    from simclr_path.downstream.encoder import read_encoder
    from simclr_path.segment.model import unet_from_encoder

    path = export_random_encoder(tmp_path / "enc.pt", seed=3)
    unet, _ = unet_from_encoder(str(path), 3)
    weights, _ = read_encoder(str(path))
    state = unet.encoder.state_dict()
    assert len(state) == len(weights)
    for key, value in weights.items():
        assert torch.equal(state[f"model.{key}"], value)


@pytest.mark.slow
def test_segment_learns_glands_from_half_labelled_images(glands, tmp_path):
    from simclr_path.segment.model import load_segment_run

    _, _, masks, store_path = glands
    out = tmp_path / "run"
    labels = labels_folder(tmp_path, masks, ["img0", "img1", "img2"], keep=lambda m: np.arange(m.shape[1])[None, :] < 96)
    result = one_json(run_cli("segment", "timm:resnet10t", store_path, "--labels", labels, "--out", out,
                              "--epochs", "12", "--batch", "8", "--image-size", "32", "--workers", "0", "-q"))
    assert result["labelled_patches"] == 3 * 2 * 2 and result["last_loss"] < result["first_loss"]
    model, meta = load_segment_run(str(out))
    store = PatchStore(str(store_path))
    label_set = load_labels(str(masks), store)
    held_out = [i for name, s, e in store.slide_ranges() if name in ("img4", "img5") for i in range(s, e)]
    from simclr_path.data.normalize import normalize

    images = torch.from_numpy(np.stack([store[i] for i in held_out])).permute(0, 3, 1, 2)
    with torch.no_grad():
        predicted = model(normalize(images, meta["mean"], meta["std"])).argmax(1).numpy()
    truth = np.stack([label_set.patch_mask(store, i) for i in held_out])
    assert (predicted == truth).mean() > 0.9


def test_qupath_geojson_labels_paint_small_inside_large_and_leave_the_rest_unlabelled(glands, tmp_path):
    from simclr_path.annotations.geojson import annotation_feature, write_geojson

    _, _, _, store_path = glands
    store = PatchStore(str(store_path))
    labels = tmp_path / "labels"
    labels.mkdir()
    square = lambda x0, y0, x1, y1: np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)  # noqa: E731
    write_geojson(labels / "img0.geojson", [
        annotation_feature(square(32, 32, 96, 96), classification="gland", color=(0, 200, 0)),
        annotation_feature(square(0, 0, 128, 128), classification="background", color=(200, 200, 200)),
    ])
    label_set = load_labels(str(labels), store, ["background", "gland"])
    start, end = next((s, e) for name, s, e in store.slide_ranges() if name == "img0")
    expected = np.full((160, 192), IGNORE, np.uint8)
    expected[:128, :128] = 0
    expected[32:96, 32:96] = 1
    labelled = set(label_set.labelled_indices(store).tolist())
    for index in range(start, end):
        _, x, y = store.coords(index)
        assert np.array_equal(label_set.patch_mask(store, index), expected[y:y + 64:2, x:x + 64:2])
        assert (index in labelled) == (x < 128 and y < 128)
    with pytest.raises(SimclrPathError, match="--classes"):
        load_labels(str(labels), store, None)
    with pytest.raises(SimclrPathError, match="'gland' is not one of the classes"):
        load_labels(str(labels), store, ["background", "tumour"])


def test_select_ranks_by_a_segment_models_entropy_and_skips_the_labelled_regions(glands, tmp_path):
    import csv

    _, _, _, store = glands
    _train(glands, tmp_path, tmp_path / "run", max_steps=2, ssl="none")
    labels = tmp_path / "labels-img0-img1" / "labels"  # written by _train: the left 96 px of img0 and img1
    for strategy in ("entropy", "hybrid"):
        out = tmp_path / strategy
        result = one_json(run_cli("select", tmp_path / "enc.pt", store, "--budget", "5", "--region-size", "1",
                                  "--strategy", strategy, "--model", tmp_path / "run", "--annotated", labels,
                                  "--out", out, "--workers", "0", "-q"))
        assert result["regions_annotated"] == 2 * 2 * 2  # two images x two labelled columns x two rows
        with open(out / "regions.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 5
        assert not any(r["slide"] in ("img0", "img1") and int(r["x"]) < 96 for r in rows)
        scores = [float(r["score"]) for r in rows]
        assert all(0 <= s <= 1 for s in scores)
        if strategy == "entropy":
            assert scores == sorted(scores, reverse=True)


def test_a_folder_of_slides_ignores_the_pngs_beside_them_and_a_folder_of_images_takes_them(tmp_path):
    from synthetic import tissue_image, write_slide

    from simclr_path.wsi.discover import find_slides

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", tissue_image(256, 256), levels=1)
    cv2.imwrite(str(slides / "a.png"), np.zeros((8, 8), np.uint8))  # a thumbnail or a mask
    assert find_slides([str(slides)]) == [str(slides / "a.tif")]
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x.jpg", "y.png"):
        cv2.imwrite(str(images / name), np.zeros((8, 8, 3), np.uint8))
    assert find_slides([str(images)]) == [str(images / "x.jpg"), str(images / "y.png")]


def test_steps_set_the_schedule_and_the_unsupervised_weight_ramps_up(glands, tmp_path):
    from simclr_path.segment.train import build_segment_run, unsup_weight

    _, _, masks, store = glands
    labels = labels_folder(tmp_path, masks, ["img0"])
    cfg = SegmentConfig(encoder=str(export_random_encoder(tmp_path / "enc.pt")), steps=50, rampup=0.2, ssl="fixmatch",
                        image_size=32, workers=0)
    run = build_segment_run([str(store)], str(labels), str(tmp_path / "run"), cfg)
    assert run.total_steps == run.schedule_steps == 50
    weights = []
    for step in (0, 4, 9, 10, 40):
        run.step = step
        weights.append(unsup_weight(run))
    assert weights == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    run.scheduler.step_update(50)
    assert run.optimizer.param_groups[1]["lr"] == pytest.approx(0.0, abs=1e-9)
    result = run_cli("segment", tmp_path / "enc.pt", store, "--labels", labels, "--out", tmp_path / "r",
                     "--epochs", "2", "--steps", "5")
    assert_error(result, "--epochs or --steps")


def test_fixmatch_defaults_to_a_longer_schedule_than_supervised_training(glands, tmp_path):
    """FixMatch's teacher needs more steps to pay off than fine-tuning does: without --epochs or
    --steps a new FixMatch run's schedule is FIXMATCH_EPOCHS passes over the labelled patches, and
    config.yaml records the number."""
    import yaml

    from simclr_path.segment.config import FIXMATCH_EPOCHS, SUPERVISED_EPOCHS
    from simclr_path.segment.train import build_segment_run

    _, _, masks, store = glands
    labels = labels_folder(tmp_path, masks, ["img0"])
    encoder = export_random_encoder(tmp_path / "enc.pt")
    assert FIXMATCH_EPOCHS > SUPERVISED_EPOCHS
    for ssl in ("none", "fixmatch"):
        cfg = SegmentConfig(encoder=str(encoder), ssl=ssl, batch=4, image_size=32, workers=0)
        run = build_segment_run([str(store)], str(labels), str(tmp_path / ssl), cfg)
        per_epoch = -(-len(run.labelled) // 4)
        assert run.schedule_steps == per_epoch * (FIXMATCH_EPOCHS if ssl == "fixmatch" else SUPERVISED_EPOCHS)
    one_json(run_cli("segment", encoder, store, "--labels", labels, "--out", tmp_path / "cli", "--ssl", "fixmatch",
                     "--image-size", "32", "--max-steps", "1", "--workers", "0", "-q"))
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["epochs"] == FIXMATCH_EPOCHS


def test_a_run_begun_with_the_old_schedule_resumes_without_epochs(glands, tmp_path):
    """A FixMatch run started when every run defaulted to 30 epochs resumes with the same command
    (no --epochs): it keeps the schedule it began with instead of being refused as changed."""
    _train(glands, tmp_path, tmp_path / "run", max_steps=1, epochs=30)
    resumed = _train(glands, tmp_path, tmp_path / "run", max_steps=2, epochs=None)
    assert resumed["step"] == 2
    assert SegmentConfig.from_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]).epochs == 30


def test_a_proposed_square_exported_back_from_qupath_is_labelled_whole(glands, tmp_path):
    import json

    _, _, _, store_path = glands
    encoder = export_random_encoder(tmp_path / "enc.pt")
    one_json(run_cli("select", encoder, store_path, "--budget", "2", "--region-size", "1", "--out", tmp_path / "round1",
                     "--workers", "0", "-q"))
    proposal = next((tmp_path / "round1").glob("*.geojson"))
    data = json.loads(proposal.read_text())
    proposed = len(data["features"])
    x0, y0 = data["features"][0]["geometry"]["coordinates"][0][0]
    gland = [[x0 + 16, y0 + 16], [x0 + 48, y0 + 16], [x0 + 48, y0 + 48], [x0 + 16, y0 + 48], [x0 + 16, y0 + 16]]
    data["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [gland]},
                             "properties": {"objectType": "annotation", "classification": {"name": "gland",
                                                                                           "color": [255, 0, 0]}}})
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / proposal.name).write_text(json.dumps(data))  # what QuPath exports: the squares and the drawing
    store = PatchStore(str(store_path))
    label_set = load_labels(str(labels), store, ["background", "gland"])
    masks_by_xy = {}
    for index in label_set.labelled_indices(store):
        slide, x, y = store.coords(index)
        assert slide == proposal.stem
        masks_by_xy[(x, y)] = label_set.patch_mask(store, index)
    assert len(masks_by_xy) == proposed  # the proposed patches of this slide, nothing else
    first = masks_by_xy[(int(x0), int(y0))]
    expected = np.zeros((32, 32), np.uint8)
    expected[8:24, 8:24] = 1  # the gland; the rest of the square is background, not unlabelled
    assert np.array_equal(first, expected)


def test_stores_at_another_resolution_than_the_run_are_refused(glands, tmp_path):
    _, images, _, _ = glands
    _train(glands, tmp_path, tmp_path / "run", max_steps=1, ssl="none")
    finer = tile_images([images / "img0.png"], tmp_path / "finer.h5", slide_mpp=0.5, mpp=0.5, patch_size=32)
    result = run_cli("predict", tmp_path / "run", finer, "--out", tmp_path / "pred", "--workers", "0", "-q")
    assert_error(result, "finer.h5", "--mpp 1")
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("image_size", [64, 32])
def test_a_patch_enters_the_network_identically_in_training_and_at_inference(glands, tmp_path, image_size):
    """Training's input of a patch (the loader's resize, then model_input) is, up to the weak view's
    flip/rotation, the very tensor segment-eval and predict feed for it, read back from the run."""
    from simclr_path.segment.infer import _PatchInputs
    from simclr_path.segment.model import load_segment_run
    from simclr_path.segment.train import build_segment_run, model_input

    _train(glands, tmp_path, tmp_path / "run", max_steps=1, ssl="none", image_size=image_size)
    _, meta = load_segment_run(str(tmp_path / "run"))
    run = build_segment_run([str(glands[3])], str(tmp_path / "labels-img0-img1" / "labels"), str(tmp_path / "other"),
                            SegmentConfig(**SegmentConfig.from_dict(
                                yaml_config(tmp_path / "run" / "config.yaml")).__dict__))
    dataset = SegmentationSamples(run.store, run.labels, run.spec)
    index = int(run.labelled[0])
    image, _ = dataset[(LABELLED, index, 0)]
    trained = model_input(image[None], run)[0]
    inference_uint8 = _PatchInputs(run.store, InputSpec.from_meta(meta))[index][0]
    inference = InputSpec.from_meta(meta).to_model(inference_uint8[None])[0]
    assert trained.shape == inference.shape == (3, image_size, image_size)
    views = [torch.rot90(inference, k, dims=(1, 2)) for k in range(4)]
    views += [torch.flip(v, dims=(2,)) for v in views]
    assert any(torch.equal(trained, v) for v in views)


def yaml_config(path):
    import yaml

    return yaml.safe_load(open(path))


def test_a_frozen_encoder_is_left_exactly_as_given_then_joins_training(glands, tmp_path):
    """--freeze-encoder-steps N: for N steps the decoder learns and the encoder's weights and
    batch-norm statistics stay those of the export (a step that touched either would be a silent
    fine-tune); from step N + 1 the encoder trains, on the CLI as in the library."""
    from simclr_path.segment.train import build_segment_run

    initial = _train(glands, tmp_path, tmp_path / "frozen", max_steps=3, ssl="fixmatch", freeze_encoder_steps=3)
    # released after one step: two encoder steps (the export's residual branches end in zero-initialised
    # batch-norm weights, so their convolutions get a gradient from the second encoder step on)
    _train(glands, tmp_path, tmp_path / "joined", max_steps=3, ssl="none", freeze_encoder_steps=1)
    cfg = yaml_config(tmp_path / "frozen" / "config.yaml")
    cfg.update(freeze_encoder_steps=0, ssl="none")
    _, _, _, store = glands
    initial = build_segment_run([str(store)], str(tmp_path / "labels-img0-img1" / "labels"), str(tmp_path / "fresh"),
                                SegmentConfig(**cfg)).model.state_dict()
    frozen = torch.load(tmp_path / "frozen" / "checkpoint.pt", weights_only=True)
    joined = torch.load(tmp_path / "joined" / "checkpoint.pt", weights_only=True)["model"]
    encoder = [k for k in initial if k.startswith("encoder.")]
    assert len(encoder) > 50
    for key in encoder:
        assert torch.equal(frozen["model"][key], initial[key]), key
        assert torch.allclose(frozen["teacher"][key].float(), initial[key].float(), atol=1e-6), key  # EMA of equals
    decoder = [k for k in initial if k.startswith("decoder.") and k.endswith("weight")]
    assert all(not torch.equal(frozen["model"][k], initial[k]) for k in decoder)  # the decoder did learn
    weights = [k for k in encoder if k.endswith("weight")]
    assert [k for k in weights if torch.equal(joined[k], initial[k])] == []  # released: every weight moved
    _, _, masks, store = glands
    labels = labels_folder(tmp_path / "cli-labels", masks, ["img0"])
    assert_error(run_cli("segment", tmp_path / "enc.pt", store, "--labels", labels, "--out", tmp_path / "cli",
                         "--freeze-encoder-steps", "-1", "-q"), "--freeze-encoder-steps must be >= 0")
    partial = run_cli("segment", tmp_path / "enc.pt", store, "--labels", labels, "--out", tmp_path / "cli",
                      "--freeze-encoder-steps", "5", "--recalibrate-bn", "--max-steps", "1", "--workers", "0",
                      "--image-size", "32", "-q")
    assert one_json(partial)["step"] == 1
    assert "spans the whole" not in partial.stderr  # --max-steps stops early; the schedule is longer than 5
    saved = yaml_config(tmp_path / "cli" / "config.yaml")
    assert saved["freeze_encoder_steps"] == 5 and saved["recalibrate_bn"] is True
    # a freeze as long as the schedule is a decoder-only fit: allowed, and said; on a random encoder, warned
    whole = run_cli("segment", tmp_path / "enc.pt", store, "--labels", labels, "--out", tmp_path / "whole",
                    "--freeze-encoder-steps", "2", "--steps", "2", "--workers", "0", "--image-size", "32", "-q")
    assert one_json(whole)["step"] == 2 and "spans the whole 2-step schedule" in whole.stderr
    frozen_random = run_cli("segment", "timm:resnet18", store, "--labels", labels, "--out", tmp_path / "random",
                            "--freeze-encoder-steps", "1", "--max-steps", "1", "--workers", "0", "--image-size", "32",
                            "-q")
    assert one_json(frozen_random)["step"] == 1
    assert "warning: timm:resnet18 is a random-init encoder and --freeze-encoder-steps is" in frozen_random.stderr
    resumed = run_cli("segment", "timm:resnet18", store, "--labels", labels, "--out", tmp_path / "random",
                      "--freeze-encoder-steps", "1", "--max-steps", "2", "--workers", "0", "--image-size", "32", "-q")
    assert one_json(resumed)["step"] == 2 and "random-init encoder" not in resumed.stderr  # said once, at the start
    plain = run_cli("segment", "timm:resnet18", store, "--labels", labels, "--out", tmp_path / "plain",
                    "--max-steps", "1", "--workers", "0", "--image-size", "32", "-q")
    assert one_json(plain)["step"] == 1 and "random-init encoder" not in plain.stderr


def test_recalibrated_batch_norm_holds_the_statistics_of_the_stores_patches(glands, tmp_path):
    """--recalibrate-bn: the encoder's first batch norm holds the mean and variance of its input
    over the store's patches as inference feeds them - not the statistics the export brought, and
    with no weight changed."""
    from simclr_path.segment.config import SegmentConfig
    from simclr_path.segment.train import build_segment_run

    _, _, masks, store_path = glands
    encoder = export_random_encoder(tmp_path / "enc.pt", input_mpp=1.0)
    labels = labels_folder(tmp_path, masks, ["img0"])
    cfg = dict(encoder=str(encoder), image_size=32, workers=0, device="cpu")
    plain = build_segment_run([str(store_path)], str(labels), str(tmp_path / "a"), SegmentConfig(**cfg))
    run = build_segment_run([str(store_path)], str(labels), str(tmp_path / "b"),
                            SegmentConfig(**cfg, recalibrate_bn=True))
    store = PatchStore(str(store_path))
    assert len(store) <= 64  # one batch: the running statistics are that batch's exactly
    images = torch.from_numpy(np.stack([run.spec.resize(store[i]) for i in range(len(store))]))
    conv, bn = run.model.encoder.model.conv1[:2]  # resnet10t's stem: the first convolution and its batch norm
    with torch.no_grad():
        first = conv(run.spec.to_model(images, "cpu", layout="NHWC")).double()
    mean, var = first.mean((0, 2, 3)), first.var((0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean.double(), mean, atol=1e-4)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(plain.model.encoder.model.conv1[1].running_var, bn.running_var, rtol=0.05)
    for (key, a), b in zip(plain.model.state_dict().items(), run.model.state_dict().values()):
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(a, b), key


def test_recalibrated_batch_norm_statistics_are_the_ones_training_and_inference_use(glands, tmp_path, monkeypatch):
    """--recalibrate-bn holds the re-estimated statistics through training (student and FixMatch
    teacher), while the encoder's weights and batch-norm scales learn; without it, training mode
    overwrites the running statistics at every step, so re-estimating them alone would change nothing."""
    from simclr_path.segment import train as segment_train
    from simclr_path.segment.train import build_segment_run

    modes = []  # every encoder batch norm's mode at every forward of every step (labelled and strong passes)

    def watched_step(run, batch):
        layers = [m for m in run.model.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        hooks = [m.register_forward_pre_hook(lambda m, _: modes.append(m.training)) for m in layers]
        try:
            return original_step(run, batch)
        finally:
            for hook in hooks:
                hook.remove()

    original_step = segment_train.train_step
    monkeypatch.setattr(segment_train, "train_step", watched_step)
    held = _train(glands, tmp_path, tmp_path / "held", max_steps=3, recalibrate_bn=True)
    monkeypatch.undo()
    assert len(modes) > 30 and not any(modes)  # normalised with the held statistics, never a batch's
    _train(glands, tmp_path, tmp_path / "plain", max_steps=3)
    assert held["step"] == 3
    cfg = yaml_config(tmp_path / "held" / "config.yaml")
    _, _, _, store = glands
    labels = str(tmp_path / "labels-img0-img1" / "labels")
    start = build_segment_run([str(store)], labels, str(tmp_path / "fresh"), SegmentConfig(**cfg)).model.state_dict()
    cfg["recalibrate_bn"] = False
    export = build_segment_run([str(store)], labels, str(tmp_path / "export"), SegmentConfig(**cfg)).model.state_dict()
    trained = torch.load(tmp_path / "held" / "checkpoint.pt", weights_only=True)
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    stats = [k for k in start if k.startswith("encoder.") and k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    for key in stats:
        assert torch.equal(trained["model"][key], start[key]), key
        assert torch.equal(trained["teacher"][key], start[key]), key
    assert all(not torch.equal(plain[k], export[k]) for k in stats)  # plain training moved the export's
    scales = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    assert any(not torch.equal(trained["model"][k], start[k]) for k in scales)  # the scales still learn
