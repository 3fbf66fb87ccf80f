"""The training engine: pretrain runs, resume, checkpoints, export round trip, run-folder errors,
the gradient cache; on a store tiled from the real slides."""

import itertools
import json
import os

import h5py
import numpy as np
import pytest
import timm
import torch
import yaml

from simclr_path import NTXentLoss, load_encoder
from simclr_path.engine.checkpoint import load_checkpoint
from simclr_path.engine.config import PretrainConfig, apply_overrides, load_config
from simclr_path.engine.gradients import cached_loss_and_backward, loss_and_backward, shuffled_order
from simclr_path.engine.pretrain import pretrain
from simclr_path.errors import SimclrPathError
from simclr_path.models import SimCLRModel

from cli_helpers import assert_error, run_cli
from contrastive_helpers import flat, global_views, grads_of, make_model, relative_error

TINY = dict(backbone="resnet10t", batch=32, image_size=64, workers=2, device="cpu")


def tiny_config(**overrides) -> PretrainConfig:
    cfg = apply_overrides(load_config("small"), **{**TINY, **overrides})
    cfg.model.head_hidden = 128
    cfg.optim.epochs = 20
    cfg.optim.warmup_epochs = 0
    cfg.run.log_every = 1
    cfg.loss.temperature = 0.1  # the loss scale the thresholds below were set at (the preset's may change)
    cfg.run.exclude_qc = "none"  # every patch of real_store, as when the thresholds were set (QC: tests/test_qc.py)
    return cfg


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


@pytest.fixture(scope="module")
def trained_run(real_store, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("runs") / "falls")
    summary = pretrain([str(real_store)], run, tiny_config(max_steps=40, checkpoint_every=20), progress=False)
    return run, summary


def test_short_run_loss_clearly_falls(trained_run):
    run, summary = trained_run
    values = losses(run)
    assert len(values) == 40 and summary["step"] == 40
    first, last = np.mean(values[:8]), np.mean(values[-8:])
    assert last < first - 1.0, (first, last)  # seen: 6.3 -> 3.9
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "curves.png"):
        assert os.path.exists(os.path.join(run, name))


def test_resume_reproduces_the_uninterrupted_losses_exactly(real_store, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    pretrain([str(real_store)], whole, tiny_config(max_steps=8, checkpoint_every=3), progress=False)
    pretrain([str(real_store)], split, tiny_config(max_steps=5, checkpoint_every=3), progress=False)
    ckpt = load_checkpoint(os.path.join(split, "checkpoint.pt"))
    assert ckpt["step"] == 5 and ckpt["batch_in_epoch"] == 5
    pretrain([str(real_store)], split, tiny_config(max_steps=8, checkpoint_every=3), progress=False)
    assert losses(split) == losses(whole)  # bit for bit, through a mid-epoch stop with 2 workers


def nan_loss_at(monkeypatch, call: int):
    """Make the ``call``-th NT-Xent evaluation return NaN; returns the real ``forward``."""
    from simclr_path.engine import pretrain as train

    real_loss = train.NTXentLoss.forward
    calls = {"n": 0}

    def forward(self, z0, z1):
        calls["n"] += 1
        loss = real_loss(self, z0, z1)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(train.NTXentLoss, "forward", forward)
    return real_loss


def test_resume_after_a_crash_uses_the_last_checkpoint(real_store, tmp_path, monkeypatch):
    from simclr_path.engine import pretrain as train

    run = str(tmp_path / "run")
    reference = str(tmp_path / "reference")
    pretrain([str(real_store)], reference, tiny_config(max_steps=6, checkpoint_every=2), progress=False)
    real_loss = nan_loss_at(monkeypatch, 6)
    with pytest.raises(SimclrPathError, match="step 6"):
        pretrain([str(real_store)], run, tiny_config(max_steps=6, checkpoint_every=2), progress=False)
    assert load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"] == 4  # last good one kept
    monkeypatch.setattr(train.NTXentLoss, "forward", real_loss)
    pretrain([str(real_store)], run, tiny_config(max_steps=6, checkpoint_every=2), progress=False)
    assert losses(run) == losses(reference)


def test_export_round_trip_gives_identical_features(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.pt"))
    model = SimCLRModel("resnet10t", head_hidden=128)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone(x)
    for name in ("encoder.pt", "encoder.safetensors"):
        out = tmp_path / name
        r = run_cli("export", run, out)
        assert r.exit_code == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["timm_model"] == "resnet10t" and info["input_size"] == [3, 96, 96]  # 64 px views x 1.5 (small)
        loaded = timm.create_model("resnet10t", num_classes=0, checkpoint_path=str(out))  # strict load
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), expected, rtol=0, atol=0)
        encoder, meta = load_encoder(str(out))
        with torch.no_grad():
            torch.testing.assert_close(encoder(x), expected, rtol=0, atol=0)
        assert meta["patch_mpp"] == 0.5 and meta["patch_size"] == 128
        assert meta["mean"] == list(PretrainConfig().views.mean)
        assert meta["training"]["steps"] == 40
    blob = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert not any(k.startswith(("backbone.", "module.", "_orig_mod.", "head.")) for k in blob["state_dict"])
    features, _ = load_encoder(str(tmp_path / "encoder.pt"), features_only=True)
    maps = features(x)
    assert len(maps) == 5 and maps[-1].shape[1] == 512


