"""Results as data: every finished run leaves a ``summary.json``, and a table is a pure function of the
summaries under a folder, so tables never re-run anything.

``collect(path)`` reads one record folder or a folder of records into :class:`Result` rows (each
``summary.json`` checked against the SHA-256 its ``record.json`` lists, and each defense against the
attack run it defended). ``build_tables`` groups them as the D3 paper's Table 1 does: one
:class:`Table` per (dataset, model, training setting), attacks as rows, defenses as column groups,
records that differ only in their seed averaged into one :class:`Cell`. The writers turn tables into
text, Markdown, LaTeX, a long CSV and a cost figure. ``sh/results_table.py`` is the command.
"""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.flags import NOT_SETTINGS, TABLE_KEYS
from utils.record import read_yaml, sha256_file, write_text

ROOT = Path(__file__).resolve().parents[1]
NO_DEFENSE = "-"
# The D3 paper's Table 1 order of rows and column groups; others follow in alphabetical order.
PAPER_ATTACKS = ["badnet", "blended", "wanet", "lf", "inputaware", "sig", "ssba"]
PAPER_DEFENSES = ["ft", "anp", "fp", "nc", "nad", "i-bau", "ft-sam", "sau", "d3"]


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


def format_runs(rows: list[Result]) -> str:
    """One line per run: ACC / ASR / RA / DER in percent and wall time."""
    if not rows:
        return "no records found"
    name_w = max(len("record"), *(len(r.record) for r in rows))
    lines = [f"{'record':<{name_w}}  {'attack':<12}{'defense':<9}{'model':<20}{'ACC':>7}{'ASR':>7}{'RA':>7}"
             f"{'DER':>7}{'wall s':>9}  note"]
    for r in rows:
        lines.append(f"{r.record:<{name_w}}  {r.attack:<12}{r.defense:<9}{r.model:<20}{_num(r.percent('clean_acc'), 7)}"
                     f"{_num(r.percent('asr'), 7)}{_num(r.percent('ra'), 7)}{_num(r.percent('der'), 7)}"
                     f"{_num(r.wall_seconds, 9, 0)}  {r.problem}")
    return "\n".join(lines)


def _num(value: float | None, width: int = 0, digits: int = 2) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


# ----------------------------------------------------------------------------- tables in the paper's layout

METRICS = ("clean_acc", "asr", "ra", "der")
# The paper's columns and which way is better (its note under Table 1: highest ACC, lowest ASR, highest DER).
SHOWN = (("clean_acc", "ACC", max), ("asr", "ASR", min), ("der", "DER", max))
NONE = "none"  # the attacked model's column and the CSV's defense value for it
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
        values = self.values.get(metric)
        return sum(values) / len(values) if values else None

    def std(self, metric: str) -> float | None:
        """The sample standard deviation over seeds; None for a single seed."""
        values = self.values.get(metric, [])
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


@dataclass
class Row:
    attack: str
    variant: str = ""  # what tells this row from others of the same attack in its table ('' when alone)
    cells: dict[str, Cell] = field(default_factory=dict)  # NONE and each defense

    @property
    def label(self) -> str:
        return f"{self.attack} ({self.variant})" if self.variant else self.attack


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
        return None if not values or any(v is None for v in values) else sum(values) / len(values)

    def cost(self, defense: str) -> float | None:
        """Wall time relative to FT, averaged over the attacks that have both."""
        return _mean(c for row in self.rows if defense in row.cells
                     for c in [_mean(row.cells[defense].costs)] if c is not None)


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _attack_keys(attack: str) -> set[str]:
    path = ROOT / "config" / "attack" / attack / "default.yaml"
    return set(read_yaml(path) or {}) if path.is_file() else set()


def _differences(settings: list[dict]) -> list[str]:
    """For each of several settings, the ``key=value`` pairs that tell it from the others."""
    keys = sorted({k for s in settings for k in s if len({_key({k: t.get(k)}) for t in settings}) > 1})
    return [", ".join(f"{k}={s.get(k)}" for k in keys) for s in settings]


