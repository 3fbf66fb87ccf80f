"""Tissue QC while tiling (`simclr-path tile --qc`) and ingesting (`simclr-path ingest --qc`): pen
ink, blur and folds flagged per patch, stored in the store, left out by `pretrain`/`embed`/`select`
through `--exclude-qc`; synthetic slides with artefacts at known positions, real PCam patches with
ink painted on some, and the real H&E slides for "no stain is taken for ink"."""

import json

import cv2
import h5py
import numpy as np
import pytest

from simclr_path import PatchStore
from simclr_path.errors import SimclrPathError
from simclr_path.store.format import QC_REASONS, qc_bit
from simclr_path.wsi.grid import TileSpec
from simclr_path.wsi.qc import BATCH, SCORE_NAMES, batch_scores, patch_scores, slide_flags
from simclr_path.wsi.tiler import tile_slides

from cli_helpers import assert_one_line_error, one_json, run_cli
from synthetic import QC_BOXES, he_texture, qc_slide_image, write_slide

PEN, BLUR, FOLD = (qc_bit(r) for r in ("pen", "blur", "fold"))
INKS = {"blue": (35, 60, 160), "green": (30, 120, 75), "red": (195, 30, 45), "black": (30, 30, 35)}


@pytest.fixture(scope="module")
def qc_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("qc") / "qc.tif", qc_slide_image(), mpp=0.5)


@pytest.fixture(scope="module")
def qc_store(qc_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("qcstore") / "qc.h5"
    result = tile_slides([qc_slide], str(out), TileSpec(target_mpp=0.5, patch_size=128, min_tissue=0.0), workers=0)
    assert result.ok and result.patches == 144
    return out


def _inside(coords, box, side=128):
    x0, y0, x1, y1 = box
    return (coords[:, 0] >= x0) & (coords[:, 0] + side <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] + side <= y1)


def _touches(coords, box, side=128):
    x0, y0, x1, y1 = box
    return (coords[:, 0] < x1) & (coords[:, 0] + side > x0) & (coords[:, 1] < y1) & (coords[:, 1] + side > y0)


@pytest.mark.parametrize("ink", sorted(INKS))
@pytest.mark.parametrize("opacity", [0.8, 1.0])
def test_ink_strokes_of_every_colour_score_as_pen_and_plain_tissue_does_not(ink, opacity):
    patch = he_texture(128, 128, seed=3)
    assert patch_scores(patch)[0] < 0.02
    stroke = np.zeros((128, 128), np.uint8)
    cv2.line(stroke, (0, 20), (127, 90), 1, 12)  # a 12 px line: ~13% of the patch
    factor = (np.array(INKS[ink], np.float32) / 255.0) ** opacity
    patch[stroke > 0] = (patch[stroke > 0] * factor).astype(np.uint8)
    assert patch_scores(patch)[0] >= 0.05


def test_synthetic_slide_flags_ink_blur_and_fold_where_they_were_painted(qc_store):
    with h5py.File(qc_store) as f:
        g = f["slides/qc"]
        coords, flags, scores = g["coords"][()], g["qc_flags"][()], g["qc_scores"][()]
        assert list(g["qc_flags"].attrs["reasons"]) == list(QC_REASONS)
        assert list(g["qc_scores"].attrs["names"]) == list(SCORE_NAMES)
        assert scores.shape == (144, len(SCORE_NAMES)) and scores.dtype == np.float32
    pen, blur, fold = (_inside(coords, QC_BOXES[k]) for k in ("pen", "blur", "fold"))
    assert pen.sum() == 24 and blur.sum() == 16 and fold.sum() == 9
    assert (flags[pen] & PEN).all()
    assert (flags[blur] & BLUR).all()
    assert (flags[fold] & FOLD).sum() >= 7
    clean = ~np.any([_touches(coords, box) for box in QC_BOXES.values()], axis=0)
    assert clean.sum() >= 80
    assert not (flags[clean] & (PEN | BLUR)).any()  # no clean patch lost to the default exclusions
    assert (flags[clean] & FOLD).sum() <= 1


