"""Run a sweep: every attack, then every defense on each attack record, for each seed.

    python sweeps/launch.py --attacks badnet,blended --defenses all --preset cpu --device cpu \\
        --dataset_path ../shared/data/cifar10-jpeg.zip
    python sweeps/launch.py --attacks all --defenses all --seeds 0,1,2 --gpus all     # one job per GPU
    python sweeps/launch.py --attacks all --defenses all --executor slurm --slurm_partition gpu

``sh/sweep.sh`` and ``sh/table1.sh`` call this; ``python sweeps/results_table.py`` builds the table
afterwards. Jobs run the scripts by path, each with its log under ``<record_dir>/_logs/``. A job
whose output is already a finished run is skipped, an interrupted one is resumed, so the same command
continues a stopped sweep. A flag of ``--attack_args`` / ``--defense_args`` given a comma-separated
list is an ablation axis, one run per value (``sweeps/axes.py``, ``docs/ablations.md``). A line per
finished job gives its wall time and figures; a failed job gives its log's path and does not stop
the others. Exit code 1 when a job failed; 2, with one line, on bad input or when a sweep is already
running on the same ``--record_dir``.

Executors: ``pool`` (default) runs on this machine, one job per ``--gpus`` entry (each sees only its
GPU) or ``--jobs`` at a time without GPUs; ``slurm`` submits two job arrays through submitit (the
attacks, then the defenses after them); ``local`` is submitit's local executor (every job of an
array at once; meant for tests). Presets (``--preset``) set the model and the schedules; see
``sweeps/presets.py``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from sweeps.executors import run_pool, run_submitit
from sweeps.jobs import Sweep, choose
from sweeps.paper import PAPER_ATTACKS, PAPER_DEFENSES
from sweeps.presets import PRESETS
from sweeps.progress import Progress
from utils.cli import cli_main
from utils.config import ROOT
from utils.errors import UserError
from utils.output import check_writable, hold_lock

DEFAULT_RESOURCES = ROOT.parent / "shared" / "data" / "backdoorbench-resource"
SWEEP_LOCK = Path("_logs") / ".sweep.lock"  # under --record_dir


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _slots(gpus: str, jobs: int) -> list[str | None]:
    if not gpus:
        return [None] * jobs
    if gpus == "all":
        import torch
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("--gpus all: this machine has no CUDA GPU; leave --gpus out to run on the CPU")
        return [str(i) for i in range(count)]
    return [g.strip() for g in gpus.split(",") if g.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--attacks", default="all", help="comma-separated attack scripts, or all")
    g.add_argument("--defenses", default="all", help="comma-separated defense scripts, or all (or none)")
    g.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds; one record per attack and seed")
    g.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()).replace("%", "%%"))
    g.add_argument("--dataset", default="cifar10")
    g.add_argument("--dataset_path", default=None, help="dataset folder or .zip (default: the scripts' ./data)")
    g.add_argument("--model", default=None, help="model name (default: the preset's)")
    g.add_argument("--epochs", type=int, default=None, help="attack epochs (default: the preset's)")
    g.add_argument("--defense_epochs", type=int, default=None,
                   help="epochs of every defense that counts epochs (default: the preset's schedules)")
    g.add_argument("--device", default="auto")
    g.add_argument("--record_dir", default="record")
    g.add_argument("--prefix", default=None,
                   help="record names are PREFIX<attack>_s<seed> (default: <dataset>_<model>_[<preset>_])")
    g.add_argument("--resource_dir", default=str(DEFAULT_RESOURCES),
                   help="BackdoorBench's resource folder: Blended's hello_kitty.jpeg and LF's pattern are taken "
                        "from it when present")
    g.add_argument("--attack_args", default="", help="extra flags for every attack job, in one quoted string; a "
                   "number flag given comma-separated values (--pratio 0.01,0.1) is an axis: one record per value, "
                   "named <prefix><attack>_pratio0.01_s<seed> (docs/ablations.md)")
    g.add_argument("--defense_args", default="", help="extra flags for every defense job, in one quoted string; a "
                   "number flag given comma-separated values (--lmd 1,10,20) is an axis: one run per value, saved "
                   "as <defense>_lmd1 (its --save_name)")
    g.add_argument("--dry_run", action="store_true", help="print the jobs' commands and run nothing")
    g = p.add_argument_group("where to run")
    g.add_argument("--executor", choices=["pool", "slurm", "local"], default="pool")
    g.add_argument("--gpus", default="", help="pool: GPU ids for one job each (e.g. 0,1,2,3), or all")
    g.add_argument("--jobs", type=int, default=1, help="pool without --gpus: jobs at a time")
    g.add_argument("--slurm_partition", default=None)
    g.add_argument("--slurm_array_parallelism", type=int, default=64)
    g.add_argument("--timeout_min", type=int, default=24 * 60, help="slurm/local: limit of one job")
    g.add_argument("--cpus_per_job", type=int, default=8)
    g.add_argument("--submitit_dir", default=None, help="submitit's own files (default: <record_dir>/_submitit)")
    g.add_argument("--no_wait", action="store_true", help="slurm: submit and return instead of reporting each job")
    return p


def sweep_from(args: argparse.Namespace) -> Sweep:
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give at least 1")
    resources = Path(args.resource_dir)
    return Sweep(attacks=choose(args.attacks, "attack", PAPER_ATTACKS),
                 defenses=[] if args.defenses == "none" else choose(args.defenses, "defense", PAPER_DEFENSES),
                 seeds=args.seeds, preset=PRESETS[args.preset], preset_name=args.preset,
                 record_dir=Path(args.record_dir), dataset=args.dataset, dataset_path=args.dataset_path,
                 model=args.model, device=args.device, attack_epochs=args.epochs, defense_epochs=args.defense_epochs,
                 prefix=args.prefix, resource_dir=resources if resources.is_dir() else None,
                 attack_args=tuple(shlex.split(args.attack_args)), defense_args=tuple(shlex.split(args.defense_args)))


def sweep_lock(record_dir: Path):
    """Held while a launcher runs on ``record_dir`` (``<record_dir>/_logs/.sweep.lock``, with its pid):
    the same sweep started twice is refused in one line, exit 2, before it reports anything (so its
    ``sh/sweep.sh`` writes no table); a lock left by a killed launcher is taken over."""
    check_writable(record_dir / "_logs", "--record_dir")
    return hold_lock(record_dir / SWEEP_LOCK, lambda pid: f"a sweep is already running on {record_dir} (pid {pid}); "
                                                         f"wait for it or stop it")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sweep = sweep_from(args)
    jobs = sweep.jobs()
    if args.dry_run:
        for job in jobs:
            print(shlex.join([sys.executable, str(job.script.relative_to(ROOT)), *job.args]))
        return 0
    with sweep_lock(sweep.record_dir):
        return _launch(args, sweep, jobs)


def _launch(args: argparse.Namespace, sweep: Sweep, jobs: list) -> int:
    records = sum(job.kind == "attack" for job in jobs)
    print(f"sweep: {len(jobs)} jobs ({records} attack record(s): {len(sweep.attacks)} attack(s) x "
          f"{len(sweep.seeds)} seed(s){' x axis values' if records > len(sweep.attacks) * len(sweep.seeds) else ''}"
          f", {len(sweep.defenses)} defense(s) each), preset {args.preset}: {sweep.preset.about}; "
          f"records in {sweep.record_dir}", flush=True)
    progress = Progress(len(jobs), out=lambda line: print(line, flush=True))
    try:
        if args.executor == "pool":
            run_pool(jobs, _slots(args.gpus, args.jobs), progress)
        else:
            import submitit
            # The tasks unpickle sweeps.executors.run_job, so they need this checkout on their path.
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            folder = Path(args.submitit_dir or sweep.record_dir / "_submitit")
            executor = submitit.AutoExecutor(folder=folder / "%j", cluster=args.executor)
            executor.update_parameters(timeout_min=args.timeout_min, name="backdoor-sweep")
            if args.executor == "slurm":
                partition = {"slurm_partition": args.slurm_partition} if args.slurm_partition else {}
                executor.update_parameters(gpus_per_node=1, cpus_per_task=args.cpus_per_job,
                                           slurm_array_parallelism=args.slurm_array_parallelism, **partition)
            run_submitit(jobs, executor, progress, wait=not args.no_wait)
    except KeyboardInterrupt:
        print(f"{progress.summary()}; interrupted: the same command resumes the sweep", flush=True)
        return 130
    print(progress.summary(), flush=True)
    return 1 if progress.failures else 0


if __name__ == "__main__":
    cli_main(lambda argv: sys.exit(main(argv)))
