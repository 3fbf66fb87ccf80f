"""QuPath's GeoJSON: annotation polygons in level-0 pixels, read, written and rasterised.

QuPath exports annotations (File > Export objects as GeoJSON) as a ``FeatureCollection``, a single
``Feature`` or a plain JSON list of features, depending on version and options; all three are
read. Coordinates are level-0 pixels (x to the right, y down, origin at the slide's top-left).
A feature's class is ``properties.classification``: ``{"name": ..., "color": [r, g, b]}`` in
QuPath >= 0.2, a plain string in older exports.

Geometry: ``Polygon`` and ``MultiPolygon`` (also inside a ``GeometryCollection``) are kept; points
and lines (cell centroids, rulers) are skipped and counted (:func:`read_annotations`); features
without geometry are ignored. Anything else is a one-line :class:`SimclrPathError` naming the file.

Rasterising (:func:`rasterize`) follows the pixel-centre rule: an output pixel gets a polygon's
class when its centre lies inside the polygon (holes excluded), so a square from level-0 x = 10
to 20 covers exactly pixels 10..19 at downsample 1, and polygons sharing an edge never overlap.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field

import numpy as np

from simclr_path.errors import SimclrPathError

#: The class of the regions ``select`` proposes. Exported back from QuPath with the annotations
#: drawn inside them, such a square means "this whole region was annotated": what no class polygon
#: covers in it is the first class (background); see :mod:`simclr_path.segment.labels`.
ANNOTATE_NEXT = "Annotate next"
ANNOTATE_NEXT_COLOR = (0, 190, 0)

_EXPORT_HINT = "export annotations from QuPath as GeoJSON (File > Export objects as GeoJSON)"
_POLYGONAL = ("Polygon", "MultiPolygon", "GeometryCollection")
_SKIPPED = ("Point", "MultiPoint", "LineString", "MultiLineString")


@dataclass(frozen=True, eq=False)
class Annotation:
    """One annotation object: its class and its polygons in level-0 pixels.

    Attributes:
        classification: ``properties.classification.name`` (QuPath), or None when unclassified.
        polygons: each polygon is ``(exterior ring, *hole rings)``; a ring is an (N, 2) float64
            read-only array of level-0 (x, y), N >= 3, not repeating its first point at the end.
        name: the object's name in QuPath, if any.
        properties: the feature's whole ``properties`` object (not compared).
    """

    classification: str | None
    polygons: tuple[tuple[np.ndarray, ...], ...]
    name: str | None = None
    properties: dict = field(default_factory=dict, compare=False)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return (self.classification == other.classification and self.name == other.name
                and len(self.polygons) == len(other.polygons)
                and all(len(a) == len(b) and all(np.array_equal(r, s) for r, s in zip(a, b))
                        for a, b in zip(self.polygons, other.polygons)))

    def __hash__(self) -> int:
        return hash((self.classification, self.name,
                     tuple(tuple(ring.tobytes() for ring in polygon) for polygon in self.polygons)))


# --- reading --------------------------------------------------------------------------------------

def read_geojson(path) -> list[Annotation]:
    """The polygon annotations of a GeoJSON file, in file order (see the module docstring)."""
    return read_annotations(path)[0]


def read_annotations(path) -> tuple[list[Annotation], dict[str, int]]:
    """``(annotations, skipped)``: as :func:`read_geojson`, plus the number of features skipped
    per geometry type (``{"Point": 12}``) so a caller can say what it ignored."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8-sig"))
    except OSError as exc:
        raise SimclrPathError(f"{path}: cannot be read ({exc.strerror or exc}); check the path") from None
    except (UnicodeDecodeError, ValueError) as exc:
        where = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise SimclrPathError(f"{path}: not GeoJSON (not valid JSON, {where}); {_EXPORT_HINT}") from None
    features = _features(data, path)
    annotations, skipped = [], {}
    for number, feature in enumerate(features):
        where = f"{path}: feature {number}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise SimclrPathError(f"{where} is not a GeoJSON Feature; {_EXPORT_HINT}")
        geometry = feature.get("geometry")
        if geometry is None:
            continue
        polygons = _polygons(geometry, where, skipped)
        if not polygons:
            continue
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise SimclrPathError(f"{where}: 'properties' is not an object; {_EXPORT_HINT}")
        name = properties.get("name")
        annotations.append(Annotation(_class_name(properties.get("classification"), where), tuple(polygons),
                                      name if isinstance(name, str) else None, properties))
    return annotations, skipped