def _seed_groups(runs_list: list[dict]) -> list[tuple[str, list[dict]]]:
    """The records of one row as (label, records) groups: all of them in one, averaged as seeds, when
    their seeds differ; otherwise one row per record, labelled with its folder name. Two records of
    one setting and one seed (a copied record, a rerun) are repeats, not seeds: averaging them would
    report a spread that no second seed measured."""
    seeds = [runs[NONE].settings.get("random_seed") for runs in runs_list]
    if len(set(map(str, seeds))) == len(seeds):
        return [("", runs_list)]
    return [(f"record {runs[NONE].record}", [runs]) for runs in runs_list]


def order(names, paper: list[str]) -> list[str]:
    names = set(names)
    return [n for n in paper if n in names] + sorted(names - set(paper))


def build_tables(rows: list[Result]) -> list[Table]:
    """Group the sound results into tables: one per (dataset, model, training setting); one row per
    attack (and attack setting); records that differ only in their seed averaged in one cell."""
    records: dict[str, dict[str, Result]] = {}
    for r in rows:
        if not r.problem:
            records.setdefault(r.record, {})[NONE if r.defense == NO_DEFENSE else r.defense] = r
    # An attack's own settings tell rows apart, not tables. Some attacks also set a training key of
    # their own (WaNet's and Input-aware's lr_scheduler, as in BackdoorBench): such a key is a row
    # setting for every attack in the collection, so that BadNets (cosine) and WaNet (MultiStepLR)
    # share the one table of their (dataset, model), as in the paper's Table 1.
    own = set().union(*(_attack_keys(a) for a in {r.attack for r in rows})) - TABLE_KEYS  # one read per attack
    groups: dict[tuple, dict] = {}
    for runs in records.values():
        if NONE not in runs:
            continue
        attack = runs[NONE]
        # A setting left at None is the same as one an older record does not list.
        setting = {k: v for k, v in attack.settings.items() if k not in NOT_SETTINGS and v is not None}
        common = {k: v for k, v in setting.items() if k not in own}
        specific = {k: v for k, v in setting.items() if k in own}
        table = groups.setdefault((attack.dataset, attack.model, _key(common)), {"common": common, "rows": {}})
        row = table["rows"].setdefault((attack.attack, _key(specific)), {"specific": specific, "runs": []})
        row["runs"].append(runs)

    tables = []
    for (dataset, model, _), group in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        siblings = [g["common"] for (d, m, _), g in groups.items() if (d, m) == (dataset, model)]
        setting = _differences(siblings)[siblings.index(group["common"])] if len(siblings) > 1 else ""
        built, defenses = [], set()
        for attack in order({a for a, _ in group["rows"]}, PAPER_ATTACKS):
            same = [v for (a, _), v in group["rows"].items() if a == attack]
            variants = _differences([v["specific"] for v in same]) if len(same) > 1 else [""] * len(same)
            for entry, variant in zip(same, variants):
                for name, runs_of_row in _seed_groups(entry["runs"]):
                    row = Row(attack, ", ".join(v for v in (variant, name) if v))
                    for runs in runs_of_row:
                        ft_wall = runs["ft"].wall_seconds if "ft" in runs else None
                        for defense, result in runs.items():
                            row.cells.setdefault(defense, Cell()).add(result, ft_wall if defense != NONE else None)
                    defenses |= set(row.cells) - {NONE}
                    built.append(row)
        tables.append(Table(dataset, model, setting, built, order(defenses, PAPER_DEFENSES),
                            settings=group["common"]))
    return tables


def rank_marks(values: dict[str, float | None], best) -> dict[str, str]:
    """``best`` / ``second`` for the defenses whose value, as shown (two decimals), is the best or the
    second-best distinct one (ties share the mark); nothing when fewer than two defenses have one."""
    shown = {k: round(v, 2) for k, v in values.items() if v is not None}
    if len(shown) < 2:
        return {}
    distinct = sorted(set(shown.values()), reverse=best is max)
    return {k: "best" if v == distinct[0] else "second" for k, v in shown.items()
            if v == distinct[0] or (len(distinct) > 1 and v == distinct[1])}


def _columns(table: Table) -> list[tuple[str, str, str, object]]:
    """(group, metric key, header, better) for every column: the attacked model's ACC and ASR, then
    ACC, ASR and DER of each defense."""
    return [(g, key, head, better) for g in [NONE] + table.defenses
            for key, head, better in SHOWN if not (g == NONE and key == "der")]


