"""The patch store: format checks, PatchStore in loader workers, info/coords, ingest."""

import h5py
import numpy as np
import pytest

from simclr_path import PatchStore

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
