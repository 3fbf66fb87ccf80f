"""``simclr-path tile``: slides in, one resumable HDF5 patch store out.

Worker processes fingerprint slides, plan them and cut tasks of patches; this process is the only
writer. Each slide is staged and committed whole (see :mod:`simclr_path.store`), so an interrupted
run keeps every finished slide and the same command resumes where it stopped, skipping slides by
fingerprint. Fingerprinting runs a few slides ahead of tiling rather than all before it: on
thousands of slides on network storage that was a long, silent stall.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import time
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from simclr_path.errors import SimclrPathError, SlideError, first_line
from simclr_path.runtime.console import Reporter
from simclr_path.store import StoreWriter
from simclr_path.store.codecs import create_pixel_dataset, write_patches
from simclr_path.store.format import DEFAULT_EXCLUDE_QC, QC_REASONS
from simclr_path.store.qc import qc_summary, write_qc
from simclr_path.wsi.discover import slide_names
from simclr_path.wsi.grid import TileSpec
from simclr_path.wsi.preview import legend_text, write_preview
from simclr_path.wsi.qc import PatchQC
from simclr_path.wsi.slide import open_slide
from simclr_path.wsi.tile_reader import (
    SlidePlan, fingerprint_slide, plan_tasks, prepare_slide, read_task, worker_init,
)


#: The QC ``tile`` flags and stores with, as ``ingest`` does (the workers score with
#: :func:`~simclr_path.wsi.qc.batch_scores` at the same default thresholds).
_QC = PatchQC()


@dataclass
class _Active:
    """A slide being written: its staged group and how many patches are still to come."""

    path: str
    name: str
    plan: SlidePlan
    group: object
    remaining: int
    failed: str | None = None
    scores: np.ndarray | None = None  # (N, K) QC scores, filled as tasks come back (QC on)


@dataclass
class TileResult:
    store: str
    slides_total: int = 0
    slides_tiled: int = 0
    slides_skipped: int = 0
    slides_empty: int = 0
    patches: int = 0
    seconds: float = 0.0
    extract_seconds: float = 0.0  # from the first patch read to the end: the steady-state part
    failures: list[dict] = field(default_factory=list)
    qc: dict | None = None  # slide name -> patches per QC reason, slides tiled in this run (QC on)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {
            "store": self.store,
            "slides_total": self.slides_total,
            "slides_tiled": self.slides_tiled,
            "slides_skipped": self.slides_skipped,
            "slides_empty": self.slides_empty,
            "slides_failed": len(self.failures),
            "patches": self.patches,
            "seconds": round(self.seconds, 3),
            "patches_per_s": round(self.patches / self.seconds, 1) if self.seconds > 0 else 0.0,
            "extract_patches_per_s": round(self.patches / self.extract_seconds, 1) if self.extract_seconds > 0 else 0.0,
            "failures": self.failures,
            "qc": None if self.qc is None else qc_summary(self.qc),
        }


class _InlineExecutor:
    """``--workers 0``: run tasks in this process (debugging, tests, tiny jobs)."""

    def submit(self, fn, *args):
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered through the future like a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def tile_slides(
    slides: list[str],
    out: str,
    spec: TileSpec,
    *,
    workers: int = 2,
    fallback_mpp: float | None = None,
    mpp_table: dict[str, float] | None = None,
    preview_dir: str | None = None,
    qc_report_dir: str | None = None,
    reporter: Reporter | None = None,
) -> TileResult:
    """Tile ``slides`` into the store at ``out`` and return a summary.

    Per-slide problems (corrupt file, missing resolution) are recorded in the result and logged;
    the other slides still finish. Problems with the store itself raise :class:`SimclrPathError`.
    With ``spec.qc`` every patch gets QC scores and flags (:mod:`simclr_path.wsi.qc`), all patches
    are stored, and ``qc_report_dir`` (optional) receives ``<slide>.json`` per slide tiled.
    """
    if workers < 0:
        raise SimclrPathError(f"--workers must be >= 0, got {workers}")
    if fallback_mpp is not None and not fallback_mpp > 0:
        raise SimclrPathError(f"--slide-mpp must be > 0, got {fallback_mpp}")
    if qc_report_dir and not spec.qc:
        raise SimclrPathError("--qc-report needs QC; drop --qc off or --qc-report")
    for folder, what in ((preview_dir, "preview"), (qc_report_dir, "QC report")):
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise SimclrPathError(f"{folder}: cannot create the {what} folder ({exc.strerror})") from None
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    slides = list(dict.fromkeys(slides))  # a path given twice is one slide
    result = TileResult(store=out, slides_total=len(slides), qc={} if spec.qc else None)
    writer = StoreWriter(out, spec.as_attrs())
    try:
        queue = _SlideQueue(slides, writer.completed(), writer.names())
        reporter.start(slides=len(slides), fingerprints=len(slides))
        _run(slides, queue, writer, spec, workers, fallback_mpp, mpp_table, preview_dir, qc_report_dir, reporter,
             result)
    finally:
        reporter.stop()
        writer.close()
    result.seconds = time.perf_counter() - start
    return result


class _SlideQueue:
    """From fingerprints to slides to tile: skip the complete ones, name the others.

    A slide whose fingerprint is in the store is skipped, whatever its file is called now. The
    others are named as :func:`slide_names` names the whole list: the stem, or
    ``stem-<fingerprint8>`` when another slide of the run has the same stem; a name the store
    already holds for other content gets the suffix too. Clashes are found from the stems alone,
    so only a slide whose stem clashes waits - for the fingerprints of its own stem - and names
    never depend on the order fingerprints arrive in.
    """

    def __init__(self, slides: list[str], done: dict[str, str], taken: set[str]):
        self.done, self.taken = done, taken
        by_stem: dict[str, list[str]] = defaultdict(list)
        for path in slides:
            by_stem[slide_names([path], {})[path]].append(path)  # one path: its stem
        self.clash = {path: group for group in by_stem.values() for path in group}
        self.fingerprints: dict[str, str | None] = {}
        self.named: dict[str, str] = {}  # name -> path, this run
        self.total = len(slides)
        self.already_complete = 0

    @property
    def complete(self) -> bool:
        """Every slide is fingerprinted (or failed to be)."""
        return len(self.fingerprints) == self.total

    def add(self, path: str, fp: str | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Record ``path``'s fingerprint (None: it could not be read).

        Returns the slides decided by it: ``(path, name)`` to tile, and ``(path, why)`` skipped.
        """
        self.fingerprints[path] = fp
        tile, skip = [], []
        if fp is not None and fp in self.done:
            self.already_complete += 1
            skip.append((path, f"already complete as {self.done[fp]}"))
        group = self.clash[path]
        if any(q not in self.fingerprints for q in group):
            return tile, skip
        names = slide_names(group, {q: self.fingerprints[q] or "" for q in group})
        for q in group:
            fq = self.fingerprints[q]
            if fq is None or fq in self.done:
                continue
            name = names[q]
            if name in self.taken:  # same stem, different content: keep both
                name = f"{name}-{fq[:8]}"
            if name in self.named:  # identical files under one stem: tile the content once
                skip.append((q, f"identical to {self.named[name]}"))
                continue
            self.named[name] = q
            tile.append((q, name))
        return tile, skip


