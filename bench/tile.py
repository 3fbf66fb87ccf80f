"""Tiling benchmark: `simclr-path tile` vs a CLAM-style baseline and the decode ceiling.

Builds (once, cached in bench/_work/) a gigapixel-scale slide: the real CMU-1-Small-Region tissue
mosaicked to 40,960 x 40,960 px at 0.25 um/px, JPEG tiles, a 4-level pyramid, written with tifffile
so OpenSlide reads it as a generic TIFF. Then, on it and on the real slides, at 0.5 um/px, 256 px:

- tile 1w / 2w: `simclr-path tile` end to end (subprocess) with 1 and 2 workers, patches/s
- CLAM-style: one `read_region` per patch, `.convert("RGB")`, resize, append to an h5 dataset
- ceiling: only OpenSlide decoding the same strips into a buffer (no conversion; 1 process), patches/s
- peak RSS of the whole `tile` process tree, bytes/patch and random reads/s per codec

Usage: python bench/tile.py [--size 40960] [--skip-real]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"
SHARED = ROOT.parent / "shared" / "data" / "slides"
CMU = SHARED / "CMU-1-Small-Region.svs"

from simclr_path import PatchStore  # noqa: E402
from simclr_path.wsi.tile_reader import plan_tasks, prepare_slide, split_runs  # noqa: E402
from simclr_path.wsi.grid import TileSpec  # noqa: E402
from simclr_path.wsi.slide import _read_argb  # noqa: E402


def build_mosaic(path: Path, size: int, tile: int = 256, levels: int = 4) -> None:
    """Repeat CMU's tissue (with flips, so neighbours differ) into a size x size pyramid."""
    source = np.asarray(openslide.OpenSlide(str(CMU)).read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
    variants = [source, source[:, ::-1], source[::-1], source[::-1, ::-1]]
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(str(tmp), bigtiff=True) as tw:
        for level in range(levels):
            f = 2**level
            side = size // f
            scaled = [cv2.resize(v, (v.shape[1] // f, v.shape[0] // f), interpolation=cv2.INTER_AREA) for v in variants]
            sh, sw = scaled[0].shape[:2]

            def tiles():
                for ty in range(0, side, tile):
                    for tx in range(0, side, tile):
                        yield _mosaic_tile(scaled, sh, sw, tx, ty, tile)

            tw.write(tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg", compressionargs={"level": 80},
                     photometric="rgb", resolution=(1e4 / (0.25 * f), 1e4 / (0.25 * f)), resolutionunit="CENTIMETER",
                     subfiletype=0 if level == 0 else 1)
    os.replace(tmp, path)


def _mosaic_tile(scaled, sh, sw, tx, ty, tile):
    out = np.empty((tile, tile, 3), np.uint8)
    y = ty
    while y < ty + tile:
        cy, oy = divmod(y, sh)
        h = min(sh - oy, ty + tile - y)
        x = tx
        while x < tx + tile:
            cx, ox = divmod(x, sw)
            w = min(sw - ox, tx + tile - x)
            out[y - ty : y - ty + h, x - tx : x - tx + w] = scaled[(cx + 2 * cy) % 4][oy : oy + h, ox : ox + w]
            x += w
        y += h
    return out


class PeakRSS:
    """Peak resident memory of a process and all its descendants (summed), polled from /proc."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self):
        children = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        todo, seen = [self.pid], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo.extend(children.get(pid, []))
        return seen

    def _run(self):
        while not self._stop:
            total = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        for line in fh:
                            if line.startswith("VmRSS:"):
                                total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def stop(self):
        self._stop = True
        self._thread.join()
        return self.peak


def run_tile(slide: Path, out: Path, workers: int, codec: str = "jpeg", extra=()):
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-m", "simclr_path", "tile", str(slide), "--out", str(out), "--workers", str(workers),
           "--codec", codec, "-q", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss = PeakRSS(proc.pid)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"tile failed: {stderr.decode()}")
    summary = json.loads(stdout)
    return len(PatchStore(out)), seconds, peak, summary["extract_patches_per_s"]


def clam_style(slide_path: Path, spec: TileSpec, coords, plan, out: Path):
    """The common baseline: one read_region per patch, appended one by one to an h5 dataset."""
    slide = openslide.OpenSlide(str(slide_path))
    start = time.perf_counter()
    with h5py.File(out, "w") as f:
        dset = f.create_dataset("imgs", shape=(0, spec.patch_size, spec.patch_size, 3), maxshape=(None, spec.patch_size, spec.patch_size, 3),
                                dtype=np.uint8, chunks=(1, spec.patch_size, spec.patch_size, 3))
        for i, (x, y) in enumerate(coords):
            img = slide.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size)).convert("RGB")
            if plan.read_size != spec.patch_size:
                img = img.resize((spec.patch_size, spec.patch_size))
            dset.resize(i + 1, axis=0)
            dset[i] = np.asarray(img)
        f.create_dataset("coords", data=coords)
    return time.perf_counter() - start


def decode_ceiling(slide_path: Path, sp, spec: TileSpec):
    """Only decode: read the same strips the tiler reads, nothing else (1 process)."""
    openslide_slide = openslide.OpenSlide(str(slide_path))
    plan = sp.plan
    start = time.perf_counter()
    for indices in plan_tasks(sp):
        coords = sp.coords[indices]
        for run in split_runs(coords, plan.step_level * plan.level_downsample):
            level_xy = np.round(coords[run] / plan.level_downsample).astype(np.int64)
            width = int(level_xy[-1, 0] - level_xy[0, 0] + plan.read_size)
            _read_argb(openslide_slide, int(coords[run][0, 0]), int(coords[run][0, 1]), plan.level, width,
                       plan.read_size)
    return time.perf_counter() - start


def random_reads(store_path: Path, n: int = 2000) -> float:
    store = PatchStore(store_path)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(store), size=n)
    store[0]
    start = time.perf_counter()
    for i in idx:
        store[int(i)]
    return n / (time.perf_counter() - start)


def bench_slide(label: str, slide: Path, spec: TileSpec, extra, rows, codec_rows):
    sp = prepare_slide(str(slide), spec, 0.25 if "TCGA" in slide.name else None, None, None, "x")
    n = len(sp.coords)
    runs = {}
    for workers in (1, 2):
        count, seconds, peak, steady = run_tile(slide, WORK / f"{label}-{workers}w.h5", workers, extra=extra)
        runs[workers] = (count / seconds, peak, steady)
    clam_s = clam_style(slide, spec, sp.coords, sp.plan, WORK / f"{label}-clam.h5")
    ceil_s = decode_ceiling(slide, sp, spec)
    ours1, ours2 = runs[1][0], runs[2][0]
    steady1, steady2 = runs[1][2], runs[2][2]
    clam, ceiling = n / clam_s, n / ceil_s
    rows.append((label, f"{sp.meta.dimensions[0]}x{sp.meta.dimensions[1]}", n, f"{ours1:,.0f}", f"{ours2:,.0f}",
                 f"{steady1:,.0f}", f"{steady2:,.0f}", f"{clam:,.0f}", f"{ceiling:,.0f}",
                 f"{steady1 / clam:.2f}x", f"{steady2 / clam:.2f}x", f"{steady1 / ceiling:.2f}x",
                 f"{runs[1][1] / 2**20:,.0f}", f"{runs[2][1] / 2**20:,.0f}"))
    for codec in ("jpeg", "raw"):
        path = WORK / f"{label}-{codec}.h5"
        if codec == "jpeg":
            path = WORK / f"{label}-1w.h5"
        else:
            run_tile(slide, path, 2, codec="raw", extra=extra)
        codec_rows.append((label, codec, f"{os.path.getsize(path) / max(n, 1) / 1024:,.1f}", f"{random_reads(path):,.0f}"))


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: " | ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40960, help="mosaic side in level-0 pixels")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    mosaic = WORK / f"mosaic-{args.size}.tif"
    if not mosaic.exists():
        t = time.perf_counter()
        build_mosaic(mosaic, args.size)
        print(f"built {mosaic.name} ({mosaic.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    spec = TileSpec(target_mpp=0.5, patch_size=256)
    rows, codec_rows = [], []
    bench_slide("mosaic", mosaic, spec, [], rows, codec_rows)
    if not args.skip_real:
        bench_slide("CMU", CMU, spec, [], rows, codec_rows)
        bench_slide("TCGA", SHARED / "TCGA-CR-7395-01A-01-TS1.svs", spec, ["--slide-mpp", "0.25"], rows, codec_rows)
        bench_slide("NDPI", SHARED / "Hamamatsu-test3-DAPI-2-387.ndpi", spec, [], rows, codec_rows)
    print("\nTiling at 0.5 um/px, 256 px patches, patches/s. 'tile' = whole CLI run (start-up, tissue, fingerprints);")
    print("'steady' = its patch-extraction phase, comparable with the CLAM-style loop and the decode ceiling;")
    print("RSS = peak resident memory of the whole process tree.")
    print_table(("slide", "level-0 size", "patches", "tile 1w", "tile 2w", "steady 1w", "steady 2w", "CLAM-style",
                 "ceiling 1p", "1w/CLAM", "2w/CLAM", "1w/ceiling", "RSS 1w MiB", "RSS 2w MiB"), rows)
    print("\nCodecs")
    print_table(("slide", "codec", "KiB/patch", "random reads/s"), codec_rows)


if __name__ == "__main__":
    main()
