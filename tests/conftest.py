import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from cli_helpers import one_json, run_cli  # noqa: E402

SHARED_DATA = TESTS.parents[1] / "shared" / "data"
SLIDES = SHARED_DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
NDPI = SLIDES / "Hamamatsu-test3-DAPI-2-387.ndpi"
PCAM = SHARED_DATA / "patches" / "pcam_ai4all"


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def fp32_training(monkeypatch):
    """In-process training runs in fp32 whatever the CPU: bf16 autocast is native on some machines
    (AVX512-BF16, AMX) and not on others, and test thresholds must not depend on which one CI gets.
    The tests of the bf16 path patch it back."""
    import simclr_path.engine.pretrain as pretrain_module
    import simclr_path.segment.train as segment_module

    monkeypatch.setattr(pretrain_module, "native_bf16", lambda device: False)
    monkeypatch.setattr(segment_module, "native_bf16", lambda device: False)


@pytest.fixture(scope="session")
def real_slides():
    if not CMU.exists():
        pytest.skip("../shared/data/slides is not present")
    return {"cmu": CMU, "tcga": TCGA, "ndpi": NDPI}


@pytest.fixture(scope="session")
def real_store(real_slides, tmp_path_factory):
    """A store tiled from the two H&E slides (TCGA needs its mpp given), 128 px at 0.5 um/px."""
    from simclr_path.wsi.grid import TileSpec
    from simclr_path.wsi.tiler import tile_slides

    out = tmp_path_factory.mktemp("store") / "real.h5"
    result = tile_slides([str(CMU), str(TCGA)], str(out), TileSpec(target_mpp=0.5, patch_size=128, min_tissue=0.3),
                         workers=0, fallback_mpp=0.25)
    assert result.ok and result.patches > 100
    return out


@pytest.fixture(scope="session")
def pcam():
    if not PCAM.exists():
        pytest.skip("../shared/data/patches/pcam_ai4all is not present")
    return PCAM



@pytest.fixture(scope="session")
def pcam_store(pcam, tmp_path_factory):
    out = tmp_path_factory.mktemp("pcam") / "valid.h5"
    summary = one_json(run_cli("ingest", pcam / "valid", "--out", out, "--mpp", 0.97))
    assert summary["patches"] == 3000 and summary["classes"] == ["0", "1"]
    return out



@pytest.fixture(scope="session")
def pcam_run(pcam, pcam_store, tmp_path_factory):
    """A brief pretraining on PCam valid, with the kNN check on PCam test during training."""
    run = tmp_path_factory.mktemp("pcamrun") / "run"
    summary = one_json(run_cli("pretrain", pcam_store, "--out", run, "--config", "small", "--backbone", "resnet10t",
                               "--batch", 64, "--image-size", 64, "--max-steps", 20, "--workers", 2, "--device", "cpu",
                               "-q", "--eval-labeled", pcam / "test", "--eval-every", 10))
    assert summary["step"] == 20
    encoder = run.parent / "encoder.pt"
    one_json(run_cli("export", run, encoder))
    return run, encoder
