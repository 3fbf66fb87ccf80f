"""Small segmentation data: plain PNG "slides" with red glands on pink stroma, and their masks."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from simclr_path.downstream.encoder import ENCODER_FORMAT


def gland_image(width: int, height: int, seed: int = 0, block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, mask): dark red blocky "glands" (class 1) on pink "stroma" (class 0), with noise.

    Glands are unions of ``block``-aligned squares, so a mask resampled at any divisor of
    ``block`` is exact.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(max(2, width * height // 6000)):
        w, h = (int(v) * block for v in rng.integers(2, 7, size=2))
        x = int(rng.integers(0, max(1, (width - w) // block))) * block
        y = int(rng.integers(0, max(1, (height - h) // block))) * block
        mask[y:y + h, x:x + w] = 1
    image = np.empty((height, width, 3), np.uint8)
    image[mask == 0] = (235, 170, 200)
    image[mask == 1] = (150, 40, 90)
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), mask


def write_gland_images(folder, count: int, width: int = 192, height: int = 160, seed: int = 0):
    """``count`` PNG images in ``folder``/images and class-index masks in ``folder``/masks."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    for i in range(count):
        image, mask = gland_image(width, height, seed + i)
        cv2.imwrite(str(folder / "images" / f"img{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "masks" / f"img{i}.png"), mask)
    return folder / "images", folder / "masks"


def gland_set(root, count: int):
    """``(root, images, masks, store)``: ``count`` 192x160 gland images at 0.5 um/px with their 0/1
    masks, tiled at 1.0 um/px into 32 px patches (raw codec)."""
    images, masks = write_gland_images(root, count)
    store = tile_images(sorted(images.iterdir()), root / "glands.h5", slide_mpp=0.5, mpp=1.0, patch_size=32)
    return root, images, masks, store


def tile_images(paths, out, *, slide_mpp: float = 0.5, mpp: float = 0.5, patch_size: int = 64, stride=None):
    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.tiler import tile_slides

    spec = TileSpec(target_mpp=mpp, patch_size=patch_size, stride=stride, min_tissue=0.0, codec="raw")
    result = tile_slides([str(p) for p in paths], str(out), spec, workers=0, fallback_mpp=slide_mpp)
    assert result.ok, result.failures
    return out


def export_random_encoder(path, timm_model: str = "resnet10t", input_mpp: float | None = None, seed: int = 0):
    """A random-init timm model in our export format."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(timm_model, pretrained=False, num_classes=0)
    meta = {"format": ENCODER_FORMAT, "version": 1, "timm_model": timm_model, "num_features": model.num_features,
            "input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "input_mpp": input_mpp}
    torch.save({"state_dict": model.state_dict(), "simclr_path": meta}, path)
    return path
