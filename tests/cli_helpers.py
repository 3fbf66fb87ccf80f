"""Running the CLI in-process and checking what it prints, shared by the test modules."""

import json

from click.testing import CliRunner

from simclr_path.cli.main import cli


def run_cli(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def summary(result):
    lines = [l for l in result.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def one_json(result):
    assert result.exit_code == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    return json.loads(lines[0])


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert errors, result.stderr
    for needle in needles:
        assert any(needle in e for e in errors), (needle, result.stderr)


def assert_error(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1, result.stderr
    for needle in needles:
        assert needle in line[0], (needle, line[0])

