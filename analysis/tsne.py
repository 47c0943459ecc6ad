"""t-SNE of the penultimate-layer features of clean and backdoor test images, under the attacked model
and the defended one (the D3 paper's Figure 4a).

    python analysis/tsne.py --result_file badnet_demo --dataset_path DATA
    python analysis/tsne.py --result_file badnet_demo --defense d3 --n 1000 --random_seed 0 --perplexity 30

The features are the input of the model's classifier layer (``models/registry.py``
``ModelLayers.classifier``: ``linear`` for PreAct-ResNet18, ``classifier`` for VGG19-BN, timm's own
``pretrained_cfg["classifier"]``), caught by a forward hook on that layer, so no architecture needs
code here. A wrapped defended model (PDB) is run whole, its defensive trigger included, and its inner
model's classifier is hooked. The models run in eval mode, in float32 (no autocast).

``--n`` clean test images (balanced over the classes: one image of each class in turn, the classes
and the images drawn with ``--random_seed``) and ``--n`` backdoor test images (drawn uniformly with
the same seed) are embedded together, one seeded ``sklearn.manifold.TSNE`` per model (PCA start,
``--perplexity``). A set smaller than ``--n`` is taken whole, and the script says so. The same points
are used for every model, so the panels compare like with like.

Writes ``R/analysis/tsne.csv`` (``tsne_<D>`` with ``--defense D``), one row per model and point:
``model`` (``attacked`` or the defense), ``set`` (``clean`` or ``backdoor``), ``index`` (position in
the clean test set), ``true_label``, ``pred_label`` (that model's prediction), ``x``, ``y``; and the
``.png``: one panel per model, clean points coloured by their class, backdoor points one black marker.
The paper's figure shows the backdoor points in one cluster of their own under the attacked model and
back among their true classes after D3. scikit-learn is the optional extra ``analysis``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn

from analysis.common import (add_evaluation_arguments, check_evaluation_arguments, defense_output, evaluation_sets,
                             open_record, optional_import, output_prefix, split_names, write_outputs)
from attack.record import load_model
from models import model_layers
from utils.cli import cli_main
from utils.config import resolve_device
from utils.device import place_model
from utils.errors import UserError
from utils.loader import Normalizer
from utils.plots import pyplot, save_figure
from utils.progress import progress

ATTACKED = "attacked"


def balanced_subsample(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` positions (sorted) with the classes as even as they allow: each class's images in a seeded
    order, taken one per class in turn (the classes too in a seeded order); all when there are fewer."""
    classes = labels.unique()
    classes = classes[torch.randperm(len(classes), generator=generator)]
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    rounds = max((len(idx) for idx in per_class), default=0)
    order = [idx[r] for r in range(rounds) for idx in per_class if r < len(idx)]
    return torch.stack(order[:n]).sort().values if order and n else torch.empty(0, dtype=torch.long)