def test_blur_is_judged_against_the_slides_own_sharpness():
    rng = np.random.default_rng(0)
    scores = np.stack([np.zeros(100), rng.normal(0.7, 0.02, 100), rng.normal(0.9, 0.05, 100)], axis=1)
    assert not (slide_flags(scores)[0] & BLUR).any()
    soft = scores.copy()
    soft[:, 1] *= 0.5  # a soft scanner: every patch half as sharp is not a blurred slide
    assert not (slide_flags(soft)[0] & BLUR).any()
    blurred = scores.copy()
    blurred[:30, 1] *= 0.6  # 30% of the slide out of focus: its median must not follow them
    flags, stats = slide_flags(blurred)
    assert (flags[:30] & BLUR).all() and not (flags[30:] & BLUR).any()
    assert stats["blur"]["threshold"] < stats["blur"]["median"]


@pytest.mark.parametrize("side", [128, 96])
def test_a_patch_scores_the_same_alone_or_in_a_tiling_batch(real_slides, side):
    """Tiling measures a task's patches as one stack: neighbours in the stack must not leak into a
    patch's scores (a blank, a blurred, an inked and real tissue patches, more than one stack)."""
    import openslide

    with openslide.OpenSlide(str(real_slides["cmu"])) as slide:
        region = np.asarray(slide.read_region((600, 1500), 0, (1200, 1200)).convert("RGB")).copy()  # 74% tissue
    rng = np.random.default_rng(0)
    patches = [np.ascontiguousarray(region[y : y + side, x : x + side]) for y, x in rng.integers(0, 1200 - side, (BATCH + 8, 2))]
    patches[1] = np.full((side, side, 3), 235, np.uint8)  # glass: no tissue, NaN sharpness and density
    patches[2] = cv2.GaussianBlur(patches[0], (0, 0), 3)
    patches[3] = patches[0].copy()
    cv2.line(patches[3], (0, 10), (side - 1, side // 2), (35, 60, 160), 12)  # blue ink
    together = batch_scores(patches)
    alone = np.stack([batch_scores([p])[0] for p in patches])
    assert together.shape == (len(patches), len(SCORE_NAMES))
    np.testing.assert_allclose(together, alone, rtol=1e-6, equal_nan=True)
    tissue = np.isfinite(together[:, 1])
    assert tissue[0] and np.isnan(together[1, 1:]).all() and tissue[4:].sum() >= 10  # glass vs real tissue
    assert together[3, 0] >= 0.05 > np.median(together[4:, 0])
    assert tissue[2] and together[2, 1] < 0.7 * np.median(together[4:][tissue[4:], 1])  # blur lowers sharpness


def test_real_he_no_stain_is_taken_for_ink_or_blur(real_store):
    store = PatchStore(real_store)
    flags = store.qc_flags()
    assert len(flags) > 200
    assert np.count_nonzero(flags & PEN) <= 0.01 * len(flags)
    assert np.count_nonzero(flags & BLUR) <= 0.01 * len(flags)


def test_exclude_qc_leaves_patches_out_without_shifting_indices(qc_store):
    everything = PatchStore(qc_store)
    store = PatchStore(qc_store, exclude_qc="pen,blur")
    assert len(store) == len(everything) == 144  # indices keep meaning every stored patch
    flags = store.qc_flags()
    kept = store.indices()
    assert len(kept) == 144 - np.count_nonzero(flags & (PEN | BLUR)) and len(kept) <= 104
    assert not (flags[kept] & (PEN | BLUR)).any()
    subset = store.kept()
    assert len(subset) == len(kept)
    assert store.coords(int(kept[5])) == everything.coords(int(kept[5]))
    np.testing.assert_array_equal(subset[5], everything[int(kept[5])])
    assert PatchStore(qc_store, exclude_qc="none").kept() is not None and len(PatchStore(qc_store).indices()) == 144
    with pytest.raises(SimclrPathError, match="unknown QC reason 'ink'"):
        PatchStore(qc_store, exclude_qc="pen,ink")


def test_store_without_qc_datasets_reads_as_clean_and_takes_qc_slides(qc_slide, tmp_path):
    out = tmp_path / "old.h5"
    spec = TileSpec(target_mpp=0.5, patch_size=128, min_tissue=0.0, qc=False)
    result = tile_slides([qc_slide], str(out), spec, workers=0)
    assert result.ok and result.as_dict()["qc"] is None
    with h5py.File(out, "r+") as f:  # a store from before QC: no root attribute either
        assert "qc_flags" not in f["slides/qc"] and f.attrs["qc"] == "off"
        del f.attrs["qc"]
    store = PatchStore(out, exclude_qc=("pen", "blur"))
    assert len(store) == 144 and store.included().all() and not store.qc_flags().any()
    store.close()
    info = one_json(run_cli("info", out))
    assert info["stores"][0]["qc"] is None and info["stores"][0]["slides"][0]["qc"] is None
    other = tmp_path / "other.tif"
    write_slide(other, qc_slide_image(seed=1), mpp=0.5)
    assert tile_slides([str(other)], str(out), TileSpec(target_mpp=0.5, patch_size=128, min_tissue=0.0), workers=0).ok
    store = PatchStore(out)
    flags = {name: store.qc_flags()[start:end] for name, start, end in store.slide_ranges()}
    assert not flags["qc"].any() and flags["other"].any()  # the new slide has QC, the old one none


def test_qc_off_stores_the_same_patches_and_nothing_else(qc_slide, qc_store, tmp_path):
    out = tmp_path / "off.h5"
    summary = one_json(run_cli("tile", qc_slide, "--out", out, "--patch-size", 128, "--min-tissue", 0, "--workers", 0,
                               "-q", "--qc", "off"))
    assert summary["qc"] is None and summary["patches"] == 144
    with h5py.File(out) as off, h5py.File(qc_store) as on:
        a, b = off["slides/qc"], on["slides/qc"]
        assert sorted(a.keys()) == ["coords", "patches", "tissue_fraction"]
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
        for i in (0, 50, 143):
            np.testing.assert_array_equal(a["patches"][i], b["patches"][i])
    r = run_cli("tile", qc_slide, "--out", out, "--patch-size", 128, "--min-tissue", 0, "--workers", 0, "-q")  # QC on
    assert_one_line_error(r, "qc=off, not on")


def test_tile_json_info_report_and_preview_show_qc(qc_slide, tmp_path):
    out = tmp_path / "p.h5"
    summary = one_json(run_cli("tile", qc_slide, "--out", out, "--patch-size", 128, "--min-tissue", 0, "--workers", 1,
                               "-q", "--qc-report", tmp_path / "qc", "--preview", tmp_path / "prev"))
    total = summary["qc"]["total"]
    assert total["pen"] == 24 and total["blur"] >= 16 and total["excluded"] >= 40
    assert summary["qc"]["slides"]["qc"] == total
    report = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert report["counts"] == total and len(report["flagged"]) == 144 - total["clean"]
    assert {"x", "y", "reasons", "scores"} <= set(report["flagged"][0])
    info = one_json(run_cli("info", out))
    assert info["stores"][0]["qc"]["pen"] == 24 and info["stores"][0]["slides"][0]["qc"]["pen"] == 24
    image = cv2.imread(str(tmp_path / "prev" / "qc.png"))
    magenta = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] > 200)
    orange = (image[..., 0] < 60) & (np.abs(image[..., 1].astype(int) - 165) < 30) & (image[..., 2] > 200)
    assert magenta[:1536].sum() > 500 and orange[:1536].sum() > 200  # pen and blur boxes
    assert magenta[1536:].any() and orange[1536:].any()  # and the legend's swatches under the slide
    r = run_cli("tile", qc_slide, "--out", tmp_path / "x.h5", "--qc", "off", "--qc-report", tmp_path / "q2", "-q")
    assert_one_line_error(r, "--qc-report needs QC")


