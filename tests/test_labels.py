"""Labels mean what the user meant: mask conventions, proposed squares, slide keys across stores,
overlapping patches, and the scores `segment-eval` headlines."""

import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_error, one_json, run_cli
from conftest import SHARED_DATA
from segment_helpers import export_random_encoder, gland_set, tile_images
from simclr_path.errors import SimclrPathError
from simclr_path.segment.labels import IGNORE, load_labels
from simclr_path.segment.masks import class_mask, decode_mask, resolve_mask_format
from simclr_path.store import PatchStore

GLAS = SHARED_DATA / "segmentation" / "glas"
GLAS_NAMES = ["testA_1", "testA_2"]


@pytest.fixture(scope="module")
def glands(tmp_path_factory):
    """Four 192x160 PNG images at 0.5 um/px tiled at 1.0 um/px into 32 px patches, masks 0/1."""
    return gland_set(tmp_path_factory.mktemp("glands"), 4)


@pytest.fixture(scope="module")
def glas(tmp_path_factory):
    """Two GlaS images as they ship (JPEG, 0/255 masks), tiled at 1.24 um/px into 64 px patches."""
    if not GLAS.exists():
        pytest.skip("../shared/data/segmentation/glas is not present")
    root = tmp_path_factory.mktemp("glas")
    store = tile_images([GLAS / "images" / f"{n}.jpg" for n in GLAS_NAMES], root / "glas.h5", slide_mpp=0.62,
                        mpp=1.24, patch_size=64)
    masks = root / "masks"
    masks.mkdir()
    for name in GLAS_NAMES:
        shutil.copy(GLAS / "masks" / f"{name}.png", masks / f"{name}.png")  # the files as they come
    return store, masks


def mask_of(glands, name="img0"):
    return cv2.imread(str(glands[2] / f"{name}.png"), cv2.IMREAD_UNCHANGED)


# --- mask conventions --------------------------------------------------------------------------------

def test_glas_masks_as_they_ship_read_as_background_and_gland(glas):
    store_path, masks = glas
    store = PatchStore(str(store_path))
    lines = []
    labels = load_labels(str(masks), store, log=lines.append)
    assert labels.mask_format == "binary" and labels.classes == ["background", "class1"]
    assert any("only the values 0 and 255" in line and "--mask-format index" in line for line in lines)
    truth = np.asarray(Image.open(masks / "testA_1.png"))
    gland_pixels = sum(int((labels.patch_mask(store, i) == 1).sum()) for i in labels.labelled_indices(store))
    assert gland_pixels > 0.2 * (labels.patch_mask(store, 0).size * len(labels.labelled_indices(store))) * \
        (truth > 0).mean()  # glands are labelled glands, not "unlabelled"
    assert not any((labels.patch_mask(store, i) == IGNORE).all() for i in labels.labelled_indices(store))
    # read the old way (255 = unlabelled), gland would have no pixel: refused, naming the class and the fix
    with pytest.raises(SimclrPathError, match=r"class 'gland' \(value 1\) has no labelled pixels.*--mask-format binary"):
        load_labels(str(masks), store, ["background", "gland"], mask_format="index")


def test_segment_on_glas_masks_trains_the_gland_class_and_records_the_format(glas, tmp_path):
    store_path, masks = glas
    encoder = export_random_encoder(tmp_path / "enc.pt")
    result = run_cli("segment", encoder, store_path, "--labels", masks, "--out", tmp_path / "run", "--max-steps", "1",
                     "--batch", "2", "--workers", "0", "-q")
    summary = one_json(result)
    assert "read as binary masks" in result.stderr
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "mask_format: binary" in config and summary["step"] == 1


