"""Ablation axes of a sweep: a flag of ``--attack_args`` / ``--defense_args`` given a comma-separated
list (``--defense_args "--lmd 1,10,20"``, ``--attack_args "--pratio 0.01,0.1"``) is one run per value.

Which flags split: a flag whose argparse action, in the script it is passed to, takes exactly one
value of a number or a boolean type (``--pratio``, ``--lmd``, ``--eps``, ``--ratio``, ``--epochs``,
``--train_mode``). Never split: a flag that takes a list (``--steplr_milestones 100 150``, nargs), a
string flag (its value may hold commas of its own: D3's ``--select_layer_name layer4,linear``), a flag
the script does not have (the script refuses it, as without axes). A value without a comma is no axis,
so a sweep without lists plans exactly the jobs it always did (and imports no script to ask).

Names (:func:`axis_suffix`): every value of an axis is named, the default value too, so that a run of
an axis never shares a folder with the plain run of a sweep without axes, which may have been made with
any value: an attack axis goes into the record name (``<prefix><attack>_pratio0.1_s0``), a defense axis
into the defense's ``--save_name`` (``d3_lmd20``; after the user's own ``--save_name`` when given).
Several axes are crossed (every combination) and named in the order given (``d3_lmd20_eps0.1``).
An empty value, a value the flag's type refuses, or two values that are the same number: one line,
exit 2, before anything runs.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
from functools import lru_cache

from utils.config import str2bool
from utils.errors import UserError

SPLIT_TYPES = (int, float, str2bool)  # the argparse types whose one value may be given as a list


@lru_cache(maxsize=None)
def script_actions(kind: str, name: str) -> dict[str, argparse.Action]:
    """The argparse actions of ``<kind>/<name>.py`` by flag name (``--lmd`` -> its action), from the
    parser its runner builds (:func:`attack.runner.attack_parser`, :func:`defense.runner.defense_parser`)."""
    if kind == "attack":
        from attack.base import get_attack
        from attack.runner import attack_parser
        parser = attack_parser(get_attack(name))
    else:
        from defense.runner import defense_parser
        parser = defense_parser(importlib.import_module(f"defense.{name}").DEFENSE)
    return {opt: action for action in parser._actions for opt in action.option_strings}


def splits(action: argparse.Action | None) -> bool:
    """Whether a comma-separated value of this flag is a list of runs (see the module's docstring)."""
    return action is not None and action.nargs is None and action.type in SPLIT_TYPES


def _values(where: str, flag: str, text: str, action: argparse.Action) -> list[str]:
    values = text.split(",")
    if any(not v.strip() for v in values):
        raise UserError(f"{where}: {flag} {text} has an empty value; give comma-separated values, e.g. "
                        f"{flag} {','.join(v for v in values if v.strip()) or '1,10'}")
    values = [v.strip() for v in values]
    parsed = []
    for v in values:
        try:
            parsed.append(action.type(v))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise UserError(f"{where}: {flag} {text}: {v!r} is not a valid value for {flag}") from None
    if len(set(parsed)) < len(parsed):
        raise UserError(f"{where}: {flag} {text} gives one value twice; give each value once")
    return values


def axis_suffix(axes: tuple[tuple[str, str], ...]) -> str:
    """``_pratio0.1`` / ``_lmd20_eps0.1``: each axis's flag (without ``--``) and its value as given."""
    return "".join(f"_{flag.lstrip('-')}{value}" for flag, value in axes)


def expand(args: tuple[str, ...], kind: str, name: str,
           where: str) -> list[tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """One ``(args, axes)`` per combination of the axes in ``args`` (the flags for script
    ``<kind>/<name>.py``): the args with each list replaced by one of its values, and the
    ``(flag, value)`` pairs chosen. Without an axis: ``[(args, ())]``, ``args`` untouched."""
    if not any("," in a for a in args):
        return [(args, ())]
    actions = script_actions(kind, name)
    slots: list[tuple[int, str, str, list[str]]] = []  # (index of the token, flag, form, values)
    for i, token in enumerate(args):
        flag, eq, inline = token.partition("=")
        if not flag.startswith("--"):
            continue
        if eq:
            text, at, form = inline, i, "inline"
        elif i + 1 < len(args) and not args[i + 1].startswith("--") and (
                i + 2 == len(args) or args[i + 2].startswith("--")):
            text, at, form = args[i + 1], i + 1, "next"
        else:
            continue
        if "," in text and splits(actions.get(flag)):
            slots.append((at, flag, form, _values(where, flag, text, actions[flag])))
    if not slots:
        return [(args, ())]
    out = []
    for choice in itertools.product(*(values for _, _, _, values in slots)):
        new = list(args)
        for (at, flag, form, _), value in zip(slots, choice):
            new[at] = f"{flag}={value}" if form == "inline" else value
        out.append((tuple(new), tuple((flag, value) for (_, flag, _, _), value in zip(slots, choice))))
    return out


def with_save_name(args: tuple[str, ...], name: str) -> tuple[str, ...]:
    """``args`` with ``--save_name`` set to ``name`` (any ``--save_name`` given before removed)."""
    out, skip = [], False
    for i, token in enumerate(args):
        if skip:
            skip = False
            continue
        if token == "--save_name":
            skip = i + 1 < len(args)
            continue
        if token.startswith("--save_name="):
            continue
        out.append(token)
    return (*out, "--save_name", name)
