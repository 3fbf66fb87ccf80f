"""Stage 1, `simclr-path tile`: slides read through OpenSlide, tissue, grid, crash-safe tiling,
previews; on the real slides and synthetic pyramids."""

import os

import h5py
import numpy as np
import openslide
import pytest

from simclr_path import PatchStore
from simclr_path.errors import SimclrPathError
from simclr_path.wsi.grid import TileSpec, plan_patches
from simclr_path.wsi.slide import read_meta
from simclr_path.wsi.tile_reader import read_patch_direct
from simclr_path.wsi.tiler import tile_slides

from cli_helpers import assert_one_line_error, run_cli, summary
from synthetic import tissue_image, write_slide


@pytest.mark.parametrize("codec,tolerance", [("raw", 0.0), ("jpeg", 3.5)])
def test_patches_equal_openslide_region_resized(real_slides, tmp_path, codec, tolerance):
    # CMU: level 0, 0.499 -> 0.5 um/px (a 257 px read resized to 256); NDPI: 40x slide read from
    # its 2x level (0.456 um/px) resized to 0.5 um/px.
    out = tmp_path / "p.h5"
    spec = TileSpec(target_mpp=0.5, patch_size=128, codec=codec, min_tissue=0.1, jpeg_quality=95)
    result = tile_slides([str(real_slides["cmu"]), str(real_slides["ndpi"])], str(out), spec, workers=2)
    assert result.ok and result.patches > 50
    store = PatchStore(out)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(store), size=12, replace=False):
        name, x, y = store.coords(index)
        path = real_slides["cmu"] if name.startswith("CMU") else real_slides["ndpi"]
        slide = openslide.OpenSlide(str(path))
        plan = plan_patches(read_meta(slide, path), spec, slide.get_best_level_for_downsample)
        expected = read_patch_direct(slide, plan, x, y)
        got = store[index]
        assert got.shape == (128, 128, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - expected.astype(int)).mean()
        assert diff <= tolerance, (name, x, y, diff)


def test_level_choice_never_upsamples_and_reads_coarsest_sufficient_level(real_slides):
    slide = openslide.OpenSlide(str(real_slides["ndpi"]))  # 0.228 um/px, levels 1,2,4,...,64
    meta = read_meta(slide, real_slides["ndpi"])
    for mpp, level in [(0.25, 0), (0.5, 1), (1.0, 2), (2.0, 3)]:
        plan = plan_patches(meta, TileSpec(target_mpp=mpp), slide.get_best_level_for_downsample)
        assert plan.level == level
        assert plan.level_downsample <= plan.scale  # the level is at least as fine as the target
    plan = plan_patches(meta, TileSpec(target_mpp=None, magnification=10), slide.get_best_level_for_downsample)
    assert plan.level == 2 and plan.read_size == 256 and plan.scale == 4


def test_coords_on_grid_inside_slide_with_clam_and_trident_attrs(real_slides, tmp_path):
    out = tmp_path / "p.h5"
    r = run_cli("tile", real_slides["ndpi"], "--out", out, "--magnification", 10, "--patch-size", 64, "--overlap", 16,
                "--min-tissue", 0.2, "--workers", 0)
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        g = f["slides/Hamamatsu-test3-DAPI-2-387"]
        coords = g["coords"][()]
        attrs = dict(g["coords"].attrs)
        assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) > 10
        assert attrs["patch_level"] == 2 and attrs["patch_size"] == 64  # 4x level, 64 px there
        assert attrs["patch_size_level0"] == 256 and attrs["level0_magnification"] == 40
        assert attrs["target_magnification"] == 10 and attrs["overlap"] == 16
        assert np.all(coords >= 0)
        assert np.all(coords[:, 0] + 256 <= 3968) and np.all(coords[:, 1] + 256 <= 4864)
        # stride 48 target px = 192 level-0 px, grid anchored at (0, 0)
        assert np.all(coords % 192 == 0)
        assert len(np.unique(coords, axis=0)) == len(coords)
        assert g["tissue_fraction"][()].min() >= 0.2