@pytest.mark.parametrize("mode", ["1", "P", "LA"])
def test_one_bit_palette_and_grey_alpha_masks_decode_to_what_their_author_meant(glands, tmp_path, mode):
    mask = mask_of(glands)  # 0 background, 1 gland
    path = tmp_path / "img0.png"
    if mode == "1":
        Image.fromarray(mask.astype(bool)).save(path)  # 1-bit: OpenCV would decode 0/255
    elif mode == "P":
        image = Image.fromarray(mask, mode="L").convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 drawn red
        image.save(path)
    else:  # MoNuSeg-style grey + alpha, 0/255 grey; the top rows transparent (not labelled)
        alpha = np.full_like(mask, 255)
        alpha[:8] = 0
        Image.fromarray(np.dstack([mask * 255, alpha]).astype(np.uint8), mode="LA").save(path)
    decoded = decode_mask(str(path))
    assert decoded.mode == mode
    fmt, _ = resolve_mask_format("auto", {str(path): decoded})
    read = class_mask(decoded, fmt)
    expected = mask.copy()
    if mode == "LA":
        expected[:8] = IGNORE
    assert np.array_equal(read, expected)


def test_classes_are_never_invented_and_every_class_needs_pixels(glands, tmp_path):
    _, _, _, store_path = glands
    store = PatchStore(str(store_path))
    mask = mask_of(glands)
    folder = tmp_path / "gap"
    folder.mkdir()
    cv2.imwrite(str(folder / "img0.png"), np.where(mask == 1, 2, 0).astype(np.uint8))  # values 0 and 2
    with pytest.raises(SimclrPathError, match="no pixel of class 1"):
        load_labels(str(folder), store)
    cv2.imwrite(str(folder / "img0.png"), np.zeros_like(mask))  # background only
    with pytest.raises(SimclrPathError, match="label only class 0"):
        load_labels(str(folder), store)
    cv2.imwrite(str(folder / "img0.png"), mask)
    with pytest.raises(SimclrPathError, match=r"class 'tumour' \(value 2\) has no labelled pixels \(0 of \d+"):
        load_labels(str(folder), store, ["background", "gland", "tumour"])
    assert load_labels(str(folder), store, ["background", "gland"]).classes == ["background", "gland"]


def test_upper_case_png_masks_are_read_by_segment_and_select(glands, tmp_path):
    _, _, masks, store_path = glands
    folder = tmp_path / "labels"
    folder.mkdir()
    shutil.copy(masks / "img1.png", folder / "img1.PNG")
    store = PatchStore(str(store_path))
    labels = load_labels(str(folder), store)
    start, end = next((s, e) for key, s, e in store.slide_ranges() if key == "img1")
    assert sorted(labels.labelled_indices(store)) == list(range(start, end))
    encoder = export_random_encoder(tmp_path / "enc.pt")
    summary = one_json(run_cli("select", encoder, store_path, "--budget", "2", "--region-size", "1", "--annotated",
                               folder, "--out", tmp_path / "round", "--workers", "0", "-q"))
    assert summary["regions_annotated"] == end - start


def test_masks_for_images_not_in_the_run_are_skipped_with_a_warning(glands, tmp_path):
    _, _, masks, store_path = glands
    folder = tmp_path / "labels"
    shutil.copytree(masks, folder)
    cv2.imwrite(str(folder / "not_tiled.png"), mask_of(glands))
    lines = []
    labels = load_labels(str(folder), PatchStore(str(store_path)), log=lines.append)
    assert set(labels.slides) == {"img0", "img1", "img2", "img3"}
    assert any("skipped 1 label file(s)" in line and "not_tiled.png" in line for line in lines)
    only_other = tmp_path / "other"
    only_other.mkdir()
    cv2.imwrite(str(only_other / "not_tiled.png"), mask_of(glands))
    with pytest.raises(SimclrPathError, match="names a slide of the stores"):
        load_labels(str(only_other), PatchStore(str(store_path)))


# --- QuPath round trip -------------------------------------------------------------------------------

def _square_features(path):
    return json.loads(path.read_text())["features"]


