"""Backbones: any timm model by name, pooled features, weights only from local files."""

from __future__ import annotations

import difflib
import os
import zipfile

from torch import nn

from simclr_path.errors import SimclrPathError, first_line
from simclr_path.runtime.files import unreadable_reason


def check_backbone_name(name: str) -> None:
    """Raise a one-line error naming close timm models when ``name`` is not one."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise SimclrPathError(f"--backbone {name!r} is not a timm model{hint}")


def create_backbone(name: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """A timm model with its classifier removed (``num_classes=0``: pooled features).

    ``pretrained`` is a local weights file (.pth, .bin, .safetensors); nothing is downloaded.
    """
    import timm

    check_backbone_name(name)
    if pretrained:
        if not os.path.isfile(pretrained):
            raise SimclrPathError(f"{pretrained}: --pretrained weights file not found (only local files are used)")
        try:
            return timm.create_model(name, pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay={"file": os.path.abspath(pretrained)}, **kwargs)
        except Exception as exc:
            reason = first_line(exc, 200)
            if not zipfile.is_zipfile(pretrained) and not pretrained.endswith(".safetensors"):
                reason = unreadable_reason(pretrained, exc)  # empty, text, not a weights file: say so
            raise SimclrPathError(
                f"{pretrained}: cannot load into {name} ({reason}); check the file matches the backbone"
            ) from None
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