def _features(data, path: str) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise SimclrPathError(f"{path}: not GeoJSON (a FeatureCollection without a 'features' list); "
                                  f"{_EXPORT_HINT}")
        return features
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    what = f"a JSON object of type {data.get('type')!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    raise SimclrPathError(f"{path}: not GeoJSON ({what}, not a FeatureCollection, Feature or list of Features); "
                          f"{_EXPORT_HINT}")


def _polygons(geometry, where: str, skipped: dict) -> list[tuple[np.ndarray, ...]]:
    """The polygons of one geometry; points and lines are counted in ``skipped``."""
    if not isinstance(geometry, dict):
        raise SimclrPathError(f"{where}: 'geometry' is not an object; {_EXPORT_HINT}")
    kind = geometry.get("type")
    if kind in _SKIPPED:
        skipped[kind] = skipped.get(kind, 0) + 1
        return []
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise SimclrPathError(f"{where}: GeometryCollection without a 'geometries' list; {_EXPORT_HINT}")
        return [polygon for part in parts for polygon in _polygons(part, where, skipped)]
    if kind not in _POLYGONAL:
        raise SimclrPathError(f"{where}: unknown geometry type {kind!r}; {_EXPORT_HINT}")
    coordinates = geometry.get("coordinates")
    if not isinstance(coordinates, list):
        raise SimclrPathError(f"{where}: {kind} without a 'coordinates' list; {_EXPORT_HINT}")
    if kind == "Polygon":
        return [_polygon(coordinates, where)]
    return [_polygon(rings, where) for rings in coordinates]


def _polygon(rings, where: str) -> tuple[np.ndarray, ...]:
    if not isinstance(rings, list) or not rings:
        raise SimclrPathError(f"{where}: a polygon without rings; fix or delete that annotation in QuPath and "
                              "export again")
    return tuple(_ring(ring, where) for ring in rings)


def _ring(points, where: str) -> np.ndarray:
    """(N, 2) float64 from GeoJSON positions (a z coordinate is dropped, the closing point too)."""
    if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) >= 2 and all(type(v) in (int, float) for v in p[:2]) for p in points):
        raise SimclrPathError(f"{where}: polygon coordinates are not [x, y] number pairs; {_EXPORT_HINT}")
    ring = np.array([p[:2] for p in points], dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(ring).all():
        raise SimclrPathError(f"{where}: polygon coordinates are not finite numbers; {_EXPORT_HINT}")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        raise SimclrPathError(f"{where}: a polygon ring with {len(ring)} distinct point(s), at least 3 needed; "
                              "fix or delete that annotation in QuPath and export again")
    ring.setflags(write=False)
    return ring


def _class_name(classification, where: str) -> str | None:
    if classification is None:
        return None
    if isinstance(classification, str):  # QuPath < 0.2
        return classification
    if isinstance(classification, dict) and isinstance(classification.get("name"), (str, type(None))):
        return classification.get("name")
    raise SimclrPathError(f"{where}: 'classification' is neither a name nor {{\"name\": ...}}; {_EXPORT_HINT}")


# --- writing --------------------------------------------------------------------------------------

def annotation_feature(exterior_xy, *, classification: str, color: tuple[int, int, int], name: str | None = None,
                       measurements: dict | None = None, holes=()) -> dict:
    """A GeoJSON Feature that QuPath imports as an annotation object.

    Args:
        exterior_xy: (N, 2) level-0 (x, y) of the outline, N >= 3; closed here if it is not.
        classification: the class name; QuPath needs a colour with it.
        color: the class colour, (r, g, b) 0-255.
        name: the object's name shown in QuPath (omitted when None).
        measurements: name -> number, shown in QuPath's measurement table; NaN becomes null.
        holes: (M, 2) level-0 rings cut out of the polygon.
    """
    rgb = [int(c) for c in color]
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"color must be three integers 0-255, got {color!r}")
    properties = {"objectType": "annotation"}
    if name is not None:
        properties["name"] = str(name)
    properties["classification"] = {"name": str(classification), "color": rgb}
    properties["measurements"] = {str(k): _json_number(v) for k, v in (measurements or {}).items()}
    return {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [_closed(exterior_xy), *(_closed(h) for h in holes)]},
            "properties": properties}