def test_an_untouched_proposed_square_labels_nothing_and_is_counted(glands, tmp_path):
    _, _, _, store_path = glands
    encoder = export_random_encoder(tmp_path / "enc.pt")
    one_json(run_cli("select", encoder, store_path, "--budget", "3", "--region-size", "1", "--out", tmp_path / "r1",
                     "--workers", "0", "-q"))
    labels = tmp_path / "labels"
    labels.mkdir()
    proposals = sorted((tmp_path / "r1").glob("*.geojson"))
    assert not list((tmp_path / "r1").glob("img?.png"))  # thumbnails are not named like masks
    assert list((tmp_path / "r1").glob("*.thumbnail.png"))
    total = sum(len(_square_features(p)) for p in proposals)
    first = proposals[0]
    features = _square_features(first)
    x0, y0 = features[0]["geometry"]["coordinates"][0][0]
    gland = [[x0 + 8, y0 + 8], [x0 + 24, y0 + 8], [x0 + 24, y0 + 24], [x0 + 8, y0 + 24], [x0 + 8, y0 + 8]]
    features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [gland]},
                     "properties": {"objectType": "annotation", "classification": {"name": "gland"}}})
    sx0, sy0 = features[0]["geometry"]["coordinates"][0][0]
    sx1, sy1 = features[0]["geometry"]["coordinates"][0][2]
    others = [f for f in features[1:] if f["properties"].get("classification", {}).get("name") == "Annotate next"]
    if others:  # an L-shaped drawing beside another square, reaching into its box: that square stays untouched
        ox0, oy0 = others[0]["geometry"]["coordinates"][0][0]
        ell = [[ox0 - 40, oy0 - 40], [ox0 + 4, oy0 - 40], [ox0 + 4, oy0 + 4], [ox0 - 30, oy0 + 4],
               [ox0 - 30, oy0 + 40], [ox0 - 40, oy0 + 40], [ox0 - 40, oy0 - 40]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ell]},
                         "properties": {"objectType": "annotation", "classification": {"name": "gland"}}})
    (labels / first.name).write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    for other in proposals[1:]:
        shutil.copy(other, labels / other.name)  # exported back untouched
    store = PatchStore(str(store_path))
    lines = []
    label_set = load_labels(str(labels), store, ["background", "gland"], log=lines.append)
    assert label_set.unannotated_proposals == total - 1
    assert any(f"{total - 1} of {total} proposed" in line for line in lines)
    labelled = label_set.labelled_indices(store)
    in_square = [i for i in labelled if sx0 <= store.coords(int(i))[1] < sx1 and sy0 <= store.coords(int(i))[2] < sy1]
    assert len(in_square) == 1  # the square with a drawing in it
    assert all((label_set.patch_mask(store, int(i)) != 0).all() or int(i) in in_square
               for i in labelled)  # elsewhere only the drawing itself labels pixels: no square became background
    assert (label_set.patch_mask(store, int(labelled[0])) == 0).sum() > 0  # its undrawn rest: background
    # the whole round came back untouched: no labels, said so
    untouched = tmp_path / "untouched"
    untouched.mkdir()
    for p in proposals:
        shutil.copy(p, untouched / p.name)
    result = run_cli("segment", encoder, store_path, "--labels", untouched, "--classes", "background,gland", "--out",
                     tmp_path / "run", "--workers", "0", "-q")
    assert_error(result, "came back unannotated")


def test_a_reimported_proposal_marks_exactly_its_region_when_patches_overlap(glands, tmp_path):
    _, images, _, _ = glands
    # 32 px patches every 16 px: each region's box reaches halfway into its neighbours
    store_path = tile_images([images / "img0.png"], tmp_path / "overlap.h5", slide_mpp=0.5, mpp=1.0, patch_size=32,
                             stride=16)
    encoder = export_random_encoder(tmp_path / "enc.pt")
    one_json(run_cli("select", encoder, store_path, "--budget", "3", "--region-size", "2", "--out", tmp_path / "r1",
                     "--workers", "0", "-q"))
    proposals = tmp_path / "r1" / "img0.geojson"
    features = _square_features(proposals)
    (_, y0), (x1, y1) = features[0]["geometry"]["coordinates"][0][0], features[0]["geometry"]["coordinates"][0][2]
    # a gland drawn in the first square, at its edge: inside the strip its neighbours' boxes share
    gx, gy = x1 - 20, (y0 + y1) / 2
    gland = [[gx, gy], [gx + 12, gy], [gx + 12, gy + 12], [gx, gy + 12], [gx, gy]]
    features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [gland]},
                     "properties": {"objectType": "annotation", "classification": {"name": "gland"}}})
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "img0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    result = run_cli("select", encoder, store_path, "--budget", "1", "--region-size", "2", "--annotated", labels,
                     "--out", tmp_path / "r2", "--workers", "0", "-q")
    assert one_json(result)["regions_annotated"] == 1  # the square drawn in, not its neighbours
    assert "2 proposed 'Annotate next' square(s) came back with nothing drawn" in result.stderr
    label_set = load_labels(str(labels), PatchStore(str(store_path)), ["background", "gland"])
    assert label_set.unannotated_proposals == 2  # segment reads the same square as annotated, the same two not