TINY_ARGS = ["--backbone", "resnet10t", "--batch", 32, "--image-size", 64, "--max-steps", 1, "--device", "cpu", "-q"]


def test_bad_inputs_are_one_line_errors(real_store, tmp_path):
    assert_error(run_cli("pretrain", tmp_path / "missing.h5", "--out", tmp_path / "r"), "missing.h5", "tile")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    assert_error(run_cli("pretrain", foreign, "--out", tmp_path / "r"), "foreign.h5", "not a simclr-path patch store")
    assert_error(run_cli("pretrain", real_store, "--out", tmp_path / "r", "--backbone", "resnet5O"), "resnet5O", "resnet50")
    assert_error(run_cli("pretrain", real_store, "--out", tmp_path / "r", *TINY_ARGS, "--batch", 100000), "--batch 100000", "patches")
    assert_error(run_cli("pretrain", real_store, "--out", tmp_path / "r", *TINY_ARGS, "--image-size", 256), "--image-size 256", "128")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(run_cli("pretrain", real_store, "--out", blocker / "run", *TINY_ARGS), "cannot be written")
    assert_error(run_cli("pretrain", real_store, "--out", tmp_path / "r", "--config", "nope"), "nope", "small")


def test_empty_store_and_other_backbone_checkpoint(real_store, tmp_path):
    from simclr_path.store import StoreWriter
    from simclr_path.wsi.grid import TileSpec

    empty = tmp_path / "empty.h5"
    StoreWriter(str(empty), TileSpec().as_attrs()).close()
    assert_error(run_cli("pretrain", empty, "--out", tmp_path / "r"), "no patches")
    run = tmp_path / "run"
    assert run_cli("pretrain", real_store, "--out", run, *TINY_ARGS).exit_code == 0
    before = (run / "checkpoint.pt").read_bytes()
    assert_error(run_cli("pretrain", real_store, "--out", run, *TINY_ARGS, "--backbone", "resnet18"), "resnet10t", "new --out")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert_error(run_cli("pretrain", real_store, "--out", run, *TINY_ARGS, "--epochs", 7), "same --batch and --epochs")
    assert_error(run_cli("export", tmp_path / "nothing", tmp_path / "e.pt"), "nothing")


def test_a_second_pretrain_into_the_same_folder_is_refused(real_store, tmp_path):
    """Two runs in one folder would interleave metrics.jsonl and race on checkpoint.pt."""
    from simclr_path.runtime.files import locked_run_folder

    run = tmp_path / "run"
    with locked_run_folder(str(run), "simclr-path pretrain"):  # a run in another process
        assert_error(run_cli("pretrain", real_store, "--out", run, *TINY_ARGS),
                     "another 'simclr-path pretrain' is running in this folder", "another --out")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written: no config, no metrics
    r = run_cli("pretrain", real_store, "--out", run, *TINY_ARGS)
    assert r.exit_code == 0 and json.loads(r.stdout)["step"] == 1, r.stderr


