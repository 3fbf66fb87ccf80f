"""`embed`, `eval`, the kNN check during pretraining, and the segmentation recipe, on the real PCam
patches."""

import json

import h5py
import numpy as np
import pytest
import torch

from simclr_path import PatchStore, load_encoder
from simclr_path.engine.features import EncoderInputs
from simclr_path.engine.knn import accuracy, knn_predict

from cli_helpers import one_json, run_cli


def test_knn_check_is_logged_during_pretraining(pcam_run):
    run, _ = pcam_run
    with open(run / "metrics.jsonl") as fh:
        checks = [json.loads(line) for line in fh if "knn_acc" in line]
    assert [c["step"] for c in checks] == [10, 20]
    assert all(0.5 < c["knn_acc"] <= 1.0 for c in checks)  # above chance on balanced PCam


def test_eval_reports_knn_and_linear_probe_against_random_floor(pcam, pcam_run):
    _, encoder = pcam_run
    r = run_cli("eval", encoder, "--labeled", pcam / "valid", "--test", pcam / "test", "--max-per-class", 150)
    result = one_json(r)
    assert result["n_train"] == 300 and result["n_test"] == 300 and result["classes"] == ["0", "1"]
    for name in ("pretrained", "random_init"):
        scores = result[name]
        assert set(scores) == {"knn_acc", "knn_balanced_acc", "linear_acc", "linear_balanced_acc",
                               "linear_weight_decay"}
        assert 0.55 < scores["knn_acc"] <= 1.0 and 0.55 < scores["linear_acc"] <= 1.0
    assert result["pretrained"] != result["random_init"]  # the floor is a different encoder
    assert "random_init" in r.stderr and "kNN acc" in r.stderr  # the table


def test_eval_splits_a_labelled_csv_by_its_split_column(pcam, pcam_run, tmp_path):
    _, encoder = pcam_run
    rows = ["path,split,label"]
    for split, folder in (("train", "valid"), ("test", "test")):
        for label in ("0", "1"):
            for p in sorted((pcam / folder / label).iterdir())[:40]:
                rows.append(f"{p},{split},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = one_json(run_cli("eval", encoder, "--labeled", tmp_path / "labels.csv", "--no-floor"))
    assert result["n_train"] == 80 and result["n_test"] == 80 and "random_init" not in result


def test_knn_votes_are_temperature_weighted():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    pred = knn_predict(train, labels, torch.tensor([[0.2, 1.0], [1.0, 0.05]]), num_classes=2, k=3)
    assert pred.tolist() == [1, 0]
    assert accuracy(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2) == (0.75, pytest.approx(0.8333, abs=1e-4))


def test_embed_writes_clam_trident_layout_with_the_encoders_features(real_store, pcam_run, tmp_path):
    _, encoder = pcam_run
    out = tmp_path / "features"
    summary = one_json(run_cli("embed", encoder, real_store, "--out", out, "--device", "cpu"))
    store = PatchStore(real_store)
    assert summary["patches"] == len(store) and summary["feature_dim"] == 512
    model, meta = load_encoder(str(encoder))
    name, start, end = store.slide_ranges()[0]
    with h5py.File(out / "h5_files" / f"{name}.h5") as f:
        features, coords = f["features"][()], f["coords"][()]
        assert features.dtype == np.float32 and features.shape == (end - start, 512)
        assert coords.shape == (end - start, 2) and "patch_level" in f["coords"].attrs
    with h5py.File(real_store) as f:
        np.testing.assert_array_equal(coords, f[f"slides/{name}/coords"][()])
    inputs = EncoderInputs([store[i] for i in range(start, start + 4)], meta["input_size"][-1])
    x = torch.stack([inputs[i] for i in range(4)]).float() / 255
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((x - mean) / std)
    np.testing.assert_allclose(features[:4], expected.numpy(), rtol=1e-4, atol=1e-5)
    pt = torch.load(out / "pt_files" / f"{name}.pt", weights_only=True)
    np.testing.assert_array_equal(pt.numpy(), features)
    with h5py.File(out / "features.h5") as f:
        assert f["features"].shape == (len(store), 512)
        assert [s.decode() for s in f["slide_names"]] == [n for n, _, _ in store.slide_ranges()]


def test_smp_unet_takes_the_encoder_with_every_key_matched(pcam_run):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from simclr_path.downstream.segmentation import load_smp_encoder

    _, encoder = pcam_run
    unet = smp.Unet(encoder_name="tu-resnet10t", encoder_weights=None, classes=2)
    load_smp_encoder(unet, str(encoder))  # strict
    weights = torch.load(encoder, weights_only=True)["state_dict"]
    torch.testing.assert_close(unet.encoder.model.state_dict()["conv1.0.weight"], weights["conv1.0.weight"])
    with torch.no_grad():
        mask = unet.eval()(torch.randn(1, 3, 64, 64))
    assert mask.shape == (1, 2, 64, 64)
