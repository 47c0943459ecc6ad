"""The loss along the straight line from an attacked model to a defended one (the D3 paper's Figure 2).

    python analysis/trajectory.py --result_file badnet_demo --defense ft --dataset_path DATA
    python analysis/trajectory.py --result_file badnet_demo,wanet_demo --defense ft,d3 --t_max 2 --points 41

For each attack record R and defense D, theta_init is R's attacked model and theta_def the model in
R/defense/D/. The path theta_t = theta_init + t (theta_def - theta_init), t from 0 to ``--t_max`` in
``--points`` even steps, is taken over ALL parameters and buffers: BatchNorm's running means and
variances are interpolated too (the model is evaluated in eval mode, so those running statistics are
the ones it normalises with); integer buffers (BatchNorm's ``num_batches_tracked``) are taken from
theta_init, as nothing is evaluated with them. The point is computed with ``torch.lerp``, exact at
both ends: t = 0 is the attacked model and t = 1 the defended one, bit for bit. Past t = 1 (or below
0) a running variance can cross zero; the model is then undefined (it computes NaN, which an argmax
would score as class 0, a false 100% ASR for target 0), so such a point is not evaluated: its
metrics are NaN in the CSV, a gap in the plot, and a line says how many variances were not positive.

At each t: the clean loss (cross-entropy on the clean test set), the backdoor loss (cross-entropy of
the backdoor test set against the attack's target labels), ACC, ASR and RA, in float32 (no autocast).
This is an analysis that judges a defense, never a defense: it reads the clean and backdoor test sets,
which no defense here may. It reads only finished records and defense outputs, their hashes verified.

Writes ``R/analysis/trajectory_<D>.csv`` (one row per record, defense and t) and ``.png`` (two panels:
the losses; ACC and ASR), or ``--out PREFIX`` + ``.csv`` / ``.png``. Several records (``--result_file
a,b``) or defenses (``--defense ft,d3``) are overlaid, one curve each; the default files then go under
the first record, named after all defenses (and the other records). Nothing here is random.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from analysis.common import (add_evaluation_arguments, check_evaluation_arguments, defense_output, evaluation_sets,
                             model_pair, open_record, output_prefix, split_names, write_outputs)
from utils.cli import cli_main
from utils.config import resolve_device
from utils.device import place_model
from utils.errors import UserError
from utils.evaluate import Evaluator
from utils.loader import Normalizer
from utils.plots import pyplot, save_figure
from utils.progress import progress, quiet_progress

METRICS = ["clean_test_loss", "bd_test_loss", "ra_test_loss", "clean_acc", "asr", "ra"]


def interpolate(init: dict[str, torch.Tensor], defended: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """theta_t for every entry of the state dicts: floating tensors (weights, biases, BatchNorm running
    statistics) on the line, exact at t = 0 and t = 1; integer buffers (``num_batches_tracked``) from ``init``."""
    return {k: torch.lerp(a, defended[k].to(a.dtype), t) if a.is_floating_point() else a.clone()
            for k, a in init.items()}


def nonpositive_variances(state: dict[str, torch.Tensor]) -> int:
    """How many BatchNorm running variances of ``state`` are not positive (a point past the ends)."""
    return sum(int((v <= 0).sum()) for k, v in state.items() if k.endswith("running_var"))


def steps(points: int, t_max: float) -> list[float]:
    return [t_max * i / (points - 1) for i in range(points)]


def trajectory(init: torch.nn.Module, defended: torch.nn.Module, ts: list[float], evaluator: Evaluator, device,
               desc: str = "trajectory") -> list[dict]:
    """One row of metrics per t: the model at theta_t, evaluated by ``evaluator``."""
    a = {k: v.detach().clone().to(device) for k, v in init.state_dict().items()}  # copies: the model's own
    b = {k: v.detach().clone().to(device) for k, v in defended.state_dict().items()}  # tensors change below
    model = place_model(init, device).eval()
    rows = []
    for i, t in enumerate(progress(ts, desc=desc, unit="point")):
        state = interpolate(a, b, t)
        bad = nonpositive_variances(state)
        if bad:
            print(f"{desc}: t={t:g}: {bad} BatchNorm running variance(s) not positive, the model is undefined "
                  f"there; left out (NaN)", file=sys.stderr, flush=True)
            rows.append({"t": t, **{m: math.nan for m in METRICS}})
            continue
        model.load_state_dict(state)
        rows.append({"t": t, **evaluator(model)})
        if quiet_progress():  # no bar when stderr is redirected: a line per point instead
            print(f"{desc}: point {i + 1}/{len(ts)}, t={t:g}: ACC {100 * rows[-1]['clean_acc']:.2f} "
                  f"ASR {100 * rows[-1]['asr']:.2f}", file=sys.stderr, flush=True)
    return rows


def draw(rows: list[dict], curves: list[str]):
    """Figure 2's two panels: clean (solid) and backdoor (dashed) loss; ACC (solid) and ASR (dashed)."""
    plt = pyplot()
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, curve in enumerate(curves):
        part = [r for r in rows if r["curve"] == curve]
        ts, colour = [r["t"] for r in part], colours[i % len(colours)]
        marker = "o" if len(ts) <= 25 else None
        for ax, (solid, dashed) in ((loss, ("clean_test_loss", "bd_test_loss")), (acc, ("clean_acc", "asr"))):
            ax.plot(ts, [r[solid] for r in part], color=colour, marker=marker, ms=3,
                    label=f"{curve}: {'clean loss' if ax is loss else 'ACC'}")
            ax.plot(ts, [r[dashed] for r in part], color=colour, marker=marker, ms=3, ls="--",
                    label=f"{curve}: {'backdoor loss' if ax is loss else 'ASR'}")
    loss.set_ylabel("cross-entropy on the test sets")
    acc.set_ylabel("fraction")
    acc.set_ylim(-0.02, 1.02)
    for ax in (loss, acc):
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")  # the defended model
        ax.set_xlabel("t  (theta_init + t (theta_def - theta_init))")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--result_file", required=True, help="attack record(s) under --record_dir, joined by commas")
    p.add_argument("--record_dir", default="record", help="where the attack records are")
    p.add_argument("--defense", default="ft", help="defense output(s) under <record>/defense/, joined by commas")
    p.add_argument("--points", type=int, default=21, help="points on the line, t = 0 and t = t_max included")
    p.add_argument("--t_max", type=float, default=1.0, help="last t (1 is the defended model; the paper goes to 2)")
    add_evaluation_arguments(p, "evaluation batch size")
    args = p.parse_args(argv)
    if args.points < 2:
        raise UserError(f"--points {args.points}: give at least 2 (t = 0 and t = t_max)")
    if not (math.isfinite(args.t_max) and args.t_max > 0):
        raise UserError(f"--t_max {args.t_max}: give a positive number (1 reaches the defended model)")
    check_evaluation_arguments(args)
    records = [open_record(args.record_dir, name) for name in split_names(args.result_file, "result_file")]
    defenses = split_names(args.defense, "defense")
    outputs = {(r.dir.name, d): defense_output(r, d) for r in records for d in defenses}
    pairs = {key: model_pair(r, outputs[key]) for r in records for key in outputs if key[0] == r.dir.name}
    prefix = output_prefix(args.out, records, "trajectory_" + "+".join(defenses))
    device = resolve_device(args.device)
    ts = steps(args.points, args.t_max)

    rows = []
    for record in records:
        sets = evaluation_sets(record, args.dataset_path, args.cache_dir)
        spec = sets.dataset.spec
        evaluator = Evaluator(sets.dataset.test, sets.backdoor, Normalizer(spec.mean, spec.std, device), device=device,
                              batch_size=args.batch_size)
        for d in defenses:
            curve = d if len(records) == 1 else f"{record.dir.name}/{d}"
            init, defended = pairs[(record.dir.name, d)]
            for i, row in enumerate(trajectory(init, defended, ts, evaluator, device, desc=f"trajectory {curve}")):
                rows.append({"record": record.dir.name, "defense": d, "curve": curve, "step": i, "t": row["t"],
                             **{k: row[k] for k in METRICS}})
    curves = list(dict.fromkeys(r["curve"] for r in rows))
    csv, png = write_outputs(prefix, rows, draw(rows, curves), save_figure)
    for curve in curves:
        part = [r for r in rows if r["curve"] == curve]
        ends = "  ".join(f"t={r['t']:g}: ACC {100 * r['clean_acc']:.2f} ASR {100 * r['asr']:.2f} "
                         f"bd loss {r['bd_test_loss']:.3f}" for r in (part[0], part[-1]))
        print(f"{curve}: {ends}")
    print(f"wrote {csv} and {png}")
    return rows


if __name__ == "__main__":
    cli_main(main)
