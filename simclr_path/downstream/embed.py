"""``simclr-path embed``: encoder features for every patch, in the layouts MIL code reads.

Output folder::

    features/h5_files/<slide>.h5   features (N, D) float32 and coords (N, 2) int64 with the store's
                                   coords attributes - CLAM's and TRIDENT's per-slide feature files
    features/pt_files/<slide>.pt   the same features as a torch tensor (CLAM's MIL datasets)
    features/features.h5           all patches: features, coords, slide_index; slide_names
                                   (active-learning pipelines pick patches from here)

Streaming: one DataLoader runs over the patches of every slide still to do, in store order, and
each batch is written as it comes into its slide's file, so memory does not grow with the number
of patches (the largest thing held is one slide's ``.pt`` tensor, written from the finished
per-slide h5). Batches never straddle two slides, so a slide's features are the same whether it is
embedded in one run or after a resume.

Resuming: every per-slide file is written to a temporary name and renamed when complete, and
records the encoder's sha256, the slide's patch count and a key of the slide's patches in the
store (the store's tiling settings, the slide's attributes, coords and source file names). A rerun
skips slides whose h5 matches and reads none of their pixels (a missing ``.pt`` is rewritten from
the h5). A slide embedded with another encoder, or whose patches in the store changed (re-tiled,
re-ingested), is recomputed and said so on stderr: the output folder always holds the features of
the encoder and stores of the last complete run. ``features.h5`` is rebuilt at the end, slide by
slide from the per-slide files (temporary name, then rename); it is left as it is when it
already holds exactly these slides for this encoder.

QC: patches that tiling flagged for an ``exclude_qc`` reason (``--exclude-qc``, default pen and
blur) are not embedded; a slide's files hold the others (features and their coords), and which
ones is part of the slide's key, so changing ``--exclude-qc`` recomputes the slides it changes.

Files are named by slide key (:class:`~simclr_path.store.PatchStore`): two stores with a slide of
the same name (two ingested folders with the same classes) give ``<slide>-<store file stem>`` for
each; ``slide_names`` in ``features.h5`` lists the per-slide file names.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from simclr_path.data.normalize import normalize
from simclr_path.engine.features import EncoderInputs
from simclr_path.errors import SimclrPathError, check_loader_options
from simclr_path.runtime.files import file_sha256
from simclr_path.store import PatchStore
from simclr_path.store.format import SLIDES, SPEC_KEYS, open_h5

COMBINED = "features.h5"
_READ_BLOCK_BYTES = 64 << 20  # features copied into features.h5 this many bytes at a time
_CHUNK_BYTES = 1 << 20


@dataclass
class _Slide:
    name: str  # in the store
    out: str  # file stem of its outputs (the name, unless an earlier store has a slide of that name)
    store: str
    start: int  # patch indices in the PatchStore
    end: int
    key: str  # what its patches are; a changed key means recompute
    rows: np.ndarray | None = None  # the patches embedded (indices into the slide) when QC leaves some out

    @property
    def n(self) -> int:
        return self.end - self.start if self.rows is None else len(self.rows)

    def indices(self):
        """PatchStore indices of the patches embedded, in store order."""
        return range(self.start, self.end) if self.rows is None else (self.start + self.rows).tolist()


def _plain(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _slide_key(spec: list, group: h5py.Group) -> str:
    """A digest of what the slide's patches are, from metadata only (no pixels read)."""
    digest = hashlib.sha256(repr(spec).encode())
    digest.update(repr(sorted((k, _plain(v)) for k, v in group.attrs.items())).encode())
    coords = np.ascontiguousarray(group["coords"][()])
    digest.update(repr((coords.shape, coords.dtype.str)).encode())
    digest.update(coords.tobytes())
    if "source_files" in group:  # ingested folders: which images, in which order
        for name in group["source_files"].asstr()[()]:
            digest.update(name.encode() + b"\0")
    return digest.hexdigest()


