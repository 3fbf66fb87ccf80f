"""``simclr-path demo``: the whole chain on the CPU in a few minutes, with no input.

Draws a small H&E-like pyramidal slide (pink stroma, purple nuclei, glass; a fixed seed), tiles
it, pretrains a small ResNet for a few dozen steps, exports the encoder and reports where
everything went.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from simclr_path.downstream.encoder import export_encoder
from simclr_path.engine.config import PretrainConfig, apply_overrides, load_config
from simclr_path.engine.pretrain import pretrain
from simclr_path.runtime.console import Reporter, log
from simclr_path.wsi.grid import TileSpec
from simclr_path.wsi.tiler import tile_slides

DEMO_MPP = 0.25


def draw_tissue(width: int, height: int, seed: int = 7) -> np.ndarray:
    """An RGB image of H&E-like tissue: stroma fibres, nuclei of varied density, lumina, glass."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), (242, 240, 244), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(5):
        center = (int(rng.uniform(0.2, 0.8) * width), int(rng.uniform(0.2, 0.8) * height))
        axes = (int(rng.uniform(0.12, 0.3) * width), int(rng.uniform(0.12, 0.3) * height))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 6)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-6)
    stroma = np.stack([225 - 40 * noise, 150 - 50 * noise, 200 - 30 * noise], axis=-1).astype(np.uint8)
    img[mask > 0] = stroma[mask > 0]
    # glands: lumina ringed by dense nuclei
    for _ in range(int(width * height / 250_000)):
        cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if not mask[cy, cx]:
            continue
        r = int(rng.uniform(20, 60))
        for a in np.linspace(0, 2 * np.pi, int(r * 0.8), endpoint=False):
            x, y = int(cx + (r + 6) * np.cos(a)), int(cy + (r + 6) * np.sin(a))
            cv2.ellipse(img, (x, y), (5, 3), float(np.degrees(a)), 0, 360, (95, 45, 140), -1)
        cv2.circle(img, (cx, cy), r, (238, 228, 240), -1)
    # scattered nuclei, denser in some regions
    density = cv2.GaussianBlur(rng.random((height // 64 + 1, width // 64 + 1)).astype(np.float32), (0, 0), 1)
    for _ in range(width * height // 300):
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if mask[y, x] and rng.random() < density[y // 64, x // 64]:
            shade = int(rng.uniform(-20, 20))
            cv2.circle(img, (x, y), int(rng.integers(2, 5)), (110 + shade, 50 + shade, 150 + shade), -1)
    return img


def write_pyramid(path: str, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256) -> str:
    """A tiled pyramidal TIFF (zlib tiles) that OpenSlide reads as generic-tiff, with mpp set."""
    import tifffile

    tmp = f"{path}.tmp.tif"
    with tifffile.TiffWriter(tmp) as tw:
        level = image
        for i in range(levels):
            tw.write(level, tile=(tile, tile), compression="zlib", photometric="rgb",
                     resolution=(1e4 / (mpp * 2**i), 1e4 / (mpp * 2**i)), resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1)
            level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA)
    os.replace(tmp, path)
    return path


def demo_config(steps: int) -> PretrainConfig:
    """The ``small`` preset cut down to a CPU demo: batch 64, 64 px views, ``steps`` steps."""
    cfg = apply_overrides(load_config("small"), batch=64, image_size=64, max_steps=steps, workers=2, device="cpu")
    cfg.optim.epochs = 100
    cfg.run.checkpoint_every = 20
    return cfg


def run_demo(out_dir: str, steps: int = 40, progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    slide = os.path.join(out_dir, "demo-slide.tif")
    if not os.path.exists(slide):
        log(f"drawing a demo slide: {slide}")
        write_pyramid(slide, draw_tissue(4096, 3072), DEMO_MPP)
    store = os.path.join(out_dir, "patches.h5")
    tiled = tile_slides([slide], store, TileSpec(target_mpp=0.5, patch_size=96, min_tissue=0.5), workers=2,
                        reporter=Reporter(enabled=progress))
    if not tiled.ok:
        raise RuntimeError(f"demo tiling failed: {tiled.failures}")
    log(f"tiled {tiled.patches} patches into {store}")
    cfg = demo_config(steps)
    run = os.path.join(out_dir, "run")
    trained = pretrain([store], run, cfg, progress=progress)
    encoder = os.path.join(out_dir, "encoder.pt")
    export_encoder(run, encoder)
    return {
        "slide": os.path.abspath(slide),
        "store": os.path.abspath(store),
        "patches": tiled.patches,
        "run": trained["run"],
        "steps": trained["step"],
        "first_loss": trained["first_loss"],
        "last_loss": trained["last_loss"],
        "encoder": os.path.abspath(encoder),
        "load_with": f"timm.create_model('{cfg.model.backbone}', num_classes=0, checkpoint_path='{encoder}')",
    }