def _closed(ring) -> list[list[float]]:
    points = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(points) > 1 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    if len(points) < 3 or not np.isfinite(points).all():
        raise ValueError(f"a polygon ring needs at least 3 finite points, got {len(points)}")
    return [[float(x), float(y)] for x, y in points] + [[float(points[0, 0]), float(points[0, 1])]]


def _json_number(value):
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_geojson(path, features: list[dict]) -> None:
    """Write ``features`` as a FeatureCollection, atomically (``path.tmp`` then rename)."""
    path = str(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"type": "FeatureCollection", "features": list(features)}, fh, allow_nan=False)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise SimclrPathError(f"{path}: cannot write GeoJSON ({exc.strerror or exc}); choose a folder you can "
                              "write") from None


# --- geometry -------------------------------------------------------------------------------------

def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _polygon_area(polygon: tuple[np.ndarray, ...]) -> float:
    return _shoelace(polygon[0]) - sum(_shoelace(hole) for hole in polygon[1:])


def polygons_area(annotation: Annotation) -> float:
    """Area of an annotation in level-0 px^2: each polygon's exterior minus its holes (shoelace)."""
    return float(sum(_polygon_area(polygon) for polygon in annotation.polygons))


def bounds(polygon: tuple[np.ndarray, ...]) -> np.ndarray:
    """(4,) level-0 x0, y0, x1, y1 of a polygon's exterior ring."""
    ring = polygon[0]
    return np.concatenate([ring.min(axis=0), ring.max(axis=0)])


