"""Common flags a defense has no use for: each script declares them in ``Defense(ignored_flags=...)``; they
are accepted, and a value given for one is logged as ignored (defense/runner.py), never silently dropped.

Checked three ways: every declared name is a common setting and has a reason; reading each defense's
source, no declared flag is read and every other common setting is (``cfg.x`` or ``getattr(cfg, "x")``,
or through ``build_optimizer``, ``build_scheduler`` or the clean data's augmented ``loader``); and, by
running the defenses that declare some, a value given for each of them is logged and changes nothing."""
import ast
import importlib

import pytest
import torch
from conftest import ROOT, copy_record, run_args

from utils.config import add_common_arguments, new_parser
from utils.flags import NOT_SETTINGS
from utils.record import load_tensors

NAMES = ["ft", "fp", "nad", "nc", "anp", "i-bau", "ft-sam", "sau", "d3", "pdb"]
MODULES = {name: importlib.import_module(f"defense.{name}") for name in NAMES}

# Machine-local and runtime flags, and those naming the record (utils/flags.py), are outside the rule, as
# is --pretrained (a defense starts from the record's weights); --amp is in it: it changes the arithmetic.
OUT_OF_SCOPE = (NOT_SETTINGS | {"pretrained"}) - {"amp"}


def common_flags() -> set[str]:
    parser = new_parser("common")
    add_common_arguments(parser)
    return {a.dest for a in parser._actions if a.dest != "help"}


SETTINGS = common_flags() - OUT_OF_SCOPE


def _tree(relative: str) -> ast.AST:
    return ast.parse((ROOT / relative).read_text(), filename=relative)


def _is_cfg(node: ast.AST) -> bool:
    """``cfg`` or ``<x>.cfg``: the name every defense gives its configuration."""
    return (isinstance(node, ast.Name) and node.id == "cfg") or (isinstance(node, ast.Attribute) and node.attr == "cfg")


def cfg_reads(tree: ast.AST) -> set[str]:
    """The settings a piece of code reads: ``cfg.x`` and ``getattr(cfg, "x"[, default])``."""
    reads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_cfg(node.value):
            reads.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and _is_cfg(node.args[0]) and isinstance(node.args[1], ast.Constant)):
            reads.add(node.args[1].value)
    return reads


def _function(tree: ast.AST, name: str) -> ast.AST:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


# What the shared helpers read, from their own source.
HELPERS = {name: cfg_reads(_function(_tree("utils/train.py"), name)) for name in ("build_optimizer", "build_scheduler")}


def _augmentation() -> dict[str, str]:
    """The clean data's fields the runner fills from common flags ({"crop_padding": "random_crop_padding", ...})."""
    call = next(n for n in ast.walk(_tree("defense/runner.py")) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name) and n.func.id == "DefenderData")
    return {k.arg: k.value.attr for k in call.keywords if isinstance(k.value, ast.Attribute) and _is_cfg(k.value.value)}


AUGMENTATION = _augmentation()


