"""Results as data: every finished run leaves a ``summary.json``, and a table is a pure function of the
summaries under a folder, so tables never re-run anything.

``collect(path)`` reads one record folder or a folder of records into :class:`Result` rows (each
``summary.json`` checked against the SHA-256 its ``record.json`` lists, and each defense against the
attack run it defended). ``sweeps/grouping.py`` groups the rows into tables, ``sweeps/formats.py``
and ``sweeps/table_files.py`` write them; ``sweeps/results_table.py`` is the command.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.record import read_yaml, sha256_file

NO_DEFENSE = "-"


@dataclass
class Result:
    record: str                    # the attack record's folder name
    attack: str
    defense: str                   # NO_DEFENSE for the attacked model itself
    model: str = ""
    dataset: str = ""
    summary: dict = field(default_factory=dict)
    problem: str = ""              # why the numbers are missing or not to be trusted
    settings: dict = field(default_factory=dict)  # the attack's config.yaml: what the record was made with

    def percent(self, key: str) -> float | None:
        value = self.summary.get(key) if not self.problem else None
        return None if value is None else 100.0 * value

    @property
    def wall_seconds(self) -> float | None:
        return None if self.problem else self.summary.get("wall_seconds")


def _read(folder: Path) -> tuple[dict, dict, str]:
    """(record.json, summary.json, problem) of a run folder; problem is '' for a sound, finished run."""
    manifest, summary = folder / "record.json", folder / "summary.json"
    if not manifest.is_file():
        return {}, {}, "unfinished" if (folder / "checkpoint.pt").is_file() else "incomplete (no record.json)"
    try:
        meta = json.loads(manifest.read_text())
        expected = meta["files"]["summary.json"]
    except (ValueError, KeyError, TypeError):
        return {}, {}, "damaged record.json (or an older record format)"
    if not summary.is_file():
        return meta, {}, "summary.json missing"
    if sha256_file(summary) != expected:
        return meta, {}, "summary.json does not match record.json"
    return meta, json.loads(summary.read_text()), ""


def _record_folders(path: Path) -> list[Path]:
    if (path / "record.json").is_file() or (path / "checkpoint.pt").is_file() or (path / "defense").is_dir():
        return [path]
    # "_logs" and "_submitit" hold a sweep's logs, not records
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def collect(path: Path) -> list[Result]:
    """Every attack record under ``path`` (or the record ``path`` itself) and each of its defenses."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give --record_dir a folder of records or one record's folder")
    rows = []
    for folder in _record_folders(path):
        meta, summary, problem = _read(folder)
        attack = meta.get("attack", "?")
        settings = read_yaml(folder / "config.yaml") if not problem and (folder / "config.yaml").is_file() else {}
        rows.append(Result(folder.name, attack, NO_DEFENSE, meta.get("model", ""),
                           meta.get("dataset", {}).get("name", ""), summary, problem, settings))
        attack_sha = sha256_file(folder / "record.json") if (folder / "record.json").is_file() else None
        defense_root = folder / "defense"
        for d in sorted(defense_root.iterdir()) if defense_root.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            dmeta, dsummary, dproblem = _read(d)
            if not dproblem and dmeta.get("attack_record_sha256") != attack_sha:
                dproblem = "defends an earlier run of this attack record"
            rows.append(Result(folder.name, attack, d.name, dmeta.get("model", meta.get("model", "")),
                               meta.get("dataset", {}).get("name", ""), dsummary, dproblem, settings))
    return rows
