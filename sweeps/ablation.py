"""Ablation tables, the layout of the D3 paper's Tables 2, 3, 6 and 7: one flag's values as rows, ACC
and ASR of each attack as column pairs, and their Average over attacks, for one defense.

``python sweeps/results_table.py --ablation FLAG [--defense NAME]`` builds them from the verified rows
of ``sweeps/collect.py``; each value is read from the run's own ``config.yaml``, never from its name.

- An attack flag (``pratio``): the flag takes several values among the attack records. Each row is the
  records at one value, shown through one defense's output folder (``--defense d3``, the default when
  the records hold one defense; ``--defense none``: the attacked models themselves).
- A defense flag (``lmd``, ``eps``, ``ratio``): the flag is in the defense runs' ``config.yaml``. Rows
  are the variants of one defense (``--defense NAME``, by script name; needed only when several
  defenses' runs vary the flag) on each record, whatever their folder is named (``d3``, ``d3_lmd20``).

An ablation changes one flag: for each attack, only the runs whose other settings are the same take
part (the set of runs that agree and show the most values of the flag); runs of other settings (a
``d3_eps0`` beside the ``lmd`` axis) are named under the table as left out. Records that differ in
their seed are averaged (mean ± std); two runs of one value and one seed are repeats: the first by
name counts. One table per (dataset, model). The paper's own tables of ``pratio``, ``ratio``, ``eps`` and
``lmd`` (``config/paper/d3_ablations.yaml``) in the same layout: :func:`paper_ablation`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.collect import NO_DEFENSE, Result
from sweeps.formats import csv_number
from sweeps.paper import PAPER_ATTACKS, order
from sweeps.tables import Cell
from utils.config import CONFIG_DIR
from utils.errors import UserError
from utils.flags import NOT_SETTINGS
from utils.record import read_yaml

PAPER_ABLATIONS = CONFIG_DIR / "paper" / "d3_ablations.yaml"
NOT_COMPARED_HERE = NOT_SETTINGS | {"save_name", "result_file", "defense", "index"}
SHOWN = (("clean_acc", "ACC"), ("asr", "ASR"))
CSV_COLUMNS = ["dataset", "model", "defense", "flag", "value", "attack", "clean_acc", "asr", "n_seeds",
               "clean_acc_std", "asr_std", "records"]


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def show(value) -> str:
    """A flag's value as a row label: ``0.01``, ``10`` (a float without its ``.0``), ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sort_key(value):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, _key(value))


@dataclass
class Ablation:
    """One ablation table: values of ``flag`` as rows, attacks as column pairs."""
    flag: str
    kind: str                      # "attack" or "defense": whose flag it is
    defense: str                   # the defense shown; NO_DEFENSE: the attacked models
    dataset: str
    model: str
    values: list = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (_key(value), attack)
    source: str = ""               # where the figures come from when not from records ("the D3 paper's Table 7")

    @property
    def heading(self) -> str:
        shown = "the attacked models (no defense)" if self.defense == NO_DEFENSE else self.defense
        where = f"{self.source}: " if self.source else ""
        return f"{where}Ablation over {self.flag} ({self.kind} flag): {shown} on {self.dataset}, {self.model}"

    def mean(self, value, attack: str, metric: str) -> float | None:
        cell = self.cells.get((_key(value), attack))
        return cell.mean(metric) if cell else None

    def average(self, value, metric: str) -> float | None:
        """The paper's Average column: the mean over attacks; '-' unless every attack has the value."""
        values = [self.mean(value, a, metric) for a in self.attacks]
        return None if any(v is None for v in values) else sum(values) / len(values)


@dataclass
class _Entry:
    dataset: str
    model: str
    attack: str
    seed: str
    value: object
    rest: str                      # every other setting: the runs of one ablation share it
    result: Result
    name: str                      # record, or record/defense/<folder>


def _folder(root: Path, record: str) -> Path:
    return root / record if (root / record).is_dir() else root


def _defense_config(root: Path, r: Result) -> dict:
    config = read_yaml(_folder(root, r.record) / "defense" / r.defense / "config.yaml")
    return config if isinstance(config, dict) else {}


def _rest(settings: dict, flag: str) -> dict:
    return {k: v for k, v in settings.items() if k not in NOT_COMPARED_HERE and k != flag and v is not None}


