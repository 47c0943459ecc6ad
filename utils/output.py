"""Output folders as transactions: a run claims its output, works in a staging folder, and
exchanges it with the finished one at the end, so no half-written result is ever in place;
an interrupted run is resumed or refused clearly. Nothing finished is deleted: a replaced result
holding more than its own run's files (an attack record's defenses) is kept beside it, whole, as
``<name>.replaced-<YYYYmmdd-HHMMSS>``; an output that is a symlink is written where it points."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from utils.checkpoint import CHECKPOINT
from utils.cli import ACTIVE_RUNS, ActiveRun
from utils.errors import UserError
from utils.logs import run_logger
from utils.record import pid_alive


def check_writable(folder: Path, flag: str) -> None:
    """Fail in one line, before any slow work, when results could not be written under ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write results under {folder} ({e.strerror or e}); choose a writable folder "
                        f"with {flag}") from None


def real_output(out_dir: Path) -> Path:
    """Where ``out_dir`` really is: an output that is a symlink (record/x -> /elsewhere/x) is written,
    staged and replaced at its target, and the link stays as it is."""
    return Path(os.path.realpath(out_dir)) if out_dir.is_symlink() else out_dir


def staging_dir(out_dir: Path) -> Path:
    """Where a rerun over a finished result writes until it has finished itself."""
    real = real_output(out_dir)
    return real.parent / f".{real.name}.rerun"


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


def say(message: str) -> None:
    """One line for the person running this: the run's log and console once logging is set up, else stderr."""
    logger = run_logger()
    if logger.handlers:
        logger.warning(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _lock_owner(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


@contextmanager
def hold_lock(path: Path, busy: Callable[[str], str]):
    """Hold the lock file ``path`` while the block runs: an ``flock`` on it, which the OS drops when the
    process ends however it ends (SIGKILL too), and this process's id written in it. A lock held by a
    live process raises :class:`UserError` with ``busy(pid)``; a file left by a process that no longer
    holds it is taken over, with a line saying so. The file is removed when the block ends. No-op
    where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot write the lock file {path} ({e.strerror or e}); choose a writable "
                            f"folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise UserError(busy(owner)) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # still the file at the path, not one a finishing holder has just removed
        except FileNotFoundError:
            pass
        os.close(fd)
    left = _lock_owner(fd)
    if left != "unknown":
        say(f"note: took over the lock {path} left by process {left}, which "
            f"{'no longer holds it' if left.isdigit() and pid_alive(int(left)) else 'is gone'} (killed?)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def claim_output(out_dir: Path):
    """Hold ``out_dir`` for this run, so that a second run on it (the same sweep started twice, a job
    left running by a killed launcher) is refused in one line instead of writing the same folder.
    The claim is :func:`hold_lock` on ``.<name>.lock`` beside the real folder: a killed run's lock
    does not block the next run, which takes it over."""
    real = real_output(out_dir)
    return hold_lock(real.parent / f".{real.name}.lock",
                     lambda pid: f"another run is writing {out_dir} now (pid {pid}); wait for it to end or stop "
                                 f"it, then run this again")


def plan_output(out_dir: Path, *, overwrite: bool, resume: bool) -> Path:
    """The folder this run writes into, so that ``out_dir`` always holds either the previous finished
    result or the new one, never a half-written one:
      * a finished ``out_dir`` is replaced only by :func:`commit_output` after the rerun, which writes
        beside it (:func:`staging_dir`), has finished;
      * ``--resume`` continues the interrupted run (a rerun's or a first run's) from its checkpoint.
    Only checks: returns the working folder (it holds ``checkpoint.pt`` exactly when the run is to be
    resumed); :func:`open_output` creates it once the slow, fallible set-up is done."""
    real = real_output(out_dir)
    if real.exists() and not real.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder; move it away or choose another name")
    if real != out_dir:
        check_writable(real.parent, f"--record_dir (or point the link {out_dir} elsewhere)")
    staging = staging_dir(out_dir)
    finished = is_finished(real)
    if resume:
        for candidate in (staging, real):
            if (candidate / CHECKPOINT).is_file() and not (candidate == real and finished):
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
    elif real.exists() and not finished and not overwrite:
        raise UserError(f"{out_dir} holds no finished run: {describe_unfinished(real)}; pass --resume to "
                        f"continue it or --overwrite to start again")
    return staging if finished else real


def is_temporary(name: str) -> bool:
    """A file being written (``utils.record``'s ``.<name>.<random>.tmp``, a figure's ``.<stem>.tmp.png``)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".tmp.png"))


def remove_temporaries(folder: Path) -> None:
    """The temporary files a killed run left in ``folder`` (only its claimed owner writes there)."""
    if not folder.is_dir():
        return
    left = [p for p in folder.iterdir() if is_temporary(p.name) and p.is_file()]
    for p in left:
        p.unlink(missing_ok=True)
    if left:
        say(f"note: removed {len(left)} temporary file(s) a killed run left in {folder}")


