"""What every script shares around its algorithm: the CLI guard, logging, output folders,
per-epoch reporting (CSV, plots, log line) and model placement."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from utils.errors import UserError
from utils.plots import plot_curves
from utils.record import safe_torch_load, torch_save, write_text
from utils.train import EpochHook, rng_state, set_rng_state

LOGGER_NAME = "backdoor"
CHECKPOINT = "checkpoint.pt"


@dataclass
class ActiveRun:
    """What the running script is writing, so that an interruption can say what it leaves behind."""
    what: str                 # "the attack badnet", "the defense d3 on record/x"
    work_dir: Path            # where this run writes
    out_dir: Path             # where the finished result goes
    epochs_done: int = 0


_ACTIVE: list[ActiveRun] = []


# SIGTERM (kill, a cluster's time limit, the launcher stopping its jobs) and SIGHUP (a closed terminal)
# stop a run as Ctrl-C does: the same message, the checkpoint kept, a working folder without one removed.
# A signal the run was started ignoring (SIGHUP under nohup) stays ignored.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_RECEIVED: list[int] = []


def _stop(signum, frame):
    _RECEIVED.append(signum)
    raise KeyboardInterrupt


def cli_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; bad input becomes one line on stderr and exit code 2; an interruption
    (Ctrl-C, SIGTERM, SIGHUP) says what it interrupted and how to continue it, exit code 128 + signal."""
    _ACTIVE.clear()
    _RECEIVED.clear()
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is signal.SIG_DFL}
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupt_message(), file=sys.stderr)
        sys.exit(128 + (_RECEIVED[0] if _RECEIVED else signal.SIGINT))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupt_message() -> str:
    if not _ACTIVE:
        return "interrupted before anything was written"
    run = _ACTIVE[-1]
    if (run.work_dir / CHECKPOINT).is_file():
        kept = f"{run.out_dir} still holds the previous finished result; " if run.work_dir != run.out_dir else ""
        return (f"interrupted: {run.what} stopped after {run.epochs_done} finished epoch(s); {kept}the same command "
                f"with --resume continues it from there")
    return f"interrupted: {run.what} stopped before its first epoch finished; nothing of it was kept"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that does not break tqdm's progress bars."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


class _Pending(logging.Handler):
    """Holds the lines logged before the run's folder exists, for :func:`log_to_file`."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def run_logger() -> logging.Logger:
    """The run's logger, for code outside the runner (a trigger being made, a cache written): its lines
    reach the console at once and the record's log once :func:`log_to_file` names it."""
    return logging.getLogger(LOGGER_NAME)


def setup_logging() -> logging.Logger:
    """The run's logger: the console at once, and the log file once :func:`log_to_file` names it
    (lines logged before, e.g. while a trigger is made, are written there too)."""
    logger = run_logger()
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    console = _TqdmHandler()
    console.setFormatter(_FORMAT)
    logger.addHandler(console)
    logger.addHandler(_Pending())
    logger.propagate = False
    return logger


def log_to_file(log_file: Path) -> logging.Logger:
    """Add the run's log file (appended to on resume), first writing the lines logged so far."""
    logger = run_logger()
    fh = logging.FileHandler(log_file)
    fh.setFormatter(_FORMAT)
    for h in list(logger.handlers):
        if isinstance(h, _Pending):
            for record in h.records:
                fh.handle(record)
            logger.removeHandler(h)
    logger.addHandler(fh)
    return logger


def log_config(logger: logging.Logger, config: dict) -> None:
    logger.info("resolved config:\n%s", yaml.safe_dump(config, sort_keys=True).rstrip())


