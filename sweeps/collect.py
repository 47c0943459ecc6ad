"""Results as data: every finished run leaves a ``summary.json``, and a table is a pure function of the
summaries under a folder, so tables never re-run anything.

``collect(path)`` reads one record folder or a folder of records into :class:`Result` rows, each attack
record and each defense output verified before its numbers count: its ``record.json`` read by
``utils.record.read_manifest`` (format version, kind, schema), every file it lists present with the
SHA-256 it lists (each file hashed once per call, several at a time), the attack's ``config.yaml`` a
mapping of settings, ``summary.json`` an object whose figures are numbers, and each defense made from
the attack run beside it. A run that fails a check keeps its row with the reason as ``problem``: the
table leaves it out and lists it. A folder reached under two names (a symbolic link beside its target)
is read once, under the folder's own name; a record that ``--overwrite`` replaced, kept beside it as
``<name>.replaced-<YYYYmmdd-HHMMSS>``, is skipped unless asked for. ``sweeps/grouping.py`` groups the
rows into tables, ``sweeps/formats.py`` and ``sweeps/table_files.py`` write them;
``sweeps/results_table.py`` is the command.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.record import read_manifest, read_summary, read_yaml, sha256_file

NO_DEFENSE = "-"
REPLACED_MARK = ".replaced-"  # in the name of a record --overwrite replaced: <name>.replaced-<YYYYmmdd-HHMMSS>
SUMMARY_FIGURES = ("der", "wall_seconds")  # read too: numbers where summary.json has them (read_summary: the rest)
HASH_THREADS = 4  # files hashed at a time (hashlib lets go of the GIL: a sweep's weights hash in parallel)


def is_replaced(name: str) -> bool:
    return REPLACED_MARK in name


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


@dataclass
class _Run:
    """One run folder on its way to a :class:`Result`: its manifest, then the first thing found wrong."""
    folder: Path
    kind: str                      # "attack" or "defense"
    meta: dict = field(default_factory=dict)
    problem: str = ""


def _short(error: UserError, folder: Path) -> str:
    """A reader's message about a file of ``folder``, its paths relative to the folder (the row names it)."""
    return str(error).replace(f"{folder}{os.sep}", "")


def _manifest(folder: Path, kind: str) -> _Run:
    if not (folder / "record.json").is_file():
        return _Run(folder, kind, problem="unfinished" if (folder / "checkpoint.pt").is_file()
                    else "incomplete (no record.json)")
    try:
        return _Run(folder, kind, read_manifest(folder, kind, verify=False))
    except UserError as e:
        return _Run(folder, kind, problem=_short(e, folder))


def _hash_all(paths: list[Path]) -> dict[Path, str | None]:
    """The SHA-256 of each file (None where it cannot be read), each file once, several at a time."""
    def one(path: Path) -> str | None:
        try:
            return sha256_file(path)
        except OSError:
            return None
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def _files_problem(run: _Run, digests: dict[Path, str | None]) -> str:
    """'' when every file the manifest lists is there with the SHA-256 it lists."""
    files = run.meta["files"]
    missing = [n for n in files if not (run.folder / n).is_file()]
    unreadable = [n for n in files if n not in missing and digests.get(run.folder / n) is None]
    changed = [n for n in files if n not in missing + unreadable and digests[run.folder / n] != files[n]]
    parts = [f"{', '.join(unreadable)} cannot be read (check its permissions)"] if unreadable else []
    if missing:
        them = "it" if len(missing) == 1 else "them"
        parts.append(f"{', '.join(missing)} missing (deleted or not copied): copy {them} back or rerun the step that "
                     f"wrote this folder")
    if changed:
        parts.append(f"{', '.join(changed)} {'does' if len(changed) == 1 else 'do'} not match record.json (damaged or "
                     f"edited): rerun the step that wrote this folder")
    return "; ".join(parts)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary(folder: Path) -> tuple[dict, str]:
    """(summary.json, problem): read by ``utils.record.read_summary`` (a mapping, ACC / ASR / RA numbers),
    and every other figure the table reads a number where it is given."""
    try:
        summary = read_summary(folder / "summary.json")
    except UserError as e:
        return {}, _short(e, folder)
    for key in SUMMARY_FIGURES:
        if summary.get(key) is not None and not _is_number(summary[key]):
            return {}, (f"summary.json: {key!r} is {type(summary[key]).__name__}, not a number; the record is "
                        f"damaged or was edited: rerun the step that wrote it")
    return summary, ""