def square_of_each(drawn: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """(P,) int: the proposed square each drawn polygon belongs to, -1 for none.

    A polygon (``drawn``: (P, 4) bounding boxes) belongs to the square (``squares``: (S, 4) boxes,
    x0, y0, x1, y1) that holds its bounding box's centre; where proposed squares overlap (``tile
    --overlap``), to the one whose centre is nearest. So a drawing belongs to one square at most, and
    a polygon merely reaching into a square from outside belongs to none.
    """
    out = np.full(len(drawn), -1, dtype=np.int64)
    if not len(drawn) or not len(squares):
        return out
    centres = (drawn[:, :2] + drawn[:, 2:]) / 2  # (P, 2)
    square_centres = (squares[:, :2] + squares[:, 2:]) / 2  # (S, 2)
    inside = ((squares[None, :, 0] <= centres[:, None, 0]) & (centres[:, None, 0] < squares[None, :, 2])
              & (squares[None, :, 1] <= centres[:, None, 1]) & (centres[:, None, 1] < squares[None, :, 3]))
    distance = ((centres[:, None, :] - square_centres[None, :, :]) ** 2).sum(axis=2)
    distance = np.where(inside, distance, np.inf)
    nearest = distance.argmin(axis=1)
    found = np.isfinite(distance[np.arange(len(drawn)), nearest])
    out[found] = nearest[found]
    return out


def rasterize(annotations, class_index: dict[str, int], origin: tuple[float, float], size: tuple[int, int],
              downsample: float = 1.0, fill: int = 255, path: str = "") -> np.ndarray:
    """A uint8 label mask of a window of the slide.

    Output pixel (row i, column j) covers level-0 x in ``[ox + j*d, ox + (j+1)*d)`` and y likewise,
    with ``(ox, oy) = origin`` and ``d = downsample``; it takes the class of the polygon containing its
    centre (pixel-centre rule, holes cut out), else ``fill``. Polygons are painted largest first
    (area minus holes), so a small polygon drawn inside a big one (a gland inside a background
    region) wins where they overlap.

    Args:
        annotations: :class:`Annotation` objects (e.g. from :func:`read_geojson`).
        class_index: class name -> pixel value (0-255); None as a key takes unclassified objects.
        origin: level-0 (x, y) of the window's top-left corner.
        size: (width, height) of the output in pixels.
        downsample: level-0 pixels per output pixel.
        fill: value of pixels no polygon covers.
        path: the file the annotations came from, named in errors.
    """
    width, height = int(size[0]), int(size[1])
    if width < 0 or height < 0 or not downsample > 0:
        raise ValueError(f"size must be non-negative and downsample positive, got {size}, {downsample}")
    out = np.full((height, width), fill, dtype=np.uint8)
    painted = []
    for annotation in annotations:
        if annotation.classification not in class_index:
            raise SimclrPathError(_unknown_class(path, annotation.classification, class_index))
        value = int(class_index[annotation.classification])
        if not 0 <= value <= 255:
            raise ValueError(f"class {annotation.classification!r}: pixel value {value} is not in 0-255")
        painted += [(_polygon_area(polygon), value, polygon) for polygon in annotation.polygons]
    offset = np.asarray(origin, dtype=np.float64)
    for _, value, polygon in sorted(painted, key=lambda item: -item[0]):  # stable: ties keep file order
        rings = [(ring - offset) / downsample for ring in polygon]
        _paint(out, rings, value)
    return out


def _unknown_class(path: str, name: str | None, class_index: dict) -> str:
    where = f"{path}: " if path else ""
    if name is None:
        return f"{where}an annotation has no classification; classify it in QuPath (or delete it) and export again"
    known = [str(k) for k in class_index if k is not None]
    return f"{where}annotation class {name!r} is not one of the classes; add it to --classes {','.join(known + [name])}"


def _paint(out: np.ndarray, rings: list[np.ndarray], value: int) -> None:
    """Set the pixels of ``out`` whose centres lie inside ``rings`` (even-odd rule) to ``value``.

    A scanline fill: for each pixel row, the edges crossing the row's centre line (half-open in y,
    so a vertex on the line counts once) give sorted x crossings; pixels with centres between
    crossings 0-1, 2-3, ... are inside. Work is limited to the polygon's bounding box.
    """
    height, width = out.shape
    points = np.concatenate(rings)
    x_min, y_min = points.min(axis=0)
    x_max, y_max = points.max(axis=0)
    row0, row1 = max(0, math.ceil(y_min - 0.5)), min(height, math.ceil(y_max - 0.5))
    col0, col1 = max(0, math.ceil(x_min - 0.5)), min(width, math.ceil(x_max - 0.5))
    if row0 >= row1 or col0 >= col1:
        return
    starts = np.concatenate(rings)
    ends = np.concatenate([np.roll(ring, -1, axis=0) for ring in rings])
    x0, y0, x1, y1 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    low, high = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows r whose centre r + 0.5 lies in [low, high)
    first = np.clip(np.ceil(low - 0.5).astype(np.int64), row0, row1)
    last = np.clip(np.ceil(high - 0.5).astype(np.int64), row0, row1)
    counts = last - first
    keep = counts > 0
    if not keep.any():
        return
    counts = counts[keep]
    edge = np.repeat(np.flatnonzero(keep), counts)
    row = np.repeat(first[keep], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    centre = row + 0.5
    x = x0[edge] + (centre - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    # crossings pair up row by row: the first and second of each pair bound an inside span
    start_col = np.clip(np.ceil(x[0::2] - 0.5).astype(np.int64), col0, col1)
    end_col = np.clip(np.ceil(x[1::2] - 0.5).astype(np.int64), col0, col1)
    rows = row[0::2]
    spans = end_col > start_col
    diff = np.zeros((row1 - row0, col1 - col0 + 1), dtype=np.int32)
    np.add.at(diff, (rows[spans] - row0, start_col[spans] - col0), 1)
    np.add.at(diff, (rows[spans] - row0, end_col[spans] - col0), -1)
    inside = np.cumsum(diff[:, :-1], axis=1) > 0
    out[row0:row1, col0:col1][inside] = value