def test_missing_mpp_is_one_line_error_and_other_slides_finish(real_slides, tmp_path):
    out = tmp_path / "p.h5"
    r = run_cli("tile", real_slides["cmu"], real_slides["tcga"], "--out", out, "--workers", 0, "-q")
    assert_one_line_error(r, "TCGA-CR-7395-01A-01-TS1.svs", "--slide-mpp")
    assert r.exit_code == 1
    s = summary(r)
    assert s["slides_tiled"] == 1 and s["slides_failed"] == 1
    assert PatchStore(out).slide_names == ["CMU-1-Small-Region"]
    # the fix the message names works, and the finished slide is skipped
    r = run_cli("tile", real_slides["cmu"], real_slides["tcga"], "--out", out, "--workers", 0, "--slide-mpp", 0.25)
    assert r.exit_code == 0, r.stderr
    s = summary(r)
    assert s["slides_skipped"] == 1 and s["slides_tiled"] == 1
    with h5py.File(out) as f:
        assert f["slides/TCGA-CR-7395-01A-01-TS1"].attrs["mpp_source"] == "cli"
        assert f["slides/CMU-1-Small-Region"].attrs["mpp_source"] == "metadata"


def test_mpp_csv_overrides_metadata(real_slides, tmp_path):
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nTCGA-CR-7395-01A-01-TS1.svs,0.25\n")
    out = tmp_path / "p.h5"
    r = run_cli("tile", real_slides["tcga"], "--out", out, "--mpp-csv", table, "--workers", 0)
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        g = f["slides/TCGA-CR-7395-01A-01-TS1"]
        assert g.attrs["mpp_source"] == "csv" and g.attrs["level0_mpp"] == 0.25
        assert g["coords"].attrs["patch_size_level0"] == 512  # 0.5 / 0.25 * 256


def test_rerun_skips_by_fingerprint_even_when_renamed(tmp_path):
    slide = write_slide(tmp_path / "a.tif", tissue_image(1536, 1024, seed=1))
    out = tmp_path / "p.h5"
    assert summary(run_cli("tile", slide, "--out", out, "--workers", 0))["slides_tiled"] == 1
    renamed = tmp_path / "renamed.tif"
    os.rename(slide, renamed)
    s = summary(run_cli("tile", renamed, "--out", out, "--workers", 0))
    assert s["slides_skipped"] == 1 and s["slides_tiled"] == 0


class RecordingReporter:
    """A Reporter that records what ``tile`` reports, in order."""

    def __init__(self):
        self.events = []

    def start(self, slides, done=0, fingerprints=0):
        self.events.append(("start", slides, fingerprints))

    def fingerprinted(self, n=1):
        self.events.append(("fingerprinted", n))

    def add_patches(self, n):
        pass

    def patches_done(self, n):
        self.events.append(("patches", n))

    def advance_slide(self):
        self.events.append(("slide",))

    def log(self, message):
        self.events.append(("log", message))

    def stop(self):
        pass