def test_pretrain_cli_prints_one_json_summary(real_store, tmp_path):
    r = run_cli("pretrain", real_store, "--out", tmp_path / "run", *TINY_ARGS, "--max-steps", 2)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["step"] == 2 and summary["global_batch"] == 32 and summary["negatives_per_anchor"] == 62
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert saved.model.backbone == "resnet10t" and saved.views.image_size == 64


def test_pretrain_recipe_options_are_recorded_and_sgd_trains_while_others_are_refused(real_store, tmp_path):
    r = run_cli("pretrain", real_store, "--out", tmp_path / "run", *TINY_ARGS, "--optimizer", "sgd",
                "--temperature", 0.3, "--weight-decay", 1e-4, "--warmup-epochs", 0.5)
    assert r.exit_code == 0, r.stderr
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert (saved.optim.optimizer, saved.loss.temperature, saved.optim.weight_decay,
            saved.optim.warmup_epochs) == ("sgd", 0.3, 1e-4, 0.5)
    groups = load_checkpoint(os.path.join(tmp_path / "run", "checkpoint.pt"))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and all("trust_coeff" not in g for g in groups)
    r = run_cli("pretrain", real_store, "--out", tmp_path / "other", *TINY_ARGS, "--optimizer", "adam")
    assert r.exit_code == 2 and "adam" in r.stderr and not (tmp_path / "other").exists()
    config = tmp_path / "adam.yaml"
    config.write_text("optim: {optimizer: adam}\n")
    assert_error(run_cli("pretrain", real_store, "--out", tmp_path / "other", "--config", config, *TINY_ARGS),
                 "--optimizer must be one of lars, sgd, got 'adam'")


