"""How big a sweep is: the presets (``paper``, the D3 paper's protocol, and the scaled-down ones for
a CPU), which attack records a preset made, and the flags that size each defense run of a preset."""
from __future__ import annotations

from dataclasses import dataclass, field

from sweeps.settings import NOT_COMPARED, flag_matches, flag_values
from utils.config import CONFIG_DIR
from utils.record import read_yaml

IN_TRAINING = {"pdb"}  # defenses that train a new model on the poisoned set: an attack's cost, not a fine-tune's

# Presets scale defense schedules this long or longer (FT, FT-SAM, FP, D3: 100 epochs; SAU: 100 rounds).
LONG_SCHEDULE = 50


@dataclass(frozen=True)
class Preset:
    """How big a sweep is. ``paper`` is the D3 paper's protocol; the others are scaled down, and the
    table printed after them says so."""
    model: str
    attack_flags: tuple[str, ...] = ()
    defense_scale: float = 1.0   # multiplies defense schedules of LONG_SCHEDULE epochs or more
    evaluations: int = 10        # evaluations per defense run (its last epoch always among them)
    cuts: dict = field(default_factory=dict)  # script -> {flag: value}: lengths not counted in epochs
    about: str = ""


# SSBA's encoder on a CPU: the documented reduced setting (attack/ssba.py), not 20 epochs of 50,000 images:
# 20 epochs of 10,000 (3,140 steps, about 9 minutes on 2 CPU cores, once: the encoder is cached). Measured on
# CIFAR-10 (JPEG copy, one H100): PSNR 22.9 dB on the test images, where 6 epochs (942 steps) end before the
# bits open the image loss's gate and leave a visible trigger (PSNR 8.5 dB). The smoke preset keeps the
# short one: it checks that the pipeline runs, not what SSBA hides.
SSBA_CPU = {"ssba_encoder_epochs": 20, "ssba_encoder_subset": 10000, "ssba_l2_loss_await": 300,
            "ssba_l2_loss_ramp": 300}
SSBA_SMOKE = {**SSBA_CPU, "ssba_encoder_epochs": 6}

PRESETS = {
    "paper": Preset("preactresnet18", ("--eval_every", "10"),
                    about="the paper's protocol: PreAct-ResNet18, BackdoorBench's attack and defense settings"),
    # Narrow model and short schedules so that one attack with FT and D3 fits in ~25 minutes on 2 CPU cores.
    # NC keeps its 80 trigger epochs: cut to 20 on cpu_small it flagged nothing on BadNets (class 0's
    # mask norm 11.5 against 60-177, anomaly index 1.48), at 80 it flags class 0 (2.5 against 48-75, 5.83).
    "cpu": Preset("preactresnet18_w16", ("--epochs", "18", "--lr", "0.05", "--eval_every", "6"), 0.6, 3,
                  {"anp": {"nb_iter": 500, "print_every": 125},  # a quarter of ANP's 2,000 mask batches
                   "inputaware": {"clean_train_epochs": 2},      # 2 of 25 mask epochs (each ~3 narrow epochs)
                   "ssba": SSBA_CPU},
                  "narrow PreAct-ResNet18 (width 16), 18 attack epochs at lr 0.05, 100-epoch defense schedules "
                  "cut to 60"),
    "cpu_small": Preset("preactresnet18_w16", ("--epochs", "18", "--lr", "0.05", "--eval_every", "6",
                                               "--train_subset", "25000"), 0.6, 3,
                        {"anp": {"nb_iter": 500, "print_every": 125},
                         "inputaware": {"clean_train_epochs": 2}, "ssba": SSBA_CPU},
                        "as cpu, on a class-balanced half of the training set (the defender's 5% is 1,250 images)"),
    # A smoke run: every attack and defense end to end in about an hour on 2 CPU cores; its figures
    # show that things work, not how well. BadNets, Blended and every defense: 64 min measured (76 with 2
    # evaluations per defense, ANP 200 batches and SAU 20 rounds, before the cuts below).
    "smoke": Preset("preactresnet18_w16", ("--epochs", "6", "--lr", "0.05", "--eval_every", "3",
                                           "--train_subset", "10000"), 0.2, 1,
                    {"anp": {"nb_iter": 100, "print_every": 25}, "nc": {"nc_epoch": 5}, "sau": {"epochs": 10},
                     "inputaware": {"clean_train_epochs": 1}, "ssba": SSBA_SMOKE},
                    "SMOKE RUN: narrow PreAct-ResNet18 (width 16), 6 attack epochs on 10,000 training images "
                    "(the defender's 5% is 500), 100-epoch defense schedules cut to 20, SAU 10 rounds, ANP 100 "
                    "batches, NC 5 trigger epochs, PDB the attack's 6 epochs; each defense evaluated at its end"),
}


def preset_made(preset: Preset, model: str, settings: dict) -> bool:
    """Whether attack records of this model and these training settings are the preset's: its model,
    and the value of every attack flag it sets (its training subset None when it sets none). A folder
    of records may hold several presets' tables; only the preset's own get its description."""
    flags = {k: v for k, v in flag_values(preset.attack_flags).items() if k not in NOT_COMPARED}
    if model != preset.model or ("train_subset" not in flags and settings.get("train_subset") is not None):
        return False
    return all(flag_matches(asked, settings.get(key)) for key, asked in flags.items())


def defense_flags(defense: str, preset: Preset, epochs: int | None = None) -> list[str]:
    """The flags that size a defense run: its own schedule (``config/defense/<name>/config.yaml``),
    long ones scaled by the preset, or exactly ``epochs`` when given; the preset's cuts; and
    ``preset.evaluations`` evaluations. An in-training defense (PDB) trains a new model, so a
    scaled-down preset gives it the attack's schedule (epochs and learning rate) instead."""
    config = read_yaml(CONFIG_DIR / "defense" / defense / "config.yaml")
    cuts = dict(preset.cuts.get(defense, {}))
    cut_epochs = cuts.pop("epochs", None)  # a schedule of its own for this defense (SAU's rounds in smoke)
    flags = [f for k, v in cuts.items() for f in (f"--{k}", str(v))]
    if "epochs" not in config:
        return flags
    n = int(config["epochs"]) if epochs is None else epochs
    attack = flag_values(preset.attack_flags)
    if defense in IN_TRAINING and preset.defense_scale < 1 and epochs is None and "epochs" in attack:
        n = int(attack["epochs"])
        flags += ["--lr", attack["lr"]] if "lr" in attack else []
    elif epochs is None and cut_epochs is not None:
        n = int(cut_epochs)
    elif epochs is None and n >= LONG_SCHEDULE:
        n = max(1, round(n * preset.defense_scale))
    return ["--epochs", str(n), "--eval_every", str(max(1, n // preset.evaluations))] + flags