def test_fingerprints_as_tiling_goes_with_progress_and_the_same_names(tmp_path):
    import shutil

    from simclr_path.wsi.discover import find_slides, slide_names
    from simclr_path.wsi.slide import fingerprint

    for i, rel in enumerate(["a/s.tif", "b/s.tif", "c.tif", "d.tif", "e.tif", "f.tif"]):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        write_slide(tmp_path / rel, tissue_image(512, 512, seed=i), levels=1)
    (tmp_path / "g").mkdir()
    shutil.copy(tmp_path / "a" / "s.tif", tmp_path / "g" / "s.tif")  # used to crash the run
    slides = find_slides([str(tmp_path)])
    out = tmp_path / "p.h5"
    spec = TileSpec(target_mpp=0.25, patch_size=64)
    reporter = RecordingReporter()
    result = tile_slides(slides, str(out), spec, workers=0, reporter=reporter)
    assert result.ok and result.slides_tiled == 6 and result.slides_skipped == 1
    # the names are those of slide_names over all fingerprints: s-<fp8> for the s.tif files
    expected = slide_names(slides, {p: fingerprint(p) for p in slides})
    assert sorted(PatchStore(out).slide_names) == sorted(set(expected.values()))
    assert len({v for v in expected.values() if v.startswith("s-")}) == 2
    kinds = [e[0] for e in reporter.events]
    assert reporter.events[0] == ("start", 7, 7)
    assert kinds.count("fingerprinted") == 7  # progress: one tick per slide
    last_fingerprint = len(kinds) - 1 - kinds[::-1].index("fingerprinted")
    assert kinds.index("patches") < last_fingerprint, "tiling waited for every fingerprint"
    assert ("log", f"{tmp_path / 'g' / 's.tif'}: identical to {tmp_path / 'a' / 's.tif'}, skipped") in reporter.events
    # a rerun skips all, and says so once all are fingerprinted
    reporter = RecordingReporter()
    assert tile_slides(slides, str(out), spec, workers=0, reporter=reporter).slides_skipped == 7
    assert [e for e in reporter.events if e[0] == "log"] == [("log", f"{out}: 7 slide(s) already complete, skipped")]


def test_names_do_not_depend_on_the_order_fingerprints_arrive_in():
    import hashlib
    import random

    from simclr_path.wsi.discover import slide_names
    from simclr_path.wsi.tiler import _SlideQueue

    paths = ["d1/x.svs", "d2/x.svs", "d3/x.tif", "y.svs", "z.svs", "d4/w.svs", "d5/w.svs", "v.svs"]
    fps = {p: hashlib.sha256(p.encode()).hexdigest()[:32] for p in paths}
    fps["d5/w.svs"] = fps["d4/w.svs"]  # the same file twice: tiled once
    fps["v.svs"] = None  # unreadable
    done = {fps["z.svs"]: "z", fps["d3/x.tif"]: "old-name"}  # complete (d3/x.tif under another name)
    taken = {"z", "old-name", "y"}  # "y" holds other content: y.svs gets a suffix
    names = slide_names(paths, {p: fp or "" for p, fp in fps.items()})
    expected = {p: names[p] for p in ("d1/x.svs", "d2/x.svs", "d4/w.svs")}
    expected["y.svs"] = f"y-{fps['y.svs'][:8]}"
    rng = random.Random(0)
    for trial in range(30):
        order = paths[:]
        rng.shuffle(order)
        queue, tiled, skipped = _SlideQueue(paths, done, taken), {}, {}
        for path in order:
            tile, skip = queue.add(path, fps[path])
            if path in ("y.svs", "z.svs"):  # a stem nobody shares is decided at once
                assert [p for p, _ in tile + skip] == [path]
            tiled.update(tile)
            skipped.update(skip)
        assert tiled == expected, order
        assert sorted(skipped) == ["d3/x.tif", "d5/w.svs", "z.svs"]
        assert queue.complete and queue.already_complete == 2


def test_fingerprints_are_taken_in_the_workers_and_still_skip_renamed_slides(tmp_path, monkeypatch):
    from simclr_path.wsi import slide as slide_module
    from simclr_path.wsi import tile_reader, tiler

    slides = [write_slide(tmp_path / f"{n}.tif", tissue_image(512, 512, seed=i), levels=1) for i, n in enumerate("ab")]
    out = tmp_path / "p.h5"
    spec = TileSpec(target_mpp=0.25, patch_size=64)
    assert tile_slides(slides[:1], str(out), spec, workers=0).slides_tiled == 1
    renamed = str(tmp_path / "renamed.tif")
    os.rename(slides[0], renamed)

    def not_here(*args, **kwargs):
        raise AssertionError("a slide was fingerprinted in the main process")

    for module in (slide_module, tile_reader, tiler):  # spawned workers import their own copies
        monkeypatch.setattr(module, "fingerprint", not_here, raising=False)
    result = tile_slides([renamed, slides[1]], str(out), spec, workers=1)
    assert result.ok, result.failures
    assert result.slides_skipped == 1 and result.slides_tiled == 1
    assert PatchStore(out).slide_names == ["a", "b"]