def test_resume_with_another_optimizer_needs_allowing_and_starts_its_momentum_afresh(real_store, tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", real_store, "--out", run, *TINY_ARGS).exit_code == 0
    assert_error(run_cli("pretrain", real_store, "--out", run, *TINY_ARGS[:-5], "--max-steps", 2, "--device", "cpu",
                         "-q", "--optimizer", "sgd"), "optim.optimizer='lars', not 'sgd'")
    r = run_cli("pretrain", real_store, "--out", run, *TINY_ARGS[:-5], "--max-steps", 2, "--device", "cpu", "-q",
                "--optimizer", "sgd", "--allow-config-change")
    assert r.exit_code == 0, r.stderr
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.pt"))
    assert ckpt["step"] == 2 and ckpt["config"]["optim"]["optimizer"] == "sgd"
    assert all("trust_coeff" not in g and "always_adapt" not in g for g in ckpt["optimizer"]["param_groups"])


@pytest.mark.parametrize("saved,now", [("lars", "sgd"), ("sgd", "lars"), ("lars", "lars")])
def test_restore_keeps_momentum_only_for_the_same_optimizer(saved, now):
    """LARS's momentum holds trust-scaled steps, SGD's raw gradients: a changed optimiser starts
    without momentum and with exactly its own group settings; the same one gets its buffers back."""
    from simclr_path.engine.state import TrainState, checkpoint_contents, rng_state, restore_checkpoint
    from simclr_path.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, lr=0.5, weight_decay=1e-4, name=saved)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    cfg = PretrainConfig()
    cfg.optim.optimizer = saved
    ckpt = checkpoint_contents(model, opt, build_scheduler(opt, 10, 0), TrainState(step=1), cfg.to_dict(), "x",
                               [rng_state(torch.device("cpu"))], {})
    fresh = build_optimizer(model, lr=0.5, weight_decay=1e-4, name=now)
    own = [{k: v for k, v in g.items() if k != "params"} for g in fresh.param_groups]
    restore_checkpoint(ckpt, model, fresh, build_scheduler(fresh, 10, 0))
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in fresh.param_groups]
    assert groups == [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in own]
    if saved == now:
        torch.testing.assert_close(fresh.state_dict()["state"], opt.state_dict()["state"])
    else:
        assert len(fresh.state) == 0


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_continues(real_store, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "cfg.yaml"
    config.write_text("model: {backbone: resnet10t, head_hidden: 64}\nviews: {image_size: 64}\n"
                      "optim: {batch: 32, epochs: 20, warmup_epochs: 0}\n"
                      "run: {device: cpu, workers: 2, log_every: 1, checkpoint_every: 1000}\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "simclr_path", "pretrain", str(real_store), "--out", str(run), "--config", str(config), "-q"]
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):  # a step is done
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "stopped on SIGTERM after step" in stderr and "Traceback" not in stderr
    step = load_checkpoint(str(run / "checkpoint.pt"))["step"]
    assert step >= 1  # progress since the last scheduled checkpoint (none) was kept
    r = subprocess.run(cmd + ["--max-steps", str(step + 1)], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {step}" in r.stderr
    assert json.loads(r.stdout)["step"] == step + 1


@pytest.mark.parametrize("where", ["settle_losses", "summarize"])
def test_a_sigterm_after_the_last_step_still_ends_in_the_summary(real_store, tmp_path, monkeypatch, where):
    """scancel as the run ends: after the loop (before the final checkpoint) or while the summary is
    written, the run is complete, so it reports like any finished run instead of asking for a resume
    (settle_losses) or dying without a summary (summarize)."""
    import signal
    import threading

    from simclr_path.engine import pretrain as pretrain_module

    assert threading.current_thread() is threading.main_thread()  # else no handler is installed
    real = getattr(pretrain_module, where)

    def then_sigterm(*args, **kwargs):
        out = real(*args, **kwargs) if where == "settle_losses" else None
        os.kill(os.getpid(), signal.SIGTERM)
        return out if where == "settle_losses" else real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, where, then_sigterm)
    leaked = []

    def default_action(signum, frame):  # stands in for death by -15 where pretrain's handler is off
        leaked.append(signum)

    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        summary = pretrain([str(real_store)], str(tmp_path / "run"), tiny_config(max_steps=3), progress=False)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not leaked
    assert summary["step"] == 3
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 3
    assert after is default_action  # the handler in place before the run is back afterwards


def test_the_knn_check_sees_whole_patches_at_the_exports_input_size(real_store, tmp_path, monkeypatch):
    """The kNN check during pretraining measures the encoder at the size it will be used at: labelled
    patches at image size x input scale (64 x 1.5 = 96 px here), not at the crops' 64 px."""
    import cv2

    from simclr_path.engine import knn as knn_module

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "labeled" / c).mkdir(parents=True)
        for i in range(10):
            cv2.imwrite(str(tmp_path / "labeled" / c / f"{c}{i}.png"), rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    seen = []
    real_extract = knn_module.extract_features

    def spying(backbone, images, size, *args, **kwargs):
        seen.append(size)
        return real_extract(backbone, images, size, *args, **kwargs)

    monkeypatch.setattr(knn_module, "extract_features", spying)
    cfg = tiny_config(max_steps=2, image_size=64)
    cfg.model.input_scale = 1.5
    cfg.run.eval_labeled, cfg.run.eval_every = str(tmp_path / "labeled"), 2
    pretrain([str(real_store)], str(tmp_path / "run"), cfg, progress=False)
    assert seen == [96, 96]  # the train and test features of the one check, at the last step
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        assert any("knn_acc" in json.loads(line) for line in fh)


@pytest.mark.parametrize("dtype,global_tol,tensor_tol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 1e-11)])
def test_gradient_cache_with_4_chunks_equals_no_cache(dtype, global_tol, tensor_tol):
    """With batch norm in eval mode the cached gradient is the full-batch one, views shuffled or not."""
    views = torch.cat(global_views()).to(dtype)  # 24 views -> 4 chunks of 6
    plain = make_model().eval().to(dtype)
    loss_a = loss_and_backward(plain, views, NTXentLoss(0.1), use_amp=False)
    cached = make_model().eval().to(dtype)
    loss_b = cached_loss_and_backward(cached, views, NTXentLoss(0.1), use_amp=False, chunk=6)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=global_tol)
    a, b = grads_of(plain), grads_of(cached)
    assert a.keys() == b.keys()
    assert relative_error(flat(b, a), flat(a, a)) < global_tol
    assert max(relative_error(b[k], a[k]) for k in a) < tensor_tol


def test_gradient_cache_replays_dropout_and_updates_batch_norm_once_per_chunk():
    # stochastic depth in train mode: the recompute must draw the same masks as the first pass,
    # so the cached gradient equals a forward of the same shuffled chunks that keeps its graph
    views = torch.cat(global_views())
    reference = make_model(drop_path_rate=0.5).train()
    torch.manual_seed(123)
    order = shuffled_order(len(views), 11)
    z = torch.cat([reference(piece) for piece in views[order].split(6)])[torch.argsort(order)]
    loss_ref = NTXentLoss(0.1)(*z.float().chunk(2))
    loss_ref.backward()
    cached = make_model(drop_path_rate=0.5).train()
    torch.manual_seed(123)
    loss = cached_loss_and_backward(cached, views, NTXentLoss(0.1), use_amp=False, chunk=6, shuffle_seed=11)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    a, b = grads_of(reference), grads_of(cached)
    assert relative_error(flat(b, a), flat(a, a)) < 1e-5
    for (name, buf_ref), (_, buf) in zip(reference.named_buffers(), cached.named_buffers()):
        torch.testing.assert_close(buf, buf_ref, msg=name)  # running stats: one update per chunk


def test_a_nan_between_sync_steps_is_caught_before_anything_is_saved(real_store, tmp_path, monkeypatch):
    """Losses are read every log_every steps and at every checkpoint step: a NaN at step 5 is found
    at step 6, the step-6 checkpoint is never written, and the error names step 5."""
    nan_loss_at(monkeypatch, 5)
    cfg = tiny_config(max_steps=8, checkpoint_every=3)
    cfg.run.log_every = 100
    run = str(tmp_path / "run")
    with pytest.raises(SimclrPathError, match="at step 5"):
        pretrain([str(real_store)], run, cfg, progress=False)
    assert load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"] == 3


def test_the_host_waits_once_per_log_interval_not_every_step(real_store, tmp_path, monkeypatch):
    """Losses, the NaN check and the SIGTERM flag ride on one all-reduce at each sync step (every
    log_every steps, step 1, the last step and checkpoint steps); the steps between never reduce."""
    from simclr_path.runtime import distributed

    reduced = []
    real = distributed.all_sum

    def counting(tensor):
        reduced.append(tensor.numel())
        return real(tensor)

    monkeypatch.setattr(distributed, "all_sum", counting)
    cfg = tiny_config(max_steps=9, checkpoint_every=6)
    cfg.run.log_every = 4
    pretrain([str(real_store)], str(tmp_path / "run"), cfg, progress=False)
    # sync steps 1, 4, 6 (checkpoint), 8, 9 (last): each carries the losses since the previous one + the flag
    assert reduced == [1 + 1, 3 + 1, 2 + 1, 2 + 1, 1 + 1]
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 4, 8, 9]  # logged every log_every steps


