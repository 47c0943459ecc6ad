"""Sweeps: a list of attacks, then a list of defenses on each attack record, for each seed, run as
jobs through the real command-line scripts (by path, never by import).

A :class:`Job` is one script run, ``attack/<a>.py --save_folder_name R ...`` or
``defense/<d>.py --result_file R ...``, with its own log file. The launcher (``sh/launch.py``) plans
the jobs from a :class:`Preset` and the user's lists, skips every job whose output is already a
finished run, and hands the rest to one of three executors:

* :func:`run_pool`: this machine, one job per slot (a GPU, through ``CUDA_VISIBLE_DEVICES``, or a
  CPU worker), the rest queued; a defense job starts when its attack record is finished;
* :func:`run_submitit` on SLURM: the attack jobs as one job array, the defense jobs as a second array
  that waits for the first (``afterany``, so one failed attack does not hold every defense forever:
  a defense whose record is unfinished fails at once and says so);
* :func:`run_submitit` with submitit's local executor: the same two arrays on this machine, the
  second submitted when the first has finished (that executor has no dependencies); the tests use it.

Done means finished: the run's ``record.json``, written last, is present, and a defense's still
names the attack record it defended (a defense of an earlier run of that record is redone). A
finished record made with other settings than the ones asked for is not silently reused: the job
fails with a line saying which settings differ. An unfinished run is continued with ``--resume``.
A failed job is reported with its log path and does not stop the others; a defense whose attack
failed is not started.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from utils.errors import UserError
from utils.record import read_yaml, sha256_file
from utils.runner import is_finished

ROOT = Path(__file__).resolve().parents[1]

# The D3 paper's Table 1 order (rows and column groups); "all" means every one of them that exists here.
PAPER_ATTACKS = ["badnet", "blended", "wanet", "lf", "inputaware", "sig", "ssba"]
PAPER_DEFENSES = ["ft", "anp", "fp", "nc", "nad", "i-bau", "ft-sam", "sau", "d3"]
IN_TRAINING = {"pdb"}  # defenses that train a new model on the poisoned set: an attack's cost, not a fine-tune's
CLEAN_ATTACKS = {"prototype"}  # a clean model: no backdoor to remove, so no defense runs on it

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
    flags = {k: v for k, v in _flag_values(preset.attack_flags).items() if k not in _NOT_COMPARED}
    if model != preset.model or ("train_subset" not in flags and settings.get("train_subset") is not None):
        return False
    return all(_flag_matches(asked, settings.get(key)) for key, asked in flags.items())


def defense_flags(defense: str, preset: Preset, epochs: int | None = None) -> list[str]:
    """The flags that size a defense run: its own schedule (``config/defense/<name>/config.yaml``),
    long ones scaled by the preset, or exactly ``epochs`` when given; the preset's cuts; and
    ``preset.evaluations`` evaluations. An in-training defense (PDB) trains a new model, so a
    scaled-down preset gives it the attack's schedule (epochs and learning rate) instead."""
    config = read_yaml(ROOT / "config" / "defense" / defense / "config.yaml")
    cuts = dict(preset.cuts.get(defense, {}))
    cut_epochs = cuts.pop("epochs", None)  # a schedule of its own for this defense (SAU's rounds in smoke)
    flags = [f for k, v in cuts.items() for f in (f"--{k}", str(v))]
    if "epochs" not in config:
        return flags
    n = int(config["epochs"]) if epochs is None else epochs
    attack = _flag_values(preset.attack_flags)
    if defense in IN_TRAINING and preset.defense_scale < 1 and epochs is None and "epochs" in attack:
        n = int(attack["epochs"])
        flags += ["--lr", attack["lr"]] if "lr" in attack else []
    elif epochs is None and cut_epochs is not None:
        n = int(cut_epochs)
    elif epochs is None and n >= LONG_SCHEDULE:
        n = max(1, round(n * preset.defense_scale))
    return ["--epochs", str(n), "--eval_every", str(max(1, n // preset.evaluations))] + flags


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
    """The scripts in ``attack/`` or ``defense/``, in the paper's order first."""
    present = sorted(p.stem for p in (ROOT / kind).glob("*.py") if not p.stem.startswith("_"))
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
        return self.record_path / "defense" / _flag_values(self.args).get("save_name", self.defense)

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

    def record_name(self, attack: str, seed: int) -> str:
        model = self.model or self.preset.model
        prefix = self.prefix if self.prefix is not None else (
            f"{self.dataset}_{model}_" + ("" if self.preset_name == "paper" else f"{self.preset_name}_"))
        return f"{prefix}{attack}_s{seed}"

    def jobs(self) -> list[Job]:
        """Every attack job (in the order asked), then every defense job of each record."""
        record_dir = self.record_dir.resolve()
        logs = record_dir / "_logs"
        data_path = ["--dataset_path", self.dataset_path] if self.dataset_path else []
        run = ["--device", self.device, "--record_dir", str(record_dir)]
        attacks, defenses = [], []
        for seed in self.seeds:
            for attack in self.attacks:
                name = self.record_name(attack, seed)
                epochs = ["--epochs", str(self.attack_epochs)] if self.attack_epochs else []
                cuts = [f for k, v in self.preset.cuts.get(attack, {}).items() for f in (f"--{k}", str(v))]
                args = ["--save_folder_name", name, "--model", self.model or self.preset.model,
                        "--dataset", self.dataset, *data_path,
                        *self.preset.attack_flags, *epochs, *cuts, *trigger_file_flags(attack, self.resource_dir),
                        *run,
                        "--random_seed", str(seed), *self.attack_args]
                attacks.append(Job("attack", attack, None, seed, name, str(record_dir), tuple(args),
                                   str(logs / f"{name}.log")))
                for defense in [] if attack in CLEAN_ATTACKS else self.defenses:
                    args = ["--result_file", name, *data_path, *run, "--random_seed", str(seed),
                            *defense_flags(defense, self.preset, self.defense_epochs), *self.defense_args]
                    defenses.append(Job("defense", attack, defense, seed, name, str(record_dir), tuple(args),
                                        str(logs / f"{name}.{defense}.log")))
        return attacks + defenses


# Settings that do not change a result, or that name files: not compared when a finished run is reused.
_NOT_COMPARED = {"device", "record_dir", "dataset_path", "cache_dir", "num_workers", "eval_every",
                 "eval_batch_size", "overwrite", "resume", "yaml_path", "save_folder_name", "result_file", "amp"}


def _flag_values(args: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for flag, value in zip(args, args[1:]):
        if flag.startswith("--") and not value.startswith("--"):
            pairs[flag[2:]] = value
    return pairs


def setting_conflicts(job: Job) -> list[str]:
    """The asked-for settings that the finished run at ``job.output`` was not made with."""
    config_path = job.output / "config.yaml"
    config = read_yaml(config_path) if config_path.is_file() else {}
    differ = []
    for key, asked in _flag_values(job.args).items():
        if key in _NOT_COMPARED or "path" in key.lower() or key not in config:
            continue
        if not _flag_matches(asked, config[key]):
            differ.append(f"{key} {config[key]} (asked {asked})")
    return differ


def _flag_matches(asked: str, value) -> bool:
    """Whether a command-line value (a string) is the value a config.yaml holds: "0.05" is 0.05."""
    return yaml.safe_load(asked) == value or str(value) == asked


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


def _open_log(job: Job, cmd: list[str]):
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "a")
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    return log


def run_job(job: Job) -> str:
    """Run one job to its end (what a SLURM or local submitit task executes): ``ran`` or ``skipped``;
    raises :class:`JobFailed` with the log's path when the script fails."""
    cmd = command(job)
    if cmd is None:
        return "skipped"
    with _open_log(job, cmd) as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise JobFailed(f"exit code {code}; log: {job.log}")
    return "ran"


def _summary(job: Job) -> dict:
    try:
        return json.loads((job.output / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def figures(job: Job) -> str:
    """ACC / ASR (/ DER) of a finished job, in %, for the progress line."""
    s = _summary(job)
    parts = [f"{name} {100 * s[key]:.2f}" for name, key in (("ACC", "clean_acc"), ("ASR", "asr"), ("DER", "der"))
             if isinstance(s.get(key), (int, float))]
    return "  ".join(parts)


class Progress:
    """A line per finished job (its wall time and figures) and the final count."""

    def __init__(self, total: int, out=print):
        self.total, self.out, self.counts, self.start = total, out, Counter(), time.perf_counter()

    def _line(self, status: str, job: Job, text: str) -> None:
        self.counts[status] += 1
        n = sum(self.counts.values())
        self.out(f"[{n:>{len(str(self.total))}}/{self.total}] {status:<7} {job.label}  {text}".rstrip())

    def done(self, job: Job, seconds: float | None = None) -> None:
        """``seconds``: the wall time seen here; the run's own (its summary's, resumed parts included) wins."""
        seconds = _summary(job).get("wall_seconds", seconds)
        self._line("done", job, (f"{seconds:.0f} s  " if seconds is not None else "") + figures(job))

    def skipped(self, job: Job) -> None:
        self._line("skipped", job, "(finished before)")

    def failed(self, job: Job, why: str) -> None:
        self._line("FAILED", job, why)

    def summary(self) -> str:
        wall = time.perf_counter() - self.start
        return (f"sweep: {self.counts['done']} done, {self.counts['skipped']} skipped, {self.counts['FAILED']} failed "
                f"in {wall / 60:.1f} min")

    @property
    def failures(self) -> int:
        return self.counts["FAILED"]


def _command_or_report(job: Job, progress: Progress, finished: set[str], failed: set[str]) -> list[str] | None:
    """The command that runs ``job`` now, or None once it is reported skipped (finished before) or
    failed (refused, such as a finished record made with other settings); an attack's record is
    added to ``finished`` or ``failed`` accordingly."""
    try:
        cmd = command(job)
    except JobFailed as e:
        progress.failed(job, str(e))
        if job.kind == "attack":
            failed.add(job.record)
        return None
    if cmd is None:
        progress.skipped(job)
        if job.kind == "attack":
            finished.add(job.record)
    return cmd


def triage(jobs: list[Job], progress: Progress) -> tuple[list[Job], set[str], set[str]]:
    """Report the jobs that are done (skipped) or cannot run (failed); return the rest, the records
    finished already and the records that failed. A defense of a record not yet finished is decided
    when its attack ends."""
    todo, finished, failed = [], set(), set()
    for job in jobs:  # attacks come first, so each defense's record is known by then
        if job.kind == "defense" and job.record in failed:
            progress.failed(job, f"not started: its attack {job.record} failed")
        elif (job.kind == "defense" and job.record not in finished) or \
                _command_or_report(job, progress, finished, failed) is not None:
            todo.append(job)
    return todo, finished, failed


def job_environment(slot: str | None, slot_count: int, base: dict | None = None,
                    cpus: int | None = None) -> dict[str, str]:
    """The environment of one pool job: its GPU (``slot``), and, when several jobs share the machine, an
    equal share of its CPU threads (``OMP_NUM_THREADS``, unless the user set it). PyTorch starts one
    thread per core in every process, so parallel jobs oversubscribe the cores: measured here, a small
    training loop beside one other 2-thread job on 2 cores ran 58x slower with 2 threads than with 1."""
    env = dict(os.environ if base is None else base)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    if slot_count > 1 and "OMP_NUM_THREADS" not in env:
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cpus // slot_count))
    return env


def run_pool(jobs: list[Job], slots: list[str | None], progress: Progress, poll_seconds: float = 1.0) -> None:
    """Run ``jobs`` on this machine, one per slot (a GPU id for ``CUDA_VISIBLE_DEVICES``, or None), the
    rest queued in order; a defense waits for its attack record. Ctrl-C (or SIGTERM to the launcher) stops
    the running jobs (each keeps its checkpoint) and the same command resumes the sweep."""
    pending, finished, failed_records = triage(jobs, progress)
    free, running = list(slots), {}
    try:
        while pending or running:
            for job in list(pending):
                if not free:
                    break
                if job.kind == "defense" and job.record in failed_records:
                    pending.remove(job)
                    progress.failed(job, f"not started: its attack {job.record} failed")
                    continue
                if job.kind == "defense" and job.record not in finished:
                    continue
                pending.remove(job)
                cmd = _command_or_report(job, progress, finished, failed_records)
                if cmd is None:
                    continue
                slot = free.pop(0)
                env = job_environment(slot, len(slots))
                log = _open_log(job, cmd)
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[proc] = (job, slot, log, time.perf_counter())
            for proc in [p for p in running if p.poll() is not None]:
                job, slot, log, started = running.pop(proc)
                log.close()
                free.append(slot)
                if proc.returncode == 0:
                    progress.done(job, time.perf_counter() - started)
                    if job.kind == "attack":
                        finished.add(job.record)
                else:
                    progress.failed(job, f"exit code {proc.returncode}; log: {job.log}")
                    if job.kind == "attack":
                        failed_records.add(job.record)
            if running:
                time.sleep(poll_seconds)
            elif pending and all(j.kind == "defense" and j.record not in finished | failed_records for j in pending):
                for job in pending:  # cannot happen while every attack ends done or failed; never spin
                    progress.failed(job, f"not started: its attack {job.record} did not finish")
                pending.clear()
    except KeyboardInterrupt:
        stop_jobs(list(running))
        raise


def stop_jobs(procs: list[subprocess.Popen], grace_seconds: float = 10.0) -> None:
    """After the launcher is interrupted: Ctrl-C in a terminal reaches every job of its process group
    and each stops by itself (its checkpoint kept); a signal sent to the launcher alone (``kill``, a
    cluster's time limit) does not, so a job still running after the grace period gets SIGTERM, which
    the scripts take as an interruption too. Never leaves a job running behind the launcher."""
    deadline = time.monotonic() + grace_seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs:
        proc.wait()


def run_submitit(jobs: list[Job], executor, progress: Progress, wait: bool = True) -> None:
    """Submit the attack jobs as one array and the defense jobs as a second one after it, through a
    submitit executor (``AutoExecutor(cluster="slurm")`` or ``"local"``), and report each as it ends."""
    import submitit

    todo, _finished, failed_records = triage(jobs, progress)
    attacks = [j for j in todo if j.kind == "attack"]
    defenses = [j for j in todo if j.kind == "defense"]
    slurm = getattr(executor, "cluster", "") == "slurm"
    poll = 30 if slurm else 1  # seconds between looks at the queue
    submitted = dict(zip(executor.map_array(run_job, attacks), attacks)) if attacks else {}
    if slurm and submitted:
        array_id = next(iter(submitted)).job_id.split("_")[0]
        executor.update_parameters(slurm_additional_parameters={"dependency": f"afterany:{array_id}"})
    elif submitted:  # no dependencies outside SLURM: wait for the attacks, then submit the defenses
        failed_records |= {j.record for j in _collect(submitted, progress, submitit, poll)}
        submitted = {}
    for job in [d for d in defenses if d.record in failed_records]:
        progress.failed(job, f"not started: its attack {job.record} failed")
    defenses = [d for d in defenses if d.record not in failed_records]
    submitted.update(zip(executor.map_array(run_job, defenses), defenses) if defenses else [])
    if not wait:
        for task, job in submitted.items():
            print(f"submitted {job.label}: job {task.job_id}, log {job.log}")
        return
    _collect(submitted, progress, submitit, poll)


def _collect(submitted: dict, progress: Progress, submitit, poll: float) -> list[Job]:
    """Wait for submitit tasks, reporting each as it ends; the failed ones are returned."""
    failed = []
    for task in submitit.helpers.as_completed(list(submitted), poll_frequency=poll):
        job = submitted[task]
        try:
            outcome = task.result()
        except Exception as e:  # submitit re-raises the task's error with its traceback
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            why = next((ln.split("JobFailed: ", 1)[1] for ln in reversed(lines) if "JobFailed: " in ln), None)
            progress.failed(job, why or f"{lines[-1] if lines else e}; submitit log: {task.paths.stderr}")
            failed.append(job)
            continue
        if outcome == "skipped":
            progress.skipped(job)
        else:
            progress.done(job)
    return failed
