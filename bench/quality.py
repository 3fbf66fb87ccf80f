"""Encoder quality per wall-clock budget: ours vs a textbook SimCLR vs random init, kNN and linear probe on PCam.

Rows (each training run one after the other on this machine, same budget, batch 128, 2 workers):

- ours: ``simclr-path pretrain STORE --config small --batch 128 --epochs 38`` (resnet18 on 64 px
  crops, whole patches at 96 px) on the PCam valid patches (3000, labels unused; ingested once into
  WORK/pcam-valid.h5 with ``simclr-path ingest --mpp 0.97 --qc off``: every patch trains, as before
  ingest had QC), sent SIGTERM when the budget is spent (it finishes its step, checkpoints and
  exits 143), then ``simclr-path export``. ``--ours-epochs N`` sets the
  schedule's length (the default 38 is what a 2-core AVX512-BF16 EPYC reaches in 900 s with bf16;
  the table then says which value would end the cosine at the budget on this machine);
  ``--ours-args "..."`` is passed through verbatim, after our own flags (so it can override them).
- baseline: bench/simclr_baseline.py, a textbook SimCLR in torch/torchvision only (the paper's
  transforms, torchvision resnet18, 2-layer head, NT-Xent t=0.2, SGD as in lightly's benchmark
  with cosine decay over the budget) on the same images, read from the folder with PIL, sent
  SIGTERM at the same budget; it writes its backbone in our encoder format. It trains in fp32, as a
  textbook loop does; ours uses bf16 autocast where the CPU runs it natively (AVX512-BF16/AMX), as
  ``pretrain`` does by default - part of what "the same cost" buys each.
- random init: the floor ``evaluate_encoder`` reports (same architecture, untrained).

``--augment both`` trains ours twice per seed, with ``pretrain --augment cpu`` (albumentations in the
loader workers) and ``--augment device`` (views made by the training device), same steps, and ends
with the mean kNN and linear differences, device - cpu, in points (issue 22's check: within 1 point
over 3 seeds). ``--augment cpu|device`` passes one choice; the default (auto) passes none.

``--ink-share F`` measures what tiling QC does for pretraining (issue 24): bench/ink.py paints pen
ink on a share F of each class of PCam valid (once, cached in WORK/pcam-valid-ink<F>-s<ink seed>/
with its truth beside it; ``--ink-seed``), ``simclr-path ingest --qc on`` stores it, and per seed
ours trains twice at the same steps: QC off (``--exclude-qc none``: every patch) and QC on (the
default exclusion, pen and blur). Steps: ``--ours-steps``, else ``--ours-epochs`` epochs of the
whole store (23 steps each at 3000 patches). Each arm's schedule spans the fewest whole epochs of
its own patches that reach them and stops there (``--max-steps``), with the preset's warm-up in the
same steps; the arms run to their end (``--budget`` cuts only the baseline, which trains on the
inked images too). Both are scored on the clean PCam test set as every row is; the table adds each
arm's patches trained on, mean ± sd over seeds, the paired QC on - off difference per seed, QC's
pen recall on the inked patches and the share of the clean ones it drops (pen or blur). Each arm
is cached with its settings in WORK/ink/: a rerun reuses the finished ones (add seeds freely).

Every process runs with ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it), which the
``simclr-path`` command sets for itself: the baseline gets it too.

The budget is wall-clock from process start to SIGTERM (start-up included; never before the
first step is done). Every encoder is scored by the same call,
``simclr_path.downstream.evaluate.evaluate_encoder(ENC, labeled=PCAM/test)`` - what
``simclr-path eval ENC --labeled PCAM/test`` prints: kNN and a linear probe on PCam test with its
seeded stratified split. views/s = 2 x batch x steps / seconds between the first and the last
step the benchmark saw logged (ours logs every 5 steps, the baseline every step); epochs =
steps x batch / patches. Also shown: wall s (start to exit; ours honours SIGTERM only at its next
logged step, i.e. up to 4 steps late) and other cores (CPU that other processes used during the
run, from /proc/stat: numbers are comparable only when it is ~0). Everything is also written to
``--out`` as JSON (balanced accuracies, the probe's L2 strength, the commands run).

Usage: python bench/quality.py [--budget 900] [--seeds 0 1 2] [--ours-epochs N] [--ours-args "..."]
       [--skip-baseline] [--work bench/_work/quality] [--out results.json] [--device cpu]
       [--augment auto|cpu|device|both] [--ink-share F [--ink-seed 0] [--ours-steps S]]
Example (QC's effect, 3 seeds, 161 steps per arm = --ours-epochs 7 of 3000 patches):
       python bench/quality.py --ink-share 0.3 --seeds 0 1 2 --ours-epochs 7 --skip-baseline --out ink.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What the simclr-path command sets (cli/main.py), here for every run: the baseline's loader workers
# share the cores too, so both compare recipes under the same OpenMP wait policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_path import PatchStore  # noqa: E402
from simclr_path.downstream.encoder import load_encoder  # noqa: E402
from simclr_path.downstream.evaluate import evaluate_encoder  # noqa: E402
from simclr_path.engine.config import load_config  # noqa: E402
from simclr_path.runtime.device import native_bf16  # noqa: E402
from simclr_path.store.format import DEFAULT_EXCLUDE_QC, qc_bit  # noqa: E402

from ink import ink_folder, truth_path  # noqa: E402  (bench/ink.py, beside this file)

PCAM = ROOT.parent / "shared" / "data" / "patches" / "pcam_ai4all"
BATCH, WORKERS, PCAM_MPP = 128, 2, 0.97
SIMCLR_PATH = [sys.executable, "-m", "simclr_path"]


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["cpu_native_bf16"] = native_bf16(torch.device("cpu"))
    return info


def run_tool(args: list[str], what: str) -> dict:
    """A short ``simclr-path`` command; its JSON line on stdout, or an error with its stderr."""
    proc = subprocess.run(SIMCLR_PATH + args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_store(work: Path, images: Path, stem: str = "pcam-valid", qc: str = "off") -> Path:
    """The images in a store (``ingest --qc``), ingested once and cached in the work folder. The
    plain rows' store has no QC, as before ``ingest --qc`` existed: every patch trains."""
    store = work / f"{stem}.h5"
    if store.exists():
        return store
    tmp = work / f"{stem}.partial.h5"
    if tmp.exists():
        tmp.unlink()
    log(f"ingesting {images} -> {store} (once, --qc {qc})")
    run_tool(["ingest", str(images), "--out", str(tmp), "--mpp", str(PCAM_MPP), "--qc", qc], "simclr-path ingest")
    os.replace(tmp, store)
    return store


