"""The D3 paper's Table 5 layout (Sec. 4.4, the adaptive attack): attack and defense as rows, the SAM
budget the attack was trained with (``--sam_rho``) as column groups of ACC and ASR, each beside the
paper's figure.

``python sweeps/results_table.py --by_budget`` (the end of ``sh/table5.sh``) builds it from the tables of
``sweeps/grouping.py``, where ``sam_rho`` is a training setting: tables of one dataset and model that
differ only in ``sam_rho`` become one budget table, the plain attacks (no budget) its first column
group. Its rows are the attacked model ("none", the paper's No Defense) and the defenses run on the
SAM-trained records (a plain record's other defense folders, ``d3_lmd1`` and the like, are not rows).
Records that differ only in their seed are averaged, as in every table. The paper's figures are
CIFAR-10 with PreAct-ResNet18 (original pickles): they are shown for every CIFAR-10 table, with the
plain attacks' taken from its Table 1; compare them with a narrower model's only as a trend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from sweeps.ablation import SHOWN
from sweeps.formats import csv_number
from sweeps.grouping import differences, settings_key
from sweeps.paper import PAPER_ATTACKS, PAPER_DEFENSES, order, paper_table
from sweeps.tables import NONE, Cell, Table
from utils.config import CONFIG_DIR
from utils.errors import UserError
from utils.record import read_yaml

BUDGET = "sam_rho"
PAPER_TABLE5 = CONFIG_DIR / "paper" / "d3_table5.yaml"
COLUMNS = ("ACC", "ASR", "paper ACC", "paper ASR")  # under each budget
CSV_COLUMNS = ["dataset", "model", "setting", "attack", "defense", "budget", "clean_acc", "asr", "n_seeds",
               "clean_acc_std", "asr_std", "paper_clean_acc", "paper_asr", "records"]


def budget_label(budget: float | None) -> str:
    """``2.0`` as the paper writes it; ``no budget`` for the plain attacks."""
    return "no budget" if budget is None else str(float(budget))


@dataclass
class BudgetTable:
    """One (dataset, model, other settings): rows (attack label, attack, defense), budgets as columns."""
    dataset: str
    model: str
    setting: str
    budgets: list = field(default_factory=list)        # None (the plain attacks) first, then ascending
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    cells: dict[tuple[str, str, float | None], Cell] = field(default_factory=dict)  # (label, defense, budget)
    settings: dict = field(default_factory=dict)       # the training settings all its records share, but the budget
    caption: str = ""                                  # how the records were made (the sweep's preset)

    @property
    def heading(self) -> str:
        where = f"{self.dataset}, {self.model}" + (f" ({self.setting})" if self.setting else "")
        return f"Defenses against the adaptive attack (SAM budget {BUDGET}): {where}" + \
            (f"; {self.caption}" if self.caption else "")


@cache  # read once: every cell asks
def _paper() -> dict:
    """(attack, defense, budget) -> (ACC, ASR) of the paper: Table 5, and Table 1 for the plain attacks."""
    out = {(row.attack, defense, None): tuple(cell.mean(m) for m, _ in SHOWN)
           for row in paper_table().rows for defense, cell in row.cells.items()}
    for budget, by_attack in (read_yaml(PAPER_TABLE5) or {}).items():
        for attack, by_defense in by_attack.items():
            for defense, figures in by_defense.items():
                out[(attack, defense, float(budget))] = tuple(figures[:2])
    return out


def paper_figure(t: BudgetTable, attack: str, defense: str, budget) -> tuple[float, float] | None:
    if t.dataset != "cifar10":
        return None
    return _paper().get((attack, defense, None if budget is None else float(budget)))


def build_budget_tables(tables: list[Table]) -> list[BudgetTable]:
    """The budget tables of ``build_tables``' output; a one-line UserError when no record was trained
    with ``--sam_rho``."""
    groups: dict[tuple, list[Table]] = {}
    rests: dict[tuple, dict] = {}
    for t in tables:
        rest = {k: v for k, v in t.settings.items() if k != BUDGET}
        key = (t.dataset, t.model, settings_key(rest))
        groups.setdefault(key, []).append(t)
        rests[key] = rest
    groups = {k: g for k, g in groups.items() if any(t.settings.get(BUDGET) is not None for t in g)}
    if not groups:
        raise UserError("--by_budget: no finished attack record here was trained with --sam_rho; make them "
                        "with sh/table5.sh (or an attack's --sam_rho R), or leave --by_budget out")
    out = []
    for key in sorted(groups, key=lambda k: k[:2]):
        siblings = [k for k in groups if k[:2] == key[:2]]
        setting = differences([rests[k] for k in siblings])[siblings.index(key)] if len(siblings) > 1 else ""
        group = sorted(groups[key], key=lambda t: (t.settings.get(BUDGET) is not None, t.settings.get(BUDGET) or 0))
        sam_defenses = {d for t in group if t.settings.get(BUDGET) is not None for d in t.defenses}
        defenses = [NONE] + order(sam_defenses, PAPER_DEFENSES)
        bt = BudgetTable(key[0], key[1], setting, [t.settings.get(BUDGET) for t in group], settings=rests[key])
        labels: dict[str, str] = {}
        for t in group:
            for row in t.rows:
                labels[row.label] = row.attack
                for defense in defenses:
                    if defense in row.cells:
                        bt.cells[(row.label, defense, t.settings.get(BUDGET))] = row.cells[defense]
        attacks = order(set(labels.values()), PAPER_ATTACKS)
        for label in sorted(labels, key=lambda lb: (attacks.index(labels[lb]), lb)):
            bt.rows += [(label, labels[label], d) for d in defenses]
        out.append(bt)
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _grid(t: BudgetTable) -> list[list[str]]:
    """Per row: attack label (first row of its attack only), defense, then per budget ACC, ASR, paper ACC, paper ASR."""
    out, previous = [], None
    for label, attack, defense in t.rows:
        cells = [label if label != previous else "", "No Defense" if defense == NONE else defense]
        previous = label
        for budget in t.budgets:
            cell = t.cells.get((label, defense, budget))
            paper = paper_figure(t, attack, defense, budget)
            cells += [_num(cell.mean(m)) if cell else "-" for m, _ in SHOWN]
            cells += [_num(v) for v in paper] if paper else ["-", "-"]
        out.append(cells)
    return out


def _head(t: BudgetTable) -> tuple[list[str], list[str]]:
    groups = ["", ""] + [budget_label(b) for b in t.budgets for _ in COLUMNS]
    heads = ["attack", "defense"] + [h for _ in t.budgets for h in COLUMNS]
    return groups, heads


def format_budget_text(t: BudgetTable) -> str:
    grid = _grid(t)
    label_w = max(8, *(len(r[0]) + 2 for r in grid))
    defense_w = max(12, *(len(r[1]) + 2 for r in grid))
    width = 11
    _, heads = _head(t)
    budgets = "".join(f"{budget_label(b):^{len(COLUMNS) * width}}" for b in t.budgets)
    lines = [" " * (label_w + defense_w) + budgets,
             f"{heads[0]:<{label_w}}{heads[1]:<{defense_w}}" + "".join(f"{h:>{width}}" for h in heads[2:])]
    lines += [f"{r[0]:<{label_w}}{r[1]:<{defense_w}}" + "".join(f"{c:>{width}}" for c in r[2:]) for r in grid]
    note = "; the paper's: PreAct-ResNet18, original CIFAR-10" if t.dataset == "cifar10" else ""
    return f"{t.heading}, in %{note}\n" + "\n".join(line.rstrip() for line in lines)


def format_budget_markdown(t: BudgetTable) -> str:
    groups, heads = _head(t)
    head = [f"{h} ({g})" if g else h for g, h in zip(groups, heads)]
    lines = [f"**{t.heading}** (in %)", "", "| " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * (len(head) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in _grid(t)]
    return "\n".join(lines)


def budget_csv_rows(tables: list[BudgetTable]) -> list[dict]:
    """Long form: one row per (attack, defense, budget) that has a run."""
    out = []
    for t in tables:
        for label, attack, defense in t.rows:
            for budget in t.budgets:
                cell = t.cells.get((label, defense, budget))
                if cell is None:
                    continue
                paper = paper_figure(t, attack, defense, budget) or (None, None)
                out.append({"dataset": t.dataset, "model": t.model, "setting": t.setting, "attack": label,
                            "defense": defense, "budget": "" if budget is None else str(float(budget)),
                            **{m: csv_number(cell.mean(m)) for m, _ in SHOWN}, "n_seeds": cell.n_seeds,
                            **{f"{m}_std": csv_number(cell.std(m)) for m, _ in SHOWN},
                            "paper_clean_acc": csv_number(paper[0]), "paper_asr": csv_number(paper[1]),
                            "records": " ".join(cell.records)})
    return out
