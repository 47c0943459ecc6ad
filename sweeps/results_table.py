"""Build the D3 paper's tables from a folder of records (or one record's folder).

    python sweeps/results_table.py --record_dir record
    python sweeps/results_table.py --record_dir record --out results/table1 --paper
    python sweeps/results_table.py --record_dir record/badnet_demo --runs

Nothing is re-run: every attack and defense ``summary.json`` under the folder is read once its run is
verified (its ``record.json`` of this format and schema, every file it lists with the SHA-256 it lists,
its config and summary readable). Unfinished, damaged or stale runs are left out and listed under the
tables, one line each with the reason; the rest are built. A folder listed twice (a symbolic link
beside it) counts once, under its own name. A record ``--overwrite`` replaced (kept beside it as
``<name>.replaced-<YYYYmmdd-HHMMSS>``) is not shown unless ``--include_replaced`` is given: then it is a
row of its own, named by its folder. One table per (dataset, model, training setting), in the paper's
layout: attacks as rows, the attacked model and each defense as ACC / ASR / DER column groups, an
Average row (the mean of each column over attacks, DER included), records that differ only in their
seed shown as mean ± std (records of one seed are repeats: a row each, named by its folder). A row
whose attacked model's ASR is below 50% is marked (a footnote; ``weak_attack`` in the CSV): with no
backdoor to remove, its DER means nothing. ``--out PREFIX`` also writes ``PREFIX.csv`` (long form, one
row per attack and defense), ``PREFIX.md`` and ``PREFIX.tex`` (best value of each metric per row in
bold, second underlined) and ``PREFIX_cost.png`` (each defense's wall time relative to FT); ``--out
DIR/`` (a trailing slash, or a folder that exists) writes ``DIR/table.csv``, ``DIR/table.md``,
``DIR/table.tex`` and ``DIR/table_cost.png``. ``--paper`` prints the paper's own Table 1 for the same
attacks and defenses below; ``--preset NAME`` puts the sweep preset's description (a smoke run's
epochs, rounds and subset) under the title of each table whose records it made (their model, epochs,
learning rate and training subset are the preset's).

``--ablation FLAG`` prints the paper's ablation layout instead (Tables 2, 3, 6, 7: the flag's values as
rows, ACC / ASR per attack and their Average; ``sweeps/ablation.py``), for one defense (``--defense
NAME`` where several vary the flag; for an attack flag, the defense output folder shown, or ``none``);
``--out PREFIX`` then writes ``PREFIX.csv``, ``PREFIX.md`` and ``PREFIX.png`` (ACC and ASR against the
flag's values, a line per attack); ``--paper`` prints the paper's own table of the flag below.

``--by_budget`` prints the paper's Table 5 layout instead (the adaptive attack, ``sweeps/adaptive.py``):
attack and defense as rows, each SAM budget the attacks were trained with (``--sam_rho``; the plain
attacks first) as ACC / ASR columns beside the paper's figures; ``--out PREFIX`` writes ``PREFIX.csv``
and ``PREFIX.md``. ``--runs`` lists every run under any layout.

    python sweeps/results_table.py --record_dir record/ablation --ablation lmd --out results/table7
    python sweeps/results_table.py --record_dir record --by_budget --out results/table5
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sweeps.ablation import CSV_COLUMNS, ablation_csv_rows, build_ablation, format_ablation_markdown, \
    format_ablation_text, paper_ablation
from sweeps.adaptive import CSV_COLUMNS as BUDGET_CSV_COLUMNS
from sweeps.adaptive import budget_csv_rows, build_budget_tables, format_budget_markdown, format_budget_text
from sweeps.collect import NO_DEFENSE, collect, replaced_records
from sweeps.formats import format_runs, format_text
from sweeps.grouping import build_tables
from sweeps.paper import paper_table
from sweeps.presets import PRESETS, preset_made
from sweeps.table_files import save_ablation_figure, table_prefix, write_files, write_tables
from utils.cli import cli_main
from utils.errors import UserError


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record_dir", default="record", help="a folder of records, or one record's folder")
    p.add_argument("--out", default=None, help="also write PREFIX.csv, PREFIX.md, PREFIX.tex and PREFIX_cost.png; "
                   "a folder (DIR/ with its trailing slash, or a folder that exists) gets DIR/table.csv, "
                   "DIR/table.md, DIR/table.tex and DIR/table_cost.png (with --ablation: PREFIX.csv, PREFIX.md and "
                   "PREFIX.png)")
    p.add_argument("--runs", action="store_true", help="also list every run on its own line")
    p.add_argument("--paper", action="store_true", help="print the paper's Table 1 for the same attacks and defenses "
                   "(with --ablation: the paper's table of that flag)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the sweep preset that made the records: its "
                   "description (as this checkout defines it) goes under each table's title (sh/sweep.sh "
                   "passes it)")
    p.add_argument("--include_replaced", action="store_true", help="also show the records --overwrite replaced "
                   "(folders named <name>.replaced-<YYYYmmdd-HHMMSS>), each as a row of its own named by its folder")
    p.add_argument("--ablation", metavar="FLAG", help="the paper's ablation layout (Tables 2, 3, 6, 7) over this "
                   "attack or defense flag (pratio, lmd, eps, ratio...): its values as rows, ACC / ASR per attack "
                   "and their average; --out writes PREFIX.csv, PREFIX.md and PREFIX.png")
    p.add_argument("--defense", default=None, help="with --ablation: the defense whose runs vary the flag (where "
                   "several do); for an attack flag, the defense output folder shown (default: the only one; none: "
                   "the attacked models)")
    p.add_argument("--by_budget", action="store_true", help="the paper's Table 5 layout (the adaptive attack): "
                   "attack and defense as rows, each SAM budget (--sam_rho) as ACC / ASR columns beside the "
                   "paper's; --out writes PREFIX.csv and PREFIX.md")
    args = p.parse_args(argv)
    if args.defense is not None and not args.ablation:
        raise UserError("--defense goes with --ablation FLAG; leave it out for the full tables")
    if args.ablation and args.by_budget:
        raise UserError("--ablation and --by_budget are two layouts; give one of them")
    if args.paper and args.by_budget:
        raise UserError("--by_budget already shows the paper's Table 5 figures beside ours: leave --paper out")
    if args.preset and args.ablation:
        raise UserError("--preset captions the full and the --by_budget tables; leave it out with --ablation")
    prefix = table_prefix(args.out) if args.out else None  # refused before anything is read
    rows = collect(Path(args.record_dir), include_replaced=args.include_replaced)
    preset = PRESETS[args.preset] if args.preset else None
    if args.ablation:
        parts, write = _ablation(args, rows)
    elif args.by_budget:
        parts, write = _by_budget(args, build_tables(rows), preset)
    else:
        parts, write = _full_tables(args, build_tables(rows), preset)
    if args.runs:
        parts.append(format_runs(rows))
    problems = [f"  {r.record}{'' if r.defense == NO_DEFENSE else '/defense/' + r.defense}: {r.problem}"
                for r in rows if r.problem]
    if problems:
        parts.append("left out:\n" + "\n".join(problems))
    hidden = [] if args.include_replaced else replaced_records(Path(args.record_dir))
    if hidden:
        parts.append(f"not shown: {len(hidden)} record(s) replaced by --overwrite ({', '.join(hidden)}); "
                     f"--include_replaced shows them")
    if prefix is not None:
        parts.append("wrote " + ", ".join(str(p) for p in write(prefix)))
    text = "\n\n".join(parts)
    print(text)
    return text


def _caption(tables: list, name: str | None, preset) -> None:
    """``--preset NAME``: its description under the title of each table whose records it made."""
    for table in tables if preset else []:
        if preset_made(preset, table.model, table.settings):
            table.caption = f"preset {name}: {preset.about}"


def _full_tables(args: argparse.Namespace, tables: list, preset) -> tuple[list[str], object]:
    """The paper's Table 1 layout, one table per (dataset, model, training setting), and their writer."""
    _caption(tables, args.preset, preset)
    parts = [format_text(t) for t in tables] or ["no finished records found"]
    if args.paper and tables:
        paper = paper_table(attacks={r.attack for t in tables for r in t.rows},
                            defenses={d for t in tables for d in t.defenses})
        parts.append(format_text(paper) if paper.rows else "the paper's Table 1 has none of these attacks")
    return parts, lambda prefix: write_tables(tables, prefix)


