"""``select``: regions of the stored slides, ranked for a pathologist to annotate next."""

import csv
import json

import cv2
import h5py
import numpy as np
import pytest
import torch

from cli_helpers import assert_error, one_json, run_cli
from simclr_path.annotations.geojson import annotation_feature, read_geojson, write_geojson
from simclr_path.cli.main import cli
from simclr_path.cli.select_commands import select as select_command
from simclr_path.downstream.encoder import ENCODER_FORMAT
from simclr_path.errors import SimclrPathError
from simclr_path.selection.kcenter import greedy_kcenter
from simclr_path.selection.outputs import ANNOTATE_COLOR, ANNOTATE_NEXT, draw_thumbnail
from simclr_path.selection.regions import build_regions
from simclr_path.selection.strategies import select_regions
from simclr_path.store import PatchStore, StoreWriter
from simclr_path.store.codecs import create_pixel_dataset, encode_patches, write_patches
from simclr_path.wsi.grid import TileSpec

if "select" not in cli.commands:  # until cli/main.py registers it
    cli.add_command(select_command)

PATCH = 16  # stored patch side, target px
SCALE = 2.0  # level-0 px per target px: a patch covers 32 level-0 px
MPP = 0.25  # level-0 um/px
COLORS = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [220, 220, 60]], dtype=np.uint8)


def make_store(path, slides, stride=None, seed=0, codec="raw"):
    """A store of ``slides``: a name -> (grid cells (N, 2), colour index per patch)."""
    rng = np.random.default_rng(seed)
    spec = TileSpec(target_mpp=MPP * SCALE, patch_size=PATCH, stride=stride, codec=codec)
    step0 = (stride or PATCH) * SCALE
    writer = StoreWriter(path, spec.as_attrs())
    for name, (cells, colors) in slides.items():
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        group = writer.begin(name)
        group.attrs.update({"source_path": f"/slides/{name}.svs", "fingerprint": f"{path}:{name}", "width": 640,
                            "height": 480, "level0_mpp": MPP, "scale": SCALE, "patch_level": 0,
                            "num_patches": len(cells)})
        group.create_dataset("coords", data=np.rint(cells * step0).astype(np.int64))
        pixels = COLORS[np.asarray(colors)][:, None, None, :] + rng.integers(0, 20, (len(cells), PATCH, PATCH, 3))
        dataset = create_pixel_dataset(group, codec, len(cells), PATCH)
        write_patches(dataset, 0, encode_patches(list(pixels.astype(np.uint8)), codec, 95), codec)
        writer.commit(name)
    writer.close()
    return path


def full_grid(columns, rows):
    return np.array([(x, y) for y in range(rows) for x in range(columns)])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A random-init resnet10t in the export format (32 px input): enough to run ``select`` quickly."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    meta = {"format": ENCODER_FORMAT, "version": 1, "timm_model": "resnet10t", "num_features": model.num_features,
            "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    torch.save({"state_dict": model.state_dict(), "simclr_path": meta}, path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two slides of 8 x 8 patches, each quarter of a slide one colour (2x2-patch regions: 16 per slide)."""
    cells = full_grid(8, 8)
    quadrant = (cells[:, 0] >= 4).astype(int) + 2 * (cells[:, 1] >= 4)
    return make_store(tmp_path_factory.mktemp("store") / "s.h5",
                      {"a": (cells, quadrant), "b": (cells, 3 - quadrant)})


def _select(encoder, store, out, *args):
    return run_cli("select", encoder, store, "--out", out, "--device", "cpu", "--workers", 0, "-q", *args)


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- regions ------------------------------------------------------------------------------------------

