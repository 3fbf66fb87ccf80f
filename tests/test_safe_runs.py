"""Runs that never lose or corrupt work, and files that are not what a command expects: one line
that says what is wrong, never a traceback."""

import os
import signal

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
    one_json(run_cli("ingest", root / "images", "--out", root / "s.h5", "--no-labels", "--mpp", 0.5))
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
