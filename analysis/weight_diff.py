"""How far each defense moved the weights D3 selects: histograms of theta_def - theta_init (the D3
paper's Figure 4b).

    python analysis/weight_diff.py --result_file badnet_demo --defenses ft,d3
    python analysis/weight_diff.py --result_file badnet_demo --defenses ft,d3 --layers layer4.1.conv2,linear

For the attack record R and each defense D, the difference theta_def - theta_init of every weight of
the chosen layers (the ``weight`` of each Linear and Conv2d module under them; biases and BatchNorm
are not part of D3's theta_s): by default the layers D3 selects for R's model (``--select_layer_name``'s
default, models/registry.py ``ModelLayers.d3_layers``: ``linear`` for PreAct-ResNet18), or
``--layers`` (module names joined by commas, or ``all_linear``), read as D3 reads them.

The figure overlays one histogram per defense (shared bins), the Frobenius distance
||theta_def - theta_init||_F of each in the legend: one panel for all chosen weights together and,
when there are several layers, one per layer. The CSV holds, per defense and panel (``all`` or a layer
name), the Frobenius distance, the number of weights and every bin's edges and count. The paper's
figure shows vanilla fine-tuning barely moving the classifier while D3 moves it far.

Reads only the models of finished, verified outputs (no data, no test set); nothing here is random.
Writes ``R/analysis/weight_diff_<D1+D2>.csv`` and ``.png``, or ``--out PREFIX`` + ``.csv`` / ``.png``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from analysis.common import defense_output, model_pair, open_record, output_prefix, split_names, write_outputs
from defense.d3 import select_layers
from models import model_layers
from utils.cli import cli_main
from utils.errors import UserError
from utils.plots import pyplot, save_figure
from utils.progress import progress

ALL = "all"


def chosen_layers(model: nn.Module, model_name: str, spec: str | None) -> list[str]:
    """The weight-bearing modules (Linear, Conv2d) under ``spec``, D3's default when ``spec`` is None."""
    spec = spec if spec is not None else model_layers(model_name, model).d3_layers
    modules = dict(model.named_modules())
    if spec != "all_linear":
        for name in split_names(spec, "layers"):
            if name not in modules:
                linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise UserError(f"--layers {name!r} is not a module of the model {model_name}; its Linear layers: "
                                f"{', '.join(linear[-3:])} (or all_linear)")
            if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in modules[name].modules()):
                raise UserError(f"--layers {name!r} holds no Linear or Conv2d layer of {model_name}")
    return [name for name, _ in select_layers(model, spec)]


def differences(init: nn.Module, defended: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """theta_def - theta_init of each layer's weight, flattened, plus ``all``: every one of them together."""
    a, b = init.state_dict(), defended.state_dict()
    out = {name: (b[f"{name}.weight"].float() - a[f"{name}.weight"].float()).flatten() for name in layers}
    out[ALL] = torch.cat([out[name] for name in layers])
    return out


def frobenius(diff: torch.Tensor) -> float:
    return torch.linalg.vector_norm(diff).item()


def histogram_rows(diffs: dict[str, dict[str, torch.Tensor]], panels: list[str], bins: int) -> list[dict]:
    """One row per defense, panel and bin; the bins shared by the defenses within a panel."""
    rows = []
    for panel in panels:
        values = torch.cat([per[panel] for per in diffs.values()])
        lo, hi = values.min().item(), values.max().item()
        if hi <= lo:  # nothing moved (or one value): a narrow range around it
            lo, hi = lo - 1e-6, hi + 1e-6
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        for defense, per in diffs.items():
            counts = torch.histogram(per[panel].double(), bins=edges).hist.long()
            distance = frobenius(per[panel])
            rows += [{"defense": defense, "layer": panel, "frobenius": distance, "numel": per[panel].numel(),
                      "bin": i, "bin_left": edges[i].item(), "bin_right": edges[i + 1].item(), "count": int(c)}
                     for i, c in enumerate(counts.tolist())]
    return rows


def draw(rows: list[dict], panels: list[str], defenses: list[str], record: str, log_y: bool = False):
    plt = pyplot()
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for i, defense in enumerate(defenses):
            part = [r for r in rows if r["layer"] == panel and r["defense"] == defense]
            edges = [part[0]["bin_left"]] + [r["bin_right"] for r in part]
            ax.stairs([r["count"] for r in part], edges, fill=True, alpha=0.45, color=colours[i % len(colours)],
                      label=f"{defense} (||diff||_F = {part[0]['frobenius']:.4g})")
        ax.set_title(f"{record}: {'all chosen weights' if panel == ALL else panel}", fontsize=9)
        ax.set_xlabel("theta_def - theta_init")
        ax.set_ylabel("weights")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--result_file", required=True, help="the attack record under --record_dir")
    p.add_argument("--record_dir", default="record", help="where the attack records are")
    p.add_argument("--defenses", default="ft,d3", help="defense outputs under <record>/defense/, joined by commas")
    p.add_argument("--layers", default=None,
                   help="module names joined by commas, or all_linear; unset: the layers D3 selects for the model")
    p.add_argument("--bins", type=int, default=100, help="histogram bins")
    p.add_argument("--log_y", action="store_true", help="count axis in log scale (the spike at 0 dwarfs the rest)")
    p.add_argument("--out", default=None, help="write PREFIX.csv and PREFIX.png instead of the default")
    args = p.parse_args(argv)
    if args.bins < 1:
        raise UserError(f"--bins {args.bins}: give a positive number")
    record = open_record(args.record_dir, args.result_file)
    defenses = split_names(args.defenses, "defenses")
    outputs = {d: defense_output(record, d) for d in defenses}
    pairs = {d: model_pair(record, out) for d, out in outputs.items()}
    init = next(iter(pairs.values()))[0]
    layers = chosen_layers(init, record.meta["model"], args.layers)
    prefix = output_prefix(args.out, [record], "weight_diff_" + "+".join(defenses))

    diffs = {d: differences(pairs[d][0], pairs[d][1], layers)
             for d in progress(defenses, desc="weight differences", unit="defense")}
    panels = [ALL] + (layers if len(layers) > 1 else [])
    rows = histogram_rows(diffs, panels, args.bins)
    csv, png = write_outputs(prefix, rows, draw(rows, panels, defenses, record.dir.name, args.log_y), save_figure)
    for d in defenses:
        per_layer = ", ".join(f"{layer} {frobenius(diffs[d][layer]):.4g}" for layer in layers)
        print(f"{d}: ||theta_def - theta_init||_F = {frobenius(diffs[d][ALL]):.4g} over {diffs[d][ALL].numel()} "
              f"weights ({per_layer})")
    print(f"wrote {csv} and {png}")
    return rows


if __name__ == "__main__":
    cli_main(main)
