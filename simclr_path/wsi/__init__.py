"""Stage 1, slides: find slides, read them (OpenSlide), find tissue, lay the patch grid, tile.

``discover`` finds slide files; ``slide`` opens one and reads its metadata and pixels; ``tissue``
finds tissue on a low-resolution view; ``grid`` lays patches at the target resolution;
``tile_reader`` reads runs of patches in worker processes; ``tiler`` drives the workers and writes
the patch store.
"""