# --- one slide name in two stores -------------------------------------------------------------------

def test_a_slide_name_in_two_stores_keeps_two_keys_in_every_command(glands, tmp_path):
    _, images, masks, _ = glands
    a = tile_images([images / "img0.png"], tmp_path / "site_a.h5", slide_mpp=0.5, mpp=1.0, patch_size=32)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    shutil.copy(images / "img1.png", b_dir / "img0.png")  # another image, the same name
    b = tile_images([b_dir / "img0.png"], tmp_path / "site_b.h5", slide_mpp=0.5, mpp=1.0, patch_size=32)
    store = PatchStore([str(a), str(b)])
    assert store.slide_names == ["img0-site_a", "img0-site_b"]  # both qualified: no key depends on the order
    assert PatchStore([str(b), str(a)]).slide_names == ["img0-site_b", "img0-site_a"]
    assert store.slide_source("img0-site_b") == (str(b), "img0")
    assert PatchStore(str(a)).slide_names == ["img0"]  # alone, a slide keeps its name
    # labels for the second store's slide only land on its patches
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(masks / "img1.png", labels / "img0-site_b.png")
    label_set = load_labels(str(labels), store)
    (_, _, end_a), (_, start_b, end_b) = store.slide_ranges()
    assert sorted(label_set.labelled_indices(store)) == list(range(start_b, end_b))
    truth = mask_of(glands, "img1")
    _, x, y = store.coords(start_b)
    assert np.array_equal(label_set.patch_mask(store, start_b), truth[y:y + 64:2, x:x + 64:2])
    # coords files: one each, never one overwriting the other
    one_json(run_cli("coords", a, b, "--out", tmp_path / "coords"))
    assert sorted(p.name for p in (tmp_path / "coords").iterdir()) == ["img0-site_a.h5", "img0-site_b.h5"]
    # predict writes both; its files are accepted back by segment --labels and select --annotated
    encoder = export_random_encoder(tmp_path / "enc.pt")
    one_json(run_cli("segment", encoder, a, b, "--labels", labels, "--out", tmp_path / "run", "--max-steps", "1",
                     "--workers", "0", "-q"))
    one_json(run_cli("predict", tmp_path / "run", a, b, "--out", tmp_path / "pred", "--workers", "0", "-q"))
    assert {"img0-site_a.png", "img0-site_b.png"} <= {p.name for p in (tmp_path / "pred").iterdir()}
    # a label file named by the bare slide name cannot say which store it is for: skipped, never guessed
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(masks / "img0.png", bare / "img0.png")
    with pytest.raises(SimclrPathError, match="img0-site_a"):
        load_labels(str(bare), store)
    back = tmp_path / "back"
    back.mkdir()
    shutil.copy(tmp_path / "pred" / "img0-site_b.png", back / "img0-site_b.png")
    assert set(load_labels(str(back), store, ["background", "class1"], every_class_labelled=False).slides) == \
        {"img0-site_b"}
    summary = one_json(run_cli("select", encoder, a, b, "--budget", "1", "--region-size", "1", "--annotated", back,
                               "--out", tmp_path / "sel", "--workers", "0", "-q"))
    assert summary["regions_annotated"] == end_b - start_b


