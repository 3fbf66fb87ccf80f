"""How the tool is installed and configured: entry points, module entry, shipped presets, config keys."""

import importlib.metadata
import subprocess
import sys

import pytest
import yaml

from simclr_path.engine.config import PretrainConfig, load_config, preset_names

from cli_helpers import assert_error, run_cli


def test_commands_are_installed_under_our_own_package_name():
    dist = importlib.metadata.distribution("simclr-path")
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"simclr-path": "simclr_path.cli.main:cli"}
    top_level = (dist.read_text("top_level.txt") or "simclr_path").split()
    assert top_level == ["simclr_path"]  # no top-level 'cli' package to collide with


def test_python_dash_m_simclr_path_runs_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "simclr_path", "--help"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: simclr-path") and "pretrain" in r.stdout and "tile" in r.stdout


@pytest.mark.parametrize("exported", [None, "ACTIVE"])
def test_the_cli_makes_openmp_threads_wait_passively_unless_the_user_chose(tmp_path, exported):
    """Loader workers need the cores OpenMP threads would spin on. The policy must reach the OpenMP
    runtime itself, which reads it once when torch loads: libgomp prints what it read (its spin count
    is 0 when passive, 300000 when nothing was set)."""
    import os
    from pathlib import Path

    import simclr_path

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    env["PYTHONPATH"] = str(Path(simclr_path.__file__).parents[1])  # this checkout's package
    if exported:
        env["OMP_WAIT_POLICY"] = exported
    code = "import simclr_path.cli.main, sys; assert 'torch' not in sys.modules; import torch; torch.ones(2).sum()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    shown = r.stdout + r.stderr
    if "GOMP_SPINCOUNT" not in shown:
        pytest.skip("torch here is not built with GNU OpenMP (libgomp), whose settings this reads")
    if exported:
        assert f"OMP_WAIT_POLICY = '{exported}'" in shown
    else:
        assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown and "GOMP_SPINCOUNT = '0'" in shown


def test_presets_are_package_resources():
    assert {"small", "resnet50_paper"} <= set(preset_names())
    assert load_config("small").model.backbone == "resnet18"
    assert load_config("resnet50_paper").optim.global_batch == 4096


def test_unknown_preset_lists_the_shipped_ones(tmp_path):
    r = run_cli("pretrain", tmp_path / "none.h5", "--out", tmp_path / "run", "--config", "smal")
    assert_error(r, "smal", "presets: resnet50_paper, small")


def test_old_config_keys_are_read_under_their_new_names_with_a_note(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("optim: {batch: 64, temperature: 0.2}\nrun: {chunk: 32, amp: false}\n")
    cfg = load_config(str(old))
    assert (cfg.optim.global_batch, cfg.loss.temperature, cfg.run.grad_cache_chunk, cfg.run.bf16) == (64, 0.2, 32, False)
    err = capsys.readouterr().err
    for old_key, new_key in [("optim.batch", "optim.global_batch"), ("optim.temperature", "loss.temperature"),
                             ("run.chunk", "run.grad_cache_chunk"), ("run.amp", "run.bf16")]:
        assert f"{old_key} is now {new_key}" in err


def test_old_and_new_name_together_is_an_error(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("optim: {batch: 64, global_batch: 128}\n")
    with pytest.raises(Exception, match="optim.batch and its new name optim.global_batch"):
        load_config(str(both))


def test_saved_config_round_trips_with_the_new_names(tmp_path):
    from simclr_path.engine.config import save_config

    cfg = load_config("small")
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "global_batch" in data["optim"] and "temperature" in data["loss"] and "bf16" in data["run"]
    assert PretrainConfig.from_dict(data) == cfg


#: What each stage may import (besides itself, ``simclr_path.errors`` and the package root):
#: the stages before it in the data flow, and ``runtime``. Nothing imports a later stage.
ALLOWED_IMPORTS = {
    "runtime": set(),
    "store": {"runtime"},
    "wsi": {"runtime", "store"},
    "data": {"runtime", "store"},
    "models": {"runtime"},
    "losses": {"runtime"},
    "optim": {"runtime"},
    "engine": {"runtime", "store", "data", "models", "losses", "optim"},
    "downstream": {"runtime", "wsi", "store", "data", "models", "losses", "optim", "engine"},
    "annotations": {"runtime"},
    "segment": {"runtime", "wsi", "store", "data", "models", "optim", "engine", "downstream", "annotations"},
    "selection": {"runtime", "wsi", "store", "data", "models", "engine", "downstream", "annotations", "segment"},
}


def test_imports_go_one_way_down_the_pipeline():
    import ast
    from pathlib import Path

    import simclr_path

    root = Path(simclr_path.__file__).parent
    wrong = []
    for path in root.rglob("*.py"):
        stage = path.relative_to(root).parts[0]
        if stage not in ALLOWED_IMPORTS:
            continue  # the package root, errors.py, demo.py (the whole chain) and the CLI may use any stage
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "simclr_path":
                modules = [f"simclr_path.{alias.name}" for alias in node.names]  # from simclr_path import engine
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "simclr_path" and len(parts) > 1 and parts[1] in set(ALLOWED_IMPORTS) | {"cli", "demo"}:
                    if parts[1] not in ALLOWED_IMPORTS[stage] | {stage}:
                        wrong.append(f"{path.relative_to(root)} imports {module}")
    assert not wrong, wrong