def test_model_input_turns_loader_uint8_nhwc_into_normalised_channels_last():
    from types import SimpleNamespace

    from simclr_path.engine.pretrain import model_input

    batch = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for channels_last in (True, False):
        run = SimpleNamespace(device=torch.device("cpu"), mean=mean, std=std, device_views=None,
                              cfg=SimpleNamespace(model=SimpleNamespace(channels_last=channels_last)))
        x = model_input(batch, run)
        expected = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
            std).view(1, 3, 1, 1)
        assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
        torch.testing.assert_close(x, expected)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt)


def chunks_sharing_a_patch_set(order: torch.Tensor, patches: int, chunk: int) -> int:
    """Pairs of chunks that hold exactly the same patches (one chunk their first views, the other their
    second): per-chunk batch-norm statistics would then be a signature shared by positives."""
    patch_sets = [frozenset((order[i:i + chunk] % patches).tolist()) for i in range(0, len(order), chunk)]
    return sum(a == b for a, b in itertools.combinations(patch_sets, 2))


@pytest.mark.parametrize("patches,chunk", [(12, 6), (64, 16), (64, 8), (256, 32)])
def test_gradient_cache_shuffles_views_so_positives_never_share_a_chunk_layout(patches, chunk):
    unshuffled = torch.arange(2 * patches)
    assert chunks_sharing_a_patch_set(unshuffled, patches, chunk) > 0  # the leak the shuffle removes
    for step in range(200):
        order = shuffled_order(2 * patches, step)
        assert sorted(order.tolist()) == list(range(2 * patches))
        assert chunks_sharing_a_patch_set(order, patches, chunk) == 0


