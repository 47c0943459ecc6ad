"""What BackdoorBench's test-set rules would have chosen for ANP and FP on a finished defense output.

    python tools/test_set_rule.py --record_dir record --result_file badnet_demo --dataset_path DATA

An analysis for comparison, never a defense: it reads the clean and backdoor test sets, which no
defense here may. ANP and FP choose on held-out clean data (``defense/anp.py``, ``defense/fp.py``);
BackdoorBench chooses on the test sets:

* ANP: the threshold (0 to 0.9, step 0.05) with the lowest test ASR among those whose test
  accuracy stays within a 10% relative drop (its issue #35). Each threshold is applied to the
  attacked model with the masks the ANP run saved (``anp_mask_values.safetensors``);
* FP: pruning continues while test accuracy stays within a 10% relative drop. The count is found
  with the ranking the FP run saved (``fp_pruning.safetensors``), before fine-tuning; the figures
  printed are of the pruned model without fine-tuning, at the count FP chose and at BackdoorBench's.

Prints one table per defense (figures in %).
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import defense.anp as anp
import defense.fp as fp
from attack.record import load_attack_record, load_train_set, rebuild_backdoor_test
from models import create_model
from utils.cli import cli_main
from utils.config import resolve_device
from utils.device import place_model
from utils.errors import UserError
from utils.evaluate import Evaluator, predict
from utils.loader import Normalizer
from utils.metrics import accuracy
from utils.progress import progress
from utils.record import load_into, load_tensors, read_json, read_yaml
from utils.sources import load_dataset


def anp_rule(model, out: Path, evaluate) -> str:
    cfg, summary = read_yaml(out / "config.yaml"), read_json(out / "summary.json")
    ranking = anp.ranked_neurons(load_tensors(out / "anp_mask_values.safetensors"))
    steps = int(round(cfg["pruning_max"] / cfg["pruning_step"]))
    base = evaluate(model)
    rows = []
    thresholds = [round(i * cfg["pruning_step"], 10) for i in range(steps + 1)]
    for t in progress(thresholds, desc="anp: thresholds on the test sets", unit="threshold"):
        pruned = copy.deepcopy(model)
        count = sum(1 for value, _, _ in ranking if value <= t)
        anp.prune_neurons(pruned, ranking[:count])
        rows.append((t, count, evaluate(pruned)))
    allowed = [r for r in rows if (base["clean_acc"] - r[2]["clean_acc"]) / base["clean_acc"] <= cfg["acc_ratio"]]
    bb = min(allowed, key=lambda r: r[2]["asr"]) if allowed else None
    lines = [f"ANP on {out.parent.parent.name} (attacked model: ACC {100 * base['clean_acc']:.2f}, "
             f"ASR {100 * base['asr']:.2f})",
             f"{'threshold':>9} {'pruned':>7} {'test ACC':>9} {'test ASR':>9}  chosen by"]
    for t, count, m in rows:
        who = [w for w, hit in (("held-out rule (ours)", t == summary.get("threshold")),
                                ("BackdoorBench's test rule", bb is not None and t == bb[0])) if hit]
        lines.append(f"{t:>9.2f} {count:>7} {100 * m['clean_acc']:>9.2f} {100 * m['asr']:>9.2f}  {', '.join(who)}")
    return "\n".join(lines)


def fp_rule(model, out: Path, evaluate) -> str:
    cfg, summary = read_yaml(out / "config.yaml"), read_json(out / "summary.json")
    saved = load_tensors(out / "fp_pruning.safetensors")
    ranking = saved["ranking"]
    layer_name = cfg["prune_layer"]
    step = math.ceil(len(ranking) * cfg["once_prune_ratio"])
    base = evaluate(model)

    def pruned_by(count):
        pruned = copy.deepcopy(model)
        device = next(pruned.parameters()).device
        fp.prune_channels(dict(pruned.named_modules())[layer_name], ranking[:count].to(device))
        return pruned

    kept = 0
    for count in progress(range(step, len(ranking) + 1, step), desc="fp: pruned counts on the test set", unit="count"):
        if (base["clean_acc"] - evaluate(pruned_by(count), clean_only=True)["clean_acc"]) / base["clean_acc"] \
                > cfg["acc_ratio"]:
            break
        kept = count
    ours = int(summary["pruned_channels"])
    lines = [f"FP on {out.parent.parent.name} (attacked model: ACC {100 * base['clean_acc']:.2f}, "
             f"ASR {100 * base['asr']:.2f}); pruned models before fine-tuning",
             f"{'rule':<26} {'pruned':>7} {'test ACC':>9} {'test ASR':>9}"]
    for who, count in (("held-out rule (ours)", ours), ("BackdoorBench's test rule", kept)):
        m = evaluate(pruned_by(count))
        lines.append(f"{who:<26} {count:>7} {100 * m['clean_acc']:>9.2f} {100 * m['asr']:>9.2f}")
    lines.append(f"(after fine-tuning, ours: ACC {100 * summary['clean_acc']:.2f}, ASR {100 * summary['asr']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record_dir", default="record")
    p.add_argument("--result_file", required=True, help="the attack record whose anp/ and fp/ outputs to read")
    p.add_argument("--dataset_path", default="./data")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    record = load_attack_record(Path(args.record_dir) / args.result_file)
    device = resolve_device(args.device)
    dataset = load_dataset(record.meta["dataset"]["name"], args.dataset_path, None)
    if dataset.fingerprint != record.meta["dataset"]["fingerprint"]:
        raise UserError(f"the data at {args.dataset_path} is not the data the attack used; pass its --dataset_path")
    dataset = load_train_set(record, dataset)
    model = create_model(record.meta["model"], dataset.spec.num_classes, pretrained=False)
    load_into(model, load_tensors(record.dir / "model.safetensors"), str(record.dir / "model.safetensors"))
    model = place_model(model, device).eval()
    normalizer = Normalizer(dataset.spec.mean, dataset.spec.std, device)
    full = Evaluator(dataset.test, rebuild_backdoor_test(record.meta, record.dir, dataset), normalizer, device=device)

    def evaluate(m, clean_only=False):
        if clean_only:  # FP's rule reads clean accuracy alone
            logits = predict(m, dataset.test.images, normalizer, device=device)
            return {"clean_acc": accuracy(logits.argmax(1), dataset.test.labels)}
        return full(m)

    parts = []
    for name, rule in (("anp", anp_rule), ("fp", fp_rule)):
        out = record.dir / "defense" / name
        if (out / "record.json").is_file():
            parts.append(rule(model, out, evaluate))
    if not parts:
        raise UserError(f"{record.dir} has no finished anp or fp output; run defense/anp.py or defense/fp.py first")
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    cli_main(main)
