"""The files a table leaves: ``PREFIX.csv`` (long form), ``PREFIX.md``, ``PREFIX.tex``, and the cost
figure ``PREFIX_cost.png`` (each defense's wall time relative to FT), each written atomically."""
from __future__ import annotations

import textwrap
from pathlib import Path

from sweeps.formats import CSV_COLUMNS, csv_rows, format_latex, format_markdown
from sweeps.tables import Table
from utils.metrics import mean
from utils.plots import pyplot, save_figure
from utils.record import write_text


def save_cost_figure(tables: list[Table], path: Path) -> bool:
    """The paper's Figure 3 question as a PNG: each defense's wall time relative to FT, one panel per
    table (bars: the mean over attacks; dots: each attack). False when no table has FT."""
    tables = [t for t in tables if "ft" in t.defenses and any(t.cost(d) is not None for d in t.defenses)]
    if not tables:
        return False
    plt = pyplot()
    width = max(6, 0.8 * max(len(t.defenses) for t in tables))
    fig, axes = plt.subplots(len(tables), 1, figsize=(width, 3.5 * len(tables)), squeeze=False)
    for ax, t in zip(axes[:, 0], tables):
        xs = range(len(t.defenses))
        ax.bar(xs, [t.cost(d) or 0 for d in t.defenses], color="#8fb3d9", label="mean over attacks")
        for row in t.rows:
            points = [(x, c) for x, d in zip(xs, t.defenses) if d in row.cells
                      for c in [mean(row.cells[d].costs)] if c is not None]
            ax.plot([x for x, _ in points], [c for _, c in points], "o", ms=4, label=row.label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(list(xs), t.defenses)
        ax.set_ylabel("wall time / FT's")
        ax.set_title(textwrap.fill(t.heading, 110), fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
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
