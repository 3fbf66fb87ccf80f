"""simclr-path: whole-slide images in, a self-supervised (SimCLR) pathology encoder out.

The stages, one folder each, in the order data flows through them:

- :mod:`simclr_path.wsi`: slides -> tissue -> patch grid -> tiles
- :mod:`simclr_path.store`: the HDF5 patch store (format, writer, :class:`PatchStore`)
- :mod:`simclr_path.data`: two augmented views per patch, loaders
- :mod:`simclr_path.models`, :mod:`simclr_path.losses`, :mod:`simclr_path.optim`: SimCLR itself
- :mod:`simclr_path.engine`: config, training loop, checkpoints, launching
- :mod:`simclr_path.downstream`: the exported encoder, embed, evaluate, segmentation

:mod:`simclr_path.runtime` (device, process group, console) is the layer every stage may use.
"""

__version__ = "0.1.0"

import os as _os

# albumentations asks PyPI for a newer release when it is imported (albumentations/__init__.py reads
# this variable first): a warning from every loader worker on an offline cluster node, and a network
# wait. Set before any albumentations import, which all go through this package; a value already in
# the environment wins.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# The public names, imported lazily: `simclr-path tile` must not pay for importing torch.
_PUBLIC = {
    "PatchStore": "simclr_path.store.reader",
    "ViewConfig": "simclr_path.data.views",
    "TwoViewDataset": "simclr_path.data.datasets",
    "NTXentLoss": "simclr_path.losses.ntxent",
    "load_encoder": "simclr_path.downstream.encoder",
    "SimclrPathError": "simclr_path.errors",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'simclr_path' has no attribute {name!r}")
