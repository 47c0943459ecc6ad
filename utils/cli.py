"""The command line around every script: a bad input is one line and exit 2, an interruption
(Ctrl-C, SIGTERM, SIGHUP) stops a run the same way and says what it leaves behind."""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.checkpoint import CHECKPOINT
from utils.errors import UserError


@dataclass
class ActiveRun:
    """What the running script is writing, so that an interruption can say what it leaves behind."""
    what: str                 # "the attack badnet", "the defense d3 on record/x"
    work_dir: Path            # where this run writes
    out_dir: Path             # where the finished result goes
    epochs_done: int = 0


ACTIVE_RUNS: list[ActiveRun] = []


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
    ACTIVE_RUNS.clear()
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
    if not ACTIVE_RUNS:
        return "interrupted before anything was written"
    run = ACTIVE_RUNS[-1]
    if (run.work_dir / CHECKPOINT).is_file():
        rerun = run.work_dir.resolve() != run.out_dir.resolve()  # an output that is a link is written at its target
        kept = f"{run.out_dir} still holds the previous finished result; " if rerun else ""
        return (f"interrupted: {run.what} stopped after {run.epochs_done} finished epoch(s); {kept}the same command "
                f"with --resume continues it from there")
    return f"interrupted: {run.what} stopped before its first epoch finished; nothing of it was kept"
