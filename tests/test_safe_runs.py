"""Runs that never lose or corrupt work, and files that are not what a command expects: one line
that says what is wrong, never a traceback."""

import os
import signal
import time

import cv2
import numpy as np
import pytest
import torch

from cli_helpers import assert_error, one_json, run_cli
from segment_helpers import export_random_encoder, tile_images, write_gland_images

TINY_PRETRAIN = ["--backbone", "resnet10t", "--batch", 16, "--image-size", 32, "--device", "cpu", "--workers", 0,
                 "-q"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A pretraining run stopped at step 1 of its schedule (--max-steps), on 24 random 64 px patches."""
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    # QC takes some coloured noise for ink: off, so every patch trains
    one_json(run_cli("ingest", root / "images", "--out", root / "s.h5", "--no-labels", "--mpp", 0.5, "--qc", "off"))
    summary = one_json(run_cli("pretrain", root / "s.h5", "--out", root / "run", *TINY_PRETRAIN, "--max-steps", 1))
    assert summary["step"] == 1 < summary["total_steps"]
    return root, root / "run"


@pytest.fixture(scope="module")
def glands(tmp_path_factory):
    """Two gland images tiled into 32 px patches, their masks, an encoder, and a 2-step segment run."""
    root = tmp_path_factory.mktemp("glands")
    images, masks = write_gland_images(root, 2)
    store = tile_images(sorted(images.iterdir()), root / "glands.h5", slide_mpp=0.5, mpp=1.0, patch_size=32)
    encoder = export_random_encoder(root / "enc.pt", input_mpp=1.0)
    one_json(run_cli("segment", encoder, store, "--labels", masks, "--out", root / "seg", *SEGMENT_ARGS,
                     "--max-steps", 2))
    return root, store, masks, encoder


SEGMENT_ARGS = ["--workers", 0, "--batch", 4, "--image-size", 32, "--device", "cpu", "-q"]


def _broken_files(folder):
    """Files that are not torch files, by kind."""
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("hello\nworld\n")  # torch reads this as KeyError('101')
    (folder / "json.pt").write_text('{"a": 1}\n')  # ... and this as its weights_only essay
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1)}, folder / "objects.pt")  # as many training scripts save
    good = (folder / "good.pt")
    torch.save({"x": torch.zeros(1000)}, good)
    (folder / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    return {"empty.pt": "empty, 0 bytes", "text.pt": "a text file", "json.pt": "a text file",
            "objects.pt": "Python objects", "truncated.pt": "truncated"}


def test_files_that_are_not_encoders_say_what_they_are(glands, tiny_run, tmp_path):
    root, store, masks, _ = glands
    for name, what in _broken_files(tmp_path).items():
        for args in (("embed", tmp_path / name, store, "--out", tmp_path / "f"),
                     ("segment", tmp_path / name, store, "--labels", masks, "--out", tmp_path / "seg", *SEGMENT_ARGS)):
            result = run_cli(*args)
            assert_error(result, name, "not a readable encoder file", what, "simclr-path export")
            assert "weights_only` argument" not in result.stderr and "(101)" not in result.stderr
    _, run = tiny_run
    assert_error(run_cli("embed", run / "checkpoint.pt", store, "--out", tmp_path / "f"),
                 "a pretraining checkpoint, not an encoder", "export it first")
    assert_error(run_cli("segment", run, store, "--labels", masks, "--out", tmp_path / "seg", *SEGMENT_ARGS),
                 "a run folder", "export it first")
    assert_error(run_cli("embed", root / "seg" / "checkpoint.pt", store, "--out", tmp_path / "f"),
                 "'simclr-path segment' checkpoint, not an encoder")


def test_files_that_are_not_checkpoints_say_what_they_are(glands, tmp_path):
    root, _, _, encoder = glands
    for name, what in _broken_files(tmp_path).items():
        for command in ("export", "segment-eval"):
            args = (tmp_path / name, tmp_path / "out.pt") if command == "export" else \
                (tmp_path / name, glands[1], "--labels", glands[2])
            assert_error(run_cli(command, *args), name, "not a readable checkpoint", what)
    assert_error(run_cli("export", encoder, tmp_path / "out.pt"), "an exported encoder, not a training checkpoint")


def test_export_never_writes_over_the_checkpoint_it_exports(tiny_run, tmp_path):
    _, run = tiny_run
    before = (run / "checkpoint.pt").read_bytes()
    assert_error(run_cli("export", run, run / "checkpoint.pt"), "checkpoint being exported", "another OUT")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(before)
    assert_error(run_cli("export", copy, copy), "checkpoint being exported")
    os.symlink(run / "checkpoint.pt", tmp_path / "link.pt")
    assert_error(run_cli("export", run, tmp_path / "link.pt"), "checkpoint being exported")
    assert (run / "checkpoint.pt").read_bytes() == before == copy.read_bytes()


def test_export_of_a_segment_run_is_a_one_line_error(glands, tmp_path):
    root = glands[0]
    assert_error(run_cli("export", root / "seg", tmp_path / "enc.pt"), "'simclr-path segment' run",
                 "not a pretraining run")
    assert not (tmp_path / "enc.pt").exists()


def test_export_of_an_unfinished_run_says_so(tiny_run, tmp_path):
    _, run = tiny_run
    result = run_cli("export", run, tmp_path / "enc.pt")
    summary = one_json(result)
    assert summary["steps"] == 1 and summary["total_steps"] > 1 and summary["finished"] is False
    assert f"unfinished, step 1 of {summary['total_steps']}" in result.stderr


def _segment(glands, out, *args):
    _, store, masks, encoder = glands
    return run_cli("segment", encoder, store, "--labels", masks, "--out", out, "--batch", 4, "--image-size", 32,
                   "--device", "cpu", "-q", "--checkpoint-every", 100, *args)


@pytest.mark.slow
def test_sigterm_to_segment_and_its_workers_checkpoints_and_exits_143(glands, tmp_path):
    """scancel signals every process of the job: the loader workers ignore SIGTERM (as pretrain's do),
    so the run finishes its step, checkpoints it and exits 143 instead of dying in a DataLoader
    traceback; the same command resumes."""
    import subprocess
    import sys

    _, store, masks, encoder = glands
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "simclr_path", "segment", str(encoder), str(store), "--labels", str(masks),
           "--out", str(run), "--workers", "2", "--batch", "4", "--image-size", "32", "--device", "cpu", "-q",
           "--log-every", "1", "--checkpoint-every", "1000", "--steps", "5000"]
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                            start_new_session=True)  # its own process group, as a job step is
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its workers, as scancel does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped on SIGTERM after step" in stderr and "Traceback" not in stderr
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 3  # progress since the last scheduled checkpoint (none) was kept
    resumed = run_cli("segment", encoder, store, "--labels", masks, "--out", run, "--workers", 0, "--batch", 4,
                      "--image-size", 32, "--device", "cpu", "-q", "--log-every", 1, "--checkpoint-every", 1000,
                      "--steps", 5000, "--max-steps", step + 1)
    assert one_json(resumed)["step"] == step + 1 and f"resuming at step {step}" in resumed.stderr


def test_ctrl_c_between_segment_steps_checkpoints_the_last_one(glands, tmp_path, monkeypatch):
    """Ctrl-C keeps the steps done since the last --checkpoint-every (they were lost) and exits 130."""
    import simclr_path.segment.train as train_module

    original = train_module.train_step

    def then_interrupt(run, batch):
        losses = original(run, batch)
        if run.step == 3:
            raise KeyboardInterrupt
        return losses

    monkeypatch.setattr(train_module, "train_step", then_interrupt)
    result = _segment(glands, tmp_path / "run", "--workers", 0, "--max-steps", 6)
    assert result.exit_code == 130 and "rerun the same command to resume" in result.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3


def test_ctrl_c_inside_an_update_keeps_the_checkpoint_before_it(glands, tmp_path, monkeypatch):
    """An update the interrupt cut in half is never saved: the last checkpoint stays."""
    calls = []
    original = torch.optim.AdamW.step

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    result = _segment(glands, tmp_path / "run", "--workers", 0, "--max-steps", 6, "--checkpoint-every", 2)
    assert result.exit_code == 130
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_second_segment_into_the_same_folder_is_refused(glands, tmp_path):
    from simclr_path.runtime.files import locked_run_folder

    with locked_run_folder(str(tmp_path / "run"), "simclr-path segment"):  # a run in another process
        result = _segment(glands, tmp_path / "run", "--workers", 0, "--max-steps", 1)
        assert_error(result, "another 'simclr-path segment' is running in this folder", "another --out")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert one_json(_segment(glands, tmp_path / "run", "--workers", 0, "--max-steps", 1))["step"] == 1
    assert_error(_segment(glands, tmp_path / "refused", "--workers", 0, "--classes", "a"), "--classes")
    assert not (tmp_path / "refused").exists()  # a refused run leaves no folder behind


def test_a_zero_byte_mask_png_is_a_one_line_error(glands, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "img0.png").write_bytes(b"")  # cv2.imdecode raised on it
    _, store, _, encoder = glands
    result = run_cli("segment", encoder, store, "--labels", labels, "--out", tmp_path / "run", *SEGMENT_ARGS)
    assert_error(result, "img0.png", "not a readable PNG mask")


def test_an_unclassified_geojson_polygon_says_so(glands, tmp_path):
    import json

    labels = tmp_path / "labels"
    labels.mkdir()
    square = [[[0, 0], [60, 0], [60, 60], [0, 60], [0, 0]]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
               "properties": {"objectType": "annotation", "name": "gland 3"}}
    (labels / "img0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    _, store, _, encoder = glands
    result = run_cli("segment", encoder, store, "--labels", labels, "--classes", "background,gland", "--out",
                     tmp_path / "run", *SEGMENT_ARGS)
    assert_error(result, "img0.geojson", "no classification", "'gland 3'", "classify it in QuPath")
    assert "None" not in result.stderr


def test_eval_max_per_class_below_one_is_a_one_line_error(glands, tmp_path):
    encoder = glands[3]
    for bad in (0, -1):
        assert_error(run_cli("eval", encoder, "--labeled", tmp_path, "--max-per-class", bad, "--device", "cpu"),
                     f"--max-per-class must be 1 or more, got {bad}")


@pytest.mark.parametrize("objective_power", [None, 20.0])
def test_a_slide_without_mpp_is_told_magnification_only_when_it_has_objective_power(objective_power):
    from simclr_path.errors import SlideError
    from simclr_path.wsi.grid import TileSpec, plan_patches
    from simclr_path.wsi.slide import SlideMeta

    meta = SlideMeta(path="core.png", fingerprint="f", vendor="", level_dimensions=((640, 480),),
                     level_downsamples=(1.0,), mpp=None, mpp_source="none", objective_power=objective_power)
    with pytest.raises(SlideError, match="--slide-mpp") as raised:
        plan_patches(meta, TileSpec(target_mpp=0.5), lambda downsample: 0)
    assert ("--magnification" in str(raised.value)) == (objective_power is not None)


def test_resume_after_the_store_grew_names_the_store_change(tiny_run, tmp_path):
    root, _ = tiny_run
    store = tmp_path / "s.h5"
    one_json(run_cli("ingest", root / "images", "--out", store, "--no-labels", "--mpp", 0.5, "--qc", "off"))
    run = tmp_path / "run"
    one_json(run_cli("pretrain", store, "--out", run, *TINY_PRETRAIN, "--max-steps", 1))
    bigger = tmp_path / "images"
    for copy in ("a", "b"):
        (bigger / copy).mkdir(parents=True)
        for image in (root / "images" / "a").iterdir():
            (bigger / copy / image.name).write_bytes(image.read_bytes())
    one_json(run_cli("ingest", bigger, "--out", tmp_path / "grown.h5", "--no-labels", "--mpp", 0.5, "--qc", "off"))
    os.replace(tmp_path / "grown.h5", store)  # the same store path, now with more patches
    assert_error(run_cli("pretrain", store, "--out", run, *TINY_PRETRAIN, "--max-steps", 2),
                 "the stores changed since this run started", "24 patches then, 48 now", "new --out")


def test_first_line_of_an_empty_message_is_the_exception_type():
    from simclr_path.errors import first_line

    assert first_line(EOFError()) == "EOFError"
    assert first_line(RuntimeError("\n  \nsecond line\nthird")) == "second line"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10


def _two_class_folder(root, classes=("a", "b"), count=6):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cv2.imwrite(str(root / c / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("case", ["eval-batch-0", "eval-workers", "eval-seed", "eval-empty-image",
                                  "eval-one-class-store", "export-into-folder", "export-unwritable",
                                  "predict-batch-0", "predict-an-encoder", "pretrained-text"])
def test_more_bad_input_is_one_line_and_writes_nothing(glands, tiny_run, tmp_path, case):
    root, store, _, encoder = glands
    labeled = _two_class_folder(tmp_path / "labeled")
    if case.startswith("eval-"):
        args = ["eval", encoder, "--labeled", labeled, "--device", "cpu", "--workers", 0]
        needles = {"eval-batch-0": ("--batch must be >= 1",), "eval-workers": ("--workers must be >= 0",),
                   "eval-seed": ("--seed must be >= 0",), "eval-empty-image": ("0.png", "empty"),
                   "eval-one-class-store": ("one.h5", "at least two classes")}[case]
        if case == "eval-batch-0":
            args += ["--batch", 0]
        elif case == "eval-workers":
            args[-1] = -1
        elif case == "eval-seed":
            args += ["--seed", -1]
        elif case == "eval-empty-image":
            (labeled / "a" / "0.png").write_bytes(b"")  # cv2.imdecode raised on it
        else:
            one = _two_class_folder(tmp_path / "one", classes=("a",))
            one_json(run_cli("ingest", one, "--out", tmp_path / "one.h5", "--mpp", 0.5))
            args[3] = tmp_path / "one.h5"
        assert_error(run_cli(*args), *needles)
    elif case == "export-into-folder":
        assert_error(run_cli("export", tiny_run[1], str(tmp_path / "newdir") + os.sep), "is a folder", "encoder.pt")
        assert not (tmp_path / "newdir").exists() and not list(tmp_path.glob("newdir*"))
    elif case == "export-unwritable":
        assert_error(run_cli("export", tiny_run[1], "/proc/encoder.pt"), "/proc/encoder.pt", "cannot write")
    elif case == "predict-batch-0":
        assert_error(run_cli("predict", root / "seg", store, "--out", tmp_path / "pred", "--batch", 0, "-q"),
                     "--batch must be >= 1")
        assert not (tmp_path / "pred").exists()
    elif case == "predict-an-encoder":
        assert_error(run_cli("predict", encoder, store, "--out", tmp_path / "pred", "-q"),
                     "an exported encoder", "'simclr-path segment' run")
        assert not (tmp_path / "pred").exists()
    else:
        (tmp_path / "weights.pth").write_text("not weights\n")
        result = run_cli("pretrain", tiny_run[0] / "s.h5", "--out", tmp_path / "run", *TINY_PRETRAIN, "--pretrained",
                         tmp_path / "weights.pth", "--max-steps", 1)
        assert_error(result, "weights.pth", "a text file")