def test_a_qc_report_that_cannot_be_written_names_the_report_not_the_store(qc_slide, tmp_path):
    (tmp_path / "rep" / "qc.json").mkdir(parents=True)  # where the slide's report must go: a folder
    r = run_cli("tile", qc_slide, "--out", tmp_path / "p.h5", "--patch-size", 128, "--min-tissue", 0, "--workers", 0, "-q",
                "--qc-report", tmp_path / "rep")
    assert_one_line_error(r, "qc.json: cannot write the QC report", "check --qc-report")
    assert "p.h5" not in r.stderr.split("qc.json")[0]
    assert not (tmp_path / "rep" / "qc.json.tmp").exists()
    (tmp_path / "rep" / "qc.json").rmdir()  # fixed: the rerun tiles the slide and writes its report
    summary = one_json(run_cli("tile", qc_slide, "--out", tmp_path / "p.h5", "--patch-size", 128, "--min-tissue", 0, "--workers", 0,
                               "-q", "--qc-report", tmp_path / "rep"))
    assert summary["patches"] == 144 and (tmp_path / "rep" / "qc.json").is_file()


def test_exclude_qc_reaches_select_regions_and_embed(qc_store, tmp_path):
    from segment_helpers import export_random_encoder

    from simclr_path.downstream.embed import embed_stores
    from simclr_path.selection.regions import build_regions

    store = PatchStore(qc_store, exclude_qc="pen,blur")
    flagged = set(np.flatnonzero(store.qc_flags() & (PEN | BLUR)).tolist())
    members = set(build_regions(store, 1).members.tolist())
    assert members and not members & flagged and len(members) == 144 - len(flagged)
    assert len(build_regions(PatchStore(qc_store, exclude_qc="none"), 1).members) == 144

    encoder = export_random_encoder(tmp_path / "enc.pt")
    summary = embed_stores(str(encoder), [str(qc_store)], str(tmp_path / "feat"), device="cpu", batch_size=64,
                           workers=0, exclude_qc="pen,blur")
    assert summary["patches"] == 144 - len(flagged) and summary["patches_excluded_qc"] == len(flagged)
    with h5py.File(tmp_path / "feat" / "h5_files" / "qc.h5") as f:
        coords = f["coords"][()]
    expected = np.array([store.coords(i)[1:] for i in store.indices()])
    np.testing.assert_array_equal(coords, expected)
    r = run_cli("select", encoder, qc_store, "--budget", 2, "--out", tmp_path / "sel", "--exclude-qc", "ink")
    assert_one_line_error(r, "unknown QC reason 'ink'")


