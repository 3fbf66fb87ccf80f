"""The patch store: format checks, PatchStore in loader workers, info/coords, ingest."""

import h5py
import numpy as np
import pytest

from simclr_path import PatchStore
from simclr_path.store import store_summary

from cli_helpers import assert_one_line_error, one_json, run_cli, summary
from synthetic import tissue_image, write_slide


def test_store_spec_mismatch_is_refused(tmp_path):
    slide = write_slide(tmp_path / "a.tif", tissue_image(1024, 1024), levels=2)
    out = tmp_path / "p.h5"
    assert run_cli("tile", slide, "--out", out, "--workers", 0).exit_code == 0
    assert_one_line_error(run_cli("tile", slide, "--out", out, "--patch-size", 128), "patch_size")


def test_truncated_store_is_refused_by_readers(real_store, tmp_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(real_store.read_bytes()[:4096])
    assert_one_line_error(run_cli("info", cut), "cut.h5")
    with pytest.raises(Exception) as info:
        PatchStore(cut)
    assert "cut.h5" in str(info.value)


def test_patchstore_is_picklable_and_works_in_dataloader_workers(real_store):
    import pickle

    import torch

    store = PatchStore(real_store)
    first = store[0]
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone[0], first)

    class Wrap(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.from_numpy(store[i])

    loader = torch.utils.data.DataLoader(Wrap(), batch_size=4, num_workers=2)
    batches = torch.cat(list(loader))
    np.testing.assert_array_equal(batches[0].numpy(), first)


def test_patchstore_resolves_a_slide_dataset_once_per_process(real_store, monkeypatch):
    """Loader workers read thousands of patches per slide: the HDF5 path is resolved on the first
    read of a slide and the handle kept; a forked worker (another pid) resolves its own."""
    store = PatchStore(real_store)
    lookups = []
    real = store._group
    monkeypatch.setattr(store, "_group", lambda slide: lookups.append(slide) or real(slide))
    first = [store[i] for i in range(5)]
    assert lookups == [0]
    monkeypatch.setattr(store, "_pid", -1)  # as seen from a forked worker
    np.testing.assert_array_equal(store[0], first[0])
    assert lookups == [0, 0]


def test_info_and_coords_commands(real_store, tmp_path):
    r = run_cli("info", real_store)
    assert r.exit_code == 0
    info = summary(r)
    store = info["stores"][0]
    assert info["total_patches"] == len(PatchStore(real_store))
    assert store["patch_size"] == 128 and store["target_mpp"] == 0.5
    by_name = {s["name"]: s for s in store["slides"]}
    assert by_name["TCGA-CR-7395-01A-01-TS1"]["mpp_source"] == "cli"
    assert by_name["CMU-1-Small-Region"]["mpp"] == pytest.approx(0.499)
    r = run_cli("coords", real_store, "--out", tmp_path / "coords")
    assert r.exit_code == 0
    with h5py.File(tmp_path / "coords" / "CMU-1-Small-Region.h5") as f:
        assert set(f.keys()) == {"coords"}
        assert {"patch_size", "patch_level", "downsample", "level_dim", "patch_size_level0"} <= set(f["coords"].attrs)


def test_ingest_keeps_labels_and_jpeg_bytes(pcam, pcam_store, tmp_path):
    store = PatchStore(pcam_store)
    assert len(store) == 3000 and store.patch_size == 96
    assert [store.label(i) for i in (0, 1499, 1500, 2999)] == [0, 0, 1, 1]
    with h5py.File(pcam_store) as f:
        assert list(f.attrs["class_names"]) == ["0", "1"]
        first = f["slides/0/source_files"][0].decode()
        assert bytes(f["slides/0/patches"][0]) == (pcam / "valid" / first).read_bytes()
    resized = one_json(run_cli("ingest", pcam / "test", "--out", tmp_path / "t.h5", "--size", 64, "--no-labels"))
    assert resized["patch_size"] == 64 and resized["classes"] == []
    assert PatchStore(tmp_path / "t.h5")[0].shape == (64, 64, 3)
    r = run_cli("ingest", tmp_path / "nothing", "--out", tmp_path / "x.h5")
    assert r.exit_code == 1 and "nothing" in r.stderr



def test_ingest_stopped_by_a_bad_image_leaves_no_store_and_reruns_once_fixed(pcam, tmp_path):
    import shutil

    for group in ("a", "b"):
        (tmp_path / "images" / group).mkdir(parents=True)
        for path in sorted((pcam / "valid" / "0").iterdir())[:4]:
            shutil.copy(path, tmp_path / "images" / group / path.name)
    bad = tmp_path / "images" / "b" / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "s.h5"
    r = run_cli("ingest", tmp_path / "images", "--out", out)
    assert r.exit_code == 1 and "bad.png: not a readable image" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.glob("s.h5*")) == []  # group a was written, then taken back
    bad.unlink()
    assert one_json(run_cli("ingest", tmp_path / "images", "--out", out))["patches"] == 8

HOLD_WRITER = """
import sys
import numpy as np
from simclr_path.store import StoreWriter
from simclr_path.store.codecs import create_pixel_dataset, encode_jpeg, write_patches
from simclr_path.wsi.grid import TileSpec

writer = StoreWriter(sys.argv[1], TileSpec(target_mpp=0.25, patch_size=64).as_attrs())
rng = np.random.default_rng(0)
for name, n, written in (("whole", 3, 3), ("half", 5, 2)):
    group = writer.begin(name)
    group.attrs.update({"fingerprint": name, "num_patches": n, "source_path": name})
    group.create_dataset("coords", data=np.zeros((n, 2), np.int64)).attrs["name"] = name
    pixels = create_pixel_dataset(group, "jpeg", n, 64)
    for i in range(written):
        write_patches(pixels, i, [encode_jpeg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), 90)], "jpeg")
    if written == n:
        writer.commit(name)
writer.file.flush()
print("holding", flush=True)
sys.stdin.read()
writer.close()
"""


