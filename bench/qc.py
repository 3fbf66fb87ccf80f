"""Tissue QC benchmark: artefacts painted at known positions onto the real slides, tiled with QC.

From the two public H&E slides in ../shared/data/slides (CMU-1-Small-Region at 0.499 um/px,
TCGA-CR-7395 at 0.25 um/px), builds (once, cached in bench/_work/qc/) pyramidal TIFFs with
artefacts painted where tissue is, and the truth beside each (``<name>.truth.npz``: a level-0
uint8 mask, 0 clean, i + 1 where artefact i of ``<name>.json``'s ``painted`` list is):

- pen: strokes of real marker colours (blue, green, red, black), one colour per slide, widths 30,
  100 and 300 um, opacity 0.6 / 0.8 / 1.0, laid over tissue and glass as ink absorbs light
  (multiplied: ``rgb * (ink / 255) ** opacity``);
- blur: three elliptic regions, Gaussian blur of sigma 0.5, 1 and 2 um (1-8 level-0 pixels);
- fold: two elliptic regions where the tissue lies on a shifted copy of itself (a double layer:
  ``a * b / 255``, darker and more saturated).

Each is tiled with ``simclr-path tile`` (0.5 um/px, 128 px, 2 workers) with QC on and off. A
patch is an artefact patch of a kind when the painted mask covers at least 5% of it (pen) or 50%
(blur, fold); clean when no artefact of any kind touches it; anything between is left out of both
counts. Printed, a table per kind (on the 128 px store): recall (artefact patches flagged for that
reason), clean patches lost (clean patches flagged pen or blur: what the default ``--exclude-qc
pen,blur`` drops), clean patches flagged fold; and the tiling time with QC over without, at 256
and 128 px (the whole command, best of 3 each, alternating), and over the extraction phase alone
(``extract_patches_per_s``: from the first patch read to the end, without start-up and tissue masks).

Usage: python bench/qc.py [--repeats 3] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work" / "qc"
SHARED = ROOT.parent / "shared" / "data" / "slides"
SOURCES = {"cmu": (SHARED / "CMU-1-Small-Region.svs", None), "tcga": (SHARED / "TCGA-CR-7395-01A-01-TS1.svs", 0.25)}
CLI = [sys.executable, "-m", "simclr_path"]

from simclr_path.store.format import qc_bit  # noqa: E402
from simclr_path.wsi.tissue import tissue_mask  # noqa: E402

#: Marker inks as scanned (RGB): what a slide's transmitted light looks like through them.
INKS = {"blue": (35, 60, 160), "green": (30, 120, 75), "red": (195, 30, 45), "black": (30, 30, 35)}
WIDTHS_UM = (30, 100, 300)
OPACITIES = (0.6, 0.8, 1.0)
BLUR_SIGMAS_UM = (0.5, 1.0, 2.0)
TRUTH_MIN = {"pen": 0.05, "blur": 0.5, "fold": 0.5}


def read_source(path: Path, mpp_override):
    slide = openslide.OpenSlide(str(path))
    rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")).copy()
    mpp = mpp_override or float(slide.properties["openslide.mpp-x"])
    return rgb, mpp


def tissue_points(rgb: np.ndarray, rng, n: int) -> np.ndarray:
    """n random level-0 (x, y) points on tissue."""
    small = cv2.resize(rgb, (rgb.shape[1] // 8, rgb.shape[0] // 8), interpolation=cv2.INTER_AREA)
    ys, xs = np.nonzero(tissue_mask(small))
    pick = rng.choice(len(xs), size=n, replace=False)
    return np.stack([xs[pick] * 8 + 4, ys[pick] * 8 + 4], axis=1)


def paint_pen(rgb, mpp, rng, ink):
    out, truth, strokes = rgb.copy(), np.zeros(rgb.shape[:2], np.uint8), []
    for (x, y), width_um, opacity in zip(tissue_points(rgb, rng, 3), WIDTHS_UM, rng.permutation(OPACITIES)):
        stroke = np.zeros(rgb.shape[:2], np.uint8)
        angle, points = rng.uniform(0, 2 * np.pi), [(x, y)]
        for _ in range(12):  # a wandering line about 1 mm long
            angle += rng.normal(0, 0.35)
            x, y = x + np.cos(angle) * 80 / mpp, y + np.sin(angle) * 80 / mpp
            points.append((x, y))
        cv2.polylines(stroke, [np.round(points).astype(np.int32)], False, 1, max(1, int(width_um / mpp)), cv2.LINE_AA)
        factor = (np.array(INKS[ink], np.float32) / 255.0) ** float(opacity)
        on = stroke > 0
        out[on] = np.clip(out[on].astype(np.float32) * factor, 0, 255).astype(np.uint8)
        truth[on] = len(strokes) + 1
        strokes.append({"ink": ink, "width_um": width_um, "opacity": float(opacity), "start": [int(points[0][0]),
                        int(points[0][1])]})
    return out, truth, strokes


def _ellipse(shape, centre, axes, angle):
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1])), float(angle), 0, 360, 1, -1)
    return mask


def paint_blur(rgb, mpp, rng):
    out, truth, regions = rgb.copy(), np.zeros(rgb.shape[:2], np.uint8), []
    for (x, y), sigma_um in zip(tissue_points(rgb, rng, 3), BLUR_SIGMAS_UM):
        region = _ellipse(rgb.shape[:2], (x, y), (rng.uniform(150, 250) / mpp, rng.uniform(100, 200) / mpp),
                          rng.uniform(0, 180))
        blurred = cv2.GaussianBlur(rgb, (0, 0), sigma_um / mpp)
        out[region > 0] = blurred[region > 0]
        truth[region > 0] = len(regions) + 1
        regions.append({"sigma_um": sigma_um, "centre": [int(x), int(y)]})
    return out, truth, regions


def paint_fold(rgb, mpp, rng):
    out, truth, regions = rgb.copy(), np.zeros(rgb.shape[:2], np.uint8), []
    for x, y in tissue_points(rgb, rng, 2):
        region = _ellipse(rgb.shape[:2], (x, y), (rng.uniform(150, 250) / mpp, rng.uniform(60, 120) / mpp),
                          rng.uniform(0, 180))
        shift = np.round(rng.normal(0, 1, 2) * 40 / mpp).astype(int)
        other = np.roll(rgb, tuple(shift[::-1]), axis=(0, 1))
        double = (rgb.astype(np.float32) * other.astype(np.float32) / 255.0).astype(np.uint8)
        out[region > 0] = double[region > 0]
        truth[region > 0] = len(regions) + 1
        regions.append({"centre": [int(x), int(y)], "shift_px": shift.tolist()})
    return out, truth, regions


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, levels: int = 3) -> None:
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(str(tmp)) as tw:
        level = rgb
        for i in range(levels):
            tw.write(level, tile=(256, 256), compression="jpeg", compressionargs={"level": 95}, photometric="rgb",
                     subfiletype=0 if i == 0 else 1, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
            level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA)
    tmp.replace(path)


def build(rebuild: bool) -> dict[str, list[Path]]:
    """Painted slides by kind, built once."""
    WORK.mkdir(parents=True, exist_ok=True)
    plan = [("pen", ink) for ink in INKS] + [("blur", 0), ("blur", 1), ("fold", 0)]
    slides = defaultdict(list)
    for source, (path, mpp_override) in SOURCES.items():
        rgb = mpp = None
        for number, (kind, variant) in enumerate(plan):
            name = f"{source}-{kind}-{variant}"
            out = WORK / kind / f"{name}.tif"
            slides[kind].append(out)
            if out.exists() and out.with_suffix(".truth.npz").exists() and not rebuild:
                continue
            if rgb is None:
                rgb, mpp = read_source(path, mpp_override)
            rng = np.random.default_rng(1000 + number + 100 * len(source))
            if kind == "pen":
                painted, truth, what = paint_pen(rgb, mpp, rng, variant)
            elif kind == "blur":
                painted, truth, what = paint_blur(rgb, mpp, rng)
            else:
                painted, truth, what = paint_fold(rgb, mpp, rng)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_pyramid(out, painted, mpp)
            np.savez_compressed(out.with_suffix(".truth.npz"), mask=truth)
            out.with_suffix(".json").write_text(json.dumps({"source": str(path), "mpp": mpp, "kind": kind,
                                                            "painted": what}, indent=1))
    return slides


def tile(slides: list[Path], out: Path, qc: str, patch_size: int = 128) -> tuple[float, dict]:
    if out.exists():
        out.unlink()
    args = [*CLI, "tile", *map(str, slides), "--out", str(out), "--patch-size", str(patch_size), "--workers", "2",
            "-q", "--qc", qc]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tile failed: {proc.stderr}")
    return seconds, json.loads(proc.stdout)


def coverage(mask: np.ndarray, coords: np.ndarray, side: int) -> np.ndarray:
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    h, w = mask.shape
    x0, y0 = np.clip(coords[:, 0], 0, w), np.clip(coords[:, 1], 0, h)
    x1, y1 = np.clip(coords[:, 0] + side, 0, w), np.clip(coords[:, 1] + side, 0, h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / float(side * side)


def score(kind: str, slides: list[Path], store: Path) -> tuple[list[dict], dict]:
    """Per painted slide: artefact patches found, clean patches lost; and recall by artefact setting
    (ink, width, opacity; blur sigma), each artefact patch counted under its most covering artefact."""
    rows, by_setting = [], defaultdict(lambda: [0, 0])
    with h5py.File(store, "r") as f:
        for slide in slides:
            group = f["slides"][slide.stem]
            coords = group["coords"][()]
            flags = group["qc_flags"][()]
            side = int(group["coords"].attrs["patch_size_level0"])
            labels = np.load(slide.with_suffix(".truth.npz"))["mask"]
            painted = json.loads(slide.with_suffix(".json").read_text())["painted"]
            per_label = np.stack([coverage(labels == i + 1, coords, side) for i in range(len(painted))], axis=1)
            cover = per_label.sum(axis=1)
            positive = cover >= TRUTH_MIN[kind]
            clean = cover == 0
            found = (flags & qc_bit(kind)) > 0
            rows.append({"slide": slide.stem, "patches": len(coords), "positive": int(positive.sum()),
                         "found": int(found[positive].sum()), "clean": int(clean.sum()),
                         "clean_lost": int(((flags & (qc_bit("pen") | qc_bit("blur"))) > 0)[clean].sum()),
                         "clean_fold": int(((flags & qc_bit("fold")) > 0)[clean].sum())})
            for i in np.flatnonzero(positive):
                what = painted[int(per_label[i].argmax())]
                keys = ([f"ink {what['ink']}", f"width {what['width_um']} um", f"opacity {what['opacity']}"]
                        if kind == "pen" else [f"sigma {what['sigma_um']} um"] if kind == "blur" else ["fold"])
                for key in keys:
                    by_setting[key][0] += int(found[i])
                    by_setting[key][1] += 1
    return rows, dict(by_setting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    slides = build(args.rebuild)
    everything = [s for kind in slides.values() for s in kind]
    times = {(size, qc): [] for size in (256, 128) for qc in ("off", "on")}
    rates = {key: [] for key in times}  # extract_patches_per_s: first patch read to the end, start-up left out
    summaries = {}
    for _ in range(args.repeats):
        for size, qc in times:
            seconds, summaries[size, qc] = tile(everything, WORK / f"all-{size}-{qc}.h5", qc, size)
            times[size, qc].append(seconds)
            rates[size, qc].append(summaries[size, qc]["extract_patches_per_s"])
    for size in (256, 128):
        off, on = min(times[size, "off"]), min(times[size, "on"])
        assert summaries[size, "on"]["patches"] == summaries[size, "off"]["patches"]
        print(f"tiling {len(everything)} painted slides into {summaries[size, 'on']['patches']} patches of {size} px "
              f"(0.5 um/px, 2 workers, whole command), best of {args.repeats}: QC off {off:.2f} s, QC on {on:.2f} s, "
              f"ratio {on / off:.3f}")
        fast_off, fast_on = max(rates[size, "off"]), max(rates[size, "on"])
        print(f"  extraction alone (first patch read to the end; start-up, tissue masks left out), best of "
              f"{args.repeats}: QC off {fast_off:.0f} patches/s, QC on {fast_on:.0f}, time ratio {fast_off / fast_on:.3f}")
    report = {"time_s": {f"{size}-{qc}": t for (size, qc), t in times.items()},
              "extract_patches_per_s": {f"{size}-{qc}": r for (size, qc), r in rates.items()}, "kinds": {}}
    for kind, kind_slides in slides.items():
        rows, by_setting = score(kind, kind_slides, WORK / "all-128-on.h5")
        report["kinds"][kind] = {"slides": rows, "by_setting": by_setting}
        print(f"\n{kind}: artefact patch = painted mask covers >= {TRUTH_MIN[kind]:.0%} of it")
        print(f"| slide | patches | {kind} patches | flagged {kind} | recall | clean | clean lost (pen/blur) "
              "| clean flagged fold |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows + [{"slide": "all", **{k: sum(x[k] for x in rows) for k in rows[0] if k != "slide"}}]:
            recall = r["found"] / r["positive"] if r["positive"] else float("nan")
            lost = r["clean_lost"] / r["clean"] if r["clean"] else float("nan")
            print(f"| {r['slide']} | {r['patches']} | {r['positive']} | {r['found']} | {recall:.3f} | {r['clean']} | "
                  f"{r['clean_lost']} ({lost:.2%}) | {r['clean_fold']} |")
        if kind != "fold":
            print("recall by setting: " + ", ".join(f"{key} {found}/{total} ({found / total:.3f})"
                                                    for key, (found, total) in sorted(by_setting.items())))
    (WORK / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