def test_embed_of_a_store_qc_leaves_empty_is_one_line_naming_the_way_out(tmp_path):
    """Every patch inked: embed says so in one line and exits non-zero (was a TypeError traceback)."""
    from segment_helpers import export_random_encoder

    folder = tmp_path / "inked" / "a"
    folder.mkdir(parents=True)
    for i in range(12):
        patch = he_texture(64, 64, seed=i)
        patch[:] = (patch * (np.array(INKS["blue"], np.float32) / 255.0)).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), patch[..., ::-1])
    store = tmp_path / "inked.h5"
    assert one_json(run_cli("ingest", tmp_path / "inked", "--out", store))["qc"]["total"]["pen"] == 12
    encoder = export_random_encoder(tmp_path / "enc.pt")
    r = run_cli("embed", encoder, store, "--out", tmp_path / "feat", "--device", "cpu", "--workers", 0)
    assert_one_line_error(r, "every patch is flagged pen,blur by QC")
    r = run_cli("embed", encoder, store, "--out", tmp_path / "feat", "--device", "cpu", "--workers", 0,
                "--exclude-qc", "none")
    assert r.exit_code == 0 and one_json(r)["patches"] == 12


def test_select_on_a_slide_qc_leaves_empty_is_one_line_naming_the_way_out(tmp_path):
    from segment_helpers import export_random_encoder

    inked = (he_texture(768, 768, seed=5) * (np.array(INKS["green"], np.float32) / 255.0)).astype(np.uint8)
    slide = write_slide(tmp_path / "inked.tif", inked, mpp=0.5)
    store = tmp_path / "inked.h5"
    summary = one_json(run_cli("tile", slide, "--out", store, "--patch-size", 128, "--min-tissue", 0, "--workers", 0,
                               "-q"))
    assert summary["patches"] == 36 and summary["qc"]["total"]["pen"] == 36
    encoder = export_random_encoder(tmp_path / "enc.pt")
    r = run_cli("select", encoder, store, "--budget", 2, "--region-size", 1, "--out", tmp_path / "sel")
    assert_one_line_error(r, "every patch is flagged pen,blur by QC", "--exclude-qc none")
    assert not (tmp_path / "sel").exists() or not any((tmp_path / "sel").iterdir())


