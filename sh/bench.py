"""Benchmark: attacks, then defenses on each, through the real command-line scripts; prints the D3
paper's Table 1 layout (attacks as rows; no defense and each defense as ACC / ASR / DER column groups)
and the wall time of every stage.

    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset cpu
    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset cpu_small --attacks sig,wanet
    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset gpu

Presets: ``cpu`` is a scaled-down run for 2 CPU cores (narrow PreAct-ResNet18, 18 attack epochs at
lr 0.05; each defense with its own settings, the 100-epoch ones (FT, FT-SAM, D3, SAU's rounds)
shortened to 60; about 25 minutes per attack and FT / D3); ``cpu_small`` is the same on a
class-balanced half of the training set (``--train_subset 25000``, so the defender's 5% is 1,250
images), stated as such in the table; ``gpu`` is the paper's protocol (full model, BackdoorBench's
100 attack epochs, every defense with its published settings on 5% clean data) and prints the
paper's figures beside ours. ``--defenses`` defaults to every defense there is, in the paper's order,
and the table adds each defense's wall time relative to FT's. ``--clean`` first trains BackdoorBench's prototype (the
same model and schedule, nothing poisoned), the clean accuracy an attack's is compared with.
Blended uses BackdoorBench's hello_kitty.jpeg and LF its cifar10_preactresnet18 pattern, from
``--resource_dir``. Records go to ``--record_dir``/bench_<preset>_<attack>; a rerun replaces them,
unless ``--skip_done`` keeps every finished attack record and defense output (so more defenses can be
added to the same records later, or an interrupted bench continues). This prints figures; it is not a test.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.record import read_yaml  # noqa: E402
from utils.results import NO_DEFENSE, collect, format_paper_table  # noqa: E402
from utils.runner import is_finished  # noqa: E402

PRESETS = {
    # Narrow model and short schedules so that one attack row fits in ~25 minutes on 2 CPU cores.
    "cpu": dict(model="preactresnet18_w16", attack=["--epochs", "18", "--lr", "0.05", "--eval_every", "6"],
                defense_epochs=0.6, evaluations=3),
    "cpu_small": dict(model="preactresnet18_w16", attack=["--epochs", "18", "--lr", "0.05", "--eval_every", "6",
                                                          "--train_subset", "25000"],
                      defense_epochs=0.6, evaluations=3),
    # The paper's protocol (Sec. 4.1; BackdoorBench's defaults for each attack and defense).
    "gpu": dict(model="preactresnet18", attack=["--eval_every", "10"], defense_epochs=1.0, evaluations=10),
}
LONG_SCHEDULE = 50  # the CPU presets shorten defense schedules this long or longer (100 epochs -> 60)


# Settings the CPU presets cut where a defense's length is not counted in epochs (published values in
# config/defense/<name>/config.yaml; the table names every cut).
CPU_CUTS = {"anp": {"nb_iter": 500, "print_every": 125},  # a quarter of ANP's 2,000 mask batches
            "nc": {"nc_epoch": 20}}  # a quarter of NC's 80 reverse-engineering epochs


def defense_flags(defense: str, preset: dict) -> list[str]:
    """Each defense runs its own default schedule, long ones shortened by the preset's factor
    (FT, FT-SAM, D3, FP: 100 epochs, SAU: 100 rounds -> 60 on the CPU; NAD's 10 + 10 epochs and
    i-BAU's 5 rounds in full; ANP's batches and NC's trigger epochs by :data:`CPU_CUTS`), evaluated
    ``evaluations`` times."""
    config = read_yaml(ROOT / "config" / "defense" / defense / "config.yaml")
    cuts = CPU_CUTS.get(defense, {}) if preset["defense_epochs"] < 1 else {}
    flags = [f for k, v in cuts.items() for f in (f"--{k}", str(v))]
    if "epochs" not in config:
        return flags
    epochs = int(config["epochs"])
    if epochs >= LONG_SCHEDULE:
        epochs = round(epochs * preset["defense_epochs"])
    return ["--epochs", str(epochs), "--eval_every", str(max(1, epochs // preset["evaluations"]))] + flags


ATTACKS = ["badnet", "blended", "sig", "wanet", "lf"]
# The paper's Table 1 column order; the default is every one of them that exists here.
PAPER_DEFENSES = ["ft", "anp", "fp", "nc", "nad", "i-bau", "ft-sam", "sau", "d3"]
DEFENSES = [d for d in PAPER_DEFENSES if (ROOT / "defense" / f"{d}.py").is_file()]
# D3 paper, Table 1 (CIFAR-10, PreAct-ResNet18, pratio 10%), in %: attack -> stage -> (ACC, ASR, DER).
_PAPER_STAGES = [NO_DEFENSE] + PAPER_DEFENSES
_PAPER_ROWS = {
    "badnet": [(91.32, 95.03), (89.96, 1.48, 96.10), (90.88, 4.88, 94.86), (91.31, 57.13, 68.95),
               (89.05, 1.27, 95.75), (89.87, 2.14, 95.72), (89.15, 1.21, 95.83), (91.49, 2.28, 96.38),
               (88.56, 1.33, 95.47), (90.77, 0.74, 96.87)],
    "blended": [(93.47, 99.92), (92.78, 96.11, 51.56), (92.97, 84.88, 57.27), (93.17, 99.26, 50.18),
                (93.47, 99.92, 50.00), (92.17, 97.69, 50.47), (87.08, 50.53, 71.46), (92.67, 11.61, 93.76),
                (90.24, 1.57, 97.56), (92.29, 0.22, 99.26)],
    "wanet": [(91.25, 89.73), (93.48, 17.10, 86.32), (91.33, 2.22, 93.76), (91.46, 1.09, 94.32),
              (91.80, 7.53, 91.10), (93.17, 22.98, 83.38), (89.49, 5.21, 91.38), (93.66, 1.31, 94.21),
              (90.32, 0.58, 94.11), (93.31, 0.04, 94.84)],
    "lf": [(93.19, 99.28), (92.37, 78.44, 60.01), (92.64, 39.99, 79.37), (92.90, 98.97, 50.01),
           (91.62, 1.41, 98.15), (92.37, 47.83, 75.31), (84.36, 44.96, 72.75), (92.68, 6.89, 95.94),
           (90.59, 0.71, 97.94), (92.37, 1.31, 98.57)],
    "inputaware": [(90.67, 98.26), (93.12, 1.72, 98.27), (91.04, 1.32, 98.47), (91.74, 0.04, 99.11),
                   (92.61, 0.76, 98.75), (93.18, 1.68, 98.29), (89.17, 27.08, 84.84), (93.50, 1.54, 98.36),
                   (91.08, 0.93, 98.66), (92.96, 0.06, 99.10)],
    "sig": [(84.48, 98.27), (90.80, 2.37, 97.95), (83.36, 36.42, 80.36), (89.10, 26.20, 86.03),
            (84.48, 98.27, 50.00), (90.02, 10.66, 93.81), (85.67, 3.68, 97.29), (91.13, 0.57, 98.85),
            (88.57, 1.84, 98.21), (89.99, 0.00, 99.13)],
    "ssba": [(92.88, 97.86), (92.14, 74.79, 61.16), (92.62, 60.17, 68.71), (92.54, 83.50, 57.01),
             (90.99, 0.58, 97.69), (91.91, 77.47, 59.74), (87.67, 3.97, 94.34), (92.12, 3.20, 96.95),
             (90.11, 0.31, 97.39), (91.85, 0.81, 98.01)],
}
PAPER = {attack: {s: (v + (None,))[:3] for s, v in zip(_PAPER_STAGES, cells)} for attack, cells in _PAPER_ROWS.items()}


def attack_flags(attack: str, resource_dir: Path) -> list[str]:
    """BackdoorBench's published trigger files, where the attack takes one."""
    if attack == "blended":
        return ["--attack_trigger_img_path", str(resource_dir / "blended" / "hello_kitty.jpeg")]
    if attack == "lf":
        return ["--lowFrequencyPatternPath", str(resource_dir / "lowFrequency" / "cifar10_preactresnet18_0_255.npy")]
    return []


def run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def names(value: str, known: list[str], what: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if not (ROOT / what / f"{v}.py").is_file()]
    if unknown:
        sys.exit(f"bench: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_path", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack scripts")
    p.add_argument("--defenses", default=",".join(DEFENSES), help="comma-separated defense scripts")
    p.add_argument("--clean", action="store_true", help="also train the clean prototype model first")
    p.add_argument("--resource_dir", default=str(ROOT.parent / "shared" / "data" / "backdoorbench-resource"))
    p.add_argument("--device", default="auto")
    p.add_argument("--record_dir", default="record")
    p.add_argument("--random_seed", default="0")
    p.add_argument("--skip_done", action="store_true",
                   help="keep finished attack records and defense outputs instead of rerunning them")
    a = p.parse_args()
    attacks = names(a.attacks, ATTACKS, "attack")
    defenses = names(a.defenses, DEFENSES, "defense")
    preset, resource = PRESETS[a.preset], Path(a.resource_dir)
    for needed in ("blended", "lf"):
        if needed in attacks and not any(Path(f).exists() for f in attack_flags(needed, resource)[1:]):
            sys.exit(f"bench: {needed} needs BackdoorBench's trigger file under {resource}; pass --resource_dir")
    common = ["--dataset_path", a.dataset_path, "--device", a.device, "--record_dir", a.record_dir,
              "--random_seed", a.random_seed, "--overwrite"]
    py = sys.executable
    records = Path(a.record_dir) if Path(a.record_dir).is_absolute() else ROOT / a.record_dir
    prefix = f"bench_{a.preset}_"
    for attack in (["prototype"] if a.clean else []) + attacks:
        name = prefix + attack
        if a.skip_done and is_finished(records / name):
            print(f"# {name}: finished record kept (--skip_done)", flush=True)
        else:
            run([py, f"attack/{attack}.py", "--save_folder_name", name, "--model", preset["model"], *preset["attack"],
                 *attack_flags(attack, resource), *common])
        for defense in ([] if attack == "prototype" else defenses):
            if a.skip_done and is_finished(records / name / "defense" / defense):
                print(f"# {name}/defense/{defense}: finished output kept (--skip_done)", flush=True)
                continue
            run([py, f"defense/{defense}.py", "--result_file", name, *defense_flags(defense, preset), *common])

    rows = [r for r in collect(records) if r.record.startswith(prefix)
            and r.record[len(prefix):] in (["prototype"] if a.clean else []) + attacks]
    data_note = " (CIFAR-10 JPEG copy, not the original pickles)" if "jpeg" in a.dataset_path.lower() else ""
    subset = " on a class-balanced half of the training set" if a.preset == "cpu_small" else ""
    device = next((r.summary.get("device") for r in rows if r.summary), "?")
    print(f"\nTable 1 layout: {preset['model']}, preset {a.preset}{subset}, device {device}{data_note}, in %")
    print(format_paper_table(rows, defenses))
    if preset["defense_epochs"] < 1:
        shortened = [f"{d} {' '.join(defense_flags(d, preset))}" for d in defenses]
        print("defense settings of this preset (published ones in config/defense/<name>/config.yaml): "
              + "; ".join(shortened))
    if a.preset == "gpu":
        print("\nthe paper's Table 1 (original CIFAR-10, PreAct-ResNet18):")
        for attack in attacks:
            cells = "   ".join(f"{s}: " + " / ".join("-" if v is None else f"{v:.2f}" for v in PAPER[attack][s])
                               for s in [NO_DEFENSE] + defenses if s in PAPER.get(attack, {}))
            print(f"  {attack:<10}{cells}")


if __name__ == "__main__":
    main()