def _slides(store: PatchStore) -> list[_Slide]:
    """Every slide with patches, in store order, with its output name and key."""
    ranges = iter(store.slide_ranges())
    included = store.included()
    slides = []
    for path, attrs in zip(store.paths, store.attrs):
        spec = [(k, _plain(attrs.get(k))) for k in (*SPEC_KEYS, "jpeg_quality")]
        with open_h5(path, "r") as f:
            for name, group in f[SLIDES].items():
                n = int(group["coords"].shape[0])
                if n == 0:
                    continue
                key, start, end = next(ranges, (None, 0, 0))
                if key is None or store.slide_source(key)[1] != name or end - start != n:
                    raise SimclrPathError(f"{path}: the store changed while being read; rerun when it is complete")
                key_digest, rows = _slide_key(spec, group), None
                if not included[start:end].all():  # --exclude-qc leaves some out: which ones is part of the key
                    rows = np.flatnonzero(included[start:end]).astype(np.int64)
                    key_digest = hashlib.sha256(key_digest.encode() + rows.tobytes()).hexdigest()
                    if len(rows) == 0:  # every patch left out: no files for this slide
                        continue
                slides.append(_Slide(name, key, os.path.abspath(path), start, end, key_digest, rows))
    return slides


def _h5_path(out_dir: str, slide: _Slide) -> str:
    return os.path.join(out_dir, "h5_files", f"{slide.out}.h5")


def _pt_path(out_dir: str, slide: _Slide) -> str:
    return os.path.join(out_dir, "pt_files", f"{slide.out}.pt")


def _finished_dim(path: str, slide: _Slide, encoder_sha: str) -> int | None:
    """Feature dimension of a complete per-slide h5 of this encoder and these patches; else None."""
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if (str(a.get("encoder_sha256", "")) != encoder_sha or str(a.get("slide_key", "")) != slide.key
                    or "features" not in f or "coords" not in f or f["features"].ndim != 2
                    or f["features"].shape[0] != slide.n or f["coords"].shape[0] != slide.n):
                return None
            return int(f["features"].shape[1])
    except OSError:  # unreadable or foreign: recompute
        return None


