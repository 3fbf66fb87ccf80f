"""Class masks on disk: what each pixel value of a label or truth PNG means.

One reader for every command that takes masks (``segment``'s labels, ``segment-eval``'s truth,
``select --annotated``), so a mask one command accepts no other reads differently. Our own
convention (the ``index`` format, also what ``predict`` writes): one 8-bit channel, a class index
per pixel, 255 where there is no class (unlabelled, not scored).

Masks as datasets ship them are decoded with Pillow, which keeps what the file says:

* 8-bit greyscale (``L``), or colour images whose channels are all equal: the values as stored;
* 1-bit PNGs (``1``, e.g. ``Image.fromarray(bool_array).save()``): 0 and 1, a binary mask by
  itself (OpenCV would give 0 and 255, which reads as "background + unlabelled");
* palette PNGs (``P``, e.g. Pascal VOC style): the palette *indices*, class indices by themselves;
* greyscale with alpha (``LA``, as MoNuSeg ships): the grey value; fully transparent pixels are
  unlabelled when the alpha channel is not constant;
* 16-bit greyscale whose values fit 8 bits: the values (0/65535 binary masks as 0/255). Colour-coded
  masks and instance masks (values above 255) are refused with a one-line error.

The **mask format** says what the decoded values mean:

* ``index``: class index per pixel, 255 = unlabelled;
* ``binary``: 0 = background (class 0), any other value = the first foreground class (class 1);
  transparent pixels are still unlabelled;
* ``auto`` (the default): a mask that says what it is (1-bit, palette, or ``predict``'s own masks,
  which state ``index`` in their PNG text) is read so; the others are ``binary`` when they hold 0
  and 255 and nothing else (GlaS 0/255 masks: as ``index`` they would mean "background +
  unlabelled" and could never train or score a foreground class), else ``index``. A mask holding
  class values beside 255 shows that the folder's 255 means "unlabelled": all are read as
  ``index``. A folder mixing 0/255-only masks with masks of other class values and no 255 (0/1
  masks) is refused: say which with the flag. The choice is said on stderr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from simclr_path.errors import SimclrPathError, first_line

#: The mask value of a pixel with no class: unlabelled (labels), not scored (truth), not covered (predictions).
IGNORE = 255
#: What ``--mask-format`` takes.
MASK_FORMATS = ("auto", "index", "binary")
#: File name suffix of every mask (any case: ``.png``, ``.PNG``).
MASK_SUFFIX = ".png"
#: File name suffix of ``select``'s thumbnails, never read as masks even though they are PNGs.
THUMBNAIL_SUFFIX = ".thumbnail.png"
#: PNG text key under which a mask says its own format (``predict`` writes ``index``): a predicted
#: mask with no foreground holds only 0 and 255, which ``auto`` would otherwise read as binary.
FORMAT_KEY = "simclr-path mask format"

#: What an image mode says by itself: a 1-bit mask is binary (0/1), a palette mask holds class indices.
_MODE_FORMATS = {"1": "binary", "P": "index"}

_FORMAT_HINT = "save masks as one-channel PNGs (class index per pixel, 255 = unlabelled) or 0/255 binary masks"


def is_mask_file(file_name: str) -> bool:
    """Whether ``file_name`` is a mask by its name: ``*.png`` in any case, not a ``select`` thumbnail."""
    lower = file_name.lower()
    return lower.endswith(MASK_SUFFIX) and not lower.endswith(THUMBNAIL_SUFFIX) and not file_name.startswith(".")


@dataclass
class DecodedMask:
    """A mask file's pixel values as stored, before the mask format gives them a meaning.

    Attributes:
        values: uint8 (H, W) decoded values (palette indices for palette PNGs).
        transparent: (H, W) bool, True where the alpha channel says "no label"; None without one.
        mode: Pillow's image mode of the file (``L``, ``1``, ``P``, ``LA``...), named in messages.
        declared: the format the file states in its PNG text (:data:`FORMAT_KEY`), else None.
    """

    values: np.ndarray
    transparent: np.ndarray | None
    mode: str
    declared: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def value_set(self) -> set[int]:
        """The distinct values of the labelled (non-transparent) pixels."""
        values = self.values if self.transparent is None else self.values[~self.transparent]
        return {int(v) for v in np.unique(values)}


def decode_mask(path: str) -> DecodedMask:
    """The pixel values of the PNG mask at ``path`` (see the module docstring for each image mode)."""
    path = str(path)
    if not os.path.isfile(path):
        raise SimclrPathError(f"{path}: no such mask file; {_FORMAT_HINT}")
    if os.path.getsize(path) == 0:
        raise SimclrPathError(f"{path}: not a readable PNG mask (the file is empty, 0 bytes); write it again")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
            declared = image.info.get(FORMAT_KEY)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = first_line(exc, 120)
        raise SimclrPathError(f"{path}: not a readable PNG mask ({reason}); {_FORMAT_HINT}") from None
    transparent = None
    if mode == "1":
        values = array.astype(np.uint8)
    elif mode in ("L", "P"):
        values = array.astype(np.uint8, copy=False)
    elif mode == "LA":
        values, alpha = array[..., 0], array[..., 1]
        transparent = alpha == 0 if alpha.min() != alpha.max() else None
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        if array.size and set(np.unique(array).tolist()) <= {0, 65535}:  # a 16-bit binary mask
            array = np.where(array > 0, 255, 0)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise SimclrPathError(
                f"{path}: a {mode} mask with values up to {int(array.max())} (an instance mask?); class masks hold "
                "class indices 0-254 (255 = unlabelled); convert it to a class mask")
        values = array.astype(np.uint8)
    elif mode in ("RGB", "RGBA"):
        colour, alpha = array[..., :3], array[..., 3] if mode == "RGBA" else None
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise SimclrPathError(
                f"{path}: a colour {mode} mask; masks hold one class index per pixel, not colours: "
                "save it as a greyscale or palette PNG of class indices")
        values = np.ascontiguousarray(colour[..., 0])
        if alpha is not None and alpha.min() != alpha.max():
            transparent = alpha == 0
    else:
        raise SimclrPathError(f"{path}: a {mode} image is not a class mask; {_FORMAT_HINT}")
    if values.ndim != 2 or values.size == 0:
        raise SimclrPathError(f"{path}: a mask must be a 2-D image, got shape {values.shape}; {_FORMAT_HINT}")
    declared = declared if declared in ("index", "binary") else _MODE_FORMATS.get(mode)
    return DecodedMask(values=np.ascontiguousarray(values), transparent=transparent, mode=mode, declared=declared)


def resolve_mask_format(mask_format: str, decoded: dict[str, DecodedMask]) -> tuple[str, str | None]:
    """``(format, note)``: the format the masks in ``decoded`` (path -> mask) are read in, and a line
    for stderr when ``auto`` chose ``binary`` (None otherwise). With ``auto``, masks that state their
    own format (``predict``'s) are read in it (:func:`class_mask`) and leave the others' choice alone."""
    if mask_format not in MASK_FORMATS:
        raise SimclrPathError(f"--mask-format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    undeclared = [m for m in decoded.values() if m.declared is None]
    if mask_format != "auto":
        return mask_format, None
    if not undeclared:
        declared = {m.declared for m in decoded.values()}
        return (declared.pop() if len(declared) == 1 else "index"), None
    binary_like = [path for path, m in decoded.items() if m.declared is None and m.value_set() == {0, IGNORE}]
    index_like = [path for path, m in decoded.items() if m.declared is None and m.value_set() - {0, IGNORE}]
    if any(IGNORE in decoded[path].value_set() for path in index_like):
        return "index", None  # class values beside 255 in one file: 255 is "unlabelled" in this folder
    if binary_like and index_like:
        first, other = os.path.basename(binary_like[0]), os.path.basename(index_like[0])
        values = sorted(decoded[index_like[0]].value_set() - {0, IGNORE})
        raise SimclrPathError(
            f"{os.path.dirname(binary_like[0]) or '.'}: the masks mix conventions: {first} holds only 0 and 255 "
            f"(a binary 0/255 mask?) while {other} holds class value(s) {','.join(map(str, values[:5]))}; pass "
            "--mask-format binary (0 = background, any other value = class 1) or --mask-format index (255 = "
            "unlabelled), or make the masks agree")
    if binary_like:
        return "binary", (f"masks hold only the values 0 and 255 ({len(binary_like)} file(s)): read as binary "
                          "masks, 0 = background, 255 = the foreground class (class 1); pass --mask-format index if "
                          "255 marks unlabelled pixels")
    return "index", None


def class_mask(decoded: DecodedMask, mask_format: str, explicit: bool = False) -> np.ndarray:
    """uint8 (H, W) class index per pixel (255 = unlabelled) of a decoded mask read in ``mask_format``
    (``index`` or ``binary``, as :func:`resolve_mask_format` resolved it), or in the format the file
    declares unless the user stated one (``explicit``)."""
    if decoded.declared is not None and not explicit:
        mask_format = decoded.declared
    if mask_format == "binary":
        out = (decoded.values != 0).astype(np.uint8)
    elif mask_format == "index":
        out = decoded.values.copy()
    else:
        raise ValueError(f"mask format {mask_format!r} is not resolved (index or binary)")
    if decoded.transparent is not None:
        out[decoded.transparent] = IGNORE
    return out


def read_class_mask(path: str, mask_format: str = "index") -> np.ndarray:
    """uint8 (H, W) class mask of the file at ``path`` read in ``mask_format`` (``auto`` decides on
    this file alone; folders are resolved together with :func:`resolve_mask_format`)."""
    decoded = decode_mask(path)
    resolved, _ = resolve_mask_format(mask_format, {str(path): decoded})
    return class_mask(decoded, resolved, explicit=mask_format != "auto")


def mask_downsample(path: str, shape: tuple[int, int], slide: str, width: int, height: int,
                    given: float | None = None) -> float:
    """Level-0 px per mask px of a (H, W) = ``shape`` mask of a ``width`` x ``height`` slide:
    ``given``, or inferred from the widths; the heights must agree within a pixel."""
    downsample = float(given) if given else width / shape[1]
    expected = (round(height / downsample), round(width / downsample))
    if abs(expected[0] - shape[0]) > 1 or abs(expected[1] - shape[1]) > 1:
        raise SimclrPathError(
            f"{path}: mask is {shape[1]}x{shape[0]} px but slide {slide} is {width}x{height} at level 0 "
            f"(expected {expected[1]}x{expected[0]} at downsample {downsample:g}); give a mask of the slide's "
            "shape at level 0 or at one downsample (--mask-downsample)"
        )
    return downsample