def test_pretrain_trains_on_the_kept_patches_and_refuses_a_changed_exclusion_on_resume(qc_store, tmp_path):
    from simclr_path.engine.checkpoint import load_checkpoint

    run = tmp_path / "run"
    tiny = ["--backbone", "resnet10t", "--batch", 16, "--image-size", 64, "--max-steps", 1, "--device", "cpu",
            "--workers", 0, "-q"]
    one_json(run_cli("pretrain", qc_store, "--out", run, *tiny))
    ckpt = load_checkpoint(str(run / "checkpoint.pt"))
    kept = len(PatchStore(qc_store, exclude_qc="pen,blur").indices())
    assert ckpt["store"]["patches"] == 144 and ckpt["store"]["patches_used"] == kept < 144
    assert ckpt["store"]["exclude_qc"] == ["pen", "blur"] and ckpt["config"]["run"]["exclude_qc"] == "pen,blur"
    r = run_cli("pretrain", qc_store, "--out", run, *tiny, "--max-steps", 2, "--exclude-qc", "none")
    assert_one_line_error(r, "--exclude-qc pen,blur, not none")


# `simclr-path ingest --qc`: the same QC on a folder of patch images, each top-level folder a "slide".

CLEAN_PER_CLASS, INKED_PER_CLASS = 12, 2


