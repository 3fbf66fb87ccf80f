"""A contact sheet of augmentations: patches beside the two views pretraining draws from them.

Augmentation strength is judged by eye before GPU-days are spent on it, so ``simclr-path views``
draws ``n`` patches spread over the stores and, for each, the two views that pretraining with the
same config, seed and epoch feeds the network. They are the very same pixels: each comes from the
:func:`~simclr_path.data.views.draw_views` call, with the same :func:`~simclr_path.data.views.sample_seed`,
that :class:`~simclr_path.data.datasets.TwoViewDataset` makes for ``(epoch, index)``.

Layout (all sizes in pixels): a few columns of ``[patch | view 1 | view 2]`` triplets, as many as keep
the sheet roughly square, one patch per triplet. The patch is shown whole, resized to the view
size, so all three tiles are on the scale the network sees; the views are crops of it. Views
smaller than :data:`MIN_TILE_SIDE` are enlarged by a whole factor with nearest-neighbour for display
only (each view pixel becomes a ``scale`` x ``scale`` block; the legend says so). Under each tile a
short label: the patch's index, size and place, or the transforms that fired in that view
(``crop 43% hflip rot90 jitter gray``). A legend band at the bottom lists the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from simclr_path.data.views import ViewConfig, build_transform, draw_views, sample_seed
from simclr_path.errors import SimclrPathError
from simclr_path.runtime.files import write_png

#: Smallest side of a tile on screen, in pixels; smaller views are enlarged by a whole factor.
MIN_TILE_SIDE = 128
MARGIN = 8  # around the sheet
TILE_GAP = 4  # between the tiles of one triplet
GROUP_GAP = 20  # between triplets side by side
ROW_GAP = 8  # between a label band and the next row of tiles
LABEL_LINES = 3  # text lines under each tile
LABEL_LINE_HEIGHT = 16
LABEL_FONT_SCALE = 0.4
LEGEND_LINE_HEIGHT = 22
LEGEND_FONT_SCALE = 0.5
FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, RULE, PAPER = (30, 30, 30), (180, 180, 180), 255  # RGB

#: Short names of the transforms that fire, in the order :func:`build_transform` applies them.
SHORT_NAMES = {"HorizontalFlip": "hflip", "VerticalFlip": "vflip", "HEStain": "stain", "ColorJitter": "jitter",
               "ToGray": "gray", "GaussianBlur": "blur"}


@dataclass
class GridSample:
    """One patch of the sheet: its store index, pixels (HxWx3 uint8 RGB), two views and their labels."""

    index: int
    patch: np.ndarray
    views: list[np.ndarray]
    patch_label: str
    view_labels: list[str]


@dataclass(frozen=True)
class GridLayout:
    """Where each tile of an ``n``-patch sheet goes; every size in pixels.

    Attributes:
        n: patches (triplets) on the sheet.
        view_size: side of a training view.
        scale: whole nearest-neighbour display factor (1: views shown at their own size).
        columns: triplets side by side.
    """

    n: int
    view_size: int
    scale: int
    columns: int

    @property
    def tile(self) -> int:
        """Side of a tile on the sheet."""
        return self.view_size * self.scale

    @property
    def rows(self) -> int:
        return math.ceil(self.n / self.columns)

    @property
    def label_height(self) -> int:
        return LABEL_LINES * LABEL_LINE_HEIGHT + 4

    @property
    def width(self) -> int:
        triplet = 3 * self.tile + 2 * TILE_GAP
        return 2 * MARGIN + self.columns * triplet + (self.columns - 1) * GROUP_GAP

    @property
    def grid_height(self) -> int:
        """Height of the tiles and their labels, without the legend band below them."""
        return MARGIN + self.rows * (self.tile + self.label_height + ROW_GAP)

    def tile_origin(self, slot: int, column: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of tile ``column`` (0 patch, 1 view 1, 2 view 2) of patch ``slot``."""
        row, group = divmod(slot, self.columns)
        x = MARGIN + group * (3 * self.tile + 2 * TILE_GAP + GROUP_GAP) + column * (self.tile + TILE_GAP)
        y = MARGIN + row * (self.tile + self.label_height + ROW_GAP)
        return y, x