def _choose(defense: str | None, found: list[str], what: str, flag: str) -> str:
    if defense is not None:
        if defense not in found:
            varies = f" varies {flag}" if what == "defense" else ""
            raise UserError(f"--defense {defense}: no {what} of that name{varies} here; choose from "
                            f"{', '.join(found) or 'none'}")
        return defense
    if len(found) != 1:
        raise UserError(f"--ablation {flag}: the records hold {', '.join(found)}; choose one with --defense NAME")
    return found[0]


def _entries(rows: list[Result], root: Path, flag: str, defense: str | None) -> tuple[str, str, list[_Entry]]:
    sound = [r for r in rows if not r.problem]
    attacks = {r.record: r for r in sound if r.defense == NO_DEFENSE}
    runs = [(r, _defense_config(root, r)) for r in sound if r.defense != NO_DEFENSE and r.record in attacks]
    attack_values = {_key(r.settings[flag]) for r in attacks.values() if flag in r.settings}
    carried = [(r, c) for r, c in runs if flag in c]
    if not attack_values and not carried:
        raise UserError(f"--ablation {flag}: no finished record under {root} has {flag} in its config.yaml "
                        f"(attack or defense); give a flag the records were made with, e.g. pratio, lmd, eps, ratio")

    def entry(a: Result, result: Result, value, rest: dict, name: str) -> _Entry:
        return _Entry(a.dataset, a.model, a.attack, str(a.settings.get("random_seed")), value, _key(rest), result,
                      name)

    if len(attack_values) > 1 or not carried:
        folders = sorted({r.defense for r, _ in runs})
        shown = NO_DEFENSE if defense == "none" or (defense is None and not folders) else \
            _choose(defense, folders, "defense output folder", flag)
        by_folder = {(r.record, r.defense): r for r, _ in runs}
        out = [entry(a, a if shown == NO_DEFENSE else by_folder[(a.record, shown)], a.settings[flag],
                     _rest(a.settings, flag), a.record)
               for a in attacks.values()
               if flag in a.settings and (shown == NO_DEFENSE or (a.record, shown) in by_folder)]
        return "attack", shown, out
    families: dict[str, set] = {}
    for r, c in carried:
        families.setdefault(str(c.get("defense", r.defense)), set()).add(_key(c[flag]))
    varied = sorted(f for f, v in families.items() if len(v) > 1) or sorted(families)
    shown = _choose(defense, varied, "defense", flag)
    out = [entry(attacks[r.record], r, c[flag], {"attack": _rest(attacks[r.record].settings, flag),
                                                 "defense": _rest(c, flag)}, f"{r.record}/defense/{r.defense}")
           for r, c in carried if str(c.get("defense", r.defense)) == shown]
    return "defense", shown, out


def build_ablation(rows: list[Result], root: Path, flag: str,
                   defense: str | None = None) -> tuple[list[Ablation], list[str]]:
    """The ablation tables of ``flag`` over the collected ``rows`` (read from ``root``), and the runs
    left out because their other settings differ from their rows'. Bad input: a one-line UserError."""
    kind, shown, entries = _entries(rows, Path(root), flag, defense)
    by_attack: dict[tuple[str, str, str], list[_Entry]] = {}
    for e in entries:
        by_attack.setdefault((e.dataset, e.model, e.attack), []).append(e)
    tables: dict[tuple[str, str], Ablation] = {}
    left_out: list[str] = []
    for (dataset, model, attack), group in sorted(by_attack.items()):
        sets: dict[str, list[_Entry]] = {}
        for e in group:
            sets.setdefault(e.rest, []).append(e)
        best = max(sorted(sets), key=lambda k: (len({_key(e.value) for e in sets[k]}), len(sets[k])))
        left_out += sorted(e.name for k, s in sets.items() if k != best for e in s)
        table = tables.setdefault((dataset, model), Ablation(flag, kind, shown, dataset, model))
        seen: set[tuple[str, str]] = set()
        for e in sorted(sets[best], key=lambda e: e.name):
            if (_key(e.value), e.seed) in seen:
                left_out.append(f"{e.name} (a repeat of one value and seed)")
                continue
            seen.add((_key(e.value), e.seed))
            table.cells.setdefault((_key(e.value), attack), Cell()).add(e.result, None)
            if _key(e.value) not in map(_key, table.values):
                table.values.append(e.value)
        table.attacks.append(attack)
    for table in tables.values():
        table.values.sort(key=_sort_key)
        table.attacks = order(set(table.attacks), PAPER_ATTACKS)
    return [tables[k] for k in sorted(tables)], left_out


