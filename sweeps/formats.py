"""Tables as text: the terminal's table, Markdown, LaTeX (best of each metric per row marked) and the
rows of a long CSV; and a collection's runs one line each. ``sweeps/table_files.py`` writes them.
A row whose attacked model has no backdoor to remove (:data:`~sweeps.tables.MIN_BACKDOOR_ASR`) is marked
with a footnote in text, Markdown and LaTeX, and flagged in the CSV's ``weak_attack`` column."""
from __future__ import annotations

from sweeps.collect import Result
from sweeps.tables import METRICS, NONE, WEAK_MARK, WEAK_NOTE, Table
from utils.metrics import mean

# The paper's columns and which way is better (its note under Table 1: highest ACC, lowest ASR, highest DER).
SHOWN = (("clean_acc", "ACC", max), ("asr", "ASR", min), ("der", "DER", max))


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


def _grid(table: Table) -> list[tuple[str, list[tuple[float | None, float | None, str]], bool]]:
    """The body: (row label, [(mean, std, mark) per column], weak attack), then the Average row."""
    columns = _columns(table)
    body = [(row.label, [(c.mean(key), c.std(key)) if (c := row.cells.get(g)) else (None, None)
                         for g, key, _, _ in columns]) for row in table.rows]
    body.append(("Average", [(table.average(g, key), None) for g, key, _, _ in columns]))
    weak = [row.weak for row in table.rows] + [False]
    marked = []
    for label, values in body:
        marks = {}
        for key, _, better in SHOWN:  # each metric ranked across the defenses (the attacked model is not one)
            marks.update(rank_marks({i: values[i][0] for i, (g, k, _, _) in enumerate(columns)
                                     if k == key and g != NONE}, better))
        marked.append((label, [(m, s, marks.get(i, "")) for i, (m, s) in enumerate(values)], weak[len(marked)]))
    return marked


def _weak_note(table: Table) -> list[str]:
    """The footnote under a table with a row of an attack too weak to compare defenses on."""
    return [f"{WEAK_MARK} {WEAK_NOTE}"] if any(row.weak for row in table.rows) else []


def _value(mean: float | None, std: float | None, pm: str = "±") -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" {pm} {std:.2f}" if std is not None else "")


def format_text(table: Table) -> str:
    """The terminal table: column groups, mean ± std where several seeds were averaged, no marks."""
    columns = _columns(table)
    grid = _grid(table)
    cells = [[_value(m, s) for m, s, _ in values] for _, values, _ in grid]
    grid = [(f"{label} {WEAK_MARK}" if weak else label, values) for label, values, weak in grid]
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
    lines += _weak_note(table)
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
    for label, values, weak in _grid(table):
        cells = [style[mark].format(_value(m, s)) for m, s, mark in values]
        lines.append(f"| {label}{' ' + WEAK_MARK if weak else ''} | " + " | ".join(cells) + " |")
    note = _weak_note(table)
    return "\n".join(lines + ([""] + note if note else []))


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
    grid, dagger = _grid(table), "$^\\dagger$"
    for n, (label, values, weak) in enumerate(grid):
        if n == len(grid) - 1:
            lines.append("\\midrule")
        cells = [style[mark].format(_value(m, s, "$\\pm$")) for m, s, mark in values]
        lines.append(_tex(label) + (dagger if weak else "") + " & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if any(row.weak for row in table.rows):
        lines.append(f"\\par\\footnotesize {dagger} {_tex(WEAK_NOTE)}")
    lines.append("\\end{table}")
    return "\n".join(lines)


def csv_number(value: float | None) -> str:
    """A figure as the long CSVs write it: two decimals, empty where there is none."""
    return "" if value is None else f"{value:.2f}"


CSV_COLUMNS = ["dataset", "model", "attack", "defense", "clean_acc", "asr", "ra", "der", "n_seeds",
               "clean_acc_std", "asr_std", "ra_std", "der_std", "wall_seconds", "wall_vs_ft", "setting", "records",
               "weak_attack"]


def csv_rows(tables: list[Table]) -> list[dict]:
    """Long form: one row per (attack, defense) of each table, then one Average row per defense;
    ``weak_attack`` is yes where the attacked model's ASR is too low to compare defenses on."""
    out = []
    for t in tables:
        for row in t.rows:
            setting = "; ".join(s for s in (t.setting, row.variant) if s)
            for d in [NONE] + t.defenses:
                c = row.cells.get(d)
                if c is None:
                    continue
                out.append({"dataset": t.dataset, "model": t.model, "attack": row.attack, "defense": d,
                            **{m: csv_number(c.mean(m)) for m in METRICS},
                            "der": "" if d == NONE else csv_number(c.mean("der")),
                            "n_seeds": c.n_seeds, **{f"{m}_std": csv_number(c.std(m)) for m in METRICS},
                            "wall_seconds": csv_number(mean(c.walls)), "wall_vs_ft": csv_number(mean(c.costs)),
                            "setting": setting, "records": " ".join(c.records),
                            "weak_attack": "yes" if row.weak else "no"})
        for d in [NONE] + t.defenses:
            cells = [row.cells[d] for row in t.rows if d in row.cells]
            out.append({"dataset": t.dataset, "model": t.model, "attack": "Average", "defense": d,
                        **{m: csv_number(t.average(d, m)) for m in METRICS},
                        "der": "" if d == NONE else csv_number(t.average(d, "der")),
                        "n_seeds": min((c.n_seeds for c in cells), default=0),
                        **{f"{m}_std": "" for m in METRICS}, "wall_seconds": "",
                        "wall_vs_ft": csv_number(t.cost(d)), "setting": t.setting, "records": "", "weak_attack": ""})
    return out