def _grid(table: Table) -> list[tuple[str, list[tuple[float | None, float | None, str]]]]:
    """The body: (row label, [(mean, std, mark) per column]), then the Average row."""
    columns = _columns(table)
    body = [(row.label, [(c.mean(key), c.std(key)) if (c := row.cells.get(g)) else (None, None)
                         for g, key, _, _ in columns]) for row in table.rows]
    body.append(("Average", [(table.average(g, key), None) for g, key, _, _ in columns]))
    marked = []
    for label, values in body:
        marks = {}
        for key, _, better in SHOWN:  # each metric ranked across the defenses (the attacked model is not one)
            marks.update(rank_marks({i: values[i][0] for i, (g, k, _, _) in enumerate(columns)
                                     if k == key and g != NONE}, better))
        marked.append((label, [(m, s, marks.get(i, "")) for i, (m, s) in enumerate(values)]))
    return marked


def _value(mean: float | None, std: float | None, pm: str = "±") -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" {pm} {std:.2f}" if std is not None else "")


def format_text(table: Table) -> str:
    """The terminal table: column groups, mean ± std where several seeds were averaged, no marks."""
    columns = _columns(table)
    grid = _grid(table)
    cells = [[_value(m, s) for m, s, _ in values] for _, values in grid]
    widths = [max(7, len(head) + 1, *(len(c[i]) + 1 for c in cells)) for i, (_, _, head, _) in enumerate(columns)]
    label_w = max(16, *(len(label) + 2 for label, _ in grid))
    groups, line1, line2 = [NONE] + table.defenses, f"{'attack':<{label_w}}", f"{'':<{label_w}}"
    for g in groups:
        span = sum(w + 1 for (gg, _, _, _), w in zip(columns, widths) if gg == g)
        line1 += f"{('no defense' if g == NONE else g):^{span}}"
    for (_, _, head, _), w in zip(columns, widths):
        line2 += f"{head:>{w}} "
    lines = [line1.rstrip(), line2.rstrip()]
    for (label, _), row in zip(grid, cells):
        lines.append((f"{label:<{label_w}}" + "".join(f"{c:>{w}} " for c, w in zip(row, widths))).rstrip())
    if any(table.cost(d) is not None for d in table.defenses):
        costs = [f"{d} {_value(table.cost(d), None)}" for d in table.defenses]
        lines.append("wall time relative to FT (mean over attacks): " + ", ".join(costs))
    seeds = sorted({c.n_seeds for row in table.rows for c in row.cells.values()})
    note = f"; mean ± std over {'/'.join(map(str, seeds))} seeds" if any(n > 1 for n in seeds) else ""
    return f"{table.heading}, in %{note}\n" + "\n".join(lines)


