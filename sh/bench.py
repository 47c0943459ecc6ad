"""Benchmark: attacks, then defenses on each, through the real command-line scripts; prints the D3
paper's Table 1 layout (attacks as rows; no defense and each defense as ACC / ASR / DER column groups)
and the wall time of every stage.

    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset cpu
    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset cpu_small --attacks sig,wanet
    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset gpu

Presets: ``cpu`` is a scaled-down run for 2 CPU cores (narrow PreAct-ResNet18, 18 attack epochs at
lr 0.05, 60 defense epochs; about 25 minutes per attack); ``cpu_small`` is the same on a class-balanced
half of the training set (``--train_subset 25000``, so the defender's 5% is 1,250 images; about 13
minutes per attack), stated as such in the table; ``gpu`` is the paper's protocol (full model,
BackdoorBench's 100 attack epochs, FT and D3 with 100 epochs, batch 256, lr 0.01 on 5% clean data)
and prints the paper's figures beside ours. ``--clean`` first trains BackdoorBench's prototype (the
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

from utils.results import NO_DEFENSE, collect, format_paper_table  # noqa: E402
from utils.runner import is_finished  # noqa: E402

PRESETS = {
    # Narrow model and short schedules so that one attack row fits in ~25 minutes on 2 CPU cores.
    "cpu": dict(model="preactresnet18_w16", attack=["--epochs", "18", "--lr", "0.05", "--eval_every", "6"],
                defense=["--epochs", "60", "--eval_every", "20"]),
    "cpu_small": dict(model="preactresnet18_w16", attack=["--epochs", "18", "--lr", "0.05", "--eval_every", "6",
                                                          "--train_subset", "25000"],
                      defense=["--epochs", "60", "--eval_every", "20"]),
    # The paper's protocol (Sec. 4.1; BackdoorBench's defaults for each attack).
    "gpu": dict(model="preactresnet18", attack=["--eval_every", "10"], defense=["--epochs", "100", "--eval_every", "10"]),
}
ATTACKS = ["badnet", "blended", "sig", "wanet", "lf"]
DEFENSES = ["ft", "d3"]
# D3 paper, Table 1 (CIFAR-10, PreAct-ResNet18, pratio 10%), in %: attack -> stage -> (ACC, ASR, DER).
PAPER = {
    "badnet": {NO_DEFENSE: (91.32, 95.03, None), "ft": (89.96, 1.48, 96.10), "d3": (90.77, 0.74, 96.87)},
    "blended": {NO_DEFENSE: (93.47, 99.92, None), "ft": (92.78, 96.11, 51.56), "d3": (92.29, 0.22, 99.26)},
    "wanet": {NO_DEFENSE: (91.25, 89.73, None), "ft": (93.48, 17.10, 86.32), "d3": (93.31, 0.04, 94.84)},
    "lf": {NO_DEFENSE: (93.19, 99.28, None), "ft": (92.37, 78.44, 60.01), "d3": (92.37, 1.31, 98.57)},
    "sig": {NO_DEFENSE: (84.48, 98.27, None), "ft": (90.80, 2.37, 97.95), "d3": (89.99, 0.00, 99.13)},
}


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
            run([py, f"defense/{defense}.py", "--result_file", name, *preset["defense"], *common])

    rows = [r for r in collect(records) if r.record.startswith(prefix)
            and r.record[len(prefix):] in (["prototype"] if a.clean else []) + attacks]
    data_note = " (CIFAR-10 JPEG copy, not the original pickles)" if "jpeg" in a.dataset_path.lower() else ""
    subset = " on a class-balanced half of the training set" if a.preset == "cpu_small" else ""
    device = next((r.summary.get("device") for r in rows if r.summary), "?")
    print(f"\nTable 1 layout: {preset['model']}, preset {a.preset}{subset}, device {device}{data_note}, in %")
    print(format_paper_table(rows, defenses))
    if a.preset == "gpu":
        print("\nthe paper's Table 1 (original CIFAR-10, PreAct-ResNet18):")
        for attack in attacks:
            cells = "   ".join(f"{s}: " + " / ".join("-" if v is None else f"{v:.2f}" for v in PAPER[attack][s])
                               for s in [NO_DEFENSE] + defenses if s in PAPER.get(attack, {}))
            print(f"  {attack:<10}{cells}")
    by_stage = {(r.record, r.defense): r for r in rows}
    for attack in attacks:
        ft, d3 = by_stage.get((prefix + attack, "ft")), by_stage.get((prefix + attack, "d3"))
        if ft and d3 and ft.wall_seconds and d3.wall_seconds:
            print(f"{attack}: D3 / FT wall time at equal epochs: {d3.wall_seconds / ft.wall_seconds:.2f}")


if __name__ == "__main__":
    main()