def more_than_its_run(folder: Path) -> list[str]:
    """What ``folder`` holds beyond its own run's files: a subfolder with a file in it (an attack
    record's ``defense/``), a link, or, in a finished result, a file its ``record.json`` does not list
    that is not its log, plot, checkpoint or a temporary file."""
    try:
        listed = set(json.loads((folder / "record.json").read_text())["files"]) | {"record.json"}
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    extra = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            extra.append(p.name)
        elif p.is_dir():
            if any(files for _, _, files in os.walk(p)):
                extra.append(f"{p.name}/")
        elif listed is not None and p.name not in listed | {CHECKPOINT} and p.suffix not in (".log", ".png") \
                and not is_temporary(p.name):
            extra.append(p.name)
    return extra


def replaced_name(real: Path) -> Path:
    """``<name>.replaced-<YYYYmmdd-HHMMSS>`` beside ``real``, with ``-2``, ``-3``... when that is taken."""
    base = f"{real.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = real.with_name(base), 1
    while os.path.lexists(dest):
        n += 1
        dest = real.with_name(f"{base}-{n}")
    return dest


def _keep_aside(folder: Path, real: Path, what: str) -> Path:
    """Move ``folder`` to :func:`replaced_name` (unless it is there already) and say so in one line."""
    dest = folder if folder.name.startswith(f"{real.name}.replaced-") else replaced_name(real)
    if dest != folder:
        os.rename(folder, dest)
    say(f"note: {what} was moved, whole, to {dest} (kept: nothing is deleted)")
    return dest


def _clear(folder: Path, real: Path) -> None:
    """Make room for a run at ``folder``: what an unfinished run left goes; a finished result or
    one holding more than its run's files (an interrupted replacement's previous result) is kept aside."""
    if folder.is_symlink():
        folder.unlink()  # a link in a working folder's place (left by an older version): only the link goes
    elif folder.is_dir():
        extra = more_than_its_run(folder)
        if is_finished(folder) or extra:
            held = f", with {', '.join(extra[:3])} it held," if extra else ""
            _keep_aside(folder, real, f"the earlier result left at {folder}{held}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def open_output(work: Path, out_dir: Path, resume: bool = True) -> None:
    """Create the working folder chosen by :func:`plan_output` (emptied, unless it is resumed: it holds
    a checkpoint and ``resume``); the temporary files a killed run left there are removed."""
    real = real_output(out_dir)
    legacy = out_dir.parent / f".{out_dir.name}.rerun"
    if real != out_dir and legacy.is_symlink():
        legacy.unlink()  # left beside a linked output by an older version, which staged there: only the link goes
    remove_temporaries(real)
    if resume and (work / CHECKPOINT).is_file():
        remove_temporaries(work)
        return
    _clear(work, real)
    if work == real:
        _clear(staging_dir(out_dir), real)
    work.mkdir(parents=True)


def commit_output(work: Path, out_dir: Path) -> None:
    """Put a finished run in place: ``work`` becomes ``out_dir`` in one rename when nothing is there,
    else the two are exchanged atomically where the OS allows (Linux). The previous result is removed
    when it holds only its own run's files; else (an attack record's defenses, which defended the old
    model) it is kept whole beside it as ``<name>.replaced-<time>``, and a line says where."""
    real = real_output(out_dir)
    if work == real:
        return
    if not real.exists():
        os.replace(work, real)
        return
    if _exchange(work, real):
        old = work  # the previous result, until it is kept aside or removed below
    else:  # no atomic exchange: the previous result steps aside first, under the name it keeps
        old = replaced_name(real)
        os.replace(real, old)
        os.replace(work, real)
    extra = more_than_its_run(old)
    if not extra:
        shutil.rmtree(old, ignore_errors=True)
        return
    _keep_aside(old, real, f"{out_dir} was replaced; its previous result, with {', '.join(extra[:3])} it held,")


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
    keeping (and must not pass for a result), so it goes; one with a checkpoint keeps all but its
    temporary files."""
    if not work.is_dir():
        return
    if not (work / CHECKPOINT).is_file():
        shutil.rmtree(work, ignore_errors=True)
        return
    for p in work.iterdir():
        if is_temporary(p.name):
            p.unlink(missing_ok=True)


@contextmanager
def writing_output(what: str, work: Path, out_dir: Path, resume: bool = True):
    """The body of a run that writes ``work`` (resuming its checkpoint when ``resume``): on success it
    becomes ``out_dir``; on failure or interruption a working folder without a checkpoint is removed."""
    open_output(work, out_dir, resume)
    ACTIVE_RUNS.append(ActiveRun(what, work, out_dir))
    try:
        yield
    except BaseException:
        discard_unresumable(work)
        raise
    commit_output(work, out_dir)
