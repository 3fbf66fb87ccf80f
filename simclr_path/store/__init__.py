"""Stage 2, the patch store: one HDF5 file of patches with their slide coordinates.

``format`` holds the layout and the checks; ``writer`` creates stores and appends complete slides;
``reader`` gives random access (:class:`PatchStore`); ``codecs`` encodes pixels (JPEG or raw);
``ingest`` turns image folders into a store; ``coords_files`` writes CLAM/TRIDENT coords files.
"""

from simclr_path.store.reader import PatchStore, PatchSubset, store_summary
from simclr_path.store.writer import StoreWriter

__all__ = ["PatchStore", "PatchSubset", "StoreWriter", "store_summary"]