def test_slide_gone_before_its_fingerprint_fails_alone(tmp_path):
    good = write_slide(tmp_path / "good.tif", tissue_image(512, 512, seed=1), levels=1)
    gone = str(tmp_path / "gone.tif")  # listed, then deleted before tiling reached it
    result = tile_slides([gone, good], str(tmp_path / "p.h5"), TileSpec(target_mpp=0.25, patch_size=64), workers=0)
    assert result.slides_tiled == 1
    assert result.failures == [{"slide": gone, "error": f"{gone}: no such file; check the path"}]


def read_all(path):
    with h5py.File(path) as f:
        out = {}
        for name, g in f["slides"].items():
            out[name] = (g["coords"][()], [bytes(b) for b in g["patches"]], g["tissue_fraction"][()])
        return out


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def test_a_staging_area_left_damaged_by_a_kill_is_rebuilt_from_the_complete_slides(tmp_path, monkeypatch, capsys):
    """kill -9 in the middle of an HDF5 metadata write can leave /_staging impossible to delete
    ("addr overflow"); the next run rebuilds the store from its finished slides, no traceback."""
    slides = [write_slide(tmp_path / f"s{i}.tif", tissue_image(1024, 768, seed=i), levels=1) for i in range(3)]
    spec = TileSpec(target_mpp=0.25, patch_size=64, min_tissue=0.2)
    reference, out = tmp_path / "reference.h5", tmp_path / "out.h5"
    assert tile_slides(slides, str(reference), spec, workers=0).ok
    assert tile_slides(slides[:2], str(out), spec, workers=0).ok
    with h5py.File(out, "r+") as f:  # what the killed run was writing
        f.require_group("_staging").create_group("s2").create_dataset("coords", data=np.zeros((5, 2)))

    original, calls = h5py.Group.__delitem__, []

    def damaged_once(self, name):
        if name == "_staging":
            calls.append(name)
            if len(calls) == 1:
                raise KeyError("Unable to synchronously delete object (addr overflow, addr = 4398, size = 328)")
        original(self, name)

    monkeypatch.setattr(h5py.Group, "__delitem__", damaged_once)
    assert tile_slides(slides, str(out), spec, workers=0).ok
    assert "rebuilt it from its 2 complete slide(s)" in capsys.readouterr().err
    expected, got = read_all(reference), read_all(out)
    assert got.keys() == expected.keys() == {"s0", "s1", "s2"}
    for name in expected:
        np.testing.assert_array_equal(got[name][0], expected[name][0])
        assert got[name][1] == expected[name][1]
    assert not list(tmp_path.glob("*.tmp"))

    # copying the slides out fails too: one line, the store left as it was
    with h5py.File(out, "r+") as f:
        f.require_group("_staging").create_group("s9")
    before = out.read_bytes()
    calls.clear()

    def copy_fails(*args, **kwargs):
        raise RuntimeError("bad heap")

    monkeypatch.setattr(h5py.Group, "copy", copy_fails)
    with pytest.raises(SimclrPathError, match="move it aside and run tile again"):
        tile_slides(slides, str(out), spec, workers=0)
    assert out.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(6):
        write_slide(folder / f"s{i}.tif", tissue_image(3072, 2048, seed=i), levels=2)
    reference = tmp_path / "reference.h5"
    cmd = [sys.executable, "-m", "simclr_path", "tile", str(folder), "--mpp", "0.25", "--patch-size", "64",
           "--min-tissue", "0.2", "--workers", "1", "-q"]
    subprocess.run(cmd + ["--out", str(reference)], check=True, capture_output=True)
    expected = read_all(reference)
    assert len(expected) == 6

    out = tmp_path / "killed.h5"
    full_size = reference.stat().st_size
    seen_partial = False
    for kill_at in (0.3, 0.6, None):  # kill once the store reaches this fraction of its final size
        log = tmp_path / "stderr.txt"
        with open(log, "w") as stderr_file:
            proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=stderr_file)
        deadline, workers = time.time() + 120, []
        while proc.poll() is None and time.time() < deadline:
            if kill_at is not None and out.exists() and out.stat().st_size >= kill_at * full_size:
                workers = children(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        stderr = log.read_text()
        time.sleep(0.5)
        if kill_at is not None and proc.returncode == -signal.SIGKILL:
            assert workers and not [pid for pid in workers if alive(pid)], "reader processes outlived kill -9"
        partial = read_all(out)  # readable after kill -9, every slide in it complete
        for name, (coords, patches, fractions) in partial.items():
            np.testing.assert_array_equal(coords, expected[name][0])
            assert patches == expected[name][1]
        if 0 < len(partial) < 6:
            seen_partial = True
    assert proc.returncode == 0, stderr
    assert seen_partial, "no kill landed mid-run; make the slides larger"
    final = read_all(out)
    assert final.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(final[name][0], expected[name][0])
        assert final[name][1] == expected[name][1]
        np.testing.assert_array_equal(final[name][2], expected[name][2])


def test_blank_slide_warns_and_stores_zero_patches(tmp_path):
    slide = write_slide(tmp_path / "blank.tif", tissue_image(1024, 1024, blank=True), levels=2)
    out = tmp_path / "p.h5"
    r = run_cli("tile", slide, "--out", out, "--workers", 0)
    assert r.exit_code == 0
    assert "warning:" in r.stderr and "no tissue" in r.stderr
    s = summary(r)
    assert s["slides_empty"] == 1 and s["patches"] == 0
    assert len(PatchStore(out)) == 0


def test_corrupt_and_foreign_slides_fail_alone(real_slides, tmp_path):
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(real_slides["cmu"].read_bytes()[:300_000])
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide")
    good = write_slide(tmp_path / "good.tif", tissue_image(1024, 1024, seed=3), levels=2)
    out = tmp_path / "p.h5"
    r = run_cli("tile", truncated, notes, good, "--out", out, "--workers", 2, "--mpp", 0.25, "--patch-size", 64)
    assert_one_line_error(r, "truncated.svs", "notes.svs")
    s = summary(r)
    assert s["slides_tiled"] == 1 and s["slides_failed"] == 2
    assert PatchStore(out).slide_names == ["good"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--mpp", "-1"], "--mpp"),
        (["--patch-size", "0"], "--patch-size"),
        (["--min-tissue", "1.5"], "--min-tissue"),
        (["--workers", "-2"], "--workers"),
        (["--shard", "3/2"], "--shard"),
        (["--mpp", "0.5", "--magnification", "20"], "--magnification"),
        (["--stride", "10", "--overlap", "2"], "--overlap"),
    ],
)
def test_nonsense_options(tmp_path, args, needle):
    slide = write_slide(tmp_path / "a.tif", tissue_image(512, 512), levels=1)
    r = run_cli("tile", slide, "--out", tmp_path / "p.h5", *args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "p.h5").exists()


