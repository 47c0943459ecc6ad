"""Running a sweep's jobs, through one of three executors:

* :func:`run_pool`: this machine, one job per slot (a GPU, through ``CUDA_VISIBLE_DEVICES``, or a
  CPU worker), the rest queued; a defense job starts when its attack record is finished;
* :func:`run_submitit` on SLURM: the attack jobs as one job array, the defense jobs as a second array
  that waits for the first (``afterany``, so one failed attack does not hold every defense forever:
  a defense whose record is unfinished fails at once and says so);
* :func:`run_submitit` with submitit's local executor: the same two arrays on this machine, the
  second submitted when the first has finished (that executor has no dependencies); the tests use it.

Each skips the jobs that are done (``sweeps/jobs.py`` says when a job is). A failed job is reported
with its log path and does not stop the others; a defense whose attack failed is not started.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from sweeps.jobs import Job, JobFailed, command
from sweeps.progress import Progress
from utils.config import ROOT


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
