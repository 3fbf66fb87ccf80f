"""``python -m simclr_path``: the same as the ``simclr-path`` command."""

from simclr_path.cli.main import cli

cli(prog_name="simclr-path")
