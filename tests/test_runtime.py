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


def _agree_main(rank, world, init_file, out):
    from simclr_path.data.loader import RunSampler
    from simclr_path.engine.pretrain import agree_on_chunk
    from simclr_path.engine.state import seed_this_rank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    views_per_rank = 24
    proposals = {0: 10, 1: 7}  # as if each GPU had a different amount of free memory
    chunk = agree_on_chunk(proposals[rank], views_per_rank, torch.device("cpu"))
    torch.manual_seed(0)  # what build_run does before the model ...
    seed_this_rank(0, rank)  # ... and after it
    mask = torch.rand(8)
    order = RunSampler(40, world, rank, seed=3, per_rank_batch=4, epochs=1).order(0)
    torch.save({"chunk": chunk, "mask": mask, "order": order}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_agree_on_one_chunk_and_draw_their_own_masks_over_a_shared_data_order(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_agree_main, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1))
    assert r0["chunk"] == r1["chunk"] == 6  # min(10, 7) = 7, rounded down to a divisor of 24
    assert not torch.equal(r0["mask"], r1["mask"])  # dropout / stochastic depth differ per rank
    assert set(r0["order"]).isdisjoint(r1["order"])  # one shared permutation, split between the ranks
    assert len(r0["order"]) == len(r1["order"]) == 20


def test_chunk_is_rounded_to_a_divisor_and_none_when_the_batch_fits():
    from simclr_path.engine.pretrain import agree_on_chunk

    cpu = torch.device("cpu")
    assert agree_on_chunk(64, 256, cpu) == 64
    assert agree_on_chunk(100, 256, cpu) == 64
    assert agree_on_chunk(30, 90, cpu) == 30
    assert agree_on_chunk(256, 256, cpu) is None and agree_on_chunk(1000, 256, cpu) is None


@pytest.mark.parametrize("visible,local,expected", [(8, 3, 3), (1, 3, 0), (2, 3, None)])
def test_each_task_uses_the_gpu_it_can_see(monkeypatch, visible, local, expected):
    """SLURM with --gpus-per-task=1 (or GPU binding): local rank 3 sees one GPU, cuda:0. Two visible
    GPUs for local rank 3 would put two ranks on one GPU: a one-line error, not a silent share."""
    from simclr_path.errors import SimclrPathError
    from simclr_path.runtime import distributed

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", str(local))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected is None:
        with pytest.raises(SimclrPathError, match="two ranks would share a GPU"):
            distributed.local_cuda_device()
    else:
        assert distributed.local_cuda_device() == torch.device("cuda", expected)


def test_rng_restore_takes_this_ranks_state_and_only_its_own_gpu():
    from simclr_path.engine.state import saved_rng_for

    gpu_states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    old = {"torch": torch.zeros(2, dtype=torch.uint8), "cuda": gpu_states}  # before per-rank states: all 8 GPUs
    assert torch.equal(saved_rng_for(old, 0, 1, 0)[1], gpu_states[0])  # a 1-GPU machine restores cuda:0 only
    assert torch.equal(saved_rng_for(old, 0, 2, 3)[1], gpu_states[3])
    assert saved_rng_for(old, 1, 2, 1) is None  # no state for rank 1: it is seeded from (seed, rank, step)
    per_rank = [{"torch": torch.full((2,), r, dtype=torch.uint8), "cuda": None} for r in range(4)]
    new = {"torch": per_rank[0]["torch"], "cuda": [], "per_rank": per_rank}
    assert torch.equal(saved_rng_for(new, 2, 4, None)[0], per_rank[2]["torch"])
    assert saved_rng_for(new, 2, 3, None) is None  # resumed with fewer processes
    assert torch.equal(saved_rng_for(new, 0, 3, None)[0], per_rank[0]["torch"])


def test_bf16_autocast_runs_the_plain_step_and_the_gradient_cache_on_cpu():
    """The bf16 path CUDA runs, exercised on the CPU: the cache equals the plain step within bf16."""
    from simclr_path.engine.gradients import cached_loss_and_backward

    views = torch.cat(global_views())
    plain, cached = make_model().eval(), make_model().eval()
    loss_a = loss_and_backward(plain, views, NTXentLoss(0.1), use_amp=True)
    loss_b = cached_loss_and_backward(cached, views, NTXentLoss(0.1), use_amp=True, chunk=6)
    assert loss_a.dtype == torch.float32  # the loss itself is computed in fp32
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=2e-2)
    a, b = grads_of(plain), grads_of(cached)
    assert relative_error(flat(b, a), flat(a, a)) < 5e-2


def test_a_small_dev_shm_lowers_prefetch_or_stops_with_the_size_needed(monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from simclr_path.data.loader import choose_prefetch
    from simclr_path.errors import SimclrPathError

    usage = namedtuple("usage", "total used free")
    batch_bytes = 2 * 512 * 224 * 224 * 3  # one batch of 512 patches at 224 px
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 100 * batch_bytes))
    assert choose_prefetch(512, 224, workers=8) == 4  # 8 x 5 batches in flight fit in 100
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 30 * batch_bytes))
    assert choose_prefetch(512, 224, workers=8) == 2  # 8 x 3 = 24 <= 0.8 x 30
    assert "prefetch 2 batch(es)" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 64 * 2**20))  # Docker's default 64 MB
    with pytest.raises(SimclrPathError, match=r"/dev/shm: the data loader needs about .* GiB .*--shm-size"):
        choose_prefetch(512, 224, workers=8)
    assert choose_prefetch(512, 224, workers=0) is None
    # eight srun tasks on the node share its /dev/shm: SLURM's tasks per node count, not just this process
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 100 * batch_bytes))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")
    with pytest.raises(SimclrPathError, match=r"\(8 process\(es\) x 8 workers"):
        choose_prefetch(512, 224, workers=8)


def test_srun_environment_maps_to_ranks_and_the_tasks_gpu(monkeypatch):
    """A simulated `srun` task: rank, world and local rank come from SLURM's variables, and a task
    bound to one GPU (--gpus-per-task=1) uses cuda:0 whatever its local rank."""
    from simclr_path.runtime import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so what _slurm_env sets below is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")
    monkeypatch.setenv("MASTER_ADDR", "node-0")
    assert distributed.launched_externally()
    distributed._slurm_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
    assert distributed.processes_on_node() == 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.local_cuda_device() == torch.device("cuda", 0)


def test_checkpoint_rng_round_trip_restores_this_ranks_stream(tmp_path):
    from simclr_path.engine.state import TrainState, checkpoint_contents, restore_checkpoint, rng_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from simclr_path.optim import build_scheduler

    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=0)
    torch.manual_seed(5)
    contents = checkpoint_contents(model, optimizer, scheduler, TrainState(step=3), {"run": {}}, "linear",
                                   [rng_state(torch.device("cpu"))], {})
    torch.save(contents, tmp_path / "c.pt")
    expected = torch.rand(4)  # what the uninterrupted run draws next
    torch.manual_seed(99)
    restore_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True), model, optimizer, scheduler)
    assert torch.equal(torch.rand(4), expected)
