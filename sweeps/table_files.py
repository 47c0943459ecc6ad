"""The files a table leaves: ``PREFIX.csv`` (long form), ``PREFIX.md``, ``PREFIX.tex``, and the cost
figure ``PREFIX_cost.png`` (each defense's wall time relative to FT), each written atomically; and where
``--out`` puts them (:func:`table_prefix`: a folder means ``FOLDER/table.*``), refused in one line, before
anything is read, where no file can be written."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

from sweeps.ablation import SHOWN, Ablation, ablation_series, show
from sweeps.formats import CSV_COLUMNS, csv_rows, format_latex, format_markdown
from sweeps.tables import Table
from utils.metrics import mean
from utils.errors import UserError
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


def save_ablation_figure(tables: list[Ablation], path: Path) -> Path:
    """The ablation as curves: one row of panels per table, ACC and ASR against the flag's values (evenly
    spaced, labelled with the values, as the paper's rows are), a line per attack and the Average dashed;
    a value an attack has no run for is a gap. Returns ``path``."""
    plt = pyplot()
    fig, axes = plt.subplots(len(tables), len(SHOWN), figsize=(5 * len(SHOWN), 3.6 * len(tables)), squeeze=False)
    for row, t in zip(axes, tables):
        xs = list(range(len(t.values)))
        for ax, (metric, label) in zip(row, SHOWN):
            for attack, ys in ablation_series(t, metric).items():
                ys = [float("nan") if y is None else y for y in ys]
                style = {"ls": "--", "color": "black", "lw": 1} if attack == "Average" else {}
                ax.plot(xs, ys, marker="o", label=attack, **style)
            ax.set_xticks(xs, [show(v) for v in t.values])
            ax.set_xlabel(t.flag)
            ax.set_ylabel(f"{label} (%)")
            ax.set_title(textwrap.fill(f"{label}: {t.heading}", 60), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    return path


DEFAULT_NAME = "table"  # the files' name in a folder given as --out (FOLDER/table.csv, ...)
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"))  # the kernel's views, never a place for files


def table_prefix(out: str) -> Path:
    """The prefix of the files ``--out OUT`` asks for: ``OUT`` itself, or ``OUT/table`` where ``OUT``
    ends with a slash or is an existing folder. Refused (one line) where no file could be written:
    under a file, under /proc or /sys, under a folder this user may not write to."""
    folder_given = out.endswith(("/", os.sep)) or Path(out).is_dir()
    prefix = Path(out) / DEFAULT_NAME if folder_given else Path(out)
    advice = "give --out a prefix (or a folder ending with /) where you can write files, e.g. --out results/table1"
    where = prefix.parent.resolve()
    for system in SYSTEM_FOLDERS:
        if where == system or system in where.parents:
            raise UserError(f"--out {out}: {where} {'is' if where == system else 'is under'} {system}, a view of the "
                            f"kernel's state, not a place for files; {advice}")
    for folder in [where, *where.parents]:
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--out {out}: {folder} is a file, not a folder, so nothing can be written under it; "
                                f"{advice}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"--out {out}: this user may not write in {folder}; {advice}")
            break
    return prefix


def write_files(prefix: Path, texts: list[tuple[str, str]], what: str, figure=None) -> list[Path]:
    """``PREFIX<ext>`` for each ``(ext, text)``, each written atomically, then ``figure(prefix)`` (the
    path of a figure it drew, or None); when one cannot be written, those already written are removed
    and the error is one line naming ``what``."""
    written: list[Path] = []
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for ext, text in texts:
            path = prefix.with_name(prefix.name + ext)
            write_text(path, text)
            written.append(path)
        drawn = figure(prefix) if figure is not None else None
        if drawn is not None:
            written.append(drawn)
    except OSError as e:
        for path in written:
            path.unlink(missing_ok=True)
        raise UserError(f"cannot write the {what} {prefix}.* ({e.strerror or e}: {e.filename or prefix}); "
                        f"give --out a prefix (or a folder ending with /) where you can write files") from None
    return written


def write_tables(tables: list[Table], prefix: Path) -> list[Path]:
    """``PREFIX.csv``, ``PREFIX.md``, ``PREFIX.tex`` and ``PREFIX_cost.png`` (:func:`write_files`)."""
    import pandas as pd

    def cost_figure(prefix: Path) -> Path | None:
        cost = prefix.with_name(prefix.name + "_cost.png")
        return cost if save_cost_figure(tables, cost) else None

    return write_files(prefix, [(".csv", pd.DataFrame(csv_rows(tables), columns=CSV_COLUMNS).to_csv(index=False)),
                                (".md", "\n\n".join(format_markdown(t) for t in tables) + "\n"),
                                (".tex", "\n\n".join(format_latex(t) for t in tables) + "\n")],
                       "table files", cost_figure)