def check_writable(folder: Path, flag: str) -> None:
    """Fail in one line, before any slow work, when results could not be written under ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write results under {folder} ({e.strerror or e}); choose a writable folder "
                        f"with {flag}") from None


def staging_dir(out_dir: Path) -> Path:
    """Where a rerun over a finished result writes until it has finished itself."""
    return out_dir.parent / f".{out_dir.name}.rerun"


def is_finished(folder: Path) -> bool:
    return (folder / "record.json").is_file()


def describe_unfinished(folder: Path) -> str:
    """Why ``folder`` is not a finished result, in words."""
    if not folder.is_dir():
        return "it does not exist"
    if (folder / CHECKPOINT).is_file():
        return "its run was interrupted (the same command with --resume continues it)"
    present = sorted(p.name for p in folder.iterdir()
                     if not p.name.startswith(".") and p.suffix not in (".png", ".log"))
    if not present:
        return "it holds no result files"
    return f"record.json, written last by a finished run, is missing (present: {', '.join(present)})"


@contextmanager
def claim_output(out_dir: Path):
    """Hold ``out_dir`` for this run, so that a second run on it (the same sweep started twice, a job
    left running by a killed launcher) is refused in one line instead of writing the same folder.
    The claim is a lock on ``.<name>.lock`` beside it, which the OS releases when the process ends,
    so a killed run leaves no stale claim; the file is removed when the claim ends. No-op where
    ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"another run is writing {out_dir} now; wait for it to end or stop it, then run "
                            f"this again") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # still the file at the path, not one a finishing run has just removed
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def plan_output(out_dir: Path, *, overwrite: bool, resume: bool) -> Path:
    """The folder this run writes into, so that ``out_dir`` always holds either the previous finished
    result or the new one, never a half-written one:
      * a finished ``out_dir`` is replaced only by :func:`commit_output` after the rerun, which writes
        beside it (:func:`staging_dir`), has finished;
      * ``--resume`` continues the interrupted run (a rerun's or a first run's) from its checkpoint.
    Only checks: returns the working folder (it holds ``checkpoint.pt`` exactly when the run is to be
    resumed); :func:`open_output` creates it once the slow, fallible set-up is done."""
    staging = staging_dir(out_dir)
    finished = is_finished(out_dir)
    if resume:
        for candidate in (staging, out_dir):
            if (candidate / CHECKPOINT).is_file() and not (candidate == out_dir and finished):
                return candidate
        if finished and not overwrite:
            raise UserError(f"{out_dir} holds a finished run and there is no interrupted run to resume; "
                            f"pass --overwrite to replace it")
        print(f"note: no interrupted run to resume at {out_dir}; starting from epoch 0", file=sys.stderr)
    elif finished and not overwrite:
        waiting = (f" (an interrupted rerun waits in {staging}: --resume continues it)"
                   if (staging / CHECKPOINT).is_file() else "")
        raise UserError(f"{out_dir} already holds a finished run{waiting}; pass --overwrite to replace it "
                        f"or choose another name")
    elif out_dir.exists() and not finished and not overwrite:
        raise UserError(f"{out_dir} holds no finished run: {describe_unfinished(out_dir)}; pass --resume to "
                        f"continue it or --overwrite to start again")
    return staging if finished else out_dir


def open_output(work: Path, out_dir: Path) -> None:
    """Create the working folder chosen by :func:`plan_output` (emptied, unless it is resumed)."""
    if (work / CHECKPOINT).is_file():
        return
    shutil.rmtree(work, ignore_errors=True)
    if work == out_dir:
        shutil.rmtree(staging_dir(out_dir), ignore_errors=True)
    work.mkdir(parents=True)