def test_coords_refuses_an_ingested_store(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((32, 32, 3), 180, np.uint8))
    one_json(run_cli("ingest", tmp_path / "images", "--out", tmp_path / "in.h5", "--no-labels", "--mpp", "0.5"))
    result = run_cli("coords", tmp_path / "in.h5", "--out", tmp_path / "coords")
    assert_error(result, "in.h5", "ingested")
    assert not (tmp_path / "coords").exists()


# --- segment-eval ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(glands, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    _, _, masks, store = glands
    encoder = export_random_encoder(root / "enc.pt")
    one_json(run_cli("segment", encoder, store, "--labels", masks, "--out", root / "run", "--max-steps", "2",
                     "--workers", "0", "-q"))
    return root / "run"


def test_segment_eval_counts_each_slide_pixel_once_when_patches_overlap(glands, trained, tmp_path):
    _, images, masks, _ = glands
    overlapping = tile_images([images / "img0.png"], tmp_path / "ov.h5", slide_mpp=0.5, mpp=1.0, patch_size=32,
                              stride=16)
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(masks / "img0.png", labels / "img0.png")
    out = one_json(run_cli("segment-eval", trained, overlapping, "--labels", labels, "--workers", "0", "-q"))
    # the 192x160 image at 1 um/px is 96x80 store pixels, every one covered and labelled: counted once each
    assert out["overall"]["pixels"] == 96 * 80
    assert out["overall"]["mean_dice"] == out["overall"]["dice"]["class1"]  # headline: the foreground class
    assert out["overall"]["background_dice"] == out["overall"]["dice"]["background"]


def test_segment_eval_refuses_mask_values_outside_the_runs_classes(glands, trained, tmp_path):
    _, images, masks, store = glands
    bad = tmp_path / "masks"
    bad.mkdir()
    for name in ("img0", "img1", "img2", "img3"):
        shutil.copy(masks / f"{name}.png", bad / f"{name}.png")
    cv2.imwrite(str(bad / "img2.png"), np.where(mask_of(glands, "img2") == 1, 7, 0).astype(np.uint8))
    assert_error(run_cli("segment-eval", trained, "--images", images, "--masks", bad, "--workers", "0", "-q"),
                 "img2.png", "value(s) 7")
    assert_error(run_cli("segment-eval", trained, store, "--labels", bad, "--workers", "0", "-q"),
                 "img2.png", "class value(s) 7")


def test_segment_eval_reads_binary_0_255_truth_as_gland(glands, trained, tmp_path):
    _, images, masks, _ = glands
    binary = tmp_path / "binary"
    binary.mkdir()
    for name in ("img0", "img1", "img2", "img3"):
        cv2.imwrite(str(binary / f"{name}.png"), (mask_of(glands, name) * 255).astype(np.uint8))
    cv2.imwrite(str(binary / "extra.png"), mask_of(glands) * 255)  # a mask of an image not in this run
    index = one_json(run_cli("segment-eval", trained, "--images", images, "--masks", masks, "--workers", "0", "-q"))
    result = run_cli("segment-eval", trained, "--images", images, "--masks", binary, "--workers", "0", "-q")
    out = one_json(result)
    assert "skipped 1 mask(s) without an image" in result.stderr
    assert out["overall"] == index["overall"]  # 0/255 scored exactly as 0/1: glands are glands


def test_a_predicted_mask_with_no_foreground_reads_back_as_class_indices(glands, trained, tmp_path):
    """predict's masks hold 0 and 255 (not tiled) when nothing was found: they say they are class
    indices, so `auto` does not take the untiled glass for the foreground."""
    _, _, _, store = glands
    mask = np.zeros((80, 96), np.uint8)
    mask[:, 48:] = IGNORE
    from simclr_path.runtime.files import write_png
    from simclr_path.segment.masks import FORMAT_KEY

    folder = tmp_path / "pred"
    folder.mkdir()
    write_png(str(folder / "img0.png"), mask, text={FORMAT_KEY: "index"})
    assert decode_mask(str(folder / "img0.png")).declared == "index"
    labels = load_labels(str(folder), PatchStore(str(store)), ["background", "gland"], every_class_labelled=False,
                         mask_downsample=2)
    assert labels.mask_format == "index"
    assert set(np.unique(labels.slides["img0"].mask)) == {0, IGNORE}
    one_json(run_cli("predict", trained, store, "--out", tmp_path / "out", "--workers", "0", "-q"))
    assert decode_mask(str(tmp_path / "out" / "img0.png")).declared == "index"


