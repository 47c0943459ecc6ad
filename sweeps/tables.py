"""What a table holds, in the D3 paper's Table 1 layout: a :class:`Table` per (dataset, model,
training setting), attacks as :class:`Row` s, defenses as column groups, and in each (attack, defense)
a :class:`Cell` of figures in percent, one per record (records that differ only in their seed are
averaged into one cell); the paper's Average row and each defense's cost relative to FT; and which
rows compare nothing: an attacked model whose ASR is below :data:`MIN_BACKDOOR_ASR` has no backdoor to remove.
``sweeps/grouping.py`` builds tables from records, ``sweeps/paper.py`` from the paper's figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from sweeps.collect import Result
from utils.metrics import mean

METRICS = ("clean_acc", "asr", "ra", "der")
NONE = "none"  # the attacked model's column and the CSV's defense value for it
# An attacked model's ASR (in %) below this: no backdoor to remove, so its row's DER means nothing.
MIN_BACKDOOR_ASR = 50.0
WEAK_MARK = "†"
WEAK_NOTE = f"attacked model's ASR below {MIN_BACKDOOR_ASR:g}%: no backdoor to remove; DER not meaningful"


@dataclass
class Cell:
    """One (attack, defense) of a table: its figures in percent, one per record (seed)."""
    values: dict[str, list[float]] = field(default_factory=dict)
    walls: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)  # wall time / FT's on the same record
    records: list[str] = field(default_factory=list)

    def add(self, result: Result, ft_wall: float | None) -> None:
        self.records.append(result.record)
        for metric in METRICS:
            if result.percent(metric) is not None:
                self.values.setdefault(metric, []).append(result.percent(metric))
        if result.wall_seconds is not None:
            self.walls.append(result.wall_seconds)
            if ft_wall:
                self.costs.append(result.wall_seconds / ft_wall)

    @property
    def n_seeds(self) -> int:
        return len(self.records)

    def mean(self, metric: str) -> float | None:
        return mean(self.values.get(metric, []))

    def std(self, metric: str) -> float | None:
        """The sample standard deviation over seeds; None for a single seed."""
        values = self.values.get(metric, [])
        if len(values) < 2:
            return None
        centre = mean(values)
        return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Row:
    attack: str
    variant: str = ""  # what tells this row from others of the same attack in its table ('' when alone)
    cells: dict[str, Cell] = field(default_factory=dict)  # NONE and each defense

    @property
    def label(self) -> str:
        return f"{self.attack} ({self.variant})" if self.variant else self.attack

    @property
    def weak(self) -> bool:
        """The attacked model's ASR (the mean over its seeds) is below :data:`MIN_BACKDOOR_ASR`."""
        asr = self.cells[NONE].mean("asr") if NONE in self.cells else None
        return asr is not None and asr < MIN_BACKDOOR_ASR


@dataclass
class Table:
    """Attacks as rows and defenses as column groups for one dataset, model and training setting."""
    dataset: str
    model: str
    setting: str           # what tells this table from others of the same dataset and model ('' when alone)
    rows: list[Row]
    defenses: list[str]
    caption: str = ""      # how the records were made, under the title (the sweep's preset)
    settings: dict = field(default_factory=dict)  # the training settings all its records share

    @property
    def title(self) -> str:
        return f"{self.dataset}, {self.model}" + (f" ({self.setting})" if self.setting else "")

    @property
    def heading(self) -> str:
        return self.title + (f"; {self.caption}" if self.caption else "")

    def average(self, defense: str, metric: str) -> float | None:
        """The paper's Average row: the mean over attacks of each attack's value, DER included (not
        recomputed from the averaged ACC and ASR); '-' unless every attack has the value."""
        values = [row.cells[defense].mean(metric) if defense in row.cells else None for row in self.rows]
        return None if any(v is None for v in values) else mean(values)

    def cost(self, defense: str) -> float | None:
        """Wall time relative to FT, averaged over the attacks that have both."""
        return mean(c for row in self.rows if defense in row.cells
                     for c in [mean(row.cells[defense].costs)] if c is not None)
