"""Pen ink painted onto a share of a folder's patch images: the data of bench/quality.py --ink-share.

From a folder of patch images (PCam's ``valid/{0,1}/*.jpg``), writes OUT with the same layout: in
each top-level folder, a share of the images (``round(share x n)``, chosen at random) with marker
strokes painted over them, the others copied byte for byte. Beside OUT, ``OUT.json`` holds the
truth: which files are inked, with what, and how much of each is covered.

The ink is bench/qc.py's: real marker colours as scanned (its ``INKS``: blue, green, red, black; one
colour per image) laid over the pixels as ink absorbs light, ``rgb * (ink / 255) ** opacity``, with
an opacity of 0.6, 0.8 or 1.0 per stroke (its ``OPACITIES``). An image gets one or two strokes,
gently curving lines 8-400 px wide (log-uniform; PCam is ~0.97 um/px, so from a fine tip to a broad
marker wider than the 96 px patch), each moved off the patch's centre until the image's ink covers
a share drawn uniformly in [5%, 40%] of the patch (a wide stroke shows its edge, a thin one crosses
the middle and covers what its width does); the coverage reached is recorded per image and stroke.
Inked JPEGs are written at quality 95 (other formats losslessly, under the same name).
Deterministic given ``--seed``: the same folder and seed give the same files and truth.

Usage: python bench/ink.py SOURCE OUT [--share 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qc import INKS, OPACITIES  # noqa: E402  (bench/qc.py: the same marker colours and opacities)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Share of a patch the ink of one image aims to cover, drawn uniformly in this range.
COVERAGE = (0.05, 0.40)
MAX_STROKES = 2
#: Stroke widths (pixels; PCam is ~0.97 um/px), drawn log-uniformly: a fine tip to a broad marker.
WIDTH_PX = (8, 400)


def truth_path(out: Path) -> Path:
    """Where :func:`ink_folder` writes the truth of ``out``: ``out`` + ``.json``, beside it."""
    return out.with_name(out.name + ".json")


def paint(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """``rgb`` (HxWx3 uint8) with marker strokes over it, and what was painted."""
    h, w = rgb.shape[:2]
    ink = str(rng.choice(sorted(INKS)))
    target = float(rng.uniform(*COVERAGE))
    n_strokes = int(rng.integers(1, MAX_STROKES + 1))
    out, covered, strokes = rgb.astype(np.float32), np.zeros((h, w), np.uint8), []
    for _ in range(n_strokes):
        width = int(round(math.exp(rng.uniform(math.log(WIDTH_PX[0]), math.log(WIDTH_PX[1])))))
        stroke = _stroke(h, w, width, target / n_strokes, rng)
        opacity = float(rng.choice(OPACITIES))
        factor = (np.array(INKS[ink], np.float32) / 255.0) ** opacity
        on = stroke > 0
        out[on] *= factor
        covered |= stroke
        strokes.append({"width_px": width, "opacity": opacity, "coverage": round(float(stroke.mean()), 4)})
    record = {"ink": ink, "target_coverage": round(target, 4), "coverage": round(float(covered.mean()), 4),
              "strokes": strokes}
    return np.clip(np.round(out), 0, 255).astype(np.uint8), record


def _stroke(h: int, w: int, width: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 0/1 mask of one stroke ``width`` px wide, a gently curving line moved off the patch's
    centre, across its direction, until it covers ``share`` of the patch (bisection on the shift;
    a line too thin to cover that much runs through the middle)."""
    side = max(h, w)
    heading = rng.uniform(0, 2 * np.pi)
    normal = np.array([-math.sin(heading), math.cos(heading)])
    step, steps = side / 8, 12 + int(width / (side / 8))  # out 1.5 sides + the width each way

    def half(angle: float) -> list:
        point, points = np.zeros(2), []
        for k in range(steps):
            angle += rng.normal(0, 0.15) if k < 6 else 0.0  # curving across the patch, straight beyond it
            point = point + step * np.array([math.cos(angle), math.sin(angle)])
            points.append(point)
        return points

    line = np.array(half(heading + np.pi)[::-1] + [np.zeros(2)] + half(heading)) + np.array([w / 2, h / 2])

    def draw(shift: float) -> np.ndarray:
        mask = np.zeros((h, w), np.uint8)
        cv2.polylines(mask, [np.round(line + shift * normal).astype(np.int32)], False, 1, width)
        return mask

    near, far = 0.0, side + width  # covered most at the centre, nothing far off it
    if draw(near).mean() <= share:
        return draw(near)
    for _ in range(24):
        middle = (near + far) / 2
        if draw(middle).mean() > share:
            near = middle
        else:
            far = middle
    low, high = draw(near), draw(far)
    return low if low.mean() - share < share - high.mean() else high


def find_images(folder: Path) -> dict[str, list[Path]]:
    """Images under each top-level subfolder of ``folder`` (as ``simclr-path ingest`` groups them)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith("."):
            relative = path.relative_to(folder)
            groups.setdefault(relative.parts[0] if len(relative.parts) > 1 else "", []).append(path)
    return groups


def ink_folder(source: Path, out: Path, share: float, seed: int = 0) -> dict:
    """Write ``out``, a copy of ``source`` with ``share`` of each top-level folder's images inked, and
    its truth (returned, and written to :func:`truth_path`). An existing ``out`` is replaced."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    source, out = Path(source).resolve(), Path(out).resolve()
    groups = find_images(source)
    if not groups:
        raise ValueError(f"{source}: no images")
    partial = out.with_name(out.name + ".partial")
    for old in (partial, out):
        if old.exists():
            shutil.rmtree(old)
    truth_path(out).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    inked: dict[str, dict] = {}
    per_folder = {}
    for group in sorted(groups):
        paths = groups[group]
        chosen = set(rng.choice(len(paths), size=int(round(share * len(paths))), replace=False).tolist())
        per_folder[group] = {"files": len(paths), "inked": len(chosen)}
        for index, path in enumerate(paths):
            relative = path.relative_to(source)
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if index not in chosen:
                shutil.copyfile(path, target)
                continue
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{path}: not a readable image")
            rgb, record = paint(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rng)
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
            if not cv2.imwrite(str(target), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
                raise OSError(f"{target}: cannot be written")
            inked[str(relative)] = record
    coverage = sorted(r["coverage"] for r in inked.values())
    truth = {
        "source": str(source), "folder": str(out), "share": share, "seed": seed,
        "files": sum(len(p) for p in groups.values()), "inked_files": len(inked), "per_folder": per_folder,
        "coverage": {"min": coverage[0], "median": coverage[len(coverage) // 2], "max": coverage[-1]}
        if coverage else None,
        "inked": inked,
    }
    os.replace(partial, out)
    tmp = truth_path(out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(truth, indent=1) + "\n")
    os.replace(tmp, truth_path(out))  # last: a truth file means a complete folder
    return truth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of patch images (class folders kept)")
    parser.add_argument("out", type=Path, help="new folder: the copy, a share of it inked")
    parser.add_argument("--share", type=float, default=0.3, help="share of each top-level folder's images to ink")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth = ink_folder(args.source, args.out, args.share, args.seed)
    print(json.dumps({k: v for k, v in truth.items() if k != "inked"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