def _settings(folder: Path) -> tuple[dict, str]:
    try:
        settings = read_yaml(folder / "config.yaml")
    except UserError as e:
        return {}, _short(e, folder)
    if not isinstance(settings, dict):
        return {}, "config.yaml holds no mapping of settings; the record is damaged or was edited"
    return settings, ""


def _is_record(path: Path) -> bool:
    return (path / "record.json").is_file() or (path / "checkpoint.pt").is_file() or (path / "defense").is_dir()


def _subfolders(path: Path, include_replaced: bool) -> list[Path]:
    # "_logs" and "_submitit" hold a sweep's logs, not records; ".x" are hidden (staging, locks)
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                  and (include_replaced or not is_replaced(p.name)))


def replaced_records(path: Path) -> list[str]:
    """The folders under ``path`` that hold records ``--overwrite`` replaced (skipped unless asked for)."""
    path = Path(path)
    if not path.is_dir() or _is_record(path):
        return []
    return [p.name for p in _subfolders(path, True) if is_replaced(p.name)]


def _record_folders(path: Path, include_replaced: bool) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """The record folders under ``path`` (or ``path`` itself), each once, and the (link, folder kept)
    pairs of names that reach a folder already listed: the folder's own name is kept, not a link's."""
    if _is_record(path):
        return [path], []
    by_target: dict[Path, list[Path]] = {}
    for p in _subfolders(path, include_replaced):
        by_target.setdefault(p.resolve(), []).append(p)
    kept, aliases = [], []
    for names in by_target.values():
        keep = next((p for p in names if not p.is_symlink()), names[0])
        kept.append(keep)
        aliases += [(p, keep) for p in names if p is not keep]
    return sorted(kept), aliases


def collect(path: Path, include_replaced: bool = False) -> list[Result]:
    """Every attack record under ``path`` (or the record ``path`` itself) and each of its defenses,
    verified; with ``include_replaced`` also the records ``--overwrite`` replaced, as records of their own."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give --record_dir a folder of records or one record's folder")
    folders, aliases = _record_folders(path, include_replaced)
    records = []
    for folder in folders:
        defense_root = folder / "defense"
        defenses = [_manifest(d, "defense") for d in (sorted(defense_root.iterdir()) if defense_root.is_dir() else [])
                    if d.is_dir() and not d.name.startswith(".") and (include_replaced or not is_replaced(d.name))]
        records.append((_manifest(folder, "attack"), defenses))
    runs = [run for attack, defenses in records for run in [attack, *defenses]]
    digests = _hash_all([r.folder / name for r in runs if not r.problem for name in r.meta["files"]]
                        + [attack.folder / "record.json" for attack, _ in records if not attack.problem])
    rows = []
    for attack, defenses in records:
        meta, summary, settings = attack.meta, {}, {}
        problem = attack.problem or _files_problem(attack, digests)
        if not problem:
            settings, problem = _settings(attack.folder)
        if not problem:
            summary, problem = _summary(attack.folder)
        name, dataset = attack.folder.name, meta.get("dataset", {}).get("name", "")
        # an imported record's row is labelled with its source attack (record.json "source")
        label = str((meta.get("source") if isinstance(meta.get("source"), dict) else meta).get("attack", "?"))
        rows.append(Result(name, label, NO_DEFENSE, meta.get("model", ""), dataset, summary,
                           problem, settings))
        attack_sha = digests.get(attack.folder / "record.json")
        for d in defenses:
            dsummary, dproblem = {}, d.problem or _files_problem(d, digests)
            if not dproblem and problem:
                dproblem = "its attack record is left out"
            if not dproblem and d.meta["attack_record_sha256"] != attack_sha:
                dproblem = "defends an earlier run of this attack record"
            if not dproblem:
                dsummary, dproblem = _summary(d.folder)
            rows.append(Result(name, label, d.folder.name, d.meta.get("model", meta.get("model", "")),
                               dataset, dsummary, dproblem, settings))
    kept = {r.record: r for r in rows if r.defense == NO_DEFENSE}
    for link, keep in aliases:
        same = kept[keep.name]
        rows.append(Result(link.name, same.attack, NO_DEFENSE, same.model, same.dataset,
                           problem=f"the same folder as {keep.name} (a link to it): counted once, as {keep.name}"))
    return rows