def ensure_inked(work: Path, share: float, seed: int) -> tuple[Path, dict]:
    """PCam valid with ``share`` of each class's images inked (bench/ink.py), made once and cached in
    the work folder; and its truth."""
    folder = work / f"pcam-valid-ink{share:g}-s{seed}"
    truth_file = truth_path(folder)
    if truth_file.exists():
        truth = json.loads(truth_file.read_text())
        if (truth.get("share"), truth.get("seed"), truth.get("source")) == (share, seed, str((PCAM / "valid").resolve())):
            return folder, truth
    log(f"inking {share:.0%} of {PCAM / 'valid'} -> {folder} (once, ink seed {seed})")
    return folder, ink_folder(PCAM / "valid", folder, share, seed)


def qc_against_truth(store: Path, truth: dict) -> dict:
    """What QC flagged in the inked store against what was painted: ``pen`` recall on the inked
    patches, and the clean patches (not inked) flagged ``pen`` and dropped by the default exclusion."""
    import h5py

    excluded = 0
    for reason in DEFAULT_EXCLUDE_QC:
        excluded |= qc_bit(reason)
    inked = clean = inked_pen = clean_pen = clean_dropped = 0
    with h5py.File(store, "r") as f:
        for group in f["slides"].values():
            for name, flags in zip(group["source_files"][()], group["qc_flags"][()]):
                if name.decode() in truth["inked"]:
                    inked, inked_pen = inked + 1, inked_pen + bool(flags & qc_bit("pen"))
                else:
                    clean, clean_pen = clean + 1, clean_pen + bool(flags & qc_bit("pen"))
                    clean_dropped += bool(flags & excluded)
    return {"inked": inked, "inked_flagged_pen": inked_pen, "pen_recall": round(inked_pen / max(inked, 1), 4),
            "clean": clean, "clean_flagged_pen": clean_pen, "clean_dropped": clean_dropped,
            "clean_dropped_share": round(clean_dropped / max(clean, 1), 4), "excluded_reasons": list(DEFAULT_EXCLUDE_QC)}