def _by_budget(args: argparse.Namespace, tables: list, preset) -> tuple[list[str], object]:
    """``--by_budget``: the paper's Table 5 layout (``sweeps/adaptive.py``), and its writer."""
    import pandas as pd
    budget_tables = build_budget_tables(tables)
    _caption(budget_tables, args.preset, preset)
    return [format_budget_text(t) for t in budget_tables], lambda prefix: write_files(prefix, [
        (".csv", pd.DataFrame(budget_csv_rows(budget_tables), columns=BUDGET_CSV_COLUMNS).to_csv(index=False)),
        (".md", "\n\n".join(format_budget_markdown(t) for t in budget_tables) + "\n")], "Table 5 files")


def _ablation(args: argparse.Namespace, rows: list) -> tuple[list[str], object]:
    """``--ablation FLAG``: the ablation tables, and their writer."""
    import pandas as pd
    flag = args.ablation.lstrip("-")
    tables, left_out = build_ablation(rows, Path(args.record_dir), flag, args.defense)
    parts = [format_ablation_text(t) for t in tables]
    if left_out:
        parts.append(f"not in the ablation (other settings than its rows'): {', '.join(left_out)}")
    if args.paper:
        paper = paper_ablation(flag)
        parts.append(format_ablation_text(paper) if paper else f"the D3 paper has no ablation over {flag} "
                     f"(its Tables 2, 3, 6, 7: pratio, ratio, eps, lmd)")
    return parts, lambda prefix: write_files(prefix, [
        (".csv", pd.DataFrame(ablation_csv_rows(tables), columns=CSV_COLUMNS).to_csv(index=False)),
        (".md", "\n\n".join(format_ablation_markdown(t) for t in tables) + "\n")], "ablation files",
        lambda prefix: save_ablation_figure(tables, prefix.with_name(prefix.name + ".png")))


if __name__ == "__main__":
    cli_main(main)
