"""How results become tables (``build_tables``), as the D3 paper's Table 1 groups them: one
:class:`~sweeps.tables.Table` per (dataset, model, training setting), attacks as rows, defenses as
column groups, records that differ only in their seed averaged into one :class:`~sweeps.tables.Cell`."""
from __future__ import annotations

import json

from sweeps.collect import NO_DEFENSE, Result, is_replaced
from sweeps.paper import PAPER_ATTACKS, PAPER_DEFENSES, order
from sweeps.tables import NONE, Cell, Row, Table
from utils.config import CONFIG_DIR
from utils.flags import NOT_SETTINGS, TABLE_KEYS
from utils.record import read_yaml


def settings_key(settings: dict) -> str:
    """Settings as one string that compares equal where they do, whatever their key order."""
    return json.dumps(settings, sort_keys=True, default=str)


def _attack_keys(attack: str) -> set[str]:
    path = CONFIG_DIR / "attack" / attack / "default.yaml"
    return set(read_yaml(path) or {}) if path.is_file() else set()


def differences(settings: list[dict]) -> list[str]:
    """For each of several settings, the ``key=value`` pairs that tell it from the others."""
    keys = sorted({k for s in settings for k in s if len({settings_key({k: t.get(k)}) for t in settings}) > 1})
    return [", ".join(f"{k}={s.get(k)}" for k in keys) for s in settings]


def _seed_groups(runs_list: list[dict]) -> list[tuple[str, list[dict]]]:
    """The records of one row as (label, records) groups: all of them in one, averaged as seeds, when
    their seeds differ; otherwise one row per record, labelled with its folder name. Two records of
    one setting and one seed (a copied record, a rerun) are repeats, not seeds: averaging them would
    report a spread that no second seed measured. A record ``--overwrite`` replaced (shown when asked
    for) is never a seed of the one that replaced it: it is a row of its own, named by its folder."""
    replaced = [runs for runs in runs_list if is_replaced(runs[NONE].record)]
    current = [runs for runs in runs_list if not is_replaced(runs[NONE].record)]
    seeds = [runs[NONE].settings.get("random_seed") for runs in current]
    if current and len(set(map(str, seeds))) == len(seeds):
        groups = [("", current)]
    else:
        groups = [(f"record {runs[NONE].record}", [runs]) for runs in current]
    return groups + [(f"record {runs[NONE].record}", [runs]) for runs in replaced]


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
        table = groups.setdefault((attack.dataset, attack.model, settings_key(common)), {"common": common, "rows": {}})
        row = table["rows"].setdefault((attack.attack, settings_key(specific)), {"specific": specific, "runs": []})
        row["runs"].append(runs)

    tables = []
    for (dataset, model, _), group in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        siblings = [g["common"] for (d, m, _), g in groups.items() if (d, m) == (dataset, model)]
        setting = differences(siblings)[siblings.index(group["common"])] if len(siblings) > 1 else ""
        built, defenses = [], set()
        for attack in order({a for a, _ in group["rows"]}, PAPER_ATTACKS):
            same = [v for (a, _), v in group["rows"].items() if a == attack]
            variants = differences([v["specific"] for v in same]) if len(same) > 1 else [""] * len(same)
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