def ink_plan(args, store: Path) -> dict:
    """Both arms' pretraining at the same steps on the inked store: QC off trains on every patch
    (``--exclude-qc none``), QC on without the default exclusion's patches. The step count is
    ``--ours-steps``, else ``--ours-epochs`` of the whole store; each arm's schedule spans whole
    epochs of its own patches (the fewest that reach the step count) and stops at it
    (``--max-steps``), with the preset's warm-up in steps of the whole store (``--warmup-epochs``
    scaled to the arm's epochs), so the two see the same number of steps, warm-up and batch."""
    arms = {}
    for arm, exclude in (("off", "none"), ("on", ",".join(DEFAULT_EXCLUDE_QC))):
        handle = PatchStore(str(store), exclude_qc=exclude)
        arms[arm] = {"exclude_qc": exclude, "patches": int(len(handle.indices()))}
        handle.close()
    per_epoch_all = arms["off"]["patches"] // BATCH
    steps = args.ours_steps or args.ours_epochs * per_epoch_all
    warmup_steps = round(load_config("small").optim.warmup_epochs * per_epoch_all)
    for plan in arms.values():
        per_epoch = plan["patches"] // BATCH
        if per_epoch == 0:
            raise RuntimeError(f"{store}: {plan['patches']} patches with --exclude-qc {plan['exclude_qc']}, "
                               f"fewer than a batch of {BATCH}")
        epochs = math.ceil(steps / per_epoch)
        total = epochs * per_epoch
        warmup = min(warmup_steps, total - 1)  # as optim.build_scheduler clamps it
        # the learning rate at the last step, of its peak: still warming up, or down the cosine (0 at its end)
        left = steps / max(1, warmup) if steps <= warmup else \
            0.5 * (1 + math.cos(math.pi * (steps - warmup) / max(1, total - warmup)))
        plan.update(steps_per_epoch=per_epoch, epochs=epochs, schedule_steps=total,
                    warmup_epochs=round(warmup_steps / per_epoch, 6), warmup_steps=warmup, lr_left_at_end=round(left, 4))
    return {"steps": steps, "arms": arms}


class StepFile:
    """Steps a run reports in a JSON-lines file, each stamped with when this process first saw it."""

    def __init__(self, path: Path, has_step=lambda record: True):
        self.path, self.has_step, self.offset, self.seen = path, has_step, 0, []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[:chunk.rfind("\n") + 1]  # a line still being written is read next time
        self.offset += len(complete.encode())
        now = time.monotonic()
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "step" in record and self.has_step(record) and (not self.seen or record["step"] > self.seen[-1][0]):
                self.seen.append((int(record["step"]), now))

    def views_per_s(self) -> tuple[float | None, float]:
        """Training views per second between the first and last step seen, and those seconds."""
        if len(self.seen) < 2:
            return None, 0.0
        (s0, t0), (s1, t1) = self.seen[0], self.seen[-1]
        return 2 * BATCH * (s1 - s0) / max(t1 - t0, 1e-9), t1 - t0


