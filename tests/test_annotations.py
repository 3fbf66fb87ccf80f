"""GeoJSON annotations as QuPath exchanges them: reading its variants, writing, rasterising."""

import json

import numpy as np
import pytest

from simclr_path.annotations.geojson import (
    Annotation, annotation_feature, polygons_area, rasterize, read_annotations, read_geojson, write_geojson,
)
from simclr_path.errors import SimclrPathError


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry, classification=None, **properties):
    if classification is not None:
        properties["classification"] = classification
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_written_features_read_back_as_qupath_annotations(tmp_path):
    features = [annotation_feature(np.array([[0, 0], [10, 0], [10, 5], [0, 5]]), classification="Tumor",
                                   color=(200, 0, 0), name="rank 1", measurements={"rank": 1, "score": np.float32(0.5),
                                                                                   "area_um2": float("nan")}),
                annotation_feature([[0, 0], [30, 0], [30, 30], [0, 30], [0, 0]], classification="Stroma",
                                   color=(0, 150, 0), holes=[[[10, 10], [20, 10], [20, 20], [10, 20]]])]
    write_geojson(tmp_path / "a.geojson", features)
    assert not (tmp_path / "a.geojson.tmp").exists()
    raw = json.loads((tmp_path / "a.geojson").read_text())
    assert raw["type"] == "FeatureCollection" and len({f["id"] for f in raw["features"]}) == 2
    first = raw["features"][0]
    assert first["geometry"]["coordinates"][0][0] == first["geometry"]["coordinates"][0][-1]  # closed ring
    assert first["properties"]["objectType"] == "annotation"
    assert first["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert first["properties"]["measurements"] == {"rank": 1, "score": 0.5, "area_um2": None}

    tumor, stroma = read_geojson(tmp_path / "a.geojson")
    assert (tumor.classification, tumor.name, stroma.name) == ("Tumor", "rank 1", None)
    np.testing.assert_array_equal(tumor.polygons[0][0], [[0, 0], [10, 0], [10, 5], [0, 5]])
    assert len(stroma.polygons[0]) == 2  # exterior and one hole
    assert polygons_area(tumor) == 50 and polygons_area(stroma) == 900 - 100
    assert tumor == read_geojson(tmp_path / "a.geojson")[0] and tumor != stroma


def test_reads_every_shape_qupath_exports(tmp_path):
    square = {"type": "Polygon", "coordinates": [_square(0, 0, 4, 4)]}
    multi = {"type": "MultiPolygon", "coordinates": [[_square(0, 0, 2, 2)], [_square(5, 5, 8, 8), _square(6, 6, 7, 7)]]}
    listed = [_feature(square, {"name": "Tumor", "color": [1, 2, 3]}), _feature(multi, "Stroma"),  # old: a string
              _feature(square), _feature(None, "Tumor"),  # unclassified; no geometry: ignored
              _feature({"type": "Point", "coordinates": [1, 1]}, "Tumor"),
              _feature({"type": "GeometryCollection", "geometries": [square, {"type": "LineString",
                                                                             "coordinates": [[0, 0], [1, 1]]}]})]
    annotations, skipped = read_annotations(_write(tmp_path / "list.json", listed))
    assert [a.classification for a in annotations] == ["Tumor", "Stroma", None, None]
    assert [len(a.polygons) for a in annotations] == [1, 2, 1, 1]
    assert [len(p) for p in annotations[1].polygons] == [1, 2]
    assert skipped == {"Point": 1, "LineString": 1}
    single = read_geojson(_write(tmp_path / "one.geojson", listed[0]))
    assert single == annotations[:1]
    collection = {"type": "FeatureCollection", "features": listed}
    assert read_geojson(_write(tmp_path / "fc.geojson", collection)) == annotations


@pytest.mark.parametrize("downsample, origin", [(1, (0, 0)), (1, (3, 7)), (2, (4, 6)), (2.5, (-5, 0))])
def test_rasterized_square_covers_exactly_the_pixels_whose_centres_it_contains(downsample, origin):
    tumor = Annotation("Tumor", ((np.array([[10.0, 20.0], [30.0, 20.0], [30.0, 40.0], [10.0, 40.0]]),),))
    mask = rasterize([tumor], {"Tumor": 1}, origin, (30, 25), downsample=downsample, fill=255)
    assert mask.shape == (25, 30) and mask.dtype == np.uint8
    cols = (np.arange(30) + 0.5) * downsample + origin[0]
    rows = (np.arange(25) + 0.5) * downsample + origin[1]
    expected = ((rows >= 20) & (rows < 40))[:, None] & ((cols >= 10) & (cols < 30))[None, :]
    np.testing.assert_array_equal(mask == 1, expected)
    assert set(np.unique(mask)) <= {1, 255}
    if (downsample, origin) == (1, (3, 7)):  # level-0 x 10..29 -> columns 7..26, y 20..39 -> rows 13..24
        assert mask[13:25, 7:27].min() == 1 and (mask == 1).sum() == 12 * 20


def test_smaller_polygon_inside_a_larger_one_wins_whatever_the_file_order():
    gland = Annotation("Gland", ((np.array([[4.0, 4], [8, 4], [8, 8], [4, 8]]),),))
    background = Annotation("Background", ((np.array([[0.0, 0], [12, 0], [12, 12], [0, 12]]),),))
    classes = {"Background": 0, "Gland": 1}
    for order in ([gland, background], [background, gland]):
        mask = rasterize(order, classes, (0, 0), (12, 12))
        assert (mask[4:8, 4:8] == 1).all() and (mask == 1).sum() == 16 and (mask == 0).sum() == 144 - 16


def test_a_hole_is_left_unlabelled_and_does_not_erase_what_lies_under_it():
    ring = np.array([[0.0, 0], [10, 0], [10, 10], [0, 10]])
    hole = np.array([[3.0, 3], [7, 3], [7, 7], [3, 7]])
    donut = Annotation("Tumor", ((ring, hole),))
    mask = rasterize([donut], {"Tumor": 2}, (0, 0), (12, 12), fill=255)
    assert (mask[3:7, 3:7] == 255).all() and (mask == 2).sum() == 100 - 16
    under = Annotation("Background", ((np.array([[0.0, 0], [12, 0], [12, 12], [0, 12]]),),))
    mask = rasterize([donut, under], {"Tumor": 2, "Background": 0}, (0, 0), (12, 12))
    assert (mask[3:7, 3:7] == 0).all() and (mask == 2).sum() == 84


def test_unknown_class_names_the_file_the_class_and_the_fix(tmp_path):
    path = _write(tmp_path / "slide.geojson", [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 4, 4)]},
                                                        "Necrosis")])
    with pytest.raises(SimclrPathError) as info:
        rasterize(read_geojson(path), {"Tumor": 0, "Stroma": 1}, (0, 0), (8, 8), path=str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "'Necrosis'" in message
    assert "--classes Tumor,Stroma,Necrosis" in message


@pytest.mark.parametrize("content, needle", [
    ("not json at all", "not valid JSON"),
    (json.dumps({"type": "Polygon", "coordinates": [_square(0, 0, 1, 1)]}), "'Polygon'"),
    (json.dumps(17), "a JSON int"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]})]), "at least 3"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], ["1", 1], [2, 0]]]})]), "number pairs"),
    (json.dumps([{"type": "Polygon"}]), "not a GeoJSON Feature"),
])
def test_files_that_are_not_geojson_annotations_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(SimclrPathError) as info:
        read_geojson(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message


def test_write_failure_is_a_one_line_error_and_leaves_no_temporary(tmp_path):
    with pytest.raises(SimclrPathError, match="cannot write GeoJSON"):
        write_geojson(tmp_path / "missing" / "a.geojson", [])
    assert not list(tmp_path.rglob("*.tmp"))
