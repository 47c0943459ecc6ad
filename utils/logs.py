"""Logging for a run: one logger, progress-bar-safe on the terminal, held until the run's log file
is open, then written there too; the resolved config logged once."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml

LOGGER_NAME = "backdoor"


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