def test_stores_of_different_resolutions_need_mixed_mpp_and_are_all_recorded(tmp_path):
    import cv2

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    stores = []
    for mpp in (0.5, 0.25):
        stores.append(tmp_path / f"s{mpp}.h5")
        assert run_cli("ingest", tmp_path / "images", "--out", stores[-1], "--no-labels", "--mpp", mpp,
                       "--qc", "off").exit_code == 0  # QC takes coloured noise for ink
    args = ["--backbone", "resnet10t", "--batch", 16, "--image-size", 48, "--max-steps", 1, "--device", "cpu",
            "--workers", 0, "-q"]
    assert_error(run_cli("pretrain", *stores, "--out", tmp_path / "run", *args), "different resolutions",
                 "0.5 um/px", "0.25 um/px", "--mixed-mpp")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    r = run_cli("pretrain", *stores, "--out", tmp_path / "run", *args, "--mixed-mpp")
    assert r.exit_code == 0, r.stderr
    assert run_cli("export", tmp_path / "run", tmp_path / "enc.pt").exit_code == 0
    _, meta = load_encoder(str(tmp_path / "enc.pt"))
    assert sorted(s["target_mpp"] for s in meta["store_resolutions"]) == [0.25, 0.5]
    assert meta["patch_mpp"] is None and meta["input_mpp"] is None  # no single resolution to claim
    assert meta["crop_scale"] == [0.08, 1.0]  # the default views (no --config)
    assert run_cli("pretrain", stores[0], "--out", tmp_path / "one", *args).exit_code == 0
    assert run_cli("export", tmp_path / "one", tmp_path / "one.pt").exit_code == 0
    _, meta = load_encoder(str(tmp_path / "one.pt"))
    assert meta["patch_mpp"] == 0.5 and meta["input_mpp"] == pytest.approx(0.5 * 64 / 48)  # 64 px patches at 48


