"""The exported encoder as the encoder of a segmentation network.

segmentation_models_pytorch builds ``Unet(encoder_name="tu-<timm name>")`` on timm's
``features_only`` model (its ``encoder.model``), whose parameter names are the backbone's own; so
the exported weights load with every key matched::

    import segmentation_models_pytorch as smp
    from simclr_path.downstream.segmentation import load_smp_encoder

    unet = smp.Unet(encoder_name="tu-resnet50", encoder_weights=None, classes=2)
    load_smp_encoder(unet, "encoder.pt")        # strict: raises on any missing or unexpected key
"""

from __future__ import annotations

from torch import nn

from simclr_path.downstream.encoder import read_encoder
from simclr_path.errors import SimclrPathError


def smp_encoder_state(encoder_path: str, encoder: nn.Module) -> dict:
    """The exported weights renamed onto an smp timm-universal encoder's ``state_dict`` keys."""
    weights, meta = read_encoder(encoder_path)
    target = encoder.state_dict()
    mapped, missing = {}, []
    for key in target:
        name = key[len("model."):] if key.startswith("model.") else key
        if name in weights:
            mapped[key] = weights[name]
        else:
            missing.append(key)
    if missing:
        raise SimclrPathError(
            f"{encoder_path}: the {meta['timm_model']} encoder has no weights for {len(missing)} smp key(s), "
            f"e.g. {missing[0]}; build the Unet with encoder_name='tu-{meta['timm_model']}'"
        )
    return mapped


def load_smp_encoder(model: nn.Module, encoder_path: str) -> nn.Module:
    """Load the exported encoder into ``model.encoder`` (an smp model built with ``tu-<name>``)."""
    model.encoder.load_state_dict(smp_encoder_state(encoder_path, model.encoder), strict=True)
    return model
