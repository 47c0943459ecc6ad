"""What a run tells its user: the plan and time estimate before training, and after each epoch
the log line, the metrics CSV, the curves and the checkpoint (:class:`EpochReporter`)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from utils.checkpoint import Checkpoint
from utils.cli import ACTIVE_RUNS
from utils.plots import plot_curves
from utils.record import torch_save, write_text
from utils.train import EpochHook, rng_state, set_rng_state


def announce_plan(logger: logging.Logger, device: torch.device, model: torch.nn.Module, loader, *, epochs: int,
                  images_per_epoch: int, amp: bool, evaluations: int = 0, eval_images: int = 0,
                  cpu_hint: str | None = None) -> None:
    """Measure training and evaluation speed on a few batches (on a copy of the model, so the run is
    unchanged), then log the device, images/s and the expected time; on a CPU, suggest ``cpu_hint``
    for a long run without changing what was asked. Smoke runs (under 10,000 training images in all)
    only log the device: they are over before an estimate would help."""
    if epochs * images_per_epoch < 10_000:
        logger.info("device %s", device)
        return
    import copy
    trial = copy.deepcopy(model).train()
    x, y = next(iter(loader))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")

    def timed(step) -> float:
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 2 * y.shape[0] / max(time.perf_counter() - start, 1e-9)

    def train_step():
        with torch.autocast(**autocast):
            loss = torch.nn.functional.cross_entropy(trial(x).float(), y)
        loss.backward()

    @torch.no_grad()
    def eval_step():
        with torch.autocast(**autocast):
            trial(x)

    train_rate = timed(train_step)
    trial.eval()
    eval_rate = timed(eval_step)
    seconds = epochs * images_per_epoch / train_rate + evaluations * eval_images / eval_rate
    logger.info("device %s: about %.0f training and %.0f evaluation images/s, so %d epoch(s) of %d images "
                "with %d evaluation(s) take about %s", device, train_rate, eval_rate, epochs, images_per_epoch,
                evaluations, _duration(seconds / 3600))
    if device.type == "cpu" and seconds > 3600 and cpu_hint:
        logger.info("this is a long run for a CPU; %s", cpu_hint)


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


def write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd
    write_text(path, pd.DataFrame(rows).to_csv(index=False))


class EpochReporter(EpochHook):
    """The ``on_epoch_end`` hook of a run: evaluates (for reporting only), logs a line, rewrites the
    per-epoch CSV and plots, and checkpoints (through :class:`utils.train.EpochHook`, which ``fit``
    drives). Returns nothing, so a defense handed this hook learns nothing from it.

    A run may train in several stages (NAD's teacher, then its student): each row names its stage,
    the epoch column counts on across stages, and each stage evaluates the model it trains and
    always its own last epoch."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], dict], model: torch.nn.Module, out_dir: Path,
                 prefix: str, logger: logging.Logger, *, epochs: int, eval_every: int = 1,
                 rows: list[dict] | None = None, checkpoint: Checkpoint | None = None):
        self._evaluate, self._out_dir, self._prefix = evaluate, out_dir, prefix
        self._logger, self._eval_every = logger, max(1, eval_every)
        self._checkpoint = checkpoint
        self._stage, self._stage_epochs, self._trained, self._offset = None, epochs, model, 0
        resumed = checkpoint.rows if checkpoint is not None and checkpoint.rows else None
        self.rows: list[dict] = list(resumed or rows or [])
        self.eval_seconds = 0.0
        self.eval_images = 0
        self._started = time.perf_counter()
        self._elapsed_before = checkpoint.state.get("elapsed", 0.0) if checkpoint is not None else 0.0
        if checkpoint is not None and ACTIVE_RUNS:
            ACTIVE_RUNS[-1].epochs_done = checkpoint.epochs_done()  # a resumed run starts with these

    def elapsed(self) -> float:
        """Wall seconds of this run so far, including the parts before any resume."""
        return self._elapsed_before + time.perf_counter() - self._started

    def start(self, stage: str, epochs: int, model: torch.nn.Module) -> None:
        self._stage, self._stage_epochs, self._trained = stage, epochs, model
        self._offset = max((r["epoch"] for r in self.rows if r.get("stage") not in (None, stage)), default=0)

    def __call__(self, epoch: int, stats: dict) -> None:
        row = {"epoch": self._offset + epoch + 1, **({"stage": self._stage} if self._stage else {}), **stats}
        if (epoch + 1) % self._eval_every == 0 or epoch + 1 == self._stage_epochs:
            start = time.perf_counter()
            row.update(self._evaluate(self._trained))
            seconds = time.perf_counter() - start
            self.eval_seconds += seconds
            self.eval_images += getattr(self._evaluate, "num_images", 0)
            row["eval_seconds"] = seconds
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("epoch",) and isinstance(v, float)}
        self._logger.info("%sepoch %d/%d  %s", f"{self._stage}: " if self._stage else "", epoch + 1,
                          self._stage_epochs,
                          "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        write_csv(self.rows, self._out_dir / "metrics.csv")
        if "clean_acc" in row:  # plotting costs about a second: on evaluated epochs only (always the last)
            plot_curves(self.rows, self._out_dir, self._prefix)

    def restore(self, stage: str, objects: dict) -> int:
        saved = self._checkpoint.state["stages"].get(stage) if self._checkpoint is not None else None
        if saved is None:
            return 0
        for name, obj in objects.items():
            obj.load_state_dict(saved["objects"][name])
        set_rng_state(saved["rng"], _device_of(objects))
        self._logger.info("resuming %s after epoch %d", stage, saved["epoch"] + 1)
        return saved["epoch"] + 1

    def save(self, stage: str, epoch: int, objects: dict) -> None:
        if self._checkpoint is None:
            return
        state = self._checkpoint.state
        state["rows"] = self.rows
        state["elapsed"] = self.elapsed()
        state["stages"][stage] = {"epoch": epoch, "rng": rng_state(_device_of(objects)),
                                  "objects": {name: obj.state_dict() for name, obj in objects.items()}}
        torch_save(self._checkpoint.path, state)
        if ACTIVE_RUNS:
            ACTIVE_RUNS[-1].epochs_done = self._checkpoint.epochs_done()


def _device_of(objects: dict) -> torch.device:
    return next(objects["model"].parameters()).device