def uniform_subsample(size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(size, generator=generator)[:n].sort().values


def classifier_layer(model: nn.Module, model_name: str) -> nn.Module:
    """The module named ``ModelLayers.classifier`` for ``model_name``, inside a wrapper (PDB) if there is one."""
    inner = getattr(model, "unwrapped", model)
    name = model_layers(model_name, inner).classifier
    modules = dict(inner.named_modules())
    if name not in modules:
        raise UserError(f"the model {model_name} has no module {name!r}, the classifier its model file names")
    return modules[name]


@torch.no_grad()
def penultimate_features(model: nn.Module, model_name: str, images: torch.Tensor, normalizer: Normalizer, *,
                         device, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier layer's input, flattened to ``[N, D]`` (float32, CPU), and the logits, for uint8 images."""
    caught: list[torch.Tensor] = []
    hook = classifier_layer(model, model_name).register_forward_pre_hook(
        lambda module, inputs: caught.append(inputs[0].detach().float().flatten(1).cpu()))
    was_training = model.training
    model.eval()
    feats, logits = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            caught.clear()
            logits.append(model(normalizer(images[i:i + batch_size].to(device))).float().cpu())
            if len(caught) != 1:
                raise UserError(f"the classifier layer of {model_name} ran {len(caught)} times in one forward "
                                f"pass; its input is no single feature vector per image")
            feats.append(caught[0])
    finally:
        hook.remove()
        model.train(was_training)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(feats), torch.cat(logits)


def embed(features: torch.Tensor, perplexity: float, seed: int):
    """A seeded 2-D t-SNE of ``features`` (rows), as a float64 numpy array."""
    manifold = optional_import("sklearn.manifold", "scikit-learn", "analysis")
    tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                         random_state=seed)
    return tsne.fit_transform(features.double().numpy())


def draw(rows: list[dict], models: list[str], record: str, num_classes: int, classes: list[str]):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo")

    def colour(k: int):  # a qualitative map's k-th colour; more classes spread over a continuous one
        return cmap(k) if num_classes <= 20 else cmap(k / max(1, num_classes - 1))
    for ax, model in zip(axes.flat, models):
        clean = [r for r in rows if r["model"] == model and r["set"] == "clean"]
        bd = [r for r in rows if r["model"] == model and r["set"] == "backdoor"]
        ax.scatter([r["x"] for r in clean], [r["y"] for r in clean], c=[colour(r["true_label"]) for r in clean],
                   s=6, alpha=0.8, linewidths=0)
        ax.scatter([r["x"] for r in bd], [r["y"] for r in bd], c="black", marker="x", s=10, linewidths=0.7,
                   label=f"backdoor ({len(bd)})")
        if num_classes <= 10:  # a legend entry per class; more classes would bury the panel
            for k in sorted({r["true_label"] for r in clean}):
                name = classes[k] if k < len(classes) else str(k)
                ax.scatter([], [], color=colour(k), s=12, label=name)
        title = "attacked model" if model == ATTACKED else f"after {model}"
        ax.set_title(f"{record}: {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return fig


def check_args(args) -> None:
    if args.n < 1:
        raise UserError(f"--n {args.n}: give a positive number of images per set")
    if not (math.isfinite(args.perplexity) and args.perplexity > 0):
        raise UserError(f"--perplexity {args.perplexity:g}: give a positive number (t-SNE's usual range is 5 to 50)")
    check_evaluation_arguments(args)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--result_file", required=True, help="the attack record under --record_dir")
    p.add_argument("--record_dir", default="record", help="where the attack records are")
    p.add_argument("--defense", default=None,
                   help="defense output(s) under <record>/defense/ (commas for several), each a panel; unset: "
                        "the attacked model alone")
    p.add_argument("--n", type=int, default=1000, help="clean and backdoor test images each")
    p.add_argument("--random_seed", type=int, default=0, help="seeds the subsampling and the t-SNE")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (below the number of points)")
    add_evaluation_arguments(p, "feature extraction batch size")
    args = p.parse_args(argv)
    check_args(args)
    optional_import("sklearn.manifold", "scikit-learn", "analysis")  # before any work: one line if missing
    record = open_record(args.record_dir, args.result_file)
    defenses = split_names(args.defense, "defense") if args.defense is not None else []
    if ATTACKED in defenses:
        raise UserError(f"--defense {ATTACKED!r} names the attacked model, which is always shown")
    outputs = {d: defense_output(record, d) for d in defenses}
    prefix = output_prefix(args.out, [record], "tsne" + ("_" + "+".join(defenses) if defenses else ""))
    sets = evaluation_sets(record, args.dataset_path, args.cache_dir)
    test, bd = sets.dataset.test, sets.backdoor
    if len(test) == 0 or len(bd) == 0:
        raise UserError(f"{record.dir}: the {'clean' if len(test) == 0 else 'backdoor'} test set is empty")
    points = min(args.n, len(test)) + min(args.n, len(bd))
    if args.perplexity >= points:
        raise UserError(f"--perplexity {args.perplexity:g}: t-SNE needs it below the number of points per model "
                        f"({points}); give a smaller one or a larger --n")
    models = {ATTACKED: load_model(record.dir), **{d: load_model(out) for d, out in outputs.items()}}
    device = resolve_device(args.device)

    g = torch.Generator().manual_seed(args.random_seed)
    clean_idx = balanced_subsample(test.labels, args.n, g)
    bd_pos = uniform_subsample(len(bd), args.n, g)
    for name, size in (("clean", len(test)), ("backdoor", len(bd))):
        if size < args.n:
            print(f"note: the {name} test set holds {size} images, fewer than --n {args.n}; all are used")
    images = torch.cat([test.images[clean_idx], bd.images[bd_pos]])
    labels = torch.cat([test.labels[clean_idx], bd.true_labels[bd_pos]]).tolist()
    index = torch.cat([clean_idx, bd.index[bd_pos]]).tolist()
    kinds = ["clean"] * len(clean_idx) + ["backdoor"] * len(bd_pos)
    spec = sets.dataset.spec
    normalizer = Normalizer(spec.mean, spec.std, device)

    rows = []
    for name in progress(list(models), desc="t-SNE", unit="model"):
        model = place_model(models[name], device).eval()
        feats, logits = penultimate_features(model, record.meta["model"], images, normalizer, device=device,
                                             batch_size=args.batch_size)
        xy = embed(feats, args.perplexity, args.random_seed)
        preds = logits.argmax(1).tolist()
        rows += [{"model": name, "set": kinds[i], "index": index[i], "true_label": labels[i], "pred_label": preds[i],
                  "x": float(xy[i, 0]), "y": float(xy[i, 1])} for i in range(len(kinds))]
        target = bd.target_labels[bd_pos]
        hit = (logits[len(clean_idx):].argmax(1) == target).float().mean().item()
        print(f"{name}: {feats.shape[1]}-d features of {len(clean_idx)} clean and {len(bd_pos)} backdoor images; "
              f"{100 * hit:.1f}% of these backdoor images predicted as the attack's label")
    fig = draw(rows, list(models), record.dir.name, spec.num_classes, sets.dataset.classes)
    csv, png = write_outputs(prefix, rows, fig, save_figure)
    print(f"wrote {csv} and {png}")
    return rows


if __name__ == "__main__":
    cli_main(main)