def test_bad_paths_and_outputs(tmp_path):
    slide = write_slide(tmp_path / "a.tif", tissue_image(512, 512), levels=1)
    assert_one_line_error(run_cli("tile", tmp_path / "missing.svs", "--out", tmp_path / "p.h5"), "missing.svs")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("tile", tmp_path / "empty", "--out", tmp_path / "p.h5"), "no slides found")
    assert_one_line_error(run_cli("tile", slide, "--out", tmp_path / "nope" / "p.h5"), "does not exist")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    before = foreign.read_bytes()
    assert_one_line_error(run_cli("tile", slide, "--out", foreign), "not a simclr-path patch store")
    assert foreign.read_bytes() == before
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert_one_line_error(run_cli("tile", slide, "--out", garbage), "garbage.h5")


def test_disk_full_keeps_finished_slides(tmp_path, monkeypatch):
    import errno

    from simclr_path.errors import SimclrPathError
    from simclr_path.wsi import tiler as tiling

    slides = [write_slide(tmp_path / f"{n}.tif", tissue_image(1024, 1024, seed=i), levels=2) for i, n in enumerate("ab")]
    out = tmp_path / "p.h5"
    spec = TileSpec(target_mpp=0.25, patch_size=64)
    tile_slides(slides[:1], str(out), spec, workers=0)
    real = tiling.write_patches

    def flaky(dataset, start, encoded, codec):
        if "/b" in dataset.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(dataset, start, encoded, codec)

    monkeypatch.setattr(tiling, "write_patches", flaky)
    with pytest.raises(SimclrPathError, match="disk full"):
        tile_slides(slides, str(out), spec, workers=0)
    assert PatchStore(out).slide_names == ["a"]
    monkeypatch.setattr(tiling, "write_patches", real)  # space freed: the same call resumes
    assert tile_slides(slides, str(out), spec, workers=0).slides_skipped == 1
    assert PatchStore(out).slide_names == ["a", "b"]


