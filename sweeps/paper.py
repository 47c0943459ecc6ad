"""The D3 paper itself: the order of its Table 1 (attacks as rows, defenses as column groups), which
orders sweeps and tables here, and its reported figures (``config/paper/d3_table1.yaml``) as a
:class:`~sweeps.tables.Table`, to print beside a sweep's own."""
from __future__ import annotations

from pathlib import Path

from sweeps.tables import NONE, Cell, Row, Table
from utils.config import CONFIG_DIR
from utils.record import read_yaml

# The D3 paper's Table 1 order (rows and column groups); a sweep's "all" means every one of them that
# exists here; in a table, others follow in alphabetical order.
PAPER_ATTACKS = ["badnet", "blended", "wanet", "lf", "inputaware", "sig", "ssba"]
PAPER_DEFENSES = ["ft", "anp", "fp", "nc", "nad", "i-bau", "ft-sam", "sau", "d3"]


def order(names, paper: list[str]) -> list[str]:
    names = set(names)
    return [n for n in paper if n in names] + sorted(names - set(paper))


def paper_table(path: Path = CONFIG_DIR / "paper" / "d3_table1.yaml", attacks=None, defenses=None) -> Table:
    """The D3 paper's Table 1 (CIFAR-10, PreAct-ResNet18, 10% poisoning) as a :class:`Table`, limited to
    the given attacks and defenses, to print beside a sweep's own."""
    data = read_yaml(path)
    rows = []
    for attack in order(set(attacks or data) & set(data), PAPER_ATTACKS):
        row = Row(attack)
        for defense, figures in data.get(attack, {}).items():
            if defense == NONE or defenses is None or defense in defenses:
                row.cells[defense] = Cell({m: [v] for m, v in zip(("clean_acc", "asr", "der"), figures)})
        rows.append(row)
    chosen = order({d for row in rows for d in row.cells} - {NONE}, PAPER_DEFENSES)
    return Table("cifar10", "preactresnet18", "the D3 paper's Table 1", rows, chosen)