def format_markdown(table: Table) -> str:
    """One Markdown table: best of each metric in each row bold, second underlined."""
    columns = _columns(table)
    style = {"best": "**{}**", "second": "<u>{}</u>", "": "{}"}
    head = ["attack"] + [(f"{'no defense' if g == NONE else g} {h}" if i == 0 or columns[i - 1][0] != g else h)
                         for i, (g, _, h, _) in enumerate(columns)]
    lines = [f"**{table.heading}** (in %; best of each metric per row in bold, second underlined)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(columns)]
    for label, values in _grid(table):
        cells = [style[mark].format(_value(m, s)) for m, s, mark in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tex(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def format_latex(table: Table) -> str:
    """One LaTeX table (booktabs): best bold, second underlined, mean $\\pm$ std."""
    columns = _columns(table)
    groups = [NONE] + table.defenses
    style = {"best": "\\textbf{{{}}}", "second": "\\underline{{{}}}", "": "{}"}
    spans, rules, col = [], [], 2
    for g in groups:
        n = sum(1 for c in columns if c[0] == g)
        spans.append(f"\\multicolumn{{{n}}}{{c}}{{{_tex('no defense' if g == NONE else g)}}}")
        rules.append(f"\\cmidrule(lr){{{col}-{col + n - 1}}}")
        col += n
    lines = ["% needs \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{{_tex(table.heading)} (\\%). Best per row in bold, second underlined.}}",
             "\\begin{tabular}{l" + "c" * len(columns) + "}", "\\toprule",
             " & " + " & ".join(spans) + " \\\\", " ".join(rules),
             "attack & " + " & ".join(h for _, _, h, _ in columns) + " \\\\", "\\midrule"]
    grid = _grid(table)
    for n, (label, values) in enumerate(grid):
        if n == len(grid) - 1:
            lines.append("\\midrule")
        cells = [style[mark].format(_value(m, s, "$\\pm$")) for m, s, mark in values]
        lines.append(f"{_tex(label)} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


CSV_COLUMNS = ["dataset", "model", "attack", "defense", "clean_acc", "asr", "ra", "der", "n_seeds",
               "clean_acc_std", "asr_std", "ra_std", "der_std", "wall_seconds", "wall_vs_ft", "setting", "records"]


def csv_rows(tables: list[Table]) -> list[dict]:
    """Long form: one row per (attack, defense) of each table, then one Average row per defense."""
    def fmt(v):
        return "" if v is None else f"{v:.2f}"
    out = []
    for t in tables:
        for row in t.rows:
            setting = "; ".join(s for s in (t.setting, row.variant) if s)
            for d in [NONE] + t.defenses:
                c = row.cells.get(d)
                if c is None:
                    continue
                out.append({"dataset": t.dataset, "model": t.model, "attack": row.attack, "defense": d,
                            **{m: fmt(c.mean(m)) for m in METRICS}, "der": "" if d == NONE else fmt(c.mean("der")),
                            "n_seeds": c.n_seeds, **{f"{m}_std": fmt(c.std(m)) for m in METRICS},
                            "wall_seconds": fmt(_mean(c.walls)), "wall_vs_ft": fmt(_mean(c.costs)),
                            "setting": setting, "records": " ".join(c.records)})
        for d in [NONE] + t.defenses:
            cells = [row.cells[d] for row in t.rows if d in row.cells]
            out.append({"dataset": t.dataset, "model": t.model, "attack": "Average", "defense": d,
                        **{m: fmt(t.average(d, m)) for m in METRICS},
                        "der": "" if d == NONE else fmt(t.average(d, "der")),
                        "n_seeds": min((c.n_seeds for c in cells), default=0),
                        **{f"{m}_std": "" for m in METRICS}, "wall_seconds": "",
                        "wall_vs_ft": fmt(t.cost(d)), "setting": t.setting, "records": ""})
    return out


def save_cost_figure(tables: list[Table], path: Path) -> bool:
    """The paper's Figure 3 question as a PNG: each defense's wall time relative to FT, one panel per
    table (bars: the mean over attacks; dots: each attack). False when no table has FT."""
    tables = [t for t in tables if "ft" in t.defenses and any(t.cost(d) is not None for d in t.defenses)]
    if not tables:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6, 0.8 * max(len(t.defenses) for t in tables))
    fig, axes = plt.subplots(len(tables), 1, figsize=(width, 3.5 * len(tables)), squeeze=False)
    for ax, t in zip(axes[:, 0], tables):
        xs = range(len(t.defenses))
        ax.bar(xs, [t.cost(d) or 0 for d in t.defenses], color="#8fb3d9", label="mean over attacks")
        for row in t.rows:
            points = [(x, c) for x, d in zip(xs, t.defenses) if d in row.cells
                      for c in [_mean(row.cells[d].costs)] if c is not None]
            ax.plot([x for x, _ in points], [c for _, c in points], "o", ms=4, label=row.label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(list(xs), t.defenses)
        ax.set_ylabel("wall time / FT's")
        ax.set_title(textwrap.fill(t.heading, 110), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_tables(tables: list[Table], prefix: Path) -> list[Path]:
    """``PREFIX.csv``, ``PREFIX.md``, ``PREFIX.tex`` and ``PREFIX_cost.png``, each written atomically."""
    import pandas as pd
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = [prefix.with_name(prefix.name + ext) for ext in (".csv", ".md", ".tex")]
    write_text(written[0], pd.DataFrame(csv_rows(tables), columns=CSV_COLUMNS).to_csv(index=False))
    write_text(written[1], "\n\n".join(format_markdown(t) for t in tables) + "\n")
    write_text(written[2], "\n\n".join(format_latex(t) for t in tables) + "\n")
    cost = prefix.with_name(prefix.name + "_cost.png")
    if save_cost_figure(tables, cost):
        written.append(cost)
    return written


def paper_table(path: Path = ROOT / "config" / "paper" / "d3_table1.yaml", attacks=None, defenses=None) -> Table:
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