def _write_pt(h5_path: str, pt_path: str) -> None:
    """The ``.pt`` tensor of a finished per-slide h5 (one slide in memory)."""
    with h5py.File(h5_path, "r") as f:
        features = torch.from_numpy(f["features"][()])
    torch.save(features, f"{pt_path}.tmp")
    os.replace(f"{pt_path}.tmp", pt_path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _SlideBatches:
    """Batch sampler: index lists of ``batch_size`` patches of one slide at a time, slide by slide.

    Batches end at slide ends, as when each slide had its own loader, so results do not depend on
    which slides a run skips. Lazy: nothing here grows with the number of patches."""

    def __init__(self, slides: list[_Slide], batch_size: int):
        self.slides, self.batch_size = slides, batch_size

    def __iter__(self):
        for s in self.slides:
            indices = s.indices()
            for first in range(0, s.n, self.batch_size):
                yield list(indices[first:first + self.batch_size])

    def __len__(self) -> int:
        return sum(-(-s.n // self.batch_size) for s in self.slides)


class _SlideWriter:
    """One slide's h5, filled batch by batch under a temporary name; renamed when complete."""

    def __init__(self, out_dir: str, slide: _Slide, dim: int):
        self.slide = slide
        self.path, self.pt = _h5_path(out_dir, slide), _pt_path(out_dir, slide)
        self.tmp = f"{self.path}.tmp"
        self.file = h5py.File(self.tmp, "w")
        self.features = self.file.create_dataset("features", shape=(slide.n, dim), dtype=np.float32)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == self.slide.n

    def write(self, features: np.ndarray) -> None:
        end = self.filled + len(features)
        self.features[self.filled:end] = features
        self.filled = end

    def finish(self, attrs: dict) -> None:
        s = self.slide
        with open_h5(s.store, "r") as f:
            group = f[SLIDES][s.name]
            all_coords = group["coords"][()]
            coords = self.file.create_dataset("coords", data=all_coords if s.rows is None else all_coords[s.rows])
            coords.attrs.update(dict(group["coords"].attrs))
            source_path = str(group.attrs.get("source_path", ""))
        self.file.attrs.update({**attrs, "slide": s.name, "source_path": source_path, "store": s.store,
                                "num_patches": s.n, "slide_key": s.key})
        self.file.close()
        _remove(self.pt)  # an older .pt must never sit next to the new h5 (a resume trusts the pair)
        os.replace(self.tmp, self.path)
        _write_pt(self.path, self.pt)

    def abort(self) -> None:
        try:
            if self.file.id.valid:
                self.file.close()
        finally:
            _remove(self.tmp)


def _clear_temporaries(out_dir: str) -> None:
    """Remove what a killed run left half-written (every finished file has its final name)."""
    for sub, suffix in (("h5_files", ".h5.tmp"), ("pt_files", ".pt.tmp")):
        folder = os.path.join(out_dir, sub)
        for entry in os.scandir(folder):
            if entry.name.endswith(suffix) and entry.is_file():
                _remove(entry.path)
    _remove(os.path.join(out_dir, f"{COMBINED}.tmp"))


def _manifest(encoder_sha: str, slides: list[_Slide]) -> str:
    digest = hashlib.sha256(encoder_sha.encode())
    for s in slides:
        digest.update(f"{s.out}\t{s.key}\t{s.n}\n".encode())
    return digest.hexdigest()


def _combined_is_current(path: str, manifest: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("manifest", "")) == manifest
    except OSError:
        return False


def _write_combined(out_dir: str, slides: list[_Slide], dim: int, attrs: dict) -> None:
    """features.h5 from the per-slide files, streamed into resizable chunked datasets."""
    target = os.path.join(out_dir, COMBINED)
    tmp = f"{target}.tmp"
    rows = max(1, _CHUNK_BYTES // (4 * dim))
    block = max(1, _READ_BLOCK_BYTES // (4 * dim) // rows) * rows
    try:
        with h5py.File(tmp, "w") as f:
            features = f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), chunks=(rows, dim),
                                        dtype=np.float32)
            coords = f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), chunks=(rows, 2), dtype=np.int64)
            index = f.create_dataset("slide_index", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=np.int64)
            total = 0
            for number, s in enumerate(slides):
                with h5py.File(_h5_path(out_dir, s), "r") as src:
                    for first in range(0, s.n, block):
                        last = min(first + block, s.n)
                        end = total + last - first
                        for dataset in (features, coords, index):
                            dataset.resize(end, axis=0)
                        features[total:end] = src["features"][first:last]
                        coords[total:end] = src["coords"][first:last]
                        index[total:end] = number
                        total = end
            f.create_dataset("slide_names", data=np.array([s.out for s in slides], dtype=h5py.string_dtype()))
            f.attrs.update(attrs)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _write_failed(out_dir: str, exc: OSError) -> SimclrPathError:
    reason = exc.strerror or (str(exc).splitlines() or ["I/O error"])[0]
    return SimclrPathError(f"{out_dir}: embedding stopped ({reason}); rerun the same command to resume")


def embed_stores(encoder_path: str, stores: list[str], out_dir: str, device: str = "auto", batch_size: int = 256,
                 workers: int = 2, exclude_qc=(), progress=None, reporter=None) -> dict:
    """Embed every patch of ``stores`` into ``out_dir``, resuming a previous run; returns the summary.

    Args:
        exclude_qc: tiling QC reasons whose patches are not embedded (``"pen,blur"``; see
            :class:`~simclr_path.store.reader.PatchStore`); the per-slide files then hold the others.
        progress: called with the number of patches after each batch is written.
        reporter: a :class:`~simclr_path.runtime.console.Reporter` for the stderr progress bar.
    """
    from simclr_path import __version__
    from simclr_path.downstream.encoder import load_encoder
    from simclr_path.runtime.console import Reporter
    from simclr_path.runtime.device import resolve_device

    check_loader_options(batch_size, workers)
    started = time.perf_counter()
    reporter = reporter or Reporter(enabled=False)
    dev = resolve_device(device)
    model, meta = load_encoder(encoder_path)
    encoder_sha = file_sha256(encoder_path)
    store = PatchStore(stores, exclude_qc=exclude_qc)
    if len(store) == 0:
        raise SimclrPathError(f"{', '.join(stores)}: no patches to embed")
    if not store.included().any():
        raise SimclrPathError(f"{', '.join(stores)}: every patch is flagged {','.join(store.exclude_qc)} by QC; "
                              "embed them anyway with --exclude-qc none")
    slides = _slides(store)
    try:
        for sub in ("h5_files", "pt_files"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        _clear_temporaries(out_dir)
    except OSError as exc:
        raise SimclrPathError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None

    todo, stale, dim = [], 0, None
    try:
        for s in slides:
            h5_path = _h5_path(out_dir, s)
            done_dim = _finished_dim(h5_path, s, encoder_sha) if os.path.exists(h5_path) else None
            if done_dim is None:
                stale += os.path.exists(h5_path)
                todo.append(s)
                continue
            dim = dim or done_dim
            if not os.path.exists(_pt_path(out_dir, s)):  # stopped between the h5 and its .pt
                _write_pt(h5_path, _pt_path(out_dir, s))
    except OSError as exc:
        raise _write_failed(out_dir, exc) from None
    skipped = len(slides) - len(todo)
    attrs = {"encoder": os.path.abspath(encoder_path), "encoder_sha256": encoder_sha,
             "timm_model": meta["timm_model"], "tool_version": __version__}
    reporter.start(slides=len(slides), done=skipped)
    try:
        if skipped:
            reporter.log(f"{out_dir}: {skipped} slide(s) already embedded with this encoder, skipped")
        if stale:
            reporter.log(f"{out_dir}: {stale} slide(s) do not match this encoder and store (another encoder, "
                         "patches changed since, or an older simclr-path); recomputing them")
        if todo:
            reporter.add_patches(sum(s.n for s in todo))
            dim = _embed(model.to(dev), meta, store, todo, out_dir, dev, batch_size, workers, attrs, progress,
                         reporter) or dim
        combined = os.path.join(out_dir, COMBINED)
        manifest = _manifest(encoder_sha, slides)
        if todo or not _combined_is_current(combined, manifest):
            _write_combined(out_dir, slides, dim, {**attrs, "manifest": manifest})
    except OSError as exc:
        raise _write_failed(out_dir, exc) from None
    finally:
        reporter.stop()
        store.close()
    seconds = time.perf_counter() - started
    embedded = sum(s.n for s in todo)
    return {"out": os.path.abspath(out_dir), "slides": len(slides), "slides_embedded": len(todo),
            "slides_skipped": skipped, "patches": sum(s.n for s in slides),
            "patches_excluded_qc": len(store) - sum(s.n for s in slides), "patches_embedded": embedded,
            "feature_dim": int(dim),
            "timm_model": meta["timm_model"], "device": str(dev), "seconds": round(seconds, 3)}


@torch.no_grad()
def _embed(model, meta, store, todo, out_dir, dev, batch_size, workers, attrs, progress, reporter) -> int:
    """Run the encoder over the ``todo`` slides' patches with one loader; returns the feature dim."""
    size, mean, std = meta["input_size"][-1], meta["mean"], meta["std"]
    loader = torch.utils.data.DataLoader(EncoderInputs(store, size), batch_sampler=_SlideBatches(todo, batch_size),
                                         num_workers=workers, pin_memory=dev.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))  # leaves global RNG alone
    model.eval()
    slides = iter(todo)
    writer, dim = None, 0
    try:
        for batch in loader:
            x = normalize(batch.to(dev, non_blocking=True), mean, std)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                features = model(x).float().cpu().numpy()
            if writer is None:
                dim = features.shape[1]
                writer = _SlideWriter(out_dir, next(slides), dim)
            writer.write(features)
            if writer.full:
                writer.finish(attrs)
                writer = None
                reporter.advance_slide()
            reporter.patches_done(len(batch))
            if progress is not None:
                progress(len(batch))
    finally:
        if writer is not None:  # stopped mid-slide: no half-written file stays behind
            writer.abort()
    return dim
