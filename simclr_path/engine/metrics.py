"""What a run reports: metrics.jsonl, TensorBoard, the progress bar on stderr and curves.png."""

from __future__ import annotations

import json
import os
import time

from simclr_path.engine.curves import plot_curves
from simclr_path.errors import SimclrPathError
from simclr_path.runtime.console import log, stderr_console


class MetricsLog:
    """metrics.jsonl in the run folder; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        kept = []
        if os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line)
                    except (ValueError, KeyError):
                        pass
        self.records = [json.loads(line) for line in kept]
        with open(path, "w") as fh:
            fh.writelines(kept)

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class TrainingLog:
    """Reporting of the training loop (rank 0 writes files; every rank counts).

    The loop hands over losses at its sync points (see :func:`simclr_path.engine.pretrain.is_sync_step`):
    every step's loss since the previous one, already averaged over ranks. A metrics record is
    written at the first and last step and every ``log_every`` steps.
    """

    def __init__(self, out: str, resume_step: int, last_step: int, log_every: int, write: bool, progress: bool,
                 tensorboard: bool):
        self.out, self.last_step, self.log_every, self.write_files = out, last_step, log_every, write
        self.resume_step = resume_step
        self.metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), resume_step) if write else None
        self.writer = _tensorboard(out) if write and tensorboard else None
        logged = [r["loss"] for r in self.metrics.records if "loss" in r] if self.metrics else []
        self.first_loss = logged[0] if logged else None
        self.previous_last_loss = logged[-1] if logged else None
        self.last_loss = None
        self.images_seen = 0
        # start-up (model build, loader workers, first batch, first step: cudnn autotune, compile) is
        # timed apart from the steady rate: the first logged interval, step 1, holds it
        self.started = time.perf_counter()  # pretrain() sets it where it starts its clock
        self.startup_seconds = 0.0
        self.steady_images, self.steady_seconds = 0, 0.0
        self._first_interval = True
        self.bar = _progress_bar(progress and write)
        self.task = None

    def __enter__(self):
        if self.bar is not None:
            self.task = self.bar.add_task("pretrain", total=self.last_step, completed=self.resume_step, loss="",
                                          lr="", rate="", epoch=0)
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()
        return False

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == 1 or step == self.last_step

    def steps_done(self, step: int, epoch: int, losses: list[float], lr: float, images: int, seconds: float) -> None:
        """``losses`` of the steps up to ``step`` since the last call; ``images`` and ``seconds`` over them."""
        self.images_seen += images
        if images:  # settle_losses hands over pending losses with no images
            if self._first_interval:
                self.startup_seconds = time.perf_counter() - self.started
                self._first_interval = False
            else:
                self.steady_images += images
                self.steady_seconds += seconds
        self.last_loss = losses[-1]
        if self.first_loss is None:
            self.first_loss = losses[0]
        rate = images / max(seconds, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=len(losses), loss=f"{self.last_loss:.4f}", lr=f"{lr:.3g}",
                            rate=f"{rate:,.0f} img/s", epoch=epoch)
        if self.write_files and self.is_log_step(step):
            self.metrics.write({"step": step, "epoch": epoch, "loss": self.last_loss, "lr": lr,
                                "img_per_s": round(rate, 2)})
            if self.writer is not None:
                self.writer.add_scalar("loss", self.last_loss, step)
                self.writer.add_scalar("lr", lr, step)

    def knn(self, step: int, epoch: int, accuracy: float) -> None:
        self.metrics.write({"step": step, "epoch": epoch, "knn_acc": round(accuracy, 4)})
        if self.writer is not None:
            self.writer.add_scalar("knn_acc", accuracy, step)
        (self.bar.console.print if self.bar is not None else log)(f"step {step}: kNN accuracy {accuracy:.3f}")

    def steady_rate(self, seconds: float) -> float:
        """Images per second after start-up (every logged interval but the first); the whole run's
        ``images_seen / seconds`` when there was no second interval."""
        if self.steady_seconds > 0:
            return self.steady_images / self.steady_seconds
        return self.images_seen / seconds if seconds > 0 else 0.0

    def final_loss(self) -> float | None:
        return self.last_loss if self.last_loss is not None else self.previous_last_loss

    def plot(self) -> None:
        if self.write_files:
            plot_curves(self.metrics.records, os.path.join(self.out, "curves.png"))


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SimclrPathError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def _progress_bar(enabled: bool):
    if not enabled or not stderr_console().is_terminal:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
        TimeRemainingColumn(),
        console=stderr_console(),
    )
