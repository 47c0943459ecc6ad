"""The plan of a sweep: a list of attacks, then a list of defenses on each attack record, for each
seed, run as jobs through the real command-line scripts (by path, never by import); and the state of
each job.

A :class:`Job` is one script run, ``attack/<a>.py --save_folder_name R ...`` or
``defense/<d>.py --result_file R ...``, with its own log file. The launcher (``sweeps/launch.py``)
plans the jobs from a :class:`~sweeps.presets.Preset` and the user's lists (a :class:`Sweep`), skips
every job whose output is already a finished run, and hands the rest to one of three executors
(``sweeps/executors.py``).

Done means finished: the run's ``record.json``, written last, is present, and a defense's still
names the attack record it defended (a defense of an earlier run of that record is redone). A
finished record made with other settings than the ones asked for is not silently reused: the job
fails with a line saying which settings differ. An unfinished run is continued with ``--resume``.
An ablation axis (a flag given a list, ``sweeps/axes.py``) is one job per value, each under its own
name, so all of the above holds for each value.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sweeps.axes import axis_suffix, expand, with_save_name
from sweeps.presets import Preset, defense_flags
from sweeps.settings import NOT_COMPARED, flag_matches, flag_values
from utils.config import CONFIG_DIR, ROOT
from utils.errors import UserError
from utils.output import is_finished
from utils.record import read_yaml, sha256_file

CLEAN_ATTACKS = {"prototype"}  # a clean model: no backdoor to remove, so no defense runs on it


def trigger_file_flags(attack: str, resource_dir: Path | None) -> list[str]:
    """BackdoorBench's published trigger files (``resource/`` there), where the attack takes one and
    ``resource_dir`` holds it; otherwise the attack's own default."""
    if resource_dir is None:
        return []
    files = {"blended": ("--attack_trigger_img_path", resource_dir / "blended" / "hello_kitty.jpeg"),
             "lf": ("--lowFrequencyPatternPath", resource_dir / "lowFrequency" / "cifar10_preactresnet18_0_255.npy")}
    if attack in files and files[attack][1].is_file():
        return [files[attack][0], str(files[attack][1])]
    return []


def available(kind: str, order: list[str]) -> list[str]:
    """The scripts in ``attack/`` or ``defense/``, in the paper's order first: each has its settings in
    ``config/<kind>/<name>/``, which the framework modules beside them (``attack/runner.py``...) have not."""
    present = sorted(p.stem for p in (ROOT / kind).glob("*.py")
                     if not p.stem.startswith("_") and (CONFIG_DIR / kind / p.stem).is_dir())
    return [n for n in order if n in present] + [n for n in present if n not in order]


def choose(value: str, kind: str, order: list[str]) -> list[str]:
    """``all`` or a comma-separated list of script names, checked against the scripts there are."""
    known = available(kind, order)
    if value.strip() == "all":
        return [n for n in known if n not in CLEAN_ATTACKS]
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise UserError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)} (or all)")
    return chosen


@dataclass(frozen=True)
class Job:
    kind: str                    # "attack" or "defense"
    attack: str
    defense: str | None
    seed: int
    record: str                  # the attack record's folder name
    record_dir: str              # absolute
    args: tuple[str, ...]        # after the script's path
    log: str                     # absolute path of this job's log

    @property
    def script(self) -> Path:
        return ROOT / self.kind / f"{self.defense if self.kind == 'defense' else self.attack}.py"

    @property
    def record_path(self) -> Path:
        return Path(self.record_dir) / self.record

    @property
    def output(self) -> Path:
        if self.kind != "defense":
            return self.record_path
        return self.record_path / "defense" / flag_values(self.args).get("save_name", self.defense)

    @property
    def label(self) -> str:
        return f"{self.defense} on {self.record}" if self.kind == "defense" else f"attack {self.record}"