def test_store_being_written_reads_complete_slides_and_refuses_a_second_writer(tmp_path):
    """A writer process holds the store open: one slide committed, one half written (staged)."""
    import subprocess
    import sys

    out = tmp_path / "p.h5"
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "holding", writer.stderr.read()
        store = PatchStore(out)  # used to fail: "unable to lock file"
        assert store.slide_names == ["whole"] and len(store) == 3
        assert store[2].shape == (64, 64, 3)
        store.close()
        info = summary(run_cli("info", out))
        assert [(s["name"], s["patches"]) for s in info["stores"][0]["slides"]] == [("whole", 3)]
        slide = write_slide(tmp_path / "a.tif", tissue_image(512, 512), levels=1)
        r = run_cli("tile", slide, "--out", out, "--mpp", 0.25, "--patch-size", 64, "--workers", 0)
        assert_one_line_error(r, "p.h5", "another process has this store open")
        assert writer.poll() is None
    finally:
        writer.communicate("", timeout=30)
    assert writer.returncode == 0
    assert PatchStore(out).slide_names == ["whole"]


def test_torn_slide_is_never_shown(tmp_path, monkeypatch):
    """What a reader that caught a writer mid-flush would see: a slide whose parts disagree. It is
    read again, and if it stays so, the store is reported damaged in one line."""
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import format as store_format
    from simclr_path.store import reader as store_reader

    slide = write_slide(tmp_path / "a.tif", tissue_image(512, 512), levels=1)
    out = tmp_path / "p.h5"
    assert run_cli("tile", slide, "--out", out, "--mpp", 0.25, "--patch-size", 64, "--workers", 0).exit_code == 0
    with h5py.File(out, "r+") as f:
        f["slides/a"].attrs["num_patches"] += 1
    assert_one_line_error(run_cli("info", out), "p.h5", "damaged")
    with pytest.raises(SimclrPathError, match="p.h5: cannot be read .*slide a"):
        PatchStore(out)
    calls = []
    real = store_format.check_slide
    monkeypatch.setattr(store_reader, "check_slide", lambda f, name: calls.append(name) or real(f, name))
    with pytest.raises(SimclrPathError, match="p.h5: cannot be read .*slide a"):
        store_summary([str(out)])
    assert len(calls) == 3  # read again, then given up soon: the file is not changing


@pytest.mark.slow
def test_info_and_patchstore_while_tile_writes(tmp_path, monkeypatch):
    """`info` and PatchStore, over and over while `tile` runs in another process: every read works,
    and every slide shown is whole - the same patches the finished store holds."""
    import hashlib
    import subprocess
    import sys
    import time

    from simclr_path.store import format as store_format

    monkeypatch.setattr(store_format, "LOCK_WAIT_S", 0.1, raising=False)  # refuse a second writer at once
    folder = tmp_path / "slides"
    folder.mkdir()
    slides = 8
    for i in range(slides):
        write_slide(folder / f"s{i}.tif", tissue_image(2048, 2048, seed=i), levels=2)
    out = tmp_path / "p.h5"
    options = ["--mpp", "0.25", "--patch-size", "32", "--min-tissue", "0.2", "--workers", "0"]
    cmd = [sys.executable, "-m", "simclr_path", "tile", str(folder), "--out", str(out), *options, "-q"]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def digest(store, name):
        start, end = next((a, b) for n, a, b in store.slide_ranges() if n == name)
        h = hashlib.sha256()
        for i in range(start, end):
            h.update(store[i].tobytes())
        return end - start, h.hexdigest()

    seen: dict[str, set] = {}  # slide -> what reads showed: patch counts, and (count, pixel digest)
    counts, refused = [], False
    deadline = time.time() + 120
    try:
        while writer.poll() is None and time.time() < deadline:
            if not out.exists():
                time.sleep(0.02)
                continue
            info = summary(run_cli("info", out))
            shown = {s["name"]: s["patches"] for s in info["stores"][0]["slides"]}
            store = PatchStore(out)
            assert set(shown) <= set(store.slide_names)  # read a moment later: a slide stays
            for name, start, end in store.slide_ranges():
                assert end - start == int(store.slide_group(name).attrs["num_patches"])
                if name in seen:  # all its pixels were read once already: the count and one patch
                    seen[name].add(end - start)
                    assert store[end - 1].shape == (32, 32, 3)
                else:
                    seen[name] = {digest(store, name)}
            store.close()
            for name, n in shown.items():
                seen[name].add(n)
            counts.append(len(shown))
            if not refused and 0 < len(shown) < slides:
                r = run_cli("tile", folder, "--out", out, *options)
                if r.exit_code != 0:  # exit 0: the writer had just closed the store, try later
                    assert_one_line_error(r, "another process has this store open")
                    refused = True
    finally:
        if writer.poll() is None:
            writer.kill()
        stdout, stderr = writer.communicate()
    assert writer.returncode == 0, stderr
    assert refused, counts
    assert len([k for k in counts if 0 < k < slides]) >= 2, f"too few reads mid-run ({counts}); add slides"
    final = PatchStore(out)
    assert len(final.slide_names) == slides
    for name, views in seen.items():  # every read of a slide saw it as it is in the end
        n, pixels = digest(final, name)
        assert views <= {n, (n, pixels)}, name