def display_scale(view_size: int) -> int:
    """Whole factor that brings a ``view_size`` view to at least :data:`MIN_TILE_SIDE` pixels."""
    return max(1, math.ceil(MIN_TILE_SIDE / view_size))


def grid_layout(n: int, view_size: int) -> GridLayout:
    """The layout for ``n`` patches: as many triplet columns as keep the sheet about square."""
    layout = GridLayout(n, view_size, display_scale(view_size), 1)
    row_height = layout.tile + layout.label_height + ROW_GAP
    columns = max(1, min(n, round(math.sqrt(n * row_height / (3 * layout.tile)))))
    columns = math.ceil(n / math.ceil(n / columns))  # the same rows with fewer empty slots
    return GridLayout(n, view_size, layout.scale, columns)


def pick_indices(total: int, n: int, seed: int) -> list[int]:
    """``n`` distinct patch indices out of ``total``, spread over the stores and fixed by ``seed``.

    One index per equal stretch of the store (stratified), at a seeded place within it: the picks
    cover every slide in proportion, and another seed shows other patches.
    """
    rng = np.random.default_rng(seed)
    bounds = [total * k // n for k in range(n + 1)]
    return [int(rng.integers(low, high)) for low, high in zip(bounds[:-1], bounds[1:])]


def check_request(total: int, patch_side: int, cfg: ViewConfig, n: int) -> None:
    """Refuse what cannot be drawn: ``n`` outside 1..``total``, views larger than the patches."""
    if not 1 <= n <= total:
        raise SimclrPathError(f"--n must be in 1..{total} (the patches in the stores), got {n}")
    if cfg.image_size > patch_side:
        raise SimclrPathError(
            f"--image-size {cfg.image_size} is larger than the {patch_side} px patches; "
            f"use --image-size <= {patch_side}"
        )


def view_label(result: dict) -> str:
    """The transforms that fired in one view, in pipeline order: ``crop 43% hflip rot90 jitter gray``.

    ``result`` is a :func:`draw_views` result of a pipeline built with ``record=True``. The crop is
    given as the share of the patch's area it covers; a rotation by its angle (omitted when the
    random multiple of 90 degrees was 0, which changes nothing).
    """
    words = []
    for name, params in result["applied_transforms"]:
        if name == "RandomResizedCrop":
            x_min, y_min, x_max, y_max = params["crop_coords"]
            height, width = params["shape"][:2]
            words.append(f"crop {round(100 * (x_max - x_min) * (y_max - y_min) / (height * width))}%")
        elif name == "RandomRotate90":
            if params["factor"] % 4:
                words.append(f"rot{90 * (params['factor'] % 4)}")
        else:
            words.append(SHORT_NAMES.get(name, name.lower()))
    return " ".join(words)


def patch_label(store, index: int, patch_side: int) -> str:
    """``patch 12, 256 px, whole`` and, when the store knows it, the slide and level-0 (x, y)."""
    text = f"patch {index}, {patch_side} px, whole"
    if hasattr(store, "coords"):
        slide, x, y = store.coords(index)
        text += f" {slide}" + (f" x{x} y{y}" if x >= 0 and y >= 0 else "")  # ingested patches have no place
    return text


def draw_samples(store, cfg: ViewConfig, n: int = 16, seed: int = 0, epoch: int = 0,
                 augment: str = "cpu") -> list[GridSample]:
    """The ``n`` patches of the sheet with the two views training draws for ``(seed, epoch, index)``.

    ``store``: a :class:`~simclr_path.PatchStore` or any sequence of HxWx3 uint8 RGB arrays.
    ``augment``: ``cpu`` (albumentations: pretrain's very pixels) or ``device`` (the batched pipeline
    of :mod:`~simclr_path.data.device_views`, on the CPU here: the same transforms and distribution,
    drawn for the ``n`` patches as one batch of step ``epoch``; in pretraining a patch's pixels depend
    on the batch and step it comes in).
    """
    total = len(store)
    patch_side = int(getattr(store, "patch_size", 0)) or (store[0].shape[0] if total else 0)
    check_request(total, patch_side, cfg, n)
    if augment == "device":
        return _draw_device_samples(store, cfg, n, seed, epoch, patch_side)
    transform = build_transform(cfg, record=True)
    samples = []
    for index in pick_indices(total, n, seed):
        patch = store[index]
        results = draw_views(transform, patch, sample_seed(seed, epoch, index))
        samples.append(GridSample(index, patch, [r["image"] for r in results], patch_label(store, index, patch_side),
                                  [view_label(r) for r in results]))
    return samples


def _draw_device_samples(store, cfg: ViewConfig, n: int, seed: int, epoch: int, patch_side: int) -> list[GridSample]:
    import torch

    from simclr_path.data.device_views import DeviceViews

    indices = pick_indices(len(store), n, seed)
    patches = [store[i] for i in indices]
    views, params = DeviceViews(cfg, seed).draw(torch.from_numpy(np.stack(patches)), step=epoch)
    pixels = views.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = params.labels(patch_side)
    return [GridSample(index, patch, [pixels[k], pixels[n + k]], patch_label(store, index, patch_side),
                       [labels[k], labels[n + k]])
            for k, (index, patch) in enumerate(zip(indices, patches))]


def legend_items(cfg: ViewConfig, seed: int, epoch: int, patch_side: int, n: int, total: int) -> list[list[str]]:
    """The legend's phrases, one group per line: sizes, geometry, colour, seed and key.

    Every augmentation setting of ``cfg`` is there, with the view and patch sides in pixels and the
    display factor, so a sheet can be matched to the config that made it.
    """
    scale = display_scale(cfg.image_size)
    shown = (f"shown {scale}x enlarged (nearest-neighbour, display only)" if scale > 1
             else "shown at their own size")
    crop_min, crop_max = cfg.crop_scale
    sigma_min, sigma_max = cfg.blur_sigma
    return [
        [f"views: {cfg.image_size} px crops of {patch_side} px patches, {shown}",
         f"seed {seed}, epoch {epoch}", f"{n} of {total} patches"],
        [f"crop scale {crop_min:.2f}-{crop_max:.2f} of the patch area",
         f"hflip p {cfg.hflip_p:.2f}", f"vflip p {cfg.vflip_p:.2f}", f"rot90 p {cfg.rot90_p:.2f}"],
        [f"colour jitter p {cfg.jitter_p:.2f}: brightness {cfg.brightness:g}, contrast {cfg.contrast:g}, "
         f"saturation {cfg.saturation:g}, hue {cfg.hue:g}",
         f"grayscale p {cfg.grayscale_p:.2f}",
         f"blur p {cfg.blur_p:.2f} (sigma {sigma_min:g}-{sigma_max:g} px)",
         f"HE stain p {cfg.he_stain_p:.2f}", f"light views p {cfg.light_p:.2f}"],
        ["each triplet: patch (whole, resized to the view size), view 1, view 2",
         "labels: the transforms that fired, crop as % of the patch area"],
    ]


def legend_text(groups: list[list[str]]) -> str:
    """:func:`legend_items` as plain text, one line per group (what the band shows, before wrapping)."""
    return "\n".join(" | ".join(group) for group in groups)


def _text_width(text: str, font_scale: float) -> int:
    return cv2.getTextSize(text, FONT, font_scale, 1)[0][0]


def _clip(text: str, width: int, font_scale: float) -> str:
    """``text`` cut (ending in ``..``) until it is at most ``width`` pixels wide."""
    while len(text) > 2 and _text_width(text, font_scale) > width:
        text = text[:-3] + ".."
    return text


def pack_lines(pieces: list[str], width: int, font_scale: float, separator: str = " ",
               max_lines: int | None = None) -> list[str]:
    """``pieces`` joined by ``separator`` into lines at most ``width`` pixels wide at ``font_scale``.

    A piece wider than a line on its own is clipped; past ``max_lines`` the last line is marked ``..``.
    """
    lines: list[str] = []
    for piece in pieces:
        joined = f"{lines[-1]}{separator}{piece}" if lines else piece
        if lines and _text_width(joined, font_scale) <= width:
            lines[-1] = joined
        else:
            lines.append(_clip(piece, width, font_scale))
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _clip(lines[-1] + " ..", width, font_scale)
    return lines


def _put_lines(canvas: np.ndarray, lines: list[str], x: int, y: int, line_height: int, font_scale: float) -> None:
    """Write ``lines`` from (x, y), the top of the first line, one every ``line_height`` pixels."""
    for k, line in enumerate(lines):
        baseline = y + (k + 1) * line_height - 5
        cv2.putText(canvas, line, (x, baseline), FONT, font_scale, INK, 1, cv2.LINE_AA)


def _enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` with every pixel a ``scale`` x ``scale`` block (nearest-neighbour), for display."""
    if scale == 1:
        return image
    height, width = image.shape[:2]
    return cv2.resize(image, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)


def render_grid(samples: list[GridSample], view_size: int, legend: list[list[str]]) -> np.ndarray:
    """The sheet (HxWx3 uint8 RGB) for ``samples``, laid out by :func:`grid_layout`, legend at the bottom.

    Each legend group starts a line and wraps, at phrase boundaries, to the sheet's width.
    """
    layout = grid_layout(len(samples), view_size)
    tile = layout.tile
    legend_lines = [line for group in legend
                    for line in pack_lines(group, layout.width - 2 * MARGIN, LEGEND_FONT_SCALE, separator=" | ")]
    legend_height = 2 * MARGIN + len(legend_lines) * LEGEND_LINE_HEIGHT
    canvas = np.full((layout.grid_height + legend_height, layout.width, 3), PAPER, np.uint8)
    for slot, sample in enumerate(samples):
        shrunk = cv2.resize(sample.patch, (view_size, view_size), interpolation=cv2.INTER_AREA)
        tiles = [shrunk, *sample.views]
        labels = [sample.patch_label, *sample.view_labels]
        for column, (image, label) in enumerate(zip(tiles, labels)):
            y, x = layout.tile_origin(slot, column)
            canvas[y:y + tile, x:x + tile] = _enlarge(image, layout.scale)
            lines = pack_lines(label.split(), tile, LABEL_FONT_SCALE, max_lines=LABEL_LINES)
            _put_lines(canvas, lines, x, y + tile + 2, LABEL_LINE_HEIGHT, LABEL_FONT_SCALE)
    top = layout.grid_height
    cv2.line(canvas, (MARGIN, top), (layout.width - MARGIN, top), RULE, 1)
    _put_lines(canvas, legend_lines, MARGIN, top + MARGIN, LEGEND_LINE_HEIGHT, LEGEND_FONT_SCALE)
    return canvas


def view_grid(store, cfg: ViewConfig, n: int = 16, seed: int = 0, epoch: int = 0, augment: str = "cpu") -> np.ndarray:
    """The sheet of ``n`` patches of ``store`` and their training views, as an HxWx3 uint8 RGB image."""
    samples = draw_samples(store, cfg, n, seed, epoch, augment)
    patch_side = samples[0].patch.shape[0]
    legend = legend_items(cfg, seed, epoch, patch_side, n, len(store))
    legend[0].append(f"views made by the {augment} pipeline (--augment {augment})")
    return render_grid(samples, cfg.image_size, legend)



def write_view_grid(path: str, store, cfg: ViewConfig, n: int = 16, seed: int = 0, epoch: int = 0,
                    augment: str = "cpu") -> list[int]:
    """Write :func:`view_grid`'s sheet as a PNG to ``path`` (atomically); returns the patch indices shown."""
    if not str(path).lower().endswith(".png"):
        raise SimclrPathError(f"{path}: --out must name a .png file")
    write_png(str(path), view_grid(store, cfg, n, seed, epoch, augment))
    return pick_indices(len(store), n, seed)
