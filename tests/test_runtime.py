"""Distributed pretraining on CPU (gloo): two ranks against one process, elastic launch, torchrun,
failing ranks."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simclr_path.engine.checkpoint import load_checkpoint
from simclr_path.engine.gradients import loss_and_backward
from simclr_path.losses import NTXentLoss

from cli_helpers import run_cli
from contrastive_helpers import B, flat, global_views, grads_of, make_model, relative_error


def _rank_main(rank, world, init_file, out, dtype):
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_model().eval().to(dtype)  # batch norm from running stats: isolates loss + gather
    ddp = DistributedDataParallel(model)
    view0, view1 = (v.to(dtype) for v in global_views())
    mine = slice(rank * B, (rank + 1) * B)  # different data on each rank
    views = torch.cat([view0[mine], view1[mine]])
    loss = loss_and_backward(ddp, views, NTXentLoss(0.1, gather_distributed=True), use_amp=False)
    total = loss.clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total.item() / world, "grads": grads_of(model)}, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("dtype,global_tol,tensor_tol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 1e-11)])
def test_two_ranks_give_the_single_process_loss_and_gradient(tmp_path, dtype, global_tol, tensor_tol):
    # float64 shows the distributed loss is the same function exactly; float32 within rounding
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(out), dtype), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, so only the distribution differs
    try:
        model = make_model().eval().to(dtype)
        view0, view1 = global_views()
        loss = loss_and_backward(model, torch.cat([view0, view1]).to(dtype), NTXentLoss(0.1), use_amp=False)
    finally:
        torch.set_num_threads(threads)
    expected = grads_of(model)
    assert got["loss"] == pytest.approx(loss.item(), rel=global_tol)
    assert got["grads"].keys() == expected.keys() and len(expected) > 50
    overall = relative_error(flat(got["grads"], expected), flat(expected, expected))
    worst = max(relative_error(got["grads"][k], expected[k]) for k in expected)
    print(f"{dtype}: relative gradient error {overall:.2e} overall, {worst:.2e} worst tensor")
    assert overall < global_tol, overall
    assert worst < tensor_tol, worst


def run_process(*args):
    """The CLI in a subprocess: the ranks it starts write to the real stdout/stderr."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "simclr_path", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))


TINY = ["--config", "small", "--backbone", "resnet10t", "--batch", 16, "--image-size", 48, "--device", "cpu",
        "--nproc", 2, "--workers", 0, "-q"]


@pytest.mark.slow
def test_cli_two_cpu_processes_train_checkpoint_and_resume(real_store, tmp_path):
    run = tmp_path / "run"
    r = run_process("pretrain", real_store, "--out", run, *TINY, "--max-steps", 2, "--checkpoint-every", 100)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip())
    assert summary["world_size"] == 2 and summary["step"] == 2 and summary["negatives_per_anchor"] == 30
    assert "SyncBatchNorm needs CUDA" in r.stderr
    assert os.listdir(run).count("checkpoint.pt") == 1
    r = run_process("pretrain", real_store, "--out", run, *TINY, "--max-steps", 4, "--checkpoint-every", 100)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 2" in r.stderr
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 4
    with open(run / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 4  # one log, no repeats


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_one_line(real_store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_process("pretrain", real_store, "--out", blocker / "run", *TINY, "--max-steps", 1)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "cannot be written" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_batch_must_divide_over_processes(real_store, tmp_path):
    r = run_cli("pretrain", real_store, "--out", tmp_path / "r", *TINY[:-5], "--batch", 15, "--nproc", 2, "-q")
    assert r.exit_code == 1 and "does not divide over 2 processes" in r.stderr


@pytest.mark.slow
def test_torchrun_launch_is_detected_from_the_environment(real_store, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "simclr_path",
            "pretrain", real_store, "--out", run, *TINY[:-5], "--workers", 0, "-q", "--max-steps", 2]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints the summary
    assert json.loads(lines[0])["world_size"] == 2
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 2
