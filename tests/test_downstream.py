"""`embed`, `eval`, the kNN check during pretraining, and the segmentation recipe, on the real PCam
patches."""

import csv
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from simclr_path import PatchStore, load_encoder
from simclr_path.data.labeled import group_split, load_labeled
from simclr_path.downstream import evaluate as evaluate_module
from simclr_path.downstream.encoder import ENCODER_FORMAT
from simclr_path.engine.features import EncoderInputs
from simclr_path.engine.knn import accuracy, knn_predict

from cli_helpers import assert_error, one_json, run_cli


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
    summary = one_json(run_cli("embed", encoder, real_store, "--out", out, "--device", "cpu", "--exclude-qc", "none"))
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


GLAS_GRADES = Path(__file__).resolve().parents[2] / "shared" / "data" / "segmentation" / "glas" / "Grade.csv"


def _sides_share_no_group(groups, train, test):
    return not set(groups[train]) & set(groups[test])


def _patients(n_per_class=6, patches=4, mixed=True):
    """Labels and patient groups: each patient mostly one class, some with a patch of the other."""
    labels, groups = [], []
    for c in (0, 1):
        for p in range(n_per_class):
            size = patches + p % 3
            labels += [c] * size + ([1 - c] if mixed and p % 2 else [])
            groups += [f"P{c}{p}"] * (size + (1 if mixed and p % 2 else 0))
    return np.array(labels), np.array(groups)


def test_group_split_keeps_every_group_on_one_side_for_many_seeds():
    labels, groups = _patients()
    for seed in range(50):
        train, test = group_split(labels, groups, 0.3, seed)
        assert _sides_share_no_group(groups, train, test)
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
        assert set(labels[train]) == set(labels[test]) == {0, 1}
        assert 0.15 < len(test) / len(labels) < 0.45
        np.testing.assert_array_equal(group_split(labels, groups, 0.3, seed)[1], test)  # seeded
    assert len({tuple(group_split(labels, groups, 0.3, s)[1]) for s in range(20)}) > 1  # the seed matters


def test_group_split_on_glas_patients(tmp_path):
    """GlaS's 165 images of 16 patients, by grade: read through a path,label,group CSV, split by patient."""
    if not GLAS_GRADES.exists():
        pytest.skip("../shared/data/segmentation/glas is not present")
    with open(GLAS_GRADES, newline="") as fh:
        rows = [[c.strip() for c in r] for r in csv.reader(fh)][1:]
    lines = ["path,label,group"] + [f"{GLAS_GRADES.parent / 'images' / (n + '.jpg')},{grade},{pid}"
                                    for n, pid, grade, _ in rows]
    (tmp_path / "glas.csv").write_text("\n".join(lines) + "\n")
    data = load_labeled(str(tmp_path / "glas.csv"))
    assert data.classes == ["benign", "malignant"] and len(set(data.groups)) == 16
    for seed in range(50):
        train, test = group_split(data.labels, data.groups, 0.3, seed, classes=data.classes)
        assert _sides_share_no_group(data.groups, train, test)
        assert set(data.labels[test]) == {0, 1}


def test_probe_chooses_its_l2_strength_on_held_out_groups(monkeypatch):
    labels, groups = _patients(n_per_class=5)
    for seed in range(30):
        fit, held = evaluate_module.probe_split(labels, groups, seed)
        assert len(fit) and len(held) and _sides_share_no_group(groups, fit, held)
    # tuned_linear_probe really uses it: the features are the row numbers, so each fit sees its rows
    calls = []

    def recording(train, train_labels, test, num_classes, weight_decay=1e-4, iterations=200):
        calls.append((train[:, 0].long().tolist(), test[:, 0].long().tolist()))
        return torch.zeros(len(test), dtype=torch.long)

    monkeypatch.setattr(evaluate_module, "linear_probe_predict", recording)
    rows = torch.arange(len(labels)).float()[:, None]
    evaluate_module.tuned_linear_probe(rows, torch.as_tensor(labels), rows[:3], 2, seed=1, groups=groups)
    assert len(calls) == len(evaluate_module.PROBE_WEIGHT_DECAYS) + 1
    for fit_rows, held_rows in calls[:-1]:
        assert _sides_share_no_group(groups, fit_rows, held_rows)
    fit_rows, held_rows = calls[0]
    ungrouped = evaluate_module.probe_split(labels, None, 1)
    assert (fit_rows, held_rows) != (ungrouped[0].tolist(), ungrouped[1].tolist())


