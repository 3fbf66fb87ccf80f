"""Whole-slide reading through OpenSlide: opening, resolution metadata, fingerprints, regions.

Coordinates follow OpenSlide: ``(x, y)`` are level-0 pixels from the top-left corner; a region read
at level ``L`` covers ``size * level_downsamples[L]`` level-0 pixels.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_path.errors import SimclrPathError, SlideError

# Extensions OpenSlide opens (vendor formats plus generic tiled TIFF and DICOM).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".dcm", ".czi",
)

#: Plain images (one level, no resolution metadata) read through openslide-python's ``ImageSlide``
#: when OpenSlide itself does not open them: tissue micro-array cores, crops, GlaS-style datasets.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Largest plain image opened (ImageSlide holds it whole in memory: 3 bytes per pixel).
PLAIN_IMAGE_MAX_PIXELS = 1_000_000_000

#: Magnification that corresponds to 1 micron per pixel (10x ~ 1.0 um/px, 20x ~ 0.5, 40x ~ 0.25).
MICRONS_AT_1X = 10.0


@dataclass(frozen=True)
class SlideMeta:
    """What we record about a slide: identity, geometry and resolution."""

    path: str
    fingerprint: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # microns per level-0 pixel
    mpp_source: str  # "metadata", "csv", "cli" or "none"
    objective_power: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]


def fingerprint(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Content fingerprint: sha256 of the size and three 1 MiB samples (start, middle, end).

    Cheap for gigapixel files yet changes when the scan changes; a renamed or moved copy of a slide
    keeps its fingerprint, so resuming skips it.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            fh.seek(offset)
            digest.update(fh.read(block))
    return digest.hexdigest()[:32]


def open_slide(path: str | os.PathLike):
    """Open ``path`` with OpenSlide, turning every failure into a one-line :class:`SlideError`."""
    import openslide

    path = str(path)
    if not os.path.exists(path):
        raise SlideError(f"{path}: no such file; check the path")
    try:
        fmt = openslide.OpenSlide.detect_format(path)
    except Exception as exc:  # unreadable file
        raise SlideError(f"{path}: cannot be read ({exc}); check permissions") from None
    if fmt is None:
        return _open_image(path)
    try:
        return openslide.OpenSlide(path)
    except Exception as exc:
        raise SlideError(
            f"{path}: corrupt or unsupported {fmt} slide ({_one_line(exc)}); re-export or remove it"
        ) from None


def _open_image(path: str):
    """A plain image as a one-level slide (``openslide.ImageSlide``, decoded by Pillow)."""
    import openslide
    from PIL import Image

    if not path.lower().endswith(IMAGE_EXTENSIONS):
        raise SlideError(
            f"{path}: not a slide format OpenSlide reads; convert it to pyramidal TIFF or remove it"
        )
    # ImageSlide decodes the whole image into memory: past PLAIN_IMAGE_MAX_PIXELS a pyramidal TIFF is the way
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, PLAIN_IMAGE_MAX_PIXELS)
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            image.verify()  # a truncated or corrupt image fails here, not halfway through tiling
    except Image.DecompressionBombError:
        pixels = PLAIN_IMAGE_MAX_PIXELS + 1
    except Exception as exc:
        raise SlideError(
            f"{path}: neither a slide OpenSlide reads nor a readable image ({_one_line(exc)}); re-export or remove it"
        ) from None
    if pixels > PLAIN_IMAGE_MAX_PIXELS:
        raise SlideError(
            f"{path}: a plain image of over {PLAIN_IMAGE_MAX_PIXELS / 1e6:.0f} Mpx is decoded whole into memory; "
            "convert it to a pyramidal TIFF (e.g. 'vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg')"
        )
    try:
        return openslide.ImageSlide(path)
    except Exception as exc:
        raise SlideError(
            f"{path}: neither a slide OpenSlide reads nor a readable image ({_one_line(exc)}); re-export or remove it"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_mpp_table(csv_path: str | os.PathLike) -> dict[str, float]:
    """Read a ``slide,mpp`` CSV (header optional). Keys match a slide's file name or its stem."""
    table: dict[str, float] = {}
    try:
        with open(csv_path, newline="") as fh:
            for row_number, row in enumerate(csv.reader(fh), start=1):
                if not row or not row[0].strip() or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise SimclrPathError(
                        f"{csv_path}:{row_number}: expected 'slide,mpp', got {','.join(row)!r}"
                    )
                try:
                    mpp = float(row[1])
                except ValueError:
                    if row_number == 1:
                        continue  # header
                    raise SimclrPathError(
                        f"{csv_path}:{row_number}: mpp {row[1]!r} is not a number"
                    ) from None
                if not mpp > 0:
                    raise SimclrPathError(f"{csv_path}:{row_number}: mpp must be > 0, got {mpp}")
                table[row[0].strip()] = mpp
    except OSError as exc:
        raise SimclrPathError(f"{csv_path}: cannot read the mpp CSV ({exc.strerror})") from None
    return table


