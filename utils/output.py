"""Output folders as transactions: a run claims its output, works in a staging folder, and
exchanges it with the finished one at the end, so no half-written result is ever in place;
an interrupted run is resumed or refused clearly."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from utils.checkpoint import CHECKPOINT
from utils.cli import ACTIVE_RUNS, ActiveRun
from utils.errors import UserError


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
    ACTIVE_RUNS.append(ActiveRun(what, work, out_dir))
    try:
        yield
    except BaseException:
        discard_unresumable(work)
        raise
    commit_output(work, out_dir)