def defense_reads(name: str) -> set[str]:
    """Every setting ``defense/<name>.py`` reads, directly or through the helpers; a read on any path
    (NC's unlearning runs only when a class is flagged) counts."""
    tree = _tree(f"defense/{name}.py")
    reads = cfg_reads(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            reads |= HELPERS.get(func, set())
            augment = {k.arg: k.value for k in node.keywords}.get("augment")
            unaugmented = isinstance(augment, ast.Constant) and augment.value is False
            if func == "loader" and not unaugmented:  # DefenderData.loader: augmented unless augment=False
                reads |= set(AUGMENTATION.values())
        elif isinstance(node, ast.Attribute) and node.attr in AUGMENTATION:  # PDB's own loader reads them
            reads.add(AUGMENTATION[node.attr])
    return reads


def test_the_source_reader_sees_what_the_helpers_and_the_runner_read():
    assert HELPERS["build_optimizer"] == {"client_optimizer", "lr", "sgd_momentum", "wd"}
    assert HELPERS["build_scheduler"] == {"lr_scheduler", "steplr_milestones", "steplr_stepsize", "steplr_gamma",
                                          "cos_t_max"}
    assert AUGMENTATION == {"crop_padding": "random_crop_padding", "hflip": "random_hflip"}
    assert {"epochs", "amp", "wd"} <= SETTINGS and not SETTINGS & OUT_OF_SCOPE


@pytest.mark.parametrize("name", NAMES)
def test_declared_flags_are_common_settings_with_a_reason(name):
    defense = MODULES[name].DEFENSE
    assert defense.name == name  # the log line names the script
    declared = defense.ignored_flags
    assert set(declared) <= SETTINGS, f"{name}: not common settings: {sorted(set(declared) - SETTINGS)}"
    assert all(isinstance(reason, str) and reason.strip() for reason in declared.values())


@pytest.mark.parametrize("name", NAMES)
def test_a_declared_flag_is_never_read_and_every_other_setting_is(name):
    declared, reads = set(MODULES[name].DEFENSE.ignored_flags), defense_reads(name)
    assert not declared & reads, f"{name} declares as ignored, yet reads: {sorted(declared & reads)}"
    unread = SETTINGS - declared - reads
    assert not unread, f"{name} never reads {sorted(unread)}: use them or declare them in its ignored_flags"


# Fast settings of the defenses that declare ignored flags, and a value for each such flag unlike the one in
# force (the record's augmentation is crop 4 and flip on).
RUNS = {"anp": ["--nb_iter", "4", "--print_every", "2", "--batch_size", "32"],
        "sau": ["--epochs", "1", "--batch_size", "50"]}
VALUES = {"epochs": ["7"], "client_optimizer": ["adam"], "wd": ["0.5"], "lr_scheduler": ["StepLR"],
          "steplr_milestones": ["1"], "steplr_stepsize": ["1"], "steplr_gamma": ["0.01"], "cos_t_max": ["1"],
          "random_crop_padding": ["2"], "random_hflip": ["false"]}
DECLARING = [name for name in NAMES if MODULES[name].DEFENSE.ignored_flags]


@pytest.fixture(scope="module")
def defend(tiny_data, tiny_record, tmp_path_factory):
    """``defend(name, save_name, extra_flags)``: the output folder of that run on a copy of the tiny record,
    run once per module."""
    root = tmp_path_factory.mktemp("ignored-flags")
    copy_record(tiny_record, root)
    done = {}

    def run(name: str, save_name: str, extra: list[str]):
        if save_name not in done:
            MODULES[name].main(["--result_file", "badnet", *run_args(tiny_data, root), "--ratio", "0.5",
                                "--save_name", save_name, *RUNS[name], *extra])
            done[save_name] = root / "badnet" / "defense" / save_name
        return done[save_name]
    return run


def test_every_declaring_defense_has_fast_settings_and_values():
    assert DECLARING and set(DECLARING) <= set(RUNS)
    for name in DECLARING:
        assert set(MODULES[name].DEFENSE.ignored_flags) <= set(VALUES), name


@pytest.mark.parametrize("name", DECLARING)
def test_a_value_given_for_an_ignored_flag_is_logged_and_changes_nothing(defend, name):
    declared = MODULES[name].DEFENSE.ignored_flags
    plain = defend(name, f"{name}-plain", [])
    given = defend(name, f"{name}-flags", [arg for flag in declared for arg in [f"--{flag}", *VALUES[flag]]])
    log = (given / "defense.log").read_text()
    for flag, reason in declared.items():
        assert f"{name} does not use --{flag} ({reason}); the value given is ignored" in log
    before, after = load_tensors(plain / "model.safetensors"), load_tensors(given / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_anp_given_epochs_logs_it_as_ignored_and_runs(defend):
    out = defend("anp", "anp-epochs", ["--epochs", "7"])  # returns normally: no error, no refusal
    assert (out / "record.json").is_file() and (out / "summary.json").is_file()  # a finished output
    assert "anp does not use --epochs" in (out / "defense.log").read_text()


def test_a_run_without_the_flag_logs_nothing_about_it(defend):
    log = (defend("anp", "anp-plain", []) / "defense.log").read_text()
    assert "does not use --" not in log
