"""Print the results under a folder of records (or one record's folder) as a table.

    python sh/results_table.py --record_dir record
    python sh/results_table.py --record_dir record/badnet_demo

One line per attack record and per defense of it: ACC / ASR / RA / DER in percent and the wall time
of the run. Nothing is re-run: the table is read from the records' summary.json files, each checked
against the SHA-256 in its record.json; unfinished, damaged or stale runs are listed with a note.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.results import collect, format_runs  # noqa: E402
from utils.runner import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record_dir", default="record", help="a folder of records, or one record's folder")
    args = p.parse_args(argv)
    table = format_runs(collect(Path(args.record_dir)))
    print(table)
    return table


if __name__ == "__main__":
    cli_main(main)
