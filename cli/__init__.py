"""The ``simclr-path`` command line: thin click commands over :mod:`simclr_path`."""