def test_export_takes_whole_patches_at_the_view_size_times_input_scale(tmp_path):
    """Views are crops; the encoder is used on whole patches, shown at --image-size x --input-scale so
    their pixel scale stays the views'. A setting of the export only: a resume may change it."""
    import cv2

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    store = tmp_path / "s.h5"
    assert run_cli("ingest", tmp_path / "images", "--out", store, "--no-labels", "--mpp", 0.5,
                   "--qc", "off").exit_code == 0  # QC takes coloured noise for ink
    args = ["--backbone", "resnet10t", "--batch", 16, "--image-size", 32, "--device", "cpu", "--workers", 0, "-q"]
    assert_error(run_cli("pretrain", store, "--out", tmp_path / "bad", *args, "--input-scale", 0), "--input-scale")
    assert_error(run_cli("pretrain", store, "--out", tmp_path / "bad", *args, "--input-scale", 0.25),
                 "--image-size x --input-scale = 8 px")
    assert not (tmp_path / "bad").exists()
    r = run_cli("pretrain", store, "--out", tmp_path / "run", *args, "--input-scale", 1.5, "--max-steps", 1)
    assert r.exit_code == 0, r.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["input_scale"] == 1.5
    assert run_cli("export", tmp_path / "run", tmp_path / "enc.pt").exit_code == 0
    _, meta = load_encoder(str(tmp_path / "enc.pt"))
    assert meta["input_size"] == [3, 48, 48] and meta["view_size"] == 32
    assert meta["input_mpp"] == pytest.approx(0.5 * 64 / 48)  # 64 px patches at 48 px
    r = run_cli("pretrain", store, "--out", tmp_path / "run", *args, "--input-scale", 2, "--max-steps", 2)
    assert r.exit_code == 0, r.stderr  # no --allow-config-change needed
    assert run_cli("export", tmp_path / "run", tmp_path / "enc2.pt").exit_code == 0
    _, meta = load_encoder(str(tmp_path / "enc2.pt"))
    assert meta["input_size"] == [3, 64, 64] and meta["training"]["steps"] == 2
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    del ckpt["config"]["model"]["input_scale"]  # as a run from before input_scale wrote it
    torch.save(ckpt, tmp_path / "older.pt")
    assert run_cli("export", tmp_path / "older.pt", tmp_path / "enc3.pt").exit_code == 0
    _, meta = load_encoder(str(tmp_path / "enc3.pt"))
    assert meta["input_size"] == [3, 32, 32] and meta["view_size"] == 32  # whole patches at the view size


def test_resume_refuses_a_changed_training_setting_unless_allowed(real_store, tmp_path):
    run = tmp_path / "run"
    base = ["--backbone", "resnet10t", "--batch", 32, "--image-size", 64, "--device", "cpu", "-q", "--workers", 0]
    assert run_cli("pretrain", real_store, "--out", run, *base, "--max-steps", 1).exit_code == 0
    r = run_cli("pretrain", real_store, "--out", run, *base, "--max-steps", 2, "--temperature", 0.3)
    assert_error(r, "loss.temperature=0.1, not 0.3", "--allow-config-change", f"--config {run / 'config.yaml'}")
    assert load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"] == 1  # nothing trained, nothing saved
    # what may change: length, workers, logging
    r = run_cli("pretrain", real_store, "--out", run, *base[:-2], "--workers", 1, "--max-steps", 2,
                "--checkpoint-every", 7)
    assert r.exit_code == 0, r.stderr
    assert not (run / "config-changes.jsonl").exists()
    r = run_cli("pretrain", real_store, "--out", run, *base, "--max-steps", 3, "--temperature", 0.3,
                "--weight-decay", 1e-4, "--allow-config-change")
    assert r.exit_code == 0, r.stderr
    changes = [json.loads(line) for line in (run / "config-changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 2, "key": "loss.temperature", "was": 0.1, "now": 0.3},
                       {"step": 2, "key": "optim.weight_decay", "was": 1e-6, "now": 1e-4}]
    groups = load_checkpoint(os.path.join(run, "checkpoint.pt"))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]  # the change took effect, not just the record
    assert [g["always_adapt"] for g in groups] == [True, False]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["allow_config_change"] is False  # a permission for one invocation, not a setting
    r = run_cli("pretrain", real_store, "--out", run, "--config", run / "config.yaml", "-q", "--max-steps", 4)
    assert r.exit_code == 0, r.stderr  # the run's config.yaml holds its settings, as the refusal says
    assert len((run / "config-changes.jsonl").read_text().splitlines()) == 2  # nothing changed this time
    r = run_cli("pretrain", real_store, "--out", run, "--config", run / "config.yaml", "-q", "--max-steps", 5,
                "--temperature", 0.5)
    assert_error(r, "loss.temperature=0.3, not 0.5")  # and it does not carry the permission along


