"""``python -m simclr_path``: the same as the ``simclr-path`` command."""

from simclr_path.cli.main import cli

if __name__ == "__main__":
    cli(prog_name="simclr-path")