def test_a_folder_mixing_0_255_and_class_index_masks_is_refused_but_1_bit_masks_mix_with_0_255(glands, tmp_path):
    _, _, _, store_path = glands
    store = PatchStore(str(store_path))
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "img0.png"), mask_of(glands, "img0") * 255)  # 0/255
    cv2.imwrite(str(folder / "img1.png"), mask_of(glands, "img1"))  # 0/1 in 8 bits: class indices
    with pytest.raises(SimclrPathError, match=r"mix conventions: img0.png holds only 0 and 255.*img1.png.*"
                                              r"--mask-format binary"):
        load_labels(str(folder), store)
    assert load_labels(str(folder), store, mask_format="binary").slides["img1"].mask.max() == 1
    Image.fromarray(mask_of(glands, "img1").astype(bool)).save(folder / "img1.png")  # 1-bit: binary by itself
    labels = load_labels(str(folder), store)
    assert labels.slides["img0"].mask.max() == 1 and labels.slides["img1"].mask.max() == 1


def test_select_refuses_an_annotated_folder_that_names_no_slide(glands, tmp_path):
    _, _, _, store_path = glands
    encoder = export_random_encoder(tmp_path / "enc.pt")
    for case in ("empty", "stray", "thumbnails"):
        folder = tmp_path / case
        folder.mkdir()
        if case == "stray":
            cv2.imwrite(str(folder / "elsewhere.png"), mask_of(glands))
        elif case == "thumbnails":
            cv2.imwrite(str(folder / "img0.thumbnail.png"), np.zeros((8, 8, 3), np.uint8))
        result = run_cli("select", encoder, store_path, "--budget", "1", "--annotated", folder, "--out",
                         tmp_path / f"out-{case}", "--workers", "0", "-q")
        assert_error(result, str(folder), "names a slide of these stores")
        assert not (tmp_path / f"out-{case}").exists()


def test_segment_seed_fixes_the_initial_decoder(glands, tmp_path):
    from simclr_path.segment.config import SegmentConfig
    from simclr_path.segment.train import build_segment_run

    _, _, masks, store = glands
    encoder = str(export_random_encoder(tmp_path / "enc.pt"))

    def initial(seed):
        cfg = SegmentConfig(encoder=encoder, workers=0, image_size=32, seed=seed)
        return build_segment_run([str(store)], str(masks), str(tmp_path / f"run{seed}"), cfg).model.state_dict()

    first, again, other = initial(0), initial(0), initial(1)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    decoder = [k for k in first if k.startswith("decoder") and first[k].dtype.is_floating_point]
    assert any(not np.array_equal(first[k], other[k]) for k in decoder)


def test_sparse_class_index_masks_with_background_only_slides_read_as_index(glands, tmp_path):
    """255 beside class values in one mask says the folder's 255 is 'unlabelled': a slide with only
    background revealed (0 and 255) is not a binary mask there."""
    _, _, _, store_path = glands
    folder = tmp_path / "sparse"
    folder.mkdir()
    revealed = np.full((160, 192), IGNORE, np.uint8)
    revealed[:64, :64] = mask_of(glands, "img0")[:64, :64]
    revealed[100:, 100:] = 1
    cv2.imwrite(str(folder / "img0.png"), revealed)  # 0, 1 and 255
    background = np.full((160, 192), IGNORE, np.uint8)
    background[:32, :32] = 0
    cv2.imwrite(str(folder / "img1.png"), background)  # 0 and 255 only
    labels = load_labels(str(folder), PatchStore(str(store_path)))
    assert labels.mask_format == "index"
    assert set(np.unique(labels.slides["img1"].mask)) == {0, IGNORE}