def _write_patients(root, names_by_class, subfolder=""):
    """Tiny PNGs in class folders, coloured by class, named as given."""
    for c, names in names_by_class.items():
        folder = root / c / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            img = np.full((16, 16, 3), (200, 60, 60) if c == "a" else (60, 60, 200), np.uint8)
            img[i % 16] = 255
            cv2.imwrite(str(folder / name), img)
    return root


def _patient_names(first, last, per=4):
    return [f"GT{p:02d}-{k}.png" for p in range(first, last) for k in range(per)]


def test_group_regex_reads_the_group_from_file_names(tmp_path):
    root = _write_patients(tmp_path / "tiles", {"a": _patient_names(1, 4), "b": _patient_names(4, 7)},
                           subfolder="GT99-batch")  # a folder name the regex would also match
    data = load_labeled(str(root), r"(GT\d+)-")
    assert sorted(set(data.groups)) == [f"GT{p:02d}" for p in range(1, 7)]
    assert load_labeled(str(root), r"GT\d+").groups.tolist() == data.groups.tolist()  # no capture: whole match
    assert load_labeled(str(root)).groups is None
    files = [p.relative_to(tmp_path) for p in data.images]
    (tmp_path / "l.csv").write_text("path,label\n" + "".join(f"{f},{f.parts[1]}\n" for f in files))
    assert load_labeled(str(tmp_path / "l.csv"), r"^(GT\d+)").groups.tolist() == data.groups.tolist()
    one_json(run_cli("ingest", root, "--out", tmp_path / "tiles.h5"))
    stored = load_labeled(str(tmp_path / "tiles.h5"), r"^(GT\d+)-")
    assert sorted(stored.groups.tolist()) == sorted(data.groups.tolist())