def test_regions_are_aligned_blocks_with_at_least_half_their_cells_stored(tmp_path):
    # cells: a full 2x2 block at (0,0); 2 of 4 in block (1,0); 1 of 4 in block (0,1): dropped
    cells = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 1), (0, 2)]
    store = PatchStore(make_store(tmp_path / "s.h5", {"a": (cells, [0] * 7)}, stride=8))
    step0, patch0 = 8 * SCALE, PATCH * SCALE  # 16 and 32 level-0 px
    regions = build_regions(store, 2)
    assert len(regions) == 2 and regions.slides[0].step0 == step0
    assert regions.x.tolist() == [0, 2 * step0] and regions.y.tolist() == [0, 0]
    assert regions.width.tolist() == regions.height.tolist() == [step0 + patch0] * 2  # 48 level-0 px
    np.testing.assert_allclose(regions.area_um2, (step0 + patch0) ** 2 * MPP ** 2)
    members = [sorted(regions.members[regions.offsets[r]:regions.offsets[r + 1]].tolist()) for r in range(2)]
    assert members == [[0, 1, 2, 3], [4, 5]]

    singles = build_regions(store, 1)  # every patch is a region, boxed as the patch itself
    assert len(singles) == 7 and sorted(singles.members.tolist()) == list(range(7))
    coords = np.array([store.coords(int(i))[1:] for i in singles.members])
    assert (singles.x == coords[:, 0]).all() and (singles.y == coords[:, 1]).all()
    assert (singles.width == patch0).all()


def test_ingested_image_folders_have_no_regions(tmp_path):
    path = make_store(tmp_path / "s.h5", {"a": (full_grid(2, 2), [0] * 4)})
    with h5py.File(path, "r+") as f:
        f["slides/a/coords"][...] = -1
    with pytest.raises(SimclrPathError, match="no slide coordinates.*simclr-path tile"):
        build_regions(PatchStore(path), 2)


# --- k-center -----------------------------------------------------------------------------------------

def _brute_force_kcenter(x, budget, centers=None):
    """The textbook O(N^2) greedy k-center on the full distance matrix."""
    distances = torch.cdist(x, x)
    if centers is not None:
        nearest = torch.cdist(x, centers).min(dim=1).values
    else:
        nearest = (x - x.mean(0)).norm(dim=1)
    picks = []
    for _ in range(budget):
        masked = nearest.clone()
        masked[picks] = -1
        pick = int(torch.argmax(masked))
        picks.append(pick)
        nearest = torch.minimum(nearest, distances[pick])
    return picks


@pytest.mark.parametrize("with_centers", [False, True])
def test_greedy_kcenter_picks_exactly_what_brute_force_picks(with_centers):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=generator, dtype=torch.float64)
    centers = torch.randn(40, 16, generator=generator, dtype=torch.float64) if with_centers else None
    order, distances = greedy_kcenter(x, 30, centers, chunk=37)  # many chunks, a ragged last one
    assert order == _brute_force_kcenter(x, 30, centers)
    assert distances == sorted(distances, reverse=True)  # coverage radius never grows
    if with_centers:
        assert distances[0] == pytest.approx(float(torch.cdist(x[order[:1]], centers).min()))


def test_greedy_kcenter_never_repeats_a_pick_even_among_duplicates():
    order, _ = greedy_kcenter(torch.ones(5, 3), 5)
    assert sorted(order) == [0, 1, 2, 3, 4]


