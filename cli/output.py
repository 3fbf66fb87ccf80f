"""What every command prints on stdout: one compact JSON line (progress and logs go to stderr)."""

from __future__ import annotations

import json

import click


def echo_json(payload: dict) -> None:
    """Print ``payload`` as one JSON line on stdout, for shell pipelines (``| jq``)."""
    click.echo(json.dumps(payload, separators=(",", ":")))