def test_stdin_paths_and_shards(tmp_path):
    slides = [write_slide(tmp_path / f"s{i}.tif", tissue_image(512, 512, seed=i), levels=1) for i in range(3)]
    out = tmp_path / "p.h5"
    r = run_cli("tile", "-", "--out", out, "--mpp", 0.25, "--patch-size", 64, "--workers", 0, input="\n".join(slides) + "\n")
    assert r.exit_code == 0, r.stderr
    assert PatchStore(out).slide_names == ["s0", "s1", "s2"]
    names = []
    for k in range(2):
        shard = tmp_path / f"shard{k}.h5"
        assert run_cli("tile", tmp_path, "--out", shard, "--mpp", 0.25, "--patch-size", 64, "--shard", f"{k}/2", "--workers", 0).exit_code == 0
        names.append(PatchStore(shard).slide_names)
    assert names == [["s0", "s2"], ["s1"]]
    both = PatchStore([tmp_path / "shard0.h5", tmp_path / "shard1.h5"])
    assert len(both) == len(PatchStore(out))


def test_upsampling_is_refused(real_slides, tmp_path):
    r = run_cli("tile", real_slides["cmu"], "--out", tmp_path / "p.h5", "--mpp", 0.25, "--workers", 0)
    assert_one_line_error(r, "CMU-1-Small-Region.svs", "upsample")


def test_preview_is_readable_whatever_the_slide_size(real_slides, tmp_path):
    """The small TCGA slide used to give a 139 x 111 px preview; both slides now get a long side of
    about 1,800 px, with the kept patches drawn and a legend band under the image."""
    import cv2

    from simclr_path.wsi.preview import PREVIEW_LONG_SIDE

    r = run_cli("tile", real_slides["cmu"], real_slides["tcga"], "--out", tmp_path / "p.h5", "--preview",
                tmp_path / "prev", "--workers", 0, "--slide-mpp", 0.25)
    assert r.exit_code == 0
    for name in ("CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1"):
        img = cv2.imread(str(tmp_path / "prev" / f"{name}.png"))
        assert img is not None
        h, w = img.shape[:2]
        assert max(h, w) >= 1500 and max(h, w) <= PREVIEW_LONG_SIDE + 120  # + the legend band (two lines: QC)
        blue = (img[..., 0] > 200) & (img[..., 1] < 140) & (img[..., 2] < 60)
        assert blue.sum() > 500  # patch outlines
        legend = img[-20:]
        assert (legend < 100).any() and (legend.mean() > 200)  # dark text on a white band