def commit_output(work: Path, out_dir: Path) -> None:
    """Put a finished run in place: ``work`` becomes ``out_dir`` in one rename when nothing is there,
    else the two are exchanged atomically where the OS allows (Linux), and the previous result removed."""
    if work == out_dir:
        return
    if not out_dir.exists():
        os.replace(work, out_dir)
        return
    if not _exchange(work, out_dir):
        old = out_dir.parent / f".{out_dir.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(work, out_dir)
        work = old
    shutil.rmtree(work, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two paths atomically; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def discard_unresumable(work: Path) -> None:
    """After a failed or interrupted run: a working folder without a checkpoint holds nothing worth
    keeping (and must not pass for a result), so it goes."""
    if work.is_dir() and not (work / CHECKPOINT).is_file():
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def writing_output(what: str, work: Path, out_dir: Path):
    """The body of a run that writes ``work``: on success it becomes ``out_dir``; on failure or
    interruption a working folder without a checkpoint is removed."""
    open_output(work, out_dir)
    _ACTIVE.append(ActiveRun(what, work, out_dir))
    try:
        yield
    except BaseException:
        discard_unresumable(work)
        raise
    commit_output(work, out_dir)


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


# A oneDNN bug guard. The oneDNN of PyTorch 2.14.1's CPU build (v3.12) corrupts the heap ("double free or
# corruption", SIGSEGV, SIGABRT) in the weight gradient of a 1x1 convolution with stride > 1 in channels_last
# when the input has fewer channels per group than one SIMD vector holds (its jit_1x1 backward-weights kernel, the
# strided "reduce to unit stride" path). On an AVX-512 CPU: 15 input channels or fewer, whatever the output
# channels; 16, 32, 64 never did. It hangs instead under ONEDNN_MAX_CPU_ISA=AVX2 (7 channels or fewer). It
# depends on the batch and image size (odd batches at 32x32, nearly all at 64x64), so it may also corrupt
# memory silently. The reproducer (exit 139 on AVX-512):
#     m = nn.Conv2d(8, 16, 1, 2, bias=False).to(memory_format=torch.channels_last)
#     x = torch.randn(32, 8, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
#     for _ in range(5): m(x).pow(2).mean().backward()
# preactresnet18_w8 has such a layer (layer2.0.shortcut). The guard detects nothing at run time, so it holds on
# every CPU: such a layer computes in NCHW on CPU, where oneDNN is correct (NCHW, or channels_last with oneDNN
# off, never failed); every other layer keeps channels_last. 16 channels covers AVX-512, the widest fp32 vector.
ONEDNN_NARROW_CHANNELS = 16


def onednn_unsafe(module: torch.nn.Module) -> bool:
    """A convolution that the oneDNN bug above can hit in channels_last on CPU."""
    return (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.in_channels // module.groups < ONEDNN_NARROW_CHANNELS)


def _is_nchw(t: torch.Tensor) -> bool:
    # By strides, not is_contiguous(): a 1x1 weight, or an input of 1x1 pixels, is "contiguous" in both formats,
    # and PyTorch's choice of layout reads the strides.
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.insert(0, step)
        step *= size
    return list(t.stride()) == expected


def _nchw_on_cpu(conv: torch.nn.Conv2d, args: tuple):
    """Forward pre-hook of a guarded convolution: on CPU, its weight and input in NCHW, so that oneDNN takes its
    NCHW path forward and backward (the copy's backward turns the gradient back to channels_last)."""
    x = args[0]
    if x.device.type != "cpu":
        return None
    if not _is_nchw(conv.weight):  # the model was put in channels_last again after place_model
        conv.to(memory_format=torch.contiguous_format)
    return (x if _is_nchw(x) else x.clone(memory_format=torch.contiguous_format), *args[1:])


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # channels_last: faster convolutions on CUDA and, measured here, 1.7x on CPU for the narrow model; the layers
    # that the oneDNN bug above can hit stay in NCHW on CPU, whichever device the model later moves to.
    model = model.to(device).to(memory_format=torch.channels_last)
    for module in model.modules():
        if onednn_unsafe(module) and _nchw_on_cpu not in module._forward_pre_hooks.values():
            if torch.device(device).type == "cpu":
                module.to(memory_format=torch.contiguous_format)
            module.register_forward_pre_hook(_nchw_on_cpu)
    return model


def write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd
    write_text(path, pd.DataFrame(rows).to_csv(index=False))


class Checkpoint:
    """``checkpoint.pt`` of a running script: its portable config, the per-epoch rows and, per
    training stage, the state after the last finished epoch, plus ``extra`` tensors the script
    needs to resume (an attack's poison indices). Plain containers and tensors only, loaded with
    ``weights_only=True``."""

    def __init__(self, path: Path, config: dict, extra: dict | None = None):
        self.path = path
        self.state = {"config": config, "rows": [], "stages": {}, "extra": dict(extra or {})}

    @classmethod
    def load(cls, path: Path, config: dict, ignore_keys: tuple[str, ...]) -> "Checkpoint":
        """A saved checkpoint, refused when the settings that shape the result changed since."""
        state = safe_torch_load(path)
        if not isinstance(state, dict) or not {"config", "rows", "stages", "extra"} <= set(state):
            raise UserError(f"{path} is not a checkpoint of this toolkit; pass --overwrite to start again")
        saved = state["config"]
        changed = sorted(k for k in (set(saved) | set(config)) - set(ignore_keys) if saved.get(k) != config.get(k))
        if changed:
            raise UserError(f"cannot resume from {path}: settings changed ({', '.join(changed)}); "
                            f"resume with the original settings or pass --overwrite to start again")
        checkpoint = cls(path, config)
        checkpoint.state = state
        return checkpoint

    @property
    def rows(self) -> list[dict]:
        return self.state["rows"]

    @property
    def extra(self) -> dict:
        return self.state["extra"]

    def epochs_done(self) -> int:
        return sum(s["epoch"] + 1 for s in self.state["stages"].values())


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
        if checkpoint is not None and _ACTIVE:
            _ACTIVE[-1].epochs_done = checkpoint.epochs_done()  # a resumed run starts with these

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
        if _ACTIVE:
            _ACTIVE[-1].epochs_done = self._checkpoint.epochs_done()


def _device_of(objects: dict) -> torch.device:
    return next(objects["model"].parameters()).device
