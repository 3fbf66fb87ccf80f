"""simclr-path: whole-slide images in, a self-supervised (SimCLR) pathology encoder out.

Stages, one module each: :mod:`~simclr_path.tiling` (slides -> HDF5 patch store),
:mod:`~simclr_path.views` (two augmented views per patch), :mod:`~simclr_path.model` and
:mod:`~simclr_path.loss` (SimCLR), :mod:`~simclr_path.train` (the loop), :mod:`~simclr_path.export`
(encoder weights + metadata for timm).
"""

__version__ = "0.1.0"

__all__ = ["PatchStore", "NTXentLoss", "load_encoder", "SimclrPathError", "__version__"]


def __getattr__(name):
    # Lazy: `simclr-path tile` must not pay for importing torch.
    if name == "PatchStore":
        from simclr_path.store import PatchStore

        return PatchStore
    if name == "NTXentLoss":
        from simclr_path.losses import NTXentLoss

        return NTXentLoss
    if name == "load_encoder":
        from simclr_path.export import load_encoder

        return load_encoder
    if name == "SimclrPathError":
        from simclr_path.errors import SimclrPathError

        return SimclrPathError
    raise AttributeError(f"module 'simclr_path' has no attribute {name!r}")