def random_encoder(folder, seed: int):
    """A random-init resnet10t in the export format (32 px input): enough to run ``eval``/``embed`` quickly."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    meta = {"format": ENCODER_FORMAT, "version": 1, "timm_model": "resnet10t", "num_features": model.num_features,
            "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    path = folder / "encoder.pt"
    torch.save({"state_dict": model.state_dict(), "simclr_path": meta}, path)
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return random_encoder(tmp_path_factory.mktemp("tiny"), 0)


def test_eval_splits_by_patient_and_says_so(tiny_encoder, tmp_path):
    root = _write_patients(tmp_path / "tiles", {"a": _patient_names(1, 7), "b": _patient_names(7, 13)})
    r = run_cli("eval", tiny_encoder, "--labeled", root, "--group-regex", r"^(GT\d+)-", "--device", "cpu",
                "--workers", 0, "--no-floor")
    result = one_json(r)
    assert result["split"] == "group" and result["groups"]["train"] + result["groups"]["test"] == 12
    assert result["n_train"] + result["n_test"] == 48 and result["n_test"] % 4 == 0  # whole patients
    assert {"linear_balanced_acc", "knn_balanced_acc"} <= set(result["pretrained"])
    assert "groups)" in r.stderr  # the table's title


def test_split_labeled_names_how_it_split(tmp_path):
    root = _write_patients(tmp_path / "tiles", {"a": _patient_names(1, 4), "b": _patient_names(4, 7)})
    split = evaluate_module.split_labeled
    train, test, how = split(str(root), None, 0.3, 0, r"^(GT\d+)-")
    assert how == "group" and not set(train.groups) & set(test.groups)
    assert split(str(root), None, 0.3, 0)[2] == "stratified"
    assert split(str(root), str(root), 0.3, 0)[2] == "test-set"
    files = sorted(p.relative_to(tmp_path) for p in root.rglob("*.png"))
    rows = [["path", "label", "split", "group"]] + [[str(f), f.parts[1], "test" if f.name[3] in "36" else "train",
                                                     f.name[:4]] for f in files]
    train, test, how = split(str(_csv(tmp_path / "l.csv", rows)), None, 0.3, 0)
    assert how == "csv" and set(test.groups) == {"GT03", "GT06"} and len(set(train.groups)) == 4


def _csv(path, rows):
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("case", ["one-group", "class-on-one-side", "no-match", "column-and-regex", "bad-regex",
                                  "empty-group", "csv-split-leaks", "probe-one-group"])
def test_group_problems_are_one_line_errors(tiny_encoder, tmp_path, case):
    root = _write_patients(tmp_path / "tiles", {"a": _patient_names(1, 4), "b": _patient_names(4, 5) + ["x.png"]})
    files = sorted(p.relative_to(tmp_path) for p in root.rglob("*.png"))
    rows = [["path", "label", "group"]] + [[str(f), f.parts[1], f.name[:4]] for f in files if f.name != "x.png"]
    args, needles = ["--labeled", root, "--group-regex", r"^(GT\d+)-"], ()
    if case == "one-group":
        one = [rows[0]] + [r[:2] + ["P1"] for r in rows[1:]]
        args, needles = ["--labeled", _csv(tmp_path / "l.csv", one)], ("l.csv", "1 group", "at least 2")
    elif case == "class-on-one-side":  # class b has a single patient
        args, needles = ["--labeled", _csv(tmp_path / "l.csv", rows)], ("l.csv", "'b'", "add groups")
    elif case == "no-match":
        needles = ("x.png", "--group-regex", "change the regex")
    elif case == "column-and-regex":
        args[1], needles = _csv(tmp_path / "l.csv", rows), ("l.csv", "give one of")
    elif case == "bad-regex":
        args[3], needles = "(GT", ("--group-regex", "not a valid regular expression")
    elif case == "empty-group":
        rows[2][2] = ""
        args, needles = ["--labeled", _csv(tmp_path / "l.csv", rows)], ("l.csv", "line 3", "empty 'group'")
    elif case == "csv-split-leaks":
        split = [rows[0] + ["split"]] + [r + ["test" if i % 2 else "train"] for i, r in enumerate(rows[1:])]
        args, needles = ["--labeled", _csv(tmp_path / "l.csv", split)], ("l.csv", "both train and test")
    elif case == "probe-one-group":
        split = [rows[0] + ["split"]] + [r[:2] + ["P1" if r[1] == "a" else "P2", "train" if r[1] == "a" else "test"]
                                         for r in rows[1:]]
        split += [[r[0], "b", "P1", "train"] for r in rows[1:3]] + [[r[0], "a", "P2", "test"] for r in rows[-2:]]
        args, needles = ["--labeled", _csv(tmp_path / "l.csv", split)], ("l.csv", "1 group", "linear probe")
    assert_error(run_cli("eval", tiny_encoder, *args, "--device", "cpu", "--workers", 0), *needles)


# --- embed: streaming, resumable per slide ------------------------------------------------------

def _random_tiles(root, counts, seed=0):
    """Class folders of random 16 px PNGs: after ingest, one 'slide' per folder. Ingest them with
    ``--qc off``: QC takes coloured noise for ink and would leave every patch out."""
    rng = np.random.default_rng(seed)
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / c / f"{c}{i:03d}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def tiles_store(tmp_path_factory):
    """Three slides of 7, 12 and 5 patches: with --batch 5 slides end mid-batch."""
    root = _random_tiles(tmp_path_factory.mktemp("tiles") / "tiles", {"a": 7, "b": 12, "c": 5})
    one_json(run_cli("ingest", root, "--out", root.parent / "tiles.h5", "--qc", "off"))
    return root.parent / "tiles.h5"


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory):
    return random_encoder(tmp_path_factory.mktemp("other"), 1)


def _embed(encoder, stores, out, workers=0):
    r = run_cli("embed", encoder, *stores, "--out", out, "--device", "cpu", "--workers", workers, "--batch", 5)
    return one_json(r), r


def _no_temporaries(out):
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _assert_same_outputs(a, b):
    names = sorted(p.name for p in (a / "h5_files").iterdir())
    assert names == sorted(p.name for p in (b / "h5_files").iterdir())
    assert sorted(p.name for p in (a / "pt_files").iterdir()) == [n[:-3] + ".pt" for n in names]
    for name in [*(f"h5_files/{n}" for n in names), "features.h5"]:
        with h5py.File(a / name) as fa, h5py.File(b / name) as fb:
            assert set(fa) == set(fb) and dict(fa.attrs) == dict(fb.attrs)
            for key in fa:
                np.testing.assert_array_equal(fa[key][()], fb[key][()])
                assert dict(fa[key].attrs) == dict(fb[key].attrs)
    for name in names:
        pt = f"pt_files/{name[:-3]}.pt"
        assert torch.equal(torch.load(a / pt, weights_only=True), torch.load(b / pt, weights_only=True))


def test_embed_streams_the_same_features_as_the_in_memory_computation(tiny_encoder, tiles_store, tmp_path):
    from simclr_path.engine.features import extract_features
    from simclr_path.store import PatchSubset

    out = tmp_path / "features"
    summary, _ = _embed(tiny_encoder, [tiles_store], out, workers=1)
    assert {k: summary[k] for k in ("slides", "slides_embedded", "slides_skipped", "patches", "patches_embedded",
                                    "feature_dim")} == {"slides": 3, "slides_embedded": 3, "slides_skipped": 0,
                                                        "patches": 24, "patches_embedded": 24, "feature_dim": 512}
    model, meta = load_encoder(str(tiny_encoder))
    store = PatchStore(tiles_store)
    expected = []
    for name, start, end in store.slide_ranges():  # what embed computed before: one loader per slide, in memory
        features = extract_features(model, PatchSubset(store, range(start, end)), meta["input_size"][-1],
                                    meta["mean"], meta["std"], torch.device("cpu"), 5, 0).numpy()
        expected.append(features)
        with h5py.File(out / "h5_files" / f"{name}.h5") as f:
            np.testing.assert_array_equal(f["features"][()], features)
            assert f["features"].dtype == np.float32 and f["coords"].shape == (end - start, 2)
            assert f.attrs["num_patches"] == end - start and f.attrs["slide"] == name
        np.testing.assert_array_equal(torch.load(out / "pt_files" / f"{name}.pt", weights_only=True).numpy(), features)
    with h5py.File(out / "features.h5") as f:
        assert f["features"].maxshape == (None, 512) and f["features"].chunks is not None
        np.testing.assert_array_equal(f["features"][()], np.concatenate(expected))
        assert f["slide_index"][()].tolist() == [0] * 7 + [1] * 12 + [2] * 5
        assert f["coords"].shape == (24, 2)
        assert [s.decode() for s in f["slide_names"]] == ["a", "b", "c"]
    assert _no_temporaries(out)


def test_embed_rerun_skips_finished_slides_and_reads_no_pixels(tiny_encoder, tiles_store, tmp_path, monkeypatch):
    out = tmp_path / "features"
    _embed(tiny_encoder, [tiles_store], out)
    (out / "pt_files" / "b.pt").unlink()  # as if stopped between a slide's h5 and its .pt
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}

    def no_pixels(self, index):
        raise AssertionError("a rerun read pixels")

    monkeypatch.setattr(PatchStore, "__getitem__", no_pixels)
    summary, r = _embed(tiny_encoder, [tiles_store], out)
    assert (summary["slides_embedded"], summary["slides_skipped"], summary["patches_embedded"]) == (0, 3, 0)
    assert summary["feature_dim"] == 512 and "3 slide(s) already embedded" in r.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept  # untouched, features.h5 too
    with h5py.File(out / "h5_files" / "b.h5") as f:
        np.testing.assert_array_equal(torch.load(out / "pt_files" / "b.pt", weights_only=True).numpy(),
                                      f["features"][()])


def test_embed_interrupted_then_rerun_equals_an_uninterrupted_run(tiny_encoder, tiles_store, tmp_path):
    from simclr_path.downstream.embed import embed_stores

    whole = tmp_path / "whole"
    _embed(tiny_encoder, [tiles_store], whole)

    class Stop(Exception):
        pass

    batches = []

    def stop_in_slide_b(n):  # slide a is batches 1-2 (5 + 2 patches); b starts with batch 3
        batches.append(n)
        if len(batches) == 3:
            raise Stop

    out = tmp_path / "features"
    with pytest.raises(Stop):
        embed_stores(str(tiny_encoder), [str(tiles_store)], str(out), device="cpu", batch_size=5, workers=0,
                     progress=stop_in_slide_b)
    assert [p.name for p in (out / "h5_files").iterdir()] == ["a.h5"]
    assert [p.name for p in (out / "pt_files").iterdir()] == ["a.pt"]
    assert not (out / "features.h5").exists() and _no_temporaries(out)
    (out / "h5_files" / "c.h5.tmp").write_bytes(b"half")  # what a killed run leaves
    summary, _ = _embed(tiny_encoder, [tiles_store], out)
    assert (summary["slides_embedded"], summary["slides_skipped"], summary["patches_embedded"]) == (2, 1, 17)
    _assert_same_outputs(out, whole)
    assert _no_temporaries(out)


def test_embed_recomputes_slides_of_another_encoder_or_changed_patches(tiny_encoder, other_encoder, tmp_path):
    from simclr_path.runtime.files import file_sha256

    root = _random_tiles(tmp_path / "tiles", {"a": 3, "b": 4, "c": 2})
    one_json(run_cli("ingest", root, "--out", tmp_path / "v1.h5", "--qc", "off"))
    out = tmp_path / "features"
    _embed(tiny_encoder, [tmp_path / "v1.h5"], out)
    with h5py.File(out / "h5_files" / "a.h5") as f:
        first = f["features"][()]
    summary, r = _embed(other_encoder, [tmp_path / "v1.h5"], out)
    assert (summary["slides_embedded"], summary["slides_skipped"]) == (3, 0)
    assert "3 slide(s) do not match this encoder" in r.stderr
    with h5py.File(out / "h5_files" / "a.h5") as f:
        assert f.attrs["encoder_sha256"] == file_sha256(str(other_encoder))
        assert not np.allclose(f["features"][()], first)
    with h5py.File(out / "features.h5") as f:
        assert f.attrs["encoder_sha256"] == file_sha256(str(other_encoder))
    # the folder re-ingested with one more image of class b: only slide b is embedded again
    cv2.imwrite(str(root / "b" / "b999.png"), np.zeros((16, 16, 3), np.uint8))
    one_json(run_cli("ingest", root, "--out", tmp_path / "v2.h5", "--qc", "off"))
    summary, _ = _embed(other_encoder, [tmp_path / "v2.h5"], out)
    assert (summary["slides_embedded"], summary["slides_skipped"], summary["patches"]) == (1, 2, 10)
    with h5py.File(out / "features.h5") as f:
        assert f["features"].shape == (10, 512) and f["slide_index"][()].tolist() == [0] * 3 + [1] * 5 + [2] * 2


def test_embed_gives_same_named_slides_of_two_stores_their_own_files(tiny_encoder, tiles_store, tmp_path):
    out = tmp_path / "features"
    summary, _ = _embed(tiny_encoder, [tiles_store, tiles_store], out)
    assert summary["slides"] == 6 and summary["patches"] == 48
    names = ["a-tiles", "b-tiles", "c-tiles", "a-tiles-2", "b-tiles-2", "c-tiles-2"]  # every copy qualified
    assert sorted(p.stem for p in (out / "h5_files").iterdir()) == sorted(names)
    with h5py.File(out / "features.h5") as f:
        assert [s.decode() for s in f["slide_names"]] == names
        np.testing.assert_array_equal(f["features"][:24], f["features"][24:])


@pytest.mark.parametrize("case", ["batch", "workers", "store"])
def test_embed_problems_are_one_line_errors(tiny_encoder, tiles_store, tmp_path, case):
    args, needles = [tiles_store], ()
    if case == "batch":
        args, needles = [tiles_store, "--batch", 0], ("--batch",)
    elif case == "workers":
        args, needles = [tiles_store, "--workers", -1], ("--workers",)
    elif case == "store":
        args, needles = [tmp_path / "missing.h5"], ("missing.h5", "no such store")
    assert_error(run_cli("embed", tiny_encoder, *args, "--out", tmp_path / "f", "--device", "cpu"), *needles)