def _run(slides, queue, writer, spec, workers, fallback_mpp, mpp_table, preview_dir, qc_report_dir, reporter,
         result):
    if workers == 0:
        executor = _InlineExecutor()
    else:
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=worker_init, initargs=(os.getpid(),))
    window = max(2, 2 * max(workers, 1))  # tasks in flight: bounds memory of pending results
    max_active = max(1, workers) + 1  # slides staged at once
    # Fingerprints run ahead of tiling: always enough for the next slides to start, and further
    # while workers would otherwise idle (a resume skipping many slides moves at pool speed).
    ahead, far_ahead = max_active, 8 * window
    unprinted = deque(slides)  # not fingerprinted yet
    ready: deque = deque()  # (path, name): fingerprinted, named, to tile
    tasks: deque = deque()  # (active slide, indices into its kept patches)
    inflight: dict[Future, tuple] = {}
    active: dict[str, _Active] = {}
    first_task = None
    try:
        while unprinted or ready or tasks or inflight:
            while len(inflight) < window:
                printing = _count(inflight, "fingerprint")
                if unprinted and len(ready) + printing < ahead:
                    path = unprinted.popleft()
                    inflight[executor.submit(fingerprint_slide, path)] = ("fingerprint", path)
                elif tasks:
                    if first_task is None:
                        first_task = time.perf_counter()
                    slide, indices = tasks.popleft()
                    if slide.failed:
                        continue
                    fut = executor.submit(read_task, slide.path, slide.plan.plan, slide.plan.coords[indices], spec)
                    inflight[fut] = ("read", slide, indices)
                elif ready and len(active) + _count(inflight, "prepare") < max_active:
                    path, name = ready.popleft()
                    fut = executor.submit(prepare_slide, path, spec, fallback_mpp, mpp_table, preview_dir, name)
                    inflight[fut] = ("prepare", path, name)
                elif unprinted and len(ready) + printing < far_ahead:
                    path = unprinted.popleft()
                    inflight[executor.submit(fingerprint_slide, path)] = ("fingerprint", path)
                else:
                    break
            if not inflight:  # cannot happen: every state above has work in flight or to submit
                raise RuntimeError("tiling scheduler stalled")
            finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in finished:
                task = inflight.pop(fut)
                if task[0] == "fingerprint":
                    _on_fingerprinted(fut, task[1], queue, ready, writer, reporter, result)
                elif task[0] == "prepare":
                    _on_prepared(fut, task[1], task[2], writer, spec, active, tasks, reporter, result)
                else:
                    _on_read(fut, task[1], task[2], writer, spec, active, reporter, result,
                             (preview_dir, qc_report_dir))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if first_task is not None:
            result.extract_seconds = time.perf_counter() - first_task