def _clusters(per_cluster=10, dims=8, seed=0):
    """4 well-separated clusters of region features, cluster c at rows c*per_cluster...; unit norm."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.eye(dims)[:4] * 10
    x = means.repeat_interleave(per_cluster, 0) + 0.1 * torch.randn(4 * per_cluster, dims, generator=generator)
    return torch.nn.functional.normalize(x, dim=1)


def test_kcenter_spreads_picks_across_clusters_where_random_does_not():
    features, none = _clusters(), np.zeros(40, dtype=bool)
    ranked, scores = select_regions("kcenter", features, 4, none)
    assert sorted(ranked // 10) == [0, 1, 2, 3] and (np.diff(scores) <= 0).all()
    random_clusters = [len(set(select_regions("random", None, 4, none, seed=s)[0] // 10)) for s in range(10)]
    assert min(random_clusters) < 4  # some draw puts two picks in one cluster


def test_annotated_regions_are_never_proposed_and_push_kcenter_elsewhere():
    features = _clusters()
    annotated = np.zeros(40, dtype=bool)
    annotated[[0, 1, 12]] = True  # clusters 0 and 1 are covered already
    ranked, _ = select_regions("kcenter", features, 2, annotated)
    assert sorted(ranked // 10) == [2, 3]
    for strategy in ("random", "kcenter", "entropy", "hybrid"):
        ranked, _ = select_regions(strategy, features, 37, annotated, entropy=np.linspace(0, 1, 40), pool=37)
        assert len(set(ranked.tolist())) == 37 and not annotated[ranked].any()


def test_entropy_ranks_most_uncertain_first_and_hybrid_diversifies_among_them():
    features = _clusters()
    entropy = np.repeat([0.9, 0.8, 0.7, 0.1], 10) + np.linspace(0, 0.01, 40)  # cluster 0 least sure
    none = np.zeros(40, dtype=bool)
    ranked, scores = select_regions("entropy", features, 3, none, entropy=entropy)
    assert ranked.tolist() == [9, 8, 7] and scores.tolist() == entropy[[9, 8, 7]].tolist()
    ranked, scores = select_regions("hybrid", features, 2, none, entropy=entropy, pool=20)  # pool: clusters 0, 1
    assert sorted(ranked // 10) == [0, 1] and scores.tolist() == entropy[ranked].tolist()
    with pytest.raises(SimclrPathError, match="--pool 1 is smaller than --budget 2"):
        select_regions("hybrid", features, 2, none, entropy=entropy, pool=1)


def test_budget_beyond_the_candidates_is_a_one_line_error():
    annotated = np.zeros(40, dtype=bool)
    annotated[:5] = True
    with pytest.raises(SimclrPathError) as info:
        select_regions("kcenter", _clusters(), 36, annotated)
    assert str(info.value) == ("--budget 36 is more than the 35 regions that can be proposed (5 already "
                               "annotated); lower --budget or use a smaller --region-size")


# --- the command --------------------------------------------------------------------------------------

def test_select_writes_qupath_geojson_csv_and_thumbnails_that_agree(encoder, store, tmp_path):
    summary = one_json(_select(encoder, store, tmp_path / "out", "--budget", 5, "--region-size", 2))
    assert summary["regions"] == 32 and summary["regions_candidate"] == 32 and summary["regions_annotated"] == 0
    assert [row["rank"] for row in summary["selected"]] == [1, 2, 3, 4, 5]
    rows = _csv_rows(tmp_path / "out" / "regions.csv")
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    slides = sorted({r["slide"] for r in rows})
    assert sorted(summary["files"]) == sorted(["regions.csv", *(f"{s}.geojson" for s in slides),
                                               *(f"{s}.thumbnail.png" for s in slides)])
    for slide in slides:
        raw = json.loads((tmp_path / "out" / f"{slide}.geojson").read_text())
        assert raw["type"] == "FeatureCollection"
        for feature, annotation in zip(raw["features"], read_geojson(tmp_path / "out" / f"{slide}.geojson")):
            properties = feature["properties"]
            assert properties["objectType"] == "annotation" and annotation.classification == ANNOTATE_NEXT
            color = properties["classification"]["color"]
            assert len(color) == 3 and all(isinstance(c, int) for c in color)
            row = next(r for r in rows if r["slide"] == slide and f"rank {r['rank']}" == annotation.name)
            x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
            ring = annotation.polygons[0][0]
            assert (ring.min(0).tolist(), ring.max(0).tolist()) == ([x, y], [x + w, y + h])
            assert w == h == 16 * SCALE * 2 and x % w == 0 and y % h == 0  # 2x2 patches, aligned
            score = pytest.approx(float(row["score"]), rel=1e-5)  # the CSV has 6 significant digits
            assert properties["measurements"] == {"rank": int(row["rank"]), "score": score,
                                                  "area_um2": pytest.approx((w * MPP) ** 2)}
        thumbnail = cv2.imread(str(tmp_path / "out" / f"{slide}.thumbnail.png"))
        first = next(r for r in rows if r["slide"] == slide)
        # patches are 16 px in the thumbnail (never finer than stored): a box edge at level-0 x / 2
        edge = thumbnail[int(first["y"]) // 2 + 8, int(first["x"]) // 2]
        assert edge.tolist() == list(ANNOTATE_COLOR[::-1])
        assert thumbnail.shape[1] == 640 // 2 and (thumbnail[:240] != 255).any()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".out.*"))


def test_kcenter_proposes_one_region_per_tissue_type_before_repeating(encoder, store, tmp_path):
    one_json(_select(encoder, store, tmp_path / "out", "--budget", 4, "--region-size", 2))
    rows = _csv_rows(tmp_path / "out" / "regions.csv")
    # region x/y pick out the quadrant (colour) of slide a; slide b has the colours mirrored
    quadrant = [(int(r["x"]) >= 4 * 32) + 2 * (int(r["y"]) >= 4 * 32) for r in rows]
    colors = sorted(q if r["slide"] == "a" else 3 - q for q, r in zip(quadrant, rows))
    assert colors == [0, 1, 2, 3]


@pytest.mark.parametrize("slide_width", [640, 32000])  # 32000: JPEGs decoded at 1/8 size for 1.3 px patches
def test_thumbnails_of_jpeg_and_raw_stores_show_the_same_slide(tmp_path, slide_width):
    slides = {"a": (full_grid(6, 4), np.arange(24) % 4)}
    thumbnails = []
    for codec in ("raw", "jpeg"):
        path = make_store(tmp_path / f"{codec}.h5", slides, codec=codec)
        with h5py.File(path, "r+") as f:
            f["slides/a"].attrs.update({"width": slide_width, "height": slide_width * 3 // 4})
        store = PatchStore(path)
        thumbnails.append(draw_thumbnail(store, build_regions(store, 2), 0, np.array([1]), np.array([1])))
    raw, jpeg = (t.astype(int) for t in thumbnails)
    d = max(slide_width / 1280, 2)  # level-0 px per thumbnail px: long side 1280, never finer than patches
    tissue = (slice(0, int(4 * 32 / d)), slice(0, int(6 * 32 / d)))  # where the 6 x 4 patches are
    assert raw.shape == jpeg.shape == (round(slide_width * 3 / 4 / d), round(slide_width / d), 3)
    assert (raw[tissue] != 255).any(axis=2).all() and (raw[tissue].mean(axis=(0, 1)) < 200).all()
    assert np.abs(raw[tissue].mean(axis=(0, 1)) - jpeg[tissue].mean(axis=(0, 1))).max() < 4


def test_next_round_never_proposes_what_was_annotated(encoder, store, tmp_path):
    one_json(_select(encoder, store, tmp_path / "round1", "--budget", 6, "--region-size", 2))
    annotated = tmp_path / "qupath"
    annotated.mkdir()
    for path in (tmp_path / "round1").glob("*.geojson"):  # the pathologist drew in every proposal
        features = json.loads(path.read_text())["features"]
        for square in list(features):
            (x0, y0), (x1, y1) = square["geometry"]["coordinates"][0][0], square["geometry"]["coordinates"][0][2]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            features.append(annotation_feature([[cx - 5, cy - 5], [cx + 5, cy - 5], [cx + 5, cy + 5]],
                                               classification="Tumor", color=(255, 0, 0)))
        write_geojson(annotated / path.name, features)
    first = {(r["slide"], r["x"], r["y"]) for r in _csv_rows(tmp_path / "round1" / "regions.csv")}
    summary = one_json(_select(encoder, store, tmp_path / "round2", "--budget", 26, "--region-size", 2,
                               "--annotated", annotated))
    assert summary["regions_annotated"] == 6 and summary["regions_candidate"] == 26
    second = {(r["slide"], r["x"], r["y"]) for r in _csv_rows(tmp_path / "round2" / "regions.csv")}
    assert len(second) == 26 and not first & second
    assert_error(_select(encoder, store, tmp_path / "round3", "--budget", 27, "--region-size", 2,
                         "--annotated", annotated), "--budget 27", "26 regions", "6 already annotated")
    assert not (tmp_path / "round3").exists()


def test_label_masks_and_small_geojson_annotations_mark_their_regions(encoder, store, tmp_path):
    annotated = tmp_path / "annotated"
    annotated.mkdir()
    mask = np.full((480 // 4, 640 // 4), 255, np.uint8)  # slide a at downsample 4
    mask[10, 10] = 0  # one background pixel: level-0 (42, 42), in region (0, 0)
    mask[38:46, 50:60] = 3  # level-0 x 200..239, y 152..183: region (192, 128)
    cv2.imwrite(str(annotated / "a.png"), mask)
    tiny = annotation_feature([[100, 70], [102, 70], [102, 72]], classification="Tumor", color=(255, 0, 0))
    write_geojson(annotated / "b.geojson", [tiny])  # smaller than a raster pixel, in region (64, 64)
    (annotated / "notes.txt").write_text("ignored")
    summary = one_json(_select(encoder, store, tmp_path / "out", "--budget", 29, "--region-size", 2,
                               "--annotated", annotated, "--strategy", "random"))
    assert summary["regions_annotated"] == 3
    proposed = {(r["slide"], int(r["x"]), int(r["y"])) for r in _csv_rows(tmp_path / "out" / "regions.csv")}
    assert len(proposed) == 29
    assert not proposed & {("a", 0, 0), ("a", 192, 128), ("b", 64, 64)}
    assert all(r["score"] == "" for r in _csv_rows(tmp_path / "out" / "regions.csv"))  # random: no score


def test_features_from_embed_give_the_same_proposals_as_running_the_encoder(encoder, store, tmp_path):
    one_json(run_cli("embed", encoder, store, "--out", tmp_path / "features", "--device", "cpu", "--workers", 0,
                     "-q"))
    direct = one_json(_select(encoder, store, tmp_path / "direct", "--budget", 6, "--region-size", 2))
    embedded = one_json(_select(encoder, store, tmp_path / "embedded", "--budget", 6, "--region-size", 2,
                                "--features", tmp_path / "features"))
    key = [(r["slide"], r["x"], r["y"]) for r in direct["selected"]]
    assert key == [(r["slide"], r["x"], r["y"]) for r in embedded["selected"]]
    for a, b in zip(direct["selected"], embedded["selected"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)

    other = tmp_path / "other.pt"  # another encoder (any other bytes: another sha256)
    other.write_bytes(encoder.read_bytes() + b"\0")
    assert_error(_select(other, store, tmp_path / "bad", "--budget", 6, "--features", tmp_path / "features"),
                 "features.h5", "another encoder", "simclr-path embed")
    with h5py.File(tmp_path / "features" / "features.h5", "r+") as f:  # a patch the embed output lacks
        f["coords"][0] = [99999, 99999]
    assert_error(_select(encoder, store, tmp_path / "bad", "--budget", 6, "--region-size", 2, "--features",
                         tmp_path / "features"), "features.h5", "lacks features", "simclr-path embed")
    assert not (tmp_path / "bad").exists()


def test_a_rerun_replaces_the_proposals_of_slides_it_no_longer_proposes(encoder, store, tmp_path):
    one_json(_select(encoder, store, tmp_path / "out", "--budget", 32, "--region-size", 2, "--strategy", "random"))
    assert (tmp_path / "out" / "a.geojson").exists() and (tmp_path / "out" / "b.thumbnail.png").exists()
    (tmp_path / "out" / "mine.geojson").write_text("{}")  # not ours: left alone
    summary = one_json(_select(encoder, store, tmp_path / "out", "--budget", 1, "--region-size", 2, "--strategy",
                               "random"))
    slide = summary["selected"][0]["slide"]
    other = {"a": "b", "b": "a"}[slide]
    assert (tmp_path / "out" / f"{slide}.geojson").exists()
    assert not (tmp_path / "out" / f"{other}.geojson").exists() and not (tmp_path / "out" / f"{other}.thumbnail.png").exists()
    assert (tmp_path / "out" / "mine.geojson").exists()


@pytest.fixture
def brightness_entropy(monkeypatch):
    """A stand-in for the segment model's per-patch entropy: the patch's brightness; records calls."""
    import sys
    import types

    calls = []

    def patch_entropy(run_dir, store, indices, *, device="auto", batch_size=32, workers=2):
        calls.append((run_dir, len(indices)))
        return np.array([store[int(i)].mean() / 255 for i in indices], dtype=np.float32)

    monkeypatch.setitem(sys.modules, "simclr_path.segment.infer", types.SimpleNamespace(patch_entropy=patch_entropy))
    return calls


def test_entropy_ranks_regions_by_the_mean_entropy_of_their_patches(encoder, store, tmp_path, brightness_entropy):
    calls = brightness_entropy
    summary = one_json(_select(encoder, store, tmp_path / "out", "--budget", 8, "--region-size", 2, "--strategy",
                               "entropy", "--model", tmp_path))
    assert calls == [(str(tmp_path), 128)]
    rows = _csv_rows(tmp_path / "out" / "regions.csv")
    patches = PatchStore(store)
    for row in rows:  # all 8 regions of the brightest (yellow) quadrants, each scored by its patches' mean
        x, y = int(row["x"]) // 32, int(row["y"]) // 32
        members = [i for i in range(len(patches)) if patches.coords(i)[0] == row["slide"]
                   and x <= patches.coords(i)[1] // 32 < x + 2 and y <= patches.coords(i)[2] // 32 < y + 2]
        assert float(row["score"]) == pytest.approx(np.mean([patches[i].mean() / 255 for i in members]), rel=1e-5)
        assert (x >= 4 and y >= 4) == (row["slide"] == "a") and (x < 4 and y < 4) == (row["slide"] == "b")
    assert [r["score"] for r in summary["selected"]] == sorted((r["score"] for r in summary["selected"]),
                                                               reverse=True)


def test_hybrid_embeds_only_its_pool_and_ranks_as_with_every_feature(encoder, store, tmp_path, brightness_entropy,
                                                                     monkeypatch):
    from simclr_path.selection import features as features_module
    from simclr_path.selection.annotated import annotated_regions

    embedded = []
    real = features_module.region_features_from_encoder

    def counting(*args, needed=None, **kwargs):
        embedded.append(None if needed is None else int(needed.sum()))
        return real(*args, needed=needed, **kwargs)

    annotated = tmp_path / "annotated"
    annotated.mkdir()
    write_geojson(annotated / "a.geojson", [annotation_feature([[10, 10], [20, 10], [20, 20]], classification="x",
                                                               color=(0, 0, 0))])
    monkeypatch.setattr("simclr_path.selection.select.region_features_from_encoder", counting)
    summary = one_json(_select(encoder, store, tmp_path / "out", "--budget", 3, "--region-size", 2, "--strategy",
                               "hybrid", "--model", tmp_path, "--pool", 6, "--annotated", annotated))
    assert embedded == [6 + 1]  # the pool and the annotated region, not all 32 regions

    patches = PatchStore(store)  # the same ranking from every region's feature
    regions = build_regions(patches, 2)
    every = real(str(encoder), patches, regions, torch.device("cpu"), workers=0)
    is_annotated = annotated_regions(str(annotated), regions)
    entropy = features_module.region_entropy(str(tmp_path), patches, regions)
    ranked, scores = select_regions("hybrid", every, 3, is_annotated, entropy=entropy, pool=6)
    assert [(r["slide"], r["x"], r["y"]) for r in summary["selected"]] == [
        (regions.slides[regions.slide[i]].file_name, int(regions.x[i]), int(regions.y[i])) for i in ranked]
    assert [r["score"] for r in summary["selected"]] == pytest.approx(scores.tolist(), abs=1e-6)


@pytest.mark.parametrize("case", ["no-model", "model-with-kcenter", "not-geojson", "colour-mask",
                                  "out-is-annotated"])
def test_select_problems_are_one_line_errors_that_write_nothing(encoder, store, tmp_path, case):
    annotated = tmp_path / "annotated"
    annotated.mkdir()
    out, args = tmp_path / "out", ["--budget", 2]
    if case == "no-model":
        args, needles = args + ["--strategy", "entropy"], ("--strategy entropy needs --model",)
    elif case == "model-with-kcenter":
        args, needles = args + ["--model", tmp_path], ("--model is used by --strategy entropy or hybrid",)
    elif case == "not-geojson":
        (annotated / "a.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": []}))
        args, needles = args + ["--annotated", annotated], ("a.geojson", "not GeoJSON", "export annotations")
    elif case == "colour-mask":
        cv2.imwrite(str(annotated / "a.png"), np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8))
        args, needles = args + ["--annotated", annotated], ("a.png", "a colour RGB mask", "greyscale or palette PNG")
    else:
        out, args, needles = annotated, args + ["--annotated", annotated], ("also the --annotated folder",)
    assert_error(_select(encoder, store, out, *args), *needles)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
