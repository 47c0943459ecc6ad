"""A job's flags read as settings: the ``--flag value`` pairs of its command line, whether a value is
the one a ``config.yaml`` holds, and which flags are not compared when a finished run is reused."""
from __future__ import annotations

import yaml

# Settings that do not change a result, or that name files: not compared when a finished run is reused.
NOT_COMPARED = {"device", "record_dir", "dataset_path", "cache_dir", "num_workers", "eval_every",
                "eval_batch_size", "overwrite", "resume", "yaml_path", "save_folder_name", "result_file", "amp"}


def flag_values(args: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for flag, value in zip(args, args[1:]):
        if flag.startswith("--") and not value.startswith("--"):
            pairs[flag[2:]] = value
    return pairs


def flag_matches(asked: str, value) -> bool:
    """Whether a command-line value (a string) is the value a config.yaml holds: "0.05" is 0.05."""
    return yaml.safe_load(asked) == value or str(value) == asked