def _float_property(props, *keys) -> float | None:
    for key in keys:
        value = props.get(key)
        if value is None:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if number > 0:
            return number
    return None


def read_meta(
    slide,
    path: str | os.PathLike,
    fallback_mpp: float | None = None,
    mpp_table: dict[str, float] | None = None,
) -> SlideMeta:
    """Collect a slide's geometry and level-0 resolution.

    Resolution precedence: a ``--mpp-csv`` entry (an explicit per-slide correction), then the
    slide's own metadata, then ``--slide-mpp`` (a fallback for slides that carry none).
    """
    import openslide

    path = str(path)
    props = slide.properties
    mpp, source = None, "none"
    name = Path(path).name
    if mpp_table and (name in mpp_table or Path(path).stem in mpp_table):
        mpp, source = mpp_table.get(name, mpp_table.get(Path(path).stem)), "csv"
    else:
        mpp_x = _float_property(props, openslide.PROPERTY_NAME_MPP_X)
        mpp_y = _float_property(props, openslide.PROPERTY_NAME_MPP_Y)
        if mpp_x is not None:
            mpp, source = (mpp_x + mpp_y) / 2 if mpp_y else mpp_x, "metadata"
        elif fallback_mpp is not None:
            mpp, source = fallback_mpp, "cli"
    return SlideMeta(
        path=path,
        fingerprint=fingerprint(path),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
        level_dimensions=tuple(tuple(int(v) for v in d) for d in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp=mpp,
        mpp_source=source,
        objective_power=_float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
    )


def read_rgb(slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """``read_region`` as an HxWx3 uint8 RGB array, transparent (unscanned) pixels made white.

    Reads OpenSlide's premultiplied ARGB straight into a numpy buffer and converts it in one
    OpenCV pass (no PIL image in between: a third less time per patch); falls back to the public
    ``read_region`` where that low-level call is unavailable.
    """
    import cv2

    w, h = int(size[0]), int(size[1])
    argb = _read_argb(slide, int(location[0]), int(location[1]), int(level), w, h)
    if argb is None:
        rgba = np.asarray(slide.read_region(location, level, size))
        bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
    else:
        bgra = argb.view(np.uint8).reshape(h, w, 4)  # little-endian ARGB words are B, G, R, A bytes
    alpha = bgra[..., 3]
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    if alpha.min() < 255:
        if argb is None:  # PIL gave straight alpha: composite on white
            a = alpha[..., None].astype(np.uint16)
            rgb = ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        else:  # premultiplied: colour + (255 - alpha) is the colour over white
            rgb = cv2.add(rgb, cv2.merge([255 - alpha] * 3))
    return rgb


def _read_argb(slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray | None:
    try:
        from ctypes import POINTER, c_uint32

        from openslide import lowlevel

        handle = slide._osr
        read = lowlevel._read_region
    except (ImportError, AttributeError):
        return None
    buf = np.empty((h, w), dtype=np.uint32)
    if w and h:
        read(handle, buf.ctypes.data_as(POINTER(c_uint32)), x, y, level, w, h)
    return buf