def test_pretrain_shuffles_the_gradient_cache_views_differently_every_step(real_store, tmp_path, monkeypatch):
    from simclr_path.engine import pretrain as train

    seeds = []
    real = train.cached_loss_and_backward

    def recording(model, views, loss_fn, use_amp, chunk, shuffle_seed=0, scaler=None):
        seeds.append(shuffle_seed)
        return real(model, views, loss_fn, use_amp, chunk, shuffle_seed, scaler)

    monkeypatch.setattr(train, "cached_loss_and_backward", recording)
    cfg = tiny_config(max_steps=3)
    cfg.run.grad_cache_chunk = 16
    pretrain([str(real_store)], str(tmp_path / "run"), cfg, progress=False)
    assert seeds == [train.shuffle_seed(cfg.run.seed, step) for step in range(3)] and len(set(seeds)) == 3



@pytest.mark.parametrize("asked,native", [(True, True), (True, False), (False, True)])
def test_bf16_autocast_runs_when_asked_and_native_to_the_device(real_store, tmp_path, monkeypatch, asked, native):
    """CPUs without AVX512-BF16/AMX would emulate bf16 (slower than fp32): they train in fp32."""
    from simclr_path.engine import pretrain as train

    used = []
    real = train.loss_and_backward

    def recording(model, views, loss_fn, use_amp, scaler=None):
        used.append(use_amp)
        return real(model, views, loss_fn, use_amp, scaler)

    monkeypatch.setattr(train, "loss_and_backward", recording)
    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    cfg = tiny_config(max_steps=2)
    cfg.run.bf16 = asked
    summary = pretrain([str(real_store)], str(tmp_path / "run"), cfg, progress=False)
    assert used == [torch.bfloat16 if asked and native else None] * 2 and summary["bf16"] is (asked and native)


def test_fp16_resume_goes_on_at_the_loss_scale_the_run_had_reached(real_store, tmp_path, monkeypatch):
    """fp16 (GPUs without native bf16) learns its loss scale as it trains; a resume that started again
    at 2**16 would overflow and skip steps an uninterrupted run never skipped."""
    from simclr_path.engine import pretrain as train

    monkeypatch.setattr(train.Run, "amp_dtype", property(lambda self: torch.float16))  # as on a V100
    monkeypatch.setattr(train, "_precision_text", lambda run: "fp16 autocast with a gradient scaler")  # names the GPU
    out = tmp_path / "run"
    pretrain([str(real_store)], str(out), tiny_config(max_steps=2), progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["scaler"]["scale"] <= 2.0 ** 16  # the first steps overflow and halve it
    ckpt["scaler"].update(scale=512.0, _growth_tracker=7)  # a run whose scale fell after overflows
    torch.save(ckpt, out / "checkpoint.pt")

    scales = []
    real = train.loss_and_backward

    def recording(model, views, loss_fn, use_amp, scaler=None):
        scales.append((use_amp, scaler.get_scale()))
        return real(model, views, loss_fn, use_amp, scaler)

    monkeypatch.setattr(train, "loss_and_backward", recording)
    pretrain([str(real_store)], str(out), tiny_config(max_steps=3), progress=False)
    assert scales == [(torch.float16, 512.0)]
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]
    assert (resumed["scale"], resumed["_growth_tracker"]) in ((512.0, 8), (256.0, 0))  # stepped, or overflowed


def test_native_bf16_reads_the_cpu_capabilities(monkeypatch):
    import torch

    from simclr_path.runtime.device import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16(torch.device("cpu"))
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not native_bf16(torch.device("cpu"))  # a torch without the probe: fp32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert native_bf16(torch.device("cuda"))  # Ampere and later; see test_device_views for older GPUs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not native_bf16(torch.device("cuda"))


def test_a_setting_an_older_checkpoint_lacks_counts_as_its_default():
    """A checkpoint from before views.light_p trained with light_p 0: resuming it at 0.5 is a change."""
    from simclr_path.engine.config import changed_settings

    current = load_config("small").to_dict()
    saved = load_config("small").to_dict()
    del saved["views"]["light_p"]
    assert ("views.light_p", 0.0, 0.5) in changed_settings(saved, current)