def _count(inflight, kind: str) -> int:
    return sum(1 for task in inflight.values() if task[0] == kind)


def _on_fingerprinted(fut, path, queue: _SlideQueue, ready, writer, reporter, result):
    message = None
    try:
        fp = fut.result()
    except SlideError as exc:
        fp, message = None, str(exc)
    except Exception as exc:  # a crashed worker or a bug: report it against the slide
        fp, message = None, f"{path}: unexpected error ({type(exc).__name__}: {exc})"
    reporter.fingerprinted()
    if fp is None:
        _fail(result, reporter, path, message)
    tile, skip = queue.add(path, fp)
    ready.extend(tile)
    for skipped, why in skip:
        result.slides_skipped += 1
        reporter.advance_slide()
        if why.startswith("identical"):
            reporter.log(f"{skipped}: {why}, skipped")
    if queue.complete and queue.already_complete:  # true once: after the last fingerprint
        reporter.log(f"{writer.path}: {queue.already_complete} slide(s) already complete, skipped")


def _fail(result, reporter, path: str, message: str) -> None:
    result.failures.append({"slide": path, "error": message})
    reporter.log(f"error: {message}")
    reporter.advance_slide()


def _on_prepared(fut, path, name, writer, spec, active, tasks, reporter, result):
    try:
        sp: SlidePlan = fut.result()
    except SlideError as exc:
        _fail(result, reporter, path, str(exc))
        return
    except Exception as exc:  # a crashed worker or a bug: report it against the slide
        _fail(result, reporter, path, f"{path}: unexpected error ({type(exc).__name__}: {exc})")
        return
    with _disk_errors(writer.path):
        group = writer.begin(name)
        _write_slide_header(group, sp, spec, name)
    n = len(sp.coords)
    if n == 0:
        reporter.log(
            f"warning: {path}: no tissue found ({sp.grid_total} grid patches, none with "
            f">= {spec.min_tissue:.0%} tissue); stored with 0 patches - check --min-tissue or --preview"
        )
        with _disk_errors(writer.path):
            if spec.qc:
                result.qc[name] = write_qc(group, np.zeros((0, len(_QC.score_names)), np.float32),
                                           np.zeros(0, np.uint8), _QC.score_names, _QC.params)
            writer.commit(name)
        result.slides_tiled += 1
        result.slides_empty += 1
        reporter.advance_slide()
        return
    slide = _Active(path, name, sp, group, remaining=n)
    if spec.qc:
        slide.scores = np.full((n, len(_QC.score_names)), np.nan, dtype=np.float32)
    active[name] = slide
    reporter.add_patches(n)
    for indices in plan_tasks(sp):
        tasks.append((slide, indices))


def _on_read(fut, slide: _Active, indices, writer, spec, active, reporter, result, outputs=(None, None)):
    if slide.failed:
        return
    try:
        encoded, scores = fut.result()
    except SlideError as exc:
        message = str(exc)
    except Exception as exc:
        message = f"{slide.path}: unexpected error ({type(exc).__name__}: {exc})"
    else:
        message = None
    if message:
        slide.failed = message
        writer.discard(slide.name)
        active.pop(slide.name, None)
        _fail(result, reporter, slide.path, message)
        return
    with _disk_errors(writer.path):
        dataset = slide.group["patches"]
        for offset, index in enumerate(indices):
            write_patches(dataset, int(index), encoded[offset : offset + 1], spec.codec)
    if scores is not None:
        slide.scores[indices] = scores
    slide.remaining -= len(indices)
    reporter.patches_done(len(indices))
    if slide.remaining == 0:
        try:
            with _disk_errors(writer.path):
                counts = _finish_qc(slide, *outputs) if spec.qc else None
        except SlideError as exc:  # its preview could not be drawn: the slide fails, as without QC
            writer.discard(slide.name)
            active.pop(slide.name, None)
            _fail(result, reporter, slide.path, str(exc))
            return
        with _disk_errors(writer.path):
            writer.commit(slide.name)
        if counts is not None:
            result.qc[slide.name] = counts
        active.pop(slide.name)
        result.slides_tiled += 1
        result.patches += len(slide.plan.coords)
        reporter.advance_slide()


