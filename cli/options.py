"""Command-line options shared by commands that take the same settings (``views`` and ``pretrain``;
``--exclude-qc`` for ``pretrain``, ``embed`` and ``select``).

:func:`view_options` adds the augmentation overrides; every one defaults to None, meaning "keep the
value of the config" (``--config``), so a preset stays the single source of defaults.
:func:`apply_view_options` puts the given values on ``cfg.views`` and refuses out-of-range ones
with a one-line :class:`~simclr_path.errors.SimclrPathError` that names the option.
"""

from __future__ import annotations

import click

from simclr_path.errors import SimclrPathError

#: Parameter names :func:`view_options` adds to a command (and :func:`apply_view_options` takes).
VIEW_OPTION_NAMES = ("image_size", "crop_scale", "flip_p", "rot90_p", "jitter_p", "color_jitter", "grayscale_p",
                     "blur_p", "he_stain_p", "light_p")

_KEEP = " [default: the config's]"


def exclude_qc_option(default: str | None = "pen,blur"):
    """Click decorator: ``--exclude-qc``, the tiling QC reasons whose patches a command leaves out.

    ``default`` None (``pretrain``) keeps the config's value; the value is normalised to a comma list
    of known reasons, or ``"none"``, so a resumed run compares like with like.
    """
    def normalise(ctx, param, value):
        if value is None:
            return None
        from simclr_path.store.format import parse_exclude_qc

        return ",".join(parse_exclude_qc(value)) or "none"

    shown = "pen,blur (the config's)" if default is None else default
    return click.option(
        "--exclude-qc", default=default, callback=normalise, metavar="REASONS",
        help="Leave out patches that tiling QC flagged for these reasons (comma list of pen, blur, fold; "
             f"'none': keep all) [default: {shown}].")


def view_options(command):
    """Click decorator: the augmentation overrides (``--image-size``, ``--crop-scale``, ``--flip-p`` ...)."""
    options = [
        click.option("--image-size", type=int, default=None,
                     help="View side in pixels (<= the store's patch size)." + _KEEP),
        click.option("--crop-scale", type=float, nargs=2, default=None, metavar="MIN MAX",
                     help="Area fraction of the patch a crop covers, 0 < MIN <= MAX <= 1." + _KEEP),
        click.option("--flip-p", type=float, default=None,
                     help="Probability of a horizontal flip, and of a vertical one." + _KEEP),
        click.option("--rot90-p", type=float, default=None,
                     help="Probability of a rotation by a random multiple of 90 degrees." + _KEEP),
        click.option("--jitter-p", type=float, default=None, help="Probability of colour jitter." + _KEEP),
        click.option("--color-jitter", type=float, nargs=4, default=None, metavar="B C S H",
                     help="Jitter strengths: brightness, contrast, saturation (>= 0), hue (0-0.5)." + _KEEP),
        click.option("--grayscale-p", type=float, default=None, help="Probability of grayscale." + _KEEP),
        click.option("--blur-p", type=float, default=None, help="Probability of Gaussian blur." + _KEEP),
        click.option("--he-stain-p", type=float, default=None,
                     help="Probability of H&E stain augmentation." + _KEEP),
        click.option("--light-p", type=float, default=None,
                     help="Probability that a view is light: crop, flips and rotations only (no stain, colour, "
                          "grayscale or blur)." + _KEEP),
    ]
    for option in reversed(options):  # so --help lists them in the order above
        command = option(command)
    return command


def apply_view_options(cfg, **values):
    """``cfg`` (a :class:`~simclr_path.engine.config.PretrainConfig`) with the given view options set.

    Keys are :data:`VIEW_OPTION_NAMES`; None means "not given". ``flip_p`` sets both flips and
    ``color_jitter`` the four jitter strengths. The resulting views are then checked as a whole, so a
    bad value from the config file is caught too (named by its config key rather than an option).
    """
    unknown = set(values) - set(VIEW_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown view option(s) {sorted(unknown)}")
    views = cfg.views
    given = {name for name, value in values.items() if value is not None}
    for name in given:
        value = values[name]
        if name == "flip_p":
            views.hflip_p = views.vflip_p = float(value)
        elif name == "color_jitter":
            views.brightness, views.contrast, views.saturation, views.hue = (float(v) for v in value)
        elif name == "crop_scale":
            views.crop_scale = tuple(float(v) for v in value)
        else:
            setattr(views, name, value)
    check_view_config(views, given)
    return cfg


def _probability(p) -> bool:
    return 0 <= p <= 1


def _crop_range(scale) -> bool:
    low, high = scale
    return 0 < low <= high <= 1


#: (option, config field, test, what it must be). The option names the value when given on the
#: command line, the field when it came from the config.
_VIEW_CHECKS = [
    ("image_size", "image_size", lambda v: 16 <= v <= 4096, "in 16..4096 pixels"),
    ("crop_scale", "crop_scale", _crop_range, "MIN MAX with 0 < MIN <= MAX <= 1"),
    ("flip_p", "hflip_p", _probability, "a probability in [0, 1]"),
    ("flip_p", "vflip_p", _probability, "a probability in [0, 1]"),
    ("rot90_p", "rot90_p", _probability, "a probability in [0, 1]"),
    ("jitter_p", "jitter_p", _probability, "a probability in [0, 1]"),
    ("color_jitter", "brightness", lambda v: v >= 0, ">= 0"),
    ("color_jitter", "contrast", lambda v: v >= 0, ">= 0"),
    ("color_jitter", "saturation", lambda v: v >= 0, ">= 0"),
    ("color_jitter", "hue", lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
    ("grayscale_p", "grayscale_p", _probability, "a probability in [0, 1]"),
    ("blur_p", "blur_p", _probability, "a probability in [0, 1]"),
    ("he_stain_p", "he_stain_p", _probability, "a probability in [0, 1]"),
    ("light_p", "light_p", _probability, "a probability in [0, 1]"),
]


def check_view_config(views, given=()) -> None:
    """Raise :class:`SimclrPathError` for the first out-of-range value of ``views`` (a ViewConfig).

    ``given``: the option names set on the command line; the message names those as options
    (``--blur-p``) and anything else as a config key (``views.blur_p``).
    """
    for option, field, ok, requirement in _VIEW_CHECKS:
        value = getattr(views, field)
        try:
            valid = bool(ok(value))  # comparisons are False for NaN, so NaN is refused too
        except (TypeError, ValueError):  # wrong type or arity from a YAML file
            valid = False
        if valid:
            continue
        shown = " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) and _all_numbers(value) else value
        if option in given:
            part = f" {field}" if option == "color_jitter" else ""
            raise SimclrPathError(f"--{option.replace('_', '-')}{part} must be {requirement}, got {shown}")
        raise SimclrPathError(f"views.{field} in the config must be {requirement}, got {shown}")


def _all_numbers(values) -> bool:
    return all(isinstance(v, (int, float)) for v in values)