def busy_cpu_s() -> float | None:
    """CPU seconds every process on this machine has used (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the run and its loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_budgeted(name: str, cmd: list[str], steps: StepFile, budget: float, log_path: Path,
                 grace: float = 600.0) -> dict:
    """Run ``cmd`` until ``budget`` seconds of wall clock are spent, then SIGTERM it and wait for it."""
    log(f"{name}: {shlex.join(cmd)}  (log: {log_path})")
    with open(log_path, "w") as err, open(log_path.with_suffix(".stdout"), "w") as out:
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        every = max(10.0, budget / 15) if math.isfinite(budget) else 60.0
        sigterm_at, next_report = None, start + every
        try:
            while proc.poll() is None:
                time.sleep(0.1)
                steps.poll()
                now = time.monotonic()
                if sigterm_at is None and now - start >= budget:
                    if steps.seen:
                        proc.send_signal(signal.SIGTERM)
                        sigterm_at = now
                        log(f"{name}: budget spent at step {steps.seen[-1][0]}; SIGTERM sent")
                    elif now >= next_report:
                        log(f"{name}: budget spent before the first logged step; waiting for it")
                if sigterm_at is not None and now - sigterm_at > grace:
                    proc.kill()
                    raise RuntimeError(f"{name}: still running {grace:.0f} s after SIGTERM; killed")
                if now >= next_report:
                    rate, _ = steps.views_per_s()
                    step = steps.seen[-1][0] if steps.seen else 0
                    log(f"{name}: {now - start:5.0f}/{budget:.0f} s, step {step}"
                        + (f", {rate:.1f} views/s" if rate else ""))
                    next_report = now + every
        finally:
            if proc.poll() is None:  # interrupted: stop the child too
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        end = time.monotonic()
        busy1, own1 = busy_cpu_s(), own_cpu_s()
    steps.poll()
    rate, seconds = steps.views_per_s()
    # cores other processes kept busy meanwhile: numbers are only comparable when this is ~0
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (end - start)
    if others is not None and others > 0.25:
        log(f"{name}: WARNING other processes used {others:.2f} cores on average during this run")
    return {"returncode": proc.returncode, "wall_s": round(end - start, 2),
            "other_cores": round(others, 2) if others is not None else None,
            "after_sigterm_s": round(end - sigterm_at, 2) if sigterm_at is not None else None,
            "views_per_s": round(rate, 2) if rate else None, "timed_s": round(seconds, 2),
            "steps_seen": steps.seen[-1][0] if steps.seen else 0}


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def evaluate(encoder: Path, floor: bool, device: str) -> dict:
    """``evaluate_encoder`` on PCam test, as ``simclr-path eval ENC --labeled PCAM/test`` runs it."""
    wanted = {"labeled": str(PCAM / "test"), "device": device, "workers": WORKERS, "random_floor": floor}
    accepted = inspect.signature(evaluate_encoder).parameters
    missing = [k for k in wanted if k not in accepted]
    if missing:
        log(f"evaluate_encoder no longer takes {missing}; calling it without them")
    started = time.monotonic()
    result = evaluate_encoder(str(encoder), **{k: v for k, v in wanted.items() if k in accepted})
    log(f"evaluated {encoder.name} in {time.monotonic() - started:.0f} s")
    return result


def train_ours(args, store: Path, seed: int, patches: int, augment: str = "auto") -> dict:
    name = f"ours-s{seed}" + ("" if augment == "auto" else f"-{augment}")
    return pretrain_and_export(args, name, store, args.work, seed, args.ours_epochs, augment, [], args.budget)


def pretrain_and_export(args, name: str, store: Path, folder: Path, seed: int, epochs: int, augment: str,
                        flags: list[str], budget: float) -> dict:
    """``simclr-path pretrain`` (``small``, batch 128) as a fresh run in ``folder/runs/name``, stopped
    by SIGTERM at ``budget`` seconds (inf: runs to its end), then exported to ``folder/name.pt``.
    ``flags`` come after ours, ``--ours-args`` after them."""
    run_dir = folder / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, never a resumed one
    run_dir.mkdir(parents=True)
    cmd = SIMCLR_PATH + ["pretrain", str(store), "--out", str(run_dir), "--config", "small", "--batch", str(BATCH),
                         "--epochs", str(epochs), "--seed", str(seed), "--workers", str(WORKERS),
                         "--device", args.device, "--quiet"] + flags + shlex.split(args.ours_args)
    if augment != "auto":
        cmd += ["--augment", augment]
    steps = StepFile(run_dir / "metrics.jsonl", has_step=lambda r: "loss" in r)
    run = run_budgeted(f"{name}", cmd, steps, budget, folder / f"{name}.log")
    # 143: stopped on SIGTERM, checkpoint saved. -15: the SIGTERM came in the instant between pretrain
    # returning its summary and the process exiting (a schedule that ends right at the budget); the
    # export below checks that the checkpoint holds every step that was logged.
    if run["returncode"] not in (0, 143, -signal.SIGTERM):
        raise RuntimeError(f"pretrain exited {run['returncode']}:\n{log_tail(folder / f'{name}.log')}")
    encoder = folder / f"{name}.pt"
    exported = run_tool(["export", str(run_dir), str(encoder)], "simclr-path export")
    run.update(steps=int(exported["steps"]), encoder=str(encoder), command=shlex.join(cmd))
    if run["steps"] < run["steps_seen"]:
        raise RuntimeError(f"exported checkpoint is at step {run['steps']}, but step {run['steps_seen']} was logged")
    return run


def scored(args, run: dict, patches: int, results: dict) -> dict:
    """``run`` with its epochs and its PCam test scores; the evaluation's split and (the first time)
    the random-init floor go into ``results``."""
    record = dict(run, epochs=round(run["steps"] * BATCH / patches, 3))
    floor = "random_init" not in results  # the floor once, from the first evaluation
    result = evaluate(Path(run["encoder"]), floor, args.device)
    record.update(scores(result["pretrained"]))
    results["eval"] = {k: result[k] for k in ("n_train", "n_test", "classes", "split", "groups") if k in result}
    if floor and "random_init" in result:
        results["random_init"] = scores(result["random_init"])
    return record


def ink_arm(args, ink: dict, seed: int, arm: str, results: dict) -> dict:
    """One arm (``off``/``on``) of the QC comparison for ``seed``: pretrained at ``ink["steps"]`` on
    the inked store (:func:`ink_plan`), run to its end, exported and scored. Cached with its settings
    in ``WORK/ink/<tag>/``: a rerun with the same settings reuses it, other settings train it again."""
    plan = ink["arms"][arm]
    name, folder = f"ours-qc-{arm}-s{seed}", args.work / "ink" / ink["tag"]
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / f"{name}.json"
    settings = json.loads(json.dumps({
        "store": ink["store"], "truth": ink["truth_file"], "steps": ink["steps"], "seed": seed,
        "plan": {key: plan[key] for key in ("exclude_qc", "patches", "epochs", "warmup_epochs")},
        "ours_args": args.ours_args, "device": args.device, "augment": args.augment, "batch": BATCH}))
    if record_path.exists():
        cached = json.loads(record_path.read_text())
        if cached.get("settings") == settings:
            log(f"{name}: cached ({record_path})")
            for key in ("eval", "random_init"):
                if cached.get(key) and key not in results:
                    results[key] = cached[key]
            return cached["record"]
        log(f"{name}: {record_path} was made with other settings; training again")
    flags = ["--max-steps", str(ink["steps"]), "--warmup-epochs", str(plan["warmup_epochs"]),
             "--exclude-qc", plan["exclude_qc"]]
    run = pretrain_and_export(args, name, Path(ink["store"]), folder, seed, plan["epochs"], args.augment, flags,
                              math.inf)
    if run["steps"] != ink["steps"]:
        raise RuntimeError(f"{name}: trained {run['steps']} steps, not {ink['steps']}")
    had_floor = "random_init" in results
    record = scored(args, run, plan["patches"], results)
    record.update(patches_trained=plan["patches"], exclude_qc=plan["exclude_qc"])
    cache = {"settings": settings, "record": record, "eval": results.get("eval"),
             "random_init": None if had_floor else results.get("random_init")}
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cache, indent=1) + "\n")
    os.replace(tmp, record_path)
    return record


def train_baseline(args, seed: int, images: Path) -> dict:
    encoder = args.work / f"baseline-s{seed}.pt"
    progress = args.work / f"baseline-s{seed}.progress.jsonl"
    for path in (encoder, progress):
        if path.exists():
            path.unlink()
    deadline = time.time() + args.budget  # when SIGTERM comes: the end of its cosine schedule
    cmd = [sys.executable, str(ROOT / "bench" / "simclr_baseline.py"), str(images), "--out", str(encoder),
           "--batch", str(BATCH), "--workers", str(WORKERS), "--seed", str(seed), "--deadline", f"{deadline:.2f}",
           "--progress", str(progress), "--device", args.device]
    run = run_budgeted(f"baseline seed {seed}", cmd, StepFile(progress), args.budget,
                       args.work / f"baseline-s{seed}.log")
    if run["returncode"] != 0:
        raise RuntimeError(f"baseline exited {run['returncode']}:\n{log_tail(args.work / f'baseline-s{seed}.log')}")
    model, meta = load_encoder(str(encoder))  # our loader, every key matched (strict)
    run.update(steps=int(meta["training"]["steps"]), encoder=str(encoder), command=shlex.join(cmd))
    return run


def scores(result: dict) -> dict:
    return {k: result[k] for k in ("knn_acc", "knn_balanced_acc", "linear_acc", "linear_balanced_acc",
                                   "linear_weight_decay") if k in result}


def fmt(values: list, digits: int, spread: bool) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    if spread and len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"


def row_label(key: str) -> str:
    """A row of the table: ``ours-cpu`` -> ``ours --augment cpu``, ``ours-qc-on`` -> ``ours QC on``."""
    if key.startswith("ours-qc-"):
        return f"ours QC {key.rpartition('-')[2]}"
    return key.replace("ours-", "ours --augment ")


def mean_sd(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 5),
            "sd": round(statistics.stdev(values), 5) if len(values) > 1 else None, "n": len(values)}


def ink_summary(rows: list[dict]) -> dict:
    """QC off and on over seeds (mean and sd of kNN and linear accuracy), and QC on - off per seed
    (the seeds where both arms finished) with its mean and sd."""
    arms = {arm: {r["seed"]: r for r in rows if r["row"] == f"ours-qc-{arm}" and "error" not in r}
            for arm in ("off", "on")}
    out: dict = {}
    for arm, by_seed in arms.items():
        if by_seed:
            out[arm] = {"seeds": sorted(by_seed), **{key: mean_sd([r[key] for r in by_seed.values()])
                                                     for key in ("knn_acc", "linear_acc")}}
    paired = sorted(set(arms["off"]) & set(arms["on"]))
    if paired:
        per_seed = [{"seed": seed, **{key: round(arms["on"][seed][key] - arms["off"][seed][key], 5)
                                      for key in ("knn_acc", "linear_acc")}} for seed in paired]
        out["on_minus_off"] = {"per_seed": per_seed,
                               **{key: mean_sd([d[key] for d in per_seed]) for key in ("knn_acc", "linear_acc")}}
    return out


def print_ink(ink: dict) -> None:
    """QC's effect: what it flagged against what was painted, and both arms side by side."""
    qc, coverage = ink["qc"], ink["coverage"] or {}
    print(f"\nink: {ink['inked_files']} of {ink['qc']['inked'] + ink['qc']['clean']} PCam valid patches inked "
          f"(ink seed {ink['ink_seed']}; coverage {coverage.get('min', 0):.0%}-{coverage.get('max', 0):.0%}, "
          f"median {coverage.get('median', 0):.0%}; bench/ink.py), ingested with --qc on")
    print(f"QC: pen recall {qc['pen_recall']:.3f} ({qc['inked_flagged_pen']} of {qc['inked']} inked patches "
          f"flagged pen); clean patches dropped ({','.join(qc['excluded_reasons'])}) {qc['clean_dropped_share']:.2%} "
          f"({qc['clean_dropped']} of {qc['clean']}; {qc['clean_flagged_pen']} of them flagged pen)")
    summary = ink.get("summary", {})
    header = f"{'arm':32} | {'patches trained on':>18} | {'steps':>6} | {'kNN acc':>15} | {'linear acc':>15}"
    print(header)
    print("-" * len(header))
    for arm in ("off", "on"):
        plan, got = ink["arms"][arm], summary.get(arm)
        cells = [f"{got[k]['mean']:.4f}" + (f" ± {got[k]['sd']:.4f}" if got[k]["sd"] is not None else "")
                 if got else "-" for k in ("knn_acc", "linear_acc")]
        label = f"QC {arm} (--exclude-qc {plan['exclude_qc']})"
        print(f"{label:32} | {plan['patches']:>18} | {ink['steps']:>6} | {cells[0]:>15} | {cells[1]:>15}")
    diff = summary.get("on_minus_off")
    if diff:
        seeds = "; ".join(f"seed {d['seed']}: kNN {100 * d['knn_acc']:+.2f}, linear {100 * d['linear_acc']:+.2f}"
                          for d in diff["per_seed"])
        spread = {k: f" ± {100 * diff[k]['sd']:.2f}" if diff[k]["sd"] is not None else "" for k in ("knn_acc", "linear_acc")}
        print(f"QC on - off, points: {seeds}. Mean kNN {100 * diff['knn_acc']['mean']:+.2f}{spread['knn_acc']}, "
              f"linear {100 * diff['linear_acc']['mean']:+.2f}{spread['linear_acc']}")
    schedules = "; ".join(
        f"QC {arm} {plan['epochs']} epochs of {plan['steps_per_epoch']} steps, warm-up {plan['warmup_steps']}, stopped "
        f"at step {ink['steps']} of {plan['schedule_steps']} ({plan['lr_left_at_end']:.1%} of the peak learning rate)"
        for arm, plan in ink["arms"].items())
    print(f"schedules: {schedules}")