def _finish_qc(slide: _Active, preview_dir, report_dir) -> dict:
    """Second QC pass once a slide is all measured: flags against the slide's own distribution,
    stored with the scores; then the preview and the per-slide report, if asked for. Returns the
    patches per reason."""
    flags, stats = _QC.flags(slide.scores)
    counts = write_qc(slide.group, slide.scores, flags, _QC.score_names, _QC.params, stats)
    sp = slide.plan
    if preview_dir and sp.mask is not None:
        legend = legend_text(slide.name, sp.meta.mpp, sp.plan.target_mpp, sp.plan.patch_size, len(sp.coords),
                             sp.grid_total)
        handle = open_slide(slide.path)
        try:
            write_preview(os.path.join(preview_dir, f"{slide.name}.png"), handle, sp.mask, sp.coords,
                          sp.plan.patch_size_level0, legend, flags, DEFAULT_EXCLUDE_QC)
        finally:
            handle.close()
    if report_dir:
        flagged = np.flatnonzero(flags)
        report = {
            "slide": slide.name, "source_path": os.path.abspath(slide.path), "patches": len(flags),
            "counts": counts, "excluded_by_default": list(DEFAULT_EXCLUDE_QC), "slide_stats": stats,
            "params": _QC.params, "score_names": list(_QC.score_names),
            "flagged": [{"x": int(sp.coords[i, 0]), "y": int(sp.coords[i, 1]),
                         "reasons": [r for b, r in enumerate(QC_REASONS) if flags[i] >> b & 1],
                         "scores": [None if not np.isfinite(v) else round(float(v), 5) for v in slide.scores[i]]}
                        for i in flagged],
        }
        path = os.path.join(report_dir, f"{slide.name}.json")
        try:
            with open(f"{path}.tmp", "w") as fh:
                json.dump(report, fh, indent=1)
            os.replace(f"{path}.tmp", path)
        except OSError as exc:  # as a preview that cannot be written: this slide fails, the store is fine
            with contextlib.suppress(OSError):
                os.remove(f"{path}.tmp")
            raise SlideError(f"{path}: cannot write the QC report ({exc.strerror or exc}); check --qc-report") from None
    return counts


def _write_slide_header(group, sp: SlidePlan, spec: TileSpec, name: str) -> None:
    """Everything about a slide except its pixels: attrs, coords with CLAM/TRIDENT attrs."""
    meta, plan = sp.meta, sp.plan
    w, h = meta.dimensions
    nan = float("nan")
    group.attrs.update(
        {
            "source_path": os.path.abspath(meta.path),
            "fingerprint": meta.fingerprint,
            "vendor": meta.vendor,
            "width": w,
            "height": h,
            "level0_mpp": meta.mpp if meta.mpp is not None else nan,
            "mpp_source": meta.mpp_source,
            "objective_power": meta.objective_power if meta.objective_power is not None else nan,
            "patch_level": plan.level,
            "scale": plan.scale,
            "num_patches": len(sp.coords),
            "grid_patches": sp.grid_total,
        }
    )
    coords = group.create_dataset("coords", data=sp.coords.astype(np.int64).reshape(-1, 2))
    level_dim = meta.level_dimensions[plan.level]
    coords.attrs.update(
        {
            # CLAM: read_region(coord, patch_level, (patch_size, patch_size))
            "patch_size": plan.read_size,
            "patch_level": plan.level,
            "downsample": np.array([plan.level_downsample, plan.level_downsample]),
            "downsampled_level_dim": np.array(level_dim, dtype=np.int64),
            "level_dim": np.array(meta.dimensions, dtype=np.int64),
            "name": name,
            # TRIDENT
            "patch_size_level0": plan.patch_size_level0,
            "level0_magnification": meta.objective_power if meta.objective_power is not None else nan,
            "target_magnification": plan.target_magnification,
            "overlap": spec.patch_size - spec.step if spec.step < spec.patch_size else 0,
            # ours: the stored pixels are target_patch_size at target_mpp
            "target_patch_size": plan.patch_size,
            "target_mpp": plan.target_mpp,
        }
    )
    group.create_dataset("tissue_fraction", data=sp.tissue_fraction.astype(np.float32))
    create_pixel_dataset(group, spec.codec, len(sp.coords), spec.patch_size)


class _disk_errors:
    """Turn a failed write (disk full, I/O error) into a one-line, resumable error."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, OSError):
            return False
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc):
            raise SimclrPathError(
                f"{self.path}: disk full; free space and rerun the same command to resume "
                "(finished slides are kept)"
            ) from None
        raise SimclrPathError(
            f"{self.path}: write failed ({first_line(exc)}); rerun the same command to resume"
        ) from None
