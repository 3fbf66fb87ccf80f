"""Entry point: the ``simclr-path`` click group and its error handling.

Exit codes: 0 success; 1 a problem with the input or a slide/run failure (one line on stderr);
2 invalid usage (click's own); 130 interrupted.
"""

from __future__ import annotations

import os
import sys

# Before anything loads torch (and its OpenMP runtime, which reads this once): OpenMP threads that
# finish a parallel region sleep instead of spinning. The loader workers share the CPU cores with the
# training threads, and a spinning thread holds a core a worker needs: on a 2-core CPU, pretrain end
# to end went from a median 0.87x to 0.97x of the training step alone (bench/train_step.py). A value
# already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from simclr_path import __version__  # noqa: E402
from simclr_path.errors import SimclrPathError  # noqa: E402


class _Group(click.Group):
    """Prints :class:`SimclrPathError` as one line on stderr, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SimclrPathError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Example, slides to encoder:
  simclr-path tile slides/ --out patches.h5 --mpp 0.5
  simclr-path pretrain patches.h5 --out runs/exp1 --config small
  simclr-path export runs/exp1 encoder.pt
""",
)
@click.version_option(__version__, prog_name="simclr-path")
def cli():
    """Turn a folder of whole-slide images into a self-supervised (SimCLR) encoder.

    Results go to stdout (one JSON line), progress and logs to stderr.
    """


def _register():
    from simclr_path.cli import (
        data_commands, downstream_commands, predict_commands, segment_commands, select_commands, tile_commands,
        train_commands,
    )

    for command in (*tile_commands.COMMANDS, *data_commands.COMMANDS, *train_commands.COMMANDS,
                    *downstream_commands.COMMANDS, *select_commands.COMMANDS, *segment_commands.COMMANDS,
                    *predict_commands.COMMANDS):
        cli.add_command(command)


_register()