def print_table(results: dict) -> None:
    m, rows = results["machine"], results["runs"]
    print(f"\nmachine: {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']} with "
          f"{m['torch_threads']} threads" + (f", GPU {m['gpu']}" if "gpu" in m else "")
          + f"; device {results['device']}; OMP_WAIT_POLICY={m.get('omp_wait_policy')} for every run")
    if results["device"] == "cpu":
        print("precision: ours " + ("bf16 autocast (native on this CPU)" if m.get("cpu_native_bf16") else "fp32")
              + ", baseline fp32 (the textbook loop)")
    ink = results.get("ink")
    if ink:
        print(f"ours: {ink['steps']} steps per arm, each run to its end, batch {BATCH}, {WORKERS} workers, on PCam "
              f"valid with {ink['share']:.0%} of it inked ({results['patches']} patches)"
              + (f", {results['ours_args']}" if results["ours_args"] else "")
              + (f"; baseline: {results['budget_s']:.0f} s wall-clock on the same images"
                 if any(r["row"] == "baseline" for r in rows) else ""))
    else:
        print(f"budget: {results['budget_s']:.0f} s wall-clock per training run (start-up included), batch {BATCH}, "
              f"{WORKERS} workers, {results['patches']} PCam valid patches; ours: --epochs {results['ours_epochs']}"
              + (f" {results['ours_args']}" if results["ours_args"] else ""))
    if results.get("eval"):
        e = results["eval"]
        print(f"eval: PCam test, {e['n_train']} train / {e['n_test']} test patches ({e.get('split', 'stratified')} split, seed 0), "
              f"kNN k=20 and linear probe")
    columns = [("views/s", "views_per_s", 1, 13), ("steps", "steps", 0, 13), ("epochs", "epochs", 2, 11),
               ("kNN acc", "knn_acc", 4, 15), ("linear acc", "linear_acc", 4, 15), ("wall s", "wall_s", 0, 10),
               ("other cores", "other_cores", 2, 11)]
    header = f"{'row':28} | " + " | ".join(f"{title:>{width}}" for title, _, _, width in columns)
    print(header)
    print("-" * len(header))

    def line(label: str, group: list[dict]) -> str:
        spread = len(group) > 1
        cells = [fmt([r.get(key) for r in group], digits + (spread and digits == 0), spread).rjust(width)
                 for _, key, digits, width in columns]  # a mean of counts gets one decimal
        return f"{label:28} | " + " | ".join(cells)

    seeds = sorted({r["seed"] for r in rows})
    keys = sorted({r["row"] for r in rows if r["row"].startswith("ours")}) + ["baseline"]
    for key, label in ((k, row_label(k)) for k in keys):
        group = [r for r in rows if r["row"] == key]
        for r in group:
            if "error" in r:
                print(f"{label + ' seed ' + str(r['seed']):28} | failed: {r['error'].strip().splitlines()[-1][:90]}")
            else:
                print(line(f"{label} seed {r['seed']}", [r]))
        ok = [r for r in group if "error" not in r]
        if len(seeds) > 1 and len(ok) > 1:
            print(line(f"{label} mean ± std ({len(ok)})", ok))
    floor = results.get("random_init")
    if floor:
        print(line("random init", [dict(floor, steps=0, epochs=0)]))
    print("wall s: start to exit (ours honours SIGTERM at its next logged step, every 5); other cores: CPU "
          "other processes used meanwhile (~0 for comparable numbers)")
    by_augment = {a: [r for r in rows if r["row"] == f"ours-{a}" and "error" not in r] for a in ("cpu", "device")}
    if by_augment["cpu"] and by_augment["device"]:
        for key, title in (("knn_acc", "kNN"), ("linear_acc", "linear")):
            gap = 100 * (statistics.mean(r[key] for r in by_augment["device"])
                         - statistics.mean(r[key] for r in by_augment["cpu"]))
            print(f"--augment device - cpu, {title}: {gap:+.2f} points (mean over seeds "
                  f"{sorted(r['seed'] for r in by_augment['device'])}; target within 1)")
    if ink:
        print_ink(ink)
    ours = [r for r in rows if r["row"].startswith("ours") and "error" not in r]
    if ours and results["ours_epochs_default"] and not ink:
        done = statistics.mean(r["steps"] for r in ours) / (results["patches"] // BATCH)  # pretrain's epochs
        print(f"\nours' schedule spans {results['ours_epochs']} epochs and {done:.1f} were done: "
              f"--ours-epochs {max(1, round(done))} would end its cosine near the budget")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=900.0, help="wall-clock seconds per training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "quality")
    parser.add_argument("--ours-epochs", type=int, default=None, help="ours' --epochs (schedule length) [38]")
    parser.add_argument("--ours-args", default="", help="extra 'simclr-path pretrain' flags, passed verbatim")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--device", default="cpu", help="training and evaluation device, for every row")
    parser.add_argument("--out", type=Path, default=None, help="write every number (balanced accuracies too) as JSON")
    parser.add_argument("--augment", choices=["auto", "cpu", "device", "both"], default="auto",
                        help="ours' pretrain --augment; both: one run of each per seed, and their difference")
    parser.add_argument("--ink-share", type=float, default=None,
                        help="QC's effect: ink this share of PCam valid (bench/ink.py), train ours with QC off and on")
    parser.add_argument("--ink-seed", type=int, default=0, help="which images are inked, and how [0]")
    parser.add_argument("--ours-steps", type=int, default=None,
                        help="with --ink-share: steps of each arm [--ours-epochs of the whole store]")
    args = parser.parse_args()
    if args.ink_share is not None and not 0 < args.ink_share < 1:
        parser.error(f"--ink-share must be between 0 and 1, got {args.ink_share}")
    if args.ink_share is not None and args.augment == "both":
        parser.error("--ink-share compares QC off and on: give one --augment, not both")
    if args.ours_steps is not None and (args.ink_share is None or args.ours_steps < 1):
        parser.error("--ours-steps is the step count of --ink-share's arms (>= 1)")
    ours_epochs_default = args.ours_epochs is None
    args.ours_epochs = args.ours_epochs or 38
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    ink = None
    if args.ink_share is None:
        images = PCAM / "valid"
        store = ensure_store(args.work, images)
    else:
        images, truth = ensure_inked(args.work, args.ink_share, args.ink_seed)
        store = ensure_store(args.work, images, images.name, qc="on")
        ink = {"share": args.ink_share, "ink_seed": args.ink_seed, "folder": str(images),
               "truth_file": str(truth_path(images)), "store": str(store),
               "inked_files": truth["inked_files"], "coverage": truth["coverage"],
               "qc": qc_against_truth(store, truth), **ink_plan(args, store)}
        ink["tag"] = f"{images.name}-{ink['steps']}steps"
    patches = len(PatchStore(str(store)))
    results = {"machine": machine(), "device": args.device, "budget_s": args.budget, "batch": BATCH,
               "workers": WORKERS, "patches": patches, "seeds": args.seeds, "ours_epochs": args.ours_epochs,
               "ours_epochs_default": ours_epochs_default, "ours_args": args.ours_args, "store": str(store),
               "runs": []}
    if ink:
        results["ink"] = ink
    log(f"machine: {results['machine']}")

    def save():
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    failed = False
    for seed in args.seeds:
        if ink:
            ours_rows = ["ours-qc-off", "ours-qc-on"]
        else:
            augments = ("cpu", "device") if args.augment == "both" else (args.augment,)
            ours_rows = ["ours" if a == "auto" else f"ours-{a}" for a in augments]
        for row in ours_rows if args.skip_baseline else ours_rows + ["baseline"]:
            record = {"row": row, "seed": seed}
            try:
                if row.startswith("ours-qc-"):
                    record.update(ink_arm(args, ink, seed, row.rpartition("-")[2], results))
                else:
                    augment = row.partition("-")[2] or "auto"
                    run = train_ours(args, store, seed, patches, augment) if row.startswith("ours") \
                        else train_baseline(args, seed, images)
                    record.update(scored(args, run, patches, results))
                log(f"{row} seed {seed}: {record['steps']} steps, kNN {record['knn_acc']:.4f}, "
                    f"linear {record['linear_acc']:.4f}")
            except Exception as exc:  # keep the other rows
                failed = True
                record["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{row} seed {seed} FAILED: {record['error']}")
            results["runs"].append(record)
            save()
    if ink:
        ink["summary"] = ink_summary(results["runs"])
        save()
    print_table(results)
    if args.out:
        log(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
