"""Results as data: every finished run leaves a ``summary.json``, and a table is a pure function of the
summaries under a folder, so tables never re-run anything.

``collect(path)`` reads one record folder or a folder of records into :class:`Result` rows (each
``summary.json`` checked against the SHA-256 its ``record.json`` lists, and each defense against the
attack run it defended); the formatters turn rows into text. ``sh/results_table.py`` is the command.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.record import sha256_file

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
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def collect(path: Path) -> list[Result]:
    """Every attack record under ``path`` (or the record ``path`` itself) and each of its defenses."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give --record_dir a folder of records or one record's folder")
    rows = []
    for folder in _record_folders(path):
        meta, summary, problem = _read(folder)
        attack = meta.get("attack", "?")
        rows.append(Result(folder.name, attack, NO_DEFENSE, meta.get("model", ""),
                           meta.get("dataset", {}).get("name", ""), summary, problem))
        attack_sha = sha256_file(folder / "record.json") if (folder / "record.json").is_file() else None
        defense_root = folder / "defense"
        for d in sorted(defense_root.iterdir()) if defense_root.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            dmeta, dsummary, dproblem = _read(d)
            if not dproblem and dmeta.get("attack_record_sha256") != attack_sha:
                dproblem = "defends an earlier run of this attack record"
            rows.append(Result(folder.name, attack, d.name, dmeta.get("model", meta.get("model", "")),
                               meta.get("dataset", {}).get("name", ""), dsummary, dproblem))
    return rows


def _cell(value: float | None, width: int, digits: int = 2) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def format_runs(rows: list[Result]) -> str:
    """One line per run: ACC / ASR / RA / DER in percent and wall time."""
    if not rows:
        return "no records found"
    name_w = max(len("record"), *(len(r.record) for r in rows))
    lines = [f"{'record':<{name_w}}  {'attack':<12}{'defense':<9}{'model':<20}{'ACC':>7}{'ASR':>7}{'RA':>7}"
             f"{'DER':>7}{'wall s':>9}  note"]
    for r in rows:
        lines.append(f"{r.record:<{name_w}}  {r.attack:<12}{r.defense:<9}{r.model:<20}{_cell(r.percent('clean_acc'), 7)}"
                     f"{_cell(r.percent('asr'), 7)}{_cell(r.percent('ra'), 7)}{_cell(r.percent('der'), 7)}"
                     f"{_cell(r.wall_seconds, 9, 0)}  {r.problem}")
    return "\n".join(lines)


def format_paper_table(rows: list[Result], defenses: list[str]) -> str:
    """The layout of the D3 paper's Table 1: attacks as rows; no defense and each defense as column
    groups (ACC / ASR, plus DER for defenses); then the wall time of each stage and, when FT is
    among the defenses, each defense's wall time relative to FT's on the same record (the paper's
    Figure 3 question: what does each method cost?)."""
    by_record: dict[str, dict[str, Result]] = {}
    for r in rows:
        by_record.setdefault(r.record, {})[r.defense] = r
    stages = [NO_DEFENSE] + defenses
    head1 = f"{'attack':<16}" + "".join(f"{('no defense' if s == NO_DEFENSE else s):^{14 if s == NO_DEFENSE else 21}}"
                                         for s in stages)
    head2 = f"{'':<16}" + "".join("   ACC    ASR" + ("" if s == NO_DEFENSE else "    DER") + " " for s in stages)
    lines = [head1, head2]
    walls = [f"{'attack':<16}" + "".join(f"{('attack' if s == NO_DEFENSE else s):>10}" for s in stages)]
    relative = [f"{'attack':<16}" + "".join(f"{s:>10}" for s in defenses)]
    for record, runs in by_record.items():
        label = runs.get(NO_DEFENSE, next(iter(runs.values()))).attack
        cells, wall, cost = f"{label:<16}", f"{label:<16}", f"{label:<16}"
        ft = runs["ft"].wall_seconds if "ft" in runs else None
        for s in stages:
            r = runs.get(s, Result(record, label, s, problem="not run"))
            cells += _cell(r.percent("clean_acc"), 7) + _cell(r.percent("asr"), 7)
            cells += (_cell(r.percent("der"), 7) if s != NO_DEFENSE else "") + " "
            wall += _cell(r.wall_seconds, 10, 0)
            if s != NO_DEFENSE:
                cost += _cell(r.wall_seconds / ft if ft and r.wall_seconds else None, 10)
        lines.append(cells)
        walls.append(wall)
        relative.append(cost)
    notes = [f"  {r.record}/{r.defense}: {r.problem}" for r in rows if r.problem]
    cost_block = ["", "wall time relative to FT:"] + relative if "ft" in defenses else []
    return "\n".join(lines + ["", "wall time per stage (s):"] + walls + cost_block
                     + (["", "problems:"] + notes if notes else []))
