"""Benchmark: BadNets, then FT and D3, through the real command-line scripts; prints one table.

    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset cpu
    python sh/bench.py --dataset_path ../shared/data/cifar10-jpeg.zip --preset gpu

``cpu`` is a scaled-down run for 2 CPU cores (narrow PreAct-ResNet18, fewer epochs); ``gpu`` is the
paper's protocol for the BadNets row of Table 1 (full model, 100 attack epochs, FT and D3 with
100 epochs, batch 256, lr 0.01 on 5% clean data) and prints the paper's figures beside ours.
This prints figures; it is not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    # Narrow model and short schedules so the whole bench fits in ~30 minutes on 2 CPU cores.
    "cpu": dict(model="preactresnet18_w16", attack=["--epochs", "18", "--lr", "0.05", "--eval_every", "6"],
                defense=["--epochs", "60", "--eval_every", "20"]),
    # The paper's protocol (Sec. 4.1; BackdoorBench prototype for the attack).
    "gpu": dict(model="preactresnet18", attack=["--epochs", "100", "--eval_every", "10"],
                defense=["--epochs", "100", "--eval_every", "10"]),
}
# D3 paper, Table 1, BadNets row (CIFAR-10, PreAct-ResNet18, pratio 10%), in %.
PAPER = {"no defense": (91.32, 95.03, None), "ft": (89.96, 1.48, 96.10), "d3": (90.77, 0.74, 96.87)}


def run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_path", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--name", default=None, help="record name (default: bench_<preset>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--record_dir", default="record")
    p.add_argument("extra", nargs="*", help="flags passed to the attack (e.g. --batch_size 512)")
    a = p.parse_args()
    preset = PRESETS[a.preset]
    name = a.name or f"bench_{a.preset}"
    common = ["--dataset_path", a.dataset_path, "--device", a.device, "--record_dir", a.record_dir,
              "--overwrite"]
    py = sys.executable
    walls = {}
    walls["attack"] = run([py, "attack/badnet.py", "--save_folder_name", name, "--model", preset["model"],
                           *preset["attack"], *common, *a.extra])
    for defense in ("ft", "d3"):
        walls[defense] = run([py, f"defense/{defense}.py", "--result_file", name, *preset["defense"], *common])

    rec = ROOT / a.record_dir / name
    attack = json.loads((rec / "summary.json").read_text())
    rows = [("no defense", attack, walls["attack"])]
    for defense in ("ft", "d3"):
        rows.append((defense, json.loads((rec / "defense" / defense / "summary.json").read_text()), walls[defense]))

    data_note = " (CIFAR-10 JPEG copy)" if "jpeg" in a.dataset_path.lower() else ""
    print(f"\nBadNets -> FT / D3 on {attack['device']}, model {preset['model']}, preset {a.preset}{data_note}")
    head = (f"{'stage':<11}{'ACC':>7}{'ASR':>7}{'RA':>7}{'DER':>7}{'wall s':>9}{'train s':>9}"
            f"{'train img/s':>13}{'eval img/s':>12}")
    if a.preset == "gpu":
        head += f"   {'paper ACC':>9}{'paper ASR':>10}{'paper DER':>10}"
    print(head)
    for stage, s, wall in rows:
        d = f"{100 * s['der']:7.2f}" if "der" in s else f"{'-':>7}"
        train_s = s.get("train_seconds", s.get("wall_seconds_this_run", 0.0))
        line = (f"{stage:<11}{100 * s['clean_acc']:7.2f}{100 * s['asr']:7.2f}{100 * s['ra']:7.2f}{d}{wall:9.1f}"
                f"{train_s:9.1f}{s['train_images_per_s']:13.0f}{s['eval_images_per_s']:12.0f}")
        if a.preset == "gpu":
            pa = PAPER[stage]
            line += f"   {pa[0]:9.2f}{pa[1]:10.2f}{(f'{pa[2]:10.2f}' if pa[2] else '         -')}"
        print(line)
    ft, d3 = rows[1][1], rows[2][1]
    print(f"D3 / FT wall time at equal epochs: {d3['wall_seconds'] / ft['wall_seconds']:.3f} "
          f"(training loops only: {d3['train_seconds'] / ft['train_seconds']:.3f})")
    print(f"total wall time: {sum(walls.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