@dataclass
class Sweep:
    """Everything a sweep is asked to do; :meth:`jobs` turns it into jobs."""
    attacks: list[str]
    defenses: list[str]
    seeds: list[int]
    preset: Preset
    record_dir: Path
    dataset: str = "cifar10"
    dataset_path: str | None = None
    model: str | None = None
    device: str = "auto"
    attack_epochs: int | None = None
    defense_epochs: int | None = None
    prefix: str | None = None
    resource_dir: Path | None = None
    attack_args: tuple[str, ...] = ()
    defense_args: tuple[str, ...] = ()
    preset_name: str = "paper"

    def record_name(self, attack: str, seed: int, axes: tuple[tuple[str, str], ...] = ()) -> str:
        """``<prefix><attack>_s<seed>``; with attack axes ``<prefix><attack>_pratio0.1_s<seed>``."""
        model = self.model or self.preset.model
        prefix = self.prefix if self.prefix is not None else (
            f"{self.dataset}_{model}_" + ("" if self.preset_name == "paper" else f"{self.preset_name}_"))
        return f"{prefix}{attack}{axis_suffix(axes)}_s{seed}"

    def jobs(self) -> list[Job]:
        """Every attack job (in the order asked), then every defense job of each record; one job per
        value of each axis (``sweeps/axes.py``), every seed of each value before the next attack."""
        record_dir = self.record_dir.resolve()
        logs = record_dir / "_logs"
        data_path = ["--dataset_path", self.dataset_path] if self.dataset_path else []
        run = ["--device", self.device, "--record_dir", str(record_dir)]
        defense_variants = {d: expand(self.defense_args, "defense", d, "--defense_args") for d in self.defenses}
        attacks, defenses = [], []
        for seed in self.seeds:
            for attack in self.attacks:
                for attack_args, attack_axes in expand(self.attack_args, "attack", attack, "--attack_args"):
                    name = self.record_name(attack, seed, attack_axes)
                    epochs = ["--epochs", str(self.attack_epochs)] if self.attack_epochs else []
                    cuts = [f for k, v in self.preset.cuts.get(attack, {}).items() for f in (f"--{k}", str(v))]
                    args = ["--save_folder_name", name, "--model", self.model or self.preset.model,
                            "--dataset", self.dataset, *data_path,
                            *self.preset.attack_flags, *epochs, *cuts, *trigger_file_flags(attack, self.resource_dir),
                            *run,
                            "--random_seed", str(seed), *attack_args]
                    attacks.append(Job("attack", attack, None, seed, name, str(record_dir), tuple(args),
                                       str(logs / f"{name}.log")))
                    for defense in [] if attack in CLEAN_ATTACKS else self.defenses:
                        for defense_args, axes in defense_variants[defense]:
                            if axes:
                                base = flag_values(defense_args).get("save_name", defense)
                                defense_args = with_save_name(defense_args, base + axis_suffix(axes))
                            args = ["--result_file", name, *data_path, *run, "--random_seed", str(seed),
                                    *defense_flags(defense, self.preset, self.defense_epochs), *defense_args]
                            log = flag_values(defense_args)["save_name"] if axes else defense
                            defenses.append(Job("defense", attack, defense, seed, name, str(record_dir), tuple(args),
                                                str(logs / f"{name}.{log}.log")))
        return attacks + defenses


def setting_conflicts(job: Job) -> list[str]:
    """The asked-for settings that the finished run at ``job.output`` was not made with."""
    config_path = job.output / "config.yaml"
    config = read_yaml(config_path) if config_path.is_file() else {}
    differ = []
    for key, asked in flag_values(job.args).items():
        if key in NOT_COMPARED or "path" in key.lower() or key not in config:
            continue
        if not flag_matches(asked, config[key]):
            differ.append(f"{key} {config[key]} (asked {asked})")
    return differ


def job_state(job: Job) -> str:
    """``done``, ``stale`` (a finished defense of an earlier run of its record), ``partial`` or ``new``."""
    if not is_finished(job.output):
        return "partial" if job.output.exists() else "new"
    if job.kind == "defense":
        try:
            defended = json.loads((job.output / "record.json").read_text()).get("attack_record_sha256")
        except ValueError:
            return "stale"
        if defended != sha256_file(job.record_path / "record.json"):
            return "stale"
    return "done"


class JobFailed(Exception):
    """A job that did not finish; the message says why and where its log is."""


def command(job: Job) -> list[str] | None:
    """The command that (re)starts ``job`` now, or None when it is already done."""
    state = job_state(job)
    if state == "done":
        differ = setting_conflicts(job)
        if differ:
            raise JobFailed(f"{job.output} is a finished run made with other settings: {'; '.join(differ)}; "
                            f"remove it or give the sweep another --prefix")
        return None
    if job.kind == "defense" and not is_finished(job.record_path):
        attack_log = Path(job.log).with_name(f"{job.record}.log")
        raise JobFailed(f"its attack record {job.record_path} is not finished (see {attack_log})")
    extra = {"partial": ["--resume"], "stale": ["--overwrite"], "new": []}[state]
    return [sys.executable, str(job.script), *job.args, *extra]
