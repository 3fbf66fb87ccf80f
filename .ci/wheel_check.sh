#!/usr/bin/env bash
# Install simclr-path as a built wheel into a fresh venv (dependencies from the system site-packages)
# and use it from outside the source tree: --help, python -m simclr_path, the shipped presets,
# one pretraining step with --config small, and the demo's config resolution.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --quiet --no-deps -w "$work/dist" "$src"
python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --no-deps "$work"/dist/simclr_path-*.whl
cd "$work"
py="$work/venv/bin/python"
"$py" - "$work/venv" <<'PY'
import sys
from importlib import resources

import simclr_path
from simclr_path.engine.config import load_config, preset_names

venv = sys.argv[1]
assert simclr_path.__file__.startswith(venv), f"simclr_path imported from {simclr_path.__file__}, not the wheel"
assert str(resources.files("simclr_path.configs")).startswith(venv), "presets not read from the wheel"
assert {"small", "resnet50_paper"} <= set(preset_names()), preset_names()
import importlib.util
assert importlib.util.find_spec("cli") is None or not importlib.util.find_spec("cli").origin.startswith(venv), \
    "the wheel installs a top-level 'cli' package"
load_config("small")
print("wheel: presets", preset_names())
PY
"$work/venv/bin/simclr-path" --help >/dev/null
"$py" -m simclr_path --version
# a tiny store of synthetic tissue-coloured images, then one step of the small preset
"$py" - <<'PY'
import os

import cv2
import numpy as np

rng = np.random.default_rng(0)
os.makedirs("images/a", exist_ok=True)
for i in range(32):
    img = np.clip(rng.normal((200, 120, 180), 30, (96, 96, 3)), 0, 255).astype(np.uint8)
    cv2.imwrite(f"images/a/{i:03d}.png", img)
PY
"$work/venv/bin/simclr-path" ingest images --out tiny.h5 --no-labels --mpp 0.5 >/dev/null
"$work/venv/bin/simclr-path" pretrain tiny.h5 --out run --config small --batch 16 --max-steps 1 --workers 0 \
  --device cpu -q >summary.json
"$py" -c "import json; s = json.load(open('summary.json')); assert s['step'] == 1, s; print('wheel: pretrain --config small ok')"
# the demo resolves its preset the same way
"$py" -c "from simclr_path.demo import demo_config; assert demo_config(1).model.backbone == 'resnet18'"
echo "wheel check passed"