@pytest.fixture(scope="module")
def inked_folder(pcam, tmp_path_factory):
    """Real PCam valid patches in class folders: the first 12 of each class as they are, the next 2
    with a marker stroke painted over them (multiplied in, as ink absorbs light) and named ``inked-*``."""
    folder = tmp_path_factory.mktemp("inked") / "valid"
    for label, ink in (("0", "blue"), ("1", "black")):
        sources = sorted((pcam / "valid" / label).glob("*.jpg"))[: CLEAN_PER_CLASS + INKED_PER_CLASS]
        (folder / label).mkdir(parents=True)
        for source in sources[:CLEAN_PER_CLASS]:
            (folder / label / source.name).write_bytes(source.read_bytes())
        for k, source in enumerate(sources[CLEAN_PER_CLASS:]):
            rgb = cv2.cvtColor(cv2.imread(str(source)), cv2.COLOR_BGR2RGB)
            stroke = np.zeros(rgb.shape[:2], np.uint8)
            cv2.line(stroke, (0, 10 + 30 * k), (95, 60 + 20 * k), 1, 10)  # a 10 px line: ~12% of the patch
            factor = (np.array(INKS[ink], np.float32) / 255.0) ** 0.8
            rgb[stroke > 0] = (rgb[stroke > 0] * factor).astype(np.uint8)
            cv2.imwrite(str(folder / label / f"inked-{source.name}"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
    return folder


def _flags_by_file(path) -> dict[str, int]:
    with h5py.File(path) as f:
        return {name.decode(): int(flag) for label in ("0", "1")
                for name, flag in zip(f[f"slides/{label}/source_files"][()], f[f"slides/{label}/qc_flags"][()])}


def test_ingest_flags_the_inked_images_pen_and_no_clean_one(inked_folder, tmp_path):
    out = tmp_path / "on.h5"
    summary = one_json(run_cli("ingest", inked_folder, "--out", out, "--mpp", 0.97))  # --qc on by default
    flags = _flags_by_file(out)
    assert len(flags) == 2 * (CLEAN_PER_CLASS + INKED_PER_CLASS)
    inked = {name for name in flags if "inked-" in name}
    assert len(inked) == 2 * INKED_PER_CLASS
    assert all(flags[name] & PEN for name in inked)
    assert not any(flags[name] & PEN for name in flags if name not in inked)
    total = summary["qc"]["total"]
    assert total["pen"] == 2 * INKED_PER_CLASS and total["clean"] + total["excluded"] <= len(flags)
    assert summary["qc"]["slides"]["0"]["pen"] == summary["qc"]["slides"]["1"]["pen"] == INKED_PER_CLASS
    assert sum(counts["clean"] for counts in summary["qc"]["slides"].values()) == total["clean"]
    info = one_json(run_cli("info", out))["stores"][0]
    assert info["qc"] == {k: v for k, v in total.items() if k != "excluded"}
    assert {s["name"]: s["qc"]["pen"] for s in info["slides"]} == {"0": INKED_PER_CLASS, "1": INKED_PER_CLASS}


def test_exclude_qc_leaves_the_inked_images_of_an_ingested_store_out(inked_folder, tmp_path):
    out = tmp_path / "on.h5"
    one_json(run_cli("ingest", inked_folder, "--out", out))
    everything = PatchStore(out, exclude_qc="none")
    assert len(everything) == len(everything.indices()) == 2 * (CLEAN_PER_CLASS + INKED_PER_CLASS)
    store = PatchStore(out, exclude_qc="pen")
    with h5py.File(out) as f:
        files = [name.decode() for label in ("0", "1") for name in f[f"slides/{label}/source_files"][()]]
    kept = {files[i] for i in store.indices()}
    assert kept == {name for name in files if "inked-" not in name}
    assert [store.label(int(i)) for i in store.indices()] == [0] * CLEAN_PER_CLASS + [1] * CLEAN_PER_CLASS


def test_ingested_groups_carry_the_qc_datasets_and_attributes_a_tiled_slide_does(inked_folder, qc_store, tmp_path):
    out = tmp_path / "on.h5"
    one_json(run_cli("ingest", inked_folder, "--out", out))
    with h5py.File(out) as ingested, h5py.File(qc_store) as tiled:
        assert ingested.attrs["qc"] == tiled.attrs["qc"] == "on"
        group, slide = ingested["slides/0"], tiled["slides/qc"]
        assert {k for k in group.attrs if k.startswith("qc_")} == {k for k in slide.attrs if k.startswith("qc_")}
        assert list(group["qc_scores"].attrs["names"]) == list(slide["qc_scores"].attrs["names"])
        assert list(group["qc_flags"].attrs["reasons"]) == list(slide["qc_flags"].attrs["reasons"])
        assert group["qc_scores"].shape == (CLEAN_PER_CLASS + INKED_PER_CLASS, len(SCORE_NAMES))
        assert group.attrs["qc_pen"] == INKED_PER_CLASS and group.attrs["qc_pen_min_fraction"] == 0.02


def test_ingest_qc_off_stores_the_same_patches_and_no_qc(inked_folder, tmp_path):
    on, off = tmp_path / "on.h5", tmp_path / "off.h5"
    one_json(run_cli("ingest", inked_folder, "--out", on))
    summary = one_json(run_cli("ingest", inked_folder, "--out", off, "--qc", "off"))
    assert summary["qc"] is None and summary["patches"] == 2 * (CLEAN_PER_CLASS + INKED_PER_CLASS)
    with h5py.File(off) as a, h5py.File(on) as b:
        assert a.attrs["qc"] == "off"
        for label in ("0", "1"):
            assert sorted(a[f"slides/{label}"].keys()) == ["coords", "labels", "patches", "source_files",
                                                           "tissue_fraction"]
            assert not any(k.startswith("qc_") for k in a[f"slides/{label}"].attrs)
            for i in range(CLEAN_PER_CLASS + INKED_PER_CLASS):
                assert bytes(a[f"slides/{label}/patches"][i]) == bytes(b[f"slides/{label}/patches"][i])
    store = PatchStore(off, exclude_qc="pen,blur")
    assert store.included().all() and not store.qc_flags().any()
    assert one_json(run_cli("info", off))["stores"][0]["qc"] is None