def ablation_series(t: Ablation, metric: str) -> dict[str, list[float | None]]:
    """Each attack's mean ``metric`` at each of ``t.values`` in order (None where it has no run), then the
    Average: the curves of the ablation figure."""
    series = {attack: [t.mean(v, attack, metric) for v in t.values] for attack in t.attacks}
    series["Average"] = [t.average(v, metric) for v in t.values]
    return series


def paper_ablation(flag: str, path: Path = PAPER_ABLATIONS) -> Ablation | None:
    """The D3 paper's own table of this flag (Table 2, 3, 6 or 7: D3 on CIFAR-10, PreAct-ResNet18), to print
    beside the records'; None for a flag the paper does not vary."""
    data = (read_yaml(path) or {}).get(flag)
    if data is None:
        return None
    table = Ablation(flag, "attack" if flag == "pratio" else "defense", "d3", "cifar10", "preactresnet18",
                     source=f"the D3 paper's Table {data['table']}")
    for value, by_attack in data["values"].items():
        table.values.append(value)
        for attack, figures in by_attack.items():
            table.cells[(_key(value), attack)] = Cell(dict(zip(("clean_acc", "asr"), ([f] for f in figures))))
    table.attacks = order({a for by_attack in data["values"].values() for a in by_attack}, PAPER_ATTACKS)
    return table


def _cell(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _grid(t: Ablation) -> list[tuple[str, list[str]]]:
    """(row label, cells): for each value, ACC and ASR of each attack, then the Average pair."""
    out = []
    for value in t.values:
        cells = []
        for attack in t.attacks:
            cell = t.cells.get((_key(value), attack))
            cells += [_cell(cell.mean(m), cell.std(m)) if cell else "-" for m, _ in SHOWN]
        cells += [_cell(t.average(value, m)) for m, _ in SHOWN]
        out.append((show(value), cells))
    return out


def format_ablation_text(t: Ablation) -> str:
    grid = _grid(t)
    groups = t.attacks + ["Average"]
    width = max(8, *(len(c) + 2 for _, cells in grid for c in cells))
    label_w = max(14, len(t.flag) + 4, *(len(label) + 2 for label, _ in grid))
    lines = [f"{'attack →':<{label_w}}" + "".join(f"{g:^{2 * width}}" for g in groups),
             f"{t.flag + ' ↓':<{label_w}}" + "".join(f"{h:>{width}}" for _ in groups for _, h in SHOWN)]
    lines += [f"{label:<{label_w}}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in grid]
    seeds = sorted({c.n_seeds for c in t.cells.values()})
    note = f"; mean ± std over {'/'.join(map(str, seeds))} seeds" if any(n > 1 for n in seeds) else ""
    return f"{t.heading}, in %{note}\n" + "\n".join(line.rstrip() for line in lines)


def format_ablation_markdown(t: Ablation) -> str:
    head = [f"{t.flag} ↓ \\ attack →"] + [f"{g} {h}" for g in t.attacks + ["Average"] for _, h in SHOWN]
    lines = [f"**{t.heading}** (in %)", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in _grid(t)]
    return "\n".join(lines)


def ablation_csv_rows(tables: list[Ablation]) -> list[dict]:
    """Long form: one row per (value, attack), then the value's Average row."""
    out = []
    for t in tables:
        base = {"dataset": t.dataset, "model": t.model, "defense": t.defense, "flag": t.flag}
        for value in t.values:
            for attack in t.attacks:
                c = t.cells.get((_key(value), attack))
                if c is not None:
                    out.append({**base, "value": show(value), "attack": attack,
                                **{m: csv_number(c.mean(m)) for m, _ in SHOWN}, "n_seeds": c.n_seeds,
                                **{f"{m}_std": csv_number(c.std(m)) for m, _ in SHOWN}, "records": " ".join(c.records)})
            out.append({**base, "value": show(value), "attack": "Average",
                        **{m: csv_number(t.average(value, m)) for m, _ in SHOWN}, "n_seeds": "",
                        "clean_acc_std": "", "asr_std": "", "records": ""})
    return out
