"""The steps every run walks, written once for attacks and defenses: the ``--resume`` flag, claiming
and planning the output folder with the checkpoint of an interrupted run, the log file opened with the
resolved config, and the finish (summary, manifest last, checkpoint gone)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from utils.checkpoint import CHECKPOINT, Checkpoint
from utils.config import Config, str2bool
from utils.flags import RESUMABLE_KEYS, portable
from utils.logs import log_config, log_to_file, run_logger
from utils.output import check_writable, claim_output, plan_output, writing_output
from utils.record import write_json, write_manifest


def log_ignored(script: str, dropped: list[str], reasons: dict[str, str]) -> None:
    """One line per common flag given to a script that has no use for it (``resolve_config``'s ``dropped``)."""
    for flag in dropped:
        run_logger().warning("%s does not use --%s (%s); the value given is ignored", script, flag, reasons[flag])


def add_resume_argument(group) -> None:
    group.add_argument("--resume", type=str2bool, nargs="?", const=True,
                       help="continue an interrupted run from its last finished epoch")


@dataclass
class RunOutput:
    """A claimed output: ``work`` is where the run writes until it finishes into ``out_dir``;
    ``checkpoint`` is an interrupted run's (None for a fresh start); ``config`` the config a record keeps."""
    out_dir: Path
    work: Path
    checkpoint: Checkpoint | None
    config: dict

    def writing(self, what: str):
        """The writing itself: finished into ``out_dir`` on success; an interruption says what it leaves.
        Without a checkpoint to resume, the working folder starts empty."""
        return writing_output(what, self.work, self.out_dir, resume=self.checkpoint is not None)


@contextmanager
def claim_run(out_dir: Path, cfg: Config, local_keys: tuple[str, ...] = ()):
    """Check ``--record_dir`` is writable, refuse a second run on the same output, plan the output
    (``--overwrite``, ``--resume``) and reload an interrupted run's checkpoint, which is refused when
    a setting that changes the result differs."""
    check_writable(out_dir.parent, "--record_dir")
    with claim_output(out_dir):
        work = plan_output(out_dir, overwrite=bool(cfg.overwrite), resume=bool(cfg.resume))
        config = portable(cfg, local_keys)
        checkpoint = None
        if cfg.resume and (work / CHECKPOINT).is_file():  # --overwrite alone starts again
            checkpoint = Checkpoint.load(work / CHECKPOINT, config, RESUMABLE_KEYS)
        yield RunOutput(out_dir, work, checkpoint, config)


def open_log(work: Path, log_name: str, headline: str, cfg: Config):
    """The run's log file, opened with its headline and the resolved config."""
    logger = log_to_file(work / log_name)
    logger.info(headline)
    log_config(logger, cfg.to_dict())
    return logger


def finish_run(work: Path, summary: dict, manifest: dict, files: list[str]) -> None:
    """``summary.json``, then ``record.json`` (last: it marks the output finished), then the checkpoint goes."""
    write_json(work / "summary.json", summary)
    write_manifest(work, manifest, files)
    (work / CHECKPOINT).unlink(missing_ok=True)
