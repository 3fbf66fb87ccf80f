"""Active learning on GlaS, simulated: Dice against the labelled fraction, per selection strategy.

The annotator is simulated on the 85 GlaS training images (../shared/data/segmentation/glas):
annotating a region reveals its ground-truth mask. Everything goes through the library calls the
commands make (``tile``, ``pretrain``/``export`` as subprocesses; ``select``, ``segment`` and
``segment-eval`` in-process):

1. ``tile`` the training images as one-level slides (0.62 um/px given, patches of ``--patch-size``
   px at ``--mpp``, no tissue filter); convert the masks to class indices (0 background, 1 gland).
2. ``pretrain`` our SimCLR encoder on those images (``small`` preset, ``--pretrain-epochs``), then
   ``export``; cached in the work folder.
3. For each strategy (random, kcenter, hybrid): rounds at increasing labelled fractions. Each
   round ``select``s regions of ``--region-size`` x K patches with the previous rounds'
   labels as ``--annotated`` (hybrid's first round has no model yet: it starts with kcenter, the
   cold start), reveals their masks, trains ``segment`` (supervised, our encoder) for
   ``--steps`` steps and scores it on testA + testB (80 images) with ``segment-eval``.
4. Extra rows at chosen fractions: FixMatch against supervised-only (same labels: kcenter's;
   ``--fixmatch-at 5 10``), both trained afresh for ``--ssl-steps`` (default 1000) steps for each
   of ``--ssl-seeds`` (default 0 1 2: one seed's runs differ by several Dice points on CPU), with
   the mean and the paired difference,
   random-init encoder (``timm:resnet18``) against ours, and 100% labelled (full masks).

With ``--compare-init``, instead of the above: our encoder against a random-init encoder, both fine-tuned
the same way, for each pretraining budget in ``--pretrain-steps`` (optimiser steps of the ``small``
preset at batch 128, rounded to whole epochs of the store; each budget's encoder cached in the work
folder by its settings; budgets are steps, never seconds, so a busy machine changes wall times only).
Labels: k-center ``select`` (regions of ``--region-size``), done once per fraction with the FIRST
budget's encoder (or ``--labels-from-steps``'s) and used by every arm and every budget, so the two arms of a pair and the budgets
see the same labelled pixels; 100% is the full masks. Each (fraction, seed) trains ours and
random init (``timm:resnet18``, encoder lr x1.0 as ``segment`` sets it) for ``--steps`` steps with
``--seeds`` (the seed sets the decoder's init, a random encoder's init and the batches). One table
per budget: ours and random init (mean ± std over seeds), ours - random init per seed and its mean,
and each arm's steps and wall time. The random-init arm does not depend on the budget: it is run once.
``--ours-set KEY=VALUE`` (repeatable) fine-tunes our encoder's arm with other ``segment`` settings
(``SegmentConfig`` fields, e.g. ``encoder_lr_scale=1.0``; ``segment`` gives a pretrained encoder 0.1x
the decoder's lr by default), against the same random-init runs: a lever measured over the same
seeds and labels, as its own table. ``--pretrain-data all`` pretrains on all 165 GlaS images' patches
(the 80 test images unlabelled, as a lab pretrains on every slide it holds) and ``--pretrain-overlap PX``
on overlapping patches (more per image): a data lever, each its own cached encoder and table, on the
same labels (chosen with an encoder of the default data).

Dice is the gland class's pixel Dice, the mean over test images (``mean_per_image``) and pooled
over all test pixels (``overall``). Training runs compared with each other have the same budget:
``--steps`` optimiser steps of ``--batch`` labelled patches, except the FixMatch comparison, whose
two arms both train for ``--ssl-steps`` (FixMatch adds as many unlabelled patches per step).
FixMatch needs the longer schedule: its EMA teacher is confident (0.95) on under 20% of
unlabelled pixels by step 400.

Usage: python bench/active_learning.py [--work bench/_work/al] [--steps 400] [--ssl-steps 1000]
       [--fractions 1 2 5 10 20]
       [--quick]   # a smoke run: two fractions, 10 steps, 2 test images
       python bench/active_learning.py --compare-init [--fractions 5 10 100] [--seeds 0 1 2]
       [--pretrain-steps 870 1740] [--steps 400] [--ours-set encoder_lr_scale=1.0] [--quick]
       [--pretrain-data all] [--pretrain-overlap 32]
Prints one table on stdout; writes WORK/active_learning.json and WORK/active_learning.png
(--compare-init: one table per budget; WORK/compare_init.json).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_path.downstream.encoder import read_encoder  # noqa: E402
from simclr_path.segment.config import SegmentConfig  # noqa: E402
from simclr_path.segment.evaluate import evaluate_segmentation  # noqa: E402
from simclr_path.segment.labels import IGNORE  # noqa: E402
from simclr_path.segment.model import matched_image_size  # noqa: E402
from simclr_path.segment.train import train_segmentation  # noqa: E402
from simclr_path.selection.regions import build_regions  # noqa: E402
from simclr_path.selection.select import select_regions_for_annotation  # noqa: E402
from simclr_path.store import PatchStore  # noqa: E402

GLAS = ROOT.parent / "shared" / "data" / "segmentation" / "glas"
GLAS_MPP = 0.62
CLASSES = ["background", "gland"]
SIMCLR_PATH = [sys.executable, "-m", "simclr_path"]
DEFAULT_DATA = "the 85 training images' patches"  # what --compare-init pretrains on by default
PRETRAIN_BATCH = 128  # --compare-init's pretraining batch, as bench/quality.py's 15-minute budget
RANDOM_INIT = "timm:resnet18"


def log(message: str) -> None:
    print(f"[al {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tool(args: list[str], what: str) -> dict:
    proc = subprocess.run(SIMCLR_PATH + args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def class_mask(path: Path) -> np.ndarray:
    """GlaS masks are 0/255; ours are class indices (255 would mean 'unlabelled')."""
    return (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)


def prepare(work: Path, args) -> dict:
    """Store of the training images, class-index masks, the test set; cached in ``work``."""
    train_names = sorted(p.stem for p in (GLAS / "images").glob("train_*.jpg"))
    test_names = sorted(p.stem for p in (GLAS / "images").glob("test*.jpg"))
    if args.quick:  # a smoke run scores on 2 test images: scoring all 80 costs far more than its training
        test_names = test_names[::40]
    store = work / "train.h5"
    if not store.exists():
        log(f"tiling {len(train_names)} training images -> {store}")
        listing = work / "train.txt"
        listing.write_text("".join(f"{GLAS / 'images' / n}.jpg\n" for n in train_names))
        proc = subprocess.run(SIMCLR_PATH + ["tile", "-", "--out", str(store), "--slide-mpp", str(GLAS_MPP), "--mpp",
                                             str(args.mpp), "--patch-size", str(args.patch_size), "--min-tissue", "0",
                                             "-q"], stdin=open(listing), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
    masks, test_images, test_masks = work / "masks_train", work / "test_images", work / "test_masks"
    for folder in (masks, test_images, test_masks):
        folder.mkdir(exist_ok=True)
    for name in train_names:
        if not (masks / f"{name}.png").exists():
            cv2.imwrite(str(masks / f"{name}.png"), class_mask(GLAS / "masks" / f"{name}.png"))
    for name in test_names:
        link = test_images / f"{name}.jpg"
        if not link.exists():
            link.symlink_to(GLAS / "images" / f"{name}.jpg")  # a link, not a copy of the shared data
        if not (test_masks / f"{name}.png").exists():
            cv2.imwrite(str(test_masks / f"{name}.png"), class_mask(GLAS / "masks" / f"{name}.png"))
    return {"store": store, "masks": masks, "test_images": test_images, "test_masks": test_masks,
            "train": train_names, "test": test_names}


def encoder(work: Path, data: dict, args) -> Path:
    path = work / "encoder.pt"
    if path.exists():
        return path
    log(f"pretraining our encoder on the training images ({args.pretrain_epochs} epochs)")
    started = time.perf_counter()
    summary = tool(["pretrain", str(data["store"]), "--out", str(work / "pretrain"), "--config", "small",
                    "--image-size", str(args.patch_size), "--batch", "128", "--epochs", str(args.pretrain_epochs), "-q"],
                   "pretrain")
    tool(["export", str(work / "pretrain"), str(path)], "export")
    log(f"pretrained {summary['step']} steps in {time.perf_counter() - started:.0f} s")
    return path


def reveal(selection_dir: Path, labels_dir: Path, masks: Path) -> None:
    """The annotator: each proposed region's ground truth is added to the slide's labels."""
    with open(selection_dir / "regions.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        target = labels_dir / f"{row['slide']}.png"
        truth = cv2.imread(str(masks / f"{row['slide']}.png"), cv2.IMREAD_UNCHANGED)
        labels = cv2.imread(str(target), cv2.IMREAD_UNCHANGED) if target.exists() else np.full_like(truth, IGNORE)
        x, y, w, h = (int(float(row[k])) for k in ("x", "y", "width", "height"))
        labels[y:y + h, x:x + w] = truth[y:y + h, x:x + w]
        cv2.imwrite(str(target), labels)


def labelled_fraction(labels_dir: Path, masks: Path, names: list[str]) -> float:
    labelled = total = 0
    for name in names:
        truth = cv2.imread(str(masks / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        total += truth.size
        path = labels_dir / f"{name}.png"
        if path.exists():
            labelled += int((cv2.imread(str(path), cv2.IMREAD_UNCHANGED) != IGNORE).sum())
    return labelled / total


def train_and_score(run: Path, encoder_ref: str, data: dict, labels_dir: Path, args, ssl: str = "none",
                    seed: int | None = None, steps: int | None = None, image_size: int | None = None,
                    settings: dict | None = None) -> dict:
    """``segment`` for ``steps`` (default ``args.steps``) steps, then ``segment-eval`` on testA + testB.
    ``image_size``: the network input side (default: ``segment``'s, matched to the encoder);
    ``settings``: other ``SegmentConfig`` fields (``segment``'s options), e.g. ``encoder_lr_scale``."""
    if not (run / "score.json").exists():
        cfg = SegmentConfig(encoder=encoder_ref, classes=list(CLASSES), batch=args.batch, ssl=ssl,
                            steps=args.steps if steps is None else steps, image_size=image_size,
                            threshold=args.threshold, workers=args.workers, seed=args.seed if seed is None else seed,
                            log_every=50, checkpoint_every=10_000, device=args.device, **(settings or {}))
        started = time.perf_counter()
        trained = train_segmentation([str(data["store"])], str(labels_dir), str(run), cfg, progress=False)
        seconds = time.perf_counter() - started
        scored = evaluate_segmentation(str(run), images_dir=str(data["test_images"]), masks_dir=str(data["test_masks"]),
                                       mpp=GLAS_MPP, device=args.device, workers=args.workers)
        result = {"steps": trained["step"], "labelled_patches": trained["labelled_patches"],
                  "train_s": round(seconds, 1), "eval_s": round(time.perf_counter() - started - seconds, 1),
                  "dice": scored["mean_per_image"]["dice"]["gland"],
                  "dice_pooled": scored["overall"]["dice"]["gland"]}
        (run / "score.json").write_text(json.dumps(result))
    return json.loads((run / "score.json").read_text())


def regions_for(fraction: float, total_regions: int) -> int:
    return max(1, int(round(fraction / 100 * total_regions)))


def active_learning(work: Path, data: dict, enc: Path, strategy: str, args, total_regions: int) -> list[dict]:
    """Rounds at ``args.fractions`` (cumulative) for one strategy; supervised, our encoder."""
    rows, annotated = [], 0
    previous_labels, previous_run = None, None
    for fraction in args.fractions:
        folder = work / strategy / f"{fraction:g}pct"
        labels_dir, run = folder / "labels", folder / "run"
        target = regions_for(fraction, total_regions)
        if not labels_dir.exists():
            budget = target - annotated
            partial = folder / "labels.partial"
            if partial.exists():
                for f in partial.iterdir():
                    f.unlink()
            partial.mkdir(parents=True, exist_ok=True)
            if previous_labels is not None:
                for f in previous_labels.iterdir():
                    (partial / f.name).write_bytes(f.read_bytes())
            used = strategy if not (strategy in ("hybrid", "entropy") and previous_run is None) else "kcenter"
            select_regions_for_annotation(
                str(enc), [str(data["store"])], str(folder / "selection"), budget=budget,
                region_size=args.region_size, strategy=used, annotated=str(previous_labels) if previous_labels else None,
                model=str(previous_run) if used in ("hybrid", "entropy") else None, seed=args.seed,
                device=args.device, workers=args.workers)
            reveal(folder / "selection", partial, data["masks"])
            os.replace(partial, labels_dir)
        annotated = target
        score = train_and_score(run, str(enc), data, labels_dir, args)
        rows.append({"strategy": strategy, "ssl": "none", "init": "simclr", "target_pct": fraction,
                     "labelled_pct": round(100 * labelled_fraction(labels_dir, data["masks"], data["train"]), 2),
                     "regions": target, **score})
        log(f"{strategy} {fraction:g}%: Dice {score['dice']:.4f} ({score['train_s']:.0f} s)")
        previous_labels, previous_run = labels_dir, run
    return rows


def budget_encoder(work: Path, data: dict, steps: int, args, variant: bool = True) -> tuple[Path, dict] | None:
    """Our ``small`` encoder pretrained for about ``steps`` optimiser steps (whole epochs of the store,
    so the cosine schedule ends where training does), exported; cached in ``work`` by its settings
    with a record of the steps trained and the wall time of the pretraining (``pretrain`` resumes a
    run folder that an interrupted benchmark left, and then times only its last part)."""
    source, suffix, described = pretrain_store(work, data, args) if variant else (data["store"], "", DEFAULT_DATA)
    store = PatchStore(str(source))
    patches = len(store)
    per_epoch = patches // PRETRAIN_BATCH
    store.close()
    epochs = max(1, round(steps / per_epoch))
    tag = f"small-b{PRETRAIN_BATCH}-e{epochs}-{epochs * per_epoch}steps{suffix}"
    path, record_path, run = work / f"encoder-{tag}.pt", work / f"encoder-{tag}.json", work / f"pretrain-{tag}"
    if not record_path.exists() and args.cached_only:
        return None
    if not record_path.exists():
        log(f"pretraining our encoder: {epochs} epochs of {per_epoch} steps ({tag})")
        started = time.perf_counter()
        summary = tool(["pretrain", str(source), "--out", str(run), "--config", "small", "--image-size",
                        str(args.patch_size), "--batch", str(PRETRAIN_BATCH), "--epochs", str(epochs), "-q"],
                       "pretrain")
        tool(["export", str(run), str(path)], "export")
        record = {"tag": tag, "steps": summary["step"], "epochs": epochs, "batch": PRETRAIN_BATCH,
                  "pretrain_s": round(time.perf_counter() - started), "data": described, "patches": patches}
        record_path.write_text(json.dumps(record))
        log(f"pretrained {record['steps']} steps in {record['pretrain_s']} s")
    return path, json.loads(record_path.read_text())


def pretrain_store(work: Path, data: dict, args) -> tuple[Path, str, str]:
    """``(store, tag suffix, description)`` of the patches ``--compare-init`` pretrains on: the 85
    training images' segmentation store by default; with ``--pretrain-data all`` all 165 GlaS images
    (the test images unlabelled: a lab pretrains on every slide it has, including those it will
    segment), with ``--pretrain-overlap`` overlapping patches (more patches per image). Tiled at the
    segmentation resolution and patch size; cached in ``work``."""
    if args.pretrain_data == "train" and not args.pretrain_overlap:
        return data["store"], "", DEFAULT_DATA
    names = sorted(p.stem for p in (GLAS / "images").glob("train_*.jpg" if args.pretrain_data == "train" else "*.jpg"))
    suffix = f"-{args.pretrain_data}{len(names)}" + (f"-o{args.pretrain_overlap}" if args.pretrain_overlap else "")
    store = work / f"pretrain{suffix}.h5"
    if not store.exists():
        log(f"tiling {len(names)} images for pretraining -> {store}")
        listing = work / f"pretrain{suffix}.txt"
        listing.write_text("".join(f"{GLAS / 'images' / n}.jpg\n" for n in names))
        partial = work / f"pretrain{suffix}.partial.h5"
        partial.unlink(missing_ok=True)
        proc = subprocess.run(SIMCLR_PATH + ["tile", "-", "--out", str(partial), "--slide-mpp", str(GLAS_MPP), "--mpp",
                                             str(args.mpp), "--patch-size", str(args.patch_size), "--overlap",
                                             str(args.pretrain_overlap), "--min-tissue", "0", "-q"],
                              stdin=open(listing), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        os.replace(partial, store)
    what = "all 165 GlaS images' patches (test images unlabelled)" if args.pretrain_data == "all" else DEFAULT_DATA
    if args.pretrain_overlap:
        what += f", overlapping by {args.pretrain_overlap} px"
    return store, suffix, what


def kcenter_labels(work: Path, data: dict, enc: Path, tag: str, fraction: float, total_regions: int,
                   args) -> Path | None:
    """The labels of ``fraction`` % of the regions, chosen by k-center on ``enc``'s features (one
    selection, no earlier rounds) and revealed; 100% is the full masks."""
    if fraction >= 100:
        return data["masks"]
    folder = work / "compare" / f"labels-kcenter-{tag}" / f"{fraction:g}pct"
    labels_dir = folder / "labels"
    if not labels_dir.exists() and args.cached_only:
        return None
    if not labels_dir.exists():
        partial = folder / "labels.partial"
        if partial.exists():
            for f in partial.iterdir():
                f.unlink()
        partial.mkdir(parents=True, exist_ok=True)
        select_regions_for_annotation(str(enc), [str(data["store"])], str(folder / "selection"),
                                      budget=regions_for(fraction, total_regions), region_size=args.region_size,
                                      strategy="kcenter", seed=0, device=args.device, workers=args.workers)
        reveal(folder / "selection", partial, data["masks"])
        os.replace(partial, labels_dir)
    return labels_dir


def compare_init(work: Path, data: dict, args, total_regions: int) -> list[dict]:
    """Ours against random init, same labels and steps, per budget, fraction and seed."""
    budgets = [budget_encoder(work, data, steps, args) for steps in args.pretrain_steps]
    budgets = [b for b in budgets if b is not None]  # --cached-only: the budgets pretrained so far
    if not budgets:
        return []
    # the labels never depend on --pretrain-data: chosen with an encoder of the default data
    labeller = budget_encoder(work, data, args.labels_from_steps or args.pretrain_steps[0], args, variant=False)
    if labeller is None:  # --cached-only, that encoder not pretrained
        return []
    label_tag = labeller[1]["tag"]
    # both arms see the same input: our encoder's (whole patches at 1.5x, as small's views were); a
    # random encoder would default to the patch side (64 px: 44% of the pixels)
    side = matched_image_size(args.patch_size, args.mpp, read_encoder(str(budgets[0][0]))[1]["input_mpp"])
    rows = []
    for fraction in args.fractions:
        labels_dir = kcenter_labels(work, data, labeller[0], label_tag, fraction, total_regions, args)
        if labels_dir is None:  # --cached-only, not selected yet
            continue
        labelled = 100.0 if fraction >= 100 else round(100 * labelled_fraction(labels_dir, data["masks"], data["train"]), 2)
        runs = work / "compare" / (f"{fraction:g}pct" if fraction >= 100 else f"{fraction:g}pct-{label_tag}")
        for seed in args.seeds:
            arms = [("random", None, RANDOM_INIT, f"random-{side}px-{args.steps}steps-s{seed}")]
            arms += [("simclr", record, str(enc), f"ours-{record['tag']}-{args.steps}steps-s{seed}{variant_suffix(args)}")
                     for enc, record in budgets]
            for init, record, ref, name in arms:
                if args.cached_only and not (runs / name / "score.json").exists():
                    continue
                settings = args.ours_set if init == "simclr" else {}
                score = train_and_score(runs / name, ref, data, labels_dir, args, seed=seed, image_size=side,
                                        settings=settings)
                rows.append({"init": init, "pretrain": record, "target_pct": fraction, "labelled_pct": labelled,
                             "seed": seed, "image_size": side, "segment_settings": settings, "labels_from": label_tag,
                             **score})
                log(f"{fraction:g}% seed {seed} {name}: Dice {score['dice']:.4f} "
                    f"({score['train_s']:.0f} s + {score.get('eval_s', 0):.0f} s eval)")
    return rows


def parse_settings(pairs: list[str]) -> dict:
    """``--ours-set KEY=VALUE`` pairs as ``SegmentConfig`` fields, each value of its field's type."""
    fields = {f.name: f for f in dataclasses.fields(SegmentConfig)}
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"--ours-set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        default = fields[key].default
        if isinstance(default, (bool, str)) or default in (None, dataclasses.MISSING):  # None: a number
            settings[key] = {"true": True, "false": False}.get(value.lower(), value) if isinstance(default, bool) \
                else value if isinstance(default, str) else (int(value) if value.lstrip("-").isdigit() else float(value))
        else:
            settings[key] = type(default)(value)
    return settings


def variant_suffix(args) -> str:
    """The ours-arm run name's suffix for ``--ours-set`` (none with segment's defaults)."""
    return "".join(f"-{key}{value:g}" if isinstance(value, float) else f"-{key}{value}"
                   for key, value in sorted(args.ours_set.items()))


def print_compare(rows: list[dict], args) -> None:
    """One table per pretraining budget: ours and random init over seeds, and the paired difference."""
    spread = lambda a: f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else ""  # noqa: E731
    random = {(r["target_pct"], r["seed"]): r for r in rows if r["init"] == "random"}
    arm = lambda r: (r["pretrain"]["tag"], json.dumps(r.get("segment_settings") or {}, sort_keys=True))  # noqa: E731
    arms = list(dict.fromkeys(arm(r) for r in rows if r["init"] == "simclr"))
    tags = [tag for tag, _ in arms]
    for tag, settings in arms:
        ours = {(r["target_pct"], r["seed"]): r for r in rows if r["init"] == "simclr" and arm(r) == (tag, settings)}
        record_row = next(iter(ours.values()))
        record = record_row["pretrain"]
        print(f"\nOur encoder: small, {record['steps']} pretraining steps at batch {record['batch']} "
              f"({record['epochs']} epoch{'s' if record['epochs'] > 1 else ''} of {record.get('data', DEFAULT_DATA)}), pretrained in {record['pretrain_s']} s "
              f"wall; random init: timm resnet18. Both at {rows[0]['image_size']} px inputs. Labels: k-center on the {record_row.get('labels_from', tags[0])} encoder's features, "
              f"the same for both arms. Gland pixel Dice, GlaS testA+B, mean over images."
              + (f" Ours fine-tuned with {', '.join(f'{k}={v}' for k, v in json.loads(settings).items())} "
                 "(random init with segment's defaults)." if settings != "{}" else ""))
        header = ["labelled %", "seeds", "ours", "random init", "ours - random (per seed)", "mean diff",
                  "segment steps", "ours train s", "random train s"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        means = {}
        for fraction in sorted({f for f, _ in ours}):
            seeds = sorted(s for f, s in ours if f == fraction and (f, s) in random)
            if not seeds:
                continue
            a = np.array([ours[fraction, s]["dice"] for s in seeds])
            b = np.array([random[fraction, s]["dice"] for s in seeds])
            means[fraction] = a.mean()
            steps = sorted({ours[fraction, s]["steps"] for s in seeds} | {random[fraction, s]["steps"] for s in seeds})
            print(f"| {fraction:g} ({ours[fraction, seeds[0]]['labelled_pct']:.1f}) | {','.join(map(str, seeds))} | "
                  f"{a.mean():.3f}{spread(a)} | {b.mean():.3f}{spread(b)} | "
                  f"{', '.join(f'{d:+.3f}' for d in a - b)} | **{(a - b).mean():+.3f}**{spread(a - b)} | "
                  f"{'/'.join(map(str, steps))} | {np.mean([ours[fraction, s]['train_s'] for s in seeds]):.0f} | "
                  f"{np.mean([random[fraction, s]['train_s'] for s in seeds]):.0f} |")
        if 100 in means:
            for fraction in (f for f in means if f < 100):
                print(f"ours at {fraction:g}% / ours at 100%: {means[fraction] / means[100]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "bench" / "_work" / "al"))
    parser.add_argument("--mpp", type=float, default=1.24, help="patch resolution (GlaS is 0.62 um/px)")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--region-size", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--strategies", nargs="+", default=["random", "kcenter", "hybrid"])
    parser.add_argument("--fixmatch-at", type=float, nargs="*", default=[5, 10])
    parser.add_argument("--ssl-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the FixMatch vs supervised-only pairs (--fixmatch-at)")
    parser.add_argument("--threshold", type=float, default=0.95, help="FixMatch confidence threshold (segment --threshold)")
    parser.add_argument("--random-init-at", type=float, nargs="*", default=[10])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ssl-steps", type=int, default=1000,
                        help="steps of both arms of the FixMatch vs supervised-only rows (FixMatch's teacher needs a "
                             "longer schedule than fine-tuning: at 400 steps it is confident on under 20%% of pixels)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compare-init", action="store_true",
                        help="ours against random init per pretraining budget (--pretrain-steps), fraction and seed")
    parser.add_argument("--pretrain-steps", type=int, nargs="+", default=[870, 1740],
                        help="--compare-init: pretraining budgets in optimiser steps at batch 128 (rounded to whole "
                             "epochs); 870 is what small reaches in about 15 minutes on an idle 2-core CPU that "
                             "runs 56-67 steps a minute (35-40 on one that runs 22-30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--compare-init: segment seeds")
    parser.add_argument("--pretrain-data", choices=["train", "all"], default="train",
                        help="--compare-init: pretrain on the 85 training images (default) or all 165 GlaS images, "
                             "the test images unlabelled (the labels and scores are unchanged)")
    parser.add_argument("--pretrain-overlap", type=int, default=0,
                        help="--compare-init: pretraining patches overlap by this many px (more patches per image)")
    parser.add_argument("--labels-from-steps", type=int, default=None,
                        help="--compare-init: choose the k-center labels with this budget's encoder (default: the first "
                             "of --pretrain-steps; always pretrained on the default data), e.g. to add a budget or a "
                             "variant on the labels of earlier runs")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="--compare-init: a segment setting for our encoder's arm only (SegmentConfig field, "
                             "e.g. encoder_lr_scale=1.0); the arm's runs are named by it, so each variant is its own table")
    parser.add_argument("--cached-only", action="store_true",
                        help="--compare-init: print the tables from the arms already finished; train nothing")
    parser.add_argument("--quick", action="store_true", help="smoke run: fractions 5 and 20, 10 steps, 2 test images "
                        "(--compare-init: fractions 5 and 100, seed 0, one-epoch pretraining)")
    args = parser.parse_args()
    args.ours_set = parse_settings(args.ours_set)
    if args.compare_init and "--fractions" not in sys.argv:
        args.fractions = [5, 10, 100]
    if args.compare_init and args.quick:
        args.fractions, args.steps, args.seeds, args.pretrain_steps = [5, 100], 10, [0], [1]
        args.work = str(Path(args.work) / "quick")
    elif args.quick:
        args.fractions, args.steps, args.ssl_steps, args.fixmatch_at, args.random_init_at = [5, 20], 10, 10, [5], [5]
        args.ssl_seeds = [0]
        args.work = str(Path(args.work) / "quick")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    started = time.perf_counter()
    data = prepare(work, args)
    if args.compare_init:
        store = PatchStore(str(data["store"]))
        total_regions = len(build_regions(store, args.region_size))
        store.close()
        rows = compare_init(work, data, args, total_regions)
        print_compare(rows, args)
        (work / "compare_init.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                            "seconds": round(time.perf_counter() - started)}, indent=1))
        log(f"done in {time.perf_counter() - started:.0f} s; {work / 'compare_init.json'}")
        return
    cached = work.parent / "encoder.pt"
    if args.quick and not cached.exists():
        args.pretrain_epochs = 1
    enc = cached if args.quick and cached.exists() else encoder(work, data, args)
    store = PatchStore(str(data["store"]))
    total_regions = len(build_regions(store, args.region_size))
    store.close()
    log(f"{total_regions} regions of {args.region_size}x{args.region_size} patches in {len(data['train'])} images")

    rows = []
    for strategy in args.strategies:
        rows += active_learning(work, data, enc, strategy, args, total_regions)
    reference = "kcenter" if "kcenter" in args.strategies else args.strategies[0]
    for fraction in args.fixmatch_at:  # FixMatch against supervised-only on the same labels, seed by seed
        labels_dir = work / reference / f"{fraction:g}pct" / "labels"
        for seed in args.ssl_seeds:
            for ssl in ("none", "fixmatch"):
                name = f"ssl-{ssl}-s{seed}-{args.ssl_steps}steps"
                name += f"-t{args.threshold:g}" if ssl == "fixmatch" and args.threshold != 0.95 else ""
                score = train_and_score(work / reference / f"{fraction:g}pct" / name, str(enc), data,
                                        labels_dir, args, ssl=ssl, seed=seed, steps=args.ssl_steps)
                rows.append({"strategy": reference, "ssl": ssl, "init": "simclr", "target_pct": fraction,
                             "labelled_pct": round(100 * labelled_fraction(labels_dir, data["masks"], data["train"]), 2),
                             "regions": regions_for(fraction, total_regions), "seed": seed, "comparison": "ssl",
                             **score})
                log(f"{reference} {fraction:g}% {ssl} seed {seed}: Dice {score['dice']:.4f} ({score['train_s']:.0f} s)")
    for fraction in args.random_init_at:
        labels_dir = work / reference / f"{fraction:g}pct" / "labels"
        score = train_and_score(work / reference / f"{fraction:g}pct" / "random_init", "timm:resnet18", data,
                                labels_dir, args)
        rows.append({"strategy": reference, "ssl": "none", "init": "random", "target_pct": fraction,
                     "labelled_pct": round(100 * labelled_fraction(labels_dir, data["masks"], data["train"]), 2),
                     "regions": regions_for(fraction, total_regions), **score})
    for init, ref in (("simclr", str(enc)), ("random", "timm:resnet18")):
        score = train_and_score(work / f"full_{init}", ref, data, data["masks"], args)
        rows.append({"strategy": "all", "ssl": "none", "init": init, "target_pct": 100, "labelled_pct": 100.0,
                     "regions": total_regions, **score})

    print_table(rows)
    print_ssl_pairs(rows)
    (work / "active_learning.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                           "seconds": round(time.perf_counter() - started)}, indent=1))
    plot(rows, work / "active_learning.png")
    log(f"done in {time.perf_counter() - started:.0f} s; {work / 'active_learning.json'}, {work / 'active_learning.png'}")


def print_table(rows: list[dict]) -> None:
    header = ["strategy", "ssl", "init", "target %", "labelled %", "regions", "patches", "steps", "train s",
              "gland pixel Dice (mean/img)", "pixel Dice (pooled)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        strategy = r["strategy"] + (f" (seed {r['seed']})" if "seed" in r else "")
        print(f"| {strategy} | {r['ssl']} | {r['init']} | {r['target_pct']:g} | {r['labelled_pct']:.2f} | "
              f"{r['regions']} | {r['labelled_patches']} | {r['steps']} | {r['train_s']:.0f} | {r['dice']:.4f} | "
              f"{r['dice_pooled']:.4f} |")


def print_ssl_pairs(rows: list[dict]) -> None:
    """FixMatch against supervised-only on the same labels: per seed, mean, and the paired difference."""
    pairs = [r for r in rows if r.get("comparison") == "ssl"]
    for fraction in sorted({r["target_pct"] for r in pairs}):
        by_seed = {}
        for r in pairs:
            if r["target_pct"] == fraction:
                by_seed.setdefault(r["seed"], {})[r["ssl"]] = r["dice"]
        seeds = sorted(s for s, v in by_seed.items() if len(v) == 2)
        if not seeds:
            continue
        sup = np.array([by_seed[s]["none"] for s in seeds])
        fix = np.array([by_seed[s]["fixmatch"] for s in seeds])
        diff = fix - sup
        spread = lambda a: f" ± {a.std(ddof=1):.4f}" if len(a) > 1 else ""  # noqa: E731
        print(f"\n{fraction:g}% labelled, seeds {seeds}: supervised {sup.mean():.4f}{spread(sup)}, "
              f"fixmatch {fix.mean():.4f}{spread(fix)}, fixmatch - supervised {diff.mean():+.4f}{spread(diff)} "
              f"(per seed: {', '.join(f'{d:+.4f}' for d in diff)})")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    curves = {}
    for r in rows:
        if r["ssl"] == "none" and r["init"] == "simclr" and r["strategy"] != "all" and "comparison" not in r:
            curves.setdefault(r["strategy"], []).append((r["labelled_pct"], r["dice"]))
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "o-", label=f"{name} (supervised, SimCLR encoder)")
    for r in rows:
        if r["ssl"] == "fixmatch":
            ax.plot(r["labelled_pct"], r["dice"], "*", markersize=12, color="tab:red", label="FixMatch (kcenter labels)")
        elif r["init"] == "random" and r["strategy"] != "all":
            ax.plot(r["labelled_pct"], r["dice"], "s", color="tab:gray", label="random-init encoder")
    for r in rows:
        if r["strategy"] == "all":
            ax.axhline(r["dice"], linestyle="--", color="black" if r["init"] == "simclr" else "gray",
                       label=f"100% labelled ({r['init']})")
            if r["init"] == "simclr":
                ax.axhline(0.9 * r["dice"], linestyle=":", color="black", label="0.9 x 100% (SimCLR)")
    ax.set(xscale="log", xlabel="labelled fraction of training tissue (%)", ylabel="gland pixel Dice, GlaS testA+B",
           title="Active learning on GlaS (simulated annotator)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
